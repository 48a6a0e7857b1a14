"""The search space of a model: its prunable groups and an analytic cost model over them.

Coupled layers (a residual stream, a depthwise conv and its producer, the branches of a concat) must
lose the same channels, so torch-pruning's dependency graph (DepGraph, Fang et al., CVPR 2023) groups
them and one ratio decides each group. A group is named after the module path of its leading layer.

A ratio is the fraction of a group's *units* removed. A unit is one channel, except where the
architecture only allows larger ones:

- a grouped convolution (ResNeXt, RegNet) loses whole convolution groups: the channels it reads from its
  producer and the channels it writes, group by group, form one decision whose units are its groups
  (the group width stays, the number of groups shrinks);
- an attention module of a known kind (:mod:`autoprune.layers.attention`) offers its heads as a group
  named after the module, whose units are heads.

The graph is traced with the model in training mode when that runs more layers (auxiliary heads:
GoogLeNet, Inception v3), with batch norm kept in eval mode so that tracing changes nothing. Some
groups cannot be pruned and are *pinned*, each with the reason in :attr:`Space.pinned_reasons`: the
first layer, the layers producing the model's outputs (the classifier, auxiliary classifiers),
``ignore`` patterns, and channels that pass through a channel shuffle (a view that splits the channels
into groups and interleaves them: ShuffleNet), a split or slice of channels (whose sizes are fixed in the
model's code), or the residual stream of a transformer. A parameter held directly by a module that
torch-pruning does not know (not a layer) is refused (:class:`InputError` naming the module) unless
autoprune knows the module or a pruner is registered for it (:mod:`autoprune.layers`).

The analytic cost model predicts FLOPs (MACs, see :mod:`autoprune.cost`) and parameters of any
policy in microseconds without touching the model, which lets agents clip actions, bisect ratios and
project random samples onto a budget. It is exact for convolutions, linear layers, normalisation
layers and the attention modules autoprune knows (projections and matrix products); the tests check it
against the counter run on physically pruned models.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

from autoprune.cost import attention_modules, count_flops, count_params
from autoprune.errors import InputError
from autoprune.inputs import call, first_sample, map_tensors, tensors
from autoprune.layers import attention_layer, customized_pruners, known_parameter, pruner_for
from autoprune.layers.attention import AttentionLayer, StreamPruner


def keep_count(channels: int, ratio: float) -> int:
    """Units kept when ``ratio`` of ``channels`` units is removed: rounded to nearest, at least one."""
    removed = int(math.floor(ratio * channels + 0.5 + 1e-9))
    return max(1, channels - removed)


@dataclass(frozen=True)
class Group:
    """One pruning decision: a set of coupled channels, led by the layer ``name``.

    ``channels`` counts the decision's units, what a ratio is a fraction of: channels, or the
    convolution groups of a grouped convolution (``module_type`` ``"grouped"``), or the heads of an
    attention module (``"attention"``); ``unit`` is how many of the leading layer's channels one unit
    holds (1 for plain channels).
    """

    index: int
    name: str
    channels: int
    pinned: bool
    module_type: str  # "conv", "depthwise", "linear", "grouped", "attention" or the leading module's class
    in_channels: int
    kernel: int
    stride: int
    weights: int  # parameters of the leading layer
    flops: int  # MACs of every layer whose size depends on this group, unpruned
    members: tuple[str, ...] = ()  # modules whose channels this group removes
    unit: int = 1  # channels of the leading layer per unit


@dataclass(frozen=True)
class Part:
    """One torch-pruning group inside a decision: its root layer and handler (what
    ``DependencyGraph.get_pruning_group`` starts from), its channel count, and the unit each of its
    channels belongs to (None: channel ``i`` is unit ``i``)."""

    root: nn.Module
    handler: Any
    channels: int
    unit_of: tuple[int, ...] | None = None

    def channels_of(self, units: Iterable[int]) -> list[int]:
        """The part's channels that belong to ``units``."""
        units = set(units)
        if self.unit_of is None:
            return sorted(units)
        return [c for c, u in enumerate(self.unit_of) if u in units]


@dataclass(frozen=True)
class Heads:
    """A decision over the heads of one attention module."""

    module: nn.Module
    layer: AttentionLayer


@dataclass
class _Term:
    """One conv/linear/norm layer (or an attention module's projection or product) in the analytic model."""

    name: str
    kind: str  # conv, depthwise, grouped, linear, attention, norm, other
    out_full: int
    in_full: int
    macs_per_io: float  # MACs per (kept_out * kept_in) pair, or per kept_out for depthwise/grouped/attention
    weight_per_io: float
    bias: bool
    params_full: int
    out_terms: list[tuple[int, float]] = field(default_factory=list)  # (group index, channels per unit)
    in_terms: list[tuple[int, float]] = field(default_factory=list)


_PER_OUT = ("depthwise", "grouped", "attention")  # kinds whose cost scales with their outputs alone


class Space:
    """Prunable groups of ``model`` for inputs like ``example_inputs`` (a tensor, a tuple or a dict, by
    torch-pruning's convention: see :mod:`autoprune.inputs`).

    Use :meth:`from_model`. ``groups`` lists every group in a stable order (pinned ones included,
    flagged); ``names`` are the searchable (unpinned) ones, the keys of a policy's ratios;
    ``pinned_reasons`` says why each pinned group is pinned.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, ignore: Iterable[str] = ()) -> None:
        self.model = model
        self.example_inputs = map_tensors(first_sample(example_inputs), lambda t: t.detach())
        model.eval()
        self.module_names = {m: n for n, m in model.named_modules()}
        self.modules = dict(model.named_modules())
        self.trace = _trace(model, self.example_inputs)
        self.dg = self.trace.dg
        self._build(list(ignore))

    @classmethod
    def from_model(cls, model: nn.Module, example_inputs: Any, ignore: Iterable[str] = ()) -> Space:
        return cls(model, example_inputs, ignore)

    # -- construction -------------------------------------------------------------------------
    def _build(self, ignore: list[str]) -> None:
        shapes, tokens, order = _io_shapes(self.model, self.example_inputs)
        weighted = [n for n in order if n in shapes]
        if not weighted and not tokens:
            raise InputError("the model has no convolution or linear layer to prune")
        first_layer = weighted[0] if weighted else None
        classifier = weighted[-1] if weighted else None
        rank = {n: i for i, n in enumerate(order)}  # execution order of layers and attention modules
        unknown = [pat for pat in ignore if not any(fnmatch.fnmatchcase(n, pat) for n in self.modules)]
        if unknown:
            raise InputError(f"--ignore {unknown[0]!r} matches no module of the model")

        specs = []  # (rank, lead, raw groups or an attention module, units, kind, problem)
        for members_raw, units, kind, problem in self._merge_grouped_convs(self._raw_groups(rank)):
            lead_rank, lead = min((r["rank"], r["lead"]) for r in members_raw)
            specs.append((lead_rank, lead, members_raw, units, kind, problem))
        for name in tokens:
            module = self.modules[name]
            layer = attention_layer(module)
            if layer is not None and layer.prunable(module) and layer.heads(module) > 1:
                specs.append((rank[name], name, module, layer.heads(module), "attention", ""))
        specs.sort(key=lambda s: (s[0], s[1]))

        self.groups: list[Group] = []
        self.pinned_reasons: dict[str, str] = {}
        self._parts: dict[str, list[Part]] = {}
        self._heads: dict[str, Heads] = {}
        member_of: dict[str, list[tuple[int, bool, float]]] = {}
        refusals: list[tuple[str, tuple[str, str, str]]] = []
        for _, lead, what, units, kind, problem in specs:
            gi = len(self.groups)
            if kind == "attention":
                layer = attention_layer(what)
                outs = [lead]
                hazard = ""
            else:
                outs = [n for r in what for n, is_out, _ in r["items"] if is_out]
                hazard = problem or next((r["hazard"] for r in what if r["hazard"]), "")
            why = ""
            pattern = next((p for p in ignore for n in outs if fnmatch.fnmatchcase(n, p)), None)
            if first_layer in outs:
                why = "the first layer"
            elif classifier in outs or any(n in self.trace.outputs for n in outs):
                out = classifier if classifier in outs else next(n for n in outs if n in self.trace.outputs)
                why = "produces the model's output" if out == lead else f"{out} produces the model's output"
            elif pattern is not None:
                why = f"--ignore {pattern}"
            else:
                why = hazard
            if kind == "attention":
                self.groups.append(Group(
                    index=gi, name=lead, channels=units, pinned=bool(why), module_type="attention",
                    in_channels=layer.in_features(what), kernel=1, stride=1, weights=layer.qkv(what)[0].numel(),
                    flops=0, members=(lead,), unit=layer.head_dim(what),
                ))
                self._heads[lead] = Heads(what, layer)
            else:
                if not why:
                    refusals += [(lead, r["unknown"]) for r in what if r["unknown"]]
                for r in what:
                    for n, is_out, count in r["items"]:
                        member_of.setdefault(n, []).append((gi, is_out, count / units))
                root = self.modules[lead]
                module_kind, k, stride, in_ch = _describe(root)
                leading = next(r for r in what if r["lead"] == lead)
                self.groups.append(Group(
                    index=gi, name=lead, channels=units, pinned=bool(why),
                    module_type="grouped" if kind == "grouped" else module_kind, in_channels=in_ch, kernel=k,
                    stride=stride, weights=sum(p.numel() for p in root.parameters(recurse=False)), flops=0,
                    members=tuple(dict.fromkeys(outs)), unit=max(1, leading["channels"] // units),
                ))
                self._parts[lead] = [Part(r["root"], r["handler"], r["channels"], r.get("unit_of")) for r in what]
            if why:
                self.pinned_reasons[lead] = why
        if refusals:
            lead, (module, cls, what) = refusals[0]
            raise InputError(
                f"module {module!r} ({cls}) holds {what} that the channels of group {lead!r} run "
                f"through, and torch-pruning does not know {cls}: register a pruner for it "
                f"(autoprune.register_pruner({cls}, ...), see the README) or keep the group whole with "
                f"--ignore {lead!r}"
            )

        self._terms = self._make_terms(shapes, tokens, member_of)
        tracked_params = sum(t.params_full for t in self._terms)
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
        self.groups = [_replace(g, flops=int(round(self._group_flops(g.index)))) for g in self.groups]
        self.names = [g.name for g in self.groups if not g.pinned]
        self.by_name = {g.name: g for g in self.groups}

    def _raw_groups(self, rank: dict[str, int]) -> list[dict[str, Any]]:
        """torch-pruning's groups, each with its leading layer, members, and what keeps it whole."""
        dg = self.dg
        roots = (nn.modules.conv._ConvNd, nn.Linear, *self.trace.customized)
        raw = []
        for grp in dg.get_all_groups(root_module_types=roots):
            if grp[0].dep.target.module not in self.module_names:
                continue
            # the leading layer: the first conv/linear to run among those whose outputs the group cuts
            leads = [(rank[self.module_names[dep.target.module]], self.module_names[dep.target.module],
                      dep.handler)
                     for dep, _ in grp
                     if self.module_names.get(dep.target.module) in rank
                     and dg.is_out_channel_pruning_fn(dep.handler)]
            if leads:
                lead_rank, lead, handler = min(leads)
            else:
                lead_rank, lead, handler = len(rank), self.module_names[grp[0].dep.target.module], grp[0].dep.handler
            items, hazard, unknown = [], "", None
            for dep, idxs in grp:
                target = dep.target
                hazard = hazard or self._hazard(target)
                if target.type == tp.ops.OPTYPE.PARAMETER:
                    name = dg._param_to_name.get(target.module)
                    owner_name, _, attr = name.rpartition(".")
                    owner = self.modules.get(owner_name, self.model)
                    if not known_parameter(owner, attr) and unknown is None:
                        unknown = (owner_name or "(the model)", type(owner).__name__, f"a parameter {attr!r}")
                    items.append((f"param:{name}", True, len(idxs)))
                    continue
                mod = target.module
                if mod not in self.module_names:
                    # functional op nodes (add, concat, reshape) have no channels of their own, but the module
                    # they ran in may hold some that torch-pruning does not see
                    where = self.trace.sites.get(target.grad_fn)
                    state = self._unknown_state(self.modules[where]) if where is not None else None
                    if state is not None and unknown is None:
                        unknown = (where or "(the model)", type(self.modules[where]).__name__, state)
                    continue
                is_out = dg.is_out_channel_pruning_fn(dep.handler)
                items.append((self.module_names[mod], is_out, len(idxs)))
            raw.append({"rank": lead_rank, "lead": lead, "handler": handler, "root": self.modules[lead],
                        "channels": len(grp[0].idxs), "group": grp, "items": items, "hazard": hazard,
                        "unknown": unknown})
        return raw

    def _unknown_state(self, m: nn.Module) -> str | None:
        """The first parameter or buffer ``m`` holds itself that nothing in autoprune or torch-pruning knows
        how to cut (None when there is none: a layer torch-pruning prunes, a module with a registered
        pruner, a block whose bare parameters autoprune knows, or one without state of its own)."""
        if m in self.dg.module2node or type(m) in self.trace.customized or attention_layer(m) is not None:
            return None
        for attr, _ in m.named_parameters(recurse=False):
            if not known_parameter(m, attr):
                return f"a parameter {attr!r}"
        if pruner_for(m) is None:
            for attr, _ in m.named_buffers(recurse=False):
                return f"a buffer {attr!r}"
        return None

    def _hazard(self, node) -> str:
        """Why channels passing through graph node ``node`` cannot be removed ('' when they can)."""
        if node.type == tp.ops.OPTYPE.CUSTOMIZED and attention_layer(node.module) is not None:
            return f"the residual stream of {self.module_names.get(node.module, 'an attention module')} (kept whole)"
        grad_fn = node.grad_fn
        where = self.trace.sites.get(grad_fn, "")
        at = f" in {where}" if where else ""
        if grad_fn in self.trace.regroups:
            return f"channel shuffle{at} (a view that splits the channels into groups reorders them)"
        if node in self.trace.cuts:
            return f"a {self.trace.cuts[node]} of the channels{at} (its sizes are fixed in the model's code)"
        return ""

    def _merge_grouped_convs(self, raw: list[dict[str, Any]]) -> list[tuple[list[dict], int, str, str]]:
        """Decisions: one per torch-pruning group, except that the groups feeding and leaving a grouped
        convolution merge into one decision over its convolution groups. Returns ``(raw groups, units,
        kind, problem)``; ``problem`` pins a decision whose channels do not fall into whole groups."""
        where: dict[tuple[nn.Module, bool], int] = {}
        for i, r in enumerate(raw):
            for dep, _ in r["group"]:
                where.setdefault((dep.target.module, self.dg.is_out_channel_pruning_fn(dep.handler)), i)
        parent = list(range(len(raw)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        grouped = [m for m in self.modules.values() if _is_grouped(m)]
        for conv in grouped:
            a, b = where.get((conv, False)), where.get((conv, True))
            if a is not None and b is not None:
                parent[find(a)] = find(b)
        components: dict[int, list[int]] = {}
        for i in range(len(raw)):
            components.setdefault(find(i), []).append(i)
        out = []
        for ids in components.values():
            convs = [m for m in grouped if where.get((m, True)) in ids or where.get((m, False)) in ids]
            if not convs:
                r = raw[ids[0]]
                out.append(([r], r["channels"], "channels", ""))
                continue
            parts, problem = self._units_of(ids, raw, convs)
            out.append((parts, convs[0].groups, "grouped", problem))
        return out

    def _units_of(self, ids: list[int], raw: list[dict], convs: list[nn.Module]) -> tuple[list[dict], str]:
        """Each raw group of a grouped-conv decision with the convolution group of each of its channels."""
        groups = {m.groups for m in convs}
        name = self.module_names[convs[0]]
        if len(groups) > 1:
            return [raw[i] for i in ids], (f"grouped convolutions with different group counts share channels "
                                           f"({name}: {convs[0].groups})")
        parts, problem = [], ""
        for i in ids:
            r = dict(raw[i])
            unit_of: list[int | None] = [None] * r["channels"]
            for dep, idxs in r["group"]:
                m = dep.target.module
                if m not in convs or not len(idxs):
                    continue
                is_out = self.dg.is_out_channel_pruning_fn(dep.handler)
                width = (m.out_channels if is_out else m.in_channels) // m.groups
                roots = dep_roots(idxs)
                for plain, root in zip(tp._helpers.to_plain_idxs(idxs), roots):
                    if root is None:
                        continue
                    u = int(plain) // width
                    if unit_of[root] is not None and unit_of[root] != u:
                        problem = problem or f"channels of {name} do not fall into whole convolution groups"
                    unit_of[root] = u
            if any(u is None for u in unit_of):
                problem = problem or f"some channels beside {name}'s do not pass through its convolution groups"
                unit_of = [u if u is not None else 0 for u in unit_of]
            r["unit_of"] = tuple(unit_of)
            parts.append(r)
        return parts, problem

    def _make_terms(self, shapes, tokens, member_of) -> list[_Term]:
        terms: list[_Term] = []
        inside = attention_modules(self.model)
        for n, m in self.modules.items():
            if m in inside:
                continue  # counted by the attention module's own terms below
            own = sum(p.numel() for p in m.parameters(recurse=False))
            in_graph = n in member_of
            is_layer = isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
            if attention_layer(m) is not None:
                terms += self._attention_terms(n, m, tokens.get(n))
                continue
            if not (is_layer or (in_graph and own)):
                continue
            term = _make_term(n, m, *shapes.get(n, (None, None)))
            self._attach(term, member_of.get(n, []))
            terms.append(term)
        for n, entries in member_of.items():  # bare parameters that groups cut
            if n.startswith("param:"):
                p = self.model.get_parameter(n[len("param:"):])
                dim = self.dg.module2node[p].pruning_dim if p in self.dg.module2node else -1
                term = _Term(n, "other", int(p.shape[dim]), 0, 0.0, 0.0, False, p.numel())
                self._attach(term, entries)
                terms.append(term)
        return terms

    @staticmethod
    def _attach(term: _Term, entries: list[tuple[int, bool, float]]) -> None:
        for gi, is_out, mult in entries:
            if term.kind == "grouped" and not is_out:
                continue  # its inputs are the same decision as its outputs, counted once through them
            target = term.out_terms if (is_out or term.kind == "depthwise") else term.in_terms
            if all(g != gi for g, _ in target):
                target.append((gi, mult))

    def _attention_terms(self, name: str, m: nn.Module, tok: tuple[int, int, int] | None) -> list[_Term]:
        layer = attention_layer(m)
        heads, hd = layer.heads(m), layer.head_dim(m)
        inner = heads * hd
        tq, tkv, keys = tok or (0, 0, 0)
        gi = self._index_of(name)
        decision = [gi] if gi is not None else []  # none when its heads cannot be removed
        w, b = layer.qkv(m)
        o, ob = layer.proj(m)
        qkv = _Term(f"{name}:qkv", "linear", 3 * inner, layer.in_features(m), (tq + 2 * tkv) / 3, 1.0,
                    b is not None, w.numel() + (b.numel() if b is not None else 0),
                    out_terms=[(g, 3.0 * hd) for g in decision])
        proj = _Term(f"{name}:proj", "linear", layer.out_features(m), inner, float(tq), 1.0, ob is not None,
                     o.numel() + (ob.numel() if ob is not None else 0), in_terms=[(g, float(hd)) for g in decision])
        products = _Term(f"{name}:attention", "attention", inner, 0, 2.0 * tq * keys, 0.0, False, 0,
                         out_terms=[(g, float(hd)) for g in decision])
        terms = [qkv, proj, products]
        for table, _dim in layer.head_tables(m):
            p = m.get_parameter(table)
            terms.append(_Term(f"{name}:{table}", "other", heads, 0, 0.0, 0.0, False, p.numel(),
                               out_terms=[(g, 1.0) for g in decision]))
        return terms

    def _index_of(self, name: str) -> int | None:
        for g in self.groups:
            if g.name == name:
                return g.index
        return None

    # -- queries ------------------------------------------------------------------------------
    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if not g.pinned]

    def parts(self, name: str) -> list[Part]:
        """The torch-pruning groups a channel decision cuts (empty for a heads decision)."""
        return self._parts.get(name, [])

    def unit_index(self, name: str, module_name: str) -> torch.Tensor | None:
        """For decision ``name`` and a module whose output channels it cuts: the unit of each of the
        module's output channels (None when every channel is its own unit)."""
        for part in self.parts(name):
            if part.unit_of is None:
                continue
            for dep, idxs in self.dg.get_pruning_group(part.root, part.handler, list(range(part.channels))):
                if self.module_names.get(dep.target.module) != module_name or not len(idxs):
                    continue
                if not self.dg.is_out_channel_pruning_fn(dep.handler):
                    continue
                plain = tp._helpers.to_plain_idxs(idxs)
                index = torch.zeros(max(plain) + 1, dtype=torch.long)
                index[torch.tensor(plain)] = torch.tensor([part.unit_of[r] for r in dep_roots(idxs)])
                return index
        return None

    def heads(self, name: str) -> Heads | None:
        """The attention module whose heads decision ``name`` is (None for a channel decision)."""
        return self._heads.get(name)

    def keep_counts(self, ratios: Mapping[str, float]) -> dict[str, int]:
        """Units kept per group (pinned groups keep all)."""
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
            elif t.kind in _PER_OUT:
                out, _ = self._dims(t, removed)
                total += t.macs_per_io * out
        return total

    def _params_of(self, removed: list[float]) -> float:
        total = float(self._const_params)
        for t in self._terms:
            out, inp = self._dims(t, removed)
            if t.kind in ("conv", "linear"):
                total += t.weight_per_io * out * inp + (out if t.bias else 0)
            elif t.kind in ("depthwise", "grouped"):
                total += t.weight_per_io * out + (out if t.bias else 0)
            elif t.kind != "attention":  # norm layers and others scale with their channels
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
            shapes, _, _ = _io_shapes(self.model, self.example_inputs)
            names = [g.name for g in self.groups]
            terms = {t.name: t for t in self._terms if t.kind in ("conv", "depthwise", "grouped", "linear")}
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

    ``in_groups`` / ``out_groups`` list ``(group name, layer channels per group unit)``: removing
    ``k`` units of such a group removes ``k * per_unit`` of the layer's input (output) channels.
    Shapes are those of one sample of the example input (batch dimension 1).
    """

    name: str
    kind: str  # conv, depthwise, grouped or linear
    in_channels: int
    out_channels: int
    in_groups: tuple[tuple[str, float], ...]
    out_groups: tuple[tuple[str, float], ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def dep_roots(idxs) -> list[int | None]:
    """The root channel of each of a group item's indices."""
    if len(idxs) and isinstance(idxs[0], tp._helpers._HybridIndex):
        return [i.root_idx for i in idxs]
    return list(idxs)


def _is_grouped(m: nn.Module) -> bool:
    """A convolution with several groups that is not depthwise (whose channels torch-pruning couples)."""
    return (isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1
            and tp.ops.module2type(m) != tp.ops.OPTYPE.DEPTHWISE_CONV)


def _channel_dim(grad_fn) -> bool:
    """Whether a split or slice node acts on dimension 1 (the channels of a conv feature map)."""
    dim = getattr(grad_fn, "_saved_dim", None)
    if dim is None:
        return True
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None) or getattr(grad_fn, "_saved_self_sizes", None)
    ndim = len(sizes) if sizes is not None else 4
    return int(dim) % max(ndim, 1) == 1


# -- tracing ----------------------------------------------------------------------------------------


@dataclass
class Trace:
    """What tracing ``model`` found besides torch-pruning's graph: the layers producing the model's
    outputs, the channel-shuffle views (grad_fn -> module), the splits and slices of channels (graph
    node -> "split" or "slice"), where every op ran (grad_fn -> module, for messages), the
    classes handled by customized pruners, and the mode the graph was traced in."""

    dg: tp.DependencyGraph
    outputs: set[str]
    regroups: dict[Any, str]
    cuts: dict[Any, str]
    sites: dict[Any, str]
    customized: tuple[type, ...]
    mode: str


class _Regroup(torch.autograd.Function):
    """Marks a view that splits the channel dimension into (groups, channels per group), or merges them
    back, in the traced graph. torch-pruning reads it as an element-wise op (its name holds none of the
    words it maps: view, reshape, cat, split), so the graph stays whole, and the group through it is pinned."""

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        return x.reshape(shape).clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(ctx.shape), None


_VIEWS = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten,
          torch.Tensor.unflatten, torch.unflatten}


def _regroups_channels(before: tuple[int, ...], after: tuple[int, ...]) -> bool:
    """(N, C, ...) -> (N, G, C/G, ...) or back, with G and C/G both above 1."""
    def split(a, b):
        return (len(a) >= 2 and len(b) == len(a) + 1 and b[0] == a[0] and b[1] * b[2] == a[1]
                and tuple(b[3:]) == tuple(a[2:]) and b[1] > 1 and b[2] > 1)

    return split(before, after) or split(after, before)


class _Watch(TorchFunctionMode):
    """While the graph is traced: marks channel regrouping views, and notes the module each op ran in."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.regroups: dict[Any, str] = {}
        self.sites: dict[Any, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not isinstance(out, torch.Tensor) or out.grad_fn is None:
            for t in out if isinstance(out, (tuple, list)) else ():
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    self.sites.setdefault(t.grad_fn, self.stack[-1] if self.stack else "")
            return out
        where = self.stack[-1] if self.stack else ""
        x = args[0] if args else None
        if func in _VIEWS and isinstance(x, torch.Tensor) and _regroups_channels(tuple(x.shape), tuple(out.shape)):
            out = _Regroup.apply(x, tuple(out.shape))
            self.regroups[out.grad_fn] = where
        self.sites.setdefault(out.grad_fn, where)
        return out


def _run_modes(model: nn.Module, x: Any) -> dict[str, set[str]]:
    """The modules each mode runs: ``eval``, and ``train`` with batch norm and dropout left in eval mode
    (auxiliary heads that only run in training); ``train`` is missing when that forward fails (a model
    that needs targets to train)."""
    out = {}
    for mode in ("eval", "train"):
        seen: set[str] = set()
        handles = [m.register_forward_hook(lambda mod, i, o, n=n, seen=seen: seen.add(n))
                   for n, m in model.named_modules() if n]
        try:
            with _mode(model, mode), torch.no_grad(), torch.random.fork_rng(devices=[]):
                call(model, x)
            out[mode] = seen
        except Exception:  # noqa: BLE001 - only eval must run; training-mode tracing is optional
            if mode == "eval":
                raise
        finally:
            for h in handles:
                h.remove()
    return out


@contextlib.contextmanager
def _mode(model: nn.Module, mode: str):
    saved = {m: m.training for m in model.modules()}
    model.train(mode == "train")
    if mode == "train":
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
                m.eval()  # running statistics untouched, the graph the same every time
    try:
        yield
    finally:
        for m, training in saved.items():
            m.training = training


def _trace(model: nn.Module, x: Any) -> Trace:
    """torch-pruning's dependency graph of ``model``, traced in the mode that runs every layer (both when
    neither does), with attention modules as single layers and channel shuffles marked."""
    ran = _run_modes(model, x)
    train = ran.get("train")
    if train is None or train <= ran["eval"]:
        modes = ["eval"]
    elif ran["eval"] <= train:
        modes = ["train"]
    else:
        modes = ["eval", "train"]
    pruners = customized_pruners(model)
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    outputs: set[str] = set()
    watch = _Watch(stack)
    attention = {m: attention_layer(m) for m in model.modules() if attention_layer(m) is not None}

    def forward(net: nn.Module, inputs: Any) -> Any:
        results = []
        for mode in modes:
            with _mode(net, mode):
                results.append(call(net, inputs))
        for result in results:
            for t in tensors(result):
                name = getattr(t, "_autoprune_layer", None)  # set by the hook of the layer that made it
                if name is not None:
                    outputs.add(name)
        return results

    def pre(mod, args):
        stack.append(names.get(mod, ""))

    def post(mod, args, output):
        if stack:
            stack.pop()
        if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(output, torch.Tensor):
            output._autoprune_layer = names.get(mod, "")

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    for m, layer in attention.items():  # one step from input to output: the graph sees no reshape inside
        m.forward = lambda *a, _m=m, _l=layer, **k: _l.stand_in(_m, *a, **k)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), watch:
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=x, forward_fn=forward, customized_pruners=pruners, verbose=False)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - torch-pruning's failures become one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise InputError(f"torch-pruning cannot trace the model's dependency graph: {type(e).__name__}: {first}; "
                         "register a pruner for the module it stops at (see the README) or give another model"
                         ) from e
    finally:
        for h in handles:
            h.remove()
        for m in attention:
            m.__dict__.pop("forward", None)
    model.eval()
    cuts = _unmap_channel_splits(dg)
    customized = tuple(cls for cls, p in pruners.items() if not isinstance(p, StreamPruner))
    return Trace(dg, outputs, watch.regroups, cuts, watch.sites, customized, "+".join(modes))


def _unmap_channel_splits(dg: tp.DependencyGraph) -> dict[Any, str]:
    """Take splits and slices of channels out of torch-pruning's index mapping, and return them (graph
    node -> "split" or "slice"). The groups holding them are pinned (their sizes are fixed in the
    model's code), and the mappings torch-pruning infers for them can be wrong (a chunk's offsets read
    from neighbouring layers) and fail while groups are formed; as element-wise nodes the indices pass
    through them unchanged."""
    cut = {n: ("split" if n.type == tp.ops.OPTYPE.SPLIT else "slice") for n in dg.module2node.values()
           if n.type in (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.SLICE) and _channel_dim(n.grad_fn)}
    for node in cut:
        node.type = tp.ops.OPTYPE.ELEMENTWISE  # update_index_mapping, run again for every group, skips it
    if cut:
        for node in dg.module2node.values():
            for dep in node.dependencies:
                if dep.source in cut or dep.target in cut:
                    dep.index_mapping = [None, None]
    return cut


@torch.no_grad()
def _io_shapes(model: nn.Module, x: Any) -> tuple[dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
                                                   dict[str, tuple[int, int, int]], list[str]]:
    """(input shape, output shape) of the first call of every conv and linear layer (those inside
    attention modules are the attention's own), the tokens of every attention module of a known kind
    (see :meth:`AttentionLayer.tokens`), and the names of both in execution order."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    tokens: dict[str, tuple[int, int, int]] = {}
    order: dict[str, None] = {}
    inside = attention_modules(model)
    handles = []
    for name, m in model.named_modules():
        layer = attention_layer(m)
        if layer is not None:
            def attn_hook(mod, args, kwargs, out, name=name, layer=layer):
                tokens.setdefault(name, layer.tokens(mod, args, kwargs))
                order.setdefault(name)
            handles.append(m.register_forward_hook(attn_hook, with_kwargs=True))
        elif isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m not in inside:
            def hook(mod, inp, out, name=name):
                shapes.setdefault(name, (tuple(inp[0].shape), tuple(out.shape)))
                order.setdefault(name)
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        call(model, x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes, tokens, list(order)


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
        if m.groups > 1:  # whole groups go: each output channel keeps reading in_channels / groups inputs
            width = m.in_channels // m.groups
            return _Term(name, "grouped", m.out_channels, m.in_channels, kernel * positions * width,
                         kernel * width, m.bias is not None, params_full)
        return _Term(name, "conv", m.out_channels, m.in_channels, kernel * positions, kernel,
                     m.bias is not None, params_full)
    if isinstance(m, nn.Linear):
        positions = (math.prod(out_shape[1:]) // m.out_features) if out_shape else 0
        return _Term(name, "linear", m.out_features, m.in_features, positions, 1.0, m.bias is not None,
                     params_full)
    pruner = pruner_for(m)
    channels = getattr(m, "num_features", None) or getattr(m, "num_channels", None)
    if isinstance(m, nn.LayerNorm):
        channels = m.normalized_shape[-1]
    if channels is None and pruner is not None:
        channels = pruner.get_out_channels(m)
    channels = channels or params_full
    kind = "norm" if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) else "other"
    return _Term(name, kind, int(channels), 0, 0.0, 0.0, False, params_full)
