"""``xkt-server train``: train the RGB source model and publish it as a signed artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from xkt.server.source_training import SourceTrainConfig, backbone_init, save_source, train_source
from xkt.shared.artifact import load_artifact
from xkt.shared.cli_support import JsonOption, QuietOption, SetOption, VerboseOption, command
from xkt.shared.config import load_config
from xkt.shared.errors import DataError
from xkt.shared.log import emit_json, progress_bar, stderr_console
from xkt.shared.signing import load_private_key, load_public_key


def train(
    data: Annotated[Path, typer.Option("--data", help="Data folder with owner/train and owner/val labels.csv.")],
    key: Annotated[Path, typer.Option("--key", help="Owner private key (from `xkt-server keys init`).")],
    out: Annotated[Path, typer.Option("--out", help="Artifact folder to create (written atomically).")],
    arch: Annotated[
        str | None, typer.Option("--arch", help="Architecture: resnet18, resnet_tiny, mobilenet_v2.")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Training epochs (overrides config).")] = None,
    init: Annotated[
        Path | None,
        typer.Option("--init", help="Start the backbone from this signed artifact (e.g. from `import-weights`)."),
    ] = None,
    init_key: Annotated[
        Path | None,
        typer.Option("--init-key", help="Public key --init is signed with [default: the public half of --key]."),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML config file.")] = None,
    overrides: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    checkpoints: Annotated[
        Path | None,
        typer.Option("--checkpoints", help="Checkpoint folder [default: OUT.ckpt].", rich_help_panel="Advanced"),
    ] = None,
    model_id: Annotated[str, typer.Option("--model-id", help="Model id recorded in the manifest.")] = "xkt-source",
    model_version: Annotated[str, typer.Option("--model-version", help="Model version in the manifest.")] = "1",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing artifact at OUT.")] = False,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Train the source classifier with SHOT's recipe and write a signed artifact.

    With --init the backbone starts from a signed artifact's weights (verified first) and
    a fresh SHOT head is trained for the data's classes; SHOT's fine-tuning rate is then
    the usual choice: --set optim.lr=0.01 --set optim.warmup_epochs=0.
    """
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        private_key = load_private_key(key)  # fail before hours of training, not after
        if not (data / "owner" / "train" / "labels.csv").is_file():
            raise DataError(
                f"{data} has no owner/train/labels.csv",
                hint="generate the built-in data with `xkt-bench data --kind shapes --out DIR`",
                reason="missing-owner-data",
            )
        start = None
        if init is not None:
            trusted = load_public_key(init_key) if init_key else private_key.public_key()
            start = backbone_init(load_artifact(init, [trusted]))  # verified before a tensor is built
        extra = [
            *([f'model.name="{start.arch_name}"'] if start else []),
            *(overrides or []),
            *([f'model.name="{arch}"'] if arch else []),
            *([f"epochs={epochs}"] if epochs else []),
        ]
        cfg = load_config(SourceTrainConfig, path=config, overrides=extra)
        with progress_bar(not quiet) as bar:
            task = bar.add_task("training", total=None, status="")

            def report(label: str, done: int, total: int, status: str) -> None:
                bar.update(task, description=label, completed=done, total=total, status=status)

            trained = train_source(
                data, cfg, checkpoints or out.with_name(out.name + ".ckpt"), resume=resume, progress=report, init=start
            )
        manifest = save_source(
            trained,
            cfg,
            data,
            out_dir=out,
            private_key=private_key,
            model_id=model_id,
            model_version=model_version,
            init=start,
            init_artifact=init.name if init else None,
            overwrite=overwrite,
        )
        result = {"ok": True, "artifact": str(out), "weights_sha256": manifest.weights.sha256, **trained.metrics}
        if json_output:
            emit_json(result)
        else:
            _print_summary(result)


def _print_summary(result: dict[str, object]) -> None:
    table = Table(title="source training", show_header=False)
    for key in ("artifact", "best_val_accuracy", "best_epoch", "epochs", "train_images", "seconds", "weights_sha256"):
        table.add_row(key, str(result[key]))
    stderr_console().print(table)
