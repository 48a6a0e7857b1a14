"""The analytic cost model and physical channel removal, on real zoo and torchvision models."""

import random

import pytest
import torch
import torch_pruning as tp

from autoprune.cost import count_flops, count_params
from autoprune.errors import InputError
from autoprune.models import build_model
from autoprune.policy import Policy
from autoprune.pruning import ChannelPruner
from autoprune.space import Space, keep_count

MODELS = [
    ("resnet20", 1, 8),
    ("vgg16_bn", 3, 8),
    ("mobilenet_v2", 1, 8),
    ("torchvision:mobilenet_v2", 3, 32),
    ("torchvision:resnet18", 1, 16),
]


@pytest.fixture(scope="module", params=MODELS, ids=[m[0] for m in MODELS])
def space(request):
    name, channels, size = request.param
    torch.manual_seed(0)
    model = build_model(name, channels, 10, size).eval()
    return Space.from_model(model, torch.randn(1, channels, size, size))


def random_policy(space, seed, high=0.85):
    rng = random.Random(seed)
    return Policy({n: rng.uniform(0, high) for n in space.names})


def test_first_conv_and_classifier_are_pinned(space):
    pinned = [g for g in space.groups if g.pinned]
    assert len(pinned) == 2
    assert all(g.name not in space.names for g in pinned)
    assert space.names and len(space.names) == len(space.groups) - 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_predicted_flops_and_params_equal_the_pruned_model(space, seed):
    pruner = ChannelPruner(space)
    policy = random_policy(space, seed)
    pruned = pruner.prune(policy)
    x = space.example_inputs
    assert pruned(x).shape == (1, 10)
    assert space.flops(policy.ratios) == count_flops(pruned, x)
    assert space.params(policy.ratios) == count_params(pruned)
    assert count_flops(pruned, x) < space.base_flops


def test_applying_a_policy_twice_gives_the_same_model(space):
    pruner = ChannelPruner(space)
    policy = random_policy(space, 7)
    a, b = pruner.prune(policy), pruner.prune(policy)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pruning_matches_torch_pruning_group_by_group(space):
    """Cutting every layer once with merged indices equals torch-pruning's sequential group.prune()."""
    pruner = ChannelPruner(space)
    policy = random_policy(space, 3, high=0.6)
    ours = pruner.prune(policy)
    removed = pruner.removed_channels(policy)

    import copy

    theirs = copy.deepcopy(space.model)
    dg = tp.DependencyGraph().build_dependency(theirs, example_inputs=space.example_inputs)
    modules = dict(theirs.named_modules())
    for name, idxs in removed.items():
        (part,) = space.parts(name)  # one torch-pruning group per decision in these models
        dg.get_pruning_group(modules[name], part.handler, idxs).prune()
    x = torch.randn_like(space.example_inputs)
    torch.testing.assert_close(ours(x), theirs(x))


def test_base_model_is_not_modified(space):
    before = {k: v.clone() for k, v in space.model.state_dict().items()}
    ChannelPruner(space).prune(random_policy(space, 5))
    after = space.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_keep_count_rounds_and_keeps_at_least_one():
    assert keep_count(16, 0.5) == 8
    assert keep_count(16, 0.0) == 16
    assert keep_count(16, 0.99) == 1
    assert keep_count(10, 0.25) == 7  # 2.5 channels removed rounds up to 3


def test_ignore_pins_more_groups_and_unknown_patterns_are_refused():
    model = build_model("resnet20", 1, 10, 8).eval()
    x = torch.zeros(1, 1, 8, 8)
    space = Space.from_model(model, x, ignore=["layer3.*"])
    assert not any(n.startswith("layer3") for n in space.names)
    with pytest.raises(InputError, match="matches no module"):
        Space.from_model(model, x, ignore=["nothing.here"])


def test_unknown_group_in_policy_is_refused():
    model = build_model("resnet20", 1, 10, 8).eval()
    space = Space.from_model(model, torch.zeros(1, 1, 8, 8))
    with pytest.raises(InputError, match="not a prunable group"):
        ChannelPruner(space).prune(Policy({"conv1": 0.5}))


def _conv_net():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1, bias=False),
        torch.nn.Conv2d(4, 4, 3, padding=1, bias=False),
        torch.nn.Conv2d(4, 4, 3, padding=1, bias=False),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 3),
    )
    with torch.no_grad():
        net[1].weight.zero_()
        # the filters of layer 1, so that L1 (sum |w|) and L2 (driven by the largest weight) rank them
        # differently, with no ties:           L1     L2
        net[1].weight[0, 0, 0, 0] = 3.0     # 3.0    3.0
        net[1].weight[1, :, 0, 0] = 1.0     # 4.0    2.0
        net[1].weight[2, 0, :, :] = 0.1     # 0.9    0.3
        net[1].weight[3, 0, 0, :2] = 1.6    # 3.2    2.26
        net[2].weight.zero_()  # the next layer's inputs add nothing to either norm
    return net.eval()


# L1 ranks 2 < 0 < 3 < 1 and keeps the two largest, {1, 3}; L2 ranks 2 < 1 < 3 < 0 and keeps {0, 3}
@pytest.mark.parametrize("criterion, kept", [("l1", {1, 3}), ("l2", {0, 3})])
def test_criteria_remove_the_smallest_channels(criterion, kept):
    net = _conv_net()
    space = Space.from_model(net, torch.zeros(1, 1, 4, 4))
    name = "1"
    assert name in space.names
    policy = Policy({n: 0.0 for n in space.names} | {name: 0.5}, criterion=criterion)
    removed = ChannelPruner(space).removed_channels(policy)[name]
    assert set(removed) == {0, 1, 2, 3} - kept
    # the pruned layer holds exactly the kept filters, in their order
    pruned = ChannelPruner(space).prune(policy)
    torch.testing.assert_close(pruned[1].weight, net[1].weight[sorted(kept)])
