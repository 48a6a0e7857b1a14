"""Gymnasium environments of autoprune.

``autoprune/AMC-v0`` is AMC's layer-by-layer pruning environment (:class:`AMCEnv`)::

    import gymnasium as gym
    import autoprune.envs  # registers the environment
    env = gym.make("autoprune/AMC-v0", evaluator=evaluator, budgets={"flops": "50%"})

(or ``gym.make("autoprune.envs:autoprune/AMC-v0", ...)``, which imports this module itself).
"""

import gymnasium as gym

from autoprune.envs.amc import ACTIONS, FEATURES, REWARDS, AMCEnv, amc_reward

AMC_ENV_ID = "autoprune/AMC-v0"

if AMC_ENV_ID not in gym.registry:
    gym.register(id=AMC_ENV_ID, entry_point="autoprune.envs.amc:AMCEnv")

__all__ = ["ACTIONS", "AMC_ENV_ID", "FEATURES", "REWARDS", "AMCEnv", "amc_reward"]
