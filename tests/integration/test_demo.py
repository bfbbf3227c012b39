"""`xkt-bench demo` end to end on a tiny profile: real subprocesses for every step, mutual TLS on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xkt.benchmarks.demo import Profile, run_demo
from xkt.server.audit_log import verify_log

TINY = Profile(
    name="tiny",
    per_class=6,
    site_per_class=8,
    train_args=("--arch", "resnet_tiny", "--set", "model.kwargs={width=4}", "--epochs", "1"),
    adapt_epochs=1,
    size=24,
)


@pytest.mark.timeout(300)
def test_demo_serves_adapts_over_mutual_tls_and_stops_the_server(tmp_path: Path) -> None:
    result = run_demo(tmp_path, TINY, ("shot", "socket"))

    work = tmp_path / "tiny"
    assert result["profile"] == "tiny" and set(result["depth_adapted"]) == {"shot", "socket"}
    assert 0.0 <= result["depth_source_only"] <= 1.0 and 0.0 <= result["rgb_accuracy"] <= 1.0
    for method in ("shot", "socket"):
        report = json.loads((work / "runs" / method / "report.json").read_text())
        assert report["method"] == method and report["accuracy"]["after"]["accuracy"] == result["depth_adapted"][method]
    # One server, mutual TLS: both fetches are in its audit log under the demo site's certificate identity.
    entries = [json.loads(line) for line in (work / "audit.jsonl").read_text().splitlines()]
    assert {e["site"] for e in entries} == {"depth-site"}
    assert [e["rpc"] for e in entries].count("FetchWeights") == 1  # the second adapt hit the cache
    assert verify_log(work / "audit.jsonl").ok
    # A second demo reuses data, keys, model and PKI: nothing is trained again.
    again = run_demo(tmp_path, TINY, ("shot",))
    assert again["training_seconds"] is None and again["depth_source_only"] == result["depth_source_only"]
