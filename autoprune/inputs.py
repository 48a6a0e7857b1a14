"""Model inputs and batches of any structure: a tensor, a tuple or list, a dict, or nested ones.

Example inputs follow torch-pruning's convention, which the dependency graph is traced with: a tensor
is passed as ``model(x)``, a tuple or list as ``model(*inputs)``, a dict as ``model(**inputs)``. The
first dimension of every tensor in them is the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


def call(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on example inputs by torch-pruning's convention (see the module docstring)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it; tuples (named ones too), lists and dicts keep
    their type, anything else is returned as it is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        items = {k: map_tensors(v, fn) for k, v in obj.items()}
        try:
            return items if type(obj) is dict else type(obj)(items)
        except TypeError:  # a mapping type that cannot be built from a dict
            return items
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in ``obj``, in order."""
    out: list[torch.Tensor] = []
    map_tensors(obj, lambda t: out.append(t) or t)
    return out


def to_device(obj: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``obj`` with every tensor moved to ``device`` (``non_blocking`` pays off from pinned memory)."""
    return map_tensors(obj, lambda t: t.to(device, non_blocking=non_blocking))


def first_sample(inputs: Any) -> Any:
    """The inputs of one sample: every tensor cut to the first entry of its batch dimension."""
    return map_tensors(inputs, lambda t: t[:1] if t.dim() > 0 else t)


def repeat_batch(inputs: Any, batch_size: int) -> Any:
    """One sample's inputs repeated ``batch_size`` times along the batch dimension (timing a batch)."""
    return map_tensors(inputs, lambda t: t[:1].expand(batch_size, *t.shape[1:]).contiguous() if t.dim() > 0 else t)


def device_of(inputs: Any, default: torch.device | str = "cpu") -> torch.device:
    found = tensors(inputs)
    return found[0].device if found else torch.device(default)


def signature(inputs: Any) -> Any:
    """A JSON-able description of the inputs' structure and shapes (for cache keys)."""
    if isinstance(inputs, torch.Tensor):
        return [list(inputs.shape), str(inputs.dtype)]
    if isinstance(inputs, Mapping):
        return {str(k): signature(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return [signature(v) for v in inputs]
    return repr(type(inputs).__name__)


def primary(output: Any) -> torch.Tensor:
    """The main prediction of a model's output: the tensor itself; the first field of a tuple or
    namedtuple (torchvision's GoogLeNet and Inception return ``(logits, aux...)`` in training mode);
    ``out`` or ``logits`` of a dict (torchvision's segmentation models return ``{"out": ..., "aux": ...}``),
    else its first value. Raises ``TypeError`` naming the type when there is no tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("out", "logits"):
            if key in output:
                return primary(output[key])
        if output:
            return primary(next(iter(output.values())))
    if isinstance(output, (tuple, list)) and output:
        return primary(output[0])
    logits = getattr(output, "logits", None)  # e.g. a dataclass output with a logits field
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"cannot find the prediction in a model output of type {type(output).__name__}; "
                    "give the task a forward_fn that returns it")
