"""Criteria side by side: the same uniform 50 %-FLOPs structure, channels chosen by each criterion.

Every criterion prunes the embedded default (ResNet-20 on digits) with the uniform ratio that meets
the budget, so the structure (and the FLOPs) is the same for all and only the choice of channels
differs. Each pruned model gets the evaluator's adaptive BN, then the same fine-tune; accuracy is
reported right after adaptive BN (no fine-tune) and after ``--finetune-steps`` steps, on the
validation and test splits, with the seconds the criterion's scores took (statistics included).
Every criterion of the registry runs by default, the data criteria (taylor, hessian, apoz, entropy,
lda, correlation) on the evaluator's seeded calibration batches. ``--finetune-l1`` (with
``--finetune-penalty``) adds the fine-tune's sparsity penalty to every fine-tune.

    .venv/bin/python benchmarks/criteria.py [--finetune-steps 100] [--budget 50%] [--criteria l1,lda,correlation]
                                            [--finetune-l1 1e-4 --finetune-penalty group]
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--model", default="resnet20")
    p.add_argument("--finetune-l1", type=float, default=0.0)
    p.add_argument("--finetune-penalty", default="l1", choices=("l1", "group"))
    args = p.parse_args()

    setup = prepare(SourceConfig(model=args.model, dataset="digits"), device="cpu")
    budget = parse_budget("flops", args.budget)
    rows = []
    for name in args.criteria.split(","):
        settings = SearchConfig(budgets={"flops": args.budget}, criterion=name, device="cpu",
                                finetune_l1=args.finetune_l1, finetune_penalty=args.finetune_penalty).to_dict()
        ev = make_evaluator(setup.model, setup.task, settings, device="cpu", info=setup.info)
        base = ev.space.base_flops
        ratios = Budgets([budget], ev, max_ratio=0.9).fit()  # the tightest uniform ratio
        policy = ev.policy(ratios)
        t0 = time.perf_counter()
        ev.pruner.scores(name)
        scoring = time.perf_counter() - t0
        zero = ev.evaluate(policy, 0)
        tuned = ev.evaluate(policy, args.finetune_steps)
        test = ev.measure(ev.build(policy, args.finetune_steps), "test", args.finetune_steps)
        rows.append((name, zero.flops / base, zero.score, tuned.score, test.score, scoring))
        print(f"{name}: done", flush=True)
    ratio = max(ratios.values())
    penalty = f", {args.finetune_penalty} penalty λ={args.finetune_l1:g}" if args.finetune_l1 > 0 else ""
    print(f"\n{args.model} on digits, uniform ratio {ratio:.3f} ({args.budget} FLOPs), "
          f"{args.finetune_steps} fine-tune steps{penalty}\n")
    print("| criterion | FLOPs kept | val acc, adaptive BN only | val acc, fine-tuned | test acc, fine-tuned "
          "| scoring s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, flops, zero, tuned, test, scoring in rows:
        print(f"| {name} | {flops:.1%} | {zero:.2%} | {tuned:.2%} | {test:.2%} | {scoring:.2f} |")


if __name__ == "__main__":
    main()
