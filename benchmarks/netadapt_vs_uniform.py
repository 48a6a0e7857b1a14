"""NetAdapt against the uniform baseline at the same FLOPs budget, and the latency table's error.

    AUTOPRUNE_CACHE=/tmp/apcache .venv/bin/python benchmarks/netadapt_vs_uniform.py [--budget 50%]
        [--initial 0.1] [--long-steps 100] [--short-steps 0]

Both agents search the embedded default (ResNet-20 on digits) under one FLOPs budget; each final
policy is then fine-tuned for the same ``--long-steps`` steps by the shared evaluator and scored on
the validation and test splits. NetAdapt's first reduction target defaults to 10 % here (2.5 % in
the agent) to keep one run within a few minutes on 2 CPU cores. The latency table is built for the
same model (8x8 inputs, where per-call overhead dominates) and for ResNet-20 on 32x32 inputs (where
convolutions dominate), and compared with measured latency of uniformly and randomly pruned models.
Figures are ratios measured in this one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

import autoprune.agents.netadapt  # noqa: F401  (registers the agent)
from autoprune.agents import SearchContext, get_agent
from autoprune.budget import Budgets, parse_budget
from autoprune.config import SourceConfig
from autoprune.latency_table import LatencyTable, estimate_error
from autoprune.models import build_model
from autoprune.runner import make_evaluator, prepare
from autoprune.space import Space
from autoprune.study import open_study


def search(setup, agent: str, budget, options: dict, tmp: str):
    ev = make_evaluator(setup.model, setup.task, {"seed": 0}, device="cpu", info=setup.info)
    study = open_study(agent, f"sqlite:///{tmp}/{agent}.db")
    ctx = SearchContext(ev, Budgets([budget], ev), study, agent, seed=0)
    t0 = time.perf_counter()
    result = get_agent(agent)(**options).search(ctx)
    return ev, ctx, result, time.perf_counter() - t0


def table_error(space: Space, name: str, extra: list[dict], seed: int = 0) -> dict:
    table = LatencyTable.build(space, model=name, cache=False, repeats=3)
    rng = np.random.default_rng(seed)
    cands = [dict.fromkeys(space.names, r) for r in (0.0, 0.25, 0.5, 0.75, 0.9)]
    cands += [dict(zip(space.names, rng.uniform(0, 0.9, len(space.names)).tolist())) for _ in range(4)]
    report = estimate_error(table, cands + extra, repeats=5, rounds=3)
    report["build_seconds"] = table.seconds
    report["points"] = table.measurements
    report["candidates"] = len(cands) + len(extra)
    return report


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", default="50%")
    p.add_argument("--initial", type=float, default=0.1)
    p.add_argument("--long-steps", type=int, default=100)
    p.add_argument("--short-steps", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    setup = prepare(SourceConfig(), device="cpu", log=lambda *a: None)
    budget = parse_budget("flops", args.budget)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        na_opts = {"initial": args.initial, "short_steps": args.short_steps, "long_steps": args.long_steps}
        ev, ctx, res, secs = search(setup, "netadapt", budget, na_opts, tmp)
        final = ev.policy(res.info["final_ratios"])
        rows.append(("netadapt", final, ev, ctx.recorder.written, secs, res.info["final_short_score"]))
        uev, uctx, ures, usecs = search(setup, "uniform", budget, {}, tmp)
        rows.append(("uniform", ures.policy, uev, uctx.recorder.written, usecs, ures.evaluation.score))
        netadapt_policies = [ev.policy(p.ratios).ratios for p in [final]]

    steps = args.long_steps
    print(f"## NetAdapt vs uniform: ResNet-20 on digits, FLOPs <= {args.budget}, "
          f"then {steps} fine-tune steps for both\n")
    print(f"NetAdapt: initial {args.initial:.3g}, decay 0.96, step 8, short-term {args.short_steps} steps, "
          f"{res.info['iterations']} iterations\n")
    print("| agent | FLOPs kept | val acc, search proxy | val acc after fine-tune | test acc after fine-tune "
          "| evaluations | search s |")
    print("|---|---|---|---|---|---|---|")
    base_val = rows[0][2].baseline("val").score
    base_test = rows[0][2].baseline("test").score
    for name, policy, e, n, s, proxy in rows:
        val = e.evaluate(policy, steps, "val")
        test = e.evaluate(policy, steps, "test")
        print(f"| {name} | {val.flops / e.space.base_flops:.3f} | {proxy:.4f} | {val.score:.4f} | "
              f"{test.score:.4f} | {n} | {s:.0f} |")
    print(f"| unpruned | 1.000 | {base_val:.4f} | {base_val:.4f} | {base_test:.4f} | - | - |")
    ratios = rows[0][1].ratios
    print("\nNetAdapt's ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))

    print("\n## Latency lookup table: estimate vs measured whole pruned models (1 CPU thread)\n")
    print("| model | input | table points | build s | candidates | mean abs rel error | max abs rel error "
          "| rank agreement |")
    print("|---|---|---|---|---|---|---|---|")
    small = rows[0][2].space
    r = table_error(small, "resnet20-digits", netadapt_policies)
    print(f"| resnet20 (digits) | 8x8 | {r['points']} | {r['build_seconds']:.1f} | {r['candidates']} | "
          f"{r['mean_abs_rel_error']:.3f} | {r['max_abs_rel_error']:.3f} | {r['rank_agreement']:.3f} |")
    big = build_model("resnet20", 3, 10, 32).eval()
    space = Space.from_model(big, torch.zeros(1, 3, 32, 32))
    r = table_error(space, "resnet20-32", [])
    print(f"| resnet20 (random weights) | 32x32 | {r['points']} | {r['build_seconds']:.1f} | {r['candidates']} | "
          f"{r['mean_abs_rel_error']:.3f} | {r['max_abs_rel_error']:.3f} | {r['rank_agreement']:.3f} |")


if __name__ == "__main__":
    from _cli import run

    run(main)
