"""What the BatchNorm layers see: batch statistics of their inputs, for SOCKET's L_BN (methods.md §2.3).

SOCKET matches, at every BatchNorm2d of the backbone, the per-channel mean and biased
variance of the layer's *input* on a target batch against the running statistics the
source model shipped.  Three pieces serve that:

* :class:`BatchNormCapture`, a context manager whose forward pre-hooks record
  (μ_l, σ²_l) of each BatchNorm2d input with the autograd graph attached, so L_BN
  backpropagates into the convolutions that produce those inputs;
* :func:`source_batchnorm_reference`, the source running statistics snapshotted before
  adaptation, in the same layer order, and :func:`stem_weighted`, SOCKET's m_l;
* :func:`batchnorm_distance_to_source`, a label-free monitoring signal that never
  changes the model's running statistics.

Layer order is always ``named_modules`` order (definition order), not execution order:
in a ResNet block the shortcut's BatchNorm runs before ``bn1`` although it is defined
after it, so the capture files each record under its layer's position.  Only
BatchNorm2d layers count (SOCKET's "every BN2d in the backbone"); the bottleneck's
BatchNorm1d is left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import TracebackType

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from xkt.client.methods.losses import batchnorm_statistics_distance

#: One layer's statistics: (mean (C,), variance (C,)).
Stats = tuple[torch.Tensor, torch.Tensor]


def batchnorm2d_layers(module: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """Every BatchNorm2d in ``module``, with its name, in ``named_modules`` order."""
    return [(name, layer) for name, layer in module.named_modules() if isinstance(layer, nn.BatchNorm2d)]


def input_statistics(inputs: torch.Tensor) -> Stats:
    """Per-channel mean and biased variance of a (N, C, H, W) tensor over (N, H, W), graph kept."""
    mean = inputs.mean(dim=(0, 2, 3))  # (C,)
    variance = inputs.var(dim=(0, 2, 3), unbiased=False)  # (C,), biased, as BatchNorm normalises with
    return mean, variance


class BatchNormCapture:
    """Records the input statistics of every BatchNorm2d of ``module`` while the ``with`` block is open.

    Usage::

        with BatchNormCapture(model.backbone) as capture:
            logits = model(target_images)      # train mode: BN normalises with these very statistics
            batch_stats = capture.take()       # [(μ_l, σ²_l)], named_modules order, graph attached
        loss = batchnorm_statistics_distance(batch_stats, reference, stem_weighted(len(reference)))

    A record is taken on every forward pass, whatever the module's mode (the input
    statistics are defined either way; in eval mode the layers downstream see inputs
    normalised by running statistics instead).  Each layer may be recorded once
    between two :meth:`take` (or :meth:`clear`) calls: a second forward, e.g. of the TI
    batch, inside the block raises instead of silently replacing the TR batch's
    statistics; run it outside the block or call :meth:`take` first.  The hooks only
    read their input, and BatchNorm saves that same tensor for its own backward, so
    any later in-place change to it would already break BatchNorm's backward.
    """

    def __init__(self, module: nn.Module) -> None:
        self.layers = batchnorm2d_layers(module)
        if not self.layers:
            raise ValueError("the module has no BatchNorm2d layer to capture")
        self._records: dict[int, Stats] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def layer_names(self) -> list[str]:
        """Names of the captured layers, in the order :meth:`take` returns them."""
        return [name for name, _ in self.layers]

    def __enter__(self) -> BatchNormCapture:
        if self._handles:
            raise RuntimeError("this BatchNormCapture is already active")
        self._records.clear()
        for position, (_, layer) in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._hook(position)))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, position: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(layer: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if position in self._records:
                raise RuntimeError(
                    f"BatchNorm layer {self.layers[position][0]!r} ran twice without take(); "
                    "capture one forward pass at a time"
                )
            self._records[position] = input_statistics(args[0])

        return record

    def take(self) -> list[Stats]:
        """The recorded (mean, variance) of every layer in ``named_modules`` order, then forget them."""
        missing = [name for position, (name, _) in enumerate(self.layers) if position not in self._records]
        if missing:
            raise RuntimeError(f"no forward pass reached BatchNorm layer(s) {', '.join(missing)}")
        records = [self._records[position] for position in range(len(self.layers))]
        self._records.clear()
        return records

    def clear(self) -> None:
        """Forget whatever was recorded since the last :meth:`take`."""
        self._records.clear()


def source_batchnorm_reference(model: nn.Module) -> list[Stats]:
    """Detached copies of every BatchNorm2d's (running_mean, running_var), in ``named_modules`` order.

    Take it from the source model before adaptation starts: in train mode the running
    statistics drift toward the target modality (methods.md §2.5).  SOCKET compares
    the biased batch variance with this unbiased running average; the difference is a
    factor (n−1)/n with n = N·H·W, negligible (methods.md §2.7).
    """
    reference = []
    for name, layer in batchnorm2d_layers(model):
        if layer.running_mean is None or layer.running_var is None:
            raise ValueError(f"BatchNorm layer {name!r} keeps no running statistics")
        reference.append((layer.running_mean.detach().clone(), layer.running_var.detach().clone()))
    return reference


def stem_weighted(count: int, stem_weight: float = 10.0) -> list[float]:
    """SOCKET's layer weights m_l: ``stem_weight`` for the first (stem) BatchNorm, 1 for the other ``count − 1``.

    methods.md §2.3: m_1 = 10, m_l = 1 otherwise; no gate (the code's sigmoid gate
    shrinks the term to nothing, §2.7).
    """
    if count < 1:
        raise ValueError("there must be at least one BatchNorm layer")
    return [stem_weight] + [1.0] * (count - 1)


@torch.no_grad()
def batchnorm_distance_to_source(
    model: nn.Module,
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    reference: list[Stats],
) -> float:
    """Label-free monitor: mean over batches of the unweighted L_BN between the model's batch statistics and ``reference``.

    ``batches`` yields image tensors (B, 3, H, W) or (images, indices) pairs, so an
    epoch's ``TargetBatches`` can be passed as is.  The model runs in train mode, so
    every layer sees inputs normalised with batch statistics exactly as in training,
    whatever mode the caller left it in.  Train-mode forwards update the running
    statistics of every BatchNorm layer (1d included); those and ``num_batches_tracked``
    are restored afterwards, with the caller's mode, so monitoring never changes the
    model.  Batch size should be ≥ 2 (BatchNorm1d refuses one-sample batches in train mode).
    """
    layers = [layer for _, layer in model.named_modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)]
    saved = [{name: buffer.clone() for name, buffer in layer.named_buffers(recurse=False)} for layer in layers]
    was_training = model.training
    distances = []
    try:
        model.train()
        with BatchNormCapture(model) as capture:
            for batch in batches:
                images = batch[0] if isinstance(batch, tuple | list) else batch
                model(images)
                stats = capture.take()
                distances.append(float(batchnorm_statistics_distance(stats, reference, [1.0] * len(stats))))
    finally:
        for layer, buffers in zip(layers, saved, strict=True):
            for name, value in buffers.items():
                getattr(layer, name).copy_(value)
        model.train(was_training)
    if not distances:
        raise ValueError("no batches to measure")
    return sum(distances) / len(distances)
