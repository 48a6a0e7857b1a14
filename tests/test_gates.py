"""Pruning from Scratch: channel gates, their regulariser, the global threshold, the policy's kept
channels and the gates agent, on a real ResNet-20 trained on digits."""

import copy

import pytest
import torch

import autoprune.agents.gates  # noqa: F401  (registers the agent)
from autoprune.agents import SearchContext, get_agent
from autoprune.agents.gates import choose, learn_gates, reinitialise
from autoprune.budget import Budgets, parse_budget
from autoprune.cost import count_flops
from autoprune.errors import InputError, ParameterError
from autoprune.evaluator import Evaluator
from autoprune.policy import Policy
from autoprune.pruning.gates import (
    ChannelGates,
    channel_flops,
    flops_weights,
    gate_mean,
    gate_targets,
    residual_streams,
    sparsity_penalty,
    threshold_structure,
)
from autoprune.study import completed, open_study, policy_of


@pytest.fixture(scope="module")
def evaluator(trained_resnet20, digits_task):
    return Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=3, seed=0)


def context(evaluator, tmp_path, budgets, name="g", max_ratio=0.9):
    study = open_study(name, f"sqlite:///{tmp_path}/db.sqlite3")
    return SearchContext(evaluator, Budgets(budgets, evaluator, max_ratio), study, "gates", seed=1)


def random_gates(evaluator, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.rand(g.channels, generator=gen) for g in evaluator.space.prunable}


def test_regulariser_is_the_squared_gap_between_mean_gate_and_target():
    gates = torch.tensor([1.0, 0.0, 0.5, -0.5])  # mean |g| = 0.5
    assert float(sparsity_penalty(gates, 0.2)) == pytest.approx(0.09)
    assert float(sparsity_penalty(torch.full((7,), 0.2), 0.2)) == pytest.approx(0.0)
    # weighted: the mean of w * |g| (weights of mean 1)
    w = torch.tensor([2.0, 1.0, 0.5, 0.5])
    assert float(gate_mean(gates, w)) == pytest.approx((2.0 + 0.0 + 0.25 + 0.25) / 4)
    assert float(sparsity_penalty(gates, 0.2, w)) == pytest.approx((0.625 - 0.2) ** 2)


def test_flops_weights_are_each_channels_flops_with_mean_one(evaluator):
    space = evaluator.space
    w = flops_weights(space)
    assert w.numel() == sum(g.channels for g in space.prunable)
    assert float(w.mean()) == pytest.approx(1.0)
    at = {}
    offset = 0
    for g in space.prunable:
        part = w[offset:offset + g.channels]
        offset += g.channels
        assert torch.allclose(part, part[0].expand_as(part))  # one weight per group
        at[g.name] = float(part[0])
    # a channel's weight is the FLOPs removing it saves: a 3x3 conv channel of the first stage (16 in and
    # out, at the full resolution) costs about four times one of the last stage (64, at a quarter of the side)
    full = space.flops({})
    for name in ("layer1.1.conv1", "layer3.1.conv1"):
        size = space.by_name[name].channels
        saved = (full - space.flops({name: 2 / size})) / 2
        assert at[name] / at["layer2.1.conv1"] == pytest.approx(
            saved / ((full - space.flops({"layer2.1.conv1": 2 / 32})) / 2), rel=1e-3)
    assert at["layer1.1.conv1"] / at["layer3.1.conv1"] == pytest.approx(4.0, rel=0.05)
    assert at == pytest.approx(channel_flops(space))


def test_flops_penalty_pushes_the_costly_channels_down_harder(evaluator):
    """The same gate-learning run, plain and FLOPs-weighted (the default lambda, where the loss's pull on
    each gate matters): with the weights, the first stage's inner convolutions (the costliest channels)
    keep much smaller gates, and the last stage's (the cheapest) no smaller ones."""
    def stage_means(weights):
        model = reinitialise(copy.deepcopy(evaluator.model), seed=0)
        gates = ChannelGates(evaluator.space, model)
        task = evaluator.task
        snaps = learn_gates(model, gates, task, task.train_batches(0, augment=False), steps=60, lr=0.05, lam=0.5,
                            r=0.2, snapshot_every=60, score=lambda m: 0.0, weights=weights)
        inner = {k: float(v.mean()) for k, v in snaps[-1].gates.items() if k.endswith(".conv1")}
        first = sum(v for k, v in inner.items() if k.startswith("layer1.")) / 3
        third = sum(v for k, v in inner.items() if k.startswith("layer3.")) / 3
        return first, third, snaps[-1].mean

    plain = stage_means(None)
    weighted = stage_means(flops_weights(evaluator.space))
    assert weighted[0] < plain[0] - 0.1
    assert weighted[1] > plain[1] - 0.02
    # each snapshot's mean is its own regulariser's mean, which both runs drove to about r
    assert plain[2] == pytest.approx(0.2, abs=0.1) and weighted[2] == pytest.approx(0.2, abs=0.1)


def test_threshold_by_gate_per_flop_removes_the_costly_channels_first(evaluator):
    space = evaluator.space
    gates = {g.name: torch.full((g.channels,), 0.5) for g in space.prunable}
    weights = channel_flops(space)
    base = space.flops({})
    fits = lambda ratios: space.flops(ratios) <= 0.8 * base  # noqa: E731
    ratios, _ = threshold_structure(gates, fits, 0.9, weights)
    costliest = max(weights.values())
    # equal gates: only the groups whose channels cost the most lose any, and they shed 20 % of the FLOPs
    assert {n for n, r in ratios.items() if r > 0} <= {n for n, w in weights.items() if w == pytest.approx(costliest)}
    assert space.flops(ratios) <= 0.8 * base
    # without weights the order is the gates' alone: ties go by group order, the first groups first
    plain, _ = threshold_structure(gates, fits, 0.9)
    assert plain != ratios
    with pytest.raises(ValueError, match="every weight must be > 0"):
        threshold_structure(gates, fits, 0.9, {**weights, space.prunable[0].name: 0.0})


def test_gates_sit_after_batch_norm_and_coupled_layers_share_one_vector(evaluator):
    targets = gate_targets(evaluator.space)
    assert targets["layer1.0.conv1"] == ["layer1.0.bn1"]
    # the residual stream of stage 2: the downsample's BN and every block's second BN, one gate vector
    assert set(targets["layer2.0.downsample.0"]) == {
        "layer2.0.downsample.1", "layer2.0.bn2", "layer2.1.bn2", "layer2.2.bn2"}
    model = copy.deepcopy(evaluator.model)
    gates = ChannelGates(evaluator.space, model)
    x = evaluator.task.data.loader("val", 16, "cpu").__iter__().__next__()[0]
    with torch.no_grad():
        assert torch.equal(model(x), evaluator.model(x))  # gates start at 1
        gates.gates[gates.names.index("layer2.0.downsample.0")][3] = 0.0
        seen = {}
        hooks = [dict(model.named_modules())[n].register_forward_hook(
            lambda m, i, o, n=n: seen.__setitem__(n, o)) for n in ("layer2.0.bn2", "layer2.1.bn2")]
        model(x)
    for h in hooks:
        h.remove()
    for out in seen.values():
        assert float(out[:, 3].abs().max()) == 0.0 and float(out[:, 4].abs().max()) > 0
    gates.remove()
    with torch.no_grad():
        assert torch.equal(model(x), evaluator.model(x))


def test_depthwise_groups_are_gated_once_after_the_depthwise_batch_norm():
    from autoprune.models import build_model
    from autoprune.space import Space

    model = build_model("mobilenet_v2", 3, 10, 32).eval()
    space = Space.from_model(model, torch.zeros(1, 3, 32, 32))
    # expansion conv -> BN -> depthwise conv -> BN: one group, one gate, after the depthwise BN
    assert gate_targets(space)["layers.1.conv1"] == ["layers.1.bn2"]


def test_gate_learning_clamps_gates_to_the_unit_interval_and_leaves_weights_unchanged(evaluator):
    model = reinitialise(copy.deepcopy(evaluator.model), seed=0)
    before = {k: v.clone() for k, v in model.named_parameters()}
    base = {k: v.clone() for k, v in evaluator.model.state_dict().items()}
    gates = ChannelGates(evaluator.space, model)
    task = evaluator.task
    # a large LR pushes many gates past both bounds within a few steps
    snaps = learn_gates(model, gates, task, task.train_batches(0, augment=False), steps=6, lr=2.0, lam=0.5, r=0.2,
                        snapshot_every=2, score=lambda m: 0.0)
    assert [s.step for s in snaps] == [2, 4, 6]
    for s in snaps:
        g = torch.cat(list(s.gates.values()))
        assert float(g.min()) >= 0.0 and float(g.max()) <= 1.0
    assert float(torch.cat(list(snaps[-1].gates.values())).eq(0).float().mean()) > 0.1
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k
    for k, v in evaluator.model.state_dict().items():
        assert torch.equal(v, base[k]), k


@pytest.mark.parametrize("budget", ["20%", "35%", "50%", "70%", "90%"])
def test_global_threshold_meets_the_budget_within_one_channel(evaluator, tmp_path, budget):
    b = parse_budget("flops", budget)
    ctx = context(evaluator, tmp_path, [b])
    gates = random_gates(evaluator, seed=len(budget))
    ratios, keep = threshold_structure(gates, ctx.budgets.fits, ctx.budgets.max_ratio)
    limit = b.limit(evaluator.space.base_flops)
    assert evaluator.cost(ratios)["flops"] <= limit
    # the channels kept are the largest gates of their group, in the number the ratio keeps
    for name, idxs in keep.items():
        g = gates[name]
        gone = [i for i in range(len(g)) if i not in idxs]
        assert not gone or float(g[gone].max()) <= float(g[idxs].min())
        assert ratios[name] == pytest.approx(len(gone) / len(g))
    # giving back the highest-gated removed channel breaks the budget: as tight as channels allow
    removed = [(float(gates[n][i]), n) for n in gates for i in range(len(gates[n])) if i not in keep[n]]
    _, name = max(removed)
    looser = dict(ratios)
    looser[name] -= 1 / len(gates[name])
    assert evaluator.cost(looser)["flops"] > limit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refill_gives_back_every_removed_channel_the_budget_does_not_need(evaluator, tmp_path, seed):
    b = parse_budget("flops", "30%")
    fits = context(evaluator, tmp_path, [b], name=f"r{seed}").budgets.fits
    limit = b.limit(evaluator.space.base_flops)
    gates, weights = random_gates(evaluator, seed=seed), channel_flops(evaluator.space)
    plain, _ = threshold_structure(gates, fits, 0.9, weights)
    ratios, keep = threshold_structure(gates, fits, 0.9, weights, refill=True)
    assert evaluator.cost(plain)["flops"] < evaluator.cost(ratios)["flops"] <= limit
    for name, g in gates.items():
        gone = [i for i in range(len(g)) if i not in keep[name]]
        if gone:  # the largest gates stay kept, and not one more channel of any group fits
            assert float(g[gone].max()) <= float(g[keep[name]].min())
            looser = {**ratios, name: ratios[name] - 1 / len(g)}
            assert evaluator.cost(looser)["flops"] > limit


def test_global_threshold_respects_max_ratio_and_a_params_budget(evaluator, tmp_path):
    b = parse_budget("params", "40%")
    ctx = context(evaluator, tmp_path, [b], max_ratio=0.7)
    ratios, _ = threshold_structure(random_gates(evaluator), ctx.budgets.fits, ctx.budgets.max_ratio)
    assert max(ratios.values()) <= 0.7
    assert evaluator.cost(ratios)["params"] <= b.limit(evaluator.space.base_params)


def test_policy_keep_survives_json_and_the_pruner_keeps_exactly_those_channels(evaluator):
    name = "layer2.0.conv1"
    keep = {name: [0, 2, 5] + list(range(10, 26))}  # 19 of 32 kept
    policy = evaluator.policy({name: 13 / 32}, criterion="gates", keep=keep)
    again = Policy.from_json(policy.to_json())
    assert again.keep == keep and again.key() == policy.key()
    assert policy.key() != evaluator.policy({name: 13 / 32}).key()
    removed = evaluator.pruner.removed_channels(again)
    assert removed == {name: sorted(set(range(32)) - set(keep[name]))}
    pruned = evaluator.pruner.prune(again)
    full = evaluator.model.layer2[0].conv1.weight
    assert torch.equal(pruned.layer2[0].conv1.weight, full[keep[name]])
    # a policy without "keep" writes no such key: existing JSON is unchanged
    assert "keep" not in evaluator.policy({name: 0.5}).to_dict()


def test_policy_keep_that_disagrees_with_its_ratio_is_refused(evaluator):
    bad = evaluator.policy({"layer2.0.conv1": 0.5}, keep={"layer2.0.conv1": [0, 1, 2]})
    with pytest.raises(InputError, match="keep.*layer2.0.conv1.*3 channel.*keeps 16 of 32"):
        evaluator.pruner.prune(bad)
    with pytest.raises(InputError, match="'keep' names 'nope'"):
        Policy({"a": 0.5}, keep={"nope": [1]})
    with pytest.raises(InputError, match="'keep' must be an object"):
        Policy.from_dict({"schema": "autoprune.policy/1", "ratios": {"a": 0.5}, "keep": {"a": "x"}})


def test_gates_agent_records_one_feasible_trial_per_run_and_a_scratch_trial_and_resumes(evaluator, tmp_path):
    b = parse_budget("flops", "50%")
    ctx = context(evaluator, tmp_path, [b])
    # a high gate LR, so that a few steps reach the target sparsity (the default tolerance, 0.05)
    agent = get_agent("gates")(steps=15, snapshot_every=5, lr=0.1, train_from_scratch=5, keep="gates",
                               **{"lambda": "0.5,2"})
    result = agent.search(ctx)
    trials = completed(ctx.study)
    runs = [t for t in trials if t.user_attrs["gates_role"] == "run"]
    scratch = [t for t in trials if t.user_attrs["gates_role"] == "scratch"]
    assert len(runs) == 2 and len(scratch) == 1
    assert sorted(t.params["lambda"] for t in runs) == [0.5, 2.0]
    # the regulariser drove the mean gate to r: every run's snapshot reached it (from 1 at the start)
    for t in runs:
        assert t.user_attrs["gates_reached_r"] is True
        assert t.user_attrs["gates_mean"] <= 0.2 + 0.05 and t.user_attrs["gates_sparsity_tol"] == 0.05
    assert all(t.params["r"] == 0.2 for t in trials)
    limit = b.limit(evaluator.space.base_flops)
    for t in trials:
        assert t.user_attrs["feasible"] is True and t.user_attrs["flops"] <= limit
    assert scratch[0].user_attrs["trained_from_scratch"] is True
    assert scratch[0].user_attrs["finetune_steps"] == 5
    assert result.policy is not None and result.policy.keep is not None
    # a second run on the same study learns nothing again and adds no trial
    again = context(evaluator, tmp_path, [b])
    assert agent.search(again).policy.key() == result.policy.key()
    assert again.recorder.written == 0 and len(completed(again.study)) == 3
    # a recorded policy re-applies to the same channels and the same figures
    run = runs[0]
    policy = policy_of(run)
    rebuilt = evaluator.build(policy, 0)
    assert count_flops(rebuilt, evaluator.example_inputs) == run.user_attrs["flops"]
    fresh = Evaluator(evaluator.model, evaluator.task, device="cpu", bn_batches=3, seed=0)
    assert fresh.evaluate(policy).score == pytest.approx(run.user_attrs["score"])
    assert run.user_attrs["score"] == run.user_attrs["accuracy"]


def test_kept_channels_are_the_largest_gates_only_when_gates_rank_the_trained_weights():
    assert get_agent("gates")().keeps_gates() is False  # random weights: the criterion picks channels
    assert get_agent("gates")(**{"from": "pretrained"}).keeps_gates() is True
    assert get_agent("gates")(keep="gates").keeps_gates() is True


def test_gates_agent_refuses_bad_options():
    with pytest.raises(ParameterError, match="gates option from='imagenet': choose from random, pretrained"):
        get_agent("gates")(**{"from": "imagenet"})
    # checked when the agent is made, as on the command line: no search needed to find out
    with pytest.raises(ParameterError, match="gates option lambda='a,b': give numbers >= 0, separated by commas"):
        get_agent("gates")(**{"lambda": "a,b"})
    with pytest.raises(ParameterError, match="gates option r='0.5,2': give numbers in \\[0, 1\\]"):
        get_agent("gates")(r="0.5,2")
    with pytest.raises(ParameterError, match="gates option penalty='params': choose from mean, flops"):
        get_agent("gates")(penalty="params")
    with pytest.raises(ParameterError, match="gates option order='size': choose from gate, flops"):
        get_agent("gates")(order="size")
    with pytest.raises(ParameterError, match="gates option streams='prune': choose from keep, gate"):
        get_agent("gates")(streams="prune")


def test_a_run_resumes_only_with_the_penalty_it_was_learned_with(evaluator, tmp_path):
    b = parse_budget("flops", "50%")
    ctx = context(evaluator, tmp_path, [b])
    plain = get_agent("gates")(steps=4, snapshot_every=2, lr=0.1)
    plain.search(ctx)
    (run,) = completed(ctx.study)
    assert run.user_attrs["gates_penalty"] == "mean"
    again = context(evaluator, tmp_path, [b])
    plain.search(again)
    assert again.recorder.written == 0  # the same settings: resumed
    weighted = context(evaluator, tmp_path, [b])
    get_agent("gates")(steps=4, snapshot_every=2, lr=0.1, penalty="flops").search(weighted)
    assert weighted.recorder.written == 1  # another penalty: learned again
    assert sorted(t.user_attrs["gates_penalty"] for t in completed(weighted.study)) == ["flops", "mean"]
    ordered = context(evaluator, tmp_path, [b])
    get_agent("gates")(steps=4, snapshot_every=2, lr=0.1, order="flops").search(ordered)
    assert ordered.recorder.written == 1  # another order: a run of its own
    gated = context(evaluator, tmp_path, [b])
    get_agent("gates")(steps=4, snapshot_every=2, lr=0.1, streams="gate").search(gated)
    assert gated.recorder.written == 1  # the streams gated too: a run of its own


def test_the_residual_streams_are_the_groups_that_several_layers_add_into(evaluator):
    # ResNet-20: the streams of stages 2 and 3, each led by its shortcut's convolution (stage 1's is pinned)
    assert residual_streams(evaluator.space) == ["layer2.0.downsample.0", "layer3.0.downsample.0"]
    stream = evaluator.space.by_name["layer2.0.downsample.0"]
    assert {"layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2"} <= set(stream.members)


def test_depthwise_partners_do_not_make_a_stream():
    # MobileNetV2's expansion group also holds its depthwise convolution, and is no stream; only the
    # projections that a residual sum joins are
    from autoprune.models import build_model
    from autoprune.space import Space

    space = Space.from_model(build_model("mobilenet_v2", 3, 10, 32).eval(), torch.zeros(1, 3, 32, 32))
    streams = residual_streams(space)
    assert streams and all(n.endswith(".conv3") for n in streams)
    assert len(streams) < sum(n.endswith(".conv3") for n in space.names)  # blocks without a residual are no stream
    expansions = [g for g in space.prunable if any(space.modules[m].groups > 1 for m in g.members
                                                   if isinstance(space.modules[m], torch.nn.Conv2d))]
    assert expansions and not {g.name for g in expansions} & set(streams)


def test_kept_streams_get_no_gate_stay_whole_and_the_other_groups_meet_the_budget(evaluator, tmp_path):
    streams = residual_streams(evaluator.space)
    gates = ChannelGates(evaluator.space, copy.deepcopy(evaluator.model),
                         [n for n in evaluator.space.names if n not in streams])
    assert not set(gates.names) & set(streams) and len(gates.names) == len(evaluator.space.names) - len(streams)
    b = parse_budget("flops", "40%")
    ctx = context(evaluator, tmp_path, [b])
    get_agent("gates")(steps=6, snapshot_every=3, lr=0.1, streams="keep").search(ctx)
    (run,) = completed(ctx.study)
    ratios = policy_of(run).ratios
    assert run.user_attrs["gates_streams"] == "keep"
    assert all(ratios[n] == 0.0 for n in streams)
    assert evaluator.cost(ratios)["flops"] <= b.limit(evaluator.space.base_flops)
    assert sum(ratios.values()) > 0
    # gating the streams too lets the threshold prune them
    both = context(evaluator, tmp_path, [b], name="both")
    get_agent("gates")(steps=6, snapshot_every=3, lr=0.1, streams="gate").search(both)
    (run,) = completed(both.study)
    assert any(policy_of(run).ratios[n] > 0 for n in streams)


def test_a_budget_the_other_groups_cannot_meet_with_the_streams_whole_is_refused_in_one_line(
        evaluator, tmp_path, monkeypatch):
    ctx = context(evaluator, tmp_path, [parse_budget("flops", "5%")])
    learned = []
    monkeypatch.setattr(autoprune.agents.gates, "learn_gates", lambda *a, **k: learned.append(1))
    with pytest.raises(InputError, match="every group but the residual streams.*streams 'gate'") as e:
        get_agent("gates")(steps=2, snapshot_every=1, lr=0.1, streams="keep").search(ctx)
    assert "\n" not in str(e.value)
    assert not learned  # refused before any gate is learned
    # the threshold refuses it too, should it be reached
    gates = {n: torch.rand(evaluator.space.by_name[n].channels) for n in evaluator.space.names
             if n not in residual_streams(evaluator.space)}
    with pytest.raises(InputError, match="every group but the residual streams"):
        get_agent("gates")(streams="keep").structure(ctx, gates)


def _learned(evaluator, *, r, tol, lr=0.1, lam=5.0, steps=8):
    """Snapshots of one gate-learning run (the same seed and batches every time) and the steps whose
    snapshot was scored, by the validation loss of the gated network."""
    model = reinitialise(copy.deepcopy(evaluator.model), seed=0)
    gates = ChannelGates(evaluator.space, model)
    scored = []

    def score(m):
        scored.append(len(scored))
        return evaluator.metrics_of(m, "val")["loss"]

    task = evaluator.task
    snaps = learn_gates(model, gates, task, task.train_batches(0, augment=False), steps=steps, lr=lr, lam=lam,
                        r=r, snapshot_every=1, score=score, tol=tol)
    return snaps, len(scored)


def test_snapshots_on_their_way_down_to_r_are_not_scored_and_the_same_snapshot_is_chosen(evaluator):
    every, n_every = _learned(evaluator, r=0.2, tol=None)
    assert n_every == len(every) and all(s.score is not None for s in every)
    means = sorted(s.mean for s in every)
    tol = means[len(means) // 2] - 0.2  # about half the snapshots reach r + tol
    lazy, n_lazy = _learned(evaluator, r=0.2, tol=tol)
    reached = [s.mean <= 0.2 + tol for s in every]
    assert 0 < sum(reached) < len(every)
    assert n_lazy == sum(reached)  # one validation pass per snapshot that can be chosen, none for the others
    assert [s.score is not None for s in lazy] == reached
    for a, b in zip(every, lazy):
        assert a.step == b.step and a.mean == pytest.approx(b.mean)
        if b.score is not None:
            assert b.score == pytest.approx(a.score, rel=1e-6)
    sign = -1.0  # the loss: lower is better
    assert choose(lazy, 0.2, tol, sign)[0].step == choose(every, 0.2, tol, sign)[0].step


def test_when_no_snapshot_reaches_r_only_the_sparsest_is_scored_as_it_stood(evaluator):
    # a large LR: the gates overshoot and the sparsest snapshot is not the last one
    every, _ = _learned(evaluator, r=0.0, tol=None, lr=0.5, lam=0.5)
    lazy, n_lazy = _learned(evaluator, r=0.0, tol=0.0, lr=0.5, lam=0.5)
    assert all(s.mean > 0.0 for s in every)  # nothing reaches r = 0 in a few steps
    assert choose(every, 0.0, 0.0)[0].step < every[-1].step
    assert n_lazy == 1
    chosen, reached = choose(lazy, 0.0, 0.0)
    assert not reached and chosen.score is not None
    expected, _ = choose(every, 0.0, 0.0)
    # scored after learning, from its saved gates and batch-norm statistics: the same as when it was taken
    assert chosen.step == expected.step and chosen.score == pytest.approx(expected.score, rel=1e-6)
