"""``xkt-bench federated`` end to end: virtual sites on Flower's simulation engine (Ray), real processes.

A tiny render split across two sites with class skew, a tiny untrained signed ResNet, two
rounds of one local epoch: seconds of compute, most of the time is Ray starting.  Afterwards
nothing the command started may still run: no process that names its work folder (every
Flower process gets ``FLWR_HOME`` under it) and no new Ray process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xkt.shared.artifact import load_artifact
from xkt.shared.models import resolve_arch
from xkt.shared.render import TASK_CLASSES
from xkt.shared.signing import load_public_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from owner_fixtures import save_signed_toy  # noqa: E402

BIN = Path(sys.executable).parent
PROC = Path("/proc")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not (PROC / "self" / "environ").exists(), reason="the stray-process check reads /proc"),
]


def run(*args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout_s)
    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-2000:]
    return completed


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # gone meanwhile, or not ours to read
        return b""


def processes_naming(text: str) -> list[str]:
    """Command lines of live processes whose command line or environment contains ``text``."""
    needle = text.encode()
    found = []
    for entry in PROC.glob("[0-9]*"):
        cmdline = _read(entry / "cmdline")
        if needle in cmdline or needle in _read(entry / "environ"):
            shown = cmdline.replace(b"\0", b" ")[:160].decode(errors="replace")
            found.append(f"{entry.name}: {shown}")
    return found


def ray_pids() -> set[int]:
    """Ray's daemons and workers, told apart by their command lines (a check only; nothing is killed by name)."""
    marks = (b"ray::", b"/ray/core/src/ray/", b"/site-packages/ray/")
    return {int(e.name) for e in PROC.glob("[0-9]*") if any(m in _read(e / "cmdline") for m in marks)}


def test_two_virtual_sites_two_rounds_then_nothing_left_running(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run("xkt-bench", "data", "--out", str(data), "--per-class", "2", "--site-per-class", "12", "--size", "32",
        "--sites", "2", "--skew", "2", "-q")  # fmt: skip
    toy = save_signed_toy(
        tmp_path / "owner", arch=resolve_arch("resnet_tiny", {}, len(TASK_CLASSES)), class_names=TASK_CLASSES
    )
    work = tmp_path / "fed"
    ray_before = ray_pids()
    completed = run(
        "xkt-bench", "federated", "--sites", "2", "--rounds", "2", "--local-epochs", "1", "--data", str(data),
        "--model", str(toy.model_dir), "--owner-key", str(toy.owner_pub), "--out", str(work), "--json", "-q",
    )  # fmt: skip
    assert processes_naming(str(work)) == []
    assert ray_pids() - ray_before == set(), "Ray processes outlived the command"

    result = json.loads(completed.stdout)
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    for record in result["rounds"]:
        assert record["replied"] == 2 and not record["failed"], record
        assert all(m["num-examples"] > 0 and 0.0 <= m["accuracy"] <= 1.0 for m in record["metrics"].values())
    for site in result["sites"]:
        assert site["replied_rounds"] == [1, 2]
        out = work / "sites" / f"site-{site['site']}" / "out"
        report = json.loads((out / "report.json").read_text())
        assert [r["round"] for r in report["rounds"]] == [1, 2] and report["accuracy_after"] == site["accuracy"]
        adapted = load_artifact(out / "adapted", [load_public_key(out / "site-key" / "owner.pub")])
        assert adapted.manifest.provenance["kind"] == "federated"
        assert adapted.manifest.input_spec.modality == "depth"

    shares = result["class_shares"]  # non-IID: the two sites see clearly different class mixes
    assert shares["tv_mean"] > 0.15 and shares["share_min"] < 0.25 * shares["share_max"], shares
    timing = result["timing"]
    assert 0.0 <= timing["outside_local_share"] < 1.0 and timing["round_seconds_mean"] > 0.0
    assert (work / "out" / "rounds.json").is_file() and (work / "out" / "global-shared.safetensors").is_file()
