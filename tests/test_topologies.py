"""Every topology prunes within its budget, or is refused in one line.

For a model at random init and an input size its architecture accepts: its search space, the uniform
policy at 50 % FLOPs bisected as the ``uniform`` agent bisects it, physical pruning, a forward pass, one
fine-tune step through the task (auxiliary outputs included), and FLOPs measured on the pruned model
within the budget and equal to the space's prediction. The fast tests take one real torchvision model
per pattern (grouped convolution, channel shuffle, squeeze-excitation with stochastic depth,
concatenation, auxiliary heads, attention) and small hand-built modules; ``make test-all`` also runs the
sweep over every torchvision classifier (marked slow).

Removing a unit is checked against the unpruned model with that unit silenced: zeroing the input
columns that every conv or linear layer reads from the removed channels (the output projection's
columns of a removed head) leaves the rest of the network computing exactly what the pruned one does,
so a wrong index anywhere in the coupling shows up as a different output.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch_pruning as tp
from torch import nn

import autoprune
from autoprune.budget import Budgets, parse_budgets
from autoprune.cost import count_flops, count_params
from autoprune.data.splits import DatasetSplits, TensorSplit
from autoprune.errors import InputError
from autoprune.evaluator import Evaluator
from autoprune.layers import attention_layer
from autoprune.models import build_model
from autoprune.policy import Policy
from autoprune.pruning import ChannelPruner
from autoprune.space import Space
from autoprune.task import ImageClassificationTask
from autoprune.training import train_steps

torchvision = pytest.importorskip("torchvision")


def random_images(size: int, channels: int = 3, classes: int = 10) -> ImageClassificationTask:
    """A task on random images of ``size`` pixels: four training images, two to score, batches of two."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorSplit:
        return TensorSplit(torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g),
                           torch.randint(0, classes, (n,), generator=g))

    data = DatasetSplits("random", channels, classes, size, (0.5,) * channels, (0.25,) * channels,
                         split(4), split(2), split(2), True)
    return ImageClassificationTask(data, batch_size=2, eval_batch_size=2)


def prune_uniformly(model: nn.Module, size: int, budget: str = "50%", classes: int = 10):
    """The whole path of the issue for ``model`` on ``size``-pixel images; returns (evaluator, policy,
    pruned model) after checking the pruned model runs, trains one step and meets the budget."""
    task = random_images(size, classes=classes)
    ev = Evaluator(model, task, device="cpu", bn_batches=1, amp=False)
    budgets = Budgets(parse_budgets(flops=budget), ev)
    ratio = max(budgets.fit().values())  # what the uniform agent does
    policy = ev.uniform(ratio)
    assert ratio > 0
    pruned = ev.pruner.prune(policy)
    loss = train_steps(pruned, task, task.train_batches(0), 1, 0.01)  # in training mode: auxiliary heads too
    assert math.isfinite(loss)
    x = task.example_inputs
    with torch.no_grad():
        out = pruned.eval()(x)
    assert out.shape == (1, classes)
    flops = count_flops(pruned, x)
    assert flops <= 0.5 * ev.space.base_flops * (1 + 1e-9)
    assert flops == ev.space.flops(policy.ratios)
    assert count_params(pruned) == ev.space.params(policy.ratios)
    return ev, policy, pruned


def silenced(space: Space, pruner: ChannelPruner, policy: Policy) -> nn.Module:
    """The unpruned model with every unit ``policy`` removes silenced: the input columns of the conv and
    linear layers that read the removed channels, and the output-projection columns of removed heads,
    set to zero."""
    reference = copy.deepcopy(space.model)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, units in pruner.removed_channels(policy).items():
            heads = space.heads(name)
            if heads is not None:
                module = modules[name]
                hd = heads.layer.head_dim(module)
                cols = (torch.tensor(units)[:, None] * hd + torch.arange(hd)).flatten()
                heads.layer.proj(module)[0][:, cols] = 0
                continue
            for part in space.parts(name):
                for target, handler, _, idxs in pruner._items_for(part, part.channels_of(units)):
                    m = modules.get(target)
                    if handler.__name__ != "prune_in_channels" or not isinstance(m, (nn.Conv2d, nn.Linear)):
                        continue  # norms and producers only carry the removed channels themselves
                    m.weight[:, idxs] = 0
    return reference


def assert_removal_is_silencing(ev: Evaluator, policy: Policy) -> None:
    pruned = ev.pruner.prune(policy)
    reference = silenced(ev.space, ev.pruner, policy)
    x = torch.randn(2, *ev.example_inputs.shape[1:], generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        out = pruned.double().eval()(x)
        assert not torch.allclose(out[0], out[1], rtol=1e-4, atol=1e-6)  # the output depends on the input
        torch.testing.assert_close(out, reference.double().eval()(x), rtol=1e-7, atol=1e-9)
        # and the check can tell: the pruned model computes something else than the unpruned one
        assert not torch.allclose(out, copy.deepcopy(ev.space.model).double().eval()(x), rtol=1e-4, atol=1e-6)


def torchvision_model(arch: str, size: int, alive: bool = True) -> nn.Module:
    """``arch`` at random init; ``alive``: with batch-norm statistics of random images and no all-zero
    layer, so that its output depends on its input and on every unit (ViT starts its classifier at zero,
    and GoogLeNet's activations fade to a constant through its default statistics)."""
    torch.manual_seed(0)
    model = build_model(f"torchvision:{arch}", 3, 10, size).eval()
    if alive:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.any():
                    nn.init.normal_(m.weight, std=0.05)
            norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # a plain average over the batches
            model.train()
            for _ in range(2):
                model(torch.randn(8, 3, size, size))
            model.eval()
    return model


# -- one real torchvision model per pattern -------------------------------------------------------


def test_grouped_convolutions_lose_whole_groups_regnet():
    ev, policy, pruned = prune_uniformly(torchvision_model("regnet_y_400mf", 32), 32)
    grouped = [g for g in ev.space.prunable if g.module_type == "grouped"]
    assert grouped and all(g.unit == 8 for g in grouped)  # RegNetY-400MF: group width 8
    name = "trunk_output.block2.block2-1.f.a.0"
    g = ev.space.by_name[name]
    assert g.channels == 13  # 104 channels in 13 groups
    conv = dict(pruned.named_modules())["trunk_output.block2.block2-1.f.b.0"]
    kept = g.channels - round(policy.ratios[name] * g.channels)
    assert (conv.groups, conv.in_channels, conv.out_channels) == (kept, 8 * kept, 8 * kept)
    assert conv.weight.shape[1] == 8  # every group keeps its width
    assert_removal_is_silencing(ev, Policy({n: 0.4 for n in ev.space.names}))


def test_channel_shuffle_keeps_the_shuffled_channels_and_prunes_the_branches_shufflenet():
    ev, policy, _ = prune_uniformly(torchvision_model("shufflenet_v2_x0_5", 32), 32)
    reasons = ev.space.pinned_reasons
    assert any("channel shuffle" in why for why in reasons.values())
    assert any("split of the channels" in why for why in reasons.values())
    assert "stage3.1.branch2.0" in ev.space.names  # the inside of every branch stays prunable
    assert_removal_is_silencing(ev, policy)


def test_squeeze_excitation_and_stochastic_depth_efficientnet():
    ev, policy, _ = prune_uniformly(torchvision_model("efficientnet_b0", 32), 32)
    assert any(n.endswith("fc1") for n in ev.space.names)  # the squeeze width is a group of its own
    assert_removal_is_silencing(ev, policy)


def test_concatenations_densenet():
    ev, policy, _ = prune_uniformly(torchvision_model("densenet121", 32), 32)
    assert_removal_is_silencing(ev, policy)


def test_auxiliary_heads_are_traced_in_training_mode_and_pruned_with_the_rest_googlenet():
    ev, policy, pruned = prune_uniformly(torchvision_model("googlenet", 32), 32)
    space = ev.space
    assert space.trace.mode == "train"
    for fc in ("fc", "aux1.fc2", "aux2.fc2"):
        assert space.pinned_reasons[fc] == "produces the model's output"
    out = pruned.train()(torch.randn(2, 3, 32, 32))
    assert [o.shape for o in out] == [(2, 10)] * 3  # logits and both auxiliary outputs
    assert_removal_is_silencing(ev, policy)


@pytest.mark.parametrize("arch", ["vit_b_16", "swin_t"])
def test_attention_heads_and_mlp_widths_are_groups(arch):
    ev, policy, pruned = prune_uniformly(torchvision_model(arch, 32), 32)
    space = ev.space
    heads = [g for g in space.prunable if g.module_type == "attention"]
    mlps = [n for n in space.names if ".mlp." in n]
    assert heads and mlps
    attention = dict(pruned.named_modules())[heads[0].name]
    layer = attention_layer(attention)
    kept = heads[0].channels - round(policy.ratios[heads[0].name] * heads[0].channels)
    assert layer.heads(attention) == kept < heads[0].channels
    for g in space.prunable:  # the residual stream through the attention modules stays whole
        for part in space.parts(g.name):
            group = space.dg.get_pruning_group(part.root, part.handler, list(range(part.channels)))
            assert not any(attention_layer(dep.target.module) for dep, _ in group)
    assert_removal_is_silencing(ev, policy)


# -- attention modules: the pruned forward, head by head -------------------------------------------


def _attention_modules():
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
    from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

    torch.manual_seed(0)
    return [
        ("multihead", nn.MultiheadAttention(32, 4, batch_first=True), (2, 5, 32)),
        ("swin", ShiftedWindowAttention(32, [4, 4], [2, 2], 4), (2, 6, 7, 32)),
        ("swin-v2", ShiftedWindowAttentionV2(32, [4, 4], [2, 2], 4), (2, 6, 7, 32)),
        ("maxvit", RelativePositionalMultiHeadAttention(32, 8, 16), (2, 3, 16, 32)),
    ]


def _call(module, x):
    out = module(x, x, x, need_weights=False) if isinstance(module, nn.MultiheadAttention) else module(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind, module, shape", _attention_modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_pruned_attention_computes_what_the_original_does_with_those_heads_silenced(kind, module, shape):
    module.eval()
    x = torch.randn(*shape)
    layer = attention_layer(module)
    same = copy.deepcopy(module)
    same.__class__ = layer._pruned_class(same)  # the pruned forward, no head removed
    reference = copy.deepcopy(module)
    layer.proj(reference)[0].data[:, 8:16] = 0  # head 1 of 4 (head_dim 8) silenced
    pruned = copy.deepcopy(module)
    layer.prune_heads(pruned, [1])
    with torch.no_grad():
        torch.testing.assert_close(_call(same, x), _call(module, x))
        torch.testing.assert_close(_call(pruned, x), _call(reference, x))
    assert layer.heads(pruned) == 3
    assert count_params(module) - count_params(pruned) == _head_params(kind)


def _head_params(kind: str) -> int:
    # a head of width 8 in a 32-wide module: q, k, v rows (3 x 8 x (32 + 1)) and the output columns (8 x 32)
    projections = 3 * 8 * 33 + 8 * 32
    return projections + {"multihead": 0, "swin": 49, "swin-v2": 1 + 512, "maxvit": 49}[kind]


def test_multihead_attention_heads_keep_their_masks_and_weights():
    torch.manual_seed(0)
    module = nn.MultiheadAttention(16, 4).eval()  # sequence first
    q, kv = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    mask = torch.rand(5, 7) > 0.7
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, -2:] = True
    same = copy.deepcopy(module)
    same.__class__ = attention_layer(module)._pruned_class(same)
    with torch.no_grad():
        for need in (False, True):
            a = module(q, kv, kv, attn_mask=mask, key_padding_mask=pad, need_weights=need)
            b = same(q, kv, kv, attn_mask=mask, key_padding_mask=pad, need_weights=need)
            torch.testing.assert_close(b[0], a[0])
            if need:
                torch.testing.assert_close(b[1], a[1])


# -- grouped convolutions, by hand ----------------------------------------------------------------


def test_a_grouped_convolution_loses_whole_groups_its_producer_and_consumer_in_step():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),  # producer
        nn.Conv2d(16, 24, 3, padding=1, groups=4), nn.BatchNorm2d(24), nn.ReLU(),  # 4 groups: 4 in, 6 out each
        nn.Conv2d(24, 8, 1), nn.ReLU(),  # consumer
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()
    space = Space.from_model(net, torch.zeros(1, 3, 8, 8))
    g = space.by_name["3"]
    assert (g.module_type, g.channels, g.unit) == ("grouped", 4, 4)
    pruner = ChannelPruner(space)
    policy = Policy({n: 0.0 for n in space.names} | {"3": 0.5}, keep={"3": [0, 2]})
    pruned = pruner.prune(policy)
    conv = pruned[6]
    assert (conv.groups, conv.in_channels, conv.out_channels, tuple(conv.weight.shape[:2])) == (2, 8, 12, (12, 4))
    assert (pruned[3].out_channels, pruned[9].in_channels) == (8, 12)
    torch.testing.assert_close(pruned[6].weight, torch.cat([net[6].weight[0:6], net[6].weight[12:18]]))
    x = torch.zeros(1, 3, 8, 8)
    assert count_flops(pruned, x) == space.flops(policy.ratios)
    assert count_params(pruned) == space.params(policy.ratios)
    reference = copy.deepcopy(net)
    with torch.no_grad():
        reference[9].weight[:, 6:12] = 0
        reference[9].weight[:, 18:24] = 0
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(pruned(x), reference(x))


# -- a user's own module ---------------------------------------------------------------------------


class Scale(nn.Module):
    """A learned per-channel scale: a module torch-pruning does not know."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


class Standardise(nn.Module):
    """A fixed per-channel shift held in a buffer."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.linspace(-1, 1, channels))

    def forward(self, x):
        return x - self.mean.view(1, -1, 1, 1)


class ScalePruner(tp.pruner.BasePruningFunc):
    def prune_out_channels(self, layer, idxs):
        keep = [i for i in range(layer.weight.numel()) if i not in set(idxs)]
        layer.weight = nn.Parameter(layer.weight.detach()[keep])
        return layer

    prune_in_channels = prune_out_channels  # input and output channels are the same ones

    def get_out_channels(self, layer):
        return layer.weight.numel()

    get_in_channels = get_out_channels


def _net_with(extra: type) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), extra(16),
                         nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("extra, held", [(Scale, "a parameter 'weight'"), (Standardise, "a buffer 'mean'")])
def test_a_module_torch_pruning_does_not_know_is_refused_in_one_line_naming_it(extra, held):
    with pytest.raises(InputError) as e:
        Space.from_model(_net_with(extra), torch.zeros(1, 3, 8, 8))
    message = str(e.value)
    assert "\n" not in message
    assert f"module '3' ({extra.__name__}) holds {held}" in message
    assert "register_pruner" in message and "--ignore '2'" in message
    # keeping that group whole is the other way out
    space = Space.from_model(_net_with(extra), torch.zeros(1, 3, 8, 8), ignore=["2"])
    assert space.pinned_reasons["2"] == "--ignore 2"


def test_a_registered_pruner_prunes_the_users_module():
    autoprune.register_pruner(Scale, ScalePruner())
    try:
        ev, policy, pruned = prune_uniformly(_net_with(Scale), 8, classes=4)
        assert pruned[3].weight.numel() == pruned[2].out_channels < 16
        assert_removal_is_silencing(ev, policy)
    finally:
        autoprune.unregister_pruner(Scale)


def test_register_pruner_refuses_what_is_not_a_pruner():
    with pytest.raises(autoprune.ParameterError, match="BasePruningFunc"):
        autoprune.register_pruner(Scale, object())
    with pytest.raises(autoprune.ParameterError, match="nn.Module subclass"):
        autoprune.register_pruner(int, ScalePruner())


# -- input sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, size, message", [
    ("alexnet", 32, r"does not run on 32x32 images \(RuntimeError: .*\); it needs at least 63x63: give --image-size"),
    ("vit_b_16", 40, "cuts images into 16x16 patches: its image size must be a multiple of 16, not 40"),
    ("maxvit_t", 64, "must be a multiple of 224, not 64"),
])
def test_an_image_size_the_architecture_cannot_take_is_refused_naming_one_it_can(arch, size, message):
    with pytest.raises(InputError, match=message):
        build_model(f"torchvision:{arch}", 3, 10, size)


def test_checking_the_input_size_leaves_batch_norm_statistics_alone():
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", 3, 10, 16)
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in model.modules()
               if isinstance(m, nn.BatchNorm2d))
    assert all(int(m.num_batches_tracked) == 0 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# -- the sweep: every torchvision classifier -------------------------------------------------------

SWEEP_SIZES = {"alexnet": 64, "inception_v3": 299, "maxvit_t": 224, "vit_h_14": 28}


@pytest.mark.slow
@pytest.mark.parametrize("arch", torchvision.models.list_models(module=torchvision.models))
def test_every_torchvision_classifier_prunes_within_its_budget(arch):
    size = SWEEP_SIZES.get(arch, 32)
    prune_uniformly(torchvision_model(arch, size, alive=False), size)


# -- from the command line -------------------------------------------------------------------------

def readme_example() -> str:
    """The README's example of a model file with a registered pruner (the code block starting ``# nets.py``)."""
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("```python\n# nets.py") + len("```python\n")
    return readme[start:readme.index("```", start)]


def _cli(capsys, *argv):
    from autoprune.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_readme_example_of_a_registered_pruner_searches_and_applies_from_the_shell(tmp_path, capsys):
    example = readme_example()
    registration = "autoprune.register_pruner(Scale, ScalePruner())\n"
    assert registration in example
    (tmp_path / "nets.py").write_text(example)
    (tmp_path / "plain.py").write_text(example.replace(registration, ""))
    storage = f"sqlite:///{tmp_path}/autoprune.db"
    common = ["--budget-flops", "50%", "--agent", "uniform", "--bn-batches", "2", "--storage", storage]
    code, _, err = _cli(capsys, "search", "--model", tmp_path / "plain.py:net", *common, "-o", tmp_path / "no.json")
    assert code == 2 and err.count("\n") == 1
    assert "module '4' (Scale) holds a parameter 'weight' that the channels of group '3' run through" in err
    code, out, err = _cli(capsys, "search", "--model", tmp_path / "nets.py:net", *common, "-o", tmp_path / "best.json")
    assert code == 0, err
    assert "kept whole: 2 of 3 groups" in out.replace("\n", " ")
    policy = Policy.load(tmp_path / "best.json")
    code, out, err = _cli(capsys, "apply", tmp_path / "best.json", "-o", tmp_path / "pruned.pt")
    assert code == 0, err
    pruned = torch.load(tmp_path / "pruned.pt", weights_only=False)
    assert pruned[4].weight.numel() == pruned[3].out_channels < 64
    assert count_flops(pruned, torch.zeros(1, 1, 8, 8)) == policy.metrics["flops"]


def test_image_size_is_recorded_and_apply_rebuilds_the_same_data(tmp_path, capsys):
    from PIL import Image

    for label, colour in (("cat", (255, 0, 0)), ("dog", (0, 255, 0))):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (30 + i, 40), tuple(min(255, c + 20 * i) for c in colour)).save(
                tmp_path / "images" / label / f"{i}.png")
    storage = f"sqlite:///{tmp_path}/autoprune.db"
    source = ["--dataset", "imagefolder", "--data-root", tmp_path / "images", "--image-size", "24"]
    code, _, err = _cli(capsys, "search", "--model", "torchvision:alexnet", *source, "--budget-flops", "50%",
                        "--storage", storage)
    assert code == 2 and err.count("\n") == 1 and "it needs at least 63x63: give --image-size 63" in err
    code, _, err = _cli(capsys, "search", "--model", "resnet20", *source, "--pretrain-steps",
                        "2", "--batch-size", "4", "--bn-batches", "2", "--budget-flops", "50%", "--storage", storage,
                        "-o", tmp_path / "best.json")
    assert code == 0, err
    policy = Policy.load(tmp_path / "best.json")
    assert policy.model["image_size"] == 24 and policy.model["source"]["image_size"] == 24
    code, out, err = _cli(capsys, "apply", tmp_path / "best.json", "-o", tmp_path / "pruned.pt")
    assert code == 0, err
    pruned = torch.load(tmp_path / "pruned.pt", weights_only=False)
    # the FLOPs depend on the image size: the same figure means apply read the same 24x24 images
    assert count_flops(pruned, torch.zeros(1, 3, 24, 24)) == policy.metrics["flops"]
    assert "(50.0% of" in out or "(49." in out  # apply's own measurement, on its rebuilt data


def test_a_model_with_pruned_heads_is_saved_and_loads_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    from torchvision.models import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=10).eval()
    space = Space.from_model(model, torch.zeros(1, 3, 32, 32))
    pruned = ChannelPruner(space).prune(Policy({n: 0.5 for n in space.names}))
    torch.save(pruned, tmp_path / "pruned.pt")
    expected = pruned(torch.ones(1, 3, 32, 32))
    torch.save(expected, tmp_path / "expected.pt")
    code = (f"import torch; m = torch.load({str(tmp_path / 'pruned.pt')!r}, weights_only=False); "
            f"e = torch.load({str(tmp_path / 'expected.pt')!r}); "
            "torch.testing.assert_close(m(torch.ones(1, 3, 32, 32)), e); print(type(m.features[1][0].attn).__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "PrunedShiftedWindowAttention"
