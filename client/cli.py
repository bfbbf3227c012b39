"""``xkt-client``: the site's command line. This file only registers commands."""

from __future__ import annotations

from xkt.client.commands import adapt, csr, doctor, evaluate, fetch, join, validate_data
from xkt.shared.cli_support import new_app

app = new_app(
    "xkt-client",
    "Site: check local data, fetch and verify the owner's model, adapt it, evaluate it.",
)
app.command("validate-data")(validate_data.validate_data)
app.command("evaluate")(evaluate.evaluate)
app.command("csr")(csr.csr)
app.command("fetch")(fetch.fetch)
app.command("doctor")(doctor.doctor)
app.command("adapt")(adapt.adapt)
app.command("join-key")(join.join_key)
app.command("join")(join.join)


def main() -> None:
    """Console-script entry point."""
    app()
