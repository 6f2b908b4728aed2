"""The MAML engine: meta-gradients against finite differences, batched against looped."""
from __future__ import annotations

import copy
import functools
import inspect
import itertools
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import fastmaml.core
import fastmaml.errors
import fastmaml.inputs
import fastmaml.norms
import fastmaml.probe
from fastmaml import MAML, ConfigError, DataError, NonFiniteLossError, ShapeError, TaskBatch
from fastmaml.errors import NonFiniteInputError
from fastmaml.core import multi_step_loss_weights
from fastmaml.models import MLP, ConvNet, SequenceNet, is_norm_param
from problems import (MORE_MODELS, PROBLEMS, TASKS, EvalAttention, attention_batch, bag_problem,
                      conv_problem, flat_grads, meta_grad, mlp_problem, relative, variant_kwargs,
                      variant_weights, with_lr_modes)

pytestmark = pytest.mark.usefixtures("float64")  # exact comparisons


@pytest.mark.parametrize("problem", MORE_MODELS)
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("lr_mode", ["fixed", "scalar", "per_param", "per_layer_step"])
def test_second_order_meta_gradient_matches_finite_differences(problem, steps, lr_mode):
    model, loss_fn, batch = MORE_MODELS[problem]()
    maml = MAML(model, loss_fn, inner_lr=0.1, inner_steps=steps, lr_mode=lr_mode)
    assert_finite_differences_agree(maml, batch, meta_grad(maml, batch), directions=3)


def assert_finite_differences_agree(maml: MAML, batch: TaskBatch, grad: torch.Tensor,
                                    directions: int, eps: float = 1e-6) -> None:
    """The meta-gradient ``grad`` (flat, over the trainable parameters) against central
    differences of the meta-loss along random directions."""
    params = [p for p in maml.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(1)
    for _ in range(directions):
        direction = [torch.randn(p.shape, generator=generator) for p in params]
        with torch.no_grad():
            values = []
            for sign in (1, -1):
                for p, d in zip(params, direction):
                    p.add_(sign * eps * d)
                values.append(maml.meta_loss(batch)[0].item())
                for p, d in zip(params, direction):
                    p.sub_(sign * eps * d)
        numeric = (values[0] - values[1]) / (2 * eps)
        analytic = torch.dot(grad, torch.cat([d.flatten() for d in direction])).item()
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)


CONFIGS = list(itertools.product(MORE_MODELS, [1, 2], [False, True],
                                 ["fixed", "scalar", "per_param", "per_layer_step"]))


@pytest.mark.parametrize("problem,steps,first_order,lr_mode", CONFIGS)
def test_batched_equals_looped(problem, steps, first_order, lr_mode):
    grads, losses = {}, {}
    for batched in (True, False):
        model, loss_fn, batch = MORE_MODELS[problem]()
        maml = MAML(model, loss_fn, 0.1, steps, first_order, lr_mode=lr_mode, batched=batched)
        grads[batched] = meta_grad(maml, batch)
        losses[batched] = maml.evaluate(batch, steps=3)["loss"]
        assert maml.path == ("batched" if batched else "looped")
    assert relative(grads[True], grads[False]) < 1e-6
    assert relative(losses[True], losses[False]) < 1e-6


@pytest.mark.parametrize("first_order", [False, True])
def test_multihead_attention_in_eval_mode_runs_batched(first_order):
    """The fast path's kernel has no derivative and no batching rule: batched, it failed in
    first order too (torch's error), and the path search did not fall back."""
    batch = attention_batch()
    grads = {}
    for batched in (True, False):
        torch.manual_seed(0)
        maml = MAML(EvalAttention().eval(), F.cross_entropy, 0.1, 2, first_order, batched=batched)
        grads[batched] = meta_grad(maml, batch)
    assert relative(grads[True], grads[False]) < 1e-6
    assert torch.backends.mha.get_fastpath_enabled()  # (turned off only inside the engine)


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("adapt", ["head", "no_norm"])
@pytest.mark.parametrize("first_order", [False, True])
def test_batched_equals_looped_with_anil_and_multi_step_loss(problem, adapt, first_order):
    grads = {}
    for batched in (True, False):
        model, loss_fn, batch = PROBLEMS[problem]()
        selection = (["head"] if problem == "conv_bn" else ["2"]) if adapt == "head" else (
            lambda name, _: not is_norm_param(name, model))
        maml = MAML(model, loss_fn, 0.1, 2, first_order, adapt=selection, batched=batched)
        grads[batched] = meta_grad(maml, batch, step_weights=multi_step_loss_weights(2, 0.3))
    assert relative(grads[True], grads[False]) < 1e-6


class OwnBatchNorm(nn.Module):
    """A batch norm of a model's own (batch statistics, no running ones), as meta-learning
    codebases write it: no ``nn.BatchNorm`` module for fastmaml to find."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True)


@pytest.mark.parametrize("layer", [lambda: nn.BatchNorm2d(4, track_running_stats=False),
                                   lambda: OwnBatchNorm(4)], ids=["module", "own"])
def test_batch_statistics_are_exact_under_vmap_where_the_fused_kernel_is_not(layer, monkeypatch):
    """The trap in the engineering notes: F.batch_norm under vmap, second order, on torch 2.13.

    Wherever batch statistics are used (transductive_bn, or a layer in training mode, also one
    of the model's own) the kernel runs without its weight, applied after it, and agrees with
    the looped reference to 1e-10; with the layer's weight inside (it is adapted per task) it
    does not. If the last assertion ever fails, torch has fixed the kernel and the workaround
    could be reconsidered.
    """
    def grads(transductive: bool) -> dict[bool, torch.Tensor]:
        out = {}
        for batched in (True, False):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), layer(), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(4 * 36, 3))
            _, loss_fn, batch = conv_problem()
            batch = TaskBatch(batch.support_x[..., :6, :6], batch.support_y,
                              batch.query_x[..., :6, :6], batch.query_y)
            maml = MAML(model, loss_fn, 0.1, 2, batched=batched, transductive_bn=transductive)
            out[batched] = meta_grad(maml, batch)
        return out

    for transductive in (True, False):
        ours = grads(transductive)
        assert relative(ours[True], ours[False]) < 1e-10
    monkeypatch.setattr(fastmaml.norms, "NORM_FUNCTIONS", ())  # as if fastmaml saw no norm
    fused = grads(transductive=False)
    assert relative(fused[True], fused[False]) > 1e-5


class BagOfWords(nn.Module):
    """Token sequences -> classes: an embedding (with the given options), averaged, then a head."""

    def __init__(self, **options):
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 6, **options), nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)).mean(1))


def token_batch() -> TaskBatch:
    torch.manual_seed(0)
    return TaskBatch(torch.randint(0, 10, (TASKS, 6, 4)), torch.randint(0, 3, (TASKS, 6)),
                     torch.randint(0, 10, (TASKS, 6, 4)), torch.randint(0, 3, (TASKS, 6)))


@pytest.mark.parametrize("first_order", [False, True])
def test_an_embeddings_padding_row_gets_no_gradient_under_vmap_either(first_order, monkeypatch):
    """torch's embedding backward under vmap trains the padding row (a meta-gradient off by
    ~7e-2); the masked lookup that runs instead agrees with the looped reference, and the
    padding row's gradient is zero. If the last assertion fails, torch has fixed the kernel."""
    def grads() -> dict[bool, MAML]:
        out = {}
        for batched in (True, False):
            torch.manual_seed(1)
            out[batched] = MAML(BagOfWords(padding_idx=0), F.cross_entropy, 0.3, 2,
                                first_order=first_order, batched=batched)
            out[batched].meta_backward(token_batch())
        return out

    ours = grads()
    assert relative(flat_grads(ours[True]), flat_grads(ours[False])) < 1e-10
    assert not any(maml.model.embed.weight.grad[0].any() for maml in ours.values())
    monkeypatch.setattr(fastmaml.probe, "pads", lambda *args, **kwargs: False)  # torch's kernel
    fused = grads()
    assert relative(flat_grads(fused[True]), flat_grads(fused[False])) > 1e-5


@pytest.mark.parametrize("call", ["meta_backward", "forward"])
def test_an_embedding_that_scales_its_gradient_by_frequency_runs_looped(call):
    """vmap scales by the wrong counts, and the scaled 'gradient' has no exact form of ours. The
    warning points at the user's call, not inside fastmaml or torch (``nn.Module.__call__``)."""
    maml = MAML(BagOfWords(scale_grad_by_freq=True), F.cross_entropy, 0.3, 2)
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match="scale_grad_by_freq: vmap scales "
                      "an embedding's gradient by the wrong counts .*; using the looped path"
                      ) as warned:
        line = inspect.currentframe().f_lineno + 1
        maml.meta_backward(token_batch()) if call == "meta_backward" else maml(token_batch())
    assert (warned[0].filename, warned[0].lineno) == (__file__, line)
    assert maml.path == "looped"
    maml = MAML(BagOfWords(scale_grad_by_freq=True), F.cross_entropy, 0.3, 2, batched=True)
    with pytest.raises(ConfigError, match="use batched=None or False"):
        maml.meta_backward(token_batch())


def test_an_operation_torch_cannot_differentiate_twice_is_named_with_the_remedy():
    """A bag scaling its gradient by frequency stays torch's, which has no second derivative:
    second order says so and what to do; first order trains it."""
    model, loss_fn, batch = bag_problem()
    model.bag.scale_grad_by_freq = True
    with pytest.raises(ConfigError, match=r"cannot differentiate an operation of the model twice "
                                          r"\(the derivative for '_embedding_bag_backward' is "
                                          r"not implemented.*\): set first_order=True"):
        MAML(model, loss_fn, 0.1, 1, batched=False).meta_backward(batch)
    model.zero_grad(set_to_none=True)
    MAML(model, loss_fn, 0.1, 1, first_order=True, batched=False).meta_backward(batch)
    assert model.bag.weight.grad is not None
    _, _, batch = conv_problem()  # a kernel whose missing derivative is a RuntimeError
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ConfigError, match=r"twice \(derivative for "
                                          r"aten::multi_margin_loss_backward is not implemented\): "
                                          "set first_order=True"):
        MAML(net, F.multi_margin_loss, 0.1, 1, batched=False).meta_backward(batch)


def test_a_learner_compiled_by_its_user_still_runs_its_norms_exactly():
    """The first call's probe runs eagerly (a graph break) under a user's torch.compile."""
    model, loss_fn, batch = mlp_problem()
    layer_norm = NORMED["layer_norm"]
    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        maml = MAML(layer_norm(), loss_fn, 0.1, 2, batched=True)
        next(m for m in maml.model if isinstance(m, nn.LayerNorm)).weight.data.normal_(1, 0.5)
        loss = (torch.compile(maml, backend="eager") if compiled else maml)(batch)[0]
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(
            loss, list(maml.parameters()))]))
    looped = MAML(copy.deepcopy(maml.model), loss_fn, 0.1, 2, batched=False)
    assert relative(grads[1], meta_grad(looped, batch)) < 1e-10
    assert relative(grads[0], grads[1]) < 1e-10


class OwnLayerNorm(nn.Module):
    """A layer norm of a model's own, as many transformer codebases write it."""

    def __init__(self, size: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(size)), nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


NORMED = {
    "layer_norm": lambda: nn.Sequential(nn.Linear(1, 8), nn.LayerNorm(8), nn.Tanh(),
                                        nn.Linear(8, 1)),
    "own_layer_norm": lambda: nn.Sequential(nn.Linear(1, 8), OwnLayerNorm(8), nn.Tanh(),
                                            nn.Linear(8, 1)),
    "instance_norm": lambda: nn.Sequential(nn.Linear(1, 8), nn.Unflatten(-1, (2, 4)),
                                           nn.InstanceNorm1d(2, affine=True), nn.Tanh(),
                                           nn.Flatten(), nn.Linear(8, 1)),
}


@pytest.mark.parametrize("kind", NORMED)
def test_adapted_layer_and_instance_norm_weights_are_exact_under_vmap(kind, monkeypatch):
    """torch's fused layer and instance norm kernels under vmap, second order, with a weight
    adapted per task, are off; applying the weight outside the kernel (the default) is exact.
    If the last assertion fails, torch has fixed the kernels."""
    def grads() -> dict[bool, torch.Tensor]:
        out = {}
        for batched in (True, False):
            torch.manual_seed(0)
            model = NORMED[kind]()
            next(m for m in model if "Norm" in type(m).__name__).weight.data.normal_(1, 0.5)
            _, loss_fn, batch = mlp_problem()
            out[batched] = meta_grad(MAML(model, loss_fn, 0.1, 2, batched=batched), batch)
        return out

    ours = grads()
    assert relative(ours[True], ours[False]) < 1e-10
    model, x = NORMED[kind](), torch.randn(5, 1)
    for p in model.parameters():
        p.data.normal_()
    with fastmaml.norms.ExactNorms(transductive=False):  # the same forward as written
        inside = model(x)
    torch.testing.assert_close(inside, model(x), rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(fastmaml.norms, "NORM_FUNCTIONS", ())  # as if fastmaml saw no norm
    fused = grads()
    assert relative(fused[True], fused[False]) > 1e-5


def test_instance_norm_keeping_running_statistics_runs_batched_and_leaves_them():
    """``track_running_stats=True`` in training mode: its fused kernel writes the buffers, which
    vmap refuses (the batched path was refused, the default fell back to the loop); the
    statistics are not updated, as batch norm's are not, so it runs batched, exact."""
    grads = {}
    for batched in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1, 8), nn.Unflatten(-1, (2, 4)),
                              nn.InstanceNorm1d(2, affine=True, track_running_stats=True),
                              nn.Tanh(), nn.Flatten(), nn.Linear(8, 1))
        _, loss_fn, batch = mlp_problem()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fall-back to the loop
            grads[batched] = meta_grad(MAML(model, loss_fn, 0.1, 2, batched=batched), batch)
        assert torch.equal(model[2].running_mean, torch.zeros(2))
        assert torch.equal(model[2].running_var, torch.ones(2))
    assert relative(grads[True], grads[False]) < 1e-10


@pytest.mark.parametrize("norm", [nn.BatchNorm1d(4), nn.LayerNorm(4), nn.GroupNorm(2, 4),
                                  nn.InstanceNorm1d(4, affine=True), nn.RMSNorm(4)],
                         ids=lambda norm: type(norm).__name__)
def test_every_norm_layers_parameters_are_norm_parameters(norm):
    """What adapt=no_norm leaves to the outer loop and per_step=norm gives a set per step
    (instance and RMS norm were adapted, and per_step=norm said the model had no norm)."""
    model = nn.Sequential(nn.Linear(3, 4), norm, nn.Linear(4, 2))
    assert [name for name, _ in model.named_parameters() if is_norm_param(name, model)] == [
        f"1.{name}" for name, _ in norm.named_parameters()]


@pytest.mark.parametrize("dim", [0, 1, -1, -2, -3, None])
@pytest.mark.parametrize("api", [parametrizations.weight_norm, nn.utils.weight_norm])
@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_weight_norm_in_plain_ops_is_torchs_weight_for_every_dim(dim, api):
    """The replacement of torch's kernel (wrong double backward) gives its weight: the norm
    over every dimension but ``dim``, over all for None (-1); -2 counted from the end."""
    conv = api(nn.Conv2d(2, 3, 3), dim=dim)
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        for name, p in conv.named_parameters():
            if name.endswith(("original1", "weight_v")):
                p.mul_(torch.rand_like(p) + 0.5)  # rows of other norms
    with fastmaml.norms.ExactNorms(transductive=False):
        inside = conv(x)
    torch.testing.assert_close(inside, conv(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("adapt", [None, ["4"]])  # all, or the head only (ANIL)
@pytest.mark.parametrize("path", ["batched", "looped", "checkpoint_steps"])
def test_first_order_equals_gradient_with_detached_inner_gradients(adapt, path):
    """The inner gradient is a constant of the outer graph, for the adapted parameters and the
    outer-only ones alike (the batched path once kept the latter's second-order term)."""
    model, loss_fn, batch = mlp_problem()
    options = {"checkpoint_steps": True} if path == "checkpoint_steps" else {
        "batched": path == "batched"}
    maml = MAML(model, loss_fn, inner_lr=0.1, inner_steps=2, first_order=True, adapt=adapt,
                **options)
    maml.meta_backward(batch)
    ours = flat_grads(maml)
    params = dict(model.named_parameters())
    adapted = [n for n in params if adapt is None or n.startswith(adapt[0])]
    total = 0.0
    for sx, sy, qx, qy in zip(*batch):
        fast = dict(params)
        for _ in range(2):
            loss = loss_fn(torch.func.functional_call(model, fast, (sx,)), sy)
            inner = torch.autograd.grad(loss, [fast[n] for n in adapted])
            fast.update({n: fast[n] - 0.1 * g.detach() for n, g in zip(adapted, inner)})
        total = total + loss_fn(torch.func.functional_call(model, fast, (qx,)), qy)
    reference = torch.autograd.grad(total / TASKS, list(params.values()))
    assert relative(ours, torch.cat([g.flatten() for g in reference])) < 1e-12
    second_order = MAML(model, loss_fn, 0.1, 2, adapt=adapt)
    assert relative(ours, meta_grad(second_order, batch)) > 1e-4


@pytest.mark.parametrize("batched", [True, False])
def test_first_order_inner_gradient_is_a_constant_of_the_losss_own_parameters(batched):
    """A loss with a parameter of its own (a learned temperature) gets, in first order, the
    query loss's gradient alone: the batched path once kept the inner gradient's dependence on
    it (0.51 against 0.32 in a reviewer's case), so the two paths disagreed."""
    model, _, batch = mlp_problem()
    temperature = nn.Parameter(torch.tensor(0.7))

    def loss_fn(predictions, targets):
        return F.mse_loss(predictions * temperature, targets)

    maml = MAML(model, loss_fn, inner_lr=0.1, inner_steps=2, first_order=True, batched=batched)
    maml.meta_backward(batch)
    ours = torch.cat([flat_grads(maml), temperature.grad.flatten()])
    params = dict(model.named_parameters())
    total = 0.0
    for sx, sy, qx, qy in zip(*batch):
        fast = dict(params)
        for _ in range(2):
            loss = loss_fn(torch.func.functional_call(model, fast, (sx,)), sy)
            inner = torch.autograd.grad(loss, list(fast.values()))  # no graph: constants
            fast = {n: p - 0.1 * g for (n, p), g in zip(fast.items(), inner)}
        total = total + loss_fn(torch.func.functional_call(model, fast, (qx,)), qy)
    reference = torch.autograd.grad(total / TASKS, [*params.values(), temperature])
    assert relative(ours, torch.cat([g.flatten() for g in reference])) < 1e-12


def test_anil_adapts_only_the_selected_parameters():
    model, loss_fn, batch = conv_problem()
    maml = MAML(model, loss_fn, inner_lr=0.5, inner_steps=3, adapt=["head"])
    adapted = maml.adapt(batch.support_x[0], batch.support_y[0])
    assert set(adapted) == {"head.weight", "head.bias"}
    assert not torch.allclose(adapted["head.weight"], model.head.weight)
    with torch.no_grad():
        features = model.features(batch.query_x[0]).mean(dim=(2, 3))
        expected = F.linear(features, adapted["head.weight"], adapted["head.bias"])
        assert torch.allclose(maml.predict(adapted, batch.query_x[0]), expected)
    grad = meta_grad(maml, batch)
    assert grad.abs().sum() > 0
    conv_grad = torch.autograd.grad(maml.meta_loss(batch)[0], model.features[0][0].weight)[0]
    assert conv_grad.abs().sum() > 0  # the outer loop still trains what the inner loop skips


def test_paper_batch_norm_uses_batch_statistics_and_never_updates_buffers():
    model, loss_fn, batch = conv_problem()
    norm = model.features[0][1]
    before = {n: b.clone() for n, b in model.named_buffers()}
    maml = MAML(model, loss_fn, 0.1, 1)
    maml.meta_loss(batch)[0].backward()
    maml.evaluate(batch, steps=2)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert not norm.weight.requires_grad and norm.bias.grad is not None
    model.eval()  # batch statistics even in eval mode: predictions depend on the batch
    x = batch.query_x[0]
    with torch.no_grad():
        alone = maml.predict({}, x[:2])
        together = maml.predict({}, x)[:2]
    assert not torch.allclose(alone, together)


def _graph_nodes(tensor: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that ``tensor`` was computed through."""
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack += [child for child, _ in node.next_functions]
    return names


@pytest.mark.parametrize("eval_mode", [False, True])
def test_batch_norm_runs_torchs_kernel_with_its_adapted_weight_outside(eval_mode, monkeypatch):
    """Batch statistics come from torch's kernel on every path (under vmap its weight and bias
    applied after it): batched and looped agree, with a scale and offset adapted, in training
    mode and (transductive) in eval mode, and match finite differences. With the weight inside
    the kernel, vmap's second-order meta-gradient is off (if the last assertion fails, torch has
    fixed the kernel)."""
    torch.manual_seed(0)
    model = ConvNet(1, 3, hidden=4, strided=True, image_size=8, blocks=2, norm_scale=True)
    model.train(not eval_mode)
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        norm.weight.data.normal_(1, 0.5)
    batch = conv_problem()[2]

    def grads() -> tuple[dict[bool, torch.Tensor], dict[bool, set[str]]]:
        out, nodes = {}, {}
        for batched in (True, False):
            maml = MAML(copy.deepcopy(model), F.cross_entropy, 0.1, 2, batched=batched)
            loss = maml.meta_loss(batch)[0]
            nodes[batched] = _graph_nodes(loss)
            params = [p for p in maml.parameters() if p.requires_grad]
            out[batched] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        return out, nodes

    ours, nodes = grads()
    for batched in (True, False):
        assert "NativeBatchNormBackward0" in nodes[batched]
        assert "NativeLayerNormBackward0" not in nodes[batched]
    assert relative(ours[True], ours[False]) < 1e-10
    looped = MAML(copy.deepcopy(model), F.cross_entropy, 0.1, 2, batched=False)
    assert_finite_differences_agree(looped, batch, ours[False], directions=2)
    monkeypatch.setattr(fastmaml.norms, "batch_stats_norm", lambda x, weight, bias, eps:
                        F.batch_norm(x, None, None, weight, bias, training=True, eps=eps))
    fused, _ = grads()
    assert relative(fused[True], fused[False]) > 1e-5


def test_the_looped_path_runs_batch_norm_with_its_weight_inside_torchs_kernel(monkeypatch):
    """Plain autograd differentiates the whole kernel exactly: the looped path spares the pass
    of a weight applied after it, which vmap needs (and gets)."""
    model, loss_fn, batch = conv_problem()
    affine_calls = []
    affine = fastmaml.norms._affine
    monkeypatch.setattr(fastmaml.norms, "_affine",
                        lambda *args: affine_calls.append(1) or affine(*args))
    calls = {}
    for batched in (True, False):
        maml = MAML(copy.deepcopy(model), loss_fn, 0.1, 2, batched=batched)
        maml.meta_loss(batch)  # (its first call probes the model, eagerly)
        affine_calls.clear()
        maml.meta_loss(batch)
        calls[batched] = len(affine_calls)
    assert calls == {True: 6, False: 0}  # (two norms in each of 3 forwards: 2 steps, query)


def test_adapting_leaves_the_requires_grad_of_the_models_buffers_as_it_was():
    """The first call's probe marks its own aliases of the tensors, never the model's."""
    model, loss_fn, batch = mlp_problem()
    model.register_buffer("scale", torch.ones(1, requires_grad=True))
    model.register_buffer("offset", torch.zeros(1))
    MAML(model, loss_fn, 0.1, 1).adapt(batch.support_x[0], batch.support_y[0])
    assert model.scale.requires_grad and not model.offset.requires_grad


def test_a_custom_outer_loss_on_adapt_follows_the_learners_order():
    """Gradients through ``adapt``'s result are first-order where the learner is (the inner
    gradients constants), as ``meta_loss``'s are."""
    model, loss_fn, batch = mlp_problem()
    one_task = TaskBatch(*(t[:1] for t in batch))
    for first_order in (True, False):
        maml = MAML(model, loss_fn, 0.1, 2, first_order)
        adapted = maml.adapt(one_task.support_x[0], one_task.support_y[0])
        outer = loss_fn(maml.predict(adapted, one_task.query_x[0]), one_task.query_y[0])
        through_adapt = torch.autograd.grad(outer, list(model.parameters()))
        expected = torch.autograd.grad(maml.meta_loss(one_task)[0], list(model.parameters()))
        assert relative(torch.cat([g.flatten() for g in through_adapt]),
                        torch.cat([g.flatten() for g in expected])) < 1e-10, first_order


def test_a_selection_by_name_takes_the_named_module_not_others_it_prefixes():
    """``adapt=["1"]`` is module 1, not 10 (nor ``head`` ``head2``)."""
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)])
    maml = MAML(model, F.mse_loss, adapt=["1"])
    assert sorted(maml.adapt(torch.randn(3, 2), torch.randn(3, 2))) == ["1.bias", "1.weight"]
    per_step = MAML(model, F.mse_loss, inner_steps=2, adapt=["0"], per_step=["1"])
    assert sorted(per_step.per_step.names) == ["1.bias", "1.weight"]


def test_learned_rates_have_the_documented_shapes_and_reuse_the_last_step():
    model, loss_fn, batch = mlp_problem()
    meta_sgd = MAML(model, loss_fn, 0.1, 2, lr_mode="per_param")
    rates = meta_sgd.inner_lrs(0)
    assert all(rates[n].shape == p.shape for n, p in model.named_parameters())
    maml_pp = MAML(model, loss_fn, 0.1, 2, lr_mode="per_layer_step")
    for tensor in maml_pp.inner_lrs.rates.values():
        tensor.data = torch.tensor([0.1, 0.3])
    assert maml_pp.inner_lrs(0)["0.weight"].item() == pytest.approx(0.1)
    assert maml_pp.inner_lrs(1)["0.weight"].item() == pytest.approx(0.3)
    assert maml_pp.inner_lrs(7)["0.weight"].item() == pytest.approx(0.3)
    with pytest.warns(fastmaml.errors.FastMAMLWarning,
                      match="inner step 3 reuses step 2's learned inner learning rates: they were "
                            "learned for inner_steps=2"):
        maml_pp.adapt(batch.support_x[0], batch.support_y[0], steps=3)
    with pytest.raises(ConfigError, match="lr_mode=per_layer_step learns the inner learning "
                                          "rates through the inner steps: it needs inner_steps"):
        MAML(model, loss_fn, 0.1, 0, lr_mode="per_layer_step")
    with warnings.catch_warnings(action="error"):  # nothing learned per step: nothing reused
        meta_sgd.evaluate(batch, steps=5)
        maml_pp.evaluate(batch, steps=2)
    grad = meta_grad(maml_pp, batch)
    assert grad.numel() == sum(p.numel() for p in model.parameters()) + 2 * 6
    torch.set_default_dtype(torch.float32)  # the fixture restores float64
    for mode in ("scalar", "per_param", "per_layer_step"):  # learned in the model's dtype
        rates = MAML(model, loss_fn, 0.1, 2, lr_mode=mode).inner_lrs.parameters()
        assert {r.dtype for r in rates} == {torch.float64}


def test_two_parameters_never_share_a_learned_rate_or_a_per_step_copy():
    """Learned rates and per-step copies are kept under the parameter's name with ``__`` for
    dots, which two names can share (``a.b__c``, ``a__b.c``): refused, not silently shared."""
    model = nn.Sequential()
    model.add_module("enc", nn.ModuleDict({"x__w": nn.Linear(2, 2)}))
    model.add_module("enc__x", nn.ModuleDict({"w": nn.Linear(2, 2)}))
    for mode in ("per_param", "per_layer_step"):
        with pytest.raises(ConfigError, match=r"the parameters enc\.x__w\.weight and "
                           r"enc__x\.w\.weight would share one learned inner learning rate, kept "
                           r"under the name enc__x__w__weight \(dots written as __\)"):
            MAML(model, F.mse_loss, 0.1, 2, lr_mode=mode)
    with pytest.raises(ConfigError, match="would share one per-step copy"):
        MAML(model, F.mse_loss, 0.1, 3, adapt=lambda n, p: n.endswith("bias"),
             per_step=lambda n, p: n.endswith("weight"))
    MAML(model, F.mse_loss, 0.1, 2, lr_mode="scalar")  # one rate for all: nothing to share


def test_more_steps_at_evaluation_than_at_training():
    model, loss_fn, batch = mlp_problem()
    maml = MAML(model, loss_fn, inner_lr=0.05, inner_steps=1)
    curve = maml.evaluate(batch, steps=10)["loss"]
    assert curve.shape == (TASKS, 11)
    support_curve = maml.evaluate(TaskBatch(batch.support_x, batch.support_y,
                                            batch.support_x, batch.support_y), steps=10)["loss"]
    assert (support_curve[:, -1] < support_curve[:, 0]).all()  # adapting lowers the support loss


def test_multi_step_loss_weights_anneal_towards_the_last_step():
    start, middle, end = (multi_step_loss_weights(5, p) for p in (0.0, 0.5, 1.0))
    assert torch.allclose(start, torch.full((5,), 0.2))
    for weights in (start, middle, end):
        assert weights.sum().item() == pytest.approx(1.0)
    assert middle[-1] > start[-1] and end[-1] > middle[-1]
    assert end[0].item() == pytest.approx(0.03 / 5)
    model, loss_fn, batch = mlp_problem()
    maml, weights = MAML(model, loss_fn, 0.1, 2), multi_step_loss_weights(2, 0.3)
    as_list, _ = maml.meta_backward(batch, weights.tolist())  # a plain list of weights works too
    assert as_list.item() == maml.meta_loss(batch, weights)[0].item()
    with pytest.raises(ConfigError, match="a whole number of inner steps >= 1, got 2.5"):
        multi_step_loss_weights(2.5, 0.3)
    with pytest.raises(ConfigError, match="a finite progress"):
        multi_step_loss_weights(3, float("nan"))


# ----- clear errors -----

def test_mismatched_task_counts_and_example_counts_are_named():
    model, loss_fn, batch = mlp_problem()
    maml = MAML(model, loss_fn)
    with pytest.raises(ShapeError, match=r"same leading task dimension, got \{.*\}$"):
        maml.meta_loss(TaskBatch(batch.support_x, batch.support_y, batch.query_x[:2], batch.query_y))
    one_task = TaskBatch(*(t[0] for t in batch))  # 5 support and 6 query examples, no task dim
    with pytest.raises(ShapeError, match=r"'support_x': 5, 'support_y': 5, 'query_x': 6, "
                                         r"'query_y': 6\}; if this is one task, add its task dimension"):
        maml.meta_loss(one_task)
    with pytest.raises(ShapeError, match="same number of examples"):
        maml.meta_loss(TaskBatch(batch.support_x, batch.support_y[:, :3], batch.query_x, batch.query_y))
    with pytest.raises(ShapeError, match="four tensors"):
        maml.meta_loss((batch.support_x, batch.support_y))
    with pytest.raises(ShapeError, match=r"four tensors.*got 4 items: ndarray, ndarray, Tensor, "
                                         r"Tensor \(torch.as_tensor converts arrays\)"):
        maml.meta_loss((batch.support_x.numpy(), batch.support_y.numpy(), *batch[2:]))
    with pytest.raises(ShapeError, match=r"got one tensor of shape \(3, 5, 1\)$"):
        maml.meta_loss(batch.support_x)
    with pytest.raises(ShapeError, match=r"got 2 items: Tensor, Tensor$"):
        maml.meta_loss((batch.support_x, batch.support_y))
    with pytest.raises(ShapeError, match="as a dict needs the keys .*; missing query_x, query_y"):
        maml.meta_loss({"support_x": batch.support_x, "support_y": batch.support_y,
                        "query": batch.query_x})
    with pytest.raises(ShapeError, match="at least one task, got 0"):
        maml.meta_backward(TaskBatch(*(t[:0] for t in batch)))
    with pytest.raises(ShapeError, match=r"support_x \(3, 0, 1\) holds no examples"):
        maml.evaluate(TaskBatch(batch.support_x[:, :0], batch.support_y[:, :0], *batch[2:]))


@pytest.mark.parametrize("batched", [None, True, False])
def test_labels_the_loss_cannot_take_are_named(batched):
    model, loss_fn, batch = conv_problem()
    bad = TaskBatch(batch.support_x, batch.support_y + 7, batch.query_x, batch.query_y)
    with pytest.raises(ShapeError, match=r"loss_fn or metric_fn failed on a task's predictions "
                                         r"\(6, 3\) torch.float64 and targets \(6,\) torch.int64"):
        MAML(model, loss_fn, batched=batched).meta_backward(bad)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_class_labels_of_another_integer_width_work_batched_looped_and_in_adapt(dtype):
    """vmap's batching rules take int32 labels where torch's cross-entropy refuses them, so
    the default path (which may be either) used to depend on timing; now every path takes them
    as the int64 labels they are."""
    model, loss_fn, batch = conv_problem()
    narrow = TaskBatch(batch.support_x, batch.support_y.to(dtype), batch.query_x,
                       batch.query_y.to(dtype))
    expected = MAML(copy.deepcopy(model), loss_fn, batched=False).meta_loss(batch)[0]
    for batched in (True, False):
        maml = MAML(copy.deepcopy(model), loss_fn, batched=batched)
        torch.testing.assert_close(maml.meta_loss(narrow)[0], expected)
        torch.testing.assert_close(maml.evaluate(narrow)["loss"], maml.evaluate(batch)["loss"])
    adapted = maml.adapt(narrow.support_x[0], narrow.support_y[0])
    torch.testing.assert_close(adapted, maml.adapt(batch.support_x[0], batch.support_y[0]))


@pytest.mark.parametrize("batched", [None, True, False])
@pytest.mark.parametrize("loss, name", [(F.mse_loss, "mse_loss"), (nn.MSELoss(), "MSELoss"),
                                        (functools.partial(F.l1_loss, reduction="sum"),
                                         "l1_loss")])
def test_targets_an_elementwise_loss_would_broadcast_are_refused(batched, loss, name):
    model, _, batch = mlp_problem()  # predictions (tasks, K, 1)
    flat = TaskBatch(batch.support_x, batch.support_y[..., 0], batch.query_x, batch.query_y)
    with pytest.raises(ShapeError, match=rf"{name} would broadcast a task's predictions "
                                         r"\(\d+, 1\) and targets \(\d+,\)"):
        MAML(model, loss, batched=batched).meta_loss(flat)
    maml = MAML(model, loss)
    with pytest.raises(ShapeError, match=rf"{name} would broadcast.*\(e.g. y\[..., None\]\)"):
        maml.adapt(batch.support_x[0], batch.support_y[0, :, 0])
    with pytest.raises(ShapeError, match=r"\(e.g. y.reshape\(5, 1\)\)"):  # one dimension too many
        maml.adapt(batch.support_x[0], batch.support_y[0, :, :, None])


@pytest.mark.parametrize("batched", [None, True, False])
def test_targets_a_hand_written_elementwise_loss_would_broadcast_are_warned_of_once(batched):
    """A loss of one's own, ((p - y) ** 2).mean(), of predictions (K, 1) and targets (K,) is the
    mean over K x K pairs: no torch loss is there to refuse it, so it is said."""
    model, _, batch = mlp_problem()
    flat = TaskBatch(batch.support_x, batch.support_y[..., 0], batch.query_x, batch.query_y)

    def squared_error(predictions, y):
        return ((predictions - y) ** 2).mean()

    maml = MAML(model, squared_error, batched=batched)
    with pytest.warns(fastmaml.errors.FastMAMLWarning) as said:
        maml.meta_loss(flat)
        maml.evaluate(flat, steps=2)
    shown = [str(w.message) for w in said if "broadcasts them" in str(w.message)]
    k = batch.support_x.shape[1]
    assert shown == [f"loss_fn gets a task's predictions ({k}, 1) and targets ({k},): an "
                     "element-wise loss of the two, such as ((predictions - y) ** 2).mean(), "
                     f"broadcasts them to ({k}, {k}), every prediction against every target; "
                     "give targets shaped as the model's output (y[..., None]), unless loss_fn "
                     "reshapes them itself"]
    with warnings.catch_warnings(action="error"):  # targets shaped as the output: nothing said
        MAML(model, squared_error, batched=batched).meta_loss(batch)
        support, query = (torch.zeros(y.shape[:2], dtype=torch.long)  # class indices: not said
                          for y in (batch.support_y, batch.query_y))
        labels = TaskBatch(batch.support_x, support, batch.query_x, query)
        MAML(model, lambda p, y: F.cross_entropy(p, y), batched=batched).meta_loss(labels)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                 "allocate memory: you tried to allocate 4000000000000 bytes.")])
def test_out_of_memory_in_the_model_or_loss_is_not_called_a_shape_error(error):
    model, loss_fn, batch = mlp_problem()

    def exhausted(*args):
        raise error  # the CLI advises on it

    with pytest.raises(type(error), match="memory"):
        MAML(model, exhausted, batched=False).meta_loss(batch)
    model.register_forward_hook(lambda *args: exhausted())
    with pytest.raises(type(error), match="memory"):
        MAML(model, loss_fn, batched=False).meta_loss(batch)


def test_input_that_does_not_fit_the_model_is_named():
    model, loss_fn, _ = mlp_problem()
    bad = TaskBatch(*(torch.randn(2, 4, 3) for _ in range(4)))
    for batched in (None, True, False):
        with pytest.raises(ShapeError, match=r"forward failed on a per-task input of shape \(4, 3\)"):
            MAML(model, loss_fn, batched=batched).meta_loss(bad)
    single = TaskBatch(*(t.float() if t.is_floating_point() else t for t in mlp_problem()[2]))
    for batched in (None, True, False):  # float32 tasks, a float64 model
        with pytest.raises(ShapeError, match=r"\(the input is torch.float32 but the model's "
                                             r"parameters are torch.float64: convert one"):
            MAML(model, loss_fn, batched=batched).meta_loss(single)
    pixels = torch.randint(0, 256, (4, 1), dtype=torch.uint8)  # images not yet made floats
    with pytest.raises(ShapeError, match=r"\(the input is torch.uint8 and the model's parameters "
                                         r"torch.float64: a model of no embedding takes "
                                         r"floating-point inputs, e.g. x.float\(\)"):
        MAML(model, loss_fn).adapt(pixels, torch.randn(4, 1))


def test_negative_steps_and_empty_selection_are_config_errors():
    model, loss_fn, batch = mlp_problem()
    with pytest.raises(ConfigError, match="inner_steps"):
        MAML(model, loss_fn, inner_steps=-1)
    maml = MAML(model, loss_fn)
    for steps in (-2, 2.0, True):
        with pytest.raises(ConfigError, match=rf"steps must be an integer >= 0, got {steps}"):
            maml.evaluate(batch, steps=steps)
        with pytest.raises(ConfigError, match=rf"steps must be an integer >= 0, got {steps}"):
            maml.adapt(batch.support_x[0], batch.support_y[0], steps=steps)
    with pytest.raises(ConfigError, match="the adapt selection matches no trainable parameter"):
        MAML(model, loss_fn, adapt=lambda name, parameter: False)
    with pytest.raises(ConfigError, match=r"adapt prefix\(es\) 'haed' match no trainable "
                                          r"parameter of the model; its trainable parameters: "):
        MAML(model, loss_fn, adapt=["2", "haed"])  # one misspelled among good ones
    with pytest.raises(ConfigError, match=r"adapt must be None \(all parameters\), name "
                                          r"prefixes .* got 1"):
        MAML(model, loss_fn, adapt=1)
    with pytest.raises(ShapeError, match=r"step_weights must be 1-d, one weight per inner step "
                                         r".*got shape \(\)"):
        maml.meta_loss(batch, step_weights=torch.tensor(1.0))
    with pytest.raises(ConfigError, match="unknown inner-lr mode"):
        MAML(model, loss_fn, lr_mode="adaptive")
    for bad, message in ((dict(inner_steps=True), "inner_steps must be an integer"),
                         (dict(inner_lr=float("nan")), "inner_lr must be a number >= 0 and "
                                                        "finite"),
                         (dict(inner_lr=-0.1), "inner_lr must be a number >= 0"),
                         (dict(inner_lr="0.01"), "inner_lr must be a number >= 0"),
                         (dict(inner_lr=torch.tensor(0.1, requires_grad=True)),
                          "not a tensor: to learn it, give lr_mode='scalar'"),
                         (dict(first_order="false"), "first_order must be True or False, got "
                                                     "'false'"),
                         (dict(batched=1), r"batched must be True or False \(or None\), got 1"),
                         (dict(chunk_size=0), r"chunk_size must be an integer >= 1 \(or None"),
                         (dict(chunk_size=True), "chunk_size must be an integer >= 1")):
        with pytest.raises(ConfigError, match=message):
            MAML(model, loss_fn, **bad)
    # numpy's scalars, e.g. read from a data file, are numbers as Python's are
    maml = MAML(model, loss_fn, inner_lr=np.float32(0.1), inner_steps=np.int64(2),
                first_order=np.bool_(True), chunk_size=np.int64(2))
    maml.adapt(batch.support_x[0], batch.support_y[0], steps=np.int64(1))


def test_a_model_and_loss_of_the_wrong_kind_are_named():
    model, loss_fn, _ = mlp_problem()
    with pytest.raises(ConfigError, match=r"model must be an nn.Module, got a function \(are "
                                          r"model and loss_fn swapped\?\)"):
        MAML(F.mse_loss, model)
    with pytest.raises(ConfigError, match="loss_fn must be a function .* got 'mse'"):
        MAML(model, "mse")
    with pytest.raises(ConfigError, match="metric_fn must be a function"):
        MAML(model, loss_fn, metric_fn="accuracy")

    class TwoInputs(nn.Module):  # (torch's TypeError from inside the first forward before)
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(1, 1)

        def forward(self, x, z, scale=1.0):
            return self.linear(x + z)

    with pytest.raises(ConfigError, match=r"the model's forward takes 2 inputs \(x, z\), but "
                                          "MAML calls it with one tensor.*: concatenate them"):
        MAML(TwoInputs(), loss_fn)

    class Masked(nn.Linear):  # its second input keyword-only: never given either
        def forward(self, x, *, mask):
            return super().forward(x) * mask

    with pytest.raises(ConfigError, match=r"the model's forward takes 2 inputs \(x, mask "
                                          r"\(keyword-only\)\), but MAML calls it with one"):
        MAML(Masked(1, 1), loss_fn)

    class Named(nn.Linear):
        def forward(self, *, x):
            return super().forward(x)

    with pytest.raises(ConfigError, match=r"takes 1 input \(x \(keyword-only\)\), but MAML "
                                          "calls it with one tensor, a task's inputs, as its "
                                          "first argument"):
        MAML(Named(1, 1), loss_fn)
    fed = TwoInputs()  # its second input given by a forward pre-hook: a model of one input
    fed.register_forward_pre_hook(lambda module, args: (args[0], torch.ones_like(args[0])))
    _, _, batch = mlp_problem()
    MAML(fed, loss_fn).meta_backward(batch)


def test_a_lazy_module_not_run_yet_is_named_and_trains_once_run():
    """torch's "Can't access the shape of an uninitialized parameter" came from inside MAML."""
    model = nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.Linear(8, 1))
    with pytest.raises(ConfigError, match=r"the model's 0.weight, 0.bias are not initialized yet "
                                          r"\(a lazy module, e.g. nn.LazyLinear\): run the model "
                                          "once on an example input"):
        MAML(model, F.mse_loss)
    _, loss_fn, batch = mlp_problem()
    model(batch.support_x[0])
    loss, _ = MAML(model, loss_fn, 0.1, 1).meta_backward(batch)
    assert torch.isfinite(loss) and model[0].weight.grad.shape == (8, 1)


def test_spectral_norm_whose_estimate_maml_never_advances_is_said():
    """Its power-iteration vectors are buffers, which MAML's forwards leave as they are: after
    training, the weight's spectral norm was 1.09, not 1, unsaid."""
    model = nn.Sequential(parametrizations.spectral_norm(nn.Linear(1, 8)), nn.Tanh(),
                          nn.utils.spectral_norm(nn.Linear(8, 1)))
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match=r"spectral_norm on 0.weight, "
                      r"2.weight: its power iteration keeps its vectors in buffers, which MAML's "
                      "forwards leave as they are"):
        MAML(model, F.mse_loss)


def test_meta_backward_without_gradients_is_named():
    model, loss_fn, batch = mlp_problem()
    with torch.no_grad(), pytest.raises(ConfigError, match=r"gradients are off here \(torch."
                                                           r"no_grad or inference_mode\)"):
        MAML(model, loss_fn).meta_backward(batch)


class Dict(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x}


def test_non_scalar_loss_is_named_and_a_bool_metric_is_averaged():
    model, _, batch = mlp_problem()
    for batched in (True, False):
        maml = MAML(model, lambda p, y: (p - y).pow(2), batched=batched)
        with pytest.raises(ShapeError, match=r"must return a scalar tensor per task, got shape "
                                             r"\(5, 1\)"):
            maml.meta_loss(batch)
    with pytest.raises(ShapeError, match="must return a scalar tensor per task, got a float"):
        MAML(model, lambda p, y: 0.5, batched=False).meta_loss(batch)
    with pytest.raises(ConfigError, match="need a whole number of inner steps >= 1, got 0"):
        multi_step_loss_weights(0, 0.5)
    close = MAML(model, F.mse_loss, metric_fn=lambda p, y: ((p - y).abs() < 1).all())
    torch.set_default_dtype(torch.float32)  # (the float64 fixture restores it)
    share = close.evaluate(batch, steps=1)["metric"]  # a bool per task, in the default dtype
    assert share.dtype == torch.float32 != model[0].weight.dtype
    assert set(share.flatten().tolist()) <= {0.0, 1.0}
    as_dict = nn.Sequential(model, Dict())  # a model whose output is not a tensor
    with pytest.raises(ShapeError, match=r"predictions \(a dict\) and targets \(5, 1\)"):
        MAML(as_dict, lambda out, y: out["y"] @ y).meta_loss(batch)


def test_nan_meta_loss_is_named_with_the_input_that_causes_it():
    """A diverged model is told to lower its learning rates; a NaN in the data is named."""
    model, loss_fn, batch = mlp_problem()
    query_y = batch.query_y.clone()
    query_y[2, 1] = float("nan")
    with pytest.raises(NonFiniteInputError, match="meta-loss is nan: query_y of task 2 holds a "
                                                  "NaN or infinite value"):
        MAML(model, loss_fn).meta_loss(batch._replace(query_y=query_y))
    with pytest.raises(DataError, match="meta-loss is nan: step_weights holds a NaN"):  # (one)
        MAML(model, loss_fn, inner_steps=2).meta_loss(batch, [float("nan"), 1.0])
    diverging = copy.deepcopy(model)
    with torch.no_grad():
        diverging[0].weight.fill_(1e200)  # finite, but its inner steps overflow
    with pytest.raises(NonFiniteLossError, match="meta-loss is nan: lower inner_lr or the meta "
                                                 "learning rate"):
        MAML(diverging, loss_fn, inner_lr=1e10).meta_loss(batch)
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))  # (as after a diverged meta-step)
    with pytest.raises(NonFiniteLossError, match=r"meta-loss is nan: model\.0\.weight holds a NaN "
                       r"or infinite value \(set so, or after a diverged meta-step\): lower "
                       "inner_lr or the meta learning rate"):
        MAML(model, loss_fn).meta_loss(batch)
    model, _, _ = mlp_problem()
    maml = MAML(model, loss_fn, lr_mode="per_param")
    with torch.no_grad():
        next(iter(maml.inner_lrs.parameters()))[0] = float("nan")  # a learned rate
    with pytest.raises(NonFiniteLossError, match=r"meta-loss is nan: inner_lrs\.\S+ holds a NaN"):
        maml.meta_loss(batch)
    # the loss's own NaN (0/0: a task's query labels all ignored), with no inner step to blame
    labels = TaskBatch(batch.support_x, torch.zeros(TASKS, 5, dtype=torch.long), batch.query_x,
                       torch.full((TASKS, 6), -100))
    for steps, said in ((0, "meta-loss is nan: lower the meta learning rate, or clip the "
                            "meta-gradient; or loss_fn itself returns it"),
                        (1, "lower inner_lr .*; or loss_fn itself returns it \\(e.g. a "
                            "cross-entropy whose labels of a task are all ignore_index\\)")):
        with pytest.raises(NonFiniteLossError, match=said):
            MAML(nn.Linear(1, 2), F.cross_entropy, inner_steps=steps).meta_loss(labels)


def test_non_finite_adapted_parameters_are_named_by_adapt():
    """adapt checks its result as the meta-loss is checked: a diverged adaptation is told to
    take fewer steps, a NaN in the support set is named; with or without gradients."""
    model, loss_fn, batch = mlp_problem()
    support_x, support_y = batch.support_x[0], batch.support_y[0]
    diverging = copy.deepcopy(model)
    with torch.no_grad():
        diverging[0].weight.fill_(1e200)  # finite, but its inner steps overflow
    for gradients in (True, False):
        with torch.set_grad_enabled(gradients):
            with pytest.raises(NonFiniteLossError, match=r"after 2 inner step\(s\) on this "
                               "support set the adapted parameters are not finite: the "
                               "adaptation diverged: give fewer steps or a lower inner_lr"):
                MAML(diverging, loss_fn, inner_lr=1e10, inner_steps=2).adapt(support_x, support_y)
            with pytest.raises(NonFiniteInputError, match=r"after 1 inner step\(s\) on this "
                               "support set the adapted parameters are not finite: support_y "
                               "holds a NaN or infinite value"):
                MAML(model, loss_fn).adapt(support_x, torch.full_like(support_y, float("nan")))
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))  # the start itself: not the steps' fault
    with pytest.raises(NonFiniteLossError, match=r"are not finite: model\.0\.weight "
                       r"holds a NaN or infinite value \(set so, or after a diverged meta-step\): "
                       "lower inner_lr or the meta learning rate"):
        MAML(model, loss_fn).adapt(support_x, support_y, steps=0)
    model, _, _ = mlp_problem()
    unchecked = MAML(diverging, loss_fn, inner_lr=1e10, inner_steps=2, check_finite=False)
    assert not all(p.isfinite().all() for p in unchecked.adapt(support_x, support_y).values())
    assert all(p.isfinite().all() for p in MAML(model, loss_fn).adapt(support_x,
                                                                      support_y).values())


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("variant, lr_mode", with_lr_modes(["fixed", "per_layer_step"]))
@pytest.mark.parametrize("batched", [True, False])
def test_meta_backward_equals_meta_loss_backward(problem, variant, lr_mode, batched):
    model, loss_fn, batch = PROBLEMS[problem]()
    maml = MAML(model, loss_fn, **variant_kwargs(problem, variant), lr_mode=lr_mode,
                batched=batched)
    weights = variant_weights(variant)
    expected = meta_grad(maml, batch, step_weights=weights)
    maml.meta_backward(batch, weights)  # the first call picks the path
    for calls in (1, 2):  # it accumulates into .grad, as backward() does
        maml.zero_grad(set_to_none=True)
        for _ in range(calls):
            maml.meta_backward(batch, weights)
        assert relative(flat_grads(maml), calls * expected) < 1e-10
    assert maml.path == ("batched" if batched else "looped")


def test_nan_meta_loss_is_named_by_meta_backward():
    model, loss_fn, batch = mlp_problem()
    maml = MAML(model, loss_fn)
    maml.meta_backward(batch)  # the first call picks the path; the next runs functionally
    bad = TaskBatch(batch.support_x, batch.support_y, batch.query_x,
                    torch.full_like(batch.query_y, float("nan")))
    with pytest.raises(NonFiniteLossError, match="meta-loss is nan: query_y of task 0 holds a "
                                                 "NaN"):  # (a NonFiniteInputError)
        maml.meta_backward(bad)


def accuracy_or_error(problem: str):
    if problem in ("conv_bn", "prototypes"):  # classifiers
        return lambda out, y: (out.argmax(-1) == y).double().mean()
    return lambda out, y: (out - y).abs().mean()


@pytest.mark.parametrize("problem", MORE_MODELS)
@pytest.mark.parametrize("variant, lr_mode",
                         with_lr_modes(["fixed", "scalar", "per_param", "per_layer_step"]))
def test_checkpointed_steps_give_the_same_meta_gradient(problem, variant, lr_mode):
    model, loss_fn, batch = MORE_MODELS[problem]()
    kwargs = {**variant_kwargs(problem, variant), "lr_mode": lr_mode,
              "metric_fn": accuracy_or_error(problem)}
    weights = variant_weights(variant)
    reference = MAML(model, loss_fn, **kwargs)
    expected_loss, expected_metrics = reference.meta_loss(batch, weights)
    expected_loss.backward()
    expected = flat_grads(reference)
    for batched in (True, False):
        maml = MAML(model, loss_fn, **kwargs, batched=batched, checkpoint_steps=True)
        maml.inner_lrs.load_state_dict(reference.inner_lrs.state_dict())
        maml.zero_grad(set_to_none=True)
        loss, metrics = maml.meta_backward(batch, weights)
        assert relative(flat_grads(maml), expected) < 1e-10
        assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
        assert metrics.keys() == expected_metrics.keys()
        for name, value in metrics.items():
            assert value.item() == pytest.approx(expected_metrics[name].item(), rel=1e-12)


@pytest.mark.parametrize("problem", ["mlp", "gru"])
def test_checkpointed_steps_refuse_active_dropout(problem):
    _, loss_fn, batch = MORE_MODELS[problem]()
    model = (nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.5), nn.Linear(8, 1)) if problem == "mlp"
             else SequenceNet(nn.GRU(2, 5, num_layers=2, dropout=0.5, batch_first=True), 1))
    maml = MAML(model, loss_fn, checkpoint_steps=True)
    with pytest.raises(ConfigError, match="dropout"):
        maml.meta_backward(batch)
    model.eval()
    maml.meta_backward(batch)  # no random draws: fine


def test_a_fixed_inner_lr_set_after_building_is_used_and_a_learned_one_refused():
    """A schedule of the user's own sets ``maml.inner_lr``: it was silently ignored."""
    model, loss_fn, batch = mlp_problem()
    maml = MAML(model, loss_fn, inner_lr=0.5)
    meta_grad(maml, batch)
    maml.inner_lr = 0.1
    assert maml.inner_lr == 0.1
    fresh = MAML(copy.deepcopy(model), loss_fn, inner_lr=0.1)
    assert relative(meta_grad(maml, batch), meta_grad(fresh, batch)) < 1e-12
    with pytest.raises(ConfigError, match="inner_lr must be a number >= 0 and finite"):
        maml.inner_lr = float("nan")
    learned = MAML(model, loss_fn, inner_lr=0.5, lr_mode="per_param")
    with pytest.raises(ConfigError, match="with lr_mode='per_param' the inner learning rates are "
                                          "parameters the meta-gradient trains"):
        learned.inner_lr = 0.1
    assert learned.inner_lr == 0.5


def test_inner_steps_set_after_building_are_used_but_not_past_a_per_step_learners():
    """A per_layer_step learner raised to more inner steps trained its last step's rates for the
    added ones, silently; fewer steps, or any number without values learned per step, are used."""
    model, loss_fn, batch = mlp_problem()
    maml = MAML(model, loss_fn, inner_lr=0.1, inner_steps=1)
    meta_grad(maml, batch)
    maml.inner_steps = 3
    fresh = MAML(copy.deepcopy(model), loss_fn, inner_lr=0.1, inner_steps=3)
    assert relative(meta_grad(maml, batch), meta_grad(fresh, batch)) < 1e-12
    with pytest.raises(ConfigError, match="inner_steps must be an integer >= 0, got 2.0"):
        maml.inner_steps = 2.0
    assert maml.inner_steps == 3
    for learner in (MAML(model, loss_fn, 0.1, 3, lr_mode="per_layer_step"),
                    MAML(model, loss_fn, 0.1, 3, adapt=["0"], per_step=["2"])):
        with pytest.raises(ConfigError, match=r"inner_steps=4: this MAML's learned (inner "
                           r"learning rates|set of per-step parameters) are one per inner step "
                           r"for 3 steps, so training more steps would train step 3's"):
            learner.inner_steps = 4
        learner.inner_steps = 2  # its third step's values stay as they are, unused
        with warnings.catch_warnings(action="error"):  # step 3 has its own: nothing reused
            learner.evaluate(batch, steps=3)
        with pytest.warns(fastmaml.errors.FastMAMLWarning, match="inner step 4 reuses step 3's learned"):
            learner.evaluate(batch, steps=4)


def test_a_model_changed_under_a_built_maml_is_named():
    """A layer replaced by one of another shape, or the model converted without the MAML whose
    learned rates took its dtype: torch's size or dtype mismatch from inside the inner step."""
    model, loss_fn, batch = mlp_problem()
    maml = MAML(model, loss_fn, lr_mode="per_param")
    maml.meta_backward(batch)
    model[4] = nn.Linear(8, 2)  # (the name stays; the shape does not)
    with pytest.raises(ConfigError, match=r"4\.weight changed shape after MAML was built "
                                          r"\(\(1, 8\) -> \(2, 8\)\): build MAML again"):
        maml.evaluate(batch)
    model, loss_fn, batch = mlp_problem()
    maml = MAML(model.float(), loss_fn, lr_mode="per_param")
    model.double()
    with pytest.raises(ConfigError, match="the model's parameters are torch.float64 on cpu, but "
                                          "MAML's own .* torch.float32 on cpu: convert the MAML"):
        maml.meta_backward(batch.to(torch.float64))
    maml.double()
    maml.meta_backward(batch.to(dtype=torch.float64))
    fixed = MAML(model.float(), loss_fn)  # nothing of its own: the model converts alone
    model.double()
    fixed.meta_backward(batch.to(torch.float64))


def test_a_task_batch_converts_its_floating_tensors_alone():
    batch = TaskBatch(torch.rand(2, 3, 1), torch.tensor([[0, 1, 2]] * 2), torch.rand(2, 4, 1),
                      torch.tensor([[0, 1, 2, 0]] * 2))
    for converted in (batch.to(torch.float16), batch.to(dtype=torch.float16),
                      batch.to("cpu", torch.float16)):
        assert [t.dtype for t in converted] == [torch.float16, torch.int64] * 2
        assert torch.equal(converted.support_x, batch.support_x.half())


def test_evaluate_names_an_input_that_makes_its_losses_nan():
    model, loss_fn, batch = mlp_problem()
    maml = MAML(model, loss_fn)
    query_x = batch.query_x.clone()
    query_x[1, 2] = float("nan")
    with pytest.raises(NonFiniteInputError, match="the evaluated losses are not finite: query_x "
                                                  "of task 1 holds a NaN or infinite value"):
        maml.evaluate(batch._replace(query_x=query_x))
    diverging = MAML(model, loss_fn, inner_lr=1e30).evaluate(batch, steps=3)["loss"]
    assert not torch.isfinite(diverging[:, -1]).all()  # a curve of its own: returned


class FunctionalDropout(nn.Module):
    """An MLP whose forward calls ``F.dropout`` itself: no dropout module to find."""

    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(1, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.out(F.dropout(torch.relu(self.hidden(x)), 0.5, self.training))


@pytest.mark.parametrize("batched", [True, False])
def test_checkpointed_steps_refuse_dropout_a_forward_draws_itself(batched):
    """No module says so: the random draws do, and the gradient of the recomputed steps'
    other masks is never applied."""
    _, loss_fn, batch = MORE_MODELS["mlp"]()
    model = FunctionalDropout()
    maml = MAML(model, loss_fn, checkpoint_steps=True, batched=batched)
    with pytest.raises(ConfigError, match="recomputes the inner steps, and the model draws "
                                          r"random numbers \(dropout, say\)"):
        maml.meta_backward(batch)
    assert all(p.grad is None for p in maml.parameters())
    model.eval()
    maml.meta_backward(batch)  # no random draws: fine


def test_attentions_dropout_is_active_dropout():
    """``nn.MultiheadAttention`` keeps its dropout as a number, not a module."""
    batch = attention_batch()
    model = EvalAttention()
    model.attention.dropout = 0.5
    maml = MAML(model, F.cross_entropy, 0.1, 1, checkpoint_steps=True)
    with pytest.raises(ConfigError, match="model draws random numbers"):
        maml.meta_backward(batch)
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match="dropout is active"):
        maml.evaluate(batch)
    model.eval()
    maml.meta_backward(batch)
    model.attention.dropout = 0.0
    assert not fastmaml.inputs.has_active_dropout(model.train())


class TemperedCrossEntropy(nn.Module):
    """A loss with a learned temperature: a parameter of the loss, which MAML trains too."""

    def __init__(self):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(0.3))

    def forward(self, logits, y):
        return F.cross_entropy(logits * self.log_temperature.exp(), y)


def test_a_loss_of_integers_is_refused_and_a_metric_of_them_taken():
    """An int loss has no gradient: torch's "element 0 of tensors does not require grad" on
    most paths, and zero gradients, silently, with checkpoint_steps."""
    _, _, batch = MORE_MODELS["mlp"]()
    wrong = lambda predictions, y: (predictions.round() != y.round()).sum()  # noqa: E731
    for options in ({}, {"checkpoint_steps": True}, {"batched": False},
                    {"metric_fn": wrong}):  # (the loss also given as the metric)
        with pytest.raises(ConfigError, match=r"loss_fn returned a torch.int64 value, which has "
                                              r"no gradient \(a count"):
            MAML(nn.Linear(1, 1), wrong, **options).meta_backward(batch)
    _, metrics = MAML(nn.Linear(1, 1), F.mse_loss, metric_fn=wrong).meta_backward(batch)
    assert metrics["query_metric"].is_floating_point()


@pytest.mark.parametrize("path", [{"batched": True}, {"batched": False}])
def test_the_metric_is_taken_of_the_query_losss_own_forward_pass(path):
    """One forward pass of the query set serves the loss and the metric: a metric adds none
    (training and evaluate ran a second, for the metric alone, before; checkpoint_steps still
    does, outside its gradient)."""
    model, loss_fn, batch = mlp_problem()

    def forwards(metric_fn, call) -> int:
        maml = MAML(model, loss_fn, inner_steps=2, metric_fn=metric_fn, **path)
        call(maml)  # (the first call probes the model)
        calls = []
        hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            call(maml)
        finally:
            hook.remove()
        return len(calls)

    for call in (lambda maml: maml.meta_backward(batch),
                 lambda maml: maml.evaluate(batch, steps=3)):
        assert forwards(None, call) == forwards(accuracy_or_error("mlp"), call) > 0


@pytest.mark.parametrize("path", [{"batched": True}, {"batched": False},
                                  {"checkpoint_steps": True}])
def test_a_metric_that_changes_its_predictions_in_place_leaves_the_meta_gradient_alone(path):
    """The metric gets a copy of the loss's predictions: mse_loss saves its input, so an
    in-place change to them failed the backward pass."""
    model, loss_fn, batch = mlp_problem()
    clamped = lambda out, y: (out.clamp_(-0.1, 0.1) - y).abs().mean()  # noqa: E731
    grads, metrics = [], []
    for metric_fn in (None, clamped):
        maml = MAML(model, loss_fn, inner_steps=2, metric_fn=metric_fn, **path)
        maml.zero_grad(set_to_none=True)
        _, values = maml.meta_backward(batch)
        grads.append(flat_grads(maml))
        metrics.append(values.get("query_metric"))
    assert torch.equal(grads[0], grads[1])
    assert 0 < metrics[1].item() < float("inf")


def test_checkpointed_steps_take_a_metric_that_leaves_torch():
    """checkpoint_steps scores the metric outside torch.func.grad, where numpy can read it."""
    model, loss_fn, batch = mlp_problem()
    numpy_error = lambda out, y: torch.tensor(float(np.abs(out.numpy() - y.numpy()).mean()))  # noqa: E731
    expected = MAML(model, loss_fn, inner_steps=2, metric_fn=F.l1_loss,
                    batched=False).meta_backward(batch)[1]["query_metric"]
    _, metrics = MAML(model, loss_fn, inner_steps=2, metric_fn=numpy_error, batched=False,
                      checkpoint_steps=True).meta_backward(batch)
    assert metrics["query_metric"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("batched", [True, False])
def test_with_dropout_the_metric_sees_the_query_losss_own_mask(batched):
    torch.manual_seed(0)
    _, loss_fn, batch = mlp_problem()
    model = nn.Sequential(nn.Linear(1, 16), nn.Dropout(0.5), nn.Linear(16, 1))
    maml = MAML(model, loss_fn, metric_fn=loss_fn, batched=batched)
    _, metrics = maml.meta_backward(batch)
    assert metrics["query_metric"].item() == metrics["query_loss"].item()


def test_checkpointed_steps_refuse_a_loss_module_with_parameters():
    """Its reverse pass differentiates the model's parameters and learned rates alone: a
    KeyError before (the other paths train the loss's parameters too)."""
    torch.manual_seed(0)
    batch = TaskBatch(torch.randn(2, 3, 5), torch.tensor([[0, 1, 2]] * 2), torch.randn(2, 4, 5),
                      torch.tensor([[0, 1, 2, 0]] * 2))
    maml = MAML(nn.Linear(5, 3), TemperedCrossEntropy(), inner_steps=2, checkpoint_steps=True)
    with pytest.raises(ConfigError, match=r"checkpoint_steps differentiates the model's "
                                          r"parameters, .* not loss_fn.log_temperature"):
        maml.meta_backward(batch)
    MAML(nn.Linear(5, 3), TemperedCrossEntropy(), inner_steps=2).meta_backward(batch)


def test_evaluate_and_predict_under_active_dropout_warn_and_after_eval_are_deterministic():
    """(predict drew a new mask per call, unsaid)"""
    _, loss_fn, batch = MORE_MODELS["mlp"]()
    maml = MAML(nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.5), nn.Linear(8, 1)), loss_fn)
    with pytest.warns(fastmaml.errors.FastMAMLWarning,
                      match="dropout is active .* every loss is a random draw"):
        maml.evaluate(batch)
    adapted = maml.adapt(batch.support_x[0], batch.support_y[0])
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match="predict runs the model as its mode "
                      "says, and its dropout is active .* every prediction is a random draw"):
        maml.predict(adapted, batch.query_x[0])
    maml.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first, second = maml.evaluate(batch), maml.evaluate(batch)
        adapted = maml.adapt(batch.support_x[0], batch.support_y[0])
        predictions = [maml.predict(adapted, batch.query_x[0]) for _ in range(2)]
    assert torch.equal(first["loss"], second["loss"]) and torch.equal(*predictions)


def test_predict_with_a_context_normalises_each_row_with_the_context_alone():
    torch.manual_seed(0)
    model = MLP([2, 8, 3], batch_norm=True)  # transductive batch norm: batch statistics
    maml = MAML(model, F.cross_entropy, 0.1, 1)
    support = torch.randn(6, 2)
    adapted = maml.adapt(support, torch.randint(0, 3, (6,)))
    queries = torch.randn(4, 2)
    together = maml.predict(adapted, queries, context=support)
    torch.testing.assert_close(maml.predict(adapted, queries[:1], context=support), together[:1])
    fresh = MAML(copy.deepcopy(model), F.cross_entropy, 0.1, 1)  # its first call: one row
    torch.testing.assert_close(fresh.predict(adapted, queries[:1], context=support), together[:1])
    torch.testing.assert_close(together[2], maml.predict(adapted, torch.cat([queries[2:3],
                                                                              support]))[0])
    with pytest.raises(ShapeError, match=r"batch norm over a batch of one value per channel "
                                         r"\(input \(1, 8\)\) would turn every input into the "
                                         "same output: .* context=.*--norm each"):
        maml.predict(adapted, queries[:1])  # normalised by itself alone: a constant
    for context in (torch.randn(6, 3), support[None], support[:0]):
        with pytest.raises(ShapeError, match=r"context .* must be examples shaped as x's "
                                             r"examples \(x \(4, 2\): one task's inputs"):
            maml.predict(adapted, queries, context=context)
    with pytest.raises(ShapeError, match=r"context \(6, 2\) must be .* \(x \(3, 4, 2\)"):
        maml.predict(adapted, queries.expand(3, 4, 2), context=support)


class WithBatchValue(nn.Module):
    """Logits and a value of the whole batch (a regulariser, or the set's mean embedding)."""

    def __init__(self, value: str):
        super().__init__()
        self.linear, self.value = nn.Linear(2, 3), value

    def forward(self, x):
        logits = self.linear(x)
        return logits, (self.linear.weight.pow(2).sum() if self.value == "regulariser"
                        else logits.mean(0))


@pytest.mark.parametrize("value, shape", [("regulariser", "()"), ("set embedding", "(3,)")])
def test_predict_with_a_context_refuses_an_output_with_no_row_per_example(value, shape):
    """Each row's output is taken out of the model's output on that row and the context: a
    batch-level value has no row (an IndexError, or a set embedding's first number passed off as
    the row's)."""
    maml = MAML(WithBatchValue(value), lambda out, y: F.cross_entropy(out[0], y), 0.1, 1)
    support, queries = torch.randn(6, 2), torch.randn(4, 2)
    adapted = maml.adapt(support, torch.randint(0, 3, (6,)))
    logits, _ = maml.predict(adapted, queries)  # without context: the model's output as it is
    assert logits.shape == (4, 3)
    for x in (queries, queries[:0]):
        with pytest.raises(ShapeError, match=rf"predict with context .* \([67] examples\), but the "
                           rf"output\[1\] is a tensor of shape {re.escape(shape)}, not one row "
                           "per example: predict without context"):
            maml.predict(adapted, x, context=support)


def test_batch_norm_over_one_example_is_refused_in_training_too():
    model = MLP([2, 8, 1], batch_norm=True)
    one = TaskBatch(*(torch.randn(3, 1, 2 if i % 2 == 0 else 1) for i in range(4)))
    with pytest.raises(ShapeError, match="batch norm over a batch of one value per channel"):
        MAML(model, F.mse_loss).meta_loss(one)


def test_batch_norm_of_one_image_normalises_over_its_pixels():
    """One image has many values per channel (its pixels): torch's layer normalises it, and so
    do we, in the looped form and in vmap's (its weight and bias applied after the kernel)
    (predicting one image with its own statistics is the user's choice)."""
    norm = nn.BatchNorm2d(3).double()
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    images = torch.randn(2, 1, 3, 4, 4, dtype=torch.float64)  # two tasks of one image
    with fastmaml.norms.ExactNorms(transductive=False):
        looped = torch.stack([norm(image) for image in images])
        batched = torch.func.vmap(norm)(images)
    plain = torch.stack([norm(image) for image in images])  # (torch's, in training mode)
    torch.testing.assert_close(looped, plain)
    torch.testing.assert_close(batched, plain)


def test_batch_norm_of_a_one_dimensional_input_is_refused_as_torch_refuses_it():
    """(N, C) runs as layer norm over the transpose, which must not take a vector (N,) as (C,)."""
    with pytest.raises(IndexError, match="Dimension out of range"):
        fastmaml.norms.batch_stats_norm(torch.randn(5), None, None, 1e-5)


@pytest.mark.parametrize("shape", [(4096, 64), (512, 64, 8), (64, 64, 5, 5)])
def test_batch_statistics_keep_float32s_digits_where_the_mean_dwarfs_the_spread(shape):
    """Features of an MLP (N, C) far from zero: torch's CPU kernel loses digits there (2.8e-5
    off at mean 10, sd 1), so such a batch norm runs as layer norm over the transpose."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32) + 10
    exact = F.batch_norm(x.double(), None, None, training=True, eps=1e-5)
    ours = fastmaml.norms.batch_stats_norm(x, None, None, 1e-5)
    assert ours.dtype == torch.float32
    assert (ours.double() - exact).abs().max() < 5e-6


class Pair(nn.Module):
    """A model that returns (prediction, features), as many do."""

    def __init__(self):
        super().__init__()
        self.body = MLP([2, 8, 4], batch_norm=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        features = self.body(x)
        return self.head(features), {"features": features}


def pair_loss(outputs, y):
    return F.cross_entropy(outputs[0], y)


def test_predict_with_a_context_keeps_the_models_output_structure():
    torch.manual_seed(0)
    maml = MAML(Pair(), pair_loss, 0.1, 1)
    support, queries = torch.randn(6, 2), torch.randn(5, 2)
    adapted = maml.adapt(support, torch.randint(0, 3, (6,)))
    logits, extra = maml.predict(adapted, queries, context=support)
    assert logits.shape == (5, 3) and extra["features"].shape == (5, 4)
    none, extra = maml.predict(adapted, queries[:0], context=support)
    assert none.shape == (0, 3) and extra["features"].shape == (0, 4)
    second, _ = maml.predict(adapted, torch.cat([queries[1:2], support]))
    torch.testing.assert_close(logits[1], second[0])


def test_a_loss_that_cannot_take_the_models_output_is_named():
    maml = MAML(Pair(), F.cross_entropy, 0.1, 1)  # given the (logits, extra) tuple itself
    with pytest.raises(ShapeError, match=r"loss_fn or metric_fn failed on a task's predictions "
                                         r"\(a tuple\)"):
        maml.adapt(torch.randn(6, 2), torch.randint(0, 3, (6,)))


def test_adapt_and_predict_refuse_what_is_not_theirs():
    model, loss_fn, batch = mlp_problem()
    maml = MAML(model, loss_fn, 0.1, 1)
    with pytest.raises(ShapeError, match=r"support_x \(0, 1\) holds no examples"):
        maml.adapt(batch.support_x[0, :0], batch.support_y[0, :0])
    with pytest.raises(ConfigError, match=r"adapted holds foo, not parameters of the model"):
        maml.predict({"foo": torch.zeros(1)}, batch.query_x[0])
    with pytest.raises(ConfigError, match=r"adapted must be the parameters MAML.adapt returns "
                                          r"\(a dict\), got list"):
        maml.predict([], batch.query_x[0])
    with pytest.raises(ShapeError, match=r"support_x must be a tensor, got ndarray \(torch."
                                         r"as_tensor converts arrays and lists\)"):
        maml.adapt(batch.support_x[0].numpy(), batch.support_y[0])
    with torch.inference_mode(), pytest.raises(ShapeError, match="support_x must be a tensor"):
        maml.adapt(batch.support_x[0].numpy(), batch.support_y[0])
    with pytest.raises(ShapeError, match="context must be a tensor, got list"):
        maml.predict(maml.adapt(batch.support_x[0], batch.support_y[0]), batch.query_x[0],
                     context=[[1.0]])
    # an MLP takes a whole batch too, as one task of all its examples: after batches of
    # tasks, a support set of one dimension more is taken for a batch and refused
    maml.adapt(batch.support_x, batch.support_y)
    maml.evaluate(batch)
    with pytest.raises(ShapeError, match=r"adapt takes one task's support set, and a task's "
                                         r"inputs in the batches so far had 2 dimensions; got "
                                         r"support_x \(3, 5, 1\), a batch of tasks\?"):
        maml.adapt(batch.support_x, batch.support_y)


@pytest.mark.parametrize("path", [dict(batched=False), dict(checkpoint_steps=True)])
def test_freezing_or_unfreezing_after_maml_is_built_is_refused(path):
    """MAML chooses what it adapts and trains when it is built; a change after it would be
    taken by one part and not another (the inner loop went on adapting a frozen layer)."""
    model, loss_fn, batch = mlp_problem()
    maml = MAML(model, loss_fn, 0.1, 1, **path)
    model[0].weight.requires_grad_(False)
    with pytest.raises(ConfigError, match="0.weight was frozen after MAML was built"):
        maml.meta_backward(batch)
    model[0].weight.requires_grad_(True)
    model[0].bias.requires_grad_(False)
    maml = MAML(model, loss_fn, 0.1, 1, **path)
    model[0].bias.requires_grad_(True)
    with pytest.raises(ConfigError, match="0.bias was unfrozen after MAML was built"):
        maml.adapt(batch.support_x[0], batch.support_y[0])
    model.requires_grad_(False)  # for inference: nothing is trained without gradients
    with torch.no_grad():
        maml.evaluate(batch)
        maml.adapt(batch.support_x[0], batch.support_y[0])


@pytest.mark.parametrize("batched", [True, False])
def test_under_inference_mode_adapt_and_evaluate_work_as_under_no_grad(batched):
    model, loss_fn, batch = mlp_problem()
    maml = MAML(model, loss_fn, 0.1, 2, batched=batched)
    results = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            inputs = TaskBatch(*(t.clone() for t in batch))  # made under it, as a user would
            adapted = maml.adapt(inputs.support_x[0], inputs.support_y[0])
            results.append((maml.predict(adapted, inputs.query_x[0]), maml.evaluate(inputs)))
    (predicted, evaluated), (inferred, evaluated_inferring) = results
    assert torch.equal(predicted, inferred)
    assert all(torch.equal(evaluated[k], evaluated_inferring[k]) for k in evaluated)


def test_adapting_zero_steps_returns_copies_that_leave_the_model_as_it_is():
    model, loss_fn, batch = mlp_problem()
    maml = MAML(model, loss_fn, 0.1, 1)
    before = [p.clone() for p in model.parameters()]
    for grad_enabled in (True, False):
        with torch.set_grad_enabled(grad_enabled):
            adapted = maml.adapt(batch.support_x[0], batch.support_y[0], steps=0)
        with torch.no_grad():
            for p in adapted.values():
                p.add_(1.0)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class RepeatedBlock(nn.Module):
    """One block registered under two names and applied twice, and an output layer whose
    weight a second layer shares (weight tying): each tensor held under several names."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(3, 3)
        self.blocks = nn.ModuleList([self.block, self.block])
        self.head, self.tied = nn.Linear(3, 2), nn.Linear(3, 2)
        self.tied.weight = self.head.weight

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x) + self.tied(x)


@pytest.mark.parametrize("path", [{"batched": True}, {"batched": False},
                                  {"checkpoint_steps": True}])
def test_a_module_under_two_names_and_tied_weights_get_the_exact_meta_gradient(path):
    """functional_call's own tying swapped the repeated block's tensors in twice: the block got
    no meta-gradient and the model was left holding a swapped-in tensor."""
    torch.manual_seed(0)
    model = RepeatedBlock().double()
    own = dict(model.named_parameters())
    x = torch.randn(TASKS, 6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (TASKS, 6))
    batch = TaskBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])
    maml = MAML(model, F.cross_entropy, inner_lr=0.5, inner_steps=2, **path)
    for _ in range(2):  # the second call finds the model as it was
        maml.meta_backward(batch)
    assert dict(model.named_parameters()) == own and model.blocks[0].weight is own["block.weight"]

    def forward(p, inputs):  # the model written out
        for _ in range(2):
            inputs = torch.tanh(F.linear(inputs, p["block.weight"], p["block.bias"]))
        return (F.linear(inputs, p["head.weight"], p["head.bias"])
                + F.linear(inputs, p["head.weight"], p["tied.bias"]))

    reference = {n: torch.zeros_like(p) for n, p in own.items()}
    for sx, sy, qx, qy in zip(*batch):
        fast = dict(own)
        for _ in range(2):
            grads = torch.autograd.grad(F.cross_entropy(forward(fast, sx), sy),
                                        list(fast.values()), create_graph=True)
            fast = {n: p - 0.5 * g for (n, p), g in zip(fast.items(), grads)}
        query_loss = F.cross_entropy(forward(fast, qx), qy) / TASKS
        for name, g in zip(own, torch.autograd.grad(query_loss, list(own.values()))):
            reference[name] += g
    for name, p in own.items():
        torch.testing.assert_close(p.grad, 2 * reference[name], rtol=1e-10, atol=1e-12)


def test_a_parameter_under_several_names_is_selected_by_any_of_them():
    """``named_parameters`` names a tied weight once (``head.weight``) and a module registered
    twice under its first name: selected as ``tied``, only the tied layer's bias was adapted,
    unsaid, and ``blocks`` matched nothing."""
    model = RepeatedBlock()
    maml = MAML(model, F.cross_entropy, 0.1, 2, adapt=["tied"])
    assert maml.adapted_names == ["head.weight", "tied.bias"]
    assert maml.outer_only_names == ["block.weight", "block.bias", "head.bias"]
    adapted = maml.adapt(torch.randn(4, 3), torch.randint(0, 2, (4,)))
    assert not torch.equal(adapted["head.weight"], model.head.weight)
    assert MAML(model, F.cross_entropy, 0.1, 1, adapt=["blocks.1"]).adapted_names == [
        "block.weight", "block.bias"]
    with pytest.raises(ConfigError, match=r"per_step selects head.weight, which the inner"):
        MAML(model, F.cross_entropy, 0.1, 2, adapt=["tied"], per_step=["tied.weight"])
    # a predicate decides by each name: one that splits a tensor's names is asked to agree
    with pytest.raises(ConfigError, match=r"the adapt predicate takes head.weight as "
                       r"tied.weight but not as head.weight: one tensor under several names"):
        MAML(model, F.cross_entropy, 0.1, 1, adapt=lambda name, _: not name.startswith("head"))
    # one that looks names up in named_parameters() fails on the others: it is told why
    named = dict(model.named_parameters())
    with pytest.raises(ConfigError, match=r"the adapt predicate failed on 'blocks.0.weight' \(KeyError"
                       r": 'blocks.0.weight'\): that is another name of the tensor "
                       r"named_parameters\(\) calls 'block.weight'"):
        MAML(model, F.cross_entropy, 0.1, 1, adapt=lambda name, _: named[name].dim() > 1)
    with pytest.raises(KeyError, match="block.weight"):  # one under the usual name: the user's
        MAML(model, F.cross_entropy, 0.1, 1, adapt=lambda name, _: {}[name])


def test_a_batch_split_into_chunks_of_no_task_is_refused():
    _, _, batch = mlp_problem()
    assert [part.num_tasks for part in batch.split(2)] == [2, 1]
    with pytest.raises(ConfigError, match="chunks of 0 tasks: give a size of at least 1"):
        batch.split(0)


class Branching(nn.Module):
    """A forward with data-dependent control flow, which vmap cannot run."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 3)

    def forward(self, x):
        return self.layer(x) * 2 if x.abs().max() > 3 else self.layer(x)


@pytest.mark.parametrize("batched", [None, False])
def test_predict_with_a_context_runs_row_by_row_where_vmap_cannot_run_the_model(batched):
    torch.manual_seed(0)
    maml = MAML(Branching(), F.cross_entropy, 0.1, 1, batched=batched)
    support = torch.randn(6, 2)
    adapted = maml.adapt(support, torch.randint(0, 3, (6,)))
    queries = torch.randn(4, 2) * 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predicted = maml.predict(adapted, queries, context=support)
    assert len(caught) == (1 if batched is None else 0)  # vmap tried once, then the loop
    for row, expected in zip(queries, predicted):
        torch.testing.assert_close(maml.predict(adapted, torch.cat([row[None], support]))[0],
                                   expected)
    assert maml.path is None  # a prediction is not a meta-batch's path
    assert not maml._vmap_failed  # nor what the meta-batches' path search knows


def test_a_weight_tied_after_maml_is_built_is_named():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    maml = MAML(model, F.mse_loss, 0.1, 1)
    model[1].weight = model[0].weight  # now named once, as 0.weight
    with pytest.raises(ConfigError, match=r"the model's parameters changed after MAML was built "
                                          r"\(1.weight no longer named so\): build MAML again"):
        maml.meta_loss(TaskBatch(torch.randn(TASKS, 4, 3), torch.randn(TASKS, 4, 3),
                                 torch.randn(TASKS, 4, 3), torch.randn(TASKS, 4, 3)))
