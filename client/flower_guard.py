"""``flwr-clientapp`` as a site runs it: Flower's own runner, behind the site's pin on the app bundle.

In Flower the owner's code runs at every site: the SuperNode receives the app bundle (FAB)
with the run and starts it.  A site that joins a federation therefore decides *which*
bundle may run.  ``xkt-client join`` starts the SuperNode with a private ``bin/`` first on
its ``PATH`` whose ``flwr-clientapp`` runs this module instead of Flower's script.  Before
Flower unpacks a bundle, this guard computes its sha256 (the same digest Flower reports as
the FAB hash) and refuses it unless ``SITE/site.toml`` ``[policy] app_sha256`` lists it.
A refused bundle is never unpacked, imported or run; Flower reports the task as failed to
the owner.  The digest is then handed to the ClientApp (``XKT_FAB_SHA256``) for its report.

The guard is site code: it comes from the site's own xkt install, never from the bundle.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xkt.client.federated_client import FAB_HASH_ENV
from xkt.shared.errors import PolicyError
from xkt.shared.site_policy import check_app, load_policy

SITE_ENV = "XKT_SITE"  # the site folder whose policy applies (set by xkt-client join)


def pinned_install(install: Callable[..., Any], site: Path) -> Callable[..., Any]:
    """Wrap Flower's ``install_from_fab`` so it runs only for a bundle the site pinned."""

    def checked(fab: bytes | Path, *args: Any, **kwargs: Any) -> Any:
        content = fab if isinstance(fab, bytes) else Path(fab).read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        check_app(load_policy(site), digest)  # PolicyError: nothing was unpacked
        os.environ[FAB_HASH_ENV] = digest
        return install(fab, *args, **kwargs)

    return checked


def main() -> None:
    """Entry point: install the pin, then hand over to Flower's ``flwr-clientapp``."""
    site = os.environ.get(SITE_ENV)
    if not site:
        print(f"xkt guard: {SITE_ENV} is not set; start the site with `xkt-client join`", file=sys.stderr)
        raise SystemExit(7)
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    run_clientapp.install_from_fab = pinned_install(run_clientapp.install_from_fab, Path(site))  # type: ignore[attr-defined]
    try:
        flwr_clientapp()
    except PolicyError as error:  # normally reported by Flower's runner; this is the last line of defence
        print(f"xkt guard: {error.message} (fix: {error.hint})", file=sys.stderr)
        raise SystemExit(7) from None


if __name__ == "__main__":
    main()
