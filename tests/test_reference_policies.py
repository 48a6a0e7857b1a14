"""policies/: reference policies from the project's own searches (written by an earlier version: the
objective under "accuracy", budgets as display strings beside "budget_args"). Each one loads, its model
and data read back as ``apply`` reads them, and re-applied through the library's own rebuild gives a
model whose FLOPs and params, *measured again* (by autoprune's counter and by torch-pruning's), are the
ones it recorded, whose layers have the widths its ratios say, and which meets its budget (channel counts
do not depend on the weights, so the model is built untrained; the criterion still picks channels,
statistics included); its recorded search configuration reads back.

The Fashion-MNIST ones (``benchmarks/quality.py``, seed 0) need the dataset where they record it
(``apt-get install dataset-fashion-mnist``) and skip, saying so, without it. Where the pretrained
weights they were searched on are also cached, they are re-applied to those weights and must score
on validation what their search recorded."""

import copy
import os
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

from autoprune.config import SearchConfig, SourceConfig
from autoprune.cost import count_flops, count_params
from autoprune.data import load_dataset
from autoprune.models import build_model
from autoprune.models.checkpoint import fingerprint, load_checkpoint
from autoprune.policy import Policy
from autoprune.runner import rebuild
from autoprune.space import keep_count
from autoprune.task import ImageClassificationTask

POLICIES = sorted((Path(__file__).resolve().parent.parent / "policies").glob("*.json"))
IDS = [p.stem for p in POLICIES]


def test_there_are_reference_policies():
    assert len(POLICIES) >= 3
    assert {Policy.load(p).model["dataset"] for p in POLICIES} >= {"digits", "fashionmnist"}


def _task(source: SourceConfig) -> ImageClassificationTask:
    """The policy's data, read as ``apply`` reads it; a skip naming what is missing for a dataset that does
    not ship with a package."""
    if source.data_root and not os.path.isdir(source.data_root):
        pytest.skip(f"{source.dataset} is not in {source.data_root} (for Fashion-MNIST: apt-get install "
                    "dataset-fashion-mnist), so its reference policies cannot be re-applied here")
    return ImageClassificationTask(load_dataset(source.dataset, root=source.data_root),
                                   batch_size=source.batch_size)


@pytest.mark.parametrize("path", POLICIES, ids=IDS)
def test_reference_policy_reapplies_to_its_recorded_flops(path):
    policy = Policy.load(path)
    info, metrics, search = policy.model, policy.metrics, policy.search
    for key in ("name", "dataset"):
        assert key in info
    assert search.get("agent") and search.get("budgets")  # which search made it, under which budget
    assert "final" in metrics and 0 <= metrics["final"]["test_accuracy"] <= 1
    source = SourceConfig.from_info(info)  # where the model and data came from, as apply reads it
    assert (source.model, source.dataset) == (info["name"], info["dataset"])
    task = _task(source)
    shape = task.model_kwargs()
    torch.manual_seed(0)
    model = build_model(source.model, shape["in_channels"], shape["num_classes"], shape["image_size"])
    pruned, ev, _ = rebuild(model, policy, task, finetune_steps=0, device="cpu")
    x = ev.example_inputs
    # measured again from the models, by two counters, never read from the file
    base_flops, base_params = count_flops(model, x), count_params(model)
    flops, params = count_flops(pruned, x), count_params(pruned)
    assert (flops, params) == torch_pruning_count(pruned, x)
    assert (base_flops, base_params) == torch_pruning_count(model, x)
    assert flops == metrics["flops"] and params == metrics["params"]
    assert (base_flops, base_params) == (metrics["base"]["flops"], metrics["base"]["params"])
    assert flops / base_flops == pytest.approx(metrics["flops_ratio"], abs=1e-12)
    assert params / base_params == pytest.approx(metrics["params_ratio"], abs=1e-12)
    # every group lost the channels its ratio says: its leading layer has that many outputs left
    layers = dict(pruned.named_modules())
    for name, ratio in policy.ratios.items():
        group = ev.space.by_name[name]
        assert layers[name].out_channels == keep_count(group.channels, ratio), name
    # and the budget the search ran under holds for the figures measured here
    for budget in SearchConfig.from_dict(search).budget_list():
        assert budget.holds({"flops": flops, "params": params}[budget.resource],
                            {"flops": base_flops, "params": base_params}[budget.resource])


def torch_pruning_count(model, x):
    """MACs of the conv and linear layers and the parameters, by torch-pruning's counter (its bias, batch
    norm, activation and pooling operations left out: the README's convention counts none of them)."""
    _, params, _, _ = tp.utils.count_ops_and_params(model, x, layer_wise=True)
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.bias = None
    _, _, flops, _ = tp.utils.count_ops_and_params(plain, x, layer_wise=True)
    return int(sum(f for m, f in flops.items() if isinstance(m, (nn.Conv2d, nn.Linear)) and f)), int(params)


@pytest.mark.parametrize("path", POLICIES, ids=IDS)
def test_reference_policy_search_configuration_reads_back(path):
    policy = Policy.load(path)
    metrics, search = policy.metrics, policy.search
    config = SearchConfig.from_dict(search)  # what worker and compare read back from a record
    assert config.agent == search["agent"]
    budgets = config.budget_list()
    assert budgets and {b.resource for b in budgets} == set(search.get("budget_args") or search["budgets"])
    assert all(b.holds(metrics[b.resource], metrics["base"][b.resource]) for b in budgets)


REAL = [p for p in POLICIES if Policy.load(p).model.get("weights") and Policy.load(p).model.get("checkpoint")]


@pytest.mark.parametrize("path", REAL, ids=[p.stem for p in REAL])
def test_reference_policy_on_its_weights_scores_what_its_search_recorded(path):
    """Re-applied to the weights it was searched on (adaptive BN with the recorded seed, no fine-tune),
    the policy scores on validation what the search recorded, to within 0.1 % of the images (thread
    counts change float sums, which may flip a near-tied prediction)."""
    policy = Policy.load(path)
    info = policy.model
    source = SourceConfig.from_info(info)
    task = _task(source)
    if not os.path.isfile(info["checkpoint"]):
        pytest.skip(f"the weights {path.stem} was searched on are not cached at {info['checkpoint']} "
                    f"(autoprune train --model {info['name']} --dataset {info['dataset']} "
                    f"--steps {info.get('pretrain_steps')} makes them)")
    shape = task.model_kwargs()
    model = build_model(source.model, shape["in_channels"], shape["num_classes"], shape["image_size"])
    load_checkpoint(model, info["checkpoint"])
    if fingerprint(model) != info["weights"]:
        pytest.skip(f"{info['checkpoint']} holds other weights than {path.stem} was searched on")
    pruned, ev, steps = rebuild(model, policy, task, finetune_steps=0, device="cpu")
    assert steps == 0 and policy.search["finetune_steps"] == 0
    result = ev.measure(pruned, "val", 0)
    assert result.score == pytest.approx(policy.metrics["score"], abs=1e-3)
    assert result.flops == policy.metrics["flops"]
