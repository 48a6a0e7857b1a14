"""The agents side by side: each searches the same model and task under the same budgets and the same
configuration (the same number of evaluations), then each one's best feasible policy gets the same
final fine-tune and is scored on the test split. One table comes out, as Markdown and CSV.

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
from autoprune.budget import format_amount
from autoprune.config import SearchConfig
from autoprune.errors import InputError, ParameterError
from autoprune.policy import Policy
from autoprune.runner import Setup, default_study_name, make_evaluator, run_search
from autoprune.study import load_study
from autoprune.task import format_metric

# the columns of the table; test_score and val_score are headed by the task's metric (test_accuracy, ...)
COLUMNS = ("agent", "test_score", "val_score", "flops", "flops_ratio", "params", "params_ratio",
           "latency_ms", "search_seconds", "evaluations", "feasible", "study")


@dataclass
class Row:
    """One agent's line of the table (``feasible`` False: no feasible policy, the figures are empty)."""

    agent: str
    study: str
    evaluations: int
    search_seconds: float
    feasible: bool
    metric: str = "accuracy"
    test_score: float | None = None
    val_score: float | None = None
    flops: int | None = None
    flops_ratio: float | None = None
    params: int | None = None
    params_ratio: float | None = None
    latency_ms: float | None = None
    policy: Policy | None = None  # the agent's best feasible policy, its final figures in metrics["final"]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("policy")
        out.pop("metric")
        return out


def headers(metric: str) -> list[str]:
    return [c.replace("score", metric) if c.endswith("_score") else c for c in COLUMNS]


def parse_agents(text: str) -> list[str]:
    """``"uniform,random"`` -> names, each checked against the registry; refused when empty or repeated."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise InputError("--agents needs at least one agent name, e.g. uniform,random,amc")
    seen = set()
    for n in names:
        try:
            get_agent(n)
        except ParameterError as e:  # one line naming the choices
            raise ParameterError("agents", n, e.allowed, flag="--agents") from None
        if n in seen:
            raise InputError(f"--agents names {n!r} twice")
        seen.add(n)
    return names


def run_compare(
    setup: Setup,
    config: SearchConfig,
    agents: Sequence[str],
    *,
    final_steps: int = 100,
    study_prefix: str | None = None,
    agent_options: Mapping[str, Mapping[str, Any]] | None = None,
    reporter: Callable[[str], Reporter] | None = None,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Search with each agent under ``config`` (its ``trials`` evaluations each; an agent that needs
    fewer, such as ``uniform``, stops sooner), then fine-tune each best feasible policy ``final_steps``
    steps and score it on the test split (the validation split when the task has none), latency measured
    on the same device for every row."""
    options = {a: dict(o) for a, o in (agent_options or {}).items()}
    unknown = sorted(set(options) - set(agents))
    if unknown:
        raise InputError(f"options for agent {unknown[0]!r}, which is not in --agents")
    configs = {a: config.replace(agent=a, agent_options=options.get(a, {})) for a in agents}  # all checked first
    task = setup.task
    judge = make_evaluator(setup.model, task, config.to_dict(), device=config.device, amp=config.amp_setting(),
                           info=setup.info)
    split = "test" if task.has_split("test") else "val"
    rows = []
    for agent in agents:
        name = f"{study_prefix}-{agent}" if study_prefix else default_study_name(
            setup.info["name"], task.name, agent, config.budget_list(), config.granularity)
        log(f"{agent}: searching ({config.trials} evaluations at most, study {name})")
        outcome = run_search(setup.model, task, configs[agent].replace(study=name), info=setup.info,
                             reporter=reporter(agent) if reporter else None, final=False)
        st = outcome.study
        evaluations = _evaluations(st)
        scan = st.user_attrs.get("sensitivity_scan")
        if scan:  # the sensitivity agent's probes are trials of a scan study of their own
            evaluations += _evaluations(load_study(scan, outcome.storage))
        row = Row(agent, name, evaluations, float(st.user_attrs.get("search_seconds", outcome.seconds)),
                  outcome.policy is not None, task.metric)
        if outcome.policy is not None:
            model = judge.build(outcome.policy, final_steps)
            test = judge.measure(model, split, final_steps)
            val = judge.measure(model, "val", final_steps)
            row.test_score, row.val_score = test.score, val.score
            row.flops, row.params = test.flops, test.params
            row.flops_ratio = test.flops / judge.space.base_flops
            row.params_ratio = test.params / judge.space.base_params
            row.latency_ms = judge.latency_of(model) * 1e3
            row.policy = outcome.policy
            row.policy.metrics["final"] = {
                "finetune_steps": final_steps, "split": split, f"{split}_{task.metric}": test.score,
                f"val_{task.metric}": val.score, "test_score": test.score, "val_score": val.score,
                "latency": row.latency_ms / 1e3, "latency_batch": judge.latency_batch,
                "search_seconds": row.search_seconds, "evaluations": evaluations,
            }
            log(f"{agent}: {split} {task.metric} {task.format(test.score)} at {row.flops_ratio:.1%} FLOPs "
                f"after {final_steps} final fine-tune steps")
        else:
            log(f"{agent}: no feasible policy")
        rows.append(row)
    return rows


def _evaluations(study) -> int:
    return sum(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in study.get_trials(deepcopy=False))


def _cell(column: str, value: Any, fmt: Callable[[float], str]) -> str:
    if value is None:
        return "—"
    if column in ("flops_ratio", "params_ratio"):
        return f"{value:.2%}"
    if column in ("test_score", "val_score"):
        return fmt(value)
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
    metric = rows[0].metric if rows else "accuracy"
    def fmt(value: float) -> str:
        return format_metric(metric, value)

    out = io.StringIO()
    if title:
        out.write(f"{title}\n\n")
    out.write("| " + " | ".join(headers(metric)) + " |\n")
    out.write("|" + "|".join("---" for _ in COLUMNS) + "|\n")
    for r in rows:
        d = r.as_dict()
        out.write("| " + " | ".join(_cell(c, d[c], fmt) for c in COLUMNS) + " |\n")
    return out.getvalue()


def write_tables(rows: Sequence[Row], directory: str | Path, title: str | None = None) -> tuple[Path, Path]:
    """``compare.md`` and ``compare.csv`` (raw numbers, empty cells where an agent found nothing), and
    each agent's best policy as ``<agent>.json`` (re-apply it with ``autoprune apply``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    md = directory / "compare.md"
    md.write_text(markdown(rows, title))
    path = directory / "compare.csv"
    names = headers(rows[0].metric if rows else "accuracy")
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for r in rows:
            d = r.as_dict()
            w.writerow(["" if d[c] is None else d[c] for c in COLUMNS])
    for r in rows:
        if r.policy is not None:
            r.policy.save(directory / f"{r.agent}.json")
    return md, path


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))
