"""The method contract: what an adaptation method declares and computes, and nothing else.

Modelled on DomainBed's one-contract algorithms (STYLE.md §6), with one change: a
method never steps an optimiser, loops, reads files or prints.  It names the parameter
groups that train and returns *named, unweighted* loss terms per batch; the trainer
(``xkt.client.trainer.adapt``) weights them with ``config.weights``, backpropagates,
logs every term and checkpoints, so every method runs through the same visible loop.

A method may have several *stages* run one after the other through that same loop
(TGMB trains a translator before TGKT trains the model), may own extra trainable
modules (a translator, a projection head; the trainer checkpoints them), and may ask
for a batch of task-irrelevant pairs beside every target batch (``needs_pairs``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, TypeVar

import torch
from torch import nn

from xkt.client.methods.pseudo_labels import centroid_pseudo_labels
from xkt.shared.data import Preprocess
from xkt.shared.errors import ConfigError
from xkt.shared.models import SourceClassifier

#: An epoch's pass over the whole target set, in dataset order: (images (B, 3, H, W), indices (B,)).
TargetBatches = Iterable[tuple[torch.Tensor, torch.Tensor]]
#: A pass over every task-irrelevant pair, in pair order: (RGB halves, target halves, indices (B,)).
PairBatches = Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PairBatch:
    """Task-irrelevant pairs: the same scenes seen in RGB and in the site's modality."""

    source: torch.Tensor  # (B, 3, H, W) RGB halves, prepared exactly as the target halves
    target: torch.Tensor  # (B, 3, H, W) target-modality halves
    indices: torch.Tensor  # (B,) int64 positions in the pair list, to look up per-pair state


@dataclass(frozen=True)
class Batch:
    """One training batch of unlabelled target images (plus TI pairs when the method needs them)."""

    images: torch.Tensor  # (B, 3, H, W), preprocessed exactly as the source model expects
    indices: torch.Tensor  # (B,) int64 positions in the target dataset, to look up per-image state
    pairs: PairBatch | None = None


@dataclass(frozen=True)
class TargetOutputs:
    """The current model's view of the whole target set, in eval mode and dataset order."""

    features: torch.Tensor  # (N, D) bottleneck features B(F(x))
    probabilities: torch.Tensor  # (N, K) softmax outputs

    @cached_property
    def centroid_labels(self) -> torch.Tensor:
        """SHOT's closed-set centroid pseudo-labels (N,), computed once however many readers ask.

        The trainer's monitor and the method's epoch hook both read them from the same outputs.
        """
        return centroid_pseudo_labels(self.features, self.probabilities)


@dataclass(frozen=True)
class SiteData:
    """Whole-set passes a method may make before training or at the start of an epoch."""

    target: Callable[[], TargetBatches]  # a fresh pass over every target image
    target_size: int
    pairs: Callable[[], PairBatches] | None  # a fresh pass over every TI pair; None: the site has none
    pair_count: int
    preprocess: Preprocess  # how every image was prepared: the source model's size and normalisation


@dataclass(frozen=True)
class Stage:
    """One pass of the training loop: its name, length and whether it changes the target model."""

    name: str
    epochs: int
    trains_model: bool = True  # False: only the method's own modules train (e.g. TGMB's translator)


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config: a frozen dataclass of the paper's defaults."""

    @property
    def weights(self) -> dict[str, float]:
        """Weight of each loss term the method returns, by term name."""
        return {}


class Method(ABC):
    """An adaptation method: trainable groups, an optional per-epoch hook and named loss terms."""

    name: ClassVar[str] = ""  # set by ``register``
    default_config: ClassVar[MethodConfig] = MethodConfig()
    trains: ClassVar[bool] = True  # False: the trainer returns the source model untouched
    needs_pairs: ClassVar[bool] = False  # True: every Batch carries TI pairs; refused without them
    batch_size: ClassVar[int] = 64  # the paper's batch size, used when AdaptConfig.batch_size is 0

    def __init__(self, config: MethodConfig) -> None:
        if not isinstance(config, type(self.default_config)):
            raise ConfigError(
                f"method {self.name!r} needs a {type(self.default_config).__name__}, got {type(config).__name__}",
                hint="pass the method's own config section",
            )
        self.config = config
        self.stage = ""  # the stage the trainer is running (set by ``enter_stage``)

    def stages(self, epochs: int) -> list[Stage]:
        """The loop's passes, in order; one stage of ``epochs`` (the trainer's setting) by default."""
        return [Stage("adapt", epochs)]

    def setup(self, source: SourceClassifier, data: SiteData) -> dict[str, float]:
        """Once before training (and again on resume): state from the frozen source model.

        ``source`` is a frozen copy in eval mode; keep references to it, never train it.
        Returns signals to record (e.g. how far TI features are apart before training).
        """
        return {}

    def modules(self) -> dict[str, nn.Module]:
        """Trainable modules the method owns besides the model (checkpointed by the trainer)."""
        return {}

    def enter_stage(self, stage: Stage) -> None:
        """Called before the first epoch of each stage (also when resuming inside it)."""
        self.stage = stage.name

    def trainable_groups(self, model: SourceClassifier) -> dict[str, list[nn.Parameter]]:
        """Parameters the optimiser updates, by group; the classifier C is frozen (SHOT §3.1).

        The trainer gives the group named ``backbone`` the lower learning rate.
        """
        return {"backbone": list(model.backbone.parameters()), "bottleneck": list(model.bottleneck.parameters())}

    def on_epoch_start(self, model: SourceClassifier, outputs: TargetOutputs, data: SiteData) -> dict[str, float]:
        """Refresh per-epoch state (e.g. pseudo-labels) from the current model's outputs; returns signals.

        ``outputs`` are the model's eval-mode features and probabilities on the whole
        target set, measured once by the trainer (they also feed its label-free signals).
        """
        return {}

    @abstractmethod
    def losses(self, model: SourceClassifier, batch: Batch) -> dict[str, torch.Tensor]:
        """Named, unweighted scalar loss terms for one batch (the model is in train mode)."""


METHODS: dict[str, type[Method]] = {}
M = TypeVar("M", bound=Method)


def register(name: str) -> Callable[[type[M]], type[M]]:
    """Class decorator adding a method to :data:`METHODS` under ``name``."""

    def add(cls: type[M]) -> type[M]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


def get_method(name: str) -> type[Method]:
    """The registered method class called ``name``; unknown names list the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}", hint=f"choose one of: {', '.join(sorted(METHODS))}", reason="unknown-method"
        ) from None
