"""Sampling episodes of meta-RL tasks: exactly H steps for tasks x trajectories environments.

Every step runs one batched policy forward for all environments of a process (per-task adapted
parameters through ``vmap``). Randomness is per episode: episode ``j`` of the task at position
``i`` of the task list draws its reset seed and its action noise from
``numpy.random.default_rng([seed, i, j])`` (a seed is an integer or a tuple of them,
``[*seed, i, j]``). The forward runs in float64 and the actions are then
rounded to the policy's dtype: float32 matrix products differ in the last bit between batch
shapes and thread counts, and MuJoCo turns such differences into different trajectories within
a few dozen steps; after rounding (to float32), the actions agree bit for bit except where a
float64 value lies within its last bits of a float32 rounding boundary (a chance of about
2**-29, 2e-9, per action value: estimated, not measured). So episodes of a float32 policy do not
depend on how the environments are batched or split over worker processes (a float64 policy's
do, to rounding).

``Sampler.sample_steps`` gives the official code's batches instead: a number of environment
steps per task, gathered by environments that start a new episode as soon as one ends (see
``lockstep_episodes``; the episodes are independent, so they are sampled in batches and handed to
the environments in order afterwards).
"""
from __future__ import annotations

import contextlib
import copy
import heapq
import multiprocessing as mp
import multiprocessing.util as mp_util
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ..inputs import Params
from ..errors import ConfigError
from ..train import STOP_SIGNALS, signals_handled
from .envs import (ENVS, BatchEnv, Task, TaskInputs, canonical_env_id, default_horizon,
                   is_numeric, make_batch_env, sample_tasks, task_values)
from .policy import policy_forward

SeedKey = int | tuple[int, ...]  # a sampler seed: an integer, or a tuple of them


class Episodes(NamedTuple):
    """Sampled episodes, (tasks, trajectories, steps, ...) each."""

    observations: Tensor  # the observation each action was taken in (0 after the episode ended)
    actions: Tensor  # the policy's sampled actions, before any clipping by the environment (ditto)
    rewards: Tensor  # 0 after the episode ended
    masks: Tensor  # 1.0 for steps inside the episode, 0.0 after it ended

    @property
    def num_tasks(self) -> int:
        return self.observations.shape[0]

    def mean_returns(self) -> Tensor:
        """Undiscounted return per task, averaged over its episodes: (tasks,).

        A trajectory slot whose first step is masked holds no episode (``sample_steps`` pads
        tasks with fewer episodes that way) and does not count.
        """
        episodes = self.masks[..., 0].sum(-1).clamp_min(1.0)
        return self.rewards.sum(-1).sum(-1) / episodes


def rollout(policy: nn.Module, env: BatchEnv, tasks: Sequence[Task], num_traj: int,
            horizon: int, seed: SeedKey, params: Params | None = None,
            task_ids: Sequence[int] | None = None, first_traj: int = 0,
            task_inputs: bool = False) -> Episodes:
    """``num_traj`` episodes of every task, all environments stepped together.

    Observations, actions and rewards are in the dtype of the policy's parameters. ``params``:
    per-task policy parameters with a leading task dimension, or ``None`` for the policy's own.
    ``task_ids``: the tasks' positions in the caller's full task list (for the seeds; default
    ``0 .. len(tasks) - 1``). The episodes are numbered from ``first_traj`` (for the seeds).
    ``task_inputs``: the observations end with each task's values (``TaskInputs``: the
    oracle's). Torch runs with one thread meanwhile.
    """
    if task_inputs:
        env = TaskInputs(env, len(task_values(tasks[0])))
    num_tasks = len(tasks)
    task_ids = range(num_tasks) if task_ids is None else task_ids
    key = list(seed) if isinstance(seed, tuple) else [seed]
    rngs = [np.random.default_rng([*key, task_id, first_traj + traj])
            for task_id in task_ids for traj in range(num_traj)]
    reset_seeds = [int(rng.integers(2**31)) for rng in rngs]
    noise = np.stack([rng.standard_normal((horizon, env.act_dim)) for rng in rngs])
    noise = torch.from_numpy(noise).view(num_tasks, num_traj, horizon, env.act_dim)
    dtype = next(policy.parameters()).dtype
    policy = copy.deepcopy(policy).double()
    params = None if params is None else {name: p.double() for name, p in params.items()}
    obs = env.reset([task for task in tasks for _ in range(num_traj)], reset_seeds)
    shape = (num_tasks, num_traj, horizon)
    episodes = Episodes(*(torch.zeros(*shape, *dims, dtype=dtype)
                          for dims in ((env.obs_dim,), (env.act_dim,), (), ())))
    done = torch.zeros(num_tasks, num_traj, dtype=torch.bool)
    with torch.no_grad(), _one_torch_thread():
        for t in range(horizon):
            if done.all():
                break
            obs = obs.double().view(num_tasks, num_traj, env.obs_dim)
            mean, log_std = policy_forward(policy, obs, params)
            action = (mean + log_std.exp() * noise[:, :, t]).to(dtype)
            episodes.observations[:, :, t] = obs
            episodes.actions[:, :, t] = action
            episodes.masks[:, :, t] = ~done
            obs, reward, ended = env.step(action.reshape(-1, env.act_dim))
            episodes.rewards[:, :, t] = reward.view(num_tasks, num_traj)
            done = ended.view(num_tasks, num_traj)
    # Steps after an episode's end hold zeros, however the environments were batched.
    episodes.observations.mul_(episodes.masks.unsqueeze(-1))
    episodes.actions.mul_(episodes.masks.unsqueeze(-1))
    return episodes


class Sampler:
    """Samples episodes of one registered environment, in this process or in worker processes.

    Args:
        env_id: a ``fastmaml/...`` id (see ``fastmaml.rl.envs``), or a user's gymnasium id
            with the task API (``fastmaml.rl.envs.env_class``).
        horizon: steps per episode (default: the paper's for ``env_id``; a user's
            environment's ``max_episode_steps``, which a given horizon replaces).
        num_workers: 0 samples here; ``n > 0`` splits the tasks over ``n`` worker processes
            (one per core is the point; each uses one thread), with identical results.
        env_kwargs: passed to the environments (e.g. ``action_scale`` for Nav2D).
    """

    def __init__(self, env_id: str, horizon: int | None = None, num_workers: int = 0,
                 **env_kwargs: Any):
        self._workers: list[tuple[mp.process.BaseProcess, Connection]] = []
        # stopped on close, or at the interpreter's exit before multiprocessing joins its
        # children (exitpriority): a sampler an error left unclosed hung the exit there, as
        # its workers ignore SIGTERM and wait on their pipes
        self._stop_workers = mp_util.Finalize(self, _stop_workers, (self._workers,),
                                              exitpriority=0)
        env_id = canonical_env_id(env_id)
        self.horizon = default_horizon(env_id) if horizon is None else horizon
        if self.horizon < 1 or num_workers < 0:
            raise ConfigError(f"need horizon >= 1 and num_workers >= 0, got {self.horizon} and "
                              f"{num_workers}")
        if env_id not in ENVS:  # a user's: the horizon, not the id's max_episode_steps, ends it
            env_kwargs = {"max_episode_steps": self.horizon, **env_kwargs}
        self.env_id, self.env_kwargs = env_id, env_kwargs
        self.env = make_batch_env(env_id, **env_kwargs)
        try:
            self.obs_dim, self.act_dim = self.env.obs_dim, self.env.act_dim
            # what every task of this environment holds, and each value's shape (``_check``)
            example = sample_tasks(env_id, 1, np.random.default_rng(0))[0]
            self._task_shapes = {key: np.shape(value) for key, value in example.items()}
            self.task_dim = len(task_values(example))  # the numbers the oracle is told
            if num_workers:
                self._start_workers(num_workers)
        except BaseException:
            self.close()  # (the environments a user's class made, too)
            raise

    def sample(self, policy: nn.Module, tasks: Sequence[Task], num_traj: int, seed: SeedKey,
               params: Params | None = None, tasks_per_rollout: int | None = None,
               first_traj: int = 0, task_ids: Sequence[int] | None = None,
               task_inputs: bool = False) -> Episodes:
        """``num_traj`` episodes of ``horizon`` steps for every task: (tasks, num_traj, H, ...).

        ``params``: per-task parameters stacked over tasks (from ``adapt_policy``) or ``None``.
        ``tasks_per_rollout`` bounds how many tasks' environments step together (memory); it
        does not change the result. ``first_traj`` numbers the episodes from there (another
        batch of the same seed). ``task_ids``: the tasks' positions in a larger task list, for
        the seeds (default ``0 .. len(tasks) - 1``), to sample some of its tasks again.
        ``task_inputs``: the observations end with each task's values, ``task_dim`` numbers
        (the oracle's policy; ``TaskInputs``).
        """
        if num_traj < 1 or not tasks:
            raise ConfigError(f"need at least one task and one trajectory, got {len(tasks)} tasks "
                              f"and num_traj={num_traj}")
        self._check(policy, tasks, task_inputs)
        task_ids = list(range(len(tasks))) if task_ids is None else list(task_ids)
        jobs = [{"tasks": [tasks[i] for i in ids], "num_traj": num_traj, "horizon": self.horizon,
                 "seed": seed, "task_ids": [task_ids[i] for i in ids], "first_traj": first_traj,
                 "task_inputs": task_inputs,
                 "params": None if params is None else {n: p[ids] for n, p in params.items()}}
                for ids in _chunks(len(tasks), len(self._workers) or 1, tasks_per_rollout)]
        if not self._workers:
            parts = [rollout(policy, self.env, **job) for job in jobs]
        else:
            conns, parts = [conn for _, conn in self._workers], []
            for start in range(0, len(jobs), len(conns)):
                batch = jobs[start:start + len(conns)]
                for conn, job in zip(conns, batch):
                    conn.send((policy, job))
                parts += _receive(conns[:len(batch)])
        return Episodes(*(torch.cat(column) for column in zip(*parts)))

    def _check(self, policy: nn.Module, tasks: Sequence[Task], task_inputs: bool) -> None:
        """A ``ConfigError`` for tasks of another environment, or a policy whose input or output
        does not fit this environment's observations (with ``task_inputs``, and the task's
        values) and actions."""
        for task in tasks:
            if not set(self._task_shapes) <= set(task):
                raise ConfigError(f"a {self.env_id} task needs the key(s) "
                                  f"{', '.join(sorted(self._task_shapes))}; got {task!r}, a task "
                                  "of another environment?")
            extra = sorted(set(task) - set(self._task_shapes))
            if extra:  # else ignored unsaid
                raise ConfigError(f"a {self.env_id} task takes only the key(s) "
                                  f"{', '.join(sorted(self._task_shapes))}; got also "
                                  f"{', '.join(map(str, extra))}")
            for key, shape in self._task_shapes.items():
                if np.shape(task[key]) != shape:
                    raise ConfigError(f"a {self.env_id} task's {key} must be of shape "
                                      f"{shape}, got {task[key]!r}")
                if not is_numeric(task[key]) or not np.isfinite(task[key]).all():
                    raise ConfigError(f"a {self.env_id} task's {key} must be finite numbers, "
                                      f"got {task[key]!r}")
        inputs = self.obs_dim + (self.task_dim if task_inputs else 0)
        probe = torch.zeros(1, inputs, dtype=next(policy.parameters()).dtype)
        try:
            with torch.no_grad():
                out = policy(probe)
        except RuntimeError as error:
            told = f" and its task's {self.task_dim}" if task_inputs else ""
            raise ConfigError(f"the policy does not take {self.env_id}'s observations of "
                              f"{self.obs_dim} numbers{told}: {error}") from None
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ConfigError(f"the policy must return (mean, log_std) of its Gaussian actions, "
                              f"as fastmaml.rl.GaussianMLPPolicy does; got "
                              f"{type(out).__name__}")
        mean = out[0]
        if mean.shape[-1] != self.act_dim:
            raise ConfigError(f"the policy gives {mean.shape[-1]} action numbers; {self.env_id} "
                              f"takes {self.act_dim}")

    def sample_steps(self, policy: nn.Module, tasks: Sequence[Task], num_envs: int, steps: int,
                     seed: SeedKey, params: Params | None = None,
                     tasks_per_rollout: int | None = None,
                     task_ids: Sequence[int] | None = None,
                     task_inputs: bool = False) -> Episodes:
        """The official code's batch: ``num_envs`` environments per task run episode after
        episode until the finished episodes hold ``steps`` steps; the episodes still running
        then are dropped (``lockstep_episodes``).

        Returns the finished episodes of every task, (tasks, most episodes, H, ...), tasks with
        fewer padded with empty slots (masks 0; ``mean_returns`` skips them). Without early
        termination that is ``steps / H`` whole episodes, like ``sample``. Episodes are sampled
        ``num_envs`` per task at a time (numbered on from the previous ones), for the tasks that
        ``lockstep_episodes`` cannot decide yet. ``task_ids``, ``task_inputs``: as for ``sample``.
        """
        if steps < 1 or not tasks:
            raise ConfigError(f"need at least one task and steps >= 1, got {len(tasks)} tasks and "
                              f"steps={steps}")
        task_ids = list(range(len(tasks))) if task_ids is None else list(task_ids)
        sampled: list[list[Episodes]] = [[] for _ in tasks]  # each task's batches of episodes
        lengths: list[list[int]] = [[] for _ in tasks]  # and its episodes' lengths so far
        keep: list[list[bool] | None] = [None] * len(tasks)
        batches = 0
        while pending := [i for i, kept in enumerate(keep) if kept is None]:
            their_params = None if params is None else {n: p[pending] for n, p in params.items()}
            part = self.sample(policy, [tasks[i] for i in pending], num_envs, seed, their_params,
                               tasks_per_rollout, first_traj=batches * num_envs,
                               task_ids=[task_ids[i] for i in pending], task_inputs=task_inputs)
            batches += 1
            for row, task in enumerate(pending):
                sampled[task].append(Episodes(*(t[row] for t in part)))
                lengths[task] += part.masks[row].sum(-1).long().tolist()
                keep[task] = lockstep_episodes(lengths[task], num_envs, steps)
        return _stack_kept(sampled, keep)

    def close(self) -> None:
        """Stop the worker processes and close the environments."""
        self._stop_workers()
        self.env.close()

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _start_workers(self, num_workers: int) -> None:
        context = mp.get_context("spawn")
        with _single_threaded_children(), _stop_signals_ignored_by_children():
            for _ in range(num_workers):
                parent, child = context.Pipe()
                process = context.Process(target=_worker, daemon=True,
                                          args=(child, self.env_id, self.env_kwargs))
                process.start()
                child.close()
                self._workers.append((process, parent))


def lockstep_episodes(lengths: Sequence[int], num_envs: int, steps: int) -> list[bool] | None:
    """Which of a task's independent episodes (their lengths, in order) a batch of ``steps``
    environment steps keeps, as the official sampler gathers it.

    ``num_envs`` environments start together; whenever one is free it runs the next episode,
    in order (the first free environment first). The batch stops at the first time at which the
    finished episodes hold at least ``steps`` steps, and keeps exactly those: so short episodes
    are over-represented, and the mean return over the batch favours them (as the paper's
    reported returns). Returns one flag per episode, or ``None`` when more episodes are needed
    to decide.
    """
    free = [(0, env) for env in range(num_envs)]  # (time the environment is free, env)
    finish = []
    for length in lengths:
        start, env = heapq.heappop(free)
        finish.append(start + length)
        heapq.heappush(free, (start + length, env))
    collected, stop = 0, None
    for end, length in sorted(zip(finish, lengths)):
        collected += length
        if collected >= steps:
            stop = end
            break
    # an episode not yet sampled starts when its environment is free, after the stop
    if stop is None or free[0][0] < stop:
        return None
    return [end <= stop for end in finish]


def _stack_kept(sampled: list[list[Episodes]], keep: list[list[bool]]) -> Episodes:
    """Each task's kept episodes, stacked over tasks and padded to the largest count with
    empty slots (all zeros, masks 0)."""
    kept = [Episodes(*(torch.cat(column)[torch.tensor(flags)] for column in zip(*batches)))
            for batches, flags in zip(sampled, keep)]
    slots = max(episodes.masks.shape[0] for episodes in kept)

    def padded(t: Tensor) -> Tensor:
        return torch.cat([t, t.new_zeros(slots - t.shape[0], *t.shape[1:])])
    return Episodes(*(torch.stack([padded(t) for t in column]) for column in zip(*kept)))


def _chunks(num_tasks: int, num_parts: int, tasks_per_rollout: int | None) -> list[list[int]]:
    """Task indices in ``num_parts`` near-equal parts, cut to at most ``tasks_per_rollout``."""
    parts = [part.tolist() for part in np.array_split(np.arange(num_tasks), num_parts) if len(part)]
    if tasks_per_rollout is None:
        return parts
    return [part[i:i + tasks_per_rollout] for part in parts
            for i in range(0, len(part), tasks_per_rollout)]


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Small per-step forwards: a second intra-op thread bought nothing and, with the other core
    busy, made sampling much slower on a 2-core machine (not recorded in docs/results.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Processes started inside inherit one BLAS / OpenMP thread (set before their imports)."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _stop_signals_ignored_by_children() -> contextlib.AbstractContextManager:
    """Processes started inside begin with SIGINT and SIGTERM ignored: an ignored signal stays
    so across exec, and Python leaves an ignored SIGINT alone. A scheduler's SIGTERM, or
    Ctrl-C, reaches the whole process group: the parent stops cleanly after its iteration
    (``fit``), and its workers end with it, also those still importing torch (they printed a
    ``KeyboardInterrupt`` traceback and the run failed). The parent ignores them for the
    milliseconds of the starts too (where it may set handlers: its main thread)."""
    main_thread = threading.current_thread() is threading.main_thread()
    return signals_handled(STOP_SIGNALS if main_thread else (), signal.SIG_IGN)


def _worker(conn: Connection, env_id: str, env_kwargs: dict[str, Any]) -> None:
    # (as started by a thread other than the main one, whose children keep the parent's)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    try:
        env: BatchEnv | Exception = make_batch_env(env_id, **env_kwargs)
    except ConfigError as error:  # e.g. an id its parent registered in code a worker never runs
        env = ConfigError(f"a worker process (started with spawn) cannot make {env_id}: {error}")
    while (message := conn.recv()) is not None:
        policy, job = message
        try:
            if isinstance(env, Exception):
                raise env
            conn.send(rollout(policy, env, **job))
        except Exception as error:  # noqa: BLE001 - handed to the parent, which raises it
            conn.send(error)
    if not isinstance(env, Exception):
        env.close()


def _stop_workers(workers: list[tuple[mp.process.BaseProcess, Connection]]) -> None:
    """Ask each worker to end, wait for it (one still busy, its answer unread, is killed), and
    empty ``workers``."""
    for process, conn in workers:
        with contextlib.suppress(OSError):  # (a worker that died closed its end)
            conn.send(None)
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()
        conn.close()
    workers.clear()


def _receive(conns: Sequence[Connection]) -> list[Episodes]:
    """Every worker's answer (so none is left in a pipe), then the first error if any."""
    results = [conn.recv() for conn in conns]
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results
