"""Sampler: shapes, masks, per-task parameters; seeded batched = sequential = worker rollouts."""
from __future__ import annotations

import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmaml.errors import ConfigError
from fastmaml.rl import (Episodes, GaussianMLPPolicy, Nav2DBatch, Sampler, env_class,
                         gaussian_log_prob, lockstep_episodes, rollout)


def _tasks(env_id: str, n: int) -> list[dict]:
    return env_class(env_id).sample_tasks(n, np.random.default_rng(0))


def _policy(obs_dim: int, act_dim: int) -> GaussianMLPPolicy:
    torch.manual_seed(0)
    return GaussianMLPPolicy(obs_dim, act_dim, hidden=(16, 16))


def _assert_equal(a: Episodes, b: Episodes) -> None:
    for name, x, y in zip(Episodes._fields, a, b):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("env_id", ["fastmaml/Nav2D-v0", "fastmaml/HalfCheetahVel-v0",
                                    "fastmaml/AntDir-v0"])
def test_batched_rollouts_equal_sequential_ones(env_id: str) -> None:
    sampler = Sampler(env_id, horizon=30)
    policy = _policy(sampler.obs_dim, sampler.act_dim)
    tasks = _tasks(env_id, 3)
    batched = sampler.sample(policy, tasks, 2, seed=5)
    sequential = sampler.sample(policy, tasks, 2, seed=5, tasks_per_rollout=1)
    _assert_equal(batched, sequential)
    assert batched.observations.shape == (3, 2, 30, sampler.obs_dim)
    assert batched.actions.shape == (3, 2, 30, sampler.act_dim)
    assert batched.rewards.shape == batched.masks.shape == (3, 2, 30)
    one = sampler.sample(policy, tasks[1:2], 2, seed=5, tasks_per_rollout=1)
    assert not torch.equal(one.actions[0], batched.actions[1])  # seeds follow task positions
    again = rollout(policy, sampler.env, tasks[1:2], 2, 30, seed=5, task_ids=[1])
    _assert_equal(again, Episodes(*(t[1:2] for t in batched)))
    other = sampler.sample(policy, tasks, 2, seed=6)
    assert not torch.equal(other.actions, batched.actions)


def test_nav2d_episodes_record_the_simulator() -> None:
    env_id = "fastmaml/Nav2D-v0"
    sampler = Sampler(env_id, horizon=40)
    policy = _policy(2, 2)
    tasks = [{"goal": np.array([0.05, -0.04])}, {"goal": np.array([0.45, 0.3])}]
    with torch.no_grad():  # a confident policy heading for the first goal
        policy.mean[-1].bias.copy_(torch.tensor([0.025, -0.02]))
        policy.mean[-1].weight.zero_()
        policy.log_std.fill_(-8.0)
    episodes = sampler.sample(policy, tasks, 3, seed=0)
    sim = Nav2DBatch()
    sim.reset([tasks[1]])
    for t in range(40):
        obs, reward, _ = sim.step(episodes.actions[1, 0, t : t + 1].double())
        if t + 1 < 40:
            assert torch.allclose(episodes.observations[1, 0, t + 1], obs[0].float())
        assert episodes.rewards[1, 0, t].item() == pytest.approx(reward.item(), abs=1e-6)
    # the first task ends at its second step: every field is 0 afterwards
    assert episodes.masks[0].sum(-1).tolist() == [2.0, 2.0, 2.0]
    for after_end in (episodes.observations, episodes.actions, episodes.rewards):
        assert not after_end[0, :, 2:].any()
    assert episodes.rewards[0, 0, 1].item() == pytest.approx(
        -float(np.linalg.norm(2 * np.array([0.025, -0.02]) - tasks[0]["goal"])), abs=1e-4)
    assert torch.all(episodes.masks[1] == 1)
    assert episodes.mean_returns().shape == (2,)
    assert episodes.mean_returns()[1] == pytest.approx(episodes.rewards[1].sum(-1).mean().item())


def test_actions_follow_the_policy_and_per_task_parameters() -> None:
    sampler = Sampler("fastmaml/Nav2D-v0", horizon=50)
    policy = _policy(2, 2)
    tasks = _tasks("fastmaml/Nav2D-v0", 2)
    params = {"log_std": torch.tensor([[-1.0, -1.0], [0.5, 0.5]]),
              "mean.4.bias": torch.tensor([[3.0, 3.0], [0.0, 0.0]])}
    episodes = sampler.sample(policy, tasks, 40, seed=0, params=params)
    # noise scale per task follows the task's log-std
    for task, std in enumerate([np.exp(-1.0), np.exp(0.5)]):
        mean, _ = torch.func.functional_call(
            policy, {n: p[task] for n, p in params.items()}, (episodes.observations[task],))
        noise = episodes.actions[task] - mean
        assert noise.std().item() == pytest.approx(std, rel=0.05)
        log_prob = gaussian_log_prob(mean, torch.full_like(mean, np.log(std)),
                                     episodes.actions[task])
        assert torch.isfinite(log_prob).all()
    assert episodes.actions[0].mean().item() > 2.0  # the first task's bias


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc")
def test_workers_ignore_ctrl_c_and_sigterm_from_their_start() -> None:
    """Before a worker has imported torch (seconds) too: a Ctrl-C to the process group then
    printed its KeyboardInterrupt and failed the run, instead of the parent stopping cleanly."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with Sampler("fastmaml/Nav2D-v0", horizon=5, num_workers=1) as workers:
        process = workers._workers[0][0]
        ignored = next(int(line.split()[1], 16) for line in
                       Path(f"/proc/{process.pid}/status").read_text().splitlines()
                       if line.startswith("SigIgn:"))
    assert all(ignored >> (signum - 1) & 1 for signum in (signal.SIGINT, signal.SIGTERM))
    assert {signum: signal.getsignal(signum) for signum in before} == before  # the parent's back


def test_workers_give_identical_episodes() -> None:
    env_id = "fastmaml/HalfCheetahDir-v0"
    tasks = _tasks(env_id, 3)
    with Sampler(env_id, horizon=20, num_workers=2) as workers:
        policy = _policy(workers.obs_dim, workers.act_dim)
        parallel = workers.sample(policy, tasks, 2, seed=3)
        params = {"log_std": torch.full((3, 6), -2.0)}
        parallel_adapted = workers.sample(policy, tasks, 2, seed=3, params=params)
        with pytest.raises(RuntimeError):  # a worker's error reaches the caller
            workers.sample(policy, tasks, 2, seed=3, params={"log_std": torch.zeros(3, 5)})
        _assert_equal(parallel, workers.sample(policy, tasks, 2, seed=3))  # and none is left over
    local = Sampler(env_id, horizon=20)
    _assert_equal(parallel, local.sample(policy, tasks, 2, seed=3))
    _assert_equal(parallel_adapted, local.sample(policy, tasks, 2, seed=3, params=params))


def test_the_oracles_episodes_hold_the_task_in_workers_too() -> None:
    env_id = "fastmaml/HalfCheetahVel-v0"
    tasks = _tasks(env_id, 3)
    with Sampler(env_id, horizon=6, num_workers=2) as workers:
        assert workers.task_dim == 1
        oracle = _policy(workers.obs_dim + 1, workers.act_dim)
        told = workers.sample(oracle, tasks, 2, seed=3, task_inputs=True)
        with pytest.raises(ConfigError, match="observations of 17 numbers and its task's 1"):
            workers.sample(_policy(workers.obs_dim, workers.act_dim), tasks, 2, seed=3,
                           task_inputs=True)
    local = Sampler(env_id, horizon=6)
    _assert_equal(told, local.sample(oracle, tasks, 2, seed=3, task_inputs=True))
    velocities = torch.tensor([task["velocity"] for task in tasks], dtype=told.observations.dtype)
    assert torch.equal(told.observations[..., -1], velocities[:, None, None].expand(3, 2, 6))
    plain = local.sample(_policy(local.obs_dim, local.act_dim), tasks, 2, seed=3)
    torch.testing.assert_close(told.observations[0, 0, 0, :-1], plain.observations[0, 0, 0])


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        Sampler("fastmaml/Nav2D-v0", horizon=0)
    sampler = Sampler("fastmaml/Nav2D-v0")
    with pytest.raises(ConfigError):
        sampler.sample(_policy(2, 2), [], 2, seed=0)
    with pytest.raises(ConfigError, match="at least one task"):
        sampler.sample_steps(_policy(2, 2), [], 2, steps=10, seed=0)
    assert sampler.horizon == 100
    goals = _tasks("fastmaml/Nav2D-v0", 2)
    with pytest.raises(ConfigError, match="needs the key.s. goal; got {'velocity': 1.0}"):
        sampler.sample(_policy(2, 2), [goals[0], {"velocity": 1.0}], 2, seed=0)
    with pytest.raises(ConfigError, match="takes only the key.s. goal; got also velocity"):
        sampler.sample(_policy(2, 2), [goals[0], {**goals[0], "velocity": 1.0}], 2, seed=0)
    with pytest.raises(ConfigError, match="does not take fastmaml/Nav2D-v0's observations of 2"):
        sampler.sample(_policy(17, 2), goals, 2, seed=0)
    with pytest.raises(ConfigError, match="gives 6 action numbers; fastmaml/Nav2D-v0 takes 2"):
        sampler.sample(_policy(2, 6), goals, 2, seed=0)
    with pytest.raises(ConfigError, match=r"the policy must return \(mean, log_std\) .* got "
                                          "Tensor"):
        sampler.sample(torch.nn.Linear(2, 2), goals, 2, seed=0)
    for goal in (0.3, np.array([0.1, 0.2, 0.3])):
        with pytest.raises(ConfigError, match=r"a fastmaml/Nav2D-v0 task's goal must be of shape "
                                              r"\(2,\), got"):
            sampler.sample(_policy(2, 2), [{"goal": goal}], 2, seed=0)
    with pytest.raises(ConfigError, match="a fastmaml/Nav2D-v0 task's goal must be finite "
                                          "numbers"):  # (else NaN rewards, said much later)
        sampler.sample(_policy(2, 2), [{"goal": np.array([np.nan, 0.0])}], 2, seed=0)


def test_lockstep_episodes_stops_when_finished_episodes_hold_the_steps() -> None:
    # two environments take episodes of 3, 5, 3, 5, ... steps as they come free: env 0 runs
    # 3 (ends at 3), 3 (6), 3 (9), 5 (14); env 1 runs 5 (5), 5 (10). 8 steps are finished at
    # time 5: the first two episodes.
    lengths = [3, 5, 3, 5, 3, 5]
    assert lockstep_episodes(lengths, 2, steps=8) == [True, True] + [False] * 4
    # after two episodes env 0's next one (not sampled yet) might still end by time 5
    assert lockstep_episodes(lengths[:2], 2, steps=8) is None
    assert lockstep_episodes(lengths, 2, steps=100) is None  # too few steps so far
    # episodes ending at the stop time together are all kept
    assert lockstep_episodes([5, 5], 2, steps=3) == [True, True]
    # a free environment takes the next episode: env 0 runs three 1-step episodes while env 1
    # is still in its 10-step one, which is dropped
    assert lockstep_episodes([1, 10, 1, 1], 2, steps=3) == [True, False, True, True]


def test_sampling_some_tasks_again_by_their_positions() -> None:
    sampler = Sampler("fastmaml/Nav2D-v0", horizon=10)
    policy, tasks = _policy(2, 2), _tasks("fastmaml/Nav2D-v0", 3)
    full = sampler.sample(policy, tasks, 2, seed=3, first_traj=4)
    # first_traj numbers the episodes on: a later batch (sample_steps') is not the first again
    _assert_equal(full, Episodes(*(t[:, 4:] for t in sampler.sample(policy, tasks, 6, seed=3))))
    again = sampler.sample(policy, [tasks[2], tasks[0]], 2, seed=3, first_traj=4, task_ids=[2, 0])
    _assert_equal(again, Episodes(*(t[[2, 0]] for t in full)))


def _goal_seeker() -> GaussianMLPPolicy:
    """Moves by (0.05, 0.05) every step, with negligible noise."""
    policy = GaussianMLPPolicy(2, 2, hidden=(4,))
    with torch.no_grad():
        for p in policy.parameters():
            p.zero_()
        policy.mean[-1].bias.fill_(0.05)
        policy.log_std.fill_(-20.0)
    return policy


def test_sample_steps_keeps_more_of_the_short_episodes() -> None:
    sampler = Sampler("fastmaml/Nav2D-v0", horizon=20)
    tasks = [{"goal": np.array([0.05, 0.05])}, {"goal": np.array([0.5, 0.5])}]
    episodes = sampler.sample_steps(_goal_seeker(), tasks, num_envs=2, steps=5, seed=0)
    # task 0 ends every episode after 1 step: two environments finish 2 steps per time step, so
    # 5 steps take until time 3 and 6 episodes; task 1's episodes last 10 steps: 2 episodes.
    assert episodes.masks.shape == (2, 6, 20)
    assert episodes.masks[0].sum(-1).tolist() == [1.0] * 6
    assert episodes.masks[1].sum(-1).tolist() == [10.0, 10.0, 0.0, 0.0, 0.0, 0.0]
    for empty in (episodes.observations[1, 2:], episodes.actions[1, 2:], episodes.rewards[1, 2:]):
        assert not empty.any()
    full = sampler.sample(_goal_seeker(), tasks, 2, seed=0)
    assert torch.allclose(episodes.mean_returns(), full.mean_returns())  # empty slots skipped
    assert episodes.mean_returns()[1] == pytest.approx(full.rewards[1, 0].sum().item())


def test_sample_steps_resamples_undecided_tasks_with_their_own_seeds() -> None:
    # Noisy goal seekers: an episode ends after 1 step when the noise lands within the goal's
    # tolerance, else it runs all 10 steps, so the tasks at positions 1 and 2 need more batches
    # than task 0 (standing still, far goal), which its first batch decides: they are sampled
    # again at other positions of the pending list.
    sampler = Sampler("fastmaml/Nav2D-v0", horizon=10)
    policy = _goal_seeker()
    with torch.no_grad():
        policy.log_std.fill_(math.log(0.01))
    params = {n: p.detach().expand(3, *p.shape).clone() for n, p in policy.named_parameters()}
    bias = next(n for n in params if n.endswith("bias") and params[n].shape[-1] == 2)
    params[bias][0] = 0.0
    tasks = [{"goal": np.array([0.5, 0.5])}, {"goal": np.array([0.05, 0.05])},
             {"goal": np.array([0.05, 0.05])}]
    got = sampler.sample_steps(policy, tasks, num_envs=2, steps=6, seed=11, params=params)
    # the reference samples every task in every batch, as many batches as the last task needs
    batches: list[Episodes] = []
    while True:
        batches.append(sampler.sample(policy, tasks, 2, seed=11, params=params,
                                      first_traj=2 * len(batches)))
        masks = torch.cat([batch.masks for batch in batches], dim=1)
        keep = [lockstep_episodes(m.sum(-1).long().tolist(), 2, 6) for m in masks]
        if None not in keep:
            break
    decided_after = [next(k for k in range(1, len(batches) + 1) if lockstep_episodes(
        masks[task, :2 * k].sum(-1).long().tolist(), 2, 6) is not None) for task in range(3)]
    assert decided_after == [1, 3, 2]  # batch 2 samples tasks 1 and 2, batch 3 task 1 alone
    for task, flags in enumerate(keep):
        count = sum(flags)
        for name, mine, theirs in zip(Episodes._fields, got, batches[0]):
            everything = torch.cat([getattr(batch, name)[task] for batch in batches])
            assert torch.equal(mine[task, :count], everything[torch.tensor(flags)]), name
            assert not mine[task, count:].any(), name  # empty padding slots


def test_sample_steps_without_early_ends_is_plain_sampling() -> None:
    sampler = Sampler("fastmaml/HalfCheetahVel-v0", horizon=5)
    policy = _policy(sampler.obs_dim, sampler.act_dim)
    tasks = _tasks("fastmaml/HalfCheetahVel-v0", 2)
    _assert_equal(sampler.sample_steps(policy, tasks, num_envs=3, steps=15, seed=4),
                  sampler.sample(policy, tasks, 3, seed=4))
