"""Measured cost of a model: FLOPs, parameters and latency.

FLOPs are counted as **multiply-accumulates (MACs) of convolution and linear layers** for one input
sample (a weight runs once per output position; per input position in a transposed convolution), the
convention of AMC, NetAdapt and most pruning papers ("FLOPs" there means MACs), **and of the attention
modules autoprune knows** (:mod:`autoprune.layers.attention`: their projections and the two matrix
products ``QKᵀ`` and ``softmax(·)V``, counted by one hook on the module, since torchvision runs the
projections functionally; layers inside such a module are not counted again). Batch
norm, activations, pooling, additions and softmax are not counted. Every FLOPs figure autoprune prints, stores
or compares uses this one definition; :class:`autoprune.space.Space` predicts the same number
analytically, and the tests check that prediction against this counter on pruned models.

A model pruned with weight masks (the unstructured and N:M granularities, ``torch.nn.utils.prune``)
keeps its dense shapes, so its plain count is the *dense* figure; ``effective=True`` counts only the
weights the masks keep (a layer's MACs scaled by its density; a layer without a mask counts whole).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from autoprune.inputs import call, device_of, first_sample, repeat_batch
from autoprune.layers.attention import attention_layer


def attention_modules(model: nn.Module) -> set[nn.Module]:
    """The modules inside attention modules of a known kind (not those modules themselves): their FLOPs
    and parameters are the attention module's."""
    inside: set[nn.Module] = set()
    for m in model.modules():
        if attention_layer(m) is not None:
            inside.update(sub for sub in m.modules() if sub is not m)
    return inside


def kept_weights(module: nn.Module, name: str = "weight") -> int:
    """Weights of ``module.<name>`` that its pruning mask keeps (all of them when it has no mask)."""
    mask = getattr(module, name + "_mask", None)
    if isinstance(mask, torch.Tensor):
        return int(torch.count_nonzero(mask))
    return getattr(module, name).numel()


@torch.no_grad()
def count_flops(model: nn.Module, example_inputs: Any, *, effective: bool = False) -> int:
    """MACs of every ``Conv*d`` and ``Linear`` call for one sample of ``example_inputs`` (a tensor, a
    tuple or a dict; see :mod:`autoprune.inputs`); with ``effective`` only those of the weights pruning
    masks keep."""
    total = 0

    def conv_hook(m: nn.modules.conv._ConvNd, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        # every weight runs once per output position (per input position for a transposed conv), so
        # MACs = positions x weights, and the kept weights scale them exactly
        x = inp[0] if m.transposed else out
        positions = x.numel() // x.shape[0] // x.shape[1]
        total += positions * (kept_weights(m) if effective else m.weight.numel())

    def linear_hook(m: nn.Linear, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if effective:
            total += (out.numel() // out.shape[0] // m.out_features) * kept_weights(m)
            return
        total += (out.numel() // out.shape[0]) * m.in_features

    def attention_hook(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        nonlocal total
        layer = attention_layer(m)
        total += layer.macs(m, layer.tokens(m, args, kwargs))

    hooks: dict[nn.Module, Any] = {}
    inside = attention_modules(model)
    for m in model.modules():
        if m in inside:
            continue
        if attention_layer(m) is not None:
            hooks[m] = attention_hook
        elif isinstance(m, nn.modules.conv._ConvNd):
            hooks[m] = conv_hook
        elif isinstance(m, nn.Linear):
            hooks[m] = linear_hook
    forward_once(model, example_inputs, hooks)
    return int(total)


@torch.no_grad()
def forward_once(model: nn.Module, example_inputs: Any, hooks: dict[nn.Module, object]) -> None:
    """One eval-mode forward pass of one sample with forward ``hooks`` (module -> hook) attached; the
    hooks are removed and the model's train/eval mode restored afterwards. A hook taking four arguments
    ``(module, args, kwargs, output)`` gets the keyword arguments too."""
    import inspect

    handles = [m.register_forward_hook(h, with_kwargs=len(inspect.signature(h).parameters) == 4)
               for m, h in hooks.items()]
    was_training = model.training
    model.eval()
    try:
        call(model, first_sample(example_inputs))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def count_params(model: nn.Module, *, effective: bool = False) -> int:
    """Number of parameters (trainable or not); buffers such as BN running stats are not counted.
    With ``effective``, a masked parameter (``<name>_orig`` beside a ``<name>_mask``) counts only the
    entries its mask keeps."""
    if not effective:
        return int(sum(p.numel() for p in model.parameters()))
    total, seen = 0, set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # a parameter shared between modules counts once, as model.parameters() does
                continue
            seen.add(id(p))
            base = name[: -len("_orig")] if name.endswith("_orig") else None
            total += kept_weights(module, base) if base and hasattr(module, base + "_mask") else p.numel()
    return int(total)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    warmup: int = 5,
    repeats: int = 20,
    batch_size: int = 1,
) -> float:
    """Median wall time in seconds of one forward pass of ``batch_size`` samples on the model's device.

    ``warmup`` untimed passes first (allocator, kernel selection, caches), then the median of
    ``repeats`` timed passes, which resists the outliers of a shared machine better than the mean.
    """
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = device_of(example_inputs)
    x = repeat_batch(example_inputs, batch_size)
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            call(model, x)
        _sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call(model, x)
            _sync(device)
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return float(statistics.median(times))
