"""The agents side by side: each searches the same model and data under the same budgets with the same
number of evaluations, then each one's best feasible policy gets the same final fine-tune and is
scored on the test split. One table comes out, as Markdown and CSV.

Every agent's search is an ordinary study (``<model>-<dataset>-<agent>-<budget>``, or
``<prefix>-<agent>`` with ``study_prefix``), so a comparison that is interrupted resumes where it
stopped, and ``autoprune report`` on any of the studies shows the others beside it. Search wall time
is what the study's searches took in all, accumulated over resumed runs (``search_seconds``, recorded
on the study by :func:`autoprune.runner.run_search`); evaluations are the trials the study holds (for
the sensitivity agent, with the probes of its scan study).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from autoprune.agents import Reporter, get_agent
from autoprune.budget import Budget, format_amount
from autoprune.errors import InputError
from autoprune.policy import Policy
from autoprune.runner import Setup, check_granularity, default_study_name, make_evaluator, run_search
from autoprune.study import DEFAULT_STORAGE, load_study

COLUMNS = ("agent", "test_accuracy", "val_accuracy", "flops", "flops_ratio", "params", "params_ratio",
           "latency_ms", "search_seconds", "evaluations", "feasible", "study")


@dataclass
class Row:
    """One agent's line of the table (``feasible`` False: no feasible policy, the figures are empty)."""

    agent: str
    study: str
    evaluations: int
    search_seconds: float
    feasible: bool
    test_accuracy: float | None = None
    val_accuracy: float | None = None
    flops: int | None = None
    flops_ratio: float | None = None
    params: int | None = None
    params_ratio: float | None = None
    latency_ms: float | None = None
    policy: Policy | None = None  # the agent's best feasible policy, its final figures in metrics["final"]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("policy")
        return out


def parse_agents(text: str) -> list[str]:
    """``"uniform,random"`` -> names, each checked against the registry; refused when empty or repeated."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise InputError("--agents needs at least one agent name, e.g. uniform,random,amc")
    seen = set()
    for n in names:
        get_agent(n)  # one line naming the choices when unknown
        if n in seen:
            raise InputError(f"--agents names {n!r} twice")
        seen.add(n)
    return names


def run_compare(
    setup: Setup,
    budgets: list[Budget],
    agents: Sequence[str],
    *,
    trials: int = 20,
    finetune_steps: int = 0,
    final_steps: int = 100,
    storage: str = DEFAULT_STORAGE,
    study_prefix: str | None = None,
    agent_options: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    device: str = "auto",
    criterion: str = "l1",
    granularity: str = "channel",
    evaluator_settings: Mapping[str, Any] | None = None,
    reporter: Callable[[str], Reporter] | None = None,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Search with each agent (``trials`` evaluations each; an agent that needs fewer, such as
    ``uniform``, stops sooner), then fine-tune each best feasible policy ``final_steps`` steps and
    score it on the test split, latency measured on the same device for every row."""
    granularity = check_granularity(granularity, criterion)
    for agent in agents:  # refused before any search runs
        check_granularity(granularity, criterion, get_agent(agent))
    options = {a: dict(o) for a, o in (agent_options or {}).items()}
    unknown = sorted(set(options) - set(agents))
    if unknown:
        raise InputError(f"options for agent {unknown[0]!r}, which is not in --agents")
    rows = []
    settings = {**dict(evaluator_settings or {}), "seed": seed}
    judge = make_evaluator(setup, device=device, criterion=criterion, granularity=granularity, **settings)
    base = judge.space
    for agent in agents:
        name = f"{study_prefix}-{agent}" if study_prefix else default_study_name(setup, agent, budgets, granularity)
        log(f"{agent}: searching ({trials} evaluations at most, study {name})")
        outcome = run_search(
            setup, budgets, agent=agent, agent_options=options.get(agent), storage=storage, study=name,
            trials=trials, finetune_steps=finetune_steps, seed=seed, device=device, criterion=criterion,
            granularity=granularity,
            evaluator_settings=evaluator_settings, reporter=reporter(agent) if reporter else None, final=False,
        )
        st = outcome.study
        evaluations = _evaluations(st)
        scan = st.user_attrs.get("sensitivity_scan")
        if scan:  # the sensitivity agent's probes are trials of a scan study of their own
            evaluations += _evaluations(load_study(scan, storage))
        row = Row(agent, name, evaluations, float(st.user_attrs.get("search_seconds", outcome.seconds)),
                  outcome.policy is not None)
        if outcome.policy is not None:
            model = judge.build(outcome.policy, final_steps)
            test = judge.measure(model, "test", final_steps)
            val = judge.measure(model, "val", final_steps)
            row.test_accuracy, row.val_accuracy = test.accuracy, val.accuracy
            row.flops, row.params = test.flops, test.params
            row.flops_ratio, row.params_ratio = test.flops / base.base_flops, test.params / base.base_params
            row.latency_ms = judge._latency(model) * 1e3
            row.policy = outcome.policy
            row.policy.metrics["final"] = {
                "finetune_steps": final_steps, "test_accuracy": test.accuracy, "val_accuracy": val.accuracy,
                "latency": row.latency_ms / 1e3, "latency_batch": judge.latency_batch,
                "search_seconds": row.search_seconds, "evaluations": evaluations,
            }
            log(f"{agent}: test accuracy {test.accuracy:.2%} at {row.flops_ratio:.1%} FLOPs "
                f"after {final_steps} final fine-tune steps")
        else:
            log(f"{agent}: no feasible policy")
        rows.append(row)
    return rows


def _evaluations(study) -> int:
    return sum(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in study.get_trials(deepcopy=False))


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "—"
    if column in ("test_accuracy", "val_accuracy", "flops_ratio", "params_ratio"):
        return f"{value:.2%}"
    if column == "flops":
        return format_amount("flops", value)
    if column == "params":
        return format_amount("params", value)
    if column == "latency_ms":
        return f"{value:.2f}"
    if column == "search_seconds":
        return f"{value:.1f}"
    if column == "feasible":
        return "yes" if value else "no"
    return str(value)


def markdown(rows: Sequence[Row], title: str | None = None) -> str:
    """The table as GitHub Markdown (percentages and human amounts)."""
    out = io.StringIO()
    if title:
        out.write(f"{title}\n\n")
    out.write("| " + " | ".join(COLUMNS) + " |\n")
    out.write("|" + "|".join("---" for _ in COLUMNS) + "|\n")
    for r in rows:
        d = r.as_dict()
        out.write("| " + " | ".join(_cell(c, d[c]) for c in COLUMNS) + " |\n")
    return out.getvalue()


def write_tables(rows: Sequence[Row], directory: str | Path, title: str | None = None) -> tuple[Path, Path]:
    """``compare.md`` and ``compare.csv`` (raw numbers, empty cells where an agent found nothing), and
    each agent's best policy as ``<agent>.json`` (re-apply it with ``autoprune apply``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    md = directory / "compare.md"
    md.write_text(markdown(rows, title))
    path = directory / "compare.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.as_dict().items() if k in COLUMNS})
    for r in rows:
        if r.policy is not None:
            r.policy.save(directory / f"{r.agent}.json")
    return md, path


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))
