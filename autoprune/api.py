"""The Python API: search a pruning policy for any model and task, and apply a policy to a model.

    import autoprune

    task = autoprune.LoaderTask.classification(train_loader, val_loader)
    result = autoprune.search(model, task, budgets={"flops": "50%"}, agent="random", trials=20,
                              finetune_steps=30)
    result.policy.save("best.json")
    pruned = autoprune.apply(model, autoprune.Policy.load("best.json"), task)

The command line is a client of the same functions (:mod:`autoprune.runner`) and of the same
configuration (:class:`~autoprune.config.SearchConfig`), so every ``autoprune search`` flag is a keyword
argument here, with the same name, default and checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune.agents import Reporter
from autoprune.config import DEFAULT_AGENT, SearchConfig
from autoprune.errors import InputError, ParameterError
from autoprune.inputs import tensors
from autoprune.policy import Policy
from autoprune.pruning import ChannelPruner, MaskPruner
from autoprune.runner import SearchOutcome, rebuild, run_search
from autoprune.space import Space
from autoprune.task import Task


def search(
    model: nn.Module,
    task: Task,
    budgets: Mapping[str, str | float] | None = None,
    *,
    agent: str = DEFAULT_AGENT,
    reporter: Reporter | None = None,
    output: str | Path | None = None,
    **options: Any,
) -> SearchOutcome:
    """Search a per-group pruning policy for ``model`` on ``task`` under ``budgets``.

    Parameters
    ----------
    model: the trained model (not modified; pruned copies are evaluated).
    task: what it is trained and judged on (:class:`~autoprune.task.Task`, e.g.
        :class:`~autoprune.task.LoaderTask`).
    budgets: what the pruned model may keep, by resource: ``{"flops": "50%"}``, ``{"params": "2x"}``,
        ``{"latency": "3ms", "flops": 0.6}``, ``{"energy": "50%"}`` (:mod:`autoprune.energy`); all must hold.
    agent: the search agent (``uniform``, ``random``, ``amc``, ``netadapt``, ``icepick``, ``gates``,
        ``sensitivity``, ``energy``; :func:`autoprune.agents.list_agents`).
    reporter: progress callbacks (:class:`~autoprune.agents.Reporter`); silent by default.
    output: also write the best policy's JSON here.
    **options: the other settings of :class:`~autoprune.config.SearchConfig` (``trials``, ``timeout``,
        ``finetune_steps``, ``seed``, ``criterion``, ``reconstruct``, ``granularity``, ``ignore``, ``max_ratio``,
        ``distill``, ``bn_batches``, ``finetune_lr``, ``finetune_l1``, ``finetune_penalty``, ``latency_batch``,
        ``energy_costs``, ``amp``, ``device``, ``storage`` (an Optuna storage URL; in memory by default),
        ``study``), and the agent's own options by their names (``warmup=10`` for AMC, as ``--amc-warmup 10``
        on the command line).

    Returns
    -------
    :class:`~autoprune.runner.SearchOutcome`: ``.policy`` (the best feasible
    :class:`~autoprune.policy.Policy`, None when none met the budgets; its ``metrics`` carry the objective
    under the task's metric name), ``.best`` (its figures), ``.baseline_val``, ``.best_test`` (where the
    task has a test split) and ``.study`` (the Optuna study holding every candidate).
    """
    from autoprune.agents import get_agent

    known = set(SearchConfig.__dataclass_fields__) - {"agent", "budgets", "agent_options"}
    own = get_agent(agent).options
    for key, value in options.items():
        if key not in known and key not in own:
            raise ParameterError(key, value, f"not a setting of the search ({', '.join(sorted(known))}) nor an "
                                 f"option of agent {agent!r} ({', '.join(own) or 'none'})")
    settings = {k: v for k, v in options.items() if k in known}
    agent_options = {k: v for k, v in options.items() if k not in known}
    config = SearchConfig(agent=agent, budgets=dict(budgets or {}), agent_options=agent_options, **settings)
    return run_search(model, task, config, reporter=reporter, output=output)


def apply(
    model: nn.Module,
    policy: Policy | str | Path,
    task: Task | None = None,
    *,
    finetune_steps: int | None = None,
    example_inputs: Any = None,
    device: str = "auto",
) -> nn.Module:
    """``policy`` (a :class:`Policy` or its JSON file) applied to a copy of ``model``.

    With a ``task`` the pruned model is also recalibrated and fine-tuned as the search recorded
    (``finetune_steps`` overrides the recorded steps), so it scores what the study recorded. Without one,
    channels (or weights) are removed only; the model is traced with ``example_inputs`` (default: zeros
    of the input shape the policy records). ``model`` itself is not modified.
    """
    policy = Policy.load(policy) if isinstance(policy, (str, Path)) else policy
    if task is not None:
        pruned, _, _ = rebuild(model, policy, task, finetune_steps=finetune_steps, device=device)
        return pruned
    if example_inputs is None:
        info = policy.model
        if not all(k in info for k in ("in_channels", "image_size")):
            raise InputError("apply without a task needs example_inputs: the policy records no input shape")
        example_inputs = torch.zeros(1, info["in_channels"], info["image_size"], info["image_size"])
    if not tensors(example_inputs):
        raise InputError("example_inputs must hold at least one tensor")
    was_training = model.training
    space = Space.from_model(model.eval(), example_inputs, ignore=policy.search.get("ignore", ()))
    model.train(was_training)
    policy.check_names(space.names, model_desc=f"{type(model).__name__}")
    if policy.granularity == "channel":
        pruner = ChannelPruner(space, seed=int(policy.search.get("seed", 0)))
    else:
        pruner = MaskPruner(space, seed=int(policy.search.get("seed", 0)))
    return pruner.prune(policy).eval()
