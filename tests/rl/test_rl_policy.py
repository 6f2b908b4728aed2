"""Gaussian policy, its distribution helpers, and the REINFORCE inner step through fastmaml.MAML."""
from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from fastmaml import MAML, TaskBatch
from fastmaml.errors import ConfigError
from fastmaml.rl import (Episodes, GaussianMLPPolicy, adapt_policy, compute_advantages,
                         gaussian_entropy, gaussian_kl, gaussian_log_prob, policy_forward,
                         reinforce_data, reinforce_loss)

TASKS, TRAJ, STEPS, OBS, ACT = 3, 4, 6, 5, 2


def _policy() -> GaussianMLPPolicy:
    torch.manual_seed(0)
    return GaussianMLPPolicy(OBS, ACT).double()


def _episodes(seed: int = 1) -> Episodes:
    g = torch.Generator().manual_seed(seed)
    shape = (TASKS, TRAJ, STEPS)
    masks = torch.ones(shape, dtype=torch.float64)
    masks[0, 1, 3:] = 0.0  # one episode ended early
    return Episodes(torch.randn(*shape, OBS, generator=g, dtype=torch.float64),
                    torch.randn(*shape, ACT, generator=g, dtype=torch.float64),
                    torch.randn(shape, generator=g, dtype=torch.float64) * masks, masks)


def test_policy_shapes_and_initial_std() -> None:
    policy = GaussianMLPPolicy(OBS, ACT)
    linear = [m for m in policy.mean if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linear] == [100, 100, ACT]
    mean, log_std = policy(torch.randn(7, 3, OBS))
    assert mean.shape == log_std.shape == (7, 3, ACT)
    assert torch.equal(log_std, torch.zeros_like(log_std))  # std 1.0
    assert all(layer.bias.abs().sum() == 0 for layer in policy.mean
               if isinstance(layer, torch.nn.Linear))
    for layer in linear:  # Xavier-uniform weights, as the official code's: within its bound
        bound = math.sqrt(6 / (layer.in_features + layer.out_features))
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound


def test_distribution_helpers_match_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    m0, m1, a = (torch.randn(10, 3, generator=g, dtype=torch.float64) for _ in range(3))
    s0, s1 = (0.5 * torch.randn(10, 3, generator=g, dtype=torch.float64) for _ in range(2))
    p0, p1 = Normal(m0, s0.exp()), Normal(m1, s1.exp())
    assert torch.allclose(gaussian_log_prob(m0, s0, a), p0.log_prob(a).sum(-1))
    assert torch.allclose(gaussian_kl(m0, s0, m1, s1), kl_divergence(p0, p1).sum(-1))
    assert torch.allclose(gaussian_entropy(s0), p0.entropy().sum(-1))
    assert torch.allclose(gaussian_kl(m0, s0, m0, s0), torch.zeros(10, dtype=torch.float64))


def test_reinforce_loss_is_masked_mean() -> None:
    policy = _policy()
    episodes = _episodes()
    advantages = torch.randn(TASKS, TRAJ, STEPS, dtype=torch.float64) * episodes.masks
    x, y = reinforce_data(episodes, advantages)
    assert x.shape == (TASKS, TRAJ * STEPS, OBS) and y.shape == (TASKS, TRAJ * STEPS, ACT + 2)
    mean, log_std = policy(x[0])
    log_prob = Normal(mean, log_std.exp()).log_prob(episodes.actions[0].reshape(-1, ACT)).sum(-1)
    mask = episodes.masks[0].reshape(-1)
    expected = -(log_prob * advantages[0].reshape(-1) * mask).sum() / mask.sum()
    assert torch.allclose(reinforce_loss(policy(x[0]), y[0]), expected)
    assert torch.equal(y[..., :ACT], episodes.actions.reshape(TASKS, -1, ACT))


def _hand_reinforce_step(policy: GaussianMLPPolicy, x: torch.Tensor, actions: torch.Tensor,
                         advantages: torch.Tensor, masks: torch.Tensor, lr: float
                         ) -> dict[str, torch.Tensor]:
    params = dict(policy.named_parameters())
    mean, log_std = policy(x)
    log_prob = Normal(mean, log_std.exp()).log_prob(actions).sum(-1)
    loss = -(log_prob * advantages * masks).sum() / masks.sum()
    grads = torch.autograd.grad(loss, list(params.values()))
    return {n: (p - lr * g).detach() for (n, p), g in zip(params.items(), grads)}


def test_inner_step_batched_looped_and_by_hand_agree() -> None:
    episodes = _episodes()
    advantages = compute_advantages(episodes)
    x, y = reinforce_data(episodes, advantages)
    qx, qy = reinforce_data(_episodes(seed=2), advantages)
    batch = TaskBatch(x, y, qx, qy)
    results = {}
    for batched in (True, False):
        maml = MAML(_policy(), reinforce_loss, inner_lr=0.1, batched=batched)
        losses = maml.evaluate(batch, steps=1)["loss"]
        meta_loss, _ = maml.meta_loss(batch)
        grads = torch.autograd.grad(meta_loss, list(maml.parameters()))
        results[batched] = (losses, grads)
        assert maml.path == ("batched" if batched else "looped")
    assert torch.allclose(results[True][0], results[False][0], atol=1e-12)
    for g_batched, g_looped in zip(results[True][1], results[False][1]):
        assert torch.allclose(g_batched, g_looped, atol=1e-10)

    maml = MAML(_policy(), reinforce_loss, inner_lr=0.1)
    with torch.no_grad():
        adapted = adapt_policy(maml, episodes)
    for task in range(TASKS):
        expected = _hand_reinforce_step(_policy(), x[task], episodes.actions[task].reshape(-1, ACT),
                                        advantages[task].reshape(-1),
                                        episodes.masks[task].reshape(-1), 0.1)
        for name, value in expected.items():
            assert torch.allclose(adapted[name][task], value, atol=1e-12), name
        # the query loss after one step, as the batched engine computed it
        output = torch.func.functional_call(_policy(), expected, (qx[task],))
        loss = reinforce_loss(output, qy[task])
        assert torch.allclose(results[True][0][task, 1], loss, atol=1e-12)


def test_adapt_policy_is_differentiable_and_policy_forward_uses_task_params() -> None:
    maml = MAML(_policy(), reinforce_loss, inner_lr=0.1)
    episodes = _episodes()
    adapted = adapt_policy(maml, episodes)
    assert all(p.shape[0] == TASKS and p.requires_grad for p in adapted.values())
    obs = episodes.observations.flatten(1, 2)
    mean, log_std = policy_forward(maml.model, obs, adapted)
    mean.sum().backward()
    assert maml.model.mean[0].weight.grad is not None
    for task in range(TASKS):
        single = {n: p[task] for n, p in adapted.items()}
        m, s = torch.func.functional_call(maml.model, single, (obs[task],))
        assert torch.allclose(mean[task], m, atol=1e-12) and torch.allclose(log_std[task], s)
    own_mean, _ = policy_forward(maml.model, obs)
    assert torch.allclose(own_mean, maml.model(obs)[0])


def test_adapt_policy_takes_gamma_and_lambda_for_its_advantages() -> None:
    episodes = _episodes()
    maml = MAML(_policy(), reinforce_loss, inner_lr=0.1)
    with torch.no_grad():
        got = adapt_policy(maml, episodes, gamma=0.5, gae_lambda=0.7)
        want = adapt_policy(maml, episodes, advantages=compute_advantages(episodes, 0.5, 0.7))
        default = adapt_policy(maml, episodes)
    assert all(torch.allclose(got[name], want[name], atol=1e-12) for name in got)
    assert not torch.allclose(got["mean.0.weight"], default["mean.0.weight"])


def test_adapt_policy_later_steps_start_and_lr_scale() -> None:
    episodes = _episodes()
    maml = MAML(_policy(), reinforce_loss, inner_lr=0.1)
    half = MAML(_policy(), reinforce_loss, inner_lr=0.05)
    before = {n: p.clone() for n, p in maml.model.named_parameters()}  # (the start loads into it)
    with torch.no_grad():
        first = adapt_policy(maml, episodes)
        second = adapt_policy(maml, episodes, start=first, lr_scale=0.5)
    advantages = compute_advantages(episodes)
    x, y = reinforce_data(episodes, advantages)
    for task in range(TASKS):
        with torch.no_grad():
            for name, p in half.model.named_parameters():
                p.copy_(first[name][task])
            expected = half.adapt(x[task], y[task])
        for name, value in expected.items():
            assert torch.allclose(second[name][task], value, atol=1e-12)
    assert all(torch.equal(p, before[n]) for n, p in maml.model.named_parameters())
    with pytest.raises(ConfigError, match="no_grad"):
        adapt_policy(maml, episodes, lr_scale=0.5)
    assert math.isclose(maml.inner_lrs.init, 0.1)
    per_step = MAML(_policy(), reinforce_loss, inner_lr=0.1, inner_steps=2, adapt=["mean"],
                    per_step=["log_std"])  # later steps start from the last: sets cannot apply
    with pytest.raises(ConfigError, match="a MAML with per_step sets cannot adapt a policy"):
        adapt_policy(per_step, episodes)
