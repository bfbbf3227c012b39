"""Label-free validation: the signals on hand-made predictions, checkpoint selection and the guard."""

from __future__ import annotations

import math

import pytest
import torch

from xkt.client.methods.base import TargetOutputs
from xkt.client.monitoring import Monitor, MonitorConfig, guard_verdict, select_epoch
from xkt.shared.errors import ConfigError
from xkt.shared.models import ArchSpec, build_model


def _signals(im: float, diversity: float, agreement: float, entropy: float = 0.5, bn: float = 1.0) -> dict[str, float]:
    return {"im": im, "diversity": diversity, "agreement": agreement, "mean_entropy": entropy, "bn_distance": bn}


def test_select_epoch_by_each_rule() -> None:
    history = [
        _signals(-0.2, 1.0, 0.7, 0.9, 3.0),
        _signals(-0.6, 1.0, 0.9, 0.4, 2.0),
        _signals(-0.5, 1.0, 0.8, 0.3, 2.5),
    ]
    assert select_epoch(history, "last") == 2
    assert select_epoch(history, "im") == 1  # lowest IM
    assert select_epoch(history, "agreement") == 1  # highest agreement
    assert select_epoch(history, "entropy") == 2  # lowest entropy
    assert select_epoch(history, "bn") == 1  # smallest BN distance


def test_select_epoch_ties_go_to_the_later_epoch() -> None:
    assert select_epoch([_signals(-0.5, 1.0, 0.8), _signals(-0.5, 1.0, 0.8)], "im") == 1


def test_unknown_selection_rule_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError) as error:
        MonitorConfig(select="best")
    assert "agreement" in error.value.hint and error.value.reason == "bad-selection-rule"


def test_guard_is_quiet_when_the_adapted_model_is_better() -> None:
    source, adapted = _signals(-0.3, 0.6, 0.7), _signals(-1.2, 1.5, 0.95)
    assert guard_verdict(source, adapted, MonitorConfig()) == []


def test_guard_names_each_failure_signature() -> None:
    source = _signals(-0.8, 1.6, 0.9)
    collapsed = _signals(-0.1, 0.2, 0.5)  # worse IM, diversity 0.2 < 0.5 × 1.6, agreement −0.4
    reasons = guard_verdict(source, collapsed, MonitorConfig())
    assert len(reasons) == 3
    assert "information maximisation got worse" in reasons[0]
    assert "collapsed" in reasons[1] and "pseudo-label agreement fell" in reasons[2]
    lenient = MonitorConfig(guard_im_margin=1.0, guard_min_diversity_ratio=0.1, guard_agreement_drop=0.5)
    assert guard_verdict(source, collapsed, lenient) == []


def test_signals_on_hand_made_outputs() -> None:
    """Two confident images per class of K = 2: entropy ≈ 0, diversity = log 2, agreement 1."""
    torch.manual_seed(0)
    model = build_model(ArchSpec("resnet_tiny", num_classes=2, bottleneck_dim=4)).eval()
    images = torch.randn(4, 3, 16, 16)
    monitor = Monitor(model, lambda: iter([(images, torch.arange(4))]), 4, MonitorConfig(bn_images=4))
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    probabilities = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    signals = monitor.signals(model, TargetOutputs(features, probabilities), previous=torch.tensor([0, 1, 1, 1]))
    assert signals["mean_entropy"] == pytest.approx(0.0, abs=1e-4)
    assert signals["diversity"] == pytest.approx(math.log(2), abs=1e-4)
    assert signals["im"] == pytest.approx(-math.log(2), abs=1e-4)
    assert signals["agreement"] == 1.0
    assert signals["changed"] == 0.25  # image 1 went from class 1 to class 0
    assert signals["bn_distance"] > 0.0  # random images are not the source's statistics
