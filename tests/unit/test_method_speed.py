"""``benchmarks/method_speed.py`` on a tiny benchmark: 16 px, 48 target images, a fresh resnet_tiny (width 4).

Checks the structure of the result and that every method that trains reports a positive rate;
the numbers themselves only mean something at the real size.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from xkt.benchmarks.method_speed import (
    ONE_EPOCH,
    check_one_epoch,
    default_methods,
    main,
    one_epoch_config,
    parse_methods,
)
from xkt.client.methods import METHODS
from xkt.client.methods.tgmb_tgkt import TgmbTgktConfig
from xkt.shared.errors import ConfigError
from xkt.shared.models import resolve_arch
from xkt.shared.render import TASK_CLASSES
from xkt.shared.shapes_benchmark import ShapesConfig, write_shapes_benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from owner_fixtures import save_signed_toy  # noqa: E402

pytestmark = pytest.mark.timeout(60)

TOP_KEYS = {
    "task",
    "data",
    "site",
    "model",
    "target_images",
    "pairs",
    "machine",
    "load_avg_1m",
    "overrides",
    "config",
    "warmup_s",
    "date",
    "methods",
}
ROW_KEYS = {
    "method",
    "trains",
    "batch_size",
    "pair_batch_size",
    "stages",
    "train_images",
    "train_s",
    "images_per_s",
    "monitor_s",
    "wall_s",
    "other_s",
    "cpu_s",
}
STAGE_KEYS = {"stage", "steps", "images", "train_s", "images_per_s", "first_step_s", "steady_images_per_s"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Built-in data at 16 px and a signed, untrained resnet_tiny (width 4): (data, model)."""
    root = tmp_path_factory.mktemp("speed")
    write_shapes_benchmark(root / "data", ShapesConfig(size=16, per_class=4, site_per_class=8))
    spec = resolve_arch("resnet_tiny", {"width": 4}, len(TASK_CLASSES), bottleneck_dim=32)
    toy = save_signed_toy(
        root,
        arch=spec,
        class_names=TASK_CLASSES,
        size=16,
        model_id="method-speed-test",
        provenance={"trainer": "tests/unit/test_method_speed.py"},
    )
    return root / "data", toy.model_dir


@pytest.fixture(scope="module")
def measured(tiny: tuple[Path, Path]) -> tuple[dict[str, Any], str, str]:
    """One run of every registered method: (returned result, stdout, stderr)."""
    data, model = tiny
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = main(["--data", str(data), "--model", str(model), "--threads", "1", "--json"])
    return result, out.getvalue(), err.getvalue()


def test_every_method_has_a_row_and_trainers_a_positive_rate(measured: tuple[dict[str, Any], str, str]) -> None:
    result, _, _ = measured
    rows = {row["method"]: row for row in result["methods"]}
    assert list(rows) == list(default_methods()) and set(rows) == set(METHODS)
    assert result["target_images"] == 48 and result["pairs"] >= 2
    for name, row in rows.items():
        assert set(row) == ROW_KEYS, name
        assert row["wall_s"] > 0 and row["cpu_s"] >= 0
        if not METHODS[name].trains:
            assert row["images_per_s"] == 0.0 and row["stages"] == [] and row["train_s"] == 0.0
            continue
        assert row["images_per_s"] > 0 and row["train_s"] > 0 and row["monitor_s"] > 0
        assert row["wall_s"] >= row["train_s"] + row["monitor_s"]
        assert row["batch_size"] == METHODS[name].batch_size  # the method's own preset
        assert (row["pair_batch_size"] is not None) == METHODS[name].needs_pairs
        for stage in row["stages"]:
            assert set(stage) == STAGE_KEYS
            assert stage["images_per_s"] > 0 and stage["images"] in (47, 48)  # one epoch of the target set
            assert stage["steps"] == -(-stage["images"] // row["batch_size"])
            assert (stage["steady_images_per_s"] is None) == (stage["steps"] == 1)
        assert row["train_images"] == sum(s["images"] for s in row["stages"])
    assert [s["stage"] for s in rows["tgmb-tgkt"]["stages"]] == ["tgmb", "tgkt"]  # one epoch of each stage
    assert [s["stage"] for s in rows["shot"]["stages"]] == ["adapt"]


def test_json_on_stdout_has_the_documented_keys(measured: tuple[dict[str, Any], str, str]) -> None:
    result, stdout, stderr = measured
    assert stdout.count("\n") == 1
    printed = json.loads(stdout)
    assert printed == json.loads(json.dumps(result)) and set(printed) == TOP_KEYS
    assert set(printed["machine"]) == {"cores", "torch_threads", "torch", "python", "platform"}
    assert printed["machine"]["torch_threads"] == 1 and printed["machine"]["torch"] == torch.__version__
    assert printed["model"]["arch"]["name"] == "resnet_tiny" and printed["model"]["image_size"] == 16
    assert printed["config"]["epochs"] == 1 and printed["config"]["tgmb_tgkt"]["tgmb_epochs"] == 1
    assert printed["config"]["batch_size"] == 0 and printed["overrides"][-len(ONE_EPOCH) :] == list(ONE_EPOCH)
    assert "images/s" in stderr and "tgmb-tgkt" in stderr  # the table goes to stderr


def test_methods_are_checked_and_stages_forced_to_one_epoch() -> None:
    assert parse_methods("shot, socket") == ("shot", "socket")
    assert parse_methods(None)[0] == "source-only"
    for bad in ("shot,shot", "shot,bogus", ","):
        with pytest.raises(ConfigError):
            parse_methods(bad)
    cfg = one_epoch_config(["epochs=5", "tgmb_tgkt.tgmb_epochs=3", "seed=2"], threads=1)
    assert (cfg.epochs, cfg.tgmb_tgkt.tgmb_epochs, cfg.seed, cfg.threads) == (1, 1, 2, 1)
    for name in METHODS:
        check_one_epoch(cfg, name)
    with pytest.raises(ConfigError) as caught:
        check_one_epoch(replace(cfg, tgmb_tgkt=TgmbTgktConfig(tgmb_epochs=2)), "tgmb-tgkt")
    assert caught.value.reason == "stage-too-long"


def test_an_unknown_method_exits_before_any_work(tiny: tuple[Path, Path]) -> None:
    data, model = tiny
    with pytest.raises(SystemExit) as caught:
        main(["--data", str(data), "--model", str(model), "--methods", "shot,bogus"])
    assert caught.value.code == 2
