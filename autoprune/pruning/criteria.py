"""Channel importance criteria: which channels a ratio removes.

A criterion scores every channel of a group (higher = more important); the pruner removes the
lowest-scoring ones. Scores are computed once per base model and group, on the unpruned weights, so
that applying a policy is deterministic and independent of the order groups are pruned in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch_pruning as tp

from autoprune.errors import InputError

Criterion = Callable[[object], torch.Tensor]  # torch-pruning Group -> per-channel scores


def _magnitude(p: int) -> Criterion:
    # Group magnitude: the p-norm of each channel's weights, averaged over every coupled layer
    # (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017, generalised to DepGraph groups).
    return tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer=None)


CRITERIA: dict[str, tuple[Callable[[], Criterion], str]] = {
    "l1": (lambda: _magnitude(1), "L1 norm of each channel's weights over the coupled layers"),
    "l2": (lambda: _magnitude(2), "L2 norm of each channel's weights over the coupled layers"),
}


def get_criterion(name: str) -> Criterion:
    try:
        factory, _ = CRITERIA[name]
    except KeyError:
        raise InputError(f"unknown criterion {name!r}; choose from {', '.join(CRITERIA)}") from None
    return factory()
