"""Resuming the learning agents: an interrupted AMC or NetAdapt search continues where it stopped."""

import pytest

import autoprune.agents.amc  # noqa: F401
import autoprune.agents.netadapt  # noqa: F401
from autoprune.agents import Limits, SearchContext, get_agent
from autoprune.budget import Budgets, parse_budget
from autoprune.evaluator import Evaluator
from autoprune.study import completed, open_study


@pytest.fixture
def fresh_evaluator(trained_resnet20, digits_task):
    # a new evaluator per run: a resumed process starts with an empty cache
    return lambda: Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=2, seed=0)


def context(evaluator, budget, study, agent, trials=None):
    return SearchContext(evaluator, Budgets([budget], evaluator), study, agent, limits=Limits(trials), seed=0)


def test_amc_resumes_by_replaying_its_recorded_episodes_into_the_replay_buffer(fresh_evaluator, tmp_path):
    storage = f"sqlite:///{tmp_path}/amc.db"
    budget = parse_budget("flops", "50%")
    first = context(fresh_evaluator(), budget, open_study("amc", storage), "amc", trials=4)
    get_agent("amc")(warmup=2, hidden=32).search(first)
    assert len(completed(first.study)) == 4

    second = context(fresh_evaluator(), budget, open_study("amc", storage), "amc", trials=7)
    get_agent("amc")(warmup=2, hidden=32).search(second)
    trials = completed(second.study)
    assert len(trials) == 7
    # the four recorded episodes were answered from the study (their rewards refill the replay
    # buffer), so only the three new episodes were evaluated
    assert second.recorder.written == 3
    assert second.evaluator.evaluations == 3
    assert len({t.user_attrs["policy"] for t in trials}) == 7


def test_netadapt_resumes_from_its_last_accepted_iteration(fresh_evaluator, tmp_path):
    storage = f"sqlite:///{tmp_path}/na.db"
    budget = parse_budget("flops", "85%")
    agent = dict(initial=0.04, short_steps=0, long_steps=0)
    first = context(fresh_evaluator(), budget, open_study("na", storage), "netadapt", trials=14)
    get_agent("netadapt")(**agent).search(first)
    accepted_before = list(first.study.user_attrs.get("netadapt_accepted", []))
    assert accepted_before, "the interrupted search accepted no iteration"

    second = context(fresh_evaluator(), budget, open_study("na", storage), "netadapt")
    result = get_agent("netadapt")(**agent).search(second)
    accepted_after = second.study.user_attrs["netadapt_accepted"]
    assert accepted_after[: len(accepted_before)] == accepted_before
    assert len(accepted_after) > len(accepted_before)
    trials = completed(second.study)
    assert len({t.user_attrs["policy"] for t in trials}) == len(trials), "a proposal was evaluated twice"
    assert second.recorder.written < len(trials)  # the recorded iterations were not evaluated again
    assert second.evaluator.evaluations == second.recorder.written
    assert result.policy is not None and result.evaluation.flops <= budget.limit(second.evaluator.space.base_flops)
