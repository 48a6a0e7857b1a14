"""FLOPs (MACs) and parameters checked against figures worked out by hand and against torch-pruning's own
counter, so that a convention drifting in both the counter and the cost model (batch norm counted, 2x
MACs, bias terms, a stride or a group forgotten) fails here.

The README's convention: multiply-accumulates of convolution and linear layers for one input sample;
batch norm, activations, pooling and additions are not counted; parameters are every parameter
(batch-norm weight and bias included), never buffers such as running statistics."""

import copy
import random

import pytest
import torch
import torch_pruning as tp
from torch import nn

from autoprune.cost import count_flops, count_params
from autoprune.models import build_model
from autoprune.policy import Policy
from autoprune.pruning import ChannelPruner
from autoprune.space import Space


def conv(c_in, c_out, k, out_h, out_w=None, groups=1):
    """MACs of a k x k convolution: every output position of every output channel reads
    (c_in / groups) x k x k inputs once."""
    return (out_w or out_h) * out_h * c_out * (c_in // groups) * k * k


@pytest.mark.parametrize(
    "layer, shape, macs, params",
    [
        # 3 -> 8, 3x3, stride 2, padding 1 on 9x9: (9 + 2 - 3) // 2 + 1 = 5, so 5x5 outputs
        (nn.Conv2d(3, 8, 3, stride=2, padding=1), (3, 9, 9), 5 * 5 * 8 * 3 * 9, 8 * 3 * 9 + 8),
        # groups 2 and a 3x1 kernel, stride (1, 2), padding (1, 0) on 5x6: outputs 5 x 3, each of the 6
        # output channels reads 4 / 2 input channels
        (nn.Conv2d(4, 6, (3, 1), stride=(1, 2), padding=(1, 0), groups=2, bias=False), (4, 5, 6),
         5 * 3 * 6 * 2 * 3, 6 * 2 * 3),
        # depthwise: one input channel per output channel
        (nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), (6, 5, 5), 5 * 5 * 6 * 9, 6 * 9),
        # dilation 2 widens the 3x3 kernel to 5x5 reach but not its weights: 7 - 4 = 3, 3x3 outputs
        (nn.Conv2d(2, 4, 3, dilation=2, bias=False), (2, 7, 7), 3 * 3 * 4 * 2 * 9, 4 * 2 * 9),
        # 1-d convolution: length (10 - 3) // 1 + 1 = 8
        (nn.Conv1d(3, 5, 3), (3, 10), 8 * 5 * 3 * 3, 5 * 3 * 3 + 5),
        # a transposed convolution runs every weight once per *input* position (3x3 of them)
        (nn.ConvTranspose2d(4, 2, 3, stride=2), (4, 3, 3), 3 * 3 * 4 * 2 * 9, 4 * 2 * 9 + 2),
        (nn.Linear(10, 4), (10,), 10 * 4, 10 * 4 + 4),
        # a linear layer on a sequence of 7 positions runs 7 times
        (nn.Linear(10, 4, bias=False), (7, 10), 7 * 10 * 4, 10 * 4),
    ],
    ids=["conv-stride-padding", "grouped-conv", "depthwise", "dilated", "conv1d", "transposed", "linear",
         "linear-on-a-sequence"],
)
def test_a_single_layer_counts_its_multiply_accumulates_and_parameters(layer, shape, macs, params):
    x = torch.zeros(1, *shape)
    assert count_flops(layer, x) == macs
    assert count_params(layer) == params
    # the count is per sample: a batch of 5 counts the same
    assert count_flops(layer, torch.zeros(5, *shape)) == macs


class Block(nn.Module):
    """A residual block: conv-BN-ReLU-conv-BN, plus the input, ReLU."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


def test_a_residual_block_counts_its_convolutions_only():
    block = Block(4).eval()
    # two 4 -> 4 3x3 convolutions on 6x6; batch norm, ReLU and the addition count nothing
    assert count_flops(block, torch.zeros(1, 4, 6, 6)) == 2 * conv(4, 4, 3, 6) == 10368
    # the BN weight and bias are parameters; running mean and variance are buffers
    assert count_params(block) == 2 * (4 * 4 * 9) + 2 * (4 + 4) == 304


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).eval()


def test_a_small_model_and_its_pruned_copy_match_the_hand_count():
    net = small_net()
    x = torch.zeros(1, 1, 8, 8)
    # 8x8, pooled to 4x4 after the first conv; pooling and BN count nothing
    full = conv(1, 4, 3, 8) + conv(4, 8, 3, 4) + conv(8, 6, 3, 4) + 6 * 3
    assert full == 2304 + 4608 + 6912 + 18
    assert count_flops(net, x) == full
    assert count_params(net) == (36 + 4) + 8 + (288 + 8) + 16 + 432 + 12 + (18 + 3)
    space = Space.from_model(net, x)
    assert space.base_flops == full
    # the first conv and the classifier are pinned; the 8- and 6-channel convs are prunable
    assert space.names == ["4", "7"]
    policy = Policy({"4": 0.5, "7": 0.0})
    pruned = ChannelPruner(space).prune(policy)
    half = conv(1, 4, 3, 8) + conv(4, 4, 3, 4) + conv(4, 6, 3, 4) + 6 * 3
    assert count_flops(pruned, x) == space.flops(policy.ratios) == half == 2304 + 2304 + 3456 + 18
    # the middle conv's weight and bias and its BN halve, and so does the next conv's input
    assert count_params(pruned) == space.params(policy.ratios) == (36 + 4) + 8 + (144 + 4) + 8 + 216 + 12 + 21


def resnet20_macs(stream, inner):
    """ResNet-20 on 8x8 inputs (1 channel, 10 classes) with ``stream[s]`` channels in the residual stream
    of stage s and ``inner[s][b]`` channels inside block b: the stem at 8x8, the stages at 8x8, 4x4 and 2x2,
    1x1 downsample convolutions at the start of stages 2 and 3, a 64-input classifier."""
    sizes, total = (8, 4, 2), conv(1, stream[0], 3, 8)
    for s in range(3):
        c_in = stream[max(s - 1, 0)]
        for b in range(3):
            total += conv(c_in if b == 0 else stream[s], inner[s][b], 3, sizes[s])
            total += conv(inner[s][b], stream[s], 3, sizes[s])
        if s > 0:
            total += conv(stream[s - 1], stream[s], 1, sizes[s])
    return total + stream[2] * 10


def test_resnet20_unpruned_and_uniformly_halved_match_the_hand_count():
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10, 8).eval()
    x = torch.zeros(1, 1, 8, 8)
    full = resnet20_macs((16, 32, 64), [[16] * 3, [32] * 3, [64] * 3])
    assert full == 2_532_992  # the README's "2.533M"
    assert count_flops(model, x) == full
    assert count_params(model) == 272_186  # He et al.'s 0.27M plus the two 1x1 downsample shortcuts
    space = Space.from_model(model, x)
    half = {n: 0.5 for n in space.names}
    pruned = ChannelPruner(space).prune(Policy(half))
    # the stem's stream is pinned (16), the other streams and every block's inner width halve
    expected = resnet20_macs((16, 16, 32), [[8] * 3, [16] * 3, [32] * 3])
    assert expected == 881_984
    assert count_flops(pruned, x) == space.flops(half) == expected


def torch_pruning_count(model, x):
    """MACs of the conv and linear layers and the parameters, by torch-pruning's counter (which also
    counts batch norm, activations, pooling and bias additions: those are left out here)."""
    _, params, _, _ = tp.utils.count_ops_and_params(model, x, layer_wise=True)
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias = None  # a bias adds, it does not multiply-accumulate
    _, _, layer_flops, _ = tp.utils.count_ops_and_params(plain, x, layer_wise=True)
    macs = sum(f for m, f in layer_flops.items() if isinstance(m, (nn.Conv2d, nn.Linear)) and f)
    return int(macs), int(params)


MODELS = [("resnet20", 1, 8), ("vgg16_bn", 3, 8), ("mobilenet_v2", 1, 8), ("torchvision:resnet18", 1, 16)]


@pytest.mark.parametrize("name, channels, size", MODELS, ids=[m[0] for m in MODELS])
def test_pruned_models_agree_with_torch_prunings_counter(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, channels, 10, size).eval()
    x = torch.randn(1, channels, size, size)
    space = Space.from_model(model, x)
    assert (space.base_flops, space.base_params) == torch_pruning_count(model, x)
    rng = random.Random(name)
    for _ in range(2):
        ratios = {n: rng.uniform(0, 0.8) for n in space.names}
        pruned = ChannelPruner(space).prune(Policy(ratios))
        macs, params = torch_pruning_count(pruned, x)
        assert count_flops(pruned, x) == space.flops(ratios) == macs
        assert count_params(pruned) == space.params(ratios) == params
