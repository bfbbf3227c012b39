"""``source-only``: no adaptation, the baseline every method must beat (SHOT Table 2, "source only").

The trainer returns a copy of the source model unchanged and records that nothing was
trained, so comparisons and the negative-transfer guard use the same code path.
"""

from __future__ import annotations

import torch

from xkt.client.methods.base import Batch, Method, register
from xkt.shared.models import SourceClassifier


@register("source-only")
class SourceOnly(Method):
    """The source model as shipped: no trainable groups, no loss terms."""

    trains = False

    def losses(self, model: SourceClassifier, batch: Batch) -> dict[str, torch.Tensor]:
        """No terms: source-only never trains."""
        return {}
