"""Optuna storage and the conventions every agent's trials follow.

Every evaluated candidate is one trial. Its params are the per-group ratios (FloatDistribution over
[0, 1]) or the agent's own hyperparameters; its value is the validation accuracy (agents with several
objectives add theirs); its user attributes carry what a person inspecting the study in
optuna-dashboard wants to see: ``agent``, ``accuracy``, ``loss``, ``flops``, ``params``, ``latency``,
``flops_ratio`` / ``params_ratio`` / ``latency_ratio`` (fractions kept), ``feasible``,
``finetune_steps``, ``seconds`` and ``policy`` (the policy JSON); for masked granularities ``flops``
and ``params`` are the effective figures and ``flops_dense`` / ``params_dense`` the dense ones.
Constraint values (<= 0 when a budget holds) go where Optuna's constrained samplers and the dashboard
look for them.

The study's own user attributes hold the unpruned model's figures and the search settings, so that
``export`` needs nothing but the storage.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from autoprune.budget import Budget
from autoprune.errors import InputError
from autoprune.evaluator import Evaluation
from autoprune.policy import Policy

DEFAULT_STORAGE = "sqlite:///autoprune.db"
RATIO_DISTRIBUTION = FloatDistribution(0.0, 1.0)

optuna.logging.set_verbosity(optuna.logging.WARNING)
logging.getLogger("optuna").propagate = False


def study_name(model: str, dataset: str, agent: str, budget_slug: str) -> str:
    """``<model>-<dataset>-<agent>-<budget>``, e.g. ``resnet20-digits-uniform-flops50``."""
    model = model.replace("torchvision:", "tv_").replace("/", "_").replace(":", "_")
    return f"{model}-{dataset}-{agent}-{budget_slug}"


def _storage(url: str) -> optuna.storages.BaseStorage:
    try:
        return optuna.storages.get_storage(url)
    except Exception as e:  # optuna raises many types for a bad URL; one line is what the user needs
        raise InputError(f"cannot open storage {url!r}: {str(e).splitlines()[0]}") from None


def open_study(name: str, storage: str | optuna.storages.BaseStorage = DEFAULT_STORAGE,
               directions: Iterable[str] = ("maximize",),
               sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """Create the study, or load it when it exists (a second run with the same name resumes).
    ``storage`` is a URL or an open storage (:func:`storage_of` another study, to keep them together)."""
    return optuna.create_study(
        study_name=name,
        storage=_storage(storage),
        directions=list(directions),
        sampler=sampler,
        load_if_exists=True,
    )


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The open storage holding ``study`` (Optuna keeps it private; studies kept beside it use it)."""
    return study._storage


def load_study(name: str, storage: str = DEFAULT_STORAGE) -> optuna.Study:
    st = _storage(storage)
    try:
        return optuna.load_study(study_name=name, storage=st)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(st)]
        known = f"; studies there: {', '.join(names)}" if names else "; the storage holds no study"
        raise InputError(f"no study named {name!r} in {storage}{known}") from None


def constraint_values(budgets: Iterable[Budget], resources: Mapping[str, float],
                      base: Mapping[str, float]) -> list[float]:
    """One value per budget, <= 0 when it holds: the measured value over the limit, minus one."""
    return [resources[b.resource] / b.limit(base[b.resource]) - 1.0 for b in budgets]


def trial_attrs(policy: Policy, result: Evaluation, *, agent: str, feasible: bool,
                base: Mapping[str, float]) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "agent": agent,
        "accuracy": result.accuracy,
        "loss": result.loss if math.isfinite(result.loss) else None,
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
    return attrs


def record(study: optuna.Study, policy: Policy, result: Evaluation, *, agent: str, feasible: bool,
           constraints: list[float], base: Mapping[str, float], params: Mapping[str, float] | None = None,
           distributions: Mapping[str, Any] | None = None, values: list[float] | None = None,
           extra: Mapping[str, Any] | None = None, claim: int | None = None) -> FrozenTrial:
    """Add one evaluated candidate to ``study`` as a finished trial and return it.

    With ``claim`` (a trial number from :func:`claim`) the claimed trial is finished instead, keeping
    the params it was claimed with."""
    attrs = trial_attrs(policy, result, agent=agent, feasible=feasible, base=base)
    attrs.update(extra or {})
    values = values if values is not None else [result.accuracy]
    if claim is not None:
        return _finish(study, claim, TrialState.COMPLETE, values, attrs, {"constraints": list(constraints)})
    if params is None:
        params = dict(policy.ratios)
        distributions = dict.fromkeys(params, RATIO_DISTRIBUTION)
    trial = optuna.trial.create_trial(
        state=TrialState.COMPLETE,
        values=values,
        params=dict(params),
        distributions=dict(distributions or {}),
        user_attrs=attrs,
        system_attrs={"constraints": list(constraints)},
    )
    study.add_trial(trial)
    return study.trials[-1]


def record_failure(study: optuna.Study, policy: Policy | None, reason: str, *, agent: str,
                   params: Mapping[str, float] | None = None,
                   distributions: Mapping[str, Any] | None = None, claim: int | None = None) -> None:
    """Keep a failed candidate in the study with its reason, so nothing is silently dropped.
    With ``claim`` (a trial number from :func:`claim`) the claimed trial is failed instead."""
    if params is None and policy is not None:
        params = dict(policy.ratios)
        distributions = dict.fromkeys(params, RATIO_DISTRIBUTION)
    attrs = {"agent": agent, "feasible": False, "fail_reason": reason}
    if policy is not None:
        attrs["policy"] = policy.to_json(indent=None)
    if claim is not None:
        _finish(study, claim, TrialState.FAIL, None, attrs)
        return
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.FAIL, params=dict(params or {}), distributions=dict(distributions or {}),
        user_attrs=attrs,
    ))


def claim(study: optuna.Study, key: str, *, params: Mapping[str, Any], distributions: Mapping[str, Any],
          user_attrs: Mapping[str, Any]) -> int:
    """Add a RUNNING trial for a candidate this process is about to evaluate, and return its number.

    Processes sharing the study see the claim (user attribute ``claim_key``, plus whatever
    ``user_attrs`` say about its owner) and leave the candidate alone; :func:`record` or
    :func:`record_failure` with ``claim=`` the number finishes the trial, so that the candidate stays
    one trial. Optuna's ``ask`` cannot fix the params of the trial it creates, hence the storage call.
    """
    trial = optuna.trial.create_trial(state=TrialState.RUNNING, params=dict(params),
                                      distributions=dict(distributions),
                                      user_attrs={**user_attrs, "claim_key": key})
    storage = storage_of(study)
    return storage.get_trial_number_from_id(storage.create_new_trial(study._study_id, template_trial=trial))


def _finish(study: optuna.Study, number: int, state: TrialState, values: list[float] | None,
            user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any] | None = None) -> FrozenTrial:
    """Finish the claimed trial ``number``; raises optuna's ``UpdateFinishedTrialError`` when another
    process finished it first (it took the claim over as abandoned)."""
    storage = storage_of(study)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    for k, v in user_attrs.items():
        storage.set_trial_user_attr(trial_id, k, v)
    for k, v in (system_attrs or {}).items():
        storage.set_trial_system_attr(trial_id, k, v)
    storage.set_trial_state_values(trial_id, state, values)
    return storage.get_trial(trial_id)


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "policy" in t.user_attrs]


def best_feasible(study: optuna.Study) -> FrozenTrial | None:
    """The most accurate feasible trial; ties go to fewer FLOPs, then to the earlier trial."""
    feasible = [t for t in completed(study) if t.user_attrs.get("feasible")]
    if not feasible:
        return None
    return max(feasible, key=lambda t: (t.user_attrs["accuracy"], -t.user_attrs["flops"], -t.number))


def policy_of(trial: FrozenTrial) -> Policy:
    return Policy.from_json(trial.user_attrs["policy"], source=f"trial {trial.number}")


def evaluation_of(trial: FrozenTrial) -> Evaluation:
    a = trial.user_attrs
    return Evaluation(
        accuracy=a["accuracy"], loss=a["loss"] if a.get("loss") is not None else float("nan"),
        flops=a["flops"], params=a["params"], latency=a.get("latency"), seconds=a["seconds"],
        finetune_steps=a["finetune_steps"], split=a.get("split", "val"),
        flops_dense=a.get("flops_dense"), params_dense=a.get("params_dense"),
    )


def best_policy(study: optuna.Study) -> Policy:
    """The best feasible trial's policy, with its metrics and the search settings filled in."""
    trial = best_feasible(study)
    if trial is None:
        n = len(completed(study))
        raise InputError(f"study {study.study_name!r} has no feasible trial among its {n} completed ones")
    policy = policy_of(trial)
    a = trial.user_attrs
    info = study.user_attrs
    policy.metrics = {
        "accuracy": a["accuracy"],
        "split": a.get("split", "val"),
        "flops": a["flops"],
        "params": a["params"],
        "latency": a.get("latency"),
        "flops_ratio": a["flops_ratio"],
        "params_ratio": a["params_ratio"],
        **{k: a[k] for k in ("flops_dense", "params_dense") if k in a},
        "base": info.get("base", {}),
        **{k: v for k, v in a.items() if k.startswith("final_")},
    }
    policy.search = {
        **policy.search,  # what the agent wrote into the recorded policy (e.g. its hyperparameters)
        "study": study.study_name,
        "trial": trial.number,
        "agent": a.get("agent"),
        "trials": len(completed(study)),
        **info.get("settings", {}),
    }
    if len(study.directions) > 1:  # a multi-objective study: the feasible Pareto front, best first
        policy.search["pareto_front"] = pareto_front(study)
    return policy


def pareto_front(study: optuna.Study) -> list[dict[str, Any]]:
    """The feasible non-dominated trials of a multi-objective study (number, values, params, accuracy),
    most accurate first."""
    front = [t for t in study.best_trials if t.user_attrs.get("feasible")]
    front.sort(key=lambda t: (-t.user_attrs.get("accuracy", 0.0), t.number))
    return [{"trial": t.number, "values": list(t.values), "params": dict(t.params),
             "accuracy": t.user_attrs.get("accuracy")} for t in front]


def set_study_info(study: optuna.Study, **info: Any) -> None:
    for k, v in info.items():
        study.set_user_attr(k, json.loads(json.dumps(v)))
