"""What ``xkt-bench federated-table`` shows: the per-arm summary and the markdown tables.

Pure arithmetic and formatting on the per-arm records that
:func:`xkt.benchmarks.federated_bench.run_federated_table` writes, so the tables can be redrawn
from ``results.json`` alone.  Differences between arms are paired by seed (same data, same
source model), then averaged, so seed-to-seed spread in the data does not hide them.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xkt.benchmarks.plots import mean_sd

SOURCE_ONLY, ALONE = "source-only", "alone"
ARM_ORDER = ("alone", "federated", "pooled")


@dataclass(frozen=True)
class ArmSummary:
    """One row: the mean site accuracy over seeds (fractions), differences in percentage points."""

    method: str  # "source-only" for the source model's row
    arm: str
    seeds: int
    accuracy_mean: float  # mean over seeds of the unweighted mean over sites
    accuracy_sd: float  # sample sd over seeds; 0 for one seed
    gain_points: float | None  # vs source-only, paired by seed
    vs_alone_points: float | None  # vs the same method's sites alone, paired by seed
    seconds_mean: float  # wall time of the arm per seed (all sites' adaptations, or the whole simulation)
    site_accuracy: tuple[float, ...]  # per site position, mean over seeds


def paired_points(runs: Sequence[Mapping[str, Any]], against: Sequence[Mapping[str, Any]]) -> float | None:
    """Mean over the seeds both have of (run − against) mean site accuracy, in points; None without a common seed."""
    base = {r["seed"]: float(r["accuracy_mean"]) for r in against}
    diffs = [100 * (float(r["accuracy_mean"]) - base[r["seed"]]) for r in runs if r["seed"] in base]
    return statistics.fmean(diffs) if diffs else None


def _row(method: str, arm: str, runs: Sequence[Mapping[str, Any]], source: list[Any], alone: list[Any]) -> ArmSummary:
    mean, sd = mean_sd([float(r["accuracy_mean"]) for r in runs])
    count = min(len(r["sites"]) for r in runs)
    per_site = tuple(statistics.fmean(float(r["sites"][i]["accuracy"]) for r in runs) for i in range(count))
    return ArmSummary(
        method=method,
        arm=arm,
        seeds=len(runs),
        accuracy_mean=mean,
        accuracy_sd=sd,
        gain_points=None if arm == SOURCE_ONLY else paired_points(runs, source),
        vs_alone_points=None if arm in (SOURCE_ONLY, ALONE) else paired_points(runs, alone),
        seconds_mean=statistics.fmean(float(r["seconds"]) for r in runs),
        site_accuracy=per_site,
    )


def summarise_arms(runs: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> list[ArmSummary]:
    """source-only first, then each method's arms in ARM_ORDER; arms without runs are left out."""
    source = [r for r in runs if r["arm"] == SOURCE_ONLY]
    rows = [_row(SOURCE_ONLY, SOURCE_ONLY, source, source, [])] if source else []
    for method in methods:
        mine = {arm: [r for r in runs if r["method"] == method and r["arm"] == arm] for arm in ARM_ORDER}
        rows += [_row(method, arm, rs, source, mine[ALONE]) for arm, rs in mine.items() if rs]
    return rows


# ------------------------------------------------------------------ markdown


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _pts(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f} pts"


def summary_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    sites = max((len(r["site_accuracy"]) for r in rows), default=0)
    head = ["method", "arm", "mean site accuracy (mean ± sd)", "vs source-only", "vs alone"]
    head += [f"site {i}" for i in range(sites)] + ["wall s / seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["arm"], f"{_pct(r['accuracy_mean'])} ± {_pct(r['accuracy_sd'])} %"]
        cells += [_pts(r["gain_points"]), _pts(r["vs_alone_points"])]
        cells += [_pct(a) for a in r["site_accuracy"]] + [f"{r['seconds_mean']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def per_seed_table(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    sites = max((len(r["sites"]) for r in runs), default=0)
    head = ["seed", "method", "arm", *(f"site {i}" for i in range(sites)), "mean", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = {arm: i for i, arm in enumerate((SOURCE_ONLY, *ARM_ORDER))}
    for r in sorted(runs, key=lambda r: (r["seed"], r["arm"] != SOURCE_ONLY, r["method"], order[r["arm"]])):
        cells = [str(r["seed"]), r["method"], r["arm"], *(_pct(s["accuracy"]) for s in r["sites"])]
        lines.append("| " + " | ".join([*cells, _pct(r["accuracy_mean"]), f"{r['seconds']:.0f}"]) + " |")
    return lines


def timing_table(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    head = ["seed", "method", "round s (each round)", "round s (mean)", "slowest local training s (mean)"]
    head += ["share outside local training", "same, training packed on the CPU slots", "whole simulation s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted((r for r in runs if r.get("timing")), key=lambda r: (r["seed"], r["method"])):
        t = r["timing"]
        each = " / ".join(f"{x['seconds']:.1f}" for x in r.get("rounds", []))
        cells = [str(r["seed"]), r["method"], each, f"{t['round_seconds_mean']:.1f}"]
        packed = t.get("outside_packed_share")
        cells += [
            f"{t['local_seconds_max_mean']:.1f}",
            f"{100 * t['outside_local_share']:.0f} %",
            "-" if packed is None else f"{100 * packed:.0f} % ({t['slots']:.0f} slots)",
            f"{t['run_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def shares_table(shares: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per seed, how non-IID the sites are; then the first seed's per-site class shares."""
    lines = [
        "| seed | mean TV distance to pooled classes | smallest class share | largest class share |",
        "|---|---|---|---|",
    ]
    for seed, s in shares.items():
        lines.append(f"| {seed} | {s['tv_mean']:.2f} | {_pct(s['share_min'])} % | {_pct(s['share_max'])} % |")
    if shares:
        seed, first = next(iter(shares.items()))
        classes = sorted(next(iter(first["shares"].values())))
        lines += ["", f"Class shares of each site's target images, seed {seed} (%):", ""]
        lines += ["| site | " + " | ".join(classes) + " | TV to pooled |", "|" + "---|" * (len(classes) + 2)]
        for site, share in first["shares"].items():
            cells = [_pct(share[c]) for c in classes] + [f"{first['tv_to_pooled'][site]:.2f}"]
            lines.append(f"| {site} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: Mapping[str, Any]) -> str:
    """results.md: command, summary, per-seed accuracies, federated round timing, class shares."""
    machine = results["machine"]
    lines = [
        "# Federated vs alone vs pooled",
        "",
        f"`{results['command']}`",
        "",
        f"{results['date']}; {machine['cores']} cores, torch {machine['torch']}, python {machine['python']}; "
        f"seeds {', '.join(map(str, results['seeds']))}; this call took {results.get('wall_seconds_this_call', 0):.0f} s "
        "(finished runs are reused, not redone). Accuracy: each site's own labelled eval images; "
        "the mean is over sites (unweighted); differences are paired by seed.",
        "",
        *summary_table(results["summary"]),
        "",
        "## Per seed",
        "",
        *per_seed_table(results["runs"]),
        "",
        "## Federated rounds",
        "",
        *timing_table(results["runs"]),
        "",
        "## How non-IID the sites are",
        "",
        *shares_table(results["class_shares"]),
        "",
    ]
    return "\n".join(lines)
