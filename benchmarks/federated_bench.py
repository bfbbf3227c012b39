"""``xkt-bench federated-table``: does federating non-IID sites beat each site adapting alone?

One source model is trained first, the way ``xkt-bench run`` trains its one model for all
seeds (the owner's RGB data and recipe of the demo's quick profile).  Then per seed, the sites'
data is rendered and split across ``sites`` with class skew (each site sees a different class
mix, see :func:`~xkt.benchmarks.federated_sim.class_shares`), and for each method four arms
are measured on every site's own labelled ``eval/`` images:

* ``source-only``: the source model as it is (once per seed, whatever the method);
* ``alone``: each site adapts on its own target images (and pairs) with
  :func:`xkt.client.trainer.adapt`, for ``rounds × local_epochs`` epochs;
* ``federated``: the sites adapt together on Flower's simulation engine, ``rounds`` rounds of
  ``local_epochs`` each, with the product's ServerApp and ClientApp
  (:mod:`xkt.benchmarks.federated_sim`); each site's accuracy comes from its report;
* ``pooled``: one model adapted on every site's target images (and pairs) at one place, for
  ``rounds × local_epochs`` epochs: what sharing the data would give, the ceiling federation
  approximates without moving images.

``OUT/`` after a run::

    source/data, source/keys, source/model   the owner's data and the signed source model (reused)
    seed-S/data                              the seed's site data (its owner split is a token 2 images per class)
    seed-S/fed-METHOD/                       the simulation's work folder (sites, logs, rounds.json;
                                             finished rounds' checkpoints are removed)
    runs/seedS-ARM.json                      one finished arm each (resumable), written atomically
    settings.json, results.json, results.md
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from xkt.benchmarks.federated_sim import (
    BENCH_SOURCE,
    SimulationPlan,
    class_shares,
    prepare_data,
    prepare_model,
    run_simulation,
    site_data_folder,
)
from xkt.benchmarks.federated_table import ALONE, ARM_ORDER, SOURCE_ONLY, markdown, summarise_arms
from xkt.benchmarks.run import _check_settings, write_json
from xkt.client.trainer import AdaptConfig, adapt
from xkt.server.source_training import SourceTrainConfig
from xkt.shared.artifact import LoadedArtifact, load_artifact
from xkt.shared.config import load_config, to_dict
from xkt.shared.data import (
    ImageDataset,
    PairedDataset,
    labelled_dataset,
    list_images,
    paired_dataset,
    read_modality,
)
from xkt.shared.errors import ConfigError
from xkt.shared.evaluation import accuracy
from xkt.shared.models import SourceClassifier
from xkt.shared.shapes_benchmark import ShapesConfig
from xkt.shared.signing import load_public_key

logger = logging.getLogger("xkt")

ProgressFn = Callable[[str, int, int, str], None]
FEDERATED, POOLED = "federated", "pooled"
ARMS = ARM_ORDER  # per method; source-only is once per seed
OWNER_TOKEN_PER_CLASS = 2  # the smallest owner split the generator writes


@dataclass(frozen=True)
class FederatedTablePlan:
    """What ``xkt-bench federated-table`` measures; sizes chosen so a 3-seed table fits ~25 min on 2 idle cores."""

    out: Path = Path(".cache/federated-table")
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("shot",)
    sites: int = 4
    rounds: int = 4
    local_epochs: int = 2
    skew: float = 1.0  # Dirichlet(1) class shares per site: clearly non-IID (see class_shares in results)
    task: str = "depth"
    shapes: ShapesConfig = field(default_factory=lambda: ShapesConfig(per_class=1000, site_per_class=200))
    source: SourceTrainConfig = BENCH_SOURCE
    overrides: tuple[str, ...] = ()  # AdaptConfig KEY=VALUE, for every arm and site

    def source_shapes(self) -> ShapesConfig:
        """The owner's data for the one source model (its site part is a token 2 images per class)."""
        return replace(self.shapes, seed=self.source.seed, site_per_class=2, modalities=(self.task,))

    def shapes_for(self, seed: int) -> ShapesConfig:
        """The seed's site data: only the task's modality, split across the sites.

        Its owner split is never used (the source model is trained once), so only a token
        ``OWNER_TOKEN_PER_CLASS`` images per class are rendered.
        """
        return replace(
            self.shapes,
            seed=seed,
            per_class=OWNER_TOKEN_PER_CLASS,
            sites=self.sites,
            skew=self.skew,
            modalities=(self.task,),
        )

    def adapt_config(self, seed: int) -> AdaptConfig:
        """alone and pooled: as many epochs as a federated site trains over all rounds."""
        epochs = [f"epochs={self.rounds * self.local_epochs}", f"seed={seed}"]
        return load_config(AdaptConfig, overrides=[*self.overrides, *epochs])

    def command_line(self) -> str:
        args = ["xkt-bench", "federated-table", "--out", str(self.out), "--seeds", str(len(self.seeds))]
        args += ["--methods", ",".join(self.methods), "--sites", str(self.sites), "--rounds", str(self.rounds)]
        args += ["--local-epochs", str(self.local_epochs), "--skew", str(self.skew), "--task", self.task]
        args += ["--size", str(self.shapes.size), "--per-class", str(self.shapes.per_class)]
        args += ["--site-per-class", str(self.shapes.site_per_class), "--source-epochs", str(self.source.epochs)]
        return shlex.join(args + [arg for o in self.overrides for arg in ("--set", o)])


DEFAULT_PLAN = FederatedTablePlan()


@dataclass(frozen=True)
class _Site:
    """One site's data as the arms read it."""

    target: ImageDataset
    pairs: PairedDataset | None
    eval: ImageDataset


@dataclass(frozen=True)
class _Seed:
    """One seed's inputs, prepared once."""

    seed: int
    root: Path
    data: Path
    model: Path
    owner_key: Path
    source: LoadedArtifact
    sites: list[_Site]


# ------------------------------------------------------------------ preparing


def _prepare_source(plan: FederatedTablePlan, progress: ProgressFn | None) -> tuple[Path, Path]:
    """The one signed source model (and its public key), trained on the owner's data once."""
    root = plan.out / "source"
    return prepare_model(root, prepare_data(root, plan.source_shapes(), progress), plan.source, progress)


def _prepare_seed(plan: FederatedTablePlan, seed: int, source: tuple[Path, Path], progress: ProgressFn | None) -> _Seed:
    root = plan.out / f"seed-{seed}"
    data = prepare_data(root, plan.shapes_for(seed), progress)
    model, owner_key = source
    loaded = load_artifact(model, [load_public_key(owner_key)])
    names, preprocess = list(loaded.manifest.class_names), loaded.manifest.input_spec.preprocess()
    sites = []
    for index in range(plan.sites):
        folder = site_data_folder(data, plan.task, index, plan.sites)
        modality = read_modality(folder)
        sites.append(
            _Site(
                target=ImageDataset(list_images(folder / "target"), modality, preprocess),
                pairs=paired_dataset(folder, modality, preprocess),
                eval=labelled_dataset(folder / "eval" / "labels.csv", modality, preprocess, names),
            )
        )
    return _Seed(seed, root, data, model, owner_key, loaded, sites)


def pooled_site(sites: Sequence[_Site]) -> _Site:
    """Every site's target images and pairs in one place (the eval set is unused: each site keeps its own)."""
    first = sites[0]
    target = ImageDataset([p for s in sites for p in s.target.paths], first.target.modality, first.target.preprocess)
    pairs = [p for s in sites if s.pairs is not None for p in s.pairs.pairs]
    paired = PairedDataset(pairs, first.target.modality, first.target.preprocess) if pairs else None
    return _Site(target=target, pairs=paired, eval=first.eval)


# ------------------------------------------------------------------ the arms


def _scores(model: SourceClassifier, seed: _Seed) -> list[dict[str, Any]]:
    """Accuracy of ``model`` on every site's own eval images."""
    names = list(seed.source.manifest.class_names)
    rows = []
    for index, site in enumerate(seed.sites):
        score = accuracy(model, site.eval, names)
        rows.append({"site": index, "accuracy": score.accuracy, "eval_images": score.count})
    return rows


def _adapt(
    plan: FederatedTablePlan, seed: _Seed, method: str, site: _Site, tag: str, progress: ProgressFn | None
) -> SourceClassifier:
    """One adaptation with the product's trainer (resumable from its per-epoch checkpoint)."""
    checkpoints = plan.out / "runs" / f"seed{seed.seed}-{method}-{tag}.ckpt"

    def report(stage: str, done: int, total: int, status: str) -> None:
        if progress is not None:
            progress(f"seed {seed.seed} {method} {tag}: {stage.removeprefix(method).strip()}", done, total, status)

    result = adapt(
        seed.source.model,
        site.target,
        method,
        plan.adapt_config(seed.seed),
        pairs=site.pairs,
        checkpoint_dir=checkpoints,
        resume=True,
        progress=report,
    )
    shutil.rmtree(checkpoints, ignore_errors=True)
    return result.model


def _run_arm(
    plan: FederatedTablePlan, seed: _Seed, method: str, arm: str, progress: ProgressFn | None
) -> dict[str, Any]:
    """One arm of one method and seed; returns its record (per-site accuracies, their mean, seconds)."""
    tick = time.perf_counter()
    extra: dict[str, Any] = {}
    if arm == SOURCE_ONLY:
        sites = _scores(seed.source.model, seed)
    elif arm == ALONE:
        sites = []
        for index, site in enumerate(seed.sites):
            model = _adapt(plan, seed, method, site, f"alone-site{index}", progress)
            sites.append(_scores(model, seed)[index])
            sites[-1]["target_images"] = len(site.target)
    elif arm == POOLED:
        sites = _scores(_adapt(plan, seed, method, pooled_site(seed.sites), "pooled", progress), seed)
    else:
        extra = _federated(plan, seed, method, progress)
        sites = extra.pop("sites")
    return {
        "seed": seed.seed,
        "method": method,
        "arm": arm,
        "sites": sites,
        "accuracy_mean": statistics.fmean(s["accuracy"] for s in sites),
        "seconds": round(time.perf_counter() - tick, 1),
        **extra,
    }


def _federated(plan: FederatedTablePlan, seed: _Seed, method: str, progress: ProgressFn | None) -> dict[str, Any]:
    """The simulation; per-site accuracies from the sites' own reports, plus round timing."""
    if progress is not None:
        progress(f"seed {seed.seed} {method} federated: {plan.rounds} rounds", 0, plan.rounds, "")
    sim = SimulationPlan(
        work=seed.root / f"fed-{method}",
        data=seed.data,
        model=seed.model,
        owner_key=seed.owner_key,
        sites=plan.sites,
        task=plan.task,
        method=method,
        rounds=plan.rounds,
        local_epochs=plan.local_epochs,
        seed=seed.seed,
        overrides=plan.overrides,
    )
    result = run_simulation(sim)
    for checkpoints in sim.sites_root.glob("site-*/out/round-*.ckpt"):  # finished rounds' resume state, 3 × model each
        shutil.rmtree(checkpoints, ignore_errors=True)
    counts = [s.eval for s in seed.sites]
    sites = [
        {
            "site": s["site"],
            "accuracy": s["accuracy"],
            "eval_images": len(counts[s["site"]]),
            "per_round": s["accuracy_per_round"],
        }
        for s in result["sites"]
    ]
    rounds = [{k: r[k] for k in ("round", "replied", "seconds", "local_seconds_max")} for r in result["rounds"]]
    for record, full in zip(rounds, result["rounds"], strict=True):
        record["train_seconds"] = {n: m.get("train-seconds") for n, m in full.get("metrics", {}).items()}
    return {"sites": sites, "timing": result["timing"], "rounds": rounds}


# ------------------------------------------------------------------ the whole table


def run_federated_table(plan: FederatedTablePlan, *, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Every missing (seed, method, arm); then results.json and results.md; returns the results."""
    if not plan.seeds or not plan.methods:
        raise ConfigError("nothing to run", hint="pass --seeds 1 or more and at least one method")
    plan.out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in _jsonable(asdict(plan)).items() if k not in ("out", "seeds", "methods")}
    settings["adapt"] = to_dict(plan.adapt_config(0))
    _check_settings(plan.out, settings)  # a resumed table must be made alike
    started, runs, shares = time.perf_counter(), [], {}
    source = _prepare_source(plan, progress)
    for seed_value in plan.seeds:
        seed = _prepare_seed(plan, seed_value, source, progress)
        counts = json.loads((seed.data / "dataset.json").read_text(encoding="utf-8"))["site_target_class_counts"]
        shares[str(seed_value)] = class_shares(counts)
        jobs = [(SOURCE_ONLY, SOURCE_ONLY)] + [(m, arm) for m in plan.methods for arm in ARMS]
        for method, arm in jobs:
            name = f"seed{seed_value}-{arm}" if arm == SOURCE_ONLY else f"seed{seed_value}-{method}-{arm}"
            path = plan.out / "runs" / f"{name}.json"
            if path.is_file():
                logger.info("%s: finished earlier, reusing %s", name, path)
                runs.append(json.loads(path.read_text(encoding="utf-8")))
                continue
            record = _run_arm(plan, seed, method, arm, progress)
            logger.info("%s: mean site accuracy %.4f in %.0f s", name, record["accuracy_mean"], record["seconds"])
            write_json(path, record)
            runs.append(record)
    results = {
        "command": plan.command_line(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_seconds_this_call": round(time.perf_counter() - started, 1),
        "machine": _machine(),
        "seeds": list(plan.seeds),
        "methods": list(plan.methods),
        "settings": settings,
        "class_shares": shares,
        "summary": [asdict(row) for row in summarise_arms(runs, plan.methods)],
        "runs": runs,
    }
    write_json(plan.out / "results.json", results)
    (plan.out / "results.md").write_text(markdown(results), encoding="utf-8")
    return results


def _machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _jsonable(value: Any) -> Any:
    """Paths as strings, tuples as lists: what settings.json compares."""
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value
