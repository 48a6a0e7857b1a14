"""Training a base model: the embedded default is trained once and cached, so every demo prunes a
trained model; ``autoprune train`` and ``search --pretrain-steps`` serve untrained architectures."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from autoprune.task import Task
from autoprune.training import train_steps


def cache_dir() -> Path:
    """``$AUTOPRUNE_CACHE``, else ``~/.cache/autoprune``."""
    root = os.environ.get("AUTOPRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "autoprune")
    return Path(root)


# what a training run reports as it goes: progress(steps done, steps in all, status text)
Progress = Callable[[int, int, str], None]


def train_model(model: nn.Module, task: Task, steps: int, *, device: torch.device, seed: int = 0,
                lr: float = 0.1, weight_decay: float = 5e-4, progress: Progress | None = None,
                checkpoints: int = 10) -> float:
    """Train ``model`` in place for ``steps`` SGD steps on ``task`` (cosine LR, the task's augmented
    batches); return its validation objective.

    With ``progress``, the running training loss is reported every few steps, and the validation
    objective ``checkpoints`` times along the way (each a pass over the validation split, so that a run
    of minutes shows where it stands and whether it still improves)."""
    torch.manual_seed(seed)
    model.to(device)
    task = task.to(device)
    on_step = None
    if progress is not None:
        on_step = _reporting(model, task, steps, progress, checkpoints)
        progress(0, steps, "")
    train_steps(model, task, task.train_batches(seed, augment=True), steps, lr, weight_decay=weight_decay,
                on_step=on_step)
    value = task.score(model.eval(), "val")[task.metric]
    if progress is not None:
        progress(steps, steps, f"validation {task.metric} {task.format(value)}")
    return value


def _reporting(model: nn.Module, task: Task, steps: int, progress: Progress, checkpoints: int):
    """The ``on_step`` of a reported training run: a running mean of the loss every ``every`` steps (one
    device sync each), the validation objective at ``checkpoints`` evenly spaced steps before the end."""
    every = max(1, min(20, steps // 100))
    marks = {round(steps * i / checkpoints) for i in range(1, checkpoints)} if checkpoints > 1 else set()
    state = {"sum": 0.0, "n": 0, "val": ""}

    def on_step(step: int, loss: torch.Tensor) -> None:
        if step % every and step not in marks:
            return
        state["sum"] = 0.9 * state["sum"] + float(loss)
        state["n"] = 0.9 * state["n"] + 1
        if step in marks:
            with torch.no_grad():
                value = task.score(model.eval(), "val")[task.metric]
            model.train()
            state["val"] = f", validation {task.metric} {task.format(value)} at step {step}"
        progress(step, steps, f"loss {state['sum'] / state['n']:.4f}{state['val']}")

    return on_step


def pretrained_path(model_name: str, task: Task, steps: int, seed: int) -> Path:
    identity = json.dumps(task.identity(), sort_keys=True, default=str)
    tag = hashlib.sha1(f"{model_name}|{task.name}|{steps}|{seed}|{identity}".encode()).hexdigest()[:10]
    safe = model_name.replace(":", "_").replace("/", "_")
    return cache_dir() / f"{safe}-{task.name}-{steps}steps-seed{seed}-{tag}.pt"


def load_or_train(model: nn.Module, model_name: str, task: Task, steps: int, *,
                  device: torch.device, seed: int = 0, log=print, progress: Progress | None = None) -> Path:
    """Load the cached weights for (model, task, steps, seed), training and caching them first
    when absent. The file is written atomically, so an interrupted run leaves no broken cache."""
    path = pretrained_path(model_name, task, steps, seed)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.to(device)
        return path
    log(f"training {model_name} on {task.name} for {steps} steps (once; cached at {path})")
    value = train_model(model, task, steps, device=device, seed=seed, progress=progress)
    log(f"trained: validation {task.metric} {task.format(value)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(path)
    return path
