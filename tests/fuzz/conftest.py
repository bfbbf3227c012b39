"""Report what the fuzz targets executed: printed after the run, and as JSON for the long run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fuzz_support import EXAMPLES, TALLIES  # noqa: E402


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line per fuzz target: inputs executed, crashes, hangs, time, outcomes."""
    if not TALLIES:
        return
    terminalreporter.section(f"fuzzing (XKT_FUZZ_EXAMPLES={EXAMPLES})")
    for item in TALLIES.values():
        outcomes = ", ".join(f"{name} {count}" for name, count in sorted(item.outcomes.items()))
        terminalreporter.write_line(
            f"{item.target}: {item.inputs} inputs, {item.crashes} crashes, {item.hangs} hangs, "
            f"{item.seconds:.1f} s | {outcomes}"
        )
    report = os.environ.get("XKT_FUZZ_REPORT")
    if report:
        data = {"examples_setting": EXAMPLES, "targets": [item.to_json() for item in TALLIES.values()]}
        Path(report).write_text(json.dumps(data, indent=2) + "\n")
        terminalreporter.write_line(f"fuzz report written to {report}")
