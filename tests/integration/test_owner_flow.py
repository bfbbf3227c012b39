"""The owner's flow through the real console scripts: data → keys → train → evaluate.

Each step is a separate process, as a user would run it, on a tiny render so the whole
file takes seconds.  The assertions are on exit codes, JSON on stdout and the files.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent


def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=300)
    assert completed.returncode == expect, completed.stderr + completed.stdout
    return completed


def run_json(*args: str, expect: int = 0) -> dict[str, Any]:
    return dict(json.loads(run(*args, "--json", expect=expect).stdout))


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("owner")
    data, keys, model = root / "data", root / "keys", root / "model"
    run(
        "xkt-bench",
        "data",
        "--kind",
        "shapes",
        "--out",
        str(data),
        "--per-class",
        "12",
        "--site-per-class",
        "12",
        "--size",
        "32",
        "--quiet",
    )
    run("xkt-server", "keys", "init", "--out", str(keys))
    args = ["train", "--data", str(data), "--key", str(keys / "owner.key"), "--out", str(model)]
    run("xkt-server", *args, "--arch", "resnet_tiny", "--epochs", "2", "--set", "batch_size=16", "--quiet")
    return {"data": data, "keys": keys, "model": model}


def test_keys_are_private_and_never_overwritten(owner: dict[str, Path]) -> None:
    mode = stat.S_IMODE(os.stat(owner["keys"] / "owner.key").st_mode)
    assert mode == 0o600
    result = run_json("xkt-server", "keys", "init", "--out", str(owner["keys"]), expect=3)
    assert result["ok"] is False and result["error"]["hint"]


def test_training_wrote_a_signed_artifact(owner: dict[str, Path]) -> None:
    assert {p.name for p in owner["model"].iterdir()} == {"weights.safetensors", "manifest.json", "manifest.sig"}
    manifest = json.loads((owner["model"] / "manifest.json").read_text())
    assert manifest["architecture"]["name"] == "resnet_tiny"
    assert manifest["provenance"]["data_fingerprint"].startswith("sha256:")


@pytest.mark.parametrize("modality", ["rgb", "depth", "ir"])
def test_evaluate_on_each_modality(owner: dict[str, Path], modality: str) -> None:
    args = ["evaluate", "--model", str(owner["model"]), "--site", str(owner["data"] / modality)]
    result = run_json("xkt-client", *args, "--owner-key", str(owner["keys"] / "owner.pub"))
    assert result["ok"] is True and result["modality"] == modality
    assert 0.0 <= result["accuracy"] <= 1.0 and result["count"] > 0
    assert set(result["per_class"]) <= set(json.loads((owner["model"] / "manifest.json").read_text())["class_names"])


def test_evaluate_refuses_a_model_signed_by_another_key(owner: dict[str, Path], tmp_path: Path) -> None:
    run("xkt-server", "keys", "init", "--out", str(tmp_path / "other"))
    args = ["evaluate", "--model", str(owner["model"]), "--site", str(owner["data"] / "depth")]
    result = run_json("xkt-client", *args, "--owner-key", str(tmp_path / "other" / "owner.pub"), expect=4)
    assert result["error"]["reason"] == "untrusted-key"


def test_validate_data_accepts_the_generated_sites(owner: dict[str, Path]) -> None:
    for modality in ("depth", "ir"):
        result = run_json("xkt-client", "validate-data", str(owner["data"] / modality))
        assert result["ok"] is True, result["findings"]
        assert result["counts"]["pairs"] > 0


def test_user_errors_are_one_line_with_a_fix(owner: dict[str, Path], tmp_path: Path) -> None:
    completed = run("xkt-client", "validate-data", str(tmp_path / "nowhere"), expect=3)
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "(fix: " in lines[0]
    completed = run(
        "xkt-server",
        "train",
        "--data",
        str(tmp_path),
        "--key",
        str(tmp_path / "none.key"),
        "--out",
        str(tmp_path / "m"),
        expect=3,
    )
    assert "Traceback" not in completed.stderr and len(completed.stderr.strip().splitlines()) == 1
