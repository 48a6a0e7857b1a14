"""Regression-based channel selection (ThiNet's greedy selection) and the least-squares refit of the layers
reading pruned channels (He et al. 2017): each matches a computation done independently here, the refit
runs for every candidate of every agent that prunes through the evaluator, and ``apply`` reproduces it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoprune
from autoprune.cli import main
from autoprune.errors import InputError, ParameterError
from autoprune.evaluator import Evaluator
from autoprune.policy import Policy
from autoprune.pruning import ChannelPruner
from autoprune.pruning import regression as reg
from autoprune.runner import apply_policy
from autoprune.space import Space
from autoprune.task import ImageClassificationTask


def make_pruner(model: nn.Module, batches, shape=(1, 1, 3, 3), seed: int = 0) -> ChannelPruner:
    space = Space.from_model(model, torch.zeros(*shape))
    return ChannelPruner(space, calibration=lambda: iter(batches), seed=seed)


def batches_of(shape, n: int = 3, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, 2, (size,), generator=g)) for _ in range(n)]


# -- (a) the refit against least squares solved independently -----------------------------------------
class Chain(nn.Module):
    """stem (pinned) -> a -> [relu] -> b -> [relu] -> fc (pinned), all linear: groups ``a`` and ``b``."""

    def __init__(self, relu: bool = True, widths=(4, 5, 4)) -> None:
        super().__init__()
        self.relu = relu
        self.stem = nn.Linear(6, widths[0])  # wider than the stem: a's channels are independent
        self.a = nn.Linear(widths[0], widths[1])
        self.b = nn.Linear(widths[1], widths[2])
        self.fc = nn.Linear(widths[2], 2)

    def forward(self, x):
        act = F.relu if self.relu else (lambda t: t)
        return self.fc(act(self.b(act(self.a(self.stem(x))))))


@pytest.mark.parametrize("ridge", [0.0, reg.RIDGE])
def test_the_refit_recovers_the_output_when_the_pruned_channel_is_a_combination_of_the_kept_ones(
        monkeypatch, ridge):
    """The weights exactly without the ridge; the output also with the documented ridge (which shrinks the
    weights along the inputs' weakest directions, where the output hardly depends on them)."""
    monkeypatch.setattr(reg, "RIDGE", ridge)
    torch.manual_seed(0)
    model = Chain(relu=False).eval()
    with torch.no_grad():  # a's channel 4 = 0.5 * channel 0 - 2 * channel 1 (bias included): b loses nothing
        model.a.weight[4] = 0.5 * model.a.weight[0] - 2 * model.a.weight[1]
        model.a.bias[4] = 0.5 * model.a.bias[0] - 2 * model.a.bias[1]
    batches = batches_of((6,))
    p = make_pruner(model, batches, shape=(1, 6))
    keep = {"a": [0, 1, 2, 3]}
    plain = p.prune(Policy({"a": 0.2, "b": 0.0}, keep=keep))
    refit = p.prune(Policy({"a": 0.2, "b": 0.0}, keep=keep, reconstruct=True))
    x = torch.randn(64, 6)
    with torch.no_grad():
        want = model(x)
        assert (plain(x) - want).abs().max() > 0.1  # removing it does change the output
        assert torch.allclose(refit(x), want, atol=1e-3, rtol=1e-3)
        # the refit found b's weights in closed form: channel 4's column folded into channels 0 and 1
        expected = model.b.weight[:, :4].clone()
        expected[:, 0] += 0.5 * model.b.weight[:, 4]
        expected[:, 1] -= 2 * model.b.weight[:, 4]
        if ridge == 0:
            assert torch.allclose(refit.b.weight, expected, atol=1e-4)
            assert torch.allclose(refit.b.bias, model.b.bias, atol=1e-4)
    assert torch.equal(refit.fc.weight, model.fc.weight)  # fc reads no pruned channel: not refitted


class Convs(nn.Module):
    """stem 1x1 (pinned) -> a 1x1 -> b 3x3 (padding 1) -> fc (pinned) on 3-channel 3x3 images, no
    activation (three input channels: a's channels are independent functions of the pixels)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.b(self.a(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("ridge", [0.0, reg.RIDGE])
def test_a_convolution_is_refitted_exactly_through_its_kernel_and_padding(monkeypatch, ridge):
    monkeypatch.setattr(reg, "RIDGE", ridge)
    torch.manual_seed(1)
    model = Convs().eval()
    with torch.no_grad():  # a's channel 2 = channel 0 + channel 3, pixel by pixel; b has no bias to refit
        model.a.weight[2] = model.a.weight[0] + model.a.weight[3]
        model.a.bias[2] = model.a.bias[0] + model.a.bias[3]
    p = make_pruner(model, batches_of((3, 3, 3)), shape=(1, 3, 3, 3))
    refit = p.prune(Policy({"a": 0.25, "b": 0.0}, keep={"a": [0, 1, 3]}, reconstruct=True))
    expected = model.b.weight[:, [0, 1, 3]].clone()
    expected[:, 0] += model.b.weight[:, 2]
    expected[:, 2] += model.b.weight[:, 2]
    assert refit.b.bias is None
    if ridge == 0:
        assert torch.allclose(refit.b.weight, expected, atol=1e-4)
    x = torch.randn(8, 3, 3, 3)
    with torch.no_grad():
        assert torch.allclose(refit(x), model(x), atol=1e-3)


def inputs_and_outputs(model: nn.Module, layer: str, batches):
    """``layer``'s inputs and outputs over ``batches`` (linear layers: every row)."""
    seen = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: seen.setdefault("io", []).append((i[0], o)))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    handle.remove()
    return torch.cat([i for i, _ in seen["io"]]).double(), torch.cat([o for _, o in seen["io"]]).double()


def ridge_lstsq(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """min ||[x 1] w - y||² + λ||w without the bias||², λ = ridge * mean diagonal of xᵀx, by lstsq on the
    stacked system (not the normal equations the module solves)."""
    lam = ridge * (x.square().sum(0)).mean()
    xs = torch.cat([torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1),
                    torch.cat([lam.sqrt() * torch.eye(x.shape[1], dtype=x.dtype),
                               torch.zeros(x.shape[1], 1, dtype=x.dtype)], 1)])
    ys = torch.cat([y, torch.zeros(x.shape[1], y.shape[1], dtype=y.dtype)])
    return torch.linalg.lstsq(xs, ys).solution  # (features + 1, outputs)


@pytest.mark.parametrize("ridge", [0.0, reg.RIDGE, 0.1])
def test_the_refit_is_least_squares_from_the_pruned_networks_inputs_layer_by_layer(monkeypatch, ridge):
    """b and fc read pruned channels (a's and b's): b is fitted first; fc then on the inputs the pruned
    network with the refitted b gives it, both to the unpruned network's outputs."""
    monkeypatch.setattr(reg, "RIDGE", ridge)
    torch.manual_seed(2)
    model = Chain().eval()
    batches = batches_of((6,), n=2, size=40)
    p = make_pruner(model, batches, shape=(1, 6))
    policy = Policy({"a": 0.4, "b": 0.5}, criterion="l1", reconstruct=True)
    removed = p.removed_channels(policy)
    refit = p.prune(policy)

    by_hand = p.prune(Policy(policy.ratios, criterion="l1"))  # the same channels, not refitted
    for layer in ("b", "fc"):
        _, target = inputs_and_outputs(model, layer, batches)
        x, _ = inputs_and_outputs(by_hand, layer, batches)
        if layer == "b":  # b also lost outputs (group b): the targets are those it keeps
            target = target[:, [i for i in range(4) if i not in removed["b"]]]
        w = ridge_lstsq(x, target, ridge)
        module = dict(by_hand.named_modules())[layer]
        with torch.no_grad():
            module.weight.copy_(w[:-1].T)
            module.bias.copy_(w[-1])
        assert torch.allclose(dict(refit.named_modules())[layer].weight, module.weight, atol=1e-4), layer
        assert torch.allclose(dict(refit.named_modules())[layer].bias, module.bias, atol=1e-4), layer


def test_grouped_consumers_keep_their_pruned_weights():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 1)
            self.a = nn.Conv2d(4, 4, 1)
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)  # moves with a: a producer, not a consumer
            self.b = nn.Conv2d(4, 2, 1)
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(self.b(F.relu(self.dw(F.relu(self.a(self.stem(x)))))).mean((2, 3)))

    torch.manual_seed(3)
    model = Grouped().eval()
    p = make_pruner(model, batches_of((1, 3, 3)))
    plain = p.prune(Policy({"a": 0.5, "b": 0.0}))
    refit = p.prune(Policy({"a": 0.5, "b": 0.0}, reconstruct=True))
    assert torch.equal(refit.dw.weight, plain.dw.weight)  # the depthwise conv is cut, never refitted
    assert not torch.equal(refit.b.weight, plain.b.weight)  # b reads the pruned channels through dw


# -- (b) the regression criterion ------------------------------------------------------------------
class Branches(nn.Module):
    """stem 1x1 (pinned) -> a 1x1 + bn + relu, read by b (3x3) and c (1x1) whose outputs add -> fc."""

    def __init__(self, width: int = 5, two: bool = True) -> None:
        super().__init__()
        self.two = two
        self.stem = nn.Conv2d(1, 3, 1)
        self.a = nn.Conv2d(3, width, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.b = nn.Conv2d(width, 3, 3, padding=1, bias=False)
        self.c = nn.Conv2d(width, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = F.relu(self.bn(self.a(self.stem(x))))
        y = self.b(h) + self.c(h) if self.two else self.b(h)
        return self.fc(F.relu(y).mean((2, 3)))


def random_bn(model: nn.Module) -> None:
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.2, 0.5)
        model.bn.running_mean.uniform_(-0.2, 0.2)


def removal_error(model: Branches, batches, consumers: list[str]):
    """The error of removing a set of a's channels, computed by running the consumers on a's activation
    with those channels alone kept: the squared change of each consumer's output, relative to its output's
    energy, summed over the consumers. 3x3 images: every position is sampled."""
    acts = []
    handle = model.b.register_forward_pre_hook(lambda m, args: acts.append(args[0]))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    handle.remove()
    h = torch.cat(acts).double()
    layers = [dict(model.named_modules())[n] for n in consumers]

    def out(layer, t):
        return F.conv2d(t, layer.weight.detach().double(), None, layer.stride, layer.padding)

    energy = [out(m, h).square().sum() for m in layers]

    def error(removed: list[int]) -> float:
        mask = torch.zeros(h.shape[1], dtype=h.dtype)
        mask[removed] = 1
        return float(sum(out(m, h * mask.view(1, -1, 1, 1)).square().sum() / e for m, e in zip(layers, energy)))

    return error


def greedy(error, channels: int) -> list[int]:
    """ThiNet's greedy selection by brute force: each step removes the channel whose removal, with those
    removed before it, gives the least error."""
    order: list[int] = []
    while len(order) < channels:
        rest = [c for c in range(channels) if c not in order]
        order.append(min(rest, key=lambda c: (error(order + [c]), c)))
    return order


@pytest.mark.parametrize("two", [False, True], ids=["one consumer", "two consumers"])
def test_regression_ranks_channels_in_thinets_greedy_order(two):
    torch.manual_seed(5)
    model = Branches(width=6, two=two).eval()
    random_bn(model)
    with torch.no_grad():  # correlated channels: removing several costs other than the sum of their costs
        model.a.weight.copy_(model.a.weight[0:1] + 0.3 * model.a.weight)
    batches = batches_of((1, 3, 3), n=2, size=12)
    error = removal_error(model, batches, ["b", "c"] if two else ["b"])
    expected = greedy(error, 6)
    # what the case tells apart: ranking channels by their own cost alone, and (two) reading b alone
    assert expected != sorted(range(6), key=lambda c: error([c]))
    if two:
        assert expected != greedy(removal_error(model, batches, ["b"]), 6)
    scores = make_pruner(model, batches).scores("regression")["a"]
    assert torch.argsort(scores).tolist() == expected
    assert sorted(scores.tolist()) == list(range(6))  # the step at which each channel goes


def test_regression_removes_a_channel_no_consumer_reads_where_l1_keeps_it():
    torch.manual_seed(5)
    model = Branches(width=4, two=False).eval()
    random_bn(model)
    with torch.no_grad():
        model.a.weight[2] *= 10  # the largest filter, by far...
        model.bn.weight[2] = 5.0
        model.b.weight[:, 2] = 0  # ...that b does not read
    p = make_pruner(model, batches_of((1, 3, 3)))
    policy = {"a": 0.25, "b": 0.0}
    assert p.removed_channels(Policy(policy, criterion="regression"))["a"] == [2]
    assert 2 not in p.removed_channels(Policy(policy, criterion="l1"))["a"]


def test_regression_removes_the_twin_of_a_cancelling_channel_right_after_it():
    """Channels 1 and 3 are the same activation and b reads 3 with -2 times 1's weights: once 1 is gone,
    removing 3 costs nothing more (ThiNet's error is that of the sum of the removed contributions), although
    on its own 3 costs four times what 1 costs and other channels cost less."""
    torch.manual_seed(6)
    model = Branches(width=5, two=False).eval()
    with torch.no_grad():
        model.a.weight[3] = model.a.weight[1]
        model.b.weight[:, 1] *= 0.4
        model.b.weight[:, 3] = -2 * model.b.weight[:, 1]
    batches = batches_of((1, 3, 3))
    error = removal_error(model, batches, ["b"])
    assert error([1, 3]) == pytest.approx(error([1]))
    assert any(error([1]) < error([c]) < error([3]) for c in (0, 2, 4))  # ranked alone, others come between
    order = torch.argsort(make_pruner(model, batches).scores("regression")["a"]).tolist()
    assert order.index(3) == order.index(1) + 1


def test_a_group_without_a_modelled_consumer_falls_back_to_l1():
    class OnlyDepthwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 1)
            self.a = nn.Conv2d(4, 4, 1)
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.relu(self.dw(F.relu(self.a(self.stem(x))))).amax((2, 3)))

    torch.manual_seed(7)
    model = OnlyDepthwise().eval()
    p = make_pruner(model, batches_of((1, 3, 3)))
    # fc reads the group, so it is modelled: make the only consumer the group cannot see a grouped one
    assert [m.module for m in reg.consumers(p._full_group(p.space.parts("a")[0]))] == [model.fc]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reg, "MAX_FEATURES", 3)  # fc (4 inputs) is now too wide to model
        fresh = make_pruner(model, batches_of((1, 3, 3)))
        assert reg.consumers(fresh._full_group(fresh.space.parts("a")[0])) == []
        assert torch.equal(fresh.scores("regression")["a"], fresh.scores("l1")["a"])


def test_regression_and_reconstruct_without_calibration_batches_are_refused():
    space = Space.from_model(Chain().eval(), torch.zeros(1, 6))
    with pytest.raises(InputError, match="criterion 'regression' reads training data"):
        ChannelPruner(space).scores("regression")
    with pytest.raises(InputError, match=r"reconstruct reads training data.*autoprune.apply\(model, policy, task\)"):
        ChannelPruner(space).prune(Policy({"a": 0.5, "b": 0.0}, reconstruct=True))


# -- the refit through the evaluator: every candidate, deterministic per seed ---------------------------
@pytest.fixture(scope="module")
def task(digits):
    return ImageClassificationTask(digits, batch_size=64)


def test_the_evaluator_refits_every_candidate_and_apply_gives_the_same_weights(trained_resnet20, task):
    ev = Evaluator(trained_resnet20, task, device="cpu", bn_batches=2, criterion_batches=2, reconstruct=True)
    policy = ev.uniform(0.5)
    assert policy.reconstruct and ev.policy({"layer1.0.conv1": 0.5}).reconstruct
    refit = ev.build(policy)
    plain = ev.build(Policy(policy.ratios))
    assert not torch.equal(refit.layer1[0].conv2.weight, plain.layer1[0].conv2.weight)
    assert ev.evaluate(policy).score > ev.evaluate(Policy(policy.ratios)).score  # 50 % of channels: it helps
    # apply builds a fresh evaluator from what the policy recorded: the same batches, the same weights
    again = Evaluator(copy.deepcopy(trained_resnet20), task, device="cpu", bn_batches=2, criterion_batches=2)
    rebuilt = again.build(Policy.from_json(policy.to_json()))
    assert all(torch.equal(a, b) for a, b in zip(refit.state_dict().values(), rebuilt.state_dict().values()))
    other = Evaluator(trained_resnet20, task, device="cpu", bn_batches=2, criterion_batches=2, seed=1)
    reseeded = other.build(policy)  # other training batches: another fit
    assert not torch.equal(refit.layer1[0].conv2.weight, reseeded.layer1[0].conv2.weight)


def test_reconstruct_is_refused_for_masked_granularities(trained_resnet20, task):
    with pytest.raises(ParameterError, match=r"^granularity='2:4': removes no channels.*leave reconstruct off") as e:
        autoprune.search(trained_resnet20, task, {"flops": "80%"}, agent="uniform", granularity="2:4",
                         reconstruct=True, device="cpu")
    assert e.value.for_cli().startswith("--granularity 2:4: removes no channels")
    with pytest.raises(ParameterError, match=r"^reconstruct=True: .*granularity unstructured"):
        Evaluator(trained_resnet20, task, device="cpu", granularity="unstructured", reconstruct=True)
    with pytest.raises(InputError, match="granularity channel only"):
        Policy({"a": 0.5}, granularity="unstructured", reconstruct=True)


def test_a_study_resumes_only_with_the_refit_it_was_searched_with(trained_resnet20, task, tmp_path):
    kw = dict(agent="uniform", device="cpu", bn_batches=1, criterion_batches=1, storage=f"sqlite:///{tmp_path}/s.db",
              study="s", ignore=["layer1.*", "layer2.*"])
    assert autoprune.search(trained_resnet20, task, {"flops": "85%"}, **kw).policy.reconstruct is False
    with pytest.raises(ParameterError, match=r"^reconstruct=True: study 's' was searched with reconstruct=False"):
        autoprune.search(trained_resnet20, task, {"flops": "85%"}, reconstruct=True, **kw)


@pytest.mark.parametrize("setting, value, was", [("criterion", "taylor", "'l1'"), ("finetune_lr", 0.05, "0.01"),
                                                 ("finetune_l1", 1e-4, "0.0")])
def test_a_study_resumes_only_with_the_criterion_and_fine_tune_it_was_scored_with(trained_resnet20, task, tmp_path,
                                                                                  setting, value, was):
    kw = dict(agent="uniform", device="cpu", bn_batches=1, criterion_batches=1, storage=f"sqlite:///{tmp_path}/s.db",
              study="s", ignore=["layer1.*", "layer2.*"])
    autoprune.search(trained_resnet20, task, {"flops": "85%"}, **kw)
    with pytest.raises(ParameterError, match=rf"^{setting}={value!r}: study 's' was searched with {setting}={was}; "
                       "give the same to resume it"):
        autoprune.search(trained_resnet20, task, {"flops": "85%"}, **{setting: value}, **kw)
    autoprune.search(trained_resnet20, task, {"flops": "85%"}, **kw)  # the same settings resume


def test_apply_without_a_task_refuses_a_refitted_policy(trained_resnet20):
    policy = Policy({"layer1.0.conv1": 0.5}, reconstruct=True, model={"in_channels": 1, "image_size": 8})
    names = Space.from_model(trained_resnet20, torch.zeros(1, 1, 8, 8)).names
    policy.ratios = {n: policy.ratios.get(n, 0.0) for n in names}
    with pytest.raises(InputError, match="autoprune.apply\\(model, policy, task\\)"):
        autoprune.apply(trained_resnet20, policy)


# -- (c) every agent that prunes through the evaluator, from the command line ----------------------------
AGENT_ARGS = {
    "uniform": [],
    "random": ["--trials", "2"],
    "amc": ["--trials", "2", "--amc-warmup", "1"],
    "netadapt": ["--netadapt-initial", "0.2", "--netadapt-long-steps", "0"],
    "sensitivity": ["--sensitivity-ratios", "0.5"],
    # from random init (the default), the gates give the structure and the criterion picks the channels
    "gates": ["--trials", "1", "--gates-steps", "4", "--gates-snapshot-every", "2"],
    "icepick": ["--trials", "1", "--icepick-max-steps", "2", "--icepick-probe-steps", "0", "--icepick-startup", "1"],
}


@pytest.mark.parametrize("agent", list(AGENT_ARGS))
def test_search_with_regression_and_reconstruct_exports_a_policy_apply_reproduces(agent, tmp_path, capsys):
    best = tmp_path / "best.json"
    code = main(["search", "--agent", agent, *AGENT_ARGS[agent], "--criterion", "regression", "--reconstruct",
                 "--criterion-batches", "2", "--budget-flops", "85%", "--pretrain-steps", "40", "--device", "cpu",
                 "--bn-batches", "1", "--ignore", "layer1.*", "--ignore", "layer2.*",
                 "--storage", f"sqlite:///{tmp_path}/a.db", "-o", str(best)])
    assert code == 0, capsys.readouterr().err
    policy = Policy.load(best)
    assert policy.criterion == "regression" and policy.reconstruct
    assert policy.metrics["flops"] <= 0.85 * policy.metrics["base"]["flops"]
    _, result, _ = apply_policy(policy, device="cpu", log=lambda m: None)
    assert (result.score, result.flops) == (policy.metrics["accuracy"], policy.metrics["flops"])
    assert "loss" in result.metrics  # the loss moves with any change of the refitted weights, where accuracy may not
    assert result.metrics == {k: policy.metrics[k] for k in result.metrics}


# -- (d) the policy field ------------------------------------------------------------------------------
def test_the_reconstruct_field_round_trips_through_json_and_old_policies_load_without_it():
    policy = Policy({"a": 0.5, "b": 0.25}, criterion="regression", reconstruct=True)
    data = policy.to_dict()
    assert data["reconstruct"] is True
    back = Policy.from_json(policy.to_json())
    assert back.reconstruct and back.key() == policy.key() and back.to_dict() == data
    old = Policy.from_dict({k: v for k, v in data.items() if k != "reconstruct"})
    assert old.reconstruct is False and "reconstruct" not in old.to_dict()
    assert old.key() != policy.key()  # a cache or a study tells the two apart
    assert old.key() == Policy({"a": 0.5, "b": 0.25}, criterion="regression").key()
    with pytest.raises(InputError, match=r"'reconstruct' is 'yes'; it must be true or false"):
        Policy.from_dict({**data, "reconstruct": "yes"})
