"""BatchNorm input statistics: hand-checked values, layer order, gradients, and a monitor that changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xkt.client.methods.batchnorm_capture import (
    BatchNormCapture,
    batchnorm_distance_to_source,
    source_batchnorm_reference,
    stem_weighted,
)
from xkt.client.methods.losses import batchnorm_statistics_distance
from xkt.shared.models import ArchSpec, build_model

# Two images of one channel, 1×2 pixels: values 1, 3 and 5, 7.
IMAGES = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])


def _tiny_net() -> nn.Sequential:
    """1×1 conv with weights (2, −1) into two channels, then BatchNorm2d, then a second BatchNorm2d."""
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
    return nn.Sequential(conv, nn.BatchNorm2d(2), nn.BatchNorm2d(2))


def test_captured_statistics_by_hand() -> None:
    net = _tiny_net()
    with BatchNormCapture(net) as capture:
        net(IMAGES)
        (mean1, var1), (mean2, var2) = capture.take()
    # Channel 0 = 2·x: 2, 6, 10, 14 → mean 8, biased variance (36 + 4 + 4 + 36)/4 = 20.
    # Channel 1 = −x: −1, −3, −5, −7 → mean −4, biased variance (9 + 1 + 1 + 9)/4 = 5.
    assert mean1.tolist() == pytest.approx([8.0, -4.0])
    assert var1.tolist() == pytest.approx([20.0, 5.0])
    # The first BN (γ = 1, β = 0, train mode) normalises: mean 0, variance v / (v + ε).
    assert mean2.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert var2.tolist() == pytest.approx([20 / (20 + 1e-5), 5 / (5 + 1e-5)])


class _DefinedOutOfOrder(nn.Module):
    """``late`` is defined first but runs second, like a ResNet block's shortcut BN."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.BatchNorm2d(1)
        self.early = nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.late(3 * self.early(x))
        return out


def test_statistics_come_back_in_definition_order() -> None:
    net = _DefinedOutOfOrder()
    capture = BatchNormCapture(net)
    assert capture.layer_names == ["late", "early"]
    with capture:
        net(IMAGES)
        (late_mean, late_var), (early_mean, early_var) = capture.take()
    # early sees 1, 3, 5, 7: mean 4, variance (9 + 1 + 1 + 9)/4 = 5; late sees 3 × its normalised output.
    assert (early_mean.item(), early_var.item()) == pytest.approx((4.0, 5.0))
    assert (late_mean.item(), late_var.item()) == pytest.approx((0.0, 9 * 5 / (5 + 1e-5)), abs=1e-5)


def test_hooks_are_removed_on_exit() -> None:
    net = _tiny_net()
    capture = BatchNormCapture(net)
    with capture:
        assert all(len(layer._forward_pre_hooks) == 1 for _, layer in capture.layers)
    assert all(len(layer._forward_pre_hooks) == 0 for _, layer in capture.layers)
    net(IMAGES)
    with pytest.raises(RuntimeError, match="no forward pass"):
        capture.take()


def test_hooks_are_removed_when_the_block_raises() -> None:
    net = _tiny_net()
    with pytest.raises(KeyError), BatchNormCapture(net) as capture:
        raise KeyError("boom")
    assert all(len(layer._forward_pre_hooks) == 0 for _, layer in capture.layers)


def test_a_second_forward_without_take_is_refused() -> None:
    net = _tiny_net()
    with BatchNormCapture(net) as capture:
        net(IMAGES)
        with pytest.raises(RuntimeError, match="ran twice"):
            net(IMAGES)
        capture.clear()
        net(IMAGES)
        assert len(capture.take()) == 2


def test_gradients_flow_to_the_convolution_through_the_statistics() -> None:
    net = _tiny_net()
    reference = [(torch.zeros(2), torch.ones(2)), (torch.zeros(2), torch.ones(2))]
    with BatchNormCapture(net) as capture:
        net(IMAGES)
        loss = batchnorm_statistics_distance(capture.take(), reference, stem_weighted(2))
    loss.backward()
    conv = net[0]
    assert isinstance(conv, nn.Conv2d)
    conv_grad = conv.weight.grad
    assert conv_grad is not None and torch.isfinite(conv_grad).all() and conv_grad.abs().sum() > 0


def test_resnet_capture_covers_every_batchnorm2d_with_the_stem_first() -> None:
    torch.manual_seed(0)
    model = build_model(ArchSpec("resnet_tiny", num_classes=3, bottleneck_dim=8))
    images = torch.randn(4, 3, 16, 16)
    with BatchNormCapture(model) as capture:
        model(images)
        stats = capture.take()
    reference = source_batchnorm_reference(model)
    # Stem + 2 per block × 4 blocks + 3 shortcut BNs; the bottleneck's BatchNorm1d is not included.
    assert len(stats) == len(reference) == 12
    assert capture.layer_names[0] == "backbone.bn1"
    assert all(mean.shape == ref_mean.shape for (mean, _), (ref_mean, _) in zip(stats, reference, strict=True))
    stem = dict(model.named_modules())["backbone.conv1"]
    stem_input = stem(images)
    assert torch.allclose(stats[0][0], stem_input.mean(dim=(0, 2, 3)), atol=1e-6)


def test_source_reference_is_a_detached_snapshot() -> None:
    net = _tiny_net()
    reference = source_batchnorm_reference(net)
    net.train()
    net(IMAGES)  # moves the running statistics
    assert reference[0][0].tolist() == [0.0, 0.0] and reference[0][1].tolist() == [1.0, 1.0]
    assert not reference[0][0].requires_grad


def test_stem_weighted() -> None:
    assert stem_weighted(4) == [10.0, 1.0, 1.0, 1.0]
    assert stem_weighted(1, stem_weight=3.0) == [3.0]
    with pytest.raises(ValueError):
        stem_weighted(0)


def test_monitor_value_by_hand() -> None:
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(2.0)
    net = nn.Sequential(conv, nn.BatchNorm2d(1))
    constant = torch.ones(2, 1, 1, 2)
    # Batch 1: 2, 6, 10, 14 → ‖8 − 0‖ + ‖20 − 0‖ = 28.  Batch 2: all 2 → ‖2‖ + ‖0‖ = 2.  Mean 15.
    zero_reference = [(torch.zeros(1), torch.zeros(1))]
    assert batchnorm_distance_to_source(net, [IMAGES, (constant, torch.arange(2))], zero_reference) == pytest.approx(15)


@pytest.mark.parametrize("training", [True, False])
def test_monitor_changes_no_running_statistics_nor_the_mode(training: bool) -> None:
    torch.manual_seed(0)
    model = build_model(ArchSpec("resnet_tiny", num_classes=3, bottleneck_dim=8))
    model.train(training)
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    reference = source_batchnorm_reference(model)
    batches = [(torch.randn(4, 3, 16, 16), torch.arange(4)) for _ in range(2)]
    distance = batchnorm_distance_to_source(model, batches, reference)
    assert distance > 0
    after = dict(model.named_buffers())
    assert before.keys() == after.keys() and any("num_batches_tracked" in name for name in before)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert model.training is training
