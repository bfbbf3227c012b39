"""Fuzzing every RPC of a real ``xkt-server`` over TLS: no crash, no hang, and still serving.

What is proven, for ``GetManifest``, ``GetBatchNormStats``, ``FetchWeights``, the health
service's ``Check`` and ``Watch``, and for methods that do not exist:

* every input ends in the status a correct server owes it, computed here independently
  (an oracle, not just "some status"): UNAUTHENTICATED without the right bearer token,
  INVALID_ARGUMENT for malformed wire data or a malformed digest or offset, NOT_FOUND for
  another model's digest, UNIMPLEMENTED for an unknown method, OK with exactly the right
  bytes otherwise; RESOURCE_EXHAUSTED only for metadata beyond gRPC's size limit;
* so never UNKNOWN or INTERNAL, never a traceback in the details, and never an error or
  exception in the server's log (a handler on the ``grpc`` and ``xkt`` loggers);
* no hang: every call has a deadline, DEADLINE_EXCEEDED counts as a hang, and each test
  has a time bound that scales with ``XKT_FUZZ_EXAMPLES``;
* afterwards the server still reports SERVING, a normal fetch returns the signed digest,
  and its audit log's hash chain still verifies.

How: one in-process ``run_server`` (TLS, token auth, audit log) on 127.0.0.1 port 0, and a
raw channel whose serializers are ``None``, so hypothesis' bytes reach the server's
protobuf parser exactly as generated (random and mutated bodies: ``fuzz_wire``).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st

from xkt.protos import source_model_pb2 as pb
from xkt.server.audit_log import verify_log
from xkt.server.servicer import WATCH_UNIMPLEMENTED
from xkt.server.serving import SERVICE_NAME, RunningServer, ServeConfig, run_server
from xkt.shared.grpc_options import MIN_CHUNK_BYTES, client_options
from xkt.shared.models import ArchSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fuzz_support import FUZZ, Stopwatch, tally, time_bound_s  # noqa: E402
from fuzz_wire import Metadata, field, metadata, offsets, request_bodies, sha256_texts, varint  # noqa: E402
from owner_fixtures import OwnerFiles, make_owner  # noqa: E402

ARCH = ArchSpec("resnet_tiny", num_classes=3)  # ~390 KB of weights: 7 chunks of 64 KiB per full fetch
DEADLINE_S = 5.0
METADATA_SOFT_LIMIT = 8 * 1024  # above it gRPC refuses a call RESOURCE_EXHAUSTED at random; always above 16 KiB
GRPC_OWN_HEADERS = 1024  # :path, :authority, te, user-agent, grpc-timeout, ... (~540 bytes as gRPC counts them)
SOURCE_MODEL = f"/{SERVICE_NAME}/"
HEALTH = "/grpc.health.v1.Health/"
Code = grpc.StatusCode

pytestmark = pytest.mark.timeout(time_bound_s())


# ------------------------------------------------------------------ the server under test


class ServerErrors(logging.Handler):
    """Every ERROR the server logs (an exception in a handler, a request it could not parse)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        found, self.records = self.records, []
        return [record.getMessage() for record in found]


@dataclass(frozen=True, repr=False)
class Served:
    """A running server, a raw channel to it, and the replies a correct server gives."""

    owner: OwnerFiles
    running: RunningServer
    channel: grpc.Channel
    errors: ServerErrors
    weights: bytes
    manifest_reply: bytes
    bn_stats_reply: bytes

    def __repr__(self) -> str:  # hypothesis prints it with every failing input
        return f"Served(port={self.running.port}, sha256={self.sha256[:12]})"

    @property
    def sha256(self) -> str:
        return self.owner.sha256


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    owner = make_owner(tmp_path_factory.mktemp("fuzz-rpc"), arch=ARCH, class_names=["a", "b", "c"])
    errors = ServerErrors()
    loggers = [logging.getLogger("grpc"), logging.getLogger("xkt")]
    for logger in loggers:
        logger.addHandler(errors)
    config = owner.serve_config(audit_log=owner.root / "audit.jsonl", chunk_size=MIN_CHUNK_BYTES)
    creds = grpc.ssl_channel_credentials(root_certificates=owner.pki.ca.cert)
    try:
        with (
            run_server(config) as running,
            grpc.secure_channel(f"127.0.0.1:{running.port}", creds, options=client_options()) as channel,
        ):
            token = (("authorization", f"Bearer {owner.token}"),)
            manifest = call_unary(channel, "GetManifest", b"", token)
            bn_request = pb.GetBatchNormStatsRequest(sha256=owner.sha256).SerializeToString()
            bn_stats = call_unary(channel, "GetBatchNormStats", bn_request, token)
            assert manifest.code == bn_stats.code == Code.OK
            weights = (owner.model_dir / "weights.safetensors").read_bytes()
            yield Served(owner, running, channel, errors, weights, manifest.messages[0], bn_stats.messages[0])
    finally:
        for logger in loggers:
            logger.removeHandler(errors)


# ------------------------------------------------------------------ raw calls and the oracle


@dataclass(frozen=True)
class Reply:
    code: grpc.StatusCode
    details: str
    messages: list[bytes]


def _path(method: str) -> str:
    return method if method.startswith("/") else SOURCE_MODEL + method


def call_unary(channel: grpc.Channel, method: str, body: bytes, md: Metadata) -> Reply:
    """Send ``body`` as it is (no serializer) and return the status and the raw reply."""
    stub = channel.unary_unary(_path(method), request_serializer=None, response_deserializer=None)
    try:
        return Reply(Code.OK, "", [stub(body, timeout=DEADLINE_S, metadata=md)])
    except grpc.RpcError as err:
        return Reply(err.code(), err.details() or "", [])


def call_stream(channel: grpc.Channel, method: str, body: bytes, md: Metadata, *, first_only: bool = False) -> Reply:
    """Like :func:`call_unary` for a response stream; ``first_only`` cancels after one message (Watch)."""
    stub = channel.unary_stream(_path(method), request_serializer=None, response_deserializer=None)
    call = stub(body, timeout=DEADLINE_S, metadata=md)
    messages: list[bytes] = []
    try:
        for message in call:
            messages.append(message)
            if first_only:
                call.cancel()
                break
    except grpc.RpcError as err:
        if not (first_only and messages and err.code() == Code.CANCELLED):
            return Reply(err.code(), err.details() or "", messages)
    return Reply(Code.OK, "", messages)


def parsed(message_type: type[Message], body: bytes) -> Message | None:
    """The request as the server's protobuf parser sees it, or None if it cannot be parsed."""
    try:
        return message_type.FromString(body)
    except DecodeError:
        return None


def authenticated(md: Metadata, token: str) -> bool:
    """What the server decides: the first ``authorization: Bearer …`` entry carries the token."""
    for key, value in md:
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :] == token
    return False


def metadata_size(md: Metadata) -> int:
    """Metadata bytes as gRPC counts them: key + value + 32 per entry, binary values base64-encoded."""
    return sum(
        len(key) + (len(value) * 4 // 3 + 4 if isinstance(value, bytes) else len(value)) + 32 for key, value in md
    )


def well_formed_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def expect(target: str, reply: Reply, owed: grpc.StatusCode, seconds: float, md: Metadata, served: Served) -> None:
    """Record the input, then fail on a hang, a server error log, or any status but the one owed."""
    big_metadata = metadata_size(md) + GRPC_OWN_HEADERS > METADATA_SOFT_LIMIT
    allowed = {owed, Code.RESOURCE_EXHAUSTED} if big_metadata else {owed}
    server_errors = served.errors.take()
    hang = reply.code == Code.DEADLINE_EXCEEDED
    leaked = "Traceback" in reply.details or 'File "' in reply.details
    crash = not hang and (reply.code not in allowed or leaked or bool(server_errors))
    tally(target).record(reply.code.name, seconds, crash=crash, hang=hang)
    assert not hang, f"{target}: no reply within {DEADLINE_S} s"
    assert not server_errors, f"{target}: the server logged errors: {server_errors}"
    assert reply.code in allowed and not leaked, f"{target}: {reply.code.name} {reply.details!r}, owed {owed.name}"


def owed_for_digest(request: Message | None, md: Metadata, served: Served) -> grpc.StatusCode:
    """The status owed to a request whose ``sha256`` field names the model (BN stats, fetch)."""
    if not authenticated(md, served.owner.token):
        return Code.UNAUTHENTICATED
    if request is None or not well_formed_sha256(request.sha256):  # type: ignore[attr-defined]
        return Code.INVALID_ARGUMENT
    if request.sha256 != served.sha256:  # type: ignore[attr-defined]
        return Code.NOT_FOUND
    return Code.OK


# ------------------------------------------------------------------ coverage of the contract

FUZZED_METHODS = {
    f"{SOURCE_MODEL}GetManifest",
    f"{SOURCE_MODEL}GetBatchNormStats",
    f"{SOURCE_MODEL}FetchWeights",
    f"{HEALTH}Check",
    f"{HEALTH}Watch",
}


def test_every_rpc_of_the_server_has_a_fuzz_target() -> None:
    """A new RPC in protos/ (or in grpc's health service) fails here until it is fuzzed below."""
    services = [pb.DESCRIPTOR.services_by_name["SourceModel"], health_pb2.DESCRIPTOR.services_by_name["Health"]]
    served_methods = {f"/{service.full_name}/{method.name}" for service in services for method in service.methods}
    assert served_methods == FUZZED_METHODS


# ------------------------------------------------------------------ the fuzz targets


@dataclass(frozen=True)
class Inputs:
    """Strategies that need the running server's digest, size and token (drawn with ``st.data()``)."""

    md: st.SearchStrategy[Metadata]
    manifest: st.SearchStrategy[bytes]
    bn_stats: st.SearchStrategy[bytes]
    fetch: st.SearchStrategy[bytes]
    health: st.SearchStrategy[bytes]


@pytest.fixture(scope="module")
def inputs(served: Served) -> Inputs:
    sha, size = served.sha256, len(served.weights)
    structured_fetch = st.builds(
        lambda s, o: pb.FetchWeightsRequest(sha256=s, offset=o).SerializeToString(), sha256_texts(sha), offsets(size)
    )
    right_digest = st.builds(  # the handler's own checks: every offset against the served digest
        lambda o: pb.FetchWeightsRequest(sha256=sha, offset=o).SerializeToString(), offsets(size)
    )
    negative_offset = st.builds(  # what a client with a signed int64 offset would send
        lambda o: pb.FetchWeightsRequest(sha256=sha).SerializeToString() + field(2, 0, varint(o)),
        st.integers(-(2**63), -1),
    )
    services = st.one_of(st.sampled_from(["", SERVICE_NAME, SERVICE_NAME + " ", "xkt.v1"]), st.text(max_size=64))
    return Inputs(
        md=metadata(served.owner.token),
        manifest=request_bodies(st.just(b"")),
        bn_stats=request_bodies(
            st.builds(lambda s: pb.GetBatchNormStatsRequest(sha256=s).SerializeToString(), sha256_texts(sha))
        ),
        fetch=st.one_of(request_bodies(structured_fetch), right_digest, negative_offset),
        health=request_bodies(
            st.builds(lambda s: health_pb2.HealthCheckRequest(service=s).SerializeToString(), services)
        ),
    )


@FUZZ
@given(data=st.data())
def test_get_manifest(served: Served, inputs: Inputs, data: st.DataObject) -> None:
    body, md = data.draw(inputs.manifest, "body"), data.draw(inputs.md, "metadata")
    with Stopwatch() as watch:
        reply = call_unary(served.channel, "GetManifest", body, md)
    if not authenticated(md, served.owner.token):
        owed = Code.UNAUTHENTICATED
    else:
        owed = Code.OK if parsed(pb.GetManifestRequest, body) is not None else Code.INVALID_ARGUMENT
    expect("GetManifest", reply, owed, watch.seconds, md, served)
    if reply.code == Code.OK:
        assert reply.messages == [served.manifest_reply]


@FUZZ
@given(data=st.data())
def test_get_batchnorm_stats(served: Served, inputs: Inputs, data: st.DataObject) -> None:
    body, md = data.draw(inputs.bn_stats, "body"), data.draw(inputs.md, "metadata")
    with Stopwatch() as watch:
        reply = call_unary(served.channel, "GetBatchNormStats", body, md)
    owed = owed_for_digest(parsed(pb.GetBatchNormStatsRequest, body), md, served)
    expect("GetBatchNormStats", reply, owed, watch.seconds, md, served)
    if reply.code == Code.OK:
        assert reply.messages == [served.bn_stats_reply]


@FUZZ
@given(data=st.data())
def test_fetch_weights(served: Served, inputs: Inputs, data: st.DataObject) -> None:
    body, md = data.draw(inputs.fetch, "body"), data.draw(inputs.md, "metadata")
    with Stopwatch() as watch:
        reply = call_stream(served.channel, "FetchWeights", body, md)
    request = parsed(pb.FetchWeightsRequest, body)
    owed = owed_for_digest(request, md, served)
    if owed == Code.OK and request.offset > len(served.weights):  # type: ignore[union-attr]
        owed = Code.INVALID_ARGUMENT
    expect("FetchWeights", reply, owed, watch.seconds, md, served)
    if reply.code == Code.OK:
        assert request is not None
        chunks = [pb.WeightsChunk.FromString(raw) for raw in reply.messages]
        assert b"".join(chunk.data for chunk in chunks) == served.weights[request.offset :]  # type: ignore[attr-defined]
        assert all(chunk.sha256 == hashlib.sha256(chunk.data).hexdigest() for chunk in chunks)


# ------------------------------------------------------------------ grpc.health.v1.Health (no credentials)


def _owed_health(request: Message | None) -> tuple[grpc.StatusCode, int | None]:
    """Status and serving status owed to a health request: known services SERVING, others unknown."""
    if request is None:
        return Code.INVALID_ARGUMENT, None
    known = request.service in ("", SERVICE_NAME)  # type: ignore[attr-defined]
    return (Code.OK, health_pb2.HealthCheckResponse.SERVING) if known else (Code.NOT_FOUND, None)


@FUZZ
@given(data=st.data())
def test_health_check(served: Served, inputs: Inputs, data: st.DataObject) -> None:
    body, md = data.draw(inputs.health, "body"), data.draw(inputs.md, "metadata")
    with Stopwatch() as watch:
        reply = call_unary(served.channel, HEALTH + "Check", body, md)
    owed, status = _owed_health(parsed(health_pb2.HealthCheckRequest, body))
    expect("Health.Check", reply, owed, watch.seconds, md, served)
    if reply.code == Code.OK:
        assert health_pb2.HealthCheckResponse.FromString(reply.messages[0]).status == status


@FUZZ
@given(data=st.data())
def test_health_watch(served: Served, inputs: Inputs, data: st.DataObject) -> None:
    """Watch is refused UNIMPLEMENTED (it could deadlock the server), malformed requests INVALID_ARGUMENT."""
    body, md = data.draw(inputs.health, "body"), data.draw(inputs.md, "metadata")
    with Stopwatch() as watch:
        reply = call_stream(served.channel, HEALTH + "Watch", body, md, first_only=True)
    request = parsed(health_pb2.HealthCheckRequest, body)
    expect("Health.Watch", reply, Code.UNIMPLEMENTED if request else Code.INVALID_ARGUMENT, watch.seconds, md, served)


# ------------------------------------------------------------------ beyond the contract


@FUZZ
@given(data=st.data())
def test_methods_that_do_not_exist(served: Served, inputs: Inputs, data: st.DataObject) -> None:
    name = data.draw(st.from_regex(r"[A-Za-z0-9_.]{0,40}", fullmatch=True), "name")
    path = data.draw(st.sampled_from([SOURCE_MODEL, HEALTH, "/", "/xkt.v2.SourceModel/"]), "service") + name
    body, md = data.draw(st.binary(max_size=256), "body"), data.draw(inputs.md, "metadata")
    if path in FUZZED_METHODS:
        return
    with Stopwatch() as watch:
        reply = call_unary(served.channel, path, body, md)
    expect("unknown method", reply, Code.UNIMPLEMENTED, watch.seconds, md, served)


@pytest.mark.parametrize("method", sorted(FUZZED_METHODS))
def test_a_request_over_the_message_size_limit_is_refused(served: Served, method: str) -> None:
    """4 MiB + 1 byte: refused by gRPC's receive limit before any parser sees it."""
    creds = grpc.ssl_channel_credentials(root_certificates=served.owner.pki.ca.cert)
    options = [("grpc.max_send_message_length", -1)]
    md: Metadata = (("authorization", f"Bearer {served.owner.token}"),)
    with (
        grpc.secure_channel(f"127.0.0.1:{served.running.port}", creds, options=options) as channel,
        Stopwatch() as watch,
    ):
        reply = call_unary(channel, method, b"\x0a" + b"\xff" * (4 * 1024 * 1024), md)
    expect("oversized body", reply, Code.RESOURCE_EXHAUSTED, watch.seconds, md, served)


def test_malformed_wire_data_is_invalid_argument_not_internal(served: Served) -> None:
    """Regression: gRPC answers a request it cannot parse with INTERNAL and logs a traceback."""
    md: Metadata = (("authorization", f"Bearer {served.owner.token}"),)
    for method in sorted(FUZZED_METHODS):
        with Stopwatch() as watch:
            reply = call_unary(served.channel, method, b"\x0a\x05ab", md)  # a field 5 bytes long, 2 bytes sent
        expect("malformed wire data", reply, Code.INVALID_ARGUMENT, watch.seconds, md, served)
        assert reply.details == "malformed request message"


def test_many_watch_calls_leave_the_server_serving(served: Served) -> None:
    """Regression: opening and cancelling Watch streams fast deadlocked gRPC's event thread (10k-input run)."""
    md: Metadata = (("authorization", f"Bearer {served.owner.token}"),)
    request = health_pb2.HealthCheckRequest(service="").SerializeToString()
    for _ in range(3 * ServeConfig.max_workers):
        reply = call_stream(served.channel, HEALTH + "Watch", request, (), first_only=True)
        assert (reply.code, reply.details) == (Code.UNIMPLEMENTED, WATCH_UNIMPLEMENTED)
    with Stopwatch() as stopwatch:
        reply = call_unary(served.channel, "GetManifest", b"", md)
    expect("GetManifest after Watch calls", reply, Code.OK, stopwatch.seconds, md, served)


# ------------------------------------------------------------------ afterwards


def test_the_server_still_serves_after_fuzzing(served: Served) -> None:
    """Runs last in this module: health SERVING, a normal fetch has the signed digest, the audit chain holds."""
    creds = grpc.ssl_channel_credentials(root_certificates=served.owner.pki.ca.cert)
    with grpc.secure_channel(f"127.0.0.1:{served.running.port}", creds, options=client_options()) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE_S
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        md = (("authorization", f"Bearer {served.owner.token}"),)
        manifest = pb.Manifest.FromString(call_unary(channel, "GetManifest", b"", md).messages[0])
        request = pb.FetchWeightsRequest(sha256=manifest.weights_sha256, offset=0).SerializeToString()
        reply = call_stream(channel, "FetchWeights", request, md)
    weights = b"".join(pb.WeightsChunk.FromString(raw).data for raw in reply.messages)
    assert hashlib.sha256(weights).hexdigest() == manifest.weights_sha256 == served.sha256
    assert served.errors.take() == []
    log = verify_log(served.owner.root / "audit.jsonl")
    assert log.ok and log.entries > 0, log
