"""Domain ⇄ wire conversions (xkt.shared.serde): exact round trips, untrusted input refused."""

from __future__ import annotations

import pytest
import torch

from xkt.protos import source_model_pb2 as pb
from xkt.shared.errors import VerificationError
from xkt.shared.manifest import InputSpec, Manifest, WeightsInfo
from xkt.shared.models import ArchSpec, BatchNormStats, batchnorm_statistics, build_model
from xkt.shared.serde import batchnorm_stats_from_proto, batchnorm_stats_to_proto, manifest_to_proto


def _manifest() -> Manifest:
    return Manifest(
        format_version=1,
        model_id="toy",
        model_version="1",
        architecture=ArchSpec("resnet_tiny", num_classes=2).to_json(),
        class_names=("a", "b"),
        input_spec=InputSpec("rgb", 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        weights=WeightsInfo("ab" * 32, 1234),
        batchnorm_layers=(),
        created="2025-01-31T12:00:00Z",
        owner_key_fingerprint="0" * 64,
        provenance={},
    )


def test_manifest_to_proto_carries_the_signed_bytes() -> None:
    manifest = _manifest()
    msg = manifest_to_proto(manifest, b"s" * 64, 65536)
    assert msg.manifest_json == manifest.to_bytes()
    assert (msg.signature, msg.weights_sha256, msg.weights_size, msg.chunk_size) == (b"s" * 64, "ab" * 32, 1234, 65536)


def test_batchnorm_stats_round_trip_exactly() -> None:
    torch.manual_seed(0)
    model = build_model(ArchSpec("resnet_tiny", num_classes=6))
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            assert module.running_mean is not None
            module.running_mean.normal_()
    stats = batchnorm_statistics(model)
    msg = pb.BatchNormStats.FromString(batchnorm_stats_to_proto(stats, "cd" * 32).SerializeToString())
    assert msg.weights_sha256 == "cd" * 32
    back = batchnorm_stats_from_proto(msg)
    assert [s.name for s in back] == [s.name for s in stats]
    for got, want in zip(back, stats, strict=True):
        assert torch.equal(got.running_mean, want.running_mean) and torch.equal(got.running_var, want.running_var)
        assert (got.momentum, got.eps) == (want.momentum, want.eps)


def _layer(**changes: object) -> pb.BatchNormLayer:
    fields: dict[str, object] = {"name": "bn", "running_mean": [0.0, 1.0], "running_var": [1.0, 2.0]}
    fields.update({"momentum": 0.1, "eps": 1e-5}, **changes)
    return pb.BatchNormLayer(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "layers",
    [
        [_layer(running_var=[1.0])],
        [_layer(running_mean=[], running_var=[])],
        [_layer(running_mean=[float("nan"), 0.0])],
        [_layer(running_var=[-1.0, 1.0])],
        [_layer(eps=0.0)],
        [_layer(name="")],
        [_layer(), _layer()],
    ],
    ids=["ragged", "empty", "nan", "negative-var", "zero-eps", "no-name", "duplicate"],
)
def test_malformed_stats_are_refused(layers: list[pb.BatchNormLayer]) -> None:
    with pytest.raises(VerificationError) as info:
        batchnorm_stats_from_proto(pb.BatchNormStats(layers=layers))
    assert info.value.reason == "bad-batchnorm-stats"


def test_from_proto_builds_float32_tensors() -> None:
    (stats,) = batchnorm_stats_from_proto(pb.BatchNormStats(layers=[_layer()]))
    assert isinstance(stats, BatchNormStats) and stats.running_mean.dtype == torch.float32
    assert stats.running_var.tolist() == [1.0, 2.0]


def test_a_hostile_layer_name_stays_one_escaped_bounded_line() -> None:
    """Regression (found by tests/fuzz): the server chooses layer names; a newline split the message."""
    name = "bn\n\x1b[31mred" + "x" * 500
    with pytest.raises(VerificationError) as info:
        batchnorm_stats_from_proto(pb.BatchNormStats(layers=[_layer(name=name, eps=0.0)]))
    message = info.value.message
    assert "\n" not in message and "\x1b" not in message and len(message) < 300
    assert "'bn\\n\\x1b[31mred" in message and "eps" in message
