"""``xkt-server``: the model owner's command line. This file only registers commands."""

from __future__ import annotations

from xkt.server.commands import keys, train
from xkt.shared.cli_support import new_app

app = new_app(
    "xkt-server",
    "Model owner: train and sign the RGB source model (later: provision sites, serve, federate).",
)
app.add_typer(keys.app, name="keys")
app.command("train")(train.train)


def main() -> None:
    """Console-script entry point."""
    app()
