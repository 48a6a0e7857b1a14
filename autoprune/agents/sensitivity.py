"""Sensitivity scan: prune one group at a time, then one global threshold on the accuracy drop.

The per-layer sensitivity analysis of Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017)
and of the course notes: every prunable group is pruned *alone* at each scanned ratio (0.1 ... 0.9 by
default); the shared evaluator recalibrates the pruned model's batch norm (adaptive BN), fine-tunes
it ``probe_steps`` steps (none by default) and scores it on the validation split; the probe's
*accuracy drop* is the unpruned model's validation accuracy minus that score. Then:

1. *Curves.* Per group, the drop at ratio 0 is 0 and every scanned drop is raised to the largest drop
   at a smaller ratio (a monotone envelope: removing more never counts as hurting less, and a drop
   below zero counts as zero). A probe that failed (e.g. a diverging fine-tune) counts as losing all
   of the accuracy; the next search measures it again.
2. *Ratios from one threshold.* Each group gets the largest ratio whose drop is at most the threshold
   ``t``, read linearly between scanned ratios (so that a group may land between two scanned ratios
   and the budget can be met tightly); a group whose drops all stay at or below ``t`` gets the largest
   scanned ratio. Flat stretches of a curve are common (a validation split of N images moves the
   accuracy in steps of 1/N) and would make every group on a plateau at the threshold's level jump to
   its end at once, overshooting the budget by far; so the curves rise by ``PLATEAU_SLOPE`` (1e-6,
   below any accuracy step) per unit of ratio, and groups level at the threshold go along their
   plateaus together, to the same ratio, as far as the budget needs.
3. *The threshold.* The ratios grow with ``t``, so the cost falls as ``t`` grows: the smallest ``t``
   whose ratios meet every budget (predicted FLOPs and params, measured latency under a latency
   budget) is found by bisection.
4. *The final policy* is scored with the search's ``--finetune-steps`` and recorded in the search's
   study, which holds nothing else: ``autoprune export`` gives a final policy, never a probe.

The scan is a profile that is saved and reused (as Model Optimizer's FastNAS saves its sensitivity
checkpoint): its probes are the trials of a study of their own in the same storage, named
``<model>-<dataset>-sensitivity-scan-<hash>``, where the hash covers what a probe's accuracy depends
on (:func:`scan_identity`): the model's weights, the dataset and its splits, the criterion and the
granularity, ``probe_steps``, the evaluator's recalibration settings and seed (and its fine-tune
settings when probes are fine-tuned). Not the budget: a search at another budget runs no probe.
Not the list of ratios either: a probe is one (group, ratio) pair whatever list it came from, so a
scan over other ratios measures only the pairs not yet recorded. Each probe trial has params
``group`` and ``ratio`` and the usual user attributes (accuracy, flops, policy JSON, ...). The
search's study names its scan in the user attribute ``sensitivity_scan``, and ``sensitivity`` holds
the threshold, the scanned ratios and the chosen ratios (``autoprune report`` plots them over the
curves).

Several processes share the probes (``autoprune worker``): a process claims a probe before measuring
it, as a RUNNING trial of the scan study (:func:`autoprune.study.claim`) that the probe's record then
finishes. Others skip claimed probes; when two processes claim one probe at the same moment the lower
trial number keeps it. A claim whose process is gone is failed and taken over (on the same machine:
its process has ended; on another machine: it is older than ``stale_after`` seconds), so an
interrupted or killed scan resumes with the missing probes only. The final policy is claimed in the
same way in the search's study, so that it is scored once.

``--trials`` is not used: the scan has (groups x ratios) probes and the search one final policy.
``--timeout`` stops the scan between probes; the same command resumes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import optuna
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from autoprune.agents.base import Agent, Option, Reporter, SearchContext, SearchResult, register
from autoprune.errors import InputError
from autoprune.evaluator import Evaluation, Evaluator
from autoprune.policy import Policy
from autoprune.study import (
    RATIO_DISTRIBUTION,
    claim,
    open_study,
    record_failure,
    set_study_info,
    storage_of,
    study_name,
)

DEFAULT_RATIOS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"
POLL_SECONDS = 1.0  # how often a process waiting for other processes' probes looks again
PLATEAU_SLOPE = 1e-6  # drop added per unit of ratio, so that flat stretches are crossed gradually (step 2)

Curve = list[tuple[float, float]]  # (ratio removed, accuracy drop) from (0, 0) up, drops non-decreasing


def parse_ratios(value: str | Iterable[float]) -> tuple[float, ...]:
    """``"0.1,0.3,0.5"`` (or numbers) -> the distinct fractions removed, sorted, each in (0, 1)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        ratios = sorted({round(float(v), 6) for v in items if str(v).strip()})
    except (TypeError, ValueError):
        ratios = []
    if not ratios or not all(0.0 < r < 1.0 for r in ratios):
        raise InputError(f"--sensitivity-ratios {value!r}: give fractions removed in (0, 1), separated by "
                         f"commas, e.g. {DEFAULT_RATIOS}")
    return tuple(ratios)


# -- curves and the threshold ------------------------------------------------------------------


def monotone(drops: Mapping[float, float], slope: float = 0.0) -> Curve:
    """The curve of one group: (0, 0), then each scanned ratio with the largest drop seen up to it,
    plus ``slope`` per unit of ratio (the search uses ``PLATEAU_SLOPE``)."""
    curve = [(0.0, 0.0)]
    top = 0.0
    for r in sorted(drops):
        top = max(top, drops[r])
        curve.append((r, top + slope * r))
    return curve


def ratio_at(curve: Curve, threshold: float) -> float:
    """The largest ratio whose drop is at most ``threshold`` (>= 0), linear between scanned points."""
    for (r0, d0), (r1, d1) in zip(curve, curve[1:]):
        if d1 > threshold:  # d0 <= threshold < d1
            return r0 + (r1 - r0) * (threshold - d0) / (d1 - d0)
    return curve[-1][0]


def ratios_at(curves: Mapping[str, Curve], threshold: float) -> dict[str, float]:
    return {group: ratio_at(curve, threshold) for group, curve in curves.items()}


def bisect_threshold(curves: Mapping[str, Curve], fits: Callable[[dict[str, float]], bool],
                     tol: float = 1e-9) -> float | None:
    """The smallest threshold whose ratios ``fits`` (monotone in the threshold) accepts, to ``tol``;
    None when even every group's largest scanned ratio does not fit."""
    if fits(ratios_at(curves, 0.0)):
        return 0.0
    hi = max(curve[-1][1] for curve in curves.values())
    if not fits(ratios_at(curves, hi)):
        return None
    lo = 0.0  # does not fit; hi fits
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if fits(ratios_at(curves, mid)):
            hi = mid
        else:
            lo = mid
    return hi


# -- the scan study ----------------------------------------------------------------------------


def weights_fingerprint(model: nn.Module) -> str:
    """A digest of the model's state dict: the same weights give the same scan, wherever they were loaded
    from; retrained weights give another."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def scan_identity(evaluator: Evaluator, probe_steps: int) -> dict[str, Any]:
    """What a probe's accuracy depends on. Its hash names the scan study; anything else (the budget,
    ``--max-ratio``, ``--ignore``, the scanned ratio list, the device) may change and the scan is reused."""
    ev = evaluator
    sample = ev.policy({})  # the criterion and granularity the search's policies get
    identity: dict[str, Any] = {
        "model": ev.model_info.get("name", type(ev.model).__name__),
        "weights": weights_fingerprint(ev.model),
        "dataset": ev.data.name,
        "data_root": ev.model_info.get("data_root"),
        "splits": [len(ev.data.train), len(ev.data.val)],
        "criterion": sample.criterion,
        "granularity": sample.granularity,
        "probe_steps": int(probe_steps),
        "bn_batches": ev.bn_batches,
        "batch_size": ev.batch_size,
        "seed": ev.seed,  # the recalibration (and fine-tune) batches
        "amp": ev.amp,
    }
    if probe_steps > 0:
        identity.update(finetune_lr=ev.finetune_lr, distill=ev.distill, temperature=ev.temperature)
    return identity


def scan_name(identity: Mapping[str, Any]) -> str:
    """``<model>-<dataset>-sensitivity-scan-<hash of the identity>``."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return study_name(identity["model"], identity["dataset"], "sensitivity", f"scan-{digest}")


def scan_drops(scan: optuna.Study, baseline: float | None = None) -> dict[str, dict[float, float]]:
    """The accuracy drop of every recorded probe, ``{group: {ratio: drop}}``, against ``baseline``
    (default: the unpruned accuracy the scan study recorded)."""
    if baseline is None:
        baseline = scan.user_attrs["base"]["accuracy"]
    drops: dict[str, dict[float, float]] = {}
    for t in scan.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "group" in t.params and "ratio" in t.params:
            drops.setdefault(t.params["group"], {})[round(t.params["ratio"], 6)] = baseline - t.user_attrs["accuracy"]
    return drops


# -- sharing candidates between processes --------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class _Claims:
    """Which candidates of a study shared between processes are measured, and which are being measured.

    A claim is a RUNNING trial (:func:`autoprune.study.claim`) with a ``claim_key`` naming the candidate
    and user attributes naming its owner: host, pid, a token per search and the time it was made.
    """

    def __init__(self, study: optuna.Study, agent: str, stale_after: float, token: str) -> None:
        self.study = study
        self.agent = agent
        self.stale_after = stale_after
        self.token = token
        self.host = socket.gethostname()

    def state(self) -> tuple[set[str], dict[str, int]]:
        """The keys measured (a COMPLETE trial) and those a live process has claimed (-> claim number).
        Abandoned claims are failed on the way, so that their candidates can be claimed again."""
        done: set[str] = set()
        running: dict[str, int] = {}
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            key = t.user_attrs.get("claim_key")
            if key is None:
                continue
            if t.state == TrialState.COMPLETE:
                done.add(key)
                continue
            why = self.abandoned(t)
            if why is None:
                running[key] = min(running.get(key, t.number), t.number)
                continue
            try:
                record_failure(self.study, None, f"claim abandoned: {why}", agent=self.agent, claim=t.number)
            except UpdateFinishedTrialError:  # its owner, or another process, finished it meanwhile
                pass
        return done, running

    def abandoned(self, t: FrozenTrial) -> str | None:
        """Why the claim ``t`` is abandoned, or None while its process may still be measuring it. Never
        called on the claim this process holds: any other claim of this process is left over."""
        a = t.user_attrs
        if a.get("claim_host") == self.host:
            pid = a.get("claim_pid")
            if pid == os.getpid():
                return "made by an earlier search of this process"
            if not isinstance(pid, int) or not _alive(pid):
                return f"process {pid} on {self.host} has ended"
        age = time.time() - float(a.get("claim_time", 0.0))  # elsewhere, or a pid the system gave again
        if age > self.stale_after:
            return f"unfinished after {age:.0f} s on {a.get('claim_host')}"
        return None

    def take(self, key: str, params: Mapping[str, Any], distributions: Mapping[str, Any]) -> int | None:
        """Claim ``key`` and return the claim's trial number; None when another process holds it (the
        lower claim number wins when two claim at once; the losing claim is failed)."""
        owner = {"agent": self.agent, "claim_host": self.host, "claim_pid": os.getpid(),
                 "claim_token": self.token, "claim_time": time.time()}
        number = claim(self.study, key, params=params, distributions=distributions, user_attrs=owner)
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
            if t.user_attrs.get("claim_key") != key or t.number == number:
                continue
            if t.state == TrialState.COMPLETE or (t.number < number and self.abandoned(t) is None):
                record_failure(self.study, None, f"claimed twice: trial {t.number} measures it", agent=self.agent,
                               claim=number)
                return None
        return number


class _ProbeReporter(Reporter):
    """Progress of the probes: their accuracy, with no "best feasible" (a probe is no candidate)."""

    def __init__(self, inner: Reporter) -> None:
        self.inner = inner

    def advance(self, result: Evaluation | None, feasible: bool, best: float | None) -> None:
        self.inner.advance(result, True, None)

    def message(self, text: str) -> None:
        self.inner.message(text)


def _out_of_time(ctx: SearchContext) -> bool:
    return ctx.timeout is not None and time.monotonic() - ctx.started >= ctx.timeout


@register
class SensitivityAgent(Agent):
    """Per-group sensitivity scan (one group pruned at a time, each scanned ratio), then every group's
    ratio from one global threshold on the accuracy drop, bisected to the budget. The scan is kept in a
    study of its own and reused by searches at other budgets; workers share its probes.

    Options (``--sensitivity-<option>`` on the command line)
    ---------------------------------------------------------
    ratios: the fractions removed that each group is probed at, comma separated (0.1 ... 0.9); those
        above ``--max-ratio`` are left out.
    probe_steps: fine-tune steps of every probe (0: adaptive BN only, as the course notes' scan).
    stale_after: seconds after which a probe (or the final policy) claimed by a process on another
        machine, still unfinished, is taken over (3600); claims of ended processes on this machine are
        taken over at once.
    """

    name = "sensitivity"
    description = "per-group sensitivity scan (kept and reused across budgets), one accuracy-drop threshold " \
                  "bisected to the budget"
    default_trials = 1  # the final policy; the probes are trials of the scan study
    parallel = True
    options = {
        "ratios": Option(str, DEFAULT_RATIOS, "fractions removed that each group is probed at, comma separated"),
        "probe_steps": Option(int, 0, "fine-tune steps of every probe (0: adaptive BN only)"),
        "stale_after": Option(float, 3600.0, "seconds after which an unfinished probe (or final policy) "
                              "claimed by a process on another machine is taken over"),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.ratios = parse_ratios(self.ratios)
        if self.probe_steps < 0:
            raise InputError(f"--sensitivity-probe-steps must be >= 0, got {self.probe_steps}")

    def search(self, ctx: SearchContext) -> SearchResult:
        ev = ctx.evaluator
        names = ev.space.names
        ratios = [r for r in self.ratios if r <= ctx.max_ratio + 1e-9]
        if not ratios:
            raise InputError(f"--sensitivity-ratios: every ratio is above --max-ratio {ctx.max_ratio}")
        if len(ratios) < len(self.ratios):
            ctx.reporter.message(f"scanning the ratios up to --max-ratio {ctx.max_ratio}: {ratios}")
        if not names or not ctx.fits(dict.fromkeys(names, ratios[-1])):
            self.unreachable(ctx, ratios[-1])  # before scanning anything
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        baseline = ev.baseline("val").accuracy
        scan = self.open_scan(ctx, baseline)
        ctx.study.set_user_attr("sensitivity_scan", scan.study_name)
        info: dict[str, Any] = {"scan": scan.study_name, "probes": len(names) * len(ratios)}

        complete, measured, failed = self.run_scan(ctx, scan, names, ratios, token)
        info.update(scan_complete=complete, probes_measured=measured, failed_probes=sorted(failed))
        if not complete:
            ctx.reporter.message(f"time is up with the scan {scan.study_name} unfinished; run the same command "
                                 "again to resume it")
            best = ctx.best()
            best.info.update(info)
            return best

        drops = scan_drops(scan, baseline)
        curves = {g: monotone({r: drops.get(g, {}).get(r, baseline) for r in ratios}, PLATEAU_SLOPE)
                  for g in names}
        threshold = bisect_threshold(curves, ctx.fits)
        if threshold is None:  # only a noisy latency measurement can turn the check above around
            self.unreachable(ctx, ratios[-1])
        chosen = ratios_at(curves, threshold)
        set_study_info(ctx.study, sensitivity={"threshold": threshold, "scan_ratios": ratios,
                                               "probe_steps": self.probe_steps, "baseline_accuracy": baseline,
                                               "ratios": chosen})
        kept = ev.cost(chosen, latency=False)["flops"] / ctx.base["flops"]
        ctx.reporter.message(f"threshold: accuracy drop {threshold:.2%}, FLOPs {kept:.1%} of the unpruned model")
        policy = ev.policy(chosen, search={"sensitivity": {"scan": scan.study_name, "threshold": threshold,
                                                           "scan_ratios": ratios, "probe_steps": self.probe_steps}})
        self.score_final(ctx, policy, threshold, scan.study_name, token)
        best = ctx.best()
        best.info.update(info, threshold=threshold, ratios=chosen)
        return best

    @staticmethod
    def unreachable(ctx: SearchContext, largest: float) -> None:
        if largest >= ctx.max_ratio - 1e-9 or not ctx.evaluator.space.names:
            ctx.unreachable()
        raise InputError(f"budget cannot be met by removing {largest:.0%} of every group, the largest scanned "
                         f"ratio; scan larger ones with --sensitivity-ratios (up to --max-ratio {ctx.max_ratio})")

    def open_scan(self, ctx: SearchContext, baseline: float) -> optuna.Study:
        """The scan study for this model and these probe settings, created on first use."""
        identity = scan_identity(ctx.evaluator, self.probe_steps)
        scan = open_study(scan_name(identity), storage_of(ctx.study))
        if "sensitivity_identity" not in scan.user_attrs:
            set_study_info(scan, sensitivity_identity=identity, model=ctx.evaluator.model_info,
                           base={"flops": ctx.base["flops"], "params": ctx.base["params"], "accuracy": baseline})
        return scan

    def run_scan(self, ctx: SearchContext, scan: optuna.Study, names: list[str], ratios: list[float],
                 token: str) -> tuple[bool, int, set[str]]:
        """Measure the probes the scan study lacks, sharing them with other processes; wait for those others
        are measuring. Returns (complete, probes measured here, probes that failed here)."""
        ev = ctx.evaluator
        plan = {f"{g}@{r}": (g, r) for g in names for r in ratios}
        distributions = {"group": CategoricalDistribution([g.name for g in ev.space.groups]),
                         "ratio": FloatDistribution(0.0, 1.0)}
        claims = _Claims(scan, self.name, self.stale_after, token)
        probes = SearchContext(ev, [], scan, self.name, seed=ctx.seed, finetune_steps=self.probe_steps,
                               max_ratio=ctx.max_ratio, reporter=_ProbeReporter(ctx.reporter))
        done, _ = claims.state()
        missing = sum(key not in done for key in plan)
        if not missing:
            ctx.reporter.message(f"sensitivity scan {scan.study_name}: all {len(plan)} probes recorded, reused")
            return True, 0, set()
        ctx.reporter.message(f"sensitivity scan {scan.study_name}: {missing} of {len(plan)} probes to measure")
        ctx.reporter.stop()
        ctx.reporter.start(len(plan), len(plan) - missing)
        tried: set[str] = set()  # a probe that failed here is not retried by this run
        waiting = False
        try:
            while True:
                done, running = claims.state()
                left = [key for key in plan if key not in done and key not in tried]
                if not left:
                    return True, probes.evaluated, tried - done
                if _out_of_time(ctx):
                    return False, probes.evaluated, tried - done
                free = [key for key in left if key not in running]
                if not free:
                    if not waiting:
                        ctx.reporter.message(f"waiting for {len(left)} probe(s) other processes are measuring")
                        waiting = True
                    time.sleep(POLL_SECONDS)
                    continue
                group, ratio = plan[free[0]]
                number = claims.take(free[0], {"group": group, "ratio": ratio}, distributions)
                if number is None:
                    continue
                tried.add(free[0])
                try:
                    probes.evaluate(ev.policy({group: ratio}), claim=number)
                except UpdateFinishedTrialError:
                    ctx.reporter.message(f"probe {free[0]} was taken over by another process")
        finally:
            ctx.reporter.stop()
            ctx.reporter.start(ctx.n_trials, ctx.trials_done)

    def score_final(self, ctx: SearchContext, policy: Policy, threshold: float, scan: str, token: str) -> None:
        """Score the final policy once among all the processes of the search: the first to claim it does,
        the others wait for it (up to ``--timeout``)."""
        claims = _Claims(ctx.study, self.name, self.stale_after, token)
        key = "final:" + hashlib.sha256(json.dumps([policy.key(), ctx.finetune_steps]).encode()).hexdigest()[:16]
        waiting = False
        while True:
            done, running = claims.state()
            if key in done:
                return
            if key not in running:
                number = claims.take(key, dict(policy.ratios), dict.fromkeys(policy.ratios, RATIO_DISTRIBUTION))
                if number is None:
                    continue
                try:
                    ctx.evaluate(policy, claim=number,
                                 extra={"sensitivity_threshold": threshold, "sensitivity_scan": scan})
                except UpdateFinishedTrialError:
                    ctx.reporter.message("the final policy was taken over by another process")
                return
            if _out_of_time(ctx):
                return
            if not waiting:
                ctx.reporter.message("waiting for the final policy another process is scoring")
                waiting = True
            time.sleep(POLL_SECONDS)
