"""The meta-RL tasks of paper section 5.3 as gymnasium environments, and batched versions of them.

Registered ids (``import fastmaml.rl`` registers them; horizons are the paper's):

- ``fastmaml/Nav2D-v0`` (100 steps), ``fastmaml/HalfCheetahVel-v0``, ``fastmaml/HalfCheetahDir-v0``,
  ``fastmaml/AntVel-v0``, ``fastmaml/AntDir-v0`` (200 steps).

Every environment has the task API ``env.unwrapped.sample_tasks(n, rng) -> list[Task]`` (a
classmethod, so ``env_class(env_id).sample_tasks`` works without an instance) and
``env.unwrapped.set_task(task)``; a task is a small dict (``{"goal": array([x, y])}``,
``{"velocity": v}`` or ``{"direction": +-1.0}``), and until ``set_task`` an environment has the
task ``sample_tasks(1, numpy.random.default_rng(0))[0]``. ``make_batch_env(env_id)`` gives the
version the sampler steps: one tensor simulator for 2D navigation, one MuJoCo environment over
many ``MjData`` for the others.

Differences from the official code (cbfinn/maml_rl on rllab):

- Nav2D: the same dynamics, reward (plain distance) and termination (``|dx| < 0.01`` and
  ``|dy| < 0.01``, as the official code). The official policy acted through rllab's ``normalize``
  wrapper, so its velocity was ``clip(0.1 * a, -0.1, 0.1)``; here ``action_scale`` (default 1.0,
  the paper's text: ``clip(a, -0.1, 0.1)``) sets that factor, ``action_scale=0.1`` reproduces it.
- Half-cheetah: gymnasium's ``HalfCheetah-v5`` model: dt 0.05 (timestep 0.01 x frame skip 5)
  where rllab's model used dt 0.01 (one 0.01 step per action); a 17-D observation (qpos without
  x, qvel) where rllab's had 20-D (plus the torso centre of mass); ``x_velocity`` is the
  finite difference of the root x position where rllab used the torso's centre-of-mass
  velocity; uniform(+-0.1) / normal(0.1) reset noise where rllab used normal(0.01) / (0.1).
- Ant: gymnasium's ``Ant-v5`` with ``include_cfrc_ext_in_observation=False``: a 27-D observation
  (qpos without x, y and qvel) where rllab's was 125-D (qpos, qvel, clipped contact forces,
  torso rotation matrix and centre of mass); actuator ranges +-1 with gear 150 where rllab's
  were +-150. The time step is rllab's, dt 0.02 (``frame_skip=2`` of v5's 0.01 steps; v5's own
  default is 0.05): at v5's dt, random actions drawn like the initial policy's (normal, std
  1, clipped) launched the torso above the healthy height 1.0 in 29 of 30 episodes, which then
  ended after 55 of 200 steps on average, against 177 steps at dt 0.02 (docs/results.md,
  session 8). rllab integrated with RK4, v5 with Euler.
  The reward weights are the official ones: control cost 0.005 * sum(a^2), contact cost
  5e-4 * sum(clip(cfrc_ext, -1, 1)^2) and a survival bonus of 1.05 for velocity (the official
  +1.0 "make it happy" plus 0.05), 0.05 for direction. The episode ends when the torso height
  leaves [0.2, 1.0] (as rllab), but v5 pays no survival bonus on that last step.
- Locomotion actions are clipped to the action space (+-1) before simulation and control cost,
  as rllab's ``normalize`` wrapper did. Directions are +1 / -1 with equal chance.

Each class's ``official_test`` says how the official test script of its task family
(``maml_examples/test_maml_*.py``) fine-tuned the methods, and ``official_test_tasks`` draws its
test tasks.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import traceback
from pathlib import Path
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium
import mujoco
import numpy as np
import torch
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.envs.registration import EnvSpec, load_env_creator
from torch import Tensor

from ..config import did_you_mean
from ..errors import ConfigError, NonFiniteInputError
from ..plots import counted

FLOAT32_MAX = float(np.finfo(np.float32).max)  # larger numbers are inf in the episodes
GYMNASIUM_DIR = str(Path(gymnasium.__file__).parent)  # its wrappers unpack a step's values

Task = dict[str, Any]
TaskRng = np.random.Generator | np.random.RandomState  # the legacy one draws the official test tasks
logger = logging.getLogger(__name__)
_seen_mujoco_warnings: set[str] = set()


def _raised_in(error: BaseException, *folders: str) -> bool:
    """Whether ``error`` was raised (its traceback's last frame) in a file under ``folders``:
    gymnasium's own checks, not the user's environment."""
    return traceback.extract_tb(error.__traceback__)[-1].filename.startswith(folders)


def _log_mujoco_warning(message: str) -> None:
    """MuJoCo warnings go to logging, once each, instead of MUJOCO_LOG.TXT in the cwd. Its
    deprecation notices go to the debug level: they name attributes of gymnasium's own model
    files (half-cheetah's ``settotalmass``), which no user of ours can change."""
    if message not in _seen_mujoco_warnings:
        _seen_mujoco_warnings.add(message)
        level = logging.DEBUG if "is deprecated" in message else logging.WARNING
        logger.log(level, "MuJoCo: %s", message)


if mujoco.get_mju_user_warning() is None:
    mujoco.set_mju_user_warning(_log_mujoco_warning)


@dataclass(frozen=True)
class OfficialTest:
    """How the official test script of a task family fine-tuned each method: the first step
    size of the pretrained and of the randomly initialised policy (None: MAML's, its training
    ``inner_lr``), the factor of the later steps' step size (rllab's VPG ``learning_rate``
    against ``init_learning_rate``), and the numpy seed of its test goals."""

    pretrained_lr: float | None = None
    random_lr: float | None = None
    later_lr_scale: float = 0.5
    seed: int = 1


# ----- 2D navigation -----
class Nav2DBatch:
    """The 2D-navigation simulator for any number of episodes at once (float64 tensors).

    Each episode starts at (0, 0); an action is a velocity, scaled by ``action_scale`` and
    clipped to [-0.1, 0.1]; the observation is the new position, the reward minus its distance
    to the goal, and the episode ends within 0.01 of the goal in both coordinates. An ended
    episode stays where it is.
    """

    obs_dim, act_dim = 2, 2

    def __init__(self, action_scale: float = 1.0):
        if not 0 < action_scale < np.inf:  # (RLConfig says so first for runs)
            raise ConfigError(f"action_scale must be > 0 and finite, got {action_scale}")
        self.action_scale = action_scale
        self.goals = torch.zeros(0, 2, dtype=torch.float64)
        self.position = torch.zeros(0, 2, dtype=torch.float64)
        self.done = torch.zeros(0, dtype=torch.bool)

    def reset(self, tasks: Sequence[Task], seeds: Sequence[int] | None = None) -> Tensor:
        """Start one episode per task; positions (episodes, 2). Nav2D has no reset noise."""
        self.goals = torch.as_tensor(np.array([t["goal"] for t in tasks]), dtype=torch.float64)
        self.position = torch.zeros_like(self.goals)
        self.done = torch.zeros(len(tasks), dtype=torch.bool)
        return self.position.clone()

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Observations (E, 2), rewards (E,), and whether each episode has ended (E,)."""
        velocity = (self.action_scale * actions.to(torch.float64)).clamp(-0.1, 0.1)
        alive = ~self.done
        self.position = torch.where(alive.unsqueeze(-1), self.position + velocity, self.position)
        offset = self.position - self.goals
        reward = torch.where(alive, -offset.norm(dim=-1), 0.0)
        self.done = self.done | (offset.abs() < 0.01).all(dim=-1)
        return self.position.clone(), reward, self.done.clone()

    def close(self) -> None:
        """Nothing to release: the simulator is a few tensors."""


class Nav2DEnv(gymnasium.Env):
    """One 2D-navigation episode as a gymnasium environment (a ``Nav2DBatch`` of size 1)."""

    official_test = OfficialTest()  # test_maml_point.py: 0.5 for every method, as MAML's
    goal_range = 0.5  # goals uniform in [-goal_range, goal_range]^2

    def __init__(self, action_scale: float = 1.0, render_mode: str | None = None):
        if render_mode is not None:
            raise ConfigError(f"fastmaml/Nav2D-v0 draws nothing: render_mode must be None, got "
                              f"{render_mode!r}")
        self.sim = Nav2DBatch(action_scale)
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (2,), np.float64)
        self.action_space = gymnasium.spaces.Box(-0.1 / action_scale, 0.1 / action_scale, (2,),
                                                 np.float64)
        self.task = self.sample_tasks(1, np.random.default_rng(0))[0]

    @classmethod
    def sample_tasks(cls, n: int, rng: TaskRng) -> list[Task]:
        """Goals uniform in [-0.5, 0.5]^2."""
        return [{"goal": goal}
                for goal in rng.uniform(-cls.goal_range, cls.goal_range, size=(n, 2))]

    @classmethod
    def outside_training(cls, task: Task) -> str | None:
        """The training tasks, in words, where ``task`` is not one of them (else None)."""
        inside = bool(np.all(np.abs(task["goal"]) <= cls.goal_range))
        return None if inside else f"goals in [-{cls.goal_range:g}, {cls.goal_range:g}]^2"

    def set_task(self, task: Task) -> None:
        self.task = task

    def reset(self, *, seed: int | None = None, options: dict | None = None
              ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return self.sim.reset([self.task])[0].numpy(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, done = self.sim.step(torch.as_tensor(action).reshape(1, 2))
        return obs[0].numpy(), float(reward[0]), bool(done[0]), False, {}


# ----- MuJoCo locomotion -----
class _Locomotion:
    """Mixin for gymnasium's v5 MuJoCo classes: clipped actions and the task's reward.

    The reward is the task term of ``info["x_velocity"]`` plus the ``info`` terms named in
    ``cost_terms`` (control cost, and for the ant contact cost and survival bonus).
    """

    cost_terms: tuple[str, ...]
    task: Task

    def set_task(self, task: Task) -> None:
        self.task = task

    def task_reward(self, x_velocity: float) -> float:
        raise NotImplementedError

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        action = np.clip(action, self.action_space.low, self.action_space.high)
        obs, _, terminated, truncated, info = super().step(action)  # type: ignore[misc]
        reward = self.task_reward(info["x_velocity"]) + sum(info[k] for k in self.cost_terms)
        return obs, float(reward), terminated, truncated, info


class _Velocity(_Locomotion):
    """Goal velocity: reward -|v_x - v_goal| + costs, v_goal uniform in [0, max_velocity]."""

    max_velocity: float

    @classmethod
    def sample_tasks(cls, n: int, rng: TaskRng) -> list[Task]:
        return [{"velocity": float(v)} for v in rng.uniform(0.0, cls.max_velocity, n)]

    @classmethod
    def outside_training(cls, task: Task) -> str | None:
        """The training tasks, in words, where ``task`` is not one of them (else None)."""
        inside = 0.0 <= task["velocity"] <= cls.max_velocity
        return None if inside else f"velocities in [0, {cls.max_velocity:g}]"

    def task_reward(self, x_velocity: float) -> float:
        return -abs(x_velocity - self.task["velocity"])

    @staticmethod
    def task_rewards(x_velocity: np.ndarray, tasks: Sequence[Task]) -> np.ndarray:
        """``task_reward`` of many episodes at once (the same float64 arithmetic)."""
        return -np.abs(x_velocity - np.array([t["velocity"] for t in tasks]))


class _Direction(_Locomotion):
    """Goal direction: reward direction * v_x + costs, direction +1 or -1 with equal chance."""

    direction_cut: float  # rllab's goal: uniform in [0, 2 cut], backwards below the cut

    @classmethod
    def sample_tasks(cls, n: int, rng: TaskRng) -> list[Task]:
        return [{"direction": float(d)} for d in rng.choice([-1.0, 1.0], n)]

    @staticmethod
    def outside_training(task: Task) -> str | None:
        """The training tasks, in words, where ``task`` is not one of them (else None)."""
        return None if task["direction"] in (-1.0, 1.0) else "directions -1 and +1"

    def task_reward(self, x_velocity: float) -> float:
        return self.task["direction"] * x_velocity

    @staticmethod
    def task_rewards(x_velocity: np.ndarray, tasks: Sequence[Task]) -> np.ndarray:
        """``task_reward`` of many episodes at once (the same float64 arithmetic)."""
        return np.array([t["direction"] for t in tasks]) * x_velocity


class _Cheetah(HalfCheetahEnv):
    cost_terms = ("reward_ctrl",)

    def __init__(self, ctrl_cost_weight: float = 0.05, **kwargs: Any):
        self.set_task(self.sample_tasks(1, np.random.default_rng(0))[0])
        super().__init__(ctrl_cost_weight=ctrl_cost_weight, **kwargs)


class _Ant(AntEnv):
    cost_terms = ("reward_ctrl", "reward_contact", "reward_survive")
    survival_bonus: float

    def __init__(self, ctrl_cost_weight: float = 0.005, contact_cost_weight: float = 5e-4,
                 healthy_reward: float | None = None,
                 include_cfrc_ext_in_observation: bool = False, **kwargs: Any):
        self.set_task(self.sample_tasks(1, np.random.default_rng(0))[0])
        kwargs.setdefault("frame_skip", 2)  # rllab's dt 0.02 (see the module docstring)
        super().__init__(ctrl_cost_weight=ctrl_cost_weight,
                         contact_cost_weight=contact_cost_weight,
                         healthy_reward=self.survival_bonus if healthy_reward is None
                         else healthy_reward,
                         include_cfrc_ext_in_observation=include_cfrc_ext_in_observation,
                         **kwargs)


class HalfCheetahVelEnv(_Velocity, _Cheetah):
    """Half-cheetah goal velocity: -|v_x - v_goal| - 0.05 sum(a^2), v_goal ~ U[0, 2]."""

    max_velocity = 2.0
    official_test = OfficialTest(pretrained_lr=0.02, random_lr=0.1)


class HalfCheetahDirEnv(_Direction, _Cheetah):
    """Half-cheetah goal direction: direction * v_x - 0.05 sum(a^2)."""

    direction_cut = 1.0
    # The script lists 0.2 and 1.0, then re-runs (and rewrites the result file of) the random
    # policy alone at 0.5: the random-init figures come from 0.5.
    official_test = OfficialTest(pretrained_lr=0.2, random_lr=0.5)


class AntVelEnv(_Velocity, _Ant):
    """Ant goal velocity: -|v_x - v_goal| + 1.05 - control and contact costs, v_goal ~ U[0, 3]."""

    max_velocity, survival_bonus = 3.0, 1.05
    official_test = OfficialTest(pretrained_lr=0.2, random_lr=1.0)


class AntDirEnv(_Direction, _Ant):
    """Ant goal direction: direction * v_x + 0.05 - control and contact costs."""

    survival_bonus = 0.05
    direction_cut = 1.5
    official_test = OfficialTest(pretrained_lr=0.2, random_lr=1.0, later_lr_scale=0.01, seed=2)


class MujocoBatch:
    """Many episodes of one MuJoCo task environment, stepped in a loop (no autoreset).

    One gymnasium environment (one compiled model) serves every episode: its ``data`` is set to
    the episode's own ``MjData`` before each reset, so each reset runs gymnasium's code
    unchanged. This relies on v5 keeping all episode state in ``data``; one model is compiled
    once instead of once per episode. A step skips gymnasium's per-episode ``step``: the same
    simulation call per episode, then observations, rewards and terminations for all episodes in
    numpy, with the arithmetic of the v5 ``step`` (the test checks bit equality against separate
    gymnasium environments). An ended episode is not stepped again.
    """

    def __init__(self, env_class: type[_Locomotion], **kwargs: Any):
        self.env: Any = env_class(**kwargs)
        if isinstance(self.env, _Ant) and (self.env._include_cfrc_ext_in_observation
                                           or not self.env._terminate_when_unhealthy):
            raise ConfigError("the batched ant steps the paper's observation (no contact forces) "
                              "and ends unhealthy episodes: include_cfrc_ext_in_observation="
                              "True and terminate_when_unhealthy=False are not supported")
        # the body whose x position gives the ant's velocity (None: a half-cheetah, by qpos[0])
        self._torso = (self.env.data.body(self.env._main_body).id if isinstance(self.env, _Ant)
                       else None)
        self.obs_dim = self.env.observation_space.shape[0]
        self.act_dim = self.env.action_space.shape[0]
        self.datas: list[mujoco.MjData] = []
        self.tasks: list[Task] = []
        self.done = np.zeros(0, dtype=bool)
        self.obs = np.zeros((0, self.obs_dim))

    def reset(self, tasks: Sequence[Task], seeds: Sequence[int]) -> Tensor:
        """One episode per task, each reset with its seed; observations (E, obs_dim)."""
        self.datas += [mujoco.MjData(self.env.model) for _ in range(len(tasks) - len(self.datas))]
        self.tasks = list(tasks)
        self.obs = np.zeros((len(tasks), self.obs_dim))
        for i, seed in enumerate(seeds):
            self._select(i)
            self.obs[i] = self.env.reset(seed=int(seed))[0]
        self.done = np.zeros(len(tasks), dtype=bool)
        return torch.from_numpy(self.obs.copy())

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Observations (E, obs_dim), rewards (E,) and whether each episode has ended (E,)."""
        actions = actions.detach().to(torch.float64).numpy()
        rewards = np.zeros(len(self.done))
        self._step_fast(actions, rewards)
        return torch.from_numpy(self.obs.copy()), torch.from_numpy(rewards), \
            torch.from_numpy(self.done.copy())

    def _step_fast(self, actions: np.ndarray, rewards: np.ndarray) -> None:
        """Every live episode: gymnasium's simulation call, then observations, rewards and
        (for the ant) terminations of all of them in numpy, with the arithmetic of the v5 step
        and of ``_Locomotion.step`` (the test checks bit equality)."""
        env, live = self.env, np.flatnonzero(~self.done)
        ant = self._torso is not None
        nq = env.model.nq
        hidden = nq + env.model.nv - self.obs_dim  # leading positions the observation leaves out
        actions = np.clip(actions[live], env.action_space.low, env.action_space.high)
        x_before, x_after = np.empty(len(live)), np.empty(len(live))
        contact_cost, healthy = np.zeros(len(live)), np.ones(len(live), dtype=bool)
        low, high = env._healthy_z_range if ant else (None, None)
        for j, i in enumerate(live):
            data = self.datas[i]
            x_before[j] = data.xpos[self._torso, 0] if ant else data.qpos[0]
            data.ctrl[:] = actions[j]
            mujoco.mj_step(env.model, data, nstep=env.frame_skip)
            self.obs[i, :nq - hidden], self.obs[i, nq - hidden:] = data.qpos[hidden:], data.qvel
            if ant:
                mujoco.mj_rnePostConstraint(env.model, data)  # the contact forces
                x_after[j] = data.xpos[self._torso, 0]
                contact_cost[j] = env._contact_cost_weight * np.sum(
                    np.square(np.clip(data.cfrc_ext, *env._contact_force_range)))
                healthy[j] = (np.isfinite(data.qpos).all() and np.isfinite(data.qvel).all()
                              and low <= data.qpos[2] <= high)
            else:
                x_after[j] = data.qpos[0]
        x_velocity = (x_after - x_before) / env.dt
        costs = -(env._ctrl_cost_weight * np.sum(np.square(actions), axis=1))
        if ant:
            costs = (costs + -contact_cost) + healthy * env._healthy_reward
            self.done[live] = ~healthy
        rewards[live] = env.task_rewards(x_velocity, [self.tasks[i] for i in live]) + costs

    def _select(self, episode: int) -> None:
        self.env.data = self.datas[episode]
        self.env.set_task(self.tasks[episode])

    def close(self) -> None:
        self.env.close()


class GymBatch:
    """Many episodes of a user's environment (``env_class``'s task API), one ``gymnasium.make``
    environment per episode (its wrappers too: the time limit ends an episode), stepped in a
    loop; an ended episode (terminated or truncated) is not stepped again. Observations are
    flattened (``gymnasium.spaces.flatten``: a dict's entries in its space's key order, a
    discrete value one-hot, an image's pixels); actions, a ``Box`` (the policy is Gaussian),
    are clipped to its bounds. A non-finite observation or reward raises
    ``NonFiniteInputError``."""

    def __init__(self, env_id: str, **kwargs: Any):
        self.env_id, self.kwargs = env_id, kwargs
        self.envs: list[gymnasium.Env] = [gymnasium.make(env_id, **kwargs)]
        observations, actions = self.envs[0].observation_space, self.envs[0].action_space
        try:
            if not isinstance(actions, gymnasium.spaces.Box):
                raise ConfigError(f"{env_id}'s actions are {actions}: fastmaml's policy is "
                                  "Gaussian and needs a Box action space (continuous actions); "
                                  "it has no policy for discrete ones")
            try:
                self.obs_dim = gymnasium.spaces.flatdim(observations)
            except (NotImplementedError, ValueError) as error:
                raise ConfigError(f"{env_id}'s observations ({observations}) do not flatten into "
                                  f"a vector for the policy: {error}") from None
        except ConfigError:
            self.close()  # (an environment may hold a simulator process, files, a window)
            raise
        self.observation_space, self.action_space = observations, actions
        self.act_dim = int(np.prod(actions.shape))
        self.tasks: list[Task] = []
        self.done = np.zeros(0, dtype=bool)
        self.obs = np.zeros((0, self.obs_dim))

    def reset(self, tasks: Sequence[Task], seeds: Sequence[int]) -> Tensor:
        """One episode per task, each reset with its seed; observations (E, obs_dim)."""
        self.envs += [gymnasium.make(self.env_id, **self.kwargs)
                      for _ in range(len(tasks) - len(self.envs))]
        self.tasks, self.done = list(tasks), np.zeros(len(tasks), dtype=bool)
        self.obs = np.zeros((len(tasks), self.obs_dim))
        for i, (task, seed) in enumerate(zip(tasks, seeds)):
            self.envs[i].unwrapped.set_task(task)
            self.obs[i] = self._flat(self._reset(i, int(seed)), i, "reset")
        return torch.from_numpy(self.obs.copy())

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Observations (E, obs_dim), rewards (E,) and whether each episode has ended (E,)."""
        space = self.action_space
        actions = np.clip(actions.detach().to(torch.float64).numpy(), space.low.reshape(-1),
                          space.high.reshape(-1))
        rewards = np.zeros(len(self.done))
        for i in np.flatnonzero(~self.done):
            obs, reward, terminated, truncated = self._step(
                i, actions[i].reshape(space.shape).astype(space.dtype))
            self.obs[i] = self._flat(obs, i, "step")
            rewards[i] = self._number(reward, i)
            self.done[i] = terminated or truncated
        return (torch.from_numpy(self.obs.copy()), torch.from_numpy(rewards),
                torch.from_numpy(self.done.copy()))

    def _reset(self, episode: int, seed: int) -> Any:
        """Episode ``episode``'s environment reset: its observation, gymnasium's tuple checked
        (a step's is unpacked by gymnasium's own wrappers, which say so)."""
        with self._checked("reset"):
            result = self.envs[episode].reset(seed=seed)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            got = ("None" if result is None else f"a {type(result).__name__}"
                   + (f" of {len(result)}" if isinstance(result, (tuple, list)) else ""))
            raise ConfigError(f"{self.env_id}'s reset returned {got}: a gymnasium environment's "
                              "reset returns (observation, info)")
        return result[0]

    def _step(self, episode: int, action: np.ndarray) -> tuple[Any, Any, bool, bool]:
        """Episode ``episode``'s environment step: its observation, reward, terminated and
        truncated. A step written to old gym's API (four values, ``done`` for both flags) is
        named, not gymnasium's wrapper that fails to unpack it."""
        try:
            with self._checked("step"):
                obs, reward, terminated, truncated, _ = self.envs[episode].step(action)
        except ValueError as error:
            if ("values to unpack (expected 5, got 4)" not in str(error)
                    or not _raised_in(error, GYMNASIUM_DIR, __file__)):  # (the user's own)
                raise
            raise ConfigError(f"{self.env_id}'s step returned 4 values, old gym's (observation, "
                              "reward, done, info): a gymnasium environment's step returns "
                              "(observation, reward, terminated, truncated, info)") from error
        return obs, reward, terminated, truncated

    @contextlib.contextmanager
    def _checked(self, call: str) -> Iterator[None]:
        """gymnasium's environment checker (``gymnasium.make``'s wrapper) refuses a first
        ``call``'s output with an AssertionError: said as the environment's error (its own
        assertions stay its own, traceback and all)."""
        try:
            yield
        except AssertionError as error:
            if not _raised_in(error, GYMNASIUM_DIR):
                raise
            raise ConfigError(f"{self.env_id}'s {call} failed gymnasium's environment "
                              f"checker: {error}") from error

    def _flat(self, obs: Any, episode: int, call: str) -> np.ndarray:
        """``obs`` as the policy's input vector, checked: in its space, and finite as the
        episodes keep it (float32)."""
        try:
            flat = np.asarray(gymnasium.spaces.flatten(self.observation_space, obs),
                              dtype=np.float64)
        except (KeyError, IndexError, TypeError, ValueError) as error:  # e.g. a dict's key
            raise ConfigError(f"{self.env_id}'s {call} gave the observation {obs!r}, which does "
                              f"not fit its observation_space {self.observation_space} "
                              f"({type(error).__name__}: {error})") from None
        if flat.size != self.obs_dim:
            raise ConfigError(f"{self.env_id}'s {call} gave an observation of {flat.size} "
                              f"numbers, its observation_space {self.obs_dim}")
        if not (np.abs(flat) <= FLOAT32_MAX).all():  # (NaN too)
            self._non_finite(f"observation {obs}", flat, episode, call)
        return flat

    def _number(self, reward: Any, episode: int) -> float:
        """``reward`` as a float, checked: a number, or an array holding one."""
        try:
            value = np.asarray(reward, dtype=np.float64)
        except (TypeError, ValueError):
            value = np.zeros(0)
        if value.size != 1:
            raise ConfigError(f"{self.env_id}'s step gave the reward {reward!r}: a step's reward "
                              "must be one number")
        if not abs(value) <= FLOAT32_MAX:  # (NaN too)
            self._non_finite(f"reward {reward}", value, episode, "step")
        return float(value.item())

    def close(self) -> None:
        """Close every environment (a later ``reset`` makes them again)."""
        for env in self.envs:
            env.close()
        self.envs = []

    def _non_finite(self, what: str, value: np.ndarray, episode: int, call: str) -> None:
        raise NonFiniteInputError(f"{self.env_id}'s {call} gave the {what}, "
                                  + ("beyond float32's range (the episodes' numbers)"
                                     if np.isfinite(value).all() else "not finite")
                                  + f", in an episode of task {self.tasks[episode]!r}: fix the "
                                  "environment (policy gradients cannot use it)")


class BatchEnv(Protocol):
    """What the sampler steps: ``Nav2DBatch``, ``MujocoBatch`` or ``GymBatch``."""

    obs_dim: int
    act_dim: int

    def reset(self, tasks: Sequence[Task], seeds: Sequence[int]) -> Tensor: ...

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...

    def close(self) -> None: ...


def task_values(task: Task) -> list[float]:
    """A task's numbers in a fixed order (its keys sorted, each value flattened): what the
    oracle's observations add (``TaskInputs``)."""
    return [float(value) for key in sorted(task) for value in np.ravel(task[key])]


class TaskInputs:
    """A batch environment whose observations end with each episode's task values
    (``task_values``): the paper's oracle, which is told the task instead of adapting to it
    (the official code's oracle environments appended the goal to the observation)."""

    def __init__(self, env: BatchEnv, task_dim: int):
        self.env, self.act_dim, self.obs_dim = env, env.act_dim, env.obs_dim + task_dim
        self.values = torch.zeros(0, task_dim, dtype=torch.float64)

    def reset(self, tasks: Sequence[Task], seeds: Sequence[int]) -> Tensor:
        self.values = torch.tensor([task_values(task) for task in tasks], dtype=torch.float64)
        return self._told(self.env.reset(tasks, seeds))

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        obs, rewards, ended = self.env.step(actions)
        return self._told(obs), rewards, ended

    def _told(self, obs: Tensor) -> Tensor:
        return torch.cat([obs, self.values.to(obs.dtype)], dim=-1)

    def close(self) -> None:
        self.env.close()


ENVS: dict[str, tuple[type, int]] = {
    "fastmaml/Nav2D-v0": (Nav2DEnv, 100),
    "fastmaml/HalfCheetahVel-v0": (HalfCheetahVelEnv, 200),
    "fastmaml/HalfCheetahDir-v0": (HalfCheetahDirEnv, 200),
    "fastmaml/AntVel-v0": (AntVelEnv, 200),
    "fastmaml/AntDir-v0": (AntDirEnv, 200),
}
"""Registered id -> (environment class, horizon)."""

for _env_id, (_cls, _horizon) in ENVS.items():
    if _env_id not in gymnasium.registry:
        gymnasium.register(_env_id, entry_point=f"{__name__}:{_cls.__name__}",
                           max_episode_steps=_horizon)


TASK_API = ("a meta-RL environment needs the task API: a classmethod sample_tasks(n, rng) giving "
            "a list of n task dicts of numbers (rng: a numpy Generator), and a method "
            "set_task(task)")


def env_class(env_id: str) -> type:
    """The environment class of a registered id (``env_class(id).sample_tasks(n, rng)``): one of
    ``ENVS``, or a user's gymnasium id whose class has the task API (``TASK_API``);
    ``module:Name-v0`` imports the module that registers it first."""
    if env_id in ENVS:
        return ENVS[env_id][0]
    entry_point = _user_spec(env_id).entry_point
    try:
        cls = entry_point if callable(entry_point) else load_env_creator(entry_point)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"cannot load {env_id}'s entry point {entry_point!r}: {error}") from None
    if not isinstance(cls, type):
        raise ConfigError(f"{env_id}'s entry point {entry_point!r} is not a class; {TASK_API} "
                          "on the class it registers")
    sampler = inspect.getattr_static(cls, "sample_tasks", None)
    lacks = [what for what, missing in (
        ("a classmethod sample_tasks" + (" (its sample_tasks is a plain method: decorate it "
                                         "with @classmethod)" if callable(sampler) else ""),
         not isinstance(sampler, (classmethod, staticmethod))),
        ("set_task", not callable(getattr(cls, "set_task", None)))) if missing]
    if lacks:
        raise ConfigError(f"{env_id} ({cls.__name__}) lacks {' and '.join(lacks)}; {TASK_API}")
    return cls


def canonical_env_id(env_id: str) -> str:
    """``env_id``; a built-in id given as a user's, ``module:fastmaml/...``, as the built-in id
    (its module imported, as gymnasium would), so that it takes the built-in's own path, horizon
    and test tasks."""
    name = env_id.rpartition(":")[2]
    return _imported(env_id) if name in ENVS else env_id


def _imported(env_id: str) -> str:
    """The id of ``module:id``, its module imported first (a ``ConfigError`` where it cannot
    be)."""
    module, _, name = env_id.rpartition(":")
    try:
        if module:
            importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(f"meta-RL environment {env_id!r}: cannot import {module!r} ({error}); "
                          "put its folder on PYTHONPATH") from None
    return name


def _user_spec(env_id: str) -> EnvSpec:
    """The gymnasium spec of a user's id, ``module:`` imported first; a ``ConfigError`` naming
    the nearest ids where it is not registered."""
    module = env_id.rpartition(":")[0]
    try:
        return gymnasium.spec(_imported(env_id))
    except gymnasium.error.Error:
        near = did_you_mean(env_id, [*ENVS, *(f"{module}:{known}" if module else known
                                              for known in gymnasium.registry)])
        raise ConfigError(f"unknown meta-RL environment {env_id!r}{near}; fastmaml's are "
                          f"{', '.join(ENVS)}; your own is the gymnasium id it is registered "
                          "with, as 'your_module:YourEnv-v0' to import the module that "
                          "registers it") from None


def sample_tasks(env_id: str, n: int, rng: TaskRng) -> list[Task]:
    """``env_class(env_id).sample_tasks(n, rng)``, checked: a ``ConfigError`` unless it gives
    a list of ``n`` dicts of numbers (a user's class may give fewer, or a name)."""
    tasks = env_class(env_id).sample_tasks(n, rng)
    fault = _task_list_fault(tasks, n)
    if fault:
        raise ConfigError(f"{env_id}'s sample_tasks({n}, rng) gave {_shown(tasks)}: {fault}; "
                          f"{TASK_API}")
    return list(tasks)


def _task_list_fault(tasks: Any, n: int) -> str | None:
    """What keeps ``tasks`` from being a list of ``n`` task dicts of numbers, if anything."""
    if not isinstance(tasks, Sequence):
        return f"not a list but a {type(tasks).__name__}"
    if len(tasks) != n:
        return f"{counted(len(tasks), 'task')}, not {n}"
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            return f"task {i}, {_shown(task)}, is not a dict"
        for key, value in task.items():
            if not is_numeric(value):
                return f"task {i}'s {key!r} is {_shown(value)}, not a number or an array of them"
    return None


def is_numeric(value: Any) -> bool:
    """Whether a task's value is a real number or an array of them (``task_values`` reads;
    not a bool)."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):  # (e.g. a ragged list)
        return False
    return array.dtype.kind in "iuf"


def _shown(value: Any, width: int = 100) -> str:
    """``value``'s repr for a message, each number to 4 significant digits (so that a long
    list is cut, with " ...", after whole numbers where it can be)."""
    with np.printoptions(precision=4, threshold=6):
        text = repr(_rounded(value))
    return text if len(text) <= width else text[:width - 4] + " ..."


def _rounded(value: Any) -> Any:
    """``value`` with its floats (in dicts, lists and tuples) to 4 significant digits."""
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map(_rounded, value))
    if isinstance(value, (float, np.floating)):
        return float(f"{value:.4g}")
    return value


def official_test(env_id: str) -> OfficialTest:
    """How the evaluation fine-tunes each method on ``env_id``: the official test script's
    settings for fastmaml's environments; a user's class may set ``official_test`` too (else
    every method takes MAML's step size, later steps half of it, test tasks of seed 1)."""
    return getattr(env_class(env_id), "official_test", OfficialTest())


def official_test_tasks(env_id: str, n: int) -> list[Task]:
    """The official test script's ``n`` tasks: numpy's legacy generator seeded with
    ``official_test.seed``, then one draw of all goals (a direction from a goal uniform in
    [0, 2 cut], as rllab's direction environments read it)."""
    seed = official_test(env_id).seed
    if env_id not in ENVS:  # a user's sample_tasks takes a Generator (TASK_API)
        return sample_tasks(env_id, n, np.random.default_rng(seed))
    cls, rng = ENVS[env_id][0], np.random.RandomState(seed)
    if issubclass(cls, _Direction):
        return [{"direction": -1.0 if goal < cls.direction_cut else 1.0}
                for goal in rng.uniform(0.0, 2 * cls.direction_cut, n)]
    return cls.sample_tasks(n, rng)


def default_horizon(env_id: str) -> int:
    """The paper's horizon for ``env_id``; a user's environment's ``max_episode_steps``."""
    if env_id in ENVS:
        return ENVS[env_id][1]
    horizon = _user_spec(env_id).max_episode_steps
    if horizon is None:
        raise ConfigError(f"{env_id} is registered without max_episode_steps: give the episodes' "
                          "length as horizon=N")
    return horizon


def right_way_threshold(env_id: str, horizon: int) -> float | None:
    """For goal-direction tasks, the mean return above which a task's episodes moved in its goal
    direction: every reward term but ``direction * v_x`` is a cost, except the survival bonus,
    which adds at most ``survival_bonus x horizon``. A return above it means net progress the
    right way that outweighs the costs (a sufficient test, not a necessary one). ``None`` for
    other tasks."""
    cls = env_class(env_id)
    return getattr(cls, "survival_bonus", 0.0) * horizon if issubclass(cls, _Direction) else None


def make_batch_env(env_id: str, **kwargs: Any) -> BatchEnv:
    """The batched version of ``env_id`` for the sampler; ``kwargs`` go to the environments."""
    env_id = canonical_env_id(env_id)
    cls = env_class(env_id)
    if env_id not in ENVS:
        return GymBatch(env_id, **kwargs)
    return Nav2DBatch(**kwargs) if cls is Nav2DEnv else MujocoBatch(cls, **kwargs)
