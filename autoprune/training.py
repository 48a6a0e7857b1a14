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

from autoprune.errors import CandidateError, ParameterError

if TYPE_CHECKING:
    from autoprune.task import Task

PENALTIES = ("l1", "group")  # the sparsity penalties a fine-tune can add (see penalty_gradient)


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
    penalty: str = "l1",
    penalty_weight: float = 0.0,
) -> float:
    """Run ``steps`` SGD steps (momentum, weight decay, cosine or constant LR) on ``task.loss``; return
    the last loss.

    ``penalty_weight`` λ > 0 adds a sparsity penalty on the weights of the trained conv and linear
    layers (:func:`penalty_gradient`; ``penalty`` ``l1`` or ``group``), so that fine-tuning pushes
    weights, or whole output channels, towards zero for a later pruning step to remove. It enters as
    its (sub)gradient, added to the loss's before the optimiser step (momentum and the LR apply to it
    as to the loss's gradient); the loss returned is the task's, without it.

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
    penalised = penalised_weights(model, trainable, penalty) if penalty_weight > 0 else []
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
        if penalised:
            penalty_gradient(penalised, penalty, penalty_weight)
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


def penalised_weights(model: nn.Module, trainable: list[torch.nn.Parameter], penalty: str = "l1"
                      ) -> list[tuple[nn.Module, torch.nn.Parameter]]:
    """The conv and linear layers of ``model`` whose weight is among ``trainable``, with that weight (a
    masked layer's ``weight_orig``). Biases and batch norms are not penalised."""
    if penalty not in PENALTIES:
        raise ParameterError("penalty", penalty, f"choose from {', '.join(PENALTIES)}")
    ids = {id(p) for p in trainable}
    out = []
    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            w = m._parameters.get("weight_orig", m._parameters.get("weight"))
            if w is not None and id(w) in ids:
                out.append((m, w))
    return out


@torch.no_grad()
def penalty_gradient(weights: list[tuple[nn.Module, torch.nn.Parameter]], penalty: str, lam: float) -> None:
    """Add to each weight's gradient the (sub)gradient of ``lam`` times its penalty:

    - ``l1``: ``λ Σ |w|`` over the weight's entries, gradient ``λ · sign(w)`` (0 at 0);
    - ``group``: group lasso over output channels, ``λ Σ_o ‖W_o‖₂`` with ``W_o`` the weights producing
      output channel ``o`` (a conv's filter, a linear's row; a transposed conv's ``[:, o]`` slice of
      its group), gradient ``λ · W_o / ‖W_o‖₂`` (0 for a channel already at zero).
    """
    for module, w in weights:
        if penalty == "l1":
            g = torch.sign(w)
        elif isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
            groups = module.groups
            v = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)  # (group, in, out, kernel)
            norms = v.square().sum((1, 3), keepdim=True).sqrt()
            g = (v / norms.clamp_min(torch.finfo(w.dtype).tiny)).reshape(w.shape)
        else:
            norms = w.reshape(w.shape[0], -1).norm(dim=1).view(-1, *([1] * (w.dim() - 1)))
            g = w / norms.clamp_min(torch.finfo(w.dtype).tiny)
        if w.grad is None:
            w.grad = lam * g
        else:
            w.grad.add_(g, alpha=lam)


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
