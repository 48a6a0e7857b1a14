"""ICE-Pick: iterative pruning that fine-tunes only when it must, and only part of the model.

Hu, Gibson and Cano, "ICE-Pick: Iterative Cost-Efficient Pruning for DNNs" (ICML 2023 workshop on
neural compression; the authors' later code is gicLAB/ICE-Pruning). A target policy is reached in
stages instead of at once; after each stage

1. the model is pruned to the cumulative target so far (the channels of the *current*, fine-tuned
   weights with the lowest importance go) and its batch norm is recalibrated;
2. its validation objective (the task's metric: accuracy for a classifier) is measured, and the model
   is fine-tuned only if the drop from the unpruned model is at least ``threshold`` (threshold-guided
   fine-tuning);
3. before a fine-tune, a probe (a few SGD steps on a copy) measures how far each layer's weights
   move, relative to their norm; the ``freeze_ratio`` of layers that move least are frozen for that
   fine-tune (still pruned, no longer trained: out of the optimiser, so neither weight decay nor
   momentum touches them). A layer is frozen with the batch norm that directly follows it, as the
   authors freeze a layer: then no gradient is computed for a frozen layer's weights, and none at
   all for a frozen stretch at the start of the network, whose backward pass autograd skips;
4. the fine-tune's maximum learning rate follows the pruning-aware schedule
   ``lr(α) = base − Δ / (1 + (α / (2(1 − P) − α))^β)`` (:func:`pruning_aware_lr`), α the fraction
   of weights left; SGD with momentum 0.9, weight decay 1e-4, cosine decay within a fine-tune,
   optional knowledge distillation from the unpruned model, and the evaluator's sparsity penalty
   (``--finetune-l1``, ``--finetune-penalty``; off by default), which lets later stages remove
   channels the earlier fine-tunes drove towards zero.

Stages follow execution order: by default one stage per top-level block (a CIFAR ResNet's
``layer1``, ``layer2``, ``layer3``: each block reaches its target while the later ones are still
whole), or ``stages`` contiguous chunks of groups; ``schedule="steps"`` instead moves every group
towards its target in ``stages`` equal steps.

Pruning a model that has been pruned before: the structure no longer matches the base model, so
each stage traces the *current* model (:meth:`Space.from_model`) and removes only the additional
channels. Group names are module paths, which pruning does not change, so the ratio for a group of
the current model is ``1 − keep / current_channels`` with ``keep`` the channels the cumulative
target leaves of the original group (:func:`autoprune.space.keep_count`); the final model therefore
has exactly the channel counts (FLOPs, params) of the target policy applied at once.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from autoprune.cost import count_params
from autoprune.errors import InputError
from autoprune.policy import Policy
from autoprune.pruning.channel import ChannelPruner
from autoprune.pruning.criteria import Calibration
from autoprune.space import Space, keep_count
from autoprune.training import recalibrate_bn, train_steps

if TYPE_CHECKING:
    from autoprune.evaluator import Evaluator

SCHEDULES = ("blocks", "steps")


def pruning_aware_lr(alpha: float, base: float = 1e-3, delta: float = 7.5e-4, p: float = 0.12,
                     beta: float = 50.0) -> float:
    """ICE-Pick's maximum fine-tune LR at the fraction ``alpha`` of weights left:
    ``lr(α) = base − Δ / (1 + (α / (2(1 − P) − α))^β)``.

    Near the unpruned model (α → 1) it is about ``base``; at α = 1 − P it is exactly ``base − Δ/2``;
    it falls towards ``base − Δ`` as α falls, the steeper the larger β. Needs 0 < P < 0.5 (so that
    2(1 − P) > 1 ≥ α) and β > 0.
    """
    if not 0.0 < p < 0.5:
        raise InputError(f"ICE-Pick P must be in (0, 0.5), got {p}")
    if not beta > 0.0:
        raise InputError(f"ICE-Pick beta must be > 0, got {beta}")
    if not 0.0 < alpha <= 1.0:
        raise InputError(f"the fraction of weights left must be in (0, 1], got {alpha}")
    # (α / (2(1 − P) − α))^β through its logarithm, which stays finite for any β
    z = beta * math.log(alpha / (2.0 * (1.0 - p) - alpha))
    if z > 700.0:
        return base
    return base - delta / (1.0 + math.exp(z))


def stage_targets(names: Sequence[str], target: Mapping[str, float], *, stages: int = 0,
                  schedule: str = "blocks") -> list[dict[str, float]]:
    """The cumulative policy (ratios removed) after each stage; the last one is ``target``.

    ``schedule="blocks"``: groups in execution order are split into blocks, and each stage brings
    one more block to its target. ``stages=0`` takes the model's top-level modules as blocks
    (``layer1.0.conv1`` belongs to ``layer1``), or three chunks when there is only one such module;
    ``stages=k`` splits the groups into ``k`` contiguous chunks. ``schedule="steps"``: every group
    moves to ``i / k`` of its target at stage ``i`` (``k`` as many stages as blocks when 0).
    Stages that would prune nothing new are dropped.
    """
    if schedule not in SCHEDULES:
        raise InputError(f"ICE-Pick schedule {schedule!r}: choose from {', '.join(SCHEDULES)}")
    if stages < 0:
        raise InputError(f"ICE-Pick stages must be >= 0, got {stages}")
    names = list(names)
    if stages == 0:
        tops: dict[str, list[str]] = {}
        for n in names:
            tops.setdefault(n.split(".")[0], []).append(n)
        chunks = list(tops.values()) if len(tops) > 1 else _split(names, min(3, len(names)))
    else:
        chunks = _split(names, min(stages, len(names)))
    out: list[dict[str, float]] = []
    if schedule == "blocks":
        current = dict.fromkeys(names, 0.0)
        for chunk in chunks:
            if all(target.get(n, 0.0) == 0.0 for n in chunk):
                continue
            current.update({n: float(target.get(n, 0.0)) for n in chunk})
            out.append(dict(current))
    else:
        k = stages or len(chunks)
        out = [{n: float(target.get(n, 0.0)) * i / k for n in names} for i in range(1, k + 1)]
    return out or [{n: float(target.get(n, 0.0)) for n in names}]


def _split(items: list[str], k: int) -> list[list[str]]:
    k = max(1, k)
    size, extra = divmod(len(items), k)
    out, start = [], 0
    for i in range(k):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return [c for c in out if c]


def layer_names(model: nn.Module) -> list[str]:
    """The layers ICE-Pick may freeze: every convolution and linear layer."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]


def layer_norms(space: Space) -> dict[str, str]:
    """For every convolution and linear layer of ``space``'s model whose output goes only to a batch
    norm, that norm: the layer's own, frozen with it. Module names survive pruning, so the base model's
    space serves every stage."""
    out = {}
    for name in layer_names(space.model):
        node = space.dg.module2node.get(space.modules[name])
        if node is None or len(node.outputs) != 1:
            continue
        follower = node.outputs[0].module
        if isinstance(follower, nn.modules.batchnorm._NormBase) and follower in space.module_names:
            out[name] = space.module_names[follower]
    return out


@dataclass
class Stage:
    """What one ICE-Pick stage did."""

    index: int
    params_left: float  # α, the fraction of weights left
    score: float  # the objective after pruning (and BN recalibration), before any fine-tune
    drop: float  # how much worse ``score`` is than the unpruned model's
    finetuned: bool
    lr: float | None = None
    frozen: list[str] = field(default_factory=list)
    score_after: float | None = None  # after the fine-tune
    # wall seconds of each phase: prune, recalibrate, score, probe, finetune, score_after (those that ran)
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.index, "params_left": self.params_left, "score": self.score,
            "drop": self.drop, "finetuned": self.finetuned, "lr": self.lr, "frozen": len(self.frozen),
            "score_after": self.score_after, "seconds": dict(self.seconds),
        }


@dataclass
class IcePickResult:
    """The pruned model and what it cost: wall time and SGD steps (fine-tune and probe)."""

    model: nn.Module
    seconds: float
    finetune_steps: int
    probe_steps: int
    stages: list[Stage]

    @property
    def train_steps(self) -> int:
        return self.finetune_steps + self.probe_steps


class IcePick:
    """The ICE-Pick pruning procedure (Hu, Gibson, Cano 2023); configure here, call :meth:`run`.

    Parameters
    ----------
    freeze_ratio: fraction of conv/linear layers frozen for each fine-tune, those whose weights
        moved least during the probe (0 freezes nothing).
    threshold: fine-tune after a stage only if the validation objective dropped by at least this much
        (absolute, e.g. 0.01 = one point of accuracy) from the unpruned model; ``-inf`` fine-tunes after
        every stage.
    base_lr, delta, p, beta: the pruning-aware LR schedule ``base``, ``Δ``, ``P``, ``β``
        (:func:`pruning_aware_lr`; 1e-3, 7.5e-4, 0.12, 50 as in the paper). ``delta=0`` gives a fixed LR.
    finetune_steps: SGD steps of one fine-tune (per stage that needs one).
    stages, schedule: how the target is split into stages (:func:`stage_targets`).
    probe_steps: SGD steps of the probe that measures how far each layer moves (on a copy).
    momentum, weight_decay: of the SGD fine-tune (0.9 and 1e-4 in the paper).
    distill, temperature: knowledge distillation from the unpruned model (weight 0 turns it off).
    bn_batches: batches of BN recalibration after each pruning step (None: the evaluator's).
    seed: seeds the batches and augmentation.
    """

    def __init__(
        self,
        *,
        freeze_ratio: float = 0.2,
        threshold: float = 0.01,
        base_lr: float = 1e-3,
        delta: float = 7.5e-4,
        p: float = 0.12,
        beta: float = 50.0,
        finetune_steps: int = 50,
        stages: int = 0,
        schedule: str = "blocks",
        probe_steps: int = 5,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        distill: float = 0.0,
        temperature: float = 4.0,
        bn_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= freeze_ratio < 1.0:
            raise InputError(f"ICE-Pick freeze_ratio must be in [0, 1), got {freeze_ratio}")
        if finetune_steps < 0 or probe_steps < 0:
            raise InputError("ICE-Pick finetune_steps and probe_steps must be >= 0")
        if schedule not in SCHEDULES:
            raise InputError(f"ICE-Pick schedule {schedule!r}: choose from {', '.join(SCHEDULES)}")
        if delta > base_lr:
            raise InputError(f"ICE-Pick delta ({delta}) must not exceed base_lr ({base_lr}): the LR would go negative")
        pruning_aware_lr(1.0, base_lr, delta, p, beta)  # validates P and beta
        self.freeze_ratio = freeze_ratio
        self.threshold = threshold
        self.base_lr = base_lr
        self.delta = delta
        self.p = p
        self.beta = beta
        self.finetune_steps = finetune_steps
        self.stages = stages
        self.schedule = schedule
        self.probe_steps = probe_steps
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.distill = distill
        self.temperature = temperature
        self.bn_batches = bn_batches
        self.seed = seed

    @classmethod
    def iterative(cls, *, lr: float = 1e-3, finetune_steps: int = 50, **kw: Any) -> IcePick:
        """Plain iterative pruning, the paper's baseline: the same stages, a full fine-tune at a fixed
        LR after every one, nothing frozen."""
        return cls(freeze_ratio=0.0, threshold=-math.inf, base_lr=lr, delta=0.0, finetune_steps=finetune_steps,
                   probe_steps=0, **kw)

    def lr(self, alpha: float) -> float:
        return pruning_aware_lr(alpha, self.base_lr, self.delta, self.p, self.beta)

    # -- the procedure --------------------------------------------------------------------------
    def run(self, evaluator: Evaluator, policy: Policy) -> IcePickResult:
        """Prune ``evaluator``'s base model to ``policy`` in stages; the base model is not modified."""
        t0 = time.perf_counter()
        space = evaluator.space
        space.check_names(policy.ratios)
        task, amp = evaluator.task, evaluator.amp
        reference = evaluator.baseline("val").score  # cached by the evaluator
        train = task.train_batches(self.seed, augment=True)
        plain = task.train_batches(self.seed, augment=False)
        bn_batches = evaluator.bn_batches if self.bn_batches is None else self.bn_batches
        teacher = evaluator.model if self.distill > 0 else None
        penalty = {"penalty": evaluator.finetune_penalty, "penalty_weight": evaluator.finetune_l1}

        model = copy.deepcopy(evaluator.model)
        history: list[Stage] = []
        finetuned = probed = 0
        targets = stage_targets(space.names, policy.ratios, stages=self.stages, schedule=self.schedule)
        norms = layer_norms(space)
        for i, cumulative in enumerate(targets):
            clock = _Clock()
            model = self.prune_to(model, space, cumulative, policy.criterion, evaluator.example_inputs,
                                  calibration=evaluator.calibration, seed=evaluator.seed, task=task,
                                  reconstruct=policy.reconstruct)
            clock.lap("prune")
            recalibrate_bn(model, task, plain, bn_batches, amp)
            clock.lap("recalibrate")
            alpha = count_params(model) / space.base_params
            value = evaluator.metrics_of(model, "val")[task.metric]
            clock.lap("score")
            stage = Stage(i, alpha, value, task.shortfall(reference, value), finetuned=False, seconds=clock.laps)
            if stage.drop >= self.threshold and self.finetune_steps > 0:
                stage.finetuned = True
                stage.lr = self.lr(alpha)
                if self.freeze_ratio > 0 and self.probe_steps > 0:
                    stage.frozen = self.probe(model, task, train, stage.lr, amp, **penalty)
                    probed += self.probe_steps
                    clock.lap("probe")
                trainable = freeze(model, stage.frozen, norms)
                train_steps(model, task, train, self.finetune_steps, stage.lr, momentum=self.momentum,
                            weight_decay=self.weight_decay, teacher=teacher, distill=self.distill,
                            temperature=self.temperature, amp=amp, params=trainable, **penalty)
                freeze(model, [])
                finetuned += self.finetune_steps
                clock.lap("finetune")
                stage.score_after = evaluator.metrics_of(model, "val")[task.metric]
                clock.lap("score_after")
            history.append(stage)
        return IcePickResult(model.eval(), time.perf_counter() - t0, finetuned, probed, history)

    @staticmethod
    def prune_to(model: nn.Module, space: Space, cumulative: Mapping[str, float], criterion: str,
                 example_inputs: Any, calibration: Calibration | None = None, seed: int = 0,
                 task: Any = None, reconstruct: bool = False) -> nn.Module:
        """A copy of ``model`` (the base model, possibly pruned and fine-tuned already) with the channel
        counts that ``cumulative`` gives the base model's groups; only the additional channels go,
        chosen by ``criterion`` on ``model``'s current weights (and on ``calibration`` batches for the
        criteria that read data). With ``reconstruct`` the layers reading the removed channels are refitted
        to ``model``'s outputs on the calibration batches (the stage's refit)."""
        current = Space.from_model(model, example_inputs)
        missing = [n for n in space.names if n not in current.by_name]
        if missing:
            raise InputError(f"ICE-Pick lost track of group {missing[0]!r} after pruning; pin it with --ignore")
        ratios = {}
        for name in space.names:
            keep = keep_count(space.by_name[name].channels, cumulative.get(name, 0.0))
            channels = current.by_name[name].channels
            ratios[name] = max(0.0, 1.0 - keep / channels)
        if not any(r > 0 for r in ratios.values()):
            return model
        return ChannelPruner(current, calibration, seed, task).prune(Policy(ratios, criterion=criterion,
                                                                            reconstruct=reconstruct))

    def probe(self, model: nn.Module, task: Any, batches: Iterator, lr: float, amp: bool = False, *,
              penalty: str = "l1", penalty_weight: float = 0.0) -> list[str]:
        """The ``freeze_ratio`` of layers whose weights move least (relative to their norm) in
        ``probe_steps`` SGD steps on a copy of ``model`` (with the fine-tune's sparsity penalty)."""
        names = layer_names(model)
        n_frozen = min(len(names) - 1, int(math.floor(self.freeze_ratio * len(names) + 0.5)))
        if n_frozen <= 0:
            return []
        trial = copy.deepcopy(model)
        modules = dict(trial.named_modules())
        before = {n: modules[n].weight.detach().clone() for n in names}
        train_steps(trial, task, batches, self.probe_steps, lr, momentum=self.momentum,
                    weight_decay=self.weight_decay, schedule="constant", amp=amp, penalty=penalty,
                    penalty_weight=penalty_weight)
        moved = {
            n: float((modules[n].weight.detach() - before[n]).norm() / before[n].norm().clamp_min(1e-12))
            for n in names
        }
        return sorted(names, key=lambda n: (moved[n], names.index(n)))[:n_frozen]


class _Clock:
    """Wall seconds between successive :meth:`lap` calls, by phase name (on CUDA a phase's kernels may
    still run when its lap is taken, and land in the next phase: the stage's total stays exact)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = self.laps.get(phase, 0.0) + now - self._last
        self._last = now


def freeze(model: nn.Module, names: Sequence[str], norms: Mapping[str, str] | None = None) -> list[nn.Parameter]:
    """Freeze the parameters of the layers ``names``, and of their own batch norms (``norms``, layer to
    norm: :func:`layer_norms`), and unfreeze every other; return the trainable parameters, the only ones
    an optimiser should see."""
    norms = norms or {}
    frozen = set(names) | {norms[n] for n in names if n in norms}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            p.requires_grad_(name not in frozen)
    return [p for p in model.parameters() if p.requires_grad]
