"""Environment steps per second of the meta-RL sampler (2D navigation, half-cheetah, ant); about
a minute.

Half-cheetah is also stepped by a gymnasium ``SyncVectorEnv`` of the registered environment;
both MuJoCo models are stepped as raw ``mujoco.mj_step`` on many ``MjData`` (no reward or task
logic: an upper bound for the simulation alone), and the sampler's rate is printed as a share
of that physics rate, measured in the same process.

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

from fastmaml.rl import GaussianMLPPolicy, Sampler, env_class


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
    """Environment steps per second of ``Sampler.sample``, counting the steps actually taken
    (an episode that ends early, as a fallen ant's, is not stepped on)."""
    with Sampler(env_id, horizon=horizon, num_workers=workers) as sampler:
        policy = GaussianMLPPolicy(sampler.obs_dim, sampler.act_dim)
        task_list = env_class(env_id).sample_tasks(tasks, np.random.default_rng(0))
        sampler.sample(policy, task_list, 1, seed=0)  # warm-up: environments, worker imports
        steps = int(sampler.sample(policy, task_list, traj, seed=1).masks.sum())
        return best_rate(lambda: sampler.sample(policy, task_list, traj, seed=1), steps, repeats)


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


def raw_mujoco_rate(env_id: str, num_envs: int, horizon: int, repeats: int) -> float:
    """Steps/s of the physics alone: ``mj_step`` (frame skip included) on many ``MjData`` of
    the task's model, with the same batched policy; no observation, reward or task logic."""
    env = env_class(env_id)()
    model, frame_skip = env.model, env.frame_skip
    datas = [mujoco.MjData(model) for _ in range(num_envs)]
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    policy = GaussianMLPPolicy(obs_dim, act_dim)
    obs = np.zeros((num_envs, obs_dim))

    def run() -> None:
        for data in datas:
            mujoco.mj_resetData(model, data)
        with torch.no_grad():
            for _ in range(horizon):
                mean, log_std = policy(torch.as_tensor(obs, dtype=torch.float32))
                actions = (mean + log_std.exp() * torch.randn_like(mean)).clamp(-1, 1).numpy()
                for data, action, row in zip(datas, actions, obs):
                    data.ctrl[:] = action
                    mujoco.mj_step(model, data, nstep=frame_skip)
                    row[:] = np.concatenate((data.qpos, data.qvel))[-obs_dim:]  # obs-sized
    return best_rate(run, num_envs * horizon, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes to compare")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cheetah, ant = "fastmaml/HalfCheetahVel-v0", "fastmaml/AntVel-v0"
    rows = [
        ("nav2d, 20 tasks x 20 traj x 100 steps, in-process",
         sampler_rate("fastmaml/Nav2D-v0", 20, 20, 100, 0, 3)),
        (f"half-cheetah, same, {args.workers} worker processes",
         sampler_rate(cheetah, 10, 10, 100, args.workers, 2)),
        ("half-cheetah, gymnasium SyncVectorEnv(100), 100 steps",
         sync_vector_env_rate(100, 100, 2)),
    ]
    for name, env_id in (("half-cheetah", cheetah), ("ant", ant)):
        sampled = sampler_rate(env_id, 10, 10, 100, 0, 2)
        physics = raw_mujoco_rate(env_id, 100, 100, 2)
        rows += [(f"{name}, 10 tasks x 10 traj x 100 steps, in-process", sampled),
                 (f"{name}, raw mj_step on 100 MjData (no reward), 100 steps", physics),
                 (f"{name}: the sampler's share of the physics rate (%)", 100 * sampled / physics)]
    width = max(len(name) for name, _ in rows)
    for name, rate in rows:
        print(f"{name:<{width}}  {rate:>10,.0f} " + ("%" if name.endswith("(%)") else "steps/s"))


if __name__ == "__main__":
    main()
