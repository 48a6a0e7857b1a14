"""What a person sees in the terminal: the search's progress bar and its summary table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autoprune.agents import Reporter
from autoprune.budget import Budget, format_amount


def _bar(console: Console, label: str) -> Progress:
    """A started rich progress bar: label, bar, done/total, elapsed time, a status text."""
    progress = Progress(TextColumn(f"[bold]{label}[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[status]}"), console=console, transient=False)
    progress.start()
    return progress


class ProgressReporter(Reporter):
    """A rich progress bar over the trials, with the best feasible accuracy so far."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task = None

    def start(self, total: int | None, done: int) -> None:
        self.progress = _bar(self.console, "search")
        self.task = self.progress.add_task("search", total=total, completed=min(done, total or done),
                                           status="resumed" if done else "")

    def advance(self, status: str) -> None:
        if self.progress is None:
            return
        self.progress.update(self.task, advance=1, status=status)

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[dim]{text}[/dim]")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class TrainingProgress:
    """A rich progress bar over training steps (``autoprune.pretrain.Progress``), shown only once training
    starts (a cached model shows nothing) and closed at the last step."""

    def __init__(self, console: Console, label: str = "training") -> None:
        self.console = console
        self.label = label
        self.progress: Progress | None = None
        self.task = None

    def __call__(self, done: int, total: int, status: str) -> None:
        if self.progress is None:
            self.progress = _bar(self.console, self.label)
            self.task = self.progress.add_task(self.label, total=total, status=status)
        self.progress.update(self.task, completed=done, status=status)
        if done >= total:
            self.progress.stop()
            self.progress = None


def _ratio(pruned: float | None, base: float | None) -> str:
    if pruned is None or not base:
        return "-"
    return f"{pruned / base:.1%}"


def print_summary(console: Console, outcome, budgets: list[Budget]) -> None:
    """Unpruned vs best: the task's objective, FLOPs (MACs), params, energy, latency, with the kept fraction."""
    st = outcome.study
    title = (f"study {st.study_name}: {outcome.new_trials} new trial(s) in {outcome.seconds:.1f} s, "
             f"budget {', '.join(str(b) for b in budgets)}")
    table = Table(title=title)
    table.add_column("")
    table.add_column("unpruned", justify="right")
    table.add_column("best pruned", justify="right")
    table.add_column("pruned / unpruned", justify="right")
    base_val, best = outcome.baseline_val, outcome.best
    base_test, best_test = outcome.baseline_test, outcome.best_test
    if best is None:
        console.print(table)
        _print_pinned(console, outcome)
        return

    fmt = _formatter(st)
    metric = best.metric
    table.add_row(f"val {metric}", fmt(base_val.score), fmt(best.score), "")
    if base_test is not None and best_test is not None:
        table.add_row(f"test {metric}", fmt(base_test.score), fmt(best_test.score), "")
    masked = best.flops_dense is not None  # weight masks: effective figures, and the dense shapes beside
    effective = ", effective" if masked else ""
    table.add_row(f"FLOPs (MACs){effective}", format_amount("flops", base_val.flops),
                  format_amount("flops", best.flops), _ratio(best.flops, base_val.flops))
    if masked:
        table.add_row("FLOPs (MACs), dense", format_amount("flops", base_val.flops),
                      format_amount("flops", best.flops_dense), _ratio(best.flops_dense, base_val.flops))
    table.add_row(f"params{effective}", format_amount("params", base_val.params),
                  format_amount("params", best.params), _ratio(best.params, base_val.params))
    if masked:
        table.add_row("params, dense", format_amount("params", base_val.params),
                      format_amount("params", best.params_dense), _ratio(best.params_dense, base_val.params))
    if base_val.energy is not None and best.energy is not None:
        table.add_row("energy (MAC-equivalents)", format_amount("energy", base_val.energy),
                      format_amount("energy", best.energy), _ratio(best.energy, base_val.energy))
    b_lat = base_test.latency if base_test is not None else base_val.latency
    p_lat = best_test.latency if best_test is not None else best.latency
    if b_lat is not None and p_lat is not None:
        batch = (outcome.policy.search.get("latency_batch", 1) if outcome.policy is not None else 1) or 1
        table.add_row(f"latency (batch {batch})", format_amount("latency", b_lat), format_amount("latency", p_lat),
                      _ratio(p_lat, b_lat))
    table.add_row("fine-tune steps", "-", str(best.finetune_steps), "")
    console.print(table)
    _print_pinned(console, outcome)
    settings = _config(st)
    if masked:
        granularity = settings.get("granularity", "masked")
        console.print(f"{granularity} masks: budgets are judged on the effective figures; dense kernels run at "
                      "the dense cost, so latency does not fall with masks")
        dense = settings.get("dense_layers") or []
        if dense:
            console.print(f"{granularity} leaves {len(dense)} layer(s) dense (input dimension not a multiple of "
                          f"M, depthwise convs among them): {', '.join(dense[:6])}{' ...' if len(dense) > 6 else ''}")


def _print_pinned(console: Console, outcome, shown: int = 4) -> None:
    """One line: the groups the search kept whole, and why (the first few)."""
    ev = getattr(outcome, "evaluator", None)
    reasons = getattr(getattr(ev, "space", None), "pinned_reasons", None)
    if not reasons:
        return
    items = [f"{name}: {why}" for name, why in list(reasons.items())[:shown]]
    more = f"; and {len(reasons) - shown} more" if len(reasons) > shown else ""
    console.print(f"kept whole: {len(reasons)} of {len(ev.space.groups)} groups: {'; '.join(items)}{more}")


# -- the study report: PNG plots and one HTML page ------------------------------------------------


def _config(study) -> dict:
    """The search configuration a study recorded (``settings`` in studies of earlier versions)."""
    return study.user_attrs.get("config", study.user_attrs.get("settings", {}))


def _metric(study) -> tuple[str, float]:
    """The objective's name and sign (+1 maximised, -1 minimised) of a study."""
    import optuna

    base = study.user_attrs.get("base", {})
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0
    return base.get("metric", "accuracy"), sign


def _formatter(study):
    """How the study's objective reads: a percentage for fractions such as accuracy."""
    from autoprune.task import format_metric

    metric, _ = _metric(study)
    return lambda value: format_metric(metric, value)


def pareto_front(points: list[tuple[float, float]], sign: float = 1.0) -> list[int]:
    """Indices of the points no other point beats on both axes: fewer FLOPs, and a better objective
    (higher when ``sign`` is +1, lower when -1)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if sign * points[i][1] > best:
            front.append(i)
            best = sign * points[i][1]
    return front


def _trial_rows(study) -> list[dict]:
    from autoprune.study import completed, score_of

    rows = []
    for t in completed(study):
        a = t.user_attrs
        rows.append({"number": t.number, "score": score_of(t), "flops_ratio": a["flops_ratio"],
                     "params_ratio": a["params_ratio"], "feasible": bool(a.get("feasible")),
                     "agent": a.get("agent", "?"), "policy": a["policy"]})
    return rows


def related_studies(study, storage) -> list:
    """Studies in ``storage`` for the same model, task and budgets (one per agent, say)."""
    import optuna

    from autoprune.study import open_storage

    storage = open_storage(storage)
    model = study.user_attrs.get("model", {})
    budgets = _config(study).get("budgets")
    out = []
    for summary in optuna.get_all_study_summaries(storage):
        attrs = summary.user_attrs
        if (attrs.get("model", {}).get("name"), attrs.get("model", {}).get("dataset")) != (
                model.get("name"), model.get("dataset")):
            continue
        if attrs.get("config", attrs.get("settings", {})).get("budgets") != budgets:
            continue
        out.append(optuna.load_study(study_name=summary.study_name, storage=storage))
    return out


def _finish(fig, ax, path, xlabel: str | None, ylabel: str, title: str, legend_loc: str = "best"):
    import matplotlib.pyplot as plt

    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc=legend_loc, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sensitivity_plot(study, storage: str, path):
    """The per-group curves of a sensitivity scan (drop of the objective vs ratio removed, one panel per group:
    the probes, their monotone envelope, and the threshold and ratio the search chose), for the study
    of a ``sensitivity`` search or for a scan study itself; None when ``study`` is neither."""
    import math

    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from autoprune.agents.sensitivity import drop_at, monotone, scan_drops
    from autoprune.errors import InputError
    from autoprune.study import load_study

    name = study.user_attrs.get("sensitivity_scan")
    if name is None and "sensitivity_identity" not in study.user_attrs:
        return None
    try:
        scan = load_study(name, storage) if name is not None else study
    except InputError:
        return None
    chosen = study.user_attrs.get("sensitivity", {}) if name is not None else {}
    drops = scan_drops(scan, _metric(scan)[1])
    if chosen.get("scan_ratios"):  # the ratios the search used, of all those the scan holds
        keep = {round(r, 6) for r in chosen["scan_ratios"]}
        drops = {g: {r: d for r, d in by.items() if r in keep} for g, by in drops.items()}
    groups = [g for g in (chosen.get("ratios") or drops) if drops.get(g)]  # the space's order
    if not groups:
        return None
    cols = min(4, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 0.6, 2.1 * rows + 1.0), sharex=True, sharey=True,
                             squeeze=False)
    threshold = chosen.get("threshold")
    for ax, g in zip(axes.flat, groups):
        curve = monotone(drops[g])
        ax.plot([r for r, _ in curve], [100 * d for _, d in curve], "-", c="tab:blue", lw=1.2, label="envelope")
        ax.plot(sorted(drops[g]), [100 * drops[g][r] for r in sorted(drops[g])], "o", c="tab:blue", ms=3.5,
                label="probe")
        if threshold is not None:
            ax.axhline(100 * threshold, ls="--", c="tab:red", lw=1, label="threshold")
        if chosen.get("ratios"):
            r = chosen["ratios"][g]
            ax.plot([r], [100 * drop_at(curve, r)], "D", c="tab:red", ms=5, label="chosen ratio")
        ax.set_title(g, fontsize=8)
        # linear up to 1 point, where the threshold usually is, logarithmic above: both stay readable
        ax.set_yscale("symlog", linthresh=1.0, linscale=1.5)
        ax.set_yticks([0, 0.5, 1, 3, 10, 30, 100])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=7, ncol=len(labels))
    metric, _ = _metric(scan)
    title = f"sensitivity scan {scan.study_name}"
    if threshold is not None:
        baseline = chosen.get("baseline_score", chosen.get("baseline_accuracy"))
        title += f"\nthreshold: a drop of {100 * threshold:.2f} points of {metric} (unpruned {100 * baseline:.2f})"
    fig.suptitle(title, fontsize=9, x=0.02, ha="left")
    fig.supxlabel("fraction of the group's channels removed (the group alone)", fontsize=8)
    fig.supylabel(f"validation {metric} drop (points; linear up to 1, then log)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(study, storage: str, out_dir) -> list:
    """Write ``<metric>_vs_flops.png`` (``accuracy_vs_flops.png`` for a classifier), ``ratios.png``,
    ``energy.png`` (energy per layer, unpruned and best; the page lists it with the total), ``agents.png``
    (when several agents' studies share the model and budget), ``sensitivity.png`` (for a sensitivity search
    or scan) and ``index.html`` into ``out_dir``; return the files written."""
    import html
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from autoprune.errors import InputError
    from autoprune.study import best_policy

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = _trial_rows(study)
    if not rows:
        raise InputError(f"study {study.study_name!r} has no completed trial to report")
    config = _config(study)
    budgets = config.get("budgets")
    if not isinstance(budgets, dict):  # a study of an earlier version: display strings beside budget_args
        budgets = config.get("budget_args") or {}
    flops_budget = _fraction(budgets.get("flops"))
    metric, sign = _metric(study)
    fmt = _formatter(study)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    feas = [r for r in rows if r["feasible"]]
    infeas = [r for r in rows if not r["feasible"]]
    ax.scatter([r["flops_ratio"] for r in infeas], [r["score"] for r in infeas], c="lightgray",
               label="infeasible", s=18)
    ax.scatter([r["flops_ratio"] for r in feas], [r["score"] for r in feas], c="tab:blue",
               label="feasible", s=18)
    if feas:
        front = pareto_front([(r["flops_ratio"], r["score"]) for r in feas], sign)
        pts = sorted((feas[i]["flops_ratio"], feas[i]["score"]) for i in front)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", c="tab:red", ms=5, label="feasible Pareto front")
    if flops_budget:
        ax.axvline(flops_budget, ls="--", c="k", lw=1, label="budget")
    base = study.user_attrs.get("base", {})
    base_score = base.get("score", base.get("accuracy"))
    if base_score is not None:
        ax.axhline(base_score, ls=":", c="tab:green", lw=1, label="unpruned")
    written.append(_finish(fig, ax, out / f"{metric}_vs_flops.png", "FLOPs kept (fraction of the unpruned model)",
                           f"validation {metric}", study.study_name))

    best = None
    try:
        best = best_policy(study)
    except InputError:
        pass
    if best is not None:
        names = list(best.ratios)
        ratio = study.user_attrs.get("uniform_ratio")
        uniform = dict.fromkeys(names, ratio) if ratio is not None else None
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4.5))
        xs = range(len(names))
        width = 0.4 if uniform else 0.8
        ax.bar([x - (width / 2 if uniform else 0) for x in xs], [best.ratios[n] for n in names], width,
               label=f"best ({best.search.get('agent')})")
        if uniform:
            ax.bar([x + width / 2 for x in xs], [uniform[n] for n in names], width, label="uniform", alpha=0.7)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
        written.append(_finish(fig, ax, out / "ratios.png", None, "fraction of channels removed",
                               "per-group ratios"))

    energy = energy_table(study, best)
    if energy is not None:
        rows_e, _ = energy
        names = [name for name, _, _ in rows_e]
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4.5))
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [unpruned or 0.0 for _, unpruned, _ in rows_e], 0.4, label="unpruned")
        ax.bar([x + 0.2 for x in xs], [pruned for _, _, pruned in rows_e], 0.4,
               label=f"best ({best.search.get('agent')})")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
        written.append(_finish(fig, ax, out / "energy.png", None, "energy (MAC-equivalents)", "energy per layer"))

    sensitivity = sensitivity_plot(study, storage, out / "sensitivity.png")
    if sensitivity is not None:
        written.append(sensitivity)

    others = related_studies(study, storage)
    table_rows = []
    if len(others) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for other in others:
            orows = [r for r in _trial_rows(other) if r["feasible"]]
            if not orows:
                continue
            agent = orows[0]["agent"]
            ax.scatter([r["flops_ratio"] for r in orows], [r["score"] for r in orows], s=16, label=agent)
            top = max(orows, key=lambda r: sign * r["score"])
            table_rows.append((agent, other.study_name, len(_trial_rows(other)), top["score"], top["flops_ratio"]))
        written.append(_finish(fig, ax, out / "agents.png", "FLOPs kept", f"validation {metric}",
                               "agents side by side (feasible trials)"))

    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(study.study_name)}</title>"
             "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}</style></head><body>",
             f"<h1>{html.escape(study.study_name)}</h1>",
             f"<p>{len(rows)} completed trials, {len(feas)} feasible; budget: "
             f"{html.escape(', '.join(f'{k} {v}' for k, v in budgets.items()))}</p>"]
    if best is not None:
        m = best.metrics
        parts.append(f"<h2>Best feasible policy (trial {best.search.get('trial')})</h2><table>"
                     f"<tr><th>validation {html.escape(metric)}</th><td>{fmt(m['score'])}</td></tr>"
                     f"<tr><th>FLOPs kept</th><td>{m['flops_ratio']:.1%}</td></tr>"
                     f"<tr><th>params kept</th><td>{m['params_ratio']:.1%}</td></tr></table>")
    for f in written:
        parts.append(f"<h2>{f.stem.replace('_', ' ')}</h2><img src='{f.name}' style='max-width:100%'>")
    if energy is not None:
        rows_e, costs = energy
        cell = lambda v: format_amount("energy", v) if v is not None else "-"  # noqa: E731
        parts.append(f"<h2>Energy per layer</h2><p>MAC-equivalents per sample (autoprune.energy; costs "
                     f"{html.escape(costs)})</p><table><tr><th>layer</th><th>unpruned</th><th>best pruned</th>"
                     "<th>kept</th></tr>")
        for name, unpruned, pruned in rows_e:
            parts.append(f"<tr><td>{html.escape(name)}</td><td>{cell(unpruned)}</td><td>{cell(pruned)}</td>"
                         f"<td>{_ratio(pruned, unpruned)}</td></tr>")
        known = [unpruned for _, unpruned, _ in rows_e if unpruned is not None]
        base_total = sum(known) if len(known) == len(rows_e) else None
        best_total = sum(pruned for _, _, pruned in rows_e)
        parts.append(f"<tr><th>total</th><th>{cell(base_total)}</th><th>{cell(best_total)}</th>"
                     f"<th>{_ratio(best_total, base_total)}</th></tr></table>")
    if table_rows:
        parts.append("<h2>Agents</h2><table><tr><th>agent</th><th>study</th><th>trials</th>"
                     f"<th>best feasible {html.escape(metric)}</th><th>its FLOPs kept</th></tr>")
        for agent, name, n, value, fr in table_rows:
            parts.append(f"<tr><td>{html.escape(agent)}</td><td>{html.escape(name)}</td><td>{n}</td>"
                         f"<td>{fmt(value)}</td><td>{fr:.1%}</td></tr>")
        parts.append("</table>")
    if best is not None:
        parts.append("<h2>Policy JSON</h2><pre>" + html.escape(json.dumps(best.to_dict(), indent=2)) + "</pre>")
    parts.append("</body></html>")
    (out / "index.html").write_text("\n".join(parts))
    written.append(out / "index.html")
    return written


def energy_table(study, best) -> tuple[list[tuple[str, float | None, float]], str] | None:
    """``([(layer, unpruned energy, best policy's energy), ...], costs)`` from what the study recorded
    (MAC-equivalents per sample, :mod:`autoprune.energy`); None when the best policy carries no energy
    (a masked granularity, or a study of an earlier version)."""
    if best is None or not best.metrics.get("energy_layers"):
        return None
    base = study.user_attrs.get("base", {}).get("energy_layers") or {}
    layers = best.metrics["energy_layers"]
    costs = _config(study).get("energy_costs") or "default"
    return [(name, base.get(name), float(value)) for name, value in layers.items()], str(costs)


def _fraction(text) -> float | None:
    """A budget's kept fraction, when it is one (``50%``, ``0.5``, ``2x``), for the plots' budget line."""
    from autoprune.budget import parse_budget
    from autoprune.errors import InputError

    if text is None:
        return None
    try:
        return parse_budget("flops", text).fraction
    except InputError:
        return None

