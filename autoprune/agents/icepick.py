"""ICE-Pick agent: tune ICE-Pick's hyperparameters for one target policy with multi-objective TPE.

Hu, Gibson and Cano, "ICE-Pick: Iterative Cost-Efficient Pruning for DNNs" (2023). The agent does not
search per-layer ratios: the target policy is given (uniform at the budget by default, or another
agent's export with ``--icepick-policy``) and ICE-Pick (:mod:`autoprune.pruning.icepick`) reaches it
iteratively. What is searched is how: ``freeze_ratio``, ``threshold``, the LR schedule's ``base``,
``Δ``, ``P``, ``β`` and the fine-tune steps per stage. The authors tune these by grid; here Optuna's
TPE does, with two objectives, the task's validation objective and the pruning time (down). Each
ICE-Pick run is one trial of the study, run by ``study.optimize`` with the TPE sampler, so workers
sharing the study sample from every run recorded there (the first run uses the paper's values); the
exported policy carries the chosen hyperparameters (``search.icepick``) and the Pareto front
(``search.pareto_front``).

The model a trial scores is ICE-Pick's own (iteratively pruned, partly frozen, threshold-guided
fine-tunes), not the shared evaluator's prune + fine-tune of the policy; ``autoprune apply`` re-builds
a policy with the evaluator, so its figures are the evaluator's, not ICE-Pick's. No run reads the
test split.
"""

from __future__ import annotations

import time
from typing import Any

import optuna
from optuna.distributions import FloatDistribution, IntDistribution

from autoprune.agents.base import Agent, Option, SearchContext, SearchResult, register
from autoprune.errors import CandidateError, ParameterError
from autoprune.evaluator import fails_candidate
from autoprune.policy import Policy
from autoprune.pruning.icepick import SCHEDULES, IcePick
from autoprune.study import sampling_with

# DESIGN.md's typical values (base 1e-3, Δ 7.5e-4, P 0.12, β 50): the first trial of every search
PAPER_DEFAULTS = {"freeze_ratio": 0.2, "threshold": 0.01, "base_lr": 1e-3, "delta_share": 0.75, "p": 0.12,
                  "beta": 50.0}


@register
class IcePickAgent(Agent):
    """ICE-Pick iterative pruning to a target policy; TPE tunes its hyperparameters for the objective and
    pruning time (two objectives). Searched, per trial:

    - ``freeze_ratio`` in [0, 0.5]: fraction of layers frozen for each fine-tune (those that move least);
    - ``threshold`` in [0, 0.1]: drop of the objective from the unpruned model that triggers a fine-tune;
    - ``base_lr`` in [1e-4, 5e-2] (log) and ``delta_share`` = Δ / base in [0, 0.95]: the LR schedule's
      ``base`` and ``Δ`` (searched as a share of ``base`` so that the LR stays positive);
    - ``p`` in [0.01, 0.49] and ``beta`` in [1, 100] (log): the schedule's ``P`` and ``β``;
    - ``finetune_steps`` in [max_steps / 10, max_steps]: SGD steps of one fine-tune.
    """

    name = "icepick"
    description = "ICE-Pick iterative pruning to a target policy, hyperparameters tuned by TPE (objective, time)"
    default_trials = 10
    # workers share the recorded study: TPE samples from every run recorded there
    parallel = True
    objectives = (("pruning_seconds", "minimize"),)  # after the task's objective
    channel_only = True  # ICE-Pick removes channels itself, stage by stage
    options = {
        "policy": Option(str, None, "target policy JSON, e.g. another agent's export (default: uniform at the budget)",
                         metavar="FILE"),
        "max_steps": Option(int, 40, "most SGD steps of one fine-tune the search may choose", low=1),
        "stages": Option(int, 0, "0: one stage per top-level block (a ResNet stage); k: k contiguous chunks", low=0),
        "schedule": Option(str, "blocks", "blocks: one more block at its target per stage; steps: every "
                           "group in equal steps", choices=SCHEDULES),
        "probe_steps": Option(int, 5, "SGD steps of the probe that picks the layers to freeze", low=0),
        "distill": Option(float, 0.0, "weight of distillation from the unpruned model in the fine-tunes", low=0.0,
                          high=1.0, high_open=True),
        "startup": Option(int, 4, "trials before TPE models the results (the first uses the paper's values)", low=0),
    }

    def distributions(self) -> dict[str, Any]:
        return {
            "freeze_ratio": FloatDistribution(0.0, 0.5),
            "threshold": FloatDistribution(0.0, 0.1),
            "base_lr": FloatDistribution(1e-4, 5e-2, log=True),
            "delta_share": FloatDistribution(0.0, 0.95),
            "p": FloatDistribution(0.01, 0.49),
            "beta": FloatDistribution(1.0, 100.0, log=True),
            "finetune_steps": IntDistribution(max(1, self.max_steps // 10), self.max_steps),
        }

    def target(self, ctx: SearchContext) -> Policy:
        """The policy ICE-Pick prunes to: the file's (checked against the model and the budgets) or
        one uniform ratio meeting the budgets as tightly as channels allow."""
        if self.policy is None:
            return ctx.evaluator.policy(ctx.budgets.fit())
        loaded = Policy.load(self.policy)
        loaded.check_names(ctx.evaluator.space.names, model_desc="the model searched")
        if not ctx.budgets.fits(loaded.ratios):
            cost, base = ctx.budgets.cost(loaded.ratios), ctx.budgets.base
            parts = [f"{r} {cost[r] / base[r]:.1%} of the original" for r in cost if r in base]
            raise ParameterError("policy", self.policy, f"does not meet the budget(s) {ctx.budgets}: "
                                 f"{', '.join(parts)}", agent=self.name)
        return ctx.evaluator.policy(loaded.ratios, criterion=loaded.criterion)

    def pruner(self, hyper: dict[str, Any], ctx: SearchContext) -> IcePick:
        return IcePick(
            freeze_ratio=hyper["freeze_ratio"], threshold=hyper["threshold"], base_lr=hyper["base_lr"],
            delta=hyper["delta_share"] * hyper["base_lr"], p=hyper["p"], beta=hyper["beta"],
            finetune_steps=hyper["finetune_steps"], stages=self.stages, schedule=self.schedule,
            probe_steps=self.probe_steps, distill=self.distill, seed=ctx.seed,
        )

    @classmethod
    def rebuild(cls, evaluator: Any, policy: Policy, finetune_steps: int) -> Any:
        """ICE-Pick's own model for ``policy``: the iterative pruning run again with the hyperparameters and
        seed it recorded (``search.icepick``), so ``apply`` gives the model the trial scored."""
        hp = policy.search.get("icepick")
        if not hp:
            return super().rebuild(evaluator, policy, finetune_steps)
        target = Policy(dict(policy.ratios), criterion=policy.criterion, reconstruct=policy.reconstruct)
        run = IcePick(
            freeze_ratio=hp["freeze_ratio"], threshold=hp["threshold"], base_lr=hp["base_lr"], delta=hp["delta"],
            p=hp["p"], beta=hp["beta"], finetune_steps=hp["finetune_steps"], stages=hp["stages"],
            schedule=hp["schedule"], probe_steps=hp["probe_steps"], distill=hp["distill"],
            seed=hp.get("seed", policy.search.get("seed", 0)),
        ).run(evaluator, target)
        return run.model

    def search(self, ctx: SearchContext) -> SearchResult:
        space = self.distributions()
        target = self.target(ctx)
        ctx.reporter.message(
            "ICE-Pick target: " + (f"uniform ratio {max(target.ratios.values()):.4f}" if self.policy is None
                                   else f"policy {self.policy}")
        )
        study = ctx.study
        study.enqueue_trial(dict(PAPER_DEFAULTS, finetune_steps=self.max_steps), skip_if_exists=True)

        def objective(trial: optuna.Trial) -> list[float]:
            hyper = {name: _suggest(trial, name, dist) for name, dist in space.items()}
            pruner = self.pruner(hyper, ctx)
            try:
                with fails_candidate(ctx.evaluator.device):
                    run = pruner.run(ctx.evaluator, target)
                    t0 = time.perf_counter()
                    result = ctx.evaluator.measure(run.model, "val", run.finetune_steps, t0 - run.seconds)
            except CandidateError as e:
                ctx.fail(target, f"ICE-Pick: {e}", trial=trial)
                raise
            chosen = {**hyper, "delta": pruner.delta, "stages": self.stages, "schedule": self.schedule,
                      "probe_steps": self.probe_steps, "distill": self.distill, "seed": ctx.seed}
            spent = {"pruning_seconds": run.seconds, "finetune_steps_spent": run.finetune_steps,
                     "probe_steps_spent": run.probe_steps, "stages_run": len(run.stages),
                     "stages_finetuned": sum(s.finetuned for s in run.stages)}
            policy = ctx.evaluator.policy(target.ratios, criterion=target.criterion,
                                          search={"icepick": {**chosen, **spent}})
            ctx.record(policy, result, trial=trial,
                       extra={"pruning_seconds": run.seconds, "probe_steps": run.probe_steps,
                              "icepick_stages": [s.as_dict() for s in run.stages]})
            return [result.score, run.seconds]

        sampler = optuna.samplers.TPESampler(seed=ctx.seed, n_startup_trials=self.startup)
        runs = 0
        with sampling_with(study, sampler):
            while not ctx.should_stop():
                if ctx.limits.n_trials is None and ctx.limits.timeout is None and runs >= self.default_trials:
                    break
                study.optimize(objective, n_trials=1, catch=(CandidateError,))
                runs += 1
        best = ctx.best()
        best.info["target"] = dict(target.ratios)
        return best


def _suggest(trial: optuna.Trial, name: str, dist: Any) -> Any:
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)
