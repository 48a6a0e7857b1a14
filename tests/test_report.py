"""The study report: plots, the HTML page, and the Pareto front."""

import pytest

from autoprune.agents import Limits, SearchContext, get_agent
from autoprune.budget import Budgets, parse_budget
from autoprune.evaluator import Evaluator
from autoprune.report import pareto_front, write_report
from autoprune.study import open_study, set_study_info


def test_pareto_front_keeps_points_nothing_beats():
    points = [(0.5, 0.9), (0.4, 0.8), (0.45, 0.95), (0.3, 0.7), (0.5, 0.85), (0.3, 0.6)]
    assert sorted(pareto_front(points)) == [1, 2, 3]
    # a minimised objective (a loss): lower is better, so the front is the other corner
    assert sorted(pareto_front(points, sign=-1.0)) == [5]
    assert sorted(pareto_front([(0.3, 0.6), (0.4, 0.5), (0.5, 0.55)], sign=-1.0)) == [0, 1]


@pytest.fixture(scope="module")
def two_agents(trained_resnet20, digits_task, tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    storage = f"sqlite:///{d}/r.db"
    ev = Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=3, model_info={
        "name": "resnet20", "dataset": "digits", "in_channels": 1, "num_classes": 10, "image_size": 8})
    budgets = Budgets([parse_budget("flops", "50%")], ev, 0.9)
    baseline = ev.baseline()
    studies = {}
    for agent, trials in (("uniform", 1), ("random", 3)):
        st = open_study(f"resnet20-digits-{agent}-flops50", storage)
        # what run_search records on the study
        set_study_info(st, model=ev.model_info,
                       base={**ev.base, "score": baseline.score, "metric": baseline.metric, **baseline.metrics},
                       config={"agent": agent, "budgets": {"flops": "50%"}, "max_ratio": 0.9},
                       uniform_ratio=max(budgets.fit().values()))
        ctx = SearchContext(ev, budgets, st, agent, limits=Limits(trials))
        get_agent(agent)().search(ctx)
        studies[agent] = st
    return d, storage, studies


def test_report_writes_plots_and_a_page(two_agents):
    d, storage, studies = two_agents
    files = write_report(studies["random"], storage, d / "out")
    names = {f.name for f in files}
    # the objective's plot is named after the task's metric: accuracy for a classifier
    assert {"accuracy_vs_flops.png", "ratios.png", "agents.png", "index.html"} <= names
    for f in files:
        assert f.stat().st_size > 1000
    page = (d / "out" / "index.html").read_text()
    assert "uniform" in page and "random" in page and "best feasible accuracy" in page
    assert (d / "out" / "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"


def test_report_reads_a_study_of_an_earlier_version(tmp_path):
    """Studies written before the Task seam: "settings" (budgets as display strings beside "budget_args"),
    the unpruned model's "accuracy", trials that record "accuracy" only."""
    import json

    import optuna

    from autoprune.study import RATIO_DISTRIBUTION

    storage = f"sqlite:///{tmp_path}/old.db"
    st = open_study("resnet20-digits-random-flops50", storage)
    set_study_info(st, model={"name": "resnet20", "dataset": "digits"},
                   base={"flops": 100.0, "params": 10.0, "accuracy": 0.9},
                   settings={"budgets": ["flops <= 50%"], "budget_args": {"flops": "50%"}, "max_ratio": 0.9})
    for ratio, accuracy in [(0.5, 0.8), (0.6, 0.7), (0.2, 0.85)]:
        policy = {"schema": "autoprune.policy/1", "ratios": {"layer1": ratio}, "granularity": "channel",
                  "criterion": "l1"}
        flops = 100 * (1 - ratio)
        st.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, values=[accuracy], params={"layer1": ratio},
            distributions={"layer1": RATIO_DISTRIBUTION},
            user_attrs={"agent": "random", "accuracy": accuracy, "flops": flops, "params": 5,
                        "flops_ratio": flops / 100, "params_ratio": 0.5, "feasible": flops <= 50,
                        "finetune_steps": 0, "seconds": 1.0, "policy": json.dumps(policy)}))
    files = write_report(st, storage, tmp_path / "out")
    assert {"accuracy_vs_flops.png", "ratios.png", "index.html"} <= {f.name for f in files}
    page = (tmp_path / "out" / "index.html").read_text()
    assert "flops 50%" in page and "80.00%" in page  # the budget, and the best feasible trial's accuracy
