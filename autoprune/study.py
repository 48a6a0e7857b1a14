"""Optuna storage and the conventions every agent's trials follow.

Every evaluated candidate is one trial. Its params are the per-group ratios (FloatDistribution over
[0, 1]) or the agent's own hyperparameters; its first value is the task's objective (named after the
task's metric for the dashboard: ``accuracy``, ``miou``, ...; agents with several objectives add
theirs); its user attributes carry what a person inspecting the study in optuna-dashboard wants to see:
``agent``, ``metric`` and ``score`` (the objective's name and value), every metric the task reported
under its own name (``accuracy``, ``loss``, ...) and together in ``metrics``, ``flops``, ``params``,
``latency``, ``flops_ratio`` / ``params_ratio`` / ``latency_ratio`` (fractions kept), ``feasible``,
``finetune_steps``, ``seconds`` and ``policy`` (the policy JSON); for masked granularities ``flops``
and ``params`` are the effective figures and ``flops_dense`` / ``params_dense`` the dense ones. Each
budget is also an Optuna constraint named after its resource (``flops``, ...: the measured value over
the limit, minus one; <= 0 when it holds), where constrained samplers and the dashboard read them.

The study's own user attributes hold the unpruned model's figures and the search's configuration, so
that ``export``, ``worker`` and ``apply`` need nothing but the storage.

Trials are written through Optuna's public API only: ``study.add_trial`` for a candidate measured in
one go, or a live trial of ``study.optimize`` (agents whose candidates Optuna's samplers propose, and
candidates that processes share out through the study's queue). A storage opened from a database URL
keeps a heartbeat of the running trials (:func:`open_storage`), so that a trial whose process died is
failed and queued again for another process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from autoprune.errors import InputError
from autoprune.evaluator import Evaluation
from autoprune.policy import Policy

if TYPE_CHECKING:
    from autoprune.budget import Budgets

DEFAULT_STORAGE = "sqlite:///autoprune.db"
RATIO_DISTRIBUTION = FloatDistribution(0.0, 1.0)
# seconds between heartbeats of a running trial; one missed for GRACE_BEATS beats is a dead process
HEARTBEAT_SECONDS = int(os.environ.get("AUTOPRUNE_HEARTBEAT", "10"))
GRACE_BEATS = 3
# attribute names the recording itself uses: a task metric with one of these names is stored as metric_<name>
RESERVED_ATTRS = frozenset({"agent", "metric", "score", "metrics", "flops", "params", "latency", "flops_ratio",
                            "params_ratio", "latency_ratio", "feasible", "finetune_steps",
                            "seconds", "split", "policy", "flops_dense", "params_dense", "fail_reason",
                            "energy", "energy_ratio", "energy_layers"})

optuna.logging.set_verbosity(optuna.logging.WARNING)
logging.getLogger("optuna").propagate = False


def study_name(model: str, dataset: str, agent: str, budget_slug: str) -> str:
    """``<model>-<task>-<agent>-<budget>``, e.g. ``resnet20-digits-uniform-flops50``."""
    file, sep, factory = model.rpartition(":")
    if sep and file.endswith(".py"):  # path/to/nets.py:small -> nets_small
        model = f"{os.path.basename(file)[:-3]}_{factory}"
    model = model.replace("torchvision:", "tv_").replace("/", "_").replace(":", "_")
    return f"{model}-{dataset}-{agent}-{budget_slug}"


_STORAGES: dict[str, optuna.storages.BaseStorage] = {}


def open_storage(url: str | optuna.storages.BaseStorage | None) -> optuna.storages.BaseStorage:
    """The storage at ``url``, opened once per process: ``None`` is a new in-memory storage, a database URL
    (``sqlite:///...``, ``postgresql://...``) an RDB storage with a heartbeat of running trials (a trial
    whose heartbeat stops is failed and queued again), anything else what Optuna makes of it."""
    if url is None:
        return optuna.storages.InMemoryStorage()
    if isinstance(url, optuna.storages.BaseStorage):
        return url
    if url not in _STORAGES:
        try:
            if "://" in url and not url.startswith(("redis", "grpc")):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    _STORAGES[url] = optuna.storages.RDBStorage(
                        url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_BEATS * HEARTBEAT_SECONDS,
                        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
            else:
                _STORAGES[url] = optuna.storages.get_storage(url)
        except Exception as e:  # optuna raises many types for a bad URL; one line is what the user needs
            raise InputError(f"cannot open storage {url!r}: {str(e).splitlines()[0]}") from None
    return _STORAGES[url]


def open_study(name: str, storage: str | optuna.storages.BaseStorage | None = DEFAULT_STORAGE,
               directions: Iterable[str] = ("maximize",), metric_names: Iterable[str] | None = None,
               sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """Create the study, or load it when it exists (a second run with the same name resumes), and name
    its objectives for the dashboard. ``storage`` is a URL or an open storage (:func:`open_storage`)."""
    study = optuna.create_study(study_name=name, storage=open_storage(storage), directions=list(directions),
                                sampler=sampler, load_if_exists=True)
    names = list(metric_names or [])
    if names and len(names) == len(study.directions) and study.metric_names != names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    return study


def load_study(name: str, storage: str | optuna.storages.BaseStorage = DEFAULT_STORAGE) -> optuna.Study:
    st = open_storage(storage)
    try:
        return optuna.load_study(study_name=name, storage=st)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(st)]
        known = f"; studies there: {', '.join(names)}" if names else "; the storage holds no study"
        raise InputError(f"no study named {name!r} in {storage}{known}") from None


# -- what one trial records -------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def trial_attrs(policy: Policy, result: Evaluation, *, agent: str, feasible: bool,
                base: Mapping[str, float]) -> dict[str, Any]:
    metrics = {k: _finite(float(v)) for k, v in result.metrics.items()}
    attrs: dict[str, Any] = {
        "agent": agent,
        "metric": result.metric,
        "score": result.score,
        **{(k if k not in RESERVED_ATTRS else f"metric_{k}"): v for k, v in metrics.items()},
        "metrics": metrics,
        "flops": result.flops,
        "params": result.params,
        "latency": result.latency,
        "flops_ratio": result.flops / base["flops"],
        "params_ratio": result.params / base["params"],
        "feasible": bool(feasible),
        "finetune_steps": result.finetune_steps,
        "seconds": result.seconds,
        "split": result.split,
        "policy": policy.to_json(indent=None),
    }
    if result.latency is not None and base.get("latency"):
        attrs["latency_ratio"] = result.latency / base["latency"]
    if result.flops_dense is not None:  # a masked granularity: flops/params above are the effective ones
        attrs["flops_dense"] = result.flops_dense
        attrs["params_dense"] = result.params_dense
    if result.energy is not None:  # MAC-equivalents (autoprune.energy), in total and per layer
        attrs["energy"] = result.energy
        attrs["energy_layers"] = dict(result.energy_layers or {})
        if base.get("energy"):
            attrs["energy_ratio"] = result.energy / base["energy"]
    return attrs


def score_of(trial: FrozenTrial) -> float:
    """The task objective a trial recorded (studies of older versions recorded ``accuracy`` only)."""
    a = trial.user_attrs
    return float(a["score"] if "score" in a else a["accuracy"])


def completed(study: optuna.Study) -> list[FrozenTrial]:
    """The study's finished candidates (complete trials that carry a policy)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "policy" in t.user_attrs]


def best_feasible(study: optuna.Study) -> FrozenTrial | None:
    """The feasible trial best at the study's first objective (its direction); ties go to fewer FLOPs,
    then to the earlier trial."""
    feasible = [t for t in completed(study) if t.user_attrs.get("feasible")]
    if not feasible:
        return None
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0
    return max(feasible, key=lambda t: (sign * score_of(t), -t.user_attrs["flops"], -t.number))


def policy_of(trial: FrozenTrial) -> Policy:
    return Policy.from_json(trial.user_attrs["policy"], source=f"trial {trial.number}")


def evaluation_of(trial: FrozenTrial) -> Evaluation:
    a = trial.user_attrs
    metric = a.get("metric", "accuracy")
    metrics = dict(a.get("metrics") or {metric: score_of(trial), "loss": a.get("loss")})
    return Evaluation(
        score=score_of(trial), flops=a["flops"], params=a["params"], latency=a.get("latency"),
        seconds=a["seconds"], finetune_steps=a["finetune_steps"], split=a.get("split", "val"), metric=metric,
        metrics={k: (float(v) if v is not None else math.nan) for k, v in metrics.items()},
        flops_dense=a.get("flops_dense"), params_dense=a.get("params_dense"),
        energy=a.get("energy"), energy_layers=a.get("energy_layers"),
    )


def best_policy(study: optuna.Study) -> Policy:
    """The best feasible trial's policy, with its metrics and the search configuration filled in."""
    trial = best_feasible(study)
    if trial is None:
        n = len(completed(study))
        raise InputError(f"study {study.study_name!r} has no feasible trial among its {n} completed ones")
    policy = policy_of(trial)
    a = trial.user_attrs
    info = study.user_attrs
    result = evaluation_of(trial)
    policy.metrics = {
        "metric": result.metric,
        "score": result.score,
        **{k: _finite(v) for k, v in result.metrics.items()},
        "split": result.split,
        "flops": a["flops"],
        "params": a["params"],
        "latency": a.get("latency"),
        "flops_ratio": a["flops_ratio"],
        "params_ratio": a["params_ratio"],
        **{k: a[k] for k in ("flops_dense", "params_dense", "energy", "energy_ratio", "energy_layers") if k in a},
        "base": info.get("base", {}),
        **{k: v for k, v in a.items() if k.startswith("final_")},
    }
    policy.search = {
        **policy.search,  # what the agent wrote into the recorded policy (e.g. its hyperparameters)
        **info.get("config", info.get("settings", {})),
        "study": study.study_name,
        "trial": trial.number,
        "agent": a.get("agent"),
        "trials": len(completed(study)),
    }
    if len(study.directions) > 1:  # a multi-objective study: the feasible Pareto front, best first
        policy.search["pareto_front"] = pareto_front(study)
    return policy


def pareto_front(study: optuna.Study) -> list[dict[str, Any]]:
    """The feasible non-dominated trials of a multi-objective study (number, values, params, score),
    best first."""
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0
    front = [t for t in study.best_trials if t.user_attrs.get("feasible")]
    front.sort(key=lambda t: (-sign * score_of(t), t.number))
    return [{"trial": t.number, "values": list(t.values), "params": dict(t.params), "score": score_of(t)}
            for t in front]


def set_study_info(study: optuna.Study, **info: Any) -> None:
    for k, v in info.items():
        study.set_user_attr(k, json.loads(json.dumps(v, default=str)))


# -- the recorder -------------------------------------------------------------------------------------


class Recorder:
    """The one place candidates become trials of ``study``, and the one "already recorded?" lookup.

    Feasibility and constraint values come from ``budgets`` (the search's budgets, judged on what
    was measured). :meth:`add` writes a finished trial (``study.add_trial``); :meth:`fill` writes into a
    live trial of ``study.optimize``, whose objective then returns the values it gives. :meth:`lookup`
    answers from the study (this process's trials and those of earlier runs and other workers), so a
    resumed search or a second worker does not evaluate a recorded candidate again. Trials an agent
    measured on a model it built itself (``measured_by_agent``) answer no lookup: they are not the
    evaluator's figures for their policy.
    """

    def __init__(self, study: optuna.Study, agent: str, budgets: Budgets) -> None:
        self.study = study
        self.agent = agent
        self.budgets = budgets
        self.sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0
        self._index: dict[tuple, tuple[int, Evaluation]] = {}
        self._read: set[int] = set()
        self.best_score: float | None = None
        self.written = 0  # trials this recorder wrote
        self._refresh()

    # -- reading ------------------------------------------------------------------------------
    def _refresh(self) -> None:
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number in self._read or "policy" not in t.user_attrs:
                continue
            self._read.add(t.number)
            try:
                policy, result = policy_of(t), evaluation_of(t)
            except (InputError, KeyError, TypeError):
                continue
            if t.user_attrs.get("feasible"):
                self._note_best(result.score)
            if not t.user_attrs.get("measured_by_agent"):
                self._index.setdefault(self.key(policy, result.finetune_steps, result.split), (t.number, result))

    @staticmethod
    def key(policy: Policy, finetune_steps: int, split: str = "val") -> tuple:
        return policy.key(), int(finetune_steps), split

    def lookup(self, policy: Policy, finetune_steps: int, split: str = "val") -> tuple[int, Evaluation] | None:
        """``(trial number, evaluation)`` of ``policy`` scored after ``finetune_steps`` steps, when the
        study holds it."""
        key = self.key(policy, finetune_steps, split)
        if key not in self._index:
            self._refresh()
        return self._index.get(key)

    def feasible(self, result: Evaluation) -> bool:
        return self.budgets.holds(result.resources())

    def _note_best(self, score: float) -> None:
        if self.best_score is None or self.sign * score > self.sign * self.best_score:
            self.best_score = score

    # -- writing ------------------------------------------------------------------------------
    def attrs(self, policy: Policy, result: Evaluation, extra: Mapping[str, Any] | None) -> dict[str, Any]:
        feasible = self.feasible(result)
        attrs = trial_attrs(policy, result, agent=self.agent, feasible=feasible, base=self.budgets.base)
        attrs.update(extra or {})
        if feasible:
            self._note_best(result.score)
        self.written += 1
        return attrs

    def add(self, policy: Policy, result: Evaluation, *, params: Mapping[str, Any] | None = None,
            distributions: Mapping[str, Any] | None = None, values: list[float] | None = None,
            extra: Mapping[str, Any] | None = None) -> None:
        """Add a finished trial: params default to the policy's ratios, values to the objective alone."""
        attrs = self.attrs(policy, result, extra)
        if params is None:
            params = dict(policy.ratios)
            distributions = dict.fromkeys(params, RATIO_DISTRIBUTION)
        self.study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, values=values if values is not None else [result.score],
            params=dict(params), distributions=dict(distributions or {}), user_attrs=attrs,
            constraints=self.budgets.violations(result.resources()),
        ))
        self._refresh()

    def fill(self, trial: optuna.Trial, policy: Policy, result: Evaluation, *,
             values: list[float] | None = None, extra: Mapping[str, Any] | None = None) -> list[float]:
        """Write the record into the live ``trial`` (of ``study.optimize``); return the values its
        objective returns."""
        for k, v in self.attrs(policy, result, extra).items():
            trial.set_user_attr(k, v)
        for k, v in self.budgets.violations(result.resources()).items():
            trial.set_constraint(k, v)
        return values if values is not None else [result.score]

    def fail(self, policy: Policy | None, reason: str, *, params: Mapping[str, Any] | None = None,
             distributions: Mapping[str, Any] | None = None, trial: optuna.Trial | None = None) -> None:
        """Keep a failed candidate in the study with its reason, so nothing is silently dropped. For a live
        ``trial`` the attributes are written and the caller lets the trial fail."""
        attrs = {"agent": self.agent, "feasible": False, "fail_reason": reason}
        if policy is not None:
            attrs["policy"] = policy.to_json(indent=None)
        if trial is not None:
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            return
        if params is None and policy is not None:
            params = dict(policy.ratios)
            distributions = dict.fromkeys(params, RATIO_DISTRIBUTION)
        self.study.add_trial(optuna.trial.create_trial(
            state=TrialState.FAIL, params=dict(params or {}), distributions=dict(distributions or {}),
            user_attrs=attrs,
        ))

    def best(self) -> FrozenTrial | None:
        return best_feasible(self.study)


# -- candidates processes share out through a study's queue ----------------------------------------


def queued_state(study: optuna.Study, key_of) -> tuple[set, set]:
    """``(done, pending)``: the keys (``key_of(params)``) of complete trials, and of those waiting in the
    queue or running somewhere (a dead process's running trial is failed, and queued again, first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    done, pending = set(), set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)):
        params = t.params or t.system_attrs.get("fixed_params", {})  # queued params are fixed, not yet suggested
        try:
            key = key_of(params)
        except (KeyError, TypeError):
            continue
        (done if t.state == TrialState.COMPLETE else pending).add(key)
    return done, pending


@contextlib.contextmanager
def sampling_with(study: optuna.Study, sampler: optuna.samplers.BaseSampler):
    """``study`` proposing with ``sampler`` within the block (an agent's own sampler on the search's study)."""
    before = study.sampler
    study.sampler = sampler
    try:
        yield study
    finally:
        study.sampler = before


def has_waiting(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
