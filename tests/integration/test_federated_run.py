"""Federated adaptation on Flower's real deployment engine, on loopback.

Real processes throughout: ``xkt-server federate`` (a SuperLink with TLS and SuperNode
authentication, the fleet-only nginx proxy, ``flwr run`` of the xkt app bundle) and one
``xkt-client join`` per site (a SuperNode dialling out through the proxy, the site's guard
in front of Flower's app runner).  The model is a tiny untrained ResNet and the data a
small render split across two sites, so a round is seconds of compute; most of the time is
Flower's polling (about 3 s per hop).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
import torch
from safetensors import safe_open

from xkt.shared.artifact import load_artifact
from xkt.shared.federation import shared_names, split_state, weighted_average
from xkt.shared.signing import load_public_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from federation_fixtures import (  # noqa: E402
    Federation,
    finish,
    make_federation,
    make_site,
    read_json_line,
    start_federate,
    start_join,
    stop_all,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx (make install installs it)"),
]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return make_federation(tmp_path_factory.mktemp("fed"))


def kill_site(join: subprocess.Popen[bytes], supernode_pid: int) -> None:
    """SIGKILL a site: its SuperNode's process group (SuperNode, app runner) and the join command."""
    os.killpg(supernode_pid, signal.SIGKILL)
    join.kill()
    join.wait()


def test_two_sites_two_rounds_over_tls_with_node_auth(federation: Federation) -> None:
    sites = [make_site(federation, f"site{i}", i) for i in (0, 1)]
    out = federation.root / "run-2x2"
    owner = start_federate(federation, sites, out, "--rounds", "2", "--min-sites", "2", "--local-epochs", "1")
    joins: list[subprocess.Popen[bytes]] = []
    try:
        ready = read_json_line(owner, 120)
        assert ready.get("event") == "ready" and ready["app_sha256"] == federation.app_sha256, ready
        joins = [start_join(federation, site, ready["listen"]) for site in sites]
        result = finish(owner, 400)
    finally:
        stop_all([owner, *joins])
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    for record in result["rounds"]:
        assert record["replied"] == 2 and not record["failed"]
        assert all(m["num-examples"] > 0 and 0.0 <= m["accuracy"] <= 1.0 for m in record["metrics"].values())
    for site in sites:
        report = json.loads((site["out"] / "report.json").read_text())
        assert [r["round"] for r in report["rounds"]] == [1, 2]
        adapted = load_artifact(site["out"] / "adapted", [load_public_key(site["out"] / "site-key" / "owner.pub")])
        assert adapted.manifest.provenance["kind"] == "federated"


def test_a_site_killed_mid_round_is_waited_out_and_rejoins_the_next_round(federation: Federation) -> None:
    """Quorum 1 of 2: round 1 closes on the survivor within the straggler timeout; the restarted site is back in round 2.

    The restarted ``xkt-client join`` ends the killed SuperNode's session itself (Flower would
    otherwise refuse the same key for about a minute), so the SuperLink reports the lost
    round-1 message as failed at once and the site takes round 2.
    """
    sites = [make_site(federation, f"kill{i}", i) for i in (0, 1)]
    out = federation.root / "run-kill"
    args = ["--rounds", "2", "--min-sites", "1", "--local-epochs", "3", "--straggler-timeout", "30"]
    owner = start_federate(federation, sites, out, *args)
    procs = [owner]
    try:
        ready = read_json_line(owner, 120)
        survivor, victim = (start_join(federation, site, ready["listen"]) for site in sites)
        procs += [survivor, victim]
        supernode = int(read_json_line(victim, 60)["supernode_pid"])
        deadline = time.monotonic() + 120
        while not (sites[1]["out"] / "artifacts").exists():  # the victim received round 1 and starts training
            assert time.monotonic() < deadline, "the victim never received round 1"
            time.sleep(0.05)
        kill_site(victim, supernode)
        log = sites[1]["out"] / "rounds.jsonl"
        assert not log.exists(), "the victim finished round 1 before it was killed"
        time.sleep(5)
        procs.append(start_join(federation, sites[1], ready["listen"]))  # the same key: the same node id
        result = finish(owner, 400)
    finally:
        stop_all(procs)
    first, second = result["rounds"]
    assert first["replied"] == 1 and len(first["failed"]) == 1, first
    assert first["seconds"] <= 30 + 10  # within the straggler timeout (earlier once Flower reports the node gone)
    assert second["replied"] == 2 and not second["failed"], second
    victim_node = first["failed"][0].split(":")[0]
    assert victim_node in second["metrics"]
    rounds = [json.loads(line)["round"] for line in (sites[1]["out"] / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [2]


def test_a_site_that_did_not_pin_the_bundle_never_unpacks_it(federation: Federation) -> None:
    """The guard refuses the bundle before Flower installs it; the round goes on with the other site (with local DP)."""
    good = make_site(federation, "pinned", 0)
    refusing = make_site(federation, "unpinned", 1, app="0" * 64)
    out = federation.root / "run-unpinned"
    dp = ("--dp-clip", "1.0", "--dp-noise", "0.01")  # the pinned site uploads a clipped, noised update
    owner = start_federate(federation, [good, refusing], out, "--rounds", "1", "--min-sites", "1", *dp)
    procs = [owner]
    try:
        ready = read_json_line(owner, 120)
        procs += [start_join(federation, site, ready["listen"]) for site in (good, refusing)]
        result = finish(owner, 300)
    finally:
        stop_all(procs)
    (record,) = result["rounds"]
    assert record["replied"] == 1 and len(record["failed"]) == 1, record
    assert "app_sha256" in record["failed"][0] or "pinned" in record["failed"][0], record["failed"]
    apps = refusing["out"] / ".flwr" / "apps"
    assert not apps.exists() or not any(apps.iterdir())  # nothing was unpacked
    assert not (refusing["out"] / "artifacts").exists() and not (refusing["out"] / "rounds.jsonl").exists()
    assert result["config"]["dp_clip_norm"] == 1.0 and result["config"]["dp_noise_multiplier"] == 0.01
    (line,) = (good["out"] / "rounds.jsonl").read_text().splitlines()
    assert json.loads(line)["upload_bytes"] > 0


def test_secure_aggregation_equals_fedavg_and_leaves_integer_buffers_alone(federation: Federation) -> None:
    """SecAgg+ over two sites: the unmasked mean equals plain FedAvg of their kept updates within 1e-4.

    Each site keeps the update it had masked (``secure-update.safetensors``, its own disk) and
    its example count, so the plain weighted mean can be recomputed here and compared tensor
    by tensor with the owner's ``global-shared.safetensors``.  Both sites require secure
    aggregation in their policy.  Integer buffers and BN statistics never take part: the
    aggregate names only floating-point shared tensors, and each site's digest of its local
    tensors after training equals the digest after the final merge.
    """
    policy = "require_secure_aggregation = true\n"
    sites = [make_site(federation, f"secagg{i}", i, extra=policy) for i in (0, 1)]
    out = federation.root / "run-secagg"
    args = ["--rounds", "1", "--min-sites", "2", "--local-epochs", "2", "--secure-aggregation"]
    args += ["--set", "optim.lr=0.1"]  # updates far larger than the 1e-4 tolerance, so the comparison means something
    owner = start_federate(federation, sites, out, *args)
    procs = [owner]
    try:
        ready = read_json_line(owner, 120)
        procs += [start_join(federation, site, ready["listen"]) for site in sites]
        result = finish(owner, 400)
    finally:
        stop_all(procs)
    (record,) = result["rounds"]
    assert record["replied"] == 2 and not record["failed"] and record["secure_seconds"] > 0, record

    source = load_artifact(federation.model, [load_public_key(federation.owner_pub)]).model
    names = shared_names(source)
    start, _ = split_state(source.state_dict(), names)
    updates = []
    for site in sites:
        kept = site["out"] / "secure-update.safetensors"
        with safe_open(str(kept), framework="numpy") as handle:
            examples = float(handle.metadata()["examples"])
        updates.append(({k: start[k] + v for k, v in safetensors_numpy.load_file(kept).items()}, examples))
    fedavg = weighted_average(updates)
    secure = safetensors_numpy.load_file(out / "global-shared.safetensors")
    assert list(secure) == sorted(names) and set(secure) == set(fedavg)
    for name in names:
        assert secure[name].dtype == np.float32, name
        assert np.max(np.abs(secure[name] - fedavg[name])) <= 1e-4, name
    assert max(np.max(np.abs(secure[k] - start[k])) for k in names) > 1e-3  # the sites moved the model by 10× more

    integer = [k for k, v in source.state_dict().items() if not torch.is_floating_point(v)]
    assert integer and not set(integer) & set(secure)  # num_batches_tracked never took part
    for site in sites:
        report = json.loads((site["out"] / "report.json").read_text())
        assert report["local_sha256"] == report["rounds"][-1]["local_sha256"]
        assert report["rounds"][-1]["secure_aggregation"] is True


def test_a_killed_join_takes_its_supernode_with_it(federation: Federation) -> None:
    """SIGKILL of `xkt-client join` (no chance to clean up) still stops its SuperNode (parent-death signal)."""
    site = make_site(federation, "orphan", 0)
    join = start_join(federation, site, "127.0.0.1:9")  # nothing listens there: the SuperNode keeps retrying
    try:
        supernode = int(read_json_line(join, 60)["supernode_pid"])
        join.kill()
        join.wait()
        deadline = time.monotonic() + 30
        while Path(f"/proc/{supernode}").exists() and _state(supernode) != "Z":
            assert time.monotonic() < deadline, "the SuperNode outlived its join command"
            time.sleep(0.2)
    finally:
        stop_all([join])


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def test_an_owner_that_crashed_resumes_after_its_last_completed_round(federation: Federation) -> None:
    """SIGKILL of ``xkt-server federate`` after round 1 (its SuperLink, proxy and run die with it); ``--resume``.

    The restarted owner reuses the SuperLink's state database in ``--out``, so the sites'
    SuperNodes (still running, retrying) reconnect with their node ids; the run continues
    with round 2 from the global parameters round 1 produced, and both sites finish.
    """
    sites = [make_site(federation, f"resume{i}", i) for i in (0, 1)]
    out = federation.root / "run-resume"
    args = ["--rounds", "2", "--min-sites", "2", "--local-epochs", "1", "--join-timeout", "120"]
    first = start_federate(federation, sites, out, *args)
    procs = [first]
    try:
        ready = read_json_line(first, 120)
        procs += [start_join(federation, site, ready["listen"]) for site in sites]
        deadline = time.monotonic() + 300
        while not (out / "round-checkpoint.safetensors").exists():
            assert time.monotonic() < deadline and first.poll() is None, "round 1 never completed"
            time.sleep(0.2)
        first.kill()
        first.wait()
        port = ready["listen"].rsplit(":", 1)[1]
        second = start_federate(federation, sites, out, *args, "--resume", "--listen", f"127.0.0.1:{port}")
        procs.append(second)
        assert read_json_line(second, 120)["listen"] == ready["listen"]  # the sites keep dialling the same address
        result = finish(second, 400)
    finally:
        stop_all(procs)
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert result["rounds"][1]["replied"] == 2, result["rounds"][1]
    for site in sites:
        report = json.loads((site["out"] / "report.json").read_text())
        assert [r["round"] for r in report["rounds"]] == [1, 2]


def test_no_site_joining_in_time_is_a_clean_error(federation: Federation) -> None:
    site = make_site(federation, "absent", 0)  # registered, but never joins
    out = federation.root / "run-absent"
    owner = start_federate(federation, [site], out, "--rounds", "1", "--min-sites", "1", "--join-timeout", "5")
    try:
        assert read_json_line(owner, 120)["event"] == "ready"
        owner.wait(timeout=120)
        result = read_json_line(owner, 5)
    finally:
        stop_all([owner])
    assert owner.returncode == 3 and result["error"]["reason"] == "no-rounds", result
