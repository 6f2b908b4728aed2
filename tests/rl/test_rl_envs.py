"""Meta-RL environments: rewards and termination against hand-computed values."""
from __future__ import annotations

import logging
import math
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium
import mujoco
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from fastmaml.errors import ConfigError
from fastmaml.rl import envs
from fastmaml.rl import (ENVS, Nav2DBatch, TaskInputs, default_horizon, env_class,
                         make_batch_env, official_test_tasks, right_way_threshold, task_values)


def test_nav2d_batch_hand_computed() -> None:
    sim = Nav2DBatch()
    obs = sim.reset([{"goal": np.array([0.3, -0.2])}, {"goal": np.array([0.1, 0.1])}])
    assert torch.equal(obs, torch.zeros(2, 2, dtype=torch.float64))
    obs, reward, done = sim.step(torch.tensor([[0.05, 0.05], [2.0, 0.1]]))
    # the second action is clipped to (0.1, 0.1): it lands on the goal and ends the episode
    assert torch.allclose(obs, torch.tensor([[0.05, 0.05], [0.1, 0.1]], dtype=torch.float64))
    assert reward[0].item() == pytest.approx(-math.hypot(0.25, 0.25), abs=1e-15)
    assert reward[1].item() == pytest.approx(0.0, abs=1e-15)
    assert done.tolist() == [False, True]
    obs, reward, done = sim.step(torch.tensor([[1.0, -1.0], [-0.1, 0.0]]))
    assert torch.allclose(obs, torch.tensor([[0.15, -0.05], [0.1, 0.1]], dtype=torch.float64))
    assert reward[0].item() == pytest.approx(-math.hypot(0.15, 0.15), abs=1e-15)
    assert reward[1].item() == 0.0  # an ended episode stays put and earns nothing
    assert done.tolist() == [False, True]


def test_gymnasium_make_with_the_module_prefix_registers_the_ids_in_a_fresh_interpreter() -> None:
    # `import fastmaml` does not import gymnasium; the "module:id" form imports fastmaml.rl first
    script = ("import gymnasium, sys; assert 'fastmaml.rl' not in sys.modules; "
              "env = gymnasium.make('fastmaml.rl:fastmaml/Nav2D-v0'); "
              "print(type(env.unwrapped).__name__, env.spec.max_episode_steps)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["Nav2DEnv", "100"]


def test_nav2d_termination_is_per_coordinate_and_action_scale() -> None:
    sim = Nav2DBatch(action_scale=0.1)
    sim.reset([{"goal": np.array([0.009, 0.009])}, {"goal": np.array([0.011, 0.0])}])
    _, _, done = sim.step(torch.zeros(2, 2))
    # |dx|, |dy| < 0.01 ends the episode (distance 0.0127 here); 0.011 in one coordinate does not
    assert done.tolist() == [True, False]
    obs, _, _ = sim.step(torch.tensor([[0.0, 0.0], [0.5, 3.0]]))
    assert torch.allclose(obs[1], torch.tensor([0.05, 0.1], dtype=torch.float64))


def test_nav2d_gymnasium_env_matches_batch_and_time_limit() -> None:
    env = gymnasium.make("fastmaml/Nav2D-v0")
    goal = np.array([0.4, 0.45])
    env.unwrapped.set_task({"goal": goal})
    obs, _ = env.reset(seed=0)
    assert obs.tolist() == [0.0, 0.0]
    position, steps, truncated = np.zeros(2), 0, False
    while not truncated:
        action = np.array([-0.05, 0.03])
        obs, reward, terminated, truncated, _ = env.step(action)
        position = position + action
        steps += 1
        assert np.allclose(obs, position) and not terminated
        assert reward == pytest.approx(-np.linalg.norm(position - goal), abs=1e-12)
    assert steps == 100 == default_horizon("fastmaml/Nav2D-v0")


def test_task_sampling() -> None:
    goals = env_class("fastmaml/Nav2D-v0").sample_tasks(500, np.random.default_rng(0))
    goals = np.array([t["goal"] for t in goals])
    assert goals.shape == (500, 2) and goals.min() >= -0.5 and goals.max() <= 0.5
    velocities = [t["velocity"] for t in env_class("fastmaml/AntVel-v0").sample_tasks(
        500, np.random.default_rng(0))]
    assert min(velocities) >= 0.0 and 2.5 < max(velocities) <= 3.0
    velocities = [t["velocity"] for t in env_class("fastmaml/HalfCheetahVel-v0").sample_tasks(
        500, np.random.default_rng(0))]
    assert min(velocities) >= 0.0 and 1.9 < max(velocities) <= 2.0
    directions = [t["direction"] for t in env_class("fastmaml/HalfCheetahDir-v0").sample_tasks(
        500, np.random.default_rng(1))]
    assert set(directions) == {-1.0, 1.0} and 200 < directions.count(1.0) < 300
    same = env_class("fastmaml/AntDir-v0").sample_tasks(10, np.random.default_rng(3))
    assert same == env_class("fastmaml/AntDir-v0").sample_tasks(10, np.random.default_rng(3))
    with pytest.raises(ConfigError, match="unknown meta-RL environment"):
        env_class("fastmaml/Nope-v0")


@pytest.mark.parametrize("env_id", list(ENVS))
def test_every_sampled_task_is_a_training_task_and_others_are_said(env_id: str) -> None:
    cls = env_class(env_id)
    assert not any(map(cls.outside_training, cls.sample_tasks(200, np.random.default_rng(0))))
    key, value = next(iter(cls.sample_tasks(1, np.random.default_rng(0))[0].items()))
    unlike = cls.outside_training({key: np.full_like(value, 3.5) if key == "goal" else 3.5})
    assert unlike == {"goal": "goals in [-0.5, 0.5]^2", "direction": "directions -1 and +1",
                      "velocity": f"velocities in [0, {cls.max_velocity:g}]"
                      if key == "velocity" else None}[key]


def test_official_test_tasks_are_the_test_scripts_draws() -> None:
    """The official scripts seeded numpy's legacy generator (1; 2 for the ant direction) and drew
    all goals at once; rllab's direction environments ran backwards below the middle of the goal
    range. MT19937's first draws: 0.417022, 0.720324 (seed 1); 0.435995, 0.025926 (seed 2)."""
    cheetah = [t["direction"] for t in official_test_tasks("fastmaml/HalfCheetahDir-v0", 40)]
    assert cheetah[:2] == [-1.0, 1.0] and cheetah.count(1.0) == 18  # goals 0.83, 1.44 of [0, 2]
    ant = [t["direction"] for t in official_test_tasks("fastmaml/AntDir-v0", 40)]
    assert ant[:3] == [-1.0, -1.0, 1.0] and ant.count(1.0) == 15  # 1.31, 0.08, 1.65 of [0, 3]
    velocities = official_test_tasks("fastmaml/AntVel-v0", 2)
    assert [t["velocity"] for t in velocities] == pytest.approx([3 * 0.417022, 3 * 0.720324],
                                                               abs=1e-5)
    assert official_test_tasks("fastmaml/HalfCheetahVel-v0", 40) == env_class(
        "fastmaml/HalfCheetahVel-v0").sample_tasks(40, np.random.RandomState(1))


def _task_term(task: dict, x_velocity: float) -> float:
    if "velocity" in task:
        return -abs(x_velocity - task["velocity"])
    return task["direction"] * x_velocity


@pytest.mark.parametrize("env_id,task,obs_dim", [
    ("fastmaml/HalfCheetahVel-v0", {"velocity": 1.3}, 17),
    ("fastmaml/HalfCheetahDir-v0", {"direction": -1.0}, 17),
    ("fastmaml/AntVel-v0", {"velocity": 2.1}, 27),
    ("fastmaml/AntDir-v0", {"direction": 1.0}, 27),
])
def test_locomotion_reward_formula(env_id: str, task: dict, obs_dim: int) -> None:
    env = gymnasium.make(env_id)
    base = env.unwrapped
    base.set_task(task)
    obs, _ = env.reset(seed=1)
    ant = "Ant" in env_id
    dt = 0.02 if ant else 0.05  # the ant at rllab's time step, the cheetah at v5's
    assert obs.shape == (obs_dim,) and base.dt == pytest.approx(dt)
    rng = np.random.default_rng(0)
    for _ in range(15):
        action = rng.normal(0.0, 1.5, env.action_space.shape)  # partly outside +-1: clipped
        x_before = base.data.body(1).xpos[0] if ant else base.data.qpos[0]
        obs, reward, terminated, _, info = env.step(action)
        x_after = base.data.body(1).xpos[0] if ant else base.data.qpos[0]
        assert info["x_velocity"] == pytest.approx((x_after - x_before) / dt, rel=1e-9)
        clipped = np.clip(action, -1.0, 1.0)
        if ant:
            contact = np.square(np.clip(base.data.cfrc_ext, -1.0, 1.0)).sum()
            survive = (1.05 if "velocity" in task else 0.05) * (not terminated)
            expected = (_task_term(task, info["x_velocity"]) + survive
                        - 0.005 * np.square(clipped).sum() - 5e-4 * contact)
        else:
            expected = _task_term(task, info["x_velocity"]) - 0.05 * np.square(clipped).sum()
        assert reward == pytest.approx(expected, rel=1e-9, abs=1e-12)
        if terminated:
            break


@pytest.mark.parametrize("env_id, bonus", [("fastmaml/HalfCheetahDir-v0", 0.0),
                                           ("fastmaml/AntDir-v0", 0.05)])
def test_right_way_threshold_bounds_every_term_but_the_direction_reward(env_id: str,
                                                                        bonus: float) -> None:
    """Each step adds at most ``bonus`` besides direction * v_x, so a return above
    ``bonus x horizon`` means the episode moved in its goal direction."""
    assert right_way_threshold(env_id, 200) == pytest.approx(bonus * 200)
    env = gymnasium.make(env_id)
    rng = np.random.default_rng(0)
    for direction in (-1.0, 1.0):
        env.unwrapped.set_task({"direction": direction})
        env.reset(seed=2)
        others = []
        for _ in range(60):
            _, reward, terminated, _, info = env.step(rng.normal(0.0, 1.0, env.action_space.shape))
            others.append(reward - direction * info["x_velocity"])
            if terminated:
                break
        assert max(others) <= bonus + 1e-12 and min(others) < bonus  # the costs are there
    assert all(right_way_threshold(e, 200) is None for e in ENVS if "Dir" not in e)


def test_ant_terminates_when_unhealthy_and_horizons() -> None:
    env = gymnasium.make("fastmaml/AntVel-v0")
    env.reset(seed=0)
    base = env.unwrapped
    qpos, qvel = base.data.qpos.copy(), base.data.qvel.copy()
    qpos[2] = 1.5  # the torso above the healthy range [0.2, 1.0]
    base.set_state(qpos, qvel)
    _, _, terminated, _, info = env.step(np.zeros(8))
    assert terminated and info["reward_survive"] == 0.0
    assert {default_horizon(env_id) for env_id in ENVS if "Nav" not in env_id} == {200}


@pytest.mark.parametrize("env_id", [e for e in ENVS if "Nav" not in e])
def test_mujoco_batch_equals_separate_environments(env_id: str) -> None:
    count, steps = (3, 40) if "Cheetah" in env_id else (8, 200)  # ants: some episodes end
    tasks = env_class(env_id).sample_tasks(count, np.random.default_rng(0))
    seeds = list(range(10, 10 + count))
    batch = make_batch_env(env_id)
    envs = [gymnasium.make(env_id) for _ in tasks]
    obs = batch.reset(tasks, seeds)
    for env, task, seed, row in zip(envs, tasks, seeds, obs):
        env.unwrapped.set_task(task)
        assert np.array_equal(env.reset(seed=seed)[0], row.numpy())
    rng = np.random.default_rng(1)
    ended = [False] * count
    for _ in range(steps):
        actions = rng.normal(0.0, 1.0, (count, batch.act_dim))
        obs, rewards, done = batch.step(torch.from_numpy(actions))
        for i, env in enumerate(envs):
            if ended[i]:
                assert rewards[i] == 0.0 and done[i]
                continue
            o, r, terminated, _, _ = env.step(actions[i])
            assert np.array_equal(o, obs[i].numpy()) and r == rewards[i].item()
            assert terminated == done[i].item()
            ended[i] = terminated
    assert any(ended) == ("Ant" in env_id)


def test_mujoco_batch_skips_ended_episodes() -> None:
    batch = make_batch_env("fastmaml/AntDir-v0")
    batch.reset([{"direction": 1.0}] * 2, [0, 1])
    batch.datas[0].qpos[2] = 1.5  # the first ant's torso above the healthy range
    obs, _, done = batch.step(torch.zeros(2, 8))
    assert done.tolist() == [True, False]
    time_before = batch.datas[0].time
    obs2, reward2, _ = batch.step(torch.zeros(2, 8))
    assert batch.datas[0].time == time_before and reward2[0] == 0.0
    assert torch.equal(obs2[0], obs[0]) and batch.datas[1].time > time_before


@pytest.mark.parametrize("option", [{"include_cfrc_ext_in_observation": True},
                                    {"terminate_when_unhealthy": False}])
def test_the_batched_ant_refuses_options_its_fast_step_does_not_model(option: dict) -> None:
    with pytest.raises(ConfigError, match="not supported"):
        make_batch_env("fastmaml/AntVel-v0", **option)


def test_mujoco_warnings_do_not_write_a_log_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(envs, "_seen_mujoco_warnings", set())  # said once per process
    caplog.set_level(logging.DEBUG, logger=envs.__name__)
    gymnasium.make("fastmaml/HalfCheetahVel-v0").close()  # its model triggers a MuJoCo warning
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
    # gymnasium's half-cheetah model sets a deprecated attribute: logged, below the warning level
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, message in said if "'settotalmass' is deprecated" in message] == [
        logging.DEBUG]
    assert mujoco.get_mju_user_warning() is envs._log_mujoco_warning
    envs._log_mujoco_warning("a warning of MuJoCo's own")  # any other: the warning level
    assert (logging.WARNING, "MuJoCo: a warning of MuJoCo's own") in [
        (r.levelno, r.getMessage()) for r in caplog.records]


@pytest.mark.parametrize("env_id", list(ENVS))
def test_gymnasium_env_checker(env_id: str) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Box observation space m")  # +-inf bounds
        check_env(gymnasium.make(env_id).unwrapped, skip_render_check=True)


def test_navigation_refuses_a_render_mode_and_a_bad_action_scale() -> None:
    with pytest.raises(ConfigError, match="fastmaml/Nav2D-v0 draws nothing: render_mode must be "
                                          "None, got 'rgb_array'"):
        gymnasium.make("fastmaml/Nav2D-v0", render_mode="rgb_array")
    for scale in (0, -1, float("inf")):
        with pytest.raises(ConfigError, match=f"action_scale must be > 0 and finite, got {scale}"):
            gymnasium.make("fastmaml/Nav2D-v0", action_scale=scale)


def test_the_ant_at_rllabs_time_step_survives_the_initial_policy() -> None:
    """At v5's dt 0.05 random full-strength actions launched the torso above the healthy height
    in most episodes (mean length 55 of 200); at rllab's dt 0.02 most episodes run their course."""
    env = gymnasium.make("fastmaml/AntVel-v0").unwrapped
    rng = np.random.default_rng(0)
    lengths = []
    for episode in range(10):
        env.reset(seed=episode)
        for step in range(200):
            if env.step(np.clip(rng.normal(0.0, 1.0, 8), -1.0, 1.0))[2]:
                break
        lengths.append(step + 1)
    assert np.mean(lengths) > 150


@pytest.mark.parametrize("env_id, task, told", [
    ("fastmaml/Nav2D-v0", {"goal": np.array([0.3, -0.2])}, [0.3, -0.2]),
    ("fastmaml/HalfCheetahVel-v0", {"velocity": 1.5}, [1.5]),
    ("fastmaml/AntDir-v0", {"direction": -1.0}, [-1.0])])
def test_the_oracles_observations_end_with_the_task(env_id: str, task: dict,
                                                    told: list[float]) -> None:
    plain, oracle = make_batch_env(env_id), TaskInputs(make_batch_env(env_id), len(told))
    assert task_values(task) == told
    assert oracle.obs_dim == plain.obs_dim + len(told) and oracle.act_dim == plain.act_dim
    other = {key: -value for key, value in task.items()}
    first = oracle.reset([task, other], [3, 4])
    expected = plain.reset([task, other], [3, 4])
    torch.testing.assert_close(first[:, :plain.obs_dim], expected)
    assert first[0, plain.obs_dim:].tolist() == told
    assert first[1, plain.obs_dim:].tolist() == [-value for value in told]
    actions = torch.full((2, plain.act_dim), 0.5)
    obs, rewards, ended = oracle.step(actions)
    plain_obs, plain_rewards, plain_ended = plain.step(actions)
    torch.testing.assert_close(obs[:, :plain.obs_dim], plain_obs)  # the same simulation
    assert torch.equal(rewards, plain_rewards) and torch.equal(ended, plain_ended)
    assert obs[0, plain.obs_dim:].tolist() == told
