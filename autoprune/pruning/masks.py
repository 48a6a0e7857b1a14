"""Masked granularities: fine-grained (unstructured) and N:M sparsity, as weight masks.

Instead of removing channels, a policy's ratios zero weights with ``torch.nn.utils.prune``
(``custom_from_mask``): the pruned model keeps its shapes, every forward multiplies the weight by its
mask (so fine-tuning keeps masked weights at zero: their gradient is masked too), and a saved model
carries ``weight_orig`` and ``weight_mask``.

The decision units stay the prunable groups of :class:`autoprune.space.Space`, so every agent works
unchanged: a group's ratio ``r`` masks each conv or linear layer that *produces* the group's channels
(whose output channels belong to the group; in a MobileNetV2 block the expansion conv and the
depthwise conv after it) to sparsity ``r``. A layer producing channels of several groups takes their
ratios' mean weighted by channels. Layers of pinned groups (first conv, classifier) stay dense.

- ``unstructured``: in every such layer the ``round(r * weights)`` weights of smallest magnitude are
  masked (at least one weight stays), so each layer reaches its sparsity exactly, up to one weight.
- ``N:M`` (e.g. ``2:4``, Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021): every run
  of M consecutive weights along the *input* dimension keeps its N largest magnitudes. Layout: a conv
  weight ``[out, in/groups, kh, kw]`` is read as ``[out, kh, kw, in/groups]`` and cut into runs of M
  along the last axis, i.e. runs of input channels at every (output channel, kernel position): the
  reduction axis of the convolution as a GEMM, which is where sparse tensor cores want the pattern; a
  linear weight ``[out, in]`` runs along ``in``. The only ratios are 0 (dense) and ``1 - N/M``
  (:func:`autoprune.policy.snap_ratio`). A layer whose input dimension per conv group is not a
  multiple of M stays dense and is listed by :meth:`MaskPruner.dense_layers`. A depthwise conv has one
  input channel per group, so N:M leaves it dense (runs along its 3x3 kernel would be a layout no
  sparse kernel executes).

Which weights a ratio masks is chosen on the base model's weights, once per layer: the ``l1`` and
``l2`` criteria both mean the magnitude ``|w|`` of each weight here; ``random`` masks a random choice,
seeded per evaluator seed and layer. Other (channel) criteria do not apply to single weights.

Cost: the dense FLOPs and params are the unpruned model's (the shapes do not change). The effective
ones count only the weights the masks keep: a layer's MACs are its output positions times its
weights, so masking scales them exactly (:func:`autoprune.cost.count_flops` with ``effective=True``
measures the same); :meth:`MaskPruner.cost` predicts both without building a model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from autoprune.cost import attention_modules, forward_once
from autoprune.errors import InputError, ParameterError
from autoprune.policy import Policy, nm_pattern, parse_granularity, snap_ratio
from autoprune.space import Space

MASK_CRITERIA = {
    "l1": "magnitude |w| of each weight",
    "l2": "magnitude |w| of each weight (the same order as l1)",
    "random": "a seeded random choice of weights",
}


def check_criterion(granularity: str, criterion: str) -> None:
    """Refuse a criterion that a masked granularity cannot use, naming the ones it can."""
    if criterion not in MASK_CRITERIA:
        raise ParameterError("criterion", criterion, f"does not apply to granularity {granularity}; "
                             f"it supports {', '.join(MASK_CRITERIA)}")


@dataclass(frozen=True)
class MaskedLayer:
    """A conv or linear layer as the masked granularities see it."""

    name: str
    weights: int  # entries of its weight
    positions: int  # output positions per sample, over every call: its MACs are positions * weights
    out_groups: tuple[tuple[str, float], ...]  # (group, fraction of the layer's output channels)
    input_dim: int  # the weight axis N:M runs along (0 for transposed convs, else 1)
    input_size: int  # its length: input channels per conv group, or in_features


class MaskPruner:
    """Applies unstructured and N:M policies to copies of ``space.model`` as weight masks.

    ``seed`` seeds the ``random`` criterion (one stream per layer).
    """

    def __init__(self, space: Space, seed: int = 0) -> None:
        self.space = space
        self.seed = seed
        modules = space.modules
        out_groups = {layer.name: layer.out_groups for layer in space.layers()}
        positions = _positions(space.model, space.example_inputs)
        self.layers: list[MaskedLayer] = []
        for name, pos in positions.items():
            m = modules[name]
            transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
            out_channels = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            groups = tuple(
                (g, per_channel * space.by_name[g].channels / out_channels)
                for g, per_channel in out_groups.get(name, ())
            )
            dim = 0 if transposed else 1
            self.layers.append(MaskedLayer(name, m.weight.numel(), pos, groups, dim, m.weight.shape[dim]))
        # what masks cannot thin (attention modules' own projections and products) counts whole
        self._unmasked_flops = space.base_flops - sum(layer.positions * layer.weights for layer in self.layers)
        self.base_flops = space.base_flops
        self.base_params = space.base_params
        self._orders: dict[tuple[str, str], torch.Tensor] = {}
        self._nm: dict[tuple[str, str, int, int], torch.Tensor] = {}

    # -- which layers, how sparse -------------------------------------------------------------
    def layer_ratios(self, ratios: Mapping[str, float], granularity: str) -> dict[str, float]:
        """The sparsity every conv/linear layer gets from the group ratios (0: dense)."""
        granularity = parse_granularity(granularity)
        nm = nm_pattern(granularity)
        group_ratio = {
            g.name: 0.0 if g.pinned else snap_ratio(granularity, float(ratios.get(g.name, 0.0)))
            for g in self.space.groups
        }
        out = {}
        for layer in self.layers:
            r = sum(share * group_ratio[g] for g, share in layer.out_groups)
            if nm is not None:
                sparse = 1.0 - nm[0] / nm[1]
                r = sparse if r >= sparse / 2 and layer.input_size % nm[1] == 0 else 0.0
            out[layer.name] = r
        return out

    def kept(self, layer: MaskedLayer, ratio: float, granularity: str) -> int:
        """Weights of ``layer`` that stay at sparsity ``ratio``."""
        if ratio <= 0.0:
            return layer.weights
        nm = nm_pattern(granularity)
        if nm is not None:
            return layer.weights // nm[1] * nm[0]
        removed = min(layer.weights - 1, int(math.floor(ratio * layer.weights + 0.5 + 1e-9)))
        return layer.weights - removed

    def dense_layers(self, granularity: str) -> list[str]:
        """Layers producing channels of a prunable group that ``granularity`` must leave dense: for
        N:M, those whose input dimension is not a multiple of M (depthwise convs among them)."""
        nm = nm_pattern(parse_granularity(granularity))
        if nm is None:
            return []
        prunable = set(self.space.names)
        return [layer.name for layer in self.layers
                if layer.input_size % nm[1] != 0 and any(g in prunable for g, _ in layer.out_groups)]

    def cost(self, ratios: Mapping[str, float], granularity: str) -> dict[str, float]:
        """Effective FLOPs and params of ``ratios`` (only the weights the masks keep), and the dense
        ones (the unpruned model's), predicted exactly."""
        flops, params = self._unmasked_flops, self.base_params
        layer_ratio = self.layer_ratios(ratios, granularity)
        for layer in self.layers:
            kept = self.kept(layer, layer_ratio[layer.name], granularity)
            flops += layer.positions * kept
            params -= layer.weights - kept
        return {"flops": float(flops), "params": float(params),
                "flops_dense": float(self.base_flops), "params_dense": float(self.base_params)}

    # -- the masks ----------------------------------------------------------------------------
    def _scores(self, index: int, criterion: str) -> torch.Tensor:
        weight = self.space.modules[self.layers[index].name].weight.detach()
        if criterion == "random":
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            return torch.rand(weight.shape, generator=gen).to(weight.device)
        return weight.abs().float()

    def _unstructured(self, index: int, criterion: str, kept: int) -> torch.Tensor:
        layer = self.layers[index]
        key = (layer.name, criterion)
        if key not in self._orders:  # ascending scores, ties by position: the first ones go
            self._orders[key] = torch.argsort(self._scores(index, criterion).flatten(), stable=True)
        weight = self.space.modules[layer.name].weight
        mask = torch.ones(layer.weights, device=weight.device, dtype=weight.dtype)
        mask[self._orders[key][: layer.weights - kept]] = 0
        return mask.view_as(weight)

    def _n_of_m(self, index: int, criterion: str, n: int, m: int) -> torch.Tensor:
        layer = self.layers[index]
        key = (layer.name, criterion, n, m)
        if key not in self._nm:
            weight = self.space.modules[layer.name].weight
            runs = self._scores(index, criterion).movedim(layer.input_dim, -1)
            shape = runs.shape
            runs = runs.reshape(*shape[:-1], shape[-1] // m, m)
            top = torch.argsort(runs, dim=-1, descending=True, stable=True)[..., :n]
            mask = torch.zeros_like(runs, dtype=weight.dtype).scatter_(-1, top, 1.0)
            self._nm[key] = mask.reshape(shape).movedim(-1, layer.input_dim).contiguous()
        return self._nm[key]

    def masks(self, policy: Policy) -> dict[str, torch.Tensor]:
        """The weight mask (1 keeps, 0 masks) of every layer ``policy`` makes sparse."""
        granularity = policy.granularity
        if granularity == "channel":
            raise InputError("the channel granularity removes channels; use the channel pruner")
        check_criterion(granularity, policy.criterion)
        self.space.check_names(policy.ratios)
        nm = nm_pattern(granularity)
        layer_ratio = self.layer_ratios(policy.ratios, granularity)
        out = {}
        for i, layer in enumerate(self.layers):
            kept = self.kept(layer, layer_ratio[layer.name], granularity)
            if kept == layer.weights:
                continue
            out[layer.name] = (self._n_of_m(i, policy.criterion, *nm) if nm is not None
                               else self._unstructured(i, policy.criterion, kept))
        return out

    def prune(self, policy: Policy, model: nn.Module | None = None) -> nn.Module:
        """A deep copy of the base model (or of ``model``, same architecture and names) with the
        policy's masks attached by ``torch.nn.utils.prune.custom_from_mask``."""
        masks = self.masks(policy)
        pruned = copy.deepcopy(self.space.model if model is None else model)
        modules = dict(pruned.named_modules())
        for name, mask in masks.items():
            weight = modules[name].weight
            prune.custom_from_mask(modules[name], "weight", mask.to(weight.device, weight.dtype))
        return pruned


def is_masked(model: nn.Module) -> bool:
    """True when some module of ``model`` carries a ``torch.nn.utils.prune`` mask."""
    return prune.is_pruned(model)


@torch.no_grad()
def sync_masked_weights(model: nn.Module) -> nn.Module:
    """Recompute every masked ``weight`` (``weight_orig * weight_mask``) from its parameter and mask.

    ``torch.nn.utils.prune`` keeps ``weight`` as a plain attribute refreshed at each forward, so
    ``model.cpu()`` moves ``weight_orig`` and ``weight_mask`` but not it; call this before saving
    a moved model, so that the file holds no tensor on the old device.
    """
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                setattr(module, hook._tensor_name, hook.apply_mask(module))
    return model


@torch.no_grad()
def _positions(model: nn.Module, x: Any) -> dict[str, int]:
    """Output positions per sample (all calls together) of every conv and linear layer, in the order
    they first run: a layer's MACs are these positions times its weight count."""
    out: dict[str, int] = {}
    hooks = {}
    inside = attention_modules(model)  # an attention module's FLOPs are its own (see autoprune.cost)
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m not in inside:
            channels = m.out_features if isinstance(m, nn.Linear) else m.out_channels

            def hook(mod, inp, y, name=name, channels=channels):
                out[name] = out.get(name, 0) + y.numel() // y.shape[0] // channels

            hooks[m] = hook
    forward_once(model, x, hooks)
    return out
