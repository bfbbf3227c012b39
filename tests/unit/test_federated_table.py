"""``xkt-bench federated-table``: the arm arithmetic, the markdown, and a tiny end-to-end table.

The end-to-end test runs the product's trainer for the alone and pooled arms on a tiny
render; the simulation itself is replaced by a stand-in here (the real one runs in
tests/integration/test_federated_simulation.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from xkt.benchmarks import federated_bench
from xkt.benchmarks.federated_bench import FederatedTablePlan, _Site, pooled_site, run_federated_table
from xkt.benchmarks.federated_sim import SimulationPlan
from xkt.benchmarks.federated_table import markdown, paired_points, summarise_arms
from xkt.server.source_training import ModelConfig, SourceTrainConfig
from xkt.shared.data import RGB, ImageDataset, Pair, PairedDataset, Preprocess
from xkt.shared.errors import ConfigError
from xkt.shared.shapes_benchmark import ShapesConfig

pytestmark = pytest.mark.timeout(240)


def _run(arm: str, seed: int, sites: list[float], method: str = "shot", seconds: float = 1.0) -> dict[str, Any]:
    return {
        "seed": seed,
        "method": "source-only" if arm == "source-only" else method,
        "arm": arm,
        "sites": [{"site": i, "accuracy": a} for i, a in enumerate(sites)],
        "accuracy_mean": sum(sites) / len(sites),
        "seconds": seconds,
    }


RUNS = [
    _run("source-only", 0, [0.2, 0.3]),
    _run("source-only", 1, [0.2, 0.2]),
    _run("alone", 0, [0.4, 0.4]),
    _run("alone", 1, [0.3, 0.5]),
    _run("federated", 0, [0.5, 0.6], seconds=9.0),
    _run("federated", 1, [0.5, 0.5], seconds=11.0),
    _run("pooled", 0, [0.6, 0.6]),
]


def test_paired_points_average_per_seed_differences() -> None:
    alone = [r for r in RUNS if r["arm"] == "alone"]
    federated = [r for r in RUNS if r["arm"] == "federated"]
    assert paired_points(federated, alone) == pytest.approx(100 * ((0.55 - 0.4) + (0.5 - 0.4)) / 2)
    pooled = [r for r in RUNS if r["arm"] == "pooled"]
    assert paired_points(pooled, alone) == pytest.approx(20.0)  # only seed 0 is in both
    assert paired_points(pooled, []) is None


def test_summary_rows_in_order_with_gains_and_per_site_means() -> None:
    rows = summarise_arms(RUNS, ["shot"])
    assert [(r.method, r.arm) for r in rows] == [
        ("source-only", "source-only"),
        ("shot", "alone"),
        ("shot", "federated"),
        ("shot", "pooled"),
    ]
    source, alone, federated, pooled = rows
    assert source.gain_points is None and source.vs_alone_points is None
    assert alone.vs_alone_points is None and alone.gain_points == pytest.approx(100 * (0.4 - 0.25 + 0.4 - 0.2) / 2)
    assert federated.accuracy_mean == pytest.approx(0.525) and federated.seeds == 2
    assert federated.site_accuracy == pytest.approx((0.5, 0.55))
    assert federated.vs_alone_points == pytest.approx(12.5) and federated.seconds_mean == 10.0
    assert pooled.seeds == 1 and pooled.accuracy_sd == 0.0


def test_markdown_shows_every_table() -> None:
    runs = [dict(r) for r in RUNS]
    runs[4] |= {
        "timing": {
            "round_seconds_mean": 4.0,
            "local_seconds_max_mean": 3.0,
            "outside_local_share": 0.25,
            "run_seconds": 20.0,
        }
    }
    runs[4]["rounds"] = [{"round": 1, "seconds": 5.0}, {"round": 2, "seconds": 3.0}]
    shares = {
        "0": {
            "tv_mean": 0.3,
            "share_min": 0.05,
            "share_max": 0.4,
            "shares": {"site0": {"a": 1.0}},
            "tv_to_pooled": {"site0": 0.3},
        }
    }
    results = {
        "command": "xkt-bench federated-table --seeds 2",
        "date": "2026-11-21",
        "machine": {"cores": 2, "torch": "2.13", "python": "3.11"},
        "seeds": [0, 1],
        "summary": [asdict(r) for r in summarise_arms(runs, ["shot"])],
        "runs": runs,
        "class_shares": shares,
    }
    text = markdown(results)
    assert "| shot | federated | 52.5 ± 3.5 % | +30.0 pts | +12.5 pts | 50.0 | 55.0 | 10 |" in text
    assert "| 0 | shot | 5.0 / 3.0 | 4.0 | 3.0 | 25 % | - | 20 |" in text
    assert "| 0 | 0.30 | 5.0 % | 40.0 % |" in text


# ------------------------------------------------------------------ a tiny table, end to end


TINY = FederatedTablePlan(
    seeds=(0,),
    sites=2,
    rounds=1,
    local_epochs=1,
    skew=2.0,
    shapes=ShapesConfig(size=16, per_class=4, site_per_class=6),
    source=SourceTrainConfig(
        epochs=1, batch_size=16, model=ModelConfig(name="resnet_tiny", kwargs={"width": 4}, bottleneck_dim=32)
    ),
    overrides=("batch_size=8",),
)


def _fake_simulation(plan: SimulationPlan, on_line: Any = None) -> dict[str, Any]:
    """What run_simulation returns, without Flower: every site at 50 %."""
    sites = [{"site": k, "accuracy": 0.5, "accuracy_per_round": [0.5]} for k in range(plan.sites)]
    rounds = [{"round": 1, "replied": plan.sites, "seconds": 2.0, "local_seconds_max": 1.0}]
    timing = {"round_seconds_mean": 2.0, "local_seconds_max_mean": 1.0, "outside_local_share": 0.5, "run_seconds": 5.0}
    return {"sites": sites, "rounds": rounds, "timing": timing}


def test_a_tiny_table_end_to_end_then_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(federated_bench, "run_simulation", _fake_simulation)
    plan = FederatedTablePlan(**{**vars(TINY), "out": tmp_path / "table"})
    results = run_federated_table(plan)
    arms = sorted(f"{r['method']}-{r['arm']}" for r in results["runs"])
    assert arms == ["shot-alone", "shot-federated", "shot-pooled", "source-only-source-only"]
    for run in results["runs"]:
        assert len(run["sites"]) == 2 and all(0.0 <= s["accuracy"] <= 1.0 for s in run["sites"])
    assert (plan.out / "results.md").read_text().startswith("# Federated vs alone vs pooled")
    assert results["class_shares"]["0"]["tv_mean"] > 0.0
    saved = json.loads((plan.out / "results.json").read_text())
    assert saved["command"].startswith("xkt-bench federated-table --out")

    def no_more_training(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished arm was run again")

    monkeypatch.setattr(federated_bench, "adapt", no_more_training)
    monkeypatch.setattr(federated_bench, "run_simulation", no_more_training)
    again = run_federated_table(plan)
    assert [r["accuracy_mean"] for r in again["runs"]] == [r["accuracy_mean"] for r in results["runs"]]
    with pytest.raises(ConfigError, match="other settings"):
        run_federated_table(FederatedTablePlan(**{**vars(plan), "rounds": 2}))


def test_the_pooled_site_has_every_sites_images_and_pairs(tmp_path: Path) -> None:
    pre = Preprocess(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    def site(n: int, tag: str) -> _Site:
        paths = [tmp_path / f"{tag}{i}.png" for i in range(n)]
        pairs = PairedDataset([Pair(p, p) for p in paths[:1]], RGB, pre)
        return _Site(target=ImageDataset(paths, RGB, pre), pairs=pairs, eval=ImageDataset([], RGB, pre))

    pooled = pooled_site([site(2, "a"), site(3, "b")])
    assert len(pooled.target) == 5 and pooled.pairs is not None and len(pooled.pairs) == 2
