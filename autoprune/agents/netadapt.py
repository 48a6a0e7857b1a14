"""NetAdapt (Yang et al., "NetAdapt: Platform-Aware Neural Network Adaptation for Mobile
Applications", ECCV 2018; reference code denru01/netadapt), Algorithm 1.

Starting from the unpruned model, each iteration ``i`` must shed ``ΔR_i`` of the tracked resource
(FLOPs, params, or latency read from a per-layer lookup table, Sec. 3.3), where
``ΔR_i = initial · R_0 · decay^i`` (2.5 % of the original resource, decaying by 0.96, by default) and
never more than what the current model must still shed to meet the budget:

1. *Choose # of filters* — for every prunable group alone, the fewest channels removed (in steps of
   ``step`` channels, fewer for small groups) for which the model sheds at least ``ΔR_i``.
2. *Choose which filters* — the evaluator's channel criterion (L1 magnitude by default).
3. *Short-term fine-tune* — each proposal (one per group) is fine-tuned ``short_steps`` steps and
   scored on the validation split.
4. *Pick the best* — the proposal with the best objective (``select="accuracy"``: the task's metric,
   accuracy for a classifier) or the one losing the least of it per unit of resource saved
   (``select="ratio"``) becomes the next iteration's start.

The loop stops when every budget holds (measured: for latency, the pruned model is timed; since one
timing on a busy machine can pass by luck, the accepted trial's recorded latency and the table's
estimate, scaled to the measured unpruned latency, must agree when the table can reach the budget at
all), when the trial or time limit is reached, or when no group can shed anything more. The final model is then
fine-tuned ``long_steps`` steps (the *long-term fine-tune*), recorded as one more trial with
``netadapt_phase="long"``, apart from the short-term ones.

Proposals are cumulative: ratios accumulate from one accepted policy to the next. Unlike the paper,
fine-tuned weights are not carried over between iterations: every proposal is the *base* model
pruned by the cumulative policy, then BN-recalibrated and fine-tuned short-term by the shared
evaluator. This keeps every trial reproducible from its policy alone (``autoprune apply`` rebuilds
it) at the cost of shorter effective fine-tuning of later iterations.

With several budgets, each iteration tracks the one furthest over its limit (largest value / limit).
For a latency budget the tracked resource is the lookup table's estimate, and the amount still to
shed is calibrated against the measured latency of the current model (the table's estimate scaled
by the measured fraction over the limit), so table error does not stop the search short or make it
overshoot by much; feasibility of recorded trials is always decided on measured values by the core.

Trials: every proposal is one trial with user attributes ``netadapt_phase`` ("short"),
``netadapt_iteration``, ``netadapt_group``, ``netadapt_parent`` (the accepted trial it extends;
None for the first iteration), ``netadapt_resource``, ``netadapt_target`` (the iteration's resource
reduction, a fraction of the unpruned model's resource), ``netadapt_estimate`` (the proposal's
tracked resource as a fraction of the unpruned one) and ``netadapt_removed`` (channels removed from
the group in this iteration). A trial cannot change once recorded, so acceptance is recorded on the
study: ``study.user_attrs["netadapt_accepted"]`` lists the accepted trial numbers in iteration order
and ``netadapt_iterations`` one summary per iteration; each later proposal's ``netadapt_parent``
also names the trial it grew from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from autoprune.agents.base import Agent, Option, SearchContext, SearchResult, register
from autoprune.evaluator import Evaluation
from autoprune.latency_table import LatencyTable
from autoprune.space import keep_count


@register
class NetAdaptAgent(Agent):
    """NetAdapt: per iteration, prune the one group whose short-term fine-tuned objective is best
    among single-group proposals that each shed the iteration's resource target.

    Options (``--netadapt-<option>`` on the command line)
    -----------------------------------------------------
    initial: first iteration's resource reduction, a fraction of the unpruned model's (0.025).
    decay: factor applied to the reduction target after every iteration (0.96).
    step: channels removed per step when searching a group's fewest channels (8); groups of fewer
        than 64 channels step by channels / 8 (at least 1).
    short_steps: short-term fine-tune steps per proposal (default: ``--finetune-steps``).
    long_steps: long-term fine-tune steps of the final model (200; 0 skips it).
    select: ``accuracy`` (best short-term objective) or ``ratio`` (least objective lost per resource
        fraction saved).
    table_step: channel step of the latency lookup table grid (8).
    table_repeats: timed passes per measured table point, per sweep (5; 3 sweeps keep the least).
    table_dir: where latency tables are cached (default ``<autoprune cache>/latency``).
    """

    name = "netadapt"
    description = "NetAdapt: iterative single-group proposals, short-term fine-tune, best kept"
    default_trials = 2000  # iterations x groups; the search ends when the budget holds
    options = {
        "initial": Option(float, 0.025, "first iteration's resource reduction, fraction of the unpruned model",
                          low=0.0, high=1.0, low_open=True),
        "decay": Option(float, 0.96, "decay of the resource reduction target per iteration", low=0.0, high=1.0,
                        low_open=True),
        "step": Option(int, 8, "channels removed per step (groups under 64 channels: channels/8)", low=1),
        "short_steps": Option(int, None, "short-term fine-tune steps per proposal (default --finetune-steps)",
                              low=0),
        "long_steps": Option(int, 200, "long-term fine-tune steps of the final model (0: none)", low=0),
        "select": Option(str, "accuracy", "keep the proposal with the best objective (the task's metric: "
                         "accuracy, mIoU, ...), or the least of it lost per resource saved",
                         choices=("accuracy", "ratio")),
        "table_step": Option(int, 8, "channel step of the latency lookup table", low=1),
        "table_repeats": Option(int, 5, "timed passes per latency table point and sweep", low=1),
        "table_dir": Option(str, None, "latency table cache directory (default <cache>/latency)", metavar="DIR"),
    }

    def search(self, ctx: SearchContext) -> SearchResult:
        ev = ctx.evaluator
        space = ev.space
        names = space.names
        short = ctx.finetune_steps if self.short_steps is None else int(self.short_steps)
        long = int(self.long_steps or 0)
        self.table = None
        if any(b.resource == "latency" for b in ctx.budgets):
            ctx.reporter.message("latency lookup table: measuring (or loading from cache)")
            self.table = LatencyTable.build(space, model=str(ev.model_info.get("name", "model")),
                                            step=self.table_step, repeats=self.table_repeats, batch=ev.latency_batch,
                                            directory=self.table_dir)
        base = {b.resource: self.resource({}, b.resource, ev) for b in ctx.budgets}
        # reachable at all? by the tracked resources or by measurement: one noisy timing must not end it
        most = dict.fromkeys(names, ctx.budgets.max_ratio)
        if not names or not (all(
            b.holds(self.resource(most, b.resource, ev) * ctx.budgets.base[b.resource] / base[b.resource],
                    ctx.budgets.base[b.resource]) for b in ctx.budgets
        ) or ctx.budgets.fits(most)):
            ctx.budgets.unreachable()

        current = dict.fromkeys(names, 0.0)
        current_acc = ev.baseline("val").score
        parent: int | None = None
        accepted: list[int] = []
        iterations: list[dict[str, Any]] = []
        last: Evaluation | None = None  # the accepted proposal's evaluation
        reached = stopped = False
        iteration = 0
        while True:
            cost = ctx.budgets.cost(current)  # measured latency when a latency budget is set
            if "latency" in cost and last is not None and last.latency is not None:
                # stop only when the accepted trial's own (recorded) latency holds too: timing is noisy
                cost["latency"] = max(cost["latency"], last.latency)
            over = [b for b in ctx.budgets if not b.holds(cost[b.resource], ctx.budgets.base[b.resource])
                    or (b.resource == "latency" and not self.table_holds(b, current, ctx))]
            if not over:
                reached = True
                break
            if self._stop(ctx, long):
                stopped = True
                break
            # NetAdapt tracks one resource: the budget furthest over its limit
            budget = max(over, key=lambda b: cost[b.resource] / b.limit(ctx.budgets.base[b.resource]))
            r = budget.resource
            now = self.resource(current, r, ev)
            # for latency, the limit in table units: scaled by the measured/table ratio of this model,
            # or by that of the unpruned one if it is lower (whichever says more is left to shed)
            limit = budget.limit(ctx.budgets.base[r]) * (now / cost[r] if cost[r] > 0 else 1.0)
            if r == "latency" and self.table_reaches(budget, ctx):
                limit = min(limit, budget.limit(ctx.budgets.base[r]) * self.table.base / ctx.budgets.base[r])
            target = min(self.initial * base[r] * self.decay**iteration, now - limit)
            floors = {g: self.resource({**current, g: self.floor(g, ev, ctx)}, r, ev) for g in names}
            largest = max(now - v for v in floors.values())
            if largest <= 0:
                break  # every group is at its floor: nothing more to shed
            target = min(target, largest)  # no single group can shed more; take what the best can
            proposals = []
            for g in names:
                ratios = self.fewest(current, g, r, now - target, ev, ctx)
                if ratios is not None:
                    proposals.append((g, ratios))
            results: list[tuple[str, dict[str, float], Evaluation, int, float]] = []
            for g, ratios in proposals:
                if self._stop(ctx, long):
                    stopped = True
                    break
                value = self.resource(ratios, r, ev)
                policy = ev.policy(ratios)
                removed = keep_count(space.by_name[g].channels, current[g]) - \
                    keep_count(space.by_name[g].channels, ratios[g])
                result = ctx.evaluate(policy, short, extra={
                    "netadapt_phase": "short",
                    "netadapt_iteration": iteration,
                    "netadapt_group": g,
                    "netadapt_parent": parent,
                    "netadapt_resource": r,
                    "netadapt_target": target / base[r],
                    "netadapt_estimate": value / base[r],
                    "netadapt_removed": removed,
                })
                if result is not None:
                    results.append((g, ratios, result, ctx.trial_of(policy, short), (now - value) / base[r]))
            if stopped or not results:
                break  # an unfinished iteration is not accepted
            g, ratios, result, number, saved = self.pick(results, current_acc, ctx.task.sign)
            current, current_acc, parent, last = ratios, result.score, number, result
            accepted.append(number)
            iterations.append({"iteration": iteration, "trial": number, "group": g, "resource": r,
                               "target": target / base[r], "saved": saved, "score": result.score,
                               "proposals": len(results)})
            ctx.study.set_user_attr("netadapt_accepted", accepted)
            ctx.study.set_user_attr("netadapt_iterations", iterations)
            ctx.reporter.message(f"iteration {iteration}: {g} ({r} -{saved:.1%}), {ctx.task.metric} "
                                 f"{ctx.task.format(result.score)}")
            iteration += 1

        long_result = None
        if reached and long > 0 and not ctx.should_stop():
            long_result = ctx.evaluate(ev.policy(current), long, extra={
                "netadapt_phase": "long", "netadapt_iteration": iteration, "netadapt_parent": parent,
            })
        best = ctx.best()
        best.info.update(
            iterations=len(iterations), accepted_trials=accepted, budget_reached=reached, stopped=stopped,
            short_steps=short, long_steps=long, final_ratios=current, final_short_score=current_acc,
            final_long_score=long_result.score if long_result is not None else None,
        )
        if self.table is not None:
            best.info.update(latency_table=str(self.table.path), table_measurements=self.table.measurements)
        return best

    # -- the pieces of one iteration --------------------------------------------------------------
    def resource(self, ratios: Mapping[str, float], resource: str, ev: Any) -> float:
        """The tracked resource of ``ratios``: predicted FLOPs/params, or the table's latency."""
        if resource == "latency":
            return self.table.estimate(ratios)
        return ev.cost(ratios, latency=False)[resource]

    def table_reaches(self, budget: Any, ctx: SearchContext) -> bool:
        """Whether the table, scaled to the measured unpruned latency, can meet ``budget`` at all."""
        most = dict.fromkeys(ctx.evaluator.space.names, ctx.budgets.max_ratio)
        return self.table_holds(budget, most, ctx, check=False)

    def table_holds(self, budget: Any, ratios: Mapping[str, float], ctx: SearchContext, check: bool = True) -> bool:
        """Latency ``budget`` holds for ``ratios`` by the table, scaled to the measured unpruned latency.

        A measurement alone can pass by luck (the unpruned model's one timing made on a busy moment);
        this second opinion is waived when the table cannot reach the budget even at the floors."""
        if check and not self.table_reaches(budget, ctx):
            return True
        scaled = self.table.estimate(ratios) * ctx.budgets.base["latency"] / self.table.base
        return budget.holds(scaled, ctx.budgets.base["latency"])

    @staticmethod
    def floor(group: str, ev: Any, ctx: SearchContext) -> float:
        """The largest ratio of ``group`` that whole channels and ``max_ratio`` allow."""
        channels = ev.space.by_name[group].channels
        removable = min(channels - 1, int(math.floor(ctx.budgets.max_ratio * channels + 1e-9)))
        return removable / channels

    def group_step(self, channels: int) -> int:
        return max(1, min(int(self.step), channels // 8))

    def fewest(self, current: Mapping[str, float], group: str, resource: str, goal: float, ev: Any,
               ctx: SearchContext) -> dict[str, float] | None:
        """``current`` with the fewest channels of ``group`` removed (a multiple of the group's
        step, or down to its floor) such that the resource is at most ``goal``; None if none does."""
        channels = ev.space.by_name[group].channels
        kept = keep_count(channels, current.get(group, 0.0))
        lowest = channels - int(round(self.floor(group, ev, ctx) * channels))
        step = self.group_step(channels)
        counts = list(range(kept - step, lowest, -step)) + ([lowest] if lowest < kept else [])
        for k in counts:
            ratios = {**current, group: (channels - k) / channels}
            if self.resource(ratios, resource, ev) <= goal * (1 + 1e-12):
                return ratios
        return None

    def pick(self, results: list, current: float, sign: float = 1.0) -> tuple:
        """The accepted proposal: the best objective (``sign`` +1 when it is maximised, -1 when
        minimised), or the least of it lost per resource fraction saved."""
        if self.select == "ratio":
            return min(results, key=lambda t: (sign * (current - t[2].score) / max(t[4], 1e-12), -sign * t[2].score))
        return max(results, key=lambda t: (sign * t[2].score, t[4]))

    @staticmethod
    def _stop(ctx: SearchContext, long: int) -> bool:
        """The limits, keeping one trial for the long-term fine-tune."""
        if ctx.should_stop():
            return True
        n = ctx.limits.n_trials
        return long > 0 and n is not None and ctx.limits.done(ctx.study) >= n - 1
