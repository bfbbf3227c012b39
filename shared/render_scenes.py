"""Random scene descriptions: what each benchmark image shows, not how it is drawn.

Why a module of its own: the fairness of the benchmark rests here.  Class must not be readable
from anything but shape, so pose, size, camera, light, colours, texture, background, temperature,
emissivity and sensor quirks are drawn per sample from distributions that do not depend on the
class (:func:`sample_scenes`).  All randomness comes from an explicit :class:`torch.Generator`;
no global RNG state is used, and the order of the draws is part of the output (changing it
changes every image of a seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from xkt.shared.render_shapes import class_indices, class_radius


@dataclass(frozen=True)
class SceneParams:
    """Per-sample scene description; every field is a tensor with leading dimension N.

    Units: metres, radians, linear RGB in [0, 1], kelvin.  World frame is z-up with the
    ground plane at z = 0.  ``focal`` is the focal length in image widths, so the same
    scene renders at any resolution.
    """

    cls: Tensor  # (N,) int64 index into ALL_CLASSES
    rot: Tensor  # (N,3,3) object-to-world rotation
    scale: Tensor  # (N,) bounding radius in metres
    center: Tensor  # (N,3) object centre
    cam_pos: Tensor  # (N,3)
    cam_target: Tensor  # (N,3)
    focal: Tensor  # (N,)
    wall: Tensor  # (N,) bool: a vertical back wall is present
    wall_dist: Tensor  # (N,) metres behind the object centre
    light_dir: Tensor  # (N,3) unit vector towards the light
    light: Tensor  # (N,) diffuse intensity
    ambient: Tensor  # (N,)
    specular: Tensor  # (N,) strength
    shininess: Tensor  # (N,)
    obj_color: Tensor  # (N,3)
    obj_color2: Tensor  # (N,3) second texture colour
    tex_kind: Tensor  # (N,) 0 stripes, 1 checker, 2 noise
    tex_freq: Tensor  # (N,) cycles per unit local radius
    tex_axis: Tensor  # (N,3) unit
    tex_phase: Tensor  # (N,3)
    ground_color: Tensor  # (N,3)
    ground_color2: Tensor  # (N,3)
    ground_kind: Tensor  # (N,) 0 gradient, 1 checker, 2 waves
    ground_freq: Tensor  # (N,) cycles per metre
    wall_color: Tensor  # (N,3)
    wall_color2: Tensor  # (N,3) colour at 1.5 m height (vertical gradient)
    sky_color: Tensor  # (N,3)
    shadow: Tensor  # (N,) darkness of the soft contact shadow
    depth_noise: Tensor  # (N,) sigma in mm at 1 m (grows with z^2)
    edge_drop: Tensor  # (N,) probability an edge pixel is invalid
    grazing: Tensor  # (N,) |n.v| below which a pixel is invalid
    dropout: Tensor  # (N,) threshold of the blob dropout field
    t_obj: Tensor  # (N,) object temperature, K
    emissivity: Tensor  # (N,)
    t_amb: Tensor  # (N,) ambient (reflected) temperature, K
    t_ground: Tensor  # (N,)
    t_wall: Tensor  # (N,)
    t_sky: Tensor  # (N,)
    t_grad: Tensor  # (N,) K across the object along grad_axis
    grad_axis: Tensor  # (N,3) unit, object-local
    ir_blur: Tensor  # (N,) optics blur sigma in image widths
    ir_noise: Tensor  # (N,) temporal noise sigma, K
    ir_fpn: Tensor  # (N,) row/column noise sigma, K

    def __len__(self) -> int:
        return int(self.cls.shape[0])


def _u(g: torch.Generator, n: int, lo: float, hi: float, *shape: int) -> Tensor:
    return torch.rand((n, *shape), generator=g) * (hi - lo) + lo


def _unit(g: torch.Generator, n: int) -> Tensor:
    return F.normalize(torch.randn(n, 3, generator=g), dim=1)


def random_rotations(n: int, generator: torch.Generator) -> Tensor:
    """Uniform random 3D rotations (normalised Gaussian quaternions), shape (n,3,3)."""
    q = F.normalize(torch.randn(n, 4, generator=generator), dim=1)
    w, x, y, z = q.unbind(1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=1).reshape(n, 3, 3)


def _spherical(az: Tensor, el: Tensor) -> Tensor:
    return torch.stack([torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)], dim=1)


def _sample_geometry(cls: Tensor, g: torch.Generator) -> dict[str, Tensor]:
    """Pose, size and camera. Apparent size is drawn directly and the focal length follows
    from it, so objects fill a sensible part of the frame at every camera distance.  The object
    rests on (or sinks slightly into) the ground relative to its own bounding radius, so the gap
    below it carries no class information."""
    n = int(cls.shape[0])
    scale = _u(g, n, 0.15, 0.35)
    lift = scale * class_radius(cls) * _u(g, n, 0.75, 1.05)
    center = torch.cat([_u(g, n, -0.1, 0.1, 2), lift[:, None]], dim=1)
    az, el, dist = _u(g, n, 0.0, 2 * math.pi), _u(g, n, 0.09, 0.75), _u(g, n, 1.0, 2.5)
    cam_pos = center + dist[:, None] * _spherical(az, el)
    target = center + scale[:, None] * _u(g, n, -0.25, 0.25, 3)
    apparent = _u(g, n, 0.26, 0.44)  # bounding radius / image width
    return {
        "rot": random_rotations(n, g),
        "scale": scale,
        "center": center,
        "cam_pos": cam_pos,
        "cam_target": target,
        "focal": apparent * dist / scale,
        "wall": torch.rand(n, generator=g) < 0.7,
        "wall_dist": _u(g, n, 0.3, 1.8),
    }


def _color(g: torch.Generator, n: int) -> Tensor:
    return _u(g, n, 0.04, 0.96, 3)


def _sample_appearance(n: int, g: torch.Generator) -> dict[str, Tensor]:
    """Light, object colours/texture and background: all class-independent."""
    obj = _color(g, n)
    contrast = _u(g, n, 0.15, 1.0)[:, None]
    return {
        "light_dir": _spherical(_u(g, n, 0.0, 2 * math.pi), _u(g, n, 0.4, 1.4)),
        "light": _u(g, n, 0.55, 1.0),
        "ambient": _u(g, n, 0.15, 0.4),
        "specular": _u(g, n, 0.0, 0.5),
        "shininess": _u(g, n, 8.0, 64.0),
        "obj_color": obj,
        "obj_color2": obj + contrast * (_color(g, n) - obj),
        "tex_kind": torch.randint(0, 3, (n,), generator=g),
        "tex_freq": _u(g, n, 0.8, 3.5),
        "tex_axis": _unit(g, n),
        "tex_phase": _u(g, n, 0.0, 2 * math.pi, 3),
        "ground_color": _color(g, n),
        "ground_color2": _color(g, n),
        "ground_kind": torch.randint(0, 3, (n,), generator=g),
        "ground_freq": _u(g, n, 0.8, 5.0),
        "wall_color": _color(g, n),
        "wall_color2": _color(g, n),
        "sky_color": _color(g, n),
        "shadow": _u(g, n, 0.2, 0.6),
    }


def _sample_sensors(n: int, g: torch.Generator) -> dict[str, Tensor]:
    """Depth-sensor and thermal parameters (temperatures in kelvin)."""
    t_amb = _u(g, n, 283.15, 303.15)
    return {
        "depth_noise": _u(g, n, 1.0, 3.0),
        "edge_drop": _u(g, n, 0.25, 0.6),
        "grazing": _u(g, n, 0.05, 0.15),
        "dropout": _u(g, n, 0.08, 0.2),
        "t_obj": _u(g, n, 288.15, 343.15),
        "emissivity": _u(g, n, 0.6, 0.98),
        "t_amb": t_amb,
        "t_ground": t_amb + _u(g, n, -3.0, 6.0),
        "t_wall": t_amb + _u(g, n, -2.0, 3.0),
        "t_sky": t_amb - _u(g, n, 10.0, 30.0),
        "t_grad": _u(g, n, 0.0, 6.0),
        "grad_axis": _unit(g, n),
        "ir_blur": _u(g, n, 0.009, 0.02),
        "ir_noise": _u(g, n, 0.03, 0.12),
        "ir_fpn": _u(g, n, 0.0, 0.1),
    }


def sample_scenes(classes: Sequence[int | str], generator: torch.Generator) -> SceneParams:
    """Random scenes, one per entry of ``classes`` (names or ALL_CLASSES indices).

    Only ``cls`` depends on the class; every other field is drawn from the same
    distribution for every class, so nothing but the silhouette/geometry tells classes apart.
    """
    cls = class_indices(classes)
    n = int(cls.shape[0])
    fields = {**_sample_geometry(cls, generator), **_sample_appearance(n, generator), **_sample_sensors(n, generator)}
    return SceneParams(cls=cls, **fields)
