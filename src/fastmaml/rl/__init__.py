"""Meta-RL building blocks for paper section 5.3: tasks, Gaussian policy, sampler, advantages, TRPO.

One meta-iteration, for a trainer to drive::

    tasks = env_class(env_id).sample_tasks(meta_batch, rng)
    support = sampler.sample(maml.model, tasks, num_traj, 2 * iteration)  # pre-update policy
    with torch.no_grad():
        adapted = adapt_policy(maml, support)                             # REINFORCE inner step
    query = sampler.sample(maml.model, tasks, num_traj, 2 * iteration + 1, params=adapted)
    stats = trpo_meta_step(maml, support, query)                          # TRPO meta-update

with ``maml = MAML(GaussianMLPPolicy(obs_dim, act_dim), reinforce_loss, inner_lr=0.1)``. A
seed fixes the episodes' reset states and action noise: the support and query seeds of every
iteration are distinct, so no two batches share their noise.
Importing this package registers the ``fastmaml/...`` gymnasium environments.
"""
from .envs import (ENVS, TASK_API, AntDirEnv, AntVelEnv, GymBatch, HalfCheetahDirEnv,
                   HalfCheetahVelEnv, Nav2DBatch, Nav2DEnv, OfficialTest, Task, TaskInputs,
                   canonical_env_id, default_horizon, env_class, make_batch_env, official_test,
                   official_test_tasks, right_way_threshold, sample_tasks, task_values)
from .policy import (GaussianMLPPolicy, adapt_policy, gaussian_entropy, gaussian_kl,
                     gaussian_log_prob, pack_targets, policy_forward, reinforce_data,
                     reinforce_loss)
from .returns import (baseline_features, compute_advantages, discounted_returns,
                      fit_linear_baseline, gae, standardize)
from .sampler import Episodes, Sampler, lockstep_episodes, rollout
from .trpo import (TRPOObjective, TRPOStats, conjugate_gradient, gauss_newton_hvp,
                   hessian_vector_product, line_search, meta_objective, policy_objective,
                   trpo_meta_step, trpo_step)

__all__ = ["ENVS", "TASK_API", "AntDirEnv", "AntVelEnv", "GymBatch", "HalfCheetahDirEnv",
           "HalfCheetahVelEnv", "Nav2DBatch", "Nav2DEnv", "OfficialTest", "Task", "TaskInputs",
           "canonical_env_id", "default_horizon", "env_class", "make_batch_env", "official_test",
           "official_test_tasks", "right_way_threshold", "sample_tasks", "task_values",
           "GaussianMLPPolicy", "adapt_policy", "gaussian_entropy", "gaussian_kl",
           "gaussian_log_prob", "pack_targets", "policy_forward", "reinforce_data",
           "reinforce_loss", "baseline_features", "compute_advantages", "discounted_returns",
           "fit_linear_baseline", "gae", "standardize", "Episodes", "Sampler", "lockstep_episodes",
           "rollout", "TRPOObjective", "TRPOStats", "conjugate_gradient", "gauss_newton_hvp",
           "hessian_vector_product", "line_search", "meta_objective", "policy_objective",
           "trpo_meta_step", "trpo_step"]
