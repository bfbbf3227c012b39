"""The site's side of a federated run: one local adaptation per round, under the site's own policy.

Flower starts this ClientApp in a fresh process for every message, inside the SuperNode that
``xkt-client join`` launched; everything that must survive a round lives on disk in the
site's ``out`` folder (node config), never in the message:

    OUT/artifacts/<sha256>/   the owner's signed source model, verified when it arrived
    OUT/local.safetensors     the site's whole current model, BatchNorm statistics included
    OUT/secure-update.safetensors  under SecAgg+: this round's update, until it is collected masked
    OUT/rounds.jsonl          what each round did (kept at the site)
    OUT/adapted/, report.*    after the last round: the site-signed adapted model and its report

Order of a round, and why: the site policy (``SITE/site.toml`` ``[policy]``) is checked
first (owner key, method, app pin), before the artifact is looked at and before a single
site image is read; the artifact is verified against the owner key the site itself holds;
local training runs the same trainer as ``xkt-client adapt``; then only the shared float
parameters go back (BatchNorm statistics stay: FedBN), optionally clipped and noised, and
only the metrics the policy lets leave.  Under secure aggregation the update stays on disk
and leaves only masked, in the SecAgg+ hops that follow (:func:`secure_update`, through
Flower's ``secaggplus_mod``); the owner can unmask nothing but the sum over the sites.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy as safetensors_numpy
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xkt.client.trainer import AdaptConfig, adapt  # adapt refuses a method that needs pairs the site lacks
from xkt.shared.artifact import InputSpec, LoadedArtifact, save_artifact
from xkt.shared.config import load_config
from xkt.shared.data import ImageDataset, labelled_dataset, list_images, paired_dataset, read_modality
from xkt.shared.errors import ConfigError, PolicyError
from xkt.shared.evaluation import accuracy
from xkt.shared.federated_wire import (
    ARTIFACT,
    CONFIG,
    METRICS,
    SHARED,
    cached_artifact,
    from_array_record,
    receive_artifact,
    to_array_record,
)
from xkt.shared.federation import (
    merge_state,
    privatise_update,
    shared_layout,
    shared_names,
    split_state,
    update_bytes,
)
from xkt.shared.files import replace_file
from xkt.shared.models import SourceClassifier
from xkt.shared.signing import fingerprint, generate_keypair, load_private_key, load_public_key
from xkt.shared.site_policy import (
    SitePolicy,
    check_method,
    check_owner,
    check_request,
    check_secure_aggregation,
    check_upload,
    filter_metrics,
    load_policy,
)

logger = logging.getLogger("xkt")
app = ClientApp(mods=[secaggplus_mod])  # the mod handles only SecAgg+'s "train" hops; other messages pass through

FAB_HASH_ENV = "XKT_FAB_SHA256"  # set by the site's guard (xkt.client.flower_guard) after it checked the pin
LOCAL_STATE = "local.safetensors"
SECURE_UPDATE = "secure-update.safetensors"
SECAGG_WIRE_FACTOR = 2  # Flower's SecAgg+ masks values as int64 (mod 2^32): twice the float32 bytes
NODE_FILE = "node.json"  # read back by xkt.client.supernode.known_node_id


@dataclass(frozen=True)
class SiteSetup:
    """The site's own settings, from the SuperNode's node config (written by ``xkt-client join``)."""

    site: Path
    out: Path
    owner_key: Path
    site_key: Path
    threads: int = 0
    simulation: bool = False  # a virtual site of Flower's simulation engine (`xkt-bench federated`)

    @classmethod
    def from_context(cls, context: Context) -> SiteSetup:
        """A real site's setup from its node config; a virtual site's from the simulation's run config.

        Flower's simulation engine gives each virtual node only ``partition-id``; its folders are
        ``<simulation-root>/site-<partition-id>/{site,out}``, laid out by ``xkt-bench federated``.
        A SuperNode started by ``xkt-client join`` never has a ``partition-id``, so an owner's run
        config cannot point a real site at other folders.
        """
        node = dict(context.node_config)
        if "partition-id" not in node:
            return cls.from_node_config(node)
        root = str(context.run_config.get("simulation-root", ""))
        if not root:
            raise ConfigError(
                "a simulated node got a run config without simulation-root",
                hint="run virtual sites with `xkt-bench federated`, which lays out their folders",
                reason="bad-node-config",
            )
        home = Path(root) / f"site-{int(node['partition-id'])}"
        return cls(
            site=home / "site",
            out=home / "out",
            owner_key=Path(str(context.run_config["owner-key"])),
            site_key=home / "out" / "site-key" / "owner.key",
            threads=1,
            simulation=True,
        )

    @classmethod
    def from_node_config(cls, config: dict[str, Any]) -> SiteSetup:
        try:
            setup = cls(
                site=Path(str(config["site"])),
                out=Path(str(config["out"])),
                owner_key=Path(str(config["owner-key"])),
                site_key=Path(str(config.get("site-key", Path(str(config["out"])) / "site-key" / "owner.key"))),
                threads=int(config.get("threads", 0)),
            )
        except (KeyError, ValueError) as error:
            raise ConfigError(
                f"the SuperNode's node config lacks or mistypes {error}",
                hint="start the site with `xkt-client join`, which writes site, out and owner-key",
                reason="bad-node-config",
            ) from None
        return setup


@dataclass(frozen=True)
class RoundSettings:
    """What the owner asks of this round (its ConfigRecord)."""

    round: int
    method: str
    local_epochs: int
    seed: int
    artifact_sha256: str
    dp_clip_norm: float
    dp_noise_multiplier: float
    keep_bn_affine_local: bool
    overrides: tuple[str, ...]
    secure_aggregation: bool = False
    secagg_clipping_range: float = 8.0

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundSettings:
        overrides = str(record.get("overrides", ""))
        return cls(
            round=int(record["round"]),  # type: ignore[arg-type]
            method=str(record["method"]),
            local_epochs=int(record["local-epochs"]),  # type: ignore[arg-type]
            seed=int(record.get("seed", 0)),  # type: ignore[arg-type]
            artifact_sha256=str(record["artifact-sha256"]),
            dp_clip_norm=float(record.get("dp-clip-norm", 0.0)),  # type: ignore[arg-type]
            dp_noise_multiplier=float(record.get("dp-noise-multiplier", 0.0)),  # type: ignore[arg-type]
            keep_bn_affine_local=bool(record.get("keep-bn-affine-local", False)),
            overrides=tuple(o for o in overrides.split(";") if o.strip()),
            secure_aggregation=bool(record.get("secure-aggregation", False)),
            secagg_clipping_range=float(record.get("secagg-clipping-range", 8.0)),  # type: ignore[arg-type]
        )


# ------------------------------------------------------------------ the handlers


def adapt_round(msg: Message, context: Context) -> Message:
    """One round: policy, artifact, merge the global parameters, adapt locally, reply with the update."""
    setup = SiteSetup.from_context(context)
    _record_node(setup.out, context.node_id)
    settings = RoundSettings.from_record(msg.content.config_records[CONFIG])
    policy = _admit(setup, settings)  # before the artifact is verified and before any site data is read
    source = _source_artifact(msg, setup, settings)
    model = _current_model(setup, source, msg, settings)
    names = shared_names(model, keep_bn_affine_local=settings.keep_bn_affine_local)
    global_shared, _ = split_state(model.state_dict(), names)
    started = time.perf_counter()
    adapted, examples, signals = _train(setup, settings, source, model)
    seconds = time.perf_counter() - started
    _save_local(setup.out, adapted)
    shutil.rmtree(setup.out / f"round-{settings.round}.ckpt", ignore_errors=True)  # only a half-done round needs it
    upload = _upload(adapted, names, global_shared, settings, policy)
    metrics = {"num-examples": float(examples), "train-seconds": seconds, **signals, **_eval(setup, source, adapted)}
    local_digest = local_state_sha256(adapted, names)
    _log_round(setup.out, settings, metrics, wire_bytes(upload, settings), local_digest)
    allowed = filter_metrics(policy, {k.replace("-", "_"): v for k, v in metrics.items()})
    allowed["num-examples"] = float(examples)  # the aggregation weight always travels
    reply = RecordDict({METRICS: MetricRecord(_metric_record(allowed))})
    if settings.secure_aggregation:  # the update leaves only masked, in the SecAgg+ hops (secure_update)
        _keep_secure_update(setup.out, settings, {k: upload[k] - global_shared[k] for k in names}, examples)
    else:
        reply[SHARED] = to_array_record(upload)
    return Message(reply, reply_to=msg)


def secure_update(msg: Message, context: Context) -> Message:
    """SecAgg+'s masking hop asks for this round's update: the one kept on disk, as a legacy FitRes.

    Flower's ``secaggplus_mod`` calls this between its key exchange and its unmasking, masks
    the arrays returned here and sends only the masked vector.  The round's settings come
    again in the request, so the policy is checked once more before anything is read.
    """
    setup = SiteSetup.from_context(context)
    fit = compat.recorddict_to_fitins(msg.content, keep_input=True)
    settings = RoundSettings.from_record(ConfigRecord(dict(fit.config)))
    _admit(setup, settings)
    update, examples = _read_secure_update(setup.out, settings.round)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), examples, {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def finish(msg: Message, context: Context) -> Message:
    """After the last round: take the final global parameters, publish the adapted model and the report."""
    setup = SiteSetup.from_context(context)
    settings = RoundSettings.from_record(msg.content.config_records[CONFIG])
    policy = _admit(setup, settings)
    source = _source_artifact(msg, setup, settings)
    model = _current_model(setup, source, msg, settings)
    _save_local(setup.out, model)
    scores = _eval(setup, source, model)
    names = shared_names(model, keep_bn_affine_local=settings.keep_bn_affine_local)
    _publish(setup, source, model, settings, scores, local_state_sha256(model, names))
    allowed = filter_metrics(policy, {k.replace("-", "_"): v for k, v in scores.items()})
    allowed["num-examples"] = float(len(list_images(setup.site / "target")))
    reply = RecordDict({METRICS: MetricRecord(_metric_record(allowed))})
    return Message(reply, reply_to=msg)


# Registered without rebinding the names, so the handlers stay plain functions callable in tests.
app.train("adapt")(adapt_round)
app.train()(secure_update)  # reached only through secaggplus_mod's masking hop
app.evaluate("finish")(finish)


# ------------------------------------------------------------------ steps


def _record_node(out: Path, node_id: int) -> None:
    """Remember this site's node id, so a restarted ``xkt-client join`` can end a killed session at once."""
    out.mkdir(parents=True, exist_ok=True)
    replace_file(out / NODE_FILE, (json.dumps({"node_id": int(node_id)}) + "\n").encode("utf-8"))


def _admit(setup: SiteSetup, settings: RoundSettings) -> SitePolicy:
    """The site's policy decides first: owner key, method, and (under the guard) the app's pin."""
    policy = load_policy(setup.site)
    owner = fingerprint(load_public_key(setup.owner_key))
    fab = os.environ.get(FAB_HASH_ENV)
    if fab is not None:
        check_request(policy, owner_fingerprint=owner, method=settings.method, fab_sha256=fab)
    elif setup.simulation:  # virtual sites of Flower's simulation engine: no bundle travels, nothing to pin
        check_owner(policy, owner)
        check_method(policy, settings.method)
    else:
        raise PolicyError(
            "this ClientApp was started without the site's guard, so its app bundle is unchecked",
            hint="start the site with `xkt-client join`, which runs every bundle through the guard",
            reason="app-not-verified",
        )
    check_secure_aggregation(policy, settings.secure_aggregation)
    if settings.dp_noise_multiplier < policy.min_dp_noise_multiplier:
        check_upload(policy, 0, settings.dp_noise_multiplier)  # the DP rule refuses now, before any training
    if policy.max_upload_bytes == 0:
        check_upload(policy, 1, settings.dp_noise_multiplier)  # a site that uploads nothing cannot take part
    return policy


def _source_artifact(msg: Message, setup: SiteSetup, settings: RoundSettings) -> LoadedArtifact:
    """The owner's model: from this message (verified, then cached by digest) or from an earlier round."""
    keys = [load_public_key(setup.owner_key)]
    cache = setup.out / "artifacts"
    if ARTIFACT in msg.content.array_records:
        return receive_artifact(msg.content.config_records[CONFIG], msg.content.array_records[ARTIFACT], cache, keys)
    loaded = cached_artifact(cache, settings.artifact_sha256, keys)
    if loaded is None:
        raise ConfigError(
            f"this site has no copy of the source model {settings.artifact_sha256[:12]}",
            hint="the owner resends it next round; the site's out folder may have been cleared",
            reason="missing-artifact",
        )
    return loaded


def _current_model(setup: SiteSetup, source: LoadedArtifact, msg: Message, settings: RoundSettings) -> SourceClassifier:
    """The site's model: its saved local state (BN statistics included) with the global shared parameters."""
    model = source.model
    local = setup.out / LOCAL_STATE
    if local.is_file():
        model.load_state_dict(load_file(local), strict=True)
    if SHARED in msg.content.array_records:
        names = shared_names(model, keep_bn_affine_local=settings.keep_bn_affine_local)
        _, kept = split_state(model.state_dict(), names)
        received = from_array_record(msg.content.array_records[SHARED])
        model.load_state_dict(merge_state(kept, received, shared_layout(model.state_dict(), names)), strict=True)
    return model


def _train(
    setup: SiteSetup, settings: RoundSettings, source: LoadedArtifact, model: SourceClassifier
) -> tuple[SourceClassifier, int, dict[str, float]]:
    """Local adaptation for this round's epochs with the site's data; (model, target images, label-free signals)."""
    modality = read_modality(setup.site)
    preprocess = source.manifest.input_spec.preprocess()
    target = ImageDataset(list_images(setup.site / "target"), modality, preprocess)
    pairs = paired_dataset(setup.site, modality, preprocess)
    cfg = load_config(AdaptConfig, overrides=list(settings.overrides))
    cfg = replace(cfg, epochs=settings.local_epochs, seed=settings.seed + settings.round, threads=setup.threads)
    result = adapt(
        model,
        target,
        settings.method,
        cfg,
        pairs=pairs,
        checkpoint_dir=setup.out / f"round-{settings.round}.ckpt",
        resume=True,  # a site restarted mid-round continues its local epochs
    )
    final = result.metrics.get("final") or {}
    signals = {k: float(v) for k, v in final.items() if isinstance(v, int | float)}
    return result.model, len(target), signals


def _upload(
    model: SourceClassifier,
    names: list[str],
    global_shared: dict[str, np.ndarray],
    settings: RoundSettings,
    policy: SitePolicy,
) -> dict[str, np.ndarray]:
    """The shared parameters to send: as trained, or global + a clipped, noised update (local DP)."""
    shared, _ = split_state(model.state_dict(), names)
    if settings.dp_clip_norm > 0:
        delta = {k: shared[k] - global_shared[k] for k in names}
        rng = np.random.default_rng()  # fresh OS entropy: predictable noise could be subtracted again
        noisy = privatise_update(delta, settings.dp_clip_norm, settings.dp_noise_multiplier, rng)
        shared = {k: (global_shared[k] + noisy[k]).astype(np.float32) for k in names}
    check_upload(policy, wire_bytes(shared, settings), settings.dp_noise_multiplier)
    return shared


def wire_bytes(upload: dict[str, np.ndarray], settings: RoundSettings) -> int:
    """What the update costs on the wire: SecAgg+ sends each float32 value masked as an int64."""
    return update_bytes(upload) * (SECAGG_WIRE_FACTOR if settings.secure_aggregation else 1)


def _keep_secure_update(out: Path, settings: RoundSettings, update: dict[str, np.ndarray], examples: int) -> None:
    """This round's update at the site, for SecAgg+ to collect masked; refused if SecAgg+ would clip it.

    SecAgg+ clips each weighted value to ±clipping-range before quantising, silently; an update
    that large means something went wrong, and averaging clipped values would hide it.
    """
    largest = max((float(np.max(np.abs(array))) for array in update.values() if array.size), default=0.0)
    if not largest <= settings.secagg_clipping_range:
        raise ConfigError(
            f"the round's update reaches {largest:.3g}, beyond SecAgg+'s clipping range {settings.secagg_clipping_range}",
            hint="the owner can raise --secagg-clip (coarser quantisation) or lower the learning rate",
            reason="secagg-range",
        )
    metadata = {"round": str(settings.round), "examples": str(examples), "names": json.dumps(list(update))}
    replace_file(out / SECURE_UPDATE, safetensors_numpy.save(update, metadata=metadata))


def _read_secure_update(out: Path, round_number: int) -> tuple[list[np.ndarray], int]:
    """The kept update of ``round_number`` in shared-name order, and its example count."""
    path = out / SECURE_UPDATE
    metadata = _safetensors_metadata(path) if path.is_file() else {}
    if metadata.get("round") != str(round_number):
        raise ConfigError(
            f"this site has no update kept for round {round_number}",
            hint="the site lost its out folder or restarted mid-round; it takes part again next round",
            reason="missing-update",
        )
    arrays = safetensors_numpy.load_file(path)
    return [arrays[name] for name in json.loads(metadata["names"])], int(metadata["examples"])


def _safetensors_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as handle:
        return dict(handle.metadata() or {})


def local_state_sha256(model: SourceClassifier, names: list[str]) -> str:
    """SHA-256 over the tensors that never leave the site (BN statistics, integer buffers, ...).

    Written to rounds.jsonl after local training and to report.json after the final merge:
    equal digests show that aggregation touched none of them.
    """
    shared = set(names)
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name not in shared:
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _eval(setup: SiteSetup, source: LoadedArtifact, model: SourceClassifier) -> dict[str, float]:
    """Accuracy on ``SITE/eval/labels.csv`` where the site has labels (a measurement, never trained on)."""
    labels = setup.site / "eval" / "labels.csv"
    if not labels.is_file():
        return {}
    names = list(source.manifest.class_names)
    modality = read_modality(setup.site)
    dataset = labelled_dataset(labels, modality, source.manifest.input_spec.preprocess(), names)
    return {"accuracy": accuracy(model, dataset, names).accuracy}


def _save_local(out: Path, model: SourceClassifier) -> None:
    """The site's whole model, atomically (a crash leaves the previous round's state)."""
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".{LOCAL_STATE}.partial"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(staging))
    os.replace(staging, out / LOCAL_STATE)


def _log_round(out: Path, settings: RoundSettings, metrics: dict[str, float], upload: int, local_sha256: str) -> None:
    line = {
        "round": settings.round,
        "method": settings.method,
        "upload_bytes": upload,
        "secure_aggregation": settings.secure_aggregation,
        "local_sha256": local_sha256,
        **metrics,
    }
    with (out / "rounds.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, sort_keys=True) + "\n")


def _metric_record(metrics: dict[str, float]) -> dict[str, int | float | list[int] | list[float]]:
    return {k.replace("_", "-"): float(v) for k, v in metrics.items()}


def _publish(
    setup: SiteSetup,
    source: LoadedArtifact,
    model: SourceClassifier,
    settings: RoundSettings,
    scores: dict[str, Any],
    local_sha256: str,
) -> None:
    """OUT/adapted (signed with the site's own key) and OUT/report.json, as ``xkt-client adapt`` writes them."""
    if not setup.site_key.is_file():
        generate_keypair(setup.site_key.parent)
    manifest, spec = source.manifest, source.manifest.input_spec
    rounds_file = setup.out / "rounds.jsonl"
    rounds = (
        [json.loads(line) for line in rounds_file.read_text(encoding="utf-8").splitlines()]
        if rounds_file.is_file()
        else []
    )
    modality = read_modality(setup.site)
    adapted = save_artifact(
        model,
        out_dir=setup.out / "adapted",
        private_key=load_private_key(setup.site_key),
        model_id=f"{manifest.model_id}-federated-{settings.method}",
        model_version=manifest.model_version,
        arch=manifest.arch,
        class_names=manifest.class_names,
        input_spec=InputSpec(modality.name, spec.channels, spec.size, spec.mean, spec.std),
        provenance={
            "kind": "federated",
            "source_sha256": manifest.weights.sha256,
            "source_owner_key_fingerprint": manifest.owner_key_fingerprint,
            "method": settings.method,
            "rounds": len(rounds),
        },
        overwrite=True,
    )
    report = {
        "method": settings.method,
        "site": str(setup.site),
        "source_sha256": manifest.weights.sha256,
        "adapted_sha256": adapted.weights.sha256,
        "rounds": rounds,
        "accuracy_after": scores.get("accuracy"),
        "local_sha256": local_sha256,
    }
    replace_file(setup.out / "report.json", (json.dumps(report, indent=1, sort_keys=True) + "\n").encode("utf-8"))
