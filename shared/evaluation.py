"""Accuracy of a classifier on a labelled image set, overall and per class.

Used by the owner (validation during source training) and by sites (``xkt-client
evaluate`` on ``eval/labels.csv``); labels are only ever read to measure, never to train.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from xkt.shared.data import ImageDataset


@dataclass(frozen=True)
class Accuracy:
    """Overall and per-class accuracy, with counts, as fractions in [0, 1]."""

    accuracy: float
    count: int
    per_class: dict[str, float]
    per_class_count: dict[str, int]

    def to_json(self) -> dict[str, object]:
        """The result as plain data for ``--json`` output and run reports."""
        return {
            "accuracy": self.accuracy,
            "count": self.count,
            "per_class": self.per_class,
            "per_class_count": self.per_class_count,
        }


@torch.inference_mode()
def predict(model: nn.Module, dataset: ImageDataset, batch_size: int = 256) -> torch.Tensor:
    """Predicted class index of every image, in dataset order (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    predictions = [model(images).argmax(dim=1) for images, _ in loader]
    model.train(was_training)
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, dataset: ImageDataset, names: Sequence[str], batch_size: int = 256) -> Accuracy:
    """Accuracy of ``model`` on a labelled dataset whose labels index ``names``."""
    labels = torch.tensor(dataset.labels, dtype=torch.long)
    return score(predict(model, dataset, batch_size), labels, names)


def score(predictions: torch.Tensor, labels: torch.Tensor, names: Sequence[str]) -> Accuracy:
    """Compare predictions with labels; classes absent from ``labels`` are left out of per_class."""
    correct = predictions == labels
    per_class: dict[str, float] = {}
    per_class_count: dict[str, int] = {}
    for index, name in enumerate(names):
        members = labels == index
        count = int(members.sum())
        if count:
            per_class[name] = float(correct[members].float().mean())
            per_class_count[name] = count
    overall = float(correct.float().mean()) if len(labels) else 0.0
    return Accuracy(overall, len(labels), per_class, per_class_count)
