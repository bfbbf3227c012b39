"""Batched procedural renderer: one 3D scene as RGB, depth (mm) and thermal infrared (cK).

Why a renderer of our own: the built-in benchmark must give the *same* scene in three
modalities, be deterministic for a seed, install nothing and generate hundreds of images
per second on two CPU cores.  Everything is plain torch on float32 tensors, in four steps
that each live in their own module:

* :mod:`xkt.shared.render_shapes`: the object classes as signed distance functions (SDFs),
  normalised so every shape has the same bounding radius and mean silhouette area;
* :mod:`xkt.shared.render_scenes`: :class:`SceneParams` and :func:`sample_scenes`, the random,
  class-independent draw of everything but the shape;
* :mod:`xkt.shared.render_geometry`: camera rays, the analytic ground plane and back wall, and
  the sphere-traced object: which surface every pixel sees;
* :mod:`xkt.shared.render_sensors`: the RGB, depth and thermal sensor models.

This module runs them in order (:func:`render`) and is the public entry point: import from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from xkt.shared.errors import DataError
from xkt.shared.render_geometry import camera_rays, object_world_normals, resolve_surfaces, view_cosine
from xkt.shared.render_scenes import SceneParams, random_rotations, sample_scenes
from xkt.shared.render_sensors import MAX_RANGE_MM, THERMAL_RANGE_CK, depth_sensor, shade_rgb, thermal_sensor
from xkt.shared.render_shapes import ALL_CLASSES, TASK_CLASSES, TI_CLASSES, class_indices

__all__ = [
    "ALL_CLASSES",
    "MAX_RANGE_MM",
    "TASK_CLASSES",
    "THERMAL_RANGE_CK",
    "TI_CLASSES",
    "Rendered",
    "SceneParams",
    "class_indices",
    "random_rotations",
    "render",
    "sample_scenes",
]


@dataclass(frozen=True)
class Rendered:
    """One batch of the same scenes seen by three sensors."""

    rgb: Tensor  # (N,H,W,3) uint8 sRGB
    depth_mm: Tensor  # (N,H,W) int32 millimetres along the optical axis, 0 = invalid
    thermal_ck: Tensor  # (N,H,W) int32 radiometric temperature in centikelvin
    mask: Tensor  # (N,H,W) bool object pixels (noise-free geometry)


@contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """Temporarily cap torch's intra-op threads (restored afterwards; None leaves them alone)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(before)


def render(scenes: SceneParams, size: int, generator: torch.Generator, *, threads: int | None = 1) -> Rendered:
    """Render every scene at ``size`` x ``size`` as RGB, depth and thermal (same geometry).

    Sensor noise is drawn from ``generator`` in a fixed order with shapes that depend only
    on (N, size), so re-rendering with a generator in the same state is bit-identical and a
    change of colours cannot change the depth or thermal images.

    ``threads`` caps torch's intra-op threads while rendering (default 1).  Why: the work is
    thousands of medium-sized element-wise ops, so a second intra-op thread gains little on an
    idle machine, while on a busy one every op waits for a descheduled worker (measured on 2 cores
    with another process busy: 1 thread ~1100 triples/s, 2 threads ~18 triples/s).  Pass None to
    keep the caller's setting.  The output does not depend on it.
    """
    if size < 8:
        raise DataError(f"image size {size} is too small", hint="use --size 8 or more (64 is the default)")
    with torch.no_grad(), _intra_op_threads(threads):
        rays = camera_rays(scenes, size)
        surf = resolve_surfaces(scenes, rays)
        obj_normal = object_world_normals(scenes, surf, size * size)
        cos_view = view_cosine(scenes, rays, surf, obj_normal)
        rgb = shade_rgb(scenes, rays, surf, obj_normal, generator)
        depth = depth_sensor(scenes, rays, surf, cos_view, generator)
        thermal = thermal_sensor(scenes, rays, surf, cos_view, generator)
        mask = (surf.kind == 3).reshape(len(scenes), size, size)
    return Rendered(rgb=rgb, depth_mm=depth, thermal_ck=thermal, mask=mask)
