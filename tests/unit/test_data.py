"""The site data contract: readers, decoding, normalisation, fingerprints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xkt.shared.data import (
    RGB,
    Modality,
    Preprocess,
    fingerprint,
    labelled_dataset,
    list_images,
    read_labels,
    read_modality,
    read_pairs,
    read_raw,
    to_unit_range,
)
from xkt.shared.errors import DataError

DEPTH = Modality("depth", 1, "mm", (0.0, 4000.0))


def _png16(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint16)).save(path)


def test_sixteen_bit_depth_maps_through_value_range_to_three_channels(tmp_path: Path) -> None:
    _png16(tmp_path / "d.png", 1000)
    raw = read_raw(tmp_path / "d.png")
    assert raw.dtype == np.uint16 and raw.shape == (8, 8)
    unit = to_unit_range(raw, DEPTH)
    assert unit.shape == (3, 8, 8)
    assert torch.allclose(unit, torch.full((3, 8, 8), 0.25))


def test_values_outside_the_range_are_clipped() -> None:
    unit = to_unit_range(np.array([[-5.0, 9000.0]], dtype=np.float32), DEPTH)
    assert unit[0].tolist() == [[0.0, 1.0]]


def test_npy_files_never_unpickle(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="cannot read image"):
        read_raw(tmp_path / "obj.npy")


def test_site_toml_parsing_and_defaults(tmp_path: Path) -> None:
    assert read_modality(tmp_path) == RGB
    (tmp_path / "site.toml").write_text(
        '[modality]\nname = "depth"\nchannels = 1\nunits = "mm"\nvalue_range = [0, 4000]\n'
    )
    assert read_modality(tmp_path) == DEPTH
    (tmp_path / "site.toml").write_text('[modality]\nname = "depth"\n')
    with pytest.raises(DataError, match="no valid \\[modality\\]"):
        read_modality(tmp_path)


def test_csv_readers_resolve_paths_and_check_headers(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("path,label\nimages/a.png,cube\n")
    assert read_labels(tmp_path / "labels.csv")[0].path == tmp_path / "images" / "a.png"
    (tmp_path / "pairs.csv").write_text("source_path,target_path\nrgb/1.png,depth/1.png\n")
    pair = read_pairs(tmp_path / "pairs.csv")[0]
    assert (pair.source, pair.target) == (tmp_path / "rgb/1.png", tmp_path / "depth/1.png")
    (tmp_path / "bad.csv").write_text("file,class\na.png,cube\n")
    with pytest.raises(DataError, match="expected path,label"):
        read_labels(tmp_path / "bad.csv")
    (tmp_path / "empty_field.csv").write_text("path,label\na.png,\n")
    with pytest.raises(DataError, match="empty field"):
        read_labels(tmp_path / "empty_field.csv")


def test_labelled_dataset_normalises_and_refuses_unknown_labels(tmp_path: Path) -> None:
    _png16(tmp_path / "images" / "a.png", 4000)
    (tmp_path / "labels.csv").write_text("path,label\nimages/a.png,cube\n")
    dataset = labelled_dataset(tmp_path / "labels.csv", DEPTH, Preprocess(size=16), ["cube", "sphere"])
    image, label = dataset[0]
    assert image.shape == (3, 16, 16) and label == 0
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(image[:, 0, 0], expected, atol=1e-5)
    with pytest.raises(DataError, match="labels the model does not know"):
        labelled_dataset(tmp_path / "labels.csv", DEPTH, Preprocess(size=16), ["sphere", "torus"])


def test_fingerprint_depends_on_names_and_sizes_not_content(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    np.save(tmp_path / "t" / "a.npy", np.zeros((4, 4), dtype=np.uint16))
    first = fingerprint(list_images(tmp_path / "t"), tmp_path)
    np.save(tmp_path / "t" / "a.npy", np.ones((4, 4), dtype=np.uint16))  # same size on disk, other pixels
    assert fingerprint(list_images(tmp_path / "t"), tmp_path) == first
    np.save(tmp_path / "t" / "b.npy", np.zeros((4, 4), dtype=np.uint16))
    assert fingerprint(list_images(tmp_path / "t"), tmp_path) != first
    assert first.endswith(":1")
