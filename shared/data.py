"""The site data contract (DESIGN.md, "Data contract") and streaming image loaders.

A site folder::

    SITE/
      target/            unlabelled task images of the site's modality (png 8/16-bit or npy)
      paired/pairs.csv   source_path,target_path rows, relative to paired/ (task-irrelevant pairs)
      eval/labels.csv    optional path,label rows, relative to eval/, for measurement only
      site.toml          optional [modality] name, channels, units, value_range

An owner's labelled set is any folder with a ``labels.csv``.  Raw values are mapped to
[0, 1] with the modality's declared ``value_range``, single-channel images are repeated
to three channels, and the model's own normalisation is applied last, so a depth image
meets the RGB model exactly as SOCKET's loader prepares it (methods.md §2.2).
Loaders read each file when it is asked for; nothing holds a site's data in memory.
"""

from __future__ import annotations

import csv
import hashlib
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xkt.shared.errors import DataError

IMAGE_SUFFIXES = (".png", ".npy")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Modality:
    """What a site's sensor values mean: name, channel count, units and the range mapped to [0, 1]."""

    name: str
    channels: int
    units: str
    value_range: tuple[float, float]


RGB = Modality("rgb", 3, "srgb8", (0.0, 255.0))


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its input: square size and per-channel normalisation."""

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class LabelledImage:
    """One image path and its class name."""

    path: Path
    label: str


@dataclass(frozen=True)
class Pair:
    """A task-irrelevant pair: the RGB view and the target-modality view of one scene."""

    source: Path
    target: Path


# ----------------------------------------------------------------- contract readers


def read_modality(site: Path) -> Modality:
    """The site's modality from ``site.toml``; plain 8-bit RGB when the file is absent."""
    path = site / "site.toml"
    if not path.exists():
        return RGB
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("modality", {})
        low, high = (float(v) for v in table["value_range"])
        modality = Modality(str(table["name"]), int(table["channels"]), str(table.get("units", "")), (low, high))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as error:
        raise DataError(
            f"{path} has no valid [modality] table ({type(error).__name__}: {error})",
            hint='write [modality] with name = "depth", channels = 1, units = "mm", value_range = [0, 10000]',
            reason="bad-site-toml",
        ) from None
    if modality.channels not in (1, 3) or not high > low:
        raise DataError(
            f"{path}: channels must be 1 or 3 and value_range increasing",
            hint="fix [modality] channels/value_range",
            reason="bad-site-toml",
        )
    return modality


def read_labels(csv_path: Path) -> list[LabelledImage]:
    """Rows of a ``path,label`` CSV, with paths resolved against the CSV's folder."""
    rows = _read_csv(csv_path, ("path", "label"))
    return [LabelledImage(csv_path.parent / row["path"], row["label"]) for row in rows]


def read_pairs(csv_path: Path) -> list[Pair]:
    """Rows of a ``source_path,target_path`` CSV, with paths resolved against its folder."""
    rows = _read_csv(csv_path, ("source_path", "target_path"))
    return [Pair(csv_path.parent / row["source_path"], csv_path.parent / row["target_path"]) for row in rows]


def list_images(folder: Path) -> list[Path]:
    """Every image file below ``folder`` (any nesting), in a stable sorted order."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder", hint="create it or check the site path", reason="missing-folder")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def class_names(rows: Sequence[LabelledImage]) -> list[str]:
    """Class names in sorted order: the index of a name is its class index."""
    return sorted({row.label for row in rows})


def _read_csv(csv_path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    if not csv_path.is_file():
        raise DataError(
            f"{csv_path} does not exist", hint=f"write a CSV with header {','.join(columns)}", reason="missing-csv"
        )
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != columns:
            raise DataError(
                f"{csv_path} has header {reader.fieldnames}, expected {','.join(columns)}",
                hint=f"make the first line exactly: {','.join(columns)}",
                reason="bad-csv-header",
            )
        rows = [dict(row) for row in reader]
    for number, row in enumerate(rows, start=2):
        if any(not row.get(c) for c in columns):
            raise DataError(f"{csv_path}:{number} has an empty field", hint="fill every column", reason="bad-csv-row")
    return rows


# -------------------------------------------------------------------- image decoding


def read_raw(path: Path) -> np.ndarray:
    """Decode one image to an (H, W) or (H, W, C) array with its native dtype.

    ``.npy`` is read with ``allow_pickle=False``: a file can never run code here.
    """
    try:
        if path.suffix.lower() == ".npy":
            array: np.ndarray = np.load(path, allow_pickle=False)
            return array
        with Image.open(path) as image:
            return np.asarray(image)
    except (OSError, ValueError) as error:
        raise DataError(
            f"cannot read image {path}: {error}", hint="replace or remove the file", reason="bad-image"
        ) from None


def to_unit_range(raw: np.ndarray, modality: Modality) -> torch.Tensor:
    """Raw sensor values → float (3, H, W) in [0, 1] using the modality's value range."""
    array = raw.astype(np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise DataError(f"image has shape {raw.shape}", hint="use (H, W) or (H, W, 3) images", reason="bad-image")
    array = array[:, :, :3]
    low, high = modality.value_range
    unit = torch.from_numpy(np.clip((array - low) / (high - low), 0.0, 1.0)).permute(2, 0, 1)
    return unit.expand(3, -1, -1).contiguous() if unit.shape[0] == 1 else unit.contiguous()


def normalise(unit: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """Resize a [0, 1] (…, 3, H, W) tensor to the model's size and apply its mean/std."""
    if unit.shape[-1] != preprocess.size or unit.shape[-2] != preprocess.size:
        batched = unit if unit.dim() == 4 else unit[None]
        batched = torch.nn.functional.interpolate(batched, size=(preprocess.size,) * 2, mode="bilinear", antialias=True)
        unit = batched if unit.dim() == 4 else batched[0]
    mean = torch.tensor(preprocess.mean).view(3, 1, 1)
    std = torch.tensor(preprocess.std).view(3, 1, 1)
    return (unit - mean) / std


class ImageDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Images read on demand and prepared for a model; label -1 where none is known."""

    def __init__(
        self,
        paths: Sequence[Path],
        modality: Modality,
        preprocess: Preprocess,
        labels: Sequence[int] | None = None,
    ) -> None:
        if labels is not None and len(labels) != len(paths):
            raise ValueError("labels and paths differ in length")
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.modality = modality
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        unit = to_unit_range(read_raw(self.paths[index]), self.modality)
        return normalise(unit, self.preprocess), self.labels[index]


class PairedDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Task-irrelevant pairs: (RGB half, target-modality half), both prepared identically.

    Both halves go through the same deterministic resize and the source model's own
    normalisation (never SOCKET's custom constants, nor a random crop on one half only:
    methods.md §2.7), so pair ``i`` shows the same scene, aligned pixel for pixel.
    """

    def __init__(self, pairs: Sequence[Pair], modality: Modality, preprocess: Preprocess) -> None:
        self.pairs = list(pairs)
        self.modality = modality
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pairs[index]
        source = normalise(to_unit_range(read_raw(pair.source), RGB), self.preprocess)
        target = normalise(to_unit_range(read_raw(pair.target), self.modality), self.preprocess)
        return source, target


def paired_dataset(site: Path, modality: Modality, preprocess: Preprocess) -> PairedDataset | None:
    """The site's ``paired/pairs.csv`` as a dataset, or None when the site has no paired data."""
    csv_path = site / "paired" / "pairs.csv"
    if not csv_path.exists():
        return None
    pairs = read_pairs(csv_path)
    if not pairs:
        raise DataError(f"{csv_path} has no rows", hint="add pairs or remove the file", reason="empty-pairs")
    return PairedDataset(pairs, modality, preprocess)


def labelled_dataset(csv_path: Path, modality: Modality, preprocess: Preprocess, names: Sequence[str]) -> ImageDataset:
    """A dataset over a ``labels.csv``, with labels indexed by ``names`` (unknown labels refused)."""
    rows = read_labels(csv_path)
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({row.label for row in rows} - set(index))
    if unknown:
        raise DataError(
            f"{csv_path} has labels the model does not know: {', '.join(unknown[:5])}",
            hint=f"the model's classes are: {', '.join(names)}",
            reason="unknown-label",
        )
    return ImageDataset([r.path for r in rows], modality, preprocess, [index[r.label] for r in rows])


def fingerprint(paths: Sequence[Path], root: Path) -> str:
    """A digest of which files a run used (relative names and sizes), never of their content.

    Recorded in artifact provenance so two runs can be told apart or matched without
    the fingerprint revealing anything about the images themselves.
    """
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}\n".encode())
    return f"sha256:{digest.hexdigest()}:{len(paths)}"
