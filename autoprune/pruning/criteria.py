"""Channel importance criteria: which channels a ratio removes.

A criterion scores every channel of a group (higher = more important); the pruner removes the
lowest-scoring ones. Scores are computed once per base model and group, on the unpruned model, so
that applying a policy is deterministic and independent of the order groups are pruned in.

A group couples several layers: the convs or linears that *produce* its channels (every conv adding
into a residual stream), their batch norms, and the layers that *read* them. A criterion scores the
channels in each layer it reads and averages over those layers, indexed by the group's own channels:

- ``l1``, ``l2``, ``lamp``, ``taylor``, ``hessian``: every weighted layer the group cuts, i.e. the
  producers' filters, the batch-norm scales and the consumers' input slices (torch-pruning's group
  importance; ``lamp`` leaves the batch norms out);
- ``bn-scale``: the batch norms; ``fpgm``: the producers' filters;
- ``apoz``, ``entropy``: the activation each producer emits (see :meth:`Statistics.activations`);
- ``lda``: the per-sample spatial maximum of that activation, against the batches' class labels;
- ``correlation``: the layers that read the channels (the consumers), their inputs against their
  outputs (see :meth:`Statistics.connections`);
- ``regression``: the consumers' outputs, reconstructed without the channel (ThiNet's greedy selection,
  :mod:`autoprune.pruning.regression`).

The criteria in :data:`DATA_CRITERIA` read data: a :class:`Statistics` gathers gradients or
activations on calibration batches (the evaluator gives seeded training batches), once per base
model, without modifying it. Without calibration batches these criteria raise :class:`InputError`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from autoprune.errors import InputError, ParameterError
from autoprune.inputs import primary

if TYPE_CHECKING:
    from autoprune.space import Space
    from autoprune.task import Task

Batch = object  # what the task's training batches are: (inputs, labels) for classification
Calibration = Callable[[], Iterable[Batch]]  # returns the same device batches each call
Criterion = Callable[[object], "torch.Tensor | None"]  # torch-pruning Group -> per-channel scores

ENTROPY_BINS = 32  # histogram bins of a channel's pooled activations, over its own range

_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
_NORMS = nn.modules.batchnorm._BatchNorm


class Statistics:
    """What criteria read besides a group's weights, for one base model: module names, the seed of
    ``random``, and gradients or activations on calibration batches, gathered on first use and kept.

    ``calibration()`` returns an iterable of ``(inputs, labels)`` batches on the model's device; it is
    called once per kind of statistic and must give the same batches every time. The base model is
    never modified: gradients are taken on a copy in eval mode (batch norm uses its running statistics
    and does not update them), activations are read in eval mode without autograd, through hooks that
    are removed afterwards.
    """

    def __init__(self, space: Space | None = None, calibration: Calibration | None = None, seed: int = 0,
                 task: Task | None = None) -> None:
        self.space = space
        self.calibration = calibration
        self.seed = int(seed)
        self.task = task  # how a batch is run and its loss taken; None: model(batch[0]) and cross-entropy
        self._gradients: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._activations: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._maxima: dict[nn.Module, torch.Tensor] = {}
        self._labels: torch.Tensor | str = ""  # the batches' class labels, or why they have none
        self._connections: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.cache: dict[str, object] = {}  # what other modules gather per base model (regression's samples)

    def _forward(self, model: nn.Module, batch) -> object:
        return self.task.forward(model, batch) if self.task is not None else model(batch[0])

    def _loss(self, output, batch) -> torch.Tensor:
        if self.task is not None:
            return self.task.loss(output, batch)
        return F.cross_entropy(primary(output).float(), batch[1])

    def name_of(self, module: nn.Module) -> str:
        return self.space.module_names.get(module, "") if self.space is not None else ""

    def _batches(self, criterion: str) -> Iterable[Batch]:
        if self.calibration is None or self.space is None:
            raise InputError(
                f"criterion {criterion!r} reads training data, and this pruner has no calibration batches "
                "(the evaluator provides them); use a weight criterion such as l1 here"
            )
        return self.calibration()

    def gradients(self, criterion: str) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        """Per conv, linear and batch-norm layer of the base model: ``(mean_b |w ⊙ g_b|, mean_b g_b²)``
        over the calibration batches, ``g_b`` the gradient of batch ``b``'s mean cross-entropy with
        respect to the layer's weight ``w`` (the task's loss). The second is the empirical Fisher's diagonal from
        per-batch gradients."""
        if self._gradients is None:
            batches = self._batches(criterion)
            base = self.space.model
            net = copy.deepcopy(base).eval()
            for p in net.parameters():
                p.requires_grad_(True)
            copies = dict(net.named_modules())
            weights = {
                m: copies[name].weight
                for name, m in base.named_modules()
                if isinstance(m, (*_LAYERS, _NORMS)) and getattr(m, "weight", None) is not None
            }
            first = {m: torch.zeros_like(w, dtype=torch.float32) for m, w in weights.items()}
            fisher = {m: torch.zeros_like(w, dtype=torch.float32) for m, w in weights.items()}
            n = 0
            with torch.enable_grad():
                for batch in batches:
                    net.zero_grad(set_to_none=True)
                    self._loss(self._forward(net, batch), batch).backward()
                    for m, w in weights.items():
                        if w.grad is not None:
                            g = w.grad.float()
                            first[m] += (w.detach().float() * g).abs()
                            fisher[m] += g.square()
                    n += 1
            if n == 0:
                raise InputError(f"criterion {criterion!r}: the calibration gave no batches")
            self._gradients = {m: (first[m] / n, fisher[m] / n) for m in weights}
        return self._gradients

    def activations(self, criterion: str) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        """Per activation source of the base model: ``(zero fraction per channel, pooled activations
        of shape (samples, channels))`` over the calibration batches.

        The sources are the batch norms and the convs/linears that do not feed one; the activation
        read is ``relu`` of a source's output. This is the tensor the channel emits after its batch
        norm and ReLU, read the same way in every model: activation modules are often shared
        (torchvision's ResNet calls one ``relu`` module twice per block), applied functionally, or
        applied after a residual add, so hooking them would not map to one producer. For ReLU6 the
        zeros are the same; a layer with no activation after it (a linear bottleneck) is read
        through ``relu`` too. Pooling is the global average over the spatial positions.

        The same pass keeps each source's per-sample spatial maxima (:meth:`fire_scores`) and the
        batches' class labels (:meth:`labels`).
        """
        if self._activations is None:
            batches = self._batches(criterion)
            model, dg = self.space.model, self.space.dg
            sources = []
            for m in model.modules():
                if isinstance(m, _NORMS):
                    sources.append(m)
                elif isinstance(m, _LAYERS):
                    node = dg.module2node.get(m)
                    if node is None or not any(isinstance(o.module, _NORMS) for o in node.outputs):
                        sources.append(m)
            zeros: dict[nn.Module, torch.Tensor] = {}
            seen: dict[nn.Module, int] = {}
            pooled: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in sources}
            peaks: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in sources}
            labels: list[torch.Tensor | str] = []

            def hook(module, _inputs, output):
                a = torch.relu(output.detach().float())
                if isinstance(module, nn.Linear):
                    a = a.movedim(-1, 1)  # features last -> channel dimension 1
                dims = [d for d in range(a.dim()) if d != 1]
                z = (a == 0).sum(dims).float()
                zeros[module] = zeros[module] + z if module in zeros else z
                seen[module] = seen.get(module, 0) + a.numel() // a.shape[1]
                pooled[module].append(a.flatten(2).mean(2) if a.dim() > 2 else a)
                peaks[module].append(a.flatten(2).amax(2) if a.dim() > 2 else a)

            self._run(criterion, batches, dict.fromkeys(sources, hook),
                      on_batch=lambda batch: labels.append(class_labels(batch)))
            self._activations = {
                m: (zeros[m] / seen[m], torch.cat(pooled[m])) for m in sources if m in zeros
            }
            self._maxima = {m: torch.cat(peaks[m]) for m in sources if m in zeros}
            problem = next((y for y in labels if isinstance(y, str)), None)
            self._labels = problem if problem is not None else torch.cat(labels)
        return self._activations

    def _run(self, criterion: str, batches: Iterable[Batch], hooks: dict[nn.Module, Callable],
             on_batch: Callable[[Batch], None] | None = None) -> None:
        """Run the base model over ``batches`` in eval mode without autograd, with forward ``hooks``
        (module -> ``hook(module, inputs, output)``), calling ``on_batch`` after each batch; refuses an
        empty calibration."""
        model = self.space.model
        n = 0
        with hooked(model, hooks):
            for batch in batches:
                self._forward(model, batch)
                if on_batch is not None:
                    on_batch(batch)
                n += 1
        if n == 0:
            raise InputError(f"criterion {criterion!r}: the calibration gave no batches")

    def fire_scores(self, criterion: str) -> dict[nn.Module, torch.Tensor]:
        """Per activation source (as :meth:`activations` reads them): the fire score of every channel
        for every calibration sample, shape (samples, channels): the maximum of the channel's
        activation over its spatial positions (Tian et al., CVPR Workshops 2017), its value itself
        for a linear layer's feature."""
        self.activations(criterion)
        return self._maxima

    def labels(self, criterion: str) -> torch.Tensor:
        """The class label of every calibration sample, in the order :meth:`fire_scores` holds them:
        the second element of each batch (``batch[1]``), which must hold one integer class per sample.
        A task whose batches do not is refused (:class:`InputError`)."""
        self.activations(criterion)
        if isinstance(self._labels, str):
            raise InputError(f"criterion {criterion!r} needs class labels, one integer class per sample as the "
                             f"second element of each training batch (batch[1]); {self._labels}")
        return self._labels

    def connections(self, criterion: str) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        """Per conv and linear layer of the base model: ``(pooled input, pooled output)`` over the
        calibration batches, shapes (samples, input channels) and (samples, output channels): what the
        layer reads (its first input) and what it computes (before any batch norm or activation),
        each channel globally averaged over its spatial positions (a linear layer's features over its
        tokens, when it has any). A layer run more than once per batch contributes a row per call.
        Read in eval mode without autograd, through hooks removed afterwards."""
        if self._connections is None:
            batches = self._batches(criterion)
            model = self.space.model
            layers = [m for m in model.modules() if isinstance(m, _LAYERS)]
            reads: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in layers}
            writes: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in layers}

            def pool(module, t):
                t = t.detach().float()
                if isinstance(module, nn.Linear):
                    return t.flatten(1, -2).mean(1) if t.dim() > 2 else t
                return t.flatten(2).mean(2)

            def hook(module, inputs, output):
                x = inputs[0] if inputs else None
                if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and x.dim() >= 2:
                    reads[module].append(pool(module, x))
                    writes[module].append(pool(module, output))

            self._run(criterion, batches, dict.fromkeys(layers, hook))
            self._connections = {m: (torch.cat(reads[m]), torch.cat(writes[m])) for m in layers if reads[m]}
        return self._connections


@contextlib.contextmanager
def hooked(model: nn.Module, hooks: dict[nn.Module, Callable], *, pre: bool = False) -> Iterator[None]:
    """Within the block: ``model`` in eval mode without autograd, with ``hooks`` (module -> hook) registered
    as forward hooks (``pre``: forward pre-hooks); its modes restored and the hooks removed afterwards."""
    handles = [m.register_forward_pre_hook(fn) if pre else m.register_forward_hook(fn) for m, fn in hooks.items()]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training


def class_labels(batch) -> torch.Tensor | str:
    """``batch[1]`` as one integer class per sample (on the CPU), or a phrase saying why it is not."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        return f"this task's batches are {type(batch).__name__}s without a second element"
    y = batch[1]
    if not isinstance(y, torch.Tensor):
        return f"this task's batch[1] is a {type(y).__name__}, not a tensor"
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex:
        dtype = str(y.dtype).removeprefix("torch.")
        return f"this task's batch[1] is a {dtype} tensor of shape {tuple(y.shape)}"
    return y.detach().long().cpu()


# -- how a group maps onto its layers ---------------------------------------------------------
@dataclass(frozen=True)
class Member:
    """One layer of a group: ``idxs`` are the layer's channels the group cuts, ``root`` the group
    channel each belongs to. ``kind`` is ``out`` (a conv/linear producing the channels; depthwise
    convs included), ``in`` (a conv/linear reading them) or ``norm`` (a batch norm)."""

    module: nn.Module
    kind: str
    idxs: torch.Tensor
    root: torch.Tensor


def members(group) -> list[Member]:
    """The conv, linear and batch-norm layers of a torch-pruning group."""
    channels = len(group[0].idxs)
    out = []
    for item in group:
        dep, idxs = item
        module = dep.target.module
        if not len(idxs) or not isinstance(module, (*_LAYERS, _NORMS)):
            continue
        root = item.root_idxs if item.root_idxs is not None else idxs
        if any(r is None for r in root):
            continue
        if isinstance(module, _NORMS):
            kind = "norm"
        else:  # depthwise convs prune inputs with their output handler: one channel, one filter
            kind = "in" if dep.handler.__name__ == "prune_in_channels" else "out"
        device = next(itertools.chain(module.parameters(), module.buffers()), torch.empty(0)).device
        idxs = torch.as_tensor(tp._helpers.to_plain_idxs(idxs), device=device)
        root = torch.as_tensor(root, device=device)
        ok = (root >= 0) & (root < channels)
        out.append(Member(module, kind, idxs[ok], root[ok]))
    return out


def per_channel(member: Member, t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` (shaped like ``member``'s weight) over each of the member's channels."""
    m = member.module
    if member.kind == "norm":
        v = t
    elif isinstance(m, nn.Linear):  # weight (out, in)
        v = t.sum(1) if member.kind == "out" else t.sum(0)
    else:  # weight (out, in / groups, *k), or (in, out / groups, *k) when transposed
        g = m.groups
        per = t.reshape(g, t.shape[0] // g, t.shape[1], -1)
        rows, cols = per.sum((2, 3)).flatten(), per.sum((1, 3)).flatten()
        produced, read = (cols, rows) if m.transposed else (rows, cols)
        v = produced if member.kind == "out" else read
    return v[member.idxs]


def filters(member: Member) -> torch.Tensor:
    """The flattened filters (one row per channel) of a producing conv/linear ``member``."""
    m, w = member.module, member.module.weight.detach().float()
    if isinstance(m, nn.modules.conv._ConvNd) and m.transposed:
        g = m.groups
        w = w.reshape(g, w.shape[0] // g, w.shape[1], -1).transpose(1, 2).reshape(g * w.shape[1], -1)
    return w.flatten(1)[member.idxs]


def layer_mean(parts: list[tuple[Member, torch.Tensor]], channels: int) -> torch.Tensor | None:
    """Per group channel: the mean over the layers that hold it of each layer's value for it
    (a layer holding a channel at several positions, e.g. a linear after a flatten, sums them)."""
    if not parts:
        return None
    device = parts[0][1].device
    total = torch.zeros(channels, device=device)
    count = torch.zeros(channels, device=device)
    for member, values in parts:
        root = member.root.to(device)
        total.index_add_(0, root, values.float().to(device))
        count += torch.zeros(channels, device=device).index_fill_(0, root, 1.0)
    return total / count.clamp_min(1.0)


# -- the criteria ------------------------------------------------------------------------------
def _magnitude(p: int) -> Criterion:
    # Group magnitude: the p-norm of each channel's weights, averaged over every coupled layer
    # (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017, generalised to DepGraph groups).
    return tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer=None)


def _bn_scale(stats: Statistics) -> Criterion:
    """|γ| of the group's batch norms, averaged (Liu et al., "Learning Efficient Convolutional Networks
    through Network Slimming", ICCV 2017). A group without an affine batch norm falls back to l1."""
    scale = tp.importance.BNScaleImportance(normalizer=None)
    fallback = _magnitude(1)

    def score(group):
        s = scale(group)
        return s if s is not None else fallback(group)

    return score


def _weight_saliency(stats: Statistics, name: str, saliency) -> Criterion:
    """Sum per channel of a weight-shaped saliency, averaged over every weighted layer of the group."""

    def score(group):
        grads = stats.gradients(name)
        parts = [(m, per_channel(m, saliency(m.module.weight.detach().float(), *grads[m.module])))
                 for m in members(group) if m.module in grads]
        return layer_mean(parts, len(group[0].idxs))

    return score


def _taylor(stats: Statistics) -> Criterion:
    """First-order Taylor expansion of the loss (Molchanov et al., "Importance Estimation for Neural
    Network Pruning", CVPR 2019): ``Σ |w · ∂L/∂w|`` over a channel's weights, per batch, averaged
    over the calibration batches."""
    return _weight_saliency(stats, "taylor", lambda w, first, fisher: first)


def _hessian(stats: Statistics) -> Criterion:
    """Second-order saliency of Optimal Brain Damage (LeCun et al., NeurIPS 1989): ``Σ ½ h w²`` over a
    channel's weights, the Hessian diagonal ``h`` approximated by the empirical Fisher, the mean of
    squared per-batch gradients over the calibration batches."""
    return _weight_saliency(stats, "hessian", lambda w, first, fisher: 0.5 * fisher * w.square())


def lamp_scores(v: torch.Tensor) -> torch.Tensor:
    """LAMP (Lee et al., "Layer-adaptive Sparsity for the Magnitude-based Pruning", ICLR 2021, Eq. 2):
    with ``v`` sorted ascending, ``score(u) = v[u] / Σ_{w ≥ u} v[w]`` (ties in index order)."""
    order = torch.argsort(v, stable=True)
    ranked = v[order]
    tail = ranked.flip(0).cumsum(0).flip(0)
    out = torch.empty_like(v)
    out[order] = ranked / tail.clamp_min(torch.finfo(v.dtype).tiny)
    return out


def _lamp(stats: Statistics) -> Criterion:
    """LAMP per channel: each conv/linear layer of the group scores its channels by LAMP over their
    squared L2 norms, and the group averages those scores. Within one layer LAMP orders channels as L2
    does; across the coupled layers of a group it weighs each layer equally whatever its scale."""

    def score(group):
        parts = [(m, lamp_scores(per_channel(m, m.module.weight.detach().float().square())))
                 for m in members(group) if m.kind in ("out", "in")]
        return layer_mean(parts, len(group[0].idxs))

    return score


def _fpgm(stats: Statistics) -> Criterion:
    """Filter pruning via geometric median (He et al., CVPR 2019, Eq. 6): a filter's score is the sum
    of its Euclidean distances to the layer's other filters; the filters nearest the geometric median
    (the lowest sums) are the most replaceable. Averaged over the group's producing layers."""

    def score(group):
        parts = []
        for m in members(group):
            if m.kind == "out":
                f = filters(m)
                parts.append((m, torch.cdist(f, f).sum(1)))
        return layer_mean(parts, len(group[0].idxs))

    return score


def _activation_score(stats: Statistics, name: str, value) -> Criterion:
    def score(group):
        acts = stats.activations(name)
        parts = [(m, value(*acts[m.module])[m.idxs]) for m in members(group)
                 if m.kind in ("out", "norm") and m.module in acts]
        return layer_mean(parts, len(group[0].idxs))

    return score


def _apoz(stats: Statistics) -> Criterion:
    """Average Percentage of Zeros (Hu et al., "Network Trimming", 2016): the fraction of a channel's
    post-ReLU activations that are zero over the calibration batches; the score is ``1 − APoZ``."""
    return _activation_score(stats, "apoz", lambda zero, pooled: 1.0 - zero)


def pooled_entropy(pooled: torch.Tensor, bins: int = ENTROPY_BINS) -> torch.Tensor:
    """Entropy (nats) of each column of ``pooled`` (samples, channels), histogrammed into ``bins``
    equal bins over the column's own range; a constant column has entropy 0."""
    lo = pooled.amin(0)
    span = pooled.amax(0) - lo
    u = (pooled - lo) / torch.where(span > 0, span, torch.ones_like(span))
    idx = (u * bins).long().clamp_(0, bins - 1)
    counts = torch.zeros(pooled.shape[1], bins, device=pooled.device)
    counts.scatter_add_(1, idx.T, torch.ones_like(idx.T, dtype=counts.dtype))
    p = counts / pooled.shape[0]
    return -torch.xlogy(p, p).sum(1)


def _entropy(stats: Statistics) -> Criterion:
    """Entropy of the channel's globally average-pooled activation over the calibration samples
    (Luo and Wu, "An Entropy-based Pruning Method for CNN Compression", 2017): a channel whose pooled
    output barely changes from sample to sample carries little information."""
    return _activation_score(stats, "entropy", lambda zero, pooled: pooled_entropy(pooled))


def fisher_ratio(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fisher's discriminant ratio of each column of ``values`` (samples, channels) for the classes
    ``labels`` (samples,): the between-class over the within-class variance,

        ``J = Σ_k n_k (μ_k − μ)² / Σ_k Σ_{i ∈ k} (x_i − μ_k)²``

    with ``n_k`` and ``μ_k`` the size and mean of class ``k`` and ``μ`` the mean of all samples (both
    variances are over all ``n`` samples, so the ``1/n`` cancels). A column constant over every
    sample scores 0; one constant within each class but not across them (the classes perfectly
    separated) scores ``inf``. Computed in float64."""
    x = values.double()
    classes, inverse = torch.unique(labels.to(x.device), return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(classes)).double()
    means = torch.zeros(len(classes), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    means /= counts[:, None]
    between = (counts[:, None] * (means - x.mean(0)).square()).sum(0)
    within = (x - means[inverse]).square().sum(0)
    total = between + within
    # rounding leaves a within-class sum a hair above 0 when every class is constant: take it as 0
    separated = within <= 1e-12 * total
    ratio = torch.where(separated, torch.full_like(total, math.inf), between / within.clamp_min(1e-300))
    return torch.where(total > 0, ratio, torch.zeros_like(total)).float()


def _lda(stats: Statistics) -> Criterion:
    """Class discriminability of the filter's fire scores (Tian, Arbel, Clark, "Deep LDA-Pruned Nets
    for Efficient Facial Gender Classification", CVPR Workshops 2017): a filter *fires* on an image
    with the maximum of its post-BN/ReLU activation over the image (:meth:`Statistics.fire_scores`),
    and filters whose fire scores separate the classes least go first. The paper ranks filters by
    their weight in a Fisher LDA of the fire vectors; this scores each filter on its own, by Fisher's
    ratio of between- to within-class variance of its fire scores (:func:`fisher_ratio`), the LDA of
    one feature, with the calibration batches' labels (``batch[1]``; a task without class labels is
    refused). Averaged over the group's activation sources, as ``apoz`` is."""

    def score(group):
        fires, labels = stats.fire_scores("lda"), stats.labels("lda")
        if labels.unique().numel() < 2:
            raise InputError(f"criterion 'lda' needs samples of at least two classes; the calibration batches "
                             f"hold only class {int(labels[0])} (give more --criterion-batches)")
        used = [m for m in members(group) if m.kind in ("out", "norm") and m.module in fires]
        matched = [m for m in used if len(fires[m.module]) == len(labels)]
        if used and not matched:
            name = stats.name_of(used[0].module) or type(used[0].module).__name__
            raise InputError(f"criterion 'lda': layer {name} gave {len(fires[used[0].module])} fire scores for "
                             f"{len(labels)} labelled samples (it runs more than once per batch)")
        parts = [(m, fisher_ratio(fires[m.module], labels)[m.idxs]) for m in matched]
        return layer_mean(parts, len(group[0].idxs))

    return score


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Columns of ``x`` centred and divided by their (population) standard deviation; a constant
    column (up to rounding) becomes zeros."""
    x = x.double()
    centred = x - x.mean(0)
    std = centred.square().mean(0).sqrt()
    scale = x.abs().amax(0)
    return torch.where(std > 1e-9 * scale, centred / std.clamp_min(1e-300), torch.zeros_like(centred))


def connection_correlation(inputs: torch.Tensor, outputs: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Per input channel of a layer: the mean, over the output channels it connects to, of the
    absolute Pearson correlation over samples between the input channel and the output channel,

        ``c_i = mean_{j connected to i} |ρ(x_i, y_j)|``,  ``ρ(x, y) = cov(x, y) / (σ_x σ_y)``,

    ``inputs`` (samples, in channels) and ``outputs`` (samples, out channels). With ``groups`` > 1
    (a grouped or depthwise convolution) input ``i`` connects only to the outputs of its group. A
    constant channel correlates with nothing (ρ = 0)."""
    n = inputs.shape[0]
    r = (_standardise(inputs).T @ _standardise(outputs) / n).abs()
    if groups > 1:
        block_in, block_out = inputs.shape[1] // groups, outputs.shape[1] // groups
        g_in = torch.arange(inputs.shape[1], device=r.device) // block_in
        g_out = torch.arange(outputs.shape[1], device=r.device) // block_out
        return (r * (g_in[:, None] == g_out[None, :])).sum(1).float() / block_out
    return r.mean(1).float()


def _correlation(stats: Statistics) -> Criterion:
    """Correlation with the next layer (after Sun, Wang, Tang, "Sparsifying Neural Network Connections
    for Face Recognition", CVPR 2016, which drops the connections between neurons of consecutive
    layers whose activations correlate weakly). A channel's connections run to the output channels
    of every conv or linear layer that reads it (a consumer); each consumer scores the channel by
    :func:`connection_correlation` of its pooled input and pooled output
    (:meth:`Statistics.connections`): the mean ``|ρ|`` over the outputs the channel feeds, ``ρ`` the
    Pearson correlation over the calibration samples of the channel's globally average-pooled value
    as the consumer reads it and the output channel's pooled value before its batch norm and
    activation (a batch norm in eval mode is affine per channel, so ``|ρ|`` is the same after it; the
    classifier's outputs are the logits). Where a consumer reads a channel at several positions (a
    linear layer after a flatten) those are averaged; the group's score averages its consumers,
    unweighted. Weakly correlated channels go first. A group with no conv or linear consumer (its
    channels feed only the model's output or other operations) falls back to ``l1``."""
    fallback = _magnitude(1)

    def score(group):
        conns = stats.connections("correlation")
        channels = len(group[0].idxs)
        total = torch.zeros(channels)
        count = torch.zeros(channels)
        for m in members(group):
            if m.kind != "in" or m.module not in conns:
                continue
            x, y = conns[m.module]
            module = m.module
            groups = module.groups if isinstance(module, nn.modules.conv._ConvNd) else 1
            per_input = connection_correlation(x, y, groups).cpu()
            root, values = m.root.cpu(), per_input[m.idxs.cpu()]
            # positions of one channel in this consumer (a flatten) are averaged: one vote per consumer
            mean = torch.zeros(channels).index_add_(0, root, values)
            seen = torch.zeros(channels).index_add_(0, root, torch.ones_like(values))
            hit = seen > 0
            total[hit] += mean[hit] / seen[hit]
            count[hit] += 1
        if not count.any():
            return fallback(group)
        return total / count.clamp_min(1.0)

    return score


def _random(stats: Statistics) -> Criterion:
    """Uniform random scores, seeded by the pruner's seed and the group's name (so a group's draw does
    not depend on the other groups)."""

    def score(group):
        # CPU generators keep 32 bits of a seed: hash the seed and the name together
        key = zlib.crc32(f"{stats.seed}:{stats.name_of(group[0].dep.target.module)}".encode())
        gen = torch.Generator().manual_seed(key)
        return torch.rand(len(group[0].idxs), generator=gen)

    return score


def _regression(stats: Statistics) -> Criterion:
    """ThiNet's greedy selection on the consumers' sampled outputs (:mod:`autoprune.pruning.regression`)."""
    from autoprune.pruning.regression import regression_criterion

    return regression_criterion(stats)


CRITERIA: dict[str, tuple[Callable[[Statistics], Criterion], str]] = {
    "l1": (lambda stats: _magnitude(1), "L1 norm of each channel's weights over the coupled layers"),
    "l2": (lambda stats: _magnitude(2), "L2 norm of each channel's weights over the coupled layers"),
    "bn-scale": (_bn_scale, "|γ| of the channel's batch norms (network slimming)"),
    "taylor": (_taylor, "first-order Taylor |w·∂L/∂w| summed per channel, on training batches"),
    "hessian": (_hessian, "OBD saliency ½·H·w², Hessian diagonal from the empirical Fisher on training batches"),
    "apoz": (_apoz, "average percentage of zeros of the post-ReLU activations (more zeros go first)"),
    "entropy": (_entropy, "entropy of the channel's average-pooled activations over training samples"),
    "lamp": (_lamp, "layer-adaptive magnitude score (LAMP) per channel, averaged over coupled layers"),
    "fpgm": (_fpgm, "distance to the layer's other filters: those near the geometric median go first"),
    "regression": (_regression, "ThiNet's greedy selection: the channels whose removal least changes the "
                   "next layers' outputs on training batches go first"),
    "random": (_random, "random scores, seeded by --seed"),
    "lda": (_lda, "Fisher ratio (between/within-class variance) of the channel's per-image maximum activation, "
                  "over training batches' class labels (LDA-pruning)"),
    "correlation": (_correlation, "mean |Pearson correlation| of the channel with the outputs of the layers "
                                  "reading it, on training batches (weakly correlated go first)"),
}

DATA_CRITERIA = ("taylor", "hessian", "apoz", "entropy", "regression", "lda", "correlation")  # read calibration batches


def get_criterion(name: str, stats: Statistics | None = None) -> Criterion:
    """The criterion ``name``, reading ``stats`` (a data-free, seed-0 one when not given)."""
    try:
        factory, _ = CRITERIA[name]
    except KeyError:
        raise ParameterError("criterion", name, f"unknown criterion; choose from {', '.join(CRITERIA)}") from None
    return factory(stats if stats is not None else Statistics())
