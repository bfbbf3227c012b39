"""The owner's round bookkeeping that needs no network: the per-round checkpoint and resuming from it.

``xkt-server federate`` restarts a SuperLink that died mid-run and starts the app again with
``resume``; the run then continues after the last completed round with the global parameters
that round produced, never mixing in a checkpoint of another model or layout.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from xkt.server import federated_server as fs
from xkt.shared.errors import ConfigError

START = {"conv.weight": np.zeros((2, 3), np.float32), "fc.bias": np.zeros(4, np.float32)}
CFG = fs.FederationConfig(model_dir="/m", owner_key="/k", out_dir="/o", rounds=3)


def _complete_rounds(out: Path, count: int, sha: str = "a" * 64) -> dict[str, np.ndarray]:
    """What run_federation leaves after ``count`` rounds: rounds.json and the checkpoint."""
    records = [
        fs.RoundRecord(round=r, sites=2, replied=2, metrics={"7": {"num-examples": 3.0}}) for r in range(1, count + 1)
    ]
    shared = {k: v + count for k, v in START.items()}
    for number in range(1, count + 1):
        fs._write_rounds(out, CFG, records[:number])
        fs._save_checkpoint(out, number, sha, shared)
    return shared


def test_without_a_checkpoint_the_run_starts_at_round_one(tmp_path: Path) -> None:
    records, shared = fs.resume_state(tmp_path, "a" * 64, START)
    assert records == [] and shared is START


def test_a_resumed_run_continues_after_the_last_completed_round(tmp_path: Path) -> None:
    saved = _complete_rounds(tmp_path, 2)
    records, shared = fs.resume_state(tmp_path, "a" * 64, START)
    assert [r.round for r in records] == [1, 2] and asdict(records[0])["metrics"] == {"7": {"num-examples": 3.0}}
    assert list(shared) == list(START)  # the model's order, not the file's
    for name in START:
        np.testing.assert_array_equal(shared[name], saved[name])


@pytest.mark.parametrize("change", ["model", "layout", "history"])
def test_a_checkpoint_that_does_not_continue_this_run_is_refused(tmp_path: Path, change: str) -> None:
    _complete_rounds(tmp_path, 2)
    sha, start = "a" * 64, START
    if change == "model":
        sha = "b" * 64
    elif change == "layout":
        start = {**START, "fc.bias": np.zeros(5, np.float32)}
    else:
        fs._write_rounds(tmp_path, CFG, [])  # rounds.json lost its rounds
    with pytest.raises(ConfigError) as caught:
        fs.resume_state(tmp_path, sha, start)
    assert caught.value.reason == "bad-resume"
