"""CMCD (Lin et al. 2024, arXiv 2405.03355): contrastive cross-modal distillation on TI pairs, made source-free.

The paper distils a frozen source encoder into a target-modality encoder on paired,
unlabelled samples (methods.md §4.2) and then fine-tunes with a few target labels.  A
site has no target labels, so the distillation runs on the task-irrelevant pairs while
the frozen source classifier and information maximisation on the unlabelled task
images (SHOT's recipe, methods.md §1) keep the model a classifier (methods.md §4.5):

    L = λ_c · L_CMC (or L_CMD, or L_L2) + λ_IM · L_IM [+ λ_PL · L_PL]

- L_CMC, the paper's CMC: CLIP's symmetric InfoNCE over a batch of TI pairs; the pair is
  the positive, the other pairs of the batch are the negatives (``symmetric_info_nce``).
- L_CMD, the paper's CMD (``variant = "cmd"``; the paper uses CMC *or* CMD, never both):
  SEED's similarity distillation against a FIFO queue of earlier source embeddings,
  with a sharper teacher than student temperature (``similarity_distillation``).
- L_L2 (``variant = "l2"``), the ablation "CMCD without negatives": positive-only
  matching, the mean over pairs of ‖e_t − e_s‖² = 2 − 2·cos(e_t, e_s) with the same
  embeddings as CMC and CMD (``normalised_pair_distance``).  It is the L2 feature
  matching that, the reviewers note, the paper's bound does not show CMC/CMD to beat
  (methods.md §4.3, §4.5); only the negatives differ from CMC, so it measures what they add.
- L_IM on the target batch through the model's copy of the frozen source classifier.
- L_PL, SHOT's centroid pseudo-labels, off by default (see ``CmcdConfig.pl_weight``).

Embeddings (the design, and why).  The teacher is the frozen source model: the
bottleneck features z_s of every pair's RGB half are computed once in ``setup``, and the
source embedding is e_s = z_s / ‖z_s‖ with *no* head.  A trainable head on the teacher
side would let the objective be met by moving the teacher instead of the student (a
head shared by both sides can collapse both onto whatever separates one batch), and
the paper's g_s stays fixed.  The target embedding is e_t = h(z_t), a trainable head h
mapping the target bottleneck D → D (hidden D), i.e. *into the source's own
D-dimensional feature space*, and L2-normalised, so the two sides are compared by
cosine; a head to d ≠ D could not be compared with the frozen source features without
a second, teacher-side head, which the first point rules out.

Which head.  Unlike the paper, nothing fine-tunes the encoder with labels after the
distillation: the frozen classifier reads z_t itself, so what the contrastive term
teaches must land in z_t, not in the head.  ``head = "residual"`` (the default) is
h(z) = normalise(z + g(z)), g the :class:`ProjectionHead` MLP with its last layer
zero-initialised: it starts as the identity direction, so the first gradients align
z_t with z_s in the classifier's own space (SOCKET's L_TI, with negatives: methods.md
§4.5), and g learns only a correction.  ``head = "mlp"`` is the paper's plain
SimCLR-style head h(z) = normalise(g(z)); from a random start it lets the backbone meet
the term in directions the classifier does not use.  On the toy shift of the tests
(CMC, 5 seeds, 10 epochs) the residual head averaged 0.85 target accuracy, the plain head
0.73, SHOT-IM 0.83.

Trained: backbone, bottleneck and the head (its own group ``head``, at the bottleneck's
learning rate); the classifier stays frozen (SHOT §3.1).  With ``variant = "cmd"`` the
queue is a module of buffers, so the trainer checkpoints it and a resumed run continues
with exactly the queue the interrupted one had.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xkt.client.methods.base import Batch, Method, MethodConfig, SiteData, TargetOutputs, register
from xkt.client.methods.losses import (
    information_maximisation,
    normalised_pair_distance,
    pseudo_label_cross_entropy,
    similarity_distillation,
    symmetric_info_nce,
)
from xkt.client.methods.projection import EmbeddingQueue, ProjectionHead
from xkt.client.methods.socket import source_pair_features
from xkt.shared.errors import ConfigError
from xkt.shared.models import SourceClassifier

VARIANTS = ("cmc", "cmd", "l2")
HEADS = ("residual", "mlp")


@dataclass(frozen=True)
class CmcdConfig(MethodConfig):
    """CMCD's settings.  The paper's temperatures, queue size and weights are not retrieved (methods.md §4.2)."""

    # "cmc": symmetric InfoNCE in the batch; "cmd": SEED-style distillation over a queue;
    # "l2": the ablation without negatives, 2 − 2·cos of each pair (same head, same weight λ_c)
    variant: str = "cmc"
    contrastive_weight: float = 1.0  # λ_c of the variant's term; the paper's only TI term, so on a par with L_IM
    im_weight: float = 1.0  # λ_IM, as SHOT and SOCKET
    pl_weight: float = 0.0  # λ_PL: the issue defines CMCD as CMC + frozen classifier + IM; 0.3 is SHOT's
    temperature: float = 0.07  # CMC's τ, CLIP's initial value (methods.md §4.2)
    teacher_temperature: float = 0.05  # CMD's τ_s; sharper than the student's, as SEED [INFER]
    student_temperature: float = 0.1  # CMD's τ_t [INFER]
    queue_size: int = 4096  # CMD's queue length, capped at the number of TI pairs (more would only repeat them)
    head: str = "residual"  # "residual": normalise(z + g(z)), g zero-initialised; "mlp": normalise(g(z)) (module doc)
    head_hidden_dim: int = 0  # hidden width of the head's MLP g; 0: the bottleneck width D (SimCLR/SEED)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(
                f"cmcd.variant must be one of {', '.join(VARIANTS)}, not {self.variant!r}",
                hint="set cmcd.variant=cmc (contrastive, in-batch negatives), cmd (similarity distillation)"
                " or l2 (the ablation without negatives)",
                reason="bad-config-value",
            )
        if self.head not in HEADS:
            raise ConfigError(
                f"cmcd.head must be 'residual' or 'mlp', not {self.head!r}",
                hint="set cmcd.head=residual (starts as the identity direction) or mlp (the paper's plain head)",
                reason="bad-config-value",
            )
        temperatures = {
            "temperature": self.temperature,
            "teacher_temperature": self.teacher_temperature,
            "student_temperature": self.student_temperature,
        }
        for name, value in temperatures.items():
            if not value > 0:
                raise ConfigError(
                    f"cmcd.{name} must be positive, not {value}",
                    hint=f"set cmcd.{name} to a value such as 0.07",
                    reason="bad-config-value",
                )
        if self.queue_size < 1 or self.head_hidden_dim < 0:
            raise ConfigError(
                "cmcd.queue_size must be at least 1 and cmcd.head_hidden_dim at least 0",
                hint="set cmcd.queue_size=4096 and cmcd.head_hidden_dim=0 (the defaults)",
                reason="bad-config-value",
            )

    @property
    def weights(self) -> dict[str, float]:
        """{"cmc", "cmd", "l2", "im", "pl"} → their λ; the variants not selected weigh 0 (they are never computed)."""
        variants = {name: self.contrastive_weight if self.variant == name else 0.0 for name in VARIANTS}
        return variants | {"im": self.im_weight, "pl": self.pl_weight}


class ResidualProjectionHead(ProjectionHead):
    """h(z) = normalise(z + g(z)): a :class:`ProjectionHead` MLP g (D → H → D) added to its input, then L2-normalised.

    Shapes: (N, D) → (N, D), unit rows.  g's last layer starts at zero, so at first
    h(z) = z / ‖z‖: the embedding starts in the bottleneck space the frozen classifier
    reads, and g learns only what a correction needs.  BatchNorm1d needs N ≥ 2 in train mode.
    """

    def __init__(self, dim: int, hidden_dim: int | None = None) -> None:
        super().__init__(dim, hidden_dim, out_dim=dim)
        last = self.mlp[-1]
        if not isinstance(last, nn.Linear):
            raise TypeError("ProjectionHead's MLP must end in a Linear layer")
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(features + self.mlp(features), dim=1)  # (N, D), unit rows


def projection_head(kind: str, dim: int, hidden_dim: int = 0) -> ProjectionHead:
    """CMCD's target-side head D → D: ``"residual"`` (:class:`ResidualProjectionHead`) or ``"mlp"``."""
    hidden = hidden_dim or dim
    return ResidualProjectionHead(dim, hidden) if kind == "residual" else ProjectionHead(dim, hidden, out_dim=dim)


@register("cmcd")
class Cmcd(Method):
    """Contrastive distillation (CMC or CMD; L2 without negatives as the ablation) on TI pairs + IM."""

    default_config = CmcdConfig()
    config: CmcdConfig
    needs_pairs = True
    # Contrastive terms need negatives: a batch of B pairs gives each positive B − 1 (CMC),
    # so keep SHOT's 64 rather than SOCKET's 32; the TI batch follows it (pair_batch_size 0).
    # The l2 ablation keeps the same batch, so that only the negatives differ from CMC.
    batch_size = 64

    def __init__(self, config: CmcdConfig) -> None:
        super().__init__(config)
        self.source_embeddings = torch.empty(0)  # (P, D) e_s = z_s / ‖z_s‖ of every pair's RGB half
        self.head: ProjectionHead | None = None  # built in setup, once D is known
        self.queue: EmbeddingQueue | None = None  # CMD only
        self.pseudo_labels: torch.Tensor | None = None

    def setup(self, source: SourceClassifier, data: SiteData) -> dict[str, float]:
        """Embed every pair's RGB half with the frozen source once; build the head (and CMD's queue)."""
        features, distance = source_pair_features(source, data)  # (P, D)
        self.source_embeddings = nn.functional.normalize(features, dim=1)
        dim = features.shape[1]
        self.head = projection_head(self.config.head, dim, self.config.head_hidden_dim)
        if self.config.variant == "cmd":
            self.queue = EmbeddingQueue(min(self.config.queue_size, data.pair_count), dim)
        return {"ti_feature_distance_per_pair": distance}

    def modules(self) -> dict[str, nn.Module]:
        """The projection head, plus CMD's queue (buffers only) so checkpoints carry it; none before setup."""
        if self.head is None:
            return {}
        return {"head": self.head} | ({"queue": self.queue} if self.queue is not None else {})

    def trainable_groups(self, model: SourceClassifier) -> dict[str, list[nn.Parameter]]:
        """Backbone and bottleneck (as SHOT) plus the head; the classifier stays frozen."""
        if self.head is None:
            raise RuntimeError("cmcd: setup must run before trainable_groups")
        return super().trainable_groups(model) | {"head": list(self.head.parameters())}

    def on_epoch_start(self, model: SourceClassifier, outputs: TargetOutputs, data: SiteData) -> dict[str, float]:
        """Refresh SHOT's centroid pseudo-labels when λ_PL > 0 (otherwise nothing to do)."""
        if self.config.pl_weight != 0.0:
            self.pseudo_labels = outputs.centroid_labels
        return {}

    def embed_pairs(self, model: SourceClassifier, target_halves: torch.Tensor) -> torch.Tensor:
        """e_t = h(z_t): the target halves (B, 3, H, W) → unit rows (B, D) in the source's feature space."""
        if self.head is None:
            raise RuntimeError("cmcd: setup must run before losses")
        embedded: torch.Tensor = self.head(model.embed(target_halves))
        return embedded

    def losses(self, model: SourceClassifier, batch: Batch) -> dict[str, torch.Tensor]:
        """{"cmc"}, {"cmd"} or {"l2"} on the TI pairs, {"im"} (and {"pl"} when λ_PL > 0) on the target batch."""
        if batch.pairs is None:
            raise RuntimeError("cmcd needs TI pairs in every batch")
        logits = model(batch.images)  # (B, K) through the frozen classifier
        terms = {"im": information_maximisation(logits.softmax(dim=1))}
        if self.config.pl_weight != 0.0:
            if self.pseudo_labels is None:
                raise RuntimeError("on_epoch_start must run before losses when pl_weight > 0")
            terms["pl"] = pseudo_label_cross_entropy(logits, self.pseudo_labels[batch.indices])
        target = self.embed_pairs(model, batch.pairs.target)  # (B', D), unit rows
        source = self.source_embeddings[batch.pairs.indices]  # (B', D), unit rows, constants
        if self.config.variant == "l2":
            terms["l2"] = normalised_pair_distance(target, source)
        elif self.queue is None:
            terms["cmc"] = symmetric_info_nce(target, source, self.config.temperature)
        else:
            cfg = self.config
            queue = self.queue.tensor()  # (Q, D), before this batch joins it (SEED)
            terms["cmd"] = similarity_distillation(
                source, target, queue, cfg.teacher_temperature, cfg.student_temperature
            )
            self.queue.push(source)
        return terms
