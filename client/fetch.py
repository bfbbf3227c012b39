"""Fetch an owner's signed model into a content-addressed cache, resumably, verifying everything.

Cache layout (``CACHE`` = ``--out``)::

    CACHE/<weights sha256>/           a complete artifact that passed verify_artifact
    CACHE/<weights sha256>.part/      a download in progress: manifest.json, manifest.sig
                                      and weights.safetensors.part (verified chunks only)
    CACHE/<weights sha256>.lock       held while a fetch of that digest runs

Order of trust: the manifest's signature is checked with the owner's key *before* a byte
of weights is requested, so an impostor server cannot make a site download (or store)
anything.  Each chunk must start where the file ends and match its sha256; the whole
file must match the signed digest; the staged folder must pass ``verify_artifact``; only
then is it renamed into place, atomically.  A download interrupted at any point (network,
server restart, Ctrl-C, SIGKILL of either side) resumes from the ``.part`` size.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from xkt.client.channel import SourceModelClient
from xkt.protos import source_model_pb2 as pb
from xkt.shared.artifact import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    WEIGHTS_FILE,
    VerifiedArtifact,
    check_signature,  # the artifact's own signer check, reused so both paths say the same thing
    read_state_dict,
    verify_artifact,
)
from xkt.shared.errors import ConfigError, TransportError, VerificationError, XktError
from xkt.shared.files import disk_full_error, fsync_dir, is_disk_full
from xkt.shared.grpc_options import MAX_CHUNK_BYTES
from xkt.shared.manifest import MAX_MANIFEST_BYTES, Manifest, check_batchnorm_layers, parse_signed_manifest
from xkt.shared.models import BatchNormStats, batchnorm_statistics, build_model
from xkt.shared.safetensors_check import expected_for
from xkt.shared.serde import batchnorm_stats_from_proto

logger = logging.getLogger("xkt")

PART_SUFFIX = ".part"
RECONNECT_WAIT_S = 30.0
"""Before resuming an interrupted stream, wait this long at most for the connection to come back."""
Progress = Callable[[int, int], None]
"""Called with (bytes held, total bytes) after every chunk written."""


@dataclass(frozen=True)
class FetchResult:
    """Where the verified artifact is and what this fetch had to do to get it."""

    path: Path
    manifest: Manifest
    cached: bool
    resumed_from: int
    downloaded: int


# ------------------------------------------------------------------ the manifest


def verify_manifest_message(reply: pb.Manifest, owner_keys: Sequence[Ed25519PublicKey]) -> Manifest:
    """Check the signature with the owner's keys, then the manifest, before any weights move."""
    if len(reply.manifest_json) > MAX_MANIFEST_BYTES:
        raise VerificationError(
            "the server's manifest is larger than any xkt manifest",
            hint="this is not a compatible xkt server; check --server",
            reason="manifest-too-large",
        )
    manifest_bytes = bytes(reply.manifest_json)
    signer = check_signature(manifest_bytes, bytes(reply.signature), list(owner_keys))
    manifest = parse_signed_manifest(manifest_bytes, signer)
    check_batchnorm_layers(manifest, expected_for(manifest.arch))
    if (reply.weights_sha256, reply.weights_size) != (manifest.weights.sha256, manifest.weights.size):
        raise VerificationError(
            "the server's unsigned digest/size fields disagree with its signed manifest",
            hint="the server is misconfigured or tampered with; tell the owner",
            reason="manifest-fields-mismatch",
        )
    return manifest


def _stage_manifest(part_dir: Path, reply: pb.Manifest) -> None:
    """Write manifest.json/.sig exactly as received (and verified) into the staging folder."""
    part_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, data in (
        (MANIFEST_FILE, bytes(reply.manifest_json)),
        (SIGNATURE_FILE, base64.b64encode(bytes(reply.signature)) + b"\n"),
    ):
        target = part_dir / name
        if target.exists() and target.read_bytes() == data:
            continue
        tmp = part_dir / f".{name}.{uuid.uuid4().hex}"
        try:
            tmp.write_bytes(data)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            if is_disk_full(error):
                raise _cache_full(part_dir) from None
            raise
        os.replace(tmp, target)


def _cache_full(part_dir: Path) -> XktError:
    return disk_full_error(
        "the model download",
        part_dir.parent,
        hint="free space or choose another --out (the cache); fetch again: it resumes from the bytes already held",
    )


# ------------------------------------------------------------------ the cache


@contextmanager
def _cache_lock(cache_dir: Path, sha256: str) -> Iterator[None]:
    """One fetch per digest at a time: two writers on one .part would corrupt it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / f"{sha256}.lock").open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another fetch of {sha256[:12]} into {cache_dir} is running",
                hint="wait for it to finish, or use another --out",
                reason="fetch-in-progress",
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _cached(final: Path, owner_keys: Sequence[Ed25519PublicKey]) -> VerifiedArtifact | None:
    """The cached artifact if it verifies; a damaged one is moved aside (never trusted, never lost)."""
    if not final.exists():
        return None
    try:
        return verify_artifact(final, owner_keys)
    except VerificationError as error:
        aside = final.with_name(f".{final.name}.bad-{uuid.uuid4().hex[:8]}")
        logger.warning("cached %s failed verification (%s); moved to %s", final.name, error.reason, aside.name)
        os.replace(final, aside)
        return None


# ------------------------------------------------------------------ the weights


def check_chunk(chunk: pb.WeightsChunk, position: int, size: int) -> None:
    """A chunk must continue the file exactly, stay within it and match its own digest."""
    data = chunk.data
    if chunk.offset != position or not 0 < len(data) <= MAX_CHUNK_BYTES or position + len(data) > size:
        raise VerificationError(
            f"the server sent a chunk at offset {chunk.offset} of {len(data)} bytes; expected offset {position}",
            hint="the server is not a compatible xkt server or the stream was altered; fetch again",
            reason="bad-chunk",
        )
    if hashlib.sha256(data).hexdigest() != chunk.sha256:
        raise VerificationError(
            f"chunk at offset {position} does not match its sha256",
            hint="the data was corrupted in transit; fetch again (it resumes before this chunk)",
            reason="chunk-digest-mismatch",
        )


def _download(client: SourceModelClient, manifest: Manifest, part: Path, progress: Progress | None) -> int:
    """Append the missing bytes to ``part`` from the server; return how many were received.

    A full disk stops the download with a ``disk-full`` error; what was written stays in the
    ``.part`` file (a prefix of the weights, whatever the write managed) for the next fetch.
    """
    try:
        return _append_chunks(client, manifest, part, progress)
    except OSError as error:
        if is_disk_full(error):
            raise _cache_full(part.parent) from None
        raise


def _append_chunks(client: SourceModelClient, manifest: Manifest, part: Path, progress: Progress | None) -> int:
    size, sha = manifest.weights.size, manifest.weights.sha256
    with part.open("ab") as handle:
        position = handle.tell()
        start = position
        if position > size:
            raise VerificationError(
                f"{part} is larger than the signed size", hint="delete it and fetch again", reason="part-too-large"
            )
        if position == size:
            return 0
        try:
            for chunk in client.fetch_weights(sha, position):
                check_chunk(chunk, position, size)
                handle.write(chunk.data)
                position += len(chunk.data)
                if progress is not None:
                    progress(position, size)
        finally:
            handle.flush()
            os.fsync(handle.fileno())
    if position != size:
        raise TransportError(
            f"the weights stream ended at byte {position} of {size}",
            hint="fetch again: it resumes from the bytes already held",
            reason="stream-incomplete",
        )
    return position - start


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _download_resuming(
    client: SourceModelClient, manifest: Manifest, part: Path, progress: Progress | None, attempts: int
) -> None:
    """Download, resuming from the .part size after a transport failure, ``attempts`` times at most."""
    for attempt in range(1, max(1, attempts) + 1):
        try:
            _download(client, manifest, part, progress)
            return
        except TransportError as error:
            if attempt >= attempts:
                raise
            logger.warning("weights stream interrupted (%s); resuming from byte %d", error.reason, part.stat().st_size)
            if not client.wait_ready(RECONNECT_WAIT_S):  # the next attempt would fail at once on a dead channel
                logger.warning("no connection to %s after %.0f s; trying anyway", client.opts.server, RECONNECT_WAIT_S)


# ------------------------------------------------------------------ the whole fetch


def fetch_artifact(
    client: SourceModelClient,
    owner_keys: Sequence[Ed25519PublicKey],
    cache_dir: Path,
    progress: Progress | None = None,
    *,
    attempts: int = 1,
) -> FetchResult:
    """GetManifest → verify → cache hit, or resume into .part → digest → verify → rename."""
    reply = client.get_manifest()
    manifest = verify_manifest_message(reply, owner_keys)
    sha = manifest.weights.sha256
    cache_dir = Path(cache_dir)
    final, part_dir = cache_dir / sha, cache_dir / f"{sha}{PART_SUFFIX}"
    with _cache_lock(cache_dir, sha):
        if _cached(final, owner_keys) is not None:
            logger.info("model %s is already in the cache: nothing downloaded", sha[:12])
            return FetchResult(final, manifest, cached=True, resumed_from=0, downloaded=0)
        _stage_manifest(part_dir, reply)
        part = part_dir / f"{WEIGHTS_FILE}{PART_SUFFIX}"
        resumed_from = part.stat().st_size if part.exists() else 0
        if resumed_from:
            logger.info("resuming %s from byte %d of %d", sha[:12], resumed_from, manifest.weights.size)
        start = resumed_from
        _download_resuming(client, manifest, part, progress, attempts)
        _publish(part_dir, part, final, manifest, owner_keys)
        downloaded = manifest.weights.size - start
        return FetchResult(final, manifest, cached=False, resumed_from=resumed_from, downloaded=downloaded)


def _publish(
    part_dir: Path, part: Path, final: Path, manifest: Manifest, owner_keys: Sequence[Ed25519PublicKey]
) -> None:
    """Whole-file digest, full artifact verification, then one atomic rename into the cache."""
    if _file_sha256(part) != manifest.weights.sha256:
        part.unlink()  # held bytes are wrong somewhere: the only safe resume point is 0
        raise VerificationError(
            "the downloaded weights do not match the signed sha256",
            hint="the partial download was damaged and has been discarded; fetch again",
            reason="digest-mismatch",
        )
    os.replace(part, part_dir / WEIGHTS_FILE)
    verify_artifact(part_dir, owner_keys)
    fsync_dir(part_dir)
    os.replace(part_dir, final)
    fsync_dir(final.parent)


def fetch_model(
    client: SourceModelClient,
    owner_keys: Sequence[Ed25519PublicKey],
    cache_dir: Path,
    progress: Progress | None = None,
) -> Path:
    """The verified artifact folder ``CACHE/<weights sha256>/`` (downloaded only if needed)."""
    return fetch_artifact(client, owner_keys, cache_dir, progress).path


def discard_partial(cache_dir: Path, sha256: str) -> None:
    """Delete a digest's partial download (for a user who wants a clean start)."""
    shutil.rmtree(Path(cache_dir) / f"{sha256}{PART_SUFFIX}", ignore_errors=True)


# ------------------------------------------------------------------ batch-norm statistics


def fetch_batchnorm_stats(client: SourceModelClient, artifact: VerifiedArtifact) -> list[BatchNormStats]:
    """The server's BN statistics, accepted only if they equal those inside the verified weights.

    The weights are signed and the statistics message is not, so the weights are the
    reference; a mismatch means the server is inconsistent and nothing is returned.
    """
    sha = artifact.manifest.weights.sha256
    reply = client.get_batchnorm_stats(sha)
    if reply.weights_sha256 != sha:
        raise VerificationError(
            "the batch-norm statistics are for other weights than requested",
            hint="the owner may have replaced the model; fetch again",
            reason="bn-stats-digest",
        )
    received = batchnorm_stats_from_proto(reply)
    model = build_model(artifact.manifest.arch)
    model.load_state_dict(read_state_dict(artifact), strict=True)
    _compare_stats(received, batchnorm_statistics(model))
    return received


def _compare_stats(received: Sequence[BatchNormStats], reference: Sequence[BatchNormStats]) -> None:
    if [s.name for s in received] != [s.name for s in reference]:
        raise _stats_mismatch("the layer names differ from the model's")
    for got, want in zip(received, reference, strict=True):
        same = torch.equal(got.running_mean, want.running_mean.float()) and torch.equal(
            got.running_var, want.running_var.float()
        )
        if not same or got.eps != want.eps or got.momentum != want.momentum:
            raise _stats_mismatch(f"layer {got.name} differs from the signed weights")


def _stats_mismatch(message: str) -> VerificationError:
    return VerificationError(
        f"the server's batch-norm statistics do not match the signed weights: {message}",
        hint="do not use these statistics; tell the owner their server is inconsistent",
        reason="bn-stats-mismatch",
    )
