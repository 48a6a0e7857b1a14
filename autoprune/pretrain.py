"""Training a base model: the embedded default is trained once and cached, so every demo prunes a
trained model; ``autoprune train`` and ``search --pretrain-steps`` serve untrained architectures."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from autoprune.task import Task
from autoprune.training import train_steps


def cache_dir() -> Path:
    """``$AUTOPRUNE_CACHE``, else ``~/.cache/autoprune``."""
    root = os.environ.get("AUTOPRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "autoprune")
    return Path(root)


def train_model(model: nn.Module, task: Task, steps: int, *, device: torch.device, seed: int = 0,
                lr: float = 0.1, weight_decay: float = 5e-4) -> float:
    """Train ``model`` in place for ``steps`` SGD steps on ``task`` (cosine LR, the task's augmented
    batches); return its validation objective."""
    torch.manual_seed(seed)
    model.to(device)
    task = task.to(device)
    train_steps(model, task, task.train_batches(seed, augment=True), steps, lr, weight_decay=weight_decay)
    return task.score(model.eval(), "val")[task.metric]


def pretrained_path(model_name: str, task: Task, steps: int, seed: int) -> Path:
    identity = json.dumps(task.identity(), sort_keys=True, default=str)
    tag = hashlib.sha1(f"{model_name}|{task.name}|{steps}|{seed}|{identity}".encode()).hexdigest()[:10]
    safe = model_name.replace(":", "_").replace("/", "_")
    return cache_dir() / f"{safe}-{task.name}-{steps}steps-seed{seed}-{tag}.pt"


def load_or_train(model: nn.Module, model_name: str, task: Task, steps: int, *,
                  device: torch.device, seed: int = 0, log=print) -> Path:
    """Load the cached weights for (model, task, steps, seed), training and caching them first
    when absent. The file is written atomically, so an interrupted run leaves no broken cache."""
    path = pretrained_path(model_name, task, steps, seed)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.to(device)
        return path
    log(f"training {model_name} on {task.name} for {steps} steps (once; cached at {path})")
    value = train_model(model, task, steps, device=device, seed=seed)
    log(f"trained: validation {task.metric} {task.format(value)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(path)
    return path
