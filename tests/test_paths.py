"""The execution paths (``fastmaml.paths``): batched, looped and compiled give one
meta-gradient; the path search, compiling's check and fallbacks, chunks, and ranks that search
together."""
from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml.errors
import fastmaml.paths
from fastmaml import MAML, ShapeError, TaskBatch
from fastmaml.core import multi_step_loss_weights
from problems import (PROBLEMS, EvalAttention, attention_batch, conv_problem, flat_grads,
                      meta_grad, mlp_problem, relative)

pytestmark = pytest.mark.usefixtures("float64")  # exact comparisons


@pytest.fixture(autouse=True)
def no_earlier_path_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without the path choices and searched shapes this process's earlier
    tests made (a search reuses them)."""
    monkeypatch.setattr(fastmaml.paths, "_PATHS_CHOSEN", {})
    monkeypatch.setattr(fastmaml.paths, "_SHAPES_SEARCHED", {})


def test_compiled_batched_path_matches_eager():
    torch.set_default_dtype(torch.float32)
    model, loss_fn, batch = mlp_problem()
    batch = TaskBatch(*(t.float() for t in batch))
    model.float()
    eager = meta_grad(MAML(model, loss_fn, 0.1, 2, batched=True), batch)
    compiled_maml = MAML(model, loss_fn, 0.1, 2, batched=True, compile=True)
    assert relative(meta_grad(compiled_maml, batch), eager) < 1e-5
    assert compiled_maml.path == f"compiled, chunk {batch.num_tasks}"  # (a chunk of all tasks)
    smaller = TaskBatch(*(t[:2, :4] for t in batch))  # new shapes: a recompile, not an error
    assert relative(meta_grad(compiled_maml, smaller),
                    meta_grad(MAML(model, loss_fn, 0.1, 2, batched=True), smaller)) < 1e-5
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match="compile=True with checkpoint_steps=True: "
                      "meta_backward's recomputing backward runs eager"):
        checkpointed = MAML(model, loss_fn, 0.1, 2, compile=True, checkpoint_steps=True)
    checkpointed.meta_backward(batch)
    assert relative(flat_grads(checkpointed), eager) < 1e-5
    assert checkpointed.path == "batched"  # not compiled, as it said


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
        assert compiled.path == "compiled, chunk 2", call  # as it ran (was "batched")
    # the graph's own gradient agreed (a differing one is replaced by the eager one)
    assert compiled._path_key(batch) in compiled._compiled_checked
    assert compiled._compiled_gradient is not None and not compiled._compiled_misses


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
    # the last step's loss alone (a run past msl_anneal_iterations): a graph compared anew
    assert maml._path_key(batch) not in maml._compiled_checked
    maml.zero_grad(set_to_none=True)
    maml.meta_backward(batch)
    assert maml._path_key(batch) in maml._compiled_checked and not maml._compiled_misses
    assert relative(flat_grads(maml), meta_grad(looped, batch)) < 1e-5


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


def test_with_compile_the_search_also_times_the_compiled_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    batch = TaskBatch(*(torch.randn(6, 5, 1) for _ in range(4)))
    expected = meta_grad(MAML(model, F.mse_loss, 0.1, 1, batched=False), batch)
    searched = MAML(model, F.mse_loss, 0.1, 1, compile=True)
    graph_calls, compiled = [], searched._compiled_gradient
    tried = paths_tried(searched, "meta_backward")
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
        searched.meta_backward(batch)
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
    return maml, batch, *counted_eager(maml)


def paths_tried(maml: MAML, method: str = "forward") -> list[tuple[str, int | None] | None]:
    """The list that each call of ``maml``'s ``method`` from now on grows by the path the search
    is timing (None: outside a search)."""
    tried, call = [], getattr(maml, method)
    setattr(maml, method, lambda *a, **k: tried.append(maml._trying) or call(*a, **k))
    return tried


def counted_eager(maml: MAML) -> tuple[Callable, list[int]]:
    """``maml``'s eager functional gradient (uncounted) and the list that each call of
    ``maml._gradient`` (the compared eager pass), counted from now on, grows."""
    eager, eager_calls = maml._gradient, []
    maml._gradient = lambda *args: eager_calls.append(1) or eager(*args)
    return eager, eager_calls


@pytest.mark.parametrize("batched", [None, True])  # a candidate of the search, or compiled for sure
def test_a_compiled_meta_gradient_that_differs_from_the_eager_one_is_dropped(batched):
    """As inductor did for a transformer encoder layer (1.6% off), simulated without compiling:
    the eager gradient, scaled by 1.01, stands in for the compiled graph's. The first compiled
    gradient of each input shape is checked, also where no search runs, until it agrees or
    has differed at ``COMPILED_CHECKS`` calls in a row (the search counts as one: it repeats
    its batch); each of them gives the eager gradient."""
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


@pytest.mark.parametrize("weighted", [False, True])  # (the multi-step loss: its own graph)
def test_the_search_compares_the_graph_once_and_gives_the_eager_gradient_where_it_differed(
        monkeypatch, weighted):
    """The search's calls repeat one batch: its first compiled call is compared, the rest are
    timed as they are; where the graph differed and won, ``.grad`` is the eager gradient."""
    maml, batch, eager, eager_calls = stand_in_compile(batched=None)
    weights = torch.ones(1) if weighted else None
    maml._compiled_gradient = lambda *args: (
        {n: 1.01 * g for n, g in eager(*args)[0].items()}, eager(*args)[1])
    # the search's clock: each uncompiled call takes a second, the graph none, so it wins
    clock = [0.0]
    monkeypatch.setattr(fastmaml.paths, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    uncompiled = maml._backward
    maml._backward = lambda *args: clock.__setitem__(0, clock[0] + 1) or uncompiled(*args)
    expected = meta_grad(MAML(maml.model, maml.loss_fn, 0.1, 1, batched=False), batch)
    maml.meta_backward(batch, weights)
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
    maml._compiled_gradient = maml._gradient  # a stand-in graph
    _, eager_calls = counted_eager(maml)
    with pytest.warns(fastmaml.errors.FastMAMLWarning, match="not checked .* active dropout"):
        maml.meta_backward(batch)
    for _ in range(fastmaml.paths.COMPILED_CHECKS):
        maml.meta_backward(batch)
    assert not eager_calls and maml._compiled_gradient is not None


def no_cxx_compiler(*_):
    """What ``torch.compile`` raises on a CPU machine without a C++ compiler (torch 2.13)."""
    from torch._inductor.exc import InductorError
    raise InductorError(RuntimeError("InvalidCxxCompiler: No working C++ compiler found"), None)


@pytest.mark.parametrize("batched", [True, None])  # compiled for sure, or a candidate of the search
def test_a_failed_compile_runs_uncompiled_from_then_on_with_a_warning(batched):
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


def test_the_default_path_is_chosen_by_timing_and_kept_per_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    batch = TaskBatch(torch.randn(6, 5, 1), torch.randn(6, 5, 1), torch.randn(6, 5, 1),
                      torch.randn(6, 5, 1))
    reference = MAML(model, F.mse_loss, 0.1, 1, batched=False)
    expected = meta_grad(reference, batch)
    searched = MAML(model, F.mse_loss, 0.1, 1)
    calls = paths_tried(searched)
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
    again_calls = paths_tried(again)
    again.meta_backward(batch)
    assert again_calls == [None] and again.path_choices == searched.path_choices  # not searched
    for explicit in (dict(batched=True), dict(batched=False), dict(chunk_size=2)):
        pinned = MAML(model, F.mse_loss, 0.1, 1, **explicit)
        pinned.meta_backward(batch)
        assert pinned.path_choices == {}


def timed_by_shape(monkeypatch: pytest.MonkeyPatch, maml: MAML,
                   fastest: Callable[[TaskBatch], tuple[str, int | None]]) -> None:
    """The search's clock for ``maml``: a second per call of the path ``fastest`` names for the
    batch, two per call of any other."""
    clock, uncompiled = [0.0], maml._backward
    monkeypatch.setattr(fastmaml.paths, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def timed(batch, *args):
        clock[0] += 1 if maml._trying == fastest(batch) else 2
        return uncompiled(batch, *args)
    maml._backward = timed


def shots_batch(tasks: int, shots: int) -> TaskBatch:
    return TaskBatch(*(torch.randn(tasks, shots, 1) for _ in range(4)))


def all_tasks_up_to_3_shots(batch: TaskBatch) -> tuple[str, int | None]:
    """All tasks at once is the fastest for K <= 3, the loop beyond."""
    return ("batched", batch.num_tasks) if batch.support_x.shape[1] <= 3 else ("looped", None)


def test_after_a_few_searched_shapes_a_near_new_one_takes_the_nearest_ones_path(monkeypatch):
    """A meta-batch whose size varies (K drawn per batch) searched at every new shape, about 7
    calls' work each time: after ``SEARCHED_SHAPES`` searches, a new shape within a factor of
    ``NEAR_SHAPE`` of one runs the role chosen for the nearest (in tasks and elements per
    task), at its own chunk sizes; one farther off is searched. A second learner alike in the
    process, and a run resumed from the training state, take the same paths."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    maml = MAML(model, F.mse_loss, 0.1, 1)
    timed_by_shape(monkeypatch, maml, all_tasks_up_to_3_shots)
    for shots in (1, 2, 6, 8):
        maml.meta_backward(shots_batch(6, shots))
    assert len(maml.searched_shapes) == 1 and maml.path == "looped"
    tried = paths_tried(maml)
    reference = MAML(model, F.mse_loss, 0.1, 1, batched=False)
    for tasks, shots, path in ((4, 2, "batched, chunk 4"), (6, 7, "looped"),
                               (7, 3, "batched, chunk 7")):
        tried.clear()
        maml.zero_grad(set_to_none=True)
        new = shots_batch(tasks, shots)
        maml.meta_backward(new)
        assert tried and set(tried) == {None} and maml.path == path  # no search
        assert relative(flat_grads(maml), meta_grad(reference, new)) < 1e-10
        assert maml.path_choices[maml._path_key(new)] == (
            ("looped", None) if path == "looped" else ("batched", tasks))
    setting = maml._setting_key(new)
    assert len(maml.searched_shapes[setting]) == fastmaml.paths.SEARCHED_SHAPES
    tried.clear()
    maml.meta_backward(shots_batch(6, 17))  # twice the elements of the largest searched: searched
    assert ("looped", None) in tried and len(maml.searched_shapes[setting]) == 5
    for learner in (MAML(model, F.mse_loss, 0.1, 1), "resumed"):
        if learner == "resumed":  # a new process: the training state's record alone
            monkeypatch.setattr(fastmaml.paths, "_SHAPES_SEARCHED", {})
            monkeypatch.setattr(fastmaml.paths, "_PATHS_CHOSEN", {})
            learner = MAML(model, F.mse_loss, 0.1, 1)
            learner.searched_shapes = copy.deepcopy(maml.searched_shapes)
        again = paths_tried(learner)
        for tasks, shots in ((6, 7), (5, 2), (7, 9)):  # seen by the first learner, or not
            learner.meta_backward(shots_batch(tasks, shots))
            assert set(again) == {None}, (tasks, shots)
            assert learner.path == ("looped" if shots > 3 else f"batched, chunk {tasks}")


def test_a_near_new_shape_runs_the_fastest_uncompiled_path_where_compiled_won(monkeypatch):
    """Compiling builds a graph per shape (torch keeps at most 8 per function): a new shape near
    searched ones that compiled runs their fastest uncompiled role instead (here the loop)."""
    maml, batch, eager, eager_calls = stand_in_compile(batched=None)
    graph_calls = []
    maml._compiled_gradient = lambda *args: graph_calls.append(1) or eager(*args)
    timed_by_shape(monkeypatch, maml, lambda _: ("looped", None))
    maml.searched_shapes[maml._setting_key(batch)] = [
        (fastmaml.paths._size(batch), "compiled", "looped")] * fastmaml.paths.SEARCHED_SHAPES
    expected = meta_grad(MAML(maml.model, maml.loss_fn, 0.1, 1, batched=False), batch)
    maml.meta_backward(batch)
    assert maml.path == "looped" and not graph_calls
    assert relative(flat_grads(maml), expected) < 1e-10
    maml.searched_shapes.clear()  # searched: the graph wins, and the loop is recorded beside it
    maml._compiled_gradient = lambda *args: graph_calls.append(1) or eager(*args)
    maml.path_choices.clear()
    fastmaml.paths._PATHS_CHOSEN.clear()
    maml.meta_backward(batch)
    (_, role, uncompiled), = maml.searched_shapes[maml._setting_key(batch)]
    assert uncompiled == "looped"


class KeepsFeatures(nn.Module):
    """A model that keeps its features on itself in its forward, as for logging."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(1, 8), nn.Linear(8, 1)
        self.history: list[torch.Tensor] = []

    def forward(self, x):
        self.features = torch.tanh(self.body(x))
        self.history = [self.features]
        return self.head(self.features)


@pytest.mark.parametrize("batched", [True, False])
def test_a_tensor_the_model_keeps_from_the_batched_path_is_named_once(batched):
    """Read after the call, such a tensor fails deep inside torch ("escaped from inside a
    function being vmapped"): said when it is kept, once."""
    model = KeepsFeatures()
    maml = MAML(model, F.mse_loss, 0.1, 1, batched=batched)
    batch = TaskBatch(*(torch.randn(3, 4, 1) for _ in range(4)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            maml.meta_backward(batch)
    said = [str(w.message) for w in caught if issubclass(w.category, fastmaml.errors.PathWarning)]
    assert said == ([] if not batched else [
        "the model keeps history, features, set in its forward inside the batched path (vmap "
        "over tasks): torch cannot use such a tensor after the call (it 'escaped' vmap). Return "
        "it from forward instead, or use batched=False where the model must keep it"])
    assert model.features.shape == (4, 8) and model.history[0] is model.features
    if not batched:
        assert model.features.sum().isfinite()  # the looped path's is an ordinary tensor


class OwnLinear(nn.Module):
    """A user's layer, under a weight norm whose forward pre-hook sets its weight."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 3))

    def forward(self, x):
        return x @ self.weight


def test_a_weight_a_pre_hook_sets_is_not_said_to_be_kept():
    """weight_norm, spectral_norm and pruning set the weight before each forward: the user
    kept nothing (the warning blamed their forward)."""
    model = nn.Sequential(torch.nn.utils.weight_norm(OwnLinear()), nn.Linear(3, 1))
    maml = MAML(model, F.mse_loss, 0.1, 1, batched=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastmaml.errors.PathWarning)
        warnings.simplefilter("ignore", FutureWarning)  # (weight_norm's own deprecation)
        maml.meta_backward(TaskBatch(*(torch.randn(3, 4, 1) for _ in range(4))))
    assert fastmaml.paths.escaped_tensors(model) == []


def test_a_learner_whose_vmap_failed_takes_no_signature_at_new_shapes():
    """Its new shapes are never searched: the model's print (its signature) at every call of
    one cost milliseconds for a large model."""
    maml = MAML(nn.Sequential(nn.Linear(1, 4), nn.Linear(4, 1)), F.mse_loss, 0.1, 1)
    maml._vmap_failed = True
    signatures = []
    signature = maml._signature
    maml._signature = lambda key: signatures.append(key) or signature(key)
    for shots in (2, 3, 4):
        maml.meta_backward(shots_batch(3, shots))
    assert signatures == [] and maml.path == "looped"


def test_another_model_of_one_class_name_and_shapes_times_its_own_paths():
    """The process's choices are kept per model: one with dropout, where the path decides
    the masks, is not run on the path another (same class name, same shapes) was timed on."""
    batch = TaskBatch(torch.randn(6, 5, 2), torch.randn(6, 5, 1), torch.randn(6, 5, 2),
                      torch.randn(6, 5, 1))

    def net(dropout: float) -> nn.Module:
        return nn.Sequential(nn.Linear(2, 8), nn.Dropout(dropout), nn.Linear(8, 1))

    for dropout in (0.0, 0.5):
        maml = MAML(net(dropout), F.mse_loss, 0.1, 1)
        calls = paths_tried(maml)
        maml.meta_backward(batch)
        assert len(calls) == 6  # searched
    assert len(fastmaml.paths._PATHS_CHOSEN) == 2

    def picky_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # vmap cannot run it
        return F.mse_loss(out, y) if bool(y.abs().max() < 1e9) else F.l1_loss(out, y)

    fastmaml.paths._PATHS_CHOSEN.clear()
    torch.manual_seed(0)
    model = net(0.0)
    with pytest.warns(fastmaml.errors.PathWarning, match=r"vmap could not run this model at "
                      r".*test_paths\.py:\d+, `return F.mse_loss\(out, y\) if bool\("):
        MAML(model, picky_loss, 0.1, 1).meta_backward(batch)  # the user's line is named
    plain = MAML(model, F.mse_loss, 0.1, 1)
    calls = paths_tried(plain)
    plain.meta_backward(batch)  # not sent looped by the picky loss's learner: searched
    assert len(calls) == 6 and len(fastmaml.paths._PATHS_CHOSEN) == 2


def test_learners_unlike_keep_compiled_graphs_apart_and_learners_alike_share_them(
        monkeypatch: pytest.MonkeyPatch):
    """torch.compile keeps at most ``recompile_limit`` graphs per code object and runs the
    code uncompiled beyond it: shared by the learners of a process, a sweep's ninth inner
    rate ran uncompiled while its path said compiled. A learner like an earlier one reuses its
    graphs."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fastmaml.paths, "_CODE_COPIES", {})  # as in a new process
    torch.set_default_dtype(torch.float32)
    model, loss_fn, batch = mlp_problem()
    batch = TaskBatch(*(t.float() for t in batch))
    model.float()
    with torch._dynamo.config.patch(recompile_limit=1):
        for inner_lr, compiles in ((0.1, True), (0.2, True), (0.1, False)):
            graphs = counters["stats"]["unique_graphs"]  # (0.1 and 0.2: a constant each)
            MAML(model, loss_fn, inner_lr, 1, batched=True, compile=True).meta_backward(batch)
            assert (counters["stats"]["unique_graphs"] > graphs) == compiles, inner_lr


def test_an_attention_model_compiles_to_one_graph_with_the_fast_path_off():
    """The engine turns nn.MultiheadAttention's native fast path off (its kernel has no
    derivative); dynamo cannot trace that switch, so a compiled call sets it around itself: set
    inside, it broke the graph and the compiled path ran slower than eager, unsaid."""
    torch.set_default_dtype(torch.float32)
    batch = attention_batch()
    grads = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        maml = MAML(EvalAttention().eval(), F.cross_entropy, 0.1, 1, batched=True,
                    compile=compiled)
        torch._dynamo.utils.counters.clear()
        maml.meta_backward(batch)  # (a compiled learner's first call: forward and autograd)
        maml.zero_grad(set_to_none=True)
        maml.meta_backward(batch)  # (then the whole meta-gradient)
        grads[compiled] = flat_grads(maml)
    assert maml.path.startswith("compiled")
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"] and not counters["unimplemented"]
    assert relative(grads[True], grads[False]) < 1e-4
    assert torch.backends.mha.get_fastpath_enabled()  # as it was, after each call


def compiled_learner() -> tuple[MAML, TaskBatch]:
    """A compiled float32 MLP learner with a learned scalar inner rate, after its first
    ``meta_backward``, and its batch."""
    torch.set_default_dtype(torch.float32)
    model, loss_fn, batch = mlp_problem()
    batch = TaskBatch(*(t.float() for t in batch))
    maml = MAML(model.float(), loss_fn, 0.1, 1, lr_mode="scalar", batched=True, compile=True)
    maml.meta_backward(batch)
    return maml, batch


def test_a_deepcopy_of_a_compiled_learner_computes_with_its_own_rates():
    """A snapshot (``copy.deepcopy``) of a compiled learner went on calling the original's
    compiled methods: its meta-loss used the original's learned rates as they trained on."""
    maml, batch = compiled_learner()
    snapshot = copy.deepcopy(maml)
    expected = snapshot.meta_loss(batch)[0].item()
    with torch.no_grad():
        maml.inner_lrs.scalar.fill_(5.0)  # the original trains on
    assert snapshot.meta_loss(batch)[0].item() == pytest.approx(expected, rel=1e-6)


def test_a_compiled_learner_saved_whole_loads_and_computes_compiled():
    """``torch.save`` of a compiled learner (pickle) failed on its compiled methods' code
    copies; loaded, it compiles again and computes with its own parameters."""
    import io

    maml, batch = compiled_learner()
    saved = io.BytesIO()
    torch.save(maml, saved)
    saved.seek(0)
    loaded = copy.deepcopy(torch.load(saved, weights_only=False))  # (a copy before its first call)
    with torch.no_grad():
        loaded.inner_lrs.scalar.fill_(0.3)
    expected = MAML(copy.deepcopy(maml.model), maml.loss_fn, 0.3, 1,
                    batched=True).meta_loss(batch)[0]
    loaded.zero_grad()
    loaded.meta_backward(batch)
    assert loaded.path.startswith("compiled")
    assert loaded.meta_loss(batch)[0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_first_meta_backward_that_fails_leaves_the_users_gradients():
    """The search clears ``.grad`` before each candidate; a non-finite loss or the user's
    error in the first call gives back the gradients the caller had accumulated."""
    model, loss_fn, batch = mlp_problem()
    model(batch.support_x[0]).sum().backward()  # e.g. an auxiliary loss of the caller's
    before = [p.grad.clone() for p in model.parameters()]
    maml = MAML(model, lambda out, y: loss_fn(out, y) * math.nan, 0.1, 1)
    with pytest.raises(fastmaml.errors.NonFiniteLossError):
        maml.meta_backward(batch)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))


def test_a_seeded_run_with_dropout_draws_the_same_whether_it_searches_or_not():
    """The search runs about 7 meta-gradients; their dropout draws must not shift the seeded
    random stream of the run, or a second run in the process (reusing the choice) differs."""
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


def test_a_path_chosen_without_compile_is_not_reused_when_compiling():
    """A run resumed with ``compile=true`` searches again (the compiled path is a candidate);
    resumed as it was, it reuses its own choice."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    batch = TaskBatch(*(torch.randn(6, 5, 1) for _ in range(4)))
    eager = MAML(model, F.mse_loss, 0.1, 1)
    eager.meta_backward(batch)
    compiled = MAML(model, F.mse_loss, 0.1, 1, compile=True)
    compiled.path_choices = dict(eager.path_choices)  # as a checkpoint restores them
    tried = paths_tried(compiled, "meta_backward")
    compiled.meta_backward(batch)
    assert ("compiled", 6) in tried and len(compiled.path_choices) == 2
    resumed = MAML(model, F.mse_loss, 0.1, 1)
    resumed.path_choices = dict(compiled.path_choices)
    calls = paths_tried(resumed)
    resumed.meta_backward(batch)
    assert calls == [None] and resumed.path_choices == compiled.path_choices
    assert resumed.path == eager.path


@pytest.mark.parametrize("change", ["path implementations", "CPU vector instructions"])
def test_a_path_chosen_on_other_paths_or_cpu_is_timed_again(monkeypatch, change):
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
    calls = paths_tried(resumed)
    resumed.meta_backward(batch)
    assert ("looped", None) in calls and len(resumed.path_choices) == 2


def test_a_learner_given_other_inner_steps_times_its_paths_again():
    """``maml.inner_steps = n`` changes each task's work: the path timed at the old count is
    not reused (the steps are part of the shape's setting)."""
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    batch = TaskBatch(*(torch.randn(6, 5, 1) for _ in range(4)))
    maml = MAML(model, F.mse_loss, 0.1, 1)
    maml.meta_backward(batch)
    maml.inner_steps = 3
    calls = paths_tried(maml)
    maml.meta_backward(batch)
    assert ("looped", None) in calls and len(maml.path_choices) == 2
    assert any("3 steps" in key for key in maml.path_choices)


class OtherRank:
    """``gather_ranks`` of this process and one more rank, which has ``knows`` a path for its
    input shape (``key``, 5 tasks of 20 input elements) and, searching, found only the ``fast``
    role quick (1 s; 100 s the others)."""

    def __init__(self, knows: bool, fast: str = "looped", key: str = "other rank's shape"):
        self.knows, self.fast, self.key, self.values = knows, fast, key, []

    def __call__(self, value):
        self.values.append(value)
        if isinstance(value, bool):  # "have I no path for my shape?"
            return [value, not self.knows]
        _, offer, _ = value
        return [value, (self.key, {role: (("batched", 7) if role != "looped" else choice,
                                           1.0 if role == self.fast else 100.0)
                                    for role, (choice, _) in offer.items()}, (5, 20))]


def test_ranks_that_step_together_search_together_and_keep_the_path_fastest_on_the_slowest():
    """With ``gather_ranks``, a rank that searches alone would time its candidates while the
    others wait, and might keep a path another rank finds slow (two torchrun ranks of one
    Omniglot run took different chunk sizes): all search where any has no path, and all keep
    the role with the best time on its slowest rank, recorded for every rank's shape. They
    ask at the first call in each derivative order and inner steps, which all make together;
    a rank whose key
    changes alone (e.g. its compiling fell back) searches alone, and one whose vmap failed
    offers its looped time for every role."""
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
    # both ranks' shapes are searched ones, on every rank alike (a resumed rank reads rank 0's)
    (setting, shapes), = maml.searched_shapes.items()
    assert shapes == [((6, 20), "one task", "one task"), ((5, 20), "one task", "one task")]
    assert fastmaml.paths._SHAPES_SEARCHED[maml._signature(setting)] == shapes
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
    other.values.clear()
    maml.inner_steps = 2  # so too where the driver sets the inner steps on every rank
    maml.meta_backward(batch)
    assert other.values[0] is True and len(other.values) == 2

    knowing = MAML(model, F.mse_loss, 0.1, 1)
    knowing.path_choices[key] = ("looped", None)
    knowing.gather_ranks = other = OtherRank(knows=True)
    calls = paths_tried(knowing)
    knowing.meta_backward(batch)
    assert other.values == [False] and calls == [None] and knowing.path == "looped"

    model.zero_grad(set_to_none=True)
    failed = MAML(model, F.mse_loss, 0.1, 1)
    failed._vmap_failed = True  # as after vmap failed on this rank: it runs looped
    failed.gather_ranks = other = OtherRank(knows=False, fast="all tasks")
    failed.meta_backward(batch)
    _, offer, _ = other.values[1]
    assert len({seconds for _, seconds in offer.values()}) == 1  # every role: the looped time
    assert failed.path == "looped" and relative(flat_grads(failed), expected) < 1e-6
    assert failed.path_choices["other rank's shape"] == ("batched", 7)  # the other keeps vmap
    # a rank of the same shape whose vmap runs: the shape's record is its path, whichever rank
    # offers first (the failed rank's looped record once overwrote it, or not, by rank order)
    for first in (True, False):
        failed = MAML(model, F.mse_loss, 0.1, 1)
        failed._vmap_failed = True
        failed.gather_ranks = other = OtherRank(knows=False, fast="all tasks", key=key)
        if not first:  # the other rank's offer first
            failed.gather_ranks = lambda value, ask=other: ask(value)[::-1]
        failed.meta_backward(batch)
        assert failed.path == "looped" and failed.path_choices == {key: ("batched", 7)}
