"""The one adaptation loop: every method in ``xkt.client.methods`` trains through :func:`adapt`.

Recipe (SHOT's ``image_target.py``, methods.md §1): copy the source model, freeze the
classifier, SGD with Nesterov momentum 0.9 and weight decay 1e-3, learning rate 1e-2
for the bottleneck and 1e-3 for the backbone, decayed as lr0·(1 + 10p)^-0.75 over each
stage's iterations.  Each epoch: the method's hook (SHOT refreshes pseudo-labels) →
batches in an order fixed by (seed, epoch), each with a batch of task-irrelevant pairs
when the method needs them → weighted sum of the method's named terms → backward →
step.  After each epoch the label-free signals (:mod:`xkt.client.monitoring`) are
measured on the whole target set and an atomic checkpoint is written, so
``resume=True`` continues bit-exactly.  The model kept is the epoch the selection rule
picks from those signals, and the negative-transfer guard compares it with the source.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from xkt.client.methods import Batch, Method, MethodConfig, get_method
from xkt.client.methods.base import PairBatch, PairBatches, SiteData, Stage, TargetBatches
from xkt.client.methods.cmcd import CmcdConfig
from xkt.client.methods.shot import ShotConfig, ShotIMConfig
from xkt.client.methods.socket import SocketConfig
from xkt.client.methods.tgmb_tgkt import TgmbTgktConfig
from xkt.client.monitoring import Monitor, MonitorConfig, guard_verdict, select_epoch
from xkt.shared.config import to_dict
from xkt.shared.data import ImageDataset, PairedDataset
from xkt.shared.errors import ConfigError
from xkt.shared.files import disk_full_error, is_disk_full
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
    batch_size: int = 0  # 0: the method's own (SHOT 64, SOCKET 32, TGMB+TGKT 32, CMCD 64)
    pair_batch_size: int = 0  # TI pairs per step for methods that use them; 0: the same as batch_size
    seed: int = 0  # decides the data order of every epoch
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    optim: AdaptOptimConfig = field(default_factory=AdaptOptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    shot: ShotConfig = field(default_factory=ShotConfig)
    shot_im: ShotIMConfig = field(default_factory=ShotIMConfig)
    socket: SocketConfig = field(default_factory=SocketConfig)
    tgmb_tgkt: TgmbTgktConfig = field(default_factory=TgmbTgktConfig)
    cmcd: CmcdConfig = field(default_factory=CmcdConfig)


@dataclass
class AdaptResult:
    """The adapted model, its per-epoch losses and label-free signals, and the resolved config."""

    model: SourceClassifier
    metrics: dict[str, Any]
    config: dict[str, Any]


def resolve_config(cfg: AdaptConfig, method: str) -> AdaptConfig:
    """``cfg`` with the method's preset filled in where it says "the method's own" (batch size 0)."""
    return replace(cfg, batch_size=cfg.batch_size or get_method(method).batch_size)


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


def freeze_all_but(modules: list[nn.Module], groups: dict[str, list[nn.Parameter]]) -> None:
    """requires_grad only on the trainable groups: the classifier (and anything unnamed) stays frozen."""
    trainable = {id(p) for params in groups.values() for p in params}
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(id(param) in trainable)


def batches(dataset: ImageDataset, order: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images (B, 3, H, W), indices (B,)) in ``order``; target labels are never read."""
    for start in range(0, len(order), size):
        indices = order[start : start + size]
        yield torch.stack([dataset[int(i)][0] for i in indices]), indices


def pair_batches(pairs: PairedDataset, order: torch.Tensor, size: int) -> PairBatches:
    """(RGB halves, target halves, indices) for the pairs in ``order``, ``size`` at a time."""
    for start in range(0, len(order), size):
        indices = order[start : start + size]
        halves = [pairs[int(i)] for i in indices]
        yield torch.stack([s for s, _ in halves]), torch.stack([t for _, t in halves]), indices


def pair_sampler(pairs: PairedDataset, size: int, seed: int, epoch: int) -> Iterator[PairBatch]:
    """Endless TI batches for one epoch: each step a fresh random subset (SOCKET draws a new loader per step).

    The draws are a function of (seed, epoch) only, so a resumed epoch sees the same pairs.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 500_009)
    size = min(size, len(pairs))
    while True:
        order = torch.randperm(len(pairs), generator=generator)[:size]
        for source, target, indices in pair_batches(pairs, order, size):
            yield PairBatch(source, target, indices)


def train_order(size: int, batch_size: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's shuffled order, a function of (seed, epoch) only (what makes resume exact).

    A last batch of a single image is dropped: BatchNorm in train mode has no batch
    statistics for one sample.  It is a different image each epoch.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(size, generator=generator)
    return order[:-1] if size % batch_size == 1 and size > 1 else order


# ----------------------------------------------------------------------- the loop

#: Benchmarks only: called with the model after each epoch that trains it; what it returns
#: (e.g. accuracy on labelled eval images) is recorded in the history, never used by training.
EpochObserver = Callable[[SourceClassifier], dict[str, float]]


def adapt(
    source: SourceClassifier,
    target: ImageDataset,
    method: str,
    cfg: AdaptConfig,
    *,
    pairs: PairedDataset | None = None,
    checkpoint_dir: Path,
    resume: bool = False,
    progress: ProgressFn | None = None,
    observer: EpochObserver | None = None,
) -> AdaptResult:
    """Adapt a copy of ``source`` to the unlabelled ``target`` images with ``method``; ``source`` is untouched."""
    cfg = resolve_config(cfg, method)
    method_class = get_method(method)
    algorithm = method_class(method_config(cfg, method_class))
    _check_inputs(algorithm, target, pairs)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    config = {"method": method, **to_dict(cfg)}
    frozen = copy.deepcopy(source).eval().requires_grad_(False)  # the source, for methods and the monitor
    model = copy.deepcopy(source)
    data = _site_data(target, pairs, cfg.batch_size)
    monitor = Monitor(frozen, data.target, len(target), cfg.monitor)
    started = time.perf_counter()
    outputs = monitor.outputs(model)
    state: dict[str, Any] = {"epoch": 0, "history": [], "source": monitor.signals(model, outputs, None)}
    if not method_class.trains:
        logger.info("%s: returning the source model unchanged", method)
        return AdaptResult(model.eval(), _metrics(method, state, cfg.monitor, trained=False), config)

    torch.manual_seed(cfg.seed)  # the method's own modules (translator, heads) start the same every run
    state["setup"] = algorithm.setup(frozen, data)
    checkpoints = Checkpoints(checkpoint_dir)
    resumed = _resume(checkpoints, config, len(target), model, algorithm) if resume else None
    if resumed is not None:
        state, resume_tensors, best = resumed
        outputs = monitor.outputs(model)
    else:
        resume_tensors, best = {}, None
    previous = outputs.probabilities.argmax(dim=1)
    started -= state.get("seconds", 0.0)

    stages = algorithm.stages(cfg.epochs)
    last_epoch = sum(stage.epochs for stage in stages)
    stage_start = 1  # global number of each stage's first epoch
    for stage in stages:
        stage_end, stage_start = stage_start + stage.epochs - 1, stage_start + stage.epochs
        first = max(stage_end - stage.epochs + 1, state["epoch"] + 1)
        if first > stage_end:
            continue  # finished before the run was interrupted
        algorithm.enter_stage(stage)
        groups = algorithm.trainable_groups(model)
        freeze_all_but([model, *algorithm.modules().values()], groups)
        optimizer = make_optimizer(groups, cfg.optim)
        if state.get("stage") == stage.name:
            restore_optimizer(optimizer, resume_tensors)
        for epoch in range(first, stage_end + 1):
            hook_signals = algorithm.on_epoch_start(model, outputs, data)
            where = _Position(stage, epoch, epoch - (stage_end - stage.epochs + 1), last_epoch)
            try:
                losses = _train_epoch(model, algorithm, optimizer, target, pairs, cfg, where, progress)
            except Diverged as diverged:  # nothing after this can be trusted: stop, keep the best finite epoch
                state["diverged"] = diverged.to_json()
                logger.warning("%s; keeping epoch %s", diverged, state.get("selected_epoch") or "0 (the source)")
                break
            entry: dict[str, Any] = {"epoch": epoch, "stage": stage.name, "losses": losses, **hook_signals}
            if stage.trains_model:
                outputs = monitor.outputs(model)
                entry["signals"] = monitor.signals(model, outputs, previous)
                previous = outputs.probabilities.argmax(dim=1)
                if observer is not None:
                    entry["observed"] = observer(model)
            state["history"].append(entry)
            state["selected_epoch"] = _selected_epoch(state["history"], cfg.monitor.select)
            if best is None or state["selected_epoch"] == epoch:
                best = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
            state.update(epoch=epoch, stage=stage.name, seconds=time.perf_counter() - started)
            state.update(config=config, target_images=len(target))
            resume_tensors = _resume_tensors(model, algorithm, optimizer, previous)
            _save_checkpoint(checkpoints, state, resume_tensors, best)
            logger.info("epoch %d (%s): %s; %s", epoch, stage.name, _fmt(losses), _fmt(entry.get("signals", {})))
        if "diverged" in state:
            break

    if best is not None:
        model.load_state_dict(best)
    elif "diverged" in state:  # no finite epoch to keep: the source itself, never half-updated weights
        model.load_state_dict(frozen.state_dict())
    model.requires_grad_(True)
    state["seconds"] = time.perf_counter() - started
    return AdaptResult(model.eval(), _metrics(method, state, cfg.monitor, trained=True), config)


def _save_checkpoint(
    checkpoints: Checkpoints,
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    best: dict[str, torch.Tensor] | None,
) -> None:
    """Save the epoch's checkpoint; a full disk is a clear error, and the previous checkpoint stays usable."""
    try:
        checkpoints.save(state, tensors, best)
    except (OSError, SafetensorError) as error:
        if not _out_of_space(error, checkpoints.folder, tensors):
            raise
        for stem in ("last", "best"):  # this epoch's half-written files; latest.json still names the last good ones
            (checkpoints.folder / f"{stem}-{state['epoch']:04d}.safetensors").unlink(missing_ok=True)
        raise disk_full_error(
            f"the epoch-{state['epoch']} checkpoint",
            checkpoints.folder,
            hint="free space, then rerun with --resume: it continues from the last complete checkpoint",
        ) from None


def _out_of_space(error: Exception, folder: Path, tensors: dict[str, torch.Tensor]) -> bool:
    """ENOSPC/EDQUOT; safetensors' own writer reports no errno, so there: less room left than the tensors need."""
    if isinstance(error, OSError):
        return is_disk_full(error)
    needed = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    return shutil.disk_usage(folder).free < needed


class Diverged(Exception):
    """A loss became NaN or infinite: the weights it would update can no longer be trusted."""

    def __init__(self, epoch: int, stage: str, terms: list[str]) -> None:
        super().__init__(f"training diverged at epoch {epoch} ({stage}): non-finite {', '.join(terms)}")
        self.epoch, self.stage, self.terms = epoch, stage, terms

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "stage": self.stage, "terms": self.terms}


def _check_inputs(algorithm: Method, target: ImageDataset, pairs: PairedDataset | None) -> None:
    """Refuse what cannot train before any work: too few target images, missing TI pairs."""
    if len(target) < 2:
        raise ConfigError("the target set needs at least 2 images", hint="add unlabelled target images")
    if algorithm.needs_pairs:
        require_pairs(algorithm.name, 0 if pairs is None else len(pairs))


def require_pairs(method: str, count: int) -> None:
    """Refuse a method that trains on task-irrelevant pairs when the site has fewer than 2."""
    if count < 2:
        raise ConfigError(
            f"method {method!r} needs task-irrelevant pairs and the site has {count or 'none'}",
            hint="add SITE/paired/pairs.csv with at least 2 pairs, or choose --method shot",
            reason="missing-pairs",
        )


def _site_data(target: ImageDataset, pairs: PairedDataset | None, batch_size: int) -> SiteData:
    """Whole-set passes over the target images and TI pairs, in dataset order."""
    everything = torch.arange(len(target))

    def target_pass() -> TargetBatches:
        return batches(target, everything, batch_size)

    if pairs is None:
        return SiteData(target_pass, len(target), None, 0, target.preprocess)
    paired = pairs  # a non-optional name for the closure

    def pair_pass() -> PairBatches:
        return pair_batches(paired, torch.arange(len(paired)), batch_size)

    return SiteData(target_pass, len(target), pair_pass, len(pairs), target.preprocess)


@dataclass(frozen=True)
class _Position:
    """Where an epoch is: its stage, its global number, its 0-based index in the stage, the last epoch."""

    stage: Stage
    epoch: int
    within: int
    last: int

    @property
    def label(self) -> str:
        stage = "" if self.stage.name == "adapt" else f"{self.stage.name} "
        return f"{stage}epoch {self.epoch}/{self.last}"


def _train_epoch(
    model: SourceClassifier,
    algorithm: Method,
    optimizer: torch.optim.SGD,
    target: ImageDataset,
    pairs: PairedDataset | None,
    cfg: AdaptConfig,
    where: _Position,
    progress: ProgressFn | None,
) -> dict[str, float]:
    """One pass over the target set: weighted sum of the method's terms, backward, step; mean terms."""
    stage, epoch, within = where.stage, where.epoch, where.within
    order = train_order(len(target), cfg.batch_size, cfg.seed, epoch)
    steps = -(-len(order) // cfg.batch_size)
    total, warmup = stage.epochs * steps, round(cfg.optim.warmup_epochs * steps)  # SHOT has no warm-up
    sampler = None
    if algorithm.needs_pairs and pairs is not None:
        sampler = pair_sampler(pairs, cfg.pair_batch_size or cfg.batch_size, cfg.seed, epoch)
    model.train()
    for module in algorithm.modules().values():
        module.train()
    sums: dict[str, float] = {}
    if progress is not None:
        progress(f"{algorithm.name} {where.label}", 0, steps, "")  # the epoch's steps start now
    for index, (images, indices) in enumerate(batches(target, order, cfg.batch_size)):
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(within * steps + index, total, cfg.optim, warmup)
        terms = algorithm.losses(model, Batch(images, indices, next(sampler) if sampler else None))
        loss = sum((algorithm.config.weights[name] * term for name, term in terms.items()), torch.zeros(()))
        if not torch.isfinite(loss):
            bad = [name for name, term in terms.items() if not torch.isfinite(term)]
            raise Diverged(epoch, stage.name, bad or list(terms))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        values = {name: term.item() for name, term in terms.items()}
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value
        if progress is not None:
            shown = " ".join(f"{name} {value:.3f}" for name, value in values.items())
            progress(f"{algorithm.name} {where.label}", index + 1, steps, shown)
    return {name: value / steps for name, value in sums.items()}


def _selected_epoch(history: list[dict[str, Any]], rule: str) -> int | None:
    """The epoch the selection rule keeps among those that trained the model (None: none yet)."""
    candidates = [entry for entry in history if "signals" in entry]
    if not candidates:
        return None
    return int(candidates[select_epoch([entry["signals"] for entry in candidates], rule)]["epoch"])


def _resume_tensors(
    model: SourceClassifier, algorithm: Method, optimizer: torch.optim.SGD, predictions: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Everything a resumed run needs besides the JSON state: model, method modules, momentum, predictions."""
    tensors = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    for module_name, module in algorithm.modules().items():
        tensors |= {f"module.{module_name}.{name}": tensor for name, tensor in module.state_dict().items()}
    return tensors | optimizer_tensors(optimizer) | {"predictions": predictions}


def _resume(
    checkpoints: Checkpoints, config: dict[str, Any], target_images: int, model: SourceClassifier, algorithm: Method
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """Load the latest checkpoint into the model and the method's modules; None starts from epoch 1."""
    loaded = checkpoints.load()
    if loaded is None:
        logger.info("no checkpoint in %s: starting from epoch 1", checkpoints.folder)
        return None
    state, tensors, best = loaded
    if state.get("config") != config or state.get("target_images") != target_images:
        raise ConfigError(
            f"the checkpoint in {checkpoints.folder} was made with a different config or target set",
            hint="resume with the same method, --config/--set values and data, or drop --resume to start over",
            reason="resume-config-mismatch",
        )
    model.load_state_dict(_section(tensors, "model."))
    for module_name, module in algorithm.modules().items():
        module.load_state_dict(_section(tensors, f"module.{module_name}."))
    logger.info("resuming after epoch %d from %s", state["epoch"], checkpoints.folder)
    return state, tensors, best


def _section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix) :]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}


def _metrics(method: str, state: dict[str, Any], monitor: MonitorConfig, *, trained: bool) -> dict[str, Any]:
    """The run's record: per-epoch history, the source's and the kept epoch's signals, the guard."""
    selected = state.get("selected_epoch")
    kept = next((e["signals"] for e in state["history"] if e["epoch"] == selected), state["source"])
    return {
        "method": method,
        "trained": trained,
        "epochs": state["epoch"],
        "seconds": round(state.get("seconds", 0.0), 2),
        "setup": state.get("setup", {}),
        "history": state["history"],
        "source": state["source"],
        "selected_epoch": selected or 0,
        "final": kept,
        "guard": _diverged_reason(state) + (guard_verdict(state["source"], kept, monitor) if trained else []),
        "diverged": state.get("diverged"),
    }


def _diverged_reason(state: dict[str, Any]) -> list[str]:
    """The guard's first reason when training stopped on a non-finite loss."""
    diverged = state.get("diverged")
    if not diverged:
        return []
    kept = state.get("selected_epoch") or 0
    where = f"epoch {kept}" if kept else "the source model, unchanged"
    return [
        f"training diverged at epoch {diverged['epoch']} ({diverged['stage']}: non-finite {', '.join(diverged['terms'])}); kept {where}"
    ]


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in values.items())
