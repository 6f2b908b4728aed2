"""The paper's Gaussian MLP policy, diagonal-Gaussian helpers and the REINFORCE inner loss.

The policy is an ordinary ``nn.Module``, so ``fastmaml.MAML`` adapts it like any supervised model:
the support set of a task is ``x = observations`` and ``y = pack_targets(actions, advantages,
masks)``, and ``reinforce_loss(policy(x), y)`` is the inner-loop loss.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..core import MAML
from ..errors import ConfigError
from ..inputs import Params
from .returns import compute_advantages

if TYPE_CHECKING:
    from .sampler import Episodes

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class GaussianMLPPolicy(nn.Module):
    """MLP mean (2 x 100 ReLU by default) and a learned state-independent log-std.

    Weights are Xavier-uniform and biases zero (as the official TensorFlow code); the log-std
    starts at ``log(init_std)``. ``forward`` returns ``(mean, log_std)`` with ``log_std``
    broadcast to the shape of ``mean``.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (100, 100),
                 init_std: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip((obs_dim, *hidden), hidden):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(hidden[-1] if hidden else obs_dim, act_dim))
        self.mean = nn.Sequential(*layers)
        for layer in self.mean:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.log_std = nn.Parameter(torch.full((act_dim,), math.log(init_std)))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.mean(obs)
        return mean, self.log_std.expand_as(mean)


def gaussian_log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """log N(actions; mean, exp(log_std)^2), summed over the last (action) dimension."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - _HALF_LOG_2PI).sum(-1)


def gaussian_kl(mean0: Tensor, log_std0: Tensor, mean1: Tensor, log_std1: Tensor) -> Tensor:
    """KL(N0 || N1) of two diagonal Gaussians, summed over the last dimension."""
    var0, var1 = torch.exp(2 * log_std0), torch.exp(2 * log_std1)
    return (log_std1 - log_std0 + (var0 + (mean0 - mean1).square()) / (2 * var1) - 0.5).sum(-1)


def gaussian_entropy(log_std: Tensor) -> Tensor:
    """Entropy of a diagonal Gaussian, summed over the last dimension."""
    return (log_std + 0.5 + _HALF_LOG_2PI).sum(-1)


def pack_targets(actions: Tensor, advantages: Tensor, masks: Tensor) -> Tensor:
    """``y`` for ``reinforce_loss``: actions (..., A), advantages and masks (...) -> (..., A+2)."""
    return torch.cat([actions, advantages.unsqueeze(-1), masks.unsqueeze(-1)], dim=-1)


def reinforce_loss(output: tuple[Tensor, Tensor], targets: Tensor) -> Tensor:
    """Vanilla policy-gradient loss: -mean of log pi(a|s) * A over the steps inside episodes.

    ``output`` is the policy's ``(mean, log_std)``, ``targets`` is ``pack_targets(...)``.
    """
    mean, log_std = output
    actions, advantages, masks = targets[..., :-2], targets[..., -2], targets[..., -1]
    log_prob = gaussian_log_prob(mean, log_std, actions)
    return -(log_prob * advantages * masks).sum() / masks.sum().clamp_min(1.0)


def policy_forward(policy: nn.Module, obs: Tensor, params: Params | None = None
                   ) -> tuple[Tensor, Tensor]:
    """``(mean, log_std)`` on ``obs`` (tasks, ..., obs_dim).

    ``params`` are per-task parameters with a leading task dimension (``adapt_policy``); names
    they lack use the policy's own. ``None`` runs the policy's own parameters on every task.
    """
    if params is None:
        return policy(obs)
    return vmap(lambda p, o: functional_call(policy, p, (o,)))(params, obs)


def reinforce_data(episodes: Episodes, advantages: Tensor) -> tuple[Tensor, Tensor]:
    """Support ``(x, y)`` per task: (tasks, traj * steps, obs_dim), (tasks, traj * steps, A+2)."""
    y = pack_targets(episodes.actions, advantages, episodes.masks)
    return episodes.observations.flatten(1, 2), y.flatten(1, 2)


def adapt_policy(maml: MAML, episodes: Episodes, *, advantages: Tensor | None = None,
                 start: Params | None = None, lr_scale: float = 1.0, steps: int | None = None,
                 gamma: float = 0.99, gae_lambda: float = 1.0) -> Params:
    """The inner loop on sampled episodes: per-task adapted parameters, stacked over tasks.

    ``advantages`` default to ``compute_advantages(episodes, gamma, gae_lambda)`` (per-task
    linear baseline, GAE, standardised).
    Each task runs ``maml.adapt`` (differentiable with respect to the initialisation when grad
    is enabled, unless ``maml.first_order``). For the test protocol's later steps (fresh episodes
    sampled with the adapted policy, then a share of alpha): ``start`` continues from earlier
    adapted parameters and ``lr_scale`` scales the update; both only under ``torch.no_grad()``.
    ``lr_scale`` scales the whole displacement, which is exact for one inner step.
    """
    if maml.per_step.names:
        raise ConfigError("adapt_policy: a MAML with per_step sets cannot adapt a policy (its "
                          "steps run one at a time, each from the last step's parameters)")
    if (start is not None or lr_scale != 1.0) and torch.is_grad_enabled():
        raise ConfigError("adapt_policy: start and lr_scale are for evaluation under "
                          "torch.no_grad()")
    if advantages is None:
        advantages = compute_advantages(episodes, gamma, gae_lambda)
    x, y = reinforce_data(episodes, advantages)
    per_task = []
    for task in range(x.shape[0]):
        initial = None if start is None else {name: value[task] for name, value in start.items()}
        with _loaded(maml.model, initial):
            adapted = maml.adapt(x[task], y[task], steps)
            if lr_scale != 1.0:
                own = dict(maml.model.named_parameters())
                adapted = {name: own[name] + lr_scale * (p - own[name])
                           for name, p in adapted.items()}
        per_task.append(adapted)
    return {name: torch.stack([p[name] for p in per_task]) for name in per_task[0]}


@contextlib.contextmanager
def _loaded(model: nn.Module, params: Params | None) -> Iterator[None]:
    """Temporarily copy ``params`` into ``model``'s parameters (no-grad evaluation only)."""
    if params is None:
        yield
        return
    own = dict(model.named_parameters())
    saved = {name: own[name].detach().clone() for name in params}
    try:
        for name, value in params.items():
            own[name].data.copy_(value)
        yield
    finally:
        for name, value in saved.items():
            own[name].data.copy_(value)
