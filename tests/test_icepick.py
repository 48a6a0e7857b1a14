"""ICE-Pick: the pruning-aware LR, staged pruning, layer freezing, threshold-guided fine-tuning, and the
agent's multi-objective TPE search over its hyperparameters, on a real ResNet-20 and the digits data."""

import copy
import json
import math

import pytest
import torch

import autoprune.agents.icepick  # noqa: F401  (registers the agent)
from autoprune.agents import Limits, SearchContext, get_agent
from autoprune.agents.icepick import PAPER_DEFAULTS
from autoprune.budget import Budgets, parse_budget
from autoprune.errors import InputError
from autoprune.evaluator import Evaluator
from autoprune.pruning.icepick import IcePick, freeze, layer_names, layer_norms, pruning_aware_lr, stage_targets
from autoprune.study import best_policy, completed, open_study, policy_of
from autoprune.training import train_steps

DIRECTIONS = ("maximize", "minimize")


@pytest.fixture(scope="module")
def evaluator(trained_resnet20, digits_task):
    return Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=3, seed=0)


def context(evaluator, study, budget="50%", trials=None, seed=0):
    # the storage holding the study, as run_search passes it (ICE-Pick runs study.optimize on it)
    return SearchContext(evaluator, Budgets([parse_budget("flops", budget)], evaluator), study, "icepick",
                         limits=Limits(trials), seed=seed, storage=study._storage)


def is_paper_run(trial, max_steps=3):
    return trial.params == pytest.approx(dict(PAPER_DEFAULTS, finetune_steps=max_steps))


def test_lr_is_base_minus_half_delta_at_one_minus_p_and_falls_as_weights_are_removed():
    base, delta = 1e-3, 7.5e-4
    for p, beta in [(0.12, 50.0), (0.3, 5.0), (0.01, 1.0)]:
        assert pruning_aware_lr(1 - p, base, delta, p, beta) == pytest.approx(base - delta / 2)
        alphas = [1.0 - i / 100 for i in range(100)]  # 1.0 down to 0.01 of the weights left
        lrs = [pruning_aware_lr(a, base, delta, p, beta) for a in alphas]
        assert all(later <= earlier for earlier, later in zip(lrs, lrs[1:]))
        assert lrs[0] > lrs[-1]
        assert base - delta <= min(lrs) and max(lrs) <= base
    # the paper's setting: about base when unpruned, about base - delta past the midpoint
    assert pruning_aware_lr(1.0) == pytest.approx(1e-3, rel=1e-4)
    assert pruning_aware_lr(0.5) == pytest.approx(2.5e-4, rel=1e-4)


def test_lr_schedule_refuses_parameters_outside_their_range():
    with pytest.raises(InputError, match=r"P must be in \(0, 0.5\)"):
        pruning_aware_lr(0.9, p=0.5)
    with pytest.raises(InputError, match="beta must be > 0"):
        pruning_aware_lr(0.9, beta=0.0)
    with pytest.raises(InputError, match="must not exceed base_lr"):
        IcePick(base_lr=1e-3, delta=2e-3)


def test_stages_bring_one_resnet_block_after_another_to_its_target(evaluator):
    names = evaluator.space.names
    target = dict.fromkeys(names, 0.5)
    stages = stage_targets(names, target)
    assert len(stages) == 3 and stages[-1] == target
    for i, stage in enumerate(stages, start=1):
        done = {n for n, r in stage.items() if r == 0.5}
        assert done == {n for n in names if int(n[len("layer")]) <= i}
    steps = stage_targets(names, target, stages=4, schedule="steps")
    assert [s[names[0]] for s in steps] == pytest.approx([0.125, 0.25, 0.375, 0.5])


def test_below_the_threshold_no_fine_tune_step_runs_and_the_target_structure_is_reached(evaluator):
    policy = evaluator.uniform(0.4)
    run = IcePick(threshold=1.0, finetune_steps=5, probe_steps=2, freeze_ratio=0.3).run(evaluator, policy)
    assert run.finetune_steps == 0 and run.probe_steps == 0
    assert len(run.stages) == 3 and not any(s.finetuned for s in run.stages)
    assert all(s.drop < 1.0 and s.frozen == [] for s in run.stages)
    # staged pruning of a pruned model ends with exactly the channel counts of the policy applied at once
    measured = evaluator.measure(run.model)
    assert (measured.flops, measured.params) == (evaluator.cost(policy)["flops"], evaluator.cost(policy)["params"])

    always = IcePick(threshold=-math.inf, finetune_steps=3, probe_steps=0).run(evaluator, policy)
    assert always.finetune_steps == 9 and all(s.finetuned and s.lr is not None for s in always.stages)


def test_frozen_layers_receive_no_updates_yet_are_pruned(evaluator):
    policy = evaluator.uniform(0.4)
    # one stage from the unpruned weights: the frozen layers must equal the plain pruned copy's
    ice = IcePick(freeze_ratio=0.5, threshold=-math.inf, base_lr=0.05, delta=0.0, finetune_steps=5, probe_steps=2,
                  stages=1, schedule="steps", weight_decay=1e-2)
    run = ice.run(evaluator, policy)
    frozen = run.stages[0].frozen
    layers = layer_names(evaluator.model)
    assert len(frozen) == round(0.5 * len(layers))
    pruned_only = dict(evaluator.pruner.prune(policy).named_modules())
    original = dict(evaluator.model.named_modules())
    result = dict(run.model.named_modules())
    shrunk = 0
    for name in layers:
        w = result[name].weight
        assert w.shape == pruned_only[name].weight.shape
        if name in frozen:
            assert torch.equal(w, pruned_only[name].weight), f"{name} is frozen but moved"
            shrunk += w.shape != original[name].weight.shape
        else:
            assert not torch.equal(w, pruned_only[name].weight), f"{name} is trained but did not move"
    assert shrunk >= len(frozen) - 1  # only the stem's weights keep their shape (its outputs are pinned)
    assert all(p.requires_grad for p in run.model.parameters())
    # a frozen layer's batch norm is frozen with it: its scale and shift stay the pruned copy's
    norms = layer_norms(evaluator.space)
    assert any(name in norms for name in frozen)
    for name in frozen:
        if name in norms:
            bn = norms[name]
            assert torch.equal(result[bn].weight, pruned_only[bn].weight), f"{bn} is frozen with {name} but moved"
            assert torch.equal(result[bn].bias, pruned_only[bn].bias), f"{bn} is frozen with {name} but moved"


def test_a_layer_is_frozen_with_its_batch_norm_so_autograd_skips_a_frozen_stem(evaluator):
    norms = layer_norms(evaluator.space)
    assert norms["conv1"] == "bn1" and norms["layer1.0.conv1"] == "layer1.0.bn1"
    assert "fc" not in norms  # no batch norm follows the classifier
    model = copy.deepcopy(evaluator.model)
    modules = dict(model.named_modules())
    trainable = freeze(model, ["conv1"], norms)
    assert {id(p) for p in trainable} == {
        id(p) for n, p in model.named_parameters() if not n.startswith(("conv1.", "bn1."))}
    # the stem's output needs no gradient: autograd records nothing for it, so its backward is skipped
    # (were its batch norm still trained, the gradient would flow back through the whole network to it)
    seen = []
    modules["bn1"].register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    task = evaluator.task
    train_steps(model, task, task.train_batches(0), 2, 1e-3, params=trainable)
    assert seen == [False, False]
    freeze(model, [], norms)
    assert all(p.requires_grad for p in model.parameters())


def test_agent_records_each_icepick_run_as_a_two_objective_trial_and_exports_its_hyperparameters(
        evaluator, tmp_path):
    agent = get_agent("icepick")(max_steps=3, probe_steps=1, startup=1)
    assert agent.directions(evaluator.task) == list(DIRECTIONS)
    assert agent.metric_names(evaluator.task) == ["accuracy", "pruning_seconds"]
    study = open_study("ice", f"sqlite:///{tmp_path}/db.sqlite3", directions=agent.directions(evaluator.task))
    budget = parse_budget("flops", "50%")
    ctx = context(evaluator, study, trials=2)
    with evaluator.sealed("test"):  # as in a search: scoring the test split raises RuntimeError
        result = agent.search(ctx)
    trials = completed(study)
    assert len(trials) == 2
    assert trials[0].params["base_lr"] == pytest.approx(1e-3) and trials[0].params["p"] == pytest.approx(0.12)
    for t in trials:
        a = t.user_attrs
        assert set(t.params) == {"freeze_ratio", "threshold", "base_lr", "delta_share", "p", "beta",
                                 "finetune_steps"}
        assert t.values == [a["score"], a["pruning_seconds"]] and a["score"] == a["accuracy"]
        assert a["feasible"] and a["flops"] <= budget.limit(evaluator.space.base_flops)
        assert a["measured_by_agent"] and a["split"] == "val"
        # no ICE-Pick run reads the test split: nothing of it is recorded
        assert not [k for k in a if "test" in k], a.keys()
    assert result.evaluation.score == max(t.values[0] for t in trials)

    exported = best_policy(study)
    hyper = exported.search["icepick"]
    best_trial = next(t for t in trials if t.number == exported.search["trial"])
    assert hyper["base_lr"] == best_trial.params["base_lr"] and hyper["p"] == best_trial.params["p"]
    assert exported.search["pareto_front"][0]["score"] == exported.metrics["score"] == exported.metrics["accuracy"]
    assert not [k for k in exported.metrics if "test" in k]
    assert {"freeze_ratio", "threshold", "delta", "beta", "pruning_seconds", "finetune_steps_spent"} <= set(hyper)
    assert exported.search["pareto_front"] and json.loads(exported.to_json())["search"]["icepick"] == hyper

    # a resumed search continues: TPE sees the recorded runs, and they are not taken as evaluator results
    resumed = context(evaluator, study, trials=3)
    for t in trials:
        assert resumed.trial_of(policy_of(t), t.user_attrs["finetune_steps"]) is None
    agent.search(resumed)
    after = completed(study)
    assert len(after) == 3
    assert sum(is_paper_run(t) for t in after) == 1  # the paper's values are not run a second time


def test_a_target_policy_file_must_fit_the_model_and_the_budget(evaluator, tmp_path):
    study = open_study("ice", f"sqlite:///{tmp_path}/db.sqlite3", directions=DIRECTIONS)
    ctx = context(evaluator, study, trials=1)
    light = tmp_path / "light.json"
    evaluator.uniform(0.1).save(light)
    with pytest.raises(InputError, match="does not meet the budget.*flops"):
        get_agent("icepick")(policy=str(light)).target(ctx)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "autoprune.policy/1", "ratios": {"features.0": 0.5}}))
    with pytest.raises(InputError, match="policy does not fit the model searched"):
        get_agent("icepick")(policy=str(other)).target(ctx)
    heavy = tmp_path / "heavy.json"
    evaluator.uniform(0.6).save(heavy)
    assert get_agent("icepick")(policy=str(heavy)).target(ctx).ratios == evaluator.uniform(0.6).ratios


def test_a_study_with_one_objective_is_refused_clearly(evaluator, tmp_path):
    from autoprune.config import SearchConfig
    from autoprune.runner import run_search

    storage = f"sqlite:///{tmp_path}/db.sqlite3"
    open_study("one", storage)
    config = SearchConfig(agent="icepick", budgets={"flops": "50%"}, storage=storage, study="one", device="cpu",
                          trials=1)
    with pytest.raises(InputError, match="study 'one' has 1 objective.*'icepick' records 2.*choose another --study"):
        run_search(evaluator.model, evaluator.task, config, final=False)


def test_plain_iterative_pruning_fine_tunes_every_stage_at_a_fixed_lr_with_nothing_frozen():
    it = IcePick.iterative(lr=1e-3, finetune_steps=7)
    assert it.lr(1.0) == it.lr(0.3) == pytest.approx(1e-3)
    assert it.threshold == -math.inf and it.freeze_ratio == 0.0 and it.probe_steps == 0


def test_workers_take_in_each_others_runs_before_asking(evaluator, tmp_path):
    """`autoprune worker` processes share the study: each TPE samples from the runs the others record."""
    url = f"sqlite:///{tmp_path}/db.sqlite3"
    first = get_agent("icepick")(max_steps=3, probe_steps=1, startup=1)
    assert first.parallel
    # one worker records a run (the paper's values come first)
    first.search(context(evaluator, open_study("ice", url, directions=DIRECTIONS), trials=1))
    runs = completed(open_study("ice", url, directions=DIRECTIONS))
    assert len(runs) == 1 and is_paper_run(runs[0])
    # another worker, its own agent, context and seed, joins the same study: it takes that run in
    # and asks TPE for new values rather than starting over
    second = get_agent("icepick")(max_steps=3, probe_steps=1, startup=1)
    second.search(context(evaluator, open_study("ice", url, directions=DIRECTIONS), trials=2, seed=7))
    runs = completed(open_study("ice", url, directions=DIRECTIONS))
    assert len(runs) == 2 and sum(is_paper_run(t) for t in runs) == 1


def test_a_context_made_without_a_storage_searches_its_own_study(evaluator, tmp_path):
    """A SearchContext made as autoprune.agents.base documents it (no storage given) runs ICE-Pick on
    the study it was given, not on a study of another storage."""
    study = open_study("own", f"sqlite:///{tmp_path}/db.sqlite3", directions=DIRECTIONS)
    ctx = SearchContext(evaluator, Budgets([parse_budget("flops", "50%")], evaluator), study, "icepick",
                        limits=Limits(1))
    get_agent("icepick")(max_steps=3, probe_steps=1, startup=1).search(ctx)
    assert len(completed(study)) == 1
