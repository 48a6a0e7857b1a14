"""Weight initialisation shared by the zoo models."""

from __future__ import annotations

from torch import nn


def kaiming_init(model: nn.Module) -> None:
    """Initialise ``model`` in place as He et al. (ICCV 2015, "Delving deep into rectifiers") propose.

    Convolutions get Kaiming-normal weights scaled by fan-out (the variant torchvision's ResNet and
    MobileNetV2 use), batch norms start as the identity, linear layers get small normal weights.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
