"""Random baseline: random per-group ratios projected onto the budget, best of N."""

from __future__ import annotations

import numpy as np

from autoprune.agents.base import Agent, Option, SearchContext, SearchResult, register


@register
class RandomAgent(Agent):
    """Draw every group's ratio uniformly from [0, max_ratio], shift them all by one amount so the
    budget holds tightly (:meth:`autoprune.budget.Budgets.fit`), evaluate, keep the best of ``--trials``.

    The draws come from ``--seed`` alone, so a resumed search replays the same candidates and the
    ones already recorded are answered from the study.
    """

    name = "random"
    description = "random per-group ratios projected onto the budget, best of N"
    default_trials = 20
    parallel = True
    options = {
        "spread": Option(float, 1.0, "scale of the random draws, as a fraction of max_ratio", low=0.0, high=1.0,
                         low_open=True),
    }

    def search(self, ctx: SearchContext) -> SearchResult:
        rng = np.random.default_rng(ctx.seed)
        names = ctx.evaluator.space.names
        draws = 0
        while not ctx.should_stop():
            raw = rng.uniform(0.0, ctx.budgets.max_ratio * self.spread, size=len(names))
            ratios = ctx.budgets.fit(dict(zip(names, raw.tolist())))
            ctx.evaluate(ctx.evaluator.policy(ratios))
            draws += 1
            if ctx.limits.n_trials is None and ctx.limits.timeout is None and draws >= self.default_trials:
                break
        return ctx.best()
