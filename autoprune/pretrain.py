"""Training a base model: the embedded default is trained once and cached, so every demo prunes a
trained model; ``autoprune train`` and ``search --pretrain-steps`` serve untrained architectures."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from autoprune.data import DatasetSplits
from autoprune.training import score, train_steps


def cache_dir() -> Path:
    """``$AUTOPRUNE_CACHE``, else ``~/.cache/autoprune``."""
    root = os.environ.get("AUTOPRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "autoprune")
    return Path(root)


def train_model(model: nn.Module, data: DatasetSplits, steps: int, *, device: torch.device, seed: int = 0,
                lr: float = 0.1, batch_size: int = 128, weight_decay: float = 5e-4) -> float:
    """Train ``model`` in place for ``steps`` SGD steps (cosine LR, augmentation); return val accuracy."""
    torch.manual_seed(seed)
    model.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    loader = data.loader("train", batch_size, device, shuffle=True, augment=True, generator=gen,
                         drop_last=len(data.train) > batch_size)
    train_steps(model, loader.infinite(), steps, lr, weight_decay=weight_decay)
    acc, _ = score(model, data.loader("val", 1000, device))
    return acc


def pretrained_path(model_name: str, dataset: str, steps: int, seed: int) -> Path:
    tag = hashlib.sha1(f"{model_name}|{dataset}|{steps}|{seed}".encode()).hexdigest()[:10]
    safe = model_name.replace(":", "_").replace("/", "_")
    return cache_dir() / f"{safe}-{dataset}-{steps}steps-seed{seed}-{tag}.pt"


def load_or_train(model: nn.Module, model_name: str, data: DatasetSplits, steps: int, *,
                  device: torch.device, seed: int = 0, log=print) -> Path:
    """Load the cached weights for (model, dataset, steps, seed), training and caching them first
    when absent. The file is written atomically, so an interrupted run leaves no broken cache."""
    path = pretrained_path(model_name, data.name, steps, seed)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.to(device)
        return path
    log(f"training {model_name} on {data.name} for {steps} steps (once; cached at {path})")
    acc = train_model(model, data, steps, device=device, seed=seed)
    log(f"trained: validation accuracy {acc:.2%}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(path)
    return path
