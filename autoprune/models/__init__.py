"""Model zoo: small-image ResNets, VGG-16-BN and MobileNetV2, torchvision models by name, user factories.

``build_model(name, in_channels, num_classes, image_size)`` is the one entry point the rest of
autoprune uses; ``load_checkpoint(model, path)`` loads trained weights into what it returns.
"""

from autoprune.models.checkpoint import load_checkpoint
from autoprune.models.mobilenetv2 import MobileNetV2, mobilenet_v2
from autoprune.models.registry import TORCHVISION_PREFIX, build_model, describe_models, list_models
from autoprune.models.resnet_cifar import CifarResNet, resnet20, resnet32, resnet56, resnet110
from autoprune.models.vgg import VGG, vgg16_bn

__all__ = [
    "TORCHVISION_PREFIX",
    "VGG",
    "CifarResNet",
    "MobileNetV2",
    "build_model",
    "describe_models",
    "list_models",
    "load_checkpoint",
    "mobilenet_v2",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "vgg16_bn",
]
