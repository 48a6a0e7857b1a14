"""Evaluator overhead: one ``evaluate()`` against a plain hand-written PyTorch loop doing the same work.

Both sides start from the trained base model and do the same steps on the same device and data:
prune the policy's channels (the hand loop gets the pruned copy for free: it reuses the evaluator's
pruner, so the ratio shows the evaluator's overhead *including* pruning), recalibrate BN on
``bn_batches`` batches, fine-tune ``steps`` SGD steps (momentum 0.9, wd 5e-4, cosine LR, random-crop
augmentation), score the validation split, count FLOPs. Run:

    .venv/bin/python benchmarks/evaluator.py [--steps 50] [--repeats 5] [--model resnet20]

Figures are medians of ``repeats`` runs (evaluator and hand loop alternating), printed as ratios of one
run of this script (the machine is shared and noisy: compare ratios, not seconds, across runs).

``--agents amc,netadapt`` also times whole agent runs (AMC: ``--episodes`` episodes; NetAdapt: one
iteration, a proposal per group) against the time spent inside the evaluations they contain: the
ratio is the agent's own overhead (environment steps, DDPG updates, recording trials in the study).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from autoprune.config import SearchConfig, SourceConfig
from autoprune.runner import make_evaluator, prepare


def hand_loop(model, data, device, steps, bn_batches, batch_size, lr, seed):
    """What a person would write by hand for the same job."""
    g = torch.Generator(device=device).manual_seed(seed)
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    xtr = (data.train.x.to(device).float() / 255 - mean) / std
    ytr = data.train.y.to(device)
    xva = (data.val.x.to(device).float() / 255 - mean) / std
    yva = data.val.y.to(device)
    n, size = len(ytr), xtr.shape[-1]
    pad = max(1, size // 8)

    def batch(augment):
        idx = torch.randint(0, n, (batch_size,), device=device, generator=g)
        x = xtr[idx]
        if augment:
            xp = F.pad(x, (pad, pad, pad, pad))
            dy = torch.randint(0, 2 * pad + 1, (batch_size, 1, 1), device=device, generator=g)
            dx = torch.randint(0, 2 * pad + 1, (batch_size, 1, 1), device=device, generator=g)
            rows = (torch.arange(size, device=device).view(1, -1, 1) + dy).expand(-1, -1, size)
            cols = (torch.arange(size, device=device).view(1, 1, -1) + dx).expand(-1, size, -1)
            b = torch.arange(batch_size, device=device).view(-1, 1, 1)
            x = xp.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2)
        return x, ytr[idx]

    m = model
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    m.train()
    with torch.no_grad():
        for _ in range(bn_batches):
            m(batch(False)[0])
    for bn in bns:
        bn.momentum = 0.1
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * s / steps))
        x, y = batch(True)
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        acc = (m(xva).argmax(1) == yva).float().mean().item()
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--amp", default="auto", choices=("auto", "on", "off"),
                    help="the evaluator's bf16 autocast (auto: on CUDA); the hand loop never uses it")
    ap.add_argument("--agents", default="", help="also time these agents' runs: amc, netadapt")
    ap.add_argument("--episodes", type=int, default=10, help="AMC episodes to time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    setup = prepare(SourceConfig(model=args.model, dataset="digits"), device=args.device)
    config = SearchConfig(budgets={"flops": "50%"}, bn_batches=20, device=args.device, amp=args.amp)
    ev = make_evaluator(setup.model, setup.task, config.to_dict(), device=args.device, amp=config.amp_setting(),
                        info=setup.info)
    policy = ev.uniform(args.ratio)
    ev.evaluate(policy, args.steps)  # warm-up: importance scores, allocator, kernels

    def timed_once(fn):
        if ev.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if ev.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def timed(fn):
        return statistics.median(timed_once(fn) for _ in range(args.repeats))

    def evaluator_once():
        ev._cache.clear()
        ev.evaluate(policy, args.steps)

    def hand_once():
        model = ev.pruner.prune(policy)
        hand_loop(model, setup.task.data, ev.device, args.steps, ev.bn_batches, setup.task.batch_size,
                  ev.finetune_lr, 0)

    # the two sides alternate, so that load that comes and goes on a shared machine hits both alike
    pairs = [(timed_once(evaluator_once), timed_once(hand_once)) for _ in range(args.repeats)]
    t_eval = statistics.median(e for e, _ in pairs)
    t_hand = statistics.median(h for _, h in pairs)
    t_prune = timed(lambda: ev.pruner.prune(policy))
    pruned = ev.pruner.prune(policy)
    t_flops = timed(lambda: ev.measure(pruned))

    print(f"device {ev.device}, autocast {ev.amp}, model {args.model} on digits, uniform ratio {args.ratio}, "
          f"{args.steps} fine-tune steps, {ev.bn_batches} BN batches, median of {args.repeats}")
    print()
    print("| measure | seconds | ratio to the hand loop |")
    print("| --- | --- | --- |")
    print(f"| evaluator.evaluate() | {t_eval:.3f} | {t_eval / t_hand:.3f} |")
    print(f"| hand-written loop (incl. pruning) | {t_hand:.3f} | 1.000 |")
    print(f"| of which pruning a copy | {t_prune:.3f} | {t_prune / t_hand:.3f} |")
    print(f"| scoring + FLOPs/params count | {t_flops:.3f} | {t_flops / t_hand:.3f} |")
    agents = [a for a in args.agents.split(",") if a]
    if agents:
        print()
        print("| agent run | evaluations | wall s | inside evaluate() s | ratio |")
        print("| --- | --- | --- | --- | --- |")
        for agent in agents:
            n, wall, inside = time_agent(agent, setup, config, args)
            print(f"| {agent} | {n} | {wall:.2f} | {inside:.2f} | {wall / inside:.3f} |")


def time_agent(agent: str, setup, config: SearchConfig, args) -> tuple[int, float, float]:
    """One agent run on a fresh evaluator and in-memory study: (evaluations, wall, seconds inside evaluate)."""
    import optuna

    from autoprune.agents import Limits, SearchContext, get_agent
    from autoprune.budget import Budgets
    from autoprune.study import open_study

    ev = make_evaluator(setup.model, setup.task, config.to_dict(), device=args.device, info=setup.info)
    inside = 0.0
    evaluate = ev.evaluate

    def timed_evaluate(*a, **kw):
        nonlocal inside
        t0 = time.perf_counter()
        try:
            return evaluate(*a, **kw)
        finally:
            inside += time.perf_counter() - t0

    ev.evaluate = timed_evaluate
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    agent_cls = get_agent(agent)
    study = open_study(f"time-{agent}", None, directions=agent_cls.directions(ev.task),
                       metric_names=agent_cls.metric_names(ev.task))  # in memory
    if agent == "amc":
        trials, options = args.episodes, {"warmup": max(1, args.episodes // 2)}
    elif agent == "netadapt":  # one iteration: one proposal per group, no long-term fine-tune
        trials, options = len(ev.space.names), {"long_steps": 0, "initial": 0.05}
    else:
        raise SystemExit(f"--agents: no timing recipe for {agent!r} (amc, netadapt)")
    ctx = SearchContext(ev, Budgets(config.budget_list(), ev, config.max_ratio), study, agent,
                        limits=Limits(trials), seed=0, finetune_steps=args.steps)
    t0 = time.perf_counter()
    agent_cls(**options).search(ctx)
    wall = time.perf_counter() - t0
    return ev.evaluations, wall, inside


if __name__ == "__main__":
    from _cli import run

    run(main)
