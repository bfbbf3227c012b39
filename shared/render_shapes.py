"""The shape library of the built-in benchmark: one signed distance function (SDF) per class.

Why a module of its own: the shapes *are* the task, the only thing that may tell the classes
apart, so their definitions, the class lists and the per-shape size normalisation live together,
away from the ray tracing that uses them (:mod:`xkt.shared.render_geometry`).

Every SDF works in the object's local frame with its farthest point <= 0.95 from the origin, i.e.
all shapes share one bounding radius before the area-equalising gain and the random scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from xkt.shared.errors import DataError

TASK_CLASSES: tuple[str, ...] = ("sphere", "box", "cylinder", "cone", "torus", "capsule")
"""Shapes the owner's classifier recognises (the task)."""
TI_CLASSES: tuple[str, ...] = ("octahedron", "hex_prism", "pyramid", "link", "cross")
"""Task-irrelevant shapes: used only for paired RGB/target data, disjoint from the task."""
ALL_CLASSES: tuple[str, ...] = TASK_CLASSES + TI_CLASSES

Sdf = Callable[[Tensor, Tensor, Tensor], Tensor]
"""Signed distance of local points (x, y, z) to a shape: negative inside, zero on the surface."""


def _len2(a: Tensor, b: Tensor) -> Tensor:
    return torch.sqrt(a * a + b * b)


def _len3(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return torch.sqrt(a * a + b * b + c * c)


def _box(x: Tensor, y: Tensor, z: Tensor, bx: float, by: float, bz: float, r: float) -> Tensor:
    """Exact rounded-box distance (half extents b, corner radius r)."""
    qx, qy, qz = x.abs() - (bx - r), y.abs() - (by - r), z.abs() - (bz - r)
    outside = _len3(qx.clamp(min=0), qy.clamp(min=0), qz.clamp(min=0))
    inside = torch.maximum(qx, torch.maximum(qy, qz)).clamp(max=0)
    return outside + inside - r


def _sphere(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    return _len3(x, y, z) - 0.95


def _box_shape(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    return _box(x, y, z, 0.70, 0.50, 0.36, 0.04)


def _cylinder(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    dx, dz = _len2(x, y) - 0.55, z.abs() - 0.72
    return torch.maximum(dx, dz).clamp(max=0) + _len2(dx.clamp(min=0), dz.clamp(min=0))


def _cone(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    # Apex (0,0,0.62), base disc radius 0.74 at z=-0.55; max of planes is a valid lower bound.
    sin_a, cos_a = 0.74 / math.hypot(0.74, 1.17), 1.17 / math.hypot(0.74, 1.17)
    side = _len2(x, y) * cos_a - (0.62 - z) * sin_a
    return torch.maximum(side, -(z + 0.55))


def _torus(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    return _len2(_len2(x, y) - 0.62, z) - 0.32


def _capsule(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    return _len3(x, y, z - z.clamp(-0.43, 0.43)) - 0.5


def _octahedron(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    return (x.abs() + y.abs() + z.abs() - 0.93) * 0.57735


def _hex_prism(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    # Regular hexagon of apothem hx in the xy plane, half height hz along z.
    hx, hz = 0.58, 0.6
    kx, ky, kz = -0.8660254, 0.5, 0.57735
    ax, ay = x.abs(), y.abs()
    fold = 2.0 * (kx * ax + ky * ay).clamp(max=0)
    ax, ay = ax - fold * kx, ay - fold * ky
    dx = _len2(ax - ax.clamp(-kz * hx, kz * hx), ay - hx) * torch.sign(ay - hx)
    dz = z.abs() - hz
    return torch.maximum(dx, dz).clamp(max=0) + _len2(dx.clamp(min=0), dz.clamp(min=0))


def _pyramid(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    # Square base half-side 0.62 at z=-0.35, apex at z=0.55 (intersection of five half-spaces).
    n = math.hypot(0.9, 0.62)
    side = (torch.maximum(x.abs(), y.abs()) * 0.9 + 0.62 * (z - 0.55)) / n
    return torch.maximum(side, -(z + 0.35))


def _link(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    qy = (y.abs() - 0.28).clamp(min=0)
    return _len2(_len2(x, qy) - 0.42, z) - 0.22


def _cross(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    a = _box(x, y, z, 0.85, 0.24, 0.24, 0.06)
    b = _box(x, y, z, 0.24, 0.85, 0.24, 0.06)
    c = _box(x, y, z, 0.24, 0.24, 0.85, 0.06)
    return torch.minimum(a, torch.minimum(b, c))


_UNIT_SDFS: dict[str, Sdf] = {
    "sphere": _sphere,
    "box": _box_shape,
    "cylinder": _cylinder,
    "cone": _cone,
    "torus": _torus,
    "capsule": _capsule,
    "octahedron": _octahedron,
    "hex_prism": _hex_prism,
    "pyramid": _pyramid,
    "link": _link,
    "cross": _cross,
}

# After the common bounding radius, each shape is shrunk by a fixed factor so that every class
# has the same mean silhouette area over random poses (measured with this renderer; the pyramid
# is the smallest and sets the target).  Without it a sphere covers ~2.7x the pixels of a cone
# and object size alone would predict the class.
_AREA_GAIN: dict[str, float] = {
    "sphere": 0.600,
    "box": 0.826,
    "cylinder": 0.770,
    "cone": 0.914,
    "torus": 0.755,
    "capsule": 0.837,
    "octahedron": 0.836,
    "hex_prism": 0.766,
    "pyramid": 0.99,
    "link": 0.918,
    "cross": 0.790,
}


def _shrunk(sdf: Sdf, gain: float) -> Sdf:
    """The SDF of the shape scaled by ``gain`` about the origin (distances scale too)."""
    inv = 1.0 / gain

    def scaled(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
        return sdf(x * inv, y * inv, z * inv) * gain

    return scaled


SDFS: dict[str, Sdf] = {name: _shrunk(f, _AREA_GAIN[name]) for name, f in _UNIT_SDFS.items()}


def class_indices(classes: Sequence[int | str]) -> Tensor:
    """Class names or indices into ALL_CLASSES as an int64 tensor; unknown names raise DataError."""
    out: list[int] = []
    for c in classes:
        if isinstance(c, str):
            if c not in ALL_CLASSES:
                raise DataError(f"unknown shape class {c!r}", hint=f"use one of {', '.join(ALL_CLASSES)}")
            out.append(ALL_CLASSES.index(c))
        elif 0 <= int(c) < len(ALL_CLASSES):
            out.append(int(c))
        else:
            raise DataError(f"shape class index {c} out of range", hint=f"use 0..{len(ALL_CLASSES) - 1}")
    return torch.tensor(out, dtype=torch.int64)


def class_radius(cls: Tensor) -> Tensor:
    """Bounding radius of each class's shape in local units (the area-equalising gain)."""
    return torch.tensor([_AREA_GAIN[c] for c in ALL_CLASSES])[cls]
