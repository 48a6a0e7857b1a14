"""MobileNetV2 for small images.

Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018, Table 2, adapted to 32x32 inputs as is usual for CIFAR: the stem convolution and the
first stride-2 bottleneck stage use stride 1, so the network downsamples 8x instead of 32x.
"""

from __future__ import annotations

import torch
from torch import nn

from autoprune.models._init import kaiming_init

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenet_v2"]

# (expansion t, output channels c, repeats n, stride s of the first repeat), Sandler et al., Table 2,
# with the second row's stride 2 -> 1 for small images.
CIFAR_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Bottleneck of Sandler et al. (CVPR 2018), Table 1: 1x1 expand, 3x3 depthwise, linear 1x1 project.

    ``conv1``/``bn1`` (expansion) are absent when ``expansion == 1``; ``conv2`` is always the
    depthwise convolution and ``conv3`` the projection. The residual connection exists only when the
    block keeps both resolution and channel count, as in the paper.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_planes * expansion
        self.use_residual = stride == 1 and in_planes == out_planes
        self.conv1: nn.Conv2d | None = None
        self.bn1: nn.BatchNorm2d | None = None
        if expansion != 1:
            self.conv1 = nn.Conv2d(in_planes, hidden, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.conv1 is not None and self.bn1 is not None:
            out = self.relu(self.bn1(self.conv1(out)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))  # linear bottleneck: no activation after the projection
        return out + x if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images (Sandler et al., CVPR 2018) with a stride-1 stem.

    Args:
        num_classes: size of the output.
        in_channels: channels of the input images.
        width_mult: the paper's width multiplier, applied to every layer (widths rounded to
            multiples of 8) except that the last 1x1 convolution never drops below 1280 channels.

    Spatial downsampling is 8x (three stride-2 stages), so 32x32 inputs end at 4x4 and 8x8 inputs
    at 1x1; adaptive average pooling feeds the classifier.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> None:
        super().__init__()
        stem = _make_divisible(32 * width_mult)
        last = 1280 if width_mult <= 1.0 else _make_divisible(1280 * width_mult)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU6(inplace=True)
        blocks: list[nn.Module] = []
        in_planes = stem
        for expansion, channels, repeats, stride in CIFAR_SETTING:
            out_planes = _make_divisible(channels * width_mult)
            for i in range(repeats):
                blocks.append(InvertedResidual(in_planes, out_planes, stride if i == 0 else 1, expansion))
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(in_planes, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = self.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round to a multiple of ``divisor`` without going below 90 % of ``value`` (as in the paper's code)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2 for small images (Sandler et al., CVPR 2018), about 2.2M parameters at 10 classes."""
    return MobileNetV2(num_classes, in_channels, width_mult)
