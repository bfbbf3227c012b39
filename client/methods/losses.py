"""Loss terms for source-free adaptation, as pure functions of probabilities, logits or features.

Every function takes tensors and returns a scalar (or per-sample) tensor; none touches a
model.  Notation: ``P`` is an (N, K) matrix of softmax probabilities, one row per
image; logs use SHOT's ε = 1e-5 (``log(p + ε)``) so a confident prediction (p = 0 for
some class) never produces ``0 · log 0 = nan``.
"""

from __future__ import annotations

from collections.abc import Sequence

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


# ------------------------------------------------------------------ cross-modal terms
# The terms below serve SOCKET (methods.md §2.3), TGMB + TGKT (§3) and CMCD (§4).  Which
# inputs are constants (frozen-source features, teacher logits, the queue) is the
# caller's business: detach them before the call, as the docstrings say.


def ti_feature_distance(source_features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
    """SOCKET's task-irrelevant feature matching L_TI = ‖Z_s − Z_t‖_F (methods.md §2.3, item 3).

    Shapes: source_features Z_s (B, D), target_features Z_t (B, D) → scalar.  The plain
    Frobenius norm of the difference, as SOCKET's code computes it: not squared and not
    averaged, so for a fixed per-pair gap it grows with √B (double the batch, ×√2).
    Z_s comes from the frozen source model on the RGB halves and should be detached;
    Z_t from the target model on the paired target-modality halves.  The gradient at
    Z_s = Z_t is taken as 0 (PyTorch's subgradient of the norm at the origin).
    """
    distance: torch.Tensor = torch.linalg.vector_norm(source_features - target_features)
    return distance


def batchnorm_statistics_distance(
    batch_stats: Sequence[tuple[torch.Tensor, torch.Tensor]],
    source_stats: Sequence[tuple[torch.Tensor, torch.Tensor]],
    layer_weights: Sequence[float],
) -> torch.Tensor:
    """SOCKET's L_BN = Σ_l m_l · (‖μ_l^t − μ_l^s‖₂ + ‖σ²_l^t − σ²_l^s‖₂) (methods.md §2.3, item 4).

    Shapes: ``batch_stats`` and ``source_stats`` hold one (mean (C_l,), var (C_l,))
    pair per BatchNorm layer, in the same layer order; ``layer_weights`` one m_l per
    layer (SOCKET: 10 for the stem, 1 elsewhere; see ``batchnorm_capture.stem_weighted``)
    → scalar.  Plain (not squared) L2 norms, summed over layers, not averaged.  The
    batch statistics (μ^t, biased σ²^t over N, H, W of each layer's input) carry the
    graph; the source running statistics are constants.
    """
    if not len(batch_stats) == len(source_stats) == len(layer_weights):
        raise ValueError(
            f"{len(batch_stats)} batch, {len(source_stats)} source statistics and {len(layer_weights)} weights"
        )
    if not batch_stats:
        raise ValueError("no BatchNorm statistics to compare")
    terms = [
        weight * (torch.linalg.vector_norm(mean_t - mean_s) + torch.linalg.vector_norm(var_t - var_s))
        for (mean_t, var_t), (mean_s, var_s), weight in zip(batch_stats, source_stats, layer_weights, strict=True)
    ]
    return torch.stack(terms).sum()


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Knowledge distillation T² · E_i[KL(softmax(t_i/T) ‖ softmax(s_i/T))] (TGKT's L_KD, methods.md §3.3).

    Shapes: student_logits s (N, K), teacher_logits t (N, K) → scalar, in nats, ≥ 0.
    The T² factor (Hinton et al. 2015) keeps gradient magnitudes comparable across
    temperatures.  The teacher (the frozen source model on translated images) must be
    detached by the caller; otherwise the gradient also flows into the teacher.
    """
    student = torch.log_softmax(student_logits / temperature, dim=1)
    teacher = torch.log_softmax(teacher_logits / temperature, dim=1)
    kl = (teacher.exp() * (teacher - student)).sum(dim=1)  # (N,)
    return temperature**2 * kl.mean()


def symmetric_info_nce(
    target_embeddings: torch.Tensor, source_embeddings: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """CMCD's CMC loss, CLIP's symmetric InfoNCE over a batch of N pairs (methods.md §4.2).

    Shapes: target_embeddings z_t (N, D), source_embeddings z_s (N, D), both already
    L2-normalised by the caller → scalar.  With logits s_ij = z_t,i · z_s,j / τ and
    the pair (i, i) as the positive:
    L = ½ [−(1/N) Σ_i log softmax_j(s_ij)_{j=i}  −  (1/N) Σ_j log softmax_i(s_ij)_{i=j}],
    the row term (each target against all sources) plus the column term (each
    source against all targets).  Swapping the two arguments leaves it unchanged.
    """
    logits = target_embeddings @ source_embeddings.T / temperature  # (N, N)
    positives = torch.arange(len(logits), device=logits.device)
    rows = nn.functional.cross_entropy(logits, positives)
    columns = nn.functional.cross_entropy(logits.T, positives)
    return 0.5 * (rows + columns)


def similarity_distillation(
    source_embeddings: torch.Tensor,
    target_embeddings: torch.Tensor,
    queue: torch.Tensor,
    source_temperature: float,
    target_temperature: float,
) -> torch.Tensor:
    """CMCD's CMD loss, SEED-style similarity distillation (Fang et al. 2021; methods.md §4.2).

    Shapes: source_embeddings z_s (N, D), target_embeddings z_t (N, D), queue (Q, D)
    of earlier source embeddings (Q may be 0), all L2-normalised → scalar.  As in
    SEED, sample i's candidate set is its own source embedding followed by the queue,
    c_i = [z_s,i; q_1 … q_Q] ((1+Q) rows; the rest of the batch is not a candidate, it
    joins the queue after the step).  With p^s_ij = softmax_j(z_s,i · c_ij / τ_s) and
    p^t_ij = softmax_j(z_t,i · c_ij / τ_t):  L = (1/N) Σ_i −Σ_j p^s_ij log p^t_ij.
    SEED uses a sharper teacher, τ_s < τ_t.  z_s and the queue come from the frozen
    source encoder and must be detached by the caller.
    """
    own_source = (source_embeddings * source_embeddings).sum(dim=1, keepdim=True)  # (N, 1), ≈ 1
    own_target = (target_embeddings * source_embeddings).sum(dim=1, keepdim=True)  # (N, 1)
    source_logits = torch.cat([own_source, source_embeddings @ queue.T], dim=1) / source_temperature  # (N, 1+Q)
    target_logits = torch.cat([own_target, target_embeddings @ queue.T], dim=1) / target_temperature  # (N, 1+Q)
    teacher = torch.softmax(source_logits, dim=1)
    return -(teacher * torch.log_softmax(target_logits, dim=1)).sum(dim=1).mean()


def pixel_reconstruction(translated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """TGMB's L_rec: mean squared error (1/n) Σ (T(x_t) − x_s)² over every element (methods.md §3.2).

    Shapes: translated T(x_t^TI) and reference x_s^TI, both (B, 3, H, W) in the source
    model's normalised input space → scalar.
    """
    return nn.functional.mse_loss(translated, reference)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The critic's GAN loss −E[log σ(d_real)] − E[log(1 − σ(d_fake))] (BCE with logits, labels 1 / 0).

    Shapes: real_logits (B_r,), fake_logits (B_f,) → scalar, the sum of the two batch
    means.  For TGMB's L_D (methods.md §3.2, [INFER]) "real" are translations of TI
    target images, which L_rec ties to RGB, and "fake" translations of TR target
    images; the caller detaches the fakes when training the critic.
    """
    real = nn.functional.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = nn.functional.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss −E[log σ(d_fake)] (BCE with logits against label 1).

    Shapes: fake_logits (B,) → scalar.  Minimised by the translator so the critic takes
    its TR translations for TI translations (TGMB's L_D, methods.md §3.2).
    """
    return nn.functional.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def confident_pseudo_label_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Cross-entropy over the confidently labelled samples only (TGKT's L_self, methods.md §3.3).

    Shapes: logits (N, K), labels (N,) int64, confidence (N,) → scalar
    Σ_i [c_i ≥ θ] · CE(z_i, ŷ_i) / max(1, Σ_i [c_i ≥ θ]): the mean over kept samples,
    and 0 (still attached to the logits' graph, with zero gradient) when none is kept.
    """
    kept = (confidence >= threshold).to(logits.dtype)  # (N,)
    per_sample = nn.functional.cross_entropy(logits, labels, reduction="none")  # (N,)
    return (per_sample * kept).sum() / kept.sum().clamp_min(1.0)


def normalised_pair_distance(target_embeddings: torch.Tensor, source_embeddings: torch.Tensor) -> torch.Tensor:
    """Positive-only pair matching: the mean squared L2 distance of the L2-normalised pairs (CMCD's ``l2``).

    Shapes: target_embeddings z_t (N, D), source_embeddings z_s (N, D) → scalar.  Each row
    is L2-normalised here, e_i = z_i / ‖z_i‖, and
    L = (1/N) Σ_i ‖e_t,i − e_s,i‖² = (1/N) Σ_i (2 − 2·cos(z_t,i, z_s,i)), in [0, 4].
    It pulls each target embedding toward its own pair only, with no negatives: the
    "L2 feature matching" baseline that CMC and CMD are compared with (methods.md §4.3,
    §4.5).  Unlike ``ti_feature_distance`` it is scale-free and averaged over pairs.
    z_s (the frozen source) should be detached by the caller.
    """
    target = nn.functional.normalize(target_embeddings, dim=1)
    source = nn.functional.normalize(source_embeddings, dim=1)
    return (target - source).pow(2).sum(dim=1).mean()
