"""``xkt-client adapt``: fetch the owner's signed model, adapt it to the site's unlabelled data, sign the result.

Order (nothing reaches the network before step 4, nothing is trained before step 5):

1. resolve the config (``AdaptConfig`` defaults < ``--config`` TOML < each ``--set``) and print it;
2. ``validate_site``: a site folder with errors is refused (exit 3) before any connection;
3. print the egress manifest (and record it in ``--json``): the only requests this command sends
   are ``GetManifest`` and, on a cache miss, ``FetchWeights`` (digest + offset);
4. fetch into the cache (``--cache``; default ``$XKT_HOME/cache`` when ``XKT_HOME`` is set, else
   ``OUT/../.xkt-cache``), keyed by the weights' sha256: a model already there is not
   downloaded again.  The manifest signature is checked with ``--owner-key`` before any byte
   of weights is requested, and the artifact is verified again before it is loaded;
5. adapt locally on ``SITE/target`` (the site's modality, the model's preprocessing) and,
   for the cross-modal methods, the task-irrelevant pairs in ``SITE/paired/pairs.csv``,
   checkpointing every epoch into ``OUT.ckpt`` (``--resume`` continues from there); the
   epoch kept is the one the label-free selection rule picks (``--set monitor.select=...``);
6. the negative-transfer guard compares the kept model's label-free signals with the
   source's: it warns, and with ``--strict`` refuses to publish (exit 8, checkpoints kept);
7. publish ``OUT/`` atomically: the adapted artifact (``weights.safetensors``, ``manifest.json``,
   ``manifest.sig``), signed with the site key, plus ``report.json`` and ``report.md``.

Site key: ``--site-key KEY`` (an Ed25519 private key, e.g. from ``xkt-server keys init``);
without it the site's own key ``SITE/.xkt/site.key`` is used, and generated together with
``site.pub`` on first use (the command says so).  The adapted manifest's provenance names the
source digest, model id, method, resolved config, a fingerprint of the target file names
and sizes, and label-free metrics only.  Accuracy on ``SITE/eval/labels.csv`` (when present)
is measurement, written to the run report, never into the artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from rich.progress import Progress

from xkt.client.channel import SourceModelClient, open_channel, options_from_cli
from xkt.client.commands.fetch import (
    CaCertOption,
    ClientCertOption,
    ClientKeyOption,
    ForceInsecureOption,
    InsecureOption,
    KitOption,
    ServerNameOption,
    ServerOption,
    TokenFileOption,
)
from xkt.client.data_checks import validate_site
from xkt.client.egress import EgressGuard, EgressManifest, render_table, single_site_manifest
from xkt.client.fetch import FetchResult, fetch_artifact
from xkt.client.methods import METHODS, get_method
from xkt.client.trainer import AdaptConfig, AdaptResult, require_pairs, resolve_config
from xkt.client.trainer import adapt as run_adaptation
from xkt.shared.artifact import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    WEIGHTS_FILE,
    InputSpec,
    LoadedArtifact,
    load_artifact,
    save_artifact,
)
from xkt.shared.cli_support import JsonOption, QuietOption, SetOption, VerboseOption, command
from xkt.shared.config import load_config, to_toml
from xkt.shared.data import (
    ImageDataset,
    Modality,
    PairedDataset,
    fingerprint,
    labelled_dataset,
    list_images,
    paired_dataset,
    read_pairs,
)
from xkt.shared.errors import ConfigError, DataError, GuardError
from xkt.shared.evaluation import Accuracy, accuracy
from xkt.shared.files import disk_full_error, is_disk_full
from xkt.shared.log import emit_json, logger, progress_bar, stderr_console
from xkt.shared.signing import fingerprint as key_fingerprint
from xkt.shared.signing import generate_keypair, load_private_key, load_public_key

CACHE_ENV = "XKT_HOME"
SITE_KEY_DIR = ".xkt"
REPORT_JSON, REPORT_MD = "report.json", "report.md"
OUTPUT_FILES = frozenset({WEIGHTS_FILE, MANIFEST_FILE, SIGNATURE_FILE, REPORT_JSON, REPORT_MD})
_ADVANCED = "Advanced"

MethodOption = Annotated[
    str,
    typer.Option(
        "--method", click_type=click.Choice(sorted(METHODS)), help="Adaptation method: " + ", ".join(sorted(METHODS))
    ),
]


@dataclass(frozen=True)
class SiteKey:
    """The key that signs adapted models, where it lives, and whether this run created it."""

    private: Ed25519PrivateKey
    path: Path
    generated: bool

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()


@dataclass(frozen=True)
class Source:
    """The verified, loaded source model and how the fetch went."""

    fetched: FetchResult
    loaded: LoadedArtifact
    seconds: float


def adapt(
    server: ServerOption,
    owner_key: Annotated[Path, typer.Option("--owner-key", help="Owner public key the model must be signed with.")],
    site: Annotated[Path, typer.Option("--site", help="Site folder: target/ (unlabelled), optional eval/labels.csv.")],
    method: MethodOption,
    out: Annotated[Path, typer.Option("--out", help="Folder to create: adapted artifact + report.json/report.md.")],
    site_key: Annotated[
        Path | None,
        typer.Option(
            "--site-key",
            help="Ed25519 private key that signs the adapted model (default: SITE/.xkt/site.key, generated on first use).",
        ),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML file with AdaptConfig values.")] = None,
    overrides: SetOption = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Adaptation epochs (overrides config).")] = None,
    cache: Annotated[
        Path | None,
        typer.Option("--cache", help="Model cache by digest (default: $XKT_HOME/cache, else OUT/../.xkt-cache)."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoints in OUT.ckpt.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous adapt output at OUT.")] = False,
    strict: Annotated[
        bool,
        typer.Option("--strict", help="Refuse to publish when the label-free guard says the model got worse (exit 8)."),
    ] = False,
    model_id: Annotated[
        str | None,
        typer.Option("--model-id", help="Adapted model id (default: SOURCE_ID-METHOD).", rich_help_panel=_ADVANCED),
    ] = None,
    ca_cert: CaCertOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    kit: KitOption = None,
    token_file: TokenFileOption = None,
    server_name: ServerNameOption = None,
    insecure: InsecureOption = False,
    force_insecure: ForceInsecureOption = False,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Fetch and verify the owner's model, adapt it to this site's unlabelled data, sign and report the result."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        started = time.perf_counter()
        _check_out(out, overwrite)
        extra = [f"epochs={epochs}"] if epochs else []
        cfg = resolve_config(load_config(AdaptConfig, path=config, overrides=[*(overrides or []), *extra]), method)
        if not quiet:
            stderr_console().print(f"# resolved config, method = {method}\n{to_toml(cfg)}", markup=False)
        modality = _check_site(site)
        _check_pairs(site, method)
        key = _site_key(site_key, site)
        opts = options_from_cli(
            server=server,
            ca_cert=ca_cert,
            client_cert=client_cert,
            client_key=client_key,
            kit=kit,
            token_file=token_file,
            insecure=insecure,
            force_insecure=force_insecure,
            server_name=server_name,
        )
        egress = single_site_manifest(sha256=None, offset=None, token=opts.token is not None)
        if not quiet:
            stderr_console().print(render_table(egress))
        with progress_bar(not quiet) as bar:
            with open_channel(opts, [EgressGuard(egress)]) as channel:
                source = _fetch_source(SourceModelClient(channel, opts), owner_key, _cache_dir(cache, out), bar)
            target = _target_dataset(site, modality, source.loaded)
            pairs = paired_dataset(site, modality, source.loaded.manifest.input_spec.preprocess())
            adapted = _adapt(source, (target, pairs), method, cfg, out, resume, bar)
        _guard(adapted[0], strict, out)
        report = _report(site, modality, source, target, adapted, egress, started)
        adapted_sha = _publish(out, adapted[0], source, key, model_id, modality, report, overwrite)
        shutil.rmtree(_checkpoint_dir(out), ignore_errors=True)  # published: nothing left to resume
        _finish(out, key, report, adapted_sha, egress, json_output)


# ------------------------------------------------------------------ before any connection


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that cannot be published to, before any download or training."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"{out} exists and is not a directory", hint="choose another --out", reason="output-exists")
    existing = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if existing and not overwrite:
        raise ConfigError(
            f"{out} already exists and is not empty",
            hint="choose another --out, or pass --overwrite to replace a previous adapt output",
            reason="output-exists",
        )
    if existing - OUTPUT_FILES:
        raise ConfigError(
            f"{out} holds files that an adapt run did not write, so it will not be replaced",
            hint="choose another --out; --overwrite only replaces a previous adapt output",
            reason="output-not-an-artifact",
        )


def _check_site(site: Path) -> Modality:
    """The site's modality, once its folder passes every data check (errors → exit 3)."""
    report = validate_site(site)
    for finding in report.findings:
        if finding.level == "warning":
            logger.warning("site check %s: %s", finding.check, finding.message)
    errors = [f for f in report.findings if f.level == "error"]
    if errors:
        first = errors[0]
        raise DataError(
            f"site {site} fails {len(errors)} data check(s); first: {first.check}: {first.message}",
            hint=(first.fix or "fix the site folder") + f"; run `xkt-client validate-data --site {site}` for all",
            reason="invalid-site",
        )
    if not report.counts.get("target"):
        raise DataError(f"{site}/target has no images", hint="add unlabelled target images", reason="no-target")
    return report.modality


def _check_pairs(site: Path, method: str) -> None:
    """A method that needs TI pairs is refused before any connection when the site has none."""
    if get_method(method).needs_pairs:
        csv_path = site / "paired" / "pairs.csv"
        require_pairs(method, len(read_pairs(csv_path)) if csv_path.exists() else 0)


def _site_key(path: Path | None, site: Path) -> SiteKey:
    """``--site-key``, else ``SITE/.xkt/site.key`` (generated with ``site.pub`` on first use)."""
    if path is not None:
        return SiteKey(load_private_key(path), path, generated=False)
    folder = site / SITE_KEY_DIR
    default = folder / "site.key"
    if default.exists():
        return SiteKey(load_private_key(default), default, generated=False)
    folder.mkdir(mode=0o700, exist_ok=True)
    key_path, pub_path = generate_keypair(folder, "site")
    logger.warning("generated this site's signing key %s (public key %s); keep it, back it up", key_path, pub_path)
    return SiteKey(load_private_key(key_path), key_path, generated=True)


def _cache_dir(cache: Path | None, out: Path) -> Path:
    if cache is not None:
        return cache
    home = os.environ.get(CACHE_ENV)
    return Path(home) / "cache" if home else out.absolute().parent / ".xkt-cache"


def _checkpoint_dir(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt")


# ------------------------------------------------------------------ fetch, data, adaptation


def _fetch_source(client: SourceModelClient, owner_key: Path, cache: Path, bar: Progress) -> Source:
    """Fetch (or find in the cache) and verify the source model, then verify and load it."""
    started = time.perf_counter()
    keys = [load_public_key(owner_key)]
    task = bar.add_task("source model", total=None, status=client.opts.mode)
    fetched = fetch_artifact(
        client, keys, cache, lambda done, total: bar.update(task, completed=done, total=total), attempts=3
    )
    bar.update(task, status="cached" if fetched.cached else "downloaded")
    loaded = load_artifact(fetched.path, keys)  # verified again: the cache is only a folder on disk
    return Source(fetched, loaded, time.perf_counter() - started)


def _target_dataset(site: Path, modality: Modality, source: LoadedArtifact) -> ImageDataset:
    """``SITE/target`` in the site's modality, prepared as the source model expects."""
    return ImageDataset(list_images(site / "target"), modality, source.manifest.input_spec.preprocess())


def _adapt(
    source: Source,
    data: tuple[ImageDataset, PairedDataset | None],
    method: str,
    cfg: AdaptConfig,
    out: Path,
    resume: bool,
    bar: Progress,
) -> tuple[AdaptResult, float]:
    """Run the method on the target set (and TI pairs) with a progress line per step; the result and its seconds."""
    task = bar.add_task(method, total=None, status="")

    def report(label: str, done: int, total: int, status: str) -> None:
        bar.update(task, description=label, completed=done, total=total, status=status)

    started = time.perf_counter()
    target, pairs = data
    result = run_adaptation(
        source.loaded.model,
        target,
        method,
        cfg,
        pairs=pairs,
        checkpoint_dir=_checkpoint_dir(out),
        resume=resume,
        progress=report,
    )
    return result, time.perf_counter() - started


def _guard(result: AdaptResult, strict: bool, out: Path) -> None:
    """Warn about each sign of negative transfer; with --strict refuse to publish (checkpoints stay)."""
    reasons: list[str] = result.metrics.get("guard", [])
    for reason in reasons:
        logger.warning("negative-transfer guard: %s", reason)
    if reasons and strict:
        raise GuardError(
            f"the adapted model looks worse than the source without labels: {'; '.join(reasons)}",
            hint=f"try another method or fewer epochs; the checkpoints stay in {_checkpoint_dir(out)}; "
            "drop --strict to publish anyway",
            reason="negative-transfer",
        )


def _accuracy(site: Path, modality: Modality, source: LoadedArtifact, result: AdaptResult) -> dict[str, Any]:
    """Accuracy before/after on ``SITE/eval/labels.csv`` (measurement only; never trained on)."""
    labels = site / "eval" / "labels.csv"
    if not labels.is_file():
        return {"before": None, "after": None}
    names = source.manifest.class_names
    dataset = labelled_dataset(labels, modality, source.manifest.input_spec.preprocess(), names)
    before: Accuracy = accuracy(source.model, dataset, names)
    after: Accuracy = accuracy(result.model, dataset, names)
    return {"before": before.to_json(), "after": after.to_json(), "eval_images": len(dataset)}


# ------------------------------------------------------------------ outputs


def _label_free(metrics: dict[str, Any]) -> dict[str, Any]:
    """The trainer's metrics minus timing: per-epoch losses and label-free signals only."""
    return {name: value for name, value in metrics.items() if name != "seconds"}


def _report(
    site: Path,
    modality: Modality,
    source: Source,
    target: ImageDataset,
    adapted: tuple[AdaptResult, float],
    egress: EgressManifest,
    started: float,
) -> dict[str, Any]:
    """The run report (report.json): what ran, on what, how long, and how it went."""
    result, adapt_s = adapted
    manifest, fetched = source.loaded.manifest, source.fetched
    evaluated = time.perf_counter()
    scores = _accuracy(site, modality, source.loaded, result)
    return {
        "method": result.config["method"],
        "config": result.config,
        "site": str(site),
        "modality": modality.name,
        "target_images": len(target),
        "data_fingerprint": fingerprint(target.paths, site / "target"),
        "source": {
            "model_id": manifest.model_id,
            "model_version": manifest.model_version,
            "sha256": manifest.weights.sha256,
            "owner_key_fingerprint": manifest.owner_key_fingerprint,
            "cached": fetched.cached,
            "downloaded_bytes": fetched.downloaded,
            "path": str(fetched.path),
        },
        "label_free": _label_free(result.metrics),
        "accuracy": scores,
        "timing": {
            "fetch_s": round(source.seconds, 3),
            "adapt_s": round(adapt_s, 3),
            "evaluate_s": round(time.perf_counter() - evaluated, 3),
            "total_s": round(time.perf_counter() - started, 3),
        },
        "egress": egress.to_json(),
    }


def _publish(
    out: Path,
    result: AdaptResult,
    source: Source,
    key: SiteKey,
    model_id: str | None,
    modality: Modality,
    report: dict[str, Any],
    overwrite: bool,
) -> str:
    """Write artifact + reports into a staging sibling, then rename it onto OUT; the adapted sha256."""
    manifest = source.loaded.manifest
    spec = manifest.input_spec
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        adapted = save_artifact(
            result.model,
            out_dir=staging,
            private_key=key.private,
            model_id=model_id or f"{manifest.model_id}-{report['method']}",
            model_version=manifest.model_version,
            arch=manifest.arch,
            class_names=manifest.class_names,
            input_spec=InputSpec(modality.name, spec.channels, spec.size, spec.mean, spec.std),
            provenance=_provenance(report, key),
        )
        report["adapted"] = {"sha256": adapted.weights.sha256, "signer": adapted.owner_key_fingerprint}
        (staging / REPORT_JSON).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        (staging / REPORT_MD).write_text(_markdown(report), encoding="utf-8")
        _replace(staging, out, overwrite)
    except OSError as error:
        if not is_disk_full(error):
            raise
        raise disk_full_error(
            "the adapted model",
            out.absolute().parent,
            hint=f"free space or choose another --out; nothing was published, and the checkpoints in "
            f"{_checkpoint_dir(out)} are kept: rerun with --resume to publish without training again",
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a half-written artifact never stays behind
    return adapted.weights.sha256


def _provenance(report: dict[str, Any], key: SiteKey) -> dict[str, Any]:
    """What the adapted manifest records: source, method, config, data fingerprint, label-free metrics."""
    source = report["source"]
    return {
        "kind": "adapted",
        "source_sha256": source["sha256"],
        "source_model_id": source["model_id"],
        "source_model_version": source["model_version"],
        "source_owner_key_fingerprint": source["owner_key_fingerprint"],
        "method": report["method"],
        "config": report["config"],
        "data_fingerprint": report["data_fingerprint"],
        "modality": report["modality"],
        "metrics": report["label_free"],
        "site_key_fingerprint": key_fingerprint(key.public),
    }


def _replace(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename ``staging`` onto ``out``; a previous output (checked by _check_out) is moved aside first."""
    _check_out(out, overwrite)  # again: something may have appeared there during the run
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}") if out.exists() else None
    if old is not None:
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _markdown(report: dict[str, Any]) -> str:
    """A short human-readable report.md beside report.json."""
    before, after = (_percent(report["accuracy"][k]) for k in ("before", "after"))
    label_free = report["label_free"]
    epochs = [(0, "source", label_free["source"])]
    epochs += [(e["epoch"], e["stage"], e["signals"]) for e in label_free.get("history", []) if "signals" in e]
    selected = label_free.get("selected_epoch", 0)
    rows = [_signal_row(epoch, stage, signals, epoch == selected) for epoch, stage, signals in epochs]
    guard = label_free.get("guard", [])
    lines = [
        f"# xkt adapt: {report['method']}",
        "",
        f"- source: `{report['source']['model_id']}` {report['source']['model_version']}, "
        f"sha256 `{report['source']['sha256']}`",
        f"- adapted: sha256 `{report['adapted']['sha256']}`, signed by `{report['adapted']['signer']}`",
        f"- site: `{report['site']}` ({report['modality']}), {report['target_images']} target images",
        f"- accuracy on eval/labels.csv (measurement only): before {before}, after {after}",
        f"- time: {report['timing']['total_s']:.1f} s (adapt {report['timing']['adapt_s']:.1f} s)",
        f"- kept: epoch {selected} (rule `{report['config']['monitor']['select']}`); "
        f"guard: {'; '.join(guard) if guard else 'no sign of negative transfer'}",
        "",
        "| epoch | stage | mean entropy | diversity | IM | agreement | BN distance | changed | kept |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    return "\n".join(lines)


def _signal_row(epoch: int, stage: str, signals: dict[str, float], kept: bool) -> str:
    """One table row of label-free signals (methods.md §6)."""
    changed = f"{signals['changed']:.3f}" if "changed" in signals else "-"
    values = " | ".join(f"{signals[k]:.4f}" for k in ("mean_entropy", "diversity", "im", "agreement", "bn_distance"))
    return f"| {epoch} | {stage} | {values} | {changed} | {'✓' if kept else ''} |"


def _percent(score: dict[str, Any] | None) -> str:
    return "n/a (no eval/labels.csv)" if score is None else f"{100 * float(score['accuracy']):.1f} %"


def _accuracy_value(score: dict[str, Any] | None) -> float | None:
    return None if score is None else float(score["accuracy"])


def _finish(
    out: Path, key: SiteKey, report: dict[str, Any], adapted_sha: str, egress: EgressManifest, json_output: bool
) -> None:
    """One JSON object on stdout with --json; otherwise a short summary on stderr and OUT on stdout."""
    scores = report["accuracy"]
    summary = {
        "ok": True,
        "out": str(out),
        "report": str(out / REPORT_JSON),
        "method": report["method"],
        "source_sha256": report["source"]["sha256"],
        "adapted_sha256": adapted_sha,
        "cached": report["source"]["cached"],
        "downloaded_bytes": report["source"]["downloaded_bytes"],
        "accuracy_before": _accuracy_value(scores["before"]),
        "accuracy_after": _accuracy_value(scores["after"]),
        "seconds": report["timing"]["total_s"],
        "site_key": str(key.path),
        "site_key_generated": key.generated,
        "site_key_fingerprint": key_fingerprint(key.public),
        "egress": egress.to_json(),
    }
    if json_output:
        emit_json(summary)
        return
    state = "from the cache" if summary["cached"] else f"downloaded {summary['downloaded_bytes']} bytes"
    console = stderr_console()
    console.print(f"source {summary['source_sha256'][:12]} {state}; adapted with {summary['method']}", markup=False)
    console.print(
        f"accuracy on eval: before {_percent(scores['before'])}, after {_percent(scores['after'])}", markup=False
    )
    typer.echo(str(out))
