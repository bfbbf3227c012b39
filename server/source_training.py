"""Owner-side source training: SHOT's recipe on the owner's labelled RGB images.

The recipe (methods.md §1, from SHOT's ``image_source.py``): label-smoothed
cross-entropy (ε = 0.1), SGD with Nesterov momentum 0.9 and weight decay 1e-3, a
learning rate of 1e-2 for bottleneck and classifier and 0.1× that for the backbone,
decayed as lr0·(1 + 10p)^-0.75, and the checkpoint with the best validation accuracy
kept.  The whole loop is in :func:`train_source`; checkpoints are written atomically
every epoch so ``--resume`` continues exactly where an interrupted run stopped.  The
optimiser config, schedule and checkpoints are shared with site adaptation
(:mod:`xkt.shared.training`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from xkt.shared.artifact import InputSpec, LoadedArtifact, Manifest, save_artifact
from xkt.shared.config import to_dict
from xkt.shared.data import (
    RGB,
    ImageDataset,
    Preprocess,
    class_names,
    fingerprint,
    labelled_dataset,
    read_labels,
    read_raw,
)
from xkt.shared.errors import ConfigError, DataError
from xkt.shared.evaluation import accuracy
from xkt.shared.models import ArchSpec, SourceClassifier, build_model, resolve_arch
from xkt.shared.training import Checkpoints, OptimConfig, lr_factor, optimizer_tensors, restore_optimizer

logger = logging.getLogger("xkt")


@dataclass(frozen=True)
class ModelConfig:
    """Which architecture to train; kwargs are passed to the registry's builder."""

    name: str = "resnet18"
    kwargs: dict[str, Any] = field(default_factory=dict)
    bottleneck_dim: int = 256  # SHOT's bottleneck width


@dataclass(frozen=True)
class SourceTrainConfig:
    """Everything that decides a source-training run (saved with its checkpoints)."""

    epochs: int = 12
    batch_size: int = 64
    label_smoothing: float = 0.1
    seed: int = 0
    augment: bool = True  # pad-4 random crop + horizontal flip, SHOT's crop/flip at 64 px
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    model: ModelConfig = field(default_factory=ModelConfig)
    # SHOT trains at lr 1e-2 from an ImageNet-pretrained backbone.  From scratch (the
    # built-in benchmark) 1e-2 learns slowly and >= 2e-2 without warm-up sits at chance
    # for epochs; 5e-2 after a one-epoch linear warm-up learned fastest (benchmarks/README.md).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-2, warmup_epochs=1.0))


@dataclass(frozen=True)
class BackboneInit:
    """Pretrained backbone weights to start from (``xkt-server train --init``), from a verified artifact.

    Only the backbone carries over: the bottleneck and classifier are built fresh for the
    owner's classes.  The artifact's normalisation carries over too, because the backbone
    learned its features on inputs normalised that way.
    """

    arch_name: str
    kwargs: dict[str, Any]
    backbone: dict[str, torch.Tensor]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_sha256: str


def backbone_init(loaded: LoadedArtifact) -> BackboneInit:
    """What ``--init`` takes from a verified artifact: its backbone, architecture and normalisation."""
    spec = loaded.manifest.input_spec
    if spec.modality != "rgb":
        raise ConfigError(
            f"--init needs an RGB model; this one was made for {spec.modality!r} input",
            hint="start from the owner's RGB artifact (e.g. one made by `xkt-server import-weights`)",
            reason="init-not-rgb",
        )
    preprocess = spec.preprocess()
    return BackboneInit(
        arch_name=loaded.manifest.arch.name,
        kwargs=dict(loaded.manifest.arch.kwargs),
        backbone={k: v.detach().clone() for k, v in loaded.model.backbone.state_dict().items()},
        mean=preprocess.mean,
        std=preprocess.std,
        weights_sha256=loaded.manifest.weights.sha256,
    )


@dataclass
class TrainedSource:
    """The best-validation model and what the artifact manifest needs to describe it."""

    model: SourceClassifier
    arch: ArchSpec
    class_names: list[str]
    preprocess: Preprocess
    metrics: dict[str, Any]


ProgressFn = Callable[[str, int, int, str], None]


# ------------------------------------------------------------------- building blocks


def make_optimizer(model: SourceClassifier, optim: OptimConfig) -> torch.optim.SGD:
    """SGD with the backbone in its own, slower parameter group (group 0)."""
    head = list(model.bottleneck.parameters()) + list(model.classifier.parameters())
    groups = [
        {"params": list(model.backbone.parameters()), "lr": optim.lr * optim.backbone_lr_ratio},
        {"params": head, "lr": optim.lr},
    ]
    for group in groups:
        group["initial_lr"] = group["lr"]
    return torch.optim.SGD(
        groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay, nesterov=optim.nesterov
    )


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (reflect padding) and random horizontal flip.

    One gather for the whole batch: each sample reads rows ``dy + i`` and columns
    ``dx + j`` (or ``dx + W - 1 - j`` when flipped) of its padded image.
    """
    batch, _, height, width = images.shape
    padded = nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    columns = torch.arange(width)
    columns = torch.where(flips[:, None], width - 1 - columns, columns) + offsets[:, 1:]  # (B, W)
    rows = torch.arange(height) + offsets[:, :1]  # (B, H)
    samples = torch.arange(batch)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[samples, rows[:, :, None], columns[:, None, :]]  # (B, H, W, C)
    return crops.permute(0, 3, 1, 2).contiguous()


def image_size(csv_path: Path) -> int:
    """The square size of the first image of a labelled set (all must match; the loader resizes otherwise)."""
    rows = read_labels(csv_path)
    if not rows:
        raise DataError(f"{csv_path} lists no images", hint="generate data with `xkt-bench data`", reason="empty-set")
    height, width = read_raw(rows[0].path).shape[:2]
    if height != width:
        raise DataError(f"{rows[0].path} is {width}x{height}", hint="use square images", reason="not-square")
    return int(height)


def save_source(
    trained: TrainedSource,
    cfg: SourceTrainConfig,
    data_dir: Path,
    *,
    out_dir: Path,
    private_key: Ed25519PrivateKey,
    model_id: str,
    model_version: str,
    init: BackboneInit | None = None,
    init_artifact: str | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Sign and write the trained source model, its provenance naming config, data and initial weights."""
    rows = read_labels(data_dir / "owner" / "train" / "labels.csv")
    spec = trained.preprocess
    started_from: dict[str, str] | None = None
    if init is not None:
        started_from = {"weights_sha256": init.weights_sha256}
        started_from |= {"artifact": init_artifact} if init_artifact is not None else {}
    return save_artifact(
        trained.model,
        out_dir=out_dir,
        private_key=private_key,
        model_id=model_id,
        model_version=model_version,
        arch=trained.arch,
        class_names=trained.class_names,
        input_spec=InputSpec("rgb", 3, spec.size, spec.mean, spec.std),
        provenance={
            "kind": "source",
            "recipe": "shot-source",
            "config": to_dict(cfg),
            "init": started_from,
            "data_fingerprint": fingerprint([r.path for r in rows], data_dir),
            "metrics": {k: v for k, v in trained.metrics.items() if k != "history"},
        },
        overwrite=overwrite,
    )


# ----------------------------------------------------------------------- the loop


def train_source(
    data_dir: Path,
    cfg: SourceTrainConfig,
    checkpoint_dir: Path,
    *,
    resume: bool = False,
    progress: ProgressFn | None = None,
    init: BackboneInit | None = None,
) -> TrainedSource:
    """Train the source model on ``data_dir/owner/{train,val}`` and return the best-validation model.

    With ``init`` the backbone starts from those weights (and the architecture is theirs);
    otherwise everything starts from a seeded random initialisation.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_csv, val_csv = data_dir / "owner" / "train" / "labels.csv", data_dir / "owner" / "val" / "labels.csv"
    names = class_names(read_labels(train_csv))
    size = image_size(train_csv)
    preprocess = Preprocess(size) if init is None else Preprocess(size, init.mean, init.std)
    train_set = labelled_dataset(train_csv, RGB, preprocess, names)
    val_set = labelled_dataset(val_csv, RGB, preprocess, names)
    model, arch = _initial_model(cfg, len(names), init)
    optimizer = make_optimizer(model, cfg.optim)
    checkpoints = Checkpoints(checkpoint_dir)

    started_from = None if init is None else init.weights_sha256
    state: dict[str, Any] = {"epoch": 0, "best_accuracy": -1.0, "best_epoch": 0, "history": [], "init": started_from}
    best_tensors = {k: v.clone() for k, v in model.state_dict().items()}
    if resume:
        state, best_tensors = _resume(checkpoints, cfg, model, optimizer, started_from)
    steps_per_epoch = -(-len(train_set) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    started = time.perf_counter() - state.get("seconds", 0.0)

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        train_loss = _train_epoch(model, optimizer, train_set, cfg, epoch, steps_per_epoch, total_steps, progress)
        val = accuracy(model, val_set, names)
        improved = val.accuracy > state["best_accuracy"]
        if improved:
            state.update(best_accuracy=val.accuracy, best_epoch=epoch)
            best_tensors = {k: v.clone() for k, v in model.state_dict().items()}
        state["history"].append({"epoch": epoch, "train_loss": train_loss, "val_accuracy": val.accuracy})
        state.update(epoch=epoch, seconds=time.perf_counter() - started, config=to_dict(cfg), class_names=names)
        last = {f"model.{k}": v for k, v in model.state_dict().items()} | optimizer_tensors(optimizer)
        checkpoints.save(state, last, best_tensors if improved else None)
        logger.info("epoch %d/%d: loss %.4f, val accuracy %.4f", epoch, cfg.epochs, train_loss, val.accuracy)

    model.load_state_dict(best_tensors)
    metrics = {
        "best_val_accuracy": state["best_accuracy"],
        "best_epoch": state["best_epoch"],
        "epochs": cfg.epochs,
        "train_images": len(train_set),
        "val_images": len(val_set),
        "seconds": round(time.perf_counter() - started, 2),
        "history": state["history"],
    }
    return TrainedSource(model, arch, names, preprocess, metrics)


def _initial_model(
    cfg: SourceTrainConfig, num_classes: int, init: BackboneInit | None
) -> tuple[SourceClassifier, ArchSpec]:
    """The seeded model to train: random throughout, or ``init``'s backbone under a fresh seeded head."""
    if init is not None and cfg.model.name != init.arch_name:
        raise ConfigError(
            f"--init holds a {init.arch_name} backbone but the config asks for {cfg.model.name}",
            hint=f"leave --arch out or pass --arch {init.arch_name}",
            reason="init-arch-mismatch",
        )
    kwargs = cfg.model.kwargs if init is None else init.kwargs
    arch = resolve_arch(cfg.model.name, kwargs, num_classes, cfg.model.bottleneck_dim)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # initial weights depend on the seed only, not on global state
        model = build_model(arch)
    if init is not None:
        model.backbone.load_state_dict(init.backbone, strict=True)
    return model, arch


def _resume(
    checkpoints: Checkpoints,
    cfg: SourceTrainConfig,
    model: SourceClassifier,
    optimizer: torch.optim.SGD,
    started_from: str | None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    loaded = checkpoints.load()
    if loaded is None:
        logger.info("no checkpoint in %s: starting from epoch 1", checkpoints.folder)
        fresh = {"epoch": 0, "best_accuracy": -1.0, "best_epoch": 0, "history": [], "init": started_from}
        return fresh, dict(model.state_dict())
    state, last, best = loaded
    if state.get("init") != started_from:
        raise ConfigError(
            f"the checkpoint in {checkpoints.folder} started from other initial weights",
            hint="resume with the same --init, or drop --resume to start over",
            reason="resume-config-mismatch",
        )
    if state.get("config") != to_dict(cfg):
        raise ConfigError(
            f"the checkpoint in {checkpoints.folder} was made with a different config",
            hint="resume with the same --config/--set values, or drop --resume to start over",
            reason="resume-config-mismatch",
        )
    model.load_state_dict({k.removeprefix("model."): v for k, v in last.items() if k.startswith("model.")})
    restore_optimizer(optimizer, last)
    logger.info("resuming after epoch %d from %s", state["epoch"], checkpoints.folder)
    return state, best


def _train_epoch(
    model: SourceClassifier,
    optimizer: torch.optim.SGD,
    train_set: ImageDataset,
    cfg: SourceTrainConfig,
    epoch: int,
    steps_per_epoch: int,
    total_steps: int,
    progress: ProgressFn | None,
) -> float:
    """One pass over the training set; the data order depends only on (seed, epoch)."""
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=generator)
    model.train()
    losses = []
    for index, (images, labels) in enumerate(loader):
        step = (epoch - 1) * steps_per_epoch + index
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(step, total_steps, cfg.optim, warmup_steps)
        inputs = augment(images, generator) if cfg.augment else images
        loss = nn.functional.cross_entropy(model(inputs), labels, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(f"epoch {epoch}/{cfg.epochs}", index + 1, steps_per_epoch, f"loss {losses[-1]:.3f}")
    return sum(losses) / max(1, len(losses))
