"""Every registered method through init → a few steps → predict, on a tiny CPU set (DomainBed-style)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xkt.client.methods import METHODS, get_method
from xkt.client.trainer import AdaptConfig, adapt, method_config, resolve_config
from xkt.shared.data import RGB, ImageDataset, Pair, PairedDataset, Preprocess
from xkt.shared.errors import ConfigError
from xkt.shared.evaluation import predict
from xkt.shared.models import ArchSpec, SourceClassifier, batchnorm_statistics, build_model


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> ImageDataset:
    """Sixteen random 32-px RGB images, unlabelled."""
    folder = tmp_path_factory.mktemp("target")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(16):
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    return ImageDataset(paths, RGB, Preprocess(size=32))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> PairedDataset:
    """Ten random task-irrelevant pairs (RGB half, second RGB half standing in for the target modality)."""
    folder = tmp_path_factory.mktemp("paired")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(10):
        halves = (folder / f"rgb-{i}.png", folder / f"target-{i}.png")
        for path in halves:
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        rows.append(Pair(*halves))
    return PairedDataset(rows, RGB, Preprocess(size=32))


def _source() -> SourceClassifier:
    torch.manual_seed(0)
    return build_model(ArchSpec("resnet_tiny", num_classes=3, bottleneck_dim=16))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_init_steps_predict(name: str, target: ImageDataset, pairs: PairedDataset, tmp_path: Path) -> None:
    source = _source()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    cfg = AdaptConfig(epochs=1, batch_size=8, threads=1)  # 2 steps per stage
    result = adapt(source, target, name, cfg, pairs=pairs, checkpoint_dir=tmp_path)

    predictions = predict(result.model, target)
    assert predictions.shape == (16,) and int(predictions.max()) < 3
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items()), "source was modified"
    for key, value in result.model.classifier.state_dict().items():
        assert torch.equal(value, before[f"classifier.{key}"]), f"classifier {key} changed"
    bn_before, bn_after = batchnorm_statistics(source), batchnorm_statistics(result.model)
    changed = any(not torch.equal(a.running_mean, b.running_mean) for a, b in zip(bn_before, bn_after, strict=True))
    assert changed == METHODS[name].trains
    assert result.metrics["trained"] == METHODS[name].trains
    assert result.config["method"] == name
    assert {"mean_entropy", "im"} <= set(result.metrics["final"])


def test_every_method_config_has_a_section_in_adapt_config() -> None:
    sections = {f.name for f in dataclasses.fields(AdaptConfig)}
    for name, method in METHODS.items():
        if dataclasses.fields(method.default_config):
            assert name.replace("-", "_") in sections, f"AdaptConfig has no [{name}] section"
        assert method_config(AdaptConfig(), method) == method.default_config


@pytest.mark.parametrize("name", sorted(name for name, method in METHODS.items() if method.needs_pairs))
def test_a_method_that_needs_pairs_is_refused_without_them(name: str, target: ImageDataset, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs task-irrelevant pairs") as error:
        adapt(_source(), target, name, AdaptConfig(epochs=1, batch_size=8), checkpoint_dir=tmp_path)
    assert error.value.reason == "missing-pairs" and "paired/pairs.csv" in error.value.hint


def test_shot_im_is_shot_without_pseudo_labels() -> None:
    assert get_method("shot").default_config.weights == {"im": 1.0, "pl": 0.3}
    assert get_method("shot-im").default_config.weights == {"im": 1.0, "pl": 0.0}


def test_unknown_method_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as error:
        get_method("shoot")
    assert "shot" in error.value.hint and "source-only" in error.value.hint


def test_batch_size_zero_means_the_methods_preset_and_an_explicit_value_wins() -> None:
    assert resolve_config(AdaptConfig(), "shot").batch_size == 64  # SHOT's
    assert resolve_config(AdaptConfig(), "socket").batch_size == 32  # SOCKET's, for TR and TI batches
    assert resolve_config(AdaptConfig(batch_size=16), "socket").batch_size == 16
