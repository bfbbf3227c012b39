"""The supervised ceiling of ``xkt-bench run``: the source model fine-tuned *with* target labels.

No site can do this (a site has no target labels), which is the point: it measures how
far adaptation could go on this target set, so a table can say which share of the
source-only → oracle gap a label-free method closed.  The labels come from the built-in
benchmark's ``truth/<site>/target_labels.csv``, which lives outside every site folder
(:func:`xkt.shared.shapes_benchmark.truth_labels`).

The recipe is the owner's own (:mod:`xkt.server.source_training`), applied to the
target images: a copy of the source model with every layer trainable, label-smoothed
cross-entropy, SGD + Nesterov with the polynomial decay after a linear warm-up, the
same crop/flip augmentation.  The epoch itself is source training's own epoch function,
so the ceiling cannot drift from the recipe the owner trained with.  There is no
validation set on the target side, so the last epoch's model is returned; the site's
``eval/`` images are never trained on.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xkt.server.source_training import SourceTrainConfig, make_optimizer
from xkt.server.source_training import _train_epoch as train_epoch
from xkt.shared.data import ImageDataset, Modality, Preprocess, labelled_dataset
from xkt.shared.errors import DataError
from xkt.shared.models import SourceClassifier
from xkt.shared.shapes_benchmark import truth_labels

logger = logging.getLogger("xkt")

ORACLE = "oracle"
ProgressFn = Callable[[str, int, int, str], None]
Observer = Callable[[SourceClassifier], dict[str, float]]


@dataclass
class OracleResult:
    """The fine-tuned model and its per-epoch history (losses, observations); shaped like an AdaptResult's."""

    model: SourceClassifier
    metrics: dict[str, Any]


def truth_dataset(
    data: Path, site_dir: str, modality: Modality, preprocess: Preprocess, names: list[str]
) -> ImageDataset:
    """The site's ``target/`` images with their benchmark-only classes (``DATA/truth/SITE/target_labels.csv``)."""
    csv_path = truth_labels(data, site_dir)
    if not csv_path.is_file():
        raise DataError(
            f"{csv_path} does not exist, so the oracle has no target labels to train on",
            hint="regenerate the data with `xkt-bench data` (older data sets have no truth/ folder), "
            "or leave `oracle` out of --methods",
            reason="missing-truth",
        )
    return labelled_dataset(csv_path, modality, preprocess, names)


def train_oracle(
    source: SourceClassifier,
    labelled: ImageDataset,
    cfg: SourceTrainConfig,
    *,
    progress: ProgressFn | None = None,
    observer: Observer | None = None,
) -> OracleResult:
    """Fine-tune a copy of ``source`` on labelled target images for ``cfg.epochs``; ``source`` is untouched.

    ``cfg.model`` is ignored (the architecture is the source's); every other field means
    what it means in source training.  ``observer`` is called after each epoch, as the
    adaptation trainer's is, and what it returns goes into the history.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if len(labelled) % cfg.batch_size == 1:  # a last batch of one image: BatchNorm has no batch statistics
        labelled = ImageDataset(labelled.paths[:-1], labelled.modality, labelled.preprocess, labelled.labels[:-1])
    model = copy.deepcopy(source).requires_grad_(True)
    optimizer = make_optimizer(model, cfg.optim)
    steps_per_epoch = -(-len(labelled) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    started = time.perf_counter()
    history: list[dict[str, Any]] = []
    for epoch in range(1, cfg.epochs + 1):
        loss = train_epoch(model, optimizer, labelled, cfg, epoch, steps_per_epoch, total_steps, progress)
        entry: dict[str, Any] = {"epoch": epoch, "stage": "supervised", "losses": {"ce": loss}}
        if observer is not None:
            entry["observed"] = observer(model)
        history.append(entry)
        logger.info("oracle epoch %d/%d: loss %.4f", epoch, cfg.epochs, loss)
    metrics = {
        "method": ORACLE,
        "trained": True,
        "epochs": cfg.epochs,
        "target_images": len(labelled),
        "seconds": round(time.perf_counter() - started, 2),
        "history": history,
    }
    return OracleResult(model.eval(), metrics)
