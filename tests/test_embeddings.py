"""The embedding bag as a lookup and a reduction: torch's values and gradients, to any order."""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from fastmaml.embeddings import ExactEmbeddings, composes_bag


def bag_inputs(two_d: bool, padding_idx: int | None, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(7, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    if two_d:  # fixed-size bags; the last one all padding (an empty bag)
        indices = torch.randint(0, 7, (4, 5), generator=generator)
        if padding_idx is not None:
            indices[-1] = padding_idx % 7
            indices[0, :2] = padding_idx % 7
        return weight, indices, None
    indices = torch.randint(0, 7, (9,), generator=generator)
    if padding_idx is not None:
        indices[1] = padding_idx % 7
    offsets = torch.tensor([0, 2, 2, 6])  # bag 1 is empty
    return weight, indices, offsets


CASES = [(two_d, mode, padding_idx, weighted, last)
         for two_d, mode, padding_idx, weighted, last in itertools.product(
             (True, False), ("sum", "mean", "max"), (None, 0, -1), (False, True), (False, True))
         if not (weighted and mode != "sum") and not (last and two_d)]


@pytest.mark.parametrize("two_d, mode, padding_idx, weighted, last", CASES)
def test_the_composed_bag_gives_torchs_values_and_gradients(two_d, mode, padding_idx, weighted,
                                                              last):
    weight, indices, offsets = bag_inputs(two_d, padding_idx)
    if last:
        offsets = torch.cat([offsets, torch.tensor([len(indices)])])
    per_sample = (torch.rand(indices.shape, dtype=torch.float64, requires_grad=True)
                  if weighted else None)
    kwargs = {"offsets": offsets, "mode": mode, "per_sample_weights": per_sample,
              "include_last_offset": last, "padding_idx": padding_idx}
    assert composes_bag(indices, weight, **kwargs)
    expected = F.embedding_bag(indices, weight, **kwargs)
    with ExactEmbeddings():
        composed = F.embedding_bag(indices, weight, **kwargs)
    assert composed.grad_fn.name() != expected.grad_fn.name() == "EmbeddingBagBackward0"
    assert composed.shape == expected.shape
    assert torch.allclose(composed, expected, atol=1e-14)
    inputs = [weight] + ([per_sample] if weighted else [])
    cotangent = torch.randn_like(expected)
    ours = torch.autograd.grad((composed * cotangent).sum(), inputs)
    theirs = torch.autograd.grad((expected * cotangent).sum(), inputs)
    assert all(torch.allclose(a, b, atol=1e-14) for a, b in zip(ours, theirs))


def test_the_composed_bag_has_a_second_derivative_torchs_has_not():
    """If the first assertion fails, torch has implemented the second derivative."""
    weight, indices, _ = bag_inputs(True, 0)
    for exact in (False, True):
        with ExactEmbeddings() if exact else contextlib.nullcontext():
            out = F.embedding_bag(indices, weight, mode="mean", padding_idx=0)
        (grad,) = torch.autograd.grad(out.pow(3).sum(), weight, create_graph=True)
        if not exact:
            with pytest.raises(NotImplementedError, match="_embedding_bag_backward"):
                torch.autograd.grad(grad.pow(2).sum(), weight)
            continue
        (second,) = torch.autograd.grad(grad.pow(2).sum(), weight)
        step = 1e-6
        direction = torch.randn_like(weight)

        def first(w: torch.Tensor) -> torch.Tensor:
            with ExactEmbeddings():
                value = F.embedding_bag(indices, w, mode="mean", padding_idx=0)
            return torch.autograd.grad(value.pow(3).sum(), w, create_graph=True)[0].pow(2).sum()
        numeric = (first(weight + step * direction) - first(weight - step * direction)) / (2 * step)
        assert numeric.item() == pytest.approx((second * direction).sum().item(), rel=1e-6)


def test_bags_torch_would_refuse_or_that_renormalise_stay_torchs():
    weight, indices, offsets = bag_inputs(False, None)
    assert not composes_bag(indices, weight, offsets, max_norm=1.0)
    assert not composes_bag(indices, weight, offsets, sparse=True)
    assert not composes_bag(indices, weight, offsets, scale_grad_by_freq=True)
    assert not composes_bag(indices, weight)  # 1-d without offsets: torch says why
    assert not composes_bag(indices, weight, offsets, mode="mean",
                            per_sample_weights=torch.ones(len(indices), dtype=weight.dtype))
    assert not composes_bag(indices, weight, offsets, mode="sum",
                            per_sample_weights=torch.ones(len(indices), dtype=torch.float32))
    for padding_idx in (7, -8):  # out of range for 7 rows
        assert not composes_bag(indices, weight, offsets, padding_idx=padding_idx)
    assert not composes_bag(indices[:0], weight, offsets[:1])  # no indices


@pytest.mark.parametrize("two_d", [True, False])
def test_max_gives_the_gradient_to_the_first_of_tied_rows_as_torch(two_d):
    weight, _, _ = bag_inputs(True, None)
    with torch.no_grad():
        weight[2] = weight[1]
    indices, offsets = ((torch.tensor([[3, 2, 1], [1, 2, 2]]), None) if two_d
                        else (torch.tensor([3, 2, 1, 1, 2, 2]), torch.tensor([0, 3])))
    expected = F.embedding_bag(indices, weight, offsets, mode="max")
    with ExactEmbeddings():
        composed = F.embedding_bag(indices, weight, offsets, mode="max")
    assert composed.grad_fn.name() != expected.grad_fn.name() == "EmbeddingBagBackward0"
    assert torch.equal(composed, expected)
    ours, theirs = (torch.autograd.grad(out.sum(), weight)[0] for out in (composed, expected))
    assert torch.equal(ours, theirs)
