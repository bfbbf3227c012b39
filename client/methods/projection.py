"""CMCD's projection head and SEED's queue of source embeddings (Lin et al. 2024; methods.md §4.2).

CMC and CMD compare L2-normalised embeddings of the two modalities.  The target
encoder's bottleneck features go through a small trainable :class:`ProjectionHead`;
CMD (the SEED variant) also needs a queue of earlier source embeddings as negatives,
kept by :class:`EmbeddingQueue`.
"""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """MLP D → H → d_out with BatchNorm1d + ReLU between, output rows L2-normalised.

    Shapes: (N, D) → (N, d_out), every row of unit length.  ``hidden_dim`` defaults to
    ``in_dim`` (D → D → d_out, the SimCLR/SEED layout); ``out_dim`` defaults to 128.
    BatchNorm1d needs N ≥ 2 in train mode.
    """

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int = 128) -> None:
        super().__init__()
        hidden = in_dim if hidden_dim is None else hidden_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.mlp(features), dim=1)  # (N, d_out), unit rows


class EmbeddingQueue:
    """A first-in-first-out ring buffer of at most ``size`` L2-normalised source embeddings of dimension ``dim``.

    :meth:`push` stores a batch detached (and L2-normalised, which changes nothing
    for embeddings that already are), overwriting the oldest rows once full; a batch
    larger than the queue keeps only its last ``size`` rows.  :meth:`tensor` returns a
    new (len, dim) tensor, oldest row first, so a later push never modifies a tensor a
    loss has already used (autograd would refuse an in-place change to it).  No
    randomness: the contents depend only on the pushes.  As in SEED, push the source
    embeddings *after* computing the step's loss, so a sample never meets itself twice.
    """

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if size < 1 or dim < 1:
            raise ValueError("queue size and dimension must be positive")
        self.size = size
        self._buffer = torch.zeros(size, dim, device=device, dtype=dtype)
        self._next = 0  # row the next push writes first
        self._count = 0  # rows filled so far, ≤ size

    def __len__(self) -> int:
        return self._count

    def push(self, embeddings: torch.Tensor) -> None:
        """Append a (B, dim) batch, detached and L2-normalised, dropping the oldest rows beyond ``size``."""
        rows = nn.functional.normalize(embeddings.detach(), dim=1)[-self.size :].to(self._buffer)
        positions = (self._next + torch.arange(len(rows))) % self.size
        self._buffer[positions.to(self._buffer.device)] = rows
        self._next = (self._next + len(rows)) % self.size
        self._count = min(self._count + len(rows), self.size)

    def tensor(self) -> torch.Tensor:
        """The stored embeddings (len, dim), oldest first, as a new tensor."""
        start = self._next - self._count  # negative once wrapped: the oldest row sits at _next
        order = (start + torch.arange(self._count)) % self.size
        return self._buffer[order.to(self._buffer.device)]
