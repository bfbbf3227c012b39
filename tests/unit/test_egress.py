"""The egress manifest's pure parts: what it declares, how it renders, what it refuses."""

from __future__ import annotations

import pytest
from rich.console import Console

from xkt.client.egress import check_request, render_table, single_site_manifest
from xkt.protos import source_model_pb2 as pb
from xkt.shared.errors import PolicyError

SHA = "ab" * 32


def test_single_site_declares_only_digest_and_offset_requests() -> None:
    manifest = single_site_manifest(sha256=SHA, offset=None, token=True, health=True, batchnorm=True)
    data = manifest.to_json()
    assert data["site_data"] == "none" and data["mode"] == "single-site"
    fields = {r["message_type"]: set(r["fields"]) for r in data["requests"]}
    assert fields == {
        "xkt.v1.GetManifestRequest": set(),
        "xkt.v1.FetchWeightsRequest": {"sha256", "offset"},
        "xkt.v1.GetBatchNormStatsRequest": {"sha256"},
        "grpc.health.v1.HealthCheckRequest": {"service"},
    }
    assert data["metadata"] and "Bearer" in data["metadata"][0]
    assert single_site_manifest(sha256=None, offset=None, token=False).metadata == ()


def test_table_lists_every_request() -> None:
    console = Console(record=True, width=200)
    console.print(render_table(single_site_manifest(sha256=SHA, offset=0, token=False)))
    text = console.export_text()
    assert "GetManifestRequest" in text and f"sha256={SHA}" in text and "offset=0" in text


def test_check_request_accepts_declared_and_refuses_the_rest() -> None:
    manifest = single_site_manifest(sha256=SHA, offset=None, token=False)
    check_request(manifest, "/xkt.v1.SourceModel/GetManifest", pb.GetManifestRequest())
    check_request(manifest, "/xkt.v1.SourceModel/FetchWeights", pb.FetchWeightsRequest(sha256=SHA, offset=123))
    refused = [
        ("/xkt.v1.SourceModel/GetBatchNormStats", pb.GetBatchNormStatsRequest(sha256=SHA)),  # undeclared RPC
        ("/xkt.v1.SourceModel/FetchWeights", pb.GetManifestRequest()),  # wrong message type
        ("/xkt.v1.SourceModel/FetchWeights", pb.FetchWeightsRequest(sha256="cd" * 32)),  # undeclared value
        ("/xkt.v1.SourceModel/GetManifest", pb.FetchWeightsRequest(sha256=SHA)),
    ]
    for method, request in refused:
        with pytest.raises(PolicyError) as info:
            check_request(manifest, method, request)
        assert info.value.reason == "undeclared-egress"
