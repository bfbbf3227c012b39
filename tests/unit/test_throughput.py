"""``benchmarks/throughput.py``: the FLOP accounting and the ratio arithmetic, on hand-countable cases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from xkt.benchmarks.method_speed import ONE_EPOCH
from xkt.benchmarks.throughput import (
    Spread,
    achieved_flop_rate,
    count_flops,
    make_cells,
    matmul_flops,
    matmul_rate,
    rate_ratio,
    render_site,
    step_flops,
)
from xkt.client.trainer import AdaptConfig
from xkt.shared.config import load_config
from xkt.shared.models import build_model, resolve_arch

pytestmark = pytest.mark.timeout(120)


def test_matmul_flops_is_two_n_cubed() -> None:
    assert matmul_flops(1) == 2
    assert matmul_flops(2048) == 2 * 2048**3
    assert count_flops(lambda: torch.mm(torch.ones(8, 8), torch.ones(8, 8))) == matmul_flops(8)


def test_a_whole_step_is_counted_forward_backward_and_optimiser() -> None:
    """A Linear 5 → 3 on a batch of 4: forward 2·4·5·3 = 120; backward adds only dW (the input needs no grad)."""
    layer = nn.Linear(5, 3)
    optimiser = torch.optim.SGD(layer.parameters(), lr=0.1)
    batch = torch.randn(4, 5)

    def step() -> None:
        optimiser.zero_grad()
        layer(batch).square().sum().backward()  # type: ignore[no-untyped-call]
        optimiser.step()  # element-wise: not counted

    assert count_flops(lambda: layer(batch)) == 2 * 4 * 5 * 3
    assert count_flops(step) == 2 * (2 * 4 * 5 * 3)


@pytest.mark.parametrize("groups", [1, 4, 32])
def test_a_convolution_backward_costs_its_forward_per_gradient(groups: int) -> None:
    """Input and weight gradient each cost the forward's FLOPs, grouped or not (torch's own formula overcounts groups)."""
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=groups)
    first = torch.randn(2, 32, 8, 8)  # an input that needs no gradient: only the weight's
    hidden = torch.randn(2, 32, 8, 8, requires_grad=True)
    forward = count_flops(lambda: conv(first))

    assert forward == 2 * 2 * 32 * (32 // groups) * 9 * 64
    assert count_flops(lambda: conv(first).sum().backward()) == 2 * forward  # type: ignore[no-untyped-call]
    assert count_flops(lambda: conv(hidden).sum().backward()) == 3 * forward  # type: ignore[no-untyped-call]


def test_achieved_rate_and_ratio() -> None:
    # 100 images/s of a 64-image step of 6.4 GFLOP = 10 GFLOP/s; against 40 GFLOP/s of matmul, 25 %
    achieved = achieved_flop_rate(100.0, 6.4e9, 64)
    assert achieved == pytest.approx(10e9)
    assert rate_ratio(achieved, 40e9) == pytest.approx(0.25)
    assert rate_ratio(achieved, 0.0) == 0.0


def test_spread_and_cells_take_medians_over_repeats() -> None:
    assert Spread.of([3.0, 1.0, 2.0]) == Spread(2.0, 1.0, 3.0)
    stages = [{"stage": "tgmb", "images_per_s": 10.0}, {"stage": "tgkt", "images_per_s": 20.0}]
    faster = [{**stage, "images_per_s": stage["images_per_s"] * 2} for stage in stages]
    runs = [(40e9, {"batch_size": 32, "stages": stages}), (20e9, {"batch_size": 32, "stages": faster})]

    first, second = make_cells("resnet_tiny", "tgmb-tgkt", [3.2e9, 6.4e9], runs)

    assert (first.stage, second.stage, first.batch_size) == ("tgmb", "tgkt", 32)
    assert first.step_gflop == pytest.approx(3.2)
    assert first.images_per_s == Spread(15.0, 10.0, 20.0)
    assert first.matmul_gflop_s == Spread(30.0, 20.0, 40.0)
    # repeat 1: 10 img/s × 0.1 GFLOP = 1 GFLOP/s of 40 → 0.025; repeat 2: 2 of 20 → 0.1
    assert first.achieved_gflop_s == Spread(1.5, 1.0, 2.0)
    assert first.ratio.low == pytest.approx(0.025) and first.ratio.high == pytest.approx(0.1)
    assert second.achieved_gflop_s.median == pytest.approx(6.0)


def test_matmul_rate_is_positive() -> None:
    assert matmul_rate(64, products=1) > 0


def test_the_first_real_step_of_each_stage_is_counted(tmp_path: Path) -> None:
    """SHOT's counted step is its forward and backward (more than the forward, under 3 × it); TGMB+TGKT has two."""
    site = render_site(tmp_path, size=16, site_per_class=4)
    model = build_model(resolve_arch("resnet_tiny", {"width": 4}, 6, bottleneck_dim=32))
    cfg = load_config(AdaptConfig, overrides=["threads=1", "batch_size=8", *ONE_EPOCH])

    (shot,) = step_flops(model, site.target, site.pairs, "shot", cfg)
    stages = step_flops(model, site.target, site.pairs, "tgmb-tgkt", cfg)

    forward = count_flops(lambda: model(torch.stack([site.target[i][0] for i in range(8)])))
    assert forward < shot < 3 * forward
    assert len(stages) == 2 and all(count > 0 for count in stages)
