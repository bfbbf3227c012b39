"""``xkt-server keys``: the owner's Ed25519 signing key pair."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xkt.shared.cli_support import JsonOption, QuietOption, VerboseOption, command
from xkt.shared.log import emit_json, stderr_console
from xkt.shared.signing import fingerprint, generate_keypair, load_public_key

app = typer.Typer(help="Manage the owner's signing key pair.", no_args_is_help=True)


@app.command("init")
def init(
    out: Annotated[Path, typer.Option("--out", help="Folder for owner.key (mode 0600) and owner.pub.")],
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Create an Ed25519 owner key pair; the private key never leaves this folder."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        private_path, public_path = generate_keypair(out)
        key_id = fingerprint(load_public_key(public_path))
        if json_output:
            emit_json(
                {"ok": True, "private_key": str(private_path), "public_key": str(public_path), "fingerprint": key_id}
            )
        else:
            stderr_console().print(f"wrote {private_path} (keep secret) and {public_path}\nfingerprint {key_id}")
