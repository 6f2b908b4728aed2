"""TRPO for the meta-update (paper section 5.3): conjugate gradient, Hessian-vector products of the
KL, backtracking line search, and the meta-objective on post-update policies.

Generic pieces work on a list of parameters seen as one flat vector
(``parameters_to_vector`` / ``vector_to_parameters``); ``trpo_meta_step`` puts them together for
``fastmaml.MAML`` around a ``GaussianMLPPolicy``.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..core import MAML
from ..errors import ConfigError
from .policy import adapt_policy, gaussian_kl, gaussian_log_prob, policy_forward
from .returns import compute_advantages
from .sampler import Episodes

Objective = Callable[[], tuple[Tensor, Tensor]]


def conjugate_gradient(hvp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10,
                       residual_tol: float = 1e-10) -> Tensor:
    """Approximately solve H x = b for symmetric positive-definite H given as ``hvp(v) = H v``."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr < residual_tol:
            break
        hp = hvp(p)
        alpha = rr / (p @ hp)
        x += alpha * p
        r -= alpha * hp
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def _flat_grad(value: Tensor, params: Sequence[Tensor], create_graph: bool = False,
               retain_graph: bool | None = None) -> Tensor:
    grads = torch.autograd.grad(value, params, create_graph=create_graph,
                                retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for p, g in zip(params, grads)])


def hessian_vector_product(fn: Callable[[], Tensor], params: Sequence[Tensor],
                           damping: float = 1e-5, method: str = "exact",
                           fd_eps: float = 1e-4) -> Callable[[Tensor], Tensor]:
    """``v -> (H + damping I) v`` with H the Hessian of ``fn()`` at the current ``params``.

    ``exact``: double backward through one graph of ``fn``, built here once. ``finite_difference``
    (the paper's): central difference of the gradient, (g(x + e v) - g(x - e v)) / 2e with
    e = fd_eps / |v|; it evaluates ``fn`` twice per product and leaves ``params`` unchanged.
    """
    params = list(params)
    if method == "exact":
        grad = _flat_grad(fn(), params, create_graph=True)

        def exact(v: Tensor) -> Tensor:
            return _flat_grad(grad @ v, params, retain_graph=True).detach() + damping * v
        return exact
    if method != "finite_difference":
        raise ConfigError(f"unknown Hessian-vector product method {method!r}; choose exact or "
                          "finite_difference")

    def finite_difference(v: Tensor) -> Tensor:
        x0 = parameters_to_vector(params).detach()
        eps = fd_eps / (v.norm() + 1e-8)
        grads = []
        for sign in (1.0, -1.0):
            vector_to_parameters(x0 + sign * eps * v, params)
            grads.append(_flat_grad(fn(), params).detach())
        vector_to_parameters(x0, params)
        return (grads[0] - grads[1]) / (2 * eps) + damping * v
    return finite_difference


def line_search(objective: Objective, params: Sequence[Tensor], step: Tensor, loss_before: float,
                max_kl: float, backtrack_ratio: float = 0.8, max_backtracks: int = 15
                ) -> tuple[bool, int, float, float]:
    """Try x - ratio^k step for k = 0 .. max_backtracks - 1; keep the first one whose loss is
    below ``loss_before`` with KL <= ``max_kl``, otherwise restore x.

    Returns (accepted, k, loss, kl) of the last candidate tried.
    """
    x0 = parameters_to_vector(params).detach()
    loss = kl = float("nan")
    for k in range(max_backtracks):
        vector_to_parameters(x0 - backtrack_ratio**k * step, params)
        with torch.no_grad():
            loss_t, kl_t = objective()
        loss, kl = loss_t.item(), kl_t.item()
        if loss < loss_before and kl <= max_kl:
            return True, k, loss, kl
    vector_to_parameters(x0, params)
    return False, max_backtracks, loss, kl


class TRPOStats(NamedTuple):
    """What a TRPO step did: ``loss_after`` and ``kl`` are those of the accepted step, or of the
    last candidate tried when none was accepted (the parameters are then unchanged); and the
    seconds spent on the loss gradient, on conjugate gradient (its Hessian-vector products) and
    on the line search."""

    loss_before: float
    loss_after: float
    kl: float
    accepted: bool
    backtracks: int
    gradient_s: float = 0.0
    cg_s: float = 0.0
    line_search_s: float = 0.0


def trpo_step(params: Sequence[Tensor], objective: Objective, max_kl: float = 0.01,
              cg_iters: int = 10, damping: float = 1e-5, backtrack_ratio: float = 0.8,
              max_backtracks: int = 15, hvp_method: str = "exact") -> TRPOStats:
    """One TRPO update of ``params`` in place.

    ``objective()`` returns (surrogate loss, mean KL(old || current)); the KL is 0 with zero
    gradient at the current ``params``. Step: d = CG(H_KL, grad loss), scaled so that
    0.5 d'Hd = max_kl, then the backtracking line search.
    """
    params = [p for p in params if p.requires_grad]
    start = time.perf_counter()
    loss, _ = objective()
    grad = _flat_grad(loss, params).detach()
    gradient_done = time.perf_counter()
    hvp = hessian_vector_product(lambda: objective()[1], params, damping, hvp_method)
    direction = conjugate_gradient(hvp, grad, cg_iters)
    step_size = torch.sqrt(2 * max_kl / (direction @ hvp(direction) + 1e-8))
    cg_done = time.perf_counter()
    accepted, backtracks, loss_after, kl = line_search(
        objective, params, step_size * direction, loss.item(), max_kl, backtrack_ratio,
        max_backtracks)
    return TRPOStats(loss.item(), loss_after, kl, accepted, backtracks, gradient_done - start,
                     cg_done - gradient_done, time.perf_counter() - cg_done)


def meta_objective(maml: MAML, support: Episodes, query: Episodes, *, gamma: float = 0.99,
                   gae_lambda: float = 1.0) -> Objective:
    """The TRPO meta-objective of MAML for RL, frozen at the current parameters.

    ``support`` was sampled with the pre-update policy, ``query`` with the adapted ones. The
    returned function adapts on ``support`` again (differentiably, through ``adapt_policy``) and
    gives the mean over tasks of the masked means over ``query`` steps of
    -exp(log pi'(a|s) - log pi'_old(a|s)) * A (the surrogate) and of KL(pi'_old || pi').
    """
    support_adv = compute_advantages(support, gamma, gae_lambda)
    query_adv = compute_advantages(query, gamma, gae_lambda)
    obs, actions, masks = query.observations, query.actions, query.masks
    count = masks.sum(dim=(1, 2)).clamp_min(1.0)

    def post_update() -> tuple[Tensor, Tensor]:
        adapted = adapt_policy(maml, support, advantages=support_adv)
        mean, log_std = policy_forward(maml.model, obs.flatten(1, 2), adapted)
        return mean.view_as(actions), log_std.view_as(actions)

    with torch.no_grad():
        old_mean, old_log_std = post_update()
        old_log_prob = gaussian_log_prob(old_mean, old_log_std, actions)

    def objective() -> tuple[Tensor, Tensor]:
        mean, log_std = post_update()
        ratio = torch.exp(gaussian_log_prob(mean, log_std, actions) - old_log_prob)
        surrogate = -((ratio * query_adv * masks).sum(dim=(1, 2)) / count).mean()
        kl = gaussian_kl(old_mean, old_log_std, mean, log_std)
        return surrogate, ((kl * masks).sum(dim=(1, 2)) / count).mean()
    return objective


def trpo_meta_step(maml: MAML, support: Episodes, query: Episodes, *, max_kl: float = 0.01,
                   cg_iters: int = 10, damping: float = 1e-5, backtrack_ratio: float = 0.8,
                   max_backtracks: int = 15, hvp_method: str = "exact", gamma: float = 0.99,
                   gae_lambda: float = 1.0) -> TRPOStats:
    """One meta-update of ``maml`` in place, with the paper's settings by default.

    With ``maml.first_order`` prefer ``hvp_method="exact"``: finite differences also see the
    inner gradient change, which first-order MAML treats as a constant.
    """
    objective = meta_objective(maml, support, query, gamma=gamma, gae_lambda=gae_lambda)
    return trpo_step(list(maml.parameters()), objective, max_kl, cg_iters, damping,
                     backtrack_ratio, max_backtracks, hvp_method)
