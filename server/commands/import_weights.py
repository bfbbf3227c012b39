"""``xkt-server import-weights``: a torchvision checkpoint in, a signed xkt artifact out."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from xkt.server.weights_import import import_torchvision, save_imported
from xkt.shared.cli_support import JsonOption, QuietOption, VerboseOption, command
from xkt.shared.errors import DataError
from xkt.shared.log import emit_json, stderr_console
from xkt.shared.signing import load_private_key


class ImportArch(StrEnum):
    """Architectures whose torchvision checkpoints xkt can import."""

    mobilenet_v2 = "mobilenet_v2"
    resnet18 = "resnet18"


def import_weights(
    arch: Annotated[ImportArch, typer.Option("--arch", help="The checkpoint's torchvision architecture.")],
    state_dict: Annotated[
        Path, typer.Option("--torchvision-state-dict", help="The .pth file (read once, with weights_only=True).")
    ],
    key: Annotated[Path, typer.Option("--key", help="Owner private key that signs the artifact.")],
    out: Annotated[Path, typer.Option("--out", help="Artifact folder to create (written atomically).")],
    class_names: Annotated[
        Path | None,
        typer.Option("--class-names", help="Text file, one class name per line [default: class-0000 ...]."),
    ] = None,
    size: Annotated[int, typer.Option("--size", min=16, max=1024, help="Input side the model expects.")] = 224,
    model_id: Annotated[str, typer.Option("--model-id", help="Model id recorded in the manifest.")] = "xkt-imported",
    model_version: Annotated[str, typer.Option("--model-version", help="Model version in the manifest.")] = "1",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing artifact at OUT.")] = False,
    json_output: JsonOption = False,
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
) -> None:
    """Convert a torchvision MobileNetV2 / ResNet-18 state dict into a signed safetensors artifact.

    The pickle is read once here with torch's restricted unpickler; sites only ever get
    the safetensors artifact.  Inputs are RGB in [0, 1] normalised with ImageNet's
    mean and std, as torchvision's models expect.
    """
    with command(json_output=json_output, verbose=verbose, quiet=quiet):
        private_key = load_private_key(key)
        imported = import_torchvision(state_dict, arch.value)
        names = _class_names(class_names, imported.arch.num_classes)
        manifest = save_imported(
            imported,
            out_dir=out,
            private_key=private_key,
            source_name=state_dict.name,
            class_names=names,
            size=size,
            model_id=model_id,
            model_version=model_version,
            overwrite=overwrite,
        )
        result = {
            "ok": True,
            "artifact": str(out),
            "architecture": imported.arch.to_json(),
            "file_sha256": imported.file_sha256,
            "weights_sha256": manifest.weights.sha256,
        }
        if json_output:
            emit_json(result)
        else:
            stderr_console().print(
                f"wrote {out}: {arch.value}, {imported.arch.num_classes} classes, "
                f"from {state_dict.name} (sha256 {imported.file_sha256[:12]})",
                markup=False,
            )


def _class_names(path: Path | None, count: int) -> list[str]:
    """Names from the file (one per line), or ``class-0000`` ... when none is given."""
    if path is None:
        return [f"class-{i:04d}" for i in range(count)]
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}", hint="pass a UTF-8 text file, one name per line") from None
    if len(names) != count:
        raise DataError(
            f"{path} has {len(names)} class names, the checkpoint has {count} classes",
            hint="write one name per line, in the checkpoint's class order",
            reason="class-count-mismatch",
        )
    return names
