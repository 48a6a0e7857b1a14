"""The AMC environment and agent: gymnasium conformance, budget clipping, the reward, learning."""

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st

import autoprune.agents.amc  # noqa: F401  (registers the agent)
from autoprune.agents import Limits, SearchContext, get_agent
from autoprune.budget import Budget, Budgets, all_hold, parse_budget
from autoprune.cost import count_flops, count_params
from autoprune.envs import AMC_ENV_ID, FEATURES, AMCEnv, amc_reward
from autoprune.errors import InputError, ParameterError
from autoprune.evaluator import Evaluator
from autoprune.models import build_model
from autoprune.space import keep_count
from autoprune.study import completed, open_study

MODELS = ["resnet20", "mobilenet_v2", "vgg16_bn", "torchvision:resnet18"]


@pytest.fixture(scope="module")
def evaluator(trained_resnet20, digits_task):
    return Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=3, seed=0)


@pytest.fixture(scope="module")
def spaces(digits, digits_task):
    """Evaluators of untrained models of every family the core prunes (for cost and clipping only)."""
    return {name: Evaluator(build_model(name, digits.in_channels, digits.num_classes, digits.image_size),
                            digits_task, device="cpu") for name in MODELS}


def random_episode(env, seed):
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    done, infos = False, []
    while not done:
        obs, reward, done, truncated, info = env.step(np.array([rng.uniform()], dtype=np.float32))
        assert env.observation_space.contains(obs)
        infos.append(info)
    return reward, infos


def test_env_passes_gymnasium_check_env_and_is_registered(evaluator):
    env = AMCEnv(evaluator, {"flops": "50%"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any other warning of the checker is a failure
        warnings.filterwarnings("ignore", message=".*alternative render modes.*")  # the env renders nothing
        check_env(env)
    made = gym.make(AMC_ENV_ID, evaluator=evaluator, budgets={"flops": "50%"})
    assert isinstance(made.unwrapped, AMCEnv)
    assert made.observation_space.shape == (len(FEATURES),)


def test_observation_is_the_min_max_normalised_layer_embedding(evaluator):
    env = AMCEnv(evaluator, [parse_budget("flops", "50%")])
    static = env._static_embedding()
    assert static.min() == 0.0 and static.max() == 1.0
    index = FEATURES.index("index")
    np.testing.assert_allclose(static[:, index], np.linspace(0, 1, env.n_steps))
    _, infos = random_episode(env, seed=3)
    obs, _ = env.reset()
    assert obs[FEATURES.index("flops_removed")] == 0.0 and obs[FEATURES.index("previous_action")] == 1.0
    removed_before = 0.0
    for t, info in enumerate(infos[:-1]):
        obs, *_ = env.step(np.array([info["requested_keep_ratio"]], dtype=np.float32))
        # the same actions give the same decisions, and the state carries the previous one
        assert obs[FEATURES.index("previous_action")] == pytest.approx(info["keep_ratio"], abs=1e-6)
        assert obs[FEATURES.index("flops_removed")] >= removed_before
        assert obs[FEATURES.index("flops_rest")] == pytest.approx(env._rest[t + 1], abs=1e-6)
        removed_before = obs[FEATURES.index("flops_removed")]


@pytest.mark.parametrize("model", MODELS)
@settings(max_examples=12, deadline=None)
@given(
    resources=st.sampled_from([("flops",), ("params",), ("flops", "params")]),
    fractions=st.tuples(st.floats(0.2, 0.9), st.floats(0.2, 0.9)),
    seed=st.integers(0, 2**16),
)
def test_every_random_episode_ends_feasible(spaces, model, resources, fractions, seed):
    ev = spaces[model]
    budgets = [Budget(r, fraction=f) for r, f in zip(resources, fractions)]
    env = AMCEnv(ev, budgets, reward_fn=lambda policy: 0.0)
    _, infos = random_episode(env, seed)
    ratios = infos[-1]["ratios"]
    assert set(ratios) == set(ev.space.names)
    assert all(0.0 <= r <= env.max_ratio for r in ratios.values())
    assert all_hold(budgets, ev.cost(ratios), ev.base)
    if model == "resnet20":  # feasibility on the physically pruned model itself
        pruned = ev.pruner.prune(infos[-1]["policy"])
        measured = {"flops": count_flops(pruned, ev.example_inputs), "params": count_params(pruned)}
        assert all_hold(budgets, measured, ev.base)


def test_clipping_keeps_the_requested_ratio_when_the_budget_allows_it(spaces):
    ev = spaces["resnet20"]
    env = AMCEnv(ev, [Budget("flops", fraction=0.9)], reward_fn=lambda policy: 0.0)
    env.reset()
    _, _, _, _, info = env.step(np.array([0.95], dtype=np.float32))
    assert info["keep_ratio"] == pytest.approx(0.95, abs=1e-6)
    # a floor of 0.2: asking for nothing is answered with the floor
    _, _, _, _, info = env.step(np.array([0.0], dtype=np.float32))
    assert info["keep_ratio"] == pytest.approx(0.2)


def test_keeping_everything_is_clipped_to_just_meet_the_budget(spaces):
    ev = spaces["resnet20"]
    budget = Budget("flops", fraction=0.5)
    env = AMCEnv(ev, [budget], reward_fn=lambda policy: 0.0)
    env.reset()
    done = False
    while not done:
        _, _, done, _, info = env.step(np.array([1.0], dtype=np.float32))
    ratios = info["ratios"]
    limit = budget.limit(ev.space.base_flops)
    assert ev.cost(ratios)["flops"] <= limit
    # the greedy walk keeps groups whole until the budget forces pruning, and then prunes as little as
    # whole channels allow: one channel fewer removed from the first pruned group breaks the budget
    first = next(n for n in env.names if ratios[n] > 0)
    assert ratios[env.names[0]] == 0.0 and first != env.names[0]
    channels = ev.space.by_name[first].channels
    removed = channels - keep_count(channels, ratios[first])
    assert ev.cost(dict(ratios, **{first: (removed - 1) / channels}))["flops"] > limit


def test_unreachable_budget_is_refused_clearly(spaces):
    with pytest.raises(InputError, match="budget cannot be met"):
        AMCEnv(spaces["resnet20"], {"flops": "1%"}, reward_fn=lambda policy: 0.0)


def test_reward_is_minus_error_times_log_flops(evaluator):
    # amc_reward takes AMC's Error (1 - accuracy)
    assert amc_reward(0.25, math.e**10) == pytest.approx(-2.5)
    assert amc_reward(0.25, 1e6, "error") == pytest.approx(-0.25)
    with pytest.raises(ParameterError, match="amc option reward='accuracy': choose from error_log_flops, error"):
        amc_reward(0.5, 1e6, "accuracy")
    for kind in ("error_log_flops", "error"):
        env = AMCEnv(evaluator, {"flops": "60%"}, reward=kind)
        reward, infos = random_episode(env, seed=1)
        result = infos[-1]["evaluation"]
        assert result == evaluator.evaluate(infos[-1]["policy"])  # the shared evaluator scored it
        assert evaluator.task.error(result.score) == pytest.approx(1 - result.metrics["accuracy"])
        expected = -(1 - result.metrics["accuracy"]) * (math.log(result.flops) if kind == "error_log_flops" else 1)
        assert reward == pytest.approx(expected)
        assert all(i.get("evaluation") is None for i in infos[:-1])


def test_latency_budget_clips_with_measured_latency(trained_resnet20, digits_task, deterministic_latency):
    ev = Evaluator(trained_resnet20, digits_task, device="cpu", bn_batches=1, latency_repeats=3)
    budgets = [parse_budget("flops", "70%"), parse_budget("latency", "50%")]
    env = AMCEnv(ev, budgets, reward="error")
    assert ev.latency  # the environment turned latency measurement on
    _, infos = random_episode(env, seed=2)
    result = infos[-1]["evaluation"]
    assert result.latency is not None and result.latency <= 0.5 * ev.base["latency"] * (1 + 1e-9)
    assert result.flops <= 0.7 * ev.space.base_flops


def test_agent_options_default_and_validate():
    amc = get_agent("amc")
    agent = amc()
    assert (agent.sigma, agent.sigma_decay, agent.tau, agent.discount, agent.batch_size, agent.hidden) == (
        0.5, 0.95, 0.01, 1.0, 64, 300)
    assert (agent.actor_lr, agent.critic_lr, agent.keep_floor) == (1e-4, 1e-3, 0.2)
    assert agent.warmup_episodes(40) == 10 and agent.warmup_episodes(1000) == 100
    assert amc(warmup=7).warmup_episodes(1000) == 7
    with pytest.raises(ParameterError, match="amc option reward='accuracy': choose from error_log_flops, error") as e:
        amc(reward="accuracy")
    assert e.value.for_cli() == "--amc-reward accuracy: choose from error_log_flops, error"
    with pytest.raises(ParameterError, match="amc option warmup=-3: must be an integer >= 0"):
        amc(warmup=-3)


def test_trained_agent_beats_random_actions_on_a_synthetic_reward(spaces):
    """Reward = -mean |ratio - target| for a known best per-layer policy (pruning more in later
    layers, within the budget): after training, the actor's own policy must be far closer to it
    than random actions are, and follow its shape."""
    ev = spaces["resnet20"]
    names = ev.space.names
    target = np.linspace(0.05, 0.75, len(names))
    budgets = [Budget("flops", fraction=0.7)]
    assert all_hold(budgets, ev.cost(dict(zip(names, target))), ev.base)

    def reward_fn(policy):
        return -float(np.abs(np.array([policy.ratios[n] for n in names]) - target).mean())

    env = AMCEnv(ev, budgets, reward_fn=reward_fn)
    agent = get_agent("amc")(warmup=15, hidden=64)
    history = agent.learn(env, 60, seed=0)
    assert [e.phase for e in history].count("warmup") == 15
    random_rewards = [e.reward for e in history if e.phase == "warmup"]
    reward, info = agent.rollout(env)
    assert reward > np.mean(random_rewards) + 0.1
    learned = np.array([info["ratios"][n] for n in names])
    assert np.corrcoef(learned, target)[0, 1] > 0.8


def test_search_records_one_feasible_trial_per_episode(evaluator, tmp_path):
    budget = parse_budget("flops", "50%")
    study = open_study("amc", f"sqlite:///{tmp_path}/db.sqlite3")
    ctx = SearchContext(evaluator, Budgets([budget], evaluator), study, "amc", limits=Limits(6), seed=0)
    result = get_agent("amc")(warmup=3, hidden=32).search(ctx)
    trials = completed(study)
    assert len(trials) == 6 and result.info["episodes"] == 6
    assert [t.user_attrs["amc_phase"] for t in trials] == ["warmup"] * 3 + ["explore"] * 3
    for t in trials:
        assert t.user_attrs["agent"] == "amc" and t.user_attrs["feasible"] is True
        assert t.user_attrs["flops"] <= budget.limit(evaluator.space.base_flops)
    assert result.policy is not None
    assert result.evaluation.score == max(t.value for t in trials)


def test_relative_actions_read_against_the_uniform_ratio_the_budget_needs(spaces):
    ev = spaces["resnet20"]
    budget = Budget("flops", fraction=0.3)
    env = AMCEnv(ev, [budget], reward_fn=lambda policy: 0.0, action="relative")
    uniform = Budgets([budget], ev, env.max_ratio).fit()  # the tightest uniform ratio, shifted to the budget
    u = next(iter(uniform.values()))
    env.reset()
    # 0.5 asks for the uniform ratio of the groups still to decide; 0 and 1 for as much more and less: at 30 %
    # the uniform ratio is nearer max_ratio than 0, so 0 removes the most and 1 removes u less as much
    d = env.max_ratio - u
    assert 0.0 < d < u
    assert env.requested_ratio(0, [], 0.5) == pytest.approx(u, abs=1e-3)
    assert env.requested_ratio(0, [], 0.0) == pytest.approx(env.max_ratio)
    assert env.requested_ratio(0, [], 1.0) == pytest.approx(u - d, abs=1e-3)
    assert env.requested_ratio(0, [], 0.75) == pytest.approx(u - d / 2, abs=1e-3)
    for a in (0.1, 0.3, 0.9):
        assert env.requested_ratio(0, [], a) + env.requested_ratio(0, [], 1 - a) == pytest.approx(2 * u, abs=2e-3)
    # under a loose budget, 1 keeps the group whole and 0 removes twice the uniform ratio
    loose = AMCEnv(ev, [Budget("flops", fraction=0.8)], reward_fn=lambda policy: 0.0, action="relative")
    u80 = loose.uniform_rest(0, [])
    assert 0.0 < 2 * u80 < loose.max_ratio
    assert loose.requested_ratio(0, [], 1.0) == pytest.approx(0.0, abs=1e-3)
    assert loose.requested_ratio(0, [], 0.0) == pytest.approx(2 * u80, abs=1e-3)
    # after a group kept whole, the rest must remove more than u to meet the budget
    assert env.requested_ratio(1, [0.0], 0.5) > u + 0.01
    done = False
    while not done:
        _, _, done, _, info = env.step(np.array([0.5], dtype=np.float32))
    ratios = info["ratios"]
    assert all(abs(r - u) < 0.05 for r in ratios.values()), ratios  # whole channels round each group
    assert budget.holds(ev.cost(ratios)["flops"], ev.space.base_flops)


def test_random_relative_actions_spread_a_tight_budget_where_preserve_ratios_pile_it_at_the_end(spaces):
    """At 15 % FLOPs, preserve ratios drawn at random leave the last groups on the floor; relative ones
    centre every group on the uniform ratio, with as much room above it as below."""
    ev = spaces["resnet20"]
    budget = Budget("flops", fraction=0.15)
    last_at_floor, near_floor, drift = {}, {}, {}
    for action in ("preserve", "relative"):
        env = AMCEnv(ev, [budget], reward_fn=lambda policy: 0.0, action=action, keep_floor=0.1)
        u = env.uniform_rest(0, [])
        policies = [random_episode(env, seed)[1][-1]["ratios"] for seed in range(12)]
        for ratios in policies:
            assert budget.holds(ev.cost(ratios)["flops"], ev.space.base_flops)
        last_at_floor[action] = sum(p[env.names[-1]] >= env.max_ratio - 1e-6 for p in policies)
        ratios = np.array([list(p.values()) for p in policies])
        near_floor[action] = float(np.mean(ratios >= env.max_ratio - 0.07))  # whole channels round below it
        drift[action] = float(np.mean(ratios) - u)
    assert last_at_floor["preserve"] >= 10
    assert last_at_floor["relative"] <= 4
    assert near_floor["preserve"] > 0.5 and near_floor["relative"] < 0.35, near_floor
    assert abs(drift["relative"]) < 0.03, drift


def test_unknown_action_is_refused_in_the_agents_words(spaces):
    with pytest.raises(ParameterError, match="action.*'keep'.*preserve, relative"):
        AMCEnv(spaces["resnet20"], {"flops": "50%"}, reward_fn=lambda policy: 0.0, action="keep")
