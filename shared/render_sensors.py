"""The three sensors that look at one resolved scene: RGB, depth and thermal cameras.

Why a module of its own: the sensor models are the part of the renderer a reader tunes (noise,
holes, blur, ranges) without touching geometry.  They are simple, documented and synthetic:
plausible, not calibrated to any real camera.  Each draws its noise from the caller's generator
in a fixed order with shapes that depend only on (N, size); depth and thermal never read the
RGB colours or textures, so a change of colours cannot change them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from xkt.shared.render_geometry import Rays, Surfaces, object_samples
from xkt.shared.render_scenes import SceneParams
from xkt.shared.render_shapes import class_radius

MAX_RANGE_MM = 4000
"""Depth sensor range: farther surfaces (and empty sky) read 0 = invalid."""
THERMAL_RANGE_CK: tuple[int, int] = (23315, 37315)
"""Radiometric range of the thermal camera in centikelvin (-40 C .. +100 C), values are clamped to it."""


def _object_texture(s: SceneParams, smp: Tensor, pos: Tensor) -> Tensor:
    """Albedo of object hits: stripes / 3D checker / smooth waves in object-local coordinates."""
    f = (2 * math.pi) * s.tex_freq[smp][:, None]
    ph = s.tex_phase[smp]
    u = (pos * s.tex_axis[smp]).sum(1, keepdim=True)
    stripes = torch.sin(f * u + ph[:, :1])
    waves = torch.sin(f * pos + ph)
    checker = waves.prod(1, keepdim=True)
    noise = waves.mean(1, keepdim=True) * 1.7 + torch.sin(1.9 * f * u + ph[:, 1:2]) * 0.5
    kind = s.tex_kind[smp][:, None]
    pattern = torch.where(kind == 0, stripes, torch.where(kind == 1, checker, noise))
    w = torch.sigmoid(6.0 * pattern)
    return s.obj_color[smp] + w * (s.obj_color2[smp] - s.obj_color[smp])


def _ground_pattern(s: SceneParams, gx: Tensor, gy: Tensor) -> Tensor:
    """Ground texture weight (N,P) in [0,1]: gradient, checker or waves, computed per sample group."""
    f = (2 * math.pi) * s.ground_freq[:, None]
    w = torch.empty_like(gx)
    for kind in range(3):
        i = (s.ground_kind == kind).nonzero().squeeze(1)
        if i.numel() == 0:
            continue
        x, y, fi = gx[i], gy[i], f[i]
        if kind == 0:
            w[i] = torch.atan(x + y) * (1 / math.pi) + 0.5
        elif kind == 1:
            w[i] = torch.sigmoid(8.0 * torch.sin(fi * x) * torch.sin(fi * y))
        else:
            w[i] = 0.5 + 0.5 * torch.sin(fi * x + 0.7 * torch.sin(fi * 0.6 * y))
    return w


def _shadow_factor(s: SceneParams, gx: Tensor, gy: Tensor) -> Tensor:
    """Soft contact shadow on the ground (N,P): a disc around where the light projects the
    object's centre onto the ground, sized by its bounding radius (shape-independent on purpose)."""
    lz = s.light_dir[:, 2].clamp(min=0.2)
    cx = s.center[:, 0] - s.center[:, 2] * s.light_dir[:, 0] / lz
    cy = s.center[:, 1] - s.center[:, 2] * s.light_dir[:, 1] / lz
    inv_r = 1.0 / (s.scale * class_radius(s.cls))
    dx, dy = (gx - cx[:, None]) * inv_r[:, None], (gy - cy[:, None]) * (inv_r * lz.sqrt())[:, None]
    soft = ((torch.sqrt(dx * dx + dy * dy) - 0.4) * 1.25).clamp(0, 1)
    return 1.0 - s.shadow[:, None] * (1.0 - soft)


def _background_rgb(s: SceneParams, rays: Rays, surf: Surfaces, n_wall: Tensor) -> Tensor:
    """Lit background colour (N,P,3).  Planes have one normal per sample, so Lambert shading is a
    per-(sample, surface) table; the texture weight is the only per-pixel work."""
    n, p = rays.dirs.shape[:2]
    kind = surf.kind.reshape(n, p).clamp(max=2)  # object pixels are overwritten later
    t = torch.where(kind == 0, 0.0, surf.t.reshape(n, p))
    gx = rays.origin[:, 0:1] + t * rays.dirs[..., 0]
    gy = rays.origin[:, 1:2] + t * rays.dirs[..., 1]
    gz = rays.origin[:, 2:3] + t * rays.dirs[..., 2]
    w_ground = _ground_pattern(s, gx, gy)
    w = torch.where(kind == 2, (gz * (1 / 1.5)).clamp(0, 1), w_ground)
    zero = torch.zeros_like(s.sky_color)
    base = torch.stack([s.sky_color, s.ground_color, s.wall_color], 1)  # (N,3 surfaces,3)
    delta = torch.stack([zero, s.ground_color2 - s.ground_color, s.wall_color2 - s.wall_color], 1)
    rows = torch.arange(n)[:, None]
    albedo = base[rows, kind] + w[..., None] * delta[rows, kind]
    lam_ground = s.light_dir[:, 2].clamp(min=0)
    lam_wall = (n_wall * s.light_dir).sum(1).clamp(min=0)
    amb = torch.stack([torch.ones(n), s.ambient, s.ambient], 1)
    light = torch.stack([torch.zeros(n), s.light * lam_ground, s.light * lam_wall], 1)
    shadow = torch.where(kind == 1, _shadow_factor(s, gx, gy), 1.0)
    shade = amb.gather(1, kind) + light.gather(1, kind) * shadow
    return albedo * shade[..., None]


def _shade_object(s: SceneParams, surf: Surfaces, nrm: Tensor, dirs: Tensor, p: int) -> Tensor:
    """Textured Lambert + ambient + Blinn-Phong colour of the visible object pixels (M,3)."""
    smp = object_samples(surf, p)
    ldir = s.light_dir[smp]
    alb = _object_texture(s, smp, surf.hits.pos[surf.obj_sel])
    diff = (nrm * ldir).sum(1).clamp(min=0)
    half = F.normalize(ldir - dirs[surf.obj], dim=1)
    spec = (nrm * half).sum(1).clamp(min=0) ** s.shininess[smp] * s.specular[smp]
    return alb * (s.ambient[smp] + s.light[smp] * diff)[:, None] + (s.light[smp] * spec)[:, None]


def shade_rgb(s: SceneParams, rays: Rays, surf: Surfaces, obj_normal: Tensor, g: torch.Generator) -> Tensor:
    """Background and object colour, luminance sensor noise, sRGB gamma, uint8."""
    n, p = rays.dirs.shape[:2]
    size = math.isqrt(p)
    color = _background_rgb(s, rays, surf, surf.n_wall).reshape(-1, 3)
    if surf.obj.numel():
        color[surf.obj] = _shade_object(s, surf, obj_normal, rays.dirs.reshape(-1, 3), p)
    color = color.reshape(n, size, size, 3) + torch.randn(n, size, size, 1, generator=g) * 0.01
    return (color.clamp(0, 1) ** (1 / 2.2) * 255 + 0.5).to(torch.uint8)


def _per_sample(v: Tensor) -> Tensor:
    """(N,) -> (N,1,1,1) to broadcast over image maps."""
    return v[:, None, None, None]


def _depth_edges(z: Tensor, thr: Tensor) -> Tensor:
    """Pixels (N,1,H,W) on either side of a jump larger than ``thr`` to a 4-neighbour."""
    dx = (z[..., :, 1:] - z[..., :, :-1]).abs() > thr[..., :, 1:]
    dy = (z[..., 1:, :] - z[..., :-1, :]).abs() > thr[..., 1:, :]
    edge = F.pad(dx, (0, 1)) | F.pad(dx, (1, 0)) | F.pad(dy, (0, 0, 0, 1)) | F.pad(dy, (0, 0, 1, 0))
    return edge


def depth_sensor(s: SceneParams, rays: Rays, surf: Surfaces, cos_view: Tensor, g: torch.Generator) -> Tensor:
    """Structured-light-like depth: z along the optical axis in mm with noise sigma ~ z^2,
    mm quantisation and holes (0) at depth edges, grazing angles, random blobs and out of range."""
    n, p = rays.dirs.shape[:2]
    size = math.isqrt(p)
    z = (torch.where(surf.kind == 0, 100.0, surf.t) * rays.axis_cos.reshape(-1)).reshape(n, 1, size, size)
    jump = _depth_edges(z, 0.04 + 0.05 * z)
    edge = jump & (torch.rand(n, 1, size, size, generator=g) < _per_sample(s.edge_drop))
    graze = cos_view.reshape(n, 1, size, size) < _per_sample(s.grazing)
    low = max(2, size // 8)
    field = F.interpolate(torch.rand(n, 1, low, low, generator=g), size=(size, size), mode="bilinear")
    blobs = field < _per_sample(s.dropout)
    noise = torch.randn(n, 1, size, size, generator=g) * (_per_sample(s.depth_noise) * z * z)
    mm = torch.round(z * 1000.0 + noise)
    bad = edge | graze | blobs | (mm > MAX_RANGE_MM) | (mm < 1)
    return torch.where(bad, 0.0, mm).to(torch.int32).reshape(n, size, size)


def _apparent_temperature(t: Tensor, emis: Tensor, t_refl: Tensor) -> Tensor:
    """Grey-body mix of emitted and reflected radiance (Stefan-Boltzmann, T^4), back to kelvin."""
    return (emis * t**4 + (1 - emis) * t_refl**4) ** 0.25


def _gaussian_blur(x: Tensor, sigma_px: Tensor) -> Tensor:
    """Per-sample Gaussian blur (N,1,H,W) via one grouped convolution."""
    n = x.shape[0]
    r = 3
    k = torch.arange(-r, r + 1, dtype=torch.float32)
    w1 = torch.exp(-(k[None, :] ** 2) / (2 * sigma_px[:, None] ** 2))
    w1 = w1 / w1.sum(1, keepdim=True)
    w2 = (w1[:, :, None] * w1[:, None, :])[:, None]  # (N,1,k,k)
    xp = F.pad(x.reshape(1, n, *x.shape[2:]), (r, r, r, r), mode="replicate")
    return F.conv2d(xp, w2, groups=n).reshape_as(x)


def thermal_sensor(s: SceneParams, rays: Rays, surf: Surfaces, cos_view: Tensor, g: torch.Generator) -> Tensor:
    """Radiometric thermal image (cK): per-surface temperature and emissivity (with a mild
    view-angle falloff), reflected ambient, optics blur, temporal and row/column noise.
    Nothing here reads the RGB colours or textures."""
    n, p = rays.dirs.shape[:2]
    size = math.isqrt(p)
    kind = surf.kind.reshape(n, p)
    temp = torch.stack([s.t_sky, s.t_ground, s.t_wall, s.t_obj], 1).gather(1, kind).reshape(-1)
    emis = torch.tensor([1.0, 0.93, 0.9, 0.0])[surf.kind]
    if surf.obj.numel():
        smp = object_samples(surf, p)
        pos = surf.hits.pos[surf.obj_sel]
        temp[surf.obj] = s.t_obj[smp] + 0.5 * s.t_grad[smp] * (pos * s.grad_axis[smp]).sum(1)
        emis[surf.obj] = s.emissivity[smp]
    emis = emis * (1.0 - 0.3 * (1.0 - cos_view) ** 3)
    t_refl = s.t_amb[:, None].expand(n, p).reshape(-1)
    t_app = _apparent_temperature(temp, emis, t_refl).reshape(n, 1, size, size)
    t_app = _gaussian_blur(t_app, s.ir_blur * size)
    noise = torch.randn(n, 1, size, size, generator=g) * _per_sample(s.ir_noise)
    rows = torch.randn(n, 1, size, 1, generator=g) * _per_sample(s.ir_fpn)
    cols = torch.randn(n, 1, 1, size, generator=g) * _per_sample(s.ir_fpn)
    ck = torch.round((t_app + noise + rows + cols) * 100.0).clamp(*THERMAL_RANGE_CK)
    return ck.to(torch.int32).reshape(n, size, size)
