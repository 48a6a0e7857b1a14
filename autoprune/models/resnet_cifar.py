"""ResNet for small images: ResNet-20/32/56/110.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2: a 3x3
stem, then three stages of ``n`` BasicBlocks with 16, 32 and 64 channels (the second and third
stage halve the resolution), global average pooling and one fully connected layer; depth ``6n + 2``.

The paper's CIFAR networks use parameter-free shortcuts (option A: strided identity, zero-padded
channels). Here a shortcut that changes shape is a 1x1 convolution plus batch norm (option B, as in
the paper's ImageNet networks): a zero-padding shortcut has no layer whose channels a pruner could
remove, while a convolution lets the dependency graph prune every stage consistently. It adds about
3K parameters to ResNet-20.
"""

from __future__ import annotations

import torch
from torch import nn

from autoprune.models._init import kaiming_init

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet56", "resnet110"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 conv + BN) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet of depth ``6 * blocks_per_stage + 2`` for small images (He et al., CVPR 2016, sec. 4.2).

    Args:
        blocks_per_stage: ``n`` in the paper; 3, 5, 9 and 18 give ResNet-20, 32, 56 and 110.
        num_classes: size of the output.
        in_channels: channels of the input images (3 for RGB, 1 for grayscale).
        widths: channels of the three stages (16, 32, 64 in the paper).

    Works on any input of at least 1x1 pixels: the stem keeps the resolution, each later stage
    halves it (rounding up) and adaptive average pooling feeds the classifier.
    """

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(widths[0], widths[0], blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(widths[0], widths[1], blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(widths[1], widths[2], blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        kaiming_init(self)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (He et al., CVPR 2016): 3 blocks per stage, about 0.27M parameters."""
    return CifarResNet(3, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 (He et al., CVPR 2016): 5 blocks per stage, about 0.47M parameters."""
    return CifarResNet(5, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (He et al., CVPR 2016): 9 blocks per stage, about 0.86M parameters."""
    return CifarResNet(9, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-110 (He et al., CVPR 2016): 18 blocks per stage, about 1.7M parameters."""
    return CifarResNet(18, num_classes, in_channels)
