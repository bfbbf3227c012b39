"""The method contract: what an adaptation method declares and computes, and nothing else.

Modelled on DomainBed's one-contract algorithms (STYLE.md §6), with one change: a
method never steps an optimiser, loops, reads files or prints.  It names the parameter
groups that train and returns *named, unweighted* loss terms per batch; the trainer
(``xkt.client.trainer.adapt``) weights them with ``config.weights``, backpropagates,
logs every term and checkpoints, so every method runs through the same visible loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
from torch import nn

from xkt.shared.errors import ConfigError
from xkt.shared.models import SourceClassifier

#: An epoch's pass over the whole target set, in dataset order: (images (B, 3, H, W), indices (B,)).
TargetBatches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Batch:
    """One training batch of unlabelled target images."""

    images: torch.Tensor  # (B, 3, H, W), preprocessed exactly as the source model expects
    indices: torch.Tensor  # (B,) int64 positions in the target dataset, to look up per-image state


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

    def __init__(self, config: MethodConfig) -> None:
        if not isinstance(config, type(self.default_config)):
            raise ConfigError(
                f"method {self.name!r} needs a {type(self.default_config).__name__}, got {type(config).__name__}",
                hint="pass the method's own config section",
            )
        self.config = config

    def trainable_groups(self, model: SourceClassifier) -> dict[str, list[nn.Parameter]]:
        """Parameters the optimiser updates, by group; the classifier C is frozen (SHOT §3.1).

        The trainer gives the group named ``backbone`` the lower learning rate.
        """
        return {"backbone": list(model.backbone.parameters()), "bottleneck": list(model.bottleneck.parameters())}

    def on_epoch_start(self, model: SourceClassifier, target: TargetBatches, size: int) -> dict[str, float]:
        """Refresh per-epoch state (e.g. pseudo-labels) from the whole target set; returns signals to log."""
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
