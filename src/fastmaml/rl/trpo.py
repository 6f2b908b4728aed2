"""TRPO for the meta-update (paper section 5.3): conjugate gradient, Hessian-vector products of the
KL, backtracking line search, and the meta-objective on post-update policies.

Generic pieces work on a list of parameters seen as one flat vector
(``parameters_to_vector`` / ``vector_to_parameters``); ``TRPOObjective`` is the surrogate and KL
of a Gaussian policy, and ``trpo_meta_step`` puts them together for ``fastmaml.MAML`` around a
``GaussianMLPPolicy``.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..core import MAML
from ..errors import ConfigError, NonFiniteInputError, NonFiniteLossError
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


def _flat_grad(value: Tensor | Sequence[Tensor], params: Sequence[Tensor],
               create_graph: bool = False, retain_graph: bool | None = None,
               grad_outputs: Sequence[Tensor] | None = None) -> Tensor:
    grads = torch.autograd.grad(value, params, grad_outputs, create_graph=create_graph,
                                retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for p, g in zip(params, grads)])


def hessian_vector_product(fn: Callable[[], Tensor], params: Sequence[Tensor],
                           damping: float = 1e-5, method: str = "exact",
                           fd_eps: float = 1e-4) -> Callable[[Tensor], Tensor]:
    """``v -> (H + damping I) v`` with H the Hessian of ``fn()`` at the current ``params``.

    ``exact``: double backward through one graph of ``fn``, built here once. ``finite_difference``
    (the paper's method): central difference of the gradient, (g(x + e v) - g(x - e v)) / 2e with
    e = fd_eps / |v|, a step of length ``fd_eps`` (the official code's e is 1e-8 / |x|); it
    evaluates ``fn`` twice per product and leaves ``params`` unchanged.
    """
    params = list(params)
    if method == "exact":
        grad = _flat_grad(fn(), params, create_graph=True)

        def exact(v: Tensor) -> Tensor:
            return _flat_grad(grad @ v, params, retain_graph=True).detach() + damping * v
        return exact
    if method != "finite_difference":
        raise ConfigError(f"unknown Hessian-vector product method {method!r}; choose "
                          "gauss_newton, exact or finite_difference")

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


def gauss_newton_hvp(outputs: Callable[[], tuple[Tensor, ...]], divergence: Callable[..., Tensor],
                     params: Sequence[Tensor], damping: float = 1e-5) -> Callable[[Tensor], Tensor]:
    """``v -> (J' D J + damping I) v``, with J the Jacobian of ``outputs()`` with respect to
    ``params`` and D the Hessian of ``divergence(*outputs)`` in the outputs, at the current point.

    That is the Hessian of ``divergence(*outputs())`` wherever the divergence has zero gradient in
    its arguments, as KL(old || current) has at current = old, where TRPO needs it: the same
    products as ``exact`` for less work. ``J v`` comes from differentiating ``J' u`` (built once,
    linear in u) with respect to u, ``J' w`` from the outputs' graph; D acts in the outputs' space
    (elementwise for a Gaussian), so neither product goes back through a double backward.
    """
    params = list(params)
    outs = outputs()
    at = tuple(o.detach().contiguous() for o in outs)  # an expanded log-std cannot be dual
    probes = [torch.zeros_like(o, requires_grad=True) for o in outs]
    transposed = _flat_grad(outs, params, create_graph=True, grad_outputs=probes)
    curvature = torch.func.grad(divergence, argnums=tuple(range(len(at))))

    def product(v: Tensor) -> Tensor:
        jv = torch.autograd.grad(transposed, probes, v, retain_graph=True, allow_unused=True)
        jv = tuple(torch.zeros_like(o) if t is None else t for o, t in zip(at, jv))
        _, djv = torch.func.jvp(curvature, at, jv)
        return (_flat_grad(outs, params, retain_graph=True, grad_outputs=djv).detach()
                + damping * v)
    return product


def line_search(objective: Objective, params: Sequence[Tensor], step: Tensor, loss_before: float,
                max_kl: float, backtrack_ratio: float = 0.8, max_backtracks: int = 15
                ) -> tuple[bool, int, float, float]:
    """Try x - ratio^k step for k = 0 .. max_backtracks - 1; keep the first one whose loss is
    below ``loss_before`` with KL <= ``max_kl``, otherwise restore x (also on an error). A
    candidate whose inner adaptation diverges (``MAML.adapt``'s ``NonFiniteLossError``) is
    rejected, as a NaN loss is.

    Returns (accepted, k, loss, kl) of the last candidate tried.
    """
    x0 = parameters_to_vector(params).detach()
    loss = kl = float("nan")
    accepted = False
    try:
        for k in range(max_backtracks):
            vector_to_parameters(x0 - backtrack_ratio**k * step, params)
            try:
                with torch.no_grad():
                    loss_t, kl_t = objective()
                loss, kl = loss_t.item(), kl_t.item()
            except NonFiniteInputError:  # the data's: no step size mends it
                raise
            except NonFiniteLossError:
                loss = kl = float("nan")
            if loss < loss_before and kl <= max_kl:
                accepted = True
                return True, k, loss, kl
        return False, max_backtracks, loss, kl
    finally:
        if not accepted:
            vector_to_parameters(x0, params)


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


class TRPOObjective:
    """TRPO's objective for a diagonal-Gaussian policy, frozen at the current parameters.

    ``dist()`` gives the policy's differentiable ``(mean, log_std)`` on the episodes'
    observations, shaped like ``actions`` (tasks, trajectories, steps, A). Calling the objective
    gives the mean over tasks of the masked means over steps of
    -exp(log pi(a|s) - log pi_old(a|s)) * A (the surrogate) and of KL(pi_old || pi); ``kl``
    is that KL from given policy outputs (what ``gauss_newton_hvp`` differentiates). The
    official code takes the surrogate so but the KL as one mean over all tasks' steps: the
    same where every task's episodes run the whole horizon (the cheetahs), a weighting of tasks
    by their steps where episodes end early (navigation at the goal, a falling ant).
    """

    def __init__(self, dist: Callable[[], tuple[Tensor, Tensor]], actions: Tensor,
                 advantages: Tensor, masks: Tensor):
        self.dist, self.actions, self.advantages, self.masks = dist, actions, advantages, masks
        self.count = masks.sum(dim=(1, 2)).clamp_min(1.0)
        with torch.no_grad():  # copies: an output may be a view of a parameter (the log-std)
            self.old_mean, self.old_log_std = (t.clone() for t in dist())
            self.old_log_prob = gaussian_log_prob(self.old_mean, self.old_log_std, actions)

    def _masked_mean(self, per_step: Tensor) -> Tensor:
        return ((per_step * self.masks).sum(dim=(1, 2)) / self.count).mean()

    def kl(self, mean: Tensor, log_std: Tensor) -> Tensor:
        return self._masked_mean(gaussian_kl(self.old_mean, self.old_log_std, mean, log_std))

    def __call__(self) -> tuple[Tensor, Tensor]:
        mean, log_std = self.dist()
        ratio = torch.exp(gaussian_log_prob(mean, log_std, self.actions) - self.old_log_prob)
        return -self._masked_mean(ratio * self.advantages), self.kl(mean, log_std)


def trpo_step(params: Sequence[Tensor], objective: Objective, max_kl: float = 0.01,
              cg_iters: int = 10, damping: float = 1e-5, backtrack_ratio: float = 0.8,
              max_backtracks: int = 15, hvp_method: str = "gauss_newton",
              over_tasks: Callable[[Tensor], Tensor] | None = None) -> TRPOStats:
    """One TRPO update of ``params`` in place.

    ``objective()`` returns (surrogate loss, mean KL(old || current)); the KL is 0 with zero
    gradient at the current ``params``. Step: d = CG(H_KL, grad loss), scaled so that
    0.5 d'Hd = max_kl, then the backtracking line search. ``hvp_method="gauss_newton"`` needs a
    ``TRPOObjective``; ``exact`` and ``finite_difference`` take any such function.
    ``over_tasks`` turns a mean over this process's tasks into the mean over every process's
    (``fastmaml.distributed.mean_over_ranks``): it is applied to the gradient, to every
    Hessian-vector product and to the line search's values, so every rank takes the same step.
    """
    params = [p for p in params if p.requires_grad]
    over_tasks = over_tasks or (lambda t: t)
    start = time.perf_counter()
    loss, _ = objective()
    grad = over_tasks(_flat_grad(loss, params).detach())
    loss_before = over_tasks(loss.detach()).item()
    gradient_done = time.perf_counter()
    if hvp_method == "gauss_newton":
        if not isinstance(objective, TRPOObjective):
            raise ConfigError("gauss_newton Hessian-vector products need a TRPOObjective (its "
                              "policy outputs and KL); use exact for other objectives")
        local_hvp = gauss_newton_hvp(objective.dist, objective.kl, params, damping)
    else:
        local_hvp = hessian_vector_product(lambda: objective()[1], params, damping, hvp_method)

    def hvp(v: Tensor) -> Tensor:  # the damping term's shares also sum to damping * v
        return over_tasks(local_hvp(v))
    direction = conjugate_gradient(hvp, grad, cg_iters)
    curvature = direction @ hvp(direction)
    # A finite-difference Hessian (the paper's) can give a non-positive curvature, which has no
    # trust-region step (it was NaN, and the iteration was lost): rllab's optimizer then tries a
    # unit step, which the line search keeps only within max_kl.
    step_size = (torch.sqrt(2 * max_kl / (curvature + 1e-8)) if curvature > 0
                 else torch.ones_like(curvature))
    cg_done = time.perf_counter()
    accepted, backtracks, loss_after, kl = line_search(
        lambda: tuple(over_tasks(value) for value in objective()), params,
        step_size * direction, loss_before, max_kl, backtrack_ratio, max_backtracks)
    return TRPOStats(loss_before, loss_after, kl, accepted, backtracks, gradient_done - start,
                     cg_done - gradient_done, time.perf_counter() - cg_done)


def policy_objective(policy: nn.Module, episodes: Episodes, gamma: float = 0.99,
                     gae_lambda: float = 1.0) -> TRPOObjective:
    """The TRPO objective of ``policy`` on its own episodes (plain TRPO, no adaptation)."""
    obs = episodes.observations
    return TRPOObjective(lambda: policy(obs), episodes.actions,
                         compute_advantages(episodes, gamma, gae_lambda), episodes.masks)


def meta_objective(maml: MAML, support: Episodes, query: Episodes, *, gamma: float = 0.99,
                   gae_lambda: float = 1.0) -> TRPOObjective:
    """The TRPO meta-objective of MAML for RL: the objective of the post-update policies.

    ``support`` was sampled with the pre-update policy, ``query`` with the adapted ones. The
    policy outputs adapt on ``support`` again (differentiably, through ``adapt_policy``) and
    are evaluated on the ``query`` observations.
    """
    support_adv = compute_advantages(support, gamma, gae_lambda)
    obs, actions = query.observations, query.actions

    def post_update() -> tuple[Tensor, Tensor]:
        adapted = adapt_policy(maml, support, advantages=support_adv)
        mean, log_std = policy_forward(maml.model, obs.flatten(1, 2), adapted)
        return mean.view_as(actions), log_std.view_as(actions)
    return TRPOObjective(post_update, actions, compute_advantages(query, gamma, gae_lambda),
                         query.masks)


def trpo_meta_step(maml: MAML, support: Episodes, query: Episodes, *, max_kl: float = 0.01,
                   cg_iters: int = 10, damping: float = 1e-5, backtrack_ratio: float = 0.8,
                   max_backtracks: int = 15, hvp_method: str = "gauss_newton",
                   gamma: float = 0.99, gae_lambda: float = 1.0,
                   over_tasks: Callable[[Tensor], Tensor] | None = None) -> TRPOStats:
    """One meta-update of ``maml`` in place, with the paper's settings by default
    (``over_tasks``: see ``trpo_step``).

    With ``maml.first_order`` prefer ``hvp_method="gauss_newton"`` or ``"exact"``: finite
    differences also see the inner gradient change, which first-order MAML treats as a constant.
    """
    objective = meta_objective(maml, support, query, gamma=gamma, gae_lambda=gae_lambda)
    return trpo_step(list(maml.parameters()), objective, max_kl, cg_iters, damping,
                     backtrack_ratio, max_backtracks, hvp_method, over_tasks)
