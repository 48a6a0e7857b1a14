"""The shared evaluator: one per process, used by every agent.

``cost(policy)`` predicts FLOPs and parameters without touching a model (microseconds; latency is
measured on the pruned model when asked). ``evaluate(policy, finetune_steps)`` prunes a copy of the
base model, recalibrates its batch norm on training batches (adaptive BN, the zero-training proxy),
optionally fine-tunes it for a number of steps (with knowledge distillation from the unpruned model
if asked), and scores it on the held-out validation split; FLOPs and params are measured on the pruned
model itself, which is what feasibility is decided on. Results are cached by policy.

Data comes only from the :class:`~autoprune.task.Task`: its seeded training batches, its forward pass
and loss, its score (one named objective with a direction, plus other metrics). Every candidate sees
the same batches for a given seed, so candidates are compared on equal terms and a recorded result can
be reproduced exactly (``autoprune apply`` does). The built-in datasets' task keeps its data on the
device as tensors, batched and augmented there.

The policy's granularity picks the pruner: channel removal (:class:`~autoprune.pruning.ChannelPruner`)
or weight masks for ``unstructured`` and ``N:M`` (:class:`~autoprune.pruning.MaskPruner`). For masked
models ``flops`` and ``params`` are the *effective* figures (only the weights the masks keep), which
budgets are judged on; ``flops_dense`` and ``params_dense`` keep the dense ones (the shapes, unchanged).

Energy (:mod:`autoprune.energy`, MAC-equivalents) is predicted with FLOPs and measured on every
channel-pruned model, in total and per layer; masked models have none (their masked weights still move).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from autoprune.cost import count_flops, count_params, measure_latency
from autoprune.energy import EnergyCosts, EnergyModel, measure_energy, total
from autoprune.errors import CandidateError, InputError, ParameterError
from autoprune.policy import Policy, parse_granularity, snap_ratio
from autoprune.pruning import ChannelPruner, MaskPruner
from autoprune.pruning.masks import check_criterion, is_masked
from autoprune.space import Space
from autoprune.task import Task, check_task, scores_of
from autoprune.training import PENALTIES, autocast, recalibrate_bn, train_steps


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError("device", device, "choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device", str(device), "no CUDA device is available here; use auto or cpu")
    return device


@contextlib.contextmanager
def fails_candidate(device: torch.device) -> Iterator[None]:
    """Within the block, running out of memory fails the candidate (:class:`CandidateError`, a failed
    trial with its reason) rather than the search: the next candidate may be smaller. Every path that
    builds or trains a candidate runs in one: the evaluator's, and the agents that build their own
    models (ICE-Pick's iterative pruning, the gates' learning and training from scratch)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise CandidateError(f"out of memory: {str(e).splitlines()[0]}") from None


@dataclass(frozen=True)
class Evaluation:
    """What one evaluated candidate measured: ``score`` is the task's objective (named ``metric``) on
    ``split``; ``metrics`` holds every metric the task reported, the objective included."""

    score: float
    flops: int
    params: int
    latency: float | None
    seconds: float
    finetune_steps: int
    split: str = "val"
    metric: str = "accuracy"
    metrics: dict[str, float] = field(default_factory=dict)
    flops_dense: int | None = None  # masked granularities: the dense figures (flops/params are effective)
    params_dense: int | None = None
    energy: float | None = None  # MAC-equivalents (autoprune.energy); None for a masked model
    energy_layers: dict[str, float] | None = None  # the same, by conv/linear layer

    @property
    def loss(self) -> float:
        """The task's loss on the split, where its score reports one (NaN otherwise)."""
        return float(self.metrics.get("loss", math.nan))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resources(self) -> dict[str, float]:
        out = {"flops": float(self.flops), "params": float(self.params)}
        if self.latency is not None:
            out["latency"] = float(self.latency)
        if self.energy is not None:
            out["energy"] = float(self.energy)
        return out


class Evaluator:
    """Scores pruning policies of one base model on one task.

    Parameters
    ----------
    model: the trained base model (not modified; pruned copies are made).
    task: what the model is trained and judged on (:class:`~autoprune.task.Task`): training batches for
        BN recalibration and fine-tuning, the validation split for search scores, the test split (when
        it has one) for final reports only.
    device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    criterion: default criterion for policies that do not name one (``l1``).
    granularity: default granularity of the policies it makes: ``channel``, ``unstructured`` or
        ``N:M`` such as ``2:4`` (see :mod:`autoprune.pruning.masks`).
    criterion_batches: training batches (seeded, not augmented) that the data-reading criteria
        (``DATA_CRITERIA``: taylor, apoz, lda, regression, ...) gather their statistics on, once per base
        model, and that the least-squares refit (``reconstruct``) fits on.
    reconstruct: default of the policies it makes: after the channels are removed, refit every conv or
        linear layer reading pruned channels by least squares to the unpruned model's outputs
        (:mod:`autoprune.pruning.regression`), before batch-norm recalibration and fine-tuning. Channel
        granularity only.
    ignore: module-name patterns whose groups stay whole, beside the first conv and the classifier.
    bn_batches: training batches for adaptive BN recalibration (0 turns it off).
    finetune_lr: peak LR of the cosine fine-tune schedule (SGD, momentum 0.9, wd 5e-4).
    finetune_l1, finetune_penalty: weight λ (0 turns it off) and kind (``l1`` or ``group``: group
        lasso over output channels) of the sparsity penalty on conv and linear weights in every
        fine-tune (:func:`~autoprune.training.penalty_gradient`); ICE-Pick's fine-tunes take it too.
    distill: weight of the distillation loss from the unpruned model (0 turns it off).
    latency: measure latency of every evaluated candidate (needed for latency budgets).
    latency_batch: samples per timed forward pass. 1 is deployment latency of one input; a larger
        batch measures throughput-bound latency, where the model's own compute dominates rather than
        per-layer dispatch overhead (small models on a CPU are overhead-bound at batch 1).
    seed: seeds the batches and augmentation of every candidate.
    amp: bf16 autocast on CUDA. ``"auto"`` times a few fine-tune steps of a copy of the base model with
        and without it, once, and keeps autocast only where it is faster: large models gain from tensor
        cores, while small ones are bound by kernel launches, which autocast's casts add to (ResNet-20 on
        the 8x8 default: 18 % slower with it on an H100). Never on the CPU. The chosen value is
        recorded with the search, so ``apply`` and workers reuse it.
    energy_costs: energy of a MAC and of an access at each memory level
        (:class:`~autoprune.energy.EnergyCosts`, its text such as ``"rf=1,pe=2,buffer=6,dram=200"`` or a
        mapping; default Eyeriss's).
    model_info: metadata stamped into every policy (model name, task, shapes).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        *,
        device: str | torch.device = "auto",
        criterion: str = "l1",
        granularity: str = "channel",
        criterion_batches: int = 8,
        reconstruct: bool = False,
        ignore: Iterable[str] = (),
        bn_batches: int = 20,
        finetune_lr: float = 0.01,
        finetune_l1: float = 0.0,
        finetune_penalty: str = "l1",
        distill: float = 0.0,
        temperature: float = 4.0,
        latency: bool = False,
        latency_repeats: int = 20,
        latency_batch: int = 1,
        seed: int = 0,
        amp: bool | str = "auto",
        energy_costs: str | Mapping[str, float] | EnergyCosts | None = None,
        model_info: Mapping[str, Any] | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.task = check_task(task).to(self.device)
        self.model = model.to(self.device).eval()
        self.criterion = criterion
        self.granularity = parse_granularity(granularity)
        if self.granularity != "channel":
            check_criterion(self.granularity, criterion)
        self.criterion_batches = criterion_batches
        if reconstruct and self.granularity != "channel":
            raise ParameterError("reconstruct", reconstruct, f"refits layers after channels are removed; granularity "
                                 f"{self.granularity} removes none (use granularity channel)")
        self.reconstruct = bool(reconstruct)
        self.bn_batches = bn_batches
        self.finetune_lr = finetune_lr
        if not (isinstance(finetune_l1, (int, float)) and math.isfinite(finetune_l1) and finetune_l1 >= 0):
            raise ParameterError("finetune_l1", finetune_l1, "must be a number >= 0")
        if finetune_penalty not in PENALTIES:
            raise ParameterError("finetune_penalty", finetune_penalty, f"choose from {', '.join(PENALTIES)}")
        self.finetune_l1 = float(finetune_l1)
        self.finetune_penalty = finetune_penalty
        self.distill = distill
        self.temperature = temperature
        self.latency = latency
        self.latency_repeats = latency_repeats
        if int(latency_batch) < 1:
            raise ParameterError("latency_batch", latency_batch, "must be an integer >= 1")
        self.latency_batch = int(latency_batch)
        self.seed = seed
        self.amp = bool(amp) if amp != "auto" else False
        self.example_inputs = self.task.example_inputs
        self.space = Space.from_model(self.model, self.example_inputs, ignore=ignore)
        self.energy = EnergyModel(self.space, EnergyCosts.parse(energy_costs))
        self.pruner = ChannelPruner(self.space, calibration=self.calibration, seed=seed, task=self.task)
        self._mask_pruner: MaskPruner | None = None
        self.model_info = dict(model_info or {})
        self.model_info.setdefault("groups", len(self.space.names))
        self._cache: dict[tuple, Evaluation] = {}
        self._baseline: dict[str, Evaluation] = {}
        self._sealed: set[str] = set()
        if amp == "auto" and self.device.type == "cuda":
            self.amp = self._autocast_pays()
        self.evaluations = 0  # candidates actually evaluated (cache hits excluded)

    def _autocast_pays(self, steps: int = 8, rounds: int = 2) -> bool:
        """Whether bf16 autocast makes fine-tune steps of (a copy of) the base model faster by 5 % or
        more: the least of ``rounds`` timings of ``steps`` steps each way, alternating."""
        import copy

        model = copy.deepcopy(self.model)
        batches = self.task.train_batches(self.seed)
        best = {False: float("inf"), True: float("inf")}
        train_steps(model, self.task, batches, 2, 1e-4, amp=True)  # warm-up: kernel selection, allocator
        train_steps(model, self.task, batches, 2, 1e-4, amp=False)
        for _ in range(rounds):
            for amp in (False, True):
                torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                train_steps(model, self.task, batches, steps, 1e-4, amp=amp)
                torch.cuda.synchronize(self.device)
                best[amp] = min(best[amp], time.perf_counter() - t0)
        del model
        return best[True] < 0.95 * best[False]

    # -- the unpruned model -------------------------------------------------------------------
    @property
    def metric(self) -> str:
        return self.task.metric

    @property
    def base(self) -> dict[str, float]:
        """The unpruned model's resources (latency included only when measured)."""
        out = {"flops": float(self.space.base_flops), "params": float(self.space.base_params),
               "energy": float(self.energy.base)}
        if self.latency:
            out["latency"] = self.baseline().latency
        return out

    def baseline(self, split: str = "val") -> Evaluation:
        """The unpruned model as given: no recalibration, no fine-tune. A task whose score fails on it is
        refused (:class:`InputError`): that is no candidate's fault."""
        if split not in self._baseline:
            t0 = time.perf_counter()
            try:
                metrics = self.metrics_of(self.model, split)
            except CandidateError as e:
                raise InputError(f"the task's score fails on the unpruned model ({split} split): {e}") from None
            lat = self.latency_of(self.model) if self.latency else None
            self._baseline[split] = Evaluation(
                metrics[self.metric], self.space.base_flops, self.space.base_params, lat,
                time.perf_counter() - t0, 0, split, self.metric, metrics,
                energy=self.energy.base, energy_layers=dict(self.energy.base_layers),
            )
        return self._baseline[split]

    # -- policies -----------------------------------------------------------------------------
    @property
    def mask_pruner(self) -> MaskPruner:
        """The pruner of the masked granularities (made on first use)."""
        if self._mask_pruner is None:
            self._mask_pruner = MaskPruner(self.space, seed=self.seed)
        return self._mask_pruner

    def pruner_for(self, granularity: str) -> ChannelPruner | MaskPruner:
        return self.pruner if granularity == "channel" else self.mask_pruner

    def policy(self, ratios: Mapping[str, float], **kw: Any) -> Policy:
        """A policy for this model: missing groups get 0, the criterion and granularity default to the
        evaluator's; N:M ratios snap to the nearer of 0 and 1 - N/M (:func:`~autoprune.policy.snap_ratio`)."""
        kw.setdefault("granularity", self.granularity)
        granularity = parse_granularity(kw["granularity"])
        full = {n: snap_ratio(granularity, float(ratios.get(n, 0.0))) for n in self.space.names}
        self.space.check_names(ratios)
        kw.setdefault("criterion", self.criterion)
        if granularity == "channel":
            kw.setdefault("reconstruct", self.reconstruct)
        kw.setdefault("model", dict(self.model_info))
        return Policy(full, **kw)

    def uniform(self, ratio: float, **kw: Any) -> Policy:
        return self.policy(dict.fromkeys(self.space.names, ratio), **kw)

    def cost(self, policy: Policy | Mapping[str, float], latency: bool | None = None) -> dict[str, float]:
        """Predicted FLOPs, params and energy (exact for conv/linear/norm layers); latency measured if asked.

        Plain ratios are read in the evaluator's granularity. Masked granularities give the effective
        ``flops`` and ``params`` (N:M ratios snapped) and the dense ``flops_dense`` / ``params_dense``,
        and no energy.
        """
        ratios = policy.ratios if isinstance(policy, Policy) else policy
        granularity = policy.granularity if isinstance(policy, Policy) else self.granularity
        if granularity == "channel":
            out = self.space.cost(ratios)
            out["energy"] = self.energy.predict(ratios)
        else:
            out = self.mask_pruner.cost(ratios, granularity)
        if self.latency if latency is None else latency:
            pol = policy if isinstance(policy, Policy) else self.policy(ratios)
            pol = dataclasses.replace(pol, reconstruct=False)  # the refit changes weights, not shapes or latency
            out["latency"] = self.latency_of(self.pruner_for(pol.granularity).prune(pol))
        return out

    # -- evaluation ---------------------------------------------------------------------------
    def build(self, policy: Policy, finetune_steps: int = 0) -> nn.Module:
        """The pruned, BN-recalibrated and fine-tuned model for ``policy`` (deterministic per seed)."""
        return self.finish(self.pruner_for(policy.granularity).prune(policy), finetune_steps)

    def finish(self, model: nn.Module, finetune_steps: int = 0) -> nn.Module:
        """``model``, already pruned (by a policy, or by other means such as another library's pruner),
        BN-recalibrated and fine-tuned as every candidate is: the same batches, LR and distillation."""
        recalibrate_bn(model, self.task, self.task.train_batches(self.seed, augment=False), self.bn_batches,
                       self.amp)
        if finetune_steps > 0:
            teacher = self.model if self.distill > 0 else None
            train_steps(model, self.task, self.task.train_batches(self.seed, augment=True), finetune_steps,
                        self.finetune_lr, teacher=teacher, distill=self.distill, temperature=self.temperature,
                        amp=self.amp, penalty=self.finetune_penalty, penalty_weight=self.finetune_l1)
        return model.eval()

    def evaluate(self, policy: Policy, finetune_steps: int = 0, split: str = "val") -> Evaluation:
        """Prune, recalibrate, fine-tune ``finetune_steps`` steps and score on ``split``."""
        key = (policy.key(), int(finetune_steps), split)
        if key in self._cache:
            return self._cache[key]
        t0 = time.perf_counter()
        with fails_candidate(self.device):
            model = self.build(policy, finetune_steps)
            result = self.measure(model, split, finetune_steps, t0)
        self._cache[key] = result
        self.evaluations += 1
        return result

    def measure(self, model: nn.Module, split: str = "val", finetune_steps: int = 0,
                t0: float | None = None) -> Evaluation:
        """Score an already pruned model and measure its resources (effective and dense ones for a
        masked model)."""
        t0 = time.perf_counter() if t0 is None else t0
        metrics = self.metrics_of(model, split)
        lat = self.latency_of(model) if self.latency else None
        flops, params = count_flops(model, self.example_inputs), count_params(model)
        extra: dict[str, Any] = {}
        if is_masked(model):
            extra = {"flops_dense": flops, "params_dense": params}
            flops = count_flops(model, self.example_inputs, effective=True)
            params = count_params(model, effective=True)
        else:
            layers = measure_energy(model, self.example_inputs, self.energy.costs)
            extra = {"energy": total(layers), "energy_layers": layers}
        return Evaluation(
            score=metrics[self.metric],
            flops=flops,
            params=params,
            latency=lat,
            seconds=time.perf_counter() - t0,
            finetune_steps=int(finetune_steps),
            split=split,
            metric=self.metric,
            metrics=metrics,
            **extra,
        )

    def metrics_of(self, model: nn.Module, split: str = "val") -> dict[str, float]:
        """The task's metrics of ``model`` on ``split`` (the objective checked to be finite)."""
        if split in self._sealed:
            raise RuntimeError(f"the {split} split is not read during a search")
        if not self.task.has_split(split):
            raise InputError(f"the task has no {split!r} split")
        model.eval()
        with autocast(self.device, self.amp):
            metrics = self.task.score(model, split)
        return scores_of(self.task, metrics, "the task's score")

    @contextlib.contextmanager
    def sealed(self, *splits: str) -> Iterator[None]:
        """Within the block, scoring on ``splits`` raises: a search reads the validation split only."""
        added = set(splits) - self._sealed
        self._sealed |= added
        try:
            yield
        finally:
            self._sealed -= added

    def calibration(self) -> Iterator[Any]:
        """The ``criterion_batches`` training batches that data-reading criteria score channels on: the
        same for a given seed, so ``apply`` picks the channels the search picked."""
        return itertools.islice(self.task.train_batches(self.seed, augment=False), self.criterion_batches)

    def latency_of(self, model: nn.Module) -> float:
        """Seconds per forward pass of ``latency_batch`` samples: the least of three medians, the rounds
        apart (load elsewhere on the machine only ever adds time, so a burst of it spoils one round, not
        the figure a budget is judged on)."""
        per_round = max(1, self.latency_repeats // 3)
        return min(measure_latency(model, self.example_inputs, warmup=5 if r == 0 else 1, repeats=per_round,
                                   batch_size=self.latency_batch) for r in range(3))
