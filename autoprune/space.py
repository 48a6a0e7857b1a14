"""The search space of a model: its prunable groups and an analytic cost model over them.

Coupled layers (a residual stream, a depthwise conv and its producer, the branches of a concat) must
lose the same channels, so torch-pruning's dependency graph (DepGraph, Fang et al., CVPR 2023) groups
them and one ratio decides each group. A group is named after the module path of its leading layer.

The analytic cost model predicts FLOPs (MACs, see :mod:`autoprune.cost`) and parameters of any
policy in microseconds without touching the model, which lets agents clip actions, bisect ratios and
project random samples onto a budget. It is exact for convolutions, linear layers and normalisation
layers; the tests check it against the counter run on physically pruned models.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from autoprune.cost import count_flops, count_params
from autoprune.errors import InputError
from autoprune.inputs import call, first_sample, map_tensors


def keep_count(channels: int, ratio: float) -> int:
    """Channels kept when ``ratio`` of ``channels`` is removed: rounded to nearest, at least one."""
    removed = int(math.floor(ratio * channels + 0.5 + 1e-9))
    return max(1, channels - removed)


@dataclass(frozen=True)
class Group:
    """One pruning decision: a set of coupled channels, led by the layer ``name``."""

    index: int
    name: str
    channels: int
    pinned: bool
    module_type: str  # "conv", "depthwise", "linear" or the leading module's class name
    in_channels: int
    kernel: int
    stride: int
    weights: int  # parameters of the leading layer
    flops: int  # MACs of every layer whose size depends on this group, unpruned
    members: tuple[str, ...] = ()  # modules whose channels this group removes


@dataclass
class _Term:
    """One conv/linear/norm layer in the analytic model."""

    name: str
    kind: str  # conv, depthwise, linear, norm, other
    out_full: int
    in_full: int
    macs_per_io: float  # MACs per (kept_out * kept_in) pair, or per kept_out for depthwise
    weight_per_io: float
    bias: bool
    params_full: int
    out_terms: list[tuple[int, float]] = field(default_factory=list)  # (group index, channels per channel)
    in_terms: list[tuple[int, float]] = field(default_factory=list)


class Space:
    """Prunable groups of ``model`` for inputs like ``example_inputs`` (a tensor, a tuple or a dict, by
    torch-pruning's convention: see :mod:`autoprune.inputs`).

    Use :meth:`from_model`. ``groups`` lists every group in a stable order (pinned ones included,
    flagged); ``names`` are the searchable (unpinned) ones, the keys of a policy's ratios.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, ignore: Iterable[str] = ()) -> None:
        self.model = model
        self.example_inputs = map_tensors(first_sample(example_inputs), lambda t: t.detach())
        model.eval()
        self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=self.example_inputs, forward_fn=call)
        self.module_names = {m: n for n, m in model.named_modules()}
        self.modules = dict(model.named_modules())
        self._build(list(ignore))

    @classmethod
    def from_model(cls, model: nn.Module, example_inputs: Any, ignore: Iterable[str] = ()) -> Space:
        return cls(model, example_inputs, ignore)

    # -- construction -------------------------------------------------------------------------
    def _build(self, ignore: list[str]) -> None:
        shapes = _io_shapes(self.model, self.example_inputs)
        order = list(shapes)  # execution order of conv/linear layers
        weighted = [n for n in order if isinstance(self.modules[n], (nn.modules.conv._ConvNd, nn.Linear))]
        if not weighted:
            raise InputError("the model has no convolution or linear layer to prune")
        first_layer, classifier = weighted[0], weighted[-1]

        rank = {n: i for i, n in enumerate(order)}
        groups_raw = []
        for grp in self.dg.get_all_groups():
            if grp[0].dep.target.module not in self.module_names:
                continue
            # the leading layer: the first conv/linear to run among those whose outputs the group cuts
            leads = [(rank[self.module_names[dep.target.module]], self.module_names[dep.target.module],
                      dep.handler)
                     for dep, _ in grp
                     if self.module_names.get(dep.target.module) in rank
                     and self.dg.is_out_channel_pruning_fn(dep.handler)]
            lead_name, lead_handler = (min(leads)[1], min(leads)[2]) if leads else (
                self.module_names[grp[0].dep.target.module], grp[0].dep.handler)
            items = []
            for dep, idxs in grp:
                target = dep.target
                if target.type == tp.ops.OPTYPE.PARAMETER:
                    name = self.dg._param_to_name.get(target.module)
                    items.append((f"param:{name}", True, len(idxs)))
                    continue
                mod = target.module
                if mod not in self.module_names:
                    continue  # functional op nodes (add, concat, reshape) have no channels of their own
                is_out = self.dg.is_out_channel_pruning_fn(dep.handler)
                items.append((self.module_names[mod], is_out, len(idxs)))
            groups_raw.append((lead_name, lead_handler, grp, items))
        groups_raw.sort(key=lambda g: rank.get(g[0], len(rank)))

        self.groups: list[Group] = []
        self._roots = {}
        self._handlers = {}
        member_of: dict[str, list[tuple[int, bool, float]]] = {}
        for gi, (name, handler, grp, items) in enumerate(groups_raw):
            root = self.modules[name]
            channels = len(grp[0].idxs)
            members = tuple(dict.fromkeys(n for n, is_out, _ in items if is_out))
            pinned = any(
                n in (first_layer, classifier) or any(fnmatch.fnmatchcase(n, pat) for pat in ignore)
                for n, is_out, _ in items
                if is_out
            )
            for n, is_out, count in items:
                member_of.setdefault(n, []).append((gi, is_out, count / channels))
            kind, kernel, stride, in_ch = _describe(root)
            self.groups.append(
                Group(
                    index=gi,
                    name=name,
                    channels=channels,
                    pinned=pinned,
                    module_type=kind,
                    in_channels=in_ch,
                    kernel=kernel,
                    stride=stride,
                    weights=sum(p.numel() for p in root.parameters(recurse=False)),
                    flops=0,
                    members=members,
                )
            )
            self._roots[name] = root
            self._handlers[name] = handler
        unknown = [pat for pat in ignore if not any(fnmatch.fnmatchcase(n, pat) for n in self.modules)]
        if unknown:
            raise InputError(f"--ignore {unknown[0]!r} matches no module of the model")

        self._terms: list[_Term] = []
        tracked_params = 0
        for n in self.modules:
            m = self.modules[n]
            own = sum(p.numel() for p in m.parameters(recurse=False))
            in_graph = n in member_of
            is_layer = isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
            if not (is_layer or (in_graph and own)):
                continue
            term = _make_term(n, m, *shapes.get(n, (None, None)))
            for gi, is_out, mult in member_of.get(n, []):
                target = term.out_terms if (is_out or term.kind == "depthwise") else term.in_terms
                if all(g != gi for g, _ in target):
                    target.append((gi, mult))
            self._terms.append(term)
            tracked_params += term.params_full
        self._const_params = count_params(self.model) - tracked_params

        zeros = [0.0] * len(self.groups)
        self.base_flops = count_flops(self.model, self.example_inputs)
        self.base_params = count_params(self.model)
        predicted = self._flops_removed(zeros)
        if abs(predicted - self.base_flops) > 0.5:
            self._flops_offset = self.base_flops - predicted  # ops the hooks see but the terms do not
        else:
            self._flops_offset = 0.0
        # FLOPs touched by each group: what the network loses if the group shrank to nothing
        self.groups = [
            _replace(g, flops=int(round(self._group_flops(g.index)))) for g in self.groups
        ]
        self.names = [g.name for g in self.groups if not g.pinned]
        self.by_name = {g.name: g for g in self.groups}

    # -- queries ------------------------------------------------------------------------------
    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if not g.pinned]

    def keep_counts(self, ratios: Mapping[str, float]) -> dict[str, int]:
        """Channels kept per group (pinned groups keep all)."""
        return {
            g.name: g.channels if g.pinned else keep_count(g.channels, ratios.get(g.name, 0.0))
            for g in self.groups
        }

    def _removed_vector(self, ratios: Mapping[str, float]) -> list[float]:
        counts = self.keep_counts(ratios)
        return [g.channels - counts[g.name] for g in self.groups]

    def _dims(self, term: _Term, removed: list[float]) -> tuple[float, float]:
        out = term.out_full - sum(removed[g] * m for g, m in term.out_terms)
        inp = term.in_full - sum(removed[g] * m for g, m in term.in_terms)
        return out, inp

    def _flops_removed(self, removed: list[float]) -> float:
        total = 0.0
        for t in self._terms:
            if t.kind in ("conv", "linear"):
                out, inp = self._dims(t, removed)
                total += t.macs_per_io * out * inp
            elif t.kind == "depthwise":
                out, _ = self._dims(t, removed)
                total += t.macs_per_io * out
        return total

    def _params_of(self, removed: list[float]) -> float:
        total = float(self._const_params)
        for t in self._terms:
            out, inp = self._dims(t, removed)
            if t.kind in ("conv", "linear"):
                total += t.weight_per_io * out * inp + (out if t.bias else 0)
            elif t.kind == "depthwise":
                total += t.weight_per_io * out + (out if t.bias else 0)
            else:  # norm layers and others scale with their channels
                total += t.params_full * (out / t.out_full if t.out_full else 1.0)
        return total

    def _group_flops(self, gi: int) -> float:
        full = [0.0] * len(self.groups)
        gone = list(full)
        gone[gi] = float(self.groups[gi].channels)
        return self._flops_removed(full) - self._flops_removed(gone)

    def flops(self, ratios: Mapping[str, float]) -> int:
        """Predicted FLOPs (MACs) of the model pruned by ``ratios``."""
        return int(round(self._flops_removed(self._removed_vector(ratios)) + self._flops_offset))

    def params(self, ratios: Mapping[str, float]) -> int:
        """Predicted parameter count of the model pruned by ``ratios``."""
        return int(round(self._params_of(self._removed_vector(ratios))))

    def cost(self, ratios: Mapping[str, float]) -> dict[str, float]:
        return {"flops": float(self.flops(ratios)), "params": float(self.params(ratios))}

    def check_names(self, ratios: Mapping[str, float]) -> None:
        unknown = sorted(set(ratios) - set(self.names))
        if unknown:
            raise InputError(f"{unknown[0]!r} is not a prunable group of this model")

    def layers(self) -> list[Layer]:
        """The conv and linear layers of the cost model, in execution order, with the groups that set
        their input and output channels and the shapes they see (for per-layer latency tables)."""
        if getattr(self, "_layers", None) is None:
            shapes = _io_shapes(self.model, self.example_inputs)
            names = [g.name for g in self.groups]
            terms = {t.name: t for t in self._terms if t.kind in ("conv", "depthwise", "linear")}
            self._layers = [
                Layer(
                    name=n, kind=terms[n].kind, in_channels=terms[n].in_full, out_channels=terms[n].out_full,
                    in_groups=tuple((names[g], m) for g, m in terms[n].in_terms),
                    out_groups=tuple((names[g], m) for g, m in terms[n].out_terms),
                    input_shape=shapes[n][0], output_shape=shapes[n][1],
                )
                for n in shapes if n in terms
            ]
        return list(self._layers)

    def describe(self) -> list[dict]:
        return [
            {
                "name": g.name,
                "channels": g.channels,
                "pinned": g.pinned,
                "type": g.module_type,
                "flops_share": g.flops / self.base_flops if self.base_flops else 0.0,
            }
            for g in self.groups
        ]


@dataclass(frozen=True)
class Layer:
    """A conv or linear layer as the cost model sees it (see :meth:`Space.layers`).

    ``in_groups`` / ``out_groups`` list ``(group name, layer channels per group channel)``: removing
    ``k`` channels of such a group removes ``k * per_channel`` of the layer's input (output) channels.
    Shapes are those of one sample of the example input (batch dimension 1).
    """

    name: str
    kind: str  # conv, depthwise or linear
    in_channels: int
    out_channels: int
    in_groups: tuple[tuple[str, float], ...]
    out_groups: tuple[tuple[str, float], ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


@torch.no_grad()
def _io_shapes(model: nn.Module, x: Any) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, output shape) of the first call of every conv and linear layer, in execution order."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            def hook(mod, inp, out, name=name):
                shapes.setdefault(name, (tuple(inp[0].shape), tuple(out.shape)))
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        call(model, x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def _replace(g: Group, **kw) -> Group:
    from dataclasses import replace

    return replace(g, **kw)


def _describe(m: nn.Module) -> tuple[str, int, int, int]:
    if isinstance(m, nn.modules.conv._ConvNd):
        kind = "depthwise" if m.groups > 1 and m.groups == m.in_channels else "conv"
        return kind, int(m.kernel_size[0]), int(m.stride[0]), int(m.in_channels)
    if isinstance(m, nn.Linear):
        return "linear", 1, 1, int(m.in_features)
    return type(m).__name__, 1, 1, 0


def _make_term(name: str, m: nn.Module, in_shape: tuple[int, ...] | None,
               out_shape: tuple[int, ...] | None) -> _Term:
    params_full = sum(p.numel() for p in m.parameters(recurse=False))
    if isinstance(m, nn.modules.conv._ConvNd):
        kernel = math.prod(m.kernel_size)
        # every weight runs once per output position, or per input position for a transposed conv
        shape = in_shape if m.transposed else out_shape
        positions = math.prod(shape[2:]) if shape else 0
        depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        if depthwise:
            return _Term(name, "depthwise", m.out_channels, m.in_channels, kernel * positions, kernel,
                         m.bias is not None, params_full)
        per_group = 1.0 / m.groups
        return _Term(name, "conv", m.out_channels, m.in_channels, kernel * positions * per_group,
                     kernel * per_group, m.bias is not None, params_full)
    if isinstance(m, nn.Linear):
        positions = (math.prod(out_shape[1:]) // m.out_features) if out_shape else 0
        return _Term(name, "linear", m.out_features, m.in_features, positions, 1.0, m.bias is not None,
                     params_full)
    channels = getattr(m, "num_features", None) or getattr(m, "num_channels", None) or params_full
    kind = "norm" if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) else "other"
    return _Term(name, kind, int(channels), 0, 0.0, 0.0, False, params_full)
