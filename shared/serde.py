"""Domain objects ⇄ wire messages for ``xkt.v1.SourceModel``: pure functions, no I/O.

The servicer and the client both go through here, so a field is converted in exactly
one place.  ``*_from_proto`` treats its input as untrusted (it came off the network) and
raises :class:`VerificationError` on anything malformed instead of building tensors of
the wrong shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from xkt.protos import source_model_pb2 as pb
from xkt.shared.errors import VerificationError
from xkt.shared.manifest import Manifest, short
from xkt.shared.models import BatchNormStats

__all__ = ["batchnorm_stats_from_proto", "batchnorm_stats_to_proto", "manifest_to_proto"]


def manifest_to_proto(manifest: Manifest, signature: bytes, chunk_size: int) -> pb.Manifest:
    """The signed manifest as sent: canonical bytes (what the signature covers) plus digest and size."""
    return pb.Manifest(
        manifest_json=manifest.to_bytes(),
        signature=signature,
        weights_sha256=manifest.weights.sha256,
        weights_size=manifest.weights.size,
        chunk_size=chunk_size,
    )


def batchnorm_stats_to_proto(stats: Sequence[BatchNormStats], weights_sha256: str = "") -> pb.BatchNormStats:
    """Every layer's running statistics as float32 lists, in the model's layer order."""
    layers = [
        pb.BatchNormLayer(
            name=layer.name,
            running_mean=layer.running_mean.detach().to(torch.float32).flatten().tolist(),
            running_var=layer.running_var.detach().to(torch.float32).flatten().tolist(),
            momentum=layer.momentum,
            eps=layer.eps,
        )
        for layer in stats
    ]
    return pb.BatchNormStats(weights_sha256=weights_sha256, layers=layers)


def batchnorm_stats_from_proto(msg: pb.BatchNormStats) -> list[BatchNormStats]:
    """Parse statistics from the wire; refuse duplicate names, ragged or non-finite values."""
    seen: set[str] = set()
    out = []
    for index, layer in enumerate(msg.layers):
        where = f"batch-norm layer {index}"
        if not layer.name or layer.name in seen:
            raise _bad_stats(f"{where} has an empty or repeated name")
        seen.add(layer.name)
        where = f"{where} ({short(repr(layer.name), 80)})"  # the peer chose the name: escaped, one line, bounded
        mean = torch.tensor(list(layer.running_mean), dtype=torch.float32)
        var = torch.tensor(list(layer.running_var), dtype=torch.float32)
        if mean.numel() == 0 or mean.shape != var.shape:
            raise _bad_stats(f"{where} has {mean.numel()} means but {var.numel()} variances")
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all()):
            raise _bad_stats(f"{where} has non-finite values or negative variances")
        if not (math.isfinite(layer.momentum) and math.isfinite(layer.eps) and layer.eps > 0):
            raise _bad_stats(f"{where} has an invalid momentum or eps")
        out.append(BatchNormStats(layer.name, mean, var, float(layer.momentum), float(layer.eps)))
    return out


def _bad_stats(message: str) -> VerificationError:
    return VerificationError(
        f"the server's batch-norm statistics are malformed: {message}",
        hint="the server is not a compatible xkt server or the response was altered; fetch again or ask the owner",
        reason="bad-batchnorm-stats",
    )
