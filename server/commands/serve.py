"""``xkt-server serve``: serve the signed source model to sites over gRPC."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from xkt.server.serving import RunningServer, ServeConfig, run_server
from xkt.shared.cli_support import JsonOption, QuietOption, VerboseOption, command
from xkt.shared.grpc_options import DEFAULT_CHUNK_BYTES
from xkt.shared.log import emit_json, stderr_console

_ADVANCED = "Advanced"


def serve(
    model: Annotated[Path, typer.Option("--model", help="Signed artifact folder (from `xkt-server train`).")],
    owner_key: Annotated[Path, typer.Option("--owner-key", help="Owner public key; the model must verify with it.")],
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to listen on (port 0 picks a free one).")],
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="Server certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="Server private key (PEM).")] = None,
    client_ca: Annotated[
        Path | None, typer.Option("--client-ca", help="CA for site certificates: enables mutual TLS.")
    ] = None,
    pki: Annotated[
        Path | None,
        typer.Option("--pki", help="Owner PKI folder: site certificates in its revoked.json are refused."),
    ] = None,
    tokens: Annotated[
        Path | None, typer.Option("--tokens", help="Per-site token hashes (see `xkt-server tokens add`).")
    ] = None,
    audit_log: Annotated[
        Path | None, typer.Option("--audit-log", help="Append-only hash-chained audit log (JSON lines).")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plaintext, no TLS (loopback only).", rich_help_panel=_ADVANCED)
    ] = False,
    force_insecure: Annotated[
        bool,
        typer.Option("--force-insecure", help="Allow --insecure on a non-loopback address.", rich_help_panel=_ADVANCED),
    ] = False,
    allow_anonymous: Annotated[
        bool,
        typer.Option("--allow-anonymous", help="Serve without site authentication.", rich_help_panel=_ADVANCED),
    ] = False,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", help="Weights chunk size in bytes (64 KiB-1 MiB).", rich_help_panel=_ADVANCED)
    ] = DEFAULT_CHUNK_BYTES,
    grace: Annotated[
        float,
        typer.Option("--grace", min=0.0, help="Seconds in-flight calls get at shutdown.", rich_help_panel=_ADVANCED),
    ] = 10.0,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Verify the signed model with the owner's key, then serve it until SIGTERM or Ctrl-C."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        cfg = ServeConfig(
            model_dir=model,
            owner_key=owner_key,
            listen=listen,
            tls_cert=tls_cert,
            tls_key=tls_key,
            client_ca=client_ca,
            pki=pki,
            tokens=tokens,
            insecure=insecure,
            force_insecure=force_insecure,
            allow_anonymous=allow_anonymous,
            audit_log=audit_log,
            chunk_size=chunk_size,
            grace_s=grace,
        )
        stop = _stop_on_signals()
        with run_server(cfg) as running:
            _announce(running, json_output)
            while not stop.wait(0.5):
                pass


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so shutdown goes through ``run_server``'s grace period."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _announce(running: RunningServer, json_output: bool) -> None:
    mode = "mutual TLS" if running.mtls else "TLS" if running.tls else "plaintext"
    if json_output:
        emit_json(
            {
                "ok": True,
                "listen": running.address,
                "port": running.port,
                "model_sha256": running.model_sha256,
                "transport": mode,
            }
        )
    else:
        stderr_console().print(f"serving model {running.model_sha256[:12]} on {running.address} ({mode})")
