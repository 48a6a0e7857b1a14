"""The agent interface, the search context every agent receives, and the agent registry.

Lifecycle of a search (what :func:`autoprune.search.run_search` does)::

    ctx = SearchContext(evaluator, budgets, study, agent_name, n_trials, timeout, seed, finetune_steps)
    result = agent.search(ctx)      # the agent proposes policies and calls ctx.evaluate(policy)
    ctx.best()                      # the best feasible trial of the study

An agent only proposes: ``ctx.evaluate(policy)`` runs the shared evaluator, decides feasibility on
the measured pruned model, and records the candidate as one Optuna trial (a failed candidate is
recorded as a failed trial and gives ``None``). Candidates already recorded in a resumed study are
answered from the study, not evaluated again, so a deterministic agent re-run with the same seed
continues where it stopped. ``ctx.should_stop()`` says when the trial or time limit is reached.

Agents subclass :class:`Agent`, declare their options (exposed on the command line as
``--<agent>-<option>``) and register with :func:`register` or the ``autoprune.agents`` entry point.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, ClassVar

import optuna
from torch import nn

from autoprune.budget import Budget, format_amount
from autoprune.errors import CandidateError, InputError
from autoprune.evaluator import Evaluation, Evaluator
from autoprune.policy import Policy
from autoprune.space import shift_to_fit
from autoprune.study import (
    best_feasible,
    completed,
    constraint_values,
    evaluation_of,
    policy_of,
    record,
    record_failure,
)


@dataclass(frozen=True)
class Option:
    """An agent hyperparameter: its type, default and meaning (shown by ``autoprune search --help``)."""

    type: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple | None = None


class Reporter:
    """Progress callbacks; the command line shows a progress bar, tests use this silent one."""

    def start(self, total: int | None, done: int) -> None: ...

    def advance(self, result: Evaluation | None, feasible: bool, best: float | None) -> None: ...

    def message(self, text: str) -> None: ...

    def stop(self) -> None: ...


@dataclass
class SearchResult:
    """What an agent hands back: the best feasible policy it found (or None) and how it got there."""

    policy: Policy | None
    evaluation: Evaluation | None
    trials: int
    info: dict[str, Any] = field(default_factory=dict)


class SearchContext:
    """Everything an agent needs: the evaluator, the budgets, the study, the limits and the seed."""

    def __init__(
        self,
        evaluator: Evaluator,
        budgets: list[Budget],
        study: optuna.Study,
        agent: str,
        *,
        n_trials: int | None = None,
        timeout: float | None = None,
        seed: int = 0,
        finetune_steps: int = 0,
        max_ratio: float = 0.9,
        reporter: Reporter | None = None,
    ) -> None:
        self.evaluator = evaluator
        self.budgets = list(budgets)
        self.study = study
        self.agent = agent
        self.n_trials = n_trials
        self.timeout = timeout
        self.seed = seed
        self.finetune_steps = finetune_steps
        self.max_ratio = max_ratio
        self.reporter = reporter or Reporter()
        self.started = time.monotonic()
        if any(b.resource == "latency" for b in self.budgets):
            evaluator.latency = True
        self.base = evaluator.base
        for b in self.budgets:
            b.check_reachable(self.base[b.resource])
        self._recorded: dict[tuple, Evaluation] = {}
        self._measured: list[Evaluation] = []  # models the agent built itself: not the evaluator's answer
        for trial in completed(study):
            try:
                pol = policy_of(trial)
                res = evaluation_of(trial)
            except (InputError, KeyError):
                continue
            if trial.user_attrs.get("measured_by_agent"):
                self._measured.append(res)
                continue
            self._recorded[(pol.key(), res.finetune_steps, res.split)] = res
            evaluator.remember(pol, res.finetune_steps, res)
        self.evaluated = 0  # new evaluations in this run

    # -- limits -------------------------------------------------------------------------------
    @property
    def trials_done(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                 optuna.trial.TrialState.FAIL)))

    def should_stop(self) -> bool:
        if self.n_trials is not None and self.trials_done >= self.n_trials:
            return True
        return self.timeout is not None and time.monotonic() - self.started >= self.timeout

    # -- budgets ------------------------------------------------------------------------------
    def cost(self, ratios: Mapping[str, float]) -> dict[str, float]:
        """Predicted FLOPs/params, and measured latency when a latency budget is set."""
        latency = any(b.resource == "latency" for b in self.budgets)
        return self.evaluator.cost(ratios, latency=latency)

    def fits(self, ratios: Mapping[str, float]) -> bool:
        """True when every budget holds for the predicted cost of ``ratios``."""
        return self.evaluator.feasible(self.budgets, self.cost(ratios))

    def project(self, ratios: Mapping[str, float], tol: float = 1e-4) -> dict[str, float]:
        """Shift every ratio by one common amount (clipped to [0, max_ratio]) so that the budgets
        hold as tightly as the granularity allows: the least pruning that still fits (the cost is
        the evaluator's, in its granularity's arithmetic: N:M ratios snapped, masks counted effective).

        Raises :class:`InputError` when even ``max_ratio`` everywhere cannot meet the budgets.
        """
        fitted = shift_to_fit(ratios, self.evaluator.space.names, self.fits, self.max_ratio, tol)
        if fitted is None:
            self.unreachable()
        return fitted

    def unreachable(self) -> None:
        ev = self.evaluator
        most = dict.fromkeys(ev.space.names, self.max_ratio)
        cost = self.cost(most)
        if ev.granularity == "channel":
            how = f"removing {self.max_ratio:.0%} of every prunable group"
        else:
            top = max(ev.policy(most).ratios.values(), default=0.0)
            how = f"{ev.granularity} masks at {top:.0%} sparsity in every prunable group's layers"
        parts = [
            f"{b.resource} {format_amount(b.resource, cost[b.resource])} "
            f"({cost[b.resource] / self.base[b.resource]:.1%}) > {b}"
            for b in self.budgets if not b.holds(cost[b.resource], self.base[b.resource])
        ]
        if not parts:  # a timing that failed the budget a moment ago passes it now: noise at the limit
            raise InputError(
                "budget is at the edge of what this model can reach here: with "
                f"{self.max_ratio:.0%} of every prunable group removed, measured latency passed and failed "
                f"{' and '.join(str(b) for b in self.budgets)} in turn; loosen the budget or time less noisily"
            )
        hint = "pinned layers are kept whole; --ignore pins more"
        if any(b.resource == "latency" and not b.holds(cost["latency"], self.base["latency"]) for b in self.budgets):
            hint += (f"; latency is timed at batch {self.evaluator.latency_batch}, where per-layer overhead that "
                     "pruning cannot remove may dominate: a larger --latency-batch times compute-bound passes")
        raise InputError(
            f"budget cannot be met: {how} still leaves "
            + "; ".join(parts) + f" ({hint})"
        )

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(
        self,
        policy: Policy,
        finetune_steps: int | None = None,
        *,
        params: Mapping[str, float] | None = None,
        distributions: Mapping[str, Any] | None = None,
        values: Callable[[Evaluation], list[float]] | None = None,
        extra: Mapping[str, Any] | None = None,
        claim: int | None = None,
    ) -> Evaluation | None:
        """Evaluate ``policy`` with the shared evaluator and record it as one trial.

        Returns the evaluation, or None when the candidate failed (recorded as a failed trial).
        A candidate the study already holds is answered from it without a new trial. ``claim`` is
        the number of a RUNNING trial this process claimed for the candidate
        (:func:`autoprune.study.claim`, how workers share out candidates): its record finishes that
        trial instead of adding one.
        """
        steps = self.finetune_steps if finetune_steps is None else finetune_steps
        key = (policy.key(), steps, "val")
        if key in self._recorded:
            if claim is not None:
                record_failure(self.study, policy, "already recorded in the study", agent=self.agent, claim=claim)
            return self._recorded[key]
        try:
            result = self.evaluator.evaluate(policy, steps)
        except CandidateError as e:
            self.record_failure(policy, str(e), params=params, distributions=distributions, claim=claim)
            return None
        except KeyboardInterrupt:
            # Ctrl-C: the running candidate is kept as a failed trial, then the search stops
            self.record_failure(policy, "interrupted by the user", params=params, distributions=distributions,
                                claim=claim)
            raise
        self._recorded[key] = result
        self._record(policy, result, params=params, distributions=distributions, values=values, extra=extra,
                     claim=claim)
        return result

    def record_failure(self, policy: Policy | None, reason: str, *, params: Mapping[str, float] | None = None,
                       distributions: Mapping[str, Any] | None = None, claim: int | None = None) -> None:
        """Record a candidate that failed (e.g. a diverging fine-tune) as a failed trial."""
        record_failure(self.study, policy, reason, agent=self.agent, params=params, distributions=distributions,
                       claim=claim)
        self.reporter.advance(None, False, self._best_value())

    def _record(self, policy: Policy, result: Evaluation, *, params: Mapping[str, float] | None,
                distributions: Mapping[str, Any] | None, values: Callable[[Evaluation], list[float]] | None,
                extra: Mapping[str, Any] | None, claim: int | None = None) -> None:
        """The one place a measured candidate becomes a trial: feasibility, constraints, progress."""
        feasible = self.is_feasible(result)
        record(
            self.study, policy, result, agent=self.agent, feasible=feasible,
            constraints=constraint_values(self.budgets, result.resources(), self.base), base=self.base,
            params=params, distributions=distributions,
            values=values(result) if values is not None else None, extra=extra, claim=claim,
        )
        self.evaluated += 1
        self.reporter.advance(result, feasible, self._best_value())

    def record_measured(
        self,
        policy: Policy,
        result: Evaluation,
        *,
        params: Mapping[str, float] | None = None,
        distributions: Mapping[str, Any] | None = None,
        values: Callable[[Evaluation], list[float]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Evaluation:
        """Record, as one trial, an evaluation the agent measured itself (with
        ``evaluator.measure``) on a model it built otherwise than the shared evaluator does, e.g. the
        pruned architecture trained from fresh weights (Pruning from Scratch). Feasibility is decided
        on ``result`` as in :meth:`evaluate`; the result is not cached as the policy's evaluation (the
        trial carries ``measured_by_agent``, so a resumed search does not take it for one either)."""
        self._measured.append(result)
        self._record(policy, result, params=params, distributions=distributions, values=values,
                     extra={**(extra or {}), "measured_by_agent": True})
        return result

    def record_model(
        self,
        policy: Policy,
        model: nn.Module,
        finetune_steps: int,
        seconds: float,
        *,
        params: Mapping[str, float] | None = None,
        distributions: Mapping[str, Any] | None = None,
        values: Callable[[Evaluation], list[float]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Evaluation:
        """Measure ``model``, a pruned model the agent built itself for ``policy`` (e.g. ICE-Pick's
        iterative pruning), on the validation split and record it as one trial (:meth:`record_measured`).
        ``finetune_steps`` and ``seconds`` are what building it took; the recorded ``seconds`` add the
        measurement."""
        result = self.evaluator.measure(model, "val", finetune_steps, time.perf_counter() - seconds)
        return self.record_measured(policy, result, params=params, distributions=distributions,
                                    values=values, extra=extra)

    def is_feasible(self, result: Evaluation) -> bool:
        return self.evaluator.feasible(self.budgets, result.resources())

    def _best_value(self) -> float | None:
        feasible = [r.accuracy for r in [*self._recorded.values(), *self._measured] if self.is_feasible(r)]
        return max(feasible) if feasible else None

    def best(self) -> SearchResult:
        trial = best_feasible(self.study)
        if trial is None:
            return SearchResult(None, None, self.trials_done)
        return SearchResult(policy_of(trial), evaluation_of(trial), self.trials_done)


class Agent(abc.ABC):
    """A search agent: proposes policies, lets the context evaluate and record them.

    Subclasses set ``name``, ``description``, ``default_trials`` and ``options``, and implement
    :meth:`search`. Options are passed to ``__init__`` as keyword arguments.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    default_trials: ClassVar[int] = 20
    options: ClassVar[dict[str, Option]] = {}
    # True when candidates are independent draws, so that `autoprune worker` processes may share the study
    parallel: ClassVar[bool] = False
    # the study's objectives: the first is always the validation accuracy; agents recording more
    # values per trial (``ctx.evaluate(..., values=...)``) declare their directions here
    directions: ClassVar[tuple[str, ...]] = ("maximize",)
    # True when the agent builds channel-pruned models itself, so that only --granularity channel applies
    channel_only: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise InputError(
                f"agent {self.name!r} has no option {unknown[0]!r}; its options: "
                + (", ".join(self.options) or "none")
            )
        for key, opt in self.options.items():
            value = options.get(key, opt.default)
            if value is not None and opt.choices is not None and value not in opt.choices:
                raise InputError(
                    f"--{self.name}-{key.replace('_', '-')} {value!r}: choose from "
                    + ", ".join(map(str, opt.choices))
                )
            setattr(self, key, value)

    @abc.abstractmethod
    def search(self, ctx: SearchContext) -> SearchResult:
        """Propose and evaluate candidates through ``ctx`` until ``ctx.should_stop()`` or done."""

    def settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.options}


AGENTS: dict[str, type[Agent]] = {}


def register(cls: type[Agent]) -> type[Agent]:
    """Class decorator: make an agent available by its ``name``."""
    AGENTS[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    for ep in metadata.entry_points(group="autoprune.agents"):
        if ep.name not in AGENTS:
            try:
                register(ep.load())
            except Exception:  # a broken plug-in must not break the built-in agents
                continue


def get_agent(name: str) -> type[Agent]:
    _load_entry_points()
    try:
        return AGENTS[name]
    except KeyError:
        raise InputError(f"unknown agent {name!r}; choose from {', '.join(sorted(AGENTS))}") from None


def list_agents() -> dict[str, type[Agent]]:
    _load_entry_points()
    return dict(sorted(AGENTS.items()))


def ratios_of(names: Iterable[str], values: Iterable[float]) -> dict[str, float]:
    return dict(zip(names, (float(v) for v in values)))
