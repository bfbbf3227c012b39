"""``xkt-server``: the model owner's command line. This file only registers commands."""

from __future__ import annotations

from xkt.server.commands import audit, federate, health, import_weights, keys, provision, serve, tokens, train
from xkt.shared.cli_support import new_app

app = new_app(
    "xkt-server",
    "Model owner: train and sign the RGB source model, provision sites, serve it over gRPC.",
)
app.add_typer(keys.app, name="keys")
app.add_typer(provision.app, name="provision")
app.command("import-weights")(import_weights.import_weights)
app.command("train")(train.train)
app.command("serve")(serve.serve)
app.command("federate")(federate.federate_command)
app.command("health")(health.health)
app.add_typer(audit.app, name="audit")
app.add_typer(tokens.app, name="tokens")


def main() -> None:
    """Console-script entry point."""
    app()
