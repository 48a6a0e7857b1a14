"""Build a model by name: the zoo, ``torchvision:NAME`` or ``path/to/file.py:factory``."""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from autoprune.errors import InputError
from autoprune.models.mobilenetv2 import mobilenet_v2
from autoprune.models.resnet_cifar import resnet20, resnet32, resnet56, resnet110
from autoprune.models.vgg import vgg16_bn

__all__ = ["TORCHVISION_PREFIX", "build_model", "describe_models", "list_models"]

TORCHVISION_PREFIX = "torchvision:"

# Keyword arguments a user factory receives when its signature names them.
_FACTORY_KWARGS = ("num_classes", "in_channels", "image_size")


@dataclass(frozen=True)
class _ZooEntry:
    build: Callable[[int, int, int], nn.Module]  # (in_channels, num_classes, image_size) -> model
    description: str


_ZOO: dict[str, _ZooEntry] = {
    "resnet20": _ZooEntry(
        lambda c, k, s: resnet20(num_classes=k, in_channels=c),
        "ResNet-20 for small images (He et al., CVPR 2016): 3x3 BasicBlocks of 16/32/64 ch, 0.27M params",
    ),
    "resnet32": _ZooEntry(
        lambda c, k, s: resnet32(num_classes=k, in_channels=c),
        "ResNet-32 for small images (He et al., CVPR 2016): 3x5 BasicBlocks of 16/32/64 ch, 0.47M params",
    ),
    "resnet56": _ZooEntry(
        lambda c, k, s: resnet56(num_classes=k, in_channels=c),
        "ResNet-56 for small images (He et al., CVPR 2016): 3x9 BasicBlocks of 16/32/64 ch, 0.86M params",
    ),
    "resnet110": _ZooEntry(
        lambda c, k, s: resnet110(num_classes=k, in_channels=c),
        "ResNet-110 for small images (He et al., CVPR 2016): 3x18 BasicBlocks of 16/32/64 ch, 1.7M params",
    ),
    "vgg16_bn": _ZooEntry(
        lambda c, k, s: vgg16_bn(num_classes=k, in_channels=c, image_size=s),
        "VGG-16 with batch norm for small images (Simonyan & Zisserman, ICLR 2015): 13 convs, 15M params",
    ),
    "mobilenet_v2": _ZooEntry(
        lambda c, k, s: mobilenet_v2(num_classes=k, in_channels=c),
        "MobileNetV2 for small images (Sandler et al., CVPR 2018): stride-1 stem, inverted residuals, "
        "2.2M params",
    ),
}


def list_models() -> list[str]:
    """Names of the zoo models, sorted (``torchvision:NAME`` and ``file.py:factory`` also work)."""
    return sorted(_ZOO)


def describe_models() -> dict[str, str]:
    """One line describing each zoo model, keyed by name in sorted order."""
    return {name: _ZOO[name].description for name in list_models()}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build an untrained model for ``in_channels`` x ``image_size`` x ``image_size`` inputs.

    Args:
        name: a zoo name (see :func:`list_models`); ``torchvision:NAME`` for any torchvision
            classification model, built with ``weights=None`` and its first convolution replaced
            when ``in_channels != 3``; or ``path/to/file.py:factory``, a function in that file called
            with whichever of ``num_classes``, ``in_channels`` and ``image_size`` it accepts.
        in_channels: channels of the input images.
        num_classes: size of the output.
        image_size: side of the square input images (the zoo's VGG drops max-pools that would
            shrink a 1x1 feature map).

    Raises:
        InputError: unknown name, missing file or factory, or a factory that returns no module.
    """
    for arg, value in (
        ("in_channels", in_channels),
        ("num_classes", num_classes),
        ("image_size", image_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{arg} must be a positive integer, got {value!r}")
    name = name.strip()
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(name[len(TORCHVISION_PREFIX) :], in_channels, num_classes, image_size)
    file_part, sep, factory = name.rpartition(":")
    if sep and file_part.endswith(".py"):
        return _build_from_file(Path(file_part), factory, in_channels, num_classes, image_size)
    if name.endswith(".py"):
        raise InputError(f"model file {name!r} needs a factory function: write it as '{name}:FUNCTION'")
    entry = _ZOO.get(name.lower())
    if entry is None:
        raise InputError(
            f"unknown model {name!r}{_suggest(name.lower(), list_models())}; "
            f"choose one of {', '.join(list_models())}, torchvision:NAME or path/to/file.py:factory"
        )
    return entry.build(in_channels, num_classes, image_size)


def _build_torchvision(arch: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    import torchvision  # imported here: zoo users need not pay its import time

    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise InputError(
            f"unknown torchvision model {arch!r}{_suggest(arch, available)}; "
            f"torchvision classification models are: {', '.join(available)}"
        )
    label = f"torchvision:{arch}"
    kwargs: dict[str, object] = {}
    if arch.startswith("vit_"):  # the patch grid is built for one image size
        patch = int(arch.rsplit("_", 1)[1])
        if image_size % patch:
            raise InputError(f"{label} cuts images into {patch}x{patch} patches: its image size must be a "
                             f"multiple of {patch}, not {image_size} (--image-size)")
        kwargs["image_size"] = image_size
    elif arch.startswith("maxvit"):  # five halvings, then 7x7 windows and grids
        if image_size % 224:
            raise InputError(f"{label} partitions its last 1/32-size feature map into 7x7 windows: its image size "
                             f"must be a multiple of 224, not {image_size} (--image-size)")
        kwargs["input_size"] = (image_size, image_size)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels, label)
    check_input_size(model, label, in_channels, image_size)
    return model


def check_input_size(model: nn.Module, label: str, in_channels: int, image_size: int) -> None:
    """Refuse an image size ``model`` cannot run on, in evaluation or in training (auxiliary classifiers
    run only then), naming the smallest size it runs on: one forward pass of zeros in each mode, on a
    batch of two (batch norm needs two values per channel to train); batch-norm statistics and the random
    state are left as they were."""
    def runs(side: int) -> str:
        buffers = [(b, b.clone()) for b in model.buffers()]
        modes = {m: m.training for m in model.modules()}
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                model.eval()
                model(torch.zeros(1, in_channels, side, side))
                model.train()
                model(torch.zeros(2, in_channels, side, side))
            return ""
        except Exception as e:  # noqa: BLE001 - the failure is reported in words
            return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        finally:
            for m, training in modes.items():
                m.training = training
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)

    problem = runs(image_size)
    if not problem:
        return
    if len(problem) > 160:
        problem = problem[:157] + "..."
    lo, hi = image_size, None
    for side in (16, 32, 64, 128, 256, 299, 512):
        if side > lo and not runs(side):
            hi = side
            break
    if hi is None:
        raise InputError(f"{label} does not run on {image_size}x{image_size} images ({problem})")
    while hi - lo > 1:  # the smallest side that runs, sizes being monotone for these networks
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if not runs(mid) else (mid, hi)
    raise InputError(f"{label} does not run on {image_size}x{image_size} images ({problem}); it needs at least "
                     f"{hi}x{hi}: give --image-size {hi} or more with an imagefolder dataset")


def _replace_first_conv(model: nn.Module, in_channels: int, label: str) -> None:
    """Swap the first ``Conv2d`` (the stem) for one reading ``in_channels`` channels, same geometry."""
    found = next(((path, m) for path, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None:
        raise InputError(f"{label} has no Conv2d whose input channels could be set to {in_channels}")
    path, conv = found
    if conv.groups != 1:
        raise InputError(
            f"{label}: the first convolution {path!r} is grouped; cannot adapt it to {in_channels} channels"
        )
    replacement = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    nn.init.kaiming_normal_(replacement.weight, mode="fan_out", nonlinearity="relu")
    if replacement.bias is not None:
        nn.init.zeros_(replacement.bias)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, replacement)


def load_factory(spec: str, what: str = "model") -> Callable[..., object]:
    """The function ``factory`` of ``path/to/file.py:factory`` (``what`` names it in messages)."""
    file_part, sep, factory_name = spec.strip().rpartition(":")
    if not sep or not file_part.endswith(".py"):
        raise InputError(f"{what} {spec!r}: write it as path/to/file.py:FUNCTION")
    path = Path(file_part)
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise InputError(f"{what} file {str(path)!r} {problem} (from {spec!r})")
    module = _import_file(path.resolve(), what)
    factory = getattr(module, factory_name, None) if factory_name.isidentifier() else None
    if factory is None or not callable(factory):
        functions = sorted(
            n
            for n, obj in vars(module).items()
            if callable(obj) and not n.startswith("_") and getattr(obj, "__module__", None) == module.__name__
        )
        raise InputError(
            f"no function {factory_name!r} in {what} file {str(path)!r}; "
            f"functions defined there: {', '.join(functions) or 'none'}"
        )
    return factory


def _build_from_file(
    path: Path, factory_name: str, in_channels: int, num_classes: int, image_size: int
) -> nn.Module:
    spec = f"{path}:{factory_name}"
    factory = load_factory(spec, "model")
    values = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    kwargs = {key: values[key] for key in _accepted_keywords(factory)}
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise InputError(f"{spec} failed: {_one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise InputError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_file(path: Path, what: str = "model") -> ModuleType:
    # A unique module name per file, registered in sys.modules so that dataclasses and pickling
    # inside the user's file work; its folder is importable while it runs, for sibling imports.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"autoprune_user_{path.stem}_{digest}"
    if module_name in sys.modules:  # a model and a task factory in one file share one module
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"{what} file {str(path)!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise InputError(f"importing {what} file {str(path)!r} failed: {_one_line(exc)}") from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def _accepted_keywords(factory: Callable[..., object]) -> list[str]:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return []
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [key for key in _FACTORY_KWARGS if key in parameters and parameters[key].kind in keyword_kinds]


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
