"""Meta-RL building blocks for paper section 5.3: tasks, Gaussian policy, sampler, advantages, TRPO.

Importing this package registers the ``fastmaml/...`` gymnasium environments.
"""
from .envs import (ENVS, AntDirEnv, AntVelEnv, HalfCheetahDirEnv, HalfCheetahVelEnv, Nav2DBatch,
                   Nav2DEnv, Task, default_horizon, env_class, make_batch_env)
from .policy import (GaussianMLPPolicy, adapt_policy, gaussian_entropy, gaussian_kl,
                     gaussian_log_prob, pack_targets, policy_forward, reinforce_data,
                     reinforce_loss)
from .returns import (baseline_features, compute_advantages, discounted_returns,
                      fit_linear_baseline, gae, standardize)
from .sampler import Episodes, Sampler, rollout

__all__ = ["ENVS", "AntDirEnv", "AntVelEnv", "HalfCheetahDirEnv", "HalfCheetahVelEnv",
           "Nav2DBatch", "Nav2DEnv", "Task", "default_horizon", "env_class", "make_batch_env",
           "GaussianMLPPolicy", "adapt_policy", "gaussian_entropy", "gaussian_kl",
           "gaussian_log_prob", "pack_targets", "policy_forward", "reinforce_data",
           "reinforce_loss", "baseline_features", "compute_advantages", "discounted_returns",
           "fit_linear_baseline", "gae", "standardize", "Episodes", "Sampler", "rollout"]
