"""Source training: SHOT's schedule, learning, checkpoints and exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xkt.server.source_training import (
    ModelConfig,
    OptimConfig,
    SourceTrainConfig,
    augment,
    lr_factor,
    make_optimizer,
    train_source,
)
from xkt.shared.errors import ConfigError
from xkt.shared.models import ArchSpec, build_model

TINY = SourceTrainConfig(epochs=3, batch_size=8, model=ModelConfig(name="resnet_tiny"), optim=OptimConfig(lr=0.02))


def make_owner_data(root: Path, per_class: int = 12) -> Path:
    """Two classes told apart by where a bright bar sits (top or bottom; flips keep it there)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rows = []
        for index in range(per_class * 2):
            label = ("top", "bottom")[index % 2]
            image = rng.integers(0, 60, (16, 16, 3)).astype(np.uint8)
            row = int(rng.integers(0, 4)) + (0 if label == "top" else 10)
            image[row : row + 5, 3:13] = 255
            path = root / "owner" / split / "images" / f"{index:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            rows.append(f"images/{index:03d}.png,{label}\n")
        (root / "owner" / split / "labels.csv").write_text("path,label\n" + "".join(rows))
    return root


def test_lr_factor_follows_shot_polynomial_decay() -> None:
    optim = OptimConfig()
    assert lr_factor(0, 100, optim) == 1.0
    assert lr_factor(100, 100, optim) == pytest.approx(11**-0.75)
    assert lr_factor(50, 100, optim) == pytest.approx(6**-0.75)


def test_lr_factor_warms_up_linearly_first() -> None:
    optim = OptimConfig()
    assert lr_factor(0, 100, optim, warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(4, 100, optim, warmup_steps=10) == pytest.approx(0.5 * 1.4**-0.75)
    assert lr_factor(20, 100, optim, warmup_steps=10) == pytest.approx(3.0**-0.75)


def test_backbone_learns_ten_times_slower() -> None:
    optimizer = make_optimizer(build_model(ArchSpec("resnet_tiny", 2)), OptimConfig(lr=0.01, backbone_lr_ratio=0.1))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.001, 0.01])
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["weight_decay"] == 1e-3


def test_augment_keeps_shape_and_is_seeded() -> None:
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    first = augment(images, torch.Generator().manual_seed(1))
    again = augment(images, torch.Generator().manual_seed(1))
    assert first.shape == images.shape and torch.equal(first, again)


def test_augment_is_a_shifted_possibly_flipped_crop_of_each_image() -> None:
    images = torch.rand(16, 3, 8, 8)
    out = augment(images, torch.Generator().manual_seed(3), pad=2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    for i in range(16):
        crops = [padded[i, :, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)


def test_training_learns_and_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    data = make_owner_data(tmp_path / "data")
    trained = train_source(data, TINY, tmp_path / "ckpt")
    assert trained.class_names == ["bottom", "top"]
    assert trained.metrics["best_val_accuracy"] >= 0.9
    best_epoch = trained.metrics["best_epoch"]
    assert trained.metrics["history"][best_epoch - 1]["val_accuracy"] == trained.metrics["best_val_accuracy"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir())[-1] == "latest.json"


def test_an_interrupted_run_resumes_to_identical_weights(tmp_path: Path) -> None:
    data = make_owner_data(tmp_path / "data")
    straight = train_source(data, TINY, tmp_path / "a")

    def interrupt_in_epoch_3(label: str, done: int, total: int, status: str) -> None:
        if label.startswith("epoch 3"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_source(data, TINY, tmp_path / "b", progress=interrupt_in_epoch_3)
    resumed = train_source(data, TINY, tmp_path / "b", resume=True)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert resumed.metrics["history"] == straight.metrics["history"]


def test_resume_with_another_config_is_refused(tmp_path: Path) -> None:
    data = make_owner_data(tmp_path / "data")
    train_source(data, SourceTrainConfig(epochs=1, batch_size=8, model=ModelConfig(name="resnet_tiny")), tmp_path / "c")
    with pytest.raises(ConfigError, match="different config"):
        train_source(data, TINY, tmp_path / "c", resume=True)
