"""Masked granularities (unstructured, N:M): masks, dense vs effective cost, budgets, agents, export."""

import json
import math
import random

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from autoprune.agents import Limits, SearchContext, get_agent
from autoprune.budget import Budgets, parse_budget
from autoprune.cli import main
from autoprune.config import SearchConfig
from autoprune.cost import count_flops, count_params
from autoprune.errors import InputError, ParameterError
from autoprune.evaluator import Evaluator
from autoprune.policy import Policy, parse_granularity, snap_ratio
from autoprune.study import best_policy, completed, open_study


@pytest.fixture(scope="module")
def unstructured(trained_resnet20, digits_task):
    return Evaluator(trained_resnet20, digits_task, device="cpu", granularity="unstructured", bn_batches=3, seed=0)


@pytest.fixture(scope="module")
def two_four(trained_resnet20, digits_task):
    return Evaluator(trained_resnet20, digits_task, device="cpu", granularity="2:4", bn_batches=3, seed=0)


def context(evaluator, tmp_path, budgets, name="s", agent="uniform", n_trials=None):
    study = open_study(name, f"sqlite:///{tmp_path}/db.sqlite3")
    return SearchContext(evaluator, Budgets(budgets, evaluator), study, agent, limits=Limits(n_trials), seed=1)


def masked_modules(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "weight_mask")}


def producers(evaluator):
    """Conv/linear layers whose output channels belong to a prunable (unpinned) group."""
    prunable = set(evaluator.space.names)
    return {layer.name for layer in evaluator.space.layers() if any(g in prunable for g, _ in layer.out_groups)}


def nonzeros_per_run(weight, m=4):
    """Non-zeros in every run of ``m`` consecutive input channels at each (out, kh, kw) position."""
    return (weight.detach().movedim(1, -1).reshape(-1, m) != 0).sum(-1)


def capture_models(evaluator, monkeypatch):
    """The pruned models that Evaluator.evaluate builds, as it hands them to measure."""
    seen = []
    original = evaluator.measure

    def measure(model, *args, **kw):
        seen.append(model)
        return original(model, *args, **kw)

    monkeypatch.setattr(evaluator, "measure", measure)
    return seen


# -- granularity strings and policies -------------------------------------------------------------
def test_granularity_strings_are_parsed_and_refused_in_one_line():
    assert parse_granularity("channel") == "channel"
    assert parse_granularity("unstructured") == "unstructured"
    assert parse_granularity(" 2:4 ") == "2:4"
    for bad in ("3:2", "0:4", "4:4"):
        with pytest.raises(ParameterError, match=rf"^granularity='{bad}': N:M .*0 < N < M"):
            parse_granularity(bad)
    for bad in ("foo", "2:", "2/4", 4):
        with pytest.raises(ParameterError) as e:
            parse_granularity(bad)
        assert str(e.value).startswith(f"granularity={bad!r}: choose channel, unstructured or N:M")
        assert "\n" not in str(e.value)


def test_n_of_m_ratios_snap_to_dense_or_n_of_m(two_four):
    assert snap_ratio("2:4", 0.24) == 0.0 and snap_ratio("2:4", 0.25) == 0.5 and snap_ratio("2:4", 0.9) == 0.5
    assert snap_ratio("1:4", 0.4) == 0.75 and snap_ratio("unstructured", 0.3) == 0.3
    names = two_four.space.names
    policy = two_four.policy({names[0]: 0.3, names[1]: 0.1})
    assert policy.granularity == "2:4"
    assert policy.ratios[names[0]] == 0.5 and policy.ratios[names[1]] == 0.0 and policy.ratios[names[2]] == 0.0


def test_the_policy_loader_refuses_n_of_m_ratios_it_cannot_realise():
    text = json.dumps({"schema": "autoprune.policy/1", "granularity": "2:4", "ratios": {"a": 0.5, "b": 0.3}})
    with pytest.raises(InputError) as e:
        Policy.from_json(text, source="p.json")
    assert str(e.value) == "p.json: policy ratio for 'b' is 0.3; a 2:4 policy allows only 0 (dense) or 0.5 (2:4)"
    with pytest.raises(InputError, match="granularity='blocks': choose channel, unstructured or N:M"):
        Policy.from_json(json.dumps({"schema": "autoprune.policy/1", "granularity": "blocks", "ratios": {"a": 0}}))


@pytest.mark.parametrize("granularity", ["channel", "unstructured", "2:4", "1:8"])
def test_policy_json_round_trip_keeps_the_granularity(granularity):
    ratio = snap_ratio(granularity, 0.6)
    policy = Policy({"a": ratio, "b": 0.0}, granularity=granularity, criterion="l2", metrics={"flops_dense": 7})
    again = Policy.from_json(policy.to_json())
    assert again.granularity == granularity and json.loads(policy.to_json())["granularity"] == granularity
    assert again.ratios == policy.ratios and again.key() == policy.key() and again.metrics == policy.metrics
    assert Policy({"a": 0.5}, granularity="channel").key() != Policy({"a": 0.5}, granularity="2:4").key()


# -- the masks ------------------------------------------------------------------------------------
def test_two_of_four_masks_hold_two_nonzeros_in_every_four_also_after_finetuning(two_four, monkeypatch):
    seen = capture_models(two_four, monkeypatch)
    result = two_four.evaluate(two_four.uniform(0.5), finetune_steps=8)
    (model,) = seen
    masked = masked_modules(model)
    assert set(masked) == producers(two_four)  # every layer of a prunable group, none of a pinned one
    assert "conv1" not in masked and "fc" not in masked
    for name, m in masked.items():
        runs = nonzeros_per_run(m.weight)
        assert torch.equal(runs, torch.full_like(runs, 2)), name
        assert torch.equal(nonzeros_per_run(m.weight_mask), runs)
        # the masked weights stayed at zero through the fine-tune: the weight is weight_orig * mask
        assert not torch.equal(m.weight_orig, two_four.space.modules[name].weight)  # and the others trained
    assert result.flops == count_flops(model, two_four.example_inputs, effective=True)


def test_unstructured_masks_reach_each_layers_sparsity_and_keep_the_largest_magnitudes(unstructured):
    rng = random.Random(0)
    policy = unstructured.policy({n: rng.uniform(0.05, 0.9) for n in unstructured.space.names})
    model = unstructured.mask_pruner.prune(policy)
    masked = masked_modules(model)
    layer_ratio = unstructured.mask_pruner.layer_ratios(policy.ratios, "unstructured")
    assert set(masked) == producers(unstructured)
    for name, m in masked.items():
        n = m.weight.numel()
        removed = int((m.weight_mask == 0).sum())
        assert abs(removed - layer_ratio[name] * n) <= 0.5 + 1e-9, name  # exactly, up to one weight
        base = unstructured.space.modules[name].weight.detach().abs()
        assert base[m.weight_mask == 1].min() >= base[m.weight_mask == 0].max(), name
        assert torch.equal(m.weight, unstructured.space.modules[name].weight * m.weight_mask)
    # a layer producing one group's channels takes exactly that group's ratio
    group = unstructured.space.by_name[unstructured.space.names[0]]
    lead = masked[group.name]
    assert int((lead.weight_mask == 0).sum()) == math.floor(policy.ratios[group.name] * lead.weight.numel() + 0.5)


def test_random_criterion_gives_seeded_random_masks(trained_resnet20, digits_task, unstructured):
    def masks(seed, criterion):
        ev = Evaluator(trained_resnet20, digits_task, device="cpu", granularity="unstructured", criterion=criterion,
                       seed=seed)
        return ev.mask_pruner.masks(ev.uniform(0.5))

    a, b, c, l1 = masks(0, "random"), masks(0, "random"), masks(1, "random"), masks(0, "l1")
    assert a.keys() == l1.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a) and not all(torch.equal(a[k], l1[k]) for k in a)
    l2 = Evaluator(trained_resnet20, digits_task, device="cpu", granularity="unstructured", criterion="l2")
    assert all(torch.equal(m, l1[k]) for k, m in l2.mask_pruner.masks(l2.uniform(0.5)).items())


def test_a_channel_criterion_is_refused_for_masked_granularities(trained_resnet20, digits_task):
    with pytest.raises(ParameterError, match=r"^criterion='taylor': does not apply to granularity 2:4; "
                                             "it supports l1, l2, random$"):
        Evaluator(trained_resnet20, digits_task, device="cpu", granularity="2:4", criterion="taylor")


# -- cost: dense and effective --------------------------------------------------------------------
def test_dense_and_effective_figures_are_both_reported(unstructured, trained_resnet20, digits_task):
    base_flops, base_params = unstructured.space.base_flops, unstructured.space.base_params
    policy = unstructured.uniform(0.5)
    predicted = unstructured.cost(policy)
    result = unstructured.evaluate(policy)
    assert result.flops_dense == base_flops and result.params_dense == base_params  # shapes unchanged
    assert result.flops == predicted["flops"] and result.params == predicted["params"]
    assert predicted["flops_dense"] == base_flops and predicted["params_dense"] == base_params
    # every masked layer loses half its weights (rounded), hence as many of its MACs; pinned layers none
    masked = [layer for layer in unstructured.mask_pruner.layers if layer.name in producers(unstructured)]
    removed = {layer.name: math.floor(0.5 * layer.weights + 0.5) for layer in masked}
    assert result.flops == base_flops - sum(layer.positions * removed[layer.name] for layer in masked)
    assert result.params == base_params - sum(removed.values())
    assert result.flops < 0.6 * base_flops
    # a channel policy has no dense figures apart from its own
    channel = Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=3)
    plain = channel.evaluate(channel.uniform(0.5))
    assert plain.flops_dense is None and "flops_dense" not in channel.cost(channel.uniform(0.5))


def test_n_of_m_cost_is_the_snapped_arithmetic(two_four):
    names = two_four.space.names
    assert two_four.cost({n: 0.2 for n in names})["flops"] == two_four.space.base_flops
    assert two_four.cost({n: 0.3 for n in names}) == two_four.cost(two_four.uniform(0.5))
    half = two_four.cost(two_four.uniform(0.5))
    macs = sum(layer.positions * layer.weights for layer in two_four.mask_pruner.layers
               if layer.name in producers(two_four))
    assert half["flops"] == two_four.space.base_flops - macs // 2


# -- budgets and agents ---------------------------------------------------------------------------
def test_budgets_are_judged_on_effective_figures(unstructured, tmp_path):
    budget = parse_budget("flops", "70%")
    ctx = context(unstructured, tmp_path, [budget])
    result = get_agent("uniform")().search(ctx)
    limit = budget.limit(unstructured.space.base_flops)
    assert result.evaluation.flops <= limit < result.evaluation.flops_dense  # feasible though dense is not
    (trial,) = completed(ctx.study)
    a = trial.user_attrs
    assert a["feasible"] is True and a["flops_dense"] == unstructured.space.base_flops
    assert a["params_dense"] == unstructured.space.base_params
    policy = best_policy(ctx.study)
    assert policy.granularity == "unstructured"
    assert policy.metrics["flops"] == a["flops"] and policy.metrics["flops_dense"] == a["flops_dense"]
    # as tight as single weights allow: a slightly lower uniform ratio breaks the budget
    ratio = result.info["uniform_ratio"]
    assert unstructured.cost(unstructured.uniform(ratio - 1e-3))["flops"] > limit
    params = context(unstructured, tmp_path, [parse_budget("params", "60%")], name="params")
    held = get_agent("uniform")().search(params).evaluation
    assert held.params <= 0.6 * unstructured.space.base_params < held.params_dense


def test_uniform_agent_with_two_of_four(two_four, tmp_path):
    result = get_agent("uniform")().search(context(two_four, tmp_path, [parse_budget("flops", "70%")]))
    assert result.info["uniform_ratio"] == 0.5
    assert set(result.policy.ratios.values()) == {0.5} and result.policy.granularity == "2:4"
    assert result.evaluation.flops <= 0.7 * two_four.space.base_flops
    assert result.evaluation.flops == two_four.cost(result.policy)["flops"]
    # a budget the unpruned model meets needs no masks at all
    loose = get_agent("uniform")().search(context(two_four, tmp_path, [parse_budget("flops", "100%")], "loose"))
    assert set(loose.policy.ratios.values()) == {0.0}
    # 2:4 everywhere is the most it can do: a tighter budget is refused, naming the granularity
    with pytest.raises(InputError, match="budget cannot be met: 2:4 masks at 50% sparsity.*pinned"):
        get_agent("uniform")().search(context(two_four, tmp_path, [parse_budget("flops", "40%")], "tight"))


@pytest.mark.parametrize("granularity", ["unstructured", "2:4"])
def test_random_agent_projects_onto_the_budget_in_the_granularitys_arithmetic(unstructured, two_four, tmp_path,
                                                                              granularity):
    ev = unstructured if granularity == "unstructured" else two_four
    budget = parse_budget("flops", "75%")
    ctx = context(ev, tmp_path, [budget], agent="random", n_trials=2)
    get_agent("random")().search(ctx)
    trials = completed(ctx.study)
    assert len(trials) == 2 and all(t.user_attrs["feasible"] for t in trials)
    for t in trials:
        policy = Policy.from_json(t.user_attrs["policy"])
        assert policy.granularity == granularity
        assert t.user_attrs["flops"] == ev.cost(policy)["flops"] <= budget.limit(ev.space.base_flops)
        if granularity == "2:4":
            assert set(policy.ratios.values()) <= {0.0, 0.5}


@pytest.fixture(scope="module")
def mobilenet(digits):
    from autoprune.models import build_model

    torch.manual_seed(0)
    return build_model("torchvision:mobilenet_v2", digits.in_channels, digits.num_classes,
                       digits.image_size).eval()


@pytest.mark.parametrize("granularity", ["unstructured", "2:4"])
def test_uniform_agent_on_torchvision_mobilenet_v2(mobilenet, digits_task, tmp_path, monkeypatch, granularity):
    ev = Evaluator(mobilenet, digits_task, device="cpu", granularity=granularity, bn_batches=2, seed=0)
    seen = capture_models(ev, monkeypatch)
    budget = parse_budget("flops", "75%")
    result = get_agent("uniform")().search(context(ev, tmp_path, [budget]))
    assert result.evaluation.flops <= budget.limit(ev.space.base_flops)
    assert result.evaluation.flops_dense == ev.space.base_flops
    (model,) = seen
    masked = masked_modules(model)
    depthwise = {n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels}
    dense = ev.mask_pruner.dense_layers(granularity)
    if granularity == "2:4":
        # one input channel per group: N:M leaves every depthwise conv dense, and says so
        assert depthwise and not depthwise & set(masked)
        assert set(dense) == depthwise & producers(ev)
        for name, m in masked.items():
            runs = nonzeros_per_run(m.weight_mask)
            assert torch.equal(runs, torch.full_like(runs, 2)), name
    else:  # unstructured masks the depthwise convs of prunable groups like any other layer
        assert dense == [] and depthwise & producers(ev) <= set(masked)
    assert set(masked) <= producers(ev)
    assert result.evaluation.flops == count_flops(model, ev.example_inputs, effective=True)


def test_agents_that_remove_channels_themselves_refuse_masked_granularities(trained_resnet20, digits_task,
                                                                           tmp_path):
    from autoprune.runner import run_search

    with pytest.raises(ParameterError, match=r"^granularity='2:4': agent 'icepick' removes channels itself"):
        config = SearchConfig(agent="icepick", budgets={"flops": "50%"}, granularity="2:4",
                              storage=f"sqlite:///{tmp_path}/db.sqlite3", device="cpu")
        run_search(trained_resnet20, digits_task, config, final=False)


# -- command line: search, export, apply ----------------------------------------------------------
def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def searched_two_four(tmp_path_factory):
    """One real 2:4 search on the embedded default; returns its folder, storage and printed summary."""
    import contextlib
    import io

    d = tmp_path_factory.mktemp("nm")
    storage = f"sqlite:///{d}/autoprune.db"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["search", "--agent", "uniform", "--granularity", "2:4", "--budget-flops", "70%",
                     "--finetune-steps", "5",
                     "--pretrain-steps", "40", "--storage", storage, "-o", str(d / "best.json")])
    assert code == 0
    return d, storage, out.getvalue()


def test_search_records_the_granularity_and_both_flops(searched_two_four, capsys, tmp_path):
    d, storage, _ = searched_two_four
    policy = Policy.load(d / "best.json")
    assert policy.granularity == "2:4" and policy.search["granularity"] == "2:4"
    assert policy.metrics["flops"] <= 0.7 * policy.metrics["base"]["flops"] < policy.metrics["flops_dense"]
    assert policy.metrics["params"] < policy.metrics["params_dense"] == policy.metrics["base"]["params"]
    assert policy.search["dense_layers"] == []  # every ResNet-20 input dimension is a multiple of 4
    code, out, _ = run(capsys, "export", "--study", "resnet20-digits-uniform-flops70-2of4", "--storage", storage,
                       "-o", str(tmp_path / "again.json"))
    assert code == 0 and Policy.load(tmp_path / "again.json").granularity == "2:4"


def test_search_summary_shows_dense_and_effective_flops(searched_two_four):
    out = searched_two_four[2]
    assert "FLOPs (MACs), effective" in out and "FLOPs (MACs), dense" in out and "params, dense" in out
    assert "budgets are judged on the effective figures" in out


def test_apply_exports_a_masked_model_that_reloads_with_its_masks(searched_two_four, capsys, tmp_path):
    d = searched_two_four[0]
    policy = Policy.load(d / "best.json")
    code, out, _ = run(capsys, "apply", str(d / "best.json"), "-o", str(tmp_path / "pruned.pt"))
    assert code == 0 and f"validation accuracy {policy.metrics['accuracy']:.2%}" in out
    assert "dense FLOPs" in out
    model = torch.load(tmp_path / "pruned.pt", weights_only=False)
    state = model.state_dict()
    assert "layer2.0.conv1.weight_orig" in state and "layer2.0.conv1.weight_mask" in state
    x = torch.zeros(1, 1, 8, 8)
    assert model(x).shape == (1, 10)
    assert count_flops(model, x, effective=True) == policy.metrics["flops"]
    assert count_flops(model, x) == policy.metrics["flops_dense"]
    assert count_params(model, effective=True) == policy.metrics["params"]
    # the masks still hold when the reloaded model trains on
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.arange(4)).backward()
    opt.step()
    model(x)
    for name, m in masked_modules(model).items():
        assert prune.is_pruned(m)
        runs = nonzeros_per_run(m.weight)
        assert torch.equal(runs, torch.full_like(runs, 2)), name


def test_sync_refreshes_masked_weights_that_a_move_leaves_behind(unstructured):
    """``weight`` of a masked layer is a plain attribute: ``.to()``/``.cpu()`` move only weight_orig and
    the mask (shown here with a dtype change, which goes the same way as a device change), so apply
    re-derives it before saving; otherwise a model pruned on CUDA would pickle CUDA tensors."""
    from autoprune.pruning.masks import sync_masked_weights

    model = unstructured.mask_pruner.prune(unstructured.uniform(0.5)).double()
    masked = masked_modules(model)
    assert {m.weight.dtype for m in masked.values()} == {torch.float32}
    sync_masked_weights(model)
    assert {m.weight.dtype for m in masked.values()} == {torch.float64}
    assert all(torch.equal(m.weight, m.weight_orig * m.weight_mask) for m in masked.values())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--granularity", "3:2"], "--granularity 3:2: N:M keeps N of every M weights and needs 0 < N < M"),
        (["--granularity", "0:4"], "--granularity 0:4: N:M keeps N of every M weights and needs 0 < N < M"),
        (["--granularity", "foo"], "--granularity foo: choose channel, unstructured or N:M"),
        (["--granularity", "unstructured", "--criterion", "taylor"],
         "--criterion taylor: does not apply to granularity unstructured; it supports l1, l2, random"),
        (["--granularity", "2:4", "--agent", "gates"],
         "--granularity 2:4: agent 'gates' removes channels itself and supports only channel"),
    ],
)
def test_bad_granularity_gives_one_line_and_exit_code_2(capsys, argv, message):
    code, _, err = run(capsys, "search", "--budget-flops", "50%", *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoprune: error:") and message in lines[0]


def test_masked_policy_with_a_ratio_n_of_m_cannot_realise_is_refused_by_apply(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "autoprune.policy/1", "granularity": "2:4",
                               "ratios": {"layer2.0.conv1": 0.3}}))
    code, _, err = run(capsys, "apply", str(bad), "-o", str(tmp_path / "p.pt"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "allows only 0 (dense) or 0.5 (2:4)" in err
