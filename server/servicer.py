"""``xkt.v1.SourceModel``: a thin servicer over one verified artifact.

Everything the RPCs send is fixed at start: the manifest message (pre-serialised, the
bytes exactly as signed) and the batch-norm statistics (read once from the verified
weights).  Only ``FetchWeights`` touches the disk per call, reading one chunk at a time
so memory stays bounded however many sites download at once.

Refusals are :class:`Refusal` exceptions carrying a status code and a public message;
:func:`_translated` turns them into ``context.abort`` and turns anything unexpected into
a bare INTERNAL (the details go to the server log only, never to the peer).  Every call
that reaches the servicer ends in one audit-log entry.

A request body that protobuf cannot parse never reaches a handler: gRPC itself would
answer INTERNAL and log a traceback per request, so :class:`MalformedRequestGuard`
answers INVALID_ARGUMENT instead, after authentication, for every service on the server.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import grpc  # type: ignore[import-untyped, unused-ignore]  # no stubs in the dev deps yet
from google.protobuf.message import DecodeError  # type: ignore[import-untyped, unused-ignore]  # no stubs in the dev deps
from grpc_health.v1 import health  # type: ignore[import-untyped, unused-ignore]

from xkt.protos import source_model_pb2 as pb
from xkt.protos import source_model_pb2_grpc as pb_grpc
from xkt.server.audit_log import AuditLog
from xkt.server.auth import current_site
from xkt.shared.artifact import SIGNATURE_FILE, VerifiedArtifact, read_state_dict
from xkt.shared.errors import ConfigError, VerificationError
from xkt.shared.grpc_options import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from xkt.shared.manifest import WeightsInfo
from xkt.shared.models import batchnorm_statistics, build_model
from xkt.shared.serde import batchnorm_stats_to_proto, manifest_to_proto

logger = logging.getLogger("xkt")

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
T = TypeVar("T")
MALFORMED_MESSAGE = "malformed request message"
WATCH_UNIMPLEMENTED = "health Watch is not offered by this server; use Check"


class Refusal(Exception):
    """A request the server declines, with a status code and a message safe to show the peer."""

    def __init__(self, code: grpc.StatusCode, public_message: str) -> None:
        super().__init__(public_message)
        self.code = code
        self.public_message = public_message


# ---------------------------------------------------------------- pure helpers


def check_digest(sha256: str, weights: WeightsInfo) -> None:
    """The request names the served weights; malformed → INVALID_ARGUMENT, other → NOT_FOUND."""
    if not _SHA256_RE.fullmatch(sha256):
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "sha256 must be 64 lowercase hex digits")
    if sha256 != weights.sha256:
        raise Refusal(grpc.StatusCode.NOT_FOUND, "this server does not serve weights with that sha256")


def check_offset(offset: int, size: int) -> None:
    """A resume offset within the file; ``offset == size`` is a finished download (empty stream)."""
    if offset > size:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"offset {offset} is beyond the end of the weights ({size})")


def check_chunk_size(chunk_size: int) -> int:
    """Chunk sizes outside 64 KiB–1 MiB are a server configuration error."""
    if not MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES:
        raise ConfigError(
            f"chunk size {chunk_size} is outside {MIN_CHUNK_BYTES}-{MAX_CHUNK_BYTES} bytes",
            hint="pick --chunk-size between 65536 and 1048576 (the default is 262144)",
            reason="bad-chunk-size",
        )
    return chunk_size


def iter_chunks(handle: BinaryIO, offset: int, end: int, chunk_size: int) -> Iterator[pb.WeightsChunk]:
    """Chunks of ``handle`` from ``offset`` to ``end``, each with its offset and sha256.

    Stops at ``end`` (the signed size) even if the file grew, and raises if it shrank.
    """
    handle.seek(offset)
    while offset < end:
        data = handle.read(min(chunk_size, end - offset))
        if not data:
            raise OSError("weights file is shorter than its signed size")
        yield pb.WeightsChunk(offset=offset, data=data, sha256=hashlib.sha256(data).hexdigest())
        offset += len(data)


def read_signature(artifact: VerifiedArtifact) -> bytes:
    """The raw 64-byte signature from ``manifest.sig`` (which verification already accepted)."""
    try:
        signature = base64.b64decode((artifact.path / SIGNATURE_FILE).read_bytes().strip(), validate=True)
    except (OSError, binascii.Error, ValueError):
        signature = b""
    if len(signature) != 64:
        raise VerificationError(
            f"{SIGNATURE_FILE} changed after the artifact was verified",
            hint="restart the server once the artifact is complete again",
            reason="signature-changed",
        )
    return signature


def bn_stats_message(artifact: VerifiedArtifact) -> pb.BatchNormStats:
    """Batch-norm statistics of the verified weights, as the wire message."""
    model = build_model(artifact.manifest.arch)
    model.load_state_dict(read_state_dict(artifact), strict=True)
    return batchnorm_stats_to_proto(batchnorm_statistics(model), artifact.manifest.weights.sha256)


def _translated(context: grpc.ServicerContext, body: Callable[[], T], on_fail: Callable[[str], None]) -> T:
    """Run ``body``; a :class:`Refusal` aborts with its public text, anything else with bare INTERNAL.

    ``on_fail`` gets the status name first, so the audit entry is written before the abort.
    """
    try:
        return body()
    except Refusal as refusal:
        on_fail(refusal.code.name)
        context.abort(refusal.code, refusal.public_message)
    except Exception:
        logger.exception("internal error while serving %s", context.peer())
        on_fail(grpc.StatusCode.INTERNAL.name)
        context.abort(grpc.StatusCode.INTERNAL, "internal server error")
    raise AssertionError("context.abort returned")


# ---------------------------------------------------------------- unparseable requests


class _Malformed:
    """What an unparseable request deserialises to (not None: gRPC reads None as its own failure)."""


_MALFORMED = _Malformed()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError:
            return _MALFORMED

    return parse


def _refuse_malformed(method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(request: Any, context: grpc.ServicerContext, *callback: Any) -> Any:
        if request is _MALFORMED:
            logger.warning("refused a malformed %s request from %s", method, context.peer())
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_MESSAGE)
        return behaviour(request, context, *callback)

    # A "non-blocking" stream handler gets gRPC's send_response_callback (and no parked
    # worker thread) only if the behaviour gRPC sees carries these flags: keep them.
    for flag in ("experimental_non_blocking", "experimental_thread_pool"):
        if hasattr(behaviour, flag):
            setattr(guarded, flag, getattr(behaviour, flag))
    return guarded


class MalformedRequestGuard(grpc.ServerInterceptor):  # type: ignore[misc, unused-ignore]
    """Answer a request body protobuf cannot parse with INVALID_ARGUMENT, not gRPC's INTERNAL.

    Put it after the auth interceptor, so an unauthenticated peer still gets UNAUTHENTICATED.
    """

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(handler_call_details)
        method = str(handler_call_details.method)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _refuse_malformed(method, handler.unary_unary),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _refuse_malformed(method, handler.unary_stream),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming RPCs on this server


class CheckOnlyHealthServicer(health.HealthServicer):  # type: ignore[misc, unused-ignore]
    """The standard ``grpc.health.v1`` service, but ``Watch`` answers UNIMPLEMENTED.

    grpcio-health-checking's non-blocking ``Watch`` sends while holding its lock, and a
    watcher's close callback takes that lock on gRPC's event thread: a peer opening and
    cancelling Watch streams quickly deadlocks the whole server (found by tests/fuzz).
    Probes use ``Check``; a gRPC client doing client-side health checking reads
    UNIMPLEMENTED as "health checking disabled" and keeps using the channel.
    """

    def __init__(self) -> None:
        super().__init__(experimental_non_blocking=False)

    def Watch(self, request: Any, context: grpc.ServicerContext, send_response_callback: Any = None) -> Any:
        """Refused: use ``Check`` (see the class docstring)."""
        context.abort(grpc.StatusCode.UNIMPLEMENTED, WATCH_UNIMPLEMENTED)


# ---------------------------------------------------------------- the servicer


class SourceModelServicer(pb_grpc.SourceModelServicer):
    """Serves one verified artifact: manifest, weights stream, batch-norm statistics."""

    def __init__(self, artifact: VerifiedArtifact, chunk_size: int, audit: AuditLog | None) -> None:
        self._weights = artifact.manifest.weights
        self._weights_path: Path = artifact.weights_path
        self._chunk_size = check_chunk_size(chunk_size)
        self._audit = audit
        self._manifest = manifest_to_proto(artifact.manifest, read_signature(artifact), self._chunk_size)
        self._bn_stats = bn_stats_message(artifact)

    def _record(self, rpc: str, bytes_sent: int, outcome: str) -> None:
        if self._audit is not None:
            self._audit.record(
                site=current_site(), rpc=rpc, model_sha256=self._weights.sha256, bytes_sent=bytes_sent, outcome=outcome
            )

    def _chunks(self, request: pb.FetchWeightsRequest) -> Generator[pb.WeightsChunk, None, None]:
        check_digest(request.sha256, self._weights)
        check_offset(request.offset, self._weights.size)
        with self._weights_path.open("rb") as handle:
            yield from iter_chunks(handle, request.offset, self._weights.size, self._chunk_size)

    def GetManifest(self, request: pb.GetManifestRequest, context: grpc.ServicerContext) -> pb.Manifest:
        """The pre-built manifest message: the signed bytes never pass through a re-encoder."""
        self._record("GetManifest", self._manifest.ByteSize(), "OK")
        return self._manifest

    def GetBatchNormStats(
        self, request: pb.GetBatchNormStatsRequest, context: grpc.ServicerContext
    ) -> pb.BatchNormStats:
        """Statistics computed once at start, only for the digest this server serves."""
        check = lambda: check_digest(request.sha256, self._weights)  # noqa: E731
        _translated(context, check, lambda outcome: self._record("GetBatchNormStats", 0, outcome))
        self._record("GetBatchNormStats", self._bn_stats.ByteSize(), "OK")
        return self._bn_stats

    def FetchWeights(self, request: pb.FetchWeightsRequest, context: grpc.ServicerContext) -> Iterator[pb.WeightsChunk]:
        """Stream the weights from ``request.offset``; one chunk in memory at a time."""
        chunks, sent, finished = self._chunks(request), 0, False

        def finish(outcome: str) -> None:
            nonlocal finished
            finished = True
            self._record("FetchWeights", sent, outcome)

        try:
            while context.is_active():  # a cancelled or expired stream stops reading the disk
                chunk = _translated(context, lambda: next(chunks, None), finish)
                if chunk is None:
                    return finish("OK")
                yield chunk
                sent += len(chunk.data)
        finally:
            chunks.close()
            if not finished:
                finish("CANCELLED")
