"""``xkt-bench``: benchmark data, the demo, accuracy tables (``run``), and simulated federations (``federated``)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from xkt.benchmarks.demo import DEFAULT_DEMO_METHODS, PROFILES, run_demo
from xkt.benchmarks.emoji_run import EmojiPlan, run_emoji_benchmark
from xkt.benchmarks.federated_commands import federated, federated_table
from xkt.benchmarks.run import BenchmarkPlan, run_benchmark
from xkt.client.methods import get_method
from xkt.shared.cli_support import JsonOption, QuietOption, SetOption, VerboseOption, command, new_app
from xkt.shared.emoji_benchmark import EmojiConfig, write_emoji_benchmark
from xkt.shared.errors import ConfigError
from xkt.shared.log import emit_json, progress_bar, stderr_console
from xkt.shared.shapes_benchmark import ShapesConfig, write_shapes_benchmark

app = new_app(
    "xkt-bench",
    "Benchmarks: generate the built-in cross-modal data, run the demo, measure methods against each other.",
)


class DataKind(StrEnum):
    """Benchmark data sets ``xkt-bench data`` can generate."""

    shapes = "shapes"
    emoji = "emoji"


class DemoProfile(StrEnum):
    """Sizes of the demo (``xkt.benchmarks.demo.PROFILES``)."""

    quick = "quick"
    full = "full"


@app.command("data")
def data(
    out: Annotated[Path, typer.Option("--out", help="Folder to create (written atomically).")],
    kind: Annotated[DataKind, typer.Option("--kind", help="Which benchmark.")] = DataKind.shapes,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: same seed, same bytes.")] = 0,
    size: Annotated[int, typer.Option("--size", min=16, max=256, help="Image side in pixels.")] = 64,
    per_class: Annotated[
        int, typer.Option("--per-class", min=2, help="Owner training images per task class (shapes).")
    ] = 3000,
    site_per_class: Annotated[
        int,
        typer.Option("--site-per-class", min=2, help="Unlabelled target images per task class, per modality (shapes)."),
    ] = 300,
    sites: Annotated[
        int, typer.Option("--sites", min=1, help="Split each modality's target data across K sites (shapes).")
    ] = 1,
    skew: Annotated[float, typer.Option("--skew", min=0.0, help="Class skew across sites, 0 = IID (shapes).")] = 0.0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT folder.")] = False,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Render a benchmark in the site data contract.

    shapes: the built-in RGB / depth / infrared rendered scenes.  emoji: OpenMoji colour emoji
    (RGB) and their line art (the ``lineart`` site), split by emoji; --seed picks the split.
    emoji needs the optional extra (make install-real) and --size 32..128.
    """
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        with progress_bar(not quiet) as bar:
            task = bar.add_task("rendering", total=None, status="")

            def report(split: str, done: int, total: int) -> None:
                bar.update(task, description=f"rendering {split}", completed=done, total=total)

            if kind is DataKind.emoji:
                shapes_only = {"--per-class": per_class != 3000, "--site-per-class": site_per_class != 300}
                shapes_only |= {"--sites": sites != 1, "--skew": skew != 0.0}
                if any(shapes_only.values()):
                    raise ConfigError(
                        f"option(s) {', '.join(k for k, v in shapes_only.items() if v)} belong to --kind shapes",
                        hint="the emoji benchmark's sizes follow from the emoji themselves; drop those options",
                        reason="bad-option",
                    )
                summary = write_emoji_benchmark(out, EmojiConfig(seed=seed, size=size), progress=report, force=force)
            else:
                shapes = ShapesConfig(
                    seed=seed, size=size, per_class=per_class, site_per_class=site_per_class, sites=sites, skew=skew
                )
                summary = write_shapes_benchmark(out, shapes, progress=report, force=force)
        if json_output:
            emit_json({"ok": True, "out": str(out), "kind": kind.value, **summary})
        else:
            stderr_console().print(f"wrote {out} ({kind.value}, seed {seed}, {size}px)")


@app.command("demo")
def demo(
    work: Annotated[
        Path, typer.Option("--work", help="Folder for data, keys, model and PKI (reused between runs).")
    ] = Path(".cache/demo"),
    profile: Annotated[
        DemoProfile,
        typer.Option("--profile", help="quick: small model, a few minutes; full: the benchmark defaults (~20 min)."),
    ] = DemoProfile.quick,
    methods: Annotated[
        list[str] | None, typer.Option("--method", help="Adaptation method to run at the site (repeatable).")
    ] = None,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """The loopback story: data, owner model, TLS server, `xkt-client adapt` at the depth site, accuracy table."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        chosen = tuple(methods) if methods else DEFAULT_DEMO_METHODS
        for name in chosen:
            get_method(name)  # an unknown name is refused before any work
        result = run_demo(work, PROFILES[profile.value], chosen)
        if json_output:
            emit_json({"ok": True, **result})


@app.command("run")
def run(
    out: Annotated[Path, typer.Option("--out", help="Folder for results.md/.json, plots and runs/ (reused: resumes).")],
    task: Annotated[
        str, typer.Option("--task", help="Target site folder of the data: depth or ir (depth-site0 ... with --sites).")
    ] = "depth",
    kind: Annotated[
        DataKind,
        typer.Option(
            "--kind",
            help="shapes: one data set, --task picks the site. emoji: the real-image table (make install-real); "
            "each seed is its own emoji split, data and fine-tuned MobileNetV2 source (--data/--model not used).",
        ),
    ] = DataKind.shapes,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Comma-separated methods, e.g. source-only,shot,oracle "
            "(oracle: supervised on target labels, the ceiling). Default: all of them.",
        ),
    ] = None,
    seeds: Annotated[
        int, typer.Option("--seeds", min=1, help="Seeds per method: N runs seeds 0 .. N-1 (emoji: N splits).")
    ] = 3,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Benchmark data folder (default: generate the built-in one into OUT/data)."),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            help="Signed source model (default: train one into OUT/model, signed with a throw-away key in OUT/keys).",
        ),
    ] = None,
    owner_key: Annotated[
        Path | None,
        typer.Option("--owner-key", help="Public key --model is signed with (default: MODEL/../keys/owner.pub)."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=1, help="Adaptation (and oracle) epochs (overrides config).")
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option("--weights", help="emoji: torchvision MobileNetV2 .pth [default: the one in the real extra]."),
    ] = None,
    size: Annotated[int, typer.Option("--size", min=32, max=128, help="emoji: image side in pixels.")] = 64,
    overrides: SetOption = None,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Adapt with each method and seed on one site; write a markdown table, JSON and plots.

    --set KEY=VALUE overrides the adaptation config (e.g. --set shot.cls_par=0.1);
    --set oracle.KEY=VALUE the oracle's training config (e.g. --set oracle.optim.lr=0.01).
    Finished runs (OUT/runs/) are reused, so rerunning an interrupted command continues it.
    """
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        method_list = None if methods is None else tuple(m.strip() for m in methods.split(",") if m.strip())
        if kind is DataKind.emoji and (data is not None or model is not None):
            raise ConfigError(
                "--data and --model are for --kind shapes",
                hint="--kind emoji makes each split's data and model in OUT",
                reason="bad-option",
            )
        plan = BenchmarkPlan(
            out=out,
            task=task,
            methods=method_list,
            seeds=tuple(range(seeds)),
            data=data,
            model=model,
            owner_key=owner_key,
            epochs=epochs,
            overrides=tuple(overrides or ()),
        )
        with progress_bar(not quiet) as bar:
            bar_task = bar.add_task("benchmark", total=None, status="")

            def report(label: str, done: int, total: int, status: str) -> None:
                bar.update(bar_task, description=label, completed=done, total=total, status=status)

            if kind is DataKind.emoji:
                emoji = EmojiPlan(
                    out=out,
                    splits=plan.seeds,
                    methods=method_list,
                    weights=weights,
                    epochs=epochs,
                    overrides=plan.overrides,
                    data=EmojiConfig(size=size),
                )
                results = run_emoji_benchmark(emoji, progress=report)
            else:
                results = run_benchmark(plan, progress=report)
        if json_output:
            runs = [{k: r[k] for k in ("method", "seed", "accuracy", "seconds", "label_free")} for r in results["runs"]]
            emit_json({"ok": True, "out": str(out), **results, "runs": runs})  # per-epoch curves: results.json
        else:
            stderr_console().print((out / "results.md").read_text(encoding="utf-8"), markup=False)
            stderr_console().print(f"wrote {out / 'results.md'}, {out / 'results.json'}", markup=False)


app.command("federated")(federated)
app.command("federated-table")(federated_table)


def main() -> None:
    """Console-script entry point."""
    app()
