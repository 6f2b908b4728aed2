"""Embeddings made exact under vmap, and embedding bags differentiable to second order.

torch 2.13's embedding backward (``embedding_dense_backward``) under ``vmap`` gives the padding
row a gradient: a meta-gradient off by up to 7e-2 (first and second order, float64), and a
padding row that trains. ``ExactEmbeddings`` runs such an ``F.embedding`` as a plain lookup
whose gradient is masked at the padding row: the same values, and autograd's gradient (to any
order). Its ``scale_grad_by_freq`` is off under vmap too, but is not a gradient, and its
second-order autograd is torch's own convention, so ``MAML`` runs such a model on the looped
path instead (``scales_gradient_by_frequency``).

torch 2.13's embedding bag (``F.embedding_bag``, ``nn.EmbeddingBag``) has no second derivative
("the derivative for '_embedding_bag_backward' is not implemented"), batched or looped, so
second-order MAML could not train it. ``ExactEmbeddings`` runs it as a lookup and a reduction
(``embedding_bag``): the same values, and autograd's gradient to any order, under vmap too.
"""
from __future__ import annotations

import torch
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


def _bag_arguments(input, weight, offsets=None, max_norm=None, norm_type=2,
                   scale_grad_by_freq=False, mode="mean", sparse=False, per_sample_weights=None,
                   include_last_offset=False, padding_idx=None) -> dict | None:
    """``embedding_bag``'s arguments for an ``F.embedding_bag`` call it takes over; None for one
    it leaves to torch: with ``max_norm`` (it renormalises the weight in place), ``sparse`` or
    frequency scaling, with no indices, or where torch would refuse the arguments (its error
    then says why; but offsets beyond the indices, which only their values show, are not
    checked)."""
    composes = (max_norm is None and not scale_grad_by_freq and not sparse
                and mode in ("sum", "mean", "max") and input.numel() > 0
                and (per_sample_weights is None
                     or mode == "sum" and per_sample_weights.dtype == weight.dtype
                     and per_sample_weights.shape == input.shape)
                and (padding_idx is None or -len(weight) <= padding_idx < len(weight))
                and (input.dim() == 2 and offsets is None
                     or input.dim() == 1 and offsets is not None and offsets.dim() == 1))
    return {"indices": input, "weight": weight, "offsets": offsets, "mode": mode,
            "per_sample_weights": per_sample_weights, "include_last_offset": include_last_offset,
            "padding_idx": padding_idx} if composes else None


def composes_bag(*args, **kwargs) -> bool:
    """Whether ``embedding_bag`` takes over an ``F.embedding_bag`` call with these arguments
    (``_bag_arguments``)."""
    return _bag_arguments(*args, **kwargs) is not None


def embedding_bag(indices: Tensor, weight: Tensor, offsets: Tensor | None, mode: str,
                  per_sample_weights: Tensor | None, include_last_offset: bool,
                  padding_idx: int | None) -> Tensor:
    """``F.embedding_bag`` as a lookup and a reduction over each bag: (bags, dim). Bags are the
    rows of 2-d ``indices``, or the runs of 1-d ``indices`` that ``offsets`` start. Entries at
    ``padding_idx`` are left out of their bag (and of its mean); an empty bag is zeros; ``max``
    takes, in each dimension, the bag's first largest entry, as torch's kernel does."""
    rows = F.embedding(indices, weight)
    keep = (torch.ones_like(indices, dtype=torch.bool) if padding_idx is None
            else indices != (padding_idx % weight.shape[0])).unsqueeze(-1)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(-1)
    if indices.dim() == 2:
        if mode == "max":
            first = rows.masked_fill(~keep, -torch.inf).argmax(1, keepdim=True)
            return rows.gather(1, first).squeeze(1) * keep.any(1)
        total = (rows * keep).sum(1)
        return total if mode == "sum" else total / keep.sum(1).clamp_min(1)
    starts = offsets[:-1] if include_last_offset else offsets
    position = torch.arange(len(indices), device=indices.device)
    bag = (torch.searchsorted(starts, position, right=True) - 1).unsqueeze(-1).expand_as(rows)
    shape = (len(starts), weight.shape[1])
    if mode == "max":  # each bag's largest value, then the first entry that holds it
        candidates = rows.detach().masked_fill(~keep, -torch.inf)
        largest = candidates.new_full(shape, -torch.inf).scatter_reduce(0, bag, candidates,
                                                                         "amax")
        holders = torch.where(keep & (candidates == largest.gather(0, bag)),
                              position.unsqueeze(-1), len(indices))
        first = torch.full(shape, len(indices), device=indices.device).scatter_reduce(
            0, bag, holders, "amin")
        return rows.gather(0, first.clamp_max(len(indices) - 1)) * (first < len(indices))
    total = rows.new_zeros(shape).index_add(0, bag[:, 0], rows * keep)
    if mode == "sum":
        return total
    return total / rows.new_zeros(shape[0]).index_add(0, bag[:, 0], keep[:, 0].to(rows)
                                                      ).clamp_min(1).unsqueeze(-1)


class ExactEmbeddings(TorchFunctionMode):
    """Inside this mode an ``F.embedding`` with a padding row (``pads``) runs as
    ``padded_embedding``, and an ``F.embedding_bag`` (``composes_bag``) as ``embedding_bag``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding and pads(*args, **kwargs):
            indices, weight, padding_idx, *_ = _bind_embedding(*args, **kwargs)
            return padded_embedding(indices, weight, padding_idx)
        if func is F.embedding_bag and (bag := _bag_arguments(*args, **kwargs)) is not None:
            return embedding_bag(**bag)
        return func(*args, **kwargs)
