"""Measured cost of a model: FLOPs, parameters and latency.

FLOPs are counted as **multiply-accumulates (MACs) of convolution and linear layers** for one input
sample, the convention of AMC, NetAdapt and most pruning papers ("FLOPs" there means MACs). Batch
norm, activations, pooling and additions are not counted. Every FLOPs figure autoprune prints, stores
or compares uses this one definition; :class:`autoprune.space.Space` predicts the same number
analytically, and the tests check that prediction against this counter on pruned models.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """MACs of every ``Conv*d`` and ``Linear`` call for one sample of ``example_input``'s shape."""
    total = 0

    def conv_hook(m: nn.modules.conv._ConvNd, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        kernel = 1
        for k in m.kernel_size:
            kernel *= k
        total += (out.numel() // out.shape[0]) * (m.in_channels // m.groups) * kernel

    def linear_hook(m: nn.Linear, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += (out.numel() // out.shape[0]) * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        model(example_input[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return int(total)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not); buffers such as BN running stats are not counted."""
    return int(sum(p.numel() for p in model.parameters()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor,
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
        device = example_input.device
    x = example_input[:1].to(device).expand(batch_size, *example_input.shape[1:]).contiguous()
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            model(x)
        _sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return float(statistics.median(times))
