"""How well each label-free checkpoint-selection rule would have chosen, measured after the fact.

The trainer keeps the epoch that ``monitor.select`` picks from label-free signals only
(``xkt.client.monitoring``).  A benchmark run also records the eval accuracy of every
epoch (never seen by training), so for each run we can ask: had the rule been in force,
how accurate would the kept model have been?  Compared with ``last`` (the papers' choice)
and with the best epoch in hindsight (what no label-free rule can beat).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from xkt.client.monitoring import SELECTION_RULES, select_epoch

RULES = ("last", *SELECTION_RULES)


def picked_accuracy(curve: Sequence[Mapping[str, Any]], rule: str) -> float | None:
    """Eval accuracy of the epoch ``rule`` keeps among a run's trained epochs (None: nothing to pick)."""
    trained = [dict(point) for point in curve if point["epoch"] > 0 and "eval_accuracy" in point and "im" in point]
    if not trained:
        return None
    return float(trained[select_epoch(trained, rule)]["eval_accuracy"])


def selection_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the mean accuracy each rule would have kept, and the best epoch in hindsight."""
    rows = []
    for method in dict.fromkeys(run["method"] for run in runs):
        curves = [run.get("curve") or [] for run in runs if run["method"] == method]
        row: dict[str, Any] = {"method": method}
        for rule in RULES:
            picks = [p for p in (picked_accuracy(curve, rule) for curve in curves) if p is not None]
            row[rule] = sum(picks) / len(picks) if picks else None
        bests = [max(p["eval_accuracy"] for p in curve if p["epoch"] > 0) for curve in curves if len(curve) > 1]
        row["hindsight"] = sum(bests) / len(bests) if bests else None
        if row["last"] is not None:
            rows.append(row)
    return rows


def selection_markdown(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The study as markdown lines (empty when no run recorded per-epoch accuracy)."""
    rows = selection_rows(runs)
    if not rows:
        return []
    header = " | ".join(RULES)
    lines = [
        "Label-free checkpoint selection (mean eval accuracy of the epoch each rule would keep; "
        "`hindsight` is the best epoch by the labels, which no label-free rule can beat):",
        "",
        f"| method | {header} | hindsight |",
        "|---|" + "---|" * (len(RULES) + 1),
    ]
    for row in rows:
        cells = " | ".join("–" if row[k] is None else f"{100 * row[k]:.1f} %" for k in (*RULES, "hindsight"))
        lines.append(f"| {row['method']} | {cells} |")
    return [*lines, ""]
