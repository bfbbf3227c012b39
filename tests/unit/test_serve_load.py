"""``benchmarks/serve_load.py`` in a tiny mode: a real ``xkt-server serve`` subprocess, 2 clients, 3 s.

Checks the result's structure and that the load produced no errors and a healthy server;
the size and memory verdicts only mean something at the real size (``--model-mb 48``).
"""

from __future__ import annotations

import pytest

from xkt.benchmarks.serve_load import FETCH, MANIFEST, Outcome, main, percentile, summarize

pytestmark = pytest.mark.timeout(90)


def test_percentile_nearest_rank() -> None:
    assert percentile([], 0.5) == 0.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0


def test_summary_keeps_manifest_calls_apart_from_fetches() -> None:
    outcomes = [
        Outcome(0.0, 2.0, 100, None, FETCH),
        Outcome(2.0, 2.01, 5, None, MANIFEST),
        Outcome(2.0, 2.03, 5, None, MANIFEST),
        Outcome(2.5, 3.0, 0, "RpcError: boom", MANIFEST),
        Outcome(3.0, 4.0, 100, None, FETCH),
    ]
    summary = summarize(outcomes, load_start=0.0)

    assert (summary["fetches"], summary["manifest_calls"], summary["errors"]) == (2, 2, 1)
    assert summary["error_samples"] == ["manifest: RpcError: boom"]
    assert summary["bytes"] == 200 and summary["throughput_mb_s"] == round(200 / 1e6 / 4.0, 1)
    assert summary["latency_p50_s"] == 1.0 and summary["latency_p99_s"] == 2.0
    assert summary["manifest_latency_p50_s"] == pytest.approx(0.01) and summary[
        "manifest_latency_max_s"
    ] == pytest.approx(0.03)


def test_tiny_load_run_has_no_errors(capsys: pytest.CaptureFixture[str]) -> None:
    result = main(["--clients", "2", "--model-mb", "1", "--seconds", "3", "--json"])

    assert result["errors"] == 0 and result["error_samples"] == []
    assert result["fetches"] >= 2 and result["manifest_calls"] >= result["fetches"]
    assert 0 < result["manifest_latency_p50_s"] <= result["manifest_latency_p99_s"] <= result["manifest_latency_max_s"]
    assert result["bytes"] == result["fetches"] * result["model"]["bytes"]
    assert 0 < result["latency_p50_s"] <= result["latency_p99_s"] <= result["latency_max_s"]
    assert result["throughput_mb_s"] > 0 and result["raw_mb_s"] > 0
    assert result["raw_bytes"] >= result["bytes"]
    assert result["ratio_to_raw"] == pytest.approx(result["throughput_mb_s"] / result["raw_mb_s"], rel=0.01)
    assert result["model"]["arch"].startswith("resnet_tiny") and result["model"]["bytes"] >= 1_000_000
    server = result["server"]
    assert server["rss_samples"] > 0 and server["rss_peak_mb"] >= server["rss_before_mb"] > 0
    assert result["health_after"] == "SERVING" and server["exit_status"] == 0
    assert set(result["acceptance"]) == {
        "model_at_least_40mb",
        "no_errors",
        "rss_growth_below_2x",
        "healthy_after",
        "server_stopped_cleanly",
    }
    assert result["acceptance"]["no_errors"] and result["acceptance"]["healthy_after"]
    assert not result["acceptance"]["model_at_least_40mb"]  # a 1 MB model cannot pass the size check
    out = capsys.readouterr()
    assert out.out.count("\n") == 1 and '"ratio_to_raw"' in out.out  # one JSON object on stdout
    assert "ratio xkt / raw" in out.err  # the table goes to stderr
