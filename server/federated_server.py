"""The owner's side of a federated run: rounds with a quorum, FedAvg over shared parameters, a round table.

Flower's built-in strategies wait forever for their minimum number of nodes and block a
round on a lost site (../shared/reference/flower.md §7, §8), so this ServerApp drives the
rounds itself through Flower's ``Grid``:

1. wait (bounded by ``join_timeout_s``) until ``min_sites`` SuperNodes are connected;
2. send every connected site this round's settings and the current shared parameters (and
   the signed source artifact, once per site); each message lives only as long as the
   round may (its TTL), so a site that comes back late never works on a stale round;
3. collect replies until every site answered, or until ``straggler_timeout_s`` has passed
   with at least ``min_sites`` good replies (a k-of-n quorum): a lost site never stalls a
   round, and it simply receives the next round's message when it is back;
4. average the replies' shared parameters weighted by their ``num-examples`` (FedAvg; the
   BatchNorm statistics never travel, so each site keeps its own: FedBN);
5. after the last round, send every site the final parameters (``evaluate.finish``) so it
   publishes its adapted model and report.

The round table (per site: examples, label-free signals, accuracy where the site lets it
leave, seconds) goes to stdout, which ``flwr log`` and ``xkt-server federate`` show, and to
``OUT/rounds.json`` on the owner's host.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy as safetensors_numpy
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import Scalar
from flwr.serverapp import Grid, ServerApp
from safetensors import safe_open

from xkt.server.secure_aggregation import SecureRound, secure_mean
from xkt.shared.artifact import load_artifact
from xkt.shared.config import from_mapping
from xkt.shared.errors import ConfigError
from xkt.shared.federated_wire import (
    ADAPT,
    ARTIFACT,
    CONFIG,
    FINISH,
    METRICS,
    SHARED,
    artifact_payload,
    from_array_record,
    to_array_record,
)
from xkt.shared.federation import Arrays, shared_names, split_state, weighted_average
from xkt.shared.files import replace_file
from xkt.shared.signing import load_public_key

logger = logging.getLogger("xkt")
app = ServerApp()
POLL_S = 1.0
CHECKPOINT = "round-checkpoint.safetensors"  # OUT/: the global parameters after the last completed round


@dataclass(frozen=True)
class FederationConfig:
    """One federated run (Flower's run config; hyphens in keys become underscores)."""

    model_dir: str  # the signed source artifact on the owner's host (absolute path)
    owner_key: str  # its public key, to verify it before sending it anywhere
    out_dir: str  # where rounds.json and the final shared parameters go
    rounds: int = 3
    min_sites: int = 2
    method: str = "shot"
    local_epochs: int = 2
    seed: int = 0
    straggler_timeout_s: float = 300.0  # after this, a round closes once min_sites have answered
    round_timeout_s: float = 3600.0  # a round with fewer than min_sites answers by then fails the run
    join_timeout_s: float = 600.0  # how long to wait for min_sites connected sites before a round
    rejoin_grace_s: float = 15.0  # before a round, how long to wait for sites seen earlier that are not back yet
    dp_clip_norm: float = 0.0  # > 0: sites clip their update to this L2 norm ...
    dp_noise_multiplier: float = 0.0  # ... and add Gaussian noise of std multiplier × clip norm
    keep_bn_affine_local: bool = False  # full FedBN: BN weight/bias stay local too
    overrides: str = ""  # adaptation config for the sites, "key=value;key=value"
    secure_aggregation: bool = False  # SecAgg+: the owner learns only the weighted sum of the updates
    secagg_clipping_range: float = 8.0  # |weighted update| bound of SecAgg+'s quantisation; beyond it a site refuses
    secagg_reconstruction_threshold: float = 0.67  # share of the sites' key shares needed to unmask (dropout tolerance)
    simulation_root: str = ""  # only `xkt-bench federated`: where its virtual sites' folders are
    resume: bool = False  # continue after the last round completed in out-dir (after a SuperLink restart)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> FederationConfig:
        """Typed and checked: Flower passes --run-config values through unchecked."""
        cfg = from_mapping(cls, {k.replace("-", "_"): v for k, v in run_config.items()}, where="run config")
        if cfg.rounds < 1 or cfg.min_sites < 1 or cfg.local_epochs < 1:
            raise ConfigError(
                "rounds, min-sites and local-epochs must be >= 1", hint="fix --rounds/--min-sites/--local-epochs"
            )
        if not cfg.secagg_clipping_range > 0 or not 0 < cfg.secagg_reconstruction_threshold <= 1:
            raise ConfigError(
                f"secagg-clipping-range {cfg.secagg_clipping_range} must be > 0 and "
                f"secagg-reconstruction-threshold {cfg.secagg_reconstruction_threshold} in (0, 1]",
                hint="fix --secagg-clip/--secagg-threshold",
            )
        return cfg


@dataclass(frozen=True)
class Shipment:
    """The verified source artifact as it travels, read from disk once per run.

    ``sha256`` is the weights digest the signed manifest names (what sites cache it under);
    ``files`` are the manifest and signature bytes, ``weights`` the weights file as uint8.
    """

    sha256: str
    files: dict[str, bytes]
    weights: ArrayRecord


@dataclass
class RoundRecord:
    """What one round did, as the round table shows it."""

    round: int
    sites: int
    replied: int
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    local_seconds_max: float = 0.0
    secure_seconds: float = 0.0  # of `seconds`: the SecAgg+ hops after local training
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # node id → metrics


# ------------------------------------------------------------------ the app


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's entry point on the owner's host."""
    cfg = FederationConfig.from_run_config(dict(context.run_config))
    run_federation(grid, cfg)


def run_federation(grid: Grid, cfg: FederationConfig) -> list[RoundRecord]:
    """All rounds, then the final parameters to every site; returns the round records."""
    model_dir, out = Path(cfg.model_dir), Path(cfg.out_dir)
    source = load_artifact(model_dir, [load_public_key(Path(cfg.owner_key))])  # never send an unverified model
    shipment = Shipment(source.manifest.weights.sha256, *artifact_payload(model_dir))  # read once, sent to each site
    names = shared_names(source.model, keep_bn_affine_local=cfg.keep_bn_affine_local)
    global_shared, _ = split_state(source.model.state_dict(), names)
    records: list[RoundRecord] = []
    if cfg.resume:
        records, global_shared = resume_state(out, shipment.sha256, global_shared)
    served: set[int] = set()  # sites that have the artifact (after a resume: resent once, sites cache by digest)
    seen = {int(node) for record in records for node in record.metrics}  # sites that took part so far
    for round_number in range(len(records) + 1, cfg.rounds + 1):
        record, replies = _round(grid, cfg, round_number, global_shared, shipment, (served, seen))
        if cfg.secure_aggregation:
            global_shared = _secure_step(grid, cfg, record, replies, global_shared, shipment.sha256)
        else:
            global_shared = weighted_average(list(replies.values()))
        records.append(record)
        _write_rounds(out, cfg, records)
        _save_checkpoint(out, round_number, shipment.sha256, global_shared)
        print(round_table(records[-1:], header=round_number == 1), flush=True)
    _finish(grid, cfg, global_shared, shipment, served)
    _save_shared(out, global_shared)
    return records


def _round(
    grid: Grid,
    cfg: FederationConfig,
    round_number: int,
    global_shared: dict[str, np.ndarray],
    shipment: Shipment,
    sites: tuple[set[int], set[int]],
) -> tuple[RoundRecord, dict[int, tuple[Arrays, float]]]:
    """Send one round to every connected site and gather a quorum of replies: node → (shared arrays, examples).

    Under secure aggregation the replies carry metrics only (the arrays are empty): the
    updates stay at the sites until SecAgg+ collects them masked (:func:`_secure_step`).
    """
    served, seen = sites
    nodes = wait_for_sites(grid, cfg.min_sites, cfg.join_timeout_s, expected=seen, grace_s=cfg.rejoin_grace_s)
    seen.update(nodes)
    started = time.monotonic()
    messages = [_message(cfg, ADAPT, node, round_number, global_shared, shipment, served) for node in nodes]
    ids = dict(zip(grid.push_messages(messages), nodes, strict=True))
    replies = collect_replies(grid, ids, cfg.min_sites, cfg.straggler_timeout_s, cfg.round_timeout_s, started)
    record = RoundRecord(round=round_number, sites=len(nodes), replied=0)
    updates: dict[int, tuple[Arrays, float]] = {}
    for node, reply in replies.items():
        if reply.has_error():
            record.failed.append(f"{node}: {reply.error.reason}")
            served.discard(node)  # it may have lost its copy; resend the artifact next time
            continue
        metrics = {k: float(v) for k, v in reply.content.metric_records[METRICS].items()}  # type: ignore[arg-type]
        arrays = {} if cfg.secure_aggregation else from_array_record(reply.content.array_records[SHARED])
        updates[node] = (arrays, metrics["num-examples"])
        record.metrics[str(node)] = metrics
        record.local_seconds_max = max(record.local_seconds_max, metrics.get("train-seconds", 0.0))
    record.failed += [f"{node}: no reply" for node in nodes if node not in replies]
    record.replied, record.seconds = len(updates), time.monotonic() - started
    if len(updates) < cfg.min_sites:
        raise ConfigError(
            f"round {round_number}: {len(updates)} of {len(nodes)} sites replied, fewer than min-sites {cfg.min_sites}",
            hint="see the sites' SuperNode logs; lower --min-sites or raise --round-timeout",
            reason="quorum-lost",
        )
    return record, updates


def wait_for_sites(
    grid: Grid, minimum: int, timeout_s: float, *, expected: set[int] | None = None, grace_s: float = 0.0
) -> list[int]:
    """The connected node ids, once there are at least ``minimum`` (bounded wait).

    Sites seen in earlier rounds (``expected``) that are not connected get up to ``grace_s``
    more: a site restarting after a crash is usually back within seconds, and would otherwise
    miss the round that starts the moment its lost message was written off.
    """
    deadline = time.monotonic() + timeout_s
    grace_end = time.monotonic() + grace_s
    while True:
        nodes = sorted(grid.get_node_ids())
        missing = (expected or set()) - set(nodes)
        if len(nodes) >= minimum and (not missing or time.monotonic() >= grace_end):
            return nodes
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"only {len(nodes)} of the required {minimum} sites connected within {timeout_s:.0f} s",
                hint="start the sites with `xkt-client join`, or lower --min-sites",
                reason="too-few-sites",
            )
        time.sleep(POLL_S)


def collect_replies(
    grid: Grid, ids: dict[str, int], quorum: int, straggler_s: float, timeout_s: float, started: float
) -> dict[int, Message]:
    """Replies by node: every one, or a quorum of good ones once the straggler timeout passed."""
    replies: dict[int, Message] = {}
    while len(replies) < len(ids):
        pending = [message_id for message_id, node in ids.items() if node not in replies]
        for reply in grid.pull_messages(pending):
            replies[ids[reply.metadata.reply_to_message_id]] = reply
        good = sum(not reply.has_error() for reply in replies.values())
        elapsed = time.monotonic() - started
        if (good >= quorum and elapsed >= straggler_s) or elapsed >= timeout_s:
            break
        if len(replies) < len(ids):
            time.sleep(POLL_S)
    return replies


def _message(
    cfg: FederationConfig,
    kind: str,
    node: int,
    round_number: int,
    shared: dict[str, np.ndarray],
    shipment: Shipment,
    served: set[int],
) -> Message:
    """One site's message: settings, shared parameters, and the artifact if the site has not had it."""
    settings: dict[str, Any] = round_settings(cfg, round_number, shipment.sha256)
    content = RecordDict({SHARED: to_array_record(shared)})
    if node not in served:
        settings |= shipment.files
        content[ARTIFACT] = shipment.weights
        served.add(node)
    content[CONFIG] = ConfigRecord(settings)
    ttl = max(60.0, cfg.round_timeout_s)  # a message never outlives its round by much
    return Message(content, dst_node_id=node, message_type=kind, ttl=ttl)


def round_settings(cfg: FederationConfig, round_number: int, artifact_sha256: str) -> dict[str, Scalar]:
    """What a site is asked to do this round (its ConfigRecord; read by ``RoundSettings`` at the site)."""
    return {
        "round": round_number,
        "method": cfg.method,
        "local-epochs": cfg.local_epochs,
        "seed": cfg.seed,
        "artifact-sha256": artifact_sha256,
        "dp-clip-norm": cfg.dp_clip_norm,
        "dp-noise-multiplier": cfg.dp_noise_multiplier,
        "keep-bn-affine-local": cfg.keep_bn_affine_local,
        "overrides": cfg.overrides,
        "secure-aggregation": cfg.secure_aggregation,
        "secagg-clipping-range": cfg.secagg_clipping_range,
    }


def _secure_step(
    grid: Grid,
    cfg: FederationConfig,
    record: RoundRecord,
    replies: dict[int, tuple[Arrays, float]],
    global_shared: Arrays,
    artifact_sha256: str,
) -> Arrays:
    """The round's new global parameters from SecAgg+ over the sites that replied (global + mean update)."""
    started = time.monotonic()
    request = SecureRound(
        round=record.round,
        examples={node: examples for node, (_, examples) in replies.items()},
        settings=round_settings(cfg, record.round, artifact_sha256),
        clipping_range=cfg.secagg_clipping_range,
        reconstruction_threshold=cfg.secagg_reconstruction_threshold,
        timeout_s=cfg.straggler_timeout_s,
    )
    mean_update = secure_mean(grid, request, {name: array.shape for name, array in global_shared.items()})
    record.secure_seconds = time.monotonic() - started
    record.seconds += record.secure_seconds
    return {name: (array + mean_update[name]).astype(np.float32) for name, array in global_shared.items()}


def _finish(
    grid: Grid, cfg: FederationConfig, shared: dict[str, np.ndarray], shipment: Shipment, served: set[int]
) -> None:
    """Send the final parameters; each site publishes its adapted model (bounded wait, best effort)."""
    nodes = sorted(grid.get_node_ids())
    final_round = cfg.rounds + 1
    messages = [_message(cfg, FINISH, node, final_round, shared, shipment, served) for node in nodes]
    ids = dict(zip(grid.push_messages(messages), nodes, strict=True))
    replies = collect_replies(grid, ids, len(nodes), cfg.straggler_timeout_s, cfg.straggler_timeout_s, time.monotonic())
    done = sum(not reply.has_error() for reply in replies.values())
    print(f"final: {done} of {len(nodes)} sites published their adapted model", flush=True)


# ------------------------------------------------------------------ outputs


def round_table(records: Iterable[RoundRecord], *, header: bool = True) -> str:
    """The round table as plain text lines (one per site and round)."""
    lines = ["round | site | examples | mean entropy | IM | accuracy | local s | round s"] if header else []
    for record in records:
        for node, metrics in sorted(record.metrics.items()):
            accuracy = metrics.get("accuracy")
            lines.append(
                f"{record.round} | {node} | {metrics.get('num-examples', 0):.0f} | "
                f"{_fmt(metrics.get('mean-entropy'))} | {_fmt(metrics.get('im'))} | "
                f"{'-' if accuracy is None else f'{100 * accuracy:.1f} %'} | "
                f"{metrics.get('train-seconds', 0.0):.1f} | {record.seconds:.1f}"
            )
        lines += [f"{record.round} | {failure} | (no update this round)" for failure in record.failed]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _write_rounds(out: Path, cfg: FederationConfig, records: list[RoundRecord]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"config": asdict(cfg), "rounds": [asdict(r) for r in records]}
    replace_file(out / "rounds.json", (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def _save_checkpoint(out: Path, round_number: int, artifact_sha256: str, shared: Arrays) -> None:
    """The global parameters after ``round_number``: what a resumed run continues from."""
    metadata = {"round": str(round_number), "artifact_sha256": artifact_sha256}
    replace_file(out / CHECKPOINT, safetensors_numpy.save(shared, metadata=metadata))


def resume_state(out: Path, artifact_sha256: str, start: Arrays) -> tuple[list[RoundRecord], Arrays]:
    """(completed rounds, global parameters after them) from ``out``; ``([], start)`` when no round completed.

    The checkpoint must belong to the same source model and fit its shared layout, and
    rounds.json must cover its round; anything else is refused rather than mixed in.
    """
    path = out / CHECKPOINT
    if not path.is_file():
        return [], start
    with safe_open(str(path), framework="numpy") as handle:
        metadata = dict(handle.metadata() or {})
    shared = safetensors_numpy.load_file(path)
    layout_fits = set(shared) == set(start) and all(shared[k].shape == start[k].shape for k in start)
    rounds_file = out / "rounds.json"
    history = json.loads(rounds_file.read_text(encoding="utf-8"))["rounds"] if rounds_file.is_file() else []
    completed = int(metadata.get("round", "0"))
    if metadata.get("artifact_sha256") != artifact_sha256 or not layout_fits or len(history) < completed:
        raise ConfigError(
            f"{path} does not continue this run (another model, layout or round history)",
            hint="start a new federation with another --out, or without resuming",
            reason="bad-resume",
        )
    return [RoundRecord(**record) for record in history[:completed]], {k: shared[k] for k in start}


def _save_shared(out: Path, shared: dict[str, np.ndarray]) -> None:
    """The final shared parameters as safetensors (no BN statistics: those stay at the sites)."""
    replace_file(out / "global-shared.safetensors", safetensors_numpy.save(shared))
