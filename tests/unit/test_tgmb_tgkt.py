"""TGMB + TGKT: gradient reversal, the translator's input normalisation, both stages, exact resume, the toy shift."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_trainer import NAMES, _Toy  # the trainer's toy site: tinted RGB source, inverted low-contrast depth

from xkt.client.methods.base import SiteData
from xkt.client.methods.tgmb_tgkt import (
    TgmbTgkt,
    TgmbTgktConfig,
    reverse_gradient,
)
from xkt.client.methods.translator import Translator
from xkt.client.trainer import AdaptConfig, AdaptResult, adapt, batches
from xkt.shared.config import load_config
from xkt.shared.data import Preprocess, normalise
from xkt.shared.errors import ConfigError
from xkt.shared.evaluation import accuracy
from xkt.shared.models import SourceClassifier
from xkt.shared.training import Checkpoints


def _clone(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(value, right[name]) for name, value in left.items())


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> _Toy:
    torch.set_num_threads(1)
    return _Toy(tmp_path_factory.mktemp("toy"))


# ------------------------------------------------------------------ pure pieces


def test_gradient_reversal_is_identity_forward_and_negated_scaled_backward() -> None:
    inputs = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    outputs = reverse_gradient(inputs, 0.5)
    assert torch.equal(outputs, inputs)
    (outputs * torch.tensor([2.0, 4.0, -6.0])).sum().backward()  # type: ignore[no-untyped-call]
    assert inputs.grad is not None
    assert inputs.grad.tolist() == [-1.0, -2.0, 3.0]  # −0.5 × (2, 4, −6)


def test_gradient_reversal_default_scale_negates() -> None:
    inputs = torch.ones(2, requires_grad=True)
    reverse_gradient(inputs).sum().backward()  # type: ignore[no-untyped-call]
    assert inputs.grad is not None and inputs.grad.tolist() == [-1.0, -1.0]


def test_the_translator_recovers_one_channel_from_a_real_preprocess() -> None:
    preprocess = Preprocess(size=4)  # ImageNet statistics, as the site loader applies them
    unit = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)).expand(2, 3, 4, 4)
    images = normalise(unit, preprocess)
    recovered = Translator(preprocess.mean, preprocess.std).unit_image(images)  # (B, 1, H, W)
    assert torch.allclose(recovered, unit[:, :1], atol=1e-5)  # the [0, 1] value the sensor gave


def test_config_weights_name_every_term_and_bad_values_are_refused() -> None:
    config = TgmbTgktConfig()
    assert set(config.weights) == {"rec", "adv", "src_im", "src_bn", "kd", "f", "im", "self"}
    assert [(s.name, s.epochs, s.trains_model) for s in TgmbTgkt(config).stages(7)] == [
        ("tgmb", config.tgmb_epochs, False),
        ("tgkt", 7, True),
    ]
    for bad in ({"tgmb_epochs": 0}, {"temperature": 0.0}, {"pseudo_labels": "oracle"}):
        with pytest.raises(ConfigError):
            TgmbTgktConfig(**bad)


def test_the_no_translation_ablation_is_one_set_away_and_has_only_the_tgkt_stage() -> None:
    cfg = load_config(AdaptConfig, overrides=["tgmb_tgkt.translate=false"])
    assert cfg.tgmb_tgkt == TgmbTgktConfig(translate=False)
    assert [(s.name, s.epochs, s.trains_model) for s in TgmbTgkt(cfg.tgmb_tgkt).stages(7)] == [("tgkt", 7, True)]
    TgmbTgktConfig(translate=False, tgmb_epochs=0)  # stage 1's length is irrelevant without stage 1


# ------------------------------------------------------------------ through the trainer


class _Spy:
    """Records the method, the frozen source it was given, and snapshots at each stage's start."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.method: TgmbTgkt | None = None
        self.source: SourceClassifier | None = None
        self.source_at_setup: dict[str, torch.Tensor] = {}
        self.at_stage: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        setup, groups = TgmbTgkt.setup, TgmbTgkt.trainable_groups

        def spy_setup(method: TgmbTgkt, source: SourceClassifier, data: SiteData) -> dict[str, float]:
            self.method, self.source, self.source_at_setup = method, source, _clone(source)
            return setup(method, source, data)

        def spy_groups(method: TgmbTgkt, model: SourceClassifier) -> dict[str, list[torch.nn.Parameter]]:
            translator, discriminator = method.modules().values()
            snapshot = {"model": _clone(model), "translator": _clone(translator), "critic": _clone(discriminator)}
            self.at_stage[method.stage] = snapshot
            return groups(method, model)

        monkeypatch.setattr(TgmbTgkt, "setup", spy_setup)
        monkeypatch.setattr(TgmbTgkt, "trainable_groups", spy_groups)


def test_stage_one_trains_only_the_translator_and_stage_two_only_the_model(
    toy: _Toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy(monkeypatch)
    cfg = AdaptConfig(epochs=2, batch_size=16, threads=1, tgmb_tgkt=TgmbTgktConfig(tgmb_epochs=2))
    result = adapt(toy.source, toy.target, "tgmb-tgkt", cfg, pairs=toy.pairs, checkpoint_dir=tmp_path)
    assert spy.method is not None and spy.source is not None
    start, between = spy.at_stage["tgmb"], spy.at_stage["tgkt"]
    original = _clone(toy.source)

    assert _same(start["model"], original) and _same(between["model"], original), "stage 1 changed the model"
    assert not _same(start["translator"], between["translator"]), "stage 1 did not train the translator"
    assert not _same(start["critic"], between["critic"]), "stage 1 did not train the critic"

    final = _clone(result.model)
    assert not _same(final, original), "stage 2 did not train the model"
    assert all(torch.equal(final[k], original[k]) for k in original if k.startswith("classifier.")), "classifier"
    modules = spy.method.modules()
    assert _same(_clone(modules["translator"]), between["translator"]), "stage 2 changed the translator"
    assert _same(_clone(modules["discriminator"]), between["critic"]), "stage 2 changed the critic"
    assert _same(_clone(spy.source), spy.source_at_setup) and _same(spy.source_at_setup, original)
    assert not spy.source.training and not any(p.requires_grad for p in spy.source.parameters())
    assert [entry["stage"] for entry in result.metrics["history"]] == ["tgmb"] * 2 + ["tgkt"] * 2
    assert set(result.metrics["history"][0]["losses"]) == {"rec", "adv", "src_im", "src_bn"}
    assert set(result.metrics["history"][-1]["losses"]) == {"kd", "f", "im", "self"}


class _Interrupt(Exception):
    pass


_RESUME_CFG = AdaptConfig(epochs=2, batch_size=16, threads=1, tgmb_tgkt=TgmbTgktConfig(tgmb_epochs=2))


@pytest.fixture(scope="module")
def straight(toy: _Toy, tmp_path_factory: pytest.TempPathFactory) -> AdaptResult:
    folder = tmp_path_factory.mktemp("straight")
    return adapt(toy.source, toy.target, "tgmb-tgkt", _RESUME_CFG, pairs=toy.pairs, checkpoint_dir=folder)


@pytest.mark.parametrize("stop_at", ["tgmb epoch 2/4", "tgkt epoch 3/4", "tgkt epoch 4/4"])
def test_interrupted_then_resumed_equals_uninterrupted(
    toy: _Toy, straight: AdaptResult, tmp_path: Path, stop_at: str
) -> None:
    _assert_resume_is_exact(toy, _RESUME_CFG, straight, stop_at, tmp_path)


def _assert_resume_is_exact(toy: _Toy, cfg: AdaptConfig, reference: AdaptResult, stop_at: str, folder: Path) -> None:
    """Interrupt at step 2 of the epoch labelled ``stop_at``, resume, and compare with ``reference``."""

    def stop(label: str, done: int, total: int, status: str) -> None:
        if label.endswith(stop_at) and done == 2:
            raise _Interrupt

    run: dict[str, Any] = {"pairs": toy.pairs, "checkpoint_dir": folder}
    with pytest.raises(_Interrupt):
        adapt(toy.source, toy.target, "tgmb-tgkt", cfg, progress=stop, **run)
    resumed = adapt(toy.source, toy.target, "tgmb-tgkt", cfg, resume=True, **run)

    assert _same(_clone(reference.model), _clone(resumed.model))
    for name in ("setup", "source", "history", "selected_epoch", "final", "guard"):
        assert reference.metrics[name] == resumed.metrics[name], name


def test_tgmb_tgkt_beats_source_only_on_the_modality_shift(toy: _Toy, tmp_path: Path) -> None:
    cfg = AdaptConfig(epochs=10, batch_size=16, threads=1)  # the method's defaults: 10 TGMB + 10 TGKT epochs
    ablation = AdaptConfig(epochs=10, batch_size=16, threads=1, tgmb_tgkt=TgmbTgktConfig(translate=False))
    scores = {}
    runs = {"source-only": ("source-only", cfg), "tgmb-tgkt": ("tgmb-tgkt", cfg), "tgkt": ("tgmb-tgkt", ablation)}
    for name, (method, config) in runs.items():
        result = adapt(toy.source, toy.target, method, config, pairs=toy.pairs, checkpoint_dir=tmp_path / name)
        scores[name] = accuracy(result.model, toy.target, NAMES).accuracy
    print(f"toy target accuracy: {scores}")
    # Seen on CPU, torch 2.13, 1 thread: source-only 0.271, tgmb-tgkt 0.750, tgkt alone 0.750 (48 images).
    assert scores["tgmb-tgkt"] > scores["source-only"] + 0.2


# ------------------------------------------------------- ablation: TGKT without TGMB


_NO_TRANSLATION = AdaptConfig(epochs=3, batch_size=16, threads=1, tgmb_tgkt=TgmbTgktConfig(translate=False))


@pytest.fixture(scope="module")
def untranslated(toy: _Toy, tmp_path_factory: pytest.TempPathFactory) -> AdaptResult:
    folder = tmp_path_factory.mktemp("untranslated")
    return adapt(toy.source, toy.target, "tgmb-tgkt", _NO_TRANSLATION, pairs=toy.pairs, checkpoint_dir=folder)


def test_without_translation_tgkt_distils_the_source_on_the_images_as_they_are(
    toy: _Toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, untranslated: AdaptResult
) -> None:
    seen: list[TgmbTgkt] = []
    setup = TgmbTgkt.setup

    def spy_setup(method: TgmbTgkt, source: SourceClassifier, data: SiteData) -> dict[str, float]:
        seen.append(method)
        return setup(method, source, data)

    monkeypatch.setattr(TgmbTgkt, "setup", spy_setup)
    cfg = AdaptConfig(epochs=1, batch_size=16, threads=1, tgmb_tgkt=TgmbTgktConfig(translate=False))
    adapt(toy.source, toy.target, "tgmb-tgkt", cfg, pairs=toy.pairs, checkpoint_dir=tmp_path)
    (method,) = seen
    assert method.translator is None and method.discriminator is None and method.modules() == {}
    assert method.teacher_logits is not None
    images, _ = next(batches(toy.target, torch.arange(len(toy.target)), len(toy.target)))
    with torch.no_grad():
        expected = toy.source.eval()(images)  # the frozen source on the channel-replicated depth, no T
    assert torch.allclose(method.teacher_logits, expected, atol=1e-5)

    history = untranslated.metrics["history"]
    assert [entry["stage"] for entry in history] == ["tgkt"] * 3  # one stage, no TGMB epochs
    assert all(set(entry["losses"]) == {"kd", "f", "im", "self"} for entry in history)
    assert history[0]["teacher_agreement"] == 1.0  # the teacher is the source, the epoch-1 model
    loaded = Checkpoints(tmp_path).load()
    assert loaded is not None and not any(name.startswith("module.") for name in loaded[1])  # no T, no D
    original = _clone(toy.source)
    final = _clone(untranslated.model)
    assert not _same(final, original), "TGKT did not train the model"
    assert all(torch.equal(final[k], original[k]) for k in original if k.startswith("classifier.")), "classifier"


@pytest.mark.parametrize("stop_at", ["tgkt epoch 2/3", "tgkt epoch 3/3"])
def test_without_translation_interrupted_then_resumed_equals_uninterrupted(
    toy: _Toy, untranslated: AdaptResult, tmp_path: Path, stop_at: str
) -> None:
    _assert_resume_is_exact(toy, _NO_TRANSLATION, untranslated, stop_at, tmp_path)
