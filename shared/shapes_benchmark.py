"""The built-in cross-modal benchmark: rendered shapes written to disk in the data contract.

One call renders an owner RGB training set, a held-out RGB/depth/IR evaluation set (the
*same* scenes in every modality, so accuracies differ only by modality), and per target
modality one or more sites with unlabelled task images and paired task-irrelevant (TI)
RGB/target images.  See DESIGN.md "Data contract" and :mod:`xkt.shared.render`.

Why it is built like this:

* every split draws from its own generator derived from (seed, split name), so splits are
  independent and adding a modality does not change the other splits;
* images are rendered in batches and streamed to disk, so memory does not grow with size;
* the data set is written into ``OUT.partial/`` and renamed at the end, so a crash or
  Ctrl-C never leaves a half-written ``OUT`` that looks complete;
* file names are running numbers over a shuffled order, so an unlabelled target folder
  does not reveal classes through its file order;
* the classes of the unlabelled target images are written *outside* every site folder, to
  ``truth/<site>/target_labels.csv`` (``path,label``; paths relative to that CSV's folder,
  e.g. ``../../depth/target/000000.png``).  It exists only for benchmarks (the supervised
  ``oracle`` ceiling of ``xkt-bench run``); a site folder never contains it, so a site, an
  adaptation method or ``xkt-client adapt`` never sees target labels.

Everything in it is synthetic (see render_sensors.py for the depth and thermal sensor models).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from PIL import Image

from xkt.shared.errors import DataError
from xkt.shared.render import (
    ALL_CLASSES,
    MAX_RANGE_MM,
    TASK_CLASSES,
    THERMAL_RANGE_CK,
    TI_CLASSES,
    Rendered,
    render,
    sample_scenes,
)

GENERATOR_NAME = "xkt-shapes"
GENERATOR_VERSION = "1"
TARGET_MODALITIES: tuple[str, ...] = ("depth", "ir")
TRUTH_DIR = "truth"
"""Benchmark-only ground truth, beside (never inside) the site folders."""
TARGET_LABELS = "target_labels.csv"
BATCH = 256
"""Scenes rendered per batch (part of the determinism contract: output depends on it)."""

Progress = Callable[[str, int, int], None]

_SITE_TOML = {
    "rgb": ("rgb", 3, "srgb8", (0, 255)),
    "depth": ("depth", 1, "mm", (0, MAX_RANGE_MM)),
    "ir": ("ir", 1, "centikelvin", THERMAL_RANGE_CK),
}
_SKEW_DOC = (
    "per task class, the K sites' shares of its target images are drawn from Dirichlet(alpha=1/skew, ..., alpha); "
    "skew=0 means equal shares (IID); skew=1 is uniform over all mixes; larger skew gives more one-sided sites; "
    "every site keeps at least one target image of every class; eval images follow each site's shares"
)


@dataclass(frozen=True)
class ShapesConfig:
    """What to generate.  ``skew`` is the class-skew across sites (see ``_SKEW_DOC``)."""

    seed: int = 0
    size: int = 64
    per_class: int = 3000  # owner training images per task class
    site_per_class: int = 300  # per modality: unlabelled target images per task class, over all sites
    sites: int = 1
    skew: float = 0.0
    modalities: tuple[str, ...] = ("depth", "ir")

    def validate(self) -> None:
        """Raise DataError naming the first bad value."""
        if self.size < 8:
            raise DataError(f"size {self.size} is too small", hint="use --size 8 or more (64 is the default)")
        if self.per_class < 1:
            raise DataError(f"per_class {self.per_class} must be >= 1", hint="use --per-class 1 or more")
        if self.sites < 1:
            raise DataError(f"sites {self.sites} must be >= 1", hint="use --sites 1 or more")
        if self.site_per_class < self.sites:
            raise DataError(
                f"site_per_class {self.site_per_class} < sites {self.sites}: a site would get no image of some class",
                hint="raise --site-per-class or lower --sites",
            )
        if not self.skew >= 0.0 or not np.isfinite(self.skew):
            raise DataError(f"skew {self.skew} must be a finite number >= 0", hint="use --skew 0 for IID sites")
        bad = [m for m in self.modalities if m not in TARGET_MODALITIES]
        if bad or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise DataError(
                f"bad modalities {list(self.modalities)}",
                hint=f"choose one or more distinct of {', '.join(TARGET_MODALITIES)}",
            )

    @property
    def val_per_class(self) -> int:
        return max(2, self.per_class // 10)

    @property
    def eval_per_class(self) -> int:
        return max(2, self.site_per_class // 3)

    @property
    def pairs_per_class(self) -> int:
        return max(2, self.site_per_class // 2)


def split_generator(seed: int, name: str) -> torch.Generator:
    """A generator for one split, seeded from a hash of (seed, split name)."""
    digest = hashlib.sha256(f"{GENERATOR_NAME}/{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder, ties to the lowest index)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))
    raw = w * total
    out = np.floor(raw).astype(np.int64)
    order = sorted(range(len(w)), key=lambda i: (-(raw[i] - out[i]), i))
    for i in order[: total - int(out.sum())]:
        out[i] += 1
    return [int(x) for x in out]


def site_class_counts(cfg: ShapesConfig) -> tuple[list[list[int]], list[list[int]]]:
    """Target and eval image counts per [site][task class], shared by every modality."""
    k, n_cls = cfg.sites, len(TASK_CLASSES)
    shares = np.full((n_cls, k), 1.0 / k)
    if cfg.skew > 0 and k > 1:
        digest = hashlib.sha256(f"{GENERATOR_NAME}/{cfg.seed}/sites".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        shares = rng.dirichlet(np.full(k, 1.0 / cfg.skew), size=n_cls)
        shares = np.nan_to_num(shares, nan=1.0 / k)
    target = [[0] * n_cls for _ in range(k)]
    evals = [[0] * n_cls for _ in range(k)]
    for c in range(n_cls):
        extra = _apportion(cfg.site_per_class - k, shares[c])
        for s in range(k):
            target[s][c] = 1 + extra[s]
        for s, n in enumerate(_apportion(cfg.eval_per_class, [target[s][c] for s in range(k)])):
            evals[s][c] = n
    return target, evals


# --------------------------------------------------------------------------- writing


def _png_rgb(path: Path, arr: np.ndarray[Any, Any]) -> None:
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(path, format="PNG")


def _png16(path: Path, arr: np.ndarray[Any, Any]) -> None:
    """16-bit greyscale PNG (Pillow mode I;16); values must already fit uint16."""
    Image.fromarray(np.ascontiguousarray(arr).astype(np.uint16)).save(path, format="PNG")


def _modality_images(out: Rendered, modality: str) -> np.ndarray[Any, Any]:
    if modality == "rgb":
        return out.rgb.numpy()
    return (out.depth_mm if modality == "depth" else out.thermal_ck).numpy()


def _save(path: Path, arr: np.ndarray[Any, Any], modality: str) -> None:
    (_png_rgb if modality == "rgb" else _png16)(path, arr)


class ImageFolder:
    """An image folder with running file numbers and an optional CSV index (streamed)."""

    def __init__(self, root: Path, images: str, modality: str, header: tuple[str, ...] | None) -> None:
        self.root, self.modality, self.count = root, modality, 0
        self.images = root / images if images else root
        self.images.mkdir(parents=True, exist_ok=True)
        self._rel = f"{images}/" if images else ""
        self._fh: TextIO | None = None
        self._csv: Any = None
        if header is not None:
            self._fh = (root / ("pairs.csv" if header[0] == "source_path" else "labels.csv")).open(
                "w", newline="", encoding="utf-8"
            )
            self._csv = csv.writer(self._fh, lineterminator="\n")
            self._csv.writerow(header)

    def add(self, arr: np.ndarray[Any, Any]) -> str:
        """Write one image; returns its path relative to the folder root."""
        name = f"{self.count:06d}.png"
        self.count += 1
        _save(self.images / name, arr, self.modality)
        return self._rel + name

    def row(self, *values: str) -> None:
        assert self._csv is not None
        self._csv.writerow(values)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _shuffled(items: list[tuple[int, int]], g: torch.Generator) -> list[tuple[int, int]]:
    perm = torch.randperm(len(items), generator=g).tolist()
    return [items[i] for i in perm]


def _batches(
    items: list[tuple[int, int]], cfg: ShapesConfig, g: torch.Generator, stage: str, progress: Progress | None
) -> Iterator[tuple[list[tuple[int, int]], Rendered]]:
    """Render (class, site) items in batches with generator ``g``; yields (items, images)."""
    for start in range(0, len(items), BATCH):
        chunk = items[start : start + BATCH]
        scenes = sample_scenes([c for c, _ in chunk], g)
        yield chunk, render(scenes, cfg.size, g)
        if progress is not None:
            progress(stage, start + len(chunk), len(items))


def _site_dir(modality: str, site: int, cfg: ShapesConfig) -> str:
    return modality if cfg.sites == 1 else f"{modality}-site{site}"


def _write_site_toml(folder: Path, modality: str) -> None:
    name, channels, units, (lo, hi) = _SITE_TOML[modality]
    folder.mkdir(parents=True, exist_ok=True)
    text = (
        "# Written by the xkt built-in shapes benchmark (synthetic data).\n"
        f'[modality]\nname = "{name}"\nchannels = {channels}\nunits = "{units}"\nvalue_range = [{lo}, {hi}]\n'
    )
    (folder / "site.toml").write_text(text, encoding="utf-8")


def _write_labelled(
    root: Path, split: str, n_per_class: int, cfg: ShapesConfig, progress: Progress | None
) -> dict[str, int]:
    """Owner RGB train/val: images/ + labels.csv (path,label)."""
    g = split_generator(cfg.seed, split)
    items = _shuffled([(c, 0) for c in range(len(TASK_CLASSES)) for _ in range(n_per_class)], g)
    folder = ImageFolder(root / split, "images", "rgb", ("path", "label"))
    try:
        for chunk, out in _batches(items, cfg, g, split, progress):
            rgb = out.rgb.numpy()
            for i, (c, _) in enumerate(chunk):
                folder.row(folder.add(rgb[i]), ALL_CLASSES[c])
    finally:
        folder.close()
    return {split: folder.count}


def _write_eval(root: Path, cfg: ShapesConfig, evals: list[list[int]], progress: Progress | None) -> dict[str, int]:
    """The same eval scenes as rgb/eval (all) and <modality>[-siteK]/eval (each site's share)."""
    g = split_generator(cfg.seed, "eval")
    items = [(c, s) for s in range(cfg.sites) for c in range(len(TASK_CLASSES)) for _ in range(evals[s][c])]
    items = _shuffled(items, g)
    folders = {("rgb", 0): ImageFolder(root / "rgb" / "eval", "images", "rgb", ("path", "label"))}
    for m in cfg.modalities:
        for s in range(cfg.sites):
            folders[(m, s)] = ImageFolder(root / _site_dir(m, s, cfg) / "eval", "images", m, ("path", "label"))
    try:
        for chunk, out in _batches(items, cfg, g, "eval", progress):
            arrays = {m: _modality_images(out, m) for m in ("rgb", *cfg.modalities)}
            for i, (c, s) in enumerate(chunk):
                for m in arrays:
                    f = folders[(m, 0 if m == "rgb" else s)]
                    f.row(f.add(arrays[m][i]), ALL_CLASSES[c])
    finally:
        for f in folders.values():
            f.close()
    return {f"{_site_dir(m, s, cfg) if m != 'rgb' else 'rgb'}/eval": f.count for (m, s), f in folders.items()}


def truth_labels(root: Path, site_dir: str) -> Path:
    """Where the benchmark-only classes of ``root/site_dir/target`` are (outside the site folder)."""
    return root / TRUTH_DIR / site_dir / TARGET_LABELS


def _write_target(
    root: Path, modality: str, cfg: ShapesConfig, target: list[list[int]], progress: Progress | None
) -> dict[str, int]:
    """Unlabelled task-class images of one modality, split across sites, and their benchmark-only truth."""
    stage = f"target/{modality}"
    g = split_generator(cfg.seed, stage)
    items = [(c, s) for s in range(cfg.sites) for c in range(len(TASK_CLASSES)) for _ in range(target[s][c])]
    items = _shuffled(items, g)
    folders = [ImageFolder(root / _site_dir(modality, s, cfg) / "target", "", modality, None) for s in range(cfg.sites)]
    truth: list[list[tuple[str, str]]] = [[] for _ in range(cfg.sites)]
    for chunk, out in _batches(items, cfg, g, stage, progress):
        arr = _modality_images(out, modality)
        for i, (c, s) in enumerate(chunk):
            truth[s].append((folders[s].add(arr[i]), ALL_CLASSES[c]))
    counts: dict[str, int] = {}
    for s, rows in enumerate(truth):
        site_dir = _site_dir(modality, s, cfg)
        write_truth(truth_labels(root, site_dir), site_dir, rows)
        counts[f"{site_dir}/target"] = folders[s].count
        counts[f"{TRUTH_DIR}/{site_dir}"] = len(rows)
    return counts


def write_truth(csv_path: Path, site_dir: str, rows: list[tuple[str, str]]) -> None:
    """``path,label`` rows; paths are relative to the CSV's folder, as ``read_labels`` resolves them."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("path", "label"))
        writer.writerows((f"../../{site_dir}/target/{name}", label) for name, label in rows)


def _write_pairs(root: Path, modality: str, cfg: ShapesConfig, progress: Progress | None) -> dict[str, int]:
    """Paired TI-class RGB/<modality> images, split evenly across sites, indexed by pairs.csv."""
    stage = f"paired/{modality}"
    g = split_generator(cfg.seed, stage)
    ti = [ALL_CLASSES.index(c) for c in TI_CLASSES]
    flat = [c for c in ti for _ in range(cfg.pairs_per_class)]
    items = _shuffled([(c, i % cfg.sites) for i, c in enumerate(flat)], g)  # site totals differ by <= 1
    src, dst = [], []
    for s in range(cfg.sites):
        paired = root / _site_dir(modality, s, cfg) / "paired"
        src.append(ImageFolder(paired, "rgb", "rgb", ("source_path", "target_path")))
        dst.append(ImageFolder(paired, modality, modality, None))
    try:
        for chunk, out in _batches(items, cfg, g, stage, progress):
            rgb, arr = out.rgb.numpy(), _modality_images(out, modality)
            for i, (_, s) in enumerate(chunk):
                src[s].row(src[s].add(rgb[i]), dst[s].add(arr[i]))
    finally:
        for f in src:
            f.close()
    return {f"{_site_dir(modality, s, cfg)}/paired": f.count for s, f in enumerate(src)}


def _write_all(root: Path, cfg: ShapesConfig, progress: Progress | None) -> dict[str, Any]:
    """Every split into ``root``; returns the dataset.json summary."""
    target, evals = site_class_counts(cfg)
    _write_site_toml(root / "rgb", "rgb")
    for m in cfg.modalities:
        for s in range(cfg.sites):
            _write_site_toml(root / _site_dir(m, s, cfg), m)
    counts: dict[str, int] = {}
    counts |= _write_labelled(root, "owner/train", cfg.per_class, cfg, progress)
    counts |= _write_labelled(root, "owner/val", cfg.val_per_class, cfg, progress)
    counts |= _write_eval(root, cfg, evals, progress)
    for m in cfg.modalities:
        counts |= _write_target(root, m, cfg, target, progress)
        counts |= _write_pairs(root, m, cfg, progress)
    summary: dict[str, Any] = {
        "generator": {"name": GENERATOR_NAME, "version": GENERATOR_VERSION},
        "config": {**asdict(cfg), "modalities": list(cfg.modalities)},
        "seed": cfg.seed,
        "size": cfg.size,
        "task_classes": list(TASK_CLASSES),
        "ti_classes": list(TI_CLASSES),
        "modalities": list(cfg.modalities),
        "sites": cfg.sites,
        "skew": cfg.skew,
        "skew_meaning": _SKEW_DOC,
        "transductive": False,
        "truth": f"{TRUTH_DIR}/<site>/{TARGET_LABELS}: classes of each site's target/ images, for benchmarks "
        "only (the supervised oracle); never inside a site folder",
        "counts": dict(sorted(counts.items())),
        "site_target_class_counts": {
            f"site{s}": dict(zip(TASK_CLASSES, target[s], strict=True)) for s in range(cfg.sites)
        },
        "synthetic": "all images are procedurally rendered; depth noise/holes and thermal physics are simple models",
    }
    (root / "dataset.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary


def _is_nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def publish_dataset(out: Path, write: Callable[[Path], dict[str, Any]], *, force: bool) -> dict[str, Any]:
    """Run ``write(folder)`` into ``OUT.partial`` and rename it onto ``out``: complete or absent, never half.

    Refuses a non-empty ``out`` unless ``force`` (then it is replaced, but only once the new
    data set is complete).  Returns what ``write`` returned (the dataset.json summary).
    """
    out = Path(out)
    if _is_nonempty(out) and not force:
        raise DataError(
            f"output folder {out} exists and is not empty",
            hint="pass --force to replace it, or choose a new --out",
            reason="out-exists",
        )
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        summary = write(partial)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return summary


def write_shapes_benchmark(
    out: Path, cfg: ShapesConfig, progress: Progress | None = None, *, force: bool = False
) -> dict[str, Any]:
    """Render and write the benchmark to ``out`` atomically; returns the dataset.json summary.

    Raises DataError when ``out`` exists and is not empty, unless ``force`` (then it is
    replaced, but only once the new data set is complete).
    """
    cfg.validate()

    def write(folder: Path) -> dict[str, Any]:
        with torch.no_grad():
            return _write_all(folder, cfg, progress)

    return publish_dataset(out, write, force=force)
