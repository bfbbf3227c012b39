"""validate-data: each contract violation is found and named with a fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from xkt.client.data_checks import validate_site

SITE_TOML = '[modality]\nname = "depth"\nchannels = 1\nunits = "mm"\nvalue_range = [0, 4000]\n'


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _depth(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, (8, 8)).astype(np.uint16)


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (8, 8, 3)).astype(np.uint8)


def make_site(root: Path) -> Path:
    (root).mkdir(parents=True, exist_ok=True)
    (root / "site.toml").write_text(SITE_TOML)
    for i in range(3):
        _save(root / "target" / f"{i}.png", _depth(i))
        _save(root / "paired" / "rgb" / f"{i}.png", _rgb(100 + i))
        _save(root / "paired" / "depth" / f"{i}.png", _depth(100 + i))
        _save(root / "eval" / "images" / f"{i}.png", _depth(200 + i))
    (root / "paired" / "pairs.csv").write_text(
        "source_path,target_path\n" + "".join(f"rgb/{i}.png,depth/{i}.png\n" for i in range(3))
    )
    (root / "eval" / "labels.csv").write_text("path,label\n" + "".join(f"images/{i}.png,cube\n" for i in range(3)))
    return root


def _checks(report_findings: list, level: str) -> set[str]:  # type: ignore[type-arg]
    return {f.check for f in report_findings if f.level == level}


def test_a_good_site_passes_with_counts(tmp_path: Path) -> None:
    report = validate_site(make_site(tmp_path / "site"))
    assert report.ok, report.findings
    assert report.counts == {"target": 3, "pairs": 3, "eval": 3, "eval_classes": 1}
    assert report.modality.name == "depth"


def test_channel_mismatch_and_out_of_range_values_are_errors(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site")
    _save(site / "target" / "rgb_by_mistake.png", _rgb(7))
    _save(site / "target" / "far.png", np.full((8, 8), 9000, dtype=np.uint16))
    report = validate_site(site)
    messages = " ".join(f.message for f in report.findings if f.level == "error")
    assert not report.ok
    assert "channel" in messages and "exceed value_range" in messages


def test_eval_images_inside_ti_pairs_are_leakage(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site")
    _save(site / "paired" / "depth" / "0.png", _depth(200))  # the same pixels as eval image 0
    report = validate_site(site)
    assert "leakage" in _checks(report.findings, "error")


def test_missing_pairs_and_unreadable_files_are_named(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site")
    (site / "paired" / "depth" / "1.png").unlink()
    (site / "target" / "broken.png").write_bytes(b"not a png")
    report = validate_site(site)
    errors = [f.message for f in report.findings if f.level == "error"]
    assert any("paired file(s) missing" in m for m in errors)
    assert any("unreadable" in m for m in errors)


def test_no_pairs_is_a_warning_and_duplicates_are_reported(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site")
    (site / "paired" / "pairs.csv").unlink()
    _save(site / "target" / "copy.png", _depth(0))
    report = validate_site(site)
    assert report.ok
    warnings = [f.message for f in report.findings if f.level == "warning"]
    assert any("pairs.csv" in m for m in warnings) and any("duplicate" in m for m in warnings)
