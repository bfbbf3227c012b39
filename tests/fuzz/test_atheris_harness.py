"""The coverage-guided harness (``atheris_artifact.py``) runs clean; skipped where atheris is not installed.

What is proven: libFuzzer, mutating a real weights file, manifest and statistics message
under coverage guidance, finds no input that makes the safetensors header check, the
manifest verifier or the batch-norm statistics parser raise anything but a well-formed
:class:`VerificationError`.  It runs ``10 × XKT_FUZZ_EXAMPLES`` inputs in a subprocess
(libFuzzer exits the process) and reads the count it really executed from its output.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_support import EXAMPLES, tally, time_bound_s  # noqa: E402

HARNESS = Path(__file__).resolve().parent / "atheris_artifact.py"


@pytest.mark.timeout(time_bound_s())
def test_atheris_harness_finds_no_crash(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is optional: pip install atheris")
    runs = 10 * EXAMPLES
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, str(HARNESS), f"-runs={runs}", "-rss_limit_mb=4096", f"-artifact_prefix={tmp_path}/"],
        capture_output=True,
        text=True,
        timeout=time_bound_s(),
        cwd=tmp_path,
    )
    seconds = time.perf_counter() - start
    done = re.search(r"Done (\d+) runs", completed.stderr)
    crashed = completed.returncode != 0 or done is None
    tally("atheris (artifact parsers)").record_many(
        "crash" if crashed else "no crash", int(done.group(1)) if done else 0, seconds
    )
    assert not crashed, completed.stderr[-4000:]
    assert done is not None and int(done.group(1)) == runs
