"""``xkt-server``: the model owner's command line. This file only registers commands."""

from __future__ import annotations

import typer

from xkt.server.commands import keys, train

app = typer.Typer(
    name="xkt-server",
    help="Model owner: train and sign the RGB source model (later: provision sites, serve, federate).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(keys.app, name="keys")
app.command("train")(train.train)


def main() -> None:
    """Console-script entry point."""
    app()
