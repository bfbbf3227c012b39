"""``xkt-client csr``: make the site's TLS key and a signing request for the owner."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xkt.client.csr import make_csr
from xkt.shared.cli_support import JsonOption, QuietOption, VerboseOption, command
from xkt.shared.log import emit_json, stderr_console


def csr(
    site_id: Annotated[str, typer.Option("--site-id", help="This site's id, as agreed with the owner.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for site.key (mode 0600, stays here) and site.csr.")],
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Create site.key and site.csr; send only site.csr to the owner (`provision sign-csr`)."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        key_path, csr_path = make_csr(site_id, out)
        if json_output:
            emit_json({"ok": True, "site_id": site_id, "key": str(key_path), "csr": str(csr_path)})
        elif not quiet:
            stderr_console().print(
                f"wrote {key_path} (keep secret, never send) and {csr_path}\n"
                f"send {csr_path.name} to the owner; put the returned site.crt and ca.crt in {out}",
                markup=False,
            )
