"""The ``autoprune`` command: search, export, apply, train, worker, report, compare, dashboard, agents,
criteria, models.

Exit codes: 0 done, 2 bad input (one line on stderr), 1 anything else, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from autoprune.errors import InputError

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{self.prog}: {message}")


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def _add_model_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    from autoprune.runner import DEFAULT_DATASET, DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL if defaults else None,
                   help="zoo name (see `autoprune models`), torchvision:NAME or path/to/file.py:factory"
                   + (f" (default {DEFAULT_MODEL})" if defaults else " (default: the policy's)"))
    p.add_argument("--checkpoint", help="state dict of the trained model (loaded with weights_only=True)")
    p.add_argument("--dataset", default=DEFAULT_DATASET if defaults else None,
                   help="digits|cifar10|cifar100|mnist|fashionmnist|imagefolder"
                   + (f" (default {DEFAULT_DATASET}, bundled)" if defaults else " (default: the policy's)"))
    p.add_argument("--data-root", help="folder holding the dataset's files")
    p.add_argument("--download", action="store_true", help="download a torchvision dataset into --data-root")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto: CUDA when present)")


def _add_agent_options(p: argparse.ArgumentParser) -> None:
    from autoprune.agents import list_agents

    for name, cls in list_agents().items():
        if not cls.options:
            continue
        group = p.add_argument_group(f"{name} agent options")
        for key, opt in cls.options.items():
            flag = f"--{name}-{key.replace('_', '-')}"
            group.add_argument(flag, dest=f"agentopt__{name}__{key}", type=opt.type, default=None,
                               choices=opt.choices,
                               help=f"{opt.help} (default {opt.default})".replace("%", "%%"))


def _add_pruning_args(p: argparse.ArgumentParser) -> None:
    """Budgets, and how a ratio becomes a pruned model: shared by search and compare."""
    from autoprune.pruning.criteria import CRITERIA

    p.add_argument("--budget-flops", help="FLOPs kept: 50%%, 0.5, 2x or an amount such as 120M")
    p.add_argument("--budget-params", help="parameters kept: 50%%, 0.5, 2x or an amount such as 1.2M")
    p.add_argument("--budget-latency", help="latency kept: 50%%, 2x or a time such as 3.2ms")
    p.add_argument("--latency-batch", type=int, default=1,
                   help="samples per timed forward pass for latency (default 1: one input's latency)")
    p.add_argument("--criterion", default="l1",
                   help=f"which channels a ratio removes: {', '.join(CRITERIA)} (see `autoprune criteria`; "
                   "default l1); unstructured and N:M take l1, l2 (both |w| per weight) or random")
    p.add_argument("--criterion-batches", type=int, default=8,
                   help="training batches that taylor, hessian, apoz and entropy read (default 8)")
    p.add_argument("--granularity", default="channel",
                   help="channel (default: channels removed), unstructured (weight masks) or N:M such as 2:4 "
                   "(N of every M weights along the input dimension)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autoprune", description="Search per-layer pruning policies for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("search", help="search a pruning policy under a budget")
    _add_model_args(s)
    s.add_argument("--agent", default="uniform", help="search agent (see `autoprune agents`; default uniform)")
    _add_pruning_args(s)
    s.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                   help="module names (glob) whose groups stay whole; repeatable")
    s.add_argument("--trials", type=int, help="candidates to evaluate (default: the agent's)")
    s.add_argument("--timeout", type=float, help="stop proposing candidates after this many seconds")
    s.add_argument("--finetune-steps", type=int, default=0, help="fine-tune steps per candidate (default 0)")
    s.add_argument("--pretrain-steps", type=int,
                   help="train the model this many steps first (cached; default: 500 for a zoo model "
                   "without --checkpoint)")
    s.add_argument("--max-ratio", type=float, default=0.9, help="largest fraction removed from a group")
    s.add_argument("--distill", type=float, default=0.0, help="weight of distillation from the unpruned model")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///autoprune.db)")
    s.add_argument("--study", help="study name (default <model>-<dataset>-<agent>-<budget>)")
    s.add_argument("-o", "--output", default="best.json", help="where to export the best policy")
    _add_agent_options(s)

    e = sub.add_parser("export", help="export the best feasible policy of a study as JSON")
    e.add_argument("--study", required=True)
    e.add_argument("--storage", default=None)
    e.add_argument("-o", "--output", required=True)

    a = sub.add_parser("apply", help="re-apply a policy to its model and save the pruned model")
    a.add_argument("policy", help="policy JSON (from search or export)")
    _add_model_args(a, defaults=False)
    a.add_argument("--finetune-steps", type=int, help="default: the steps the policy was scored with")
    a.add_argument("-o", "--output", required=True, help="pruned model file (torch.save of the module)")

    t = sub.add_parser("train", help="train a model once and cache it (what search does without a checkpoint)")
    _add_model_args(t)
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("-o", "--output", help="also write the state dict here")

    w = sub.add_parser("worker", help="join a running search (agents that can share a study)")
    w.add_argument("--study", required=True)
    w.add_argument("--storage", required=True, help="the search's storage URL (PostgreSQL across machines)")
    w.add_argument("--trials", type=int, help="stop when the study holds this many trials (default: the search's)")
    w.add_argument("--timeout", type=float)
    w.add_argument("--device", default="auto")

    r = sub.add_parser("report", help="PNG plots and an HTML page of a study")
    r.add_argument("--study", required=True)
    r.add_argument("--storage", default=None)
    r.add_argument("-o", "--output", required=True, help="folder for the plots and index.html")

    c = sub.add_parser("compare", help="run several agents on one model and budget; one table (Markdown, CSV)")
    _add_model_args(c)
    c.add_argument("--agents", default="uniform,random,amc,netadapt,icepick,gates,sensitivity",
                   help="comma-separated agents (default: all built in)")
    _add_pruning_args(c)
    c.add_argument("--trials", type=int, default=20, help="evaluations per agent (default 20)")
    c.add_argument("--pretrain-steps", type=int,
                   help="train the model this many steps first (cached; default as for search)")
    c.add_argument("--finetune-steps", type=int, default=0, help="fine-tune steps per candidate (default 0)")
    c.add_argument("--final-steps", type=int, default=100,
                   help="fine-tune steps of each agent's best policy before the test score (default 100)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///autoprune.db)")
    c.add_argument("--study-prefix", help="study names <prefix>-<agent> (default <model>-<dataset>-<agent>-<budget>)")
    c.add_argument("-o", "--output", default="compare", help="folder for compare.md and compare.csv")
    _add_agent_options(c)

    d = sub.add_parser("dashboard", help="open optuna-dashboard on the storage")
    d.add_argument("--storage", default=None)
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)

    sub.add_parser("agents", help="list the search agents")
    sub.add_parser("criteria", help="list the channel importance criteria")
    sub.add_parser("models", help="list the model zoo and datasets")
    return parser


def _budgets(args: argparse.Namespace):
    from autoprune.budget import parse_budgets

    return parse_budgets(flops=args.budget_flops, params=args.budget_params, latency=args.budget_latency)


def _agent_options(args: argparse.Namespace) -> dict[str, Any]:
    chosen: dict[str, Any] = {}
    for agent, options in _options_by_agent(args).items():
        if agent != args.agent:
            opt = next(iter(options))
            raise InputError(f"--{agent}-{opt.replace('_', '-')} applies to --agent {agent}, not {args.agent}")
        chosen.update(options)
    return chosen


def _options_by_agent(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The ``--<agent>-<option>`` values given, by agent."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if key.startswith("agentopt__") and value is not None:
            _, agent, opt = key.split("__", 2)
            out.setdefault(agent, {})[opt] = value
    return out


def _storage(args: argparse.Namespace) -> str:
    from autoprune.study import DEFAULT_STORAGE

    return args.storage or DEFAULT_STORAGE


def _positive(name: str, value: int | float | None, allow_zero: bool = True) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise InputError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def cmd_search(args: argparse.Namespace) -> int:
    from autoprune.agents import get_agent
    from autoprune.pruning import get_criterion
    from autoprune.runner import check_granularity, prepare, run_search

    console = _console()
    budgets = _budgets(args)  # refuse bad input before any heavy work
    if not budgets:
        raise InputError("give at least one budget: --budget-flops, --budget-params or --budget-latency")
    granularity = check_granularity(args.granularity, args.criterion, get_agent(args.agent))
    if granularity == "channel":
        get_criterion(args.criterion)
    _positive("--trials", args.trials, allow_zero=False)
    _positive("--timeout", args.timeout, allow_zero=False)
    _positive("--finetune-steps", args.finetune_steps)
    _positive("--pretrain-steps", args.pretrain_steps)
    _positive("--criterion-batches", args.criterion_batches, allow_zero=False)
    if not 0 < args.max_ratio < 1:
        raise InputError(f"--max-ratio must be in (0, 1), got {args.max_ratio}")
    options = _agent_options(args)
    get_agent(args.agent)(**options)  # bad agent options too are refused before the model is trained
    setup = prepare(args.model, args.dataset, data_root=args.data_root, download=args.download,
                    checkpoint=args.checkpoint, pretrain_steps=args.pretrain_steps, device=args.device,
                    log=lambda m: console.print(f"[dim]{m}[/dim]"))
    from autoprune.report import ProgressReporter, print_summary

    reporter = ProgressReporter(console)
    storage = _storage(args)
    try:
        outcome = run_search(
            setup, budgets, agent=args.agent, agent_options=options, storage=storage, study=args.study,
            trials=args.trials, timeout=args.timeout, finetune_steps=args.finetune_steps, seed=args.seed,
            device=args.device, criterion=args.criterion, granularity=granularity, ignore=args.ignore,
            max_ratio=args.max_ratio,
            evaluator_settings={"distill": args.distill, "latency_batch": args.latency_batch,
                                "criterion_batches": args.criterion_batches},
            reporter=reporter, output=args.output,
        )
    except KeyboardInterrupt:
        reporter.stop()
        resume = " ".join(["autoprune", *sys.argv[1:]]) if sys.argv[1:2] == ["search"] else "the same command"
        print(f"interrupted: completed trials are kept in {storage}; run {resume} again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print_summary(console, outcome, budgets)
    if outcome.policy is None:
        print("no feasible policy was found; try more --trials or a looser budget", file=sys.stderr)
        return EXIT_ERROR
    console.print(f"exported the best policy to [bold]{outcome.exported}[/bold]")
    console.print(f"inspect every trial: optuna-dashboard {storage}   (or: autoprune dashboard)")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from autoprune.runner import export

    policy, path = export(args.study, _storage(args), args.output)
    m = policy.metrics
    print(f"exported trial {policy.search.get('trial')} of {args.study}: accuracy {m['accuracy']:.2%}, "
          f"FLOPs {m['flops_ratio']:.1%} of the original -> {path}")
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    import torch

    from autoprune.budget import format_amount
    from autoprune.policy import Policy
    from autoprune.runner import apply_policy

    policy = Policy.load(args.policy)
    _positive("--finetune-steps", args.finetune_steps)
    model, result, evaluator = apply_policy(
        policy, model=args.model, dataset=args.dataset, data_root=args.data_root,
        checkpoint=args.checkpoint, finetune_steps=args.finetune_steps, device=args.device,
        log=lambda m: print(m, file=sys.stderr),
    )
    from autoprune.pruning.masks import sync_masked_weights

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sync_masked_weights(model.cpu()), out)  # a masked weight is a plain attribute .cpu() skips
    base = evaluator.space.base_flops
    effective = " effective" if result.flops_dense is not None else ""
    print(f"pruned model: FLOPs{effective} {format_amount('flops', result.flops)} ({result.flops / base:.1%} of "
          f"{format_amount('flops', base)}), params{effective} {format_amount('params', result.params)}, "
          f"validation accuracy {result.accuracy:.2%} after {result.finetune_steps} fine-tune steps")
    if result.flops_dense is not None:
        print(f"{policy.granularity} masks: dense FLOPs {format_amount('flops', result.flops_dense)}, dense params "
              f"{format_amount('params', result.params_dense)} (kept in weight_orig and weight_mask; "
              "dense kernels run at the dense cost)")
    recorded = policy.metrics
    if recorded.get("flops") is not None:
        print(f"recorded in the study: FLOPs {format_amount('flops', recorded['flops'])}, "
              f"accuracy {recorded['accuracy']:.2%}")
    print(f"saved {out} (load with torch.load(path, weights_only=False))")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from autoprune.runner import prepare

    setup = prepare(args.model, args.dataset, data_root=args.data_root, download=args.download,
                    checkpoint=args.checkpoint, pretrain_steps=args.steps, device=args.device)
    print(f"cached weights: {setup.info.get('checkpoint')}")
    if args.output:
        torch.save(setup.model.state_dict(), args.output)
        print(f"saved {args.output}")
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from autoprune.report import ProgressReporter
    from autoprune.runner import run_worker

    _positive("--trials", args.trials, allow_zero=False)
    console = _console()
    try:
        added = run_worker(args.study, args.storage, device=args.device, trials=args.trials,
                           timeout=args.timeout, reporter=ProgressReporter(console),
                           log=lambda m: console.print(f"[dim]{m}[/dim]"))
    except KeyboardInterrupt:
        print(f"interrupted: completed trials are kept in {args.storage}", file=sys.stderr)
        return EXIT_INTERRUPTED
    console.print(f"worker added {added} trial(s) to {args.study}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from autoprune.report import write_report
    from autoprune.study import load_study

    storage = _storage(args)
    files = write_report(load_study(args.study, storage), storage, args.output)
    for f in files:
        print(f"wrote {f}")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from autoprune.compare import markdown, parse_agents, run_compare, write_tables
    from autoprune.pruning import get_criterion
    from autoprune.report import ProgressReporter
    from autoprune.runner import prepare

    console = _console()
    budgets = _budgets(args)
    if not budgets:
        raise InputError("give at least one budget: --budget-flops, --budget-params or --budget-latency")
    agents = parse_agents(args.agents)
    get_criterion(args.criterion)
    from autoprune.agents import get_agent
    from autoprune.runner import check_granularity

    for agent in agents:
        check_granularity(args.granularity, args.criterion, get_agent(agent))
    _positive("--trials", args.trials, allow_zero=False)
    _positive("--finetune-steps", args.finetune_steps)
    _positive("--final-steps", args.final_steps)
    _positive("--criterion-batches", args.criterion_batches, allow_zero=False)
    _positive("--pretrain-steps", args.pretrain_steps)
    options = _options_by_agent(args)
    stray = sorted(set(options) - set(agents))
    if stray:
        raise InputError(f"options for agent {stray[0]!r}, which is not in --agents")
    log = lambda m: console.print(f"[dim]{m}[/dim]")  # noqa: E731
    setup = prepare(args.model, args.dataset, data_root=args.data_root, download=args.download,
                    checkpoint=args.checkpoint, pretrain_steps=args.pretrain_steps, device=args.device, log=log)
    rows = run_compare(
        setup, budgets, agents, trials=args.trials, finetune_steps=args.finetune_steps,
        final_steps=args.final_steps, storage=_storage(args), study_prefix=args.study_prefix,
        agent_options=options, seed=args.seed, device=args.device, criterion=args.criterion,
        granularity=args.granularity,
        evaluator_settings={"latency_batch": args.latency_batch, "criterion_batches": args.criterion_batches},
        reporter=lambda agent: ProgressReporter(console), log=log,
    )
    title = (f"{setup.info['name']} on {setup.data.name}, {', '.join(str(b) for b in budgets)}: "
             f"{args.trials} evaluations per agent, {args.finetune_steps} fine-tune steps each, "
             f"{args.final_steps} final fine-tune steps")
    md, csv_path = write_tables(rows, args.output, title)
    print(markdown(rows, title))
    console.print(f"wrote {md} and {csv_path}")
    return EXIT_OK if any(r.feasible for r in rows) else EXIT_ERROR


def cmd_dashboard(args: argparse.Namespace) -> int:
    from optuna_dashboard import run_server

    from autoprune.study import _storage

    storage = _storage(args.storage or "sqlite:///autoprune.db")
    print(f"optuna-dashboard on http://{args.host}:{args.port} (Ctrl-C stops it)")
    run_server(storage, host=args.host, port=args.port)
    return EXIT_OK


def cmd_agents(args: argparse.Namespace) -> int:
    from rich.table import Table

    from autoprune.agents import list_agents

    table = Table(title="search agents")
    table.add_column("agent")
    table.add_column("what it does")
    table.add_column("options")
    for name, cls in list_agents().items():
        opts = ", ".join(f"--{name}-{k.replace('_', '-')}" for k in cls.options) or "-"
        table.add_row(name, cls.description, opts)
    _console().print(table)
    return EXIT_OK


def cmd_criteria(args: argparse.Namespace) -> int:
    from rich.table import Table

    from autoprune.pruning.criteria import CRITERIA, DATA_CRITERIA

    table = Table(title="channel importance criteria (--criterion; the lowest-scoring channels go)")
    table.add_column("criterion")
    table.add_column("score")
    table.add_column("reads")
    for name, (_, description) in CRITERIA.items():
        reads = "random numbers" if name == "random" else "training batches" if name in DATA_CRITERIA else "weights"
        table.add_row(name, description, reads)
    _console().print(table)
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from rich.table import Table

    from autoprune.data import DATASETS
    from autoprune.models import describe_models

    table = Table(title="model zoo (also torchvision:NAME and path/to/file.py:factory)")
    table.add_column("model")
    table.add_column("description")
    for name, desc in describe_models().items():
        table.add_row(name, desc)
    console = _console()
    console.print(table)
    data = Table(title="datasets")
    data.add_column("dataset")
    data.add_column("description")
    for info in DATASETS:
        data.add_row(info.name, info.description)
    console.print(data)
    return EXIT_OK


COMMANDS = {
    "search": cmd_search,
    "export": cmd_export,
    "apply": cmd_apply,
    "train": cmd_train,
    "worker": cmd_worker,
    "report": cmd_report,
    "compare": cmd_compare,
    "dashboard": cmd_dashboard,
    "agents": cmd_agents,
    "criteria": cmd_criteria,
    "models": cmd_models,
}


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--budget-flops -5%`` would read -5% as an option; join it so the budget parser refuses it."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--budget-") and "=" not in a and i + 1 < len(argv) and argv[i + 1].startswith("-") \
                and not argv[i + 1].startswith("--"):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    try:
        argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except InputError as e:
        print(f"autoprune: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
