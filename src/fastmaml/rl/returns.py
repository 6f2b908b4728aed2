"""Advantages for the policy-gradient steps: per-task linear feature baseline, GAE, standardisation.

Every function is batched. Tensors are (tasks, trajectories, steps, ...), and ``masks`` are 1.0 for
the steps inside an episode and 0.0 after it ended (rewards there are 0). As in rllab, the value
after the last step of a trajectory is 0, also when the horizon cut it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import NonFiniteLossError

if TYPE_CHECKING:
    from .sampler import Episodes


def _discounted_cumsum(x: Tensor, masks: Tensor, discount: float) -> Tensor:
    """out[t] = sum over k >= t inside the episode of discount^(k-t) x[k] (0 outside)."""
    out = torch.empty_like(x)
    running = torch.zeros_like(x[..., 0])
    for t in reversed(range(x.shape[-1])):
        running = (x[..., t] + discount * running) * masks[..., t]
        out[..., t] = running
    return out


def discounted_returns(rewards: Tensor, masks: Tensor, gamma: float) -> Tensor:
    """Discounted return from every step to the end of its trajectory."""
    return _discounted_cumsum(rewards, masks, gamma)


def baseline_features(observations: Tensor) -> Tensor:
    """rllab's linear-baseline features: clip(obs, +-10), its square, t/100 .. (t/100)^3, 1."""
    obs = observations.clamp(-10.0, 10.0)
    t = torch.arange(obs.shape[-2], dtype=obs.dtype) / 100.0
    t = t.view(-1, 1).expand(*obs.shape[:-1], 1)
    return torch.cat([obs, obs.square(), t, t.square(), t.pow(3), torch.ones_like(t)], dim=-1)


def fit_linear_baseline(observations: Tensor, returns: Tensor, masks: Tensor,
                        reg: float = 1e-5, attempts: int = 5) -> Tensor:
    """Values (tasks, traj, steps) of a ridge regression of returns on features, one per task.

    Solves (F'F + reg I) w = F'R over each task's in-episode steps in float64. A task whose
    system is singular, or whose solution is not finite, is solved again with reg x 10 (at most
    ``attempts`` tries, as rllab).
    """
    features = baseline_features(observations.double())
    tasks, num_features = features.shape[0], features.shape[-1]
    weights = masks.double().unsqueeze(-1)
    design = (features * weights).reshape(tasks, -1, num_features)
    target = (returns.double().unsqueeze(-1) * weights).reshape(tasks, -1, 1)
    gram, moment = design.mT @ design, design.mT @ target
    eye = torch.eye(num_features, dtype=torch.float64)
    ridge = torch.full((tasks, 1, 1), reg, dtype=torch.float64)
    for _ in range(attempts):
        coeffs, info = torch.linalg.solve_ex(gram + ridge * eye, moment)
        bad = (info != 0) | ~torch.isfinite(coeffs).all(dim=(1, 2))
        if not bad.any():
            break
        ridge = torch.where(bad.view(-1, 1, 1), ridge * 10, ridge)
    else:
        raise NonFiniteLossError("the linear baseline has no finite fit: the observations or "
                                 "returns contain NaN or infinite values")
    values = (features.reshape(tasks, -1, num_features) @ coeffs).reshape(returns.shape)
    return values.to(returns.dtype)


def gae(rewards: Tensor, values: Tensor, masks: Tensor, gamma: float = 0.99,
        lam: float = 1.0) -> Tensor:
    """Generalised advantage estimates; lam = 1 gives returns - values."""
    next_values = torch.cat([values[..., 1:] * masks[..., 1:],
                             torch.zeros_like(values[..., :1])], dim=-1)
    deltas = (rewards + gamma * next_values - values) * masks
    return _discounted_cumsum(deltas, masks, gamma * lam)


def standardize(advantages: Tensor, masks: Tensor, eps: float = 1e-8) -> Tensor:
    """Zero mean and unit (population) std per task over its in-episode steps; 0 outside."""
    dims = tuple(range(1, advantages.dim()))
    count = masks.sum(dim=dims, keepdim=True).clamp_min(1.0)
    mean = (advantages * masks).sum(dim=dims, keepdim=True) / count
    var = ((advantages - mean).square() * masks).sum(dim=dims, keepdim=True) / count
    return (advantages - mean) / (var.sqrt() + eps) * masks


def compute_advantages(episodes: Episodes, gamma: float = 0.99, gae_lambda: float = 1.0) -> Tensor:
    """The paper's advantages: baseline fitted per task on these episodes, GAE, standardised."""
    returns = discounted_returns(episodes.rewards, episodes.masks, gamma)
    values = fit_linear_baseline(episodes.observations, returns, episodes.masks)
    advantages = gae(episodes.rewards, values, episodes.masks, gamma, gae_lambda)
    return standardize(advantages, episodes.masks)
