"""The built-in shapes benchmark writer: layout, counts, determinism, 16-bit PNGs, atomic writes."""

from __future__ import annotations

import csv
import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from xkt.shared import shapes_benchmark as sb
from xkt.shared.data import read_labels
from xkt.shared.errors import DataError
from xkt.shared.render import MAX_RANGE_MM, TASK_CLASSES, THERMAL_RANGE_CK, TI_CLASSES
from xkt.shared.shapes_benchmark import ShapesConfig, write_shapes_benchmark

SMALL = ShapesConfig(seed=3, size=16, per_class=6, site_per_class=6)


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _mode(path: Path) -> str:
    with Image.open(path) as im:
        return str(im.mode)


@pytest.fixture(scope="module")
def one_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("sb") / "bench"
    return out, write_shapes_benchmark(out, SMALL)


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("sb3") / "bench"
    return out, write_shapes_benchmark(
        out, ShapesConfig(seed=1, size=16, per_class=9, site_per_class=9, sites=3, skew=2.0)
    )


def test_png16_round_trips_through_pillow(tmp_path: Path) -> None:
    arr = np.array([[0, 1, 255], [256, 4000, 65535]], dtype=np.int32)
    sb._png16(tmp_path / "x.png", arr)
    with Image.open(tmp_path / "x.png") as im:
        assert im.mode == "I;16"
        back = np.array(im)
    assert back.dtype == np.uint16
    assert np.array_equal(back, arr.astype(np.uint16))


def test_single_site_layout(one_site: tuple[Path, dict[str, Any]]) -> None:
    out, summary = one_site
    assert json.loads((out / "dataset.json").read_text()) == summary
    assert summary["generator"]["name"] == sb.GENERATOR_NAME and summary["transductive"] is False
    assert summary["task_classes"] == list(TASK_CLASSES) and summary["ti_classes"] == list(TI_CLASSES)
    assert not (out.parent / "bench.partial").exists()
    n_task = len(TASK_CLASSES)
    for split, per in (("owner/train", 6), ("owner/val", 2), ("rgb/eval", 2)):
        header, rows = _rows(out / split / "labels.csv")
        assert header == ["path", "label"]
        assert len(rows) == per * n_task == summary["counts"][split]
        assert sorted({label for _, label in rows}) == sorted(TASK_CLASSES)
        for path, _ in rows[:5]:
            assert path.startswith("images/") and _mode(out / split / path) == "RGB"
    rgb_toml = tomllib.loads((out / "rgb" / "site.toml").read_text())["modality"]
    assert rgb_toml == {"name": "rgb", "channels": 3, "units": "srgb8", "value_range": [0, 255]}
    for modality, units, value_range in (
        ("depth", "mm", [0, MAX_RANGE_MM]),
        ("ir", "centikelvin", list(THERMAL_RANGE_CK)),
    ):
        site = out / modality
        toml = tomllib.loads((site / "site.toml").read_text())["modality"]
        assert toml == {"name": modality, "channels": 1, "units": units, "value_range": value_range}
        assert len(list((site / "target").glob("*.png"))) == 6 * n_task
        header, pairs = _rows(site / "paired" / "pairs.csv")
        assert header == ["source_path", "target_path"]
        assert len(pairs) == 3 * len(TI_CLASSES)
        for src, dst in pairs:
            assert src.startswith("rgb/") and dst.startswith(f"{modality}/")
            assert _mode(site / "paired" / src) == "RGB" and _mode(site / "paired" / dst) == "I;16"
        _, evals = _rows(site / "eval" / "labels.csv")
        assert evals and all(_mode(site / "eval" / p) == "I;16" for p, _ in evals[:3])
        lo, hi = value_range
        img = np.array(Image.open(site / "target" / "000000.png"))
        assert img.dtype == np.uint16 and lo <= int(img.min()) and int(img.max()) <= hi


def test_eval_is_the_same_scenes_in_every_modality_and_disjoint_from_target(
    one_site: tuple[Path, dict[str, Any]],
) -> None:
    out, _ = one_site
    _, rgb_rows = _rows(out / "rgb" / "eval" / "labels.csv")
    for modality in ("depth", "ir"):
        _, rows = _rows(out / modality / "eval" / "labels.csv")
        assert [label for _, label in rows] == [label for _, label in rgb_rows]
        eval_hashes = {_digest(out / modality / "eval" / p) for p, _ in rows}
        target_hashes = {_digest(p) for p in (out / modality / "target").glob("*.png")}
        paired_hashes = {_digest(p) for p in (out / modality / "paired" / modality).glob("*.png")}
        assert not eval_hashes & target_hashes and not eval_hashes & paired_hashes


def test_three_skewed_sites(three_sites: tuple[Path, dict[str, Any]]) -> None:
    out, summary = three_sites
    assert not (out / "depth").exists() and not (out / "ir").exists()
    per_site = summary["site_target_class_counts"]
    for c in TASK_CLASSES:
        assert sum(per_site[f"site{k}"][c] for k in range(3)) == 9
        assert all(per_site[f"site{k}"][c] >= 1 for k in range(3))
    assert len({tuple(per_site[f"site{k}"].values()) for k in range(3)}) > 1, "skew>0 gives different class mixes"
    _, rgb_eval = _rows(out / "rgb" / "eval" / "labels.csv")
    for modality in ("depth", "ir"):
        eval_total = 0
        for k in range(3):
            site = out / f"{modality}-site{k}"
            assert tomllib.loads((site / "site.toml").read_text())["modality"]["name"] == modality
            assert len(list((site / "target").glob("*.png"))) == sum(per_site[f"site{k}"].values())
            _, pairs = _rows(site / "paired" / "pairs.csv")
            assert abs(len(pairs) - len(TI_CLASSES) * 4 / 3) < 1, "TI pairs split evenly"
            assert all((site / "paired" / s).is_file() and (site / "paired" / t).is_file() for s, t in pairs)
            _, evals = _rows(site / "eval" / "labels.csv")
            eval_total += len(evals)
        assert eval_total == len(rgb_eval) == 3 * len(TASK_CLASSES)


def test_same_seed_is_byte_identical_other_seed_is_not(tmp_path: Path) -> None:
    cfg = ShapesConfig(seed=5, size=12, per_class=3, site_per_class=3, modalities=("ir",))
    a = _tree(tmp_path / "a") if write_shapes_benchmark(tmp_path / "a", cfg) else {}
    b = _tree(tmp_path / "b") if write_shapes_benchmark(tmp_path / "b", cfg) else {}
    assert a == b and len(a) > 50
    write_shapes_benchmark(
        tmp_path / "c", ShapesConfig(seed=6, size=12, per_class=3, site_per_class=3, modalities=("ir",))
    )
    c = _tree(tmp_path / "c")
    assert a.keys() == c.keys() and a != c


def test_failure_halfway_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> dict[str, int]:
        raise RuntimeError("disk full")

    monkeypatch.setattr(sb, "_write_pairs", boom)
    out = tmp_path / "bench"
    with pytest.raises(RuntimeError, match="disk full"):
        write_shapes_benchmark(out, ShapesConfig(size=12, per_class=2, site_per_class=2))
    assert not out.exists()
    assert not (tmp_path / "bench.partial").exists()


def test_refuses_non_empty_output_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = ShapesConfig(size=12, per_class=2, site_per_class=2, modalities=("depth",))
    with pytest.raises(DataError) as err:
        write_shapes_benchmark(out, cfg)
    assert err.value.reason == "out-exists" and "--force" in err.value.hint
    assert (out / "keep.txt").exists()
    (tmp_path / "bench.partial").mkdir()  # a stale partial from an earlier crash
    (tmp_path / "bench.partial" / "junk").write_text("x")
    write_shapes_benchmark(out, cfg, force=True)
    assert not (out / "keep.txt").exists() and (out / "dataset.json").is_file()
    assert not (tmp_path / "bench.partial").exists()


def test_empty_existing_output_is_fine_and_progress_is_reported(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    out.mkdir()
    seen: list[tuple[str, int, int]] = []
    write_shapes_benchmark(
        out,
        ShapesConfig(size=12, per_class=2, site_per_class=2, modalities=("depth",)),
        lambda s, d, t: seen.append((s, d, t)),
    )
    stages = {s for s, _, _ in seen}
    assert {"owner/train", "owner/val", "eval", "target/depth", "paired/depth"} == stages
    assert all(d == t for s, d, t in seen if s == "owner/train")


@pytest.mark.parametrize(
    "cfg",
    [
        ShapesConfig(size=4),
        ShapesConfig(per_class=0),
        ShapesConfig(site_per_class=2, sites=3),
        ShapesConfig(skew=-1.0),
        ShapesConfig(modalities=("sketch",)),
        ShapesConfig(modalities=()),
    ],
)
def test_bad_config_raises_data_error(cfg: ShapesConfig, tmp_path: Path) -> None:
    with pytest.raises(DataError):
        write_shapes_benchmark(tmp_path / "x", cfg)
    assert not (tmp_path / "x").exists()


def test_split_generators_are_deterministic_and_independent() -> None:
    a = sb.split_generator(0, "eval").initial_seed()
    assert a == sb.split_generator(0, "eval").initial_seed()
    assert a != sb.split_generator(0, "owner/train").initial_seed()
    assert a != sb.split_generator(1, "eval").initial_seed()


def test_target_truth_is_outside_every_site_and_names_each_target_image(
    one_site: tuple[Path, dict[str, Any]], three_sites: tuple[Path, dict[str, Any]]
) -> None:
    for out, summary in (one_site, three_sites):
        site_dirs = [name for name in summary["counts"] if name.endswith("/target")]
        assert site_dirs
        for key in site_dirs:
            site_dir = key.removesuffix("/target")
            csv_path = sb.truth_labels(out, site_dir)
            assert csv_path == out / "truth" / site_dir / "target_labels.csv"
            rows = read_labels(csv_path)
            targets = sorted((out / site_dir / "target").glob("*.png"))
            assert [r.path.resolve() for r in rows] == [p.resolve() for p in targets]  # every image, file order
            assert {r.label for r in rows} <= set(TASK_CLASSES)
            assert len(rows) == summary["counts"][f"truth/{site_dir}"] == summary["counts"][key]
            assert not list((out / site_dir).rglob("target_labels.csv")), "a site folder never holds the truth"
    out, summary = three_sites
    for k in range(3):  # the truth agrees with the per-site class counts the generator planned
        rows = read_labels(sb.truth_labels(out, f"depth-site{k}"))
        planned = summary["site_target_class_counts"][f"site{k}"]
        assert {c: sum(r.label == c for r in rows) for c in TASK_CLASSES} == planned
