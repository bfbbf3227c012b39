"""Label-free validation: how an adaptation run is going when the site has no labels.

Each epoch the trainer looks at the whole target set through the current model and
records signals that need no label (methods.md §6, DESIGN.md "Adaptation"):

- ``mean_entropy`` E[H(p)]: how confident predictions are (lower: more confident);
- ``diversity`` H(p̄): how spread predictions are over the classes (log K: balanced);
- ``im`` = mean_entropy − diversity, SHOT's information-maximisation objective;
- ``agreement``: share of images whose prediction equals its SHOT centroid pseudo-label,
  i.e. how well the classifier agrees with the cluster structure of the features;
- ``bn_distance``: SOCKET's unweighted L_BN between the batch statistics the target
  images produce at every BatchNorm input and the source model's running statistics;
- ``changed``: share of predictions that changed since the previous epoch.

:func:`select_epoch` picks the checkpoint to keep from them and :func:`guard_verdict`
compares the kept model with the source to catch negative transfer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from xkt.client.methods.base import TargetBatches, TargetOutputs
from xkt.client.methods.batchnorm_capture import batchnorm_distance_to_source, source_batchnorm_reference
from xkt.client.methods.losses import diversity, mean_entropy
from xkt.client.methods.pseudo_labels import target_outputs
from xkt.shared.errors import ConfigError
from xkt.shared.models import SourceClassifier

Signals = dict[str, float]

#: How each selection rule ranks epochs: the signal and whether larger is better.
SELECTION_RULES: dict[str, tuple[str, bool]] = {
    "im": ("im", False),
    "entropy": ("mean_entropy", False),
    "agreement": ("agreement", True),
    "bn": ("bn_distance", False),
}


@dataclass(frozen=True)
class MonitorConfig:
    """What the per-epoch label-free validation measures, which epoch it keeps, and the guard."""

    # "last" keeps the final epoch (SOCKET's and SHOT's code); otherwise a rule of SELECTION_RULES.
    # "im" (lowest IM value) kept a model at least as accurate as "last" for all 8 method×task
    # pairs of the built-in benchmark, +0.0 to +0.6 points (benchmarks/README.md, selection study).
    select: str = "im"
    bn_images: int = 256  # target images used for the BN-statistic distance (one extra pass over them)
    # Guard: the kept model is flagged as worse than the source when its IM value is
    # higher (worse) than the source's by more than this many nats ...
    guard_im_margin: float = 0.0
    # ... or its predictions cover less than this share of the source's diversity H(p̄) ...
    guard_min_diversity_ratio: float = 0.5
    # ... or its pseudo-label agreement fell by more than this.
    guard_agreement_drop: float = 0.1

    def __post_init__(self) -> None:
        if self.select != "last" and self.select not in SELECTION_RULES:
            raise ConfigError(
                f"unknown checkpoint selection rule {self.select!r}",
                hint=f"set monitor.select to last, {', '.join(sorted(SELECTION_RULES))}",
                reason="bad-selection-rule",
            )


class Monitor:
    """Measures the label-free signals of a model on the target set (BN reference from the source)."""

    def __init__(
        self, source: SourceClassifier, target: Callable[[], TargetBatches], size: int, cfg: MonitorConfig
    ) -> None:
        self.target = target
        self.size = size
        self.cfg = cfg
        self.reference = source_batchnorm_reference(source.backbone)

    def outputs(self, model: SourceClassifier) -> TargetOutputs:
        """Eval-mode features and probabilities of the whole target set (one pass)."""
        features, probabilities = target_outputs(model, self.target(), self.size)
        return TargetOutputs(features, probabilities)

    def signals(self, model: SourceClassifier, outputs: TargetOutputs, previous: torch.Tensor | None) -> Signals:
        """Every signal of the module docstring for ``model``, whose outputs are ``outputs``."""
        probabilities = outputs.probabilities
        predictions = probabilities.argmax(dim=1)
        pseudo_labels = outputs.centroid_labels
        entropy, spread = float(mean_entropy(probabilities)), float(diversity(probabilities))
        signals = {
            "mean_entropy": entropy,
            "diversity": spread,
            "im": entropy - spread,
            "agreement": float((pseudo_labels == predictions).float().mean()),
            "bn_distance": batchnorm_distance_to_source(model.backbone, self._bn_batches(), self.reference),
        }
        if previous is not None:
            signals["changed"] = float((predictions != previous).float().mean())
        return signals

    def _bn_batches(self) -> TargetBatches:
        """The first ``bn_images`` target images, in the loader's batches."""
        seen = 0
        for images, indices in self.target():
            if seen >= self.cfg.bn_images:
                return
            keep = min(len(images), self.cfg.bn_images - seen)
            if keep > 1:  # BatchNorm statistics need two samples
                yield images[:keep], indices[:keep]
            seen += keep


def select_epoch(history: Sequence[Signals], rule: str) -> int:
    """Index into ``history`` (one entry per candidate epoch) of the epoch to keep; ties go to the later."""
    if not history:
        raise ValueError("no epoch to select from")
    if rule == "last":
        return len(history) - 1
    name, larger_is_better = SELECTION_RULES[rule]
    finite = [index for index, signals in enumerate(history) if math.isfinite(signals[name])]
    if not finite:
        return len(history) - 1
    best = finite[0]
    for index in finite:
        value, kept = history[index][name], history[best][name]
        best = index if (value >= kept if larger_is_better else value <= kept) else best
    return best


def guard_verdict(source: Signals, adapted: Signals, cfg: MonitorConfig) -> list[str]:
    """Reasons to believe the adapted model is worse than the source (empty: no evidence of it).

    Without labels nothing proves a model better; these are the failure signatures the
    signals can show: IM got worse, predictions collapsed onto fewer classes, or the
    classifier stopped agreeing with the feature clusters.
    """
    reasons = []
    if not all(math.isfinite(value) for value in adapted.values()):
        reasons.append("the adapted model's label-free signals are not finite (NaN weights or outputs)")
    if adapted["im"] > source["im"] + cfg.guard_im_margin:
        reasons.append(f"information maximisation got worse ({adapted['im']:.3f} vs {source['im']:.3f} at the source)")
    if adapted["diversity"] < cfg.guard_min_diversity_ratio * source["diversity"]:
        reasons.append(
            f"predictions collapsed onto fewer classes (diversity {adapted['diversity']:.3f} vs {source['diversity']:.3f})"
        )
    if adapted["agreement"] < source["agreement"] - cfg.guard_agreement_drop:
        reasons.append(
            f"pseudo-label agreement fell ({adapted['agreement']:.3f} vs {source['agreement']:.3f} at the source)"
        )
    return reasons
