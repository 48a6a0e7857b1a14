"""How well does the search's score predict the accuracy a policy ends with? Kendall's tau, measured.

A search ranks candidates by a cheap proxy: adaptive BN (EagleEye's batch-norm recalibration) plus
``--finetune-steps`` SGD steps, scored on the validation split. The user keeps the accuracy after the
final fine-tune. If the two rank candidates differently, the search optimises noise.

For ``--candidates`` random policies at one FLOPs budget (drawn as the ``random`` agent draws them,
shifted onto the budget) plus the uniform policy, this script scores every policy with each proxy of
``--proxy-steps`` (validation objective and validation loss) and after the final fine-tune
(``--final-steps``, test split), then prints Kendall's tau between each proxy and the final accuracy.
It also fine-tunes the uniform policy under ``--noise-seeds`` other batch seeds, to show how far the
final accuracy of one policy moves with the batches alone (the noise floor a ranking works against).
Raw figures go to ``--json``.

``--around POLICY.json`` draws the candidates near a policy instead (a search's best, say): every ratio
moved by a normal step of std ``--sigma`` on the logit scale, then shifted onto the budget, and the policy
itself added. With the final fine-tune as one of the proxies (``--proxy-steps 0,300``) this shows how much
better than that policy a search could still do near it, were it to score candidates as the user does.

    .venv/bin/python benchmarks/proxy.py --dataset fashionmnist --data-root /usr/share/datasets/fashion-mnist \\
        --pretrain-steps 8000 --budget 30% --candidates 30 --proxy-steps 0,10,50 --final-steps 300
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr

from autoprune.budget import Budgets, parse_budget
from autoprune.config import SourceConfig
from autoprune.errors import InputError
from autoprune.policy import Policy
from autoprune.runner import make_evaluator, prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--budget", default="30%", help="FLOPs kept")
    ap.add_argument("--candidates", type=int, default=30)
    ap.add_argument("--proxy-steps", default="0,10,50", help="fine-tune steps of the proxies compared")
    ap.add_argument("--final-steps", type=int, default=300)
    ap.add_argument("--finetune-lr", type=float, default=0.01)
    ap.add_argument("--noise-seeds", type=int, default=2, help="other batch seeds for the uniform policy")
    ap.add_argument("--around", default=None, metavar="POLICY.json",
                    help="draw the candidates near this policy instead of at random")
    ap.add_argument("--sigma", type=float, default=0.4, help="with --around: std of each ratio's step, logit scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write every figure here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    proxies = [int(s) for s in args.proxy_steps.split(",")]

    setup = prepare(SourceConfig(model=args.model, dataset=args.dataset, data_root=args.data_root,
                                 pretrain_steps=args.pretrain_steps), device="cpu",
                    log=lambda m: print(f"<!-- {m} -->"))
    settings = {"seed": args.seed, "finetune_lr": args.finetune_lr}
    ev = make_evaluator(setup.model, setup.task, settings, device="cpu", info=setup.info)
    budgets = Budgets([parse_budget("flops", args.budget)], ev)
    rng = np.random.default_rng(args.seed)
    names = ev.space.names
    policies = [("uniform", ev.policy(budgets.fit()))]
    if args.around:
        given = Policy.load(args.around).ratios
        if set(given) != set(names):
            raise InputError(f"--around {args.around}: its groups are not those of {args.model}'s pruning space "
                             f"({len(given)} against {len(names)})")
        centre = np.array([given[n] for n in names]).clip(1e-3, 1 - 1e-3)
        policies.append(("around", ev.policy(budgets.fit(dict(zip(names, centre.tolist()))))))
    for i in range(args.candidates):
        if args.around:
            step = np.log(centre / (1 - centre)) + rng.normal(0.0, args.sigma, size=len(names))
            raw = 1 / (1 + np.exp(-step))
        else:
            raw = rng.uniform(0.0, budgets.max_ratio, size=len(names))
        label = "near" if args.around else "random"
        policies.append((f"{label}-{i}", ev.policy(budgets.fit(dict(zip(names, raw.tolist()))))))

    rows = []
    t0 = time.perf_counter()
    for label, policy in policies:
        row = {"policy": label, "ratios": policy.ratios, "flops_ratio": ev.cost(policy)["flops"] / ev.space.base_flops}
        built = None
        for k in proxies:
            if k == args.final_steps:  # the final fine-tune as a proxy: the same model, scored on validation
                built = ev.build(policy, k)
                r = ev.measure(built, "val", k)
            else:
                r = ev.evaluate(policy, k)
            row[f"val@{k}"], row[f"val_loss@{k}"] = r.score, r.loss
        final = ev.measure(built or ev.build(policy, args.final_steps), "test", args.final_steps)
        row["final_test"] = final.score
        rows.append(row)
        print(f"<!-- {label}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                           if isinstance(v, float)) + f" ({time.perf_counter() - t0:.0f} s) -->",
              flush=True)

    noise = [rows[0]["final_test"]]
    for s in range(1, args.noise_seeds + 1):
        other = make_evaluator(setup.model, setup.task, {**settings, "seed": args.seed + 1000 * s}, device="cpu",
                               info=setup.info)
        noise.append(other.measure(other.build(policies[0][1], args.final_steps), "test").score)

    final = [r["final_test"] for r in rows]
    drawn = f"the given policy and {args.candidates} near it (sigma {args.sigma:g})" if args.around else \
        f"{args.candidates} random"
    print(f"\n{args.model} on {args.dataset}, {args.budget} FLOPs, {len(rows)} policies (uniform + "
          f"{drawn}), final fine-tune {args.final_steps} steps at LR {args.finetune_lr}, "
          f"test split\n")
    print(f"final test accuracy over the policies: mean {statistics.mean(final):.2%}, std "
          f"{statistics.stdev(final):.2%}, min {min(final):.2%}, max {max(final):.2%}; uniform {final[0]:.2%}"
          + (f", the given policy {final[1]:.2%}" if args.around else ""))
    print(f"uniform policy under {len(noise)} batch seeds: {', '.join(f'{v:.2%}' for v in noise)} "
          f"(std {statistics.stdev(noise):.2%})\n")
    print("| proxy (validation) | Kendall tau | p | Spearman rho | best by proxy: final test | its rank |")
    print("|---|---|---|---|---|---|")
    order = np.argsort(final)[::-1]
    for k in proxies:
        for key, sign in ((f"val@{k}", 1), (f"val_loss@{k}", -1)):
            proxy = [sign * r[key] for r in rows]
            tau, p = kendalltau(proxy, final)
            rho, _ = spearmanr(proxy, final)
            pick = int(np.argmax(proxy))
            rank = int(np.where(order == pick)[0][0]) + 1
            what = f"accuracy after BN + {k} steps" if key.startswith("val@") else f"loss after BN + {k} steps"
            print(f"| {what} | {tau:.3f} | {p:.3f} | {rho:.3f} | {final[pick]:.2%} | {rank} of {len(rows)} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "noise": noise}, indent=1))


if __name__ == "__main__":
    from _cli import run

    run(main)
