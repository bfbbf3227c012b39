"""``xkt-bench run``: every method × seed on one target site, as a table, JSON and plots.

Each run does what a site does, with the product's own code: load and verify the signed
source artifact (:func:`xkt.shared.artifact.load_artifact`), build the site's unlabelled
target set and its task-irrelevant pairs, adapt with :func:`xkt.client.trainer.adapt`, then
measure accuracy on ``SITE/eval/labels.csv`` (:func:`xkt.shared.evaluation.accuracy`).  The
``oracle`` (:mod:`xkt.benchmarks.oracle`) is the supervised ceiling and exists only here.

``OUT/`` after a run::

    data/, keys/, model/   generated / trained when --data / --model are not given (reused)
    settings.json          what every run in OUT was made with (a later call must match it)
    runs/METHOD-seedK.json one finished run each, written atomically
    results.json           runs + per-method summary + command, date, machine
    results.md             the table
    accuracy.png, epochs.png  bars with error bars; per-epoch accuracy and label-free signals

Resumable: a finished run is never redone, so an interrupted table continues where it
stopped (an interrupted adaptation also resumes from its per-epoch checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from xkt.benchmarks.oracle import ORACLE, Observer, OracleResult, train_oracle, truth_dataset
from xkt.benchmarks.plots import SOURCE_ONLY, markdown, summarise, write_plots
from xkt.client.methods import METHODS
from xkt.client.trainer import AdaptConfig, AdaptResult, adapt
from xkt.server.source_training import BackboneInit, SourceTrainConfig, save_source, train_source
from xkt.shared.artifact import LoadedArtifact, load_artifact
from xkt.shared.config import load_config, to_dict
from xkt.shared.data import (
    ImageDataset,
    labelled_dataset,
    list_images,
    paired_dataset,
    read_modality,
)
from xkt.shared.errors import ConfigError, DataError
from xkt.shared.evaluation import accuracy
from xkt.shared.files import replace_file
from xkt.shared.models import SourceClassifier
from xkt.shared.shapes_benchmark import ShapesConfig, write_shapes_benchmark
from xkt.shared.signing import generate_keypair, load_private_key, load_public_key

logger = logging.getLogger("xkt")

ORACLE_PREFIX = "oracle."  # --set oracle.KEY=VALUE goes to the oracle's SourceTrainConfig
ProgressFn = Callable[[str, int, int, str], None]


@dataclass(frozen=True)
class BenchmarkPlan:
    """What ``xkt-bench run`` measures, and where (``shapes`` and ``source`` are for callers in Python only)."""

    out: Path
    task: str = "depth"  # a site folder of the data: depth, ir (depth-site0 ... with --sites)
    methods: tuple[str, ...] | None = None  # None: every registered method, then the oracle
    seeds: tuple[int, ...] = (0, 1, 2)
    data: Path | None = None  # None: OUT/data, generated with `shapes` on first use
    model: Path | None = None  # None: OUT/model, trained with `source` on first use
    owner_key: Path | None = None  # with `model`; default MODEL/../keys/owner.pub
    epochs: int | None = None  # adaptation (and oracle) epochs; None keeps AdaptConfig's
    overrides: tuple[str, ...] = ()  # --set KEY=VALUE: AdaptConfig; oracle.KEY=VALUE: the oracle; seed: from `seeds`
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    source: SourceTrainConfig = field(default_factory=SourceTrainConfig)


@dataclass(frozen=True)
class _Setup:
    """Everything a run needs, resolved once."""

    out: Path
    data: Path
    site: Path
    model: Path
    owner_key: Path
    adapt: AdaptConfig
    oracle: SourceTrainConfig


# ------------------------------------------------------------------ pure helpers


def default_methods() -> tuple[str, ...]:
    """source-only first, the other registered methods sorted, the oracle last."""
    return (SOURCE_ONLY, *sorted(m for m in METHODS if m != SOURCE_ONLY), ORACLE)


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """The methods, in order; an unknown name is refused with the list of choices."""
    choices = [*sorted(METHODS), ORACLE]
    for name in methods:
        if name not in choices:
            raise ConfigError(
                f"unknown method {name!r}", hint=f"choose from: {', '.join(choices)}", reason="unknown-method"
            )
    if not methods or len(set(methods)) != len(methods):
        raise ConfigError(f"bad method list {list(methods)}", hint="name each method once, e.g. source-only,shot")
    return tuple(methods)


def command_line(plan: BenchmarkPlan, methods: Sequence[str]) -> str:
    """The ``xkt-bench run`` command line for ``plan``, methods spelled out (recorded in results.md)."""
    count = len(plan.seeds)  # the command line runs seeds 0 .. N-1; other lists exist only in Python
    seeds = str(count) if plan.seeds == tuple(range(count)) else ",".join(map(str, plan.seeds))
    args = ["xkt-bench", "run", "--task", plan.task, "--methods", ",".join(methods), "--seeds", seeds]
    args += ["--out", str(plan.out)]
    for option, value in (("--data", plan.data), ("--model", plan.model), ("--owner-key", plan.owner_key)):
        args += [option, str(value)] if value is not None else []
    args += ["--epochs", str(plan.epochs)] if plan.epochs else []
    for override in plan.overrides:
        args += ["--set", override]
    return shlex.join(args)


def resolve_configs(plan: BenchmarkPlan) -> tuple[AdaptConfig, SourceTrainConfig]:
    """AdaptConfig from ``--set`` and ``--epochs``; the oracle's from the same epochs/batch plus ``oracle.*``."""
    ours = [o.strip() for o in plan.overrides]
    oracle_sets = [o.removeprefix(ORACLE_PREFIX) for o in ours if o.startswith(ORACLE_PREFIX)]
    extra = [f"epochs={plan.epochs}"] if plan.epochs else []
    cfg = load_config(AdaptConfig, overrides=[*(o for o in ours if not o.startswith(ORACLE_PREFIX)), *extra])
    shared = [f"epochs={cfg.epochs}", f"threads={cfg.threads}"]
    shared += [f"batch_size={cfg.batch_size}"] if cfg.batch_size else []  # 0: each method's own; the oracle 64
    return cfg, load_config(SourceTrainConfig, overrides=[*shared, *oracle_sets])


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode("utf-8"))


# ------------------------------------------------------------------ preparing


def _prepare_data(plan: BenchmarkPlan, progress: ProgressFn | None) -> Path:
    if plan.data is not None:
        if not plan.data.is_dir():
            raise DataError(
                f"data folder {plan.data} does not exist",
                hint="pass an existing --data folder, or leave --data out to generate the built-in benchmark",
                reason="missing-folder",
            )
        return plan.data
    data = plan.out / "data"
    if not (data / "dataset.json").is_file():
        logger.info("generating the built-in benchmark into %s", data)
        report = None if progress is None else lambda split, done, total: progress(f"data {split}", done, total, "")
        write_shapes_benchmark(data, plan.shapes, report)  # atomic: OUT/data is complete or absent
    return data


def _prepare_model(plan: BenchmarkPlan, data: Path, progress: ProgressFn | None) -> tuple[Path, Path]:
    """The source artifact and the public key it must be signed with."""
    if plan.model is not None:
        owner_key = plan.owner_key or plan.model.parent / "keys" / "owner.pub"
        if not owner_key.is_file():
            raise ConfigError(
                f"no owner key for {plan.model}: {owner_key} does not exist",
                hint="pass the owner's public key with --owner-key",
                reason="missing-owner-key",
            )
        return plan.model, owner_key
    keys, model = plan.out / "keys", plan.out / "model"
    if not (keys / "owner.key").is_file():
        generate_keypair(keys)  # throw-away: it signs only this benchmark's source model
    if not (model / "manifest.json").is_file():
        train_source_model(data, plan.source, keys / "owner.key", model, progress)
    return model, keys / "owner.pub"


def train_source_model(
    data: Path,
    cfg: SourceTrainConfig,
    key: Path,
    model: Path,
    progress: ProgressFn | None,
    init: BackboneInit | None = None,
) -> None:
    """The owner's side, as ``xkt-server train [--init]`` does it; resumes from MODEL.ckpt after an interruption."""
    logger.info("training the source model (%s, %d epochs) into %s", cfg.model.name, cfg.epochs, model)
    checkpoints = model.with_name(model.name + ".ckpt")
    trained = train_source(data, cfg, checkpoints, resume=True, progress=progress, init=init)
    save_source(
        trained, cfg, data, out_dir=model, private_key=load_private_key(key), model_id="xkt-bench-source",
        model_version="1", init=init,
    )  # fmt: skip
    shutil.rmtree(checkpoints, ignore_errors=True)


def site_folder(data: Path, task: str) -> Path:
    """``DATA/TASK`` when it is a site with target images and eval labels; otherwise the choices."""
    site = data / task
    if not (site / "target").is_dir() or not (site / "eval" / "labels.csv").is_file():
        found = sorted(p.parent.name for p in data.glob("*/target") if p.is_dir())
        raise DataError(
            f"{site} is not a site folder with target/ and eval/labels.csv",
            hint=f"choose --task from: {', '.join(found) or '(none in ' + str(data) + ')'}",
            reason="unknown-task",
        )
    return site


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """OUT's runs are comparable only if made alike: refuse to mix settings in one OUT."""
    path = out / "settings.json"
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
        if changed:
            raise ConfigError(
                f"{out} holds runs made with other settings (changed: {', '.join(changed)})",
                hint="use a new --out, or delete OUT/runs and OUT/settings.json to start over",
                reason="settings-changed",
            )
        return
    write_json(path, settings)


# ------------------------------------------------------------------ one run


def epoch_curve(metrics: Mapping[str, Any], before: Mapping[str, float]) -> list[dict[str, Any]]:
    """Per-epoch points: label-free signals and what the observer measured; epoch 0 is the source model."""
    points = [{"epoch": 0, **(metrics.get("source") or {}), **before}]
    for entry in metrics.get("history", []):
        point = {"epoch": entry["epoch"], **entry.get("signals", {}), **entry.get("observed", {})}
        if len(point) > 1:
            points.append(point)
    return points


def _train(
    setup: _Setup, loaded: LoadedArtifact, method: str, seed: int, report: ProgressFn, observe: Observer
) -> tuple[AdaptResult | OracleResult, int]:
    """Adapt ``loaded``'s model (or fine-tune the oracle) once; returns the result and how many images it used."""
    names = list(loaded.manifest.class_names)
    preprocess = loaded.manifest.input_spec.preprocess()
    modality = read_modality(setup.site)
    if method == ORACLE:
        labelled = truth_dataset(setup.data, setup.site.name, modality, preprocess, names)
        cfg = replace(setup.oracle, seed=seed)
        return train_oracle(loaded.model, labelled, cfg, progress=report, observer=observe), len(labelled)
    target = ImageDataset(list_images(setup.site / "target"), modality, preprocess)
    pairs = paired_dataset(setup.site, modality, preprocess)
    result = adapt(
        loaded.model,
        target,
        method,
        replace(setup.adapt, seed=seed),
        pairs=pairs,
        checkpoint_dir=_checkpoint_dir(setup, method, seed),
        resume=True,  # an interrupted adaptation continues from its last epoch
        progress=report,
        observer=observe,
    )
    return result, len(target)


def _checkpoint_dir(setup: _Setup, method: str, seed: int) -> Path:
    return setup.out / "runs" / f"{method}-seed{seed}.ckpt"


def _run_one(setup: _Setup, method: str, seed: int, progress: ProgressFn | None) -> dict[str, Any]:
    """Verify the source, train once, measure; returns the run record."""
    loaded = load_artifact(setup.model, [load_public_key(setup.owner_key)])  # verified for every run, as a site does
    names = list(loaded.manifest.class_names)
    modality, preprocess = read_modality(setup.site), loaded.manifest.input_spec.preprocess()
    eval_set = labelled_dataset(setup.site / "eval" / "labels.csv", modality, preprocess, names)
    label = f"{method} seed {seed}"
    observing = [0.0]  # seconds spent measuring per-epoch accuracy, left out of the wall time

    def report(stage: str, done: int, total: int, status: str) -> None:
        if progress is not None:
            progress(f"{label}: {stage.removeprefix(method).strip()}", done, total, status)

    def observe(model: SourceClassifier) -> dict[str, float]:
        tick = time.perf_counter()
        value = accuracy(model, eval_set, names).accuracy  # measured only: training never sees it
        observing[0] += time.perf_counter() - tick
        return {"eval_accuracy": value}

    started, before = datetime.now(UTC), observe(loaded.model)
    observing[0] = 0.0  # the source's accuracy is measured before the clock starts, not during training
    resumed = (_checkpoint_dir(setup, method, seed) / "latest.json").is_file()  # `seconds`: this process's part
    tick = time.perf_counter()
    result, images = _train(setup, loaded, method, seed, report, observe)
    seconds = time.perf_counter() - tick - observing[0]
    tick = time.perf_counter()
    score = accuracy(result.model, eval_set, names)
    shutil.rmtree(_checkpoint_dir(setup, method, seed), ignore_errors=True)
    logger.info("%s: accuracy %.4f in %.1f s", label, score.accuracy, seconds)
    return {
        "method": method,
        "seed": seed,
        "accuracy": score.accuracy,
        "per_class": score.per_class,
        "eval_images": score.count,
        "target_images": images,
        "seconds": round(seconds, 3),
        "eval_seconds": round(time.perf_counter() - tick + observing[0], 3),
        "resumed": resumed,
        "label_free": result.metrics.get("final"),  # the kept epoch's label-free signals (none for the oracle)
        "selected_epoch": result.metrics.get("selected_epoch"),
        "guard": result.metrics.get("guard"),
        "curve": epoch_curve(result.metrics, before),
        "history": result.metrics.get("history", []),
        "started": started.isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------ the whole table


def run_benchmark(plan: BenchmarkPlan, *, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run every missing method × seed of ``plan``, then write results.json, results.md and plots; returns the results."""
    methods = check_methods(default_methods() if plan.methods is None else plan.methods)
    if not plan.seeds:
        raise ConfigError("no seeds to run", hint="pass --seeds 1 or more")
    adapt_cfg, oracle_cfg = resolve_configs(plan)  # bad --set values fail before any work
    plan.out.mkdir(parents=True, exist_ok=True)
    data = _prepare_data(plan, progress)
    site = site_folder(data, plan.task)
    model, owner_key = _prepare_model(plan, data, progress)
    source = load_artifact(model, [load_public_key(owner_key)])
    setup = _Setup(plan.out, data, site, model, owner_key, adapt_cfg, oracle_cfg)
    settings = {
        "task": plan.task,
        "data": str(data.resolve()),
        "source_sha256": source.manifest.weights.sha256,
        "adapt": to_dict(adapt_cfg),
        "oracle": {k: v for k, v in to_dict(oracle_cfg).items() if k != "model"},  # the oracle keeps the source's
    }
    _check_settings(plan.out, settings)
    runs, skipped = [], 0
    for seed in plan.seeds:
        for method in methods:
            path = plan.out / "runs" / f"{method}-seed{seed}.json"
            if path.is_file():
                runs.append(json.loads(path.read_text(encoding="utf-8")))
                skipped += 1
                logger.info("%s seed %d: finished earlier, reusing %s", method, seed, path)
                continue
            record = _run_one(setup, method, seed, progress)
            write_json(path, record)
            runs.append(record)
    results = {
        "command": command_line(plan, methods),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "task": plan.task,
        "site": str(site),
        "methods": list(methods),
        "seeds": list(plan.seeds),
        "settings": settings,
        "skipped": skipped,
        "summary": [asdict(row) for row in summarise(runs, methods)],
        "runs": runs,
    }
    plots = write_plots(results, plan.out)
    results["files"] = {
        "results_json": str(plan.out / "results.json"),
        "results_md": str(plan.out / "results.md"),
        "runs": str(plan.out / "runs"),
        "plots": [str(p) for p in plots],
    }
    write_json(plan.out / "results.json", results)
    (plan.out / "results.md").write_text(markdown(results), encoding="utf-8")
    return results
