"""The agent interface, the search context every agent receives, and the agent registry.

Lifecycle of a search (what :func:`autoprune.runner.run_search` does)::

    agent = get_agent("amc")(**options)          # options checked here, as on the command line
    study = open_study(name, storage, agent.directions(task), agent.metric_names(task))
    ctx = SearchContext(evaluator, Budgets(budgets, evaluator, max_ratio), study, "amc",
                        limits=Limits(trials, timeout), seed=seed, finetune_steps=steps)
    result = agent.search(ctx)                   # proposes policies; ctx.evaluate(policy) scores and records
    ctx.best()                                   # the best feasible trial of the study

An agent only proposes. ``ctx.evaluate(policy)`` runs the shared evaluator, decides feasibility on the
measured pruned model and records the candidate as one Optuna trial (a failed candidate is recorded as
a failed trial and gives ``None``). A candidate the study already holds is answered from it, not
evaluated again, so a deterministic agent re-run with the same seed continues where it stopped, and
workers sharing a study do not repeat each other. ``ctx.should_stop()`` says when the trial or time
limit is reached.

The context has few parts, each with a handful of methods:

- ``ctx.evaluator``: the shared evaluator; ``ctx.task`` is its task (the only way to data);
- ``ctx.budgets``: the budgets (:class:`~autoprune.budget.Budgets`): ``fits``, ``fit`` (the one
  bisection to the budget), ``holds``, ``unreachable`` (the one refusal), ``max_ratio``, ``base``;
- ``ctx.recorder``: the study (``ctx.study``) and the one recording path
  (:class:`~autoprune.study.Recorder`); ``ctx.storage`` holds studies kept beside it;
- ``ctx.limits``: the trial and time limits; ``ctx.seed``, ``ctx.finetune_steps``, ``ctx.reporter``.

Agents subclass :class:`Agent`, declare their options (exposed on the command line as
``--<agent>-<option>``, in Python as keyword arguments of :func:`autoprune.search`) and register with
:func:`register` or the ``autoprune.agents`` entry point.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, ClassVar

import optuna
from optuna.trial import TrialState
from torch import nn

from autoprune.budget import Budgets
from autoprune.errors import CandidateError, InputError, ParameterError
from autoprune.evaluator import Evaluation, Evaluator
from autoprune.policy import Policy
from autoprune.study import Recorder, evaluation_of, open_storage, policy_of
from autoprune.task import Task


@dataclass(frozen=True)
class Option:
    """An agent hyperparameter: its type, default, meaning and the values it accepts.

    ``low`` / ``high`` bound a number (or every number of a tuple) inclusively, or exclusively with
    ``low_open`` / ``high_open``; ``choices`` lists the values allowed; ``accepts`` says in words what a
    parsing ``type`` accepts; ``metavar`` names the value in ``--help`` (default ``N`` for integers, ``X``
    for other numbers, ``TEXT`` for strings). ``None`` as a default means "derived from other settings"
    and is always accepted.
    """

    type: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    metavar: str | None = None
    accepts: str | None = None  # what it accepts, in words, where the type and bounds do not say it

    def allowed(self) -> str:
        """What the option accepts, in words."""
        if self.accepts is not None:
            return self.accepts
        if self.choices is not None:
            return "choose from " + ", ".join(map(str, self.choices))
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        kind = {int: "an integer", float: "a number", str: "text"}.get(self.type, "a value")
        return f"{kind} {' and '.join(parts)}".strip() if parts else kind

    def display_metavar(self) -> str:
        if self.metavar:
            return self.metavar
        if self.choices is not None:
            return "{" + ",".join(map(str, self.choices)) + "}"
        return {int: "N", float: "X"}.get(self.type, "TEXT")

    def check(self, agent: str, name: str, value: Any) -> Any:
        """``value`` converted to the option's type and checked; :class:`ParameterError` otherwise."""
        if value is None:
            return None

        def bad() -> ParameterError:
            text = self.allowed()
            return ParameterError(name, value, text if self.choices is not None or self.accepts else f"must be {text}",
                                  agent=agent)

        if isinstance(value, bool) and self.type is not bool:
            raise bad()
        try:
            if self.type is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                converted = int(value)
            elif self.type in (float, str):
                converted = self.type(value)
            else:  # a parsing function (e.g. comma-separated numbers): strings and values alike
                converted = self.type(value)
        except (TypeError, ValueError, InputError):
            raise bad() from None
        if self.choices is not None and converted not in self.choices:
            raise bad()
        numbers = converted if isinstance(converted, tuple) else (converted,)
        for x in numbers:
            if not isinstance(x, (int, float)):
                continue
            if isinstance(x, float) and not math.isfinite(x):
                raise bad()
            if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
                raise bad()
            if self.high is not None and (x > self.high or (self.high_open and x == self.high)):
                raise bad()
        return converted


# a search's first candidates all this close to the task's chance level are noise to rank (Fashion-MNIST at 15 %
# FLOPs: every candidate of 20 scored 11-13 % on validation after adaptive BN alone, against 10 % chance)
CHANCE_EVALUATIONS = 5
CHANCE_MARGIN = 0.05


class Reporter:
    """Progress callbacks; the command line shows a progress bar, tests use this silent one."""

    def start(self, total: int | None, done: int) -> None: ...

    def advance(self, status: str) -> None: ...

    def message(self, text: str) -> None: ...

    def stop(self) -> None: ...


@dataclass
class SearchResult:
    """What an agent hands back: the best feasible policy it found (or None) and how it got there."""

    policy: Policy | None
    evaluation: Evaluation | None
    trials: int
    info: dict[str, Any] = field(default_factory=dict)


class Limits:
    """When a search stops: after ``n_trials`` finished trials in its study (complete or failed), or
    ``timeout`` seconds after it started."""

    def __init__(self, n_trials: int | None = None, timeout: float | None = None) -> None:
        self.n_trials = n_trials
        self.timeout = timeout
        self.started = time.monotonic()

    @staticmethod
    def done(study: optuna.Study) -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)))

    def out_of_time(self) -> bool:
        return self.timeout is not None and time.monotonic() - self.started >= self.timeout

    def reached(self, study: optuna.Study) -> bool:
        return (self.n_trials is not None and self.done(study) >= self.n_trials) or self.out_of_time()


class SearchContext:
    """Everything an agent works with (see the module docstring): the evaluator, the budgets, the
    recorder of its study, the limits, the seed, the fine-tune steps per candidate and a reporter."""

    def __init__(
        self,
        evaluator: Evaluator,
        budgets: Budgets,
        study: optuna.Study,
        agent: str,
        *,
        limits: Limits | None = None,
        seed: int = 0,
        finetune_steps: int = 0,
        reporter: Reporter | None = None,
        storage: optuna.storages.BaseStorage | None = None,
    ) -> None:
        self.evaluator = evaluator
        self.budgets = budgets
        self.recorder = Recorder(study, agent, budgets)
        self.limits = limits or Limits()
        self.seed = seed
        self.finetune_steps = finetune_steps
        self.reporter = reporter or Reporter()
        self._chance_scores: list[float] = []
        self._chance_said = False
        self.storage = storage if storage is not None else open_storage(None)

    @property
    def task(self) -> Task:
        return self.evaluator.task

    @property
    def study(self) -> optuna.Study:
        return self.recorder.study

    @property
    def agent(self) -> str:
        return self.recorder.agent

    def should_stop(self) -> bool:
        return self.limits.reached(self.study)

    # -- evaluation and recording -------------------------------------------------------------
    def evaluate(
        self,
        policy: Policy,
        finetune_steps: int | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        distributions: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        trial: optuna.Trial | None = None,
    ) -> Evaluation | None:
        """Evaluate ``policy`` with the shared evaluator and record it as one trial.

        Returns the evaluation, or None when the candidate failed (recorded as a failed trial). A
        candidate the study already holds is answered from it without a new trial. With ``trial`` (a
        live trial of ``study.optimize``) the record goes into that trial: a failed candidate raises
        its :class:`CandidateError` so that the trial fails, and a recorded one prunes the trial.
        """
        steps = self.finetune_steps if finetune_steps is None else int(finetune_steps)
        hit = self.recorder.lookup(policy, steps)
        if hit is not None:
            if trial is not None:
                raise optuna.TrialPruned(f"already recorded in trial {hit[0]}")
            return hit[1]
        try:
            result = self.evaluator.evaluate(policy, steps)
        except CandidateError as e:
            self.fail(policy, str(e), params=params, distributions=distributions, trial=trial)
            if trial is not None:
                raise
            return None
        except KeyboardInterrupt:
            # Ctrl-C: the running candidate is kept as a failed trial, then the search stops
            self.fail(policy, "interrupted by the user", params=params, distributions=distributions, trial=trial)
            raise
        self._write(policy, result, params, distributions, extra, trial)
        return result

    def record(
        self,
        policy: Policy,
        result: Evaluation,
        *,
        params: Mapping[str, Any] | None = None,
        distributions: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        trial: optuna.Trial | None = None,
    ) -> Evaluation:
        """Record, as one trial, an evaluation the agent measured itself (``evaluator.measure``) on a
        model it built otherwise than the shared evaluator does (ICE-Pick's iterative pruning, Pruning
        from Scratch's training from fresh weights). Feasibility is decided on ``result`` as in
        :meth:`evaluate`; the trial carries ``measured_by_agent``, so that no lookup of its policy
        takes it for the evaluator's figures."""
        self._write(policy, result, params, distributions, {**(extra or {}), "measured_by_agent": True}, trial)
        return result

    def fail(self, policy: Policy | None, reason: str, *, params: Mapping[str, Any] | None = None,
             distributions: Mapping[str, Any] | None = None, trial: optuna.Trial | None = None) -> None:
        """Record a candidate that failed (a diverging fine-tune, a task function that raised) as a failed trial."""
        self.recorder.fail(policy, reason, params=params, distributions=distributions, trial=trial)
        self.reporter.advance(f"candidate failed: {reason[:60]}" + self._best_status())

    def _write(self, policy, result, params, distributions, extra, trial) -> None:
        if trial is not None:
            self.recorder.fill(trial, policy, result, extra=extra)
        else:
            self.recorder.add(policy, result, params=params, distributions=distributions, extra=extra)
        feasible = self.recorder.feasible(result)
        self._check_chance(result)
        self.reporter.advance(f"last {self.task.format(result.score)}{'' if feasible else ' (infeasible)'}"
                              + self._best_status())

    def _check_chance(self, result: Evaluation) -> None:
        """Say once when the first :data:`CHANCE_EVALUATIONS` candidates of this run all score within
        :data:`CHANCE_MARGIN` of the task's chance level: their ranking is then noise, and fine-tune steps
        per candidate are what separates them."""
        chance = self.task.chance if self.task.direction == "maximize" else None
        if chance is None or self._chance_said:
            return
        self._chance_scores.append(result.score)
        if len(self._chance_scores) < CHANCE_EVALUATIONS:
            return
        self._chance_said = True
        if max(self._chance_scores) <= chance + CHANCE_MARGIN:
            steps = self.finetune_steps
            self.reporter.message(
                f"the first {len(self._chance_scores)} candidates all score within {CHANCE_MARGIN:.0%} of chance "
                f"({self.task.format(chance)}) after adaptive BN and {steps} fine-tune step{'s' * (steps != 1)}, "
                "so the search cannot tell them apart; give more --finetune-steps (README: Search quality)")

    def _best_status(self) -> str:
        best = self.recorder.best_score
        return f" | best feasible {self.task.format(best)}" if best is not None else ""

    def trial_of(self, policy: Policy, finetune_steps: int | None = None) -> int | None:
        """The number of the trial recording ``policy`` (at ``finetune_steps``), if the study holds one."""
        steps = self.finetune_steps if finetune_steps is None else int(finetune_steps)
        hit = self.recorder.lookup(policy, steps)
        return hit[0] if hit is not None else None

    def best(self) -> SearchResult:
        trial = self.recorder.best()
        done = Limits.done(self.study)
        if trial is None:
            return SearchResult(None, None, done)
        return SearchResult(policy_of(trial), evaluation_of(trial), done)


class Agent(abc.ABC):
    """A search agent: proposes policies, lets the context evaluate and record them.

    Subclasses set ``name``, ``description``, ``default_trials`` and ``options``, and implement
    :meth:`search`. Options are passed to ``__init__`` as keyword arguments and checked there, with the
    same names, defaults and rules as the command line's ``--<agent>-<option>`` flags.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    default_trials: ClassVar[int] = 20
    options: ClassVar[dict[str, Option]] = {}
    # True when candidates are independent draws, so that `autoprune worker` processes may share the study
    parallel: ClassVar[bool] = False
    # the study's objectives after the task's own (always the first): (name, direction) pairs
    objectives: ClassVar[tuple[tuple[str, str], ...]] = ()
    # True when the agent builds channel-pruned models itself, so that only --granularity channel applies
    channel_only: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ParameterError(unknown[0], options[unknown[0]],
                                 "no such option; its options: " + (", ".join(self.options) or "none"),
                                 agent=self.name)
        for key, opt in self.options.items():
            setattr(self, key, opt.check(self.name, key, options.get(key, opt.default)))

    @classmethod
    def directions(cls, task: Task) -> list[str]:
        """The study's objective directions: the task's, then the agent's own."""
        return [task.direction, *(d for _, d in cls.objectives)]

    @classmethod
    def metric_names(cls, task: Task) -> list[str]:
        """The study's objective names, as the dashboard shows them."""
        return [task.metric, *(n for n, _ in cls.objectives)]

    @abc.abstractmethod
    def search(self, ctx: SearchContext) -> SearchResult:
        """Propose and evaluate candidates through ``ctx`` until ``ctx.should_stop()`` or done."""

    @classmethod
    def rebuild(cls, evaluator: Evaluator, policy: Policy, finetune_steps: int) -> nn.Module:
        """The model a policy this agent recorded stands for, built again (``autoprune apply``): the
        shared evaluator's prune, recalibration and fine-tune. Agents that score models they build
        otherwise (ICE-Pick) build them again the same way, from what the policy recorded."""
        return evaluator.build(policy, finetune_steps)

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
    except (KeyError, TypeError):
        raise ParameterError("agent", name, f"unknown agent; choose from {', '.join(sorted(AGENTS))}") from None


def list_agents() -> dict[str, type[Agent]]:
    _load_entry_points()
    return dict(sorted(AGENTS.items()))

