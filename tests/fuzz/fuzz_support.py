"""What every fuzz test shares: the hypothesis profile, input counters and a run report.

Size: ``XKT_FUZZ_EXAMPLES`` (default 200) is the number of inputs each fuzz target asks
hypothesis for; CI keeps the default, the documented long run sets 10000.  Hypothesis may
stop a target early (a finite input space) or run a few more (replaying a failure), so a
target never reports the setting: it counts the inputs its body really executed, in a
:class:`Tally`, together with what became of them.

``tests/fuzz/conftest.py`` prints every tally at the end of the pytest run and, when
``XKT_FUZZ_REPORT`` names a file, writes them there as JSON (the source of the numbers in
``benchmarks/README.md``).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("XKT_FUZZ_EXAMPLES", "200"))
"""Inputs per fuzz target: ~200 for CI, 10000 for the documented long run."""

SECONDS_PER_INPUT = 0.1
"""Generous upper bound of one input's cost on 2 shared cores; a target slower than this hangs."""

settings.register_profile(
    "xkt-fuzz",
    max_examples=EXAMPLES,
    deadline=None,  # a slow input on a busy machine is not a bug; a stuck one hits the per-call deadline
    database=None,  # no .hypothesis folder in the repository; failures print their reproduction blob
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # fixtures here are read-only or rewritten per input
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
FUZZ = settings.get_profile("xkt-fuzz")


def time_bound_s(targets: int = 1) -> float:
    """A whole-test time limit for ``targets`` fuzz targets of :data:`EXAMPLES` inputs each."""
    return 120.0 + targets * EXAMPLES * SECONDS_PER_INPUT


@dataclass
class Tally:
    """Inputs one fuzz target executed, how each ended, and the time they took."""

    target: str
    inputs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    crashes: int = 0
    hangs: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, outcome: str, seconds: float, *, crash: bool = False, hang: bool = False) -> None:
        """One executed input that ended in ``outcome`` (a status code name or an error reason).

        A crash or hang is counted before the test asserts on it, so the report shows it too.
        """
        with self._lock:
            self.inputs += 1
            self.outcomes[outcome] += 1
            self.seconds += seconds
            self.crashes += crash
            self.hangs += hang

    def record_many(self, outcome: str, count: int, seconds: float) -> None:
        """``count`` inputs executed elsewhere (a libFuzzer run) that all ended in ``outcome``."""
        with self._lock:
            self.inputs += count
            self.outcomes[outcome] += count
            self.seconds += seconds

    def to_json(self) -> dict[str, object]:
        return {
            "target": self.target,
            "inputs": self.inputs,
            "crashes": self.crashes,
            "hangs": self.hangs,
            "seconds": round(self.seconds, 2),
            "outcomes": dict(sorted(self.outcomes.items())),
        }


TALLIES: dict[str, Tally] = {}


def tally(target: str) -> Tally:
    """The run-wide tally of ``target`` (created on first use)."""
    return TALLIES.setdefault(target, Tally(target))


class Stopwatch:
    """``with Stopwatch() as watch: ...`` then ``watch.seconds``."""

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
