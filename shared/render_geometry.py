"""Where every pixel's ray lands: camera rays, the ground and wall planes, and the object.

Why a module of its own: it is the one place that does 3D intersection.  The sensors
(:mod:`xkt.shared.render_sensors`) take its :class:`Surfaces` and never trace a ray.

The planes are intersected analytically.  The object is an SDF in its own local frame: rays are
moved into that frame once, clipped analytically against the shape's bounding sphere and
sphere-traced only there, grouped by class so each SDF sees only its own rays, with finished rays
compacted away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from xkt.shared.render_scenes import SceneParams
from xkt.shared.render_shapes import ALL_CLASSES, SDFS, Sdf, class_radius

_MARCH_STEPS = 36
_COMPACT_EVERY = 6
_HIT_EPS = 2e-3
_LATE_HIT_EPS = 2e-2


@dataclass(frozen=True)
class Rays:
    """One ray per pixel from each scene's camera."""

    origin: Tensor  # (N,3) world
    dirs: Tensor  # (N,P,3) world, unit
    axis_cos: Tensor  # (N,P) cos of angle to the optical axis (depth = t * axis_cos)


def camera_rays(s: SceneParams, size: int) -> Rays:
    """Pinhole rays through pixel centres, z-up world, square pixels."""
    fwd = F.normalize(s.cam_target - s.cam_pos, dim=1)
    up_world = torch.tensor([0.0, 0.0, 1.0]).expand_as(fwd)
    right = F.normalize(torch.linalg.cross(fwd, up_world), dim=1)
    up = torch.linalg.cross(right, fwd)
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    v, u = torch.meshgrid(-c, c, indexing="ij")
    uv1 = torch.stack([u.reshape(-1), v.reshape(-1), torch.ones(size * size)], dim=1)  # (P,3)
    basis = torch.stack([right, up, fwd * s.focal[:, None]], dim=1)  # (N,3,3)
    raw = uv1 @ basis  # (N,P,3)
    norm = raw.norm(dim=2)
    return Rays(s.cam_pos, raw / norm[..., None], s.focal[:, None] / norm)


def _plane_hits(s: SceneParams, rays: Rays) -> tuple[Tensor, Tensor, Tensor]:
    """Distances to the ground (z=0) and back wall (inf where missed), and the wall normal."""
    inf = torch.tensor(float("inf"))
    oz, dz = rays.origin[:, 2:3], rays.dirs[..., 2]
    t_ground = torch.where(dz < -1e-6, -oz / dz.clamp(max=-1e-6), inf)
    to_cam = s.cam_pos - s.center
    n_wall = F.normalize(torch.stack([to_cam[:, 0], to_cam[:, 1], torch.zeros_like(to_cam[:, 0])], 1), dim=1)
    # wall: n.(x - c) = -wall_dist, facing the camera
    denom = (rays.dirs * n_wall[:, None, :]).sum(2)
    num = -s.wall_dist - (n_wall * (rays.origin - s.center)).sum(1)
    t_wall = num[:, None] / denom.clamp(max=-1e-6)
    t_wall = torch.where((denom < -1e-6) & s.wall[:, None] & (t_wall > 0), t_wall, inf)
    return t_ground, t_wall, n_wall


@dataclass(frozen=True)
class ObjectHits:
    """Where rays hit their scene's object (before occlusion by the planes), grouped by class."""

    index: Tensor  # (M,) flat pixel index into N*P
    t: Tensor  # (M,) world distance along the ray
    pos: Tensor  # (M,3) local hit position
    normal: Tensor  # (M,3) local unit normal


def _sphere_trace(sdf: Sdf, o: Tensor, d: Tensor, t0: Tensor, t1: Tensor) -> tuple[Tensor, Tensor]:
    """Sphere-trace rays o + t d between t0 and t1; returns (hit mask, t).  Finished rays
    are compacted away every few steps so late iterations only touch the hard rays."""
    m = o.shape[0]
    hit = torch.zeros(m, dtype=torch.bool)
    t_out = torch.zeros(m)
    idx = torch.arange(m)
    ox, oy, oz = o.unbind(1)
    dx, dy, dz = d.unbind(1)
    t = t0
    dist = torch.full((m,), float("inf"))
    for step in range(1, _MARCH_STEPS + 1):
        dist = sdf(ox + t * dx, oy + t * dy, oz + t * dz)
        t = t + dist
        if step % _COMPACT_EVERY == 0 or step == _MARCH_STEPS:
            eps = _HIT_EPS if step < _MARCH_STEPS else _LATE_HIT_EPS
            done = dist < eps
            hit[idx[done]] = True
            t_out[idx[done]] = t[done]
            keep = ~done & (t < t1)
            idx, t, t1 = idx[keep], t[keep], t1[keep]
            ox, oy, oz, dx, dy, dz = ox[keep], oy[keep], oz[keep], dx[keep], dy[keep], dz[keep]
            if idx.numel() == 0:
                break
    return hit, t_out


def _sdf_normal(sdf: Sdf, p: Tensor) -> Tensor:
    """Outward unit normal from the SDF gradient (tetrahedron finite differences, 4 evaluations)."""
    h = 1e-3
    x, y, z = p.unbind(1)
    n = torch.zeros_like(p)
    for kx, ky, kz in ((1, -1, -1), (-1, -1, 1), (-1, 1, -1), (1, 1, 1)):
        f = sdf(x + kx * h, y + ky * h, z + kz * h)
        n = n + f[:, None] * torch.tensor([kx, ky, kz], dtype=torch.float32)
    return F.normalize(n, dim=1)


@dataclass(frozen=True)
class _Candidates:
    """Rays that cross their object's bounding sphere, grouped by class, in object-local units."""

    index: Tensor  # (K,) flat pixel index into N*P
    sample: Tensor  # (K,) which scene each ray belongs to
    origin: Tensor  # (K,3) local ray origin
    dirs: Tensor  # (K,3) local unit direction
    t0: Tensor  # (K,) where the ray enters the bounding sphere (0 if the camera is inside)
    t1: Tensor  # (K,) where it leaves


def _bounded_candidates(s: SceneParams, rays: Rays) -> _Candidates:
    """Clip every ray against its object's bounding sphere; keep only those that cross it."""
    p = rays.dirs.shape[1]
    o_loc = ((rays.origin - s.center)[:, None, :] @ s.rot)[:, 0, :] / s.scale[:, None]  # (N,3)
    # Bounding-sphere test in local units without rotating every ray: d_loc.o_loc == d.(o - c) / scale.
    b = (rays.dirs @ (rays.origin - s.center)[:, :, None])[..., 0] / s.scale[:, None]
    radius = class_radius(s.cls)  # tight per-class bound
    disc = b * b - ((o_loc * o_loc).sum(1) - radius * radius)[:, None]
    # Visit samples in class order so candidate rays come out grouped by class (no ray sort).
    perm = torch.argsort(s.cls, stable=True)
    cand_p = (disc[perm] > 0).reshape(-1).nonzero().squeeze(1)
    sample = perm[torch.div(cand_p, p, rounding_mode="floor")]
    cand = sample * p + cand_p % p
    sq = disc.reshape(-1)[cand].sqrt()
    bb = b.reshape(-1)[cand]
    d_r = (rays.dirs.reshape(-1, 3)[cand][:, :, None] * s.rot[sample]).sum(1)  # rotate candidates only: d @ R
    return _Candidates(cand, sample, o_loc[sample], d_r, (-bb - sq).clamp(min=0), -bb + sq)


def _march_by_class(cls: Tensor, c: _Candidates) -> tuple[Tensor, Tensor] | None:
    """Sphere-trace each class's candidates with its own SDF: (hit mask, local t), or None if no candidates."""
    counts = torch.bincount(cls, minlength=len(ALL_CLASSES)).tolist()
    hits, ts, start = [], [], 0
    for ci, cnt in enumerate(counts):
        sl = slice(start, start + cnt)
        start += cnt
        if cnt:
            h, t = _sphere_trace(SDFS[ALL_CLASSES[ci]], c.origin[sl], c.dirs[sl], c.t0[sl], c.t1[sl])
            hits.append(h)
            ts.append(t)
    if not hits:
        return None
    return torch.cat(hits), torch.cat(ts)


def _normals_by_class(cls: Tensor, pos: Tensor) -> Tensor:
    """Local unit normals (M,3) at hit points that are grouped by class, each from its own SDF."""
    normal = torch.empty_like(pos)
    start = 0
    for ci, cnt in enumerate(torch.bincount(cls, minlength=len(ALL_CLASSES)).tolist()):
        if cnt:
            normal[start : start + cnt] = _sdf_normal(SDFS[ALL_CLASSES[ci]], pos[start : start + cnt])
            start += cnt
    return normal


def _trace_object(s: SceneParams, rays: Rays) -> ObjectHits:
    """Intersect every ray with its sample's object, in the object's local frame."""
    c = _bounded_candidates(s, rays)
    marched = _march_by_class(s.cls[c.sample], c)
    if marched is None:
        empty = torch.zeros(0, 3)
        return ObjectHits(torch.zeros(0, dtype=torch.int64), torch.zeros(0), empty, empty)
    hit, t_all = marched
    t_loc = t_all[hit]
    idx, smp = c.index[hit], c.sample[hit]
    pos = c.origin[hit] + t_loc[:, None] * c.dirs[hit]
    normal = _normals_by_class(s.cls[smp], pos)  # hits stay grouped by class
    return ObjectHits(idx, t_loc * s.scale[smp], pos, normal)


@dataclass(frozen=True)
class Surfaces:
    """Which surface every pixel sees: 0 sky, 1 ground, 2 wall, 3 object; flat (N*P,) tensors."""

    kind: Tensor
    t: Tensor  # world distance (inf for sky)
    obj: Tensor  # (M,) flat pixel indices of visible object hits
    obj_sel: Tensor  # (M,) which entries of ObjectHits are visible
    hits: ObjectHits
    n_wall: Tensor  # (N,3)


def resolve_surfaces(s: SceneParams, rays: Rays) -> Surfaces:
    """Nearest surface per pixel (an object sunk into the ground is cut by the plane)."""
    t_ground, t_wall, n_wall = _plane_hits(s, rays)
    t_plane = torch.minimum(t_ground, t_wall).reshape(-1)
    kind = torch.where(t_ground <= t_wall, 1, 2).reshape(-1)
    kind = torch.where(torch.isinf(t_plane), 0, kind)
    hits = _trace_object(s, rays)
    vis = hits.t < t_plane[hits.index]
    obj = hits.index[vis]
    t = t_plane.clone()
    t[obj] = hits.t[vis]
    kind[obj] = 3
    return Surfaces(kind, t, obj, vis.nonzero().squeeze(1), hits, n_wall)


def object_samples(surf: Surfaces, p: int) -> Tensor:
    """Sample index of every visible object pixel."""
    return torch.div(surf.obj, p, rounding_mode="floor")


def object_world_normals(s: SceneParams, surf: Surfaces, p: int) -> Tensor:
    """World-frame unit normals (M,3) of the visible object pixels."""
    rot = s.rot[object_samples(surf, p)]
    return (rot * surf.hits.normal[surf.obj_sel][:, None, :]).sum(2)  # R @ n, without tiny batched matmuls


def view_cosine(s: SceneParams, rays: Rays, surf: Surfaces, obj_normal: Tensor) -> Tensor:
    """|cos| of the angle between each pixel's ray and the surface normal, flat (N*P,)."""
    n, p = rays.dirs.shape[:2]
    wall = (rays.dirs @ surf.n_wall[:, :, None])[..., 0].abs()
    cos = torch.where(surf.kind.reshape(n, p) == 2, wall, rays.dirs[..., 2].abs()).reshape(-1)
    if surf.obj.numel():
        cos[surf.obj] = (obj_normal * rays.dirs.reshape(-1, 3)[surf.obj]).sum(1).abs()
    return cos.clamp(max=1.0)
