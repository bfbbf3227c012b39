"""``xkt-client fetch``: download and verify an owner's signed model into a local cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xkt.client.channel import SourceModelClient, open_channel, options_from_cli
from xkt.client.egress import EgressGuard, render_table, single_site_manifest
from xkt.client.fetch import fetch_artifact
from xkt.shared.cli_support import JsonOption, QuietOption, VerboseOption, command
from xkt.shared.log import emit_json, progress_bar, stderr_console
from xkt.shared.signing import load_public_key

_ADVANCED = "Advanced"

ServerOption = Annotated[str, typer.Option("--server", help="Owner's server as HOST:PORT.")]
CaCertOption = Annotated[Path | None, typer.Option("--ca-cert", help="Owner CA certificate that signs the server's.")]
ClientCertOption = Annotated[Path | None, typer.Option("--client-cert", help="Site certificate for mutual TLS.")]
ClientKeyOption = Annotated[Path | None, typer.Option("--client-key", help="Site private key for mutual TLS (0600).")]
KitOption = Annotated[Path | None, typer.Option("--kit", help="Site kit folder: ca.crt, site.crt, site.key.")]
TokenFileOption = Annotated[
    Path | None, typer.Option("--token-file", help="File holding the site's bearer token (0600); or env XKT_TOKEN.")
]
ServerNameOption = Annotated[
    str | None, typer.Option("--server-name", help="Name to check in the server certificate (and SNI).")
]
InsecureOption = Annotated[
    bool, typer.Option("--insecure", help="Plaintext, no TLS (loopback only).", rich_help_panel=_ADVANCED)
]
ForceInsecureOption = Annotated[
    bool, typer.Option("--force-insecure", help="Allow --insecure to a non-loopback host.", rich_help_panel=_ADVANCED)
]


def fetch(
    server: ServerOption,
    owner_key: Annotated[Path, typer.Option("--owner-key", help="Owner public key the model must be signed with.")],
    out: Annotated[Path, typer.Option("--out", help="Cache folder; the model lands in OUT/<weights sha256>/.")],
    ca_cert: CaCertOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    kit: KitOption = None,
    token_file: TokenFileOption = None,
    server_name: ServerNameOption = None,
    insecure: InsecureOption = False,
    force_insecure: ForceInsecureOption = False,
    attempts: Annotated[
        int,
        typer.Option("--attempts", min=1, max=20, help="Stream resumes within this run.", rich_help_panel=_ADVANCED),
    ] = 3,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Fetch a signed model, verify it with the owner's key, and cache it by digest (resumable)."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        keys = [load_public_key(owner_key)]
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
        with open_channel(opts, [EgressGuard(egress)]) as channel, progress_bar(not quiet) as bar:
            task = bar.add_task("weights", total=None, status=opts.mode)
            result = fetch_artifact(
                SourceModelClient(channel, opts),
                keys,
                out,
                lambda done, total: bar.update(task, completed=done, total=total),
                attempts=attempts,
            )
        summary = {
            "path": str(result.path),
            "sha256": result.manifest.weights.sha256,
            "size": result.manifest.weights.size,
            "model_id": result.manifest.model_id,
            "model_version": result.manifest.model_version,
            "cached": result.cached,
            "resumed_from": result.resumed_from,
            "downloaded": result.downloaded,
            "transport": opts.mode,
        }
        if json_output:
            emit_json({"ok": True, **summary, "egress": egress.to_json()})
        else:
            state = "already cached" if result.cached else f"downloaded {result.downloaded} bytes"
            stderr_console().print(f"verified {result.manifest.model_id} {result.manifest.model_version}: {state}")
            typer.echo(str(result.path))
