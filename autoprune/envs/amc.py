"""The AMC pruning environment (He et al., "AMC: AutoML for Model Compression", ECCV 2018, Sec. 3).

One episode walks the prunable groups of a model in execution order. At step ``t`` the agent sees the
embedding of group ``t`` (Eq. 1 of the paper)::

    (t, type, in_channels, out_channels, stride, kernel, weights, flops_removed, flops_rest, a_{t-1})

each static feature min-max normalised over the model's groups, the three dynamic ones as fractions
in [0, 1]; it answers with a continuous **keep ratio** ``a_t`` in [0, 1] (AMC's preserve ratio; the
policy stores the fraction removed, ``1 - a_t``). The environment clips the action twice: to the keep
floor (0.2 in the paper) and, as AMC's resource-constrained search does, to the least pruning that
still lets the remaining groups meet every budget at their floor. So every episode ends feasible and
the reward needs no penalty term. The budgets are checked with the analytic cost model (measured
latency for a latency budget), the same one every agent of autoprune uses.

At the last step the policy is scored: the shared evaluator prunes the model, recalibrates batch norm
(no fine-tune unless asked) and scores it on the held-out split. The reward is ``-Error * log(FLOPs)``
(the paper's FLOPs-constrained reward) or ``-Error``; every other step gives 0. ``Error`` is the task's
reading of its objective (:meth:`autoprune.task.Task.error`): ``1 - accuracy`` as in the paper, ``1 -
mIoU`` for a segmenter, the value itself for a minimised objective such as a loss.

The environment works with an :class:`~autoprune.evaluator.Evaluator` and budgets alone (what
``gymnasium.make("autoprune/AMC-v0", evaluator=..., budgets={"flops": "50%"})`` builds); built from a
:class:`~autoprune.agents.base.SearchContext` it records every episode as one Optuna trial.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from autoprune.budget import Budget, Budgets, bisect, parse_budgets
from autoprune.errors import CandidateError, InputError, ParameterError
from autoprune.evaluator import Evaluation, Evaluator
from autoprune.policy import Policy
from autoprune.space import keep_count

if TYPE_CHECKING:
    from autoprune.agents.base import SearchContext

REWARDS = ("error_log_flops", "error")
ACTIONS = ("preserve", "relative")

FEATURES = (
    "index",
    "type",
    "in_channels",
    "out_channels",
    "stride",
    "kernel",
    "weights",
    "flops_removed",
    "flops_rest",
    "previous_action",
)

# AMC encodes the layer type as 0 (conv) or 1 (fc); depthwise groups sit between them.
_TYPE_CODE = {"conv": 0.0, "depthwise": 0.5, "linear": 1.0}


def amc_reward(error: float, flops: float, kind: str = "error_log_flops") -> float:
    """AMC's episode reward: ``-Error * log(FLOPs)`` or ``-Error`` (the paper's ``Error = 1 - accuracy``).

    ``flops`` is the pruned model's FLOPs (MACs) count; the logarithm makes a smaller model earn a
    little more for the same error (He et al., 2018, Sec. 3.4).
    """
    if kind not in REWARDS:
        raise ParameterError("reward", kind, f"choose from {', '.join(REWARDS)}", agent="amc")
    error = float(error)
    if kind == "error":
        return -error
    return -error * math.log(max(float(flops), 1.0))


class AMCEnv(gym.Env):
    """Layer-by-layer pruning of one model under resource budgets (AMC, He et al. 2018).

    Parameters
    ----------
    evaluator: the shared evaluator of the model to prune (its space gives the groups).
    budgets: :class:`~autoprune.budget.Budgets`, a list of :class:`~autoprune.budget.Budget`, or a
        mapping such as ``{"flops": "50%", "params": "60%"}``; all must hold.
    max_ratio: the largest fraction removed from any group.
    keep_floor: the smallest keep ratio of a group (AMC: 0.2). When the budgets cannot be met at
        the floor, the floor falls to ``1 - max_ratio`` (``relaxed_floor`` says so).
    reward: ``"error_log_flops"`` (``-Error * log(FLOPs)``, default) or ``"error"`` (``-Error``).
    action: how an action becomes a ratio. ``"preserve"`` (the paper): the action is the group's keep
        ratio. ``"relative"``: the action is read against ``u``, the one removal ratio that, given to
        this group and every group after it, meets the budgets exactly: 0.5 removes ``u``, 1 removes
        ``u - d`` and 0 removes ``u + d``, linearly, with ``d = min(u, max_ratio - u)`` so that the
        range is symmetric about ``u`` (under a loose budget, 1 keeps the group whole). Either is then
        clipped to the budgets' wall. Under a tight budget, preserve ratios drawn at random leave most
        of the cut to the groups walked last, which the wall then sends to the floor whatever the agent
        asks; relative actions drawn at random centre every group on the uniform policy instead. A
        range reaching 0 on one side and only ``max_ratio`` on the other would not: each group would
        remove less than ``u`` on average and push the rest towards the floor.
    finetune_steps: fine-tune steps before scoring a policy (0: adaptive BN only, as in AMC).
    reward_fn: replaces the evaluation: maps the episode's policy to its reward (synthetic tasks,
        tests); nothing is evaluated or recorded then.
    context: a search context; policies are then evaluated and recorded through it (one Optuna trial
        per episode) and its budget checks are used. See :meth:`from_context`.

    ``reset(options={"trial_attrs": {...}})`` attaches user attributes to the episode's trial.
    The final step's ``info`` holds ``ratios``, ``policy``, ``evaluation`` (or None), ``reward``.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        evaluator: Evaluator,
        budgets: Budgets | Iterable[Budget] | Mapping[str, str],
        *,
        max_ratio: float = 0.9,
        keep_floor: float = 0.2,
        reward: str = "error_log_flops",
        action: str = "preserve",
        finetune_steps: int = 0,
        reward_fn: Callable[[Policy], float] | None = None,
        context: SearchContext | None = None,
    ) -> None:
        super().__init__()
        if reward not in REWARDS:
            raise ParameterError("reward", reward, f"choose from {', '.join(REWARDS)}", agent="amc")
        if action not in ACTIONS:
            raise ParameterError("action", action, f"choose from {', '.join(ACTIONS)}", agent="amc")
        self.action_kind = action
        if not 0.0 <= keep_floor < 1.0:
            raise ParameterError("keep_floor", keep_floor, "must lie in [0, 1)", agent="amc")
        self.evaluator = evaluator
        if isinstance(budgets, Budgets):
            self.budgets = budgets
        else:
            items = parse_budgets(budgets) if isinstance(budgets, Mapping) else list(budgets)
            self.budgets = Budgets(items, evaluator, max_ratio)
        max_ratio = self.budgets.max_ratio if context is not None else max_ratio
        if not 0.0 < max_ratio < 1.0:
            raise ParameterError("max_ratio", max_ratio, "must lie in (0, 1)")
        self.reward_kind = reward
        self.finetune_steps = int(finetune_steps)
        self.reward_fn = reward_fn
        self.context = context

        self.groups = list(evaluator.space.prunable)
        if not self.groups:
            raise InputError("the model has no prunable group (every group is pinned)")
        self.names = [g.name for g in self.groups]
        self.n_steps = len(self.groups)
        self.base_flops = float(evaluator.space.base_flops)

        # the most a group may lose: AMC's keep floor, unless the budgets need more
        self.relaxed_floor = False
        self.max_ratio = min(max_ratio, 1.0 - keep_floor)
        if not self.budgets.fits(dict.fromkeys(self.names, self.max_ratio)):
            if self.max_ratio < max_ratio and self.budgets.fits(dict.fromkeys(self.names, max_ratio)):
                self.max_ratio = max_ratio
                self.relaxed_floor = True
            else:
                self.budgets.unreachable()
        self.keep_floor = 1.0 - self.max_ratio

        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(len(FEATURES),), dtype=np.float32)
        self.action_space = gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self._static = self._static_embedding()
        flops = np.array([g.flops for g in self.groups], dtype=np.float64)
        total = flops.sum() or 1.0
        # FLOPs still to come after group t (AMC's "rest"), as a share of all the groups' FLOPs
        self._rest = np.concatenate([np.cumsum(flops[::-1])[::-1][1:], [0.0]]) / total
        self._t = 0
        self._removed: list[float] = []
        self._trial_attrs: dict[str, Any] = {}

    @classmethod
    def from_context(cls, ctx: SearchContext, **kw: Any) -> AMCEnv:
        """The environment of a search: the context's evaluator, budgets, max ratio and fine-tune
        steps; episodes are evaluated and recorded through ``ctx.evaluate``."""
        kw.setdefault("finetune_steps", ctx.finetune_steps)
        return cls(ctx.evaluator, ctx.budgets, context=ctx, **kw)

    # -- budgets ------------------------------------------------------------------------------
    def clip(self, t: int, removed: list[float], ratio: float) -> float:
        """The removal ratio of group ``t`` closest to ``ratio`` that lets the budgets hold when the
        groups before it keep ``removed`` and the groups after it drop to the floor (AMC Sec. 3.4).

        Searched over whole channels: the fewest channels removed that fit, by bisection (the cost
        falls monotonically with every ratio).
        """
        ratio = min(max(ratio, 0.0), self.max_ratio)
        rest = self.names[t + 1:]

        def fits(r: float) -> bool:
            ratios = dict(zip(self.names, removed))
            ratios[self.names[t]] = r
            ratios.update(dict.fromkeys(rest, self.max_ratio))
            return self.budgets.fits(ratios)

        if fits(ratio):
            return ratio
        channels = self.groups[t].channels
        lo = channels - keep_count(channels, ratio)  # channels removed: this many do not fit
        most = channels - keep_count(channels, self.max_ratio)  # this many fit (or nothing does)
        if most <= lo:
            return self.max_ratio
        hi = bisect(lambda k: fits(k / channels), lo, most)
        return self.max_ratio if hi >= most else hi / channels

    def uniform_rest(self, t: int, removed: list[float]) -> float:
        """``u``: the least removal ratio that, given to group ``t`` and every group after it (the
        groups before it keeping ``removed``), meets the budgets; ``max_ratio`` when none does."""

        def fits(r: float) -> bool:
            return self.budgets.fits({**dict(zip(self.names, removed)), **dict.fromkeys(self.names[t:], r)})

        if fits(0.0):
            return 0.0
        if not fits(self.max_ratio):
            return self.max_ratio
        return bisect(fits, 0.0, self.max_ratio, tol=1e-4)

    def requested_ratio(self, t: int, removed: list[float], action: float) -> float:
        """The removal ratio an action in [0, 1] asks of group ``t``, before the wall (see ``action``)."""
        if self.action_kind == "preserve":
            return 1.0 - action
        u = self.uniform_rest(t, removed)
        return u + (1.0 - 2.0 * action) * min(u, self.max_ratio - u)

    # -- embedding ----------------------------------------------------------------------------
    def _static_embedding(self) -> np.ndarray:
        rows = [
            [t, _TYPE_CODE.get(g.module_type, 0.25), g.in_channels, g.channels, g.stride, g.kernel, g.weights]
            for t, g in enumerate(self.groups)
        ]
        emb = np.asarray(rows, dtype=np.float64)
        lo, hi = emb.min(axis=0), emb.max(axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        return (emb - lo) / span  # a feature constant over the model becomes 0

    def _observation(self, t: int) -> np.ndarray:
        decided = dict(zip(self.names, self._removed))
        removed_flops = (self.base_flops - self.evaluator.space.flops(decided)) / self.base_flops
        previous = 1.0 - self._removed[-1] if self._removed else 1.0
        obs = np.concatenate([self._static[t], [removed_flops, self._rest[t], previous]])
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    # -- gymnasium API ------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._t = 0
        self._removed = []
        self._trial_attrs = dict((options or {}).get("trial_attrs", {}))
        return self._observation(0), {"group": self.names[0]}

    def step(self, action):
        if self._t >= self.n_steps:
            raise RuntimeError("the episode is over: call reset()")
        requested = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], 0.0, 1.0))
        t = self._t
        ratio = self.clip(t, self._removed, self.requested_ratio(t, self._removed, requested))
        self._removed.append(ratio)
        self._t += 1
        info: dict[str, Any] = {
            "group": self.names[t],
            "requested_keep_ratio": requested,
            "keep_ratio": 1.0 - ratio,
            "ratio": ratio,
        }
        if self._t < self.n_steps:
            return self._observation(self._t), 0.0, False, False, info
        ratios = dict(zip(self.names, self._removed))
        reward, evaluation, policy = self._score(ratios)
        info.update(ratios=ratios, policy=policy, evaluation=evaluation, reward=reward)
        # the terminal observation: the last group with its decision filled in (as the reference code)
        obs = self._observation(t)
        obs[-1] = np.float32(1.0 - ratio)
        return obs, reward, True, False, info

    def _score(self, ratios: dict[str, float]) -> tuple[float, Evaluation | None, Policy]:
        policy = self.evaluator.policy(ratios)
        if self.reward_fn is not None:
            return float(self.reward_fn(policy)), None, policy
        if self.context is not None:
            result = self.context.evaluate(policy, self.finetune_steps, extra=self._trial_attrs or None)
        else:
            try:
                result = self.evaluator.evaluate(policy, self.finetune_steps)
            except CandidateError:
                result = None
        task = self.evaluator.task
        if result is None:  # a failed candidate scores as the worst model: Error 1 (or the base's error doubled)
            worst = max(1.0, 2.0 * task.error(self.evaluator.baseline().score))
            return amc_reward(worst, self.evaluator.space.flops(ratios), self.reward_kind), None, policy
        return amc_reward(task.error(result.score), result.flops, self.reward_kind), result, policy
