"""Images per second and achieved FLOP rate of one adaptation step, per method and backbone, against matmul.

Usage: python benchmarks/throughput.py [--backbones resnet_tiny,resnet18,mobilenet_v2] [--methods a,b,...]
       [--size 64] [--site-per-class 43] [--threads 2] [--repeats 3]
       [--matmul-n 2048] [--json]
       python benchmarks/throughput.py --profile --backbones resnet18 --methods shot [--top 15]

Why: images/s alone does not say whether a step is slow because it does a lot of
arithmetic or because it wastes time around the arithmetic.  The ratio of the step's
achieved floating-point rate to this machine's own matrix-multiply rate, measured in the
same run, does (nanoGPT's ``estimate_mfu`` idea, with a measured instead of a datasheet peak).

What it does, all in one process so that every ratio is measured side by side:

1. Renders a small built-in data set (the ``depth`` site at ``--size`` px: 6 ×
   ``--site-per-class`` unlabelled target images and its task-irrelevant pairs) into a
   temporary folder, and builds each backbone untrained (weights change neither the
   arithmetic nor the time): ``resnet_tiny`` as the benchmark's (width 32, ImageNet stem),
   ``resnet18`` and ``mobilenet_v2`` with their registry defaults.
2. Counts the FLOPs of one real step of every stage: :func:`xkt.client.trainer.adapt` runs on
   one batch with a :class:`torch.utils.flop_counter.FlopCounterMode` entered by the
   trainer's progress callback where the stage's step loop starts and left after its first
   step, so the forward passes, losses, backward and optimiser step are all under the counter.
   The counter counts matrix products and convolutions (forward and backward), as FLOP
   utilisation figures do; element-wise work (BatchNorm, activations, SGD) is not counted.
3. ``--repeats`` times: for each (backbone, method), the matmul rate (two ``--matmul-n``
   square float32 matrices on ``--threads`` threads, median of three products) right
   before the method's timed epoch (:func:`xkt.benchmarks.method_speed.time_method`: one
   epoch of each stage through the real loop, data reading included).

Per cell: ``images_per_s`` (method_speed's: target images trained on per second of the step
loop), ``step_gflop`` (the counted step at the method's batch size), ``achieved_gflop_s`` =
images/s × step GFLOP / batch, ``matmul_gflop_s`` and ``ratio`` = achieved / matmul, each the
median over repeats, with their min and max to show the noise.  A two-stage method has a
row per stage.

``--profile`` instead runs one epoch of the first backbone and method under
:mod:`torch.profiler` and prints where the step loop's time goes: the ``--top`` operators by
self CPU time, each with its share of the profiled time (JSON: ``profile``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from xkt.benchmarks.method_speed import ONE_EPOCH, check_one_epoch, parse_methods, time_method
from xkt.client.methods import get_method
from xkt.client.trainer import AdaptConfig, adapt, resolve_config
from xkt.shared.config import load_config
from xkt.shared.data import ImageDataset, PairedDataset, Preprocess, list_images, paired_dataset, read_modality
from xkt.shared.errors import ConfigError, XktError
from xkt.shared.models import SourceClassifier, build_model, resolve_arch
from xkt.shared.render import TASK_CLASSES
from xkt.shared.shapes_benchmark import ShapesConfig, write_shapes_benchmark

GIGA = 1e9
#: The backbones measured by default, with the keyword arguments they are built with.
BACKBONES: dict[str, dict[str, Any]] = {
    "resnet_tiny": {"width": 32, "stem": "imagenet"},  # the cross-modal benchmark's source model
    "resnet18": {},  # xkt-server train's default architecture
    "mobilenet_v2": {},  # the real-image benchmark's ImageNet backbone
}
TRAINING_METHODS = ("shot", "shot-im", "socket", "tgmb-tgkt", "cmcd")


# ------------------------------------------------------------------ pure arithmetic


def matmul_flops(n: int) -> int:
    """FLOPs of one (n × n) @ (n × n) product: n² outputs, each n multiplies and n adds."""
    return 2 * n**3


def achieved_flop_rate(images_per_s: float, step_flops: float, batch_size: int) -> float:
    """FLOP/s a step loop reached: images per second × FLOPs per image of its step."""
    return images_per_s * step_flops / batch_size


def rate_ratio(achieved: float, reference: float) -> float:
    """``achieved`` as a share of ``reference`` (0 when there is no reference)."""
    return achieved / reference if reference > 0 else 0.0


@dataclass(frozen=True)
class Spread:
    """Median, min and max of repeated measurements (how noisy the machine was)."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


# ------------------------------------------------------------------ measurements


def matmul_rate(n: int, products: int = 3) -> float:
    """FLOP/s of float32 (n × n) matrix products on torch's current threads: the median of ``products``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: allocation and the BLAS's thread start
    seconds = []
    for _ in range(products):
        tick = time.perf_counter()
        torch.mm(a, b)
        seconds.append(time.perf_counter() - tick)
    return matmul_flops(n) / statistics.median(seconds)


def conv_backward_flops(
    grad_out_shape: Sequence[int],
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    _bias: object,
    _stride: object,
    _padding: object,
    _dilation: object,
    transposed: bool,
    _output_padding: object,
    _groups: int,
    output_mask: Sequence[bool],
    out_shape: object = None,
) -> int:
    """FLOPs of a convolution's backward: the forward's count for each of the two gradients it computes.

    Why not torch's own formula: in torch 2.13 it counts the weight gradient of a grouped
    convolution as if it were ungrouped (33 × the forward for a 32-channel depthwise layer
    instead of 2 ×), which made a MobileNetV2 step look 20 × its forward pass.  Both the input
    and the weight gradient of a convolution cost exactly what its forward costs.
    """
    forward = int(conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed))
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode with the corrected convolution-backward formula."""
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})


def count_flops(run: Callable[[], object]) -> int:
    """FLOPs counted by :func:`flop_counter` while ``run()`` runs."""
    with flop_counter() as counter:
        run()
    return int(counter.get_total_flops())


@dataclass
class _FirstStepCounter:
    """A trainer progress callback that counts the FLOPs of the first step of each stage's loop."""

    per_stage: list[int] = field(default_factory=list)
    _counting: tuple[FlopCounterMode, ExitStack] | None = None

    def __call__(self, _label: str, done: int, _total: int, _status: str) -> None:
        if done == 0:  # the stage's step loop starts: everything until step 1's callback is counted
            counter, stack = flop_counter(), ExitStack()
            stack.enter_context(counter)
            self._counting = counter, stack
        elif done == 1 and self._counting is not None:
            counter, stack = self._counting
            stack.close()
            self.per_stage.append(int(counter.get_total_flops()))
            self._counting = None


def step_flops(
    model: SourceClassifier, target: ImageDataset, pairs: PairedDataset | None, method: str, cfg: AdaptConfig
) -> list[int]:
    """FLOPs of one real step of each of the method's stages, at its own batch size."""
    batch = resolve_config(cfg, method).batch_size
    one_batch = ImageDataset(target.paths[:batch], target.modality, target.preprocess)
    counter = _FirstStepCounter()
    with tempfile.TemporaryDirectory(prefix="xkt-throughput-") as checkpoints:
        adapt(model, one_batch, method, cfg, pairs=pairs, checkpoint_dir=Path(checkpoints), progress=counter)
    return counter.per_stage


@dataclass(frozen=True)
class Cell:
    """One (backbone, method, stage) row of the table; rates in GFLOP/s."""

    backbone: str
    method: str
    stage: str
    batch_size: int
    step_gflop: float
    images_per_s: Spread
    achieved_gflop_s: Spread
    matmul_gflop_s: Spread
    ratio: Spread


def make_cells(backbone: str, method: str, flops: list[int], runs: list[tuple[float, dict[str, Any]]]) -> list[Cell]:
    """Table rows from a method's step FLOPs and its repeated (matmul FLOP/s, method_speed row) runs."""
    cells = []
    for index, count in enumerate(flops):
        batch = runs[0][1]["batch_size"]
        speeds = [row["stages"][index]["images_per_s"] for _, row in runs]
        achieved = [achieved_flop_rate(s, count, batch) / GIGA for s in speeds]
        matmul = [rate / GIGA for rate, _ in runs]
        ratios = [rate_ratio(a, m) for a, m in zip(achieved, matmul, strict=True)]
        stage = runs[0][1]["stages"][index]["stage"]
        cells.append(
            Cell(
                backbone, method, stage, batch, count / GIGA,
                Spread.of(speeds), Spread.of(achieved), Spread.of(matmul), Spread.of(ratios),
            )
        )  # fmt: skip
    return cells


def profile_epoch(model: SourceClassifier, site: Site, method: str, cfg: AdaptConfig, top: int) -> list[dict[str, Any]]:
    """The ``top`` operators of one epoch by self CPU time: name, calls, seconds and share of the total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        time_method(model, site.target, site.pairs, method, cfg)
    events = [e for e in profiler.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3),
            "share": round(e.self_cpu_time_total / total, 4),
        }
        for e in ranked
    ]


# ------------------------------------------------------------------ the run


@dataclass(frozen=True)
class Site:
    """The rendered site's target images and pairs (prepared at the run's size)."""

    target: ImageDataset
    pairs: PairedDataset | None


def render_site(root: Path, size: int, site_per_class: int) -> Site:
    """A small built-in data set under ``root``; its depth site as datasets at ``size`` px."""
    write_shapes_benchmark(
        root / "data", ShapesConfig(size=size, per_class=1, site_per_class=site_per_class, modalities=("depth",))
    )
    site = root / "data" / "depth"
    modality, preprocess = read_modality(site), Preprocess(size)
    return Site(
        ImageDataset(list_images(site / "target"), modality, preprocess), paired_dataset(site, modality, preprocess)
    )


def measure(args: argparse.Namespace, methods: Sequence[str], cfg: AdaptConfig, root: Path) -> dict[str, Any]:
    """Render, count every step's FLOPs, then time every (backbone, method) ``repeats`` times."""
    torch.set_num_threads(args.threads)
    site = render_site(root, args.size, args.site_per_class)
    models = {name: build_model(resolve_arch(name, BACKBONES[name], len(TASK_CLASSES))) for name in args.backbones}
    if args.profile:
        backbone, method = args.backbones[0], methods[0]
        time_method(models[backbone], site.target, site.pairs, method, cfg)  # warm-up: one-time costs
        top = profile_epoch(models[backbone], site, method, cfg, args.top)
        return {"backbone": backbone, "method": method, "size": args.size, "profile": top}
    flops = {(b, m): step_flops(model, site.target, site.pairs, m, cfg) for b, model in models.items() for m in methods}
    runs: dict[tuple[str, str], list[tuple[float, dict[str, Any]]]] = {key: [] for key in flops}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for (backbone, method), seen in runs.items():
            rate = matmul_rate(args.matmul_n)
            seen.append((rate, time_method(models[backbone], site.target, site.pairs, method, cfg)))
    cells = [cell for (b, m), count in flops.items() for cell in make_cells(b, m, count, runs[(b, m)])]
    return {
        "size": args.size,
        "target_images": len(site.target),
        "pairs": 0 if site.pairs is None else len(site.pairs),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "matmul_n": args.matmul_n,
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cells": [asdict(cell) for cell in cells],
    }


def print_profile(result: dict[str, Any]) -> None:
    """The profile's operators on stderr."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"one epoch of {result['method']} on {result['backbone']} at {result['size']} px: self CPU time"
    )
    for name in ("operator", "calls", "self CPU s", "share"):
        table.add_column(name, justify="left" if name == "operator" else "right")
    for row in result["profile"]:
        table.add_row(row["op"], str(row["calls"]), f"{row['self_cpu_s']:.3f}", f"{row['share']:.1%}")
    Console(stderr=True, width=None if sys.stderr.isatty() else 170).print(table)


def print_table(result: dict[str, Any]) -> None:
    """The human summary on stderr: one line per (backbone, method, stage), median (min–max)."""
    from rich.console import Console
    from rich.table import Table

    title = (
        f"one adaptation step: {result['target_images']} depth images at {result['size']} px, "
        f"{result['threads']} threads on {result['cores']} cores, {result['repeats']} repeats, median (min-max)"
    )
    table = Table(title=title)
    for name in (
        "backbone",
        "method",
        "stage",
        "batch",
        "images/s",
        "step GFLOP",
        "GFLOP/s",
        "matmul GFLOP/s",
        "ratio",
    ):
        table.add_column(name, justify="left" if name in ("backbone", "method", "stage") else "right")

    def spread(values: dict[str, float], digits: int) -> str:
        return f"{values['median']:.{digits}f} ({values['low']:.{digits}f}-{values['high']:.{digits}f})"

    for cell in result["cells"]:
        table.add_row(
            cell["backbone"], cell["method"], cell["stage"], str(cell["batch_size"]),
            spread(cell["images_per_s"], 1), f"{cell['step_gflop']:.2f}", spread(cell["achieved_gflop_s"], 1),
            spread(cell["matmul_gflop_s"], 1), spread(cell["ratio"], 3),
        )  # fmt: skip
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 170)
    console.print(table)
    console.print(f"1-min load average {result['load_avg_1m']} (before, after)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the flags, measure, print the table (and JSON); returns the result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--backbones", default=",".join(BACKBONES), help=f"comma-separated from {', '.join(BACKBONES)}")
    ap.add_argument("--methods", default=",".join(TRAINING_METHODS), help="comma-separated registered methods")
    ap.add_argument("--size", type=int, default=64, help="image size in pixels (the benchmark's is 64)")
    ap.add_argument("--site-per-class", type=int, default=43, help="target images per class (6 classes)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads, for the steps and the matmul")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per cell, each after its own matmul")
    ap.add_argument("--matmul-n", type=int, default=2048, help="side of the square matrices of the matmul rate")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="AdaptConfig override")
    ap.add_argument("--profile", action="store_true", help="profile one epoch of the first backbone and method")
    ap.add_argument("--top", type=int, default=15, help="operators shown by --profile")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args(argv)
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    unknown = sorted(set(args.backbones) - set(BACKBONES))
    if unknown or not args.backbones or min(args.threads, args.repeats, args.matmul_n) < 1:
        ap.error(f"choose --backbones from {', '.join(BACKBONES)}; --threads, --repeats, --matmul-n at least 1")
    try:
        methods = parse_methods(args.methods)
        if any(not get_method(m).trains for m in methods):
            raise ConfigError("a method that does not train has no step", hint=f"choose from {TRAINING_METHODS}")
        cfg = load_config(AdaptConfig, overrides=[*args.set, f"threads={args.threads}", *ONE_EPOCH])
        for method in methods:
            check_one_epoch(cfg, method)
        with tempfile.TemporaryDirectory(prefix="xkt-throughput-") as tmp:
            result = measure(args, methods, cfg, Path(tmp))
    except XktError as error:
        ap.error(f"{error.message} ({error.hint})")
    (print_profile if args.profile else print_table)(result)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
