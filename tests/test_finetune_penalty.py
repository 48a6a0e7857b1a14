"""The fine-tune's sparsity penalty (``--finetune-l1``, ``--finetune-penalty``): one SGD step against the
hand-computed update, its effect over many steps, its checks, and its way into every fine-tune a search
runs (the evaluator's, ICE-Pick's, NetAdapt's through the evaluator) and into ``apply``."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprune.cli import main
from autoprune.config import SearchConfig
from autoprune.errors import ParameterError
from autoprune.policy import Policy
from autoprune.runner import apply_policy
from autoprune.task import Task
from autoprune.training import train_steps


class FixedBatches(Task):
    """Cross-entropy on the same few batches, over and over."""

    metric, name = "accuracy", "fixed"

    def __init__(self, batches):
        self.batches = batches

    @property
    def example_inputs(self):
        return self.batches[0][0][:1]

    def train_batches(self, seed, *, augment=True):
        while True:
            yield from self.batches

    def loss(self, output, batch):
        return F.cross_entropy(output, batch[1])

    def score(self, model, split="val"):
        x, y = self.batches[0]
        return {"accuracy": float((model(x).argmax(1) == y).double().mean())}


def linear_layer() -> nn.Linear:
    """A 3 -> 3 linear layer in float64 with a zero weight (w[0, 1]) and an all-zero row (row 2)."""
    layer = nn.Linear(3, 3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, 0.0, -1.5], [-0.25, 2.0, 1.0], [0.0, 0.0, 0.0]]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return layer


def one_batch():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0], [2.0, 0.5, -1.0], [-1.0, -1.0, 3.0]], dtype=torch.float64)
    return [(x, torch.tensor([0, 2, 1, 2]))]


LR, WD, LAM = 0.1, 0.01, 0.3


def step(layer, **penalty):
    """One SGD step (momentum 0.9: the first step's buffer is the gradient itself, weight decay WD)."""
    task = FixedBatches(one_batch())
    train_steps(layer, task, task.train_batches(0), 1, LR, weight_decay=WD, schedule="constant", **penalty)
    return layer


def hand_step(layer, penalty_grad):
    """``w - lr (∂L/∂w + wd·w + penalty)`` and ``b - lr (∂L/∂b + wd·b)``, the gradients by autograd."""
    x, y = one_batch()[0]
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    gw, gb = torch.autograd.grad(F.cross_entropy(x @ w.T + b, y), [w, b])
    w, b = w.detach(), b.detach()
    return w - LR * (gw + WD * w + penalty_grad(w)), b - LR * (gb + WD * b)


def test_one_l1_step_adds_lambda_times_the_sign_of_each_weight():
    layer = linear_layer()
    w, b = hand_step(layer, lambda w: LAM * torch.sign(w))  # sign(0) = 0: zero weights get no push
    step(layer, penalty="l1", penalty_weight=LAM)
    assert torch.allclose(layer.weight, w, rtol=0, atol=1e-15)
    assert torch.allclose(layer.bias, b, rtol=0, atol=1e-15)  # the bias is not penalised


def test_one_group_lasso_step_adds_lambda_times_each_rows_direction():
    layer = linear_layer()

    def group(w):
        norms = w.norm(dim=1, keepdim=True)
        return LAM * torch.where(norms > 0, w / norms, torch.zeros_like(w))  # row 2 is zero: no push

    w, b = hand_step(layer, group)
    assert torch.equal(group(layer.weight.detach())[2], torch.zeros(3, dtype=torch.float64))
    step(layer, penalty="group", penalty_weight=LAM)
    assert torch.allclose(layer.weight, w, rtol=0, atol=1e-15)
    assert torch.allclose(layer.bias, b, rtol=0, atol=1e-15)


def test_group_lasso_of_a_conv_takes_the_norm_of_each_output_filter():
    conv = nn.Conv2d(2, 3, 2, bias=False).double()
    torch.manual_seed(0)
    x = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    task = FixedBatches([(x, torch.tensor([0, 1, 2, 0]))])

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(x).flatten(1)

    model = Head()
    w0 = conv.weight.detach().clone()
    plain = copy.deepcopy(model)
    train_steps(plain, task, task.train_batches(0), 1, LR, weight_decay=0.0, schedule="constant")
    train_steps(model, task, task.train_batches(0), 1, LR, weight_decay=0.0, schedule="constant", penalty="group",
                penalty_weight=LAM)
    norms = w0.flatten(1).norm(dim=1).view(3, 1, 1, 1)
    assert torch.allclose(model.conv.weight, plain.conv.weight - LR * LAM * w0 / norms, rtol=0, atol=1e-15)


def test_lambda_zero_is_the_unpenalised_step():
    plain, zero_l1, zero_group = step(linear_layer()), step(linear_layer(), penalty="l1", penalty_weight=0.0), \
        step(linear_layer(), penalty="group", penalty_weight=0.0)
    for other in (zero_l1, zero_group):
        assert torch.equal(plain.weight, other.weight) and torch.equal(plain.bias, other.bias)


def sparse_problem():
    """Ten features, of which only the first two decide the class."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        x = torch.randn(64, 10, generator=g)
        batches.append((x, (x[:, 0] + x[:, 1] > 0).long()))
    return FixedBatches(batches)


@pytest.mark.parametrize("penalty", ["l1", "group"])
def test_a_penalty_drives_more_weights_towards_zero_than_none(penalty):
    task = sparse_problem()
    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2))
    trained = {}
    for lam in (0.0, 0.02):
        model = copy.deepcopy(start)
        train_steps(model, task, task.train_batches(0), 300, 0.05, weight_decay=0.0, schedule="cosine",
                    penalty=penalty, penalty_weight=lam)
        trained[lam] = model[0].weight.detach()
    if penalty == "l1":  # weights near zero
        small = {lam: int((w.abs() < 0.01).sum()) for lam, w in trained.items()}
    else:  # whole hidden units (rows of the first layer) near zero
        small = {lam: int((w.norm(dim=1) < 0.05).sum()) for lam, w in trained.items()}
    assert small[0.02] > small[0.0]


def test_the_settings_are_checked_with_their_names():
    base = {"budgets": {"flops": "50%"}}
    with pytest.raises(ParameterError, match=r"finetune_l1=-0.5: must be a number >= 0"):
        SearchConfig(**base, finetune_l1=-0.5)
    with pytest.raises(ParameterError, match=r"finetune_penalty='lasso': choose from l1, group"):
        SearchConfig(**base, finetune_penalty="lasso")
    assert SearchConfig(**base, finetune_l1=0.001, finetune_penalty="group").to_dict()["finetune_l1"] == 0.001


def test_the_command_line_refuses_a_negative_lambda_in_one_line(capsys):
    assert main(["search", "--budget-flops", "50%", "--finetune-l1", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "autoprune: error: --finetune-l1 -1: must be a number >= 0"
    assert main(["search", "--budget-flops", "50%", "--finetune-penalty", "lasso"]) == 2
    assert "invalid choice: 'lasso'" in capsys.readouterr().err


@pytest.fixture
def fine_tunes(monkeypatch):
    """The penalty settings of every fine-tune the evaluator and ICE-Pick run."""
    seen = []

    def spy(where, real):
        def train(*args, **kw):
            seen.append((where, kw.get("penalty", "l1"), kw.get("penalty_weight", 0.0)))
            return real(*args, **kw)

        return train

    import autoprune.evaluator
    import autoprune.pruning.icepick

    monkeypatch.setattr(autoprune.evaluator, "train_steps", spy("evaluator", autoprune.evaluator.train_steps))
    monkeypatch.setattr(autoprune.pruning.icepick, "train_steps", spy("icepick", autoprune.pruning.icepick.train_steps))
    return seen


@pytest.fixture(scope="module")
def checkpoint(trained_resnet20, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "resnet20.pt"
    torch.save(trained_resnet20.state_dict(), path)
    return path


@pytest.mark.parametrize("agent, penalty, flags", [
    # NetAdapt fine-tunes through the evaluator: its short-term proposals and its long-term fine-tune
    ("netadapt", "l1", ["--budget-flops", "90%", "--ignore", "layer1.*", "--ignore", "layer2.*",
                        "--netadapt-initial", "0.1", "--netadapt-long-steps", "2", "--finetune-steps", "2"]),
    # ICE-Pick runs its own probe and fine-tunes (at 50 % the accuracy drops past its threshold)
    ("icepick", "group", ["--budget-flops", "50%", "--trials", "1", "--icepick-max-steps", "2",
                          "--icepick-probe-steps", "1"]),
])
def test_a_penalised_search_fine_tunes_with_it_records_it_and_apply_reproduces_it(
        agent, penalty, flags, checkpoint, tmp_path, capsys, fine_tunes):
    best = tmp_path / "best.json"
    code = main(["search", "--agent", agent, *flags, "--finetune-l1", "0.001", "--finetune-penalty", penalty,
                 "--bn-batches", "2", "--checkpoint", str(checkpoint), "--device", "cpu",
                 "--storage", f"sqlite:///{tmp_path}/a.db", "-o", str(best)])
    assert code == 0, capsys.readouterr().err
    trainer = "icepick" if agent == "icepick" else "evaluator"
    assert any(where == trainer for where, _, _ in fine_tunes)
    assert {(p, lam) for _, p, lam in fine_tunes} == {(penalty, 0.001)}  # every fine-tune of the search
    policy = Policy.load(best)
    assert (policy.search["finetune_l1"], policy.search["finetune_penalty"]) == (0.001, penalty)
    fine_tunes.clear()
    _, result, _ = apply_policy(policy, device="cpu", log=lambda m: None)
    assert any(where == trainer for where, _, _ in fine_tunes)
    assert {(p, lam) for _, p, lam in fine_tunes} == {(penalty, 0.001)}
    assert (result.score, result.flops) == (policy.metrics["score"], policy.metrics["flops"])
    assert result.metrics["loss"] == pytest.approx(policy.metrics["loss"], rel=1e-9)


def test_a_penalised_sensitivity_scan_is_kept_apart_from_an_unpenalised_one():
    from autoprune.agents.sensitivity import scan_identity, scan_name
    from autoprune.evaluator import Evaluator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2))
    task = sparse_problem()
    plain = scan_identity(Evaluator(model, task, device="cpu"), probe_steps=2)
    penalised = scan_identity(Evaluator(model, task, device="cpu", finetune_l1=0.01), probe_steps=2)
    assert "finetune_l1" not in plain  # the scans of searches without the penalty keep their names
    assert (penalised["finetune_l1"], penalised["finetune_penalty"]) == (0.01, "l1")
    assert scan_name(plain) != scan_name(penalised)
