"""Kernels torch differentiates only once, in plain ops that second-order MAML can differentiate.

torch 2.13 has no double backward for ``F.hardsigmoid`` ("derivative for
aten::hardsigmoid_backward is not implemented"; MobileNetV3's squeeze-excitation uses it),
``torch.cdist`` for every ``p`` but 2 and, with ``p=2``, where both sets have at most 25 rows
(its matrix-product form takes over above that) or ``compute_mode`` forbids that form, and
``F.pdist`` ("the derivative for '_pdist_backward' is not implemented"). ``p=0`` (a count of
the differing features) stays torch's, and second order refuses it. Second-order MAML
differentiates the inner gradient, so it could not train a model that calls one of them.
``TwiceDifferentiable`` runs each as the same values (to rounding) in elementwise ops, whose
derivatives torch has to any order, batched or looped, with torch's gradients where the formula
has none (a zero distance or coordinate, ties at p = inf). The plain ``cdist`` holds the
differences of every pair of rows (P x R x M numbers), which torch's kernel does not, and it runs
in first order and evaluation too (a model's forward is one for every path): more memory than
torch's kernel for large sets, and likely slower (not timed).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

MM_ROWS = 25  # above this many rows in either set, torch's p=2 cdist is a matrix product
COMPUTE_MODES = ("use_mm_for_euclid_dist_if_necessary", "use_mm_for_euclid_dist",
                 "donot_use_mm_for_euclid_dist")


def hardsigmoid(x: Tensor) -> Tensor:
    """0 below -3, 1 above 3, x / 6 + 1/2 between (and NaN for NaN); the gradient 1/6 strictly
    between, as torch's."""
    inside = ((x > -3) & (x < 3)) | x.isnan()
    return torch.where(inside, x / 6 + 0.5, (x >= 3).to(x.dtype))


def _distance(differences: Tensor, p: float) -> Tensor:
    """The p-norm (p > 0) of ``differences`` over the last dimension, with torch's gradient
    where the formula has none: zero for a zero coordinate (below p = 1 its power's derivative
    is infinite) and for a zero distance (the root's), and at p = inf each coordinate tied at
    the maximum gets its full sign."""
    size = differences.abs()
    if p == math.inf:
        top = size.detach().amax(-1, keepdim=True)
        return top.squeeze(-1) + ((size - size.detach()) * (size.detach() == top)).sum(-1)
    nonzero = size > 0
    powered = torch.where(nonzero, torch.where(nonzero, size, 1.0).pow(p), 0.0).sum(-1)
    positive = powered > 0
    return torch.where(positive, torch.where(positive, powered, 1.0).pow(1 / p), 0.0)


def cdist(x1: Tensor, x2: Tensor, p: float = 2.0) -> Tensor:
    """``torch.cdist``: the p-norm (p > 0) distance of every row of ``x1`` (..., P, M) to every
    row of ``x2`` (..., R, M), (..., P, R)."""
    return _distance(x1.unsqueeze(-2) - x2.unsqueeze(-3), p)


def pdist(x: Tensor, p: float = 2.0) -> Tensor:
    """``F.pdist``: the p-norm (p > 0) distance of every pair of rows i < j of ``x`` (N, M), in
    row order."""
    first, second = torch.triu_indices(len(x), len(x), offset=1, device=x.device)
    return _distance(x[first] - x[second], p)


def _bind_hardsigmoid(input, inplace=False) -> tuple:
    return input, inplace


def _bind_cdist(x1, x2, p=2.0, compute_mode=COMPUTE_MODES[0]) -> tuple:
    return x1, x2, p, compute_mode


def _bind_pdist(input, p=2.0) -> tuple:
    return input, p


def plain_form(func, *args, **kwargs) -> Callable[[], Tensor] | None:  # noqa: ANN001
    """This call in plain ops, to run, where ``TwiceDifferentiable`` takes it over (else None):
    every ``F.hardsigmoid`` (in place where asked); a ``torch.cdist`` or ``F.pdist`` of p > 0 on
    non-empty floating inputs that torch accepts, unless torch runs it as a matrix product
    (p = 2 over more than 25 rows in a set, or asked for), which has a double backward.
    Anything else stays torch's, errors included."""
    if func is F.hardsigmoid:
        x, inplace = _bind_hardsigmoid(*args, **kwargs)
        return (lambda: x.copy_(hardsigmoid(x))) if inplace else lambda: hardsigmoid(x)
    if func is torch.pdist:
        x, p = _bind_pdist(*args, **kwargs)
        taken = x.dim() == 2 and x.is_floating_point() and x.numel() > 0 and p > 0
        return (lambda: pdist(x, p)) if taken else None
    if func is not torch.cdist:
        return None
    x1, x2, p, compute_mode = _bind_cdist(*args, **kwargs)
    if not (compute_mode in COMPUTE_MODES and min(x1.dim(), x2.dim()) >= 2
            and x1.shape[-1] == x2.shape[-1] and x1.dtype == x2.dtype
            and x1.is_floating_point() and x1.numel() > 0 and x2.numel() > 0 and p > 0):
        return None
    product = p == 2 and (compute_mode == "use_mm_for_euclid_dist"
                          or compute_mode == COMPUTE_MODES[0]
                          and max(x1.shape[-2], x2.shape[-2]) > MM_ROWS)
    return None if product else lambda: cdist(x1, x2, p)


class TwiceDifferentiable(TorchFunctionMode):
    """Inside this mode the calls ``plain_form`` takes over run in their plain forms."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        form = plain_form(func, *args, **(kwargs or {}))
        return form() if form else func(*args, **(kwargs or {}))
