"""The study report: plots, the HTML page, and the Pareto front."""

import pytest

from autoprune.agents import SearchContext, get_agent
from autoprune.budget import parse_budget
from autoprune.evaluator import Evaluator
from autoprune.report import pareto_front, write_report
from autoprune.study import open_study, set_study_info


def test_pareto_front_keeps_points_nothing_beats():
    points = [(0.5, 0.9), (0.4, 0.8), (0.45, 0.95), (0.3, 0.7), (0.5, 0.85), (0.3, 0.6)]
    assert sorted(pareto_front(points)) == [1, 2, 3]


@pytest.fixture(scope="module")
def two_agents(trained_resnet20, digits, tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    storage = f"sqlite:///{d}/r.db"
    ev = Evaluator(trained_resnet20, digits, device="cpu", bn_batches=3, model_info={
        "name": "resnet20", "dataset": "digits", "in_channels": 1, "num_classes": 10, "image_size": 8})
    budget = parse_budget("flops", "50%")
    studies = {}
    for agent, trials in (("uniform", 1), ("random", 3)):
        st = open_study(f"resnet20-digits-{agent}-flops50", storage)
        set_study_info(st, model=ev.model_info, base={**ev.base, "accuracy": ev.baseline().accuracy},
                       settings={"budgets": [str(budget)], "budget_args": {"flops": "50%"}, "max_ratio": 0.9})
        ctx = SearchContext(ev, [budget], st, agent, n_trials=trials)
        get_agent(agent)().search(ctx)
        studies[agent] = st
    return d, storage, studies


def test_report_writes_plots_and_a_page(two_agents):
    d, storage, studies = two_agents
    files = write_report(studies["random"], storage, d / "out")
    names = {f.name for f in files}
    assert {"accuracy_vs_flops.png", "ratios.png", "agents.png", "index.html"} <= names
    for f in files:
        assert f.stat().st_size > 1000
    page = (d / "out" / "index.html").read_text()
    assert "uniform" in page and "random" in page and "best feasible accuracy" in page
    assert (d / "out" / "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
