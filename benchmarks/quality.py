"""Search quality on a real dataset: the accuracy of the policy each agent finds, at the same budget and cost.

For every model, FLOPs budget and seed, each agent searches with the same number of evaluations
(``--trials``, each one adaptive BN plus ``--finetune-steps`` SGD steps, scored on the validation
split; ``sensitivity`` spends its scan instead, groups x ratios probes shared by every budget of a
seed and counted once), and its best feasible policy is given the same final fine-tune
(``--final-steps``) and scored on the test split, which no search reads. Two peers outside
autoprune's agents get the same final fine-tune at the same FLOPs: Torch-Pruning's global magnitude
pruning (``MetaPruner`` with ``global_pruning=True``, its global ratio bisected to the budget) and
Torch-Pruning's uniform L1 pruning (the same, ``global_pruning=False``).

Prints, per model, a Markdown table of test accuracy (mean ± std over the seeds) per method and budget,
the search cost per agent (evaluations, wall and CPU seconds, as ratios to AMC's from this run), and
writes a plot of accuracy against FLOPs with error bars. Every search is an ordinary study in
``<out>/quality.db`` and every final score is kept in ``<out>/results.json``, so an interrupted run
resumes where it stopped. Run (Fashion-MNIST from ``apt-get install dataset-fashion-mnist``):

    .venv/bin/python benchmarks/quality.py --data-root /usr/share/datasets/fashion-mnist -o bench/quality
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune.budget import bisect
from autoprune.config import SearchConfig, SourceConfig
from autoprune.cost import count_flops
from autoprune.errors import InputError
from autoprune.runner import make_evaluator, prepare, run_search

AGENTS = ("uniform", "random", "amc", "netadapt", "sensitivity", "gates", "icepick")
# what fits in about an hour on 2 cores (ResNet-20, two budgets, three seeds): left out by default are the
# 50 % budget, MobileNetV2 (about 1 s per training step on 2 cores, so 300 final steps per policy alone take
# longer than a whole ResNet-20 row), NetAdapt (one proposal per group and iteration: 20 evaluations are
# less than two iterations over ResNet-20's 11 groups, so it cannot reach 30 % or 15 %) and ICE-Pick (whose
# trial is a whole iterative pruning run); give them with --budgets, --models and --agents
DEFAULT_AGENTS = ("uniform", "sensitivity", "random", "amc", "gates")
PEERS = ("tp-global", "tp-uniform")


def tp_pruned(ev, model: nn.Module, flops_limit: float, *, global_pruning: bool, max_ratio: float) -> nn.Module:
    """Torch-Pruning's L1 magnitude pruning of ``model`` at the largest FLOPs that fit ``flops_limit``: the
    pruning ratio is bisected (the same layers pinned as in autoprune's space)."""
    import copy

    import torch_pruning as tp

    pinned = {m for g in ev.space.groups if g.pinned for m in g.members}
    modules = dict(model.named_modules())

    def pruned(ratio: float) -> nn.Module:
        net = copy.deepcopy(model)
        named = dict(net.named_modules())
        pruner = tp.pruner.MetaPruner(net, ev.example_inputs, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, global_pruning=global_pruning,
                                      max_pruning_ratio=max_ratio, ignored_layers=[named[n] for n in pinned])
        pruner.step()
        return net

    assert all(n in modules for n in pinned)
    cache: dict[float, nn.Module] = {}

    def fits(ratio: float) -> bool:
        cache[ratio] = pruned(ratio)
        return count_flops(cache[ratio], ev.example_inputs) <= flops_limit

    ratio = bisect(fits, 0.0, max_ratio, tol=1e-3)
    return cache[ratio] if ratio in cache else pruned(ratio)


# search settings a method may set through --option (the rest are set by this script's own flags)
FIXED = ("agent", "budgets", "trials", "finetune_steps", "seed", "device", "storage", "study", "agent_options")


def split_options(given: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """A method's ``--option`` values split into search settings (``reconstruct``, ``criterion``, ...; a
    true/false setting parsed from its text) and the agent's own options (checked by the agent)."""
    fields = {f.name: f for f in dataclasses.fields(SearchConfig)}
    settings: dict[str, Any] = {}
    agent: dict[str, str] = {}
    for key, value in given.items():
        f = fields.get(key)
        if f is None:
            agent[key] = value
        elif key in FIXED:
            raise SystemExit(f"--option ...{key}={value}: {key} is set by this script's own flags")
        elif f.metadata.get("kind") is bool and isinstance(value, str):
            if value.lower() not in ("true", "false"):
                raise SystemExit(f"--option ...{key}={value}: write true or false")
            settings[key] = value.lower() == "true"
        else:
            settings[key] = value
    return settings, agent


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--dataset", default="fashionmnist")
    ap.add_argument("--models", default="resnet20=8000", help="model=pretrain steps, comma separated")
    ap.add_argument("--budgets", default="30,15", help="FLOPs kept, in percent (50,30,15 for all three)")
    ap.add_argument("--agents", default=",".join(DEFAULT_AGENTS),
                    help=f"agents to compare, of {','.join(AGENTS)}; label:agent:option=value:... runs an agent "
                    "with options under a label (amc-rec:amc:reconstruct=true is AMC with the least-squares refit)")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, default=20, help="evaluations per agent")
    ap.add_argument("--finetune-steps", type=int, default=0, help="fine-tune steps of every evaluation")
    ap.add_argument("--final-steps", type=int, default=300, help="the final fine-tune every best policy gets")
    ap.add_argument("--option", action="append", default=[],
                    help="agent or search option of a method, label.name=value (e.g. amc.warmup=5, "
                    "amc-rec.reconstruct=true, sensitivity.criterion=regression); repeatable")
    ap.add_argument("--report-only", action="store_true", help="print the table and draw the plot from the "
                    "results recorded so far, running nothing")
    ap.add_argument("--policies", default=None, metavar="DIR",
                    help="write each agent's best policy, with its final test score, to DIR (default <out>/policies)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--out", default="bench/quality")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{out / 'quality.db'}"
    results_path = out / "results.json"
    results = load_results(results_path)
    other = sorted({r.get("final_steps") for k, r in results.items() if k != "base" and r.get("feasible")}
                   - {args.final_steps})
    if other:  # a row is skipped once it is in results.json, so rows of another final fine-tune would be reported
        raise InputError(f"{results_path} holds final fine-tunes of {', '.join(map(str, other))} steps, not "
                         f"--final-steps {args.final_steps}; give -o another folder")
    options: dict[str, dict[str, str]] = defaultdict(dict)
    agent_of: dict[str, str] = {}
    for item in args.option:
        key, value = item.split("=", 1)
        agent, name = key.split(".", 1)
        options[agent][name.replace("-", "_")] = value
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    agents = [a.split(":")[0] for a in args.agents.split(",") if a]
    for spec in args.agents.split(","):  # label:agent:option=value:... runs an agent under another label
        label, *rest = spec.split(":")
        agent_of[label] = rest[0] if rest else label
        options[label].update(dict(item.split("=", 1) for item in rest[1:]))
    peers = [p for p in args.peers.split(",") if p]
    log = lambda m: print(f"<!-- {m} -->", flush=True)  # noqa: E731

    for spec in args.models.split(","):
        model_name, steps = spec.split("=")
        if args.report_only:
            print(report(results, model_name, budgets, agents + peers, args))
            plot(results, model_name, budgets, agents + peers, out / f"{model_name}.png", _seeds(args))
            write_policies(results, storage, Path(args.policies or out / "policies"), args.dataset, args.final_steps)
            continue
        setup = prepare(SourceConfig(model=model_name, dataset=args.dataset, data_root=args.data_root or None,
                                     pretrain_steps=int(steps)), device="cpu", log=log)
        base = make_evaluator(setup.model, setup.task, {}, device="cpu", info=setup.info)
        base_test = base.baseline("test").score
        results.setdefault("base", {})[model_name] = {"test": base_test, "val": base.baseline("val").score,
                                                      "pretrain_steps": int(steps)}
        log(f"{model_name}: unpruned test accuracy {base_test:.2%}")
        for seed in seeds:  # seed by seed, so that a run cut short leaves whole tables
            judge = make_evaluator(setup.model, setup.task, {"seed": seed}, device="cpu", info=setup.info)
            for budget in budgets:
                limit = budget / 100 * judge.space.base_flops
                for method in agents + peers:
                    key = f"{model_name}|{budget:g}|{seed}|{method}"
                    if key in results:
                        continue
                    row: dict[str, Any] = {"model": model_name, "budget": budget, "seed": seed, "method": method}
                    if method in PEERS:
                        t0, c0 = time.perf_counter(), time.process_time()
                        model = tp_pruned(judge, setup.model, limit, global_pruning=method == "tp-global",
                                          max_ratio=0.9)
                        row.update(evaluations=0, wall=time.perf_counter() - t0, cpu=time.process_time() - c0)
                    else:
                        row["study"] = study_name(model_name, budget, seed, method)
                        settings, agent_options = split_options(options.get(method, {}))
                        config = SearchConfig(agent=agent_of[method], budgets={"flops": f"{budget:g}%"},
                                              trials=args.trials,
                                              finetune_steps=args.finetune_steps, seed=seed, device="cpu",
                                              storage=storage, study=row["study"],
                                              agent_options=agent_options, **settings)
                        t0, c0, started = time.perf_counter(), time.process_time(), datetime.now()
                        outcome = run_search(setup.model, setup.task, config, info=setup.info, final=False)
                        st = outcome.study
                        scan = st.user_attrs.get("sensitivity_scan")
                        evals, wall = _evaluations(st), time.perf_counter() - t0
                        if scan:  # a scan is shared between budgets: its probes count once, where first used
                            ratios = set(st.user_attrs.get("sensitivity", {}).get("scan_ratios", []))
                            counted = any(r.get("scan") == scan for k, r in results.items() if k != "base")
                            probes = _probes(_load(scan, outcome.storage), ratios)
                            evals += sum(t.datetime_start >= started or not counted for t in probes)
                            # probes measured before this run (an earlier run's) add their recorded time
                            wall += 0.0 if counted else sum((t.datetime_complete - t.datetime_start).total_seconds()
                                                            for t in probes if t.datetime_start < started)
                            row["scan"] = scan
                        row.update(evaluations=evals, wall=wall, cpu=time.process_time() - c0,
                                   search_val=outcome.best.score if outcome.best else None)
                        if outcome.policy is None:
                            row["feasible"] = False
                            results[key] = row
                            results_path.write_text(json.dumps(results, indent=1))
                            log(f"{key}: no feasible policy")
                            continue
                        # pruned (and refitted, for a reconstruct policy) with the search's own settings: its
                        # calibration batches pick the channels of the data criteria and fit the refit
                        model = outcome.evaluator.pruner.prune(outcome.policy)
                        row["ratios"] = outcome.policy.ratios
                    final = judge.finish(model, args.final_steps)
                    test = judge.measure(final, "test", args.final_steps)
                    row.update(feasible=True, test=test.score, final_steps=args.final_steps,
                               flops_ratio=test.flops / judge.space.base_flops,
                               params_ratio=test.params / judge.space.base_params)
                    results[key] = row
                    results_path.write_text(json.dumps(results, indent=1))
                    log(f"{key}: test {test.score:.2%} at {row['flops_ratio']:.1%} FLOPs "
                        f"({row['evaluations']} evaluations, {row['wall']:.0f} s)")
        print(report(results, model_name, budgets, agents + peers, args))
        plot(results, model_name, budgets, agents + peers, out / f"{model_name}.png", _seeds(args))
        write_policies(results, storage, Path(args.policies or out / "policies"), args.dataset, args.final_steps)


def study_name(model: str, budget: float, seed: int, method: str) -> str:
    return f"{model}-flops{budget:g}-s{seed}-{method}"


def write_policies(results: Mapping[str, Any], storage: str, folder: Path, dataset: str, final_steps: int) -> None:
    """Each agent's best policy from its study, with the final fine-tune's test score this benchmark measured
    in ``metrics["final"]``, as ``<model>-<dataset>-flops<budget>-s<seed>-<method>.json`` in ``folder``."""
    from autoprune.study import best_policy

    for key, row in results.items():
        if key == "base" or row["method"] in PEERS or not row.get("feasible"):
            continue
        name = row.get("study") or study_name(row["model"], row["budget"], row["seed"], row["method"])
        policy = best_policy(_load(name, storage))
        if policy.ratios != row["ratios"]:  # the study holds what the row was measured on, or the row is stale
            raise SystemExit(f"{key}: the best policy of study {name} is not the one scored in results.json")
        policy.metrics["final"] = {
            "finetune_steps": int(row.get("final_steps", final_steps)), "split": "test",
            "test_accuracy": row["test"], "test_score": row["test"], "evaluations": row["evaluations"],
            "search_seconds": row["wall"], "measured_by": "benchmarks/quality.py",
        }
        policy.save(folder / f"{row['model']}-{dataset}-flops{row['budget']:g}-s{row['seed']}-{row['method']}.json")


def _evaluations(study) -> int:
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in study.get_trials(deepcopy=False))


def _probes(scan, ratios: set[float]) -> list:
    from optuna.trial import TrialState

    return [t for t in scan.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.FAIL)
            and t.params.get("ratio") in ratios]


def _load(name: str, storage):
    from autoprune.study import load_study

    return load_study(name, storage)


def _rows(results: Mapping[str, Any], model: str, budget: float, method: str,
          seeds: list[int] | None = None) -> list[dict[str, Any]]:
    return [r for k, r in results.items() if k != "base" and r["model"] == model and r["budget"] == budget
            and r["method"] == method and (seeds is None or r["seed"] in seeds)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _seeds(args) -> list[int]:
    return [int(x) for x in args.seeds.split(",")]


def report(results: Mapping[str, Any], model: str, budgets: list[float], methods: list[str], args) -> str:
    base = results["base"][model]
    lines = [f"\n### {model} on {args.dataset}: unpruned test accuracy {base['test']:.2%} "
             f"({base['pretrain_steps']} pretraining steps)\n",
             f"Test accuracy, mean ± std over seeds {args.seeds}; {args.trials} evaluations per agent "
             f"({args.finetune_steps} fine-tune steps each), {args.final_steps} final fine-tune steps for every "
             "method. In brackets: FLOPs kept.\n",
             "| method | " + " | ".join(f"{b:g} % FLOPs" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for method in methods:
        cells = []
        for b in budgets:
            rows = [r for r in _rows(results, model, b, method, _seeds(args)) if r.get("feasible")]
            if not rows:
                cells.append("—")
                continue
            m, s = _mean_std([r["test"] for r in rows])
            fl = statistics.mean(r["flops_ratio"] for r in rows)
            seeds = len(args.seeds.split(","))
            cells.append(f"{m:.2%} ± {s:.2%} ({fl:.1%})" + ("" if len(rows) == seeds else
                                                             f" [{len(rows)} of {seeds} seeds]"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Search cost per agent, summed over budgets and seeds, as ratios to AMC's:\n",
              "| agent | evaluations | wall s | CPU s | wall / AMC | CPU / AMC |", "|---|---|---|---|---|---|"]
    totals = {}
    for method in methods:
        rows = [r for b in budgets for r in _rows(results, model, b, method, _seeds(args))]
        if rows:
            totals[method] = (sum(r["evaluations"] for r in rows), sum(r["wall"] for r in rows),
                              sum(r["cpu"] for r in rows))
    amc = totals.get("amc")
    for method, (ev, wall, cpu) in totals.items():
        ratio = (f"{wall / amc[1]:.2f} | {cpu / amc[2]:.2f}" if amc and amc[1] > 0 else "— | —")
        lines.append(f"| {method} | {ev} | {wall:.0f} | {cpu:.0f} | {ratio} |")
    return "\n".join(lines)


def plot(results: Mapping[str, Any], model: str, budgets: list[float], methods: list[str], path: Path,
         seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(methods):
        xs, ys, es = [], [], []
        for b in budgets:
            rows = [r for r in _rows(results, model, b, method, seeds) if r.get("feasible")]
            if rows:
                m, s = _mean_std([r["test"] * 100 for r in rows])
                xs.append(statistics.mean(r["flops_ratio"] * 100 for r in rows) + (i - len(methods) / 2) * 0.15)
                ys.append(m)
                es.append(s)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
    base = results["base"][model]["test"] * 100
    ax.axhline(base, color="grey", linestyle=":", label="unpruned")
    ax.set_xlabel("FLOPs kept (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model}: accuracy after the final fine-tune (mean ± std over seeds)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    from _cli import run

    run(main)
