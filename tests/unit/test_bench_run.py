"""``xkt-bench run``: the table arithmetic, an end-to-end tiny run, resuming, and refusals."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from xkt.benchmarks.cli import app
from xkt.benchmarks.oracle import truth_dataset
from xkt.benchmarks.plots import gap_closed, mean_curves, mean_sd, summarise, write_plots
from xkt.benchmarks.run import BenchmarkPlan, check_methods, run_benchmark
from xkt.benchmarks.selection import selection_markdown, selection_rows
from xkt.server.source_training import ModelConfig, SourceTrainConfig
from xkt.shared.data import RGB, Preprocess
from xkt.shared.errors import ConfigError, DataError
from xkt.shared.shapes_benchmark import ShapesConfig, write_shapes_benchmark

pytestmark = pytest.mark.timeout(180)
METHODS = ("source-only", "shot", "oracle")
TINY_SOURCE = SourceTrainConfig(
    epochs=1, batch_size=16, model=ModelConfig(name="resnet_tiny", kwargs={"width": 4}, bottleneck_dim=32)
)
FAST = ("batch_size=16",)  # with epochs=1: one adaptation / oracle epoch


# ------------------------------------------------------------------ pure arithmetic


def _run(method: str, seed: int, accuracy: float, seconds: float = 1.0) -> dict[str, Any]:
    return {"method": method, "seed": seed, "accuracy": accuracy, "seconds": seconds}


def test_summary_mean_sd_gain_and_gap_on_known_numbers() -> None:
    runs = [
        _run("source-only", 0, 0.20, 1.0),
        _run("source-only", 1, 0.30, 3.0),
        _run("shot", 0, 0.50, 10.0),
        _run("shot", 1, 0.60, 20.0),
        _run("shot", 2, 0.70, 30.0),
        _run("oracle", 0, 0.85, 5.0),
        _run("other", 0, 0.99),  # not asked for: ignored
    ]
    rows = {row.method: row for row in summarise(runs, ["source-only", "shot", "oracle", "cmcd"])}
    assert list(rows) == ["source-only", "shot", "oracle"]  # methods without runs have no row
    src, shot, oracle = rows["source-only"], rows["shot"], rows["oracle"]
    assert (src.runs, shot.runs, oracle.runs) == (2, 3, 1)
    assert src.accuracy_mean == pytest.approx(0.25) and src.accuracy_sd == pytest.approx(0.0707107, abs=1e-6)
    assert shot.accuracy_mean == pytest.approx(0.60) and shot.accuracy_sd == pytest.approx(0.10)  # n - 1
    assert oracle.accuracy_sd == 0.0  # one seed
    assert shot.gain_points == pytest.approx(35.0) and src.gain_points == pytest.approx(0.0)
    assert shot.gap_closed == pytest.approx(0.35 / 0.60)
    assert src.gap_closed == pytest.approx(0.0) and oracle.gap_closed == pytest.approx(1.0)
    assert shot.seconds_mean == pytest.approx(20.0) and src.seconds_mean == pytest.approx(2.0)


def test_gain_and_gap_are_none_without_their_references() -> None:
    no_refs = summarise([_run("shot", 0, 0.5)], ["shot"])[0]
    assert no_refs.gain_points is None and no_refs.gap_closed is None
    no_oracle = {r.method: r for r in summarise([_run("source-only", 0, 0.2), _run("shot", 0, 0.5)], METHODS)}
    assert no_oracle["shot"].gain_points == pytest.approx(30.0) and no_oracle["shot"].gap_closed is None
    assert gap_closed(0.5, 0.4, 0.4) is None and gap_closed(0.5, 0.4, 0.3) is None  # no positive gap
    assert gap_closed(0.3, 0.4, 0.6) == pytest.approx(-0.5)  # worse than source-only: negative share
    assert mean_sd([0.4]) == (0.4, 0.0)
    assert mean_sd([0.1, 0.2, 0.6]) == (pytest.approx(0.3), pytest.approx(statistics.stdev([0.1, 0.2, 0.6])))


def test_unknown_method_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError) as caught:
        check_methods(["source-only", "shott"])
    assert caught.value.reason == "unknown-method" and "'shott'" in caught.value.message
    assert "shot" in caught.value.hint and "oracle" in caught.value.hint
    with pytest.raises(ConfigError):
        check_methods(["shot", "shot"])
    assert check_methods(["oracle", "shot"]) == ("oracle", "shot")


def test_unknown_method_on_the_command_line_exits_3_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--out", str(out), "--methods", "source-only,bogus", "--json"])
    assert result.exit_code == 3, result.output
    error = json.loads(result.stdout)["error"]
    assert error["reason"] == "unknown-method" and "oracle" in error["hint"]
    assert not out.exists()


def test_oracle_without_truth_labels_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        truth_dataset(tmp_path, "depth", RGB, Preprocess(16), ["a", "b"])
    assert caught.value.reason == "missing-truth" and "xkt-bench data" in caught.value.hint


def test_mean_curves_average_seeds_per_epoch() -> None:
    results = {
        "methods": ["shot", "source-only"],
        "runs": [
            {"method": "shot", "curve": [{"epoch": 0, "im": 1.0}, {"epoch": 1, "im": 0.0, "eval_accuracy": 0.5}]},
            {"method": "shot", "curve": [{"epoch": 0, "im": 3.0}, {"epoch": 1, "im": 1.0, "eval_accuracy": 0.7}]},
            {"method": "source-only", "curve": [{"epoch": 0, "im": 2.0}]},  # one point: no line
        ],
    }
    assert mean_curves(results, "im") == {"shot": ([0, 1], [2.0, 0.5])}
    assert mean_curves(results, "eval_accuracy") == {}  # a single epoch is no curve


def test_plots_are_skipped_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert write_plots({"summary": [], "runs": [], "methods": []}, tmp_path) == []
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """A tiny benchmark: 16 px, 72 target images, a 1-epoch resnet_tiny source, 1 adaptation epoch."""
    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    write_shapes_benchmark(data, ShapesConfig(seed=0, size=16, per_class=20, site_per_class=12))
    plan = BenchmarkPlan(
        out=root / "out",
        task="depth",
        methods=METHODS,
        seeds=(0, 1),
        data=data,
        epochs=1,
        overrides=FAST,
        source=TINY_SOURCE,
    )
    return root / "out", data, run_benchmark(plan)


def test_run_writes_runs_table_json_and_plots(bench: tuple[Path, Path, dict[str, Any]]) -> None:
    out, _, results = bench
    for name in ("results.json", "results.md", "settings.json", "accuracy.png", "epochs.png", "model/manifest.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        f"{m}-seed{s}.json" for m in METHODS for s in (0, 1)
    )  # one file per finished run, no checkpoint left behind
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [(m, s) for s in (0, 1) for m in METHODS]
    for run in results["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0 and run["seconds"] >= 0.0
        assert run["eval_images"] == 24 and run["target_images"] == 72
        assert (run["label_free"] is None) == (run["method"] == "oracle")
    source_only = next(r for r in results["runs"] if r["method"] == "source-only")
    for run in results["runs"]:  # epoch 0 is the verified source model, measured before adapting
        assert run["curve"][0]["epoch"] == 0
        assert run["curve"][0]["eval_accuracy"] == pytest.approx(source_only["accuracy"])
        if run["method"] != "source-only":
            assert [p["epoch"] for p in run["curve"]] == [0, 1] and "eval_accuracy" in run["curve"][1]
    assert results["summary"] == [asdict(row) for row in summarise(results["runs"], METHODS)]
    table = (out / "results.md").read_text()
    for method in METHODS:
        assert sum(line.startswith(f"| {method} | 2 | ") for line in table.splitlines()) == 1
    assert "seeds: 0, 1" in table and "cores" in table


def test_a_second_invocation_skips_finished_runs(bench: tuple[Path, Path, dict[str, Any]]) -> None:
    out, data, _ = bench
    runs = sorted((out / "runs").iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in runs}
    args = ["run", "--out", str(out), "--data", str(data), "--model", str(out / "model"), "--task", "depth"]
    args += ["--methods", ",".join(METHODS), "--seeds", "2", "--epochs", "1", "--set", FAST[0], "--json", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (
        summary["ok"]
        and summary["skipped"] == 6
        and summary["command"].startswith(
            "xkt-bench run --task depth --methods source-only,shot,oracle --seeds 2 --out"
        )
    )
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == before
    assert summary["command"] in (out / "results.md").read_text()


def test_other_settings_in_the_same_out_are_refused(bench: tuple[Path, Path, dict[str, Any]]) -> None:
    out, data, _ = bench
    args = ["run", "--out", str(out), "--data", str(data), "--model", str(out / "model")]
    args += ["--methods", "shot", "--seeds", "1", "--epochs", "2", "--set", FAST[0], "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    error = json.loads(result.stdout)["error"]
    assert error["reason"] == "settings-changed" and "adapt" in error["message"] and "--out" in error["hint"]


def test_selection_study_by_hand() -> None:
    """Two runs of one method; each rule's pick is read off the hand-made curves."""
    curve_a = [
        {"epoch": 0, "eval_accuracy": 0.2},
        {"epoch": 1, "eval_accuracy": 0.5, "im": -0.5, "mean_entropy": 0.9, "agreement": 0.9, "bn_distance": 3.0},
        {"epoch": 2, "eval_accuracy": 0.4, "im": -0.7, "mean_entropy": 0.8, "agreement": 0.8, "bn_distance": 2.0},
    ]
    curve_b = [
        {"epoch": 0, "eval_accuracy": 0.2},
        {"epoch": 1, "eval_accuracy": 0.6, "im": -0.9, "mean_entropy": 0.5, "agreement": 0.7, "bn_distance": 1.0},
        {"epoch": 2, "eval_accuracy": 0.8, "im": -0.8, "mean_entropy": 0.6, "agreement": 0.9, "bn_distance": 4.0},
    ]
    runs = [{"method": "m", "curve": curve_a}, {"method": "m", "curve": curve_b}]
    [row] = selection_rows(runs)
    assert row["last"] == pytest.approx((0.4 + 0.8) / 2)
    assert row["im"] == pytest.approx((0.4 + 0.6) / 2)  # lowest IM: a epoch 2, b epoch 1
    assert row["agreement"] == pytest.approx((0.5 + 0.8) / 2)
    assert row["entropy"] == pytest.approx((0.4 + 0.6) / 2)
    assert row["bn"] == pytest.approx((0.4 + 0.6) / 2)
    assert row["hindsight"] == pytest.approx((0.5 + 0.8) / 2)
    assert any("hindsight" in line for line in selection_markdown(runs))
