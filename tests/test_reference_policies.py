"""policies/: reference policies from the project's own searches (written by an earlier version: the
objective under "accuracy", budgets as display strings beside "budget_args"). Each one loads, its model
and data read back as ``apply`` reads them, and re-applied through the library's own rebuild gives
exactly the FLOPs and params it recorded (channel counts do not depend on the weights, so the model is
built untrained; the criterion still picks channels, statistics included); its recorded search
configuration reads back and its budgets hold for what it recorded."""

import json
from pathlib import Path

import pytest
import torch

from autoprune.config import SearchConfig, SourceConfig
from autoprune.cost import count_flops, count_params
from autoprune.data import load_dataset
from autoprune.models import build_model
from autoprune.policy import Policy
from autoprune.runner import rebuild
from autoprune.task import ImageClassificationTask

POLICIES = sorted((Path(__file__).resolve().parent.parent / "policies").glob("*.json"))
IDS = [p.stem for p in POLICIES]


def test_there_are_reference_policies():
    assert len(POLICIES) >= 3


@pytest.mark.parametrize("path", POLICIES, ids=IDS)
def test_reference_policy_reapplies_to_its_recorded_flops(path):
    raw = json.loads(path.read_text())
    policy = Policy.load(path)
    info, metrics, search = policy.model, policy.metrics, policy.search
    for key in ("name", "dataset"):
        assert key in info
    assert search.get("agent") and search.get("budgets")  # which search made it, under which budget
    assert "final" in metrics and 0 <= metrics["final"]["test_accuracy"] <= 1
    source = SourceConfig.from_info(info)  # where the model and data came from, as apply reads it
    assert (source.model, source.dataset) == (info["name"], info["dataset"])
    task = ImageClassificationTask(load_dataset(source.dataset), batch_size=source.batch_size)
    shape = task.model_kwargs()
    torch.manual_seed(0)
    model = build_model(source.model, shape["in_channels"], shape["num_classes"], shape["image_size"])
    pruned, ev, _ = rebuild(model, policy, task, finetune_steps=0, device="cpu")
    assert count_flops(pruned, ev.example_inputs) == metrics["flops"] == raw["metrics"]["flops"]
    assert count_params(pruned) == metrics["params"]


@pytest.mark.parametrize("path", POLICIES, ids=IDS)
def test_reference_policy_search_configuration_reads_back(path):
    policy = Policy.load(path)
    metrics, search = policy.metrics, policy.search
    config = SearchConfig.from_dict(search)  # what worker and compare read back from a record
    assert config.agent == search["agent"]
    budgets = config.budget_list()
    assert budgets and {b.resource for b in budgets} == set(search["budget_args"])
    assert all(b.holds(metrics[b.resource], metrics["base"][b.resource]) for b in budgets)
