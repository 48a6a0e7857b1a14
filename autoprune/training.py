"""The training steps every part shares: fine-tuning (with optional distillation), adaptive BN
recalibration and scoring. Kept in one place so that the evaluator, pretraining, ``apply`` and the
agents run exactly the same loop."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.errors import CandidateError


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled; nothing on the CPU, where it does not pay for small models."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_steps(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
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
) -> float:
    """Run ``steps`` SGD steps (momentum, weight decay, cosine or constant LR); return the last loss.

    With a ``teacher`` and ``distill`` > 0 the loss is ``(1 - distill) * CE + distill * T^2 *
    KL(student_T || teacher_T)`` (Hinton et al., 2015). A non-finite loss raises
    :class:`CandidateError`, so one diverging candidate does not end a search.
    """
    if steps <= 0:
        return float("nan")
    device = next(model.parameters()).device
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
    for step, (x, y) in zip(range(steps), batches):
        with autocast(device, amp):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None and distill > 0:
                with torch.no_grad():
                    soft = teacher(x)
                kd = F.kl_div(
                    F.log_softmax(logits.float() / temperature, dim=1),
                    F.log_softmax(soft.float() / temperature, dim=1),
                    reduction="batchmean",
                    log_target=True,
                ) * temperature**2
                loss = (1 - distill) * loss + distill * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        last = loss.detach()
        if step % 50 == 49 and not torch.isfinite(last):  # checking every step would sync the GPU
            break
    value = float(last)
    if not math.isfinite(value):
        raise CandidateError(f"fine-tune diverged (loss {value})")
    return value


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], n: int,
                   amp: bool = False) -> None:
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
    device = next(model.parameters()).device
    with autocast(device, amp):
        for _, (x, _y) in zip(range(n), batches):
            model(x)
    for m, mom in zip(norms, saved):
        m.momentum = mom
    model.eval()


@torch.no_grad()
def score(model: nn.Module, batches, amp: bool = False) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) over every batch of ``batches``."""
    model.eval()
    device = next(model.parameters()).device
    correct = torch.zeros((), device=device, dtype=torch.long)
    loss_sum = torch.zeros((), device=device)
    n = 0
    with autocast(device, amp):
        for x, y in batches:
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            n += len(y)
    if n == 0:
        return float("nan"), float("nan")
    return float(correct) / n, float(loss_sum) / n
