"""``xkt-server provision``: the owner's CA, the server certificate and per-site kits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xkt.server import provision as pki
from xkt.shared.cli_support import JsonOption, QuietOption, VerboseOption, command
from xkt.shared.log import emit_json, stderr_console
from xkt.shared.tls import describe_cert, load_cert

app = typer.Typer(
    help="Provision mutual TLS: an owner CA, the server certificate and one kit per site.", no_args_is_help=True
)

PkiOption = Annotated[Path, typer.Option("--pki", help="The PKI folder made by `provision init`.")]
DaysOption = Annotated[int, typer.Option("--days", help="Validity of the issued certificate in days.", min=1)]


@app.command("init")
def init(
    out: Annotated[Path, typer.Option("--out", help="New folder for ca.crt/ca.key and server.crt/server.key.")],
    server_name: Annotated[
        list[str] | None,
        typer.Option("--server-name", help="DNS name clients dial (repeatable; default localhost).", metavar="NAME"),
    ] = None,
    server_ip: Annotated[
        list[str] | None,
        typer.Option(
            "--server-ip", help="IP address clients dial (repeatable; 127.0.0.1 is always added).", metavar="IP"
        ),
    ] = None,
    ca_name: Annotated[str, typer.Option("--ca-name", help="Common name of the owner CA.")] = "xkt owner CA",
    days: DaysOption = pki.SERVER_DAYS,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Create the owner CA and the server certificate; refuses to overwrite an existing PKI."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        names = tuple(server_name) if server_name else ("localhost",)
        paths = pki.init_pki(out, ca_name=ca_name, server_names=names, server_ips=tuple(server_ip or ()), days=days)
        ca, server = describe_cert(load_cert(paths.ca_cert)), describe_cert(load_cert(paths.server_cert))
        if json_output:
            emit_json({"ok": True, "pki": str(paths.root), "ca": ca.to_json(), "server": server.to_json()})
        elif not quiet:
            stderr_console().print(
                f"wrote {paths.root} (keep ca.key and server.key secret)\nCA      {ca.line()}\nserver  {server.line()}",
                markup=False,
            )


@app.command("add-site")
def add_site(
    site_id: Annotated[str, typer.Argument(help="Site id: lowercase letters, digits and '-', up to 63.")],
    pki_dir: PkiOption,
    days: DaysOption = pki.SITE_DAYS,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Make a site kit with a new key; other kits and the CA are left untouched."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        kit = pki.add_site(pki_dir, site_id, days=days)
        _report_kit(kit, json_output=json_output, quiet=quiet, note="holds site.key: ship it over a trusted channel")


@app.command("sign-csr")
def sign_csr(
    csr: Annotated[Path, typer.Argument(help="The site.csr made by `xkt-client csr`.")],
    pki_dir: PkiOption,
    site_id: Annotated[
        str | None, typer.Option("--site-id", help="Expected site id; refuses a CSR for another one.")
    ] = None,
    days: DaysOption = pki.SITE_DAYS,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Issue a site certificate for a CSR; the site's private key never leaves the site."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        kit = pki.sign_csr(pki_dir, csr, site_id=site_id, days=days)
        _report_kit(kit, json_output=json_output, quiet=quiet, note="send site.crt and ca.crt back to the site")


@app.command("revoke")
def revoke(
    site_id: Annotated[str, typer.Argument(help="The site whose certificates the server must refuse.")],
    pki_dir: PkiOption,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Record a site's certificates in revoked.json; the server refuses those serials."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        serials = [format(s, "x") for s in pki.revoke_site(pki_dir, site_id)]
        if json_output:
            emit_json({"ok": True, "site_id": site_id, "revoked_serials": serials})
        elif not quiet:
            stderr_console().print(f"revoked {site_id} (serials {', '.join(serials)}); restart or reload the server")


def _report_kit(kit: Path, *, json_output: bool, quiet: bool, note: str) -> None:
    info = describe_cert(load_cert(kit / "site.crt"))
    if json_output:
        emit_json({"ok": True, "kit": str(kit), "site_id": kit.name, "cert": info.to_json()})
    elif not quiet:
        stderr_console().print(f"wrote {kit} ({note})\nsite  {info.line()}", markup=False)
