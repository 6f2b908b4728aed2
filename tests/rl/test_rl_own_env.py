"""Meta-RL on a user's own gymnasium environment: a module fastmaml does not import, registered
under the user's id, with the task API (``fastmaml.rl.TASK_API``)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fastmaml
from fastmaml.cli import main
from fastmaml.errors import ConfigError, NonFiniteInputError
from fastmaml.experiments.rl import RLConfig
from fastmaml.rl import GaussianMLPPolicy, Nav2DBatch, Sampler, make_batch_env

MODULE = '''
import gymnasium, numpy as np
from gymnasium import spaces

CLOSED = []  # the classes of the environments closed, in order


class Point(gymnasium.Env):
    """A point moving towards its task's goal; ends within 0.05 of it."""

    observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float64)
    action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)

    def __init__(self):
        self.task = {"goal": np.zeros(2)}

    @classmethod
    def sample_tasks(cls, n, rng):
        return [{"goal": goal} for goal in rng.uniform(-1, 1, (n, 2))]

    def set_task(self, task):
        self.task = task

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.position = self.np_random.uniform(-0.1, 0.1, 2)  # the env's own seeded noise
        return self.position.copy(), {}

    def step(self, action):
        assert np.all(np.abs(action) <= 1.0), "actions arrive clipped to the action space"
        self.position = self.position + 0.1 * action
        distance = float(np.linalg.norm(self.position - self.task["goal"]))
        return self.position.copy(), self.reward(distance), distance < 0.05, False, {}

    def reward(self, distance):
        return -distance

    def close(self):
        CLOSED.append(type(self).__name__)


class Discrete(Point):
    action_space = spaces.Discrete(4)


class DictObservations(Point):
    observation_space = spaces.Dict({"position": spaces.Box(-np.inf, np.inf, (2,)),
                                     "phase": spaces.Discrete(3)})

    def reset(self, *, seed=None, options=None):
        position, info = super().reset(seed=seed)
        return {"position": position.astype(np.float32), "phase": 1}, info

    def step(self, action):
        position, *rest = super().step(action)
        return {"position": position.astype(np.float32), "phase": 2}, *rest


class NoTaskApi(gymnasium.Env):
    observation_space = spaces.Box(-1.0, 1.0, (2,))
    action_space = spaces.Box(-1.0, 1.0, (2,))


class InstanceSampleTasks(Point):
    def sample_tasks(self, n, rng):
        return Point.sample_tasks(n, rng)


class NotDicts(Point):
    @classmethod
    def sample_tasks(cls, n, rng):
        return list(rng.uniform(-1, 1, n))


class NamedTasks(Point):
    @classmethod
    def sample_tasks(cls, n, rng):
        return [{**task, "name": f"t{i}"} for i, task in enumerate(Point.sample_tasks(n, rng))]


class OneShort(Point):
    @classmethod
    def sample_tasks(cls, n, rng):
        return Point.sample_tasks(max(1, n - 1), rng)


class NaNReward(Point):
    def reward(self, distance):
        return float("nan")


class HugeReward(Point):
    def reward(self, distance):
        return 1e39  # finite in float64, inf in the episodes' float32


class KeyLost(DictObservations):
    def step(self, action):
        (observation, *rest), self.steps = super().step(action), getattr(self, "steps", 0) + 1
        if self.steps > 1:  # (past the first step, which gymnasium's checker sees)
            del observation["phase"]
        return observation, *rest


class KeysWrong(DictObservations):
    def reset(self, *, seed=None, options=None):
        observation, info = super().reset(seed=seed)
        return {"position": observation["position"]}, info


class OutOfRange(Point):
    observation_space = spaces.Discrete(5)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return 0, {}

    def step(self, action):
        return 7, 0.0, False, False, {}


class ArrayReward(Point):
    def reward(self, distance):
        return np.array([-distance])


class PairReward(Point):
    def reward(self, distance):
        return np.array([-distance, distance])


class ResetUnwritten(Point):
    def reset(self, *, seed=None, options=None):
        ...  # (as README's example before it is filled in)


class ResetAsList(Point):
    def reset(self, *, seed=None, options=None):
        return list(super().reset(seed=seed))


class TruncatesItself(Point):
    """Truncates its episodes after 3 steps (a budget of its own, before the time limit's)."""

    def reset(self, *, seed=None, options=None):
        self.steps = 0
        return super().reset(seed=seed)

    def step(self, action):
        self.steps += 1
        obs, reward, terminated, _, info = super().step(action)
        return obs, reward, terminated, self.steps == 3, info


class OldGymStep(Point):
    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, terminated or truncated, info


class BuggyStep(Point):
    def step(self, action):
        obs, reward, terminated, truncated, info = self.helper(action)  # its own bug
        return obs, reward, terminated, truncated, info

    def helper(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, terminated or truncated, info


for name in ("Point", "Discrete", "DictObservations", "NoTaskApi", "InstanceSampleTasks",
             "NotDicts", "NamedTasks", "OneShort", "NaNReward", "ArrayReward", "PairReward",
             "ResetUnwritten", "ResetAsList", "OldGymStep", "TruncatesItself", "BuggyStep",
             "HugeReward", "KeyLost", "KeysWrong", "OutOfRange"):
    gymnasium.register(f"{__name__}/{name}-v0", entry_point=f"{__name__}:{name}",
                       max_episode_steps=12)
gymnasium.register(f"{__name__}/Unbounded-v0", entry_point=f"{__name__}:Point")
'''
TINY = dict(hidden=(16,), iterations=2, meta_batch=3, trajectories=3, eval_tasks=2,
            eval_trajectories=3, eval_inner_steps=1, progress=False)


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The user's module, importable (on the path) but not imported; its name per test, so that
    each test registers its ids afresh."""
    name = f"userenvs_{abs(hash(str(tmp_path)))}"
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / f"{name}.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    return name


def test_a_users_environment_trains_evaluates_and_adapts_reproducibly(
        module: str, tmp_path: Path) -> None:
    env = f"{module}:{module}/Point-v0"
    runs = [fastmaml.meta_train("rl-env", tmp_path / f"run{i}", env=env, horizon=10, **TINY)
            for i in (1, 2)]
    task = {"goal": np.array([0.3, -0.2])}
    adapted = [run.adapt(task, steps=1) for run in runs]
    assert adapted[0].returns == adapted[1].returns and len(adapted[0].returns) == 2
    assert main(["eval", str(tmp_path / "run1"), "--no-progress"]) == 0
    results = (tmp_path / "run1" / "results.md").read_text()
    assert "horizon 10" in results and "sample_tasks' draw, seed 1" in results
    assert "Locomotion" not in results and "paper" not in results  # notes of fastmaml's own
    assert main(["adapt", str(tmp_path / "run1"), "--task", "goal=0.3,-0.2", "--steps", "1"]) == 0


def test_dict_observations_are_flattened_for_the_policy(module: str) -> None:
    sampler = Sampler(f"{module}:{module}/DictObservations-v0")
    assert (sampler.obs_dim, sampler.act_dim, sampler.horizon) == (2 + 3, 2, 12)
    tasks = [{"goal": np.array([0.5, 0.5])}]
    episodes = sampler.sample(GaussianMLPPolicy(5, 2, (8,)), tasks, 2, seed=0)
    assert episodes.observations.shape == (1, 2, 12, 5)
    # the dict space's entries in its (sorted) key order: phase (one-hot) first, then position
    assert torch.equal(episodes.observations[0, :, 0, :3], torch.tensor([[0.0, 1.0, 0.0]] * 2))


@pytest.mark.parametrize("env, message", [
    ("Discrete-v0", r"actions are Discrete\(4\): fastmaml's policy is Gaussian and needs a Box"),
    ("NoTaskApi-v0", r"\(NoTaskApi\) lacks a classmethod sample_tasks and set_task; a meta-RL "
                     r"environment needs the task API"),
    ("InstanceSampleTasks-v0", r"lacks a classmethod sample_tasks \(its sample_tasks is a plain "
                               r"method: decorate it with @classmethod\); a meta-RL environment"),
    ("NotDicts-v0", r"sample_tasks\(1, rng\) gave \[.*\]: task 0, -?\d.\d{1,4}, is "
                    r"not a dict; a meta-RL environment needs"),
    ("NamedTasks-v0", r"sample_tasks\(1, rng\) gave \[\{'goal': array\(\[ ?-?\d.\d{4}, ?-?\d.\d{4}"
                      r"\]\), 'name': 't0'\}\]: task 0's 'name' is 't0', not a number or an array "
                      r"of them; a meta-RL environment needs the task API: a classmethod "
                      r"sample_tasks\(n, rng\) giving a list of n task dicts of numbers"),
    ("Unbounded-v0", r"registered without max_episode_steps: give the episodes' length as "
                     r"horizon=N"),
    ("Pointt-v0", r"unknown meta-RL environment '.*:userenvs_\d+/Pointt-v0' \(did you mean "
                  r".*:userenvs_\d+/Point-v0\?\); fastmaml's are fastmaml/Nav2D-v0"),
])
def test_an_unfit_environment_is_named_with_its_fault(module: str, env: str,
                                                      message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Sampler(f"{module}:{module}/{env}")


def test_a_config_names_an_unfit_environment_before_anything_runs(module: str) -> None:
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        RLConfig(env="no_such_module:Point-v0")
    with pytest.raises(ConfigError, match="did you mean fastmaml/Nav2D-v0"):
        RLConfig(env="fastmaml/Nav2d-v0")
    with pytest.raises(ConfigError, match="CartPole-v1 .* lacks a classmethod sample_tasks"):
        RLConfig(env="CartPole-v1")
    # a built-in id given as a user's (module:id) took the generic path, losing the paper's
    # test tasks, and refused action_scale; its module is still imported
    assert RLConfig(env="fastmaml.rl:fastmaml/Nav2D-v0", action_scale=2.0).env == \
        "fastmaml/Nav2D-v0"
    assert isinstance(Sampler("fastmaml.rl:fastmaml/Nav2D-v0").env, Nav2DBatch)
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        RLConfig(env="no_such_module:fastmaml/Nav2D-v0")
    with pytest.raises(ConfigError, match="name the environment to meta-train on: env="):
        fastmaml.meta_train("rl-env", Path("/nonexistent/never-written"), progress=False)


@pytest.mark.parametrize("env, said", [
    ("NaNReward-v0", r"the reward nan, not finite"),
    # (1e39 passed the check, in float64, and its inf in the episodes failed the baseline's fit)
    ("HugeReward-v0", r"the reward 1e\+39, beyond float32's range \(the episodes' numbers\)")])
def test_a_reward_the_episodes_cannot_hold_is_named_with_its_task(module: str, env: str,
                                                                  said: str) -> None:
    batch = make_batch_env(f"{module}:{module}/{env}")
    batch.reset([{"goal": np.array([0.5, 0.5])}], [0])
    with pytest.raises(NonFiniteInputError, match=rf"{env}'s step gave {said}, in an episode of "
                                                  r"task \{'goal'"):
        batch.step(torch.zeros(1, 2))


@pytest.mark.parametrize("env, message", [
    ("KeyLost-v0", r"KeyLost-v0's step gave the observation \{'position': .*\}, which does not "
                   r"fit its observation_space Dict\(.*\) \(KeyError: 'phase'\)"),
    ("OutOfRange-v0", r"OutOfRange-v0's step gave the observation 7, which does not fit its "
                      r"observation_space Discrete\(5\) \(IndexError: "),
    ("KeysWrong-v0", r"KeysWrong-v0's reset failed gymnasium's environment checker: The obs "
                     r"returned by the `reset\(\)` method observation keys is not same"),
])
def test_an_observation_outside_its_space_is_named(module: str, env: str, message: str) -> None:
    """gymnasium's flatten (a KeyError, an IndexError) and its environment checker (an
    AssertionError) failed with their tracebacks."""
    batch = make_batch_env(f"{module}:{module}/{env}")
    with pytest.raises(ConfigError, match=message):
        batch.reset([{"goal": np.array([0.5, 0.5])}], [0])
        for _ in range(2):
            batch.step(torch.zeros(1, 2))


def test_a_sampler_an_error_left_open_lets_the_process_end(module: str, tmp_path: Path) -> None:
    """Its workers ignore SIGTERM and wait on their pipes: multiprocessing's exit joined them
    for ever where nothing had closed the sampler (``fastmaml train ... workers=2`` printed the
    error of an environment, then hung)."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import numpy as np
        from fastmaml.rl import GaussianMLPPolicy, Sampler

        if __name__ == "__main__":
            sampler = Sampler("{module}:{module}/NaNReward-v0", num_workers=1)
            try:
                sampler.sample(GaussianMLPPolicy(2, 2, (8,)), [{{"goal": np.zeros(2)}}], 1, 0)
            except Exception as error:
                print(type(error).__name__)
        """))
    paths = [str(tmp_path / "modules"), *filter(None, [os.environ.get("PYTHONPATH")])]
    ended = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
                           timeout=300)  # (it never ended before)
    assert (ended.returncode, ended.stdout) == (0, "NonFiniteInputError\n")


def test_a_reset_that_returns_other_than_gymnasiums_tuple_is_named(module: str) -> None:
    """A reset left unwritten (None) failed in fastmaml's code with a TypeError."""
    task = [{"goal": np.array([0.5, 0.5])}]
    with pytest.raises(ConfigError, match=r"ResetUnwritten-v0's reset returned None: a gymnasium "
                                          r"environment's reset returns \(observation, info\)"):
        make_batch_env(f"{module}:{module}/ResetUnwritten-v0").reset(task, [0])
    assert torch.equal(make_batch_env(f"{module}:{module}/ResetAsList-v0").reset(task, [0]),
                       make_batch_env(f"{module}:{module}/Point-v0").reset(task, [0]))


def test_an_episode_the_environment_truncates_is_not_stepped_on(module: str) -> None:
    """Its steps after the truncation would enter the returns and the baseline."""
    sampler = Sampler(f"{module}:{module}/TruncatesItself-v0")
    tasks = [{"goal": np.array([0.9, 0.9])}, {"goal": np.array([-0.9, 0.9])}]
    episodes = sampler.sample(GaussianMLPPolicy(2, 2, (8,)), tasks, 2, seed=0)
    assert sampler.horizon == 12 and episodes.masks.sum(-1).tolist() == [[3.0, 3.0]] * 2


def test_a_step_of_old_gyms_four_values_is_named(module: str) -> None:
    """Such a step failed in gymnasium's time-limit wrapper (a ValueError from unpacking)."""
    env = make_batch_env(f"{module}:{module}/OldGymStep-v0")
    env.reset([{"goal": np.array([0.5, 0.5])}], [0])
    with pytest.raises(ConfigError, match=r"OldGymStep-v0's step returned 4 values, old gym's "
                       r"\(observation, reward, done, info\): a gymnasium environment's step "
                       r"returns \(observation, reward, terminated, truncated, info\)"):
        env.step(torch.zeros(1, 2))
    buggy = make_batch_env(f"{module}:{module}/BuggyStep-v0")  # the same error in its own code
    buggy.reset([{"goal": np.array([0.5, 0.5])}], [0])
    with pytest.raises(ValueError, match=r"expected 5, got 4") as caught:
        buggy.step(torch.zeros(1, 2))
    assert caught.traceback[-1].name == "step"  # raised where the user's step unpacks


def test_a_reward_held_in_an_array_is_its_one_number(module: str) -> None:
    """An array reward (a vectorised reward function's) failed in float(), unnamed."""
    task = [{"goal": np.array([0.5, 0.5])}]
    number, one, pair = (make_batch_env(f"{module}:{module}/{name}-v0")
                         for name in ("Point", "ArrayReward", "PairReward"))
    for env in (number, one, pair):
        env.reset(task, [0])
    assert torch.equal(one.step(torch.zeros(1, 2))[1], number.step(torch.zeros(1, 2))[1])
    with pytest.raises(ConfigError, match=r"PairReward-v0's step gave the reward array\(\[.*\]\): "
                                          "a step's reward must be one number"):
        pair.step(torch.zeros(1, 2))


def test_the_sampler_closes_the_environments_it_made(module: str) -> None:
    """An environment may hold a simulator process, files or a window: none was closed."""
    users = importlib.import_module(module)
    with Sampler(f"{module}:{module}/Point-v0") as sampler:
        sampler.sample(GaussianMLPPolicy(2, 2, (8,)), [{"goal": np.zeros(2)}] * 3, 1, seed=0)
        assert users.CLOSED == []
    assert users.CLOSED == ["Point"] * 3
    with pytest.raises(ConfigError, match="needs a Box action space"):
        make_batch_env(f"{module}:{module}/Discrete-v0")
    assert users.CLOSED[3:] == ["Discrete"]
    with pytest.raises(ConfigError, match="sample_tasks"):  # refused after the env was made
        Sampler(f"{module}:{module}/NotDicts-v0")
    assert users.CLOSED[4:] == ["NotDicts"]


def test_a_horizon_longer_than_max_episode_steps_runs_its_steps(module: str) -> None:
    """horizon=30 on an id of max_episode_steps=12 ran 12 steps (its time limit), unsaid."""
    sampler = Sampler(f"{module}:{module}/Point-v0", horizon=30)
    far = [{"goal": np.array([50.0, 50.0])}]  # never reached: no termination
    episodes = sampler.sample(GaussianMLPPolicy(2, 2, (8,)), far, 2, seed=0)
    assert episodes.masks.sum(-1).tolist() == [[30.0, 30.0]]


def test_an_id_that_worker_processes_cannot_make_is_named(module: str) -> None:
    """An id registered in code that a spawned worker does not run (here: this test) broke
    the worker, and the parent raised a bare BrokenPipeError."""
    gymnasium = pytest.importorskip("gymnasium")
    gymnasium.register(f"{module}-OnlyHere-v0", entry_point=f"{module}:Point",
                       max_episode_steps=5)
    with Sampler(f"{module}-OnlyHere-v0", num_workers=1) as sampler, pytest.raises(
            ConfigError, match=rf"a worker process \(started with spawn\) cannot make "
                               rf"{module}-OnlyHere-v0: unknown meta-RL environment"):
        sampler.sample(GaussianMLPPolicy(2, 2, (8,)), [{"goal": np.zeros(2)}], 1, seed=0)


def test_sample_tasks_giving_other_than_n_tasks_is_refused(module: str, tmp_path: Path) -> None:
    """A class giving n - 1 tasks trained on fewer tasks per meta-batch, and evaluated fewer
    than eval_tasks, unsaid."""
    with pytest.raises(ConfigError, match=r"OneShort-v0's sample_tasks\(3, rng\) gave \[\{'goal.*\]: 2 "
                                         r"tasks, not 3; a meta-RL"):
        fastmaml.meta_train("rl-env", tmp_path / "run", env=f"{module}:{module}/OneShort-v0",
                            **TINY)
