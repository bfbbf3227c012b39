"""The site's gRPC channel to an owner's server, and the one place gRPC errors become XktErrors.

Secure by default, mirroring ``xkt-server serve`` (DESIGN.md, "Transport security"):

* TLS, trusting ``--ca-cert`` (or the kit's ``ca.crt``); ``--server-name`` overrides the
  name checked against the server certificate (and sent as SNI / authority).
* Mutual TLS with ``--client-cert/--client-key`` or a site kit (``--kit DIR``).
* A bearer token read from ``--token-file`` or ``XKT_TOKEN``, never from the command line
  (it would be visible in ``ps`` and shell history); it rides on call credentials, which
  gRPC only sends over TLS.
* Plaintext only with ``--insecure``, and only to a loopback address unless
  ``--force-insecure`` (a token in clear text on a network is a leaked token).

Every unary call has a deadline and is retried by gRPC itself on UNAVAILABLE (they are
idempotent reads); the weights stream is never retried here, because the caller resumes
it from the bytes it holds.  A stream that delivers no chunk for ``chunk_idle_s`` is
cancelled, so a stalled server cannot hang a fetch for the whole stream deadline.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped, unused-ignore]  # no stubs in the dev deps yet
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped, unused-ignore]

from xkt.client.tls_diagnosis import explain_handshake_failure
from xkt.protos import source_model_pb2 as pb
from xkt.protos import source_model_pb2_grpc as pb_grpc
from xkt.shared.addresses import is_loopback, split_address
from xkt.shared.errors import AuthError, ConfigError, TransportError, VerificationError, XktError
from xkt.shared.files import FileReasons, read_bounded_file
from xkt.shared.grpc_options import AUTH_METADATA_KEY, STREAM_DEADLINE_S, UNARY_DEADLINE_S, client_options
from xkt.shared.tls import REASON_METADATA_KEY, REVOKED_REASON
from xkt.shared.tls_checks import load_tls_identity, load_trust_anchors

TOKEN_ENV = "XKT_TOKEN"
SERVICE = "xkt.v1.SourceModel"
CHUNK_IDLE_S = 60.0
"""A weights stream with no chunk for this long is cancelled (and resumed by the caller)."""
MAX_TOKEN_BYTES = 4096
_IDEMPOTENT = ("GetManifest", "GetBatchNormStats")
RECONNECT_BACKOFF: list[tuple[str, int | str]] = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]
"""One site, one server: after a network cut, notice within 5 s that it healed (gRPC's default waits up to 120 s)."""


@dataclass(frozen=True)
class ChannelOptions:
    """How to reach and authenticate to one server; see the module docstring for the rules."""

    server: str
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    token: str | None = field(default=None, repr=False)
    insecure: bool = False
    force_insecure: bool = False
    server_name: str | None = None
    unary_deadline_s: float = UNARY_DEADLINE_S
    stream_deadline_s: float = STREAM_DEADLINE_S
    chunk_idle_s: float = CHUNK_IDLE_S
    unary_attempts: int = 3

    @property
    def mode(self) -> str:
        """What a person reads in a log line: plaintext, TLS or mutual TLS, and token or not."""
        base = "PLAINTEXT" if self.insecure else "mutual TLS" if self.client_cert else "TLS"
        return base + (" + token" if self.token else "")


# ------------------------------------------------------------------ options from the CLI


def split_server(server: str) -> tuple[str, int]:
    """The client's ``--server HOST:PORT`` as (host, port)."""
    return split_address(server, option="--server", example="owner.example.org:50051 or 127.0.0.1:50051")


def read_token(token_file: Path | None) -> str | None:
    """The bearer token from ``token_file`` (0600, first line) or ``XKT_TOKEN``; None if neither."""
    if token_file is None:
        return os.environ.get(TOKEN_ENV) or None
    data = _read_secret_file(token_file)
    token = data.decode("utf-8", "replace").strip().splitlines()[0].strip() if data.strip() else ""
    if not token or not token.isprintable() or " " in token:
        raise ConfigError(
            f"token file {token_file} holds no usable token",
            hint="put the token printed by `xkt-server tokens add` on the first line of the file",
            reason="bad-token-file",
        )
    return token


def _read_secret_file(path: Path) -> bytes:
    """A small secret file that only its owner may read (same rules as a private key)."""
    reasons = FileReasons("tls-file-not-found", "tls-file-unreadable", "tls-not-a-file", "bad-token-file")
    hint = "pass the file `xkt-server tokens add` printed the token into"
    return read_bounded_file(
        path, what="token", limit=MAX_TOKEN_BYTES, private=True, reasons=reasons, missing_hint=hint
    )


def options_from_cli(
    *,
    server: str,
    ca_cert: Path | None,
    client_cert: Path | None,
    client_key: Path | None,
    kit: Path | None,
    token_file: Path | None,
    insecure: bool,
    force_insecure: bool,
    server_name: str | None,
) -> ChannelOptions:
    """Resolve the CLI flags (a kit fills in what was not given) and check their combination."""
    if kit is not None:
        ca_cert = ca_cert or kit / "ca.crt"
        client_cert = client_cert or kit / "site.crt"
        client_key = client_key or kit / "site.key"
    opts = ChannelOptions(
        server=server,
        ca_cert=ca_cert,
        client_cert=client_cert,
        client_key=client_key,
        token=read_token(token_file),
        insecure=insecure,
        force_insecure=force_insecure,
        server_name=server_name,
    )
    check_options(opts)
    return opts


def check_options(opts: ChannelOptions) -> None:
    """Refuse combinations that would be insecure or cannot work, before any connection."""
    host, _ = split_server(opts.server)
    if opts.insecure and not is_loopback(host) and not opts.force_insecure:
        raise ConfigError(
            f"refusing a plaintext connection to non-loopback address {host}",
            hint="drop --insecure and pass --ca-cert (or --kit); --force-insecure overrides this",
            reason="insecure-non-loopback",
        )
    if opts.insecure and (opts.client_cert or opts.ca_cert):
        raise ConfigError(
            "--insecure cannot be combined with TLS files",
            hint="drop --insecure to use TLS, or drop --ca-cert/--client-cert/--kit",
            reason="insecure-with-tls",
        )
    if (opts.client_cert is None) != (opts.client_key is None):
        raise ConfigError(
            "mutual TLS needs both --client-cert and --client-key",
            hint="pass both, or --kit DIR with site.crt and site.key",
            reason="half-client-identity",
        )
    if not opts.insecure and opts.ca_cert is None:
        raise ConfigError(
            "TLS needs the owner's CA certificate to trust the server",
            hint="pass --ca-cert ca.crt (from the site kit) or --kit DIR; --insecure only for a loopback test",
            reason="missing-ca-cert",
        )


# ------------------------------------------------------------------ building the channel


class _BearerAuth(grpc.AuthMetadataPlugin):  # type: ignore[misc, unused-ignore]
    """Adds ``authorization: Bearer <token>`` to every call (gRPC sends it over TLS only)."""

    def __init__(self, token: str) -> None:
        self._metadata = ((AUTH_METADATA_KEY, f"Bearer {token}"),)

    def __call__(self, context: Any, callback: Any) -> None:
        callback(self._metadata, None)


class _PlaintextBearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc, unused-ignore]
    """The token on a plaintext channel (loopback tests only): call credentials need TLS."""

    def __init__(self, token: str) -> None:
        self._pair = (AUTH_METADATA_KEY, f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._pair]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)


@dataclass(frozen=True)
class _Details(grpc.ClientCallDetails):  # type: ignore[misc, unused-ignore]
    """ClientCallDetails with other metadata (gRPC's own class is not always a namedtuple)."""

    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: Any
    wait_for_ready: bool | None
    compression: Any

    def __init__(self, base: Any, metadata: Sequence[tuple[str, str]]) -> None:
        for name in ("method", "timeout", "credentials", "wait_for_ready", "compression"):
            object.__setattr__(self, name, getattr(base, name, None))
        object.__setattr__(self, "metadata", metadata)


def _service_config(attempts: int) -> str:
    """gRPC's own retry policy, for the idempotent unary calls only (never the stream)."""
    names = [{"service": SERVICE, "method": m} for m in _IDEMPOTENT]
    names.append({"service": "grpc.health.v1.Health", "method": "Check"})
    policy = {
        "maxAttempts": attempts,
        "initialBackoff": "0.2s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def _credentials(opts: ChannelOptions) -> grpc.ChannelCredentials:
    """TLS credentials; the CA and our own certificate + key are checked first (expired, weak, mismatched)."""
    assert opts.ca_cert is not None  # check_options ran
    root = load_trust_anchors(opts.ca_cert, what="CA certificate")
    key = chain = None
    if opts.client_cert is not None and opts.client_key is not None:
        chain, key = load_tls_identity(opts.client_cert, opts.client_key, what="client certificate")
    creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)
    if opts.token:
        creds = grpc.composite_channel_credentials(creds, grpc.metadata_call_credentials(_BearerAuth(opts.token)))
    return creds


def open_channel(opts: ChannelOptions, interceptors: Sequence[Any] = ()) -> grpc.Channel:
    """A channel with paired keepalive, small message limits and retries for idempotent calls.

    ``interceptors`` (for example the egress guard) see every request before it is sent.
    """
    check_options(opts)
    options: list[tuple[str, int | str]] = [*client_options(), *RECONNECT_BACKOFF]
    if opts.unary_attempts >= 2:  # gRPC rejects a retry policy of fewer than two attempts
        options += [("grpc.enable_retries", 1), ("grpc.service_config", _service_config(opts.unary_attempts))]
    if opts.server_name:
        options += [("grpc.ssl_target_name_override", opts.server_name), ("grpc.default_authority", opts.server_name)]
    if opts.insecure:
        channel = grpc.insecure_channel(opts.server, options=options)
        extra = [_PlaintextBearer(opts.token)] if opts.token else []
    else:
        channel = grpc.secure_channel(opts.server, _credentials(opts), options=options)
        extra = []
    return grpc.intercept_channel(channel, *interceptors, *extra) if interceptors or extra else channel


# ------------------------------------------------------------------ errors


def _tls_hint(debug: str, opts: ChannelOptions) -> tuple[str, str, str] | None:
    """gRPC's own handshake text (not ours) tells trust, name and client-cert failures apart."""
    text = debug.lower()
    if "hostname verification" in text or "peer name" in text and "not in peer certificate" in text:
        name = opts.server_name or split_server(opts.server)[0]
        return (
            f"the server certificate is not valid for the name {name!r} (hostname mismatch)",
            "dial the name in the server certificate, or pass --server-name NAME that the certificate lists",
            "tls-hostname-mismatch",
        )
    if "certificate_verify_failed" in text or "certificate verify failed" in text:
        return (
            "the server's TLS certificate is not signed by the trusted CA (untrusted server CA)",
            f"pass the owner's ca.crt with --ca-cert (now: {opts.ca_cert}); check you dial the right server",
            "tls-untrusted-server",
        )
    if "certificate_required" in text or "alert" in text and "certificate" in text or "bad_certificate" in text:
        return (
            "the server refused our client certificate during the TLS handshake",
            "use the site kit issued by this owner (--kit DIR or --client-cert/--client-key)",
            "tls-client-cert-refused",
        )
    if "handshake" in text or "ssl" in text or "tsi_" in text:
        mode = "plaintext" if opts.insecure else "TLS"
        return (
            f"the TLS handshake failed ({mode} client)",
            "the server may speak the other protocol: drop --insecure for a TLS server, or check --ca-cert/--kit",
            "tls-handshake-failed",
        )
    return None


def _closed(opts: ChannelOptions, call: str) -> TransportError:
    """The server hung up during connection set-up: in practice a TLS mismatch of some kind."""
    if opts.insecure:
        message, hint = "closed the plaintext connection (it probably expects TLS)", "drop --insecure; pass --ca-cert"
    elif opts.client_cert is not None:
        message = "closed the connection during the TLS handshake: it refused our client certificate"
        hint = "use the site kit issued by this server's owner (--kit DIR); a certificate from another CA is refused"
    else:
        message = "closed the connection during the TLS handshake (it may require mutual TLS)"
        hint = "pass the site kit with --kit DIR (or --client-cert/--client-key), or check --server"
    return TransportError(f"{call}: {opts.server} {message}", hint=hint, reason="tls-handshake-failed")


def _unavailable(error: grpc.RpcError, opts: ChannelOptions, call: str) -> XktError:
    debug = f"{error.details() or ''} {getattr(error, 'debug_error_string', lambda: '')() or ''}"
    tls = _tls_hint(debug, opts)
    if not opts.insecure and (tls is not None or "socket closed" in debug.lower()):
        explained = explain_handshake_failure(
            opts.server, server_name=opts.server_name, ca_cert=opts.ca_cert, client_cert=opts.client_cert
        )
        if explained is not None:  # gRPC's words do not say why; a probe of the server's certificate does
            message, hint, reason = explained
            return TransportError(f"{call} to {opts.server}: {message}", hint=hint, reason=reason)
    if tls is not None:
        message, hint, reason = tls
        return TransportError(f"{call} to {opts.server}: {message}", hint=hint, reason=reason)
    if "connection refused" in debug.lower() or "connect failed" in debug.lower():
        return TransportError(
            f"{call}: connection refused by {opts.server}",
            hint="check the address and port, and that `xkt-server serve` is running there",
            reason="connection-refused",
        )
    if "socket closed" in debug.lower():
        return _closed(opts, call)
    return TransportError(
        f"{call}: server {opts.server} is unavailable ({(error.details() or 'no details')[:200]})",
        hint="check the network path and that the server is running; a fetch resumes where it stopped",
        reason="unavailable",
    )


def _server_reason(error: grpc.RpcError) -> str:
    """The ``xkt-reason`` trailer an xkt server attaches to a refusal (a slug, never free text), or ""."""
    trailers = getattr(error, "trailing_metadata", lambda: None)() or ()
    return next((str(value) for key, value in trailers if key == REASON_METADATA_KEY), "")


def rpc_error(error: grpc.RpcError, opts: ChannelOptions, call: str) -> XktError:
    """The ONE mapping from a gRPC status to an XktError (and so to an exit code)."""
    code, details = error.code(), (error.details() or "")[:200]
    if code == grpc.StatusCode.UNAVAILABLE:
        return _unavailable(error, opts, call)
    if code == grpc.StatusCode.UNAUTHENTICATED and _server_reason(error) == REVOKED_REASON:
        return AuthError(
            f"{call}: the server refused our site certificate: it has been revoked by the owner ({details})",
            hint="ask the owner for a new site kit (`xkt-server provision add-site` after the revocation)",
            reason=REVOKED_REASON,
        )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AuthError(
            f"{call}: the server refused our identity ({details})",
            hint="check --token-file / XKT_TOKEN or the site kit (--kit) issued by this owner",
            reason="refused-identity" if code == grpc.StatusCode.UNAUTHENTICATED else "permission-denied",
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TransportError(
            f"{call}: no answer from {opts.server} before the deadline",
            hint="the server or the network is slow or stalled; retry (a fetch resumes where it stopped)",
            reason="deadline-exceeded",
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return VerificationError(
            f"{call}: the server does not serve the requested weights ({details})",
            hint="the owner replaced the model meanwhile; fetch again to get the current manifest",
            reason="not-served",
        )
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return ConfigError(
            f"{call}: the server rejected the request ({details})",
            hint="the cache may hold a damaged partial download; delete CACHE/<sha>.part and fetch again",
            reason="request-rejected",
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return TransportError(
            f"{call}: {opts.server} is not an xkt model server", hint="check --server", reason="unimplemented"
        )
    return TransportError(
        f"{call} failed: {code.name} ({details})",
        hint="retry; if it persists, ask the owner to check the server log",
        reason=code.name.lower(),
    )


# ------------------------------------------------------------------ the typed client


class SourceModelClient:
    """The three RPCs plus health, with deadlines, an idle watchdog and error translation."""

    def __init__(self, channel: grpc.Channel, opts: ChannelOptions) -> None:
        self._channel = channel
        self._stub = pb_grpc.SourceModelStub(channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(channel)
        self.opts = opts

    def _unary(self, call: str, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=self.opts.unary_deadline_s)
        except grpc.RpcError as error:
            raise rpc_error(error, self.opts, call) from None

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the channel is connected again (gRPC reconnects with backoff); False after ``timeout_s``.

        A call made while the channel is down fails at once, so a resume right after a
        network cut would spend every attempt in milliseconds; waiting here first lets
        the cut heal.
        """
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            return False
        return True

    def get_manifest(self) -> pb.Manifest:
        """The signed manifest as the server sends it (verify before trusting any field)."""
        return self._unary("GetManifest", self._stub.GetManifest, pb.GetManifestRequest())  # type: ignore[no-any-return]

    def get_batchnorm_stats(self, sha256: str) -> pb.BatchNormStats:
        """Batch-norm statistics of the weights with digest ``sha256``."""
        request = pb.GetBatchNormStatsRequest(sha256=sha256)
        return self._unary("GetBatchNormStats", self._stub.GetBatchNormStats, request)  # type: ignore[no-any-return]

    def health(self) -> str:
        """The SourceModel service's health status name (SERVING, NOT_SERVING, ...)."""
        reply = self._unary("Health", self._health.Check, health_pb2.HealthCheckRequest(service=SERVICE))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def fetch_weights(self, sha256: str, offset: int) -> Iterator[pb.WeightsChunk]:
        """Chunks from ``offset``; cancelled when one takes longer than ``chunk_idle_s`` to arrive."""
        request = pb.FetchWeightsRequest(sha256=sha256, offset=offset)
        call = self._stub.FetchWeights(request, timeout=self.opts.stream_deadline_s)
        stalled = threading.Event()

        def stall() -> None:
            stalled.set()
            call.cancel()

        received = 0
        try:
            while True:
                timer = threading.Timer(self.opts.chunk_idle_s, stall)
                timer.daemon = True
                timer.start()
                try:
                    chunk = next(call, None)
                finally:
                    timer.cancel()
                if chunk is None:
                    return
                received += 1
                yield chunk
        except grpc.RpcError as error:
            if stalled.is_set():
                raise TransportError(
                    f"FetchWeights: no data from {self.opts.server} for {self.opts.chunk_idle_s:.0f} s",
                    hint="the server or network stalled; fetch again to resume from the bytes already held",
                    reason="stream-stalled",
                ) from None
            if received and error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                # Chunks already arrived, so this is no handshake problem: the server went away.
                raise TransportError(
                    f"FetchWeights: {self.opts.server} went away after {received} chunk(s) "
                    f"({(error.details() or 'no details')[:120]})",
                    hint="fetch again when the server is back: the download resumes from the bytes already held",
                    reason="stream-interrupted",
                ) from None
            raise rpc_error(error, self.opts, "FetchWeights") from None
        finally:
            call.cancel()
