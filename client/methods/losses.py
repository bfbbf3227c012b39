"""Loss terms for source-free adaptation, as pure functions of probabilities or logits.

Every function takes tensors and returns a scalar (or per-sample) tensor; none touches a
model.  Notation: ``P`` is an (N, K) matrix of softmax probabilities, one row per
image; logs use SHOT's ε = 1e-5 (``log(p + ε)``) so a confident prediction (p = 0 for
some class) never produces ``0 · log 0 = nan``.
"""

from __future__ import annotations

import torch
from torch import nn

EPSILON = 1e-5  # SHOT's ε inside every log (methods.md §1)


def entropy(probabilities: torch.Tensor, eps: float = EPSILON) -> torch.Tensor:
    """Per-sample Shannon entropy H(p_i) = -Σ_k p_ik · log(p_ik + ε), in nats.

    Shapes: (N, K) → (N,).  A one-hot row has entropy ≈ 0, a uniform row log K.
    """
    return -(probabilities * torch.log(probabilities + eps)).sum(dim=1)


def mean_entropy(probabilities: torch.Tensor, eps: float = EPSILON) -> torch.Tensor:
    """The batch's average entropy E_i[H(p_i)] (SHOT §3.2, the L_ent term).

    Shapes: (N, K) → scalar.  Minimising it makes each prediction confident.
    """
    return entropy(probabilities, eps).mean()


def diversity(probabilities: torch.Tensor, eps: float = EPSILON) -> torch.Tensor:
    """Entropy of the batch-mean prediction H(p̄), p̄ = (1/N) Σ_i p_i (SHOT §3.2, L_div up to sign).

    Shapes: (N, K) → scalar.  Maximising it keeps the batch spread over classes, which
    stops entropy minimisation from collapsing every image onto one class.
    """
    return entropy(probabilities.mean(dim=0, keepdim=True), eps)[0]


def information_maximisation(probabilities: torch.Tensor, eps: float = EPSILON) -> torch.Tensor:
    """SHOT's information-maximisation loss L_IM = E_i[H(p_i)] − H(p̄) (methods.md §1).

    Shapes: (N, K) → scalar, bounded below by −log K (confident and perfectly balanced).
    """
    return mean_entropy(probabilities, eps) - diversity(probabilities, eps)


def pseudo_label_cross_entropy(logits: torch.Tensor, pseudo_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits against centroid pseudo-labels, −E_i[log softmax(z_i)_{ŷ_i}] (SHOT §3.3).

    Shapes: logits (N, K), pseudo_labels (N,) int64 in [0, K) → scalar.  Plain CE
    without label smoothing, as SHOT's L_PL.
    """
    return nn.functional.cross_entropy(logits, pseudo_labels)
