"""Agents, trial recording, resuming and best-feasible selection, on a real Optuna SQLite storage."""

import optuna
import pytest

from autoprune.agents import Limits, SearchContext, get_agent, list_agents
from autoprune.budget import Budgets, parse_budget
from autoprune.config import SearchConfig, SourceConfig
from autoprune.errors import InputError, ParameterError
from autoprune.evaluator import Evaluator
from autoprune.study import best_feasible, best_policy, completed, open_study


@pytest.fixture(scope="module")
def evaluator(trained_resnet20, digits_task):
    return Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=3, seed=0)


def context(evaluator, tmp_path, agent, budgets, trials=None, name="s"):
    study = open_study(name, f"sqlite:///{tmp_path}/db.sqlite3")
    return SearchContext(evaluator, Budgets(budgets, evaluator), study, agent, limits=Limits(trials), seed=1)


def test_registry_lists_the_baselines_and_refuses_unknown_agents():
    assert {"uniform", "random"} <= set(list_agents())
    with pytest.raises(ParameterError, match="agent='nope': unknown agent; choose from .*random.*uniform"):
        get_agent("nope")


def test_agent_options_are_validated():
    with pytest.raises(ParameterError, match="random option warmup=3: no such option; its options: spread"):
        get_agent("random")(warmup=3)


@pytest.mark.parametrize("budget", ["20%", "50%", "90%"])
def test_uniform_meets_the_flops_budget_as_tightly_as_channels_allow(evaluator, tmp_path, budget):
    b = parse_budget("flops", budget)
    ctx = context(evaluator, tmp_path, "uniform", [b])
    result = get_agent("uniform")().search(ctx)
    assert result.policy is not None and result.trials == 1
    ratio = result.info["uniform_ratio"]
    limit = b.limit(evaluator.space.base_flops)
    assert result.evaluation.flops <= limit
    # one channel less pruning anywhere breaks the budget: the ratio cannot be lowered further
    looser = evaluator.uniform(max(0.0, ratio - 1 / 64 - 1e-6))
    assert evaluator.cost(looser)["flops"] > limit


def test_uniform_meets_flops_and_params_budgets_together(evaluator, tmp_path):
    budgets = [parse_budget("flops", "70%"), parse_budget("params", "30%")]
    result = get_agent("uniform")().search(context(evaluator, tmp_path, "uniform", budgets))
    assert result.evaluation.flops <= 0.7 * evaluator.space.base_flops
    assert result.evaluation.params <= 0.3 * evaluator.space.base_params


def test_unreachable_budget_is_refused_clearly(evaluator, tmp_path):
    ctx = context(evaluator, tmp_path, "uniform", [parse_budget("flops", "1%")])
    with pytest.raises(InputError, match="budget cannot be met.*pinned"):
        get_agent("uniform")().search(ctx)


def test_random_records_every_candidate_as_a_feasible_trial(evaluator, tmp_path):
    budget = parse_budget("flops", "50%")
    ctx = context(evaluator, tmp_path, "random", [budget], trials=4)
    result = get_agent("random")().search(ctx)
    trials = completed(ctx.study)
    assert len(trials) == 4
    for t in trials:
        a = t.user_attrs
        assert a["agent"] == "random" and a["feasible"] is True
        assert a["flops"] <= budget.limit(evaluator.space.base_flops)
        assert set(t.params) == set(evaluator.space.names)
        assert t.constraints == {"flops": pytest.approx(a["flops"] / budget.limit(evaluator.space.base_flops) - 1)}
        assert t.constraints["flops"] <= 0
        assert a["flops_ratio"] == pytest.approx(a["flops"] / evaluator.space.base_flops)
    assert result.evaluation.score == max(t.value for t in trials)


def test_a_second_run_resumes_the_study_without_duplicates(evaluator, tmp_path):
    budget = parse_budget("flops", "50%")
    first = context(evaluator, tmp_path, "random", [budget], trials=2, name="resume")
    get_agent("random")().search(first)
    fresh = Evaluator(evaluator.model, evaluator.task, device="cpu", bn_batches=3, seed=0)
    second = context(fresh, tmp_path, "random", [budget], trials=4, name="resume")
    get_agent("random")().search(second)
    trials = completed(second.study)
    assert len(trials) == 4
    assert second.recorder.written == 2  # the first two draws were answered from the study
    assert fresh.evaluations == 2
    assert len({t.user_attrs["policy"] for t in trials}) == 4


def test_best_feasible_ignores_infeasible_trials(evaluator, tmp_path):
    study = open_study("mixed", f"sqlite:///{tmp_path}/db.sqlite3")
    strict = SearchContext(evaluator, Budgets([parse_budget("flops", "30%")], evaluator), study, "uniform")
    dense = strict.evaluate(evaluator.uniform(0.1))  # infeasible at 30 %, and more accurate
    sparse = strict.evaluate(evaluator.uniform(0.6))
    assert dense.score > sparse.score
    best = best_feasible(study)
    assert best.user_attrs["flops_ratio"] <= 0.3 + 1e-9
    policy = best_policy(study)
    assert policy.metrics["flops"] == best.user_attrs["flops"]
    assert policy.search["trial"] == best.number


def test_failed_candidate_is_recorded_and_the_search_goes_on(trained_resnet20, digits_task, tmp_path):
    ev = Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=2, finetune_lr=1e9)
    ctx = context(ev, tmp_path, "random", [parse_budget("flops", "50%")], trials=2, name="fail")
    ctx.finetune_steps = 60
    get_agent("random")().search(ctx)
    failed = ctx.study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == 2
    assert "diverged" in failed[0].user_attrs["fail_reason"]


def test_an_agent_refuses_a_study_with_another_number_of_objectives(tmp_path):
    from autoprune.runner import prepare, run_search

    storage = f"sqlite:///{tmp_path}/db.sqlite3"
    open_study("two", storage, directions=("maximize", "minimize"))
    setup = prepare(SourceConfig(model="resnet20", dataset="digits", pretrain_steps=40), device="cpu")
    config = SearchConfig(agent="random", budgets={"flops": "50%"}, storage=storage, study="two", device="cpu")
    with pytest.raises(InputError, match="study 'two' has 2 objective.*agent 'random' records 1"):
        run_search(setup.model, setup.task, config, info=setup.info, final=False)


class Messages:
    def __init__(self):
        self.lines = []

    def start(self, total, done):
        pass

    def advance(self, status):
        pass

    def stop(self):
        pass

    def message(self, text):
        self.lines.append(text)


@pytest.mark.parametrize("blind", [True, False], ids=["at-chance", "trained"])
def test_a_search_whose_candidates_all_score_at_chance_says_so_once(trained_resnet20, digits_task, tmp_path, blind):
    import copy

    import torch

    model = copy.deepcopy(trained_resnet20)
    if blind:  # a classifier that always answers class 0 scores the share of class 0, at most chance
        torch.nn.init.zeros_(model.fc.weight)
        torch.nn.init.zeros_(model.fc.bias)
    chance = digits_task.chance
    labels = digits_task.data.val.y
    assert chance == pytest.approx(max((labels == c).double().mean().item() for c in labels.unique()))
    ev = Evaluator(model, digits_task, device="cpu", bn_batches=2, seed=0)
    ctx = context(ev, tmp_path, "random", [parse_budget("flops", "50%")], trials=7)
    ctx.reporter = Messages()
    get_agent("random")().search(ctx)
    said = [m for m in ctx.reporter.lines if "chance" in m]
    if blind:
        assert said == [f"the first 5 candidates all score within 5% of chance ({digits_task.format(chance)}) after "
                        "adaptive BN and 0 fine-tune steps, so the search cannot tell them apart; give more "
                        "--finetune-steps (README: Search quality)"]
    else:
        assert said == []
