"""Pruning from Scratch (the gates agent) against the uniform baseline and AMC at 50 % FLOPs.

Each agent searches ResNet-20 (the embedded default, trained on digits, unless ``--dataset`` says
otherwise) with no fine-tuning per candidate (AMC's recipe: adaptive-BN accuracy as the proxy); its best
policy is then fine-tuned once for the same number of steps by the shared evaluator and scored on the
validation and test splits. The search's wall and CPU time are compared with AMC's (default trials).
When the AMC agent cannot be imported, the random agent with as many evaluations as AMC's default stands
in, and the table says so.

A second table says where each search's time went (exclusive wall seconds, each call counted once):
gate learning (the steps of every run), validation passes outside a candidate's evaluation (the gate
snapshots), candidates' evaluations (prune, BN recalibration, resources counted: their validation pass
is in the validation column), budget checks (the threshold's bisection, AMC's clipping), DDPG updates,
and the rest (Optuna records, AMC's environment).

    .venv/bin/python benchmarks/gates_vs_uniform.py [--finetune-steps 100] [--amc-trials 100] [--gates-steps 300]
    .venv/bin/python benchmarks/gates_vs_uniform.py --dataset fashionmnist \\
        --data-root /usr/share/datasets/fashion-mnist --pretrain-steps 8000 --runs gates,amc
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

import autoprune.agents.gates  # noqa: F401
from autoprune.agents import Limits, SearchContext, get_agent
from autoprune.budget import Budgets, parse_budget
from autoprune.config import SourceConfig
from autoprune.errors import InputError
from autoprune.evaluator import Evaluator
from autoprune.runner import make_evaluator, prepare
from autoprune.study import open_study

RUNS = {  # name: (label, agent, options beside the gate steps)
    "uniform": ("uniform", "uniform", {}),
    "gates": ("gates (random weights; l1 picks channels: default)", "gates", {}),
    "gates-keep": ("gates (random weights; largest gates kept)", "gates", {"keep": "gates"}),
    "gates-pretrained": ("gates (pretrained weights; largest gates kept)", "gates", {"from": "pretrained"}),
    "amc": ("amc", "amc", {}),
}
PHASES = ("gate learning", "validation passes", "evaluations", "budget checks", "DDPG updates", "rest")


class Phases:
    """Exclusive wall seconds and calls per phase: a call's time goes to its own phase, less the time of
    the timed calls it makes (an evaluation's validation pass counts as a validation pass)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[float] = []  # time spent in timed callees, per active call

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            self._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                inner = self._stack.pop()
                self.seconds[phase] += elapsed - inner
                self.calls[phase] += 1
                if self._stack:
                    self._stack[-1] += elapsed

        return timed

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        """Time the phases' functions while the block runs (class attributes, put back afterwards)."""
        targets = [(Evaluator, "metrics_of", "validation passes"), (Evaluator, "evaluate", "evaluations"),
                   (Budgets, "fits", "budget checks"),
                   (sys.modules["autoprune.agents.gates"], "learn_gates", "gate learning")]
        amc = sys.modules.get("autoprune.agents.amc")
        if amc is not None:
            targets.append((amc.AMCDDPG, "train", "DDPG updates"))
        saved = [(owner, name, vars(owner).get(name)) for owner, name, _ in targets]  # None: inherited
        try:
            for owner, name, phase in targets:
                setattr(owner, name, self.wrap(phase, getattr(owner, name)))
            yield
        finally:
            for owner, name, original in saved:
                if original is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)


def search(evaluator, agent: str, budget, trials: int | None, **options):
    study = open_study(f"bench-{agent}", None)  # in memory
    ctx = SearchContext(evaluator, Budgets([budget], evaluator), study, agent, limits=Limits(trials), seed=0,
                        finetune_steps=0)
    phases = Phases()
    with phases.patched():
        wall, cpu = time.perf_counter(), time.process_time()
        result = get_agent(agent)(**options).search(ctx)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    phases.seconds["rest"] = wall - sum(phases.seconds.values())
    return result, wall, cpu, ctx.recorder.written, phases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--amc-trials", type=int, default=None, help="default: AMC's default_trials")
    p.add_argument("--budget", default="50%")
    p.add_argument("--gates-steps", type=int, default=None, help="gate-learning steps per run (default: the agent's)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"searches to run, of {','.join(RUNS)} (amc last)")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--pretrain-steps", type=int, default=500, help="of the cached pretrained model")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    chosen = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in chosen if r not in RUNS]
    if unknown or "amc" not in chosen:
        p.error(f"--runs {args.runs!r}: choose from {', '.join(RUNS)}, amc included (the times are ratios to it)")
    chosen = [r for r in chosen if r != "amc"] + ["amc"]

    try:
        setup = prepare(SourceConfig(model=args.model, dataset=args.dataset, data_root=args.data_root,
                                     pretrain_steps=args.pretrain_steps), log=lambda m: None, device="cpu")
    except InputError as e:  # a missing data folder, an unknown dataset: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    budget = parse_budget("flops", args.budget)
    rows = []
    try:
        import autoprune.agents.amc  # noqa: F401

        amc_name = "amc"
    except Exception as e:  # AMC is written in parallel; say so rather than fail
        print(f"(AMC unavailable: {e}; the random agent stands in)")
        amc_name = "random"
    amc_trials = args.amc_trials or (get_agent("amc").default_trials if amc_name == "amc" else 100)
    gates = {} if args.gates_steps is None else {"steps": args.gates_steps,
                                                   "snapshot_every": min(25, args.gates_steps)}
    for run in chosen:
        label_, agent, options = RUNS[run]
        trials = 1 if agent == "uniform" else None
        if agent == "gates":
            options = {**gates, **options}
        if run == "amc":
            label_, agent, trials = amc_name, amc_name, amc_trials
        # a fresh cache per agent: nothing shared
        evaluator = make_evaluator(setup.model, setup.task, {}, device="cpu", info=setup.info)
        result, wall, cpu, evaluations, phases = search(evaluator, agent, budget, trials, **options)
        tuned = evaluator.build(result.policy, args.finetune_steps)  # one fine-tune, scored on both splits
        tuned_val, tuned_test = evaluator.measure(tuned, "val"), evaluator.measure(tuned, "test")
        rows.append((label_, evaluations, result.evaluation.score, tuned_val.score, tuned_test.score,
                     tuned_val.flops / evaluator.space.base_flops, wall, cpu, phases))
    amc_wall, amc_cpu = rows[-1][6], rows[-1][7]
    label = "AMC" if amc_name == "amc" else "random (AMC stand-in)"
    print(f"\n{args.model} on {setup.task.name} ({args.pretrain_steps} pretraining steps), budget FLOPs <= "
          f"{args.budget}; fine-tune {args.finetune_steps} steps after the search; CPU, {args.threads} thread(s)\n")
    print(f"| agent | evaluations | val acc, no fine-tune | val acc, fine-tuned | test acc, fine-tuned | "
          f"FLOPs kept | search wall s | search CPU s | wall / {label} | CPU / {label} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for agent, n, acc0, acc, test, flops, wall, cpu, _ in rows:
        print(f"| {agent} | {n} | {acc0:.2%} | {acc:.2%} | {test:.2%} | {flops:.1%} | {wall:.1f} | {cpu:.1f} "
              f"| {wall / amc_wall:.2f} | {cpu / amc_cpu:.2f} |")
    print("\nWhere each search's wall time went: seconds (calls)\n")
    print(f"| agent | {' | '.join(PHASES)} |")
    print("|---|" + "---:|" * len(PHASES))
    for agent, *_, phases in rows:
        cells = [f"{phases.seconds.get(ph, 0.0):.1f}" + (f" ({phases.calls[ph]})" if phases.calls.get(ph) else "")
                 for ph in PHASES]
        print(f"| {agent} | {' | '.join(cells)} |")


if __name__ == "__main__":
    from _cli import run

    run(main)
