"""Criteria side by side: the same uniform 50 %-FLOPs structure, channels chosen by each criterion, with and
without the least-squares refit of the layers that read pruned channels (``--reconstruct``).

Every criterion prunes the embedded default (ResNet-20 on digits) with the uniform ratio that meets
the budget, so the structure (and the FLOPs) is the same for all and only the choice of channels
differs. Each pruned model is built twice: as is, and refitted (He et al. 2017, on the same
``--criterion-batches`` seeded training batches the data criteria read). Each gets the evaluator's
adaptive BN, then the same fine-tune; accuracy is reported right after adaptive BN (no fine-tune) and
after ``--finetune-steps`` steps, on the validation and test splits, with the seconds the criterion's
scores took (statistics included) and the seconds the refit adds to building one candidate.

    .venv/bin/python benchmarks/criteria.py [--finetune-steps 100] [--budget 50%] [--criteria l1,regression]
        [--reconstruct both|on|off]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from autoprune.budget import Budgets, parse_budget
from autoprune.config import SearchConfig, SourceConfig
from autoprune.pruning.criteria import CRITERIA
from autoprune.runner import make_evaluator, prepare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--budget", default="50%")
    p.add_argument("--criteria", default=",".join(CRITERIA))
    p.add_argument("--reconstruct", choices=("both", "on", "off"), default="both",
                   help="build each structure without the refit, with it, or both (default)")
    p.add_argument("--criterion-batches", type=int, default=8)
    p.add_argument("--model", default="resnet20")
    args = p.parse_args()

    setup = prepare(SourceConfig(model=args.model, dataset="digits"), device="cpu")
    budget = parse_budget("flops", args.budget)
    refits = {"both": (False, True), "on": (True,), "off": (False,)}[args.reconstruct]
    rows = []
    for name in args.criteria.split(","):
        settings = SearchConfig(budgets={"flops": args.budget}, criterion=name, device="cpu",
                                criterion_batches=args.criterion_batches).to_dict()
        ev = make_evaluator(setup.model, setup.task, settings, device="cpu", info=setup.info)
        base = ev.space.base_flops
        ratios = Budgets([budget], ev, max_ratio=0.9).fit()  # the tightest uniform ratio
        t0 = time.perf_counter()
        ev.pruner.scores(name)
        scoring = time.perf_counter() - t0
        for refit in refits:
            policy = dataclasses.replace(ev.policy(ratios), reconstruct=refit)
            ev.pruner.prune(policy)  # the refit's targets are gathered once per base model: not counted below
            t0 = time.perf_counter()
            ev.pruner.prune(policy)
            build = time.perf_counter() - t0
            zero = ev.evaluate(policy, 0)
            tuned = ev.evaluate(policy, args.finetune_steps)
            test = ev.measure(ev.build(policy, args.finetune_steps), "test", args.finetune_steps)
            rows.append((name, refit, zero.flops / base, zero.score, tuned.score, test.score, scoring, build))
        print(f"{name}: done", flush=True)
    ratio = max(ratios.values())
    print(f"\n{args.model} on digits, uniform ratio {ratio:.3f} ({args.budget} FLOPs), "
          f"{args.finetune_steps} fine-tune steps, {args.criterion_batches} calibration batches\n")
    print("| criterion | refit | FLOPs kept | val acc, adaptive BN only | val acc, fine-tuned | test acc, fine-tuned "
          "| scoring s | prune s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, refit, flops, zero, tuned, test, scoring, build in rows:
        print(f"| {name} | {'yes' if refit else 'no'} | {flops:.1%} | {zero:.2%} | {tuned:.2%} | {test:.2%} "
              f"| {scoring:.2f} | {build:.2f} |")


if __name__ == "__main__":
    main()
