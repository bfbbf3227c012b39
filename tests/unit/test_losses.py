"""Loss functions checked against values worked out by hand on a 2×3 probability matrix."""

from __future__ import annotations

import math

import pytest
import torch

from xkt.client.methods.losses import (
    diversity,
    entropy,
    information_maximisation,
    mean_entropy,
    pseudo_label_cross_entropy,
)

# ε = 1e-5 shifts each value by at most ~1e-5, hence abs=1e-4 below.
# Row 0 is one-hot, row 1 uniform over two classes; the batch mean is (0.5, 0.25, 0.25).
P = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], dtype=torch.float64)


def test_entropy_per_row() -> None:
    # H(one-hot) = 0; H(0, ½, ½) = log 2.
    assert entropy(P).tolist() == pytest.approx([0.0, math.log(2)], abs=1e-4)


def test_entropy_uses_shot_epsilon() -> None:
    # −[1·log(1+ε) + 0·log ε + 0·log ε] = −log(1 + ε), so a one-hot row is slightly negative.
    assert entropy(P)[0].item() == pytest.approx(-math.log(1 + 1e-5), rel=1e-9)


def test_mean_entropy() -> None:
    assert mean_entropy(P).item() == pytest.approx(math.log(2) / 2, abs=1e-4)


def test_diversity_is_entropy_of_the_mean() -> None:
    # H(½, ¼, ¼) = ½ log 2 + 2·¼ log 4 = 1.5 log 2.
    assert diversity(P).item() == pytest.approx(1.5 * math.log(2), abs=1e-4)


def test_information_maximisation() -> None:
    # ½ log 2 − 1.5 log 2 = −log 2.
    assert information_maximisation(P).item() == pytest.approx(-math.log(2), abs=1e-4)


def test_information_maximisation_lower_bound_is_minus_log_k() -> None:
    confident_and_balanced = torch.eye(3, dtype=torch.float64)
    assert information_maximisation(confident_and_balanced).item() == pytest.approx(-math.log(3), abs=1e-4)


def test_pseudo_label_cross_entropy() -> None:
    # Logits log P' for P' = [[½, ¼, ¼], [¼, ¼, ½]], labels (0, 2): CE = −½(log ½ + log ½) = log 2.
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]], dtype=torch.float64))
    labels = torch.tensor([0, 2])
    assert pseudo_label_cross_entropy(logits, labels).item() == pytest.approx(math.log(2))


def test_losses_are_differentiable() -> None:
    logits = torch.zeros(2, 3, requires_grad=True)
    information_maximisation(logits.softmax(dim=1)).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
