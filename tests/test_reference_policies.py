"""policies/: reference policies from the project's own searches. Each one loads, fits its model, and
re-applied gives exactly the FLOPs and params it recorded (channel counts do not depend on the weights,
so the model is built untrained; the criterion still picks channels, statistics included)."""

import json
from pathlib import Path

import pytest
import torch

from autoprune.cost import count_flops, count_params
from autoprune.data import load_dataset
from autoprune.evaluator import Evaluator
from autoprune.models import build_model
from autoprune.policy import Policy

POLICIES = sorted((Path(__file__).resolve().parent.parent / "policies").glob("*.json"))


def test_there_are_reference_policies():
    assert len(POLICIES) >= 3


@pytest.mark.parametrize("path", POLICIES, ids=[p.stem for p in POLICIES])
def test_reference_policy_reapplies_to_its_recorded_flops(path):
    raw = json.loads(path.read_text())
    policy = Policy.load(path)
    info, metrics, search = policy.model, policy.metrics, policy.search
    for key in ("name", "dataset"):
        assert key in info
    assert search.get("agent") and search.get("budgets")  # which search made it, under which budget
    assert "final" in metrics and 0 <= metrics["final"]["test_accuracy"] <= 1
    data = load_dataset(info["dataset"])
    torch.manual_seed(0)
    model = build_model(info["name"], data.in_channels, data.num_classes, data.image_size)
    ev = Evaluator(model, data, device="cpu", bn_batches=0, ignore=search.get("ignore", ()),
                   criterion_batches=search.get("criterion_batches", 8))
    policy.check_names(ev.space.names, model_desc=info["name"])
    pruned = ev.build(policy)
    assert count_flops(pruned, ev.example_input) == metrics["flops"] == raw["metrics"]["flops"]
    assert count_params(pruned) == metrics["params"]
    assert all(b.holds(metrics[b.resource], metrics["base"][b.resource]) for b in _budgets(search))


def _budgets(search):
    from autoprune.budget import parse_budget

    return [parse_budget(r, t) for r, t in search["budget_args"].items()]
