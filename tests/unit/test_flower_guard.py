"""The site's guard in front of Flower's app runner: an unpinned bundle is never installed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from xkt.client import flower_guard
from xkt.client.federated_client import FAB_HASH_ENV
from xkt.shared.errors import PolicyError

BUNDLE = b"PK\x03\x04 a pretend app bundle"


def _site(tmp_path: Path, pinned: str) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "site.toml").write_text(f'[policy]\napp_sha256 = ["{pinned}"]\n', encoding="utf-8")
    return site


def test_a_pinned_bundle_is_installed_and_its_hash_handed_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FAB_HASH_ENV, raising=False)
    calls: list[Any] = []
    digest = hashlib.sha256(BUNDLE).hexdigest()
    install = flower_guard.pinned_install(lambda fab, **kw: calls.append((fab, kw)), _site(tmp_path, digest))
    install(BUNDLE, skip_prompt=True)
    assert calls == [(BUNDLE, {"skip_prompt": True})]
    assert os.environ[FAB_HASH_ENV] == digest


def test_an_unpinned_bundle_never_reaches_the_installer(tmp_path: Path) -> None:
    calls: list[Any] = []
    install = flower_guard.pinned_install(lambda fab, **kw: calls.append(fab), _site(tmp_path, "0" * 64))
    with pytest.raises(PolicyError) as caught:
        install(BUNDLE, skip_prompt=True)
    assert caught.value.reason == "app-not-pinned"
    assert calls == []


def test_the_guard_refuses_to_start_without_a_site(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(flower_guard.SITE_ENV, raising=False)
    with pytest.raises(SystemExit) as caught:
        flower_guard.main()
    assert caught.value.code == 7
