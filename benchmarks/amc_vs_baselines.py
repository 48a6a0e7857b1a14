"""AMC against the uniform and random baselines on the embedded default (ResNet-20 on digits).

Every agent gets the same FLOPs budget and, apart from uniform (one evaluation by construction), the
same number of evaluations; each searches its own fresh in-memory study with the same seed. Printed:
validation accuracy of the best feasible policy (what the search optimises), its test accuracy, its
FLOPs ratio, the evaluations spent and the wall time.

    .venv/bin/python benchmarks/amc_vs_baselines.py [--trials 100] [--budget 50%] [--warmup N]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import autoprune.agents.amc  # noqa: F401  (registers the agent)
from autoprune.config import SearchConfig, SourceConfig
from autoprune.runner import prepare, run_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100, help="evaluations per agent (default 100)")
    parser.add_argument("--budget", default="50%", help="FLOPs kept (default 50%%)")
    parser.add_argument("--warmup", type=int, default=None, help="AMC warm-up episodes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    setup = prepare(SourceConfig(), device="cpu", log=lambda s: None)
    runs = [("uniform", {}, 1), ("random", {}, args.trials), ("amc", {"warmup": args.warmup}, args.trials)]
    rows = []
    storage = f"sqlite:///{tempfile.mkdtemp(prefix='amc-bench-')}/bench.db"
    for agent, options, trials in runs:
        t0 = time.perf_counter()
        chosen = {k: v for k, v in options.items() if v is not None}
        config = SearchConfig(agent=agent, budgets={"flops": args.budget}, agent_options=chosen, storage=storage,
                              study=f"bench-{agent}", trials=trials, seed=args.seed, device="cpu")
        out = run_search(setup.model, setup.task, config, info=setup.info)
        wall = time.perf_counter() - t0
        base_flops = float(out.study.user_attrs["base"]["flops"])
        rows.append((agent, out.best.score, out.best_test.score, out.best.flops / base_flops,
                     out.new_trials, wall))

    print(f"ResNet-20 on digits, FLOPs budget {args.budget}, seed {args.seed}; unpruned val accuracy "
          f"{out.baseline_val.score:.4f}, test accuracy {out.baseline_test.score:.4f}\n")
    print("| agent | val accuracy | test accuracy | FLOPs ratio | evaluations | wall time (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for agent, val, test, ratio, n, wall in rows:
        print(f"| {agent} | {val:.4f} | {test:.4f} | {ratio:.3f} | {n} | {wall:.1f} |")


if __name__ == "__main__":
    from _cli import run

    run(main)
