"""Environment steps per second of the meta-RL sampler (2D navigation, half-cheetah); < 1 minute.

Half-cheetah is also stepped two other ways with the same batched policy, for comparison: a
gymnasium ``SyncVectorEnv`` of the registered environment, and raw ``mujoco.mj_step`` on many
``MjData`` of one model (no reward or task logic: an upper bound for the simulation alone).

    python benchmarks/rl_sampler.py [--workers 2]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import gymnasium
import mujoco
import numpy as np
import torch

from fastmaml.rl import GaussianMLPPolicy, HalfCheetahVelEnv, Sampler, env_class


def best_rate(run: Callable[[], object], steps: int, repeats: int) -> float:
    """Steps per second of the fastest of ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return steps / min(times)


def sampler_rate(env_id: str, tasks: int, traj: int, horizon: int, workers: int,
                 repeats: int) -> float:
    with Sampler(env_id, horizon=horizon, num_workers=workers) as sampler:
        policy = GaussianMLPPolicy(sampler.obs_dim, sampler.act_dim)
        task_list = env_class(env_id).sample_tasks(tasks, np.random.default_rng(0))
        sampler.sample(policy, task_list, 1, seed=0)  # warm-up: environments, worker imports
        return best_rate(lambda: sampler.sample(policy, task_list, traj, seed=1),
                         tasks * traj * horizon, repeats)


def sync_vector_env_rate(num_envs: int, horizon: int, repeats: int) -> float:
    env = gymnasium.vector.SyncVectorEnv(
        [lambda: gymnasium.make("fastmaml/HalfCheetahVel-v0") for _ in range(num_envs)])
    policy = GaussianMLPPolicy(17, 6)

    def run() -> None:
        obs, _ = env.reset(seed=0)
        with torch.no_grad():
            for _ in range(horizon):
                mean, log_std = policy(torch.as_tensor(obs, dtype=torch.float32))
                obs, *_ = env.step((mean + log_std.exp() * torch.randn_like(mean)).numpy())
    rate = best_rate(run, num_envs * horizon, repeats)
    env.close()
    return rate


def raw_mujoco_rate(num_envs: int, horizon: int, repeats: int) -> float:
    model = HalfCheetahVelEnv().model
    datas = [mujoco.MjData(model) for _ in range(num_envs)]
    policy = GaussianMLPPolicy(17, 6)
    obs = np.zeros((num_envs, 17))

    def run() -> None:
        with torch.no_grad():
            for _ in range(horizon):
                mean, log_std = policy(torch.as_tensor(obs, dtype=torch.float32))
                actions = (mean + log_std.exp() * torch.randn_like(mean)).clamp(-1, 1).numpy()
                for data, action, row in zip(datas, actions, obs):
                    data.ctrl[:] = action
                    mujoco.mj_step(model, data, nstep=5)
                    row[:8], row[8:] = data.qpos[1:], data.qvel
    return best_rate(run, num_envs * horizon, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes to compare")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [
        ("nav2d, 20 tasks x 20 traj x 100 steps, in-process",
         sampler_rate("fastmaml/Nav2D-v0", 20, 20, 100, 0, 3)),
        ("half-cheetah, 10 tasks x 10 traj x 100 steps, in-process",
         sampler_rate("fastmaml/HalfCheetahVel-v0", 10, 10, 100, 0, 2)),
        (f"half-cheetah, same, {args.workers} worker processes",
         sampler_rate("fastmaml/HalfCheetahVel-v0", 10, 10, 100, args.workers, 2)),
        ("half-cheetah, gymnasium SyncVectorEnv(100), 100 steps",
         sync_vector_env_rate(100, 100, 2)),
        ("half-cheetah, raw mj_step on 100 MjData (no reward), 100 steps",
         raw_mujoco_rate(100, 100, 2)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, rate in rows:
        print(f"{name:<{width}}  {rate:>10,.0f} steps/s")


if __name__ == "__main__":
    main()
