"""The shared evaluator on a real trained model and the embedded digits data."""

import pytest
import torch
from torch import nn

from autoprune.errors import CandidateError
from autoprune.evaluator import Evaluator
from autoprune.training import recalibrate_bn, train_steps


@pytest.fixture(scope="module")
def evaluator(trained_resnet20, digits_task):
    return Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=5, seed=0)


def test_cost_predicts_what_evaluate_measures(evaluator):
    policy = evaluator.uniform(0.4)
    predicted = evaluator.cost(policy)
    result = evaluator.evaluate(policy)
    assert predicted["flops"] == result.flops
    assert predicted["params"] == result.params
    assert result.flops < evaluator.space.base_flops


def test_evaluate_is_cached_by_policy(evaluator):
    policy = evaluator.uniform(0.3)
    before = evaluator.evaluations
    a = evaluator.evaluate(policy)
    b = evaluator.evaluate(evaluator.uniform(0.3))
    assert a is b
    assert evaluator.evaluations == before + 1


def test_build_is_deterministic_for_a_seed(evaluator):
    policy = evaluator.uniform(0.5)
    a, b = evaluator.build(policy, 5), evaluator.build(policy, 5)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_finetuning_recovers_accuracy_of_a_heavily_pruned_model(evaluator):
    policy = evaluator.uniform(0.75)
    zero = evaluator.evaluate(policy, 0)
    tuned = evaluator.evaluate(policy, 60)
    assert tuned.finetune_steps == 60
    assert tuned.metric == zero.metric == "accuracy"
    assert tuned.score > zero.score
    assert tuned.metrics["accuracy"] == tuned.score


def test_adaptive_bn_beats_stale_statistics(evaluator):
    """Pruned with the unpruned model's BN statistics vs. recalibrated: recalibration helps."""
    policy = evaluator.uniform(0.6)
    stale = evaluator.pruner.prune(policy)
    stale_acc = evaluator.measure(stale).score
    assert evaluator.evaluate(policy).score > stale_acc


def test_distillation_pulls_the_fine_tuned_model_towards_the_unpruned_one(trained_resnet20, digits_task):
    """The same pruned model, batches and steps, with and without distillation: with it, the fine-tuned
    model's outputs end up much closer (KL divergence at the distillation temperature) to the teacher's."""
    import torch.nn.functional as F

    x = next(iter(digits_task.data.loader("val", 1000, "cpu")))[0]
    with torch.no_grad():
        teacher = trained_resnet20(x)

    def divergence(distill):
        ev = Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=5, distill=distill)
        model = ev.build(ev.uniform(0.5), 20)
        with torch.no_grad():
            student = model(x)
        return float(F.kl_div(F.log_softmax(student / 4, 1), F.softmax(teacher / 4, 1), reduction="batchmean"))

    plain, distilled = divergence(0.0), divergence(0.7)
    assert distilled < 0.6 * plain, (distilled, plain)  # seen: 0.12 against 0.33


def test_baseline_is_the_unpruned_model(evaluator):
    base = evaluator.baseline()
    assert base.flops == evaluator.space.base_flops
    assert base.metric == "accuracy" and base.score > 0.8
    assert base.score == base.metrics["accuracy"] and base.loss > 0


def test_latency_is_measured_when_asked(trained_resnet20, digits_task):
    ev = Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=2, latency=True, latency_repeats=3)
    result = ev.evaluate(ev.uniform(0.5))
    assert result.latency is not None and result.latency > 0
    assert ev.base["latency"] > 0


def test_bn_recalibration_replaces_running_statistics(digits_task):
    # the task gives the forward pass (model(batch[0])); the batches are these
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    batches = iter([(torch.full((4, 1, 2, 2), 3.0), torch.zeros(4, dtype=torch.long))] * 3)
    recalibrate_bn(net, digits_task, batches, 3)
    bn = net[1]
    expected = net[0](torch.full((1, 1, 1, 1), 3.0)).flatten()
    torch.testing.assert_close(bn.running_mean, expected.detach())
    assert not net.training


def test_diverging_finetune_raises_candidate_error(digits_task):
    # the task gives the forward pass and the loss (cross-entropy); the batches are these
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(8, 4) * 1e6
    batches = iter([(x, torch.zeros(8, dtype=torch.long))] * 100)
    with pytest.raises(CandidateError, match="diverged"):
        train_steps(net, digits_task, batches, 100, lr=1e6)


def test_autocast_auto_is_off_on_the_cpu_and_recorded_for_apply(trained_resnet20, digits_task):
    from autoprune.config import SearchConfig
    from autoprune.runner import rebuild, run_search

    ev = Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=1)
    assert ev.amp is False
    # the chosen value is recorded with the search ("amp_used"), and apply and workers reuse it
    config = SearchConfig(agent="uniform", budgets={"flops": "50%"}, bn_batches=1, device="cpu", amp="auto")
    outcome = run_search(trained_resnet20, digits_task, config, final=False)
    assert outcome.evaluator.amp is False
    assert outcome.policy.search["amp_used"] is False
    assert outcome.study.user_attrs["config"]["amp_used"] is False
    _, rebuilt, _ = rebuild(trained_resnet20, outcome.policy, digits_task, device="cpu")
    assert rebuilt.amp is False
