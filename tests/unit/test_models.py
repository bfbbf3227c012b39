"""Architecture registry: shapes, torchvision-compatible names, the SHOT head."""

from __future__ import annotations

import pytest
import torch

from xkt.shared.errors import ConfigError
from xkt.shared.models import (
    ArchSpec,
    WeightNormLinear,
    batchnorm_layers,
    batchnorm_statistics,
    build_model,
    expected_state,
    resolve_arch,
)


@pytest.mark.parametrize("name", ["resnet_tiny", "resnet18", "mobilenet_v2"])
def test_every_architecture_classifies_a_batch(name: str) -> None:
    model = build_model(ArchSpec(name, num_classes=6)).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
        features = model.embed(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 6)
    assert features.shape == (2, 256)


def test_resnet18_imagenet_stem_matches_torchvision_names_and_size() -> None:
    backbone = build_model(ArchSpec("resnet18", 6, kwargs={"stem": "imagenet"})).backbone
    names = set(backbone.state_dict())
    for expected in ("conv1.weight", "bn1.running_var", "layer1.0.conv2.weight", "layer4.1.bn2.num_batches_tracked"):
        assert expected in names
    assert "layer2.0.downsample.0.weight" in names and "layer2.0.downsample.1.bias" in names
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in the 512→1000 fc.
    assert sum(p.numel() for p in backbone.parameters()) == 11_689_512 - 513_000
    assert len([m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]) == 20


def test_mobilenet_v2_matches_torchvision_names_and_size() -> None:
    backbone = build_model(ArchSpec("mobilenet_v2", 6)).backbone
    names = set(backbone.state_dict())
    for expected in ("features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight"):
        assert expected in names
    assert "features.17.conv.3.running_mean" in names and "features.18.1.weight" in names
    # torchvision's checkpoint holds 314 tensors: 312 in `features` plus classifier.1.{weight,bias}.
    assert len(names) == 312
    # torchvision's mobilenet_v2 has 3,504,872 parameters, 1,281,000 of them in the classifier.
    assert sum(p.numel() for p in backbone.parameters()) == 3_504_872 - 1_281_000


def test_weight_norm_linear_on_a_hand_computed_case() -> None:
    layer = WeightNormLinear(2, 2)
    with torch.no_grad():
        layer.weight_v.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))  # row norms 5 and 2
        layer.weight_g.copy_(torch.tensor([[10.0], [1.0]]))
        layer.bias.copy_(torch.tensor([1.0, -1.0]))
    # effective W = [[6, 8], [0, 1]]; x = [1, 1] → [6 + 8 + 1, 0 + 1 - 1]
    assert torch.allclose(layer(torch.tensor([[1.0, 1.0]])), torch.tensor([[15.0, 0.0]]))


def test_resolve_arch_records_defaults_and_refuses_unknown_kwargs() -> None:
    spec = resolve_arch("resnet_tiny", {}, num_classes=6)
    assert spec.kwargs == {"stem": "small", "width": 8}
    assert ArchSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ConfigError, match="has no parameter"):
        resolve_arch("resnet_tiny", {"depth": 3}, num_classes=6)
    with pytest.raises(ConfigError, match="unknown architecture"):
        resolve_arch("vit", {}, num_classes=6)


def test_arch_spec_from_json_refuses_malformed_input() -> None:
    with pytest.raises(ConfigError):
        ArchSpec.from_json({"name": "resnet18"})
    with pytest.raises(ConfigError):
        ArchSpec.from_json({"name": "resnet18", "num_classes": True, "bottleneck_dim": 256, "kwargs": {}})


def test_expected_state_allocates_nothing_and_matches_a_real_model() -> None:
    spec = ArchSpec("resnet_tiny", 6)
    expected = expected_state(spec)
    real = build_model(spec).state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in real.items()} == expected
    assert expected["backbone.bn1.num_batches_tracked"][1] == torch.int64


def test_batchnorm_statistics_cover_every_layer_in_order() -> None:
    model = build_model(ArchSpec("resnet18", 6))
    stats = batchnorm_statistics(model)
    assert [s.name for s in stats] == [name for name, _ in batchnorm_layers(model)]
    assert len(stats) == 20 + 1  # 20 BatchNorm2d in ResNet-18 + the bottleneck's BatchNorm1d
    assert stats[0].name == "backbone.bn1" and stats[-1].name == "bottleneck.bn"
    assert torch.equal(stats[0].running_var, torch.ones(64))
