"""``xkt-client``: the site's command line. This file only registers commands."""

from __future__ import annotations

import typer

from xkt.client.commands import evaluate, validate_data

app = typer.Typer(
    name="xkt-client",
    help="Site: check local data and evaluate models (later: fetch, adapt, join a federation).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("validate-data")(validate_data.validate_data)
app.command("evaluate")(evaluate.evaluate)


def main() -> None:
    """Console-script entry point."""
    app()
