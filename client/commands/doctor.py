"""``xkt-client doctor``: check every step between this site and an owner's server, with a fix for each.

Each check is PASS, FAIL or SKIP (a later check whose precondition failed, or whose input
was not given), so a person sees the *first* thing to fix rather than a stack of
consequences.  Nothing here downloads weights or reads more than one sample image.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from xkt.client.channel import ChannelOptions, SourceModelClient, open_channel, options_from_cli, split_server
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
from xkt.client.egress import EgressGuard, single_site_manifest
from xkt.client.fetch import verify_manifest_message
from xkt.protos import source_model_pb2 as pb
from xkt.shared.cli_support import JsonOption, QuietOption, VerboseOption, command
from xkt.shared.data import list_images, read_modality, read_raw
from xkt.shared.errors import ExitCode, XktError
from xkt.shared.log import emit_json, stderr_console
from xkt.shared.manifest import Manifest
from xkt.shared.signing import load_public_key

TCP_TIMEOUT_S = 5.0

# The exit status when a check fails: the first failing row (in report order) decides.
FAILURE_CODES = {
    "reachable": ExitCode.TRANSPORT,
    "tls": ExitCode.TRANSPORT,
    "identity": ExitCode.AUTH,
    "owner-key": ExitCode.VERIFICATION,
    "compatible": ExitCode.CONFIG_OR_DATA,
    "health": ExitCode.TRANSPORT,
}


@dataclass(frozen=True)
class Check:
    """One row of the report."""

    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


def _failed(name: str, error: XktError) -> Check:
    return Check(name, "FAIL", error.message, error.hint)


def check_tcp(opts: ChannelOptions) -> Check:
    """Can we open a TCP connection at all (before any TLS or gRPC)?"""
    host, port = split_server(opts.server)
    try:
        with socket.create_connection((host, port), timeout=TCP_TIMEOUT_S):
            return Check("reachable", "PASS", f"TCP connection to {opts.server} opened")
    except OSError as exc:
        fix = "check the host and port, firewalls, and that `xkt-server serve` runs there"
        return Check("reachable", "FAIL", f"cannot connect to {opts.server}: {exc.strerror or exc}", fix)


def check_tls(opts: ChannelOptions) -> Check:
    """Handshake with Python's ssl to tell an untrusted CA from a wrong name, which gRPC blurs."""
    if opts.insecure:
        return Check("tls", "SKIP", "plaintext (--insecure): no server identity is checked", "use TLS off loopback")
    host, port = split_server(opts.server)
    context = ssl.create_default_context(cafile=str(opts.ca_cert))
    if opts.client_cert is not None and opts.client_key is not None:
        context.load_cert_chain(str(opts.client_cert), str(opts.client_key))
    name = opts.server_name or host
    try:
        with (
            socket.create_connection((host, port), timeout=TCP_TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=name) as tls,
        ):
            return Check("tls", "PASS", f"{tls.version()}, server certificate trusted and valid for {name!r}")
    except ssl.SSLCertVerificationError as exc:
        if "hostname" in str(exc.verify_message).lower() or "ip address mismatch" in str(exc.verify_message).lower():
            return Check(
                "tls",
                "FAIL",
                f"certificate not valid for {name!r}",
                "dial the certificate's name or pass --server-name",
            )
        return Check(
            "tls",
            "FAIL",
            f"server certificate not trusted: {exc.verify_message}",
            "pass the owner's ca.crt (--ca-cert or --kit)",
        )
    except (ssl.SSLError, OSError) as exc:
        return Check(
            "tls", "FAIL", f"TLS handshake failed: {exc}", "the server may not speak TLS; check --server and --insecure"
        )


def check_identity(client: SourceModelClient) -> tuple[Check, pb.Manifest | None]:
    """The server accepts our certificate or token if GetManifest succeeds."""
    try:
        reply = client.get_manifest()
    except XktError as error:
        return _failed("identity", error), None
    return Check("identity", "PASS", f"server accepted our identity ({client.opts.mode})"), reply


def check_owner_key(reply: pb.Manifest | None, owner_key: Path | None) -> tuple[Check, Manifest | None]:
    """The manifest verifies with the owner key the site trusts."""
    if reply is None or owner_key is None:
        return Check(
            "owner-key",
            "SKIP",
            "no manifest" if reply is None else "no --owner-key given",
            "pass --owner-key owner.pub",
        ), None
    try:
        manifest = verify_manifest_message(reply, [load_public_key(owner_key)])
    except XktError as error:
        return _failed("owner-key", error), None
    return Check(
        "owner-key", "PASS", f"{manifest.model_id} {manifest.model_version} signed by {manifest.owner_key_fingerprint}"
    ), manifest


def check_compatibility(manifest: Manifest | None, site: Path | None) -> Check:
    """The site's modality (site.toml) and a sample image fit the model's input."""
    if manifest is None or site is None:
        return Check("compatible", "SKIP", "needs a verified manifest and --site", "pass --owner-key and --site")
    spec = manifest.input_spec
    try:
        modality = read_modality(site)
        images = list_images(site / "target")
        sample = read_raw(images[0]) if images else None
    except XktError as error:
        return _failed("compatible", error)
    if modality.channels not in (1, spec.channels):
        return Check(
            "compatible",
            "FAIL",
            f"site has {modality.channels} channels, model takes {spec.channels}",
            "fix [modality] channels in site.toml",
        )
    if sample is None:
        return Check("compatible", "FAIL", f"no images under {site / 'target'}", "add target images (png or npy)")
    channels = 1 if sample.ndim == 2 else int(sample.shape[2])
    if channels != modality.channels:
        return Check(
            "compatible",
            "FAIL",
            f"{images[0].name} has {channels} channels, site.toml says {modality.channels}",
            "run `xkt-client validate-data`",
        )
    detail = f"{modality.name} {modality.channels}-channel {sample.shape[0]}x{sample.shape[1]} → model {spec.channels}x{spec.size}x{spec.size}"
    return Check("compatible", "PASS", detail)


def check_health(client: SourceModelClient) -> Check:
    """The server reports the model service SERVING."""
    try:
        status = client.health()
    except XktError as error:
        return _failed("health", error)
    ok = status == "SERVING"
    return Check(
        "health",
        "PASS" if ok else "FAIL",
        f"service status {status}",
        "" if ok else "ask the owner to check the server",
    )


def run_checks(opts: ChannelOptions, owner_key: Path | None, site: Path | None) -> list[Check]:
    """All checks in order; network checks after a failed TCP check are skipped."""
    checks = [check_tcp(opts)]
    if checks[0].status == "FAIL":
        return checks + [
            Check(n, "SKIP", "server unreachable") for n in ("tls", "identity", "owner-key", "compatible", "health")
        ]
    checks.append(check_tls(opts))
    egress = single_site_manifest(sha256=None, offset=None, token=opts.token is not None, health=True)
    with open_channel(opts, [EgressGuard(egress)]) as channel:
        client = SourceModelClient(channel, opts)
        identity, reply = check_identity(client)
        owner, manifest = check_owner_key(reply, owner_key)
        checks += [identity, owner, check_compatibility(manifest, site), check_health(client)]
    return checks


def doctor(
    server: ServerOption,
    ca_cert: CaCertOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    kit: KitOption = None,
    token_file: TokenFileOption = None,
    server_name: ServerNameOption = None,
    owner_key: Annotated[
        Path | None, typer.Option("--owner-key", help="Owner public key to check the manifest with.")
    ] = None,
    site: Annotated[
        Path | None, typer.Option("--site", help="Site folder to check model compatibility against.")
    ] = None,
    insecure: InsecureOption = False,
    force_insecure: ForceInsecureOption = False,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Check reachability, TLS, identity, owner key, data compatibility and health; PASS/FAIL with fixes."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
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
        checks = run_checks(opts, owner_key, site)
        ok = all(c.status != "FAIL" for c in checks)
        if json_output:
            emit_json({"ok": ok, "server": server, "checks": [c.to_json() for c in checks]})
        else:
            _print(checks, server)
        failed = [c for c in checks if c.status == "FAIL"]
        if failed:
            raise typer.Exit(int(FAILURE_CODES.get(failed[0].name, ExitCode.TRANSPORT)))


def _print(checks: list[Check], server: str) -> None:
    table = Table("check", "result", "detail", "fix", title=f"xkt-client doctor {server}")
    style: dict[str, Callable[[str], str]] = {"PASS": lambda s: f"[green]{s}[/]", "FAIL": lambda s: f"[red]{s}[/]"}
    for check in checks:
        table.add_row(check.name, style.get(check.status, str)(check.status), check.detail, check.fix)
    stderr_console().print(table)
