"""The MAML engine: meta-gradients against finite differences, batched against looped."""
from __future__ import annotations

import copy
import functools
import itertools
import math
import time
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml.core
import fastmaml.norms
import fastmaml.paths
from fastmaml import MAML, ConfigError, NonFiniteLossError, ShapeError, TaskBatch
from fastmaml.core import multi_step_loss_weights
from fastmaml.models import ConvNet, MLP, SequenceNet, is_norm_param

TASKS = 3
pytestmark = pytest.mark.usefixtures("float64")  # exact comparisons


def mlp_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = MLP([1, 8, 8, 1])
    batch = TaskBatch(torch.randn(TASKS, 5, 1), torch.randn(TASKS, 5, 1),
                      torch.randn(TASKS, 6, 1), torch.randn(TASKS, 6, 1))
    return model, F.mse_loss, batch


def conv_problem(seed: int = 0):
    """A small paper-style conv net with batch norm (offset only), 3-way tasks on 8x8 images."""
    torch.manual_seed(seed)
    model = ConvNet(1, 3, hidden=4, strided=True, image_size=8, blocks=2)
    batch = TaskBatch(torch.randn(TASKS, 6, 1, 8, 8), torch.randint(0, 3, (TASKS, 6)),
                      torch.randn(TASKS, 6, 1, 8, 8), torch.randint(0, 3, (TASKS, 6)))
    return model, F.cross_entropy, batch


def recurrent_problem(layer: type[nn.RNNBase], **options):
    """Regression on sequences (4 support and 5 query sequences of 5 steps per task)."""
    def problem(seed: int = 0):
        torch.manual_seed(seed)
        model = SequenceNet(layer(2, 5, batch_first=True, **options), outputs=1)
        batch = TaskBatch(torch.randn(TASKS, 4, 5, 2), torch.randn(TASKS, 4, 1),
                          torch.randn(TASKS, 5, 5, 2), torch.randn(TASKS, 5, 1))
        return model, F.mse_loss, batch
    return problem


class SelfAttention(nn.Module):
    """Attention written as users do, with ``F.scaled_dot_product_attention``, then a head."""

    def __init__(self, features: int, steps: int):
        super().__init__()
        self.qkv, self.head = nn.Linear(features, 3 * features), nn.Linear(features * steps, 1)

    def forward(self, x):
        return self.head(F.scaled_dot_product_attention(*self.qkv(x).chunk(3, -1)).flatten(1))


def attention_problem(encoder_layer: bool):
    """Regression on 5-step sequences of 4 features: torch's transformer encoder layer
    (attention, layer norm, feed-forward) or ``SelfAttention``."""
    def problem(seed: int = 0):
        torch.manual_seed(seed)
        model = (nn.Sequential(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True),
                               nn.Flatten(), nn.Linear(20, 1)) if encoder_layer
                 else SelfAttention(4, 5))
        batch = TaskBatch(torch.randn(TASKS, 4, 5, 4), torch.randn(TASKS, 4, 1),
                          torch.randn(TASKS, 5, 5, 4), torch.randn(TASKS, 5, 1))
        return model, F.mse_loss, batch
    return problem


class BagRegression(nn.Module):
    """Token bags (padding 0 left out of each bag's mean) -> a value, as text models do."""

    def __init__(self):
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(10, 6, mode="mean", padding_idx=0), nn.Linear(6, 1)

    def forward(self, tokens):
        return self.head(torch.tanh(self.bag(tokens)))


def bag_problem(seed: int = 0):
    """Regression on bags of 4 tokens: torch's embedding bag has no second derivative, the
    lookup and reduction that runs instead (``fastmaml.embeddings``) has."""
    torch.manual_seed(seed)
    batch = TaskBatch(torch.randint(0, 10, (TASKS, 5, 4)), torch.randn(TASKS, 5, 1),
                      torch.randint(0, 10, (TASKS, 6, 4)), torch.randn(TASKS, 6, 1))
    return BagRegression(), F.mse_loss, batch


PROBLEMS = {"mlp": mlp_problem, "conv_bn": conv_problem}
# torch's recurrent kernels cannot run under vmap (fastmaml.recurrent steps them in plain ops);
# its fused attention kernels neither, and their backward has no derivative (second order)
MORE_MODELS = {**PROBLEMS, "lstm": recurrent_problem(nn.LSTM, num_layers=2),
               "gru": recurrent_problem(nn.GRU, bidirectional=True),
               "transformer": attention_problem(encoder_layer=True),
               "attention": attention_problem(encoder_layer=False), "embedding_bag": bag_problem}


def meta_grad(maml: MAML, batch: TaskBatch, **kwargs) -> torch.Tensor:
    loss, _ = maml.meta_loss(batch, **kwargs)
    params = [p for p in maml.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                      for g, p in zip(grads, params)])


def flat_grads(maml: MAML) -> torch.Tensor:
    """The .grad of every trainable parameter, flattened (zeros where there is none)."""
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                      for p in maml.parameters() if p.requires_grad])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("problem", MORE_MODELS)
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("lr_mode", ["fixed", "scalar", "per_param", "per_layer_step"])
def test_second_order_meta_gradient_matches_finite_differences(problem, steps, lr_mode):
    model, loss_fn, batch = MORE_MODELS[problem]()
    maml = MAML(model, loss_fn, inner_lr=0.1, inner_steps=steps, lr_mode=lr_mode)
    params = [p for p in maml.parameters() if p.requires_grad]
    grad = meta_grad(maml, batch)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=generator) for p in params]
        eps = 1e-6
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
    of the model's own) our elementary-op batch norm runs, and agrees with the looped reference
    to 1e-10; the fused kernel does not. If the last assertion ever fails, torch has fixed the
    kernel and the workaround could be reconsidered.
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
    monkeypatch.setattr(fastmaml.core, "NORM_FUNCTIONS", ())  # as if fastmaml saw no norm
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
    monkeypatch.setattr(fastmaml.core, "pads", lambda *args, **kwargs: False)  # torch's kernel
    fused = grads()
    assert relative(flat_grads(fused[True]), flat_grads(fused[False])) > 1e-5


def test_an_embedding_that_scales_its_gradient_by_frequency_runs_looped():
    """vmap scales by the wrong counts, and the scaled 'gradient' has no exact form of ours."""
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match="scale_grad_by_freq: vmap scales "
                      "an embedding's gradient by the wrong counts .*; using the looped path"):
        maml = MAML(BagOfWords(scale_grad_by_freq=True), F.cross_entropy, 0.3, 2)
        maml.meta_backward(token_batch())
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
    monkeypatch.setattr(fastmaml.core, "NORM_FUNCTIONS", ())  # as if fastmaml saw no norm
    fused = grads()
    assert relative(fused[True], fused[False]) > 1e-5


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


def test_learned_rates_have_the_documented_shapes_and_reuse_the_last_step():
    model, loss_fn, batch = mlp_problem()
    meta_sgd = MAML(model, loss_fn, 0.1, 2, lr_mode="per_param")
    rates = meta_sgd.inner_lrs(0)
    assert all(rates[n].shape == p.shape for n, p in model.named_parameters())
    maml_pp = MAML(model, loss_fn, 0.1, 2, lr_mode="per_layer_step")
    for tensor in maml_pp.inner_lrs.rates.values():
        tensor.data = torch.tensor([0.1, 0.3])
    assert maml_pp.inner_lrs(1)["0.weight"].item() == pytest.approx(0.3)
    assert maml_pp.inner_lrs(7)["0.weight"].item() == pytest.approx(0.3)
    grad = meta_grad(maml_pp, batch)
    assert grad.numel() == sum(p.numel() for p in model.parameters()) + 2 * 6
    torch.set_default_dtype(torch.float32)  # the fixture restores float64
    for mode in ("scalar", "per_param", "per_layer_step"):  # learned in the model's dtype
        rates = MAML(model, loss_fn, 0.1, 2, lr_mode=mode).inner_lrs.parameters()
        assert {r.dtype for r in rates} == {torch.float64}


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
                         (dict(chunk_size=0), r"chunk_size must be an integer >= 1 \(or None")):
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
    with pytest.raises(ConfigError, match="need inner steps >= 1, got 0"):
        multi_step_loss_weights(0, 0.5)
    close = MAML(model, F.mse_loss, metric_fn=lambda p, y: ((p - y).abs() < 1).all())
    share = close.evaluate(batch, steps=1)["metric"]  # a bool per task, in the default dtype
    assert share.dtype == torch.float64 and set(share.flatten().tolist()) <= {0.0, 1.0}
    as_dict = nn.Sequential(model, Dict())  # a model whose output is not a tensor
    with pytest.raises(ShapeError, match=r"predictions \(a dict\) and targets \(5, 1\)"):
        MAML(as_dict, lambda out, y: out["y"] @ y).meta_loss(batch)


def test_nan_meta_loss_is_named():
    model, loss_fn, batch = mlp_problem()
    bad = TaskBatch(batch.support_x, batch.support_y, batch.query_x,
                    torch.full_like(batch.query_y, float("nan")))
    with pytest.raises(NonFiniteLossError, match="meta-loss is nan"):
        MAML(model, loss_fn).meta_loss(bad)


def test_compiled_batched_path_matches_eager():
    torch.set_default_dtype(torch.float32)
    model, loss_fn, batch = mlp_problem()
    batch = TaskBatch(*(t.float() for t in batch))
    model.float()
    eager = meta_grad(MAML(model, loss_fn, 0.1, 2, batched=True), batch)
    compiled_maml = MAML(model, loss_fn, 0.1, 2, batched=True, compile=True)
    assert relative(meta_grad(compiled_maml, batch), eager) < 1e-5
    smaller = TaskBatch(*(t[:2, :4] for t in batch))  # new shapes: a recompile, not an error
    assert relative(meta_grad(compiled_maml, smaller),
                    meta_grad(MAML(model, loss_fn, 0.1, 2, batched=True), smaller)) < 1e-5


HEADS = {"mlp": ["4"], "conv_bn": ["head"], "lstm": ["head"], "gru": ["head"],  # ANIL: the last
         "transformer": ["2"], "attention": ["head"], "embedding_bag": ["head"]}  # layer
VARIANTS = {"plain": {}, "first_order": {"first_order": True}, "anil": {"adapt": "head"},
            "anil_first_order": {"adapt": "head", "first_order": True},
            "no_inner_steps": {"inner_steps": 0}, "multi_step_loss": {}}


def variant_kwargs(problem: str, variant: str) -> dict:
    kwargs = {"inner_lr": 0.1, "inner_steps": 3, **VARIANTS[variant]}
    if kwargs.get("adapt") == "head":
        kwargs["adapt"] = HEADS[problem]
    return kwargs


def variant_weights(variant: str) -> torch.Tensor | None:
    return multi_step_loss_weights(3, 0.3) if variant == "multi_step_loss" else None


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("lr_mode", ["fixed", "per_layer_step"])
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


@pytest.mark.parametrize("problem", PROBLEMS)
def test_compiled_meta_backward_matches_eager(problem):
    torch.set_default_dtype(torch.float32)
    model, loss_fn, batch = PROBLEMS[problem]()
    batch = TaskBatch(*(t.float() if t.is_floating_point() else t for t in batch))
    model.float()
    steps = 1 if problem == "conv_bn" else 2  # one step keeps the conv net's compile short
    eager = meta_grad(MAML(model, loss_fn, 0.1, steps, lr_mode="scalar", batched=False), batch)
    # 3 tasks in uneven vmap chunks (2 and 1): the chunked path that CPU defaults take
    compiled = MAML(model, loss_fn, 0.1, steps, lr_mode="scalar", compile=True, chunk_size=2)
    # The first call (compiled meta_loss, then autograd) picks the path; the second is one graph.
    # On CPU both take the conv net's weights channels-last, through a differentiable copy.
    for call in ("first", "second"):
        compiled.zero_grad(set_to_none=True)
        compiled.meta_backward(batch)
        got = torch.cat([p.grad.flatten() for p in compiled.parameters() if p.requires_grad])
        assert relative(got, eager) < 1e-5, call


def test_compiled_paths_call_one_graph_per_chunk_of_tasks():
    """The graph holds one chunk (vmap's chunks would be unrolled into it): a larger meta-batch
    calls the same graph more often instead of compiling a larger one. Uneven chunks (2, 2, 1)
    count by their share of the tasks in the gradient, the loss and the metrics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    batch = TaskBatch(*(torch.randn(5, 4, 1) for _ in range(4)))
    weights = multi_step_loss_weights(2, 0.3)
    settings = dict(inner_lr=0.1, inner_steps=2, lr_mode="per_layer_step", metric_fn=F.l1_loss)
    looped = MAML(model, F.mse_loss, batched=False, **settings)
    expected_loss, expected_metrics = looped.meta_loss(batch, weights)
    expected = meta_grad(looped, batch, step_weights=weights)
    expected_eval = looped.evaluate(batch)["metric"]
    # batched=None with a chunk size: no search; the first call picks the path (vmap may fail)
    maml = MAML(model, F.mse_loss, compile=True, chunk_size=2, **settings)
    calls = {"_compiled_gradient": [], "_compiled_batched": []}
    for name, record in calls.items():
        graph = getattr(maml, name)
        tasks = (lambda a: a[1].num_tasks) if name == "_compiled_gradient" else (
            lambda a: a[-1].shape[0])
        setattr(maml, name, lambda *a, graph=graph, record=record, tasks=tasks: (
            record.append(tasks(a)) or graph(*a)))
    maml.meta_backward(batch, weights)  # that first call runs the compiled forward and autograd
    assert calls["_compiled_batched"] == [2, 2, 1] and calls["_compiled_gradient"] == []
    assert relative(flat_grads(maml), expected) < 1e-5
    maml.zero_grad(set_to_none=True)
    torch._dynamo.utils.counters.clear()
    loss, metrics = maml.meta_backward(batch, weights)  # later calls: the compiled gradient
    assert calls["_compiled_gradient"] == [2, 2, 1]
    counters = torch._dynamo.utils.counters  # one whole graph: nothing dynamo stopped at
    assert not counters["graph_break"] and not counters["unimplemented"]
    assert relative(flat_grads(maml), expected) < 1e-5
    assert torch.allclose(loss, expected_loss.detach(), rtol=1e-5)
    assert metrics.keys() == expected_metrics.keys()
    assert all(torch.allclose(metrics[k], expected_metrics[k], rtol=1e-5) for k in metrics)
    assert torch.allclose(maml.evaluate(batch)["metric"], expected_eval, atol=1e-6)


def channels_last_strides(shape: torch.Size) -> tuple[int, ...]:
    out_channels, in_channels, height, width = shape
    return (height * width * in_channels, 1, width * in_channels, in_channels)


@pytest.mark.parametrize("compile", [True, False])
def test_only_compiled_graphs_take_conv_weights_channels_last(compile):
    model, loss_fn, batch = conv_problem()
    maml = MAML(model, loss_fn, 0.1, 1, batched=True, compile=compile)
    layouts = []

    def recording(fast, frozen, *rest):  # stands in for the graph (no compile needed)
        layouts.extend(p.stride() == channels_last_strides(p.shape)
                       for p in fast.values() if p.dim() == 4)
        return MAML._batched(maml, fast, frozen, *rest)

    setattr(maml, "_compiled_batched" if compile else "_batched", recording)
    loss, _ = maml.meta_loss(batch)
    loss.backward()  # the layout copy is differentiable
    assert layouts and all(channels_last == compile for channels_last in layouts)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_nan_meta_loss_is_named_by_meta_backward():
    model, loss_fn, batch = mlp_problem()
    maml = MAML(model, loss_fn)
    maml.meta_backward(batch)  # the first call picks the path; the next runs functionally
    bad = TaskBatch(batch.support_x, batch.support_y, batch.query_x,
                    torch.full_like(batch.query_y, float("nan")))
    with pytest.raises(NonFiniteLossError, match="meta-loss is nan"):
        maml.meta_backward(bad)


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_chunked_vmap_equals_looped(chunk_size):
    grads = {}
    for kwargs in ({"batched": True, "chunk_size": chunk_size}, {"batched": False}):
        model, loss_fn, batch = conv_problem()
        grads[len(kwargs)] = meta_grad(MAML(model, loss_fn, 0.1, 2, **kwargs), batch)
    assert relative(grads[2], grads[1]) < 1e-6


def test_cpu_chunks_hold_about_a_quarter_million_input_elements():
    model, loss_fn, _ = conv_problem()
    maml = MAML(model, loss_fn)
    images = TaskBatch(torch.zeros(32, 5, 1, 28, 28), torch.zeros(32, 5), torch.zeros(32, 75, 1, 28, 28),
                       torch.zeros(32, 75))
    assert maml._chunk(images) == 4  # Omniglot 5-way 1-shot with 15 queries per class
    assert MAML(model, loss_fn, chunk_size=32)._chunk(images) == 32


def accuracy_or_error(problem: str):
    if problem == "conv_bn":
        return lambda out, y: (out.argmax(-1) == y).double().mean()
    return lambda out, y: (out - y).abs().mean()


@pytest.mark.parametrize("problem", MORE_MODELS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("lr_mode", ["fixed", "scalar", "per_param", "per_layer_step"])
def test_checkpointed_steps_give_the_same_meta_gradient(problem, variant, lr_mode):
    model, loss_fn, batch = MORE_MODELS[problem]()
    kwargs = {**variant_kwargs(problem, variant), "lr_mode": lr_mode,
              "metric_fn": accuracy_or_error(problem)}
    weights = variant_weights(variant)
    reference = MAML(model, loss_fn, **kwargs)
    expected_loss, expected_metrics = reference.meta_loss(batch, weights)
    expected_loss.backward()
    expected = flat_grads(reference)  # a learned rate unused at 0 inner steps: None -> zeros
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


@pytest.mark.parametrize("functional", ["checkpoint_steps", "compile"])
def test_unused_learned_rates_keep_no_gradient_like_autograd(functional):
    """At 0 inner steps the learned rates do not enter the objective: autograd leaves their .grad
    None, and the functional branches of meta_backward must too (not write zeros)."""
    torch.set_default_dtype(torch.float32)
    model, loss_fn, batch = mlp_problem()
    model.float()
    batch = TaskBatch(*(t.float() for t in batch))
    maml = MAML(model, loss_fn, 0.1, 0, lr_mode="per_param", batched=True, **{functional: True})
    for _ in range(2):  # compile: the first call picks the path, the second is functional
        maml.zero_grad(set_to_none=True)
        maml.meta_backward(batch)
    assert all(p.grad is None for p in maml.inner_lrs.parameters())
    assert all(p.grad is not None for p in maml.model.parameters())


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
    move a parameter no loss uses. The functional branches leave it None too, also where the
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


def test_with_compile_the_search_also_times_the_compiled_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    batch = TaskBatch(*(torch.randn(6, 5, 1) for _ in range(4)))
    expected = meta_grad(MAML(model, F.mse_loss, 0.1, 1, batched=False), batch)
    searched = MAML(model, F.mse_loss, 0.1, 1, compile=True)
    tried, graph_calls = [], []
    meta_backward, compiled = searched.meta_backward, searched._compiled_gradient
    searched.meta_backward = lambda *a, **k: tried.append(searched._trying) or meta_backward(*a, **k)
    searched._compiled_gradient = lambda *a: graph_calls.append(1) or compiled(*a)
    searched.meta_backward(batch)
    assert tried[1:3] == [("compiled", 6), ("batched", 6)]  # warm-ups (compiling), after the call
    candidates = {("compiled", 6), ("batched", 6), ("batched", 1), ("looped", None)}
    assert set(tried[3:7]) == candidates and len(tried) == 9
    assert relative(flat_grads(searched), expected) < 1e-5
    (key, choice), = searched.path_choices.items()
    assert choice in candidates and searched.path == (
        "looped" if choice[1] is None else f"{choice[0]}, chunk {choice[1]}")
    for forced in (("compiled", 6), ("batched", 1)):  # each path, once chosen, gives the same
        searched.path_choices[key] = forced
        searched.zero_grad(set_to_none=True)
        graph_calls.clear()
        meta_backward(batch)
        assert searched.path == f"{forced[0]}, chunk {forced[1]}"
        assert len(graph_calls) == (forced[0] == "compiled")
        assert relative(flat_grads(searched), expected) < 1e-5


def stand_in_compile(batched: bool | None = True) -> tuple[MAML, TaskBatch, Callable, list[int]]:
    """A learner on ``mlp_problem`` whose compiled paths are eager stand-ins, with its batch, its
    eager functional gradient (uncounted, for a stand-in graph to call) and the list that each
    counted call of ``maml._gradient`` (the compared eager pass) grows."""
    model, loss_fn, batch = mlp_problem()
    maml = MAML(model, loss_fn, 0.1, 1, batched=batched, compile=True)
    maml._compiled_batched = maml._batched
    eager, eager_calls = maml._gradient, []
    maml._gradient = lambda *args: eager_calls.append(1) or eager(*args)
    return maml, batch, eager, eager_calls


@pytest.mark.parametrize("batched", [None, True])  # a candidate of the search, or compiled for sure
def test_a_compiled_meta_gradient_that_differs_from_the_eager_one_is_dropped(batched,
                                                                           monkeypatch):
    """As inductor did for a transformer encoder layer (1.6% off), simulated without compiling:
    the eager gradient, scaled by 1.01, stands in for the compiled graph's. The first compiled
    gradient of each input shape is checked, also where no search runs, until it agrees or
    has differed at ``COMPILED_CHECKS`` calls in a row (the search counts as one: it repeats
    its batch); each of them gives the eager gradient."""
    monkeypatch.setattr(fastmaml.paths, "_PATHS_CHOSEN", {})  # this process's earlier choices
    maml, batch, eager, _ = stand_in_compile(batched)
    graph_calls = []

    def off_by_one_percent(*args):
        graph_calls.append(1)
        grads, aux = eager(*args)
        return {name: 1.01 * g for name, g in grads.items()}, aux
    maml._compiled_gradient = off_by_one_percent
    expected = meta_grad(MAML(maml.model, maml.loss_fn, 0.1, 1, batched=False), batch)
    checks = fastmaml.paths.COMPILED_CHECKS
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastmaml.errors.FastMAMLWarning)
        for call in range(checks - 1):  # the graph's calls (the search's first one counts once)
            maml.zero_grad(set_to_none=True)
            maml.meta_backward(batch)
            assert relative(flat_grads(maml), expected) < 1e-10  # the eager gradient
            if batched is None and call == 0:  # the search timed the graph: say it won
                (key, (_, chunk)), = maml.path_choices.items()
                maml.path_choices[key] = ("compiled", chunk or batch.num_tasks)
    assert maml._compiled_gradient is not None
    maml.zero_grad(set_to_none=True)
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match="eager path's by "
                      + ", ".join(["1.0e-02"] * checks) + "; running uncompiled"):
        maml.meta_backward(batch)
    assert graph_calls and maml._compiled_gradient is None and "compiled" not in maml.path
    assert relative(flat_grads(maml), expected) < 1e-10  # the eager gradient, not the graph's
    graph_calls.clear()
    maml.zero_grad(set_to_none=True)
    maml.meta_backward(batch)  # uncompiled from then on
    assert not graph_calls and relative(flat_grads(maml), expected) < 1e-10


def test_the_search_compares_the_graph_once_and_gives_the_eager_gradient_where_it_differed(
        monkeypatch):
    """The search's calls repeat one batch: its first compiled call is compared, the rest are
    timed as they are; where the graph differed and won, ``.grad`` is the eager gradient."""
    monkeypatch.setattr(fastmaml.paths, "_PATHS_CHOSEN", {})  # this process's earlier choices
    maml, batch, eager, eager_calls = stand_in_compile(batched=None)
    maml._compiled_gradient = lambda *args: (
        {n: 1.01 * g for n, g in eager(*args)[0].items()}, eager(*args)[1])
    uncompiled = maml._backward
    maml._backward = lambda *args: time.sleep(0.2) or uncompiled(*args)  # so the graph wins
    expected = meta_grad(MAML(maml.model, maml.loss_fn, 0.1, 1, batched=False), batch)
    maml.meta_backward(batch)
    assert maml.path.startswith("compiled") and len(eager_calls) == 1
    assert relative(flat_grads(maml), expected) < 1e-10


def test_a_compiled_meta_gradient_off_by_rounding_once_is_kept_once_it_agrees():
    """Near a minimum, float32 rounding alone can take one call past the tolerance: that call
    gives the eager gradient, and the next one that agrees makes the graph trusted."""
    maml, batch, eager, eager_calls = stand_in_compile()
    graph_calls = []

    def off_at_first(*args):
        graph_calls.append(1)
        grads, aux = eager(*args)
        return {n: g * (1.01 if len(graph_calls) == 1 else 1.0) for n, g in grads.items()}, aux
    maml._compiled_gradient = off_at_first
    expected = meta_grad(MAML(maml.model, maml.loss_fn, 0.1, 1, batched=False), batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastmaml.errors.FastMAMLWarning)
        for _ in range(4):
            maml.zero_grad(set_to_none=True)
            maml.meta_backward(batch)
            assert relative(flat_grads(maml), expected) < 1e-6
    assert len(graph_calls) == 4 and len(eager_calls) == 2 and maml._compiled_gradient is not None


def test_a_right_compiled_meta_gradient_is_checked_once_per_input_shape():
    maml, batch, eager, eager_calls = stand_in_compile()
    graph_calls = []
    maml._compiled_gradient = lambda *args: graph_calls.append(1) or eager(*args)
    for _ in range(3):  # the graph, checked against the eager gradient once, then trusted
        maml.meta_backward(batch)
    assert len(graph_calls) == 3 and len(eager_calls) == 1 and maml._compiled_gradient is not None
    maml.meta_backward(TaskBatch(*(t[:2] for t in batch)))  # a new shape: checked again
    assert len(eager_calls) == 2


def test_a_non_finite_eager_gradient_leaves_the_shape_to_be_checked_at_its_next_call():
    model, loss_fn, batch = mlp_problem()
    maml = MAML(model, loss_fn, 0.1, 1, batched=True, compile=True, check_finite=False)
    maml._compiled_batched = maml._batched
    eager, eager_calls = maml._gradient, []

    def nan_at_first(*args):
        eager_calls.append(1)
        grads, aux = eager(*args)
        return ({n: g * math.nan for n, g in grads.items()} if len(eager_calls) == 1
                else grads), aux
    maml._gradient = nan_at_first
    maml._compiled_gradient = lambda *args: eager(*args)
    for _ in range(3):
        maml.meta_backward(batch)
    assert len(eager_calls) == 2 and maml._compiled_gradient is not None


def test_under_active_dropout_the_compiled_gradient_is_not_checked_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.1), nn.ReLU(), nn.Linear(8, 1))
    batch = TaskBatch(*(torch.randn(3, 4, 1) for _ in range(4)))
    maml = MAML(model, F.mse_loss, 0.1, 1, batched=True, compile=True)
    maml._compiled_batched = maml._batched
    maml._compiled_gradient = maml._gradient
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match="not checked .* active dropout"):
        maml.meta_backward(batch)
    assert maml._compiled_gradient is not None


def no_cxx_compiler(*_):
    """What ``torch.compile`` raises on a CPU machine without a C++ compiler (torch 2.13)."""
    from torch._inductor.exc import InductorError
    raise InductorError(RuntimeError("InvalidCxxCompiler: No working C++ compiler found"), None)


@pytest.mark.parametrize("batched", [True, None])  # compiled for sure, or a candidate of the search
def test_a_failed_compile_runs_uncompiled_from_then_on_with_a_warning(batched, monkeypatch):
    monkeypatch.setattr(fastmaml.paths, "_PATHS_CHOSEN", {})  # this process's earlier choices
    model, loss_fn, batch = mlp_problem()
    expected = meta_grad(MAML(model, loss_fn, 0.1, 2, batched=False), batch)
    maml = MAML(model, loss_fn, 0.1, 2, batched=batched, compile=True)
    maml._compiled_gradient = maml._compiled_batched = no_cxx_compiler
    with pytest.warns(UserWarning, match=r"torch.compile failed \(.*No working C\+\+ compiler "
                                         r"found\); running uncompiled"):
        maml.meta_backward(batch)
    assert maml._compiled_gradient is None and maml._compiled_batched is None
    assert relative(flat_grads(maml), expected) < 1e-10
    assert all("compile=False" in key for key in maml.path_choices)
    assert "compiled" not in maml.path
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning: later calls run uncompiled, silently
        for _ in range(2):
            maml.zero_grad(set_to_none=True)
            maml.meta_backward(batch)
            assert relative(flat_grads(maml), expected) < 1e-10
        assert relative(meta_grad(maml, batch), expected) < 1e-10


class FailsToCompileItsBackward(torch.autograd.Function):
    """An output whose backward graph fails to compile, as AOTAutograd compiles it lazily."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        no_cxx_compiler()


def test_a_compile_failure_in_the_backward_pass_also_falls_back():
    model, loss_fn, batch = mlp_problem()
    expected = meta_grad(MAML(model, loss_fn, 0.1, 2, batched=False), batch)
    maml = MAML(model, loss_fn, 0.1, 2, compile=True, chunk_size=2)  # no search: a lazy first call
    maml._compiled_batched = lambda *args: tuple(
        FailsToCompileItsBackward.apply(t) if t.requires_grad else t for t in maml._batched(*args))
    for p in maml.parameters():
        p.grad = torch.ones_like(p)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        maml.meta_backward(batch)  # the first call: compiled forward, then autograd
    assert maml._compiled_batched is None and maml.path == "batched"
    assert relative(flat_grads(maml), expected + 1) < 1e-10  # accumulated once, onto the ones


def test_a_path_chosen_compiled_is_labelled_as_it_ran_once_compiling_fails():
    model, loss_fn, batch = mlp_problem()
    maml = MAML(model, loss_fn, 0.1, 1, compile=True)
    maml.path_choices[maml._path_key(batch)] = ("compiled", 2)  # e.g. from a checkpoint
    maml._compiled_gradient = maml._compiled_batched = no_cxx_compiler
    with pytest.warns(UserWarning, match="torch.compile failed"):
        maml.meta_loss(batch)
    assert maml.path == "batched, chunk 2"


def test_a_users_error_under_compile_is_raised_and_compiling_stays_on():
    model, loss_fn, batch = mlp_problem()
    wrong_features = TaskBatch(*(t.repeat(1, 1, 2) for t in batch))
    maml = MAML(model, loss_fn, 0.1, 1, batched=True, compile=True)
    maml._compiled_gradient = maml._compiled_batched = no_cxx_compiler
    for call in (maml.meta_backward, maml.meta_loss):
        with pytest.raises(ShapeError, match="forward failed on a per-task input of shape"):
            call(wrong_features)
        assert maml._compiled_gradient is no_cxx_compiler
        assert maml._compiled_batched is no_cxx_compiler


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


def test_the_default_path_is_chosen_by_timing_and_kept_per_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    batch = TaskBatch(torch.randn(6, 5, 1), torch.randn(6, 5, 1), torch.randn(6, 5, 1),
                      torch.randn(6, 5, 1))
    reference = MAML(model, F.mse_loss, 0.1, 1, batched=False)
    expected = meta_grad(reference, batch)
    searched = MAML(model, F.mse_loss, 0.1, 1)
    calls = []
    original = searched.forward
    searched.forward = lambda *a, **k: calls.append(searched._trying) or original(*a, **k)
    searched.meta_backward(batch)
    got = flat_grads(searched)  # one gradient in .grad, though every candidate ran
    assert relative(got, expected) < 1e-6
    (key, choice), = searched.path_choices.items()
    # a warm-up, every candidate, then the two fastest again
    assert calls[:4] == [("batched", 6), ("batched", 6), ("batched", 1), ("looped", None)]
    assert len(calls) == 6 and set(calls[4:]) <= set(calls[1:4]) and calls[4] != calls[5]
    assert searched.path in ("looped", f"batched, chunk {choice[1]}")
    calls.clear()
    searched.meta_backward(batch)
    assert calls == [None]  # no second search for the same shape
    again = MAML(model, F.mse_loss, 0.1, 1)  # same model and settings in this process: reused
    again.meta_backward(batch)
    assert again.path_choices == searched.path_choices
    for explicit in (dict(batched=True), dict(batched=False), dict(chunk_size=2)):
        pinned = MAML(model, F.mse_loss, 0.1, 1, **explicit)
        pinned.meta_backward(batch)
        assert pinned.path_choices == {}


def test_a_seeded_run_with_dropout_draws_the_same_whether_it_searches_or_not(monkeypatch):
    """The search runs about 7 meta-gradients; their dropout draws must not shift the seeded
    random stream of the run, or a second run in the process (reusing the choice) differs."""
    monkeypatch.setattr(fastmaml.paths, "_PATHS_CHOSEN", {})  # no choices from other tests
    torch.manual_seed(0)
    batch = TaskBatch(torch.randn(4, 4, 3), torch.randn(4, 4, 1), torch.randn(4, 6, 3),
                      torch.randn(4, 6, 1))

    def train() -> tuple[torch.Tensor, bool]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.3), nn.Linear(16, 1))
        maml = MAML(model, F.mse_loss, inner_lr=0.1)
        optimizer = torch.optim.SGD(maml.parameters(), 0.1)
        searched = []
        for _ in range(3):
            optimizer.zero_grad()
            searched.append(maml._searches(batch))
            maml.meta_backward(batch)
            optimizer.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()]), searched[0]

    (first, searched), (second, searched_again) = train(), train()
    assert searched and not searched_again
    assert torch.equal(first, second)


def test_a_path_chosen_without_compile_is_not_reused_when_compiling(monkeypatch):
    """A run resumed with ``compile=true`` searches again (the compiled path is a candidate);
    resumed as it was, it reuses its own choice."""
    monkeypatch.setattr(fastmaml.paths, "_PATHS_CHOSEN", {})  # no choices from other tests
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    batch = TaskBatch(*(torch.randn(6, 5, 1) for _ in range(4)))
    eager = MAML(model, F.mse_loss, 0.1, 1)
    eager.meta_backward(batch)
    compiled = MAML(model, F.mse_loss, 0.1, 1, compile=True)
    compiled.path_choices = dict(eager.path_choices)  # as a checkpoint restores them
    tried = []
    meta_backward = compiled.meta_backward
    compiled.meta_backward = lambda *a, **k: tried.append(compiled._trying) or meta_backward(*a, **k)
    compiled.meta_backward(batch)
    assert ("compiled", 6) in tried and len(compiled.path_choices) == 2
    resumed = MAML(model, F.mse_loss, 0.1, 1)
    resumed.path_choices = dict(compiled.path_choices)
    calls = []
    forward = resumed.forward
    resumed.forward = lambda *a, **k: calls.append(resumed._trying) or forward(*a, **k)
    resumed.meta_backward(batch)
    assert calls == [None] and resumed.path_choices == compiled.path_choices
    assert resumed.path == eager.path


@pytest.mark.parametrize("change", ["path implementations", "CPU vector instructions"])
def test_a_path_chosen_on_other_paths_or_cpu_is_timed_again(monkeypatch, change):
    monkeypatch.setattr(fastmaml.paths, "_PATHS_CHOSEN", {})  # no choices from other tests
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    batch = TaskBatch(*(torch.randn(6, 5, 1) for _ in range(4)))
    old = MAML(model, F.mse_loss, 0.1, 1)
    old.meta_backward(batch)
    monkeypatch.setattr(fastmaml.paths, "_PATHS_CHOSEN", {})  # a new process
    if change == "path implementations":
        monkeypatch.setattr(fastmaml.paths, "PATHS_REVISION", fastmaml.paths.PATHS_REVISION + 1)
    else:  # e.g. a run timed on an AVX512 machine, resumed on an AVX2 one
        other = "AVX2" if torch.backends.cpu.get_cpu_capability() != "AVX2" else "AVX512"
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    resumed = MAML(model, F.mse_loss, 0.1, 1)
    resumed.path_choices = dict(old.path_choices)  # as a checkpoint restores them
    calls = []
    forward = resumed.forward
    resumed.forward = lambda *a, **k: calls.append(resumed._trying) or forward(*a, **k)
    resumed.meta_backward(batch)
    assert ("looped", None) in calls and len(resumed.path_choices) == 2


class OtherRank:
    """``gather_ranks`` of this process and one more rank, which has ``knows`` a path for its
    input shape (``key``) and, searching, found only the ``fast`` role quick (1 s; 100 s the
    others)."""

    def __init__(self, knows: bool, fast: str = "looped", key: str = "other rank's shape"):
        self.knows, self.fast, self.key, self.values = knows, fast, key, []

    def __call__(self, value):
        self.values.append(value)
        if isinstance(value, bool):  # "have I no path for my shape?"
            return [value, not self.knows]
        _, offer = value
        return [value, (self.key, {role: (("batched", 7) if role != "looped" else choice,
                                           1.0 if role == self.fast else 100.0)
                                    for role, (choice, _) in offer.items()})]


def test_ranks_that_step_together_search_together_and_keep_the_path_fastest_on_the_slowest(
        monkeypatch):
    """With ``gather_ranks``, a rank that searches alone would time its candidates while the
    others wait, and might keep a path another rank finds slow (two torchrun ranks of one
    Omniglot run took different chunk sizes): all search where any has no path, and all keep
    the role with the best time on its slowest rank, recorded for every rank's shape. They
    ask at the first call in each derivative order, which all make together; a rank whose key
    changes alone (e.g. its compiling fell back) searches alone, and one whose vmap failed
    offers its looped time for every role."""
    monkeypatch.setattr(fastmaml.paths, "_PATHS_CHOSEN", {})  # no choices from other tests
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    batch = TaskBatch(*(torch.randn(6, 5, 1) for _ in range(4)))
    expected = meta_grad(MAML(model, F.mse_loss, 0.1, 1, batched=False), batch)
    maml = MAML(model, F.mse_loss, 0.1, 1)
    key = maml._path_key(batch)
    maml.path_choices[key] = ("batched", 6)  # this rank knows a path (e.g. from a checkpoint)
    maml.gather_ranks = other = OtherRank(knows=False, fast="one task")
    maml.meta_backward(batch)
    assert other.values[0] is False and len(other.values) == 2  # asked, then the offers
    assert maml.path == "batched, chunk 1" and relative(flat_grads(maml), expected) < 1e-6
    assert maml.path_choices == {key: ("batched", 1), "other rank's shape": ("batched", 7)}
    other.values.clear()
    maml.meta_backward(batch)
    assert other.values == []  # asked once per derivative order
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # a key changed on this rank alone: searched alone
    try:
        maml.meta_backward(batch)
    finally:
        torch.set_num_threads(threads)
    assert other.values == [] and len(maml.path_choices) == 3
    maml.first_order = True  # the driver switches every rank at once: asked again
    maml.meta_backward(batch)
    assert other.values[0] is True and len(other.values) == 2
    assert len(maml.path_choices) == 4  # a first-order key of this rank's (the other's: one name)

    knowing = MAML(model, F.mse_loss, 0.1, 1)
    knowing.path_choices[key] = ("looped", None)
    knowing.gather_ranks = other = OtherRank(knows=True)
    calls = []
    forward = knowing.forward
    knowing.forward = lambda *a, **k: calls.append(knowing._trying) or forward(*a, **k)
    knowing.meta_backward(batch)
    assert other.values == [False] and calls == [None] and knowing.path == "looped"

    model.zero_grad(set_to_none=True)
    failed = MAML(model, F.mse_loss, 0.1, 1)
    failed._vmap_failed = True  # as after vmap failed on this rank: it runs looped
    failed.gather_ranks = other = OtherRank(knows=False, fast="all tasks")
    failed.meta_backward(batch)
    _, offer = other.values[1]
    assert len({seconds for _, seconds in offer.values()}) == 1  # every role: the looped time
    assert failed.path == "looped" and relative(flat_grads(failed), expected) < 1e-6
    assert failed.path_choices["other rank's shape"] == ("batched", 7)  # the other keeps vmap


def test_a_warning_shows_the_cause_that_an_introducing_first_line_announces():
    inductor = RuntimeError("backend='inductor' raised:\nNotImplementedError: no storage\n\nSet ...")
    assert fastmaml.errors.first_line(inductor) == (
        "backend='inductor' raised: NotImplementedError: no storage")
    assert fastmaml.errors.first_line(RuntimeError("one line\nand more")) == "one line"
    assert fastmaml.errors.first_line(RuntimeError("  ")) == "RuntimeError"


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


def test_batch_norm_over_one_example_is_refused_in_training_too():
    model = MLP([2, 8, 1], batch_norm=True)
    one = TaskBatch(*(torch.randn(3, 1, 2 if i % 2 == 0 else 1) for i in range(4)))
    with pytest.raises(ShapeError, match="batch norm over a batch of one value per channel"):
        MAML(model, F.mse_loss).meta_loss(one)


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


def test_attention_is_found_in_torchs_modules_and_in_forwards_that_call_it():
    assert fastmaml.core._has_attention(attention_problem(encoder_layer=True)()[0])
    assert fastmaml.core._has_attention(SelfAttention(4, 5))
    assert not fastmaml.core._has_attention(MLP([1, 8, 1]))
    assert not fastmaml.core._has_attention(ConvNet(1, 3, hidden=4, image_size=8))
