"""The batched shapes renderer: determinism, sensor outputs, and no class leak through appearance."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from xkt.shared.errors import DataError
from xkt.shared.render import (
    ALL_CLASSES,
    MAX_RANGE_MM,
    TASK_CLASSES,
    THERMAL_RANGE_CK,
    TI_CLASSES,
    Rendered,
    SceneParams,
    render,
    sample_scenes,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _render(classes: list[int], size: int, seed: int) -> tuple[SceneParams, Rendered]:
    g = _gen(seed)
    scenes = sample_scenes(classes, g)
    return scenes, render(scenes, size, g)


@pytest.fixture(scope="module")
def task_batch() -> tuple[torch.Tensor, SceneParams, Rendered]:
    """600 task-class scenes at 32x32 (100 per class), shared by the statistical tests."""
    cls = torch.arange(600) % len(TASK_CLASSES)
    scenes, out = _render(cls.tolist(), 32, seed=1)
    return cls, scenes, out


def test_class_lists_are_disjoint_and_large_enough() -> None:
    assert len(TASK_CLASSES) >= 6 and len(TI_CLASSES) >= 4
    assert not set(TASK_CLASSES) & set(TI_CLASSES)
    assert ALL_CLASSES == TASK_CLASSES + TI_CLASSES


def test_same_seed_is_bit_identical_and_other_seed_differs() -> None:
    classes = list(range(len(ALL_CLASSES)))
    _, a = _render(classes, 24, seed=7)
    _, b = _render(classes, 24, seed=7)
    _, c = _render(classes, 24, seed=8)
    for name in ("rgb", "depth_mm", "thermal_ck", "mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.rgb, c.rgb)
    assert not torch.equal(a.depth_mm, c.depth_mm)


def test_names_and_indices_give_the_same_scenes() -> None:
    _, a = _render([0, 6, 10], 16, seed=3)
    g = _gen(3)
    b = render(sample_scenes(["sphere", "octahedron", "cross"], g), 16, g)
    assert torch.equal(a.rgb, b.rgb)


def test_dtypes_shapes_and_ranges() -> None:
    n, size = len(ALL_CLASSES) * 2, 32
    _, out = _render(list(range(len(ALL_CLASSES))) * 2, size, seed=0)
    assert out.rgb.shape == (n, size, size, 3) and out.rgb.dtype == torch.uint8
    assert out.depth_mm.shape == (n, size, size) and out.depth_mm.dtype == torch.int32
    assert out.thermal_ck.shape == (n, size, size) and out.thermal_ck.dtype == torch.int32
    assert out.mask.shape == (n, size, size) and out.mask.dtype == torch.bool
    assert int(out.depth_mm.min()) >= 0 and int(out.depth_mm.max()) <= MAX_RANGE_MM
    lo, hi = THERMAL_RANGE_CK
    assert int(out.thermal_ck.min()) >= lo and int(out.thermal_ck.max()) <= hi
    assert bool((out.mask.sum((1, 2)) > 0).all()), "every scene shows its object"
    assert bool((~out.mask).sum((1, 2)).gt(0).all()), "every scene shows background"


def test_unknown_class_and_tiny_size_raise_data_error() -> None:
    with pytest.raises(DataError):
        sample_scenes(["dodecahedron"], _gen(0))
    with pytest.raises(DataError):
        sample_scenes([len(ALL_CLASSES)], _gen(0))
    with pytest.raises(DataError):
        render(sample_scenes([0], _gen(0)), 4, _gen(0))


def test_depth_is_metric_noisy_and_has_holes(task_batch: tuple[torch.Tensor, SceneParams, Rendered]) -> None:
    _, _, out = task_batch
    on_obj = out.mask
    holes = ((out.depth_mm == 0) & on_obj).sum((1, 2)).float() / on_obj.sum((1, 2)).float()
    # Sensor-like: 5-20 % invalid object pixels on average (edges, grazing angles, dropout blobs).
    assert 0.05 <= float(holes.mean()) <= 0.20
    valid = out.depth_mm[on_obj & (out.depth_mm > 0)].float()
    assert 900 <= float(valid.median()) <= 2700, "camera is about 1-2.5 m from the object"
    # Noise: on a smooth surface the second difference of three valid neighbours would be ~0-1 mm
    # after mm quantisation; sensor noise (sigma of a few mm, growing with z^2) makes it larger.
    d, ok = out.depth_mm.float(), on_obj & (out.depth_mm > 0)
    run = ok[:, :, 2:] & ok[:, :, 1:-1] & ok[:, :, :-2]
    second = (d[:, :, 2:] - 2 * d[:, :, 1:-1] + d[:, :, :-2]).abs()[run]
    assert float(second.median()) >= 3.0


def test_thermal_follows_object_temperature(task_batch: tuple[torch.Tensor, SceneParams, Rendered]) -> None:
    _, scenes, out = task_batch
    m = out.mask.float()
    obj_ck = (out.thermal_ck.float() * m).sum((1, 2)) / m.sum((1, 2))
    corr = torch.corrcoef(torch.stack([obj_ck, scenes.t_obj * 100]))[0, 1]
    assert float(corr) > 0.8


def test_ir_and_depth_do_not_depend_on_rgb_colour_or_texture() -> None:
    classes = list(range(len(ALL_CLASSES)))
    g = _gen(5)
    scenes = sample_scenes(classes, g)
    other = sample_scenes(classes, _gen(99))
    recoloured = dataclasses.replace(
        scenes,
        obj_color=other.obj_color,
        obj_color2=other.obj_color2,
        tex_kind=other.tex_kind,
        tex_freq=other.tex_freq,
        tex_axis=other.tex_axis,
        ground_color=other.ground_color,
        ground_kind=other.ground_kind,
        wall_color=other.wall_color,
    )
    state = g.get_state()
    a = render(scenes, 32, g)
    g.set_state(state)
    b = render(recoloured, 32, g)
    assert not torch.equal(a.rgb, b.rgb)
    assert torch.equal(a.thermal_ck, b.thermal_ck)
    assert torch.equal(a.depth_mm, b.depth_mm)


def _nearest_mean_accuracy(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> float:
    """Fit class means on the first half, classify the second half by nearest standardised mean."""
    x = (x - x.mean(0)) / x.std(0).clamp(min=1e-6)
    half = x.shape[0] // 2
    means = torch.stack([x[:half][y[:half] == c].mean(0) for c in range(n_classes)])
    pred = torch.cdist(x[half:], means).argmin(1)
    return float((pred == y[half:]).float().mean())


def _appearance_features(out: Rendered) -> torch.Tensor:
    rgb, m = out.rgb.float() / 255, out.mask
    area = m.sum((1, 2)).float()
    obj = (rgb * m[..., None]).sum((1, 2)) / area[:, None]
    bg = (rgb * (~m)[..., None]).sum((1, 2)) / (~m).sum((1, 2))[:, None]
    return torch.cat([rgb.mean((1, 2)), obj, bg, area.log()[:, None]], dim=1)


def _silhouette_features(mask: torch.Tensor) -> torch.Tensor:
    """Scale-free shape descriptors of the mask: eccentricity, normalised spread, compactness."""
    m = mask.float()
    h, w = m.shape[1:]
    ys, xs = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    area = m.sum((1, 2))
    cy, cx = (m * ys).sum((1, 2)) / area, (m * xs).sum((1, 2)) / area
    dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
    myy, mxx, mxy = (
        (m * dy * dy).sum((1, 2)) / area,
        (m * dx * dx).sum((1, 2)) / area,
        (m * dx * dy).sum((1, 2)) / area,
    )
    tr, det = mxx + myy, mxx * myy - mxy * mxy
    ecc = torch.sqrt((tr * tr / 4 - det).clamp(min=0)) / (tr / 2)
    eroded = -F.max_pool2d(-F.pad(m[:, None], (1, 1, 1, 1)), 3, 1, 0)[:, 0]
    perimeter = (m - eroded).sum((1, 2))
    return torch.stack([ecc, tr / area, perimeter**2 / area], dim=1)


def test_class_not_readable_from_colour_size_or_background(
    task_batch: tuple[torch.Tensor, SceneParams, Rendered],
) -> None:
    """Appearance features stay near chance (1/6 = 0.167).  With 300 test images the standard
    deviation of a chance-level accuracy is sqrt(0.167 * 0.833 / 300) = 0.022, so 0.28 is five
    standard deviations above chance: a real colour/size/background leak would cross it (before the
    per-shape area equalisation, mask area alone gave 0.32), noise will not."""
    cls, _, out = task_batch
    n = len(TASK_CLASSES)
    feats = _appearance_features(out)
    assert _nearest_mean_accuracy(feats, cls, n) < 0.28
    for cols in (slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)):
        assert _nearest_mean_accuracy(feats[:, cols], cls, n) < 0.28, cols
    # ... while the silhouette alone carries the class (measured ~0.59).
    assert _nearest_mean_accuracy(_silhouette_features(out.mask), cls, n) > 0.4


def test_ir_has_no_rgb_texture(task_batch: tuple[torch.Tensor, SceneParams, Rendered]) -> None:
    """Across samples, object brightness in RGB does not predict object temperature."""
    _, _, out = task_batch
    m = out.mask.float()
    area = m.sum((1, 2))
    rgb_obj = (out.rgb.float().mean(3) * m).sum((1, 2)) / area
    ir_obj = (out.thermal_ck.float() * m).sum((1, 2)) / area
    assert abs(float(torch.corrcoef(torch.stack([rgb_obj, ir_obj]))[0, 1])) < 0.2


def test_thread_cap_does_not_change_the_output() -> None:
    g = _gen(11)
    scenes = sample_scenes(list(range(len(ALL_CLASSES))), g)
    state = g.get_state()
    before = torch.get_num_threads()
    a = render(scenes, 16, g, threads=1)
    assert torch.get_num_threads() == before, "the cap is restored"
    g.set_state(state)
    b = render(scenes, 16, g, threads=None)
    assert torch.equal(a.rgb, b.rgb) and torch.equal(a.depth_mm, b.depth_mm) and torch.equal(a.thermal_ck, b.thermal_ck)
