"""The one adaptation loop: every method in ``xkt.client.methods`` trains through :func:`adapt`.

Recipe (SHOT's ``image_target.py``, methods.md §1): copy the source model, freeze the
classifier, SGD with Nesterov momentum 0.9 and weight decay 1e-3, learning rate 1e-2
for the bottleneck and 1e-3 for the backbone, decayed as lr0·(1 + 10p)^-0.75 over all
iterations.  Each epoch: the method's hook (SHOT refreshes pseudo-labels), then batches
in an order fixed by (seed, epoch) → weighted sum of the method's named terms →
backward → step.  After each epoch the label-free signals (mean prediction entropy,
the IM value, the share of predictions that changed) are measured on the whole target
set and an atomic checkpoint is written, so ``resume=True`` continues bit-exactly.
There are no labels on the target side, so the returned model is the last epoch's.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xkt.client.methods import Batch, Method, MethodConfig, get_method
from xkt.client.methods.losses import information_maximisation, mean_entropy
from xkt.client.methods.pseudo_labels import target_outputs
from xkt.client.methods.shot import ShotConfig, ShotIMConfig
from xkt.shared.config import to_dict
from xkt.shared.data import ImageDataset
from xkt.shared.errors import ConfigError
from xkt.shared.models import SourceClassifier
from xkt.shared.training import Checkpoints, OptimConfig, lr_factor, optimizer_tensors, restore_optimizer

logger = logging.getLogger("xkt")

ProgressFn = Callable[[str, int, int, str], None]


@dataclass(frozen=True)
class AdaptOptimConfig(OptimConfig):
    """SHOT's target optimiser: as the source's, but the backbone at 0.1 × lr (F 1e-3, B 1e-2)."""

    backbone_lr_ratio: float = 0.1


@dataclass(frozen=True)
class AdaptConfig:
    """Everything that decides an adaptation run (saved with its checkpoints and in the result).

    Each method's own config is a section named after it (``-`` → ``_``), so
    ``--set shot.cls_par=0.1`` changes only SHOT; a method without a section uses its defaults.
    """

    epochs: int = 15  # SHOT's argparse default; its run.sh uses 30 for Office/Office-Home
    batch_size: int = 64  # SHOT's target batch size
    seed: int = 0  # decides the data order of every epoch
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    optim: AdaptOptimConfig = field(default_factory=AdaptOptimConfig)
    shot: ShotConfig = field(default_factory=ShotConfig)
    shot_im: ShotIMConfig = field(default_factory=ShotIMConfig)


@dataclass
class AdaptResult:
    """The adapted model, its per-epoch losses and label-free signals, and the resolved config."""

    model: SourceClassifier
    metrics: dict[str, Any]
    config: dict[str, Any]


def method_config(cfg: AdaptConfig, method: type[Method]) -> MethodConfig:
    """The method's section of ``cfg`` (its defaults when AdaptConfig has no section for it)."""
    section = getattr(cfg, method.name.replace("-", "_"), method.default_config)
    return section if isinstance(section, MethodConfig) else method.default_config


# ------------------------------------------------------------------- building blocks


def make_optimizer(groups: dict[str, list[nn.Parameter]], optim: OptimConfig) -> torch.optim.SGD:
    """SGD over the method's groups; ``backbone`` at ``backbone_lr_ratio`` × lr, the rest at lr."""
    param_groups = [
        {"params": params, "lr": optim.lr * (optim.backbone_lr_ratio if name == "backbone" else 1.0), "name": name}
        for name, params in groups.items()
    ]
    for group in param_groups:
        group["initial_lr"] = group["lr"]
    return torch.optim.SGD(
        param_groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay, nesterov=optim.nesterov
    )


def freeze_all_but(model: nn.Module, groups: dict[str, list[nn.Parameter]]) -> None:
    """requires_grad only on the trainable groups: the classifier (and anything unnamed) stays frozen."""
    trainable = {id(p) for params in groups.values() for p in params}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)


def batches(dataset: ImageDataset, order: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images (B, 3, H, W), indices (B,)) in ``order``; target labels are never read."""
    for start in range(0, len(order), size):
        indices = order[start : start + size]
        yield torch.stack([dataset[int(i)][0] for i in indices]), indices


def train_order(size: int, batch_size: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's shuffled order, a function of (seed, epoch) only (what makes resume exact).

    A last batch of a single image is dropped: BatchNorm in train mode has no batch
    statistics for one sample.  It is a different image each epoch.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(size, generator=generator)
    return order[:-1] if size % batch_size == 1 and size > 1 else order


def label_free_signals(probabilities: torch.Tensor, previous: torch.Tensor | None) -> dict[str, float]:
    """Signals for monitoring without labels (methods.md §6): entropy, IM, prediction churn."""
    signals = {
        "mean_entropy": float(mean_entropy(probabilities)),
        "im": float(information_maximisation(probabilities)),
    }
    if previous is not None:
        signals["changed"] = float((probabilities.argmax(dim=1) != previous).float().mean())
    return signals


# ----------------------------------------------------------------------- the loop


def adapt(
    source: SourceClassifier,
    target: ImageDataset,
    method: str,
    cfg: AdaptConfig,
    *,
    checkpoint_dir: Path,
    resume: bool = False,
    progress: ProgressFn | None = None,
) -> AdaptResult:
    """Adapt a copy of ``source`` to the unlabelled ``target`` images with ``method``; ``source`` is untouched."""
    method_class = get_method(method)
    algorithm = method_class(method_config(cfg, method_class))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if len(target) < 2:
        raise ConfigError("the target set needs at least 2 images", hint="add unlabelled target images")
    config = {"method": method, **to_dict(cfg)}
    model = copy.deepcopy(source)
    everything = torch.arange(len(target))  # dataset order, for whole-set passes

    def whole_set() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return batches(target, everything, cfg.batch_size)

    started = time.perf_counter()
    probabilities = target_outputs(model, whole_set(), len(target))[1]  # (N, K) before any training
    state: dict[str, Any] = {"epoch": 0, "history": [], "signals": [label_free_signals(probabilities, None)]}
    previous = probabilities.argmax(dim=1)
    if not method_class.trains:
        logger.info("%s: returning the source model unchanged", method)
        metrics = {"method": method, "trained": False, "epochs": 0, "target_images": len(target), **state}
        return AdaptResult(model.eval(), metrics | {"final": state["signals"][-1]}, config)

    groups = algorithm.trainable_groups(model)
    freeze_all_but(model, groups)
    optimizer = make_optimizer(groups, cfg.optim)
    checkpoints = Checkpoints(checkpoint_dir)
    if resume:
        state, previous = _resume(checkpoints, config, len(target), model, optimizer, state, previous)
    steps_per_epoch = -(-len(train_order(len(target), cfg.batch_size, cfg.seed, 1)) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)  # 0 by default: SHOT has no warm-up
    started -= state.get("seconds", 0.0)

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        hook_signals = algorithm.on_epoch_start(model, whole_set(), len(target))
        model.train()
        sums: dict[str, float] = {}
        order = train_order(len(target), cfg.batch_size, cfg.seed, epoch)
        for index, (images, indices) in enumerate(batches(target, order, cfg.batch_size)):
            step = (epoch - 1) * steps_per_epoch + index
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(step, total_steps, cfg.optim, warmup_steps)
            terms = algorithm.losses(model, Batch(images, indices))
            loss = sum((algorithm.config.weights[name] * term for name, term in terms.items()), torch.zeros(()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            for name, term in terms.items():
                sums[name] = sums.get(name, 0.0) + term.item()
            if progress is not None:
                shown = " ".join(f"{name} {term.item():.3f}" for name, term in terms.items())
                progress(f"{method} epoch {epoch}/{cfg.epochs}", index + 1, steps_per_epoch, shown)

        probabilities = target_outputs(model, whole_set(), len(target))[1]
        signals = label_free_signals(probabilities, previous)
        previous = probabilities.argmax(dim=1)
        losses = {name: total / steps_per_epoch for name, total in sums.items()}
        state["history"].append({"epoch": epoch, "losses": losses, **hook_signals})
        state["signals"].append(signals)
        state.update(epoch=epoch, seconds=time.perf_counter() - started, config=config, target_images=len(target))
        resume_tensors = optimizer_tensors(optimizer) | {"predictions": previous}
        checkpoints.save(state, resume_tensors, dict(model.state_dict()))
        logger.info("epoch %d/%d: %s; %s", epoch, cfg.epochs, _fmt(losses), _fmt(signals))

    model.requires_grad_(True)
    metrics = {
        "method": method,
        "trained": True,
        "epochs": cfg.epochs,
        "target_images": len(target),
        "seconds": round(time.perf_counter() - started, 2),
        "history": state["history"],
        "signals": state["signals"],
        "final": state["signals"][-1],
    }
    return AdaptResult(model.eval(), metrics, config)


def _resume(
    checkpoints: Checkpoints,
    config: dict[str, Any],
    target_images: int,
    model: SourceClassifier,
    optimizer: torch.optim.SGD,
    fresh: dict[str, Any],
    predictions: torch.Tensor,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Load the latest checkpoint into model and optimiser; a missing one starts from epoch 1."""
    loaded = checkpoints.load()
    if loaded is None:
        logger.info("no checkpoint in %s: starting from epoch 1", checkpoints.folder)
        return fresh, predictions
    state, resume_tensors, model_tensors = loaded
    if state.get("config") != config or state.get("target_images") != target_images:
        raise ConfigError(
            f"the checkpoint in {checkpoints.folder} was made with a different config or target set",
            hint="resume with the same method, --config/--set values and data, or drop --resume to start over",
            reason="resume-config-mismatch",
        )
    model.load_state_dict(model_tensors)
    restore_optimizer(optimizer, resume_tensors)
    logger.info("resuming after epoch %d from %s", state["epoch"], checkpoints.folder)
    return state, resume_tensors["predictions"]


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in values.items())
