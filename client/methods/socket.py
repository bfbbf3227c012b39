"""SOCKET (Ahmed et al., ECCV 2022): source-free cross-modal transfer with task-irrelevant pairs.

SHOT's recipe plus two terms that attack the modality gap directly (methods.md §2.3):

    L = 1.0·L_IM + 0.3·L_PL + 0.5·L_TI + 0.5·L_BN

- L_IM, information maximisation on the target batch (as SHOT);
- L_PL, cross-entropy against SOCKET's one-round Euclidean centroid pseudo-labels,
  refreshed at the start of every epoch (``pseudo_labels = "shot"`` uses SHOT's instead);
- L_TI = ‖Z_s − Z_t‖_F: the target model's bottleneck features of the target halves of
  a batch of TI pairs should equal the frozen source model's features of their RGB halves,
  computed once before training from identically prepared images (§2.7: no random crop
  on one half only, the source's own normalisation on both);
- L_BN = Σ_l m_l(‖μ_l^t − μ_l^s‖ + ‖σ²_l^t − σ²_l^s‖) at the input of every BatchNorm2d
  of the backbone, on the target batch, against the source's running statistics, with
  the stem weighted m_1 = 10 and *no* learnable gate (§2.7: the code's gate shrinks to
  zero and switches the term off; here it is fixed at 1).

Trained: backbone and bottleneck; the classifier stays frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xkt.client.methods.base import Batch, Method, MethodConfig, SiteData, TargetOutputs, register
from xkt.client.methods.batchnorm_capture import (
    BatchNormCapture,
    Stats,
    source_batchnorm_reference,
    stem_weighted,
)
from xkt.client.methods.losses import (
    batchnorm_statistics_distance,
    information_maximisation,
    pseudo_label_cross_entropy,
    ti_feature_distance,
)
from xkt.client.methods.pseudo_labels import socket_pseudo_labels
from xkt.shared.errors import ConfigError
from xkt.shared.models import SourceClassifier


@dataclass(frozen=True)
class SocketConfig(MethodConfig):
    """SOCKET's defaults, from its ``knowledge_transfer.py`` (methods.md §2.3–2.5)."""

    im_weight: float = 1.0
    pl_weight: float = 0.3  # λ_PL
    ti_weight: float = 0.5  # λ_TI
    bn_weight: float = 0.5  # λ_BN
    stem_weight: float = 10.0  # m_1, the first BatchNorm's weight in L_BN
    pseudo_labels: str = "socket"  # "socket": one round, Euclidean; "shot": SHOT's two rounds, cosine

    def __post_init__(self) -> None:
        if self.pseudo_labels not in ("socket", "shot"):
            raise ConfigError(
                f"socket.pseudo_labels must be 'socket' or 'shot', not {self.pseudo_labels!r}",
                hint="set socket.pseudo_labels=socket (the paper's) or shot",
                reason="bad-config-value",
            )

    @property
    def weights(self) -> dict[str, float]:
        """{"im", "pl", "ti", "bn"} → their λ."""
        return {"im": self.im_weight, "pl": self.pl_weight, "ti": self.ti_weight, "bn": self.bn_weight}


@register("socket")
class Socket(Method):
    """IM + centroid pseudo-labels + TI feature matching + BatchNorm-statistics matching."""

    default_config = SocketConfig()
    config: SocketConfig
    needs_pairs = True
    batch_size = 32  # SOCKET's batch for both the target and the TI batches

    def __init__(self, config: SocketConfig) -> None:
        super().__init__(config)
        self.source_ti_features = torch.empty(0)  # (P, D): z_s of every pair's RGB half
        self.reference: list[Stats] = []  # the source's BN running statistics
        self.layer_weights: list[float] = []
        self.pseudo_labels: torch.Tensor | None = None

    def setup(self, source: SourceClassifier, data: SiteData) -> dict[str, float]:
        """Snapshot the source's BN statistics and embed every TI pair's RGB half once."""
        self.reference = source_batchnorm_reference(source.backbone)
        self.layer_weights = stem_weighted(len(self.reference), self.config.stem_weight)
        self.source_ti_features, distance = source_pair_features(source, data)
        return {"ti_feature_distance_per_pair": distance}

    def on_epoch_start(self, model: SourceClassifier, outputs: TargetOutputs, data: SiteData) -> dict[str, float]:
        """Refresh the pseudo-labels of the whole target set from the current model."""
        if self.config.pseudo_labels == "socket":
            self.pseudo_labels = socket_pseudo_labels(outputs.features, outputs.probabilities)
        else:
            self.pseudo_labels = outputs.centroid_labels
        return {}

    def losses(self, model: SourceClassifier, batch: Batch) -> dict[str, torch.Tensor]:
        """{"im", "pl", "bn"} on the target batch and {"ti"} on the batch of TI pairs."""
        if batch.pairs is None or self.pseudo_labels is None:
            raise RuntimeError("socket needs TI pairs in every batch and on_epoch_start before losses")
        with BatchNormCapture(model.backbone) as capture:
            logits = model(batch.images)  # (B, K); BN in train mode, statistics recorded
            batch_stats = capture.take()
        target_features = model.embed(batch.pairs.target)  # (B', D), outside the capture
        return {
            "im": information_maximisation(logits.softmax(dim=1)),
            "pl": pseudo_label_cross_entropy(logits, self.pseudo_labels[batch.indices]),
            "ti": ti_feature_distance(self.source_ti_features[batch.pairs.indices], target_features),
            "bn": batchnorm_statistics_distance(batch_stats, self.reference, self.layer_weights),
        }


@torch.inference_mode()
def source_pair_features(source: SourceClassifier, data: SiteData) -> tuple[torch.Tensor, float]:
    """The frozen source's features of every pair's RGB half (P, D), and the mean pair distance.

    The distance ‖z_s(x_s) − z_s(x_t)‖ averaged over pairs is the modality gap the source
    model sees before any training (a label-free signal recorded with the run).
    """
    if data.pairs is None:
        raise RuntimeError("no TI pairs")
    source.eval()
    features = torch.empty(0)
    total = 0.0
    for rgb, target, indices in data.pairs():
        embedded = source.embed(rgb)
        if features.numel() == 0:
            features = torch.empty(data.pair_count, embedded.shape[1])
        features[indices] = embedded
        total += float((embedded - source.embed(target)).norm(dim=1).sum())
    return features, total / max(1, data.pair_count)
