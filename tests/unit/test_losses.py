"""Loss functions checked against values worked out by hand on tiny matrices (mostly 2×3)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from xkt.client.methods.losses import (
    batchnorm_statistics_distance,
    confident_pseudo_label_cross_entropy,
    discriminator_loss,
    distillation_kl,
    diversity,
    entropy,
    generator_adversarial_loss,
    information_maximisation,
    mean_entropy,
    normalised_pair_distance,
    pixel_reconstruction,
    pseudo_label_cross_entropy,
    similarity_distillation,
    symmetric_info_nce,
    ti_feature_distance,
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


# ------------------------------------------------------------------ cross-modal terms


def test_ti_feature_distance_is_the_plain_frobenius_norm() -> None:
    source = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    # Difference [[0, 2], [3, 0]]: √(2² + 3²) = √13, neither squared nor averaged.
    assert ti_feature_distance(source, target).item() == pytest.approx(math.sqrt(13))
    assert ti_feature_distance(target, source).item() == pytest.approx(math.sqrt(13))  # symmetric


def test_ti_feature_distance_grows_with_root_batch_size() -> None:
    source = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    doubled = ti_feature_distance(source.repeat(2, 1), target.repeat(2, 1))
    assert doubled.item() == pytest.approx(math.sqrt(26))


def test_ti_feature_distance_is_zero_with_a_finite_gradient_when_equal() -> None:
    target = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    loss = ti_feature_distance(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), target)
    loss.backward()
    assert loss.item() == 0.0
    assert target.grad is not None and torch.equal(target.grad, torch.zeros(2, 2))


def test_batchnorm_statistics_distance_weights_each_layer() -> None:
    batch = [
        (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])),
        (torch.tensor([0.0, 0.0, 0.0]), torch.tensor([2.0, 2.0, 2.0])),
    ]
    source = [
        (torch.tensor([1.0, 0.0]), torch.tensor([4.0, 5.0])),
        (torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 2.0, 2.0])),
    ]
    # Layer 1: ‖(0, 2)‖ + ‖(−3, −4)‖ = 2 + 5 = 7, weight 10 → 70.
    # Layer 2: ‖(−1, −1, −1)‖ + ‖0‖ = √3, weight 1.
    loss = batchnorm_statistics_distance(batch, source, [10.0, 1.0])
    assert loss.item() == pytest.approx(70 + math.sqrt(3))


def test_batchnorm_statistics_distance_is_zero_for_equal_statistics_and_refuses_mismatches() -> None:
    stats = [(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))]
    assert batchnorm_statistics_distance(stats, stats, [10.0]).item() == 0.0
    with pytest.raises(ValueError):
        batchnorm_statistics_distance(stats, stats, [10.0, 1.0])
    with pytest.raises(ValueError):
        batchnorm_statistics_distance([], [], [])


def test_batchnorm_statistics_distance_gradient_reaches_the_batch_statistics() -> None:
    mean = torch.tensor([3.0, 4.0], requires_grad=True)
    loss = batchnorm_statistics_distance([(mean, torch.ones(2))], [(torch.zeros(2), torch.ones(2))], [2.0])
    loss.backward()
    # d/dμ of 2·‖μ‖ = 2·μ/‖μ‖ = 2·(0.6, 0.8).
    assert mean.grad is not None and mean.grad.tolist() == pytest.approx([1.2, 1.6])


def test_distillation_kl() -> None:
    # Row 0: teacher (½, ½), student (¼, ¾): KL = ½ log(½/¼) + ½ log(½/¾) = ½ log(4/3).
    # Row 1: identical distributions, KL = 0.  Mean over rows: ¼ log(4/3).
    teacher = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=torch.float64))
    student = torch.log(torch.tensor([[0.25, 0.75], [0.25, 0.75]], dtype=torch.float64))
    assert distillation_kl(student, teacher).item() == pytest.approx(0.25 * math.log(4 / 3))


def test_distillation_kl_temperature_scales_logits_and_multiplies_by_t_squared() -> None:
    # Logits ×2 divided by T = 2 give the same distributions as above; the T² factor gives ×4.
    teacher = 2 * torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=torch.float64))
    student = 2 * torch.log(torch.tensor([[0.25, 0.75], [0.25, 0.75]], dtype=torch.float64))
    assert distillation_kl(student, teacher, temperature=2.0).item() == pytest.approx(math.log(4 / 3))


def test_distillation_kl_is_zero_for_equal_logits() -> None:
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    assert distillation_kl(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_symmetric_info_nce_averages_row_and_column_cross_entropy() -> None:
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    source = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    # s = z_t z_sᵀ = [[1, 0.6], [0, 0.8]] with τ = 1; −log softmax of a two-way choice is log(1 + e^(other − own)).
    rows = 0.5 * (math.log(1 + math.exp(0.6 - 1.0)) + math.log(1 + math.exp(0.0 - 0.8)))
    columns = 0.5 * (math.log(1 + math.exp(0.0 - 1.0)) + math.log(1 + math.exp(0.6 - 0.8)))
    assert symmetric_info_nce(target, source, temperature=1.0).item() == pytest.approx(0.5 * (rows + columns))
    # Swapping the modalities swaps rows and columns: same value.
    assert symmetric_info_nce(source, target, temperature=1.0).item() == pytest.approx(0.5 * (rows + columns))


def test_symmetric_info_nce_temperature_divides_the_logits() -> None:
    identity = torch.eye(2, dtype=torch.float64)
    # s = I / 0.5 = 2·I: every row and column is −log(e² / (e² + 1)) = log(1 + e^−2).
    assert symmetric_info_nce(identity, identity, temperature=0.5).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_similarity_distillation_uses_own_source_embedding_and_queue_only() -> None:
    source = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([[0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    queue = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    # Row 0: candidates [z_s,0 = (1, 0); q = (0, 1)].  Teacher logits (1, 0)/0.5 = (2, 0),
    # p^s = (e², 1)/(e² + 1).  Student logits (0.6, 0.8)/1, log p^t = (0.6, 0.8) − log(e^0.6 + e^0.8).
    p0, p1 = math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)
    row0 = math.log(math.exp(0.6) + math.exp(0.8)) - (p0 * 0.6 + p1 * 0.8)
    # Row 1: candidates [(0, 1); (0, 1)], equal logits for teacher and student: p = (½, ½), CE = log 2.
    # (Were row 0's source embedding a candidate too, this row would differ.)
    row1 = math.log(2)
    loss = similarity_distillation(source, target, queue, source_temperature=0.5, target_temperature=1.0)
    assert loss.item() == pytest.approx(0.5 * (row0 + row1))


def test_similarity_distillation_with_an_empty_queue_is_zero() -> None:
    embeddings = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    target = torch.tensor([[0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    loss = similarity_distillation(embeddings, target, torch.empty(0, 2), 0.1, 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-7)  # one candidate: p^s = p^t = 1
    assert target.grad is not None and torch.isfinite(target.grad).all()


def test_pixel_reconstruction_is_mean_squared_error() -> None:
    translated = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    reference = torch.tensor([[1.0, 0.0], [3.0, 5.0]])
    # Squared differences 0, 4, 0, 1 over four elements: 5/4.
    assert pixel_reconstruction(translated, reference).item() == pytest.approx(1.25)


def test_discriminator_loss() -> None:
    # Logits 0: σ = ½ for both, each BCE is log 2.
    assert discriminator_loss(torch.zeros(2), torch.zeros(3)).item() == pytest.approx(2 * math.log(2))
    # Logit log 3: σ = ¾.  Real: −log ¾ = log(4/3).  Fake: −log(1 − ¾) = log 4.
    log3 = torch.tensor([math.log(3)], dtype=torch.float64)
    assert discriminator_loss(log3, log3).item() == pytest.approx(math.log(4 / 3) + math.log(4))


def test_generator_adversarial_loss_is_non_saturating() -> None:
    # −log σ(log 3) = log(4/3), −log σ(0) = log 2; mean ½ log(8/3).
    fake = torch.tensor([math.log(3), 0.0], dtype=torch.float64)
    assert generator_adversarial_loss(fake).item() == pytest.approx(0.5 * math.log(8 / 3))
    # A critic sure of "fake" (logit −20) still gives a large gradient: about −1 per sample, / 2 for the mean.
    confident_fake = torch.tensor([-20.0, -20.0], requires_grad=True)
    generator_adversarial_loss(confident_fake).backward()
    assert confident_fake.grad is not None and confident_fake.grad.tolist() == pytest.approx([-0.5, -0.5], abs=1e-6)


_PL_LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]], dtype=torch.float64))


def test_confident_pseudo_label_cross_entropy_keeps_confident_samples_only() -> None:
    labels = torch.tensor([0, 1])
    confidence = torch.tensor([0.9, 0.2], dtype=torch.float64)
    # Only row 0 (0.9 ≥ 0.5) is kept: −log ½ = log 2.
    assert confident_pseudo_label_cross_entropy(_PL_LOGITS, labels, confidence, 0.5).item() == pytest.approx(
        math.log(2)
    )
    # Both kept (0.2 ≥ 0.2, the threshold is inclusive): ½(log 2 + log 4) = 1.5 log 2.
    assert confident_pseudo_label_cross_entropy(_PL_LOGITS, labels, confidence, 0.2).item() == pytest.approx(
        1.5 * math.log(2)
    )


def test_confident_pseudo_label_cross_entropy_is_zero_with_a_gradient_path_when_none_is_kept() -> None:
    logits = _PL_LOGITS.clone().requires_grad_(True)
    loss = confident_pseudo_label_cross_entropy(logits, torch.tensor([0, 1]), torch.tensor([0.1, 0.2]), 0.5)
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize(
    "term",
    [
        lambda x: ti_feature_distance(torch.zeros(2, 3), x),
        lambda x: distillation_kl(x, torch.zeros(2, 3)),
        lambda x: symmetric_info_nce(torch.nn.functional.normalize(x, dim=1), torch.eye(2, 3)),
        lambda x: similarity_distillation(
            torch.eye(2, 3), torch.nn.functional.normalize(x, dim=1), torch.eye(3), 0.05, 0.1
        ),
        lambda x: pixel_reconstruction(x, torch.zeros(2, 3)),
        lambda x: normalised_pair_distance(x, torch.eye(2, 3)),
        lambda x: generator_adversarial_loss(x.sum(dim=1)),
    ],
)
def test_cross_modal_terms_have_finite_gradients(term: Callable[[torch.Tensor], torch.Tensor]) -> None:
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]], requires_grad=True)
    term(x).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_normalised_pair_distance_is_mean_squared_distance_of_unit_rows() -> None:
    target = torch.tensor([[3.0, 4.0], [2.0, 0.0]], dtype=torch.float64)
    source = torch.tensor([[4.0, 3.0], [0.0, 5.0]], dtype=torch.float64)
    # Unit rows: (0.6, 0.8) vs (0.8, 0.6), squared distance 0.04 + 0.04 = 0.08 = 2 − 2·0.96;
    # (1, 0) vs (0, 1), squared distance 2 = 2 − 2·0.  Mean over the two pairs: 1.04.
    assert normalised_pair_distance(target, source).item() == pytest.approx(1.04)
    # Scale-free, zero for pairs pointing the same way, and 4 (the maximum) for opposite ones.
    assert normalised_pair_distance(7 * target, source).item() == pytest.approx(1.04)
    assert normalised_pair_distance(3 * source, source).item() == pytest.approx(0.0, abs=1e-12)
    assert normalised_pair_distance(-source, source).item() == pytest.approx(4.0)
