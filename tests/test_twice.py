"""The plain-op forms of the kernels torch differentiates only once give torch's values and
gradients, and derivatives of every order (``fastmaml.twice``)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastmaml.twice
from fastmaml.twice import MM_ROWS, TwiceDifferentiable

pytestmark = pytest.mark.usefixtures("float64")


def values_and_gradients(call, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """``call(*inputs)`` and the gradient of its sum with respect to each input."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = call(*inputs)
    return [out, *torch.autograd.grad(out.sum(), inputs)]


def assert_plain_form_is_torchs(call, *inputs: torch.Tensor, rtol: float = 1e-10,
                                twice: bool = True) -> None:
    """The same values and gradients inside ``TwiceDifferentiable``, and (``twice``: away from
    kinks) a second derivative there that matches finite differences of the first."""
    expected = values_and_gradients(call, *inputs)
    with TwiceDifferentiable():
        got = values_and_gradients(call, *inputs)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-12)
        if twice:
            inputs = [x.detach().requires_grad_() for x in inputs]
            assert torch.autograd.gradgradcheck(call, inputs)


@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("rows, mode", [(4, "use_mm_for_euclid_dist_if_necessary"),
                                        (MM_ROWS + 1, "donot_use_mm_for_euclid_dist")])
def test_cdist_in_plain_ops_is_torchs(p, rows, mode):
    x1, x2 = torch.randn(2, 1, rows, 3), torch.randn(3, 5, 3)  # batch dimensions broadcast
    assert_plain_form_is_torchs(lambda a, b: torch.cdist(a, b, p, compute_mode=mode), x1, x2)


@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, 2.0, math.inf])
def test_zero_distances_coordinates_and_ties_get_torchs_gradients(p):
    """Where the formula has no gradient (a zero distance, a zero coordinate below p = 1, a tie
    at p = inf), torch's: it was NaN, or split among the tied coordinates."""
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, -1.0], [1.0, 2.0]])  # rows 0, 1 coincide;
    assert_plain_form_is_torchs(lambda a: torch.cdist(a, a[:2], p), x, twice=False)  # tie: 3
    assert_plain_form_is_torchs(lambda a: F.pdist(a, p=p), x, twice=False)
    with TwiceDifferentiable():
        assert F.pdist(x, p)[0] == 0


def test_what_torch_refuses_or_runs_twice_differentiably_stays_torchs(monkeypatch):
    """p = 0, an empty set, a matrix product asked for, and inputs torch refuses."""
    monkeypatch.setattr(fastmaml.twice, "cdist", lambda *args: pytest.fail("replaced"))
    monkeypatch.setattr(fastmaml.twice, "pdist", lambda *args: pytest.fail("replaced"))
    x = torch.randn(4, 3)
    with TwiceDifferentiable():
        torch.cdist(x, x, 0.0), F.pdist(x, 0.0), torch.cdist(x[:0], x)
        torch.cdist(x, x, compute_mode="use_mm_for_euclid_dist")
        with pytest.raises(RuntimeError, match="same number of columns"):
            torch.cdist(x, x[:, :2])
        with pytest.raises(RuntimeError, match="2D"):
            F.pdist(x[None])
        with pytest.raises(ValueError, match="compute_mode"):
            torch.cdist(x, x, compute_mode="use_mm")


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_pdist_in_plain_ops_is_torchs(p):
    assert_plain_form_is_torchs(lambda x: torch.pdist(input=x, p=p), torch.randn(5, 3))


def test_hardsigmoid_in_plain_ops_is_torchs_at_its_edges_in_place_and_for_nan():
    """(torch's gradient is 1/6 in float32, even for float64: 3e-8 off)"""
    x = torch.tensor([-4.0, -3.0, -1.0, 0.0, 2.5, 3.0, 5.0])
    assert_plain_form_is_torchs(F.hardsigmoid, x, rtol=1e-7, twice=False)  # (kinks at +-3)
    assert_plain_form_is_torchs(torch.nn.Hardsigmoid(), torch.randn(6) * 2, rtol=1e-7)
    changed, nan = x.clone(), torch.tensor([float("nan")])
    with TwiceDifferentiable():
        assert F.hardsigmoid(changed, inplace=True) is changed
        assert F.hardsigmoid(nan).isnan().all()
    torch.testing.assert_close(changed, F.hardsigmoid(x))


def test_a_cdist_torch_runs_as_a_matrix_product_stays_torchs(monkeypatch):
    """p=2 with more than 25 rows in a set: torch's matrix-product form has a double backward
    (and uses less memory than the differences of every pair); it is kept."""
    monkeypatch.setattr(fastmaml.twice, "cdist", lambda *args: pytest.fail("replaced"))
    with TwiceDifferentiable():
        torch.cdist(torch.randn(MM_ROWS + 1, 3), torch.randn(4, 3))
