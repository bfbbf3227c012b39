"""``run_server(cfg)``: the gRPC server lifecycle for one verified source model.

Secure by default (DESIGN.md, "Transport security"):

* TLS unless ``insecure=True``; plaintext is refused on any non-loopback address unless
  ``force_insecure=True`` as well, because a plaintext bearer token on a network is a
  leaked token.
* With a client CA, mutual TLS: the handshake requires a client certificate signed by
  that CA, and the certificate's common name is the site identity.
* Without a client CA, sites present bearer tokens (``tokens``); a server with neither
  refuses to start unless ``allow_anonymous=True``, so nobody serves to the world by
  forgetting a flag.

The artifact is verified against the owner's key and its batch-norm statistics loaded
*before* the port is bound; health then goes NOT_SERVING → SERVING once the server is
started, and back to NOT_SERVING (``enter_graceful_shutdown``) when it stops.  In-flight
streams get ``grace_s`` seconds to finish; after that they are cancelled and the
servicer stops reading the disk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc  # type: ignore[import-untyped, unused-ignore]  # no stubs in the dev deps yet
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # type: ignore[import-untyped, unused-ignore]

from xkt.protos import source_model_pb2, source_model_pb2_grpc
from xkt.server.audit_log import AuditLog
from xkt.server.auth import AuthInterceptor, load_tokens
from xkt.server.provision import load_revoked
from xkt.server.servicer import CheckOnlyHealthServicer, MalformedRequestGuard, SourceModelServicer
from xkt.shared.addresses import is_loopback, split_address
from xkt.shared.artifact import verify_artifact
from xkt.shared.errors import ConfigError, TransportError
from xkt.shared.grpc_options import DEFAULT_CHUNK_BYTES, server_options
from xkt.shared.signing import load_public_key
from xkt.shared.tls_checks import load_tls_identity, load_trust_anchors

logger = logging.getLogger("xkt")

SERVICE_NAME = source_model_pb2.DESCRIPTOR.services_by_name["SourceModel"].full_name


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``xkt-server serve`` needs; see the module docstring for the security rules."""

    model_dir: Path
    owner_key: Path
    listen: str = "127.0.0.1:0"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    pki: Path | None = None  # the owner PKI folder: its revoked.json lists refused site certificates
    tokens: Path | None = None
    insecure: bool = False
    force_insecure: bool = False
    allow_anonymous: bool = False
    audit_log: Path | None = None
    chunk_size: int = DEFAULT_CHUNK_BYTES
    max_workers: int = 8  # threads running calls: at most this many chunks are read and in flight at once
    # Calls admitted beyond that wait for a worker (queued, costing only their HTTP/2 state); later ones
    # are refused RESOURCE_EXHAUSTED.  A site holds one call at a time, so this is how many sites may
    # download at once; 4 x 8 workers refused half of 64 sites (benchmarks/serve_load.py).
    max_concurrent_rpcs: int = 256
    grace_s: float = 10.0


@dataclass(frozen=True)
class RunningServer:
    """A started server: the real bound port and the address clients should dial."""

    server: grpc.Server
    port: int
    address: str
    health: health.HealthServicer
    model_sha256: str
    tls: bool
    mtls: bool


def split_host_port(listen: str) -> tuple[str, int]:
    """The server's ``--listen HOST:PORT`` as (host, port); port 0 lets the OS pick one."""
    example = "127.0.0.1:50051, [::1]:50051 or 0.0.0.0:50051 (port 0 picks a free port)"
    return split_address(listen, option="--listen", example=example, allow_port_zero=True)


def check_transport(cfg: ServeConfig) -> None:
    """Refuse configurations that would serve in plaintext to a network or with no identity check."""
    host, _ = split_host_port(cfg.listen)
    if cfg.insecure and not is_loopback(host) and not cfg.force_insecure:
        raise ConfigError(
            f"refusing to serve without TLS on non-loopback address {host}",
            hint="serve with --tls-cert/--tls-key, or listen on 127.0.0.1; "
            "--force-insecure overrides this (tokens would cross the network in clear text)",
            reason="insecure-non-loopback",
        )
    if not cfg.insecure and (cfg.tls_cert is None or cfg.tls_key is None):
        raise ConfigError(
            "TLS needs both --tls-cert and --tls-key",
            hint="pass the server certificate and key (from `xkt-server provision`), or --insecure for a loopback test",
            reason="missing-tls-files",
        )
    if cfg.insecure and cfg.client_ca is not None:
        raise ConfigError(
            "--client-ca (mutual TLS) cannot be combined with --insecure",
            hint="drop --insecure and pass --tls-cert/--tls-key",
            reason="mtls-needs-tls",
        )
    if cfg.client_ca is None and cfg.tokens is None and not cfg.allow_anonymous:
        raise ConfigError(
            "no way to identify sites: neither --client-ca nor --tokens was given",
            hint="pass --tokens FILE (see `xkt-server tokens add`) or --client-ca CA.pem for mutual TLS",
            reason="no-site-auth",
        )


def server_credentials(cfg: ServeConfig) -> grpc.ServerCredentials | None:
    """TLS credentials (requiring client certificates when a client CA is set); None for insecure.

    The certificate, key and client CA are checked first (:mod:`xkt.shared.tls_checks`):
    an expired or not-yet-valid certificate, a weak key or a key of another certificate
    stops the server with a message naming the cause, instead of an opaque handshake
    failure at every client.
    """
    if cfg.insecure:
        return None
    assert cfg.tls_cert is not None and cfg.tls_key is not None  # check_transport ran first
    chain, key = load_tls_identity(cfg.tls_cert, cfg.tls_key, what="server certificate", private=False)
    client_ca = load_trust_anchors(cfg.client_ca, what="client CA") if cfg.client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _bind(server: grpc.Server, cfg: ServeConfig, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            port = server.add_insecure_port(cfg.listen)
        else:
            port = server.add_secure_port(cfg.listen, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise TransportError(
            f"could not listen on {cfg.listen}",
            hint="the port may be in use or the address not local; pick another --listen (port 0 picks a free one)",
            reason="bind-failed",
        )
    return int(port)


@contextmanager
def run_server(cfg: ServeConfig) -> Iterator[RunningServer]:
    """Verify the model, start the server, yield it, and always stop it with ``grace_s``."""
    check_transport(cfg)
    credentials = server_credentials(cfg)
    artifact = verify_artifact(cfg.model_dir, [load_public_key(cfg.owner_key)])
    audit = AuditLog(cfg.audit_log) if cfg.audit_log is not None else None
    servicer = SourceModelServicer(artifact, cfg.chunk_size, audit)
    sha256 = artifact.manifest.weights.sha256

    def refused(method: str) -> None:
        if audit is not None:
            audit.record(
                site="unknown",
                rpc=method.rsplit("/", 1)[-1],
                model_sha256=sha256,
                bytes_sent=0,
                outcome="UNAUTHENTICATED",
            )

    tokens = load_tokens(cfg.tokens) if cfg.tokens is not None else None
    revoked = frozenset(load_revoked(cfg.pki)) if cfg.pki is not None else frozenset()
    interceptor = AuthInterceptor(
        tokens, mtls=cfg.client_ca is not None, allow_anonymous=cfg.allow_anonymous, on_refused=refused, revoked=revoked
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix="xkt-rpc"),
        interceptors=[interceptor, MalformedRequestGuard()],  # authenticate first, then parse
        options=server_options(),
        maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
    )
    health_servicer = CheckOnlyHealthServicer()  # Watch could deadlock the server: see its docstring
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    source_model_pb2_grpc.add_SourceModelServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = _bind(server, cfg, credentials)
    host, _ = split_host_port(cfg.listen)
    running = RunningServer(
        server=server,
        port=port,
        address=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        health=health_servicer,
        model_sha256=sha256,
        tls=credentials is not None,
        mtls=cfg.client_ca is not None,
    )
    server.start()
    try:
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving model %s on %s (%s)", sha256[:12], running.address, _mode(running))
        yield running
    finally:
        health_servicer.enter_graceful_shutdown()
        server.stop(cfg.grace_s).wait(cfg.grace_s + 5.0)
        logger.info("server on %s stopped", running.address)


def _mode(running: RunningServer) -> str:
    return "mutual TLS" if running.mtls else "TLS" if running.tls else "PLAINTEXT"
