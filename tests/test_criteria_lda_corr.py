"""The ``lda`` and ``correlation`` criteria against their definitions on hand-built numbers, their
refusals, and both through every agent that takes a criterion, re-applied by ``autoprune apply``."""

import math

import pytest
import torch
from tiny_net import Tiny
from torch import nn

from autoprune.cli import main
from autoprune.errors import InputError
from autoprune.policy import Policy
from autoprune.pruning import ChannelPruner
from autoprune.pruning.criteria import Statistics, connection_correlation, fisher_ratio
from autoprune.runner import apply_policy
from autoprune.space import Space


def pruner(model: nn.Module, batches, inputs: int = 1) -> ChannelPruner:
    space = Space.from_model(model, torch.zeros(1, inputs, 4, 4))
    return ChannelPruner(space, calibration=lambda: iter(batches))


def identity_bn(bn: nn.BatchNorm2d, shifts) -> None:
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)
    bn.weight.fill_(1.0)
    bn.bias.copy_(torch.tensor(shifts))


# -- lda ------------------------------------------------------------------------------------------
def hand_fisher(classes: list[list[float]]) -> float:
    """Between-class over within-class sum of squares, spelled out."""
    every = [v for c in classes for v in c]
    mean = sum(every) / len(every)
    between = sum(len(c) * (sum(c) / len(c) - mean) ** 2 for c in classes)
    within = sum((v - sum(c) / len(c)) ** 2 for c in classes for v in c)
    return between / within


def lda_model() -> Tiny:
    """bn_a's channel c outputs ``scale[c] * x + shift[c]`` at each pixel of the one-channel image x."""
    torch.manual_seed(0)
    model = Tiny().eval()
    scales, shifts = [1.0, -1.0, 1.0, 0.0], [0.0, 1.0, -0.65, 0.5]
    with torch.no_grad():
        model.stem.weight.fill_(1.0)
        model.a.weight.copy_(torch.tensor(scales).view(-1, 1, 1, 1).expand(-1, 2, 1, 1) / 2)
        identity_bn(model.bn_a, shifts)
    return model


def lda_batches():
    """Images of background 0.5 with one bright pixel ``hi`` and one dark pixel ``lo``: the bright pixel
    tells the classes apart (0.6, 0.7 against 0.9, 1.0), the dark one (0.1 or 0.3) does not."""
    his = {0: [0.6, 0.7], 1: [0.9, 1.0]}
    images, labels = [], []
    for label, values in his.items():
        for hi in values:
            for lo in (0.1, 0.3):
                x = torch.full((1, 4, 4), 0.5)
                x[0, 0, 0], x[0, 3, 3] = hi, lo
                images.append(x)
                labels.append(label)
    images, labels = torch.stack(images), torch.tensor(labels)
    order = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # classes mixed within each batch
    images, labels = images[order], labels[order]
    return [(images[:4], labels[:4]), (images[4:], labels[4:])], his


def test_lda_scores_the_fisher_ratio_of_each_channels_per_image_maximum():
    batches, his = lda_batches()
    got = pruner(lda_model(), batches).scores("lda")["a"]
    # fire scores (the maximum over the image of relu(scale * x + shift)):
    #   channel 0: hi                  -> class 0 {0.6, 0.6, 0.7, 0.7}, class 1 {0.9, 0.9, 1.0, 1.0}
    #   channel 1: relu(1 - lo)        -> {0.9, 0.7} in both classes: the class means are equal
    #   channel 2: relu(hi - 0.65)     -> class 0 {0, 0, 0.05, 0.05}, class 1 {0.25, 0.25, 0.35, 0.35}
    #   channel 3: 0.5 everywhere      -> constant
    fire0 = [[h for h in his[c] for _ in (0, 1)] for c in (0, 1)]
    fire2 = [[max(0.0, h - 0.65) for h in his[c] for _ in (0, 1)] for c in (0, 1)]
    expected = torch.tensor([hand_fisher(fire0), 0.0, hand_fisher(fire2), 0.0])
    assert hand_fisher(fire0) == pytest.approx(9.0) and hand_fisher(fire2) == pytest.approx(12.1)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    # the channels whose fire scores do not tell the classes apart go first, the constant one included
    assert pruner(lda_model(), batches).removed_channels(Policy({"a": 0.5, "b": 0.0}, criterion="lda"))["a"] == [1, 3]


def test_fisher_ratio_of_known_columns():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    values = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 2.0], [2.0, 5.0, 4.0], [4.0, 5.0, 4.0],
                           [6.0, 5.0, 7.0], [8.0, 5.0, 7.0]])
    got = fisher_ratio(values, labels)
    # column 0: class means 2, 3, 7 around 25/6; each class spreads by ±1
    assert got[0].item() == pytest.approx(hand_fisher([[1, 3], [2, 4], [6, 8]]))
    assert got[1].item() == 0.0  # constant: no class information at all
    assert got[2].item() == math.inf  # constant within each class, different across: perfectly separated


def test_lda_refuses_a_task_without_class_labels():
    batches, _ = lda_batches()
    masks = [(x, torch.zeros(len(x), 4, 4, dtype=torch.long)) for x, _ in batches]  # per-pixel labels
    with pytest.raises(InputError, match=r"criterion 'lda' needs class labels, one integer class per sample as the "
                                         r"second element of each training batch \(batch\[1\]\); this task's "
                                         r"batch\[1\] is a int64 tensor of shape \(4, 4, 4\)"):
        pruner(lda_model(), masks).scores("lda")
    with pytest.raises(InputError, match=r"batches are tuples without a second element"):
        pruner(lda_model(), [(x,) for x, _ in batches]).scores("lda")
    with pytest.raises(InputError, match=r"batch\[1\] is a float32 tensor of shape \(4,\)"):
        pruner(lda_model(), [(x, y.float()) for x, y in batches]).scores("lda")
    # apoz reads the same pass and needs no labels
    assert pruner(lda_model(), masks).scores("apoz")["a"].shape == (4,)


def test_lda_needs_two_classes():
    batches, _ = lda_batches()
    one = [(x, torch.full_like(y, 3)) for x, y in batches]
    with pytest.raises(InputError, match="at least two classes; the calibration batches hold only class 3"):
        pruner(lda_model(), one).scores("lda")


# -- correlation ----------------------------------------------------------------------------------
def correlation_model(b_weight, b_gain: float = 1.0) -> Tiny:
    """Two input channels passed through stem, a and bn_a: group ``a``'s channel A is input channel 0,
    B is ``b_gain`` times input channel 1 (non-negative, so the ReLU keeps them); ``b`` mixes them
    with ``b_weight``."""
    torch.manual_seed(0)
    model = Tiny(inputs=2, width=2).eval()
    with torch.no_grad():
        model.stem.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        model.a.weight.copy_(torch.diag(torch.tensor([1.0, b_gain])).view(2, 2, 1, 1))
        identity_bn(model.bn_a, [0.0, 0.0])
        model.b.weight.zero_()
        model.b.weight[:, :, 0, 0] = torch.tensor(b_weight)
    return model


def correlation_batches():
    """Uniform two-channel images: channel A is 1 ± 1 alternating, channel B 1 ± 1 in halves, so that
    over the four samples the two are uncorrelated (their centred values are orthogonal)."""
    a = torch.tensor([2.0, 0.0, 2.0, 0.0])
    b = torch.tensor([2.0, 2.0, 0.0, 0.0])
    x = torch.stack([a, b], 1).view(4, 2, 1, 1).expand(4, 2, 4, 4).contiguous()
    y = torch.tensor([0, 1, 0, 1])
    return [(x[:2], y[:2]), (x[2:], y[2:])]


def test_correlation_removes_the_channel_the_next_layer_does_not_follow_first():
    # b's three outputs all follow channel A: A correlates perfectly with each, B (independent) not at
    # all, though B's filter is ten times A's
    model = correlation_model([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]], b_gain=10.0)
    p = pruner(model, correlation_batches(), inputs=2)
    got = p.scores("correlation")["a"]
    assert torch.allclose(got, torch.tensor([1.0, 0.0]), atol=1e-6)  # |ρ| = 1 (the sign does not count)
    half = Policy({"a": 0.5, "b": 0.0}, criterion="correlation")
    assert p.removed_channels(half)["a"] == [1]
    assert p.removed_channels(Policy(half.ratios, criterion="l1"))["a"] == [0]  # the magnitudes say otherwise


def test_correlation_is_the_mean_absolute_pearson_correlation_over_the_outputs_a_channel_feeds():
    # outputs: A, A + B, B. With A and B uncorrelated and of equal variance, ρ(A, A + B) = 1/√2
    model = correlation_model([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    got = pruner(model, correlation_batches(), inputs=2).scores("correlation")["a"]
    half = 1 / math.sqrt(2)
    assert torch.allclose(got, torch.tensor([(1 + half + 0) / 3, (0 + half + 1) / 3]), atol=1e-6)


def test_connection_correlation_of_a_grouped_layer_counts_only_the_outputs_of_each_inputs_group():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    noise = torch.randn(64, 4, generator=g)
    # two groups of two inputs and two outputs: outputs 0, 1 read inputs 0, 1; outputs 2, 3 read 2, 3
    y = torch.stack([x[:, 0], x[:, 0] + noise[:, 0], x[:, 3], noise[:, 1]], 1)
    full = connection_correlation(x, y)
    grouped = connection_correlation(x, y, groups=2)

    def rho(u, v):
        u, v = u - u.mean(), v - v.mean()
        return float((u * v).sum() / (u.square().sum() * v.square().sum()).sqrt())

    for i in range(4):
        own = range(0, 2) if i < 2 else range(2, 4)
        assert grouped[i].item() == pytest.approx(sum(abs(rho(x[:, i], y[:, j])) for j in own) / 2, rel=1e-5)
        assert full[i].item() == pytest.approx(sum(abs(rho(x[:, i], y[:, j])) for j in range(4)) / 4, rel=1e-5)
    assert connection_correlation(torch.zeros(5, 1), torch.randn(5, 2)).item() == 0.0  # a dead channel


def test_correlation_falls_back_to_l1_for_a_group_without_a_conv_or_linear_consumer(monkeypatch):
    model = correlation_model([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    monkeypatch.setattr(Statistics, "connections", lambda self, criterion: {})  # no consumer was read
    p = pruner(model, correlation_batches(), inputs=2)
    assert torch.equal(p.scores("correlation")["a"], p.scores("l1")["a"])


def test_lda_shares_the_activation_pass_and_correlation_reads_one_more():
    calls = []
    batches, _ = lda_batches()

    def calibration():
        calls.append(1)
        return iter(batches)

    p = ChannelPruner(Space.from_model(lda_model(), torch.zeros(1, 1, 4, 4)), calibration=calibration)
    p.scores("apoz")
    p.scores("lda")
    assert len(calls) == 1
    p.scores("correlation")
    assert len(calls) == 2


# -- through the command line, with every agent that takes a criterion ----------------------------
# the last stage's groups only, at 90 % of the FLOPs: every agent's search takes a few evaluations
SCOPE = ["--budget-flops", "90%", "--ignore", "layer1.*", "--ignore", "layer2.*"]
AGENT_FLAGS = {
    "uniform": [],
    "random": ["--trials", "2"],
    "amc": ["--trials", "2", "--amc-warmup", "1"],
    "netadapt": ["--netadapt-initial", "0.1", "--netadapt-long-steps", "0"],
    "sensitivity": ["--sensitivity-ratios", "0.5"],
    "icepick": ["--trials", "1", "--icepick-max-steps", "2", "--icepick-probe-steps", "1"],
    "gates": ["--gates-steps", "4", "--gates-snapshot-every", "2"],  # gates on random weights: the criterion picks
}


@pytest.fixture(scope="module")
def checkpoint(trained_resnet20, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "resnet20.pt"
    torch.save(trained_resnet20.state_dict(), path)
    return path


@pytest.mark.parametrize("agent", list(AGENT_FLAGS))
@pytest.mark.parametrize("criterion", ["lda", "correlation"])
def test_a_search_with_the_criterion_exports_a_policy_that_apply_reproduces(agent, criterion, checkpoint, tmp_path,
                                                                            capsys):
    best = tmp_path / "best.json"
    code = main(["search", "--agent", agent, *SCOPE, *AGENT_FLAGS[agent], "--criterion", criterion,
                 "--criterion-batches", "2", "--bn-batches", "2", "--checkpoint", str(checkpoint), "--device", "cpu",
                 "--storage", f"sqlite:///{tmp_path}/a.db", "-o", str(best)])
    out = capsys.readouterr()
    assert code == 0, out.err
    policy = Policy.load(best)
    assert policy.criterion == criterion and policy.search["agent"] == agent
    assert policy.metrics["flops_ratio"] <= 0.9
    _, result, _ = apply_policy(policy, device="cpu", log=lambda m: None)
    assert (result.score, result.flops) == (policy.metrics["score"], policy.metrics["flops"])
