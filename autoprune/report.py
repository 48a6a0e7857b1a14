"""What a person sees in the terminal: the search's progress bar and its summary table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autoprune.agents import Reporter
from autoprune.budget import Budget, format_amount
from autoprune.evaluator import Evaluation


class ProgressReporter(Reporter):
    """A rich progress bar over the trials, with the best feasible accuracy so far."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task = None

    def start(self, total: int | None, done: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]search[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"), console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("search", total=total, completed=min(done, total or done),
                                           status="resumed" if done else "")

    def advance(self, result: Evaluation | None, feasible: bool, best: float | None) -> None:
        if self.progress is None:
            return
        if result is None:
            status = "candidate failed"
        else:
            status = f"last {result.accuracy:.2%}{'' if feasible else ' (infeasible)'}"
        if best is not None:
            status += f" | best feasible {best:.2%}"
        self.progress.update(self.task, advance=1, status=status)

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[dim]{text}[/dim]")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _ratio(pruned: float | None, base: float | None) -> str:
    if pruned is None or not base:
        return "-"
    return f"{pruned / base:.1%}"


def print_summary(console: Console, outcome, budgets: list[Budget]) -> None:
    """Unpruned vs best: accuracy, FLOPs (MACs), params, latency, with the kept fraction."""
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
        return

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.2%}"

    table.add_row("val accuracy", pct(base_val.accuracy), pct(best.accuracy), "")
    if base_test is not None and best_test is not None:
        table.add_row("test accuracy", pct(base_test.accuracy), pct(best_test.accuracy), "")
    table.add_row("FLOPs (MACs)", format_amount("flops", base_val.flops), format_amount("flops", best.flops),
                  _ratio(best.flops, base_val.flops))
    table.add_row("params", format_amount("params", base_val.params), format_amount("params", best.params),
                  _ratio(best.params, base_val.params))
    b_lat = base_test.latency if base_test is not None else base_val.latency
    p_lat = best_test.latency if best_test is not None else best.latency
    if b_lat is not None and p_lat is not None:
        table.add_row("latency (batch 1)", format_amount("latency", b_lat), format_amount("latency", p_lat),
                      _ratio(p_lat, b_lat))
    table.add_row("fine-tune steps", "-", str(best.finetune_steps), "")
    console.print(table)
