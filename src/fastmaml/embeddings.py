"""Embeddings with a ``padding_idx`` made exact under vmap.

torch 2.13's embedding backward (``embedding_dense_backward``) under ``vmap`` gives the padding
row a gradient: a meta-gradient off by up to 7e-2 (first and second order, float64), and a
padding row that trains. ``ExactEmbeddings`` runs such an ``F.embedding`` as a plain lookup
whose gradient is masked at the padding row: the same values, and autograd's gradient (to any
order). Its ``scale_grad_by_freq`` is off under vmap too, but is not a gradient, and its
second-order autograd is torch's own convention, so ``MAML`` runs such a model on the looped
path instead (``scales_gradient_by_frequency``).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def _bind_embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0,
                    scale_grad_by_freq=False, sparse=False) -> tuple:
    return input, weight, padding_idx, max_norm, scale_grad_by_freq, sparse


def pads(*args, **kwargs) -> bool:
    """Whether an ``F.embedding`` call with these arguments has a padding row that
    ``ExactEmbeddings`` takes over (not with ``max_norm``, ``sparse`` or frequency scaling)."""
    _, _, padding_idx, max_norm, scale_grad_by_freq, sparse = _bind_embedding(*args, **kwargs)
    return padding_idx is not None and max_norm is None and not (scale_grad_by_freq or sparse)


def scales_gradient_by_frequency(*args, **kwargs) -> bool:
    """Whether an ``F.embedding`` call with these arguments has ``scale_grad_by_freq``."""
    return bool(_bind_embedding(*args, **kwargs)[4])


def padded_embedding(indices: Tensor, weight: Tensor, padding_idx: int) -> Tensor:
    """``F.embedding(indices, weight, padding_idx)`` from a plain lookup: the lookup's values,
    and no gradient to the rows looked up at ``padding_idx``."""
    rows = F.embedding(indices, weight)
    padding = padding_idx if padding_idx >= 0 else weight.shape[0] + padding_idx
    values = rows.detach()
    return values + (rows - values) * (indices != padding).unsqueeze(-1)  # values; masked gradient


class ExactEmbeddings(TorchFunctionMode):
    """Inside this mode an ``F.embedding`` with a padding row (``pads``) runs as
    ``padded_embedding``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding and pads(*args, **kwargs):
            indices, weight, padding_idx, *_ = _bind_embedding(*args, **kwargs)
            return padded_embedding(indices, weight, padding_idx)
        return func(*args, **kwargs)
