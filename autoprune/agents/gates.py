"""Pruning from Scratch (Wang, Zhang, Li, Xie, Bai, Wang, AAAI 2020): learn channel gates on a
network whose weights stay at their random initialisation, then read the pruned structure off them.

1. A scalar gate per channel of every prunable group, multiplied into the output after batch norm
   (:class:`autoprune.pruning.gates.ChannelGates`; coupled layers share one gate vector).
   The residual streams (:func:`autoprune.pruning.gates.residual_streams`) get no gate and stay
   whole, as in the authors' code, which gates each ResNet or MobileNetV2 block's inner channels only;
   ``--gates-streams gate`` gates them too, so that the threshold can prune them.
2. The weights are frozen at a fresh random initialisation (``--gates-from pretrained``: the trained
   ones); the gates start at 1 and are learned with Adam (lr 0.01) on
   ``CE + lambda * (mean|g| - r)^2`` (Eq. 2; lambda 0.5, r 0.2), clamped to [0, 1] after each step.
   ``--gates-penalty flops`` weighs each gate in that mean by the FLOPs one channel of its group
   costs (mean weight 1), so that the gate of a costly channel is pulled towards zero harder than a
   cheap one's; the paper's plain mean counts every channel alike, whatever it costs. Adam scales each
   gate's step by its own gradient's size, so the weights act through the balance with the loss's pull
   on each gate rather than through the size of the steps.
3. Every ``snapshot_every`` steps the gates are kept with the gated network's validation objective.
   The run's gates are the most accurate snapshot among those that reached the target sparsity,
   here read as ``mean|g| <= r + sparsity_tol`` (the quantity the regulariser drives to r); the
   sparsest snapshot when none did. Only the snapshots that can be chosen are scored (a validation
   pass each): not those taken while the gates are still on their way down to r.
4. One global threshold over all gates is bisected until the pruned structure meets every budget
   as tightly as whole channels allow (:func:`autoprune.pruning.gates.threshold_structure`);
   ``--gates-order flops`` walks the channels by gate divided by what one channel of their group
   costs, the least gate for the FLOPs first. Under FLOPs and parameter budgets, the channels removed
   that the budget did not need (the last one taken can be a costly one) are then given back. The
   channels kept are those with the largest gates, carried in the policy's ``keep`` field so that
   ``autoprune apply`` reproduces the same channels (``--gates-keep gates``, the default for gates
   learned on pretrained weights). Gates learned on random weights rank the channels of a random
   network, which have no counterpart in the trained one that is fine-tuned here, so by default
   (``auto``) only their per-group counts are used and the criterion picks the channels.
5. The structure is scored by the shared evaluator, like every agent's candidates: pruned from the
   trained base model, BN-recalibrated, fine-tuned ``--finetune-steps``. ``--gates-train-from-scratch
   STEPS`` also trains the pruned architecture from fresh weights, as the paper does, and records
   that as one more trial (user attribute ``gates_role = "scratch"``).

Several values of ``--gates-lambda`` / ``--gates-r`` (comma-separated) give one gate-learning run
each; every run is one Optuna trial whose params are its lambda and r.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from optuna.distributions import FloatDistribution
from torch import nn

from autoprune.agents.base import Agent, Option, SearchContext, SearchResult, register
from autoprune.errors import CandidateError, InputError
from autoprune.evaluator import Evaluation, fails_candidate
from autoprune.models._init import kaiming_init
from autoprune.policy import Policy
from autoprune.pruning.gates import (
    ChannelGates,
    channel_flops,
    flops_weights,
    gate_mean,
    residual_streams,
    sparsity_penalty,
    threshold_structure,
)
from autoprune.space import Space
from autoprune.study import completed, evaluation_of, policy_of
from autoprune.task import Task
from autoprune.training import autocast, train_steps

# what a run recorded before an option existed was learned with (so that such runs still resume)
_BEFORE_OPTION = {"gates_penalty": "mean", "gates_order": "gate", "gates_streams": "gate"}
SCRATCH_LR = 0.1  # peak LR of the from-scratch training (cosine, SGD momentum 0.9, as CIFAR ResNets use)


def _floats(text: str | float | Sequence[float]) -> tuple[float, ...]:
    """``"0.5"`` or ``"0.5,1"`` (or numbers) -> a tuple of floats: one gate-learning run per value."""
    if isinstance(text, (int, float)):
        return (float(text),)
    if isinstance(text, str):
        try:
            values = tuple(float(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise InputError(f"{text!r} is not a number or a comma-separated list of numbers") from None
    else:
        values = tuple(float(v) for v in text)
    if not values:
        raise InputError("give at least one value")
    return values


@dataclass(frozen=True)
class Snapshot:
    """The gates after ``step`` steps, their mean absolute value and the gated network's validation
    objective (the task's metric; None when it was not scored, see :func:`learn_gates`). ``buffers``
    holds the model's buffers (batch-norm statistics) of a snapshot not scored yet, so that it can be
    scored later exactly as it stood."""

    step: int
    gates: dict[str, torch.Tensor]
    mean: float
    score: float | None
    buffers: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with fresh random weights: every layer's own reset, then the zoo's He initialisation
    for convolutions, batch norms and linear layers. Seeded, and the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()
        kaiming_init(model)
    return model


def learn_gates(
    model: nn.Module,
    gates: ChannelGates,
    task: Task,
    batches: Iterator,
    *,
    steps: int,
    lr: float,
    lam: float,
    r: float,
    snapshot_every: int,
    score: Any,
    amp: bool = False,
    tol: float | None = None,
    weights: torch.Tensor | None = None,
) -> list[Snapshot]:
    """Learn ``gates`` on the frozen ``model`` (Sec. 3.1) and return the snapshots taken: ``task.loss``
    (cross-entropy for a classifier) plus ``lam`` times the sparsity penalty.

    Only the gates are optimised (Adam); the model's parameters get no gradient. Batch norm runs in
    training mode (batch statistics), as when the weights themselves are trained. ``score(model)``
    scores the gated model for a snapshot (a validation pass).

    With ``tol``, only the snapshots that :func:`choose` can pick are scored: those whose mean |gate|
    reached ``r + tol``, or, when none does, the sparsest one, scored after learning from its gates and
    batch-norm statistics (the weights never move, so it scores as it would have). The others keep
    ``score`` None. Without ``tol`` every snapshot is scored.

    ``weights`` (one per gate, mean 1) weigh the regulariser's mean and each snapshot's ``mean``
    (:func:`autoprune.pruning.gates.gate_mean`).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(gates.parameters(), lr=lr)
    device = gates.gates[0].device
    if weights is not None:
        weights = weights.to(device)
    snapshots = []

    def snap(step: int) -> None:
        with torch.no_grad():
            mean = float(gate_mean(gates.vector(), weights))
        if tol is None or mean <= r + tol:
            value, buffers = score(model), None
            model.train()
        else:  # not a candidate once any snapshot reaches r: a validation pass saved
            value, buffers = None, {k: b.detach().clone() for k, b in model.named_buffers()}
        snapshots.append(Snapshot(step, gates.as_dict(), mean, value, buffers))

    model.train()
    for step, batch in zip(range(1, steps + 1), batches):
        with autocast(device, amp):
            loss = task.loss(task.forward(model, batch), batch).float()
        loss = loss + lam * sparsity_penalty(gates.vector(), r, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        gates.clamp_()
        if step % snapshot_every == 0 or step == steps:
            snap(step)
    if snapshots and all(s.score is None for s in snapshots):  # none reached r: choose takes the sparsest
        i = min(range(len(snapshots)), key=lambda j: (snapshots[j].mean, -snapshots[j].step))
        chosen = snapshots[i]
        gates.load_(chosen.gates)
        current = dict(model.named_buffers())
        with torch.no_grad():
            for k, b in chosen.buffers.items():
                current[k].copy_(b)
        snapshots[i] = dataclasses.replace(chosen, score=score(model), buffers=None)
        model.train()
    return snapshots


def choose(snapshots: list[Snapshot], r: float, tol: float, sign: float = 1.0) -> tuple[Snapshot, bool]:
    """The best-scoring snapshot (``sign`` -1 for a minimised objective) whose mean |gate| reached ``r``
    (within ``tol``; later wins a tie), and whether any did; if none did, the sparsest one."""
    reached = [s for s in snapshots if s.mean <= r + tol]
    if reached:
        return max(reached, key=lambda s: (sign * s.score, s.step)), True
    return min(snapshots, key=lambda s: (s.mean, -s.step)), False


@register
class GatesAgent(Agent):
    """Pruning from Scratch: channel gates learned on random (or trained) frozen weights under a
    sparsity regulariser, one global threshold bisected to the budget, the largest gates kept."""

    name = "gates"
    description = "Pruning from Scratch: gates learned on frozen random weights, thresholded to the budget"
    default_trials = 10
    channel_only = True  # the gates rank channels, and the structure keeps whole channels
    options = {
        "lambda": Option(_floats, 0.5, "weight of the sparsity regulariser (comma-separated: one run each)",
                         low=0.0, metavar="X[,X...]", accepts="give numbers >= 0, separated by commas"),
        "r": Option(_floats, 0.2, "target mean gate r (comma-separated: one run each)", low=0.0, high=1.0,
                    metavar="X[,X...]", accepts="give numbers in [0, 1], separated by commas"),
        "steps": Option(int, 300, "gate-learning steps per run", low=1),
        "lr": Option(float, 0.01, "Adam learning rate of the gates", low=0.0, low_open=True),
        "penalty": Option(str, "mean", "the regulariser's mean over the gates: plain (mean, Eq. 2), or each gate "
                          "weighted by the FLOPs one channel of its group costs (flops), so that costly channels "
                          "are pushed towards zero harder", choices=("mean", "flops")),
        "order": Option(str, "gate", "the global order the threshold walks: by gate (gate, Sec. 3.2), or by gate "
                        "divided by what one channel of its group costs in FLOPs (flops), so that the least gate "
                        "for the FLOPs goes first", choices=("gate", "flops")),
        "streams": Option(str, "keep", "the residual streams: left ungated and whole, the budget met by the other "
                          "groups, as the authors' code gates only the blocks' inner channels (keep), or gated like "
                          "every group, so that the threshold can prune them (gate)", choices=("keep", "gate")),
        "snapshot_every": Option(int, 25, "steps between gate snapshots", low=1),
        "sparsity_tol": Option(float, 0.05, "a snapshot has reached r when mean|g| <= r + this", low=0.0),
        "from": Option(str, "random", "weights the gates are learned on", choices=("random", "pretrained")),
        "keep": Option(str, "auto", "which channels the structure keeps: the largest gates, or the criterion's "
                       "choice on the trained weights (auto: gates when learned on the pretrained weights, "
                       "else the criterion)", choices=("auto", "gates", "criterion")),
        "train_from_scratch": Option(int, 0, "also train the chosen structure from fresh weights this many "
                                     "steps and record it as a trial (0: off)", low=0),
    }

    def search(self, ctx: SearchContext) -> SearchResult:
        lambdas, rs = getattr(self, "lambda"), self.r  # tuples, checked with the options
        ev = ctx.evaluator
        self.check_reachable(ctx)  # before any gate is learned
        runs: list[tuple[Policy, Evaluation, dict[str, Any]]] = []
        for i, (lam, r) in enumerate((lam, r) for lam in lambdas for r in rs):
            if ctx.should_stop():
                break
            settings = self.run_settings(ctx, lam, r, i)
            done = self.recorded_run(ctx, settings)
            if done is not None:  # a resumed search: this run was learned and recorded already
                runs.append(done)
                continue
            t0 = time.perf_counter()
            try:
                with fails_candidate(ev.device):
                    gates, snapshot, reached = self.learn(ctx, lam, r, run=i)
            except CandidateError as e:  # this run fails (a trial saying why); the next may fit
                ctx.fail(None, f"gates run {i}: {e}", params={"lambda": lam, "r": r},
                         distributions=_distributions(lam))
                continue
            ratios, keep = self.structure(ctx, gates)
            if self.keeps_gates():
                policy = ev.policy(ratios, criterion="gates", keep=keep)
            else:
                policy = ev.policy(ratios)
            info = {
                **settings, "gates_step": snapshot.step, "gates_mean": snapshot.mean,
                "gates_score": snapshot.score, "gates_reached_r": reached,
                "gates_seconds": time.perf_counter() - t0,
            }
            ctx.reporter.message(
                f"gates run {i}: lambda {lam:g}, r {r:g}: snapshot at step {snapshot.step}, "
                f"mean|g| {snapshot.mean:.3f}, gated {ctx.task.metric} {ctx.task.format(snapshot.score)}"
            )
            result = ctx.evaluate(policy, params={"lambda": lam, "r": r},
                                  distributions=_distributions(lam), extra=info)
            if result is not None:
                runs.append((policy, result, info))

        best = ctx.best()
        if not runs:
            best.info["failed"] = True
            return best
        sign = ctx.task.sign
        policy, result, info = max(runs, key=lambda t: (sign * t[1].score, -t[1].flops))
        best.info.update({k: v for k, v in info.items() if k != "gates_role"})
        if self.train_from_scratch > 0 and not ctx.should_stop():
            scratch = self.scratch(ctx, policy, info)
            best.info["scratch_score"] = scratch.score if scratch is not None else None
            best = _with_info(ctx.best(), best.info)
        return best

    def run_settings(self, ctx: SearchContext, lam: float, r: float, run: int) -> dict[str, Any]:
        """What decides a gate-learning run's outcome (recorded as trial attributes)."""
        return {
            "gates_role": "run", "gates_run": run, "gates_lambda": lam, "gates_r": r,
            "gates_from": getattr(self, "from"),
            "gates_keep": "gates" if self.keeps_gates() else ctx.evaluator.criterion,
            "gates_penalty": self.penalty, "gates_order": self.order, "gates_streams": self.streams,
            "gates_steps": self.steps, "gates_lr": self.lr, "gates_snapshot_every": self.snapshot_every,
            "gates_sparsity_tol": self.sparsity_tol, "gates_seed": ctx.seed + run,
        }

    def recorded_run(self, ctx: SearchContext, settings: dict[str, Any]
                     ) -> tuple[Policy, Evaluation, dict[str, Any]] | None:
        for trial in completed(ctx.study):
            a = trial.user_attrs
            if a.get("finetune_steps") == ctx.finetune_steps and all(
                    a.get(k, _BEFORE_OPTION.get(k)) == v for k, v in settings.items()):
                return policy_of(trial), evaluation_of(trial), {k: a[k] for k in a if k.startswith("gates_")}
        return None

    def keeps_gates(self) -> bool:
        """Whether the kept channels are the largest gates. Gates learned on random weights rank
        channels of the *random* network, which have no counterpart in the trained one the shared
        evaluator prunes and fine-tunes; there the structure (channels per group) is what they tell,
        and the criterion picks the channels (the paper retrains from scratch, where it does not matter)."""
        return self.keep == "gates" or (self.keep == "auto" and getattr(self, "from") == "pretrained")

    # -- step 2-3: gate learning --------------------------------------------------------------
    def learn(self, ctx: SearchContext, lam: float, r: float, run: int = 0
              ) -> tuple[dict[str, torch.Tensor], Snapshot, bool]:
        ev = ctx.evaluator
        model = copy.deepcopy(ev.model)
        if getattr(self, "from") == "random":
            reinitialise(model, ctx.seed + run)
        groups = self.gated(ev.space)
        gates = ChannelGates(ev.space, model, groups)
        snapshots = learn_gates(
            model, gates, ctx.task, ctx.task.train_batches(ctx.seed + run), steps=self.steps, lr=self.lr, lam=lam,
            r=r, snapshot_every=self.snapshot_every, score=lambda m: ev.metrics_of(m, "val")[ev.metric],
            amp=ev.amp, tol=self.sparsity_tol,
            weights=flops_weights(ev.space, groups) if self.penalty == "flops" else None,
        )
        gates.remove()
        snapshot, reached = choose(snapshots, r, self.sparsity_tol, ctx.task.sign)
        return snapshot.gates, snapshot, reached

    def gated(self, space: Space) -> list[str] | None:
        """The groups that get gates: all (None), or with ``streams`` "keep" every group but the
        residual streams."""
        if self.streams == "gate":
            return None
        streams = set(residual_streams(space))
        groups = [n for n in space.names if n not in streams]
        if not groups:
            raise InputError("every prunable group is a residual stream, so with streams 'keep' nothing is "
                             "left to gate; use streams 'gate'")
        return groups

    def check_reachable(self, ctx: SearchContext) -> None:
        """Refuse a budget that the gated groups cannot meet alone, with the streams whole."""
        groups = self.gated(ctx.evaluator.space)
        if groups is not None:
            most = {**dict.fromkeys(ctx.evaluator.space.names, 0.0), **dict.fromkeys(groups, ctx.budgets.max_ratio)}
            if not ctx.budgets.fits(most):
                self.unreachable(ctx, most)

    def unreachable(self, ctx: SearchContext, most: dict[str, float]) -> NoReturn:
        ctx.budgets.unreachable(
            f"removing {ctx.budgets.max_ratio:.0%} of every group but the residual streams, which streams 'keep' "
            f"leaves whole (streams 'gate' lets the threshold prune them)", most)

    # -- step 4: one global threshold ---------------------------------------------------------
    def structure(self, ctx: SearchContext, gates: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, float], dict[str, list[int]]]:
        """Per-group ratios and kept channels; the groups without gates (kept streams) stay whole."""
        budgets = ctx.budgets
        whole = {n: 0.0 for n in ctx.evaluator.space.names if n not in gates}
        try:
            weights = channel_flops(ctx.evaluator.space) if self.order == "flops" else None
            # the refill costs one fits per removed channel: a timing each under a latency budget
            ratios, keep = threshold_structure(gates, lambda r: budgets.fits({**whole, **r}), budgets.max_ratio,
                                               weights, refill=not budgets.latency)
        except ValueError:
            if not whole:
                budgets.unreachable()
            self.unreachable(ctx, {**whole, **dict.fromkeys(gates, budgets.max_ratio)})
        return {**whole, **ratios}, keep

    # -- step 5 (optional): the pruned architecture trained from scratch ----------------------
    @classmethod
    def rebuild(cls, evaluator: Any, policy: Policy, finetune_steps: int) -> nn.Module:
        """A policy trained from scratch (``search.gates_scratch``) is trained from fresh weights again with
        the recorded steps, LR and seed; any other is the shared evaluator's."""
        scratch = policy.search.get("gates_scratch")
        if not scratch:
            return super().rebuild(evaluator, policy, finetune_steps)
        # fresh weights replace every weight: a least-squares refit would be thrown away
        model = reinitialise(evaluator.pruner.prune(dataclasses.replace(policy, reconstruct=False)),
                             int(scratch["seed"]))
        task = evaluator.task
        train_steps(model, task, task.train_batches(int(scratch["seed"])), int(scratch["steps"]),
                    float(scratch["lr"]), amp=evaluator.amp)
        return model.eval()

    def scratch(self, ctx: SearchContext, policy: Policy, info: dict[str, Any]) -> Evaluation | None:
        """The chosen structure trained from fresh weights and recorded as a trial (None: it failed, and
        the failed trial says why)."""
        ev = ctx.evaluator
        for trial in completed(ctx.study):  # a resumed search: trained and recorded already
            a = trial.user_attrs
            if (a.get("gates_role") == "scratch" and a.get("scratch_steps") == self.train_from_scratch
                    and policy_of(trial).key() == policy.key()):
                return evaluation_of(trial)
        t0 = time.perf_counter()
        policy = Policy(dict(policy.ratios), granularity=policy.granularity, criterion=policy.criterion,
                        model=dict(policy.model), keep=policy.keep, reconstruct=policy.reconstruct,
                        search={**policy.search, "gates_scratch": {"steps": self.train_from_scratch,
                                                                    "lr": SCRATCH_LR, "seed": ctx.seed}})
        params = {"lambda": info["gates_lambda"], "r": info["gates_r"]}
        try:
            with fails_candidate(ev.device):
                model = self.rebuild(ev, policy, ctx.finetune_steps)
                result = ev.measure(model, "val", self.train_from_scratch, t0)
        except CandidateError as e:
            ctx.fail(policy, f"gates from scratch: {e}", params=params,
                     distributions=_distributions(info["gates_lambda"]))
            return None
        extra = {**info, "gates_role": "scratch", "trained_from_scratch": True,
                 "scratch_steps": self.train_from_scratch, "scratch_lr": SCRATCH_LR}
        return ctx.record(policy, result, params=params, distributions=_distributions(info["gates_lambda"]),
                          extra=extra)


def _distributions(lam: float) -> dict[str, FloatDistribution]:
    return {"lambda": FloatDistribution(0.0, max(10.0, lam)), "r": FloatDistribution(0.0, 1.0)}


def _with_info(result: SearchResult, info: dict[str, Any]) -> SearchResult:
    result.info.update(info)
    return result
