"""Sinusoid regression tasks (paper section 5.1): y = A sin(x - phase)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..inputs import TaskBatch

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


class SinusoidTasks(NamedTuple):
    """A batch of sinusoid tasks: the support/query data and each task's amplitude and phase."""

    batch: TaskBatch
    amplitude: Tensor  # (tasks,)
    phase: Tensor  # (tasks,)


def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator) -> Tensor:
    low, high = bounds
    return torch.rand(shape, generator=generator) * (high - low) + low


def sinusoid(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
    """A sin(x - phase), broadcasting (tasks,) parameters over (tasks, points, 1) inputs."""
    return amplitude[:, None, None] * torch.sin(x - phase[:, None, None])


def sample_sinusoid_tasks(num_tasks: int, k_support: int, k_query: int,
                          generator: torch.Generator) -> SinusoidTasks:
    """A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; support and query drawn independently."""
    amplitude = _uniform((num_tasks,), AMPLITUDE, generator)
    phase = _uniform((num_tasks,), PHASE, generator)
    x = _uniform((num_tasks, k_support + k_query, 1), X_RANGE, generator)
    y = sinusoid(x, amplitude, phase)
    batch = TaskBatch(x[:, :k_support], y[:, :k_support], x[:, k_support:], y[:, k_support:])
    return SinusoidTasks(batch, amplitude, phase)


def with_task_parameters(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
    """The oracle's input: x with the task's amplitude and phase appended as features."""
    params = torch.stack([amplitude, phase], dim=-1)[:, None, :].expand(-1, x.shape[1], -1)
    return torch.cat([x, params], dim=-1)
