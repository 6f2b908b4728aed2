"""Per-step parameters (MAML++'s per-step batch-norm weights and biases): ``fastmaml.per_step``."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.func import functional_call

import fastmaml
from fastmaml import MAML, ConfigError, TaskBatch
from fastmaml.errors import FastMAMLWarning
from fastmaml.cli import main
from fastmaml.core import multi_step_loss_weights
from fastmaml.models import ConvNet, MLP, is_norm_param
from problems import flat_grads, relative

TASKS, STEPS = 3, 3
pytestmark = pytest.mark.usefixtures("float64")  # exact comparisons


def conv_problem(seed: int = 0):
    """The paper's conv net (batch-norm biases trained by the outer loop alone), 3-way tasks."""
    torch.manual_seed(seed)
    model = ConvNet(1, 3, hidden=4, strided=True, image_size=8, blocks=2)
    batch = TaskBatch(torch.randn(TASKS, 6, 1, 8, 8), torch.randint(0, 3, (TASKS, 6)),
                      torch.randn(TASKS, 6, 1, 8, 8), torch.randint(0, 3, (TASKS, 6)))
    return model, batch


def per_step_maml(model, steps: int = STEPS, spread: bool = True, **kwargs) -> MAML:
    """The batch-norm biases per step; with ``spread``, each copy moved away from the model's
    own, so that a forward that took the wrong copy would show."""
    maml = MAML(model, F.cross_entropy, 0.4, steps, adapt=lambda n, _: not is_norm_param(n, model),
                per_step=lambda n, _: is_norm_param(n, model), **kwargs)
    if spread:
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for copies in maml.per_step.copies.values():
                copies.add_(torch.randn(copies.shape, generator=generator))
    return maml


def reference_meta_loss(maml: MAML, batch: TaskBatch, steps: int,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """The meta-loss written out, one task at a time: inner step k's support forward and the
    query forward after it set each batch-norm bias to its set k (MAML++'s indexing): the
    model's own at k = 0, else copy k - 1."""
    model = maml.model
    norm_names = [n for n, p in model.named_parameters()
                  if p.requires_grad and is_norm_param(n, model)]
    own = dict(model.named_parameters())

    def forward(fast, k, x):
        biases = {n: own[n] if k == 0 else maml.per_step.copies[n.replace(".", "__")][k - 1]
                  for n in norm_names}
        return functional_call(model, {**own, **dict(model.named_buffers()), **biases, **fast},
                               (x,))

    losses = []
    for sx, sy, qx, qy in zip(*batch):
        fast = {n: p for n, p in own.items() if n not in norm_names and p.requires_grad}
        query = []
        for k in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(forward(fast, k, sx), sy),
                                        list(fast.values()), create_graph=True)
            fast = {n: p - 0.4 * g for (n, p), g in zip(fast.items(), grads)}
            query.append(F.cross_entropy(forward(fast, k, qx), qy))
        query = torch.stack(query)
        losses.append(query[-1] if weights is None else query @ weights)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("msl", [False, True])
def test_inner_step_k_and_the_query_after_it_use_set_k_as_written_out(msl):
    model, batch = conv_problem()
    maml = per_step_maml(model, batched=False)
    weights = multi_step_loss_weights(STEPS, 0.3) if msl else None
    params = [p for p in maml.parameters() if p.requires_grad]
    expected = reference_meta_loss(maml, batch, STEPS, weights)
    loss, _ = maml.meta_loss(batch, weights)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)
    assert len(maml.per_step.copies) == 2  # the two blocks' biases: sets 1.. of the inner steps
    assert all(c.shape == (STEPS - 1, 4) for c in maml.per_step.copies.values())


def test_the_meta_gradient_of_the_copies_matches_finite_differences():
    model, batch = conv_problem()
    maml = per_step_maml(model)
    loss, _ = maml.meta_loss(batch)
    copies = list(maml.per_step.parameters())
    analytic = torch.autograd.grad(loss, copies)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        direction = [torch.randn(c.shape, generator=generator) for c in copies]
        values = []
        with torch.no_grad():
            for sign in (1, -1):
                for c, d in zip(copies, direction):
                    c.add_(sign * 1e-6 * d)
                values.append(maml.meta_loss(batch)[0].item())
                for c, d in zip(copies, direction):
                    c.sub_(sign * 1e-6 * d)
        numeric = (values[0] - values[1]) / 2e-6
        got = sum((g * d).sum() for g, d in zip(analytic, direction)).item()
        assert got == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_copies_start_as_the_model_and_their_gradients_sum_to_the_tied_one():
    """Fresh copies equal the model's biases: the same meta-loss as without them, and the
    gradients of a bias and of its copies add up to the bias's gradient without copies."""
    model, batch = conv_problem()
    tied = MAML(model, F.cross_entropy, 0.4, STEPS, adapt=lambda n, _: not is_norm_param(n, model))
    untied = per_step_maml(conv_problem()[0], spread=False)
    tied_loss, _ = tied.meta_loss(batch)
    untied_loss, _ = untied.meta_loss(batch)
    assert untied_loss.item() == pytest.approx(tied_loss.item(), rel=1e-13)
    tied_loss.backward()
    untied_loss.backward()
    for name, p in untied.model.named_parameters():
        if p.requires_grad and is_norm_param(name, model):
            copies = untied.per_step.copies[name.replace(".", "__")]
            assert copies.grad.abs().sum() > 0
            assert torch.allclose(p.grad + copies.grad.sum(0), model.get_parameter(name).grad,
                                  rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("msl", [False, True])
def test_batched_looped_checkpointed_and_functional_paths_agree(first_order, msl):
    """Every path gives the looped path's meta-gradient, and leaves the same parameters without
    ``.grad``; "functional" is ``torch.func.grad`` of the whole objective, the compiled path's
    form, run eagerly."""
    weights = multi_step_loss_weights(STEPS, 0.3) if msl else None
    grads, losses, without = {}, {}, {}
    for path, options in {"looped": {"batched": False}, "batched": {"batched": True},
                          "functional": {"batched": True, "compile": True},
                          "checkpointed_batched": {"batched": True, "checkpoint_steps": True},
                          "checkpointed_looped": {"batched": False,
                                                  "checkpoint_steps": True}}.items():
        model, batch = conv_problem()
        maml = per_step_maml(model, first_order=first_order, **options)
        if options.get("compile"):  # eager stand-ins for the compiled graphs
            maml._compiled_batched, maml._compiled_gradient = maml._batched, maml._gradient
        for _ in range(2):  # the functional path runs from the second call on
            maml.zero_grad(set_to_none=True)
            loss, _ = maml.meta_backward(batch, weights)
        grads[path], losses[path] = flat_grads(maml), loss.item()
        without[path] = {n for n, p in maml.named_parameters() if p.grad is None}
        copies = torch.cat([p.grad.flatten() for p in maml.per_step.parameters()])
        assert copies.abs().sum() > 0, path
    for path in grads:
        assert relative(grads[path], grads["looped"]) < 1e-10, path
        assert losses[path] == pytest.approx(losses["looped"], rel=1e-12)
        assert without[path] == without["looped"], path
    # in first order only the first support forward uses the model's own biases (set 0): no
    # derivative reaches them, unless the multi-step loss takes the query loss after that step
    assert ("model.features.0.1.bias" in without["looped"]) == (first_order and not msl)


@pytest.mark.parametrize("first_order", [False, True])
def test_compiled_meta_gradient_with_copies_matches_eager(first_order):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    model = MLP([1, 8, 8, 1])  # per step: the hidden layer's weights; adapted: the head
    batch = TaskBatch(torch.randn(TASKS, 5, 1), torch.randn(TASKS, 5, 1),
                      torch.randn(TASKS, 6, 1), torch.randn(TASKS, 6, 1))
    grads, without = {}, {}
    for compile in (False, True):
        maml = MAML(model, F.mse_loss, 0.1, STEPS, first_order, adapt=["4"], per_step=["2"],
                    batched=True, compile=compile)
        with torch.no_grad():
            maml.per_step.copies["2__weight"].mul_(torch.tensor([0.5, 2.0])[:, None, None])
        for _ in range(2):  # the first call picks the path; the second is one compiled graph
            maml.zero_grad(set_to_none=True)
            maml.meta_backward(batch)
        grads[compile] = flat_grads(maml)
        without[compile] = {n for n, p in maml.named_parameters() if p.grad is None}
    # the graph's own gradient agreed (a differing one is replaced by the eager one)
    assert maml._compiled_checked and not maml._compiled_misses
    assert relative(grads[True], grads[False]) < 1e-5
    assert without[True] == without[False] == ({"model.2.weight", "model.2.bias"}
                                               if first_order else set())


def test_adapt_returns_the_last_steps_copies_for_predict():
    model, batch = conv_problem()
    maml = per_step_maml(model, metric_fn=lambda out, y: (out.argmax(-1) == y).double().mean())
    with pytest.warns(FastMAMLWarning, match=f"inner steps {STEPS + 1} to {STEPS + 2} reuse step "
                                             f"{STEPS}'s learned set of per-step parameters: "
                                             f"they were learned for inner_steps={STEPS}"):
        evaluated = maml.evaluate(batch, steps=STEPS + 2)  # beyond the copies: the last one
    sx, sy, qx, qy = (t[0] for t in batch)
    for steps in range(STEPS + 3):
        with (pytest.warns(FastMAMLWarning, match=f"step {steps} reuses|steps {STEPS + 1} to")
              if steps > STEPS else warnings.catch_warnings(action="error")):
            adapted = maml.adapt(sx, sy, steps)
        for name, copies in maml.per_step.copies.items():
            name = name.replace("__", ".")
            if steps <= 1:  # set 0 (or no step): the model's own
                assert name not in adapted
            else:  # the last step's set, steps - 1, or the last set beyond them
                assert torch.equal(adapted[name], copies[min(steps - 1, STEPS - 1) - 1])
        loss = F.cross_entropy(maml.predict(adapted, qx), qy)
        assert loss.item() == pytest.approx(evaluated["loss"][0, steps].item(), rel=1e-10)
    adapted = maml.adapt(sx, sy)
    next(iter(maml.per_step.copies.values())).data.zero_()  # the result holds copies
    assert all(t.abs().sum() > 0 for t in adapted.values())


def test_selections_the_copies_cannot_take_are_named():
    model, _ = conv_problem()
    norm = lambda n, _: is_norm_param(n, model)  # noqa: E731
    with pytest.raises(ConfigError, match="per_step selects features.0.1.bias, features.1.1.bias, "
                                          "which the inner loop adapts"):
        MAML(model, F.cross_entropy, 0.4, STEPS, per_step=norm)
    for steps in (0, 1):
        with pytest.raises(ConfigError, match=f"with inner_steps={steps} the model's own is the "
                                              "only one: use inner_steps >= 2"):
            MAML(model, F.cross_entropy, 0.4, steps, adapt=["head"], per_step=norm)
    with pytest.raises(ConfigError, match="per_step prefix\\(es\\) 'nowhere' match no trainable"):
        MAML(model, F.cross_entropy, 0.4, STEPS, adapt=["head"], per_step=["nowhere"])
    with pytest.raises(ConfigError, match="per_step must be None \\(none\\), name prefixes"):
        MAML(model, F.cross_entropy, 0.4, STEPS, per_step=3)
    # the paper's batch-norm scales are frozen: said so
    with pytest.raises(ConfigError, match=r"per_step prefix\(es\) 'features.0.1.weight' match no "
                                          r"trainable parameter of the model \(features.0.1.weight:"
                                          r" frozen, requires_grad=False\)"):
        MAML(model, F.cross_entropy, 0.4, STEPS, adapt=["head"], per_step=["features.0.1.weight"])


def write_classes(data, classes, per_class, size=8):
    for c in range(classes):
        (data / f"class{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (size, size), 20 * c + 3 * i).save(data / f"class{c:02d}" / f"{i}.png")


def test_a_run_with_per_step_norms_trains_resumes_evaluates_and_adapts(tmp_path, capsys):
    torch.set_default_dtype(torch.float32)  # as a user's run
    data, run = tmp_path / "data", tmp_path / "run"
    write_classes(data, 6, 3)
    common = ["--data-root", str(data), "n_way=2", "k_shot=1", "k_query=1", "eval_k_query=1",
              "image_size=8", "hidden=4", "meta_batch=2", "val_every=0",
              "split_fractions=0.34,0.33,0.33", "eval_tasks=4", "inner_steps=3",
              "checkpoint_every=1", "--no-progress"]
    train = ["train", "fewshot-folder", "--out", str(run), "per_step=norm", "norm_scale=true",
             *common]
    assert main([*train, "iterations=2"]) == 0
    assert main([*train, "iterations=3"]) == 0  # resumed
    assert main(["eval", str(run), "--no-progress"]) == 0
    assert json.loads((run / "eval.json").read_text())[0]["tasks"] == 4
    trained = fastmaml.load_run(run)
    copies = dict(trained.maml.per_step.named_parameters())
    # the 4 blocks' batch-norm biases and (norm_scale) scales: sets 1 and 2 of 4 channels
    assert len(copies) == 8 and all(c.shape == (2, 4) for c in copies.values())
    assert any(not torch.equal(c[0], c[1]) for c in copies.values())  # trained apart
    support = torch.rand(2, 1, 8, 8)
    adapted = trained.adapt(support, torch.tensor([0, 1]), steps=3)
    for name, c in copies.items():  # after the run's 3 steps: step 2's set
        assert torch.equal(adapted.params[name[len("copies."):].replace("__", ".")], c[1])
    assert trained.predict(adapted, support, context=support).shape == (2, 2)
    capsys.readouterr()
    assert main(["train", "fewshot-folder", "--out", str(tmp_path / "other"), "per_step=head",
                 "iterations=1", *common]) == 2
    assert "per_step selects head.weight, head.bias, which the inner loop adapts" in \
        capsys.readouterr().err
