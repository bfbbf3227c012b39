"""What ``xkt-bench run`` shows people: the per-method summary, the markdown table, the PNG plots.

The summary is pure arithmetic on the per-run records; the table and the plots read only
the results object :func:`xkt.benchmarks.run.run_benchmark` builds, so either can be
redrawn from ``results.json`` alone.  Plots use matplotlib's Agg backend (no display
needed); matplotlib is optional (``pip install 'xkt[bench]'``): without it the plots are
skipped with a one-line warning and the table and JSON are still written.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xkt.benchmarks.oracle import ORACLE
from xkt.benchmarks.selection import selection_markdown

logger = logging.getLogger("xkt")

SOURCE_ONLY = "source-only"
ACCURACY_PNG, EPOCHS_PNG = "accuracy.png", "epochs.png"


@dataclass(frozen=True)
class MethodSummary:
    """One row of the table: accuracies as fractions, the gain in percentage points."""

    method: str
    runs: int
    accuracy_mean: float
    accuracy_sd: float  # sample sd (n - 1); 0 for a single seed
    gain_points: float | None  # over source-only; None when source-only was not run
    gap_closed: float | None  # (acc - source-only) / (oracle - source-only); None without a positive gap
    seconds_mean: float  # wall time of the adaptation (or oracle training) per run, evaluation excluded


# ------------------------------------------------------------------ the summary


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the sd of one value is 0."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def gap_closed(value: float, source_only: float | None, oracle: float | None) -> float | None:
    """Share of the source-only → oracle gap closed; None when either is missing or the gap is not positive."""
    if source_only is None or oracle is None or oracle - source_only <= 0:
        return None
    return (value - source_only) / (oracle - source_only)


def summarise(runs: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> list[MethodSummary]:
    """Per-method rows, in ``methods`` order, from per-run records (``method``, ``accuracy``, ``seconds``)."""
    by_method = {m: [r for r in runs if r["method"] == m] for m in methods}
    stats = {m: mean_sd([float(r["accuracy"]) for r in rs]) for m, rs in by_method.items() if rs}
    source = stats[SOURCE_ONLY][0] if SOURCE_ONLY in stats else None
    oracle = stats[ORACLE][0] if ORACLE in stats else None
    rows = []
    for method, records in by_method.items():
        if not records:
            continue
        mean, sd = stats[method]
        rows.append(
            MethodSummary(
                method=method,
                runs=len(records),
                accuracy_mean=mean,
                accuracy_sd=sd,
                gain_points=None if source is None else 100.0 * (mean - source),
                gap_closed=gap_closed(mean, source, oracle),
                seconds_mean=statistics.fmean(float(r["seconds"]) for r in records),
            )
        )
    return rows


# ------------------------------------------------------------------ the table


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def markdown(results: Mapping[str, Any]) -> str:
    """results.md: the command, when and where, one row per method, then one row per run."""
    settings, machine, runs = results["settings"], results["machine"], results["runs"]
    first = runs[0] if runs else {}
    lines = [
        f"# xkt-bench run: {results['task']}",
        "",
        "```sh",
        results["command"],
        "```",
        "",
        f"- date: {results['date']}; machine: {machine['cores']} cores, {machine['platform']}, torch {machine['torch']}",
        f"- site: `{results['site']}`; seeds: {', '.join(str(s) for s in results['seeds'])}"
        + (f" ({results['seed_meaning']})" if "seed_meaning" in results else ""),
        f"- target images: {first.get('target_images', '–')}; eval images: {first.get('eval_images', '–')}",
        f"- adaptation: {settings['adapt']['epochs']} epochs, batch {settings['adapt']['batch_size'] or 'per method'}; "
        f"oracle: {settings['oracle']['epochs']} epochs, batch {settings['oracle']['batch_size']}, "
        "supervised on the target labels (the ceiling)",
        f"- source model sha256 `{settings['source_sha256']}`",
        *(
            [f"- wall time of the whole table: {results['table_seconds'] / 60:.1f} min"]
            if "table_seconds" in results
            else []
        ),
        "",
        "| method | runs | accuracy (mean ± sd) | gain over source-only | gap closed | wall time / run |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["summary"]:
        gain = "–" if row["gain_points"] is None else f"{row['gain_points']:+.1f} pts"
        lines.append(
            f"| {row['method']} | {row['runs']} | {100 * row['accuracy_mean']:.1f} ± {100 * row['accuracy_sd']:.1f} % "
            f"| {gain} | {_percent(row['gap_closed'])} | {row['seconds_mean']:.1f} s |"
        )
    lines += [
        "",
        "| method | seed | accuracy | wall time | final mean entropy | final IM |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        signals = run.get("label_free") or {}
        entropy, im = (f"{signals[k]:.4f}" if k in signals else "–" for k in ("mean_entropy", "im"))
        lines.append(
            f"| {run['method']} | {run['seed']} | {_percent(run['accuracy'])} | {run['seconds']:.1f} s "
            f"| {entropy} | {im} |"
        )
    lines += ["", *selection_markdown(runs)]
    lines += [
        "Accuracy on the site's labelled eval images; sd is the sample sd over seeds. Gap closed = "
        "(method − source-only) / (oracle − source-only) on mean accuracies. Wall time covers the "
        "adaptation (or oracle training), not the evaluation.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ the plots


def write_plots(results: Mapping[str, Any], out: Path) -> list[Path]:
    """accuracy.png, and epochs.png when runs have per-epoch points, in ``out``; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        logger.warning("matplotlib is not installed: skipping the plots (pip install 'xkt[bench]')")
        return []
    written = [_accuracy_plot(pyplot, results, out / ACCURACY_PNG)]
    keys = ("eval_accuracy", "mean_entropy", "im")
    if any(mean_curves(results, key) for key in keys):  # some method has two or more epochs of a measure
        written.append(_epochs_plot(pyplot, results, out / EPOCHS_PNG))
    return written


def mean_curves(results: Mapping[str, Any], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per method: (epochs, mean over seeds of ``key``) at the epochs where some run measured it."""
    curves = {}
    for method in results["methods"]:
        values: dict[int, list[float]] = {}
        for run in results["runs"]:
            if run["method"] == method:
                for point in run.get("curve") or []:
                    if key in point:
                        values.setdefault(int(point["epoch"]), []).append(float(point[key]))
        if len(values) > 1:
            epochs = sorted(values)
            curves[method] = (epochs, [sum(values[e]) / len(values[e]) for e in epochs])
    return curves


def _accuracy_plot(pyplot: Any, results: Mapping[str, Any], path: Path) -> Path:
    """Mean accuracy per method with ±1 sd error bars; grey lines at source-only (dotted) and the oracle (dashed)."""
    rows = results["summary"]
    names = [row["method"] for row in rows]
    means = [100 * row["accuracy_mean"] for row in rows]
    figure, axes = pyplot.subplots(figsize=(1.2 * len(rows) + 2.5, 4.0))
    axes.bar(names, means, yerr=[100 * row["accuracy_sd"] for row in rows], capsize=4, color="#4c72b0")
    for row in rows:
        style = {SOURCE_ONLY: ":", ORACLE: "--"}.get(row["method"])
        if style:
            axes.axhline(100 * row["accuracy_mean"], color="grey", linestyle=style, linewidth=1)
    for x, (mean, row) in enumerate(zip(means, rows, strict=True)):
        axes.text(x, mean + 100 * row["accuracy_sd"] + 1, f"{mean:.1f}", ha="center", va="bottom", fontsize=8)
    axes.set_ylim(0, 105)
    axes.set_ylabel("eval accuracy (%)")
    axes.set_title(f"{results['task']}: mean ± sd over seeds {', '.join(str(s) for s in results['seeds'])}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


def _epochs_plot(pyplot: Any, results: Mapping[str, Any], path: Path) -> Path:
    """Per epoch, mean over seeds: eval accuracy (measured only), mean entropy and the IM loss (label-free)."""
    from matplotlib.ticker import MaxNLocator  # present: write_plots imported matplotlib

    panels = [
        (title, scale, curves)
        for key, title, scale in (
            ("eval_accuracy", "eval accuracy, % (measured, never trained on)", 100.0),
            ("mean_entropy", "mean prediction entropy (label-free)", 1.0),
            ("im", "IM loss: entropy − diversity (label-free)", 1.0),
        )
        if (curves := mean_curves(results, key))
    ]
    figure, axes_row = pyplot.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
    for axes, (title, scale, curves) in zip(axes_row[0], panels, strict=True):
        for method, (epochs, values) in curves.items():
            axes.plot(epochs, [scale * v for v in values], marker="o", markersize=3, label=method)
        axes.set_xlabel("epoch (0: the source model)")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(title, fontsize=9)
        axes.legend(fontsize=8)
    figure.suptitle(f"{results['task']}: per epoch, mean over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path
