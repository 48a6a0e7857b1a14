"""VGG-16 with batch norm for small images.

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015 (configuration D), with batch norm after every convolution (Ioffe and Szegedy, ICML 2015).
The small-image variant follows the common CIFAR adaptation (e.g. Liu et al., "Learning Efficient
Convolutional Networks through Network Slimming", ICCV 2017): the thirteen 3x3 convolutions are
kept, the three 4096-wide fully connected layers become a small 512-wide classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from autoprune.models._init import kaiming_init

__all__ = ["VGG", "VGG16_CONFIG", "vgg16_bn"]

# Output channels of the convolutions of each stage; every stage ends with a 2x2 max-pool.
VGG16_CONFIG: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)


class VGG(nn.Module):
    """VGG with batch norm for images of ``image_size`` pixels (Simonyan and Zisserman, ICLR 2015).

    Args:
        config: output channels of the convolutions of each stage; a 2x2 max-pool ends every stage.
        num_classes: size of the output.
        in_channels: channels of the input images.
        image_size: side of the (square) input images. A max-pool that would shrink a 1x1 feature
            map becomes an identity, so 8x8 inputs keep three of the five pools and 32x32 inputs all
            five. Inputs larger than ``image_size`` still work (adaptive average pooling before the
            classifier); smaller ones may not.
        hidden_features: width of the classifier's hidden layer.

    Modules are numbered as in torchvision's VGG (``features.0`` is the first convolution,
    ``features.1`` its batch norm, ``classifier.2`` the output layer).
    """

    def __init__(
        self,
        config: tuple[tuple[int, ...], ...] = VGG16_CONFIG,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        hidden_features: int = 512,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for stage in config:
            for out_channels in stage:
                layers += [
                    nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
                channels = out_channels
            # An Identity in place of a skipped pool keeps module indices (and so policy names and
            # checkpoint keys) the same for every image size.
            layers.append(nn.MaxPool2d(2, 2) if size > 1 else nn.Identity())
            size = max(size // 2, 1)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden_features),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_features, num_classes),
        )
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def vgg16_bn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> VGG:
    """VGG-16 with batch norm for small images (Simonyan and Zisserman, ICLR 2015), about 15M parameters."""
    return VGG(VGG16_CONFIG, num_classes, in_channels, image_size)
