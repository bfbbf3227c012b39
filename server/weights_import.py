"""Bring an existing torchvision-format classifier into xkt's own signed form.

Owners rarely start from nothing: they have an ImageNet checkpoint (torchvision's
MobileNetV2 or ResNet-18) as a ``.pth`` file.  Such a file is a *pickle*, and unpickling
runs code.  So it is read exactly once, here, on the owner's machine, with
``torch.load(weights_only=True)`` (a restricted unpickler that builds tensors and plain
containers and refuses everything else), converted, and from then on only the project's
safetensors artifact exists: no site ever sees the pickle.

The conversion is by name, because xkt's backbones use torchvision's module names
(:mod:`xkt.shared.models`): every backbone tensor must be present with its exact shape,
and nothing may be left over except the head.  The head (``classifier.1`` of MobileNetV2,
``fc`` of ResNet-18) becomes xkt's weight-normalised classifier with v = W and
g = ‖W‖ per row, which computes W·x + b again (to float rounding), and the architecture
gets ``bottleneck_dim=0`` (no SHOT bottleneck): the imported model predicts exactly what
the original did.  ``xkt-server train --init`` then keeps the backbone and puts a fresh
SHOT head for the owner's classes on top.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from xkt.shared.artifact import InputSpec, Manifest, save_artifact
from xkt.shared.data import IMAGENET_MEAN, IMAGENET_STD
from xkt.shared.errors import DataError
from xkt.shared.models import ArchSpec, SourceClassifier, build_model, resolve_arch

TORCHVISION_HEADS = {"mobilenet_v2": "classifier.1", "resnet18": "fc"}
"""Where torchvision keeps each architecture's final linear layer."""
MAX_CHECKPOINT_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class ImportedModel:
    """A converted classifier, its architecture, and the digest of the file it came from."""

    model: SourceClassifier
    arch: ArchSpec
    file_sha256: str


def read_torchvision_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The file's tensors (name → tensor) and its sha256, read once with the restricted unpickler.

    A ``{"state_dict": {...}}`` or ``{"model": {...}}`` wrapper, as training scripts often
    write, is unwrapped; anything that is not a flat mapping of names to tensors is refused.
    """
    if not path.is_file():
        raise DataError(f"{path} does not exist", hint="pass the .pth file with --torchvision-state-dict")
    if path.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise DataError(f"{path} is over 2 GiB", hint="pass a classifier state dict, not a training archive")
    data = path.read_bytes()
    try:
        loaded = torch.load(
            io.BytesIO(data),  # the very bytes that were hashed
            map_location="cpu",
            weights_only=True,
        )
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as error:
        raise DataError(
            f"{path} is not a plain torch state dict ({type(error).__name__}: {str(error).splitlines()[0][:200]})",
            hint="save it with torch.save(model.state_dict(), FILE); files that need arbitrary code are refused",
            reason="bad-checkpoint",
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, dict) and set(loaded) == {wrapper} and isinstance(loaded[wrapper], dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise DataError(
            f"{path} does not hold a mapping of tensor names to tensors",
            hint="save it with torch.save(model.state_dict(), FILE)",
            reason="bad-checkpoint",
        )
    return dict(loaded), hashlib.sha256(data).hexdigest()


def convert_torchvision(state: dict[str, torch.Tensor], arch_name: str) -> tuple[SourceClassifier, ArchSpec]:
    """Build xkt's classifier for ``arch_name`` from a torchvision state dict, checking every name and shape."""
    head = TORCHVISION_HEADS.get(arch_name)
    if head is None:
        raise DataError(
            f"cannot import architecture {arch_name!r}",
            hint=f"choose one of: {', '.join(sorted(TORCHVISION_HEADS))}",
            reason="unknown-architecture",
        )
    weight, bias = state.get(f"{head}.weight"), state.get(f"{head}.bias")
    if weight is None or bias is None or weight.ndim != 2:
        raise DataError(
            f"the state dict has no {head}.weight/{head}.bias linear head, as a torchvision {arch_name} has",
            hint=f"check --arch: the file's first tensors are {', '.join(list(state)[:3])}",
            reason="wrong-architecture",
        )
    arch = resolve_arch(arch_name, {}, num_classes=int(weight.shape[0]), bottleneck_dim=0)
    model = build_model(arch)
    backbone = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
    _check_names_and_shapes(backbone, model.backbone.state_dict(), arch_name)
    converted = {f"backbone.{k}": _like(v, model.backbone.state_dict()[k]) for k, v in backbone.items()}
    w = weight.to(torch.float32)
    converted |= {
        "classifier.weight_v": w.clone(),
        "classifier.weight_g": w.norm(dim=1, keepdim=True),
        "classifier.bias": bias.to(torch.float32).clone(),
    }
    model.load_state_dict(converted, strict=True)
    model.eval()
    return model, arch


def import_torchvision(path: Path, arch_name: str) -> ImportedModel:
    """Read, check and convert one torchvision checkpoint (see the module docstring)."""
    state, digest = read_torchvision_state_dict(path)
    model, arch = convert_torchvision(state, arch_name)
    return ImportedModel(model, arch, digest)


def save_imported(
    imported: ImportedModel,
    *,
    out_dir: Path,
    private_key: Ed25519PrivateKey,
    source_name: str,
    class_names: Sequence[str] | None = None,
    size: int = 224,
    model_id: str = "xkt-imported",
    model_version: str = "1",
    overwrite: bool = False,
) -> Manifest:
    """Sign and write the imported model: RGB in [0, 1] with ImageNet's mean/std, as torchvision expects."""
    names = list(class_names) if class_names is not None else None
    return save_artifact(
        imported.model,
        out_dir=out_dir,
        private_key=private_key,
        model_id=model_id,
        model_version=model_version,
        arch=imported.arch,
        class_names=names or [f"class-{i:04d}" for i in range(imported.arch.num_classes)],
        input_spec=InputSpec("rgb", 3, size, IMAGENET_MEAN, IMAGENET_STD),
        provenance={
            "kind": "imported",
            "format": "torchvision-state-dict",
            "file": source_name,
            "file_sha256": imported.file_sha256,
        },
        overwrite=overwrite,
    )


def _check_names_and_shapes(found: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor], arch: str) -> None:
    missing = sorted(set(wanted) - set(found))
    extra = sorted(set(found) - set(wanted))
    if missing or extra:
        parts = [
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(extra[:3])}" if extra else "",
        ]
        raise DataError(
            f"the state dict is not a torchvision {arch}: {'; '.join(p for p in parts if p)}"
            f" ({len(missing)} missing, {len(extra)} unexpected tensors)",
            hint="check --arch, and that the file is torchvision's own format (no 'module.' prefixes)",
            reason="wrong-architecture",
        )
    for name, tensor in found.items():
        if tuple(tensor.shape) != tuple(wanted[name].shape):
            raise DataError(
                f"{name} has shape {tuple(tensor.shape)}, a torchvision {arch} has {tuple(wanted[name].shape)}",
                hint="check --arch (a different width or variant is not supported)",
                reason="wrong-architecture",
            )
        if tensor.dtype.is_floating_point != wanted[name].dtype.is_floating_point:
            raise DataError(
                f"{name} is {tensor.dtype}, expected {wanted[name].dtype}",
                hint="the file is not a torchvision state dict",
                reason="wrong-dtype",
            )


def _like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``tensor`` in the dtype xkt stores (half-precision checkpoints are widened to float32)."""
    return tensor.detach().to(reference.dtype).clone()
