"""The site's ClientApp handlers, called in-process with real Flower messages.

What is checked here is the order a round runs in: the site's policy is decided before the
artifact is looked at and before any site data is read, and a ClientApp that did not come
through the site's guard refuses to run at all.  The whole run over the network is in
``tests/integration/test_federation.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from torch import nn

from xkt.client import federated_client as fc
from xkt.shared.errors import ConfigError, PolicyError
from xkt.shared.federated_wire import ADAPT, CONFIG
from xkt.shared.federation import shared_names
from xkt.shared.signing import fingerprint, generate_keypair, load_public_key


def _site(tmp_path: Path, *, methods: list[str], owner: str, extra: str = "") -> Path:
    """A site folder with a policy and NO target/ folder: reading data would fail loudly."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "site.toml").write_text(
        "[policy]\n"
        f"allowed_owner_keys = [{json.dumps(owner)}]\n"
        f"allowed_methods = {json.dumps(methods)}\n"
        f'app_sha256 = ["{"a" * 64}"]\n'
        "max_upload_bytes = 1000000\n" + extra,
        encoding="utf-8",
    )
    return site


def _call(tmp_path: Path, site: Path, owner_pub: Path, method: str, **more: float) -> None:
    settings = {"round": 1, "method": method, "local-epochs": 1, "artifact-sha256": "b" * 64}
    settings |= {name.replace("_", "-"): value for name, value in more.items()}
    msg = Message(RecordDict({CONFIG: ConfigRecord(settings)}), dst_node_id=1, message_type=ADAPT)
    node_config = {"site": str(site), "out": str(tmp_path / "out"), "owner-key": str(owner_pub)}
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    fc.adapt_round(msg, context)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower's runner sets in a ClientApp process before it builds any Message."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


@pytest.fixture
def owner(tmp_path: Path) -> Path:
    _, public = generate_keypair(tmp_path / "owner")
    return public


def test_a_disallowed_method_is_refused_before_artifact_and_data(
    tmp_path: Path, owner: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fc.FAB_HASH_ENV, "a" * 64)
    site = _site(tmp_path, methods=["shot"], owner=fingerprint(load_public_key(owner)))
    with pytest.raises(PolicyError) as caught:
        _call(tmp_path, site, owner, "cmcd")
    assert caught.value.reason == "method-not-allowed"
    assert not (tmp_path / "out" / "artifacts").exists()


def test_an_unknown_owner_key_is_refused_first(tmp_path: Path, owner: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fc.FAB_HASH_ENV, "a" * 64)
    site = _site(tmp_path, methods=["shot"], owner="ed25519:" + "0" * 64)
    with pytest.raises(PolicyError) as caught:
        _call(tmp_path, site, owner, "shot")
    assert caught.value.reason == "owner-not-allowed"


def test_an_unpinned_bundle_is_refused(tmp_path: Path, owner: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fc.FAB_HASH_ENV, "c" * 64)
    site = _site(tmp_path, methods=["shot"], owner=fingerprint(load_public_key(owner)))
    with pytest.raises(PolicyError) as caught:
        _call(tmp_path, site, owner, "shot")
    assert caught.value.reason == "app-not-pinned"


def test_without_the_guard_nothing_runs(tmp_path: Path, owner: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fc.FAB_HASH_ENV, raising=False)
    site = _site(tmp_path, methods=["shot"], owner=fingerprint(load_public_key(owner)))
    with pytest.raises(PolicyError) as caught:
        _call(tmp_path, site, owner, "shot")
    assert caught.value.reason == "app-not-verified"


def test_an_allowed_request_gets_as_far_as_the_missing_artifact(
    tmp_path: Path, owner: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: with everything allowed, the next step (the artifact) is reached."""
    monkeypatch.setenv(fc.FAB_HASH_ENV, "a" * 64)
    site = _site(tmp_path, methods=["shot"], owner=fingerprint(load_public_key(owner)))
    with pytest.raises(Exception) as caught:
        _call(tmp_path, site, owner, "shot")
    assert getattr(caught.value, "reason", "") == "missing-artifact"


def test_a_site_that_requires_dp_refuses_a_round_with_too_little_noise(
    tmp_path: Path, owner: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fc.FAB_HASH_ENV, "a" * 64)
    site = _site(
        tmp_path, methods=["shot"], owner=fingerprint(load_public_key(owner)), extra="min_dp_noise_multiplier = 0.5\n"
    )
    with pytest.raises(PolicyError) as caught:
        _call(tmp_path, site, owner, "shot", dp_clip_norm=1.0, dp_noise_multiplier=0.1)
    assert caught.value.reason == "dp-too-weak"
    assert not (tmp_path / "out" / "artifacts").exists()


def test_a_site_that_uploads_nothing_takes_no_part(
    tmp_path: Path, owner: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fc.FAB_HASH_ENV, "a" * 64)
    site = tmp_path / "site"
    site.mkdir()
    owner_fp = fingerprint(load_public_key(owner))
    (site / "site.toml").write_text(
        f'[policy]\nallowed_owner_keys = ["{owner_fp}"]\nallowed_methods = ["shot"]\napp_sha256 = ["{"a" * 64}"]\n',
        encoding="utf-8",
    )
    with pytest.raises(PolicyError) as caught:
        _call(tmp_path, site, owner, "shot")
    assert caught.value.reason == "upload-too-large"


def test_a_site_that_requires_secure_aggregation_refuses_a_plain_round_before_any_data(
    tmp_path: Path, owner: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fc.FAB_HASH_ENV, "a" * 64)
    extra = "require_secure_aggregation = true\n"
    site = _site(tmp_path, methods=["shot"], owner=fingerprint(load_public_key(owner)), extra=extra)
    with pytest.raises(PolicyError) as caught:
        _call(tmp_path, site, owner, "shot")
    assert caught.value.reason == "secagg-required"
    assert not (tmp_path / "out" / "artifacts").exists()
    with pytest.raises(ConfigError) as caught_missing:  # the same site takes a secure round (up to the artifact)
        _call(tmp_path, site, owner, "shot", secure_aggregation=True)
    assert caught_missing.value.reason == "missing-artifact"


def _settings(round_number: int, clip: float = 8.0) -> fc.RoundSettings:
    record = {"round": round_number, "method": "shot", "local-epochs": 1, "artifact-sha256": "b" * 64}
    return fc.RoundSettings.from_record(
        ConfigRecord(record | {"secure-aggregation": True, "secagg-clipping-range": clip})
    )


def test_the_kept_secure_update_comes_back_in_shared_name_order(tmp_path: Path) -> None:
    update = {"z.weight": np.full((2, 2), 0.5, np.float32), "a.bias": np.array([-1.0, 2.0], np.float32)}
    fc._keep_secure_update(tmp_path, _settings(3), update, examples=17)
    arrays, examples = fc._read_secure_update(tmp_path, 3)
    assert examples == 17
    assert [a.tolist() for a in arrays] == [[[0.5, 0.5], [0.5, 0.5]], [-1.0, 2.0]]  # z first, as given, not sorted
    with pytest.raises(ConfigError) as caught:  # a stale update is never sent for another round
        fc._read_secure_update(tmp_path, 4)
    assert caught.value.reason == "missing-update"


def test_an_update_beyond_the_secagg_clipping_range_is_refused_not_clipped(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        fc._keep_secure_update(tmp_path, _settings(1, clip=1.0), {"w": np.array([0.5, -1.5], np.float32)}, examples=3)
    assert caught.value.reason == "secagg-range" and "1.5" in str(caught.value)
    assert not (tmp_path / fc.SECURE_UPDATE).exists()


def test_the_local_digest_covers_exactly_what_never_travels() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    names = shared_names(model)
    before = fc.local_state_sha256(model, names)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # a shared parameter: aggregation may change it
    assert fc.local_state_sha256(model, names) == before
    model[1].num_batches_tracked += 1  # an integer buffer: it must not change
    assert fc.local_state_sha256(model, names) != before
