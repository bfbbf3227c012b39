"""The demo behind ``make demo``: the product's own commands, run in order, on built-in data.

It runs exactly what a newcomer would type (each command is printed first), reusing
whatever a previous run left in the work folder: the data set, the owner's keys and the
trained model.  The final table shows the owner's RGB model on the same eval scenes in
RGB, depth and infrared, which is the modality gap that adaptation has to close.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from xkt.shared.errors import XktError
from xkt.shared.log import stderr_console

MODALITIES = ("rgb", "depth", "ir")


def _command(name: str) -> str:
    """The console script installed beside this interpreter (the venv's own xkt-* commands)."""
    return str(Path(sys.executable).parent / name)


def _run(args: list[str], *, capture: bool = False) -> str:
    console = stderr_console()
    shown = [Path(args[0]).name, *args[1:]]
    console.print(f"$ {shlex.join(shown)}", style="bold", markup=False)
    completed = subprocess.run(args, stdout=subprocess.PIPE if capture else None, text=True, check=False)
    if completed.returncode != 0:
        raise XktError(
            f"`{shlex.join(shown)}` failed with exit code {completed.returncode}",
            hint="see its error line above",
            reason="demo-step-failed",
        )
    return completed.stdout or ""


def run_demo(work: Path, *, epochs: int | None = None) -> dict[str, Any]:
    """Data → keys → source training → evaluation on RGB, depth and IR; returns the accuracies."""
    data, keys, model = work / "data", work / "keys", work / "model"
    if not (data / "dataset.json").exists():
        _run([_command("xkt-bench"), "data", "--kind", "shapes", "--out", str(data), "--seed", "0", "--force"])
    if not (keys / "owner.key").exists():
        _run([_command("xkt-server"), "keys", "init", "--out", str(keys)])
    training: dict[str, Any] = {}
    if not (model / "manifest.json").exists():
        args = [
            "train",
            "--data",
            str(data),
            "--key",
            str(keys / "owner.key"),
            "--out",
            str(model),
            "--arch",
            "resnet18",
        ]
        args += ["--resume", "--json", *(["--epochs", str(epochs)] if epochs else [])]
        training = json.loads(_run([_command("xkt-server"), *args], capture=True))
    else:
        stderr_console().print(f"reusing the trained model in {model} (delete it to retrain)")
    results = {}
    for modality in MODALITIES:
        args = ["evaluate", "--model", str(model), "--site", str(data / modality)]
        args += ["--owner-key", str(keys / "owner.pub"), "--json", "--quiet"]
        results[modality] = json.loads(_run([_command("xkt-client"), *args], capture=True))
    _print_table(results, training)
    return {
        "accuracy": {m: r["accuracy"] for m, r in results.items()},
        "eval_images": {m: r["count"] for m, r in results.items()},
        "training_seconds": training.get("seconds"),
    }


def _print_table(results: dict[str, dict[str, Any]], training: dict[str, Any]) -> None:
    rgb = results["rgb"]["accuracy"]
    table = Table("modality", "eval images", "accuracy", "vs RGB", title="owner's RGB model on the same eval scenes")
    for modality, result in results.items():
        gap = "" if modality == "rgb" else f"{100 * (result['accuracy'] - rgb):+.1f} pts"
        table.add_row(modality, str(result["count"]), f"{100 * result['accuracy']:.1f} %", gap)
    console = stderr_console()
    console.print(table)
    if training:
        console.print(
            f"source training took {training['seconds']:.0f} s (best val accuracy {training['best_val_accuracy']:.3f})"
        )
    console.print("Next: adapting to depth and IR on the sites' own data (xkt-client adapt) closes this gap.")
