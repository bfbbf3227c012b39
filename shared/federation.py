"""What a federated round exchanges, and how the server averages it (FedAvg with FedBN).

Several sites adapt one shared target model.  Each round a site receives the global
shared arrays, trains, and returns its shared arrays (or, with differential privacy, a
clipped and noised update); the server averages them weighted by example counts.

Which tensors travel is explicit (:func:`shared_names`), because the transport cannot be
trusted to treat them right: Flower ships numpy arrays, its SecAgg+ hands back float64
and would corrupt an int64 ``num_batches_tracked``, and its DP wrappers noise every
array they see, which can turn a BatchNorm ``running_var`` negative.  So only
floating-point parameters and buffers travel, and every BatchNorm layer's running
statistics stay at the site: each modality keeps the normalisation of its own data
(FedBN, Li et al., ICLR 2021).  Nothing here imports Flower; these are pure functions
of state dicts and arrays, so the same code serves the site, the server and the tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from xkt.shared.errors import ConfigError, VerificationError
from xkt.shared.models import batchnorm_layers

AnyArray = NDArray[Any]
"""Any numpy array: what a peer may send, before it is checked."""

Arrays = dict[str, NDArray[np.float32]]
"""Named float32 arrays: what crosses the wire in one direction of one round."""

Layout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
"""Name → (shape, dtype) of every shared tensor: what a received update must match."""

_BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
_BN_AFFINE = ("weight", "bias")
_DISCARD_HINT = "the sender's model or shared-name partition differs from this one; discard this update"


# ------------------------------------------------------------------ the partition


def shared_names(model: nn.Module, *, keep_bn_affine_local: bool = False) -> list[str]:
    """State-dict names that travel each round, in state-dict order.

    Floating-point parameters and buffers travel; BatchNorm running statistics and
    every integer tensor stay local.  ``keep_bn_affine_local=True`` also keeps each BN
    layer's weight and bias local (full FedBN: the whole normalisation is per-site).
    """
    local_suffixes = _BN_STATISTICS + (_BN_AFFINE if keep_bn_affine_local else ())
    local = {_join(layer, suffix) for layer, _ in batchnorm_layers(model) for suffix in local_suffixes}
    return [
        name for name, tensor in model.state_dict().items() if name not in local and torch.is_floating_point(tensor)
    ]


def shared_layout(
    state: Mapping[str, torch.Tensor], names: Iterable[str]
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of the shared tensors: the ``expected`` argument of :func:`merge_state`."""
    return {name: (tuple(state[name].shape), state[name].dtype) for name in names}


def split_state(state: Mapping[str, torch.Tensor], names: Iterable[str]) -> tuple[Arrays, dict[str, torch.Tensor]]:
    """Split a state dict into (shared float32 numpy copies, local tensor copies).

    Copies, so neither half aliases the live model: training on after the split cannot
    change what was already handed to the transport or kept for the next round.
    """
    wanted = list(names)
    for name in wanted:
        if name not in state or not torch.is_floating_point(state[name]):
            raise ConfigError(
                f"shared name {name!r} is not a floating-point tensor of this model's state dict",
                hint="compute the names with shared_names() on this very model",
                reason="bad-shared-names",
            )
    chosen = set(wanted)
    shared = {name: state[name].detach().to("cpu", torch.float32).numpy().copy() for name in wanted}
    local = {name: tensor.detach().clone() for name, tensor in state.items() if name not in chosen}
    return shared, local


def merge_state(
    local_state: Mapping[str, torch.Tensor], shared_arrays: Mapping[str, AnyArray], expected: Layout
) -> dict[str, torch.Tensor]:
    """The full state dict: this site's local tensors plus received shared arrays, checked.

    Every expected name must arrive exactly once with its expected shape, a floating
    dtype and only finite values; each is cast back to its tensor's dtype (float64 from
    SecAgg+ becomes float32 again).  Raises :class:`VerificationError` naming the first
    bad array, with reason ``bad-update`` or ``non-finite-update``.
    """
    _check_names(shared_arrays, list(expected), where="the received update")
    overlap = next((name for name in expected if name in local_state), None)
    if overlap is not None:
        raise ConfigError(
            f"{overlap!r} is both a local tensor and a shared array",
            hint="split the state with split_state() and the same shared names",
            reason="bad-shared-names",
        )
    merged = {name: tensor.detach().clone() for name, tensor in local_state.items()}
    for name, (shape, dtype) in expected.items():
        array = _checked_array(name, shared_arrays[name], shape, where="the received update")
        merged[name] = torch.from_numpy(np.array(array, copy=True)).to(dtype)
    return merged


def update_bytes(arrays: Mapping[str, AnyArray]) -> int:
    """Bytes an upload of ``arrays`` carries (Σ nbytes), for the site's ``max_upload_bytes`` rule."""
    return sum(int(array.nbytes) for array in arrays.values())


# ------------------------------------------------------------------ aggregation


def weighted_average(updates: Sequence[tuple[Mapping[str, AnyArray], float]]) -> Arrays:
    """FedAvg: x̄ = Σ_i w_i x_i / Σ_i w_i for each array name, with w_i ≥ 0 and Σ_i w_i > 0.

    ``w_i`` is normally site i's example count.  Accumulates in float64 (a large site
    count in float32 loses digits) and returns float32.  Every update must hold the
    same names with the same shapes as the first and only finite values; a negative
    or non-finite weight is refused, since it would let one site push the average
    outside the hull of what the sites sent.
    """
    if not updates:
        raise VerificationError(
            "no updates to aggregate",
            hint="no site returned an update this round; check the sites' logs and the minimum number of fit clients",
            reason="no-updates",
        )
    weights = [float(weight) for _, weight in updates]
    bad = next((i for i, w in enumerate(weights) if not (math.isfinite(w) and w >= 0)), None)
    if bad is not None or sum(weights) <= 0:
        which = f"update {bad} has weight {weights[bad]}" if bad is not None else f"the weights sum to {sum(weights)}"
        raise VerificationError(
            f"cannot average: {which}",
            hint="each weight is a site's example count: finite, >= 0, and at least one > 0",
            reason="bad-weight",
        )
    reference = {name: np.shape(array) for name, array in updates[0][0].items()}
    sums = {name: np.zeros(shape, dtype=np.float64) for name, shape in reference.items()}
    for index, ((arrays, _), weight) in enumerate(zip(updates, weights, strict=True)):
        where = f"update {index}"
        _check_names(arrays, list(reference), where=where)
        for name, shape in reference.items():
            sums[name] += weight * _checked_array(name, arrays[name], shape, where=where).astype(np.float64)
    total = math.fsum(weights)
    return {name: (value / total).astype(np.float32) for name, value in sums.items()}


# ------------------------------------------------------------------ differential privacy


def clip_update(delta: Mapping[str, AnyArray], max_norm: float) -> tuple[Arrays, float]:
    """Scale the whole update by min(1, C / ‖Δ‖₂); return (clipped, ‖Δ‖₂).

    ‖Δ‖₂ = √(Σ_arrays Σ_elements Δ²) is the global L2 norm over every array, so the
    clipped update lies in the ball of radius C: that bound is the sensitivity the
    Gaussian noise of :func:`gaussian_noise` is calibrated to.  Δ = [3, 4], C = 1 gives
    [0.6, 0.8] and norm 5; an update already inside the ball is returned unchanged.
    """
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ConfigError(
            f"the DP clipping norm must be a finite number > 0, got {max_norm}",
            hint="set the clipping norm C to a positive value (for example 1.0)",
            reason="bad-dp-setting",
        )
    arrays = {
        name: _finite(name, array, where="the update to upload").astype(np.float64) for name, array in delta.items()
    }
    norm = math.sqrt(math.fsum(float(np.sum(a * a)) for a in arrays.values()))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {name: (a * scale).astype(np.float32) for name, a in arrays.items()}, norm


def gaussian_noise(delta: Mapping[str, AnyArray], std: float, generator: np.random.Generator) -> Arrays:
    """Δ + N(0, σ² I): independent Gaussian noise of standard deviation σ = ``std`` on every element.

    The generator is an argument, never module state; outside tests it must be seeded
    from the operating system (``np.random.default_rng()``), since anyone who can
    replay the noise can subtract it.
    """
    if not (math.isfinite(std) and std >= 0):
        raise ConfigError(
            f"the DP noise standard deviation must be a finite number >= 0, got {std}",
            hint="set the noise multiplier to a value >= 0",
            reason="bad-dp-setting",
        )
    return {
        name: (np.asarray(array, dtype=np.float64) + std * generator.standard_normal(np.shape(array))).astype(
            np.float32
        )
        for name, array in delta.items()
    }


def privatise_update(
    delta: Mapping[str, AnyArray], clip_norm: float, noise_multiplier: float, rng: np.random.Generator
) -> Arrays:
    """The update a site uploads under DP: clip(Δ, C) + N(0, (z·C)² I), C = ``clip_norm``, z = ``noise_multiplier``.

    ``delta`` is the site's update (new − global) over the shared names only.
    BatchNorm running statistics are never noised because they never travel
    (:func:`shared_names`), so a site's normalisation is not damaged by the noise.

    What this guarantees, and what it does not:

    * Per round, the upload is the Gaussian mechanism applied to a vector of L2 norm at
      most C, computed by the site itself (local, site-level DP: the server never sees
      the un-noised update).  With sensitivity C (add/remove the site's whole data) one
      round is (ε, δ)-DP for ε < 1 when z ≥ √(2 ln(1.25/δ)) / ε (Dwork & Roth 2014,
      Thm. A.1).  Under replace-the-data adjacency the sensitivity is 2C, which doubles
      the z needed for the same ε.
    * There is no privacy accountant here: the loss over R rounds composes (roughly
      √R-fold with an RDP accountant, R-fold naively) and must be tracked by the caller.
    * Only the update is covered.  The example count used as the FedAvg weight, any
      metric the site releases, and the choice to take part at all are not noised.
    * numpy's sampler is not a hardened DP sampler (floating-point attacks on noise
      generation exist; Mironov 2012); treat the guarantee as for an honest implementation.

    Averaging n equally weighted sites divides the noise std by √n relative to the
    clipped signal, which is why local DP needs many sites or a small z to stay useful.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError(
            f"the DP noise multiplier must be a finite number >= 0, got {noise_multiplier}",
            hint="set the noise multiplier z to a value >= 0 (0 disables the noise)",
            reason="bad-dp-setting",
        )
    clipped, _norm = clip_update(delta, clip_norm)
    return gaussian_noise(clipped, noise_multiplier * clip_norm, rng)


# ------------------------------------------------------------------ checks


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_names(arrays: Mapping[str, object], expected: Sequence[str], *, where: str) -> None:
    """Refuse a missing or an extra array, naming the first one."""
    wanted = set(expected)
    missing = next((name for name in expected if name not in arrays), None)
    if missing is not None:
        raise VerificationError(f"{where} lacks the array {missing!r}", hint=_DISCARD_HINT, reason="bad-update")
    extra = next((name for name in sorted(arrays) if name not in wanted), None)
    if extra is not None:
        raise VerificationError(f"{where} has the unexpected array {extra!r}", hint=_DISCARD_HINT, reason="bad-update")


def _checked_array(name: str, array: object, shape: tuple[int, ...], *, where: str) -> AnyArray:
    """The array itself if it is a floating numpy array of ``shape`` with finite values."""
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
        kind = f"dtype {array.dtype}" if isinstance(array, np.ndarray) else type(array).__name__
        raise VerificationError(
            f"{where}: array {name!r} is {kind}, not a floating-point numpy array",
            hint=_DISCARD_HINT,
            reason="bad-update",
        )
    if tuple(array.shape) != tuple(shape):
        raise VerificationError(
            f"{where}: array {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}",
            hint=_DISCARD_HINT,
            reason="bad-update",
        )
    return _finite(name, array, where=where)


def _finite(name: str, array: AnyArray, *, where: str) -> AnyArray:
    if not np.all(np.isfinite(array)):
        raise VerificationError(
            f"{where}: array {name!r} holds non-finite values (nan or inf)",
            hint="the training that produced it diverged; discard it (and lower the learning rate at that site)",
            reason="non-finite-update",
        )
    return array
