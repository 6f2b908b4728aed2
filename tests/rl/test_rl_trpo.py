"""TRPO pieces: conjugate gradient, Hessian-vector products, line search, the meta-update."""
from __future__ import annotations


import math

import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import fastmaml.rl.trpo
from fastmaml import MAML
from fastmaml.errors import ConfigError, NonFiniteInputError, NonFiniteLossError
from fastmaml.rl import (Episodes, GaussianMLPPolicy, Sampler, TRPOObjective, adapt_policy,
                         compute_advantages, conjugate_gradient, env_class, gauss_newton_hvp,
                         gaussian_kl, gaussian_log_prob, hessian_vector_product, meta_objective,
                         policy_forward, reinforce_loss, trpo_meta_step, trpo_step)


def test_conjugate_gradient_solves_spd_system() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(8, 8, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iters=10)
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-8)
    few = conjugate_gradient(lambda v: a @ v, b, iters=2)
    assert (a @ few - b).norm() < b.norm()  # fewer iterations: still a descent on the residual


def _policy_problem(seed: int = 0) -> tuple[GaussianMLPPolicy, torch.Tensor, torch.Tensor,
                                              torch.Tensor]:
    """A policy and one task's data, shaped (tasks 1, trajectories 1, steps 64, ...)."""
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(3, 2, hidden=(16, 16)).double()
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(1, 1, 64, 3, generator=g, dtype=torch.float64)
    actions = torch.randn(1, 1, 64, 2, generator=g, dtype=torch.float64)
    advantages = torch.randn(1, 1, 64, generator=g, dtype=torch.float64)
    return policy, obs, actions, advantages


def _objective(policy: GaussianMLPPolicy, obs: torch.Tensor, actions: torch.Tensor,
               advantages: torch.Tensor) -> TRPOObjective:
    return TRPOObjective(lambda: policy(obs), actions, advantages, torch.ones_like(advantages))


def test_objective_is_the_surrogate_and_kl_by_hand() -> None:
    policy, obs, actions, advantages = _policy_problem()
    masks = torch.ones_like(advantages)
    masks[..., 40:] = 0.0  # an episode that ended after 40 steps
    objective = TRPOObjective(lambda: policy(obs), actions, advantages, masks)
    old_mean, old_log_std = (t.detach().clone() for t in policy(obs))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
        mean, log_std = policy(obs)
    surrogate, kl = objective()
    ratio = torch.exp(gaussian_log_prob(mean, log_std, actions)
                      - gaussian_log_prob(old_mean, old_log_std, actions))
    assert surrogate.item() == pytest.approx(-(ratio * advantages)[..., :40].mean().item())
    assert kl.item() == pytest.approx(
        gaussian_kl(old_mean, old_log_std, mean, log_std)[..., :40].mean().item())


def test_objective_weighs_tasks_alike_whatever_their_episodes_lengths() -> None:
    """The mean over tasks of each task's masked mean (rather than one mean over every step,
    which weighs a task by its steps): a task whose episodes end early counts as much."""
    policy, obs, actions, advantages = _policy_problem()
    obs, actions, advantages = (t.view(2, 1, 32, *t.shape[3:]) for t in (obs, actions, advantages))
    masks = torch.ones_like(advantages)
    masks[1, :, 8:] = 0.0  # task 1's episode ended after 8 steps, task 0's ran 32
    objective = TRPOObjective(lambda: policy(obs), actions, advantages, masks)
    old = [t.detach().clone() for t in policy(obs)]
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
        new = policy(obs)
    surrogate, kl = objective()
    ratio = torch.exp(gaussian_log_prob(*new, actions) - gaussian_log_prob(*old, actions))
    per_step = {"surrogate": -ratio * advantages, "kl": gaussian_kl(*old, *new)}
    expected = {key: (values[0].mean() + values[1][:, :8].mean()) / 2
                for key, values in per_step.items()}
    assert surrogate.item() == pytest.approx(expected["surrogate"].item())
    assert kl.item() == pytest.approx(expected["kl"].item())


def test_a_step_that_does_not_lower_the_loss_is_rejected() -> None:
    """Returns all alike standardise to zero advantages: no candidate lowers the surrogate, so
    the search fails and the parameters stay (a step of no gain was accepted on equality)."""
    policy, obs, actions, advantages = _policy_problem()
    objective = _objective(policy, obs, actions, torch.zeros_like(advantages))
    before = parameters_to_vector(policy.parameters()).clone()
    stats = trpo_step(list(policy.parameters()), objective, max_kl=0.01, hvp_method="exact")
    assert not stats.accepted and torch.equal(parameters_to_vector(policy.parameters()), before)


def test_exact_hvp_matches_finite_difference_and_autograd() -> None:
    policy, obs, _, _ = _policy_problem()
    obs = obs.flatten(0, 2)
    with torch.no_grad():
        old_mean, old_log_std = (t.clone() for t in policy(obs))
        for p in policy.parameters():  # away from the old policy: the KL gradient is nonzero too
            p.add_(0.05 * torch.randn_like(p))
    params = list(policy.parameters())
    names = [name for name, _ in policy.named_parameters()]

    def kl(output: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return gaussian_kl(old_mean, old_log_std, *(output or policy(obs))).mean()

    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    exact = hessian_vector_product(kl, params, damping=0.0)(v)
    before = parameters_to_vector(params).clone()
    finite = hessian_vector_product(kl, params, damping=0.0, method="finite_difference")(v)
    assert torch.equal(parameters_to_vector(params), before)
    assert torch.allclose(exact, finite, rtol=1e-5, atol=1e-8)

    def kl_of(flat: torch.Tensor) -> torch.Tensor:
        chunks = flat.split([p.numel() for p in params])
        state = {n: c.view_as(p) for n, c, p in zip(names, chunks, params)}
        return kl(torch.func.functional_call(policy, state, (obs,)))

    _, reference = torch.autograd.functional.hvp(kl_of, before, v)
    assert torch.allclose(exact, reference, atol=1e-12)
    damped = hessian_vector_product(kl, params, damping=1e-5)(v)
    assert torch.allclose(damped, exact + 1e-5 * v)
    with pytest.raises(ConfigError, match="Hessian-vector"):
        hessian_vector_product(kl, params, method="magic")


@pytest.mark.parametrize("method", ["gauss_newton", "exact", "finite_difference"])
def test_trpo_step_respects_kl_bound_and_improves(method: str) -> None:
    policy, obs, actions, advantages = _policy_problem()
    objective = _objective(policy, obs, actions, advantages)
    before = parameters_to_vector(policy.parameters()).clone()
    stats = trpo_step(list(policy.parameters()), objective, max_kl=0.01, hvp_method=method)
    loss, kl = objective()
    assert stats.accepted and stats.loss_after < stats.loss_before
    assert kl.item() <= 0.01 and kl.item() == pytest.approx(stats.kl)
    assert loss.item() == pytest.approx(stats.loss_after)
    assert not torch.equal(parameters_to_vector(policy.parameters()), before)
    # a quadratic model of the KL: the first candidate lands near the bound, not far inside it
    assert stats.backtracks > 0 or kl.item() > 0.005


def test_a_non_positive_curvature_tries_a_unit_step_instead_of_nan(monkeypatch) -> None:
    """As rllab's optimizer: a finite-difference Hessian-vector product can make d'Hd <= 0."""
    policy, obs, actions, advantages = _policy_problem()
    objective = _objective(policy, obs, actions, advantages)
    exact = fastmaml.rl.trpo.hessian_vector_product
    monkeypatch.setattr(fastmaml.rl.trpo, "hessian_vector_product",
                        lambda *args: (lambda v, hvp=exact(*args): -hvp(v)))  # curvature < 0
    stats = trpo_step(list(policy.parameters()), objective, max_kl=0.01, hvp_method="exact")
    assert math.isfinite(stats.loss_after) and math.isfinite(stats.kl)  # (NaN before)
    assert parameters_to_vector(policy.parameters()).isfinite().all()


def test_line_search_failure_restores_parameters() -> None:
    policy, obs, actions, advantages = _policy_problem()
    objective = _objective(policy, obs, actions, advantages)
    before = parameters_to_vector(policy.parameters()).clone()
    stats = trpo_step(list(policy.parameters()), objective, max_kl=-1.0)  # no KL is <= -1
    assert not stats.accepted and stats.backtracks == 15
    assert torch.equal(parameters_to_vector(policy.parameters()), before)


def test_a_candidate_whose_adaptation_diverges_is_rejected_and_an_error_restores() -> None:
    """MAML.adapt's finite check raises where a candidate's inner step diverges: the line
    search rejects that candidate (as a NaN loss) and goes on backtracking; any other error
    leaves the parameters as they were."""
    policy, obs, actions, advantages = _policy_problem()
    objective = _objective(policy, obs, actions, advantages)
    before = parameters_to_vector(policy.parameters()).clone()
    candidates = []  # the line search's: parameters other than the start

    def raising_at_first_candidate(error: Exception):
        def call() -> tuple[torch.Tensor, torch.Tensor]:
            now = parameters_to_vector(policy.parameters()).clone()
            if not torch.equal(now, before):
                candidates.append(now)
                if len(candidates) == 1:
                    raise error
            return objective()
        return call

    stats = trpo_step(list(policy.parameters()), raising_at_first_candidate(NonFiniteLossError(
        "after 1 inner step(s) on this support set the adapted parameters are not finite")),
        max_kl=0.01, hvp_method="exact")
    assert stats.accepted and stats.backtracks == len(candidates) - 1 >= 1
    assert torch.equal(parameters_to_vector(policy.parameters()), candidates[-1])
    vector_to_parameters(before, policy.parameters())
    candidates.clear()
    with pytest.raises(NonFiniteInputError):  # the data's: raised, the start restored
        trpo_step(list(policy.parameters()), raising_at_first_candidate(NonFiniteInputError(
            "query_y of task 0 holds a NaN or infinite value")), max_kl=0.01,
            hvp_method="exact")
    assert len(candidates) == 1 and torch.equal(parameters_to_vector(policy.parameters()), before)


def _nav_problem() -> tuple[MAML, Episodes, Episodes]:
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(2, 2, hidden=(32, 32)).double()
    with torch.no_grad():  # zero biases put every first step (obs (0, 0)) on a ReLU kink
        for layer in policy.mean[::2]:
            layer.bias.uniform_(-0.1, 0.1)
    maml = MAML(policy, reinforce_loss, inner_lr=0.1)
    tasks = env_class("fastmaml/Nav2D-v0").sample_tasks(3, np.random.default_rng(0))
    sampler = Sampler("fastmaml/Nav2D-v0", horizon=20)
    support = sampler.sample(policy, tasks, 4, seed=0)  # float64 episodes: a float64 policy
    with torch.no_grad():
        adapted = adapt_policy(maml, support)
    return maml, support, sampler.sample(policy, tasks, 4, seed=1, params=adapted)


@pytest.mark.parametrize("gamma, lam", [(0.99, 1.0), (0.5, 0.7)])
def test_meta_objective_at_the_current_parameters(gamma: float, lam: float) -> None:
    maml, support, query = _nav_problem()
    surrogate, kl = meta_objective(maml, support, query, gamma=gamma, gae_lambda=lam)()
    assert kl.item() == pytest.approx(0.0, abs=1e-12)
    # the surrogate's gradient is the policy gradient of the post-update policies, whose
    # support and query advantages take the run's gamma and lambda
    grads = torch.autograd.grad(surrogate, list(maml.parameters()))
    adapted = adapt_policy(maml, support, gamma=gamma, gae_lambda=lam)
    mean, log_std = policy_forward(maml.model, query.observations.flatten(1, 2), adapted)
    log_prob = gaussian_log_prob(mean, log_std, query.actions.flatten(1, 2))
    weights = (compute_advantages(query, gamma, lam) * query.masks).flatten(1, 2)
    count = query.masks.sum(dim=(1, 2))
    pg_loss = -((log_prob * weights).sum(1) / count).mean()
    expected = torch.autograd.grad(pg_loss, list(maml.parameters()))
    for g, e in zip(grads, expected):
        assert torch.allclose(g, e, atol=1e-10)


def test_meta_hvp_exact_matches_finite_difference() -> None:
    maml, support, query = _nav_problem()
    objective = meta_objective(maml, support, query)
    params = list(maml.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    exact = hessian_vector_product(lambda: objective()[1], params)(v)
    finite = hessian_vector_product(lambda: objective()[1], params,
                                    method="finite_difference")(v)
    assert torch.allclose(exact, finite, rtol=1e-4, atol=1e-7)


def test_gauss_newton_hvp_equals_the_exact_kl_hessian_at_the_old_policy() -> None:
    maml, support, query = _nav_problem()
    objective = meta_objective(maml, support, query)
    params = list(maml.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    exact = hessian_vector_product(lambda: objective()[1], params, damping=0.0)(v)
    gauss_newton = gauss_newton_hvp(objective.dist, objective.kl, params, damping=0.0)
    assert torch.allclose(gauss_newton(v), exact, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gauss_newton(2 * v), 2 * exact, rtol=1e-10, atol=1e-12)  # reusable
    damped = gauss_newton_hvp(objective.dist, objective.kl, params, damping=1e-5)(v)
    assert torch.allclose(damped, exact + 1e-5 * v, rtol=1e-10, atol=1e-12)


def test_gauss_newton_needs_a_trpo_objective() -> None:
    policy, obs, actions, advantages = _policy_problem()
    objective = _objective(policy, obs, actions, advantages)
    with pytest.raises(ConfigError, match="TRPOObjective"):
        trpo_step(list(policy.parameters()), lambda: objective(), hvp_method="gauss_newton")


def test_trpo_meta_step() -> None:
    maml, support, query = _nav_problem()
    objective = meta_objective(maml, support, query)
    stats = trpo_meta_step(maml, support, query, max_kl=0.01)
    assert stats.accepted and stats.kl <= 0.01 and stats.loss_after < stats.loss_before
    loss, kl = objective()  # the frozen objective at the updated parameters
    assert loss.item() == pytest.approx(stats.loss_after) and kl.item() == pytest.approx(stats.kl)


def test_one_meta_iteration_in_float32() -> None:
    """The loop a trainer drives (see ``fastmaml.rl``), at a tiny scale."""
    torch.manual_seed(0)
    maml = MAML(GaussianMLPPolicy(2, 2), reinforce_loss, inner_lr=0.1)
    sampler = Sampler("fastmaml/Nav2D-v0", horizon=25)
    tasks = env_class("fastmaml/Nav2D-v0").sample_tasks(4, np.random.default_rng(0))
    for iteration in range(2):
        support = sampler.sample(maml.model, tasks, 5, seed=2 * iteration)
        with torch.no_grad():
            adapted = adapt_policy(maml, support)
        query = sampler.sample(maml.model, tasks, 5, seed=2 * iteration + 1, params=adapted)
        assert support.observations.dtype == query.rewards.dtype == torch.float32
        stats = trpo_meta_step(maml, support, query)
        assert stats.accepted and 0.0 < stats.kl <= 0.01
        assert torch.isfinite(parameters_to_vector(maml.parameters())).all()
