"""Layers that torch-pruning's dependency graph does not prune on its own, and how autoprune handles them.

- Attention modules of known kinds (:mod:`autoprune.layers.attention`): each is one opaque layer of the
  graph, and its heads are a prunable group of their own.
- Parameters held directly by a block rather than by a layer (``nn.Parameter`` attributes): torch-pruning
  cuts them along their last non-singleton dimension. That is right for the ones autoprune knows
  (:data:`KNOWN_PARAMETERS`: ConvNeXt's layer scale, ViT's class token and position embedding); for any
  other, autoprune cannot tell how the module uses it, and refuses to prune its channels until a pruner
  is registered for the module's class.
- A user's own module: :func:`register_pruner` gives its class a pruner (torch-pruning's
  ``BasePruningFunc`` interface: ``prune_out_channels``, ``prune_in_channels``, ``get_out_channels``,
  ``get_in_channels``); the dependency graph then treats every instance as one layer and calls the
  pruner to cut it. Register it where the model is built (the ``file.py`` of a ``file.py:factory``
  model), so that workers and ``autoprune apply`` register it too.
"""

from __future__ import annotations

import torch_pruning as tp
from torch import nn

from autoprune.errors import ParameterError
from autoprune.layers.attention import AttentionLayer, StreamPruner, attention_layer, attention_layers

__all__ = ["KNOWN_PARAMETERS", "AttentionLayer", "attention_layer", "attention_layers", "known_parameter",
           "register_pruner", "registered_pruners", "unregister_pruner"]

_PRUNERS: dict[type, tp.pruner.BasePruningFunc] = {}

# (module path of the class, attribute): bare parameters whose channels torch-pruning cuts correctly,
# because the block only multiplies or adds them channel-wise (read in torchvision's code)
KNOWN_PARAMETERS = frozenset({
    ("torchvision.models.convnext.CNBlock", "layer_scale"),
    ("torchvision.models.vision_transformer.VisionTransformer", "class_token"),
    ("torchvision.models.vision_transformer.Encoder", "pos_embedding"),
})


def register_pruner(module_type: type, pruner: tp.pruner.BasePruningFunc) -> None:
    """Prune every instance of ``module_type`` with ``pruner``.

    ``pruner`` implements torch-pruning's ``BasePruningFunc``: ``prune_out_channels(layer, idxs)`` and
    ``prune_in_channels(layer, idxs)`` remove the listed channels in place and return the layer,
    ``get_out_channels`` / ``get_in_channels`` give its widths. When the module keeps its input and
    output channels in step (a per-channel scale or normalisation), set ``prune_in_channels =
    prune_out_channels``: the graph then couples them, as it does for batch norm. A second registration
    for the same class replaces the first.

    Raises:
        ParameterError: ``module_type`` is not an ``nn.Module`` subclass, or ``pruner`` is not a
            ``torch_pruning.pruner.BasePruningFunc``.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ParameterError("module_type", module_type, "must be a torch.nn.Module subclass")
    if not isinstance(pruner, tp.pruner.BasePruningFunc):
        raise ParameterError("pruner", type(pruner).__name__, "must be a torch_pruning.pruner.BasePruningFunc "
                             "(prune_out_channels, prune_in_channels, get_out_channels, get_in_channels)")
    _PRUNERS[module_type] = pruner


def unregister_pruner(module_type: type) -> None:
    """Forget the pruner registered for ``module_type`` (nothing happens when there is none)."""
    _PRUNERS.pop(module_type, None)


def registered_pruners() -> dict[type, tp.pruner.BasePruningFunc]:
    """The pruners registered with :func:`register_pruner`, by module class."""
    return dict(_PRUNERS)


def pruner_for(module: nn.Module) -> tp.pruner.BasePruningFunc | None:
    """The registered pruner of ``module``'s class (or of its nearest registered base class)."""
    for cls in type(module).__mro__:
        if cls in _PRUNERS:
            return _PRUNERS[cls]
    return None


def known_parameter(owner: nn.Module, attribute: str) -> bool:
    """Whether autoprune knows how ``owner`` uses its bare parameter ``attribute`` (see the module
    docstring), or a pruner is registered for ``owner``'s class."""
    if pruner_for(owner) is not None:
        return True
    return any(f"{cls.__module__}.{cls.__qualname__}" == path and attribute == attr
               for cls in type(owner).__mro__ for path, attr in KNOWN_PARAMETERS)


def customized_pruners(model: nn.Module) -> dict[type, tp.pruner.BasePruningFunc]:
    """What the dependency graph of ``model`` is built with: the registered pruners of the classes in it,
    and a :class:`~autoprune.layers.attention.StreamPruner` for each kind of attention module in it."""
    out: dict[type, tp.pruner.BasePruningFunc] = {}
    for m in model.modules():
        cls = type(m)
        if cls in out:
            continue
        pruner = pruner_for(m)
        if pruner is not None:
            out[cls] = pruner
            continue
        layer = attention_layer(m)
        if layer is not None:
            out[cls] = StreamPruner(layer)
    return out
