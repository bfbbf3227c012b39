"""Training speed of every adaptation method: one epoch of each, side by side, in images per second.

Usage: python benchmarks/method_speed.py --data DIR --model DIR [--owner-key PUB] [--task depth]
       [--methods a,b,...] [--threads N] [--set KEY=VALUE ...] [--json]

What it does, all in one process so the ratios between methods are comparable:

1. Loads and verifies the signed source model with the owner's public key (default
   ``MODEL/../keys/owner.pub``) and builds the site's unlabelled target set (``DATA/TASK/target``)
   and its task-irrelevant pairs (``DATA/TASK/paired``), exactly as ``xkt-bench run`` does.
2. Warm-up, untimed: reads every target image and pair once (so no method pays for a cold page
   cache) and runs a throw-away ``adapt()`` on 8 target images (so no method pays the process's
   one-time costs, such as the first optimiser importing ``torch._dynamo``).
3. For each method (default: every registered one, source-only first) calls
   :func:`xkt.client.trainer.adapt` for ONE epoch of each of its stages (``epochs=1`` and
   ``tgmb_tgkt.tgmb_epochs=1``; a method whose stages are still longer is refused), with the
   method's own preset batch size (``batch_size=0``) and its defaults otherwise (``--set`` changes
   them, as ``xkt-client adapt --set`` does).  source-only does not train: its row is 0 images/s.

Definitions (per stage; each stage runs exactly one epoch):

- ``train_s``: from the moment the trainer enters the epoch's step loop (its call of
  its step-0 ``progress`` call, after the method's epoch-start hook) to the
  ``progress`` callback of the epoch's last step.  It covers every step: reading and preparing the
  batch (and its TI pairs), forward, the method's loss terms, backward and the optimiser step.
- ``images``: every target image the epoch trained on (the length of that epoch's order; a lone
  last image is dropped by the trainer).  ``images_per_s = images / train_s``.
- ``steady_images_per_s``: the same without the first step, i.e. from the first step's callback to
  the last one's, over the images of steps 2..S (null when the epoch has a single step).
- ``monitor_s`` (per method): the label-free monitoring pass after each stage that trains the model
  (from the last step's callback to the trainer's per-epoch observer call).
- ``wall_s``: the whole ``adapt()`` call: setup (copies of the model, the initial monitoring pass,
  the method's own setup), per-epoch hooks (e.g. SHOT's pseudo-labels), training, monitoring and
  checkpoints.  ``other_s = wall_s - train_s - monitor_s``; ``cpu_s`` is the process CPU time of
  the call (on a shared machine it shows how much of a slow wall time is contention).

Output: a table on stderr; with ``--json`` one JSON object on stdout with the keys ``task``,
``data``, ``site``, ``model`` (path, model_id, arch, image_size, classes), ``target_images``,
``pairs``, ``machine`` (cores, torch_threads, torch, python, platform), ``load_avg_1m`` (before,
after), ``overrides`` (the ``--set`` values, then the forced ones), ``config`` (the resolved
AdaptConfig, batch size 0 = each method's own), ``warmup_s``, ``date`` and ``methods``: one row per method with
``method``, ``trains``, ``batch_size``, ``pair_batch_size``, ``stages`` (each: ``stage``,
``steps``, ``images``, ``train_s``, ``images_per_s``, ``first_step_s``, ``steady_images_per_s``),
``train_images``, ``train_s``, ``images_per_s`` (over all its stages), ``monitor_s``, ``wall_s``,
``other_s`` and ``cpu_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import xkt.client.trainer as trainer
from xkt.benchmarks.run import site_folder
from xkt.client.methods import METHODS, get_method
from xkt.client.trainer import AdaptConfig, adapt, method_config, resolve_config
from xkt.shared.artifact import load_artifact
from xkt.shared.config import load_config, to_dict
from xkt.shared.data import ImageDataset, PairedDataset, list_images, paired_dataset, read_modality
from xkt.shared.errors import ConfigError, XktError
from xkt.shared.models import SourceClassifier
from xkt.shared.signing import load_public_key

SOURCE_ONLY = "source-only"
#: One epoch of every stage: the trainer's epochs plus each multi-stage method's own stage length.
ONE_EPOCH = ("epochs=1", "tgmb_tgkt.tgmb_epochs=1")


def default_methods() -> tuple[str, ...]:
    """source-only first, then every other registered method, sorted."""
    return (SOURCE_ONLY, *sorted(m for m in METHODS if m != SOURCE_ONLY))


def parse_methods(text: str | None) -> tuple[str, ...]:
    """``a,b,c`` → the methods in order; unknown or repeated names are refused."""
    if text is None:
        return default_methods()
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for name in names:
        get_method(name)  # ConfigError listing the choices
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"bad method list {text!r}", hint="name each method once, e.g. shot,socket")
    return names


def one_epoch_config(overrides: Sequence[str], threads: int) -> AdaptConfig:
    """AdaptConfig from ``--set`` values with one epoch per stage forced (and ``threads`` when given)."""
    extra = [f"threads={threads}"] if threads else []
    return load_config(AdaptConfig, overrides=[*overrides, *extra, *ONE_EPOCH])


def check_one_epoch(cfg: AdaptConfig, method: str) -> None:
    """Refuse a method with a stage longer than one epoch (a new stage-length setting missing from ONE_EPOCH)."""
    cls = get_method(method)
    long = [(s.name, s.epochs) for s in cls(method_config(cfg, cls)).stages(cfg.epochs) if s.epochs != 1]
    if long:
        raise ConfigError(
            f"method {method!r} would run stage(s) {long} for more than one epoch",
            hint="add the method's stage-length setting to ONE_EPOCH in benchmarks/method_speed.py",
            reason="stage-too-long",
        )


# ------------------------------------------------------------------ timing one adapt() call


@dataclass
class _Loop:
    """One epoch's step loop: when it started, how many images its order holds, each step's callback time."""

    start: float
    images: int
    steps: list[float] = field(default_factory=list)
    totals: set[int] = field(default_factory=set)


@dataclass
class _Clock:
    """Timestamps of the events of one adapt() call."""

    loops: list[_Loop] = field(default_factory=list)
    observed: list[float] = field(default_factory=list)

    def step_done(self, done: int, total: int, images: int) -> None:
        """The trainer's progress callback: step 0 announces the epoch's step loop, then each step."""
        now = time.perf_counter()
        if done == 0:
            self.loops.append(_Loop(now, images))
            return
        if not self.loops or len(self.loops[-1].steps) + 1 != done:
            raise RuntimeError(f"progress step {done}/{total} came out of order; the trainer's loop has changed")
        self.loops[-1].steps.append(now)
        self.loops[-1].totals.add(total)

    def observe(self, model: SourceClassifier) -> dict[str, float]:
        self.observed.append(time.perf_counter())
        return {}


def _stage_row(name: str, loop: _Loop, batch_size: int) -> dict[str, Any]:
    """One stage's numbers (see the module docstring for the definitions)."""
    if not loop.steps or loop.totals != {len(loop.steps)}:
        raise RuntimeError(f"stage {name}: {len(loop.steps)} step callbacks for {sorted(loop.totals)} steps")
    train_s = loop.steps[-1] - loop.start
    steady_s, steady_images = loop.steps[-1] - loop.steps[0], loop.images - min(batch_size, loop.images)
    return {
        "stage": name,
        "steps": len(loop.steps),
        "images": loop.images,
        "train_s": round(train_s, 4),
        "images_per_s": round(loop.images / train_s, 2),
        "first_step_s": round(loop.steps[0] - loop.start, 4),
        "steady_images_per_s": round(steady_images / steady_s, 2) if len(loop.steps) > 1 else None,
    }


def time_method(
    model: SourceClassifier, target: ImageDataset, pairs: PairedDataset | None, method: str, cfg: AdaptConfig
) -> dict[str, Any]:
    """adapt() once (one epoch per stage) with every event timed; returns the method's row."""
    cls = get_method(method)
    resolved = resolve_config(cfg, method)
    clock = _Clock()
    images = len(target) - (1 if len(target) % resolved.batch_size == 1 else 0)  # a lone last image is dropped
    with tempfile.TemporaryDirectory(prefix="xkt-method-speed-") as checkpoints:
        cpu, tick = time.process_time(), time.perf_counter()
        adapt(
            model,
            target,
            method,
            cfg,
            pairs=pairs,  # as `xkt-bench run` passes them: to every method
            checkpoint_dir=Path(checkpoints),
            progress=lambda _label, done, total, _status: clock.step_done(done, total, images),
            observer=clock.observe,
        )
        wall_s, cpu_s = time.perf_counter() - tick, time.process_time() - cpu
    stages = cls(method_config(resolved, cls)).stages(resolved.epochs) if cls.trains else []
    if len(clock.loops) != len(stages):
        raise RuntimeError(f"{method}: {len(clock.loops)} step loops for {len(stages)} stages")
    rows, monitor_s, observed = [], 0.0, iter(clock.observed)
    for stage, loop in zip(stages, clock.loops, strict=True):
        rows.append(_stage_row(stage.name, loop, resolved.batch_size))
        if stage.trains_model:  # the trainer's monitoring pass, then the observer
            monitor_s += next(observed) - loop.steps[-1]
    train_s, images = sum(r["train_s"] for r in rows), sum(r["images"] for r in rows)
    pair_batch = (
        min(resolved.pair_batch_size or resolved.batch_size, len(pairs))
        if cls.needs_pairs and pairs is not None
        else None
    )
    return {
        "method": method,
        "trains": cls.trains,
        "batch_size": resolved.batch_size,
        "pair_batch_size": pair_batch,
        "stages": rows,
        "train_images": images,
        "train_s": round(train_s, 4),
        "images_per_s": round(images / train_s, 2) if train_s > 0 else 0.0,
        "monitor_s": round(monitor_s, 4),
        "wall_s": round(wall_s, 4),
        "other_s": round(wall_s - train_s - monitor_s, 4),
        "cpu_s": round(cpu_s, 4),
    }


def warm_up(model: SourceClassifier, target: ImageDataset, pairs: PairedDataset | None, cfg: AdaptConfig) -> float:
    """Untimed by the rows: read every image once, then a throw-away adapt() on a few images; returns its seconds.

    The small adapt() pays the process's one-time costs (the first optimiser imports torch._dynamo,
    about a second) that would otherwise land on whichever method runs first.
    """
    tick = time.perf_counter()
    readers: list[ImageDataset | PairedDataset] = [target] if pairs is None else [target, pairs]
    for dataset in readers:  # read for the page cache only
        for i in range(len(dataset)):
            dataset[i]
    method = next(name for name, cls in sorted(METHODS.items()) if cls.trains and not cls.needs_pairs)
    few = ImageDataset(target.paths[: min(len(target), 8)], target.modality, target.preprocess)
    with tempfile.TemporaryDirectory(prefix="xkt-method-speed-") as checkpoints:
        adapt(model, few, method, replace(cfg, batch_size=4), checkpoint_dir=Path(checkpoints))
    return time.perf_counter() - tick


# ------------------------------------------------------------------ the run


def measure(args: argparse.Namespace, methods: Sequence[str], cfg: AdaptConfig) -> dict[str, Any]:
    """Load, warm up and time every method; returns the JSON result."""
    if args.threads:
        torch.set_num_threads(args.threads)
    owner_key = args.owner_key or args.model.parent / "keys" / "owner.pub"
    if not owner_key.is_file():
        raise ConfigError(f"no owner key: {owner_key} does not exist", hint="pass --owner-key PUB")
    loaded = load_artifact(args.model, [load_public_key(owner_key)])
    site = site_folder(args.data, args.task)
    modality, preprocess = read_modality(site), loaded.manifest.input_spec.preprocess()
    target = ImageDataset(list_images(site / "target"), modality, preprocess)
    pairs = paired_dataset(site, modality, preprocess)
    for method in methods:
        if get_method(method).needs_pairs:
            trainer.require_pairs(method, 0 if pairs is None else len(pairs))
    load_before = os.getloadavg()[0]
    warmup_s = warm_up(loaded.model, target, pairs, cfg)
    rows = [time_method(loaded.model, target, pairs, method, cfg) for method in methods]
    return {
        "task": args.task,
        "data": str(args.data),
        "site": str(site),
        "model": {
            "path": str(args.model),
            "model_id": loaded.manifest.model_id,
            "arch": loaded.manifest.arch.to_json(),
            "image_size": loaded.manifest.input_spec.size,
            "classes": len(loaded.manifest.class_names),
        },
        "target_images": len(target),
        "pairs": 0 if pairs is None else len(pairs),
        "machine": {
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "overrides": [*args.set, *ONE_EPOCH],
        "config": to_dict(cfg),
        "warmup_s": round(warmup_s, 4),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "methods": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    """The human summary on stderr: one line per stage, the method's totals on its first line."""
    from rich.console import Console
    from rich.table import Table

    machine, model = result["machine"], result["model"]
    title = (
        f"one adaptation epoch per method: {result['task']}, {result['target_images']} target images, "
        f"{result['pairs']} pairs, {model['arch']['name']} at {model['image_size']} px, "
        f"{machine['cores']} cores / {machine['torch_threads']} torch threads"
    )
    table = Table(title=title)
    for name in ("method", "batch", "stage", "steps", "images", "train s", "images/s", "w/o 1st step"):
        table.add_column(name, justify="left" if name in ("method", "stage") else "right")
    for name in ("monitor s", "epoch wall s", "CPU s"):
        table.add_column(name, justify="right")
    for row in result["methods"]:
        totals = [f"{row['monitor_s']:.2f}", f"{row['wall_s']:.2f}", f"{row['cpu_s']:.2f}"]
        if not row["stages"]:
            table.add_row(row["method"], "-", "(no training)", "0", "0", "0", "0", "-", *totals)
        for i, stage in enumerate(row["stages"]):
            steady = stage["steady_images_per_s"]
            cells = [stage["stage"], str(stage["steps"]), str(stage["images"]), f"{stage['train_s']:.2f}"]
            cells += [f"{stage['images_per_s']:.1f}", "-" if steady is None else f"{steady:.1f}"]
            first = [row["method"], str(row["batch_size"])] if i == 0 else ["", ""]
            table.add_row(*first, *cells, *(totals if i == 0 else ["", "", ""]))
    wide = sys.stderr.isatty() or "COLUMNS" in os.environ  # a log file gets the whole table, not 80 columns
    console = Console(stderr=True, width=None if wide else 150)
    console.print(table)
    console.print(f"warm-up {result['warmup_s']:.2f} s; 1-min load average {result['load_avg_1m']} (before, after)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the flags, time every method, print the table (and JSON); returns the result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--data", type=Path, required=True, help="a data folder of `xkt-bench data` (DATA/TASK/target)")
    ap.add_argument("--model", type=Path, required=True, help="the owner's signed source model folder")
    ap.add_argument("--owner-key", type=Path, default=None, help="owner's public key; default MODEL/../keys/owner.pub")
    ap.add_argument("--task", default="depth", help="the site folder of DATA: depth, ir, ...")
    ap.add_argument("--methods", default=None, help="comma-separated; default every registered method")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's default")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="AdaptConfig override")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args(argv)
    if args.threads < 0:
        ap.error("--threads must be 0 or more")
    try:
        methods = parse_methods(args.methods)
        cfg = one_epoch_config(args.set, args.threads)
        for method in methods:
            check_one_epoch(cfg, method)
        result = measure(args, methods, cfg)
    except XktError as error:
        ap.error(f"{error.message} ({error.hint})")
    print_table(result)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
