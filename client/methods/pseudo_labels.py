"""SHOT's centroid pseudo-labels (Liang et al., ICML 2020, §3.3; methods.md §1 "Refresh procedure").

The frozen classifier's own predictions on the new modality are noisy, but they are
good enough to place one centroid per class in feature space; labelling every image by
its nearest centroid then uses the *global* structure of the target set, which
corrects many individually wrong predictions.  Two rounds, as SHOT:

1. features f = B(F(x)) of the whole target set, in eval mode; append a constant 1 and
   L2-normalise each row (SHOT's "cosine" option);
2. soft centroids c_k = Σ_i p_ik f_i / Σ_i p_ik, weighted by the softmax outputs;
3. label each image with the nearest centroid by cosine distance, among the classes the
   classifier currently predicts more than ``threshold`` times (0: closed set);
4. hard centroids c_k = mean of the f_i labelled k in step 3, and label again.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from xkt.shared.models import SourceClassifier


def centroid_pseudo_labels(features: torch.Tensor, probabilities: torch.Tensor, threshold: int = 0) -> torch.Tensor:
    """Pseudo-labels from features (N, D) and softmax outputs (N, K) → (N,) int64 in [0, K).

    A class kept in step 3 that receives no image gets a zero centroid in step 4, whose
    cosine distance to every feature is 1, so it can still win only a tie with nothing
    closer (instead of producing a NaN centroid).
    """
    num_classes = probabilities.shape[1]
    features = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], dim=1)
    features = torch.nn.functional.normalize(features, dim=1)  # (N, D+1), unit rows
    counts = torch.bincount(probabilities.argmax(dim=1), minlength=num_classes)  # (K,)
    kept = torch.nonzero(counts > threshold).flatten()  # classes allowed as labels
    if len(kept) == 0:  # only possible with a threshold >= N: fall back to every class
        kept = torch.arange(num_classes)

    weights = probabilities.to(features.dtype)  # round 1: soft centroids
    labels = _nearest(features, weights.T @ features / weights.sum(dim=0)[:, None].clamp_min(1e-8), kept)
    hard = torch.nn.functional.one_hot(labels, num_classes).to(features.dtype)  # round 2: hard centroids
    return _nearest(features, hard.T @ features / hard.sum(dim=0)[:, None].clamp_min(1e-8), kept)


def socket_pseudo_labels(features: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """SOCKET's variant (methods.md §2.4): one round of soft centroids, nearest by Euclidean distance.

    Features (N, D) get the constant 1 appended and are L2-normalised as in SHOT; the
    soft centroids c_k = Σ_i p_ik f_i / Σ_i p_ik are *not* normalised, and each image
    takes the class of the nearest centroid in Euclidean distance.  No hard-assignment
    round and no class-count threshold.  Returns (N,) int64 in [0, K).
    """
    features = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], dim=1)
    features = torch.nn.functional.normalize(features, dim=1)
    weights = probabilities.to(features.dtype)  # (N, K)
    centroids = weights.T @ features / weights.sum(dim=0)[:, None].clamp_min(1e-8)  # (K, D+1)
    return torch.cdist(features, centroids).argmin(dim=1)


def _nearest(features: torch.Tensor, centroids: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """For unit rows (N, D) and centroids (K, D): the kept class of smallest cosine distance."""
    directions = torch.nn.functional.normalize(centroids[kept], dim=1)  # (K', D); zero rows stay zero
    distance = 1.0 - features @ directions.T  # (N, K')
    return kept[distance.argmin(dim=1)]


@torch.inference_mode()
def target_outputs(
    model: SourceClassifier, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bottleneck features (N, D) and softmax outputs (N, K) of the whole target set, in eval mode.

    ``batches`` yields (images, dataset indices); rows are placed by index, so the
    result is in dataset order whatever order the loader uses.  Eval mode means the
    BatchNorm running statistics are used and left untouched, as SHOT does.
    """
    was_training = model.training
    model.eval()
    features: torch.Tensor | None = None
    probabilities: torch.Tensor | None = None
    for images, indices in batches:
        embedded = model.embed(images)  # (B, D)
        probs = model.classifier(embedded).softmax(dim=1)  # (B, K)
        if features is None or probabilities is None:
            features = torch.empty(size, embedded.shape[1])
            probabilities = torch.empty(size, probs.shape[1])
        features[indices] = embedded
        probabilities[indices] = probs
    model.train(was_training)
    if features is None or probabilities is None:
        raise ValueError("the target set is empty")
    return features, probabilities
