"""Latency budgets against FLOPs budgets: per-layer latency against FLOPs, and what a latency budget buys.

Two parts, on one model and dataset (ResNet-20 on the embedded digits by default):

1. **Per-layer latency against FLOPs.** The latency lookup table (:mod:`autoprune.latency_table`, the one
   NetAdapt reads) is built at ``--latency-batch`` and at every ``--table-batches`` batch: each conv and
   linear layer timed standalone at full width, and the table's *rest* (what the layers do not account for:
   a fixed per-call part and a part per activation element, fitted on two whole-model timings). For every
   layer the table gives its share of the whole model's latency beside its share of the FLOPs. Uniform
   policies at ``--uniform-ratios`` are then really pruned and timed as whole models
   (:func:`autoprune.latency_table.estimate_error`, which times with :func:`autoprune.cost.measure_latency`),
   against their FLOPs and against the table's estimate. ``latency_vs_flops.png`` in ``-o DIR`` plots both
   (and, after part 2, the policies compared there). What pruning cannot remove (the fixed rest, the pinned
   layers and the residual streams they fix, the 10 % every group keeps) sets the least latency any policy
   reaches: uniform 0.9 in the sweep comes close to it, and the lines after the tables say whether it is
   within the latency budget at each batch.
2. **A latency budget against FLOPs budgets of the same measured latency.** Each of ``--agents`` (NetAdapt
   and sensitivity by default) searches under ``--budget-latency`` timed at ``--latency-batch``. For each
   such policy, each of ``--flops-methods`` (uniform and sensitivity under a FLOPs budget) is searched at the
   FLOPs budget whose policy has the same measured latency (``--match latency``: the FLOPs budget bisected
   to within ``--match-tol``, each step timing the candidate and the latency policy in alternation, so that
   load elsewhere on the machine hits both) and at the FLOPs the latency policy keeps (``--match flops``).
   Every policy found gets the same final fine-tune (``--final-steps``) and is scored on the test split;
   all of them are timed once more together, interleaved, for the table.

NetAdapt runs here with a first reduction target of 10 % (``initial=0.1``; the agent's default is 2.5 %,
which takes about 40 iterations of 11 proposals each to shed half the latency) and without its own
long-term fine-tune (``long_steps=0``: the final fine-tune below replaces it); its latency table is this
run's (``<out>/latency-tables``). ``--option netadapt.initial=0.025`` and the like change that. Every search
is an ordinary study in ``<out>/latency.db`` and every final score is kept in ``<out>/results.json``, so an
interrupted run resumes. Latency depends on the machine and on ``--threads`` (the tables are keyed by both);
figures are ratios measured in this one run. Run (Fashion-MNIST from ``apt-get install
dataset-fashion-mnist``; the 8000-step ResNet-20 is trained once and cached):

    .venv/bin/python benchmarks/latency.py --dataset fashionmnist --data-root /usr/share/datasets/fashion-mnist \\
        --pretrain-steps 8000 --budget-latency 50% -o bench/latency

(``--skip-search`` runs part 1 alone, in about two minutes.) When the latency policy is found, a policy
of a FLOPs method is *matched* when its measured latency is at most the latency policy's; the bisection
keeps the largest such FLOPs budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch

from autoprune.agents import Reporter
from autoprune.budget import bisect, parse_budget
from autoprune.config import SearchConfig, SourceConfig
from autoprune.cost import count_flops
from autoprune.errors import InputError, ParameterError
from autoprune.latency_table import LatencyTable, estimate_error, standalone
from autoprune.runner import make_evaluator, prepare, run_search

LATENCY_AGENTS = ("netadapt", "sensitivity")
FLOPS_METHODS = ("uniform", "sensitivity")
# this benchmark's NetAdapt: a faster first target, and no long-term fine-tune (the final fine-tune replaces it)
AGENT_DEFAULTS = {"netadapt": {"initial": "0.1", "long_steps": "0"}}
SEARCH_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SearchConfig)}


class Log(Reporter):
    """An agent's progress messages as Markdown comments (NetAdapt's iterations, the table being built)."""

    def __init__(self, label: str) -> None:
        self.label = label

    def message(self, text: str) -> None:
        log(f"{self.label}: {text}")


def log(text: str) -> None:
    print(f"<!-- {text} -->", flush=True)


def fail(text: str) -> NoReturn:
    """Bad input: one line on stderr and exit code 2, as the command line does."""
    print(text, file=sys.stderr)
    raise SystemExit(2)


# -- part 1: per-layer latency against FLOPs --------------------------------------------------------

def build_table(ev, name: str, batch: int, directory: Path) -> LatencyTable:
    """The table NetAdapt would build (its default grid step and repeats), cached in ``directory``."""
    t0 = time.perf_counter()
    table = LatencyTable.build(ev.space, model=name, step=8, repeats=5, batch=batch, directory=directory)
    log(f"latency table at batch {batch}: {table.measurements} points measured in {time.perf_counter() - t0:.0f} s"
        + ("" if table.measurements else " (cached)"))
    return table


def layer_shares(table: LatencyTable) -> dict[str, Any]:
    """Each conv/linear layer at full width: its FLOPs (counted on the table's standalone layer) and its
    latency (the table's entry), and the table's rest, all as shares of the whole model's."""
    space = table.space
    rows = []
    for layer in table.layers:
        module, x = standalone(space, layer, layer.in_channels, layer.out_channels)
        rows.append({"name": layer.name, "in": layer.in_channels, "out": layer.out_channels,
                     "spatial": "×".join(map(str, layer.output_shape[2:])) or "1",
                     "flops": count_flops(module, x),
                     "latency": table.layer_latency(layer.name, layer.in_channels, layer.out_channels)})
    total = table.base  # the layers plus the rest: the measured unpruned latency, by construction
    layers = sum(r["latency"] for r in rows)
    return {"rows": rows, "total": total, "measured": table.full, "layers": layers, "fixed": table.rest,
            "per_element": total - layers - table.rest, "flops": sum(r["flops"] for r in rows)}


def uniform_sweep(table: LatencyTable, ev, ratios: list[float], repeats: int, rounds: int) -> list[dict]:
    """Uniform policies really pruned and timed as whole models (interleaved), with the table's estimate."""
    names = ev.space.names
    cands = [dict.fromkeys(names, r) for r in [0.0, *ratios]]
    report = estimate_error(table, cands, pruner=ev.pruner, repeats=repeats, rounds=rounds)
    base_m, base_e = report["rows"][0]["measured"], report["rows"][0]["estimate"]
    out = []
    for r, cand, row in zip([0.0, *ratios], cands, report["rows"]):
        out.append({"ratio": r, "flops": ev.space.flops(cand) / ev.space.base_flops,
                    "measured": row["measured"] / base_m, "estimate": row["estimate"] / base_e,
                    "seconds": row["measured"]})
    return out


def part1_report(shares: Mapping[int, dict], sweeps: Mapping[int, list[dict]], errors: Mapping[int, dict],
                 title: str) -> str:
    batches = sorted(shares)
    first = shares[batches[0]]
    lines = [f"\n## Per-layer latency against FLOPs: {title}\n",
             "Each conv/linear layer at full width, timed standalone by the latency table "
             "(`autoprune.latency_table`), as a share of the table's whole-model latency (its layers plus its "
             "rest, equal to the measured unpruned latency), beside its share of the FLOPs.\n",
             "| layer | channels in→out, output | FLOPs share | " + " | ".join(f"latency share, batch {b}"
                                                                          for b in batches) + " |",
             "|---|---|---|" + "---|" * len(batches)]
    for i, row in enumerate(first["rows"]):
        cells = [f"{shares[b]['rows'][i]['latency'] / shares[b]['total']:.1%}" for b in batches]
        lines.append(f"| {row['name']} | {row['in']}→{row['out']}, {row['spatial']} | "
                     f"{row['flops'] / first['flops']:.1%} | " + " | ".join(cells) + " |")
    lines.append("| **all conv/linear layers** | | 100.0% | "
                 + " | ".join(f"**{shares[b]['layers'] / shares[b]['total']:.1%}**" for b in batches) + " |")
    lines.append("| rest, fixed (per-call overhead) | | — | "
                 + " | ".join(f"{shares[b]['fixed'] / shares[b]['total']:.1%}" for b in batches) + " |")
    lines.append("| rest, per activation element (BN, ReLU, additions) | | — | "
                 + " | ".join(f"{shares[b]['per_element'] / shares[b]['total']:.1%}" for b in batches) + " |")
    lines.append(f"| whole model, measured | | {first['flops'] / 1e6:.3g}M MACs | "
                 + " | ".join(f"{shares[b]['measured'] * 1e3:.3g} ms" for b in batches) + " |")
    lines += ["", "Uniform policies, pruned and timed as whole models (`cost.measure_latency`, interleaved), "
              "latency kept measured and as the table estimates it:\n",
              "| uniform ratio | FLOPs kept | " + " | ".join(f"latency kept, batch {b} (table)" for b in batches)
              + " |", "|---|---|" + "---|" * len(batches)]
    for i, row in enumerate(sweeps[batches[0]]):
        if i == 0:
            continue
        cells = [f"{sweeps[b][i]['measured']:.1%} ({sweeps[b][i]['estimate']:.1%})" for b in batches]
        lines.append(f"| {row['ratio']:g} | {row['flops']:.1%} | " + " | ".join(cells) + " |")
    lines.append("| table vs measured: mean abs error, rank agreement | | "
                 + " | ".join(f"{errors[b]['mean_abs_rel_error']:.1%}, {errors[b]['rank_agreement']:.2f}"
                              for b in batches) + " |")
    return "\n".join(lines)


# -- part 2: a latency budget against FLOPs budgets of the same latency ------------------------------

def options_of(given: list[str]) -> dict[str, dict[str, str]]:
    """``--option agent.name=value`` items over this benchmark's agent defaults."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for agent, opts in AGENT_DEFAULTS.items():
        out[agent].update(opts)
    for item in given:
        key, sep, value = item.partition("=")
        agent, dot, name = key.partition(".")
        if not sep or not dot:
            fail(f"--option {item}: write agent.name=value, e.g. netadapt.initial=0.025")
        out[agent][name.replace("-", "_")] = value
    return out


def search_config(args, options: Mapping[str, Mapping[str, str]], agent: str, budgets: dict[str, str],
                  study: str | None = None, storage: str | None = None, table_dir: Path | None = None) -> SearchConfig:
    """The settings every search of part 2 shares, with ``agent``'s options (checked here)."""
    opts = dict(options.get(agent, {}))
    if agent == "netadapt" and "latency" in budgets and table_dir is not None:
        opts.setdefault("table_dir", str(table_dir))
    return SearchConfig(agent=agent, budgets=budgets, trials=args.trials, finetune_steps=args.finetune_steps,
                        seed=args.seed, device="cpu", latency_batch=args.latency_batch, storage=storage,
                        study=study, agent_options=opts)


class Runner:
    """The searches of part 2, all in one storage, with the settings shared by every one of them."""

    def __init__(self, setup, args, out: Path, options: Mapping[str, Mapping[str, str]]) -> None:
        self.setup, self.args, self.options = setup, args, options
        self.storage = f"sqlite:///{out / 'latency.db'}"
        self.table_dir = out / "latency-tables"
        self.prefix = f"{setup.info['name']}-{setup.task.name}"

    def search(self, agent: str, budgets: dict[str, str], study: str):
        """One ordinary search (no final test): the outcome, or the one line saying why it has none."""
        config = search_config(self.args, self.options, agent, budgets, study, self.storage, self.table_dir)
        t0 = time.perf_counter()
        try:
            outcome = run_search(self.setup.model, self.setup.task, config, info=self.setup.info, final=False,
                                 reporter=Log(study))
        except InputError as e:
            return None, str(e), time.perf_counter() - t0
        if outcome.policy is None:
            return None, f"no feasible policy among {outcome.new_trials} new trials", time.perf_counter() - t0
        return outcome, "", time.perf_counter() - t0

    def latency_search(self, agent: str):
        return self.search(agent, {"latency": self.args.budget_latency},
                           f"{self.prefix}-{agent}-latency{self.args.budget_latency}-b{self.args.latency_batch}"
                           f"-s{self.args.seed}")

    def flops_search(self, method: str, fraction: float):
        budget = f"{fraction * 100:.4g}%"
        outcome, why, secs = self.search(method, {"flops": budget}, f"{self.prefix}-{method}-flops{budget}"
                                                                     f"-s{self.args.seed}")
        return budget, outcome, why, secs


def timed_pair(table: LatencyTable, ev, a: Mapping[str, float], b: Mapping[str, float], repeats: int,
               rounds: int) -> float:
    """Measured latency of ``b`` over that of ``a``, the two timed in alternation."""
    rows = estimate_error(table, [a, b], pruner=ev.pruner, repeats=repeats, rounds=rounds)["rows"]
    return rows[1]["measured"] / rows[0]["measured"]


def match_latency(runner: Runner, method: str, target: Mapping[str, float], f0: float, f_min: float,
                  table: LatencyTable, ev, args) -> dict[str, Any]:
    """The largest FLOPs budget (to within ``--match-tol``) whose ``method`` policy is timed no slower than
    ``target``; the steps tried are kept in ``tried``."""
    tried: dict[float, dict[str, Any]] = {}

    def fits(removed: float) -> bool:
        fraction = 1.0 - removed
        budget, outcome, why, secs = runner.flops_search(method, fraction)
        if outcome is None:
            log(f"{method} at {budget} FLOPs: {why}")
            tried[removed] = {"budget": budget, "why": why, "seconds": secs}
            return False
        ratios = outcome.policy.ratios
        rel = timed_pair(table, ev, target, ratios, args.timing_repeats, args.timing_rounds)
        tried[removed] = {"budget": budget, "outcome": outcome, "ratios": ratios, "relative": rel, "seconds": secs}
        log(f"{method} at {budget} FLOPs: {rel:.3f} of the latency policy's latency")
        return rel <= 1.0

    x0, x_max = 1.0 - f0, 1.0 - f_min
    if fits(x0):
        lo, hi = 0.0, x0
    elif x_max > x0 and fits(x_max):
        lo, hi = x0, x_max
    else:  # even the most pruning this method allows is slower: report that
        last = tried[x_max] if x_max in tried else tried[x0]
        return {**last, "reached": False, "steps": len(tried), "seconds": spent(tried)}
    x = bisect(fits, lo, hi, tol=args.match_tol)
    return {**tried[x], "reached": True, "steps": len(tried), "seconds": spent(tried)}


def spent(tried: Mapping[float, dict]) -> float:
    """Search seconds over every step of a bisection (not counting the timings that compare them)."""
    return sum(t.get("seconds") or 0.0 for t in tried.values())


def final_score(judge, outcome, ratios: Mapping[str, float], key: str, results: dict, path: Path,
                steps: int) -> dict[str, Any]:
    """``ratios`` pruned with its search's own settings (criterion, refit), the final fine-tune, the test
    split (kept in ``results`` under ``key``, with the ratios it was measured on)."""
    row = results.get(key)
    if row is not None and row.get("ratios") == dict(ratios) and row.get("final_steps") == steps:
        return row
    t0 = time.perf_counter()
    model = outcome.evaluator.pruner.prune(outcome.evaluator.policy(ratios))
    test = judge.measure(judge.finish(model, steps), "test", steps)
    row = {"ratios": dict(ratios), "final_steps": steps, "test": test.score,
           "flops": test.flops / judge.space.base_flops, "seconds": time.perf_counter() - t0}
    results[key] = row
    path.write_text(json.dumps(results, indent=1))
    log(f"{key}: test {test.score:.2%} after {steps} final steps ({row['seconds']:.0f} s)")
    return row


def plot(shares: Mapping[int, dict], sweeps: Mapping[int, list[dict]], points: list[dict], batch: int,
         path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    markers = "osD^v<>"
    for i, (b, s) in enumerate(sorted(shares.items())):
        xs = [100 * r["flops"] / s["flops"] for r in s["rows"]]
        ys = [100 * r["latency"] / s["total"] for r in s["rows"]]
        left.scatter(xs, ys, marker=markers[i % len(markers)], alpha=0.75,
                     label=f"batch {b} (rest: {100 * (s['total'] - s['layers']) / s['total']:.0f} % of latency)")
    top = max(max(100 * r["flops"] / s["flops"] for r in s["rows"]) for s in shares.values())
    top = max(top, max(max(100 * r["latency"] / s["total"] for r in s["rows"]) for s in shares.values()))
    left.plot([0, top], [0, top], color="grey", linestyle=":", label="latency share = FLOPs share")
    left.set_xlabel("share of the model's FLOPs (%)")
    left.set_ylabel("share of the model's latency (%), standalone layer")
    left.set_title("per conv/linear layer, full width")
    left.legend(fontsize=8)
    for i, (b, rows) in enumerate(sorted(sweeps.items())):
        line = right.plot([100 * r["flops"] for r in rows], [100 * r["measured"] for r in rows],
                          marker=markers[i % len(markers)], label=f"uniform, measured, batch {b}")
        right.plot([100 * r["flops"] for r in rows], [100 * r["estimate"] for r in rows], linestyle="--",
                   color=line[0].get_color(), alpha=0.6, label=f"uniform, table estimate, batch {b}")
    for p in points:
        right.scatter([100 * p["flops"]], [100 * p["latency"]], marker="*", s=120, zorder=3,
                      label=f"{p['label']} (batch {batch})")
    right.plot([0, 100], [0, 100], color="grey", linestyle=":")
    right.set_xlabel("FLOPs kept (%)")
    right.set_ylabel("measured latency kept (%)")
    right.set_title("whole pruned models")
    right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--pretrain-steps", type=int, default=None, help="of the cached pretrained model "
                    "(default: the search's, 500)")
    ap.add_argument("--budget-latency", default="50%", help="latency kept by the latency searches")
    ap.add_argument("--latency-batch", type=int, default=SEARCH_DEFAULTS['latency_batch'],
                    help="samples per timed pass of the searches and the comparison (default: the search's)")
    ap.add_argument("--table-batches", default="1,256",
                    help="further batches of the per-layer table and the uniform sweep (comma separated; '' for none)")
    ap.add_argument("--uniform-ratios", default="0.25,0.5,0.75,0.9", help="uniform policies timed whole")
    ap.add_argument("--agents", default=",".join(LATENCY_AGENTS), help="agents searching under the latency budget")
    ap.add_argument("--flops-methods", default=",".join(FLOPS_METHODS),
                    help="agents searching under the FLOPs budgets they are compared with")
    ap.add_argument("--match", default="latency,flops",
                    help="latency: the FLOPs budget of the same measured latency (bisected); flops: the FLOPs "
                    "the latency policy keeps; both by default")
    ap.add_argument("--match-tol", type=float, default=0.01, help="of the bisected FLOPs budget (fraction kept)")
    ap.add_argument("--trials", type=int, default=None, help="evaluations per search (default: the agent's; "
                    "NetAdapt ends when the budget holds)")
    ap.add_argument("--finetune-steps", type=int, default=0, help="fine-tune steps of every evaluation")
    ap.add_argument("--final-steps", type=int, default=300, help="the final fine-tune every policy gets")
    ap.add_argument("--option", action="append", default=[],
                    help="an agent's option, agent.name=value (netadapt.initial=0.025); repeatable")
    ap.add_argument("--timing-repeats", type=int, default=10, help="timed passes per model and round")
    ap.add_argument("--timing-rounds", type=int, default=3, help="rounds over the models timed together; the "
                    "least median is kept")
    ap.add_argument("--skip-search", action="store_true", help="part 1 only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--out", default="bench/latency")
    args = ap.parse_args()
    try:
        parse_budget("latency", args.budget_latency)
    except ParameterError as e:
        fail(e.for_cli())
    if args.latency_batch < 1:
        fail(f"--latency-batch {args.latency_batch}: must be an integer >= 1")
    options = options_of(args.option)
    unknown = sorted(set(m.strip() for m in args.match.split(",") if m.strip()) - {"latency", "flops"})
    if unknown:
        fail(f"--match {unknown[0]}: choose from latency, flops")
    agents = [a for a in args.agents.split(",") if a]
    methods = [m for m in args.flops_methods.split(",") if m]
    # every agent name and option checked before anything runs, named as this script's flags name them
    for flag, names, budgets in (("--agents", agents, {"latency": args.budget_latency}),
                                 ("--flops-methods", methods, {"flops": "50%"})):
        for agent in names:
            try:
                search_config(args, options, agent, budgets)
            except ParameterError as e:
                if e.agent:
                    fail(f"--option {agent}.{e.name}={e.value}: {e.allowed}")
                fail(f"{flag} {agent}: {e.allowed}" if e.name == "agent" else e.for_cli())
            except InputError as e:
                fail(str(e))
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    batches = sorted({args.latency_batch, *(int(b) for b in args.table_batches.split(",") if b.strip())})
    try:
        setup = prepare(SourceConfig(model=args.model, dataset=args.dataset, data_root=args.data_root,
                                     pretrain_steps=args.pretrain_steps), device="cpu", log=log)
    except InputError as e:
        fail(str(e))
    name = setup.info["name"]
    title = f"{name} on {setup.task.name}, CPU ({args.threads} thread{'s' if args.threads > 1 else ''})"
    # part 1: the tables, their per-layer shares, and uniform policies timed whole
    judge = make_evaluator(setup.model, setup.task, {"seed": args.seed, "latency_batch": args.latency_batch},
                           device="cpu", info=setup.info)
    tables, shares, sweeps, errors = {}, {}, {}, {}
    ratios = [float(r) for r in args.uniform_ratios.split(",") if r.strip()]
    for b in batches:
        tables[b] = build_table(judge, name, b, out / "latency-tables")
        shares[b] = layer_shares(tables[b])
        t0 = time.perf_counter()
        sweeps[b] = uniform_sweep(tables[b], judge, ratios, args.timing_repeats, args.timing_rounds)
        errs = [r["estimate"] / r["measured"] - 1 for r in sweeps[b][1:]]
        pairs = [(p, q) for i, p in enumerate(sweeps[b]) for q in sweeps[b][i + 1:]]
        errors[b] = {"mean_abs_rel_error": sum(map(abs, errs)) / len(errs) if errs else math.nan,
                     "rank_agreement": (sum((p["estimate"] - q["estimate"]) * (p["measured"] - q["measured"]) > 0
                                            for p, q in pairs) / len(pairs)) if pairs else math.nan}
        log(f"batch {b}: {len(ratios) + 1} uniform policies timed whole in {time.perf_counter() - t0:.0f} s")
    if abs(shares[batches[0]]["flops"] - judge.space.base_flops) > 0.5:
        log(f"the conv/linear layers count {shares[batches[0]]['flops']} MACs of the model's "
            f"{judge.space.base_flops}: the rest is outside them")
    print(part1_report(shares, sweeps, errors, title))
    for b in batches:
        floor = sweeps[b][-1]
        budget = parse_budget("latency", args.budget_latency)
        note = "" if budget.fraction is None else (
            " — within" if floor["measured"] <= budget.fraction else " — beyond") + f" reach of {args.budget_latency}"
        print(f"\nBatch {b}: the unpruned model takes {shares[b]['measured'] * 1e3:.3g} ms; uniform "
              f"{floor['ratio']:g} keeps {floor['flops']:.1%} of the FLOPs and {floor['measured']:.1%} of the "
              f"latency{note}; the table's fixed rest alone is {shares[b]['fixed'] / shares[b]['total']:.1%}.")
    plot(shares, sweeps, [], args.latency_batch, out / "latency_vs_flops.png", title)
    log(f"wrote {out / 'latency_vs_flops.png'}")
    if args.skip_search:
        return

    # part 2: the latency searches and the FLOPs budgets they are compared with
    runner = Runner(setup, args, out, options)
    table = tables[args.latency_batch]
    most = dict.fromkeys(judge.space.names, SEARCH_DEFAULTS['max_ratio'])  # the most any search here removes
    f_min = judge.space.flops(most) / judge.space.base_flops + 1e-3
    match = [m.strip() for m in args.match.split(",") if m.strip()]
    rows: list[dict[str, Any]] = []
    for agent in agents:
        outcome, why, secs = runner.latency_search(agent)
        label = f"{agent}, latency ≤ {args.budget_latency}"
        if outcome is None:
            log(f"{label}: {why}")
            rows.append({"method": label, "budget": f"latency {args.budget_latency}", "why": why})
            continue
        if agent == "netadapt" and not outcome.info.get("budget_reached"):
            log(f"{label}: NetAdapt stopped before the budget held (trial limit?); scoring its best feasible trial")
        target = outcome.policy.ratios
        ended = outcome.info.get("final_ratios")
        if agent == "netadapt" and outcome.info.get("budget_reached") and ended:
            # NetAdapt's result is the policy its iterations end with; the study's best feasible trial can be
            # an earlier proposal whose one latency timing passed the budget on a busy moment
            if dict(ended) != dict(target):
                log(f"{label}: the study's best feasible trial is not the policy NetAdapt ended with; "
                    "scoring the latter")
            target = {n: float(r) for n, r in ended.items()}
        f0 = judge.space.flops(target) / judge.space.base_flops
        final = final_score(judge, outcome, target,
                            f"{agent}|latency{args.budget_latency}|b{args.latency_batch}|s{args.seed}",
                            results, results_path, args.final_steps)
        rows.append({"method": f"**{label}**", "budget": f"latency {args.budget_latency}", "ratios": target,
                     "test": final["test"], "flops": final["flops"], "search": secs, "anchor": True})
        for method in methods:
            found = []
            if "latency" in match:
                m = match_latency(runner, method, target, f0, f_min, table, judge, args)
                how = f"same latency as {agent}" + ("" if m.get("reached") else ", not reached")
                found.append((how, {**m, "budget": f"{m['budget']}, {m['steps']} steps"}))
            if "flops" in match:
                budget, o, why, s = runner.flops_search(method, f0)
                found.append((f"same FLOPs as {agent}", {"budget": budget, "outcome": o, "why": why, "seconds": s,
                                                         "ratios": o.policy.ratios if o else None}))
            for how, m in found:
                label = f"{method}, {how}"
                if m.get("outcome") is None:
                    rows.append({"method": label, "budget": f"FLOPs {m['budget']}", "why": m.get("why", "")})
                    continue
                key = f"{method}|flops{m['budget'].split(',')[0]}|s{args.seed}"
                final = final_score(judge, m["outcome"], m["ratios"], key, results, results_path, args.final_steps)
                rows.append({"method": label, "budget": f"FLOPs {m['budget']}", "ratios": m["ratios"],
                             "test": final["test"], "flops": final["flops"], "search": m.get("seconds"),
                             "steps": m.get("steps")})

    # every policy timed once more, together, interleaved with the unpruned model
    timed = [r for r in rows if "ratios" in r]
    rep = estimate_error(table, [{}] + [r["ratios"] for r in timed], pruner=judge.pruner,
                         repeats=args.timing_repeats, rounds=max(args.timing_rounds, 5))
    base_m, base_e = rep["rows"][0]["measured"], rep["rows"][0]["estimate"]
    for r, t in zip(timed, rep["rows"][1:]):
        r["latency"], r["estimate"], r["ms"] = t["measured"] / base_m, t["estimate"] / base_e, t["measured"] * 1e3
    base_test = judge.baseline("test").score
    print(f"\n## A latency budget against FLOPs budgets of the same measured latency: {title}\n")
    print(f"Latency timed at batch {args.latency_batch}; every policy got {args.final_steps} final fine-tune steps "
          f"(seed {args.seed}) and was scored on the test split. Latency kept: all policies timed together with "
          f"the unpruned model ({base_m * 1e3:.3g} ms), interleaved, the least of {max(args.timing_rounds, 5)} "
          "medians; in brackets the latency table's estimate. FLOPs budgets bisected to within "
          f"{args.match_tol:.0%} of the FLOPs.\n")
    print("| method | budget | FLOPs kept | latency kept (table) | latency ms | test accuracy | search s (all steps) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| unpruned | — | 100.0% | 100.0% | {base_m * 1e3:.3g} | {base_test:.2%} | — |")
    for r in rows:
        if "ratios" not in r:
            why = r["why"]
            if ">" in why and " (" in why[why.find(">"):]:  # the refusal's figures, not its advice
                why = why[:why.find(" (", why.find(">"))]
            print(f"| {r['method']} | {r['budget']} | — | — | — | not found: {why} | — |")
            continue
        search = f"{r['search']:.0f}" if r.get("search") is not None else "—"
        print(f"| {r['method']} | {r['budget']} | {r['flops']:.1%} | {r['latency']:.1%} ({r['estimate']:.1%}) "
              f"| {r['ms']:.3g} | {r['test']:.2%} | {search} |")
    plot(shares, sweeps, [{"label": r["method"].strip("*"), "flops": r["flops"], "latency": r["latency"]}
                          for r in timed], args.latency_batch, out / "latency_vs_flops.png", title)
    log(f"wrote {out / 'latency_vs_flops.png'}")


if __name__ == "__main__":
    from _cli import run

    run(main)
