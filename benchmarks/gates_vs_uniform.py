"""Pruning from Scratch (the gates agent) against the uniform baseline and AMC at 50 % FLOPs.

Each agent searches the embedded default (ResNet-20 on digits) with no fine-tuning per candidate
(AMC's recipe: adaptive-BN accuracy as the proxy); its best policy is then fine-tuned for the same
number of steps by the shared evaluator and scored on the validation and test splits. The search's
wall and CPU time are compared with AMC's (default trials). When the AMC agent cannot be imported,
the random agent with as many evaluations as AMC's default stands in, and the table says so.

    .venv/bin/python benchmarks/gates_vs_uniform.py [--finetune-steps 100] [--amc-trials 100] [--gates-steps 300]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("AUTOPRUNE_CACHE", "/tmp/apcache")  # reuse the pretrained default model

import autoprune.agents.gates  # noqa: E402,F401
from autoprune.agents import Limits, SearchContext, get_agent  # noqa: E402
from autoprune.budget import Budgets, parse_budget  # noqa: E402
from autoprune.config import SourceConfig  # noqa: E402
from autoprune.runner import make_evaluator, prepare  # noqa: E402
from autoprune.study import open_study  # noqa: E402


def search(evaluator, agent: str, budget, trials: int | None, **options):
    study = open_study(f"bench-{agent}", None)  # in memory
    ctx = SearchContext(evaluator, Budgets([budget], evaluator), study, agent, limits=Limits(trials), seed=0,
                        finetune_steps=0)
    wall, cpu = time.perf_counter(), time.process_time()
    result = get_agent(agent)(**options).search(ctx)
    return result, time.perf_counter() - wall, time.process_time() - cpu, ctx.recorder.written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--amc-trials", type=int, default=None, help="default: AMC's default_trials")
    p.add_argument("--budget", default="50%")
    p.add_argument("--gates-steps", type=int, default=None, help="gate-learning steps per run (default: the agent's)")
    args = p.parse_args()
    torch.set_num_threads(1)

    setup = prepare(SourceConfig(), log=lambda m: None, device="cpu")
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
    runs = (
        ("uniform", "uniform", 1, {}),
        ("gates (random weights; l1 picks channels: default)", "gates", None, gates),
        ("gates (random weights; largest gates kept)", "gates", None, {**gates, "keep": "gates"}),
        ("gates (pretrained weights; largest gates kept)", "gates", None, {**gates, "from": "pretrained"}),
        (amc_name, amc_name, amc_trials, {}),
    )
    for label_, agent, trials, options in runs:
        # a fresh cache per agent: nothing shared
        evaluator = make_evaluator(setup.model, setup.task, {}, device="cpu", info=setup.info)
        result, wall, cpu, evaluations = search(evaluator, agent, budget, trials, **options)
        tuned_val = evaluator.evaluate(result.policy, args.finetune_steps, "val")
        tuned_test = evaluator.evaluate(result.policy, args.finetune_steps, "test")
        rows.append((label_, evaluations, result.evaluation.score, tuned_val.score, tuned_test.score,
                     tuned_val.flops / evaluator.space.base_flops, wall, cpu))
    amc_wall, amc_cpu = rows[-1][6], rows[-1][7]
    label = "AMC" if amc_name == "amc" else "random (AMC stand-in)"
    print(f"\nResNet-20 on digits, budget FLOPs <= {args.budget}; fine-tune {args.finetune_steps} steps "
          f"after the search; CPU, 1 thread\n")
    print(f"| agent | evaluations | val acc, no fine-tune | val acc, fine-tuned | test acc, fine-tuned | "
          f"FLOPs kept | search wall s | search CPU s | wall / {label} | CPU / {label} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for agent, n, acc0, acc, test, flops, wall, cpu in rows:
        print(f"| {agent} | {n} | {acc0:.2%} | {acc:.2%} | {test:.2%} | {flops:.1%} | {wall:.1f} | {cpu:.1f} "
              f"| {wall / amc_wall:.2f} | {cpu / amc_cpu:.2f} |")


if __name__ == "__main__":
    main()
