"""Physical channel removal: apply a policy to a copy of a model.

The dependency graph is traced once per base model. For a policy, each group's units to remove are
chosen by the criterion, mapped to the channels of each torch-pruning group the decision holds and
through the graph to every coupled layer, and merged per layer; each layer is then cut once on a fresh
copy. Because every index refers to the unpruned model, the result does not depend on the order of
groups, and no graph is re-traced per candidate.

Beside torch-pruning's own layer pruners this cuts bare parameters (ConvNeXt's layer scale), removes
whole groups of a grouped convolution (its ``groups`` shrinks, each group keeps its width), and removes
heads of attention modules (:mod:`autoprune.layers.attention`).
"""

from __future__ import annotations

import copy
import zlib

import torch
import torch_pruning as tp
from torch import nn

from autoprune.errors import InputError
from autoprune.policy import Policy
from autoprune.pruning.criteria import Calibration, Statistics, get_criterion
from autoprune.space import Part, Space, dep_roots, keep_count

_Item = tuple  # (target name, handler, pruning dim, layer indices, root channels)


def prune_grouped_conv_inputs(layer: nn.Module, idxs) -> nn.Module:
    """Remove the inputs ``idxs`` of a grouped convolution that loses whole groups: its weight keeps its
    per-group input width, its ``groups`` and ``in_channels`` shrink (the filters of those groups go with
    its outputs, cut by the output pruner)."""
    width = layer.in_channels // layer.groups
    if len(idxs) % width:
        raise InputError(f"inputs {list(idxs)[:4]}... of a grouped convolution are not whole groups of {width}")
    layer.groups -= len(idxs) // width
    layer.in_channels -= len(idxs)
    return layer


class ChannelPruner:
    """Applies channel policies to copies of ``space.model``.

    ``calibration`` (a callable returning the same device batches each call) is what the data-reading
    criteria (``DATA_CRITERIA``: taylor, apoz, lda, ...) read, run and scored through ``task`` (its forward and
    loss; default ``model(batch[0])`` and cross-entropy); without it they raise :class:`InputError`.
    ``seed`` seeds the ``random`` criterion. Attention heads are ranked by the magnitude of their
    projection weights (``l2`` for ``--criterion l2``, else ``l1``), or randomly for ``random``.
    A policy with ``reconstruct`` also has every conv/linear layer that reads pruned channels refitted by
    least squares on the calibration batches (:func:`autoprune.pruning.regression.refit`).
    """

    def __init__(self, space: Space, calibration: Calibration | None = None, seed: int = 0, task=None) -> None:
        self.space = space
        self.seed = seed
        self.statistics = Statistics(space, calibration, seed, task)
        self._scores: dict[str, dict[str, torch.Tensor]] = {}
        self._full_groups: dict[int, object] = {}
        self._maps: dict[int, list[_Item] | None] = {}

    def _full_group(self, part: Part):
        key = id(part)
        if key not in self._full_groups:
            self._full_groups[key] = self.space.dg.get_pruning_group(part.root, part.handler,
                                                                       list(range(part.channels)))
        return self._full_groups[key]

    def _target(self, dep) -> tuple[str | None, object]:
        """The name a graph item is cut under (``param:<name>`` for a bare parameter) and its handler."""
        target = dep.target
        if target.type == tp.ops.OPTYPE.PARAMETER:
            return "param:" + self.space.dg._param_to_name[target.module], dep.handler
        name = self.space.module_names.get(target.module)
        handler = dep.handler
        if (name is not None and isinstance(target.module, nn.modules.conv._ConvNd) and target.module.groups > 1
                and tp.ops.module2type(target.module) != tp.ops.OPTYPE.DEPTHWISE_CONV
                and not self.space.dg.is_out_channel_pruning_fn(handler)):
            handler = prune_grouped_conv_inputs
        return name, handler

    def _item_map(self, part: Part) -> list[_Item] | None:
        """For every layer the part touches: its handler and, per layer index, the root channel."""
        key = id(part)
        if key not in self._maps:
            items = []
            for dep, idxs in self._full_group(part):
                name, handler = self._target(dep)
                if name is None or len(idxs) == 0:
                    continue  # functional op nodes (add, concat, reshape) carry no weights
                plain = torch.tensor(tp._helpers.to_plain_idxs(idxs))
                roots = dep_roots(idxs)
                if any(r is None for r in roots) or max(roots) >= part.channels:
                    items = None  # index mapping through concat/split: ask the graph per policy instead
                    break
                items.append((name, handler, dep.target.pruning_dim, plain, torch.tensor(roots)))
            self._maps[key] = items
        return self._maps[key]

    def _items_for(self, part: Part, idxs: list[int]) -> list[tuple[str, object, int, torch.Tensor]]:
        """(target, handler, pruning dim, layer indices) removed when channels ``idxs`` leave ``part``."""
        items = self._item_map(part)
        if items is not None:
            chosen = torch.zeros(part.channels, dtype=torch.bool)
            chosen[idxs] = True
            return [(m, h, d, plain[chosen[root]]) for m, h, d, plain, root in items]
        out = []
        for dep, item_idxs in self.space.dg.get_pruning_group(part.root, part.handler, idxs):
            name, handler = self._target(dep)
            if name is not None and len(item_idxs):
                plain = torch.tensor(tp._helpers.to_plain_idxs(item_idxs))
                out.append((name, handler, dep.target.pruning_dim, plain))
        return out

    def scores(self, criterion: str) -> dict[str, torch.Tensor]:
        """Importance of every unit of every prunable group, computed once per criterion: the mean over
        a unit's channels of their scores, averaged over the torch-pruning groups a decision holds."""
        if criterion not in self._scores:
            score = get_criterion(criterion, self.statistics)
            out = {}
            with torch.no_grad():
                for g in self.space.prunable:
                    heads = self.space.heads(g.name)
                    if heads is not None:
                        out[g.name] = self._head_scores(g.name, heads, criterion)
                        continue
                    per_part = []
                    for part in self.space.parts(g.name):
                        s = score(self._full_group(part))
                        if s is None:  # torch-pruning gives None when no layer of the group has weights
                            s = torch.zeros(part.channels)
                        s = s.detach().float().cpu()
                        if part.unit_of is not None:
                            unit = torch.tensor(part.unit_of)
                            s = torch.zeros(g.channels).index_add_(0, unit, s) / torch.bincount(
                                unit, minlength=g.channels).clamp_min(1)
                        per_part.append(s)
                    out[g.name] = torch.stack(per_part).mean(0)
            self._scores[criterion] = out
        return self._scores[criterion]

    def _head_scores(self, name: str, heads, criterion: str) -> torch.Tensor:
        if criterion == "random":
            gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))
            return torch.rand(heads.layer.heads(heads.module), generator=gen)
        return heads.layer.head_scores(heads.module, 2 if criterion == "l2" else 1).cpu()

    def removed_channels(self, policy: Policy) -> dict[str, list[int]]:
        """Units (indices into the unpruned group: channels, convolution groups or heads) that ``policy``
        removes from each group: the complement of ``policy.keep`` where the policy names the kept
        units, else the lowest-scoring ones."""
        self.space.check_names(policy.ratios)
        keep = policy.keep or {}
        self.space.check_names(keep)
        removed = {}
        for g in self.space.prunable:
            kept = keep_count(g.channels, policy.ratios.get(g.name, 0.0))
            if g.name in keep:
                idxs = keep[g.name]
                if len(idxs) != kept or idxs[-1] >= g.channels:
                    raise InputError(
                        f"policy 'keep' for {g.name!r} lists {len(idxs)} channel(s) (largest index {idxs[-1]}); "
                        f"its ratio keeps {kept} of {g.channels}"
                    )
                gone = sorted(set(range(g.channels)) - set(idxs))
                if gone:
                    removed[g.name] = gone
                continue
            n = g.channels - kept
            if n > 0:
                order = torch.argsort(self.scores(policy.criterion)[g.name], stable=True)
                removed[g.name] = sorted(order[:n].tolist())
        return removed

    def prune(self, policy: Policy, model: nn.Module | None = None) -> nn.Module:
        """A pruned deep copy of the base model (``model`` must share its architecture and names)."""
        if policy.granularity != "channel":
            raise InputError(f"granularity {policy.granularity!r} is not supported by the channel pruner")
        base = self.space.model if model is None else model
        cuts: dict[tuple[str, str], tuple[object, int, list[torch.Tensor]]] = {}
        heads: dict[str, list[int]] = {}
        for name, units in self.removed_channels(policy).items():
            if self.space.heads(name) is not None:
                heads[name] = units
                continue
            for part in self.space.parts(name):
                for target, handler, pruning_dim, layer_idxs in self._items_for(part, part.channels_of(units)):
                    entry = cuts.setdefault((target, handler.__name__), (handler, pruning_dim, []))
                    entry[2].append(layer_idxs)
        pruned = copy.deepcopy(base)
        modules = dict(pruned.named_modules())
        for (target, _), (handler, pruning_dim, parts) in cuts.items():
            idxs = sorted(set(torch.cat(parts).tolist()))
            if hasattr(handler, "__self__"):
                handler.__self__.pruning_dim = pruning_dim
            if target.startswith("param:"):
                owner_name, _, attr = target[len("param:"):].rpartition(".")
                owner = modules[owner_name]
                setattr(owner, attr, handler(getattr(owner, attr), idxs))
            else:
                handler(modules[target], idxs)
        for name, units in heads.items():
            self.space.heads(name).layer.prune_heads(modules[name], units)
        if policy.reconstruct:
            self.reconstruct(pruned, cuts)
        return pruned

    def reconstruct(self, pruned: nn.Module, cuts: dict) -> list[str]:
        """Refit the layers of ``pruned`` whose inputs ``cuts`` removed, each for the outputs it kept."""
        from autoprune.pruning.regression import refit

        base = dict(self.space.model.named_modules())
        gone_in, gone_out = set(), {}
        for (target, _), (handler, _, parts) in cuts.items():
            if target.startswith("param:"):
                continue
            if self.space.dg.is_out_channel_pruning_fn(handler):
                gone_out.setdefault(target, set()).update(torch.cat(parts).tolist())
            else:
                gone_in.add(target)
        order = {name: i for i, name in enumerate(base)}
        kept = {}
        for name in sorted(gone_in, key=order.__getitem__):
            out = gone_out.get(name)
            total = getattr(base[name], "out_features", None) or getattr(base[name], "out_channels", 0)
            kept[name] = None if not out else torch.tensor(sorted(set(range(total)) - out))
        return refit(self.statistics, pruned, kept)
