"""Kernels torch differentiates only once, in plain ops that second-order MAML can differentiate.

torch 2.13 has no double backward for ``F.hardsigmoid`` ("derivative for
aten::hardsigmoid_backward is not implemented"; MobileNetV3's squeeze-excitation uses it),
``torch.cdist`` for every ``p`` but 2 and, with ``p=2``, where both sets have at most 25 rows
(its matrix-product form takes over above that) or ``compute_mode`` forbids that form, and
``F.pdist`` ("the derivative for '_pdist_backward' is not implemented"). Second-order MAML
differentiates the inner gradient, so it could not train a model that calls one of them.
``TwiceDifferentiable`` runs each as the same values (to rounding) in elementwise ops, whose
derivatives torch has to any order, batched or looped; a distance of zero has the gradient zero,
as torch gives it. The plain ``cdist`` holds the differences of every pair of rows (P x R x M
numbers), which torch's kernel does not.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

MM_ROWS = 25  # above this many rows in either set, torch's p=2 cdist is a matrix product
ONCE_DIFFERENTIABLE = (F.hardsigmoid, torch.cdist, torch.pdist)


def hardsigmoid(x: Tensor) -> Tensor:
    """0 below -3, 1 above 3, x / 6 + 1/2 between; the gradient 1/6 strictly between (torch's)."""
    inside = (x > -3) & (x < 3)
    return torch.where(inside, x / 6 + 0.5, (x >= 3).to(x.dtype))


def _distance(differences: Tensor, p: float) -> Tensor:
    """The p-norm (p > 0) of ``differences`` over the last dimension; zero, with the gradient
    zero, for a difference of zero (where the p-th root has no derivative)."""
    if p == math.inf:
        return differences.abs().amax(-1)
    powered = differences.abs().pow(p).sum(-1)
    positive = powered > 0
    return torch.where(positive, torch.where(positive, powered, 1.0).pow(1 / p), 0.0)


def cdist(x1: Tensor, x2: Tensor, p: float = 2.0) -> Tensor:
    """``torch.cdist``: the p-norm (p > 0) distance of every row of ``x1`` (..., P, M) to every
    row of ``x2`` (..., R, M), (..., P, R)."""
    return _distance(x1.unsqueeze(-2) - x2.unsqueeze(-3), p)


def pdist(x: Tensor, p: float = 2.0) -> Tensor:
    """``F.pdist``: the p-norm (p > 0) distance of every pair of rows i < j of ``x`` (N, M), in row
    order."""
    first, second = torch.triu_indices(len(x), len(x), offset=1, device=x.device)
    return _distance(x[first] - x[second], p)


def _bind_cdist(x1, x2, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary") -> tuple:
    return x1, x2, p, compute_mode


def _bind_pdist(input, p=2.0) -> tuple:
    return input, p


class TwiceDifferentiable(TorchFunctionMode):
    """Inside this mode ``F.hardsigmoid`` runs as ``hardsigmoid``, and an ``F.pdist`` or a
    ``torch.cdist`` that torch would run without a double backward as ``pdist`` or ``cdist``
    (of p > 0: p = 0 counts the differing features, whose gradient is zero anyway)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.hardsigmoid:
            return hardsigmoid(args[0] if args else kwargs["input"])
        if func is torch.pdist:
            x, p = _bind_pdist(*args, **kwargs)
            if p > 0:
                return pdist(x, p)
        if func is torch.cdist:
            x1, x2, p, compute_mode = _bind_cdist(*args, **kwargs)
            product = (compute_mode == "use_mm_for_euclid_dist"
                       or compute_mode == "use_mm_for_euclid_dist_if_necessary"
                       and max(x1.shape[-2], x2.shape[-2]) > MM_ROWS)
            if p > 0 and not (p == 2 and product):
                return cdist(x1, x2, p)
        return func(*args, **kwargs)
