"""The ``autoprune`` command: search, export, apply, train, worker, report, compare, dashboard, agents,
criteria, models.

The flags of ``search`` and ``compare`` are generated from the typed configuration
(:mod:`autoprune.config`), which the Python API takes as keyword arguments; a bad value is refused by
the same check in both, and said here with the flag's name.

Exit codes: 0 done, 2 bad input (one line on stderr), 1 anything else (one line, the traceback in a
log file; ``AUTOPRUNE_DEBUG=1`` prints it instead), 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback
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


def _add_source_args(p: argparse.ArgumentParser, defaults: bool = True, device: bool = False,
                     exclude: tuple[str, ...] = ()) -> None:
    """Where the model and data come from (:class:`~autoprune.config.SourceConfig`)."""
    from autoprune.config import SourceConfig, add_arguments

    exclude = exclude + (() if defaults else ("pretrain_steps", "batch_size", "download", "image_size"))
    add_arguments(p, SourceConfig, exclude=exclude)
    if not defaults:  # apply: what the policy recorded, unless given
        for action in p._actions:
            if action.dest in ("model", "dataset"):
                action.help = action.help.split(" (default")[0] + " (default: the policy's)"
    if device:
        p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto: CUDA when present)")


def _add_search_args(p: argparse.ArgumentParser, *, exclude: tuple[str, ...] = (),
                     defaults: dict[str, Any] | None = None) -> None:
    """Budgets, then every field of :class:`~autoprune.config.SearchConfig`, then the agents' options."""
    from autoprune.config import SearchConfig, add_agent_arguments, add_arguments

    p.add_argument("--budget-flops", metavar="X", help="FLOPs kept: 50%%, 0.5, 2x or an amount such as 120M")
    p.add_argument("--budget-params", metavar="X", help="parameters kept: 50%%, 0.5, 2x or an amount such as 1.2M")
    p.add_argument("--budget-latency", metavar="X", help="latency kept: 50%%, 2x or a time such as 3.2ms")
    p.add_argument("--budget-energy", metavar="X", help="energy kept (autoprune.energy): 50%%, 2x or MAC-equivalents "
                   "such as 40M")
    add_arguments(p, SearchConfig, exclude=exclude, defaults=defaults)
    add_agent_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    from autoprune.config import DEFAULT_AGENT

    parser = _Parser(prog="autoprune", description="Search per-layer pruning policies for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("search", help="search a pruning policy under a budget")
    _add_source_args(s)
    _add_search_args(s, defaults={"agent": DEFAULT_AGENT, "storage": "sqlite:///autoprune.db"})
    s.add_argument("-o", "--output", default="best.json", help="where to export the best policy (default best.json)")

    e = sub.add_parser("export", help="export the best feasible policy of a study as JSON")
    e.add_argument("--study", required=True)
    e.add_argument("--storage", default=None)
    e.add_argument("-o", "--output", required=True)

    a = sub.add_parser("apply", help="re-apply a policy to its model and save the pruned model")
    a.add_argument("policy", help="policy JSON (from search or export)")
    _add_source_args(a, defaults=False, device=True)
    a.add_argument("--finetune-steps", type=int, help="default: the steps the policy was scored with")
    a.add_argument("-o", "--output", required=True, help="pruned model file (torch.save of the module)")

    t = sub.add_parser("train", help="train a model once and cache it (what search does without a checkpoint)")
    _add_source_args(t, device=True, exclude=("pretrain_steps",))
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
    _add_source_args(c)
    c.add_argument("--agents", default="uniform,random,amc,netadapt,icepick,gates,sensitivity",
                   help="comma-separated agents (default: all built in)")
    _add_search_args(c, exclude=("agent", "study"), defaults={"trials": 20, "storage": "sqlite:///autoprune.db"})
    c.add_argument("--final-steps", type=int, default=100,
                   help="fine-tune steps of each agent's best policy before the test score (default 100)")
    c.add_argument("--study-prefix", help="study names <prefix>-<agent> (default <model>-<task>-<agent>-<budget>)")
    c.add_argument("-o", "--output", default="compare", help="folder for compare.md and compare.csv")

    d = sub.add_parser("dashboard", help="open optuna-dashboard on the storage")
    d.add_argument("--storage", default=None)
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)

    sub.add_parser("agents", help="list the search agents")
    sub.add_parser("criteria", help="list the channel importance criteria")
    sub.add_parser("models", help="list the model zoo and datasets")
    return parser


def _storage(args: argparse.Namespace) -> str:
    from autoprune.study import DEFAULT_STORAGE

    return args.storage or DEFAULT_STORAGE


def _positive(name: str, value: int | float | None, allow_zero: bool = True) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise InputError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _source(args: argparse.Namespace):
    from autoprune.config import SourceConfig, given

    return SourceConfig(**given(args, SourceConfig))


def _config(args: argparse.Namespace, **fixed: Any):
    """The search configuration the flags give (checked whole, before any model is trained)."""
    from autoprune.config import SearchConfig, budgets_given, given

    values = {**given(args, SearchConfig), **fixed}
    values.setdefault("storage", _storage(args))
    return SearchConfig(budgets=budgets_given(args), **values)


def _one_agents_options(args: argparse.Namespace, agent: str) -> dict[str, Any]:
    from autoprune.config import agent_options_given

    chosen: dict[str, Any] = {}
    for other, options in agent_options_given(args).items():
        if other != agent:
            opt = next(iter(options))
            raise InputError(f"--{other}-{opt.replace('_', '-')} applies to --agent {other}, not {agent}")
        chosen.update(options)
    return chosen


def cmd_search(args: argparse.Namespace) -> int:
    from autoprune.config import DEFAULT_AGENT
    from autoprune.report import ProgressReporter, TrainingProgress, print_summary
    from autoprune.runner import prepare, run_search

    console = _console()
    agent = args.agent or DEFAULT_AGENT
    config = _config(args, agent=agent, agent_options=_one_agents_options(args, agent))
    source = _source(args)  # bad input is refused before any heavy work
    setup = prepare(source, device=config.device, log=lambda m: console.print(f"[dim]{m}[/dim]"),
                    progress=TrainingProgress(console))
    reporter = ProgressReporter(console)
    try:
        outcome = run_search(setup.model, setup.task, config, info=setup.info, reporter=reporter, output=args.output)
    except KeyboardInterrupt:
        reporter.stop()
        resume = " ".join(["autoprune", *sys.argv[1:]]) if sys.argv[1:2] == ["search"] else "the same command"
        print(f"interrupted: completed trials are kept in {config.storage}; run {resume} again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print_summary(console, outcome, config.budget_list())
    if outcome.policy is None:
        print("no feasible policy was found; try more --trials or a looser budget", file=sys.stderr)
        return EXIT_ERROR
    console.print(f"exported the best policy to [bold]{outcome.exported}[/bold]")
    console.print(f"inspect every trial: optuna-dashboard {config.storage}   (or: autoprune dashboard)")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from autoprune.runner import export
    from autoprune.task import format_metric

    policy, path = export(args.study, _storage(args), args.output)
    m = policy.metrics
    metric = m.get("metric", "accuracy")
    print(f"exported trial {policy.search.get('trial')} of {args.study}: {metric} "
          f"{format_metric(metric, m['score'])}, FLOPs {m['flops_ratio']:.1%} of the original -> {path}")
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
        checkpoint=args.checkpoint, task=args.task, finetune_steps=args.finetune_steps, device=args.device,
        log=lambda m: print(m, file=sys.stderr),
    )
    from autoprune.pruning.masks import sync_masked_weights
    from autoprune.task import format_metric

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sync_masked_weights(model.cpu()), out)  # a masked weight is a plain attribute .cpu() skips
    base = evaluator.space.base_flops
    effective = " effective" if result.flops_dense is not None else ""
    print(f"pruned model: FLOPs{effective} {format_amount('flops', result.flops)} ({result.flops / base:.1%} of "
          f"{format_amount('flops', base)}), params{effective} {format_amount('params', result.params)}, "
          f"validation {result.metric} {format_metric(result.metric, result.score)} after "
          f"{result.finetune_steps} fine-tune steps")
    if result.energy is not None:
        print(f"energy {format_amount('energy', result.energy)} MAC-equivalents "
              f"({result.energy / evaluator.energy.base:.1%} of {format_amount('energy', evaluator.energy.base)}; "
              f"costs {evaluator.energy.costs.text()})")
    if result.flops_dense is not None:
        print(f"{policy.granularity} masks: dense FLOPs {format_amount('flops', result.flops_dense)}, dense params "
              f"{format_amount('params', result.params_dense)} (kept in weight_orig and weight_mask; "
              "dense kernels run at the dense cost)")
    recorded = policy.metrics
    if recorded.get("flops") is not None:
        metric = recorded.get("metric", "accuracy")
        value = recorded.get("score", recorded.get(metric))
        print(f"recorded in the study: FLOPs {format_amount('flops', recorded['flops'])}, "
              f"{metric} {format_metric(metric, value)}")
    print(f"saved {out} (load with torch.load(path, weights_only=False))")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from autoprune.report import TrainingProgress
    from autoprune.runner import prepare

    source = _source(args).replace(pretrain_steps=args.steps)
    console = _console()
    setup = prepare(source, device=args.device, log=lambda m: console.print(f"[dim]{m}[/dim]"),
                    progress=TrainingProgress(console))
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
    from autoprune.config import agent_options_given
    from autoprune.report import ProgressReporter, TrainingProgress
    from autoprune.runner import prepare

    console = _console()
    agents = parse_agents(args.agents)
    options = agent_options_given(args)
    stray = sorted(set(options) - set(agents))
    if stray:
        raise InputError(f"options for agent {stray[0]!r}, which is not in --agents")
    _positive("--final-steps", args.final_steps)
    config = _config(args, agent=agents[0], trials=args.trials if args.trials is not None else 20)
    for agent in agents:  # every agent's configuration is refused or accepted before any search runs
        config.replace(agent=agent, agent_options=options.get(agent, {}))
    source = _source(args)
    log = lambda m: console.print(f"[dim]{m}[/dim]")  # noqa: E731
    setup = prepare(source, device=config.device, log=log, progress=TrainingProgress(console))
    rows = run_compare(setup, config, agents, final_steps=args.final_steps, study_prefix=args.study_prefix,
                       agent_options=options, reporter=lambda agent: ProgressReporter(console), log=log)
    title = (f"{setup.info['name']} on {setup.task.name}, {', '.join(str(b) for b in config.budget_list())}: "
             f"{config.trials} evaluations per agent, {config.finetune_steps} fine-tune steps each, "
             f"{args.final_steps} final fine-tune steps")
    md, csv_path = write_tables(rows, args.output, title)
    print(markdown(rows, title))
    console.print(f"wrote {md} and {csv_path}")
    return EXIT_OK if any(r.feasible for r in rows) else EXIT_ERROR


def cmd_dashboard(args: argparse.Namespace) -> int:
    from optuna_dashboard import run_server

    from autoprune.study import open_storage

    storage = open_storage(args.storage or "sqlite:///autoprune.db")
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
    console = _console()
    console.print(table)
    console.print("--reconstruct (after any criterion): every conv/linear layer reading pruned channels is refitted "
                  "by least squares to the unpruned model's outputs on --criterion-batches training batches")
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
    data = Table(title="datasets (or --task path/to/file.py:factory for your own data and metric)")
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


def _log_crash(command: str) -> Path:
    """Write the traceback of the exception being handled to a log file and return its path."""
    from autoprune.pretrain import cache_dir

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for folder in (cache_dir() / "logs", Path.cwd()):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"autoprune-{command}-{stamp}-{os.getpid()}.log"
            path.write_text(f"autoprune {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
            return path
        except OSError:
            continue
    return Path("(no log written)")


def main(argv: Sequence[str] | None = None) -> int:
    from autoprune.config import for_cli

    command = "autoprune"
    try:
        argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
        args = build_parser().parse_args(argv)
        command = args.command
        return COMMANDS[args.command](args)
    except InputError as e:
        print(f"autoprune: error: {for_cli(e)}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if os.environ.get("AUTOPRUNE_DEBUG") == "1":
            raise
        path = _log_crash(command)
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"autoprune: {command} failed: {type(e).__name__}: {first} (traceback in {path}; "
              "AUTOPRUNE_DEBUG=1 prints it)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
