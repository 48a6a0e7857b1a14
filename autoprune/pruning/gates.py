"""Channel gates: one learnable scalar per channel of every prunable group (Wang et al., "Pruning
from Scratch", AAAI 2020, Sec. 3).

A gate vector ``g`` of a group multiplies, channel by channel, every output that carries the group's
channels: the batch norm that follows each of its convolutions (or the layer itself when no batch
norm follows it). Coupled layers therefore share one gate per channel, so a gate closing at zero
silences a channel everywhere the group would physically remove it. Gates act through forward hooks
on a copy of the model, which leaves the model's own code and weights alone.

The structure a gate vector implies is read by :func:`threshold_structure`: one global threshold over
all gates (Sec. 3.2), found by bisection until the pruned model meets the budget.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from autoprune.budget import bisect
from autoprune.errors import InputError
from autoprune.space import Space


def residual_streams(space: Space) -> list[str]:
    """The prunable groups whose channels more than one layer produces: the residual streams of a ResNet
    or a MobileNetV2, where each block's last convolution (and the shortcut's, where there is one) adds
    into the same channels. A group with one producing layer is not a stream, nor is one whose other
    layers are depthwise convolutions fed by it (MobileNetV2's expansion and its depthwise convolution)."""
    out = []
    for g in space.prunable:
        producers = [n for n in g.members if _is_layer(space.modules[n]) and not _is_depthwise(space.modules[n])]
        if len(producers) > 1:
            out.append(g.name)
    return out


def gate_targets(space: Space, model: nn.Module | None = None, groups: Sequence[str] | None = None
                 ) -> dict[str, list[str]]:
    """For every prunable group (or each of ``groups``), the modules whose outputs carry its channels and
    get its gate.

    Each convolution or linear layer among the group's members (``Group.members``: the modules whose
    out-channels the group removes) is gated after the batch norm that directly consumes it when that
    norm is a member too, else at its own output. In a group with depthwise convolutions (MobileNetV2's
    expansion conv feeding a depthwise one) only the depthwise layers are gated, so that no channel is
    multiplied by its gate twice along one path.
    """
    model = space.model if model is None else model
    modules = dict(model.named_modules())
    out: dict[str, list[str]] = {}
    for g in space.prunable:
        if groups is not None and g.name not in groups:
            continue
        if space.heads(g.name) is not None:
            raise InputError(
                f"group {g.name!r} is the heads of an attention module, which channel gates cannot gate; keep it "
                f"whole with --ignore {g.name!r}, or use another agent"
            )
        members = set(g.members)
        layers = [n for n in g.members if _is_layer(space.modules[n])]
        depthwise = [n for n in layers if _is_depthwise(space.modules[n])]
        targets = []
        for name in depthwise or layers:
            node = space.dg.module2node.get(space.modules[name])
            follower = None
            if node is not None and len(node.outputs) == 1:
                nxt = space.module_names.get(node.outputs[0].module)
                if nxt in members and isinstance(space.modules[nxt], nn.modules.batchnorm._NormBase):
                    follower = nxt
            targets.append(follower or name)
        out[g.name] = [t for t in dict.fromkeys(targets) if t in modules]
    return out


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels


class ChannelGates(nn.Module):
    """The gates of every prunable group of ``space`` (or of ``groups`` only), hooked into ``model`` (a
    copy of the space's model with the same module names). Gates start at 1: the gated model computes
    what ``model`` does.

    ``gates[i]`` belongs to group ``names[i]``; :meth:`remove` takes the hooks off again.
    """

    def __init__(self, space: Space, model: nn.Module, groups: Sequence[str] | None = None) -> None:
        super().__init__()
        targets = gate_targets(space, model, groups)
        self.names = [g.name for g in space.prunable if groups is None or g.name in groups]
        self.gates = nn.ParameterList(
            [nn.Parameter(torch.ones(space.by_name[n].channels, device=_device(model))) for n in self.names]
        )
        modules = dict(model.named_modules())
        self._handles = []
        for gate, name in zip(self.gates, self.names):
            for target in targets[name]:
                index = space.unit_index(name, target)  # a grouped convolution's channels share their group's gate
                if index is not None:
                    index = index.to(gate.device)
                self._handles.append(modules[target].register_forward_hook(_multiply(gate, index)))

    def vector(self) -> torch.Tensor:
        """Every gate of the network, groups in order, as one vector."""
        return torch.cat(list(self.gates))

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {n: g.detach().clone().cpu() for n, g in zip(self.names, self.gates)}

    @torch.no_grad()
    def load_(self, values: Mapping[str, torch.Tensor]) -> None:
        """Set every group's gates to ``values`` (as :meth:`as_dict` gives them)."""
        for name, g in zip(self.names, self.gates):
            g.copy_(values[name].to(g.device))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project every gate onto [0, 1] (done after each optimiser step, Sec. 3.1)."""
        for g in self.gates:
            g.clamp_(0.0, 1.0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _multiply(gate: nn.Parameter, index: torch.Tensor | None = None) -> Callable:
    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (output.dim() - 2)
        g = gate if index is None else gate[index]
        return output * g.to(output.dtype).view(shape)

    return hook


def gate_mean(gates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean absolute gate, ``||g||_1 / N`` (Eq. 2), or with ``weights`` (one per gate, mean 1) the
    weighted mean ``sum(w * |g|) / N``: with each channel's FLOPs as its weight, roughly the share of the
    per-channel FLOPs the gates leave open."""
    g = gates.abs()
    return (g if weights is None else weights * g).mean()


def sparsity_penalty(gates: torch.Tensor, r: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The gate regulariser of Eq. (2): ``(||g||_1 / N - r)^2``, the squared gap between the mean
    absolute gate and the target ``r``. The loss is ``CE + lambda * sparsity_penalty(g, r)``. With
    ``weights`` the mean is :func:`gate_mean`'s weighted one, so a gate's pull towards zero grows with
    its weight."""
    return (gate_mean(gates, weights) - r) ** 2


def channel_flops(space: Space) -> dict[str, float]:
    """What removing one channel of each prunable group saves from the unpruned model, in MACs, scaled
    so that the mean over all channels is 1. In ResNet-20, a channel of a first-stage convolution (16
    wide, full resolution) weighs four times one of the last stage (64 wide, a quarter of the side)."""
    flops = {g.name: max(float(g.flops), 0.0) for g in space.prunable}
    total = sum(flops.values())
    if total <= 0:
        return dict.fromkeys(flops, 1.0)
    count = sum(g.channels for g in space.prunable)
    return {g.name: max(flops[g.name] / g.channels * count / total, 1e-12) for g in space.prunable}


def flops_weights(space: Space, groups: Sequence[str] | None = None) -> torch.Tensor:
    """:func:`channel_flops` as one weight per gate of every prunable group (or of ``groups`` only), in
    ``space.prunable`` order (as :meth:`ChannelGates.vector`), rescaled so that their mean is 1."""
    per = channel_flops(space)
    w = torch.cat([torch.full((g.channels,), per[g.name]) for g in space.prunable
                   if groups is None or g.name in groups])
    return w / w.mean()


def threshold_structure(
    gates: Mapping[str, torch.Tensor],
    fits: Callable[[dict[str, float]], bool],
    max_ratio: float = 1.0,
    weights: Mapping[str, float] | None = None,
    refill: bool = False,
) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Turn gates into per-group channel counts with one global threshold (Sec. 3.2).

    Channels are ordered by gate over the whole network (ties broken by group order, then by channel
    index, so the order is total), and the threshold is bisected over that order: the smallest number
    of lowest-gated channels whose removal makes ``fits(ratios)`` true. Removing one channel fewer
    breaks a budget, so the budget is met as tightly as whole channels allow. Every group keeps at
    least one channel and loses at most ``max_ratio`` of them; the channels kept are those with the
    largest gates. Returns ``(ratios removed, kept channel indices)`` per group.

    ``fits`` must be monotone (removing more channels never breaks a budget), as FLOPs and
    parameter counts are; measured latency is close to it.

    With ``weights`` (a positive weight per group, e.g. what one of its channels costs) the global order
    is by gate divided by its group's weight, so the channels whose gate is smallest for what they cost
    go first; within a group the order is the same.

    The last channel the threshold takes can save far more than the budget still needed (a channel of
    a full-resolution layer, when the threshold has reached it). With ``refill``, the removed channels
    are then walked back, highest first in that order, and each whose return still meets the budget
    is given back; within a group the channels kept stay its largest gates. This costs one ``fits``
    per removed channel: cheap for FLOPs and parameters, not for a measured latency.
    """
    names = list(gates)
    sizes = {n: int(gates[n].numel()) for n in names}
    cap = {n: min(sizes[n] - 1, int(math.floor(max_ratio * sizes[n] + 1e-9))) for n in names}
    # one global order over every removable channel: the per-group ascending order, capped, merged
    candidates = []
    for gi, n in enumerate(names):
        g = gates[n].detach().float().cpu()
        scale = 1.0 if weights is None else float(weights[n])
        if not scale > 0:
            raise ValueError(f"group {n!r} has weight {scale!r}; every weight must be > 0")
        order = sorted(range(sizes[n]), key=lambda i: (float(g[i]), i))
        candidates += [(float(g[i]) / scale, gi, i, n) for i in order[: cap[n]]]
    candidates.sort()

    def ratios_of(removed: list) -> dict[str, float]:  # what ``fits`` judges: counts only
        count = Counter(n for *_, n in removed)
        return {n: count[n] / sizes[n] for n in names}

    def structure(removed: list) -> tuple[dict[str, float], dict[str, list[int]]]:
        gone: dict[str, set[int]] = {n: set() for n in names}
        for _, _, i, n in removed:
            gone[n].add(i)
        return ratios_of(removed), {n: [i for i in range(sizes[n]) if i not in gone[n]] for n in names}

    if fits(ratios_of([])):
        return structure([])
    if not fits(ratios_of(candidates)):
        raise ValueError("the budget cannot be met even at the largest ratio every group allows")
    removed = candidates[: bisect(lambda k: fits(ratios_of(candidates[:k])), 0, len(candidates))]
    if refill:
        full: set[str] = set()  # groups that could not take one back: a later channel costs the same
        for c in reversed(removed[:-1]):  # the last one taken is the one the budget needed
            if c[3] in full:
                continue
            fewer = [d for d in removed if d is not c]
            if fits(ratios_of(fewer)):
                removed = fewer
            else:
                full.add(c[3])
    return structure(removed)
