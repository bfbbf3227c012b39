"""``xkt-bench federated`` and ``xkt-bench federated-table``: virtual sites on Flower's simulation engine.

Registered by :mod:`xkt.benchmarks.cli`; the work is in :mod:`xkt.benchmarks.federated_sim`
(one simulated federation) and :mod:`xkt.benchmarks.federated_bench` (the table: sites alone
vs federated vs pooled, over seeds).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from xkt.benchmarks.federated_bench import DEFAULT_PLAN, FederatedTablePlan, run_federated_table
from xkt.benchmarks.federated_sim import (
    BENCH_SOURCE,
    SimulationPlan,
    prepare_data,
    prepare_model,
    run_simulation,
)
from xkt.client.methods import get_method
from xkt.shared.cli_support import JsonOption, QuietOption, SetOption, VerboseOption, command
from xkt.shared.errors import ConfigError
from xkt.shared.log import emit_json, progress_bar, stderr_console
from xkt.shared.shapes_benchmark import ShapesConfig

_DATA = "Data and source model (used when --data / --model are not given)"
_ADVANCED = "Advanced"

OutOption = Annotated[Path, typer.Option("--out", help="Work folder (data, model, sites, logs, results; reused).")]
SitesOption = Annotated[int, typer.Option("--sites", min=1, help="Virtual sites (the data is split across them).")]
RoundsOption = Annotated[int, typer.Option("--rounds", min=1, help="Federated rounds.")]
LocalEpochsOption = Annotated[int, typer.Option("--local-epochs", min=1, help="Local adaptation epochs per round.")]
SkewOption = Annotated[
    float, typer.Option("--skew", min=0.0, help="Class skew across sites (0 = IID; 1 = Dirichlet(1) shares).")
]
TaskOption = Annotated[str, typer.Option("--task", help="Target modality: depth or ir.")]
SizeOption = Annotated[
    int, typer.Option("--size", min=16, max=256, help="Image side in pixels.", rich_help_panel=_DATA)
]
PerClassOption = Annotated[
    int, typer.Option("--per-class", min=2, help="Owner training images per class.", rich_help_panel=_DATA)
]
SitePerClassOption = Annotated[
    int,
    typer.Option("--site-per-class", min=2, help="Target images per class, over all sites.", rich_help_panel=_DATA),
]
SourceEpochsOption = Annotated[
    int, typer.Option("--source-epochs", min=1, help="Source model training epochs.", rich_help_panel=_DATA)
]
CpusOption = Annotated[
    int,
    typer.Option("--cpus-per-site", min=1, help="CPUs Ray reserves per virtual site.", rich_help_panel=_ADVANCED),
]


def federated(
    out: OutOption,
    sites: SitesOption = 4,
    method: Annotated[str, typer.Option("--method", help="Adaptation method every site runs.")] = "shot",
    rounds: RoundsOption = DEFAULT_PLAN.rounds,
    local_epochs: LocalEpochsOption = DEFAULT_PLAN.local_epochs,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data (when generated) and of training.")] = 0,
    skew: SkewOption = DEFAULT_PLAN.skew,
    task: TaskOption = "depth",
    data: Annotated[
        Path | None, typer.Option("--data", help="Data set from `xkt-bench data --sites N` (default: OUT/data).")
    ] = None,
    model: Annotated[Path | None, typer.Option("--model", help="Signed source model (default: OUT/model).")] = None,
    owner_key: Annotated[
        Path | None, typer.Option("--owner-key", help="Public key --model is signed with (default: MODEL/../keys).")
    ] = None,
    size: SizeOption = DEFAULT_PLAN.shapes.size,
    per_class: PerClassOption = DEFAULT_PLAN.shapes.per_class,
    site_per_class: SitePerClassOption = DEFAULT_PLAN.shapes.site_per_class,
    source_epochs: SourceEpochsOption = BENCH_SOURCE.epochs,
    cpus_per_site: CpusOption = 1,
    overrides: SetOption = None,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Run N virtual sites on Flower's simulation engine with the product's ServerApp and ClientApp.

    Without --data, the built-in shapes data is rendered into OUT/data, split across --sites
    with --skew; without --model, a source model is trained into OUT/model.  Each site's
    adapted model and report land in OUT/sites/site-K/out, the round table in OUT/out/rounds.json.
    --set KEY=VALUE overrides the sites' adaptation config.
    """
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        get_method(method)  # an unknown name is refused before any work
        if owner_key is not None and model is None:
            raise ConfigError("--owner-key needs --model", hint="pass both, or neither", reason="bad-option")
        out.mkdir(parents=True, exist_ok=True)
        with progress_bar(not quiet) as bar:
            bar_task = bar.add_task("preparing", total=None, status="")

            def report(label: str, done: int, total: int, status: str) -> None:
                bar.update(bar_task, description=label, completed=done, total=total, status=status)

            shapes = ShapesConfig(
                seed=seed,
                size=size,
                per_class=per_class,
                site_per_class=site_per_class,
                sites=sites,
                skew=skew,
                modalities=(task,),
            )
            data = data or prepare_data(out, shapes, report)
            if model is None:
                source = replace(BENCH_SOURCE, epochs=source_epochs, seed=seed)
                model, owner_key = prepare_model(out, data, source, report)
            owner_key = owner_key or model.parent / "keys" / "owner.pub"
        plan = SimulationPlan(
            work=out,
            data=data,
            model=model,
            owner_key=owner_key,
            sites=sites,
            task=task,
            method=method,
            rounds=rounds,
            local_epochs=local_epochs,
            seed=seed,
            overrides=tuple(overrides or ()),
            cpus_per_site=cpus_per_site,
        )
        console = stderr_console()
        result = run_simulation(plan, on_line=(lambda line: console.print(line, markup=False)) if verbose else None)
        if json_output:
            emit_json(result)
        else:
            console.print(_sites_table(result))
            console.print(f"wrote {out / 'result.json'}", markup=False)


def _sites_table(result: dict[str, Any]) -> Table:
    shares = result.get("class_shares") or {}
    table = Table(title=f"{result['method']}: {len(result['sites'])} virtual sites, {len(result['rounds'])} rounds")
    for column in ("site", "class TV to pooled", "accuracy per round", "final accuracy"):
        table.add_column(column)
    for site in result["sites"]:
        distance = shares.get("tv_to_pooled", {}).get(f"site{site['site']}")
        rounds = " → ".join("-" if a is None else f"{100 * a:.1f}" for a in site["accuracy_per_round"])
        table.add_row(
            str(site["site"]),
            "-" if distance is None else f"{distance:.2f}",
            rounds,
            "-" if site["accuracy"] is None else f"{100 * site['accuracy']:.1f} %",
        )
    timing = result["timing"]
    table.caption = (
        f"round {timing['round_seconds_mean']:.1f} s on average, {100 * timing['outside_local_share']:.0f} % "
        f"of it outside local training; whole run {timing['run_seconds']:.0f} s"
    )
    return table


def federated_table(
    out: OutOption,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Seeds 0 .. N-1 (each its own site data).")] = 3,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated adaptation methods.")] = ",".join(
        DEFAULT_PLAN.methods
    ),
    sites: SitesOption = DEFAULT_PLAN.sites,
    rounds: RoundsOption = DEFAULT_PLAN.rounds,
    local_epochs: LocalEpochsOption = DEFAULT_PLAN.local_epochs,
    skew: SkewOption = DEFAULT_PLAN.skew,
    task: TaskOption = DEFAULT_PLAN.task,
    size: SizeOption = DEFAULT_PLAN.shapes.size,
    per_class: PerClassOption = DEFAULT_PLAN.shapes.per_class,
    site_per_class: SitePerClassOption = DEFAULT_PLAN.shapes.site_per_class,
    source_epochs: SourceEpochsOption = DEFAULT_PLAN.source.epochs,
    overrides: SetOption = None,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Sites alone vs federated vs pooled, per method and seed: a markdown table, JSON and per-run records.

    Train one source model (OUT/source), then per seed render the sites' data split across
    --sites with --skew, and for each method adapt every site alone (rounds × local epochs),
    run the federation on the simulation engine, and adapt one model on all sites' data
    pooled.  Finished runs (OUT/runs/) are reused, so rerunning an interrupted command continues it.
    """
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        method_list = tuple(m.strip() for m in methods.split(",") if m.strip())
        for name in method_list:
            get_method(name)
        plan = FederatedTablePlan(
            out=out,
            seeds=tuple(range(seeds)),
            methods=method_list,
            sites=sites,
            rounds=rounds,
            local_epochs=local_epochs,
            skew=skew,
            task=task,
            shapes=replace(DEFAULT_PLAN.shapes, size=size, per_class=per_class, site_per_class=site_per_class),
            source=replace(DEFAULT_PLAN.source, epochs=source_epochs),
            overrides=tuple(overrides or ()),
        )
        with progress_bar(not quiet) as bar:
            bar_task = bar.add_task("federated table", total=None, status="")

            def report(label: str, done: int, total: int, status: str) -> None:
                bar.update(bar_task, description=label, completed=done, total=total, status=status)

            results = run_federated_table(plan, progress=report)
        if json_output:
            emit_json({"ok": True, "out": str(out), **{k: v for k, v in results.items() if k != "runs"}})
        else:
            stderr_console().print((out / "results.md").read_text(encoding="utf-8"), markup=False)
            stderr_console().print(f"wrote {out / 'results.md'}, {out / 'results.json'}", markup=False)
