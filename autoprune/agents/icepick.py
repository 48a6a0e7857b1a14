"""ICE-Pick agent: tune ICE-Pick's hyperparameters for one target policy with multi-objective TPE.

Hu, Gibson and Cano, "ICE-Pick: Iterative Cost-Efficient Pruning for DNNs" (2023). The agent does not
search per-layer ratios: the target policy is given (uniform at the budget by default, or another
agent's export with ``--icepick-policy``) and ICE-Pick (:mod:`autoprune.pruning.icepick`) reaches it
iteratively. What is searched is how: ``freeze_ratio``, ``threshold``, the LR schedule's ``base``,
``Δ``, ``P``, ``β`` and the fine-tune steps per stage. The authors tune these by grid; here Optuna's
TPE does, with two objectives, the final validation accuracy (up) and the pruning time (down). Each
ICE-Pick run is one trial of the study; the exported policy carries the chosen hyperparameters
(``search.icepick``) and the Pareto front (``search.pareto_front``).

Why a separate in-memory study for the sampler: trials reach the recorded study through the shared
recording path (``ctx.record_model``, which adds finished trials), not through ``ask``/``tell``, so a
sampler asked on the recorded study would leave a RUNNING trial beside every recorded one. The
in-memory study is only TPE's scratchpad: it is rebuilt from the recorded ICE-Pick trials when a search
starts, so a resumed search continues from everything the storage holds.

The model a trial scores is ICE-Pick's own (iteratively pruned, partly frozen, threshold-guided
fine-tunes), not the shared evaluator's prune + fine-tune of the policy; ``autoprune apply`` re-builds
a policy with the evaluator, so its accuracy is the evaluator's, not ICE-Pick's.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import optuna
from optuna.distributions import FloatDistribution, IntDistribution

from autoprune.agents.base import Agent, Option, SearchContext, SearchResult, register
from autoprune.errors import CandidateError, InputError
from autoprune.evaluator import Evaluation
from autoprune.policy import Policy
from autoprune.pruning.icepick import SCHEDULES, IcePick
from autoprune.training import score

# DESIGN.md's typical values (base 1e-3, Δ 7.5e-4, P 0.12, β 50): the first trial of every search
PAPER_DEFAULTS = {"freeze_ratio": 0.2, "threshold": 0.01, "base_lr": 1e-3, "delta_share": 0.75, "p": 0.12,
                  "beta": 50.0}


@register
class IcePickAgent(Agent):
    """ICE-Pick iterative pruning to a target policy; TPE tunes its hyperparameters for accuracy and
    pruning time (two objectives). Searched, per trial:

    - ``freeze_ratio`` in [0, 0.5]: fraction of layers frozen for each fine-tune (those that move least);
    - ``threshold`` in [0, 0.1]: accuracy drop from the unpruned model that triggers a fine-tune;
    - ``base_lr`` in [1e-4, 5e-2] (log) and ``delta_share`` = Δ / base in [0, 0.95]: the LR schedule's
      ``base`` and ``Δ`` (searched as a share of ``base`` so that the LR stays positive);
    - ``p`` in [0.01, 0.49] and ``beta`` in [1, 100] (log): the schedule's ``P`` and ``β``;
    - ``finetune_steps`` in [max_steps / 10, max_steps]: SGD steps of one fine-tune.
    """

    name = "icepick"
    description = "ICE-Pick iterative pruning to a target policy, hyperparameters tuned by TPE (accuracy, time)"
    default_trials = 10
    # workers share the recorded study: each one's TPE takes in the others' finished runs before asking
    parallel = True
    directions = ("maximize", "minimize")  # validation accuracy, pruning seconds
    channel_only = True  # ICE-Pick removes channels itself, stage by stage
    options = {
        "policy": Option(str, None, "target policy JSON, e.g. another agent's export (default: uniform at the budget)"),
        "max_steps": Option(int, 40, "most SGD steps of one fine-tune the search may choose"),
        "stages": Option(int, 0, "0: one stage per top-level block (a ResNet stage); k: k contiguous chunks"),
        "schedule": Option(str, "blocks", "blocks: one more block at its target per stage; steps: every "
                           "group in equal steps", choices=SCHEDULES),
        "probe_steps": Option(int, 5, "SGD steps of the probe that picks the layers to freeze"),
        "distill": Option(float, 0.0, "weight of distillation from the unpruned model in the fine-tunes"),
        "startup": Option(int, 4, "trials before TPE models the results (the first uses the paper's values)"),
    }

    def distributions(self) -> dict[str, Any]:
        if self.max_steps < 1:
            raise InputError(f"--icepick-max-steps must be >= 1, got {self.max_steps}")
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
            return ctx.evaluator.policy(ctx.project({}))
        loaded = Policy.load(self.policy)
        loaded.check_names(ctx.evaluator.space.names, model_desc="the model searched")
        if not ctx.fits(loaded.ratios):
            cost = ctx.cost(loaded.ratios)
            parts = [f"{r} {cost[r] / ctx.base[r]:.1%} of the original" for r in cost if r in ctx.base]
            raise InputError(f"--icepick-policy {self.policy!r} does not meet the budget(s) "
                             f"{', '.join(str(b) for b in ctx.budgets)}: {', '.join(parts)}")
        return ctx.evaluator.policy(loaded.ratios, criterion=loaded.criterion)

    def pruner(self, hyper: dict[str, Any], ctx: SearchContext) -> IcePick:
        return IcePick(
            freeze_ratio=hyper["freeze_ratio"], threshold=hyper["threshold"], base_lr=hyper["base_lr"],
            delta=hyper["delta_share"] * hyper["base_lr"], p=hyper["p"], beta=hyper["beta"],
            finetune_steps=hyper["finetune_steps"], stages=self.stages, schedule=self.schedule,
            probe_steps=self.probe_steps, distill=self.distill, seed=ctx.seed,
        )

    def sampler_study(self, ctx: SearchContext, space: dict[str, Any]) -> optuna.Study:
        """TPE's in-memory study, holding the ICE-Pick trials the recorded study already has."""
        sampler = optuna.samplers.TPESampler(seed=ctx.seed, n_startup_trials=self.startup)
        hp = optuna.create_study(directions=list(self.directions), sampler=sampler)
        self._synced: set[int] = set()
        self._token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        if self.sync(hp, ctx, space) == 0:
            defaults = dict(PAPER_DEFAULTS, finetune_steps=self.max_steps)
            hp.enqueue_trial(defaults)
        return hp

    def sync(self, hp: optuna.Study, ctx: SearchContext, space: dict[str, Any]) -> int:
        """Add to TPE's study the recorded ICE-Pick runs it has not seen: those of an earlier run of the
        search, and those other workers finished meanwhile (this process tells TPE its own runs)."""
        added = 0
        for t in ctx.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if (t.number in self._synced or t.user_attrs.get("agent") != self.name or t.distributions != space
                    or len(t.values) != 2 or t.user_attrs.get("icepick_worker") == self._token):
                continue
            hp.add_trial(optuna.trial.create_trial(params=t.params, distributions=space, values=t.values))
            self._synced.add(t.number)
            added += 1
        return added

    def search(self, ctx: SearchContext) -> SearchResult:
        if len(ctx.study.directions) != len(self.directions):
            raise InputError(f"study {ctx.study.study_name!r} has {len(ctx.study.directions)} objective(s); "
                             "ICE-Pick records two (accuracy, pruning time): choose another --study name")
        space = self.distributions()
        target = self.target(ctx)
        ctx.reporter.message(
            "ICE-Pick target: " + (f"uniform ratio {max(target.ratios.values()):.4f}" if self.policy is None
                                   else f"policy {self.policy}")
        )
        hp = self.sampler_study(ctx, space)
        test = ctx.evaluator.data.loader("test", ctx.evaluator.eval_batch_size, ctx.evaluator.device)
        while not ctx.should_stop():
            self.sync(hp, ctx, space)
            trial = hp.ask(space)
            hyper = dict(trial.params)
            pruner = self.pruner(hyper, ctx)
            try:
                run = pruner.run(ctx.evaluator, target)
            except CandidateError as e:
                ctx.record_failure(target, f"ICE-Pick: {e}", params=hyper, distributions=space)
                hp.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            test_accuracy, _ = score(run.model, test, ctx.evaluator.amp)  # reported, never searched on
            chosen = {**hyper, "delta": pruner.delta, "stages": self.stages, "schedule": self.schedule,
                      "probe_steps": self.probe_steps, "distill": self.distill}
            spent = {"pruning_seconds": run.seconds, "finetune_steps_spent": run.finetune_steps,
                     "probe_steps_spent": run.probe_steps, "stages_run": len(run.stages),
                     "stages_finetuned": sum(s.finetuned for s in run.stages)}
            policy = ctx.evaluator.policy(target.ratios, criterion=target.criterion,
                                          search={"icepick": {**chosen, **spent}})

            def values(r: Evaluation, seconds: float = run.seconds) -> list[float]:
                return [r.accuracy, seconds]

            result = ctx.record_model(
                policy, run.model, run.finetune_steps, run.seconds, params=hyper, distributions=space,
                values=values,
                extra={"pruning_seconds": run.seconds, "probe_steps": run.probe_steps,
                       "icepick_stages": [s.as_dict() for s in run.stages],
                       "final_icepick_test_accuracy": test_accuracy, "icepick_worker": self._token},
            )
            hp.tell(trial, [result.accuracy, run.seconds])
        best = ctx.best()
        best.info["target"] = dict(target.ratios)
        return best
