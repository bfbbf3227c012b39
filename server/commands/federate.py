"""``xkt-server federate``: run federated adaptation rounds over the sites that join."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from xkt.client.trainer import AdaptConfig
from xkt.server.federated_server import FederationConfig
from xkt.server.federation_runner import FederateRequest, federate, read_site_keys
from xkt.shared.artifact import load_artifact
from xkt.shared.cli_support import JsonOption, QuietOption, SetOption, VerboseOption, command
from xkt.shared.config import load_config
from xkt.shared.errors import ConfigError
from xkt.shared.log import emit_json, stderr_console
from xkt.shared.signing import load_public_key

_ROUNDS = "Rounds"
_PRIVACY = "Privacy"


def federate_command(
    model: Annotated[Path, typer.Option("--model", help="Signed source artifact (verified before it is sent).")],
    owner_key: Annotated[Path, typer.Option("--owner-key", help="Owner public key the model verifies with.")],
    out: Annotated[Path, typer.Option("--out", help="Work folder: SuperLink state, logs, rounds.json.")],
    tls_cert: Annotated[Path, typer.Option("--tls-cert", help="Server certificate (SANs: public name, 127.0.0.1).")],
    tls_key: Annotated[Path, typer.Option("--tls-key", help="Its private key.")],
    ca_cert: Annotated[Path, typer.Option("--ca-cert", help="The CA the certificate chains to (sites trust it).")],
    site_key: Annotated[
        list[Path], typer.Option("--site-key", help="A site's supernode.pub (repeatable); only these may join.")
    ],
    listen: Annotated[str, typer.Option("--listen", help="Public HOST:PORT of the fleet-only proxy.")] = "127.0.0.1:0",
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Federated rounds.", rich_help_panel=_ROUNDS)] = 3,
    min_sites: Annotated[
        int, typer.Option("--min-sites", min=1, help="Quorum: replies a round needs.", rich_help_panel=_ROUNDS)
    ] = 2,
    method: Annotated[
        str, typer.Option("--method", help="Adaptation method at the sites.", rich_help_panel=_ROUNDS)
    ] = "shot",
    local_epochs: Annotated[
        int, typer.Option("--local-epochs", min=1, help="Local epochs per round.", rich_help_panel=_ROUNDS)
    ] = 2,
    straggler_timeout: Annotated[
        float,
        typer.Option(
            "--straggler-timeout", help="Seconds after which a round closes on a quorum.", rich_help_panel=_ROUNDS
        ),
    ] = 300.0,
    round_timeout: Annotated[
        float,
        typer.Option("--round-timeout", help="Seconds before a round without quorum fails.", rich_help_panel=_ROUNDS),
    ] = 3600.0,
    join_timeout: Annotated[
        float, typer.Option("--join-timeout", help="Seconds to wait for --min-sites sites.", rich_help_panel=_ROUNDS)
    ] = 600.0,
    dp_clip: Annotated[
        float,
        typer.Option(
            "--dp-clip", min=0.0, help="Sites clip updates to this L2 norm (0: off).", rich_help_panel=_PRIVACY
        ),
    ] = 0.0,
    dp_noise: Annotated[
        float, typer.Option("--dp-noise", min=0.0, help="Gaussian noise std, × --dp-clip.", rich_help_panel=_PRIVACY)
    ] = 0.0,
    secure_aggregation: Annotated[
        bool,
        typer.Option(
            "--secure-aggregation",
            help="SecAgg+: sites upload only masked updates; the owner learns their weighted mean.",
            rich_help_panel=_PRIVACY,
        ),
    ] = False,
    secagg_clip: Annotated[
        float,
        typer.Option(
            "--secagg-clip", min=0.0, help="SecAgg+ clipping range of an update value.", rich_help_panel=_PRIVACY
        ),
    ] = 8.0,
    secagg_threshold: Annotated[
        float,
        typer.Option(
            "--secagg-threshold",
            min=0.0,
            max=1.0,
            help="Share of key shares needed to unmask (lower tolerates more dropouts).",
            rich_help_panel=_PRIVACY,
        ),
    ] = 0.67,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sites' local training.")] = 0,
    overrides: SetOption = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the federation in --out after its last completed round (after a crash).",
            rich_help_panel=_ROUNDS,
        ),
    ] = False,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Start a loopback SuperLink (TLS, node auth), a fleet-only proxy on --listen, and run the rounds.

    Sites join with `xkt-client join --superlink LISTEN ...`; the first JSON line (with --json)
    announces the proxy address and the app bundle's sha256 that sites pin in site.toml.
    """
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        load_artifact(model, [load_public_key(owner_key)])  # refuse a bad model before starting anything
        sets = _site_overrides(overrides or [])
        out.mkdir(parents=True, exist_ok=True)
        run = FederationConfig(
            model_dir=str(model.resolve()),
            owner_key=str(owner_key.resolve()),
            out_dir=str(out.resolve()),
            rounds=rounds,
            min_sites=min_sites,
            method=method,
            local_epochs=local_epochs,
            seed=seed,
            straggler_timeout_s=straggler_timeout,
            round_timeout_s=round_timeout,
            join_timeout_s=join_timeout,
            dp_clip_norm=dp_clip,
            dp_noise_multiplier=dp_noise,
            overrides=sets,
            resume=resume,
            secure_aggregation=secure_aggregation,
            secagg_clipping_range=secagg_clip,
            secagg_reconstruction_threshold=secagg_threshold,
        )
        request = FederateRequest(
            work=out.resolve(),
            tls_cert=tls_cert.resolve(),
            tls_key=tls_key.resolve(),
            ca_cert=ca_cert.resolve(),
            site_keys=read_site_keys([k.resolve() for k in site_key]),
            run=run,
            listen=listen,
        )
        console = stderr_console()

        def ready(address: str, fab: str) -> None:
            if json_output:
                emit_json({"event": "ready", "listen": address, "app_sha256": fab})
            else:
                console.print(f"sites join at {address}; app bundle sha256 {fab}", markup=False)

        result = federate(request, on_line=lambda line: console.print(line, markup=False), on_ready=ready)
        if json_output:
            emit_json(result)
        else:
            console.print(_table(result))


def _site_overrides(items: list[str]) -> str:
    """The sites' adaptation overrides as the run config carries them, checked here before any site trains."""
    if any(";" in item for item in items):
        raise ConfigError("a --set value contains ';'", hint="pass one key=value per --set", reason="bad-override")
    load_config(AdaptConfig, overrides=items)  # the same check each site makes, failing here instead of at every site
    return ";".join(items)


def _table(result: dict[str, Any]) -> Table:
    table = Table(title=f"federated rounds ({result['seconds']} s)")
    for column in ("round", "site", "examples", "accuracy", "local s", "round s"):
        table.add_column(column)
    for record in result["rounds"]:
        for node, metrics in sorted(record["metrics"].items()):
            accuracy = metrics.get("accuracy")
            table.add_row(
                str(record["round"]),
                node,
                f"{metrics.get('num-examples', 0):.0f}",
                "-" if accuracy is None else f"{100 * accuracy:.1f} %",
                f"{metrics.get('train-seconds', 0.0):.1f}",
                f"{record['seconds']:.1f}",
            )
    return table
