"""AMC: AutoML for Model Compression (He, Lin, Liu, Wang, Li, Han; ECCV 2018).

A DDPG agent walks the prunable groups one by one (:class:`autoprune.envs.AMCEnv`): it sees a group's
embedding and answers with a keep ratio, which the environment clips so that the budgets can still
be met; at the episode's end the policy is scored (adaptive BN, no fine-tune by default) and the
reward ``-Error * log(FLOPs)`` is given to every step of the episode. One episode is one Optuna trial.

The recipe of the paper and of the reference code (mit-han-lab/amc), every piece an option:

* actor and critic: MLPs with two hidden layers of 300 units (``--amc-hidden``), learning rates
  1e-4 / 1e-3 (``--amc-actor-lr``, ``--amc-critic-lr``), soft target updates tau = 0.01, discount 1,
  batch 64. The networks, the replay buffer and the update are Stable-Baselines3's ``DDPG``.
* warm-up: the first episodes take uniform random actions and only fill the replay buffer (100 in
  the paper; ``min(100, trials // 4)`` here unless ``--amc-warmup`` says otherwise).
* exploration: a normal truncated to [0, 1] around the actor's action, sigma 0.5 decaying by 0.95
  per episode after the warm-up (``--amc-sigma``, ``--amc-sigma-decay``).
* pruning a candidate: the reference code removes the channels of least weight magnitude and refits the
  layer reading them by least squares on features sampled from the unpruned network. Here the shared
  evaluator prunes with ``--criterion`` (``l1`` by default); ``--reconstruct`` adds the least-squares
  refit (He et al. 2017, :mod:`autoprune.pruning.regression`) to every candidate, so AMC with and without
  it are the same agent on the same budgets and can be compared study to study.
* credit assignment: the reward arrives only at the episode's end, so every step of the episode is
  stored with that reward; a moving average of the sampled rewards is subtracted as a baseline (the
  reference code's variance reduction, ``--amc-baseline-alpha``). One gradient step per layer after
  every episode past the warm-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import truncnorm
from stable_baselines3 import DDPG
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from stable_baselines3.common.utils import update_learning_rate

from autoprune.agents.base import Agent, Option, SearchContext, SearchResult, register
from autoprune.envs import ACTIONS, REWARDS, AMCEnv


class BaselineReplayBuffer(ReplayBuffer):
    """A replay buffer that subtracts a moving average of the sampled rewards from every batch.

    AMC gives each step of an episode the episode's reward; rewards such as ``-Error * log(FLOPs)``
    sit far from zero, so the reference code centres each sampled batch on an exponential moving
    average of the batch means (rate ``alpha``) before the critic sees it.
    """

    def __init__(self, *args: Any, alpha: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.alpha = alpha
        self.baseline: float | None = None

    def sample(self, batch_size: int, env=None) -> ReplayBufferSamples:
        batch = super().sample(batch_size, env=env)
        mean = float(batch.rewards.mean())
        self.baseline = mean if self.baseline is None else self.baseline + self.alpha * (mean - self.baseline)
        return batch._replace(rewards=batch.rewards - self.baseline)


class AMCDDPG(DDPG):
    """Stable-Baselines3's DDPG with separate actor and critic learning rates (AMC: 1e-4 and 1e-3)."""

    def __init__(self, *args: Any, actor_lr: float, critic_lr: float, **kwargs: Any) -> None:
        self.actor_lr = actor_lr
        self.critic_lr = critic_lr
        super().__init__(*args, learning_rate=critic_lr, **kwargs)

    def _update_learning_rate(self, optimizers) -> None:
        update_learning_rate(self.actor.optimizer, self.actor_lr)
        update_learning_rate(self.critic.optimizer, self.critic_lr)


@dataclass
class Episode:
    """One episode of the search: how its actions were chosen and what it earned."""

    number: int
    phase: str  # "warmup" (random actions) or "explore" (actor + truncated-normal noise)
    sigma: float | None
    reward: float
    ratios: dict[str, float]
    score: float | None  # the task objective of the episode's policy


@register
class AMCAgent(Agent):
    """AMC's DDPG agent (He et al., ECCV 2018); see the module docstring for the recipe.

    :meth:`search` runs it on a search context; :meth:`learn` and :meth:`rollout` run it on any
    :class:`~autoprune.envs.AMCEnv` (a synthetic reward, another evaluator).
    """

    name = "amc"
    description = "AMC (He et al. 2018): DDPG walks the layers, actions clipped to the budget"
    default_trials = 100
    options = {
        "warmup": Option(int, None, "episodes of random actions before the actor acts "
                         "(default min(100, trials // 4); the paper uses 100)", low=0),
        "sigma": Option(float, 0.5, "initial std of the truncated-normal exploration noise", low=0.0),
        "sigma_decay": Option(float, 0.95, "exploration std multiplier per episode after the warm-up", low=0.0,
                              high=1.0, low_open=True),
        "reward": Option(str, "error_log_flops", "episode reward: -Error*log(FLOPs) or -Error", choices=REWARDS),
        "action": Option(str, "preserve", "an action is the group's keep ratio (preserve, the paper) or is read "
                         "against the uniform ratio u the budget needs from that group on (relative: 0.5 asks "
                         "for u, 0 and 1 for as much more and less, symmetrically)", choices=ACTIONS),
        "keep_floor": Option(float, 0.2, "smallest fraction of a group's channels kept", low=0.0, high=1.0,
                             high_open=True),
        "actor_lr": Option(float, 1e-4, "actor learning rate", low=0.0, low_open=True),
        "critic_lr": Option(float, 1e-3, "critic learning rate", low=0.0, low_open=True),
        "tau": Option(float, 0.01, "soft target-network update rate", low=0.0, high=1.0, low_open=True),
        "discount": Option(float, 1.0, "discount factor gamma", low=0.0, high=1.0),
        "batch_size": Option(int, 64, "replay batch size", low=1),
        "hidden": Option(int, 300, "units in each of the two hidden layers of actor and critic", low=1),
        "baseline_alpha": Option(float, 0.5, "update rate of the moving-average reward baseline", low=0.0, high=1.0),
        "updates": Option(int, None, "gradient steps after each episode (default: one per layer)", low=1),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.model: AMCDDPG | None = None

    # -- the search ---------------------------------------------------------------------------
    def search(self, ctx: SearchContext) -> SearchResult:
        env = AMCEnv.from_context(ctx, keep_floor=self.keep_floor, reward=self.reward, action=self.action)
        if env.relaxed_floor:
            ctx.reporter.message(f"keep floor {self.keep_floor:g} cannot meet the budget; "
                                 f"lowered to {env.keep_floor:.2f}")
        limits = ctx.limits
        episodes = limits.n_trials if limits.n_trials is not None else (
            10**9 if limits.timeout is not None else self.default_trials)
        history = self.learn(env, episodes, seed=ctx.seed, stop=ctx.should_stop, reporter=ctx.reporter.message)
        best = ctx.best()
        best.info.update(
            episodes=len(history),
            warmup=self.warmup_episodes(episodes),
            keep_floor=env.keep_floor,
            best_reward=max((e.reward for e in history), default=None),
        )
        return best

    def warmup_episodes(self, episodes: int) -> int:
        return self.warmup if self.warmup is not None else min(100, episodes // 4)

    # -- DDPG on an AMC environment -----------------------------------------------------------
    def build_model(self, env: AMCEnv, episodes: int, seed: int = 0) -> AMCDDPG:
        """Stable-Baselines3 DDPG with AMC's networks and hyperparameters for ``env``."""
        model = AMCDDPG(
            "MlpPolicy",
            env,
            actor_lr=self.actor_lr,
            critic_lr=self.critic_lr,
            buffer_size=min(1_000_000, max(self.batch_size, episodes * env.n_steps)),
            learning_starts=0,
            batch_size=self.batch_size,
            tau=self.tau,
            gamma=self.discount,
            replay_buffer_class=BaselineReplayBuffer,
            replay_buffer_kwargs={"alpha": self.baseline_alpha},
            policy_kwargs={"net_arch": {"pi": [self.hidden] * 2, "qf": [self.hidden] * 2}},
            seed=seed,
            device="cpu",  # two 300-unit layers: the CPU beats a GPU round trip
        )
        model.set_logger(Logger(folder=None, output_formats=[]))
        return model

    def learn(
        self,
        env: AMCEnv,
        episodes: int,
        *,
        seed: int = 0,
        stop: Callable[[], bool] | None = None,
        reporter: Callable[[str], None] | None = None,
    ) -> list[Episode]:
        """Run ``episodes`` episodes of AMC's DDPG on ``env`` (fewer if ``stop()`` says so).

        Returns one :class:`Episode` per episode; the trained model stays in ``self.model``.
        """
        warmup = self.warmup_episodes(episodes)
        self.model = model = self.build_model(env, episodes, seed)
        buffer = model.replay_buffer
        rng = np.random.default_rng(seed)
        history: list[Episode] = []
        for number in range(episodes):
            if stop is not None and stop():
                break
            if number == warmup and warmup > 0 and reporter is not None:
                reporter(f"AMC: {warmup} warm-up episodes done, the actor takes over")
            phase = "warmup" if number < warmup else "explore"
            sigma = None if phase == "warmup" else self.sigma * self.sigma_decay ** (number - warmup)
            attrs = {"amc_episode": number, "amc_phase": phase}
            if sigma is not None:
                attrs["amc_sigma"] = sigma
            obs, _ = env.reset(seed=seed + number, options={"trial_attrs": attrs})
            steps = []
            done = False
            while not done:
                keep = rng.uniform(0.0, 1.0) if sigma is None else self._explore(obs, sigma, rng)
                next_obs, reward, terminated, truncated, info = env.step(np.array([keep], dtype=np.float32))
                done = terminated or truncated
                steps.append((obs, next_obs, keep, done))
                obs = next_obs
            # every step of the episode earns the episode's reward (the baseline comes off at sampling)
            for o, o2, keep, d in steps:
                buffer.add(o[None], o2[None], model.policy.scale_action(np.array([[keep]], dtype=np.float32)),
                           np.array([reward], dtype=np.float32), np.array([d]), [{}])
            if number >= warmup - 1:  # the last warm-up episode trains the actor before it first acts
                model.train(gradient_steps=self.updates or len(steps), batch_size=self.batch_size)
            result = info.get("evaluation")
            history.append(Episode(number, phase, sigma, float(reward), info["ratios"],
                                   result.score if result is not None else None))
        return history

    def _explore(self, obs: np.ndarray, sigma: float, rng: np.random.Generator) -> float:
        """A keep ratio drawn from N(actor(obs), sigma) truncated to [0, 1] (AMC's exploration)."""
        mu = self.act(obs)
        if sigma <= 0:
            return mu
        lo, hi = (0.0 - mu) / sigma, (1.0 - mu) / sigma
        return float(truncnorm.rvs(lo, hi, loc=mu, scale=sigma, random_state=rng))

    def act(self, obs: np.ndarray) -> float:
        """The actor's keep ratio for one observation (no exploration)."""
        if self.model is None:
            raise RuntimeError("the agent has not been trained: call learn() or search() first")
        with torch.no_grad():
            action, _ = self.model.predict(obs, deterministic=True)
        return float(np.clip(np.asarray(action).reshape(-1)[0], 0.0, 1.0))

    def rollout(self, env: AMCEnv) -> tuple[float, dict[str, Any]]:
        """One episode with the trained actor's actions, no exploration: (reward, final info)."""
        obs, _ = env.reset()
        done = False
        while not done:
            obs, reward, terminated, truncated, info = env.step(np.array([self.act(obs)], dtype=np.float32))
            done = terminated or truncated
        return float(reward), info
