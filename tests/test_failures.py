"""What goes wrong during a search: a candidate that runs out of memory is a failed trial with its reason
and the search goes on (the error injected, here on a CPU); no feasible policy is exit code 1; an
interrupted command is exit code 130."""

import optuna
import pytest
import torch

import autoprune.agents.gates
import autoprune.evaluator
import autoprune.pruning.icepick
from autoprune.agents import Limits, SearchContext, get_agent
from autoprune.budget import Budgets, parse_budget
from autoprune.cli import main
from autoprune.evaluator import Evaluator
from autoprune.study import completed, open_study

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)"


def out_of_memory_on_call(n, real):
    """``real`` that raises torch.OutOfMemoryError on its ``n``-th call (counting from 1)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise torch.OutOfMemoryError(OOM + "\nIf reserved but unallocated memory is large ...")
        return real(*args, **kwargs)

    return wrapped, calls


@pytest.fixture
def evaluator(trained_resnet20, digits_task):
    return Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=2, seed=0)


def context(evaluator, tmp_path, agent, trials, directions=("maximize",)):
    study = open_study(agent, f"sqlite:///{tmp_path}/db.sqlite3", directions=directions)
    return SearchContext(evaluator, Budgets([parse_budget("flops", "50%")], evaluator), study, agent,
                         limits=Limits(trials), seed=0, finetune_steps=1, storage=study._storage)


def test_a_candidate_out_of_memory_is_a_failed_trial_and_the_search_goes_on(evaluator, tmp_path, monkeypatch):
    failing, calls = out_of_memory_on_call(2, autoprune.evaluator.train_steps)
    monkeypatch.setattr(autoprune.evaluator, "train_steps", failing)
    ctx = context(evaluator, tmp_path, "random", trials=3)
    result = get_agent("random")().search(ctx)
    trials = ctx.study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                                         optuna.trial.TrialState.COMPLETE]
    assert trials[1].user_attrs["fail_reason"] == f"out of memory: {OOM}"  # its first line
    assert len(calls) == 3 and result.policy is not None


def test_an_icepick_run_out_of_memory_is_a_failed_trial_and_the_search_goes_on(evaluator, tmp_path, monkeypatch):
    failing, calls = out_of_memory_on_call(1, autoprune.pruning.icepick.train_steps)
    monkeypatch.setattr(autoprune.pruning.icepick, "train_steps", failing)
    ctx = context(evaluator, tmp_path, "icepick", trials=2, directions=("maximize", "minimize"))
    result = get_agent("icepick")(max_steps=2, probe_steps=0, startup=1).search(ctx)
    trials = ctx.study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert trials[0].user_attrs["fail_reason"] == f"ICE-Pick: out of memory: {OOM}"
    assert len(completed(ctx.study)) == 1 and result.policy is not None


def test_a_gate_learning_run_or_its_training_from_scratch_out_of_memory_is_a_failed_trial(evaluator, tmp_path,
                                                                                         monkeypatch):
    learning, _ = out_of_memory_on_call(1, autoprune.agents.gates.learn_gates)
    scratch, _ = out_of_memory_on_call(1, autoprune.agents.gates.train_steps)
    monkeypatch.setattr(autoprune.agents.gates, "learn_gates", learning)
    monkeypatch.setattr(autoprune.agents.gates, "train_steps", scratch)
    ctx = context(evaluator, tmp_path, "gates", trials=None)
    result = get_agent("gates")(steps=2, snapshot_every=2, train_from_scratch=2, **{"lambda": "0.5,2"}).search(ctx)
    trials = ctx.study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE,
                                         optuna.trial.TrialState.FAIL]
    assert trials[0].user_attrs["fail_reason"] == f"gates run 0: out of memory: {OOM}"
    assert trials[0].params == {"lambda": 0.5, "r": 0.2} and trials[1].params == {"lambda": 2.0, "r": 0.2}
    assert trials[2].user_attrs["fail_reason"] == f"gates from scratch: out of memory: {OOM}"
    assert result.policy is not None and result.info["scratch_score"] is None


def test_no_feasible_policy_is_exit_code_1(capsys, tmp_path):
    # every candidate's fine-tune diverges: each is a failed trial, and nothing meets the budget
    code = main(["search", "--agent", "random", "--trials", "2", "--finetune-steps", "3", "--finetune-lr", "1e12",
                 "--budget-flops", "50%", "--pretrain-steps", "40", "--device", "cpu", "--bn-batches", "2",
                 "--storage", f"sqlite:///{tmp_path}/a.db", "-o", str(tmp_path / "best.json")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().splitlines()[-1] == "no feasible policy was found; try more --trials or a looser budget"
    assert not (tmp_path / "best.json").exists()
    trials = optuna.load_study(study_name="resnet20-digits-random-flops50", storage=f"sqlite:///{tmp_path}/a.db").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all("diverged" in t.user_attrs["fail_reason"] for t in trials)


@pytest.mark.parametrize("command", [
    ["search", "--budget-flops", "50%", "--storage", "sqlite:///{tmp}/a.db"],
    ["worker", "--study", "s", "--storage", "sqlite:///{tmp}/a.db"],
    ["compare", "--agents", "uniform", "--budget-flops", "50%", "--storage", "sqlite:///{tmp}/a.db"],
])
def test_ctrl_c_is_exit_code_130_whatever_the_command(capsys, tmp_path, monkeypatch, command):
    """The in-process view of Ctrl-C (a real SIGINT to a real search is test_reliability's): the command
    stops with 130 and says so on stderr."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for where in ("autoprune.runner.prepare", "autoprune.runner.run_worker"):
        monkeypatch.setattr(where, interrupted)
    code = main([a.replace("{tmp}", str(tmp_path)) for a in command])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and "Traceback" not in err
