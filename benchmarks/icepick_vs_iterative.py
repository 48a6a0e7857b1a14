"""ICE-Pick vs plain iterative pruning, the comparison of Hu, Gibson and Cano (2023), on our data.

Both prune ResNet-20 (the embedded default, trained on digits, unless ``--dataset`` says otherwise) to a
uniform policy that removes 40 % and 60 % of the parameters (``--pruned``), in the same stages (every
group moving towards its target in equal steps), with the same fine-tune length per stage and the same
batches:

- iterative: a full fine-tune after every stage at a fixed LR of 0.001, nothing frozen;
- ICE-Pick: fine-tune only when the validation accuracy dropped by at least the threshold, freeze
  the layers that move least in a short probe, pruning-aware LR (the paper's base 1e-3, Δ 7.5e-4,
  P 0.12, β 50).

Prints total pruning time, SGD steps, and final accuracy (validation and test) of each, and ICE-Pick's
time as a ratio to the iterative run's, measured in this run; then where each run's time went, summed
over its stages (:attr:`autoprune.pruning.icepick.Stage.seconds`): pruning, BN recalibration, the
validation pass that decides whether to fine-tune, the freeze probe, the fine-tune and the validation
pass after it. The paper reports 72-88 % of the time saved at 40 % on CIFAR-10 ResNets with accuracy
kept. On Fashion-MNIST (``apt-get install dataset-fashion-mnist``; the 8000-step model is trained once
and cached)::

    .venv/bin/python benchmarks/icepick_vs_iterative.py [--stages 5] [--steps 30]
    .venv/bin/python benchmarks/icepick_vs_iterative.py --dataset fashionmnist \\
        --data-root /usr/share/datasets/fashion-mnist --pretrain-steps 8000 --steps 100 --pruned 40
"""

from __future__ import annotations

import argparse
import sys

import torch

from autoprune.budget import Budgets, parse_budget
from autoprune.config import SourceConfig
from autoprune.errors import InputError
from autoprune.pruning.icepick import IcePick
from autoprune.runner import make_evaluator, prepare

PHASES = ("prune", "recalibrate", "score", "probe", "finetune", "score_after")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=5, help="pruning steps to reach the target")
    parser.add_argument("--steps", type=int, default=30, help="SGD steps of one fine-tune")
    parser.add_argument("--pruned", default="40,60", help="percent of the parameters removed, comma separated")
    parser.add_argument("--freeze-ratio", type=float, default=0.2)
    parser.add_argument("--threshold", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--pretrain-steps", type=int, default=500, help="of the cached pretrained model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        levels = [float(v) / 100 for v in args.pruned.split(",")]
    except ValueError:
        parser.error(f"--pruned {args.pruned!r}: give percentages separated by commas, such as 40,60")

    try:
        setup = prepare(SourceConfig(model=args.model, dataset=args.dataset, data_root=args.data_root,
                                     pretrain_steps=args.pretrain_steps), device="cpu",
                        log=lambda m: print(f"<!-- {m} -->"))
    except InputError as e:  # a missing data folder, an unknown dataset: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    evaluator = make_evaluator(setup.model, setup.task, {"seed": args.seed}, device="cpu", info=setup.info)
    base_val = evaluator.baseline("val").score
    base_test = evaluator.baseline("test").score
    common = {"stages": args.stages, "schedule": "steps", "seed": args.seed}
    methods = {
        "iterative (LR 1e-3, fine-tune every step)": IcePick.iterative(lr=1e-3, finetune_steps=args.steps,
                                                                       **common),
        "ICE-Pick (paper's LR schedule)": IcePick(freeze_ratio=args.freeze_ratio, threshold=args.threshold,
                                                  finetune_steps=args.steps, **common),
    }

    print(f"{args.model} on {setup.task.name} ({args.pretrain_steps} pretraining steps), unpruned: "
          f"val {base_val:.2%}, test {base_test:.2%}; {args.stages} pruning steps, {args.steps} SGD steps per "
          f"fine-tune; CPU, {args.threads} thread(s)\n")
    print("| params pruned | method | fine-tunes | SGD steps | time (s) | time / iterative | val acc | test acc |")
    print("|---|---|---|---|---|---|---|---|")
    phases = []
    for pruned in levels:
        budget = parse_budget("params", f"{(1 - pruned) * 100:g}%")
        # one ratio for every group, as tight as channels allow
        policy = evaluator.policy(Budgets([budget], evaluator).fit())
        reference = None
        for label, pruner in methods.items():
            run = pruner.run(evaluator, policy)
            measured = evaluator.measure(run.model, "val")
            test_acc = evaluator.measure(run.model, "test").score
            kept = measured.params / evaluator.space.base_params
            reference = reference or run.seconds
            print(f"| {1 - kept:.1%} | {label} | {sum(s.finetuned for s in run.stages)}/{len(run.stages)} | "
                  f"{run.train_steps} | {run.seconds:.1f} | {run.seconds / reference:.2f} | "
                  f"{measured.score:.2%} | {test_acc:.2%} |")
            spent = {p: sum(s.seconds.get(p, 0.0) for s in run.stages) for p in PHASES}
            phases.append((f"{1 - kept:.1%}", label.split(" (")[0], spent, run.seconds))

    print("\nWhere the time went (seconds, summed over the stages; other: copying the base model and the "
          "run's own bookkeeping)\n")
    print(f"| params pruned | method | {' | '.join(PHASES)} | other | total |")
    print("|---|---|" + "---:|" * (len(PHASES) + 2))
    for pruned, label, spent, total in phases:
        print(f"| {pruned} | {label} | {' | '.join(f'{spent[p]:.1f}' for p in PHASES)} | "
              f"{total - sum(spent.values()):.1f} | {total:.1f} |")


if __name__ == "__main__":
    from _cli import run

    run(main)
