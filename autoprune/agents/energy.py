"""Energy-aware pruning (Yang, Chen and Sze, "Designing Energy-Efficient Convolutional Neural Networks
using Energy-Aware Pruning", CVPR 2017, Sec. 4), with channels where the paper prunes weights.

The energy of every layer comes from :mod:`autoprune.energy` (computation plus data movement at each
memory level). The search repeats *passes* until every budget holds (predicted, as
:meth:`autoprune.budget.Budgets.fits` says), or the trial or time limit is reached:

1. *Order* (Sec. 4.1). The prunable groups are sorted by the energy they account for in the current
   model (:meth:`autoprune.energy.EnergyModel.shares`), most first: the layer that costs most is pruned
   first, while the network still has the most redundancy to give.
2. *Magnitude* (Sec. 4.2). In the group being visited, the ``step`` fraction of its channels with the
   smallest L1 norm (in the agent's working model, fine-tuned so far) goes, plus ``restore`` more.
3. *Restoration* (Sec. 4.3). Magnitude is a poor guide for some channels: ``restore`` of the removed
   ones come back, greedily, one at a time, each time the one whose removal raises the loss most (whose
   return lowers it most), the loss measured on the evaluator's first ``restore_batches`` seeded
   training batches through the task (:func:`restore`). The paper restores the weights that reduce the
   layer's output error most; the loss is the channel version of that question.
4. *Local fine-tune* (Sec. 4.4). ``local_steps`` SGD steps on the weights of the visited group's layers
   and of the layers that read its channels (the rest of the network is held).
5. The next group is visited, until the budget holds (the last visit removes only as many channels as
   the budget still needs). Then a *global fine-tune* (Sec. 4.5) of ``global_steps`` steps on the whole
   working model ends the pass.

Every pass gives one candidate: its ratios and the channels it kept, which the policy carries in its
``keep`` field (the channels are chosen on the working model, whose weights move, so the base model's
criterion could not pick them again). Like every agent's candidates it is scored by the shared
evaluator, so that ``autoprune apply`` rebuilds it: pruned from the trained base model, BN-recalibrated,
fine-tuned ``--finetune-steps``. **The agent's own fine-tuned weights are not carried**: a policy
holds a structure, not weights, so the local and global fine-tunes steer which channels go and the
evaluator's fine-tune is the one the candidate is scored (and applied) with.

Trials carry ``energy_pass``, ``energy_visits`` (per visited group: channels removed and, by their index
in the unpruned group, those restored) and ``energy_reached`` (whether the budget holds).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from autoprune.agents.base import Agent, Option, SearchContext, SearchResult, register
from autoprune.budget import bisect
from autoprune.errors import CandidateError
from autoprune.evaluator import fails_candidate
from autoprune.policy import Policy
from autoprune.pruning import ChannelPruner
from autoprune.space import Space
from autoprune.task import Task
from autoprune.training import train_steps


def restore(removed: Iterable[int], count: int, loss_without: Callable[[frozenset[int]], float]
            ) -> tuple[list[int], list[int]]:
    """The restoration step: bring back ``count`` of the ``removed`` units, one at a time, each time the
    one whose return gives the lowest ``loss_without(units still removed)``, i.e. the unit whose removal
    raises the loss most. Ties go to the lower index. Returns ``(still removed, restored)``, both sorted."""
    gone = set(removed)
    restored = []
    for _ in range(min(count, len(gone))):
        best = min(sorted(gone), key=lambda u: loss_without(frozenset(gone - {u})))
        gone.discard(best)
        restored.append(best)
    return sorted(gone), sorted(restored)


@torch.no_grad()
def batch_loss(model: nn.Module, task: Task, batches: list[Any]) -> float:
    """The task's mean loss of ``model`` (eval mode) over ``batches``."""
    model.eval()
    losses = [float(task.loss(task.forward(model, batch), batch)) for batch in batches]
    value = sum(losses) / len(losses)
    return value if math.isfinite(value) else math.inf


@register
class EnergyAgent(Agent):
    """Energy-aware pruning: groups in order of energy, magnitude pruning, restoration of the channels
    whose removal hurts the loss most, local then global fine-tune, pass after pass until the budget holds.

    Options (``--energy-<option>`` on the command line)
    ---------------------------------------------------
    step: fraction of a group's channels removed per visit (0.125; at least one channel).
    restore: channels pruned beyond the step by magnitude, then restored one by one, those whose removal
        raises the loss most (2; 0 turns the restoration off).
    restore_batches: seeded training batches the restoration's losses are measured on (2).
    local_steps: fine-tune steps of the visited layers and the layers reading them, per visit (10).
    global_steps: fine-tune steps of the whole working model after each pass (20).
    """

    name = "energy"
    description = "Energy-aware pruning (Yang et al., CVPR 2017): most energy first, magnitude, restoration, " \
                  "local and global fine-tune"
    default_trials = 100  # passes; the search ends when the budget holds
    channel_only = True  # the kept channels are chosen and recorded by index
    options = {
        "step": Option(float, 0.125, "fraction of a group's channels removed per visit", low=0.0, high=1.0,
                       low_open=True, high_open=True),
        "restore": Option(int, 2, "channels pruned beyond the step by magnitude, then restored greedily by the "
                          "loss their removal adds (0: no restoration)", low=0),
        "restore_batches": Option(int, 2, "seeded training batches the restoration's losses are measured on", low=1),
        "local_steps": Option(int, 10, "fine-tune steps of the visited layers and those reading them, per visit",
                              low=0),
        "global_steps": Option(int, 20, "fine-tune steps of the whole working model after each pass", low=0),
    }

    def search(self, ctx: SearchContext) -> SearchResult:
        ev = ctx.evaluator
        names = ev.space.names
        channels = {g: ev.space.by_name[g].channels for g in names}
        if not names or not ctx.budgets.fits(dict.fromkeys(names, ctx.budgets.max_ratio)):
            ctx.budgets.unreachable()
        floor = {g: channels[g] - min(channels[g] - 1, int(math.floor(ctx.budgets.max_ratio * channels[g] + 1e-9)))
                 for g in names}
        self.batches = list(itertools.islice(ctx.task.train_batches(ctx.seed, augment=False), self.restore_batches))
        work = copy.deepcopy(ev.model)
        kept = {g: list(range(channels[g])) for g in names}  # indices into the unpruned group

        def ratios_of(kept: dict[str, list[int]]) -> dict[str, float]:
            return {g: (channels[g] - len(kept[g])) / channels[g] for g in names}

        reached = ctx.budgets.fits(ratios_of(kept))
        passes, visits_done = 0, 0
        while not reached and not ctx.should_stop():
            shares = ev.energy.shares(ratios_of(kept))
            order = sorted((g for g in names if len(kept[g]) > floor[g]), key=lambda g: (-shares[g], g))
            if not order:
                break
            visits = []
            try:
                with fails_candidate(ev.device):
                    for g in order:
                        if visits and ctx.limits.out_of_time():
                            break  # the pass so far is still a candidate
                        n = min(max(1, round(self.step * channels[g])), len(kept[g]) - floor[g])
                        n = self.fewest(ctx, kept, g, n, ratios_of)
                        work, removed, restored = self.visit(ctx, work, kept, g, n, seed=visits_done)
                        visits_done += 1
                        visits.append({"group": g, "removed": len(removed), "restored": restored})
                        if ctx.budgets.fits(ratios_of(kept)):
                            reached = True
                            break
                    if not reached and self.global_steps:
                        train_steps(work, ctx.task, ctx.task.train_batches(ctx.seed + 7919 * (passes + 1)),
                                    self.global_steps, ev.finetune_lr, amp=ev.amp)
            except CandidateError as e:  # the agent's own fine-tune diverged: nothing more to steer with
                ctx.fail(self.policy(ev, kept, ratios_of(kept)), f"energy agent, pass {passes}: {e}")
                break
            ctx.reporter.message(f"pass {passes}: visited {', '.join(v['group'] for v in visits)}; energy "
                                 f"{ev.energy.predict(ratios_of(kept)) / ev.energy.base:.1%} of the unpruned model")
            ctx.evaluate(self.policy(ev, kept, ratios_of(kept)), extra={
                "energy_pass": passes, "energy_visits": visits, "energy_reached": reached})
            passes += 1
        best = ctx.best()
        best.info.update(passes=passes, visits=visits_done, budget_reached=reached, final_ratios=ratios_of(kept))
        return best

    # -- the pieces of one visit ---------------------------------------------------------------
    def policy(self, ev: Any, kept: dict[str, list[int]], ratios: dict[str, float]) -> Policy:
        """The candidate: its ratios, and the channels it keeps in every pruned group."""
        keep = {g: list(idxs) for g, idxs in kept.items() if ratios[g] > 0}
        return ev.policy(ratios, keep=keep or None, search={"energy": self.settings()})

    @staticmethod
    def fewest(ctx: SearchContext, kept: dict[str, list[int]], group: str, n: int,
               ratios_of: Callable[[dict[str, list[int]]], dict[str, float]]) -> int:
        """At most ``n``: the fewest channels of ``group`` whose removal meets every budget, else ``n``."""
        def fits(m: int) -> bool:
            return ctx.budgets.fits(ratios_of({**kept, group: kept[group][: len(kept[group]) - m]}))

        if n <= 1 or not fits(n):
            return n
        return bisect(fits, 0, n)

    def visit(self, ctx: SearchContext, work: nn.Module, kept: dict[str, list[int]], group: str, n: int,
              seed: int) -> tuple[nn.Module, list[int], list[int]]:
        """Prune ``n`` channels of ``group`` from ``work`` (magnitude, then restoration), fine-tune the
        result locally; update ``kept`` (indices into the unpruned group). Returns the pruned working
        model, the units removed (indices into the working model's group) and those restored (indices into
        the unpruned group)."""
        ev = ctx.evaluator
        space = Space.from_model(work, ev.example_inputs)
        if space.by_name.get(group) is None or space.by_name[group].channels != len(kept[group]):
            raise RuntimeError(f"the pruned working model no longer has group {group!r} as the search space "
                               "traced it; the energy agent cannot go on with this model")
        pruner = ChannelPruner(space, seed=ctx.seed)
        count = len(kept[group])
        extra = min(self.restore, count - 1 - n)
        order = torch.argsort(pruner.scores("l1")[group], stable=True).tolist()
        candidates = sorted(order[: n + extra])

        def without(units: Iterable[int]) -> nn.Module:
            units = set(units)
            keep = [u for u in range(count) if u not in units]
            return pruner.prune(Policy({group: (count - len(keep)) / count}, keep={group: keep}))

        removed, restored = restore(candidates, extra, lambda units: batch_loss(without(units), ctx.task,
                                                                                self.batches))
        pruned = without(removed)
        old, gone = kept[group], set(removed)
        kept[group] = [idx for u, idx in enumerate(old) if u not in gone]
        if self.local_steps:
            params = self.local_parameters(pruned, space, group)
            train_steps(pruned, ctx.task, ctx.task.train_batches(ctx.seed + 104729 * (seed + 1)), self.local_steps,
                        ev.finetune_lr, amp=ev.amp, params=params)
        return pruned.eval(), removed, [old[u] for u in restored]

    @staticmethod
    def local_parameters(model: nn.Module, space: Space, group: str) -> list[nn.Parameter]:
        """The weights of the layers whose channels ``group`` cuts and of the conv/linear layers that read
        them (Sec. 4.4's "local" fine-tune: the pruned layer and the next)."""
        layers = set(space.by_name[group].members)
        layers |= {layer.name for layer in space.layers() if any(g == group for g, _ in layer.in_groups)}
        modules = dict(model.named_modules())
        params = [p for name in sorted(layers) if name in modules for p in modules[name].parameters(recurse=False)]
        return params or list(model.parameters())
