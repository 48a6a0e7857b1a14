"""The training steps every part shares: fine-tuning (with optional distillation) and adaptive BN
recalibration, both through a :class:`~autoprune.task.Task`. Kept in one place so that the evaluator,
pretraining, ``apply`` and the agents run exactly the same loop."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autoprune.errors import CandidateError

if TYPE_CHECKING:
    from autoprune.task import Task


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled; nothing on the CPU, where it does not pay for small models."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def train_steps(
    model: nn.Module,
    task: Task,
    batches: Iterator[Any],
    steps: int,
    lr: float,
    *,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    teacher: nn.Module | None = None,
    distill: float = 0.0,
    temperature: float = 4.0,
    schedule: str = "cosine",
    amp: bool = False,
    params: list[torch.nn.Parameter] | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> float:
    """Run ``steps`` SGD steps (momentum, weight decay, cosine or constant LR) on ``task.loss``; return
    the last loss.

    With a ``teacher`` and ``distill`` > 0 the loss is ``(1 - distill) * task.loss + distill *
    task.distill_loss(student, teacher, T)`` (Hinton et al., 2015). A non-finite loss raises
    :class:`CandidateError`, so one diverging candidate does not end a search. ``on_step(step, loss)``
    is called after every step with the steps done and the (detached) loss; reading the loss's value
    waits for the device, so a caller that reports progress reads it only now and then.
    """
    if steps <= 0:
        return float("nan")
    device = model_device(model)
    trainable = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    else:
        sched = None
    model.train()
    if teacher is not None:
        teacher.eval()
    last = torch.zeros((), device=device)
    for step, batch in zip(range(steps), batches):
        with autocast(device, amp):
            output = task.forward(model, batch)
            loss = task.loss(output, batch)
            if teacher is not None and distill > 0:
                with torch.no_grad():
                    soft = task.forward(teacher, batch)
                loss = (1 - distill) * loss + distill * task.distill_loss(output, soft, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        last = loss.detach()
        if on_step is not None:
            on_step(step + 1, last)
        if step % 50 == 49 and not torch.isfinite(last):  # checking every step would sync the GPU
            break
    value = float(last)
    if not math.isfinite(value):
        raise CandidateError(f"fine-tune diverged (loss {value})")
    return value


@torch.no_grad()
def recalibrate_bn(model: nn.Module, task: Task, batches: Iterator[Any], n: int, amp: bool = False) -> None:
    """Adaptive BN (Li et al., EagleEye, ECCV 2020): re-estimate BatchNorm statistics of a pruned
    model from ``n`` training batches, the zero-training proxy of its accuracy."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or n <= 0:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not an exponential one
    model.train()
    device = model_device(model)
    try:
        with autocast(device, amp):
            for _, batch in zip(range(n), batches):
                task.forward(model, batch)
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom
        model.eval()
