"""SHOT's centroid pseudo-labelling on constructed feature clusters with known labels."""

from __future__ import annotations

import torch

from xkt.client.methods.pseudo_labels import centroid_pseudo_labels, target_outputs
from xkt.shared.models import ArchSpec, build_model


def _two_clusters() -> tuple[torch.Tensor, torch.Tensor]:
    """Ten features around (+5, 0) (class 0) and ten around (0, +5) (class 1)."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    truth = torch.tensor([0] * 10 + [1] * 10)
    return centres[truth] + 0.3 * torch.randn(20, 2, generator=generator), truth


def test_centroids_correct_noisy_predictions() -> None:
    features, truth = _two_clusters()
    # The classifier is right with p = 0.7 on most images but confidently wrong on 3 of each class.
    probabilities = torch.nn.functional.one_hot(truth, 2).float() * 0.4 + 0.3
    probabilities[[0, 1, 2, 10, 11, 12]] = probabilities[[0, 1, 2, 10, 11, 12]].flip(1)
    assert (probabilities.argmax(1) != truth).sum() == 6
    assert torch.equal(centroid_pseudo_labels(features, probabilities), truth)


def test_classes_at_or_below_the_threshold_are_never_labels() -> None:
    features, truth = _two_clusters()
    probabilities = torch.tensor([[0.6, 0.3, 0.1]]).repeat(20, 1)  # class 0 predicted 20 times, 1 and 2 never
    labels = centroid_pseudo_labels(features, probabilities)
    assert torch.equal(labels, torch.zeros(20, dtype=torch.long))
    # With class 1 predicted for one image only, a threshold of 1 still excludes it.
    probabilities[15] = torch.tensor([0.1, 0.8, 0.1])
    assert set(centroid_pseudo_labels(features, probabilities, threshold=1).tolist()) == {0}
    assert truth.sum() == 10  # the clusters themselves are balanced


def test_target_outputs_are_in_dataset_order_and_leave_bn_alone() -> None:
    torch.manual_seed(0)
    model = build_model(ArchSpec("resnet_tiny", num_classes=3, bottleneck_dim=8))
    images = torch.randn(6, 3, 16, 16)
    before = model.bottleneck.bn.running_mean.clone()
    shuffled = [(images[[4, 1, 5]], torch.tensor([4, 1, 5])), (images[[0, 3, 2]], torch.tensor([0, 3, 2]))]
    features, probabilities = target_outputs(model, shuffled, size=6)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(features, model.embed(images), atol=1e-5)
    assert torch.allclose(probabilities.sum(1), torch.ones(6))
    assert torch.equal(model.bottleneck.bn.running_mean, before)
