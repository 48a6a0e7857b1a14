"""Sensitivity scan: prune one group at a time, then one global threshold on the accuracy drop.

The per-layer sensitivity analysis of Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017)
and of the course notes: every prunable group is pruned *alone* at each scanned ratio (0.2, 0.4, 0.6, 0.8,
0.9 by default); the shared evaluator recalibrates the pruned model's batch norm (adaptive BN), fine-tunes
it ``probe_steps`` steps (none by default) and scores it on the validation split; the probe's
*accuracy drop* is the unpruned model's validation accuracy minus that score. Then:

1. *Curves.* Per group, the drop at ratio 0 is 0 and every scanned drop is raised to the largest drop
   at a smaller ratio (a monotone envelope: removing more never counts as hurting less, and a drop
   below zero counts as zero). The drop is how much worse the probe's objective is than the unpruned
   model's (:meth:`autoprune.task.Task.shortfall`: accuracy lost, or loss gained). A probe that failed
   (e.g. a diverging fine-tune) counts as losing as much as the objective itself (all of the
   accuracy), or the largest drop measured when that is more; the next search measures it again.
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

Several processes share the probes (``autoprune worker``) through the scan study's queue: the probes
not yet recorded are queued (``study.enqueue_trial``) and every process measures queued probes in turn
(``study.optimize``), so a probe is measured once. A database storage keeps a heartbeat of each running
probe: one whose process died is failed and queued again (Optuna's ``RetryHeartbeatStaleTrialCallback``), so an
interrupted or killed scan resumes with the missing probes only. The final policy is queued in the same
way in the search's study, so that it is scored once.

``--trials`` is not used: the scan has (groups x ratios) probes and the search one final policy.
``--timeout`` stops the scan between probes; the same command resumes it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import optuna
from optuna.trial import TrialState

from autoprune.agents.base import Agent, Option, SearchContext, SearchResult, register
from autoprune.budget import bisect
from autoprune.errors import CandidateError, InputError, ParameterError
from autoprune.evaluator import Evaluator
from autoprune.models.checkpoint import fingerprint
from autoprune.policy import Policy
from autoprune.study import has_waiting, open_study, queued_state, sampling_with, set_study_info, study_name

DEFAULT_RATIOS = "0.2,0.4,0.6,0.8,0.9"  # benchmarks/quality.py: 0.9 lets a tight budget go past 0.8 where it is cheap
POLL_SECONDS = 1.0  # how often a process waiting for other processes' probes looks again
RATIO_DIGITS = 6  # ratios are compared rounded to this many digits
ALLOCATIONS = ("threshold", "resource")
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


def drop_at(curve: Curve, ratio: float) -> float:
    """The curve's drop at ``ratio``, linear between scanned points (the last drop beyond them)."""
    for (r0, d0), (r1, d1) in zip(curve, curve[1:]):
        if ratio <= r1:
            return d0 + (d1 - d0) * (ratio - r0) / (r1 - r0) if r1 > r0 else d1
    return curve[-1][1]


def allocate(curves: Mapping[str, Curve], fits: Callable[[dict[str, float]], bool],
             resource: Callable[[dict[str, float]], float]) -> dict[str, float] | None:
    """Ratios that meet the budget while losing the least in all, the curves read as additive drops: the
    greedy of a knapsack. From no pruning, every step moves the one group, to whichever of its larger
    scanned ratios, that adds the least drop per unit of ``resource`` (FLOPs, say) saved; the last step
    is cut short (bisected) so that the budget is met tightly. Where the threshold rule gives every group
    the same drop, this one equalises the drop *per resource saved*, so a group that is cheap to keep
    (few FLOPs per channel) keeps more. None when even the largest ratios do not fit."""
    current = {g: 0.0 for g in curves}
    if fits(current):
        return current
    if not fits({g: c[-1][0] for g, c in curves.items()}):
        return None
    spent = {g: 0.0 for g in curves}  # the drop each group's current ratio costs
    while True:
        now = resource(current)
        best: tuple[float, float, str, float] | None = None
        for g, curve in curves.items():
            for r, d in curve[1:]:
                if r <= current[g] + 1e-12:
                    continue
                saved = now - resource({**current, g: r})
                if saved <= 0:
                    continue
                key = (max(d - spent[g], 0.0) / saved, -saved)
                if best is None or key < best[:2]:
                    best = (key[0], key[1], g, r)
        if best is None:
            return None
        _, _, g, r = best
        step = {**current, g: r}
        if fits(step):
            chosen = bisect(lambda x, base=dict(current), group=g: fits({**base, group: x}), current[g], r,
                            tol=1e-6)
            return {**current, g: chosen}
        current, spent[g] = step, drop_at(curves[g], r)


def bisect_threshold(curves: Mapping[str, Curve], fits: Callable[[dict[str, float]], bool],
                     tol: float = 1e-9) -> float | None:
    """The smallest threshold whose ratios ``fits`` (monotone in the threshold) accepts, to ``tol``;
    None when even every group's largest scanned ratio does not fit."""
    if fits(ratios_at(curves, 0.0)):
        return 0.0
    hi = max(curve[-1][1] for curve in curves.values())
    if not fits(ratios_at(curves, hi)):
        return None
    return bisect(lambda t: fits(ratios_at(curves, t)), 0.0, hi, tol=tol)


# -- the scan study ----------------------------------------------------------------------------


def scan_identity(evaluator: Evaluator, probe_steps: int) -> dict[str, Any]:
    """What a probe's score depends on. Its hash names the scan study; anything else (the budget,
    ``--max-ratio``, ``--ignore``, the scanned ratio list, the device) may change and the scan is reused."""
    ev = evaluator
    sample = ev.policy({})  # the criterion and granularity the search's policies get
    identity: dict[str, Any] = {
        "model": ev.model_info.get("name", type(ev.model).__name__),
        "weights": fingerprint(ev.model),
        "dataset": ev.task.name,
        "task": ev.task.identity(),
        "data_root": ev.model_info.get("data_root"),
        "criterion": sample.criterion,
        "granularity": sample.granularity,
        "probe_steps": int(probe_steps),
        "bn_batches": ev.bn_batches,
        "seed": ev.seed,  # the recalibration (and fine-tune) batches
        "amp": ev.amp,
    }
    if sample.reconstruct:  # only then, so that the scans recorded before the refit existed keep their names
        identity["reconstruct"] = True
    if probe_steps > 0:
        identity.update(finetune_lr=ev.finetune_lr, distill=ev.distill, temperature=ev.temperature)
        if ev.finetune_l1 > 0:  # only then, so that the scans of unpenalised searches keep their names
            identity.update(finetune_l1=ev.finetune_l1, finetune_penalty=ev.finetune_penalty)
    return identity


def scan_name(identity: Mapping[str, Any]) -> str:
    """``<model>-<dataset>-sensitivity-scan-<hash of the identity>``."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return study_name(identity["model"], identity["dataset"], "sensitivity", f"scan-{digest}")


def probe_key(params: Mapping[str, Any]) -> tuple[str, float]:
    """A probe's identity: its group and its ratio, rounded."""
    return str(params["group"]), round(float(params["ratio"]), RATIO_DIGITS)


def scan_drops(scan: optuna.Study, sign: float = 1.0, baseline: float | None = None) -> dict[str, dict[float, float]]:
    """The drop of every recorded probe, ``{group: {ratio: drop}}``: how much worse than ``baseline``
    (default: the unpruned model's score the scan study recorded) the probe scored, for an objective
    maximised (``sign`` +1) or minimised (-1)."""
    if baseline is None:
        baseline = scan.user_attrs["base"]["score"]
    drops: dict[str, dict[float, float]] = {}
    for t in scan.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "group" in t.params and "ratio" in t.params and "score" in t.user_attrs:
            group, ratio = probe_key(t.params)
            drops.setdefault(group, {})[ratio] = sign * (baseline - t.user_attrs["score"])
    return drops


@register
class SensitivityAgent(Agent):
    """Per-group sensitivity scan (one group pruned at a time, each scanned ratio), then every group's
    ratio from one global threshold on the accuracy drop, bisected to the budget. The scan is kept in a
    study of its own and reused by searches at other budgets; workers share its probes.

    Options (``--sensitivity-<option>`` on the command line)
    ---------------------------------------------------------
    ratios: the fractions removed that each group is probed at, comma separated (0.2, 0.4, 0.6, 0.8, 0.9); those
        above ``--max-ratio`` are left out.
    probe_steps: fine-tune steps of every probe (0: adaptive BN only, as the course notes' scan).
    """

    name = "sensitivity"
    description = "per-group sensitivity scan (kept and reused across budgets), one accuracy-drop threshold " \
                  "bisected to the budget"
    default_trials = 1  # the final policy; the probes are trials of the scan study
    parallel = True
    options = {
        "ratios": Option(parse_ratios, DEFAULT_RATIOS, "fractions removed that each group is probed at, comma "
                         "separated", metavar="R[,R...]",
                         accepts=f"give fractions removed in (0, 1), separated by commas, e.g. {DEFAULT_RATIOS}"),
        "probe_steps": Option(int, 0, "fine-tune steps of every probe (0: adaptive BN only)", low=0),
        "allocation": Option(str, "threshold", "threshold: every group pruned up to one common drop; resource: "
                             "the least drop per resource saved (a greedy knapsack over the curves)",
                             choices=ALLOCATIONS),
    }

    def search(self, ctx: SearchContext) -> SearchResult:
        ev, task = ctx.evaluator, ctx.task
        names = ev.space.names
        max_ratio = ctx.budgets.max_ratio
        ratios = [r for r in self.ratios if r <= max_ratio + 1e-9]
        if not ratios:
            raise ParameterError("ratios", ",".join(map(str, self.ratios)),
                                 f"every ratio is above max_ratio {max_ratio}", agent=self.name)
        if len(ratios) < len(self.ratios):
            ctx.reporter.message(f"scanning the ratios up to --max-ratio {max_ratio}: {ratios}")
        if not names or not ctx.budgets.fits(dict.fromkeys(names, ratios[-1])):
            self.unreachable(ctx, ratios[-1])  # before scanning anything
        baseline = ev.baseline("val").score
        scan = self.open_scan(ctx, baseline)
        ctx.study.set_user_attr("sensitivity_scan", scan.study_name)
        info: dict[str, Any] = {"scan": scan.study_name, "probes": len(names) * len(ratios)}

        complete, measured, failed = self.run_scan(ctx, scan, names, ratios)
        info.update(scan_complete=complete, probes_measured=measured, failed_probes=sorted(failed))
        if not complete:
            ctx.reporter.message(f"time is up with the scan {scan.study_name} unfinished; run the same command "
                                 "again to resume it")
            best = ctx.best()
            best.info.update(info)
            return best

        drops = scan_drops(scan, task.sign, baseline)
        measured_drops = [d for per in drops.values() for d in per.values()]
        worst = max([abs(baseline), *measured_drops])  # what a failed probe counts as losing
        curves = {g: monotone({r: drops.get(g, {}).get(r, worst) for r in ratios}, PLATEAU_SLOPE)
                  for g in names}
        if self.allocation == "threshold":
            threshold = bisect_threshold(curves, ctx.budgets.fits)
            chosen = ratios_at(curves, threshold) if threshold is not None else None
        else:
            threshold, chosen = None, allocate(curves, ctx.budgets.fits, self.resource(ctx))
        if chosen is None:  # only a noisy latency measurement can turn the check above around
            self.unreachable(ctx, ratios[-1])
        set_study_info(ctx.study, sensitivity={"threshold": threshold, "allocation": self.allocation,
                                               "scan_ratios": ratios,
                                               "probe_steps": self.probe_steps, "baseline_score": baseline,
                                               "ratios": chosen})
        kept = ev.cost(chosen, latency=False)["flops"] / ctx.budgets.base["flops"]
        how = f"threshold: a drop of {threshold:.4g} in {task.metric}" if threshold is not None else \
            f"least predicted drop per resource saved: {sum(drop_at(curves[g], r) for g, r in chosen.items()):.4g}"
        ctx.reporter.message(f"{how}, FLOPs {kept:.1%} of the unpruned model")
        policy = ev.policy(chosen, search={"sensitivity": {"scan": scan.study_name, "threshold": threshold,
                                                           "allocation": self.allocation, "scan_ratios": ratios,
                                                           "probe_steps": self.probe_steps}})
        self.score_final(ctx, policy, threshold, scan.study_name)
        best = ctx.best()
        best.info.update(info, threshold=threshold, ratios=chosen)
        return best

    @staticmethod
    def resource(ctx: SearchContext) -> Callable[[dict[str, float]], float]:
        """What the ``resource`` allocation saves: the predicted cost under every budget, each as a
        fraction of its limit, summed (FLOPs stand in for latency, which is not predicted)."""
        ev, base = ctx.evaluator, ctx.budgets.base
        limits = {}  # predicted resource -> its limit, in its own units
        for b in ctx.budgets:
            predicted = "flops" if b.resource == "latency" else b.resource
            limits[predicted] = b.limit(base[b.resource]) / base[b.resource] * base[predicted]

        def cost(ratios: dict[str, float]) -> float:
            predicted = ev.cost(ratios, latency=False)
            return sum(predicted[r] / limit for r, limit in limits.items())

        return cost

    @staticmethod
    def unreachable(ctx: SearchContext, largest: float) -> None:
        max_ratio = ctx.budgets.max_ratio
        if largest >= max_ratio - 1e-9 or not ctx.evaluator.space.names:
            ctx.budgets.unreachable()
        ctx.budgets.unreachable(
            how=f"removing {largest:.0%} of every group, the largest scanned ratio (scan larger ones with "
                f"--sensitivity-ratios, up to --max-ratio {max_ratio}),",
            ratios=dict.fromkeys(ctx.evaluator.space.names, largest))

    def open_scan(self, ctx: SearchContext, baseline: float) -> optuna.Study:
        """The scan study for this model and these probe settings, created on first use."""
        identity = scan_identity(ctx.evaluator, self.probe_steps)
        task = ctx.task
        scan = open_study(scan_name(identity), ctx.storage, directions=[task.direction], metric_names=[task.metric],
                          sampler=optuna.samplers.RandomSampler())
        if "sensitivity_identity" not in scan.user_attrs:
            base = ctx.budgets.base
            set_study_info(scan, sensitivity_identity=identity, model=ctx.evaluator.model_info,
                           base={"flops": base["flops"], "params": base["params"], "score": baseline,
                                 "metric": task.metric})
        return scan

    def run_scan(self, ctx: SearchContext, scan: optuna.Study, names: list[str], ratios: list[float]
                 ) -> tuple[bool, int, set[tuple[str, float]]]:
        """Measure the probes the scan study lacks, sharing them with other processes through its queue;
        wait for those others are measuring. Returns (complete, probes measured here, probes that failed
        here)."""
        ev = ctx.evaluator
        plan = [(g, round(r, RATIO_DIGITS)) for g in names for r in ratios]
        groups = [g.name for g in ev.space.groups]
        probes = SearchContext(ev, ctx.budgets, scan, self.name, seed=ctx.seed, finetune_steps=self.probe_steps,
                               reporter=ctx.reporter, storage=ctx.storage)
        tried: set[tuple[str, float]] = set()  # a probe that failed here is not tried again in this run

        def objective(trial: optuna.Trial) -> float:
            if not trial.user_attrs.get("sensitivity_probe"):  # the queue ran dry since it was looked at
                raise optuna.TrialPruned("no probe was left in the queue")
            group = trial.suggest_categorical("group", groups)
            ratio = trial.suggest_float("ratio", 0.0, 1.0)
            tried.add(probe_key({"group": group, "ratio": ratio}))
            result = probes.evaluate(ev.policy({group: ratio}), trial=trial)
            return result.score

        done, pending = queued_state(scan, probe_key)
        missing = sum(key not in done for key in plan)
        if not missing:
            ctx.reporter.message(f"sensitivity scan {scan.study_name}: all {len(plan)} probes recorded, reused")
            return True, 0, set()
        ctx.reporter.message(f"sensitivity scan {scan.study_name}: {missing} of {len(plan)} probes to measure")
        ctx.reporter.stop()
        ctx.reporter.start(len(plan), len(plan) - missing)
        waiting = False
        try:
            while True:
                done, pending = queued_state(scan, probe_key)
                left = [key for key in plan if key not in done and key not in tried]
                if not left:
                    return True, probes.recorder.written, tried - done
                if ctx.limits.out_of_time():
                    return False, probes.recorder.written, tried - done
                for group, ratio in left:
                    if (group, ratio) not in pending:
                        scan.enqueue_trial({"group": group, "ratio": ratio}, user_attrs={"sensitivity_probe": True})
                if has_waiting(scan):
                    scan.optimize(objective, n_trials=1, catch=(CandidateError,))
                    continue
                if not waiting:
                    ctx.reporter.message(f"waiting for {len(left)} probe(s) other processes are measuring")
                    waiting = True
                time.sleep(POLL_SECONDS)
        finally:
            ctx.reporter.stop()
            ctx.reporter.start(ctx.limits.n_trials, ctx.limits.done(ctx.study))

    def score_final(self, ctx: SearchContext, policy: Policy, threshold: float, scan: str) -> None:
        """Score the final policy once among all the processes of the search: it is queued in the search's
        study, the first process to take it scores it, the others wait for it (up to ``--timeout``)."""
        key = json.dumps(sorted((k, round(v, RATIO_DIGITS)) for k, v in policy.ratios.items()))

        def key_of(params: Mapping[str, Any]) -> str:
            if set(params) != set(policy.ratios):
                raise KeyError("another candidate")
            return json.dumps(sorted((k, round(float(v), RATIO_DIGITS)) for k, v in params.items()))

        attempted = []  # scored (or failed) here: a failed final policy is not tried again in this run

        def objective(trial: optuna.Trial) -> float:
            if not trial.user_attrs.get("sensitivity_final"):
                raise optuna.TrialPruned("the final policy was taken by another process")
            attempted.append(trial.number)
            for name in policy.ratios:
                trial.suggest_float(name, 0.0, 1.0)
            result = ctx.evaluate(policy, trial=trial, extra={"sensitivity_threshold": threshold,
                                                              "sensitivity_scan": scan})
            return result.score

        waiting = False
        with sampling_with(ctx.study, optuna.samplers.RandomSampler()) as study:
            while True:
                done, pending = queued_state(study, key_of)
                if key in done or ctx.trial_of(policy) is not None:
                    return
                if key not in pending:
                    study.enqueue_trial(dict(policy.ratios), user_attrs={"sensitivity_final": True})
                if has_waiting(study):
                    study.optimize(objective, n_trials=1, catch=(CandidateError,))
                    if attempted or ctx.limits.out_of_time():
                        return
                    continue
                if ctx.limits.out_of_time():
                    return
                if not waiting:
                    ctx.reporter.message("waiting for the final policy another process is scoring")
                    waiting = True
                time.sleep(POLL_SECONDS)
