"""TOML configs with typed dataclasses and --set overrides."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from xkt.shared.config import load_config, to_dict, to_toml
from xkt.shared.errors import ConfigError


@dataclass(frozen=True)
class Optim:
    lr: float = 0.01
    nesterov: bool = True


@dataclass(frozen=True)
class Run:
    epochs: int = 10
    name: str = "run"
    sizes: tuple[int, ...] = (1, 2)
    optim: Optim = field(default_factory=Optim)


def test_defaults_then_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('epochs = 3\nname = "file"\n[optim]\nlr = 0.5\n')
    cfg = load_config(Run, path=path, overrides=["optim.lr=1e-3", "name=cli", "sizes=[4, 5]"])
    assert cfg == Run(epochs=3, name="cli", sizes=(4, 5), optim=Optim(lr=0.001, nesterov=True))


def test_int_widens_to_float_but_nothing_else_is_coerced() -> None:
    assert load_config(Run, overrides=["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="must be int"):
        load_config(Run, overrides=["epochs=1.5"])
    with pytest.raises(ConfigError, match="must be int"):
        load_config(Run, overrides=["epochs=true"])
    with pytest.raises(ConfigError, match="must be bool"):
        load_config(Run, overrides=["optim.nesterov=1"])


def test_unknown_keys_get_a_near_miss_hint() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(Run, overrides=["optim.lrr=0.1"])
    assert "optim.lrr" in caught.value.message
    assert "optim.lr" in caught.value.hint


def test_bad_files_and_overrides_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, path=tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("epochs = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(Run, path=tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(Run, overrides=["epochs"])
    with pytest.raises(ConfigError, match="must be a table"):
        load_config(Run, overrides=["optim=3"])


def test_resolved_config_round_trips_through_toml() -> None:
    cfg = load_config(Run, overrides=["optim.lr=0.25", 'name="a \\"quoted\\" name"'])
    text = to_toml(cfg)
    assert load_config(Run, overrides=[]) != cfg
    parsed = tomllib.loads(text)
    assert parsed == to_dict(cfg)
