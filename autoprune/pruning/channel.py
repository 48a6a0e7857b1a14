"""Physical channel removal: apply a policy to a copy of a model.

The dependency graph is traced once per base model. For a policy, each group's channels to remove
are chosen by the criterion, mapped through the graph to every coupled layer, and merged per layer;
each layer is then cut once on a fresh copy. Because every index refers to the unpruned model, the
result does not depend on the order of groups, and no graph is re-traced per candidate.
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from autoprune.errors import InputError
from autoprune.policy import Policy
from autoprune.pruning.criteria import Calibration, Statistics, get_criterion
from autoprune.space import Space, keep_count


class ChannelPruner:
    """Applies channel policies to copies of ``space.model``.

    ``calibration`` (a callable returning the same device batches each call) is what the data-reading
    criteria (taylor, hessian, apoz, entropy) read, run and scored through ``task`` (its forward and
    loss; default ``model(batch[0])`` and cross-entropy); without it they raise :class:`InputError`.
    ``seed`` seeds the ``random`` criterion.
    """

    def __init__(self, space: Space, calibration: Calibration | None = None, seed: int = 0, task=None) -> None:
        self.space = space
        self.statistics = Statistics(space, calibration, seed, task)
        self._scores: dict[str, dict[str, torch.Tensor]] = {}
        self._full_groups: dict[str, object] = {}
        self._maps: dict[str, list[tuple[str, object, int, torch.Tensor, torch.Tensor]] | None] = {}

    def _full_group(self, name: str):
        if name not in self._full_groups:
            g = self.space.by_name[name]
            self._full_groups[name] = self.space.dg.get_pruning_group(
                self.space._roots[name], self.space._handlers[name], list(range(g.channels))
            )
        return self._full_groups[name]

    def _item_map(self, name: str) -> list[tuple[str, object, int, torch.Tensor, torch.Tensor]] | None:
        """For every layer the group touches: its handler and, per layer index, the root channel."""
        if name not in self._maps:
            items = []
            for dep, idxs in self._full_group(name):
                target = dep.target
                if target.type == tp.ops.OPTYPE.PARAMETER:
                    raise InputError(
                        f"group {name!r} prunes a bare nn.Parameter, which autoprune does not support yet; "
                        "pin it with --ignore"
                    )
                mod_name = self.space.module_names.get(target.module)
                if mod_name is None or len(idxs) == 0:
                    continue  # functional op nodes (add, concat, reshape) carry no weights
                if isinstance(idxs[0], tp._helpers._HybridIndex):
                    plain = torch.tensor([i.idx for i in idxs])
                    root = torch.tensor([i.root_idx for i in idxs])
                else:
                    plain = torch.tensor(list(idxs))
                    root = plain.clone()
                if int(root.max()) >= self.space.by_name[name].channels:
                    items = None  # index mapping through concat/split: ask the graph per policy instead
                    break
                items.append((mod_name, dep.handler, target.pruning_dim, plain, root))
            self._maps[name] = items
        return self._maps[name]

    def _items_for(self, name: str, idxs: list[int]) -> list[tuple[str, object, int, torch.Tensor]]:
        """(layer, handler, pruning dim, layer indices) removed when ``idxs`` leave group ``name``."""
        items = self._item_map(name)
        if items is not None:
            chosen = torch.zeros(self.space.by_name[name].channels, dtype=torch.bool)
            chosen[idxs] = True
            return [(m, h, d, plain[chosen[root]]) for m, h, d, plain, root in items]
        out = []
        group = self.space.dg.get_pruning_group(self.space._roots[name], self.space._handlers[name], idxs)
        for dep, item_idxs in group:
            mod_name = self.space.module_names.get(dep.target.module)
            if mod_name is not None and len(item_idxs):
                plain = torch.tensor(tp._helpers.to_plain_idxs(item_idxs))
                out.append((mod_name, dep.handler, dep.target.pruning_dim, plain))
        return out

    def scores(self, criterion: str) -> dict[str, torch.Tensor]:
        """Per-channel importance of every prunable group, computed once per criterion."""
        if criterion not in self._scores:
            score = get_criterion(criterion, self.statistics)
            out = {}
            with torch.no_grad():
                for g in self.space.prunable:
                    s = score(self._full_group(g.name))
                    if s is None:  # torch-pruning gives None when no layer of the group has weights
                        s = torch.zeros(g.channels)
                    out[g.name] = s.detach().float().cpu()
            self._scores[criterion] = out
        return self._scores[criterion]

    def removed_channels(self, policy: Policy) -> dict[str, list[int]]:
        """Indices (into the unpruned group) that ``policy`` removes from each group: the complement
        of ``policy.keep`` where the policy names the kept channels, else the lowest-scoring ones."""
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
        for name, idxs in self.removed_channels(policy).items():
            for mod_name, handler, pruning_dim, layer_idxs in self._items_for(name, idxs):
                entry = cuts.setdefault((mod_name, handler.__name__), (handler, pruning_dim, []))
                entry[2].append(layer_idxs)
        pruned = copy.deepcopy(base)
        modules = dict(pruned.named_modules())
        for (mod_name, _), (handler, pruning_dim, parts) in cuts.items():
            handler.__self__.pruning_dim = pruning_dim
            handler(modules[mod_name], sorted(set(torch.cat(parts).tolist())))
        return pruned
