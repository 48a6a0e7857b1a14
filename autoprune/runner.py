"""What the commands do, apart from parsing: set up the model and task, run a search, export and
re-apply policies, join a search as a worker. The Python API (:mod:`autoprune.api`) and the command
line are both thin layers over these functions, and so are the tests."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune.agents import Limits, Reporter, SearchContext, get_agent, list_agents
from autoprune.budget import Budget, Budgets, budgets_slug
from autoprune.config import SearchConfig, SourceConfig
from autoprune.errors import CandidateError, InputError, ParameterError
from autoprune.evaluator import Evaluation, Evaluator, resolve_device
from autoprune.models import build_model, load_checkpoint
from autoprune.models.checkpoint import fingerprint
from autoprune.policy import Policy
from autoprune.pretrain import Progress, load_or_train
from autoprune.study import (
    DEFAULT_STORAGE,
    best_feasible,
    best_policy,
    completed,
    evaluation_of,
    load_study,
    open_storage,
    open_study,
    set_study_info,
    study_name,
)
from autoprune.task import ImageClassificationTask, Task, check_task, load_task

DEFAULT_PRETRAIN_STEPS = 500
PRETRAIN_SEED = 0  # the base model does not change with the search's --seed


@dataclass
class Setup:
    """A base model ready to prune, its task, and the metadata that identifies them."""

    model: nn.Module
    task: Task
    info: dict[str, Any]


def prepare(source: SourceConfig | None = None, *, device: torch.device | str = "auto",
            log: Callable[[str], None] = print, progress: Progress | None = None) -> Setup:
    """Build the task (a built-in dataset, or ``source.task``'s factory), build the model for it, and load
    (or train once and cache) its weights.

    With no checkpoint a zoo or torchvision model is trained for ``pretrain_steps`` (default
    ``DEFAULT_PRETRAIN_STEPS``) and cached; a user factory is trained only when asked, since it may
    carry its own weights. ``progress`` follows that training (:func:`autoprune.pretrain.train_model`).
    """
    from autoprune.data import load_dataset

    source = source or SourceConfig()
    device = resolve_device(device)
    info: dict[str, Any] = {"name": source.model}
    if source.task is not None:
        task = load_task(source.task)
    else:
        if source.data_root is not None and not os.path.isdir(source.data_root) and not source.download:
            raise InputError(f"--data-root {source.data_root!r} does not exist or is not a directory")
        data = load_dataset(source.dataset, root=source.data_root, download=source.download,
                            image_size=source.image_size)
        task = ImageClassificationTask(data, batch_size=source.batch_size)
    kwargs = task.model_kwargs()
    missing = [k for k in ("in_channels", "num_classes", "image_size") if k not in kwargs]
    if missing and ".py:" not in source.model:
        raise InputError(f"model {source.model!r} is built for the task's {', '.join(missing)}, which the task "
                         "does not give (Task.model_kwargs); give --model path/to/file.py:factory instead")
    with torch.random.fork_rng(devices=[]):  # the same initial weights in every process: workers, apply
        torch.manual_seed(PRETRAIN_SEED)
        net = build_model(source.model, kwargs.get("in_channels", 3), kwargs.get("num_classes", 1),
                          kwargs.get("image_size", 32))
    info.update({"dataset": task.name, **kwargs, "source": source.to_dict()})
    if source.data_root is not None:
        info["data_root"] = str(Path(source.data_root).resolve())
    if source.checkpoint is not None:
        load_checkpoint(net, source.checkpoint)
        info["checkpoint"] = str(Path(source.checkpoint).resolve())
    else:
        user_file = ".py:" in source.model
        steps = source.pretrain_steps if source.pretrain_steps is not None else (
            0 if user_file else DEFAULT_PRETRAIN_STEPS)
        if steps > 0:
            path = load_or_train(net, source.model, task, steps, device=device, seed=PRETRAIN_SEED, log=log,
                                 progress=progress)
            info["pretrain_steps"] = steps
            info["checkpoint"] = str(path)
    return Setup(net.to(device).eval(), task, info)


def default_study_name(model_name: str, task_name: str, agent: str, budgets: list[Budget],
                       granularity: str = "channel") -> str:
    """``<model>-<task>-<agent>-<budget>``, with ``-unstructured`` or ``-2of4`` for a masked granularity,
    so that a masked search never resumes a channel one."""
    slug = budgets_slug(budgets) + ("" if granularity == "channel" else "-" + granularity.replace(":", "of"))
    return study_name(model_name, task_name, agent, slug)


def model_info(model: nn.Module, task: Task, info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What identifies the model searched: the command line's source (its name, dataset, checkpoint...),
    or, for a model handed over from Python, its class and the task; always its weights' fingerprint."""
    out = dict(info) if info else {"name": type(model).__name__, "dataset": task.name, "source": "python",
                                   **task.model_kwargs()}
    out["weights"] = fingerprint(model)
    return out


# the settings of a search the evaluator takes (as SearchConfig names them), recorded with every policy
EVALUATOR_SETTINGS = ("criterion", "granularity", "criterion_batches", "ignore", "bn_batches", "finetune_lr",
                      "distill", "latency_batch", "seed", "finetune_l1", "finetune_penalty", "reconstruct",
                      "energy_costs")


def make_evaluator(model: nn.Module, task: Task, settings: Mapping[str, Any], *, device: str = "auto",
                   amp: bool | str = "auto", info: Mapping[str, Any] | None = None) -> Evaluator:
    """The shared evaluator for ``settings`` (a :class:`SearchConfig`'s dict, or what a policy recorded)."""
    given = {k: settings[k] for k in EVALUATOR_SETTINGS if settings.get(k) is not None}
    return Evaluator(model, task, device=device, amp=amp, model_info=info, **given)


@dataclass
class SearchOutcome:
    """What a search gives back: the study, the best feasible policy (None when nothing met the
    budgets) and its figures, the unpruned model's, and the final test figures where the task has a
    test split."""

    study: Any
    policy: Policy | None
    best: Evaluation | None
    baseline_val: Evaluation
    baseline_test: Evaluation | None = None
    best_test: Evaluation | None = None
    new_trials: int = 0
    seconds: float = 0.0
    exported: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    evaluator: Evaluator | None = None
    recorded: int = 0  # trials this run wrote (workers add to a study others write too)
    storage: Any = None  # the open storage holding the study (and any study kept beside it)

    @property
    def evaluation(self) -> Evaluation | None:
        return self.best


def check_task_runs(evaluator: Evaluator) -> Evaluation:
    """Refuse, before any search, a task that fails on the unpruned model: its score, then the loss of
    one training batch. Returns the unpruned model's validation figures."""
    import copy

    baseline = evaluator.baseline("val")
    task = evaluator.task
    # in training mode, as the fine-tune runs it (outputs differ: auxiliary heads), on a copy: batch norm
    # would update the base model's running statistics, which every candidate starts from
    probe = copy.deepcopy(evaluator.model).train()
    try:
        batch = next(iter(task.train_batches(evaluator.seed)))
        with torch.no_grad():
            loss = task.loss(task.forward(probe, batch), batch)
        if not torch.isfinite(loss):
            raise CandidateError(f"loss is {float(loss)}")
    except CandidateError as e:
        raise InputError(f"the task fails on the unpruned model's first training batch: {e}") from None
    finally:
        del probe
    return baseline


def run_search(
    model: nn.Module,
    task: Task,
    config: SearchConfig,
    *,
    info: Mapping[str, Any] | None = None,
    reporter: Reporter | None = None,
    output: str | Path | None = None,
    final: bool = True,
    agent_seed: int | None = None,
) -> SearchOutcome:
    """Search ``model`` on ``task`` with ``config``: record every candidate in the study, and give the
    best feasible policy back (exported to ``output`` when given, with test figures when the task has a
    test split and ``final``). ``info`` is what the command line knows of where the model and data came
    from (:func:`prepare`; recorded, so that workers and ``apply`` rebuild them). ``agent_seed`` (a worker)
    seeds the agent's own draws apart from ``config.seed``, which seeds the evaluator's batches; a worker
    leaves the study's recorded configuration alone."""
    worker = agent_seed is not None
    task = check_task(task)
    agent_cls = config.agent_class()
    searcher = config.make_agent()
    info = model_info(model, task, info)
    evaluator = make_evaluator(model, task, config.to_dict(), device=config.device, amp=config.amp_setting(),
                               info=info)
    budgets = Budgets(config.budget_list(), evaluator, config.max_ratio)
    storage = open_storage(config.storage)
    name = config.study or default_study_name(info["name"], task.name, config.agent, budgets.budgets,
                                              config.granularity)
    directions = agent_cls.directions(task)
    st = open_study(name, storage, directions=directions, metric_names=agent_cls.metric_names(task))
    if len(st.directions) != len(directions):
        raise InputError(
            f"study {name!r} has {len(st.directions)} objective(s) but agent {config.agent!r} records "
            f"{len(directions)}; choose another --study name"
        )
    _check_same_search(st, info, evaluator, config)
    baseline_val = check_task_runs(evaluator)
    limits = Limits(config.trials if config.trials is not None else agent_cls.default_trials, config.timeout)
    ctx = SearchContext(evaluator, budgets, st, config.agent, limits=limits,
                        seed=config.seed if agent_seed is None else agent_seed,
                        finetune_steps=config.finetune_steps, reporter=reporter, storage=storage)
    if not worker:
        recorded = {**config.to_dict(), "trials": limits.n_trials, "amp_used": evaluator.amp,
                    "device_used": str(evaluator.device)}
        if config.granularity != "channel":  # N:M leaves these dense (input dimension not a multiple of M)
            recorded["dense_layers"] = evaluator.mask_pruner.dense_layers(config.granularity)
        base = {**budgets.base, "score": baseline_val.score, "metric": task.metric,
                **{k: v for k, v in baseline_val.metrics.items()}, "energy_layers": baseline_val.energy_layers}
        set_study_info(st, model=info, base=base, config=recorded, uniform_ratio=_uniform_ratio(budgets))
    t0 = time.perf_counter()
    before = Limits.done(st)
    ctx.reporter.start(limits.n_trials, before)
    try:
        with evaluator.sealed("test"):  # a search reads the validation split only
            result = searcher.search(ctx)
    finally:
        ctx.reporter.stop()
    outcome = SearchOutcome(st, None, None, baseline_val, new_trials=Limits.done(st) - before,
                            seconds=time.perf_counter() - t0, info=result.info, evaluator=evaluator,
                            recorded=ctx.recorder.written, storage=storage)
    # wall time of every run of this study's search, so that a resumed search reports its whole cost
    st.set_user_attr("search_seconds", float(st.user_attrs.get("search_seconds", 0.0)) + outcome.seconds)
    trial = best_feasible(st)
    if trial is None:
        return outcome
    outcome.policy = best_policy(st)
    outcome.best = evaluation_of(trial)
    if final and task.has_split("test"):
        # the final report: both models on the test split, latency measured on the same device
        steps = outcome.best.finetune_steps
        pruned = evaluator.build(outcome.policy, steps)
        outcome.baseline_test = _with_latency(evaluator, evaluator.baseline("test"), evaluator.model)
        outcome.best_test = _with_latency(evaluator, evaluator.measure(pruned, "test", steps), pruned)
        metrics = outcome.policy.metrics
        metrics["test_score"] = outcome.best_test.score
        metrics[f"test_{task.metric}"] = outcome.best_test.score
        metrics["latency"] = outcome.best_test.latency
        metrics["base"].update({"test_score": outcome.baseline_test.score,
                                f"test_{task.metric}": outcome.baseline_test.score,
                                "latency": outcome.baseline_test.latency})
    if output is not None:
        outcome.exported = outcome.policy.save(output)
    return outcome


def _uniform_ratio(budgets: Budgets) -> float | None:
    """The uniform policy's ratio at these budgets, for reports (not under a latency budget, which
    would time models to find it)."""
    if budgets.latency:
        return None
    try:
        return max(budgets.fit().values(), default=0.0)
    except InputError:
        return None


def _with_latency(evaluator: Evaluator, result: Evaluation, model: nn.Module) -> Evaluation:
    if result.latency is not None:
        return result
    return replace(result, latency=evaluator.latency_of(model))


# search settings that change the score of a candidate, not only how it is found: a resumed study keeps them
SCORED_WITH = ("criterion", "criterion_batches", "finetune_lr", "finetune_l1", "finetune_penalty")


def _check_same_search(st, info: Mapping[str, Any], evaluator: Evaluator, config: SearchConfig) -> None:
    """A study resumes only with the model, granularity, refit, latency batch, agent and options it was searched
    with: an agent that picks up its own trials (NetAdapt's iterations, AMC's episodes) would otherwise
    mix two searches in one study."""
    if not completed(st):
        return
    recorded = st.user_attrs.get("model")
    if recorded:
        same = all(recorded.get(k) == info.get(k) for k in ("name", "dataset", "checkpoint"))
        if "weights" in recorded and not info.get("checkpoint"):
            same = same and recorded["weights"] == info.get("weights")
        if not same or st.user_attrs.get("base", {}).get("flops") != evaluator.space.base_flops:
            raise InputError(
                f"study {st.study_name!r} holds trials of another model ({recorded.get('name')} on "
                f"{recorded.get('dataset')}); choose another --study name"
            )
    before = st.user_attrs.get("config", st.user_attrs.get("settings", {}))
    if before.get("granularity", "channel") != evaluator.granularity:
        raise ParameterError("granularity", evaluator.granularity, f"study {st.study_name!r} holds trials of "
                             f"granularity {before.get('granularity', 'channel')}; choose another study name")
    if bool(before.get("reconstruct", False)) != evaluator.reconstruct:  # AMC, NetAdapt resume from their trials
        raise ParameterError("reconstruct", evaluator.reconstruct, f"study {st.study_name!r} was searched with "
                             f"reconstruct={bool(before.get('reconstruct', False))}; choose another study name")
    if "latency" in (before.get("budgets") or {}) and evaluator.latency_batch != before.get("latency_batch", 1):
        raise ParameterError("latency_batch", evaluator.latency_batch, f"study {st.study_name!r} timed latency at "
                             f"batch {before.get('latency_batch', 1)}; use that, or another study name")
    defaults = {f.name: f.default for f in fields(SearchConfig)}
    for k in SCORED_WITH:  # what a recorded trial's score depends on besides the policy
        was = before.get(k, defaults[k])
        if was != getattr(config, k):
            raise ParameterError(k, getattr(config, k), f"study {st.study_name!r} was searched with {k}={was!r}; "
                                 "give the same to resume it, or another study name")
    if "agent_options" not in before:
        return
    if before.get("agent") != config.agent:
        raise ParameterError("agent", config.agent, f"study {st.study_name!r} was searched by agent "
                             f"{before.get('agent')!r}; choose another study name")
    old, new = before["agent_options"], json.loads(json.dumps(config.agent_options, default=list))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        k = changed[0]
        raise ParameterError(k, new.get(k), f"study {st.study_name!r} was searched with {old.get(k)!r}; give the "
                             "same options to resume it, or another study name", agent=config.agent)


def export(study: str, storage: str, output: str | Path) -> tuple[Policy, Path]:
    """Write the best feasible policy of ``study`` to ``output``."""
    st = load_study(study, storage)
    policy = best_policy(st)
    return policy, policy.save(output)


def rebuild(model: nn.Module, policy: Policy, task: Task, *, finetune_steps: int | None = None,
            device: str = "auto", model_name: str | None = None) -> tuple[nn.Module, Evaluator, int]:
    """``policy`` applied to ``model`` exactly as its search did: pruned, recalibrated and fine-tuned with
    the recorded settings on ``task`` (or built as the agent that recorded it builds its models:
    :meth:`autoprune.agents.Agent.rebuild`). Returns the pruned model, the evaluator and the fine-tune
    steps."""
    search = dict(policy.search)
    amp = search.get("amp_used", search.get("amp"))  # the choice the search made (older policies: "amp")
    settings = {**search, "criterion": policy.criterion, "granularity": policy.granularity,
                "reconstruct": policy.reconstruct}
    evaluator = make_evaluator(model, task, settings, device=device, amp=amp if isinstance(amp, bool) else "auto",
                               info=policy.model)
    name = model_name or type(model).__name__
    policy.check_names(evaluator.space.names, model_desc=f"{name} on {task.name}")
    steps = finetune_steps if finetune_steps is not None else int(search.get("finetune_steps", 0))
    agent = list_agents().get(search.get("agent") or "")
    model = agent.rebuild(evaluator, policy, steps) if agent is not None else evaluator.build(policy, steps)
    return model, evaluator, steps


def apply_policy(
    policy: Policy,
    *,
    model: str | None = None,
    dataset: str | None = None,
    data_root: str | None = None,
    checkpoint: str | None = None,
    task: str | None = None,
    finetune_steps: int | None = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, Evaluation, Evaluator]:
    """Re-apply ``policy`` to the model its search came from (or the one named here): prune, recalibrate
    and fine-tune exactly as the search did, and measure the result on the validation split (the figures
    the study recorded)."""
    info = policy.model
    if info.get("source") == "python" and model is None:
        raise InputError(f"the policy was searched from Python (model {info.get('name')!r}); apply it with "
                         "autoprune.apply(model, policy, task), or give --model")
    if not (model or info.get("name")):
        raise InputError("the policy names no model; give --model")
    recorded_ckpt = info.get("checkpoint")
    if checkpoint is None and recorded_ckpt and not info.get("pretrain_steps"):
        if not Path(recorded_ckpt).is_file():
            raise InputError(f"the policy's checkpoint {recorded_ckpt!r} is missing; give --checkpoint")
        checkpoint = recorded_ckpt
    overrides = {"model": model, "dataset": dataset, "data_root": data_root, "checkpoint": checkpoint, "task": task}
    source = SourceConfig.from_info(info, **overrides)
    if checkpoint is not None:
        source = source.replace(pretrain_steps=None)
    setup = prepare(source, device=device, log=log)
    pruned, evaluator, steps = rebuild(setup.model, policy, setup.task, finetune_steps=finetune_steps, device=device,
                                       model_name=setup.info["name"])
    return pruned, evaluator.measure(pruned, "val", steps), evaluator


def run_worker(
    study: str,
    storage: str,
    *,
    device: str = "auto",
    trials: int | None = None,
    timeout: float | None = None,
    reporter: Reporter | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Join a running search: rebuild its model, task, budgets and evaluator from what the study
    recorded, and propose candidates into the same study until its trial count (or ``trials``, or
    ``timeout``) is reached. Returns the trials this worker added.

    Only agents whose candidates are independent draws share a study (``Agent.parallel``); each
    worker draws from its own seed, and candidates the study already holds are not evaluated again.
    """
    st = load_study(study, storage)
    info, recorded = st.user_attrs.get("model"), st.user_attrs.get("config")
    if not info or not recorded or not isinstance(info.get("source"), Mapping):
        why = "was searched from Python" if info and info.get("source") == "python" else \
            "was not made by `autoprune search`"
        raise InputError(f"study {study!r} {why}; a worker cannot rebuild its model and task")
    agent_cls = get_agent(recorded["agent"])
    if not agent_cls.parallel:
        shareable = ", ".join(n for n, c in list_agents().items() if c.parallel)
        raise InputError(f"agent {agent_cls.name!r} runs in one process and cannot share its study with "
                         f"workers; agents that can: {shareable}")
    setup = prepare(SourceConfig.from_dict(info["source"]), device=device, log=log)
    # a seed of its own per worker process, so that workers do not draw the same candidates
    seed = (int(recorded.get("seed", 0)) * 1_000_003 + os.getpid() * 7919 + time.time_ns()) % (2**31)
    amp = recorded.get("amp_used")
    config = SearchConfig.from_dict(recorded).replace(
        storage=storage, study=study, device=device, timeout=timeout,
        trials=trials if trials is not None else recorded.get("trials"),
        amp=("on" if amp else "off") if isinstance(amp, bool) else "auto")
    outcome = run_search(setup.model, setup.task, config, info=setup.info, reporter=reporter, final=False,
                         agent_seed=seed)
    return outcome.recorded


DEFAULT_MODEL = SourceConfig().model
DEFAULT_DATASET = SourceConfig().dataset
__all__ = ["DEFAULT_STORAGE", "SearchOutcome", "Setup", "apply_policy", "export", "make_evaluator", "prepare",
           "rebuild", "run_search", "run_worker"]
