"""``xkt-bench``: benchmark data, the demo, and (later) accuracy tables."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from xkt.benchmarks.demo import run_demo
from xkt.shared.cli_support import JsonOption, QuietOption, VerboseOption, command, new_app
from xkt.shared.log import emit_json, progress_bar, stderr_console
from xkt.shared.shapes_benchmark import ShapesConfig, write_shapes_benchmark

app = new_app(
    "xkt-bench",
    "Benchmarks: generate the built-in cross-modal data, run the demo.",
)


class DataKind(StrEnum):
    """Benchmark data sets ``xkt-bench data`` can generate."""

    shapes = "shapes"


@app.command("data")
def data(
    out: Annotated[Path, typer.Option("--out", help="Folder to create (written atomically).")],
    kind: Annotated[DataKind, typer.Option("--kind", help="Which benchmark.")] = DataKind.shapes,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: same seed, same bytes.")] = 0,
    size: Annotated[int, typer.Option("--size", min=16, max=256, help="Image side in pixels.")] = 64,
    per_class: Annotated[int, typer.Option("--per-class", min=2, help="Owner training images per task class.")] = 3000,
    site_per_class: Annotated[
        int, typer.Option("--site-per-class", min=2, help="Unlabelled target images per task class, per modality.")
    ] = 300,
    sites: Annotated[int, typer.Option("--sites", min=1, help="Split each modality's target data across K sites.")] = 1,
    skew: Annotated[float, typer.Option("--skew", min=0.0, help="Class skew across sites (0 = IID).")] = 0.0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT folder.")] = False,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Render the built-in RGB / depth / infrared shapes benchmark in the site data contract."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        cfg = ShapesConfig(
            seed=seed, size=size, per_class=per_class, site_per_class=site_per_class, sites=sites, skew=skew
        )
        with progress_bar(not quiet) as bar:
            task = bar.add_task("rendering", total=None, status="")

            def report(split: str, done: int, total: int) -> None:
                bar.update(task, description=f"rendering {split}", completed=done, total=total)

            summary = write_shapes_benchmark(out, cfg, progress=report, force=force)
        if json_output:
            emit_json({"ok": True, "out": str(out), "kind": kind.value, **summary})
        else:
            stderr_console().print(f"wrote {out} ({kind.value}, seed {seed}, {size}px)")


@app.command("demo")
def demo(
    work: Annotated[
        Path, typer.Option("--work", help="Folder for data, keys and models (reused between runs).")
    ] = Path(".cache/demo"),
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Source-training epochs.")] = None,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Generate the data, train (or reuse) the owner's model, and show it failing on depth and IR."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        result = run_demo(work, epochs=epochs)
        if json_output:
            emit_json({"ok": True, **result})


def main() -> None:
    """Console-script entry point."""
    app()
