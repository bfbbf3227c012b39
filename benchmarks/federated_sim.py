"""``xkt-bench federated``: N virtual sites adapt together on Flower's simulation engine.

The owner's ServerApp and the sites' ClientApp are the product's own
(:mod:`xkt.server.federated_server`, :mod:`xkt.client.federated_client`); only the transport
differs from ``xkt-server federate``.  Flower's simulation SuperLink runs each virtual site as
a Ray actor on this host, so a federated benchmark needs no SuperNodes, site keys, TLS or
proxy.  What the simulation needs from us (:func:`run_simulation`):

1. the virtual sites' folders, ``WORK/sites/site-K/{site,out}`` (where
   ``SiteSetup.from_context`` looks): a copy of the data set's ``<task>-siteK`` folder with a
   ``[policy]`` that allows this owner key and method (the site still checks it every round),
   and an empty output folder;
2. the run config (:class:`~xkt.server.federated_server.FederationConfig`, with
   ``simulation-root`` pointing at ``WORK/sites`` and every site required in every round);
3. a simulation SuperLink on 127.0.0.1 whose Ray instance is private to the run (its own
   temp folder), and ``flwr run`` with ``num-supernodes = N``;
4. every process stopped at the end, Ray's daemons included (:meth:`SuperLink.stop`).

``WORK`` after a run::

    data/, keys/, model/   generated / trained when no data set or model is given (reused)
    sites/site-K/site/     the site's data and policy;   sites/site-K/out/  rounds.jsonl, adapted/, report.json
    out/rounds.json        the owner's round table;      out/global-shared.safetensors
    link/                  the SuperLink's FLWR_HOME and logs;   ray/  Ray's sockets and logs
    run-config.toml, flwr-run.log, result.json
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xkt.benchmarks.run import train_source_model, write_json
from xkt.server.federated_server import FederationConfig
from xkt.server.federation_runner import stream_run, write_run_config
from xkt.server.source_training import ModelConfig, SourceTrainConfig
from xkt.server.superlink import SimulationLinkConfig, SuperLink
from xkt.shared.config import toml_value
from xkt.shared.errors import ConfigError, DataError, TransportError
from xkt.shared.shapes_benchmark import ShapesConfig, write_shapes_benchmark
from xkt.shared.signing import fingerprint, generate_keypair, load_public_key
from xkt.shared.site_policy import load_policy

logger = logging.getLogger("xkt")

LineFn = Callable[[str], None]
ProgressFn = Callable[[str, int, int, str], None]

SITE_METRICS = ("num_examples", "accuracy", "im", "mean_entropy", "train_seconds")
"""What a virtual site lets leave: the round table's columns (accuracy is a benchmark's measurement)."""
MAX_UPLOAD_BYTES = 1 << 30  # virtual sites on one host: no reason to cap the update below the model's size
UNIX_PATH_MAX = 107
RAY_SOCKET_SUFFIX = len("/ray/session_2026-11-21_15-57-04_745244_4194304/sockets/plasma_store")
JOIN_TIMEOUT_S = 120.0  # virtual sites exist from the start; this only bounds a broken engine
ROUND_TIMEOUT_S = 3600.0

BENCH_SOURCE = SourceTrainConfig(
    epochs=16, model=ModelConfig(name="resnet_tiny", kwargs={"width": 32, "stem": "imagenet"})
)
"""The source model ``xkt-bench federated`` trains when none is given: the demo's quick profile (README)."""


@dataclass(frozen=True)
class SimulationPlan:
    """One simulated federation: which data, model and sites, and how the rounds go."""

    work: Path  # everything the run writes goes here
    data: Path  # a data set with <task>-site0 ... <task>-site{N-1} (<task> when N is 1)
    model: Path  # the signed source artifact
    owner_key: Path  # the public key it is signed with
    sites: int
    task: str = "depth"
    method: str = "shot"
    rounds: int = 3
    local_epochs: int = 2
    seed: int = 0
    overrides: tuple[str, ...] = ()  # AdaptConfig KEY=VALUE for every site
    cpus_per_site: int = 1  # Ray runs (cores // this) sites at once; each trains on one torch thread
    round_timeout_s: float = ROUND_TIMEOUT_S

    @property
    def sites_root(self) -> Path:
        return self.work / "sites"

    def federation(self) -> FederationConfig:
        """The run config: every site in every round (no quorum shortcut), bounded waits."""
        return FederationConfig(
            model_dir=str(self.model.resolve()),
            owner_key=str(self.owner_key.resolve()),
            out_dir=str((self.work / "out").resolve()),
            rounds=self.rounds,
            min_sites=self.sites,
            method=self.method,
            local_epochs=self.local_epochs,
            seed=self.seed,
            straggler_timeout_s=self.round_timeout_s,  # also bounds the final publish step
            round_timeout_s=self.round_timeout_s,
            join_timeout_s=JOIN_TIMEOUT_S,
            rejoin_grace_s=0.0,
            overrides=";".join(self.overrides),
            simulation_root=str(self.sites_root.resolve()),
        )

    def slots(self) -> int:
        """How many virtual sites Ray trains at once: its CPUs (all of this host's) over each site's share."""
        return max(1, min(self.sites, (os.cpu_count() or 1) // self.cpus_per_site))

    def timeout_s(self) -> float:
        """The whole ``flwr run``: every round and the publish step at their limits, plus start-up."""
        return (self.rounds + 1) * (JOIN_TIMEOUT_S + self.round_timeout_s) + 300.0


# ------------------------------------------------------------------ pure helpers


def site_data_folder(data: Path, task: str, index: int, count: int) -> Path:
    """The data set's folder for virtual site ``index`` of ``count``, as ``xkt-bench data --sites`` names it."""
    folder = data / (task if count == 1 else f"{task}-site{index}")
    if not (folder / "target").is_dir() or not (folder / "eval" / "labels.csv").is_file():
        raise DataError(
            f"{folder} is not a site folder with target/ and eval/labels.csv",
            hint=f"generate the data with `xkt-bench data --sites {count}`, or pass the matching --sites and --task",
            reason="unknown-task",
        )
    return folder


def policy_block(owner_fingerprint: str, methods: Sequence[str]) -> str:
    """The ``[policy]`` table a virtual site appends to its ``site.toml``: this owner, these methods, uploads on."""
    lines = [
        "",
        "# Added by xkt-bench federated: a virtual site of Flower's simulation engine.",
        "[policy]",
        f"allowed_owner_keys = {toml_value([owner_fingerprint])}",
        f"allowed_methods = {toml_value(list(methods))}",
        f"max_upload_bytes = {MAX_UPLOAD_BYTES}",
        f"metrics = {toml_value(list(SITE_METRICS))}",
    ]
    return "\n".join(lines) + "\n"


def federation_config_args(sites: int, cpus_per_site: int) -> tuple[str, ...]:
    """``flwr run`` arguments that size the simulated federation (Flower's ``SimulationConfig`` fields)."""
    return ("--federation-config", f"num-supernodes={sites} client-resources-num-cpus={cpus_per_site}")


def round_timing(rounds: Sequence[Mapping[str, Any]], slots: int = 1) -> dict[str, float]:
    """Mean round time, the slowest local training, and the share of round time spent outside local training.

    ``local_seconds_max`` is the slowest site's training in a round; everything else in the
    round (Flower's messaging, Ray's scheduling, loading and merging models, the per-round
    evaluation, and sites queueing for a free CPU) counts as outside.  When more sites than
    ``slots`` (sites Ray runs at once) take part, queueing alone makes a round at least
    ``sites / slots`` local trainings long, so ``outside_packed_share`` also gives the share
    outside if the sites' training (``train-seconds`` of every site) were packed perfectly
    onto the slots: 1 − Σ train-seconds / (slots × Σ round seconds).
    """
    seconds = [float(r["seconds"]) for r in rounds]
    local = [float(r["local_seconds_max"]) for r in rounds]
    trained = [sum(float(m.get("train-seconds", 0.0)) for m in r.get("metrics", {}).values()) for r in rounds]
    total = sum(seconds)
    return {
        "round_seconds_mean": statistics.fmean(seconds) if seconds else 0.0,
        "local_seconds_max_mean": statistics.fmean(local) if local else 0.0,
        "outside_local_share": 1.0 - sum(local) / total if total > 0 else 0.0,
        "outside_packed_share": 1.0 - sum(trained) / (slots * total) if total > 0 else 0.0,
        "slots": float(slots),
    }


def class_shares(counts: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """Per-site class shares of the target images, and how far each site is from the pooled mix.

    The distance is total variation, ½ Σ_c |p_site(c) − p_pooled(c)|: 0 for IID sites, 1 for
    sites with disjoint classes.
    """
    classes = sorted({c for site in counts.values() for c in site})
    pooled_total = sum(n for site in counts.values() for n in site.values())
    pooled = {c: sum(site.get(c, 0) for site in counts.values()) / pooled_total for c in classes}
    shares = {name: {c: site.get(c, 0) / sum(site.values()) for c in classes} for name, site in counts.items()}
    distance = {name: 0.5 * sum(abs(share[c] - pooled[c]) for c in classes) for name, share in shares.items()}
    flat = [value for share in shares.values() for value in share.values()]
    return {
        "shares": shares,
        "tv_to_pooled": distance,
        "tv_mean": statistics.fmean(distance.values()) if distance else 0.0,
        "share_min": min(flat, default=0.0),
        "share_max": max(flat, default=0.0),
    }


# ------------------------------------------------------------------ inputs


def prepare_data(work: Path, shapes: ShapesConfig, progress: ProgressFn | None = None) -> Path:
    """``WORK/data``: the built-in data split across sites, rendered once and reused."""
    data = work / "data"
    wanted = {**asdict(shapes), "modalities": list(shapes.modalities)}
    if (data / "dataset.json").is_file():
        written = json.loads((data / "dataset.json").read_text(encoding="utf-8")).get("config")
        if written != wanted:  # e.g. another --skew: reusing it would silently measure the old split
            raise DataError(
                f"{data} was rendered with other settings ({_changed(written or {}, wanted)})",
                hint="use a new --out, or delete OUT/data to render it again",
                reason="settings-changed",
            )
        return data
    logger.info("generating the built-in data (%d sites, skew %s) into %s", shapes.sites, shapes.skew, data)
    report = None if progress is None else lambda split, done, total: progress(f"data {split}", done, total, "")
    write_shapes_benchmark(data, shapes, report, force=True)  # atomic: complete or absent
    return data


def _changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k}: {before.get(k)!r} → {after.get(k)!r}" for k in sorted(after) if before.get(k) != after.get(k)
    )


def prepare_model(
    work: Path, data: Path, source: SourceTrainConfig, progress: ProgressFn | None = None
) -> tuple[Path, Path]:
    """``WORK/model`` signed with a throw-away ``WORK/keys/owner.key``, trained once and reused; (model, owner.pub)."""
    keys, model = work / "keys", work / "model"
    if not (keys / "owner.key").is_file():
        generate_keypair(keys)
    if not (model / "manifest.json").is_file():
        train_source_model(data, source, keys / "owner.key", model, progress)
    return model, keys / "owner.pub"


def lay_out_sites(plan: SimulationPlan) -> list[Path]:
    """Fresh ``WORK/sites/site-K/{site,out}`` for every virtual site; returns the site folders."""
    check_site_count(plan.data, plan.sites)
    policy = policy_block(fingerprint(load_public_key(plan.owner_key)), [plan.method])
    shutil.rmtree(plan.sites_root, ignore_errors=True)  # a previous run's local state must not leak in
    folders = []
    for index in range(plan.sites):
        home = plan.sites_root / f"site-{index}"
        shutil.copytree(site_data_folder(plan.data, plan.task, index, plan.sites), home / "site")
        with (home / "site" / "site.toml").open("a", encoding="utf-8") as handle:
            handle.write(policy)
        load_policy(home / "site")  # a malformed block is refused here, not in round 1
        (home / "out").mkdir()
        folders.append(home / "site")
    return folders


def check_site_count(data: Path, sites: int) -> None:
    """Refuse a data set split across another number of sites (its extra sites would silently be left out)."""
    summary = data / "dataset.json"
    written = json.loads(summary.read_text(encoding="utf-8")).get("sites") if summary.is_file() else None
    if written is not None and int(written) != sites:
        raise DataError(
            f"{data} is split across {written} sites, not {sites}",
            hint=f"pass --sites {written}, or generate the data with `xkt-bench data --sites {sites}`",
            reason="site-count-mismatch",
        )


# ------------------------------------------------------------------ the run


@contextmanager
def ray_temp_dir(work: Path) -> Iterator[Path]:
    """Ray's temp folder: ``WORK/ray`` when its socket paths fit in 107 bytes, else a short one in /tmp.

    The short one is linked from ``WORK/ray`` while the run lasts and removed after it.
    """
    local = (work / "ray").resolve()
    if len(str(local)) + RAY_SOCKET_SUFFIX <= UNIX_PATH_MAX and not (work / "ray").is_symlink():
        local.mkdir(parents=True, exist_ok=True)
        yield local
        return
    short = Path(tempfile.mkdtemp(prefix="xkt-ray-", dir="/tmp" if Path("/tmp").is_dir() else None))
    link = work / "ray"
    link.unlink(missing_ok=True)
    link.symlink_to(short, target_is_directory=True)
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)
        link.unlink(missing_ok=True)


def run_simulation(plan: SimulationPlan, on_line: LineFn | None = None) -> dict[str, Any]:
    """Lay out the sites, run every round on the simulation engine, stop everything; the result record."""
    if importlib.util.find_spec("ray") is None:  # Flower would fail later, inside the run, with exit code 701
        raise ConfigError(
            "Flower's simulation engine needs Ray, which is not installed",
            hint="pip install 'flwr[simulation]==1.41.*' (make install does: it is in the dev extra)",
            reason="missing-ray",
        )
    lay_out_sites(plan)
    shutil.rmtree(plan.work / "out", ignore_errors=True)
    shutil.rmtree(plan.work / "link", ignore_errors=True)
    run_config = write_run_config(plan.work / "run-config.toml", plan.federation())
    started = time.monotonic()
    with (plan.work / "flwr-run.log").open("w", encoding="utf-8") as log, ray_temp_dir(plan.work) as ray_dir:

        def line(text: str) -> None:
            log.write(text + "\n")
            log.flush()
            if on_line is not None:
                on_line(text)

        link_cfg = SimulationLinkConfig(work=plan.work / "link", ray_temp=ray_dir)
        with SuperLink(link_cfg) as link:
            stream_run(
                link.home, run_config, plan.timeout_s(), line, federation_config_args(plan.sites, plan.cpus_per_site)
            )
    result = collect_results(plan, time.monotonic() - started)
    write_json(plan.work / "result.json", result)
    return result


def collect_results(plan: SimulationPlan, seconds: float) -> dict[str, Any]:
    """rounds.json, each virtual site's report and round accuracies, timing and the sites' class shares."""
    rounds_file = plan.work / "out" / "rounds.json"
    if not rounds_file.is_file():
        raise TransportError(
            "the simulated run wrote no rounds.json",
            hint=f"see {plan.work / 'flwr-run.log'} and {plan.work / 'link' / 'superlink.log'}",
            reason="run-failed",
        )
    rounds = json.loads(rounds_file.read_text(encoding="utf-8"))["rounds"]
    if len(rounds) != plan.rounds:  # the ServerApp stopped early (it writes rounds.json after every round)
        raise TransportError(
            f"the simulated run finished {len(rounds)} of {plan.rounds} rounds",
            hint=f"see {plan.work / 'flwr-run.log'} and {plan.work / 'link' / 'superlink.log'}",
            reason="run-failed",
        )
    sites = [_site_result(plan, index, rounds) for index in range(plan.sites)]
    summary = plan.data / "dataset.json"
    counts = (
        json.loads(summary.read_text(encoding="utf-8")).get("site_target_class_counts") if summary.is_file() else None
    )
    return {
        "ok": True,
        "method": plan.method,
        "sites": sites,
        "rounds": rounds,
        "timing": {**round_timing(rounds, plan.slots()), "run_seconds": round(seconds, 1)},
        "accuracy_mean": _mean_or_none([s["accuracy"] for s in sites]),
        "class_shares": class_shares(counts) if counts else None,
        "plan": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(plan).items()},
    }


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean, or None when any site reported no accuracy (a site without eval labels)."""
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known and len(known) == len(values) else None


def _site_result(plan: SimulationPlan, index: int, rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out = plan.sites_root / f"site-{index}" / "out"
    report_file, node_file = out / "report.json", out / "node.json"
    if not report_file.is_file() or not node_file.is_file():
        raise TransportError(
            f"virtual site {index} published no report",
            hint=f"see {plan.work / 'flwr-run.log'}; the site's files are in {out}",
            reason="site-failed",
        )
    report = json.loads(report_file.read_text(encoding="utf-8"))
    node = str(json.loads(node_file.read_text(encoding="utf-8"))["node_id"])
    per_round = [r["metrics"].get(node, {}).get("accuracy") for r in rounds]
    return {
        "site": index,
        "node_id": node,
        "accuracy": report["accuracy_after"],
        "accuracy_per_round": per_round,
        "replied_rounds": [r["round"] for r in rounds if node in r["metrics"]],
        "report": str(report_file),
        "adapted": str(out / "adapted"),
    }
