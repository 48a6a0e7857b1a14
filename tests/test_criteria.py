"""Channel importance criteria: each ranks channels as its definition says, reads data only through
calibration batches, leaves the base model untouched, and works through the evaluator and the CLI."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_net import Tiny
from torch import nn

from autoprune.cli import main
from autoprune.cost import count_flops
from autoprune.errors import InputError
from autoprune.evaluator import Evaluator
from autoprune.models import build_model
from autoprune.policy import Policy
from autoprune.pruning import CRITERIA, ChannelPruner
from autoprune.pruning.criteria import pooled_entropy
from autoprune.pruning.icepick import IcePick
from autoprune.runner import apply_policy
from autoprune.space import Space
from autoprune.task import ImageClassificationTask


def tiny(width: int = 4, seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(width).eval()


def pruner(model: nn.Module, batches=None, seed: int = 0, size: int = 4) -> ChannelPruner:
    space = Space.from_model(model, torch.zeros(1, 1, size, size))
    return ChannelPruner(space, calibration=(lambda: iter(batches)) if batches is not None else None, seed=seed)


def random_batches(n: int = 2, size: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, size, size, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def passthrough(model: Tiny, shifts, scales=None) -> None:
    """Make bn_a's output channel c equal ``scales[c] * x + shifts[c]`` for an input image x."""
    width = model.a.out_channels
    scales = [1.0] * width if scales is None else scales
    with torch.no_grad():
        model.stem.weight.fill_(1.0)
        model.a.weight.copy_(torch.tensor(scales).view(-1, 1, 1, 1).expand(-1, 2, 1, 1) / 2)
        model.bn_a.running_mean.zero_()
        model.bn_a.running_var.fill_(1.0 - model.bn_a.eps)
        model.bn_a.weight.fill_(1.0)
        model.bn_a.bias.copy_(torch.tensor(shifts))


def test_the_registry_lists_every_criterion_with_a_description():
    assert set(CRITERIA) == {"l1", "l2", "bn-scale", "taylor", "hessian", "apoz", "entropy", "lamp", "fpgm",
                             "regression", "random", "lda", "correlation"}
    assert all(desc for _, desc in CRITERIA.values())


def test_bn_scale_ranks_by_the_absolute_batch_norm_scale():
    model = tiny()
    with torch.no_grad():
        model.bn_a.weight.copy_(torch.tensor([0.5, -2.0, 0.1, 1.0]))
        model.a.weight.copy_(torch.tensor([1.0, 1.0, 9.0, 1.0]).view(-1, 1, 1, 1).expand(-1, 2, 1, 1))
    p = pruner(model)
    assert torch.allclose(p.scores("bn-scale")["a"], torch.tensor([0.5, 2.0, 0.1, 1.0]))
    policy = Policy({"a": 0.5, "b": 0.0}, criterion="bn-scale")
    assert p.removed_channels(policy)["a"] == [0, 2]
    assert p.removed_channels(Policy({"a": 0.5, "b": 0.0}, criterion="l1"))["a"] != [0, 2]


def test_bn_scale_averages_the_batch_norms_of_a_residual_group():
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10, 8).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, -1, 1)
    space = Space.from_model(model, torch.zeros(1, 1, 8, 8))
    norms = ["layer2.0.downsample.1", "layer2.0.bn2", "layer2.1.bn2", "layer2.2.bn2"]
    expected = torch.stack([space.modules[n].weight.detach().abs() for n in norms]).mean(0)
    got = ChannelPruner(space).scores("bn-scale")["layer2.0.downsample.0"]
    assert torch.allclose(got, expected)


def test_taylor_and_hessian_match_a_hand_computation_of_the_gradients():
    model, batches = tiny(seed=1), random_batches()
    p = pruner(model, batches)
    ref = copy.deepcopy(model)
    layers = [ref.a.weight, ref.bn_a.weight, ref.b.weight]
    first = [torch.zeros_like(w) for w in layers]
    fisher = [torch.zeros_like(w) for w in layers]
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(ref(x), y), layers)
        for i, (w, g) in enumerate(zip(layers, grads)):
            first[i] += (w * g).abs().detach() / len(batches)
            fisher[i] += g.square() / len(batches)

    def per_channel(ts):  # a's filters, bn_a's scales, b's input slices
        return (ts[0].sum((1, 2, 3)) + ts[1] + ts[2].sum((0, 2, 3))) / 3

    taylor = per_channel(first)
    hessian = per_channel([0.5 * f * w.detach().square() for f, w in zip(fisher, layers)])
    assert torch.allclose(p.scores("taylor")["a"], taylor, rtol=1e-5)
    assert torch.allclose(p.scores("hessian")["a"], hessian, rtol=1e-5)


def test_apoz_scores_one_minus_the_fraction_of_zero_activations():
    model = tiny()
    passthrough(model, shifts=[-0.28, -0.78, 0.1, -0.53])
    image = (torch.arange(16.0) / 16).view(1, 1, 4, 4)  # pixel values k/16
    batches = [(image.repeat(2, 1, 1, 1), torch.zeros(2, dtype=torch.long))] * 2
    got = pruner(model, batches).scores("apoz")["a"]
    # relu(x + shift) is zero for the pixels with k/16 <= -shift: 5, 13, 0 and 9 of 16
    assert torch.allclose(got, 1 - torch.tensor([5, 13, 0, 9]) / 16)


def test_entropy_ranks_constant_pooled_activations_lowest():
    model = tiny()
    passthrough(model, shifts=[0.5, 0.0, -0.9, -0.5], scales=[0.0, 1.0, 1.0, 1.0])
    values = torch.arange(64.0) / 64  # sample i is a uniform image of value i/64
    images = values.view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    batches = [(images[:32], torch.zeros(32, dtype=torch.long)), (images[32:], torch.zeros(32, dtype=torch.long))]
    got = pruner(model, batches).scores("entropy")["a"]
    # channel 0 is constant; 2 is zero for 58 samples of 64, 3 for 33; 1 spreads over every bin
    assert got[0] == 0
    assert torch.argsort(got).tolist() == [0, 2, 3, 1]


def test_pooled_entropy_of_known_histograms():
    spread = torch.arange(32.0) + 0.5  # one sample per bin
    halves = torch.tensor([0.0] * 16 + [1.0] * 16)
    constant = torch.full((32,), 3.0)
    got = pooled_entropy(torch.stack([spread, halves, constant], 1), bins=32)
    assert torch.allclose(got, torch.tensor([math.log(32), math.log(2), 0.0]))


def test_lamp_averages_per_layer_lamp_scores_and_can_differ_from_l2():
    model = tiny()
    filters = torch.tensor([4.0, 1.0, 2.0, 3.0])  # squared norms of a's filters
    inputs = torch.tensor([1.0, 30.0, 2.0, 3.0])  # squared norms of b's input slices
    with torch.no_grad():
        model.a.weight.zero_()
        model.a.weight[:, 0, 0, 0] = filters.sqrt()
        model.b.weight.zero_()
        model.b.weight[0, :, 0, 0] = inputs.sqrt()
    p = pruner(model)
    # LAMP: v[u] / (sum of the v >= v[u]); a: 4/4, 1/10, 2/9, 3/7; b: 1/36, 30/30, 2/35, 3/33
    expected = torch.tensor([(1 + 1 / 36) / 2, (1 / 10 + 1) / 2, (2 / 9 + 2 / 35) / 2, (3 / 7 + 3 / 33) / 2])
    assert torch.allclose(p.scores("lamp")["a"], expected)
    assert torch.argsort(p.scores("lamp")["a"]).tolist() == [2, 3, 0, 1]
    assert torch.argsort(p.scores("l2")["a"]).tolist() == [2, 0, 3, 1]


def test_fpgm_removes_the_filter_at_the_geometric_median_first():
    model = tiny(width=5)
    centre_and_neighbours = torch.tensor([[3.0, 3.0], [4.0, 3.0], [2.0, 3.0], [3.0, 4.0], [3.0, 2.0]])
    with torch.no_grad():
        model.a.weight.copy_(centre_and_neighbours.view(5, 2, 1, 1))
        model.b.weight.fill_(1.0)
    p = pruner(model)
    rim = 1 + 2 + 2 * math.sqrt(2)  # a neighbour's distances to the centre and the other three
    assert torch.allclose(p.scores("fpgm")["a"], torch.tensor([4.0] + [rim] * 4))
    policy = {"a": 0.2, "b": 0.0}
    assert p.removed_channels(Policy(policy, criterion="fpgm"))["a"] == [0]
    assert p.removed_channels(Policy(policy, criterion="l2"))["a"] == [2]  # the smallest filter


def test_random_is_deterministic_per_seed():
    model = tiny(width=16)
    a, b, c = (pruner(model, seed=s).scores("random") for s in (3, 3, 4))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["a"], c["a"])
    assert a["a"].shape == (16,) and not torch.equal(a["a"][:3], a["b"])  # each group its own draw


@pytest.mark.parametrize("criterion", ["taylor", "hessian", "apoz", "entropy", "regression", "lda", "correlation"])
def test_data_criteria_without_calibration_batches_are_refused(criterion):
    with pytest.raises(InputError, match="training data"):
        pruner(tiny()).scores(criterion)


def test_statistics_are_gathered_once_and_scores_cached():
    calls = []
    batches = random_batches()

    def calibration():
        calls.append(1)
        return iter(batches)

    space = Space.from_model(tiny(), torch.zeros(1, 1, 4, 4))
    p = ChannelPruner(space, calibration=calibration)
    taylor = p.scores("taylor")
    assert p.scores("taylor") is taylor
    p.scores("hessian")
    assert len(calls) == 1  # one gradient pass serves taylor and hessian
    p.scores("apoz")
    p.scores("entropy")
    assert len(calls) == 2  # one activation pass serves apoz and entropy


def test_scoring_leaves_the_base_model_unchanged():
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10, 8).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = pruner(model, random_batches(size=8), size=8)
    for name in CRITERIA:
        p.scores(name)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running statistics included
    assert all(q.grad is None for q in model.parameters())
    assert not any(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())


@pytest.fixture(scope="module")
def resnet_evaluator(trained_resnet20, digits):
    return Evaluator(trained_resnet20, ImageClassificationTask(digits, batch_size=64), device="cpu", bn_batches=2,
                     criterion_batches=2)


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_every_criterion_evaluates_on_the_default_resnet20(resnet_evaluator, criterion):
    policy = resnet_evaluator.uniform(0.5, criterion=criterion)
    result = resnet_evaluator.evaluate(policy)
    assert result.flops == resnet_evaluator.cost(policy)["flops"] < resnet_evaluator.space.base_flops
    assert result.metric == "accuracy" and 0.0 <= result.score <= 1.0


def test_criteria_choose_different_channels_on_the_trained_resnet20(resnet_evaluator):
    ev = resnet_evaluator
    chosen = {c: ev.pruner.removed_channels(ev.uniform(0.5, criterion=c)) for c in CRITERIA}
    assert len({str(sorted(r.items())) for r in chosen.values()}) == len(CRITERIA)


@pytest.mark.parametrize("criterion", ["taylor", "apoz"])
def test_icepick_scores_its_current_model_with_a_data_criterion(resnet_evaluator, criterion):
    ev = resnet_evaluator
    policy = ev.uniform(0.4, criterion=criterion)
    run = IcePick(threshold=1.0, finetune_steps=0).run(ev, policy)  # staged, no fine-tune
    measured = ev.measure(run.model)
    assert (measured.flops, measured.params) == (ev.cost(policy)["flops"], ev.cost(policy)["params"])


@pytest.fixture(scope="module")
def mobilenet_evaluator(digits):
    torch.manual_seed(0)
    model = build_model("torchvision:mobilenet_v2", digits.in_channels, digits.num_classes, digits.image_size)
    return Evaluator(model, ImageClassificationTask(digits, batch_size=16), device="cpu", bn_batches=1,
                     criterion_batches=1)


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_every_criterion_prunes_torchvision_mobilenet_v2(mobilenet_evaluator, criterion):
    ev = mobilenet_evaluator
    policy = ev.uniform(0.5, criterion=criterion)
    pruned = ev.pruner.prune(policy)
    assert count_flops(pruned, ev.example_inputs) == ev.cost(policy)["flops"] < ev.space.base_flops
    assert pruned(ev.example_inputs).shape == (1, ev.task.data.num_classes)


def test_apply_reproduces_a_taylor_policy(trained_resnet20, capsys, tmp_path):
    ckpt = tmp_path / "resnet20.pt"
    torch.save(trained_resnet20.state_dict(), ckpt)
    best = tmp_path / "best.json"
    code = main(["search", "--agent", "uniform", "--budget-flops", "50%", "--criterion", "taylor",
                 "--criterion-batches", "3", "--checkpoint", str(ckpt), "--device", "cpu", "--storage", f"sqlite:///{tmp_path}/autoprune.db",
                 "-o", str(best)])
    assert code == 0
    policy = Policy.load(best)
    assert policy.criterion == "taylor" and policy.search["criterion_batches"] == 3
    capsys.readouterr()
    assert main(["apply", str(best), "--device", "cpu", "-o", str(tmp_path / "pruned.pt")]) == 0
    out = capsys.readouterr().out
    assert f"validation accuracy {policy.metrics['accuracy']:.2%}" in out
    model = torch.load(tmp_path / "pruned.pt", weights_only=False)
    assert count_flops(model, torch.zeros(1, 1, 8, 8)) == policy.metrics["flops"]
    _, result, _ = apply_policy(policy, device="cpu", log=lambda m: None)
    assert result.metric == policy.metrics["metric"] == "accuracy"
    assert (result.score, result.flops) == (policy.metrics["accuracy"], policy.metrics["flops"])


def test_cli_lists_the_criteria(capsys):
    assert main(["criteria"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in CRITERIA)
