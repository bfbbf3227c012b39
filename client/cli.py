"""``xkt-client``: the site's command line. This file only registers commands."""

from __future__ import annotations

from xkt.client.commands import evaluate, validate_data
from xkt.shared.cli_support import new_app

app = new_app(
    "xkt-client",
    "Site: check local data and evaluate models (later: fetch, adapt, join a federation).",
)
app.command("validate-data")(validate_data.validate_data)
app.command("evaluate")(evaluate.evaluate)


def main() -> None:
    """Console-script entry point."""
    app()
