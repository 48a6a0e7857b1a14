"""What the commands do, apart from parsing: set up the model and data, run a search, export and
re-apply policies. The CLI is a thin layer over these functions, and so are the tests."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune.agents import Reporter, SearchContext, get_agent, list_agents
from autoprune.budget import Budget, budgets_slug
from autoprune.data import DatasetSplits, load_dataset
from autoprune.errors import InputError
from autoprune.evaluator import Evaluation, Evaluator, resolve_device
from autoprune.models import build_model, load_checkpoint
from autoprune.policy import Policy, parse_granularity
from autoprune.pretrain import load_or_train
from autoprune.study import (
    DEFAULT_STORAGE,
    best_feasible,
    best_policy,
    completed,
    evaluation_of,
    load_study,
    open_study,
    set_study_info,
    study_name,
)

DEFAULT_MODEL = "resnet20"
DEFAULT_DATASET = "digits"
DEFAULT_PRETRAIN_STEPS = 500
PRETRAIN_SEED = 0  # the base model does not change with the search's --seed

# evaluator settings a policy records, so that `apply` rebuilds exactly the recorded model
EVALUATOR_SETTINGS = ("batch_size", "bn_batches", "finetune_lr", "distill", "latency_batch", "seed",
                      "criterion_batches", "amp")


@dataclass
class Setup:
    """A base model ready to prune, its data, and the metadata that identifies them."""

    model: nn.Module
    data: DatasetSplits
    info: dict[str, Any]


def prepare(
    model: str = DEFAULT_MODEL,
    dataset: str = DEFAULT_DATASET,
    *,
    data_root: str | None = None,
    download: bool = False,
    checkpoint: str | None = None,
    pretrain_steps: int | None = None,
    device: torch.device | str = "auto",
    log: Callable[[str], None] = print,
) -> Setup:
    """Load the data, build the model for it, and load (or train once and cache) its weights.

    With no checkpoint a zoo or torchvision model is trained for ``pretrain_steps`` (default
    ``DEFAULT_PRETRAIN_STEPS``) and cached; a user factory is trained only when asked, since it may
    carry its own weights.
    """
    device = resolve_device(device)
    if data_root is not None and not os.path.isdir(data_root) and not download:
        raise InputError(f"--data-root {data_root!r} does not exist or is not a directory")
    data = load_dataset(dataset, root=data_root, download=download)
    net = build_model(model, data.in_channels, data.num_classes, data.image_size)
    info: dict[str, Any] = {
        "name": model,
        "dataset": data.name,
        "in_channels": data.in_channels,
        "num_classes": data.num_classes,
        "image_size": data.image_size,
    }
    if data_root is not None:
        info["data_root"] = str(Path(data_root).resolve())
    if checkpoint is not None:
        load_checkpoint(net, checkpoint)
        info["checkpoint"] = str(Path(checkpoint).resolve())
    else:
        user_file = ".py:" in model
        steps = pretrain_steps if pretrain_steps is not None else (0 if user_file else DEFAULT_PRETRAIN_STEPS)
        if steps > 0:
            path = load_or_train(net, model, data, steps, device=device, seed=PRETRAIN_SEED, log=log)
            info["pretrain_steps"] = steps
            info["checkpoint"] = str(path)
    return Setup(net.to(device).eval(), data, info)


def check_granularity(granularity: str, criterion: str, agent: type | None = None) -> str:
    """The canonical spelling of ``granularity``, after refusing a criterion or an agent it cannot
    work with: masked granularities take the criteria of :data:`autoprune.pruning.MASK_CRITERIA`, and
    agents that remove channels themselves (``channel_only``) take only ``channel``."""
    from autoprune.pruning.masks import check_criterion

    granularity = parse_granularity(granularity)
    if granularity != "channel":
        check_criterion(granularity, criterion)
        if agent is not None and agent.channel_only:
            raise InputError(f"agent {agent.name!r} removes channels itself and supports only --granularity channel")
    return granularity


def default_study_name(setup: Setup, agent: str, budgets: list[Budget], granularity: str = "channel") -> str:
    """``<model>-<dataset>-<agent>-<budget>``, with ``-unstructured`` or ``-2of4`` for a masked granularity,
    so that a masked search never resumes a channel one."""
    slug = budgets_slug(budgets) + ("" if granularity == "channel" else "-" + granularity.replace(":", "of"))
    return study_name(setup.info["name"], setup.data.name, agent, slug)


def make_evaluator(setup: Setup, *, device: str = "auto", criterion: str = "l1", granularity: str = "channel",
                   ignore=(), **settings: Any) -> Evaluator:
    return Evaluator(setup.model, setup.data, device=device, criterion=criterion, granularity=granularity,
                     ignore=ignore, model_info=setup.info, **settings)


@dataclass
class SearchOutcome:
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


def run_search(
    setup: Setup,
    budgets: list[Budget],
    *,
    agent: str = "uniform",
    agent_options: Mapping[str, Any] | None = None,
    storage: str = DEFAULT_STORAGE,
    study: str | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    finetune_steps: int = 0,
    seed: int = 0,
    device: str = "auto",
    criterion: str = "l1",
    granularity: str = "channel",
    ignore=(),
    max_ratio: float = 0.9,
    evaluator_settings: Mapping[str, Any] | None = None,
    reporter: Reporter | None = None,
    output: str | Path | None = None,
    final: bool = True,
) -> SearchOutcome:
    """Search with ``agent`` under ``budgets``, record every candidate, export the best policy.

    ``granularity`` is ``channel``, ``unstructured`` or ``N:M`` (e.g. ``2:4``); a masked granularity's
    study is named with a suffix (``-unstructured``, ``-2of4``) so that it does not resume a channel one.
    """
    if not budgets:
        raise InputError("give at least one budget: --budget-flops, --budget-params or --budget-latency")
    agent_cls = get_agent(agent)
    granularity = check_granularity(granularity, criterion, agent_cls)
    searcher = agent_cls(**dict(agent_options or {}))
    settings = dict(evaluator_settings or {})
    settings["seed"] = seed
    evaluator = make_evaluator(setup, device=device, criterion=criterion, granularity=granularity, ignore=ignore,
                               **settings)
    name = study or default_study_name(setup, agent, budgets, granularity)
    st = open_study(name, storage, directions=agent_cls.directions)
    if len(st.directions) != len(agent_cls.directions):
        raise InputError(
            f"study {name!r} has {len(st.directions)} objective(s) but agent {agent!r} records "
            f"{len(agent_cls.directions)}; choose another --study name"
        )
    _check_same_model(st, setup, evaluator)
    _check_same_options(st, agent, searcher.settings())
    ctx = SearchContext(
        evaluator, budgets, st, agent, n_trials=trials if trials is not None else agent_cls.default_trials,
        timeout=timeout, seed=seed, finetune_steps=finetune_steps, max_ratio=max_ratio, reporter=reporter,
    )
    record_settings = {
        "agent": agent,
        "trials": ctx.n_trials,
        "data_root": setup.info.get("data_root"),
        "budgets": [str(b) for b in budgets],
        "budget_args": {b.resource: b.text for b in budgets},
        "finetune_steps": finetune_steps,
        "criterion": criterion,
        "granularity": granularity,
        "ignore": list(ignore),
        "max_ratio": max_ratio,
        "device": str(evaluator.device),
        "agent_options": searcher.settings(),
        **{k: getattr(evaluator, k) for k in EVALUATOR_SETTINGS},
    }
    if granularity != "channel":  # N:M leaves these dense (input dimension not a multiple of M)
        record_settings["dense_layers"] = evaluator.mask_pruner.dense_layers(granularity)
    baseline_val = evaluator.baseline("val")
    set_study_info(
        st,
        model=setup.info,
        base={**ctx.base, "accuracy": baseline_val.accuracy},
        settings=record_settings,
    )
    t0 = time.perf_counter()
    before = ctx.trials_done
    (reporter or Reporter()).start(ctx.n_trials, before)
    try:
        result = searcher.search(ctx)
    finally:
        (reporter or Reporter()).stop()
    outcome = SearchOutcome(st, None, None, baseline_val, new_trials=ctx.trials_done - before,
                            seconds=time.perf_counter() - t0, info=result.info)
    # wall time of every run of this study's search, so that a resumed search reports its whole cost
    st.set_user_attr("search_seconds", float(st.user_attrs.get("search_seconds", 0.0)) + outcome.seconds)
    trial = best_feasible(st)
    if trial is None:
        return outcome
    outcome.policy = best_policy(st)
    outcome.best = evaluation_of(trial)
    if final:
        # the final report: both models on the test split, latency measured on the same device
        steps = outcome.best.finetune_steps
        pruned = evaluator.build(outcome.policy, steps)
        outcome.baseline_test = _with_latency(evaluator, evaluator.baseline("test"), evaluator.model)
        outcome.best_test = _with_latency(evaluator, evaluator.measure(pruned, "test", steps), pruned)
        metrics = outcome.policy.metrics
        metrics["test_accuracy"] = outcome.best_test.accuracy
        metrics["latency"] = outcome.best_test.latency
        metrics["base"].update(test_accuracy=outcome.baseline_test.accuracy,
                               latency=outcome.baseline_test.latency)
    if output is not None:
        outcome.exported = outcome.policy.save(output)
    return outcome


def _with_latency(evaluator: Evaluator, result: Evaluation, model: nn.Module) -> Evaluation:
    if result.latency is not None:
        return result
    return replace(result, latency=evaluator._latency(model))


def _check_same_options(st, agent: str, options: Mapping[str, Any]) -> None:
    """A study resumes only with the agent and options it was searched with: an agent that picks up its
    own trials (NetAdapt's iterations, AMC's episodes) would otherwise mix two searches in one study."""
    import json

    before = st.user_attrs.get("settings", {})
    if not completed(st) or "agent_options" not in before:
        return
    if before.get("agent") != agent:
        raise InputError(f"study {st.study_name!r} was searched by agent {before.get('agent')!r}, not {agent!r}; "
                         "choose another --study name")
    old, new = before["agent_options"], json.loads(json.dumps(dict(options), default=str))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        k = changed[0]
        raise InputError(
            f"study {st.study_name!r} was searched with --{agent}-{k.replace('_', '-')} {old.get(k)!r}, not "
            f"{new.get(k)!r}; give the same options to resume it, or another --study name"
        )


def _check_same_model(st, setup: Setup, evaluator: Evaluator) -> None:
    recorded = st.user_attrs.get("model")
    if not recorded or not completed(st):
        return
    same = (recorded.get("name"), recorded.get("dataset"), recorded.get("checkpoint")) == (
        setup.info.get("name"), setup.info.get("dataset"), setup.info.get("checkpoint"))
    if not same or st.user_attrs.get("base", {}).get("flops") != evaluator.space.base_flops:
        raise InputError(
            f"study {st.study_name!r} holds trials of another model ({recorded.get('name')} on "
            f"{recorded.get('dataset')}); choose another --study name"
        )
    before = st.user_attrs.get("settings", {})
    if before.get("granularity", "channel") != evaluator.granularity:
        raise InputError(
            f"study {st.study_name!r} holds trials of --granularity {before.get('granularity', 'channel')}, not "
            f"{evaluator.granularity}; choose another --study name"
        )
    if before.get("budget_args", {}).get("latency") and evaluator.latency_batch != before.get("latency_batch", 1):
        raise InputError(
            f"study {st.study_name!r} timed latency at batch {before.get('latency_batch', 1)}, not "
            f"{evaluator.latency_batch}; use that --latency-batch or another --study name"
        )


def export(study: str, storage: str, output: str | Path) -> tuple[Policy, Path]:
    """Write the best feasible policy of ``study`` to ``output``."""
    st = load_study(study, storage)
    policy = best_policy(st)
    return policy, policy.save(output)


def apply_policy(
    policy: Policy,
    *,
    model: str | None = None,
    dataset: str | None = None,
    data_root: str | None = None,
    checkpoint: str | None = None,
    finetune_steps: int | None = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, Evaluation, Evaluator]:
    """Re-apply ``policy`` to its model: prune, recalibrate and fine-tune exactly as the search did,
    and measure the result on the validation split (the figures the study recorded)."""
    info = policy.model
    model = model or info.get("name")
    if not model:
        raise InputError("the policy names no model; give --model")
    dataset = dataset or info.get("dataset") or DEFAULT_DATASET
    recorded_ckpt = info.get("checkpoint")
    pretrain = info.get("pretrain_steps")
    if checkpoint is None and recorded_ckpt and not pretrain:
        if not Path(recorded_ckpt).is_file():
            raise InputError(f"the policy's checkpoint {recorded_ckpt!r} is missing; give --checkpoint")
        checkpoint = recorded_ckpt
    setup = prepare(model, dataset, data_root=data_root, checkpoint=checkpoint,
                    pretrain_steps=pretrain if checkpoint is None else None, device=device, log=log)
    search = policy.search
    settings = {k: search[k] for k in EVALUATOR_SETTINGS if k in search}
    evaluator = make_evaluator(setup, device=device, criterion=policy.criterion, granularity=policy.granularity,
                               ignore=search.get("ignore", ()), **settings)
    policy.check_names(evaluator.space.names, model_desc=f"{model} on {setup.data.name}")
    steps = finetune_steps if finetune_steps is not None else int(search.get("finetune_steps", 0))
    pruned = evaluator.build(policy, steps)
    result = evaluator.measure(pruned, "val", steps)
    return pruned, result, evaluator


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
    """Join a running search: rebuild its model, data, budgets and evaluator from what the study
    recorded, and propose candidates into the same study until its trial count (or ``trials``, or
    ``timeout``) is reached. Returns the trials this worker added.

    Only agents whose candidates are independent draws share a study (``Agent.parallel``); each
    worker draws from its own seed, and candidates the study already holds are not evaluated again.
    """
    from autoprune.budget import parse_budget

    st = load_study(study, storage)
    info, settings = st.user_attrs.get("model"), st.user_attrs.get("settings")
    if not info or not settings or "agent" not in settings:
        raise InputError(f"study {study!r} was not made by `autoprune search`; a worker cannot join it")
    agent_cls = get_agent(settings["agent"])
    if not agent_cls.parallel:
        shareable = ", ".join(n for n, c in list_agents().items() if c.parallel)
        raise InputError(f"agent {agent_cls.name!r} runs in one process and cannot share its study with "
                         f"workers; agents that can: {shareable}")
    ckpt = info.get("checkpoint")
    pretrain = info.get("pretrain_steps")
    setup = prepare(info["name"], info["dataset"], data_root=info.get("data_root") or settings.get("data_root"),
                    checkpoint=None if pretrain else ckpt, pretrain_steps=pretrain, device=device, log=log)
    budgets = [parse_budget(r, t) for r, t in settings["budget_args"].items()]
    evaluator = make_evaluator(setup, device=device, criterion=settings.get("criterion", "l1"),
                               granularity=settings.get("granularity", "channel"),
                               ignore=settings.get("ignore", ()),
                               **{k: settings[k] for k in EVALUATOR_SETTINGS if k in settings})
    # a seed of its own per worker process, so that workers do not draw the same candidates
    seed = (int(settings.get("seed", 0)) * 1_000_003 + os.getpid() * 7919 + time.time_ns()) % (2**31)
    ctx = SearchContext(evaluator, budgets, st, settings["agent"],
                        n_trials=trials if trials is not None else settings.get("trials"), timeout=timeout,
                        seed=seed, finetune_steps=int(settings.get("finetune_steps", 0)),
                        max_ratio=float(settings.get("max_ratio", 0.9)), reporter=reporter)
    before = ctx.evaluated
    agent_cls(**settings.get("agent_options", {})).search(ctx)
    return ctx.evaluated - before
