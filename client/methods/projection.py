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


class EmbeddingQueue(nn.Module):
    """SEED's first-in-first-out queue of at most ``size`` L2-normalised source embeddings.

    :meth:`push` stores a batch detached and L2-normalised, dropping the oldest rows
    beyond ``size`` (a batch larger than the queue keeps its last ``size`` rows);
    :meth:`tensor` returns a new (len, dim) tensor, oldest first, so a later push never
    changes a tensor a loss has used.  The rows and the fill count are registered
    buffers: they travel in ``state_dict``, which is all the trainer saves and restores
    of a method's modules, so a resumed run continues with the same queue.  As in SEED,
    push the source embeddings *after* the step's loss, so a sample never meets itself.
    """

    rows: torch.Tensor
    count: torch.Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError("queue size and dimension must be positive")
        self.size = size
        self.register_buffer("rows", torch.zeros(size, dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def __len__(self) -> int:
        return int(self.count)

    def push(self, embeddings: torch.Tensor) -> None:
        """Append a (B, dim) batch, detached and L2-normalised, dropping the oldest rows beyond ``size``."""
        new = nn.functional.normalize(embeddings.detach(), dim=1).to(self.rows)
        kept = torch.cat([self.rows[: len(self)], new])[-self.size :]  # (≤ size, dim), oldest first
        self.rows[: len(kept)] = kept
        self.count.fill_(len(kept))

    def tensor(self) -> torch.Tensor:
        """The stored embeddings (len, dim), oldest first, as a new tensor (later pushes never change it)."""
        return self.rows[: len(self)].clone()
