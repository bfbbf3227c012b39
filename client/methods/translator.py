"""TGMB's modality translator and its critic (Zhu, Chen, Wang 2024; methods.md §3.2).

The translator T maps a one-channel target-modality image (depth, NIR) to a
three-channel "source-like RGB" image, so the frozen source model can be applied to
target data.  The reviewers describe it as "an FC layer, a BN layer, and a Conv layer";
read per pixel ([INFER] in methods.md), that is a 1×1 convolution lifting 1 → C
channels (a fully connected layer applied at every pixel), BatchNorm2d, ReLU and a
3×3 convolution C → 3.  Its output lives in the source model's normalised input space.

The critic :class:`ModalityDiscriminator` serves TGMB's adversarial term L_D, which
targets the intra-modality gap between TI and TR target images: it tells translations
of TI target images ("real": L_rec ties them to paired RGB) from translations of TR
target images ("fake"), and the translator learns to fool it (see
``losses.discriminator_loss`` and ``losses.generator_adversarial_loss``).

Both modules draw their initial weights from torch's default generator, so the
caller's ``torch.manual_seed`` fixes them; neither keeps global state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Translator(nn.Module):
    """T: target-modality batch (B, 3, H, W) as the site loader makes it → source-like RGB (B, 3, H, W).

    Input.  The site loader maps the sensor to [0, 1], repeats the single channel three
    times and normalises each copy with the *source model's* per-channel mean and std
    (``xkt.shared.data.normalise``), so the three input channels differ although they
    carry one value.  ``forward`` undoes that normalisation with the ``mean`` and
    ``std`` given here (x_c · std_c + mean_c) and averages the three channels.  For a
    replicated one-channel image every channel gives back the same [0, 1] value, so the
    average is exact and merely robust to rounding; for a genuinely three-channel
    target it is the plain channel mean (a grey image).  Using the [0, 1] value rather
    than normalised channel 0 keeps T independent of which normalisation the source
    happened to use.

    Output.  Unconstrained values in the source model's normalised input space, the
    space L_rec compares with the normalised paired RGB image.
    """

    mean: torch.Tensor  # (1, 3, 1, 1), non-persistent buffers
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels: int = 32) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError("mean and std need three values each, std positive")
        # Constants of the input pipeline, not learned and not saved: they come with the source model.
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.lift = nn.Conv2d(1, channels, kernel_size=1)  # the per-pixel "FC layer", 1 → C
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.out = nn.Conv2d(channels, 3, kernel_size=3, padding=1)  # C → 3, same spatial size

    def unit_image(self, images: torch.Tensor) -> torch.Tensor:
        """The single [0, 1] channel behind a normalised, replicated batch: (B, 3, H, W) → (B, 1, H, W)."""
        unit: torch.Tensor = (images * self.std + self.mean).mean(dim=1, keepdim=True)
        return unit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.relu(self.bn(self.lift(self.unit_image(images))))  # (B, C, H, W)
        translated: torch.Tensor = self.out(hidden)  # (B, 3, H, W)
        return translated


class ModalityDiscriminator(nn.Module):
    """Critic for TGMB's L_D: (B, 3, H, W) translated images → (B,) logits, high for "TI translation".

    Three stride-2 3×3 convolutions (3 → w → 2w → 4w) with LeakyReLU(0.2), global
    average pooling and a linear layer to one logit.  No BatchNorm, so the logit of an
    image never depends on the rest of its batch (real and fake batches are scored
    separately).  3×3 kernels with padding 1 accept any input size down to 1×1.
    """

    def __init__(self, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(images))  # (B, 1)
        return logits.squeeze(1)
