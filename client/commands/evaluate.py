"""``xkt-client evaluate``: accuracy of a verified model on a site's ``eval/labels.csv``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from xkt.shared.artifact import load_artifact
from xkt.shared.cli_support import JsonOption, QuietOption, VerboseOption, command
from xkt.shared.data import labelled_dataset, read_modality
from xkt.shared.evaluation import Accuracy, accuracy
from xkt.shared.log import emit_json, stderr_console
from xkt.shared.signing import load_public_key


def evaluate(
    model: Annotated[Path, typer.Option("--model", help="Artifact folder (weights.safetensors, manifest.json/.sig).")],
    site: Annotated[Path, typer.Option("--site", help="Site folder with eval/labels.csv.")],
    owner_key: Annotated[Path, typer.Option("--owner-key", help="Public key the artifact must be signed with.")],
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Verify a model artifact, then measure its accuracy on the site's labelled eval images."""
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        loaded = load_artifact(model, [load_public_key(owner_key)])
        preprocess = loaded.manifest.input_spec.preprocess()
        modality = read_modality(site)
        dataset = labelled_dataset(site / "eval" / "labels.csv", modality, preprocess, loaded.manifest.class_names)
        result = accuracy(loaded.model, dataset, loaded.manifest.class_names)
        if json_output:
            emit_json(
                {"ok": True, "model": str(model), "site": str(site), "modality": modality.name, **result.to_json()}
            )
        else:
            _print_result(result, site, modality.name)


def _print_result(result: Accuracy, site: Path, modality: str) -> None:
    table = Table("class", "images", "accuracy", title=f"{site} ({modality})")
    for name, value in result.per_class.items():
        table.add_row(name, str(result.per_class_count[name]), f"{100 * value:.1f} %")
    table.add_row("all", str(result.count), f"{100 * result.accuracy:.1f} %", style="bold")
    stderr_console().print(table)
