"""Criteria side by side: the same uniform structure, channels chosen by each criterion, with and without
the least-squares refit of the layers that read pruned channels (``--reconstruct``).

Every criterion prunes the model with the uniform ratio that meets the FLOPs budget, so the structure
(and the FLOPs) is the same for all and only the choice of channels differs. Each pruned model is built
as is and refitted (He et al. 2017, on the same ``--criterion-batches`` seeded training batches the data
criteria read). Each gets the evaluator's adaptive BN, then the same fine-tune; accuracy is reported right
after adaptive BN (no fine-tune) on validation, and after ``--finetune-steps`` steps on validation and
test, with the seconds the criterion's scores took (statistics included) and the seconds the refit adds
to building one candidate. Every criterion of the registry runs by default, the data criteria on the
evaluator's seeded calibration batches. ``--finetune-l1`` (with ``--finetune-penalty``) adds the
fine-tune's sparsity penalty. The embedded default (ResNet-20 on digits) unless ``--dataset`` says
otherwise; on Fashion-MNIST (``apt-get install dataset-fashion-mnist``)::

    .venv/bin/python benchmarks/criteria.py --dataset fashionmnist \\
        --data-root /usr/share/datasets/fashion-mnist --pretrain-steps 8000 --budget 30%
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from autoprune.budget import Budgets, parse_budget
from autoprune.config import SearchConfig, SourceConfig
from autoprune.pruning.criteria import CRITERIA
from autoprune.runner import make_evaluator, prepare
from autoprune.training import PENALTIES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--budget", default="50%", help="FLOPs kept")
    p.add_argument("--criteria", default=",".join(CRITERIA))
    p.add_argument("--reconstruct", choices=("both", "on", "off"), default="both",
                   help="build each structure without the refit, with it, or both (default)")
    p.add_argument("--criterion-batches", type=int, default=8)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--pretrain-steps", type=int, default=500, help="of the cached pretrained model")
    p.add_argument("--finetune-l1", type=float, default=0.0)
    p.add_argument("--finetune-penalty", default="l1", choices=PENALTIES)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    setup = prepare(SourceConfig(model=args.model, dataset=args.dataset, data_root=args.data_root,
                                 pretrain_steps=args.pretrain_steps), device="cpu")
    budget = parse_budget("flops", args.budget)
    refits = {"both": (False, True), "on": (True,), "off": (False,)}[args.reconstruct]
    rows = []
    for name in args.criteria.split(","):
        settings = SearchConfig(budgets={"flops": args.budget}, criterion=name, device="cpu",
                                criterion_batches=args.criterion_batches, finetune_l1=args.finetune_l1,
                                finetune_penalty=args.finetune_penalty).to_dict()
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
            model = ev.build(policy, args.finetune_steps)  # one fine-tune, scored on both splits
            val = ev.measure(model, "val", args.finetune_steps)
            test = ev.measure(model, "test", args.finetune_steps)
            rows.append((name, refit, zero.flops / base, zero.score, val.score, test.score, scoring, build))
            print(f"{name}{' refit' if refit else ''}: test {test.score:.2%}", flush=True)
    ratio = max(ratios.values())
    penalty = f", {args.finetune_penalty} penalty λ={args.finetune_l1:g}" if args.finetune_l1 > 0 else ""
    print(f"\n{args.model} on {args.dataset}, uniform ratio {ratio:.3f} ({args.budget} FLOPs), "
          f"{args.finetune_steps} fine-tune steps{penalty}, {args.criterion_batches} calibration batches\n")
    print("| criterion | refit | FLOPs kept | val acc, adaptive BN only | val acc, fine-tuned | test acc, fine-tuned "
          "| scoring s | prune s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, refit, flops, zero, tuned, test, scoring, build in rows:
        print(f"| {name} | {'yes' if refit else 'no'} | {flops:.1%} | {zero:.2%} | {tuned:.2%} | {test:.2%} "
              f"| {scoring:.2f} | {build:.2f} |")


if __name__ == "__main__":
    from _cli import run

    run(main)
