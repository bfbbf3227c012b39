"""``xkt-server tokens``: per-site bearer tokens, stored only as hashes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from xkt.server.auth import add_token
from xkt.shared.cli_support import JsonOption, QuietOption, VerboseOption, command
from xkt.shared.log import emit_json, stderr_console

app = typer.Typer(help="Manage per-site bearer tokens.", no_args_is_help=True)


@app.command("add")
def add(
    site: Annotated[str, typer.Argument(help="Site id (letters, digits, '.', '_', '-').")],
    tokens: Annotated[Path, typer.Option("--tokens", help="Token file to append the hash to (created 0600).")],
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Create a random token for SITE, print it once on stdout, and store only its sha256."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        token = add_token(tokens, site)
        if json_output:
            emit_json({"ok": True, "site": site, "tokens": str(tokens), "token": token})
        else:
            sys.stdout.write(token + "\n")
            sys.stdout.flush()
            if not quiet:
                stderr_console().print(f"stored the hash for {site} in {tokens}; the token is not shown again")
