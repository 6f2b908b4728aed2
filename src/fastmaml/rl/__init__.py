"""Meta-RL building blocks for paper section 5.3: tasks, Gaussian policy, sampler, advantages, TRPO.

Importing this package registers the ``fastmaml/...`` gymnasium environments.
"""
from .envs import (ENVS, AntDirEnv, AntVelEnv, HalfCheetahDirEnv, HalfCheetahVelEnv, Nav2DBatch,
                   Nav2DEnv, Task, default_horizon, env_class, make_batch_env)

__all__ = ["ENVS", "AntDirEnv", "AntVelEnv", "HalfCheetahDirEnv", "HalfCheetahVelEnv",
           "Nav2DBatch", "Nav2DEnv", "Task", "default_horizon", "env_class", "make_batch_env"]
