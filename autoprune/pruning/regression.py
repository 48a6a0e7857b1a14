"""Regression-based channel selection and least-squares reconstruction: what a channel contributes to
the output of the layers that read it.

Both read the *consumers* of a group: the convolutions and linear layers that take the group's channels
as input. On the calibration batches (the evaluator's seeded training batches, the ones the other data
criteria read), each consumer's output is sampled at ``POSITIONS_PER_IMAGE`` random spatial positions
per image (10, as both papers do; every row of a linear layer's input is one position), all of its
output channels at each, with the input patch (``unfold``) that produced it. The positions are drawn
once per base model, seeded by the pruner's seed and the consumer's name, and kept, so a candidate's
refit reads the same positions as the unpruned model's targets.

**Selection** (``--criterion regression``): ThiNet's greedy selection (Luo, Wu, Lin, "ThiNet: A Filter
Level Pruning Method for Deep Neural Network Compression", ICCV 2017, Sec. 3.2, Eq. 5-6 and Algorithm 1).
A sampled output ``y = Σ_c x̂_c`` sums the contributions ``x̂_c`` of the input channels; removing the
set ``T`` changes it by ``Σ_{c∈T} x̂_c``, so the error of removing ``T`` is ``Σ_samples (Σ_{c∈T} x̂_c)²
= 1_Tᵀ G 1_T``, ``G`` the Gram matrix of the contributions. The greedy selection adds to ``T``, one at a
time, the channel that increases that error least. A channel's score is the step at which the greedy
selection removes it (0 first), so removing the ``n`` lowest-scoring channels removes exactly the set
ThiNet's greedy selection removes for ``n``. ``G`` is computed from the consumer's weights ``W`` and
the second moment of its sampled input patches, ``G[c, d] = Σ_{k, k'} (WᵀW)[ck, dk'] · E[u_ck u_dk']``
(sums over the output channels and the sampled positions), without forming ``x̂``. ThiNet samples one
random output channel per position; taking all of them is the same estimate with less variance.

A group read by several consumers (a residual stream) sums their errors, each divided by its
consumer's mean output energy ``E‖y − b‖²`` (a batch norm after a consumer undoes its scale, so the
loss is what counts, relative to what the layer outputs). Consumers this module does not model are
left out: grouped and depthwise convolutions (a depthwise conv moves with its producer: it is not a
consumer), transposed convolutions, convolutions other than 2-D or padded otherwise than with zeros,
and layers with more than ``MAX_FEATURES`` inputs per output (the moment matrix would not fit). A group
with none of its consumers modelled (read only by such layers, or by no conv/linear at all) falls back to
``l1``, the group magnitude.

**Reconstruction** (``reconstruct=True``, ``--reconstruct``): after any criterion's channels are removed,
each consumer of a pruned group is refitted by least squares so that, on the sampled positions, its
output from the pruned network's input matches the unpruned network's output (He, Zhang, Sun, "Channel
Pruning for Accelerating Very Deep Neural Networks", ICCV 2017, Eq. 1 with the channel mask fixed, and
Sec. 3.2, "Whole model pruning": the pruned network's inputs, the original network's outputs, layer by
layer in forward order, so that a refit also absorbs the error the layers before it left). The bias,
where the consumer has one, is fitted with the weights (a column of ones); a consumer without one gets
none. A ridge term ``RIDGE`` times the mean diagonal of ``XᵀX`` (the bias left out) conditions the
normal equations: it shrinks the weights only along directions of the inputs whose variance is below
about that fraction of the mean (where the output hardly depends on them), and keeps the fit unique when
the kept inputs are collinear or constant on the samples (a dead ReLU channel, a zero-padded border).
Consumers not modelled (above) keep their pruned weights. The targets are computed once per base model;
each candidate runs the calibration batches once per consumer refitted, through the network up to that
consumer only.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.errors import InputError
from autoprune.pruning.criteria import Member, Statistics, hooked, members

if TYPE_CHECKING:
    from autoprune.pruning.criteria import Criterion

POSITIONS_PER_IMAGE = 10  # sampled output positions per image (ThiNet and He et al. both take 10)
MAX_FEATURES = 4096  # inputs per output (channels x kernel) above which a consumer is not modelled
RIDGE = 1e-4  # ridge of the refit, relative to the mean diagonal of X^T X


def modelled(module: nn.Module) -> bool:
    """Whether ``module`` is a consumer this module selects for and refits (see the module doc)."""
    if isinstance(module, nn.Linear):
        return module.in_features <= MAX_FEATURES
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return (module.groups == 1 and not module.transposed and module.padding_mode == "zeros"
                and not isinstance(module.padding, str) and module.in_channels * k <= MAX_FEATURES)
    return False


def consumers(group) -> list[Member]:
    """The modelled consumers of a torch-pruning group (members reading its channels)."""
    return [m for m in members(group) if m.kind == "in" and modelled(m.module)]


def patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of every output position of ``module``: ``(images, positions, features)``, the features
    ordered as the flattened weight's columns (channel-major, then the kernel)."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    u = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    return u.transpose(1, 2)


def flat_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``(outputs, features)``, columns matching :func:`patches`."""
    return module.weight.detach().reshape(module.weight.shape[0], -1)


@dataclass
class Consumer:
    """What the unpruned model's consumer gave on the calibration batches: the sampled positions per
    batch, the second moment of its sampled input patches (features x features, mean over samples), its
    mean output energy without the bias, and its outputs (bias included) at the positions, per batch."""

    positions: list[torch.Tensor] = field(default_factory=list)
    moment: torch.Tensor | None = None
    energy: float = 0.0
    targets: list[torch.Tensor] = field(default_factory=list)
    samples: int = 0


def _sample(positions: int, images: int, seed: int, name: str, batch: int, device) -> torch.Tensor:
    """``min(POSITIONS_PER_IMAGE, positions)`` distinct positions per image, seeded by the seed, the
    consumer's name and the batch's index: ``(images, k)``."""
    k = min(POSITIONS_PER_IMAGE, positions)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{batch}".encode()))
    return torch.rand(images, positions, generator=gen).argsort(1)[:, :k].to(device)


def _at(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``rows`` ``(images, positions, features)`` at ``idx`` ``(images, k)``: ``(images * k, features)``."""
    return rows.gather(1, idx.unsqueeze(-1).expand(-1, -1, rows.shape[-1])).reshape(-1, rows.shape[-1])


def _run(stats: Statistics, model: nn.Module, what: str, hooks: dict[nn.Module, Callable],
         stop: type[Exception] | None = None) -> None:
    """Run ``model`` over the calibration batches without autograd, in eval mode, with ``hooks`` (module ->
    ``hook(module, x, batch_index)`` before the module runs on ``x``); a hook may raise ``stop`` to end a
    batch's forward pass there."""
    state = {"batch": 0}
    n = 0
    with hooked(model, {m: (lambda mod, args, fn=fn: fn(mod, args[0], state["batch"])) for m, fn in hooks.items()},
                pre=True):
        for i, batch in enumerate(_calibration(stats, what)):
            state["batch"] = i
            try:
                stats._forward(model, batch)
            except Exception as e:
                if stop is None or not isinstance(e, stop):
                    raise
            n += 1
    if n == 0:
        raise InputError(f"{what}: the calibration gave no batches")


def _calibration(stats: Statistics, what: str):
    if stats.calibration is None or stats.space is None:
        raise InputError(
            f"{what} reads training data, and this pruner has no calibration batches (the evaluator gives "
            "them: apply such a policy with a task, autoprune.apply(model, policy, task))"
        )
    return stats.calibration()


def unpruned(stats: Statistics, what: str) -> dict[nn.Module, Consumer]:
    """Per modelled consumer of a prunable group of the base model: its :class:`Consumer` record,
    gathered in one pass over the calibration batches on first use and kept with ``stats``."""
    cache = stats.cache.get("regression")
    if cache is not None:
        return cache
    space = stats.space
    if stats.calibration is None or space is None:
        _calibration(stats, what)
    wanted: dict[nn.Module, Consumer] = {}
    for g in space.prunable:
        for part in space.parts(g.name):
            group = space.dg.get_pruning_group(part.root, part.handler, list(range(part.channels)))
            for m in consumers(group):
                wanted.setdefault(m.module, Consumer())

    def record(module, x, batch):
        rec = wanted[module]
        if len(rec.positions) > batch:  # a module called twice in one pass: its first call counts
            return
        rows = patches(module, x.detach())
        idx = _sample(rows.shape[1], rows.shape[0], stats.seed, stats.name_of(module), batch, rows.device)
        u = _at(rows, idx).double()
        y = u @ flat_weight(module).double().T  # the output at the positions (the layer is linear in its patch)
        rec.moment = u.T @ u if rec.moment is None else rec.moment + u.T @ u
        rec.energy += float(y.square().sum())
        if module.bias is not None:
            y = y + module.bias.detach().double()
        rec.positions.append(idx)
        rec.targets.append(y)
        rec.samples += u.shape[0]

    if wanted:
        _run(stats, space.model, what, {m: record for m in wanted})
    for rec in wanted.values():
        if rec.samples:
            rec.moment /= rec.samples
            rec.energy /= rec.samples
    stats.cache["regression"] = {m: r for m, r in wanted.items() if r.samples}
    return stats.cache["regression"]


# -- selection ---------------------------------------------------------------------------------------
def contribution_gram(member: Member, record: Consumer, channels: int) -> torch.Tensor:
    """``G`` over the group's channels for one consumer: ``G[c, d]`` the mean over sampled positions of
    ``Σ_o x̂_oc x̂_od``, ``x̂_oc`` channel ``c``'s contribution to output ``o`` (a layer holding a group
    channel at several inputs, a linear after a flatten, sums them)."""
    w = flat_weight(member.module).double()
    k = w.shape[1] // (member.module.in_features if isinstance(member.module, nn.Linear)
                       else member.module.in_channels)
    idxs = member.idxs.to(w.device)
    cols = (idxs[:, None] * k + torch.arange(k, device=w.device)).flatten()
    ws = w[:, cols]
    moment = record.moment.to(w.device)[cols][:, cols]
    n = len(idxs)
    layer = ((ws.T @ ws) * moment).reshape(n, k, n, k).sum((1, 3))
    root = torch.zeros(n, channels, dtype=w.dtype, device=w.device)
    root[torch.arange(n, device=w.device), member.root.to(w.device)] = 1.0
    return root.T @ layer @ root


def greedy_order(gram: torch.Tensor) -> torch.Tensor:
    """ThiNet's greedy selection (Algorithm 1) on the contribution Gram matrix: the channels in the
    order they are removed, each the one whose removal adds the least error ``1_Tᵀ G 1_T`` given those
    removed before it (ties: the lowest index)."""
    c = gram.shape[0]
    diag = gram.diagonal().clone()
    cross = torch.zeros_like(diag)  # 2 Σ_{t ∈ T} G[t, c]
    gone = torch.zeros(c, dtype=torch.bool, device=gram.device)
    order = []
    for _ in range(c):
        cost = torch.where(gone, torch.full_like(diag, float("inf")), cross + diag)
        pick = int(torch.argmin(cost))
        order.append(pick)
        gone[pick] = True
        cross += 2 * gram[pick]
    return torch.tensor(order)


def regression_criterion(stats: Statistics) -> Criterion:
    """``--criterion regression`` (see the module doc): scores = the greedy removal step, summed relative
    errors over the group's modelled consumers; ``l1`` where it has none."""
    from autoprune.pruning.criteria import _magnitude

    fallback = _magnitude(1)

    def score(group):
        records = unpruned(stats, "criterion 'regression'")
        channels = len(group[0].idxs)
        gram = None
        for m in consumers(group):
            rec = records.get(m.module)
            if rec is None or rec.energy <= 0:
                continue
            g = contribution_gram(m, rec, channels) / rec.energy
            gram = g if gram is None else gram + g.to(gram.device)
        if gram is None:
            return fallback(group)
        order = greedy_order(gram.cpu())
        scores = torch.empty(channels)
        scores[order] = torch.arange(channels, dtype=torch.float32)
        return scores

    return score


# -- reconstruction ----------------------------------------------------------------------------------
class _Reached(Exception):
    """Raised by a refit's hook once the consumer's input is read: the rest of the pass is not needed."""


def forward_order(stats: Statistics, model: nn.Module, modules: list[nn.Module]) -> list[nn.Module]:
    """``modules`` in the order ``model``'s forward pass first calls them (on the first calibration batch);
    any it does not call, last."""
    seen: list[nn.Module] = []
    first = next(iter(_calibration(stats, "reconstruct")), None)
    if first is None:
        raise InputError("reconstruct: the calibration gave no batches")
    with hooked(model, {m: (lambda mod, args: seen.append(mod) if mod not in seen else None) for m in modules},
                pre=True):
        stats._forward(model, first)
    return seen + [m for m in modules if m not in seen]


def refit(stats: Statistics, model: nn.Module, kept_outputs: dict[str, torch.Tensor | None]) -> list[str]:
    """Refit, in forward order, the consumers of ``model`` (a pruned copy of ``stats``' base model) named
    in ``kept_outputs`` (name -> the original indices of the outputs it keeps, None for all), by ridge
    least squares from the pruned network's inputs to the unpruned network's outputs at the sampled
    positions. Consumers not modelled are left as they are. Returns the names refitted."""
    records = unpruned(stats, "reconstruct")
    base = dict(stats.space.model.named_modules())
    pruned = dict(model.named_modules())
    chosen = [pruned[n] for n in kept_outputs if base.get(n) in records]
    if not chosen:
        return []
    name_of = {m: n for n, m in pruned.items()}
    done = []
    for module in forward_order(stats, model, chosen):
        name = name_of[module]
        rec = records[base[name]]
        keep = kept_outputs[name]
        bias = module.bias is not None
        acc: dict[str, torch.Tensor] = {}

        def gather(mod, x, batch, rec=rec, keep=keep, bias=bias, acc=acc):
            rows = patches(mod, x)
            if batch >= len(rec.positions) or rows.shape[:2] != (rec.positions[batch].shape[0],
                                                                 rows.shape[1]):
                raise InputError("reconstruct: the calibration batches differ from those the targets were "
                                 "taken on (the calibration must give the same batches every call)")
            u = _at(rows, rec.positions[batch]).double()
            if bias:
                u = torch.cat([u, torch.ones(u.shape[0], 1, dtype=u.dtype, device=u.device)], 1)
            y = rec.targets[batch].to(u.device)
            if keep is not None:
                y = y[:, keep.to(u.device)]
            acc["xtx"] = u.T @ u + acc.get("xtx", 0)
            acc["xty"] = u.T @ y + acc.get("xty", 0)
            raise _Reached

        _run(stats, model, "reconstruct", {module: gather}, stop=_Reached)
        if not acc:  # the forward pass never calls it: nothing to fit on
            continue
        xtx, xty = acc["xtx"], acc["xty"]
        features = xtx.shape[0] - int(bias)
        scale = xtx.diagonal()[:features].mean().clamp_min(torch.finfo(xtx.dtype).tiny)
        ridge = torch.zeros(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
        ridge[:features] = RIDGE * scale
        solution = torch.linalg.solve(xtx + torch.diag(ridge), xty)  # (features [+1], outputs)
        with torch.no_grad():
            w = module.weight
            w.copy_(solution[:features].T.reshape(w.shape).to(w.dtype))
            if bias:
                module.bias.copy_(solution[features].to(module.bias.dtype))
        done.append(name)
    return done
