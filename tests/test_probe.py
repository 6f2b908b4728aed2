"""The model probe: the forms its functions run in, and the parameters its output does not use."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from fastmaml import MAML, TaskBatch
from fastmaml.models import ConvNet, MLP
from fastmaml.probe import has_attention
from problems import SelfAttention, attention_problem, flat_grads, mlp_problem

pytestmark = pytest.mark.usefixtures("float64")  # exact comparisons


def test_finding_the_functions_a_model_calls_leaves_the_random_state_as_it_was():
    """The first call's extra forward (``_probe``) draws no dropout mask of the run's, so a
    resumed run (a fresh MAML) draws what an uninterrupted one does."""
    model = nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    _, loss_fn, batch = mlp_problem()
    probed = MAML(copy.deepcopy(model), loss_fn, 0.1, 1, batched=False)
    probed.evaluate(batch)
    draws = []
    for maml in (probed, MAML(copy.deepcopy(model), loss_fn, 0.1, 1, batched=False)):
        torch.manual_seed(3)
        maml.meta_backward(batch)
        draws.append((flat_grads(maml), torch.rand(3)))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])


class WithUnusedHead(nn.Module):
    """An MLP, a head its forward never calls (e.g. kept for another task), and a term that
    only training mode adds."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.unused_head = MLP([1, 8, 1]), nn.Linear(8, 3)
        self.in_training = nn.Linear(1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + (self.in_training(x) if self.training else 0.0)


@pytest.mark.parametrize("first_call", ["inference_mode", "eval_mode"])
@pytest.mark.parametrize("functional", ["checkpoint_steps", "compile"])
def test_parameters_the_output_does_not_use_keep_no_gradient_like_autograd(functional,
                                                                           first_call):
    """torch.func.grad gives zeros where autograd gives None; AdamW's weight decay would then
    move a parameter no loss uses. The functional branches leave it None too (the unused head's
    learned rates among them), also where the
    first call (the probe) ran under inference_mode, and a parameter the probe's mode did not
    use but training does keeps its gradient."""
    torch.set_default_dtype(torch.float32)
    _, loss_fn, batch = mlp_problem()
    batch = TaskBatch(*(t.float() for t in batch))
    torch.manual_seed(0)
    model = WithUnusedHead()
    reference = MAML(model, loss_fn, 0.1, 1, lr_mode="per_param", batched=True)
    reference.meta_loss(batch)[0].backward()
    assert all(p.grad is None for p in model.unused_head.parameters())
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    maml = MAML(model, loss_fn, 0.1, 1, lr_mode="per_param", batched=True, **{functional: True})
    if first_call == "inference_mode":
        with torch.inference_mode():
            maml.meta_loss(batch)
        assert maml._unused_names is None  # no graph: probed again where gradients are on
    else:
        model.eval()
        maml.evaluate(batch)
        assert "model.in_training.weight" in maml._unused_names  # unused in eval mode
        model.train()
    for _ in range(2):  # compile: the first call picks the path, the second is functional
        maml.zero_grad(set_to_none=True)
        maml.meta_backward(batch)
    assert all(p.grad is None for p in model.unused_head.parameters())
    got = {n: p.grad for n, p in maml.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    assert all(torch.allclose(got[n], expected[n], atol=1e-6) for n in expected)


class NoGradientFor(torch.autograd.Function):
    """x * 2, whose backward gives the weight it is handed no gradient (e.g. straight-through)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor) -> Tensor:
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        return grad * 2, None

    generate_vmap_rule = True


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.gate = MLP([1, 8, 1]), nn.Parameter(torch.ones(3))

    def forward(self, x: Tensor) -> Tensor:
        return NoGradientFor.apply(self.body(x), self.gate)


def test_a_parameter_an_operation_gives_no_gradient_keeps_none_like_autograd():
    """In the graph, yet no gradient: autograd leaves it None, and so does the functional path
    (checkpointed steps; inductor cannot compile this autograd.Function under vmap)."""
    torch.set_default_dtype(torch.float32)
    _, loss_fn, batch = mlp_problem()
    batch = TaskBatch(*(t.float() for t in batch))
    torch.manual_seed(0)
    model = Gated()
    MAML(model, loss_fn, 0.1, 1, batched=False).meta_loss(batch)[0].backward()
    assert model.gate.grad is None and model.body[0].weight.grad is not None
    model.zero_grad(set_to_none=True)
    maml = MAML(model, loss_fn, 0.1, 1, batched=True, checkpoint_steps=True)
    maml.meta_backward(batch)
    assert "model.gate" in maml._unused_names
    assert model.gate.grad is None and model.body[0].weight.grad is not None


def test_finding_the_unused_parameters_runs_no_backward_pass_their_hooks_would_see():
    model, loss_fn, batch = mlp_problem()
    calls = []
    for p in model.parameters():
        p.register_hook(lambda grad: calls.append(1))
    maml = MAML(model, loss_fn, 0.1, 1)
    maml.evaluate(batch)  # the probe, and inner steps on detached copies
    assert calls == [] and maml._unused_names == set()
    maml.meta_loss(batch)[0].backward()
    assert len(calls) == len(list(model.parameters()))


def test_attention_is_found_in_torchs_modules_and_in_forwards_that_call_it():
    assert has_attention(attention_problem(encoder_layer=True)()[0])
    assert has_attention(SelfAttention(4, 5))
    assert not has_attention(MLP([1, 8, 1]))
    assert not has_attention(ConvNet(1, 3, hidden=4, image_size=8))


class Halving(nn.Module):
    """An MLP that first halves its input, in place (``x /= 2``) or not."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place, self.body = in_place, MLP([1, 8, 8, 1])

    def forward(self, x: Tensor) -> Tensor:
        if self.in_place:
            x /= 2
        else:
            x = x / 2
        return self.body(x)


@pytest.mark.parametrize("path", [dict(batched=True), dict(batched=False), dict(batched=None),
                                  dict(batched=True, checkpoint_steps=True)])
def test_a_model_that_changes_its_input_in_place_gets_a_copy_at_each_forward(path):
    """Each of the inner steps, the query's forward and the caller's batch see the input as it
    was: the meta-gradient is the out-of-place model's (the looped path failed in autograd, an
    input saved for backward changed; vmap refused the captured input's change), and the
    caller's tensors, also under inference_mode, stay as they were."""
    _, loss_fn, batch = mlp_problem()
    kept = TaskBatch(*(t.clone() for t in batch))
    grads, predictions = [], []
    for in_place in (False, True):
        torch.manual_seed(0)
        maml = MAML(Halving(in_place), loss_fn, 0.1, 3, **path)
        maml.meta_backward(batch)
        grads.append(flat_grads(maml))
        with torch.inference_mode():
            x = batch.query_x[0].clone()
            predictions.append(maml.predict(maml.adapt(batch.support_x[0], batch.support_y[0]),
                                            x))
            assert torch.equal(x, kept.query_x[0])
        assert all(torch.equal(a, b) for a, b in zip(batch, kept))
    assert torch.allclose(grads[1], grads[0], rtol=1e-12, atol=1e-14)
    assert torch.allclose(predictions[1], predictions[0], rtol=1e-12, atol=1e-14)
