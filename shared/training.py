"""Training machinery shared by the owner's source training and the site's adaptation.

Both loops follow SHOT's optimiser recipe (methods.md §1): SGD with Nesterov momentum
0.9, weight decay 1e-3 and the polynomial decay lr0·(1 + 10p)^-0.75; both write
atomic per-epoch checkpoints so an interrupted run resumes bit-exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from xkt.shared.files import replace_file


@dataclass(frozen=True)
class OptimConfig:
    """SHOT's optimiser: SGD + Nesterov, two learning rates, polynomial decay."""

    lr: float = 1e-2  # bottleneck and classifier
    # SHOT's 0.1 assumes an ImageNet-pretrained backbone; trained from scratch (the
    # built-in benchmark) the backbone must learn as fast as the head.
    backbone_lr_ratio: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-3
    nesterov: bool = True
    decay_gamma: float = 10.0  # lr = lr0 * (1 + gamma * p) ** -power, p = step / total steps
    decay_power: float = 0.75
    warmup_epochs: float = 0.0  # linear warm-up before the decay (not in SHOT; 0 = off)


def lr_factor(step: int, total: int, optim: OptimConfig, warmup_steps: int = 0) -> float:
    """SHOT's decay factor (1 + γ·p)^-power for progress p = step / total, after a linear warm-up."""
    progress = step / max(1, total)
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return float(warmup * (1.0 + optim.decay_gamma * progress) ** (-optim.decay_power))


class Checkpoints:
    """Per-epoch checkpoints in a folder, published atomically through ``latest.json``.

    Each epoch writes new files under fresh names, then swaps ``latest.json`` with
    ``os.replace``; a crash at any point leaves the previous ``latest.json`` pointing at
    complete files.  Files are safetensors + JSON that this process wrote itself.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def load(self) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """(state, last tensors, best model tensors) of the latest epoch, or None if none was saved."""
        pointer = self.folder / "latest.json"
        if not pointer.exists():
            return None
        state = json.loads(pointer.read_text(encoding="utf-8"))
        return state, load_file(self.folder / state["last_file"]), load_file(self.folder / state["best_file"])

    def save(self, state: dict[str, Any], last: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None) -> None:
        """Write this epoch's tensors, then publish the new state in one atomic rename."""
        self.folder.mkdir(parents=True, exist_ok=True)
        epoch = state["epoch"]
        state["last_file"] = f"last-{epoch:04d}.safetensors"
        _save_synced(last, self.folder / state["last_file"])
        if best is not None:
            state["best_file"] = f"best-{epoch:04d}.safetensors"
            _save_synced(best, self.folder / state["best_file"])
        replace_file(self.folder / "latest.json", json.dumps(state, indent=1, sort_keys=True).encode("utf-8"))
        keep = {state["last_file"], state["best_file"], "latest.json"}
        for stale in self.folder.glob("*.safetensors"):
            if stale.name not in keep:
                stale.unlink()


def _save_synced(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def optimizer_tensors(optimizer: torch.optim.SGD) -> dict[str, torch.Tensor]:
    """SGD's momentum buffers keyed by parameter position, for a checkpoint."""
    tensors = {}
    for index, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        buffer = optimizer.state.get(param, {}).get("momentum_buffer")
        if buffer is not None:
            tensors[f"optimizer.{index}.momentum_buffer"] = buffer
    return tensors


def restore_optimizer(optimizer: torch.optim.SGD, tensors: dict[str, torch.Tensor]) -> None:
    """Put back the momentum buffers :func:`optimizer_tensors` saved (same parameter order)."""
    for index, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        key = f"optimizer.{index}.momentum_buffer"
        if key in tensors:
            optimizer.state[param]["momentum_buffer"] = tensors[key].clone()
