"""Model architectures, described by a registry name plus keyword arguments.

Every model xkt trains, signs, ships or adapts is a :class:`SourceClassifier`: a
backbone, SHOT's 256-d bottleneck (Linear + BatchNorm1d) and a weight-normalised
linear classifier (Liang et al., ICML 2020, section 3).  ``bottleneck_dim=0`` leaves the
bottleneck out: that is how an imported ImageNet classifier (``xkt-server
import-weights``) keeps its plain linear head, written exactly as weight-normalised
(v = W, g = ‖W‖ per row).  An artifact never carries
code: its manifest names the architecture (``ArchSpec``) and the loader rebuilds the
module from this registry, so the set of buildable models is exactly what is here.

Backbones use torchvision's module names (``conv1``, ``layer1.0.bn2``,
``features.3.conv.1.0`` ...) so torchvision-format checkpoints load by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xkt.shared.errors import ConfigError


@dataclass(frozen=True)
class ArchSpec:
    """An architecture by registry name plus keyword arguments (JSON-serialisable)."""

    name: str
    num_classes: int
    bottleneck_dim: int = 256
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The spec as it appears in a manifest."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "bottleneck_dim": self.bottleneck_dim,
            "kwargs": dict(sorted(self.kwargs.items())),
        }

    @classmethod
    def from_json(cls, data: Any) -> ArchSpec:
        """Parse a manifest's ``architecture`` member, refusing anything malformed."""
        if not isinstance(data, dict) or set(data) != {"name", "num_classes", "bottleneck_dim", "kwargs"}:
            raise ConfigError(
                "architecture must be an object with name, num_classes, bottleneck_dim and kwargs",
                hint="re-export the model with `xkt-server train` or `xkt-server import-weights`",
                reason="bad-architecture",
            )
        ints_ok = all(
            isinstance(data[k], int) and not isinstance(data[k], bool) for k in ("num_classes", "bottleneck_dim")
        )
        if not isinstance(data["name"], str) or not ints_ok or not isinstance(data["kwargs"], dict):
            raise ConfigError(
                "architecture fields have the wrong types",
                hint="name is a string, num_classes and bottleneck_dim integers, kwargs an object",
                reason="bad-architecture",
            )
        return cls(data["name"], data["num_classes"], data["bottleneck_dim"], dict(data["kwargs"]))


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm, identity or 1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: torch.Tensor = self.relu(out + identity)
        return result


class ResNet(nn.Module):
    """A ResNet feature extractor (no fc) with torchvision's parameter names.

    ``stem="imagenet"`` is torchvision's 7x7/2 conv + 3x3/2 max-pool (loads ImageNet
    checkpoints).  ``stem="small"`` is a 3x3/1 conv + 3x3/2 max-pool for 64-px inputs:
    it keeps twice the spatial resolution of the ImageNet stem in ``layer1`` (32x32
    instead of 16x16), which small rendered objects need, at 4x the compute.
    """

    def __init__(self, blocks: tuple[int, ...], widths: tuple[int, ...], stem: str = "small") -> None:
        super().__init__()
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        elif stem == "small":
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        else:
            raise ConfigError(f"unknown ResNet stem {stem!r}", hint="use stem='small' or stem='imagenet'")
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = widths[0]
        for index, (count, width) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if index == 0 else 2
            layer = [BasicBlock(in_ch if i == 0 else width, width, stride if i == 0 else 1) for i in range(count)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*layer))
            in_ch = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_features = widths[-1]
        self.num_layers = len(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(self.num_layers):
            x = getattr(self, f"layer{index + 1}")(x)
        return torch.flatten(self.avgpool(x), 1)  # (B, C)


def resnet18(stem: str = "imagenet") -> ResNet:
    """ResNet-18 (He et al. 2016): 4 stages of 2 basic blocks, 512-d features.

    The default stem is torchvision's, so ImageNet checkpoints load; at 64 px it leaves a
    16x16 map for ``layer1``.  ``stem="small"`` keeps 32x32 there for small objects, at
    4x the compute (76 vs 350 training images/s on 2 cores, measured side by side).
    """
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), stem)


def resnet_tiny(stem: str = "small", width: int = 8) -> ResNet:
    """A four-stage, one-block-per-stage ResNet for tests (a few thousand weights)."""
    return ResNet((1, 1, 1, 1), (width, 2 * width, 4 * width, 8 * width), stem)


# ---------------------------------------------------------------------- MobileNetV2


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8 without going more than 10 % below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU(nn.Sequential):
    """Conv → BatchNorm → ReLU6, indexed 0/1/2 like torchvision's Conv2dNormActivation."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = (kernel - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_ch, hidden, kernel=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        return x + out if self.use_residual else out


# (expansion t, output channels c, repeats n, first stride s), Sandler et al. 2018, Table 2.
_MOBILENET_V2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor (no classifier) with torchvision's parameter names."""

    def __init__(self, width_mult: float = 1.0) -> None:
        super().__init__()
        in_ch = _make_divisible(32 * width_mult)
        last_ch = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU(3, in_ch, stride=2)]
        for t, c, n, s in _MOBILENET_V2_SETTINGS:
            out_ch = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(ConvBNReLU(in_ch, last_ch, kernel=1))
        self.features = nn.Sequential(*features)
        self.out_features = last_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)  # (B, 1280)


# ------------------------------------------------------------------- the SHOT head


class Bottleneck(nn.Module):
    """SHOT's feature bottleneck: Linear(feat → 256) then BatchNorm1d, no activation."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, dim)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.fc(x))
        return out


class WeightNormLinear(nn.Module):
    """Linear layer with weight normalisation: W_k = g_k · v_k / ‖v_k‖ (Salimans & Kingma 2016).

    SHOT freezes this classifier during adaptation, so the class directions (v) and
    their scales (g) the owner learned are exactly what every site keeps.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.empty(out_features, 1))
        self.bias = nn.Parameter(torch.zeros(out_features))
        if self.weight_v.device.type != "meta":
            nn.init.kaiming_uniform_(self.weight_v, a=5**0.5)
            with torch.no_grad():
                self.weight_g.copy_(self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return nn.functional.linear(x, weight, self.bias)


class SourceClassifier(nn.Module):
    """backbone → bottleneck (256-d, BN1d; none when ``bottleneck_dim`` is 0) → weight-normalised classifier."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, bottleneck_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.bottleneck: nn.Module = Bottleneck(feature_dim, bottleneck_dim) if bottleneck_dim else nn.Identity()
        self.classifier = WeightNormLinear(bottleneck_dim or feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck features z = B(F(x)), shape (N, bottleneck_dim); F(x) itself when there is no bottleneck."""
        features: torch.Tensor = self.bottleneck(self.backbone(x))
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.embed(x))  # (N, num_classes)
        return logits


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet_tiny": resnet_tiny,
    "resnet18": resnet18,
    "mobilenet_v2": MobileNetV2,
}


def build_model(spec: ArchSpec, device: str | torch.device = "cpu") -> SourceClassifier:
    """Build the classifier a spec describes; ``device="meta"`` allocates no storage.

    Unknown names and keyword arguments are refused here, so a manifest can never make
    the loader call anything but these constructors with their declared parameters.
    """
    builder = BACKBONES.get(spec.name)
    if builder is None:
        raise ConfigError(
            f"unknown architecture {spec.name!r}",
            hint=f"choose one of: {', '.join(sorted(BACKBONES))}",
            reason="unknown-architecture",
        )
    accepted = set(inspect.signature(builder).parameters)
    unknown = sorted(set(spec.kwargs) - accepted)
    if unknown:
        raise ConfigError(
            f"architecture {spec.name!r} has no parameter(s) {', '.join(unknown)}",
            hint=f"{spec.name} accepts: {', '.join(sorted(accepted)) or 'no parameters'}",
            reason="unknown-architecture-kwarg",
        )
    if spec.num_classes < 2 or spec.bottleneck_dim < 0:
        raise ConfigError(
            "num_classes must be >= 2 and bottleneck_dim >= 0", hint="fix the architecture spec (0: no bottleneck)"
        )
    with torch.device(device):
        backbone = builder(**spec.kwargs)
        feature_dim = int(backbone.out_features)  # type: ignore[arg-type]  # every registered backbone sets it
        return SourceClassifier(backbone, feature_dim, spec.num_classes, spec.bottleneck_dim)


def resolve_arch(name: str, kwargs: dict[str, Any], num_classes: int, bottleneck_dim: int = 256) -> ArchSpec:
    """An ArchSpec with every backbone default written out.

    Manifests record the resolved keyword arguments, so a later change of a default in
    this file can never silently change how an existing artifact is rebuilt.
    """
    builder = BACKBONES.get(name)
    if builder is None:
        raise ConfigError(f"unknown architecture {name!r}", hint=f"choose one of: {', '.join(sorted(BACKBONES))}")
    defaults = {
        p.name: p.default
        for p in inspect.signature(builder).parameters.values()
        if p.default is not inspect.Parameter.empty
    }
    spec = ArchSpec(name, num_classes, bottleneck_dim, {**defaults, **kwargs})
    build_model(spec, device="meta")  # refuses unknown kwargs now, not at load time
    return spec


def expected_state(spec: ArchSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of every tensor in the model's state dict, without allocating any."""
    model = build_model(spec, device="meta")
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}


@dataclass(frozen=True)
class BatchNormStats:
    """One BatchNorm layer's running statistics (what SOCKET's L_BN matches against)."""

    name: str
    running_mean: torch.Tensor
    running_var: torch.Tensor
    momentum: float
    eps: float


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Every BatchNorm layer (1d and 2d) in forward-definition order, with its name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def batchnorm_statistics(model: nn.Module) -> list[BatchNormStats]:
    """Detached copies of every BatchNorm layer's running mean and variance."""
    stats = []
    for name, layer in batchnorm_layers(model):
        assert layer.running_mean is not None and layer.running_var is not None, "BN built without running stats"
        stats.append(
            BatchNormStats(
                name=name,
                running_mean=layer.running_mean.detach().clone(),
                running_var=layer.running_var.detach().clone(),
                momentum=float(layer.momentum if layer.momentum is not None else 0.0),
                eps=float(layer.eps),
            )
        )
    return stats
