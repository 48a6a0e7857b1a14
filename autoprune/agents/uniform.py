"""Uniform baseline: the same ratio for every prunable group, bisected to the budget."""

from __future__ import annotations

from autoprune.agents.base import Agent, SearchContext, SearchResult, register


@register
class UniformAgent(Agent):
    """One ratio for every group: the smallest that meets every budget, found by bisection on the
    predicted cost (and measured latency), as tightly as the granularity allows (whole channels,
    single weights, or N:M's one sparse ratio). One evaluation."""

    name = "uniform"
    description = "one ratio for every group, bisected to meet the budget (1 evaluation)"
    default_trials = 1

    def search(self, ctx: SearchContext) -> SearchResult:
        ratios = ctx.budgets.fit()  # a common shift from zero is exactly a uniform ratio
        policy = ctx.evaluator.uniform(max(ratios.values()) if ratios else 0.0)
        ratio = max(policy.ratios.values()) if policy.ratios else 0.0  # as the granularity realises it
        ctx.reporter.message(f"uniform ratio {ratio:.4f}")
        result = ctx.evaluate(policy, extra={"uniform_ratio": ratio})
        best = ctx.best()
        best.info["uniform_ratio"] = ratio
        if result is None:
            best.info["failed"] = True
        return best
