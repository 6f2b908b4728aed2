"""MAML in one module: the inner loop (``adapt``) and the outer loop (``meta_loss``).

A meta-batch of tasks runs in one call: ``torch.func.vmap`` over the task dimension of a task
function that adapts with ``torch.func.grad`` and evaluates the adapted parameters through
``torch.func.functional_call``. The same task function also runs in a plain Python loop over tasks
with ``torch.autograd.grad``; that is the reference the tests compare against, and the fallback
for models that ``vmap`` cannot handle.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from .errors import (ConfigError, FastMAMLError, FastMAMLWarning, NonFiniteLossError,
                     ShapeError, is_out_of_memory)
from .inner_lr import InnerLearningRates
from .embeddings import ExactEmbeddings, composes_bag, pads, scales_gradient_by_frequency
from .per_step import PerStepParameters
from .norms import NORM_FUNCTIONS, ExactNorms, has_batch_norm
from .recurrent import StepwiseRNNs, has_recurrent

Params = dict[str, Tensor]
# execution paths chosen by timing in this process: model, settings and shapes -> (path, chunk)
_PATHS_CHOSEN: dict[str, tuple[str, int | None]] = {}
# raised whenever a candidate path's implementation changes, so that choices timed on the old
# one (a checkpoint keeps them) are timed again; the torch version is in the key for the same reason
# 3: first order detaches the outer-only parameters; norms.py. 4: recurrent layers and attention
# run batched (a recurrent model's saved choice was the looped fallback). 5: norms and embeddings
# found by the first call's forward (``_probe``): exact batch norm in training mode, padded lookups
PATHS_REVISION = 5
CPU_CHUNK_ELEMENTS = 2**18  # input elements per vmap chunk on CPU (see ``MAML(chunk_size=...)``)
# the relative difference from the eager meta-gradient beyond which a compiled one counts as off
COMPILED_TOLERANCE = 1e-3
# calls of an input shape, in a row, whose compiled meta-gradient must differ beyond the tolerance
# before compiling stops. Inductor's float32 sums round more than eager's, and near a minimum,
# where the mean gradient is small beside the terms it sums, some batches take that past the
# tolerance: the trained Omniglot 5w5s net's compiled meta-gradient was over 1e-3 off at 6 of 48
# batches on CPU (up to 2e-2; eager float32 within 3e-5 of float64 at all, and the graph exact
# in float64; docs/results.md, session 26). The trade-off: a graph wrong at every batch still
# stops compiling (after five calls, each given the eager gradient), but one wrong at only some
# batches is now caught only where five of them come in a row.
COMPILED_CHECKS = 5
PREDICT_BATCH = 1024  # inputs in one forward pass when ``predict`` normalises each with a context
# element-wise losses that broadcast predictions and targets of different shapes with only a
# warning (e.g. (K, 1) against (K,) gives a K x K loss): a wrong loss, refused here instead
_BROADCASTING_LOSSES = (torch.nn.functional.mse_loss, torch.nn.functional.l1_loss,
                        torch.nn.functional.smooth_l1_loss, torch.nn.functional.huber_loss)
_BROADCASTING_LOSS_MODULES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)
LossFn = Callable[[Tensor, Tensor], Tensor]
GradFn = Callable[[Callable, Params, bool], tuple[Params, Tensor]]


class TaskBatch(NamedTuple):
    """Support and query tensors of a meta-batch, each with a leading task dimension."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str) -> TaskBatch:
        """The tensors on ``device``; asynchronous only towards a GPU (a copy to the host must
        be complete before the host reads it)."""
        to_gpu = torch.device(device).type == "cuda"
        return TaskBatch(*(t.to(device, non_blocking=to_gpu) for t in self))

    def split(self, size: int) -> list[TaskBatch]:
        """Consecutive chunks of at most ``size`` tasks (bounded memory, one graph each)."""
        return [TaskBatch(*parts) for parts in zip(*(t.split(size) for t in self))]


def _described(batch: Any) -> str:
    """What was given as a task batch, in words for its error."""
    if isinstance(batch, Tensor):
        return f"one tensor of shape {tuple(batch.shape)}"
    kinds = [type(t).__name__ for t in batch]
    arrays = any(isinstance(t, (list, tuple)) or not isinstance(t, Tensor)
                 and hasattr(t, "__array__") for t in batch)
    return (f"{len(kinds)} items: {', '.join(kinds[:6])}" + (", ..." if len(kinds) > 6 else "")
            + (" (torch.as_tensor converts arrays)" if arrays else ""))


def as_task_batch(batch: TaskBatch | Sequence[Tensor]) -> TaskBatch:
    """Validate the four task tensors and return them as a ``TaskBatch``."""
    if isinstance(batch, dict):
        missing = [k for k in TaskBatch._fields if k not in batch]
        if missing:
            raise ShapeError(f"a task batch as a dict needs the keys {', '.join(TaskBatch._fields)}"
                             f"; missing {', '.join(missing)}")
        batch = [batch[k] for k in TaskBatch._fields]
    if isinstance(batch, Tensor) or len(batch) != 4 or not all(isinstance(t, Tensor)
                                                               for t in batch):
        raise ShapeError("a task batch is four tensors: support_x, support_y, query_x, query_y; "
                         f"got {_described(batch)}")
    batch = TaskBatch(*batch)
    counts = {name: t.shape[0] if t.dim() else None for name, t in zip(TaskBatch._fields, batch)}
    if None in counts.values() or len(set(counts.values())) != 1:
        support, query = {counts["support_x"], counts["support_y"]}, {counts["query_x"],
                                                                      counts["query_y"]}
        forgotten = len(support) == len(query) == 1  # examples counted where tasks belong
        raise ShapeError(f"all task tensors need the same leading task dimension, got {counts}"
                         + ("; if this is one task, add its task dimension: x.unsqueeze(0)"
                            if forgotten else ""))
    if not batch.num_tasks:
        raise ShapeError("a task batch needs at least one task, got 0")
    for kind in ("support", "query"):
        x, y = getattr(batch, f"{kind}_x"), getattr(batch, f"{kind}_y")
        if x.dim() < 2 or y.dim() < 2 or x.shape[1] != y.shape[1]:
            raise ShapeError(f"{kind}_x {tuple(x.shape)} and {kind}_y {tuple(y.shape)} must both be "
                             "(tasks, examples, ...) with the same number of examples")
        if not x.shape[1]:
            raise ShapeError(f"{kind}_x {tuple(x.shape)} holds no examples: a task needs at least "
                             f"one {kind} example")
    return batch


def _broadcasting_loss(fn: Any) -> str | None:
    """The name of ``fn`` if it is a loss that broadcasts (also as a module or a partial)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if fn in _BROADCASTING_LOSSES or isinstance(fn, _BROADCASTING_LOSS_MODULES):
        return getattr(fn, "__name__", type(fn).__name__)
    return None


def check_steps(name: str, steps: Any) -> None:
    """A number of inner steps: an integer >= 0 (not a float or bool), or a ``ConfigError``."""
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {steps!r}")


def _check_options(model: Any, loss_fn: Any, metric_fn: Any, inner_lr: Any, inner_steps: Any,
                   chunk_size: Any, adapt: Any, per_step: Any, **flags: Any) -> None:
    """``MAML``'s arguments, each of its kind, or a ``ConfigError`` naming the first that is not
    (a swapped model and loss, a YAML string for a flag, a tensor for a learned rate)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got a {type(model).__name__}"
                          + (" (are model and loss_fn swapped?)" if callable(model) else ""))
    for name, fn in (("loss_fn", loss_fn), ("metric_fn", metric_fn)):
        if not callable(fn) and not (name == "metric_fn" and fn is None):
            raise ConfigError(f"{name} must be a function (predictions, targets) -> scalar "
                              f"tensor, e.g. torch.nn.functional.mse_loss; got {fn!r}")
    for name, flag in flags.items():
        optional = name in ("batched", "transductive_bn")  # None: chosen for the model
        if not isinstance(flag, (bool, np.bool_)) and not (optional and flag is None):
            raise ConfigError(f"{name} must be True or False{' (or None)' if optional else ''}, "
                              f"got {flag!r}")
    check_steps("inner_steps", inner_steps)
    for name, selection, default in (("adapt", adapt, "all parameters"),
                                     ("per_step", per_step, "none")):
        if not (selection is None or callable(selection) or isinstance(selection, str)
                or isinstance(selection, Collection)
                and all(isinstance(a, str) for a in selection)):
            raise ConfigError(f"{name} must be None ({default}), name prefixes (e.g. ['head']) "
                              f"or a function (name, parameter) -> bool, got {selection!r}")
    if isinstance(inner_lr, Tensor):
        raise ConfigError("inner_lr is the inner learning rate's (initial) value, a number, not "
                          "a tensor: to learn it, give lr_mode='scalar' (one rate), 'per_param' "
                          "(Meta-SGD) or 'per_layer_step' (MAML++), and MAML holds it as a "
                          "parameter")
    if (not isinstance(inner_lr, numbers.Real) or isinstance(inner_lr, bool)
            or not 0 <= inner_lr < math.inf):  # NaN fails too
        raise ConfigError(f"inner_lr must be a number >= 0 and finite, got {inner_lr!r}")
    if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ConfigError(f"chunk_size must be an integer >= 1 (or None: automatic), got "
                          f"{chunk_size!r}")


def _check_tensors(**named: Any) -> None:
    """A ``ShapeError`` naming the first of ``named`` that is not a tensor."""
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise ShapeError(f"{name} must be a tensor, got {type(value).__name__}"
                             + (" (torch.as_tensor converts arrays and lists)"
                                if isinstance(value, (np.ndarray, list, tuple)) else ""))


def _as_weights(step_weights: Tensor | Sequence[float] | None) -> Tensor | None:
    """Step weights as a 1-d tensor (a list or tuple of floats is taken too)."""
    if step_weights is None:
        return None
    if not isinstance(step_weights, Tensor):
        step_weights = torch.as_tensor(step_weights, dtype=torch.get_default_dtype())
    if step_weights.dim() != 1:
        raise ShapeError(f"step_weights must be 1-d, one weight per inner step (see "
                         f"multi_step_loss_weights), got shape {tuple(step_weights.shape)}")
    return step_weights


def _first_line(error: Exception) -> str:
    """An error's message in one line (a warning's), or its type where it has none. A first
    line that only introduces the next (inductor's "backend='inductor' raised:") takes it along."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def _random_state(device: torch.device) -> tuple[Tensor, ...]:
    """The default generators' states: the CPU's, and ``device``'s when it is a GPU."""
    cpu = torch.get_rng_state()
    return (cpu, torch.cuda.get_rng_state(device)) if device.type == "cuda" else (cpu,)


def _set_random_state(state: tuple[Tensor, ...], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def multi_step_loss_weights(steps: int, progress: float, min_fraction: float = 0.03) -> Tensor:
    """MAML++ multi-step loss weights over inner steps 1..steps.

    Uniform at ``progress`` 0; the non-final weights decay linearly to ``min_fraction / steps``
    at ``progress`` 1 and the final step takes the rest, so the weights always sum to one.
    """
    if steps < 1:
        raise ConfigError(f"multi-step loss weights need inner steps >= 1, got {steps}")
    nonfinal = max((1.0 - min(max(progress, 0.0), 1.0)) / steps, min_fraction / steps)
    weights = torch.full((steps,), nonfinal)
    weights[-1] = 1.0 - nonfinal * (steps - 1)
    return weights


# Without create_graph (first order, evaluation) the inner gradient is a constant of the outer
# graph, so both gradient functions compute it from detached parameters (``_inner_step`` also
# detaches the outer-only ones): the same values, with nothing recorded for the outer backward
# (sinusoid, first order: from 0.92x to 0.99x the speed of TorchOpt under vmap, measured side
# by side; docs/results.md, session 9).

def _functorch_grad(loss_of: Callable, fast: Params, create_graph: bool) -> tuple[Params, Tensor]:
    if not create_graph:
        fast = {n: p.detach() for n, p in fast.items()}
    return torch.func.grad(loss_of, has_aux=True)(fast)


def _autograd_grad(loss_of: Callable, fast: Params, create_graph: bool) -> tuple[Params, Tensor]:
    with torch.enable_grad():
        leaves = {n: p if p.requires_grad and create_graph else p.detach().requires_grad_()
                  for n, p in fast.items()}
        loss, _ = loss_of(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph,
                                    allow_unused=True)
    return ({n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(fast.items(), grads)},
            loss.detach())


def _second_derivatives_explained(meta_backward: Callable) -> Callable:
    """``meta_backward`` where torch lacks the second derivative of an operation the model
    calls: a ``ConfigError`` that says so and what to do, not torch's ``NotImplementedError``."""
    @functools.wraps(meta_backward)
    def explained(self: MAML, *args: Any, **kwargs: Any) -> Any:
        try:
            return meta_backward(self, *args, **kwargs)
        except NotImplementedError as error:
            if self.first_order or "derivative for" not in str(error):
                raise
            raise ConfigError(f"second-order MAML differentiates the inner gradient, and torch "
                              f"{torch.__version__} cannot differentiate an operation of the "
                              f"model twice ({_first_line(error)}): set first_order=True, or "
                              "replace that operation") from error
    return explained


class MAML(nn.Module):
    """Model-agnostic meta-learning around any unmodified ``nn.Module``.

    Args:
        model: the network; its parameters are the meta-learned initialisation.
        loss_fn: ``loss_fn(predictions, targets) -> scalar`` for one task.
        inner_lr: the inner learning rate alpha (the initial value when it is learned).
        inner_steps: inner gradient steps during meta-training.
        first_order: drop the second-order terms (FOMAML).
        lr_mode: ``fixed`` | ``scalar`` | ``per_param`` (Meta-SGD) | ``per_layer_step`` (MAML++).
        adapt: which parameters the inner loop adapts: ``None`` for all, a list of name prefixes
            (e.g. ``["head"]`` for ANIL; each must match) or a predicate ``(name, param) ->
            bool``. The others are still trained by the outer loop. Both are fixed when MAML is
            built, with the parameters' ``requires_grad``: freeze or unfreeze before.
        per_step: outer-loop parameters (selected as by ``adapt``; ``None``: none) that get one
            meta-learned set per inner step, MAML++'s per-step batch-norm weights and biases:
            inner step k's support forward and the query forward after it use set k, set 0
            being the model's own (``fastmaml.per_step``; needs ``inner_steps >= 2``). ``adapt``
            returns the last step's set with the adapted parameters, for ``predict``. The sets
            start as the model's values when MAML is built: load weights into the model before,
            or into MAML (its ``state_dict``) after. In first order without the multi-step loss
            only the last step's set gets a meta-gradient (as in MAML++).
        metric_fn: optional ``metric_fn(predictions, targets) -> scalar`` (e.g. accuracy).
        batched: ``True`` for ``vmap`` over tasks, ``False`` for the looped reference, ``None``
            (default) to choose: the first ``meta_backward`` of each new input shape times the
            batched path at a few chunk sizes, the looped path and, with ``compile``, the
            compiled batched path, once each, and keeps the fastest for that shape
            (``path_choices``; every candidate computes the same meta-gradient). An explicit
            ``batched``, ``chunk_size`` or ``checkpoint_steps`` turns the search off. If ``vmap``
            cannot run the model, the looped path is used, with a warning.
        transductive_bn: normalise with batch statistics always, as the paper (default: on when
            the model has batch-norm layers). Running statistics are never updated, also with
            ``False``, where batch norm runs as the model's mode says (``eval()``: the running
            statistics as they are). Layer and instance norms run as written, their affine
            weight applied outside torch's kernel (exact under ``vmap``; ``fastmaml.norms``).
        compile: allow the batched path through ``torch.compile`` (fused kernels, less dispatch
            overhead; the first call of each shape compiles, which takes seconds). With the
            default path search it is one more candidate (compiled once, at the default chunk
            size), kept only where it is the fastest; with an explicit ``batched=True`` it is used.
            Where compiling fails (e.g. no C++ compiler), it warns once and runs eager from then on.
        chunk_size: ``vmap`` this many tasks at a time. Default: all tasks on GPU; on CPU as many
            as hold about 2**18 input elements, which keeps the activations cache-sized (Omniglot
            with 75 queries per task: 4 tasks a chunk, 1.8x faster than all 32 at once).
        checkpoint_steps: trade compute for memory in ``meta_backward``: keep one inner step's
            activations at a time instead of all of them (each step is recomputed once in the
            backward pass), so activation memory stays flat in the number of inner steps; each
            step's adapted parameters are still kept. Not compiled; refuses active dropout.

    Under ``torch.distributed``, set ``gather_ranks = fastmaml.distributed.gather_ranks`` (the
    training driver does) so that ranks that step together search together: with the path
    search on, the first ``meta_backward`` in each derivative order (``first_order``) asks
    every rank, so every rank must make it; where any has no path for its input shape, all
    time the candidates and all keep the one fastest on the slowest rank. A path missing later
    (a rank's compiling fell back alone, or a new input shape) is searched by each rank alone;
    a rank whose vmap failed runs looped. Without ``gather_ranks``, each rank chooses alone
    (and may choose differently).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.01,
                 inner_steps: int = 1, first_order: bool = False, *, lr_mode: str = "fixed",
                 adapt: Sequence[str] | Callable[[str, Tensor], bool] | None = None,
                 per_step: Sequence[str] | Callable[[str, Tensor], bool] | None = None,
                 metric_fn: LossFn | None = None, batched: bool | None = None,
                 transductive_bn: bool | None = None, check_finite: bool = True,
                 compile: bool = False, chunk_size: int | None = None,
                 checkpoint_steps: bool = False):
        super().__init__()
        _check_options(model, loss_fn, metric_fn, inner_lr, inner_steps, chunk_size, adapt,
                       per_step, first_order=first_order, batched=batched,
                       transductive_bn=transductive_bn, check_finite=check_finite, compile=compile,
                       checkpoint_steps=checkpoint_steps)
        self.model = model
        self.loss_fn, self.metric_fn = loss_fn, metric_fn
        self.inner_steps, self.first_order = inner_steps, first_order
        self.batched, self.check_finite = batched, check_finite
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.adapted_names = _matching("adapt", adapt, trainable)
        self.outer_only_names = [n for n in trainable if n not in self.adapted_names]
        per_step_names = [] if per_step is None else _matching("per_step", per_step, trainable)
        adapted_per_step = [n for n in per_step_names if n in self.adapted_names]
        if adapted_per_step:
            raise ConfigError(f"per_step selects {_listed(adapted_per_step)}, which the inner "
                              "loop adapts: per-step sets are the outer loop's; leave them out "
                              "of adapt, or choose other per_step parameters (per_step=norm "
                              "goes with adapt=no_norm)")
        if per_step_names and inner_steps < 2:
            raise ConfigError(f"per_step gives each inner step its own set of parameters, but "
                              f"with inner_steps={inner_steps} the model's own is the only one: "
                              "use inner_steps >= 2, or no per_step")
        self.per_step = PerStepParameters({n: trainable[n] for n in per_step_names}, inner_steps)
        self._trainable_names = {*self.adapted_names, *self.outer_only_names}
        self.checkpoint_steps = checkpoint_steps
        adapted = {n: p for n, p in model.named_parameters() if n in self.adapted_names}
        self.inner_lrs = InnerLearningRates(lr_mode, inner_lr,
                                            {n: p.shape for n, p in adapted.items()}, inner_steps,
                                            like=next(iter(adapted.values())))
        self._transductive = has_batch_norm(model) if transductive_bn is None else transductive_bn
        # the exact forms of the norm and embedding functions the model calls: set by ``_probe``
        self._norm_mode = self._embedding_mode = contextlib.nullcontext
        self._probed = False
        self._task_input_dims: int | None = None  # of one task's inputs in a batch of tasks
        # trainable parameters the model's output does not depend on (set by ``_probe``)
        self._unused_names: set[str] | None = None
        recurrent = has_recurrent(model)
        self._rnn_mode = StepwiseRNNs if recurrent else contextlib.nullcontext
        # attention (F.scaled_dot_product_attention) in its math kernel: torch's fused ones have
        # no vmap batching rule (a slow per-task fallback) and their backward no derivative
        # (second order failed, batched or looped)
        self._attention_mode = (functools.partial(sdpa_kernel, [SDPBackend.MATH])
                                if _has_attention(model) else contextlib.nullcontext)
        self._buffer_names = [n for n, _ in model.named_buffers()]
        self.chunk_size = chunk_size
        if compile and recurrent:  # inductor: "Cannot access storage of BatchedTensorImpl"
            warnings.warn("torch.compile cannot compile recurrent layers under vmap (torch "
                          f"{torch.__version__}); running uncompiled", FastMAMLWarning, stacklevel=2)
            compile = False
        self._compiled_batched = torch.compile(self._batched, dynamic=False) if compile else None
        self._compiled_gradient = torch.compile(self._gradient, dynamic=False) if compile else None
        self.path: str | None = None  # "batched" or "looped" once a call has run (+ chunk)
        # input shapes -> (path, chunk size) chosen by timing; saved with the training state
        self.path_choices: dict[str, tuple[str, int | None]] = {}
        self._trying: tuple[str, int | None] | None = None  # the candidate being timed
        self._vmap_failed = False
        self._compiled_checked: set[str] = set()  # input shapes of a checked compiled gradient
        self._compiled_misses: dict[str, list[float]] = {}  # per shape: its differences so far
        self._auto = batched is None and chunk_size is None and not checkpoint_steps
        # under torch.distributed: every rank's value of an object, in rank order
        # (``fastmaml.distributed.gather_ranks``), so that the ranks search paths together
        self.gather_ranks: Callable[[Any], list[Any]] | None = None
        self._asked_orders: set[bool] = set()  # first_order values the ranks were asked in

    # ----- the model as a function of its parameters -----
    def _split_params(self, detach: bool) -> tuple[Params, Params]:
        """(adapted params, the other params and the buffers)."""
        fast, frozen = {}, {}
        for name, p in self.model.named_parameters():
            p = p.detach() if detach else p
            (fast if name in self.adapted_names else frozen)[name] = p
        frozen.update(self.model.named_buffers())
        return fast, frozen

    def _forward(self, fast: Params, frozen: Params, x: Tensor) -> Tensor:
        state = {**frozen, **fast}
        for name in self._buffer_names:  # fresh copies: a forward may count batches in place
            state[name] = state[name].clone()
        try:
            with (self._norm_mode(), self._embedding_mode(), self._rnn_mode(),
                  self._attention_mode()):
                return functional_call(self.model, state, (x,))
        except FastMAMLError:
            raise
        except (RuntimeError, ValueError) as error:
            if is_out_of_memory(error):  # not the model's input's fault
                raise
            weights = next((p.dtype for p in fast.values() if p.is_floating_point()), x.dtype)
            hint = (f" (the input is {x.dtype} but the model's parameters are {weights}: "
                    "convert one to the other)" if x.is_floating_point() and x.dtype != weights
                    else "")
            raise ShapeError(f"the model's forward failed on a per-task input of shape "
                             f"{tuple(x.shape)}{hint}: {error}") from error

    def _prepare(self, x: Tensor, of_batch: bool = False) -> None:
        """At the start of a public call, outside any transform: where gradients are on, refuse
        parameters frozen or unfrozen since MAML was built (it chose what it adapts and trains
        then); and probe the model once (``_probe``) on ``x``, one task's inputs (``of_batch``:
        the first task of a batch, whose dimensions ``adapt`` then expects)."""
        if of_batch:
            self._task_input_dims = x.dim()
        if torch.is_grad_enabled():
            changed = next(((name, p.requires_grad) for name, p in self.model.named_parameters()
                            if p.requires_grad != (name in self._trainable_names)), None)
            if changed:
                raise ConfigError(
                    f"{changed[0]} was {'unfrozen' if changed[1] else 'frozen'} after MAML was "
                    "built, which chose the parameters it adapts and trains then: build MAML "
                    "again after freezing or unfreezing parameters")
        if not self._probed or self._unused_names is None and torch.is_grad_enabled():
            self._probe(x)  # again where the first probe ran under inference_mode, without graph

    @torch.compiler.disable  # eager, also where a user compiles the learner (one graph break)
    def _probe(self, x: Tensor) -> None:
        """Once, before the first forward of any path: an eager forward on ``x`` (one task's
        inputs) shows which functions the model calls, from its modules or its own code; the
        norms and the embeddings whose kernels ``vmap`` differentiates wrongly, and the embedding
        bags, which torch differentiates only once, run in their exact forms (``ExactNorms``,
        ``ExactEmbeddings``) from then on, on every path, and an embedding's
        ``scale_grad_by_freq``, which has none, on the looped path. Its graph shows the
        parameters the output does not depend on (``_unused_parameters``). The random state is
        left as it was, so that a resumed run draws what an uninterrupted one does."""
        # as in training (torch's fused fast paths run only without gradients), and under
        # ExactNorms, whose replacements are norm functions too, and whose errors are clearer
        self._norm_mode = functools.partial(ExactNorms, self._transductive)
        calls, state = _KernelsCalled(), _random_state(x.device)
        # stand-ins for the parameters (the same storage), whose gradients no hook of the
        # model's own parameters sees
        fast, frozen = self._split_params(detach=True)
        if not torch.is_inference_mode_enabled():
            fast, frozen = ({n: t.requires_grad_(n in self._trainable_names) for n, t in
                             params.items()} for params in (fast, frozen))
        try:
            with torch.enable_grad(), calls:
                output = self._forward(fast, frozen, x)
        finally:
            _set_random_state(state, x.device)
        self._unused_names = self._unused_parameters(output, {**frozen, **fast})
        if not calls.norms:
            self._norm_mode = contextlib.nullcontext
        if calls.exact_embeddings:
            self._embedding_mode = ExactEmbeddings
        if calls.frequency_scaling:
            if self.batched:
                raise ConfigError("scale_grad_by_freq: vmap scales an embedding's gradient by "
                                  "the wrong counts (torch's kernel): use batched=None or False")
            if self.batched is None and not self._vmap_failed:
                self._vmap_failed = True
                warnings.warn("scale_grad_by_freq: vmap scales an embedding's gradient by the "
                              "wrong counts (torch's kernel); using the looped path",
                              FastMAMLWarning, stacklevel=3)
        self._probed = True

    def _unused_parameters(self, output: Any, params: Params) -> set[str] | None:
        """The trainable model parameters that ``output`` (of a forward with gradients on) does
        not depend on, with their learned inner rates and per-step sets; None under
        inference_mode, which records no graph. Autograd leaves their ``.grad`` None;
        ``meta_backward``'s functional branches, whose ``torch.func.grad`` gives zeros, do the
        same where such a gradient is all zeros (weight decay must not move them), so a
        parameter that another mode or input uses keeps its gradient. An output whose tensors
        this cannot see leaves none out. ``params``: the tensors the forward ran with, by name."""
        if torch.is_inference_mode_enabled():
            return None
        outputs = [t for t in tree_leaves(output) if isinstance(t, Tensor) and t.requires_grad]
        if not outputs:
            return set()
        names = sorted(self._trainable_names)
        grads = torch.autograd.grad(outputs, [params[n] for n in names],
                                    [torch.ones_like(t) for t in outputs], allow_unused=True)
        unused = {name for name, grad in zip(names, grads) if grad is None}
        return ({f"model.{n}" for n in unused}
                | {f"inner_lrs.{n}" for n in self.inner_lrs.own_rates(unused)}
                | {f"per_step.{n}" for n in self.per_step.own_copies(unused)})

    def _loss(self, fast: Params, frozen: Params, x: Tensor, y: Tensor,
              fn: LossFn | None = None) -> Tensor:
        predictions = self._forward(fast, frozen, x)
        fn = fn or self.loss_fn
        broadcasting = _broadcasting_loss(fn)
        if broadcasting and isinstance(predictions, Tensor) and predictions.shape != y.shape:
            shape = ", ".join(map(str, predictions.shape))
            example = (" (e.g. y[..., None])" if y.dim() < predictions.dim()
                       else f" (e.g. y.reshape({shape}))" if len(y) == len(predictions) else "")
            raise ShapeError(f"{broadcasting} would broadcast a task's predictions "
                             f"{tuple(predictions.shape)} and targets {tuple(y.shape)}: give "
                             f"targets shaped as the model's output{example}")
        try:
            value = fn(predictions, y)
        except FastMAMLError:
            raise
        # e.g. a label out of range; a model output (a tuple) that the loss cannot take
        except (RuntimeError, IndexError, ValueError, TypeError, AttributeError) as error:
            if is_out_of_memory(error):
                raise
            shown = (f"{tuple(predictions.shape)} {predictions.dtype}"
                     if isinstance(predictions, Tensor) else f"(a {type(predictions).__name__})")
            raise ShapeError(f"loss_fn or metric_fn failed on a task's predictions {shown} and "
                             f"targets {tuple(y.shape)} {y.dtype}: {error}") from error
        if not isinstance(value, Tensor) or value.dim() != 0:
            got = (f"shape {tuple(value.shape)}" if isinstance(value, Tensor)
                   else f"a {type(value).__name__}")
            raise ShapeError(f"loss_fn and metric_fn must return a scalar tensor per task, got "
                             f"{got}")
        return value if value.is_floating_point() else value.to(torch.get_default_dtype())

    # ----- inner loop -----
    def _adapt(self, fast: Params, frozen: Params, x: Tensor, y: Tensor, steps: int,
               create_graph: bool, grad_fn: GradFn,
               on_step: Callable[[int, Params], None] | None = None,
               loss_fn: LossFn | None = None) -> tuple[Params, Tensor]:
        """``steps`` gradient steps on (x, y). Returns the adapted params and the loss before."""
        loss_before = None
        for step in range(steps):
            if on_step:
                on_step(step, fast)
            fast, loss = self._inner_step(fast, self._at_step(frozen, step), self.inner_lrs(step),
                                          x, y, create_graph, grad_fn, loss_fn)
            loss_before = loss if loss_before is None else loss_before
        if on_step:
            on_step(steps, fast)
        if loss_before is None:
            loss_before = self._loss(fast, frozen, x, y, loss_fn).detach()
        return fast, loss_before

    def _at_step(self, frozen: Params, step: int) -> Params:
        """``frozen`` for inner step ``step``'s forwards: with its set of per-step parameters."""
        copies = self.per_step(step)
        return {**frozen, **copies} if copies else frozen

    def _inner_step(self, fast: Params, frozen: Params, lrs: dict[str, Tensor | float], x: Tensor,
                    y: Tensor, create_graph: bool, grad_fn: GradFn,
                    loss_fn: LossFn | None = None) -> tuple[Params, Tensor]:
        """One gradient step on (x, y). Returns the new params and the loss before the step."""
        if not create_graph:  # first order: no derivative of the inner gradient, w.r.t. anything
            frozen = {n: t.detach() for n, t in frozen.items()}

        def loss_of(params: Params) -> tuple[Tensor, Tensor]:
            loss = self._loss(params, frozen, x, y, loss_fn)
            return loss, loss.detach()

        grads, loss = grad_fn(loss_of, fast, create_graph)
        # p - lr * g, bit for bit; an addition's backward needs no negation of each gradient
        return {n: p + grads[n] * -lrs[n] for n, p in fast.items()}, loss

    def _task(self, fast: Params, frozen: Params, steps: int, create_graph: bool,
              record: Sequence[int], grad_fn: GradFn, sx: Tensor, sy: Tensor, qx: Tensor,
              qy: Tensor) -> tuple[Tensor, ...]:
        """One task: adapt on the support set, query loss (and metric) after each step in record."""
        losses, metrics = [], []

        def on_step(step: int, params: Params) -> None:
            if step in record:
                at_step = self._at_step(frozen, step - 1)  # the set of the step just taken
                losses.append(self._loss(params, at_step, qx, qy))
                if self.metric_fn:
                    metrics.append(self._loss(params, at_step, qx, qy, self.metric_fn).detach())

        _, support_loss = self._adapt(fast, frozen, sx, sy, steps, create_graph, grad_fn, on_step)
        out = (support_loss, torch.stack(losses))
        return (*out, torch.stack(metrics)) if self.metric_fn else out

    def _run(self, batch: TaskBatch, steps: int, create_graph: bool,
             record: Sequence[int]) -> tuple[Tensor, ...]:
        fast, frozen = self._split_params(detach=not torch.is_grad_enabled())
        args = (fast, frozen, steps, create_graph, record)
        chunk = self._chunk(batch)
        if torch.compiler.is_compiling():  # inside meta_backward's graph: one graph, not nested
            return self._batched(*args, chunk, *batch)
        choice = self._choice(batch)
        if choice is not None and not self._vmap_failed:
            path, chunk = choice
            if path == "looped":
                self.path = "looped"
                return self._run_looped(args, batch)
        compiled = self._compiled_batched is not None and (choice is None or choice[0] == "compiled")

        def batched() -> tuple[Tensor, ...]:
            if not compiled:
                return self._batched(*args, chunk, *batch)
            layout = _graph_layout(fast), _graph_layout(frozen)  # one graph call per chunk
            try:
                return _concatenated([self._compiled_batched(*layout, *args[2:], None, *part)
                                      for part in _chunks(batch, chunk)])
            except torch._dynamo.exc.TorchDynamoException as error:
                return self._uncompiled_from_now(error, lambda: self._batched(*args, chunk, *batch))
        out = self._dispatch(batched, lambda: self._run_looped(args, batch))
        if self.path == "batched" and choice is not None:  # (uncompiled if compiling just failed)
            self.path = _label(choice if compiled and self._compiled_batched else ("batched", chunk))
        return out

    def _choice(self, batch: TaskBatch) -> tuple[str, int | None] | None:
        """The path chosen for this batch's shapes (or being timed), if any."""
        return self._trying or (self.path_choices.get(self._path_key(batch)) if self._auto else None)

    def _compiles_gradient(self, batch: TaskBatch) -> bool:
        """Whether ``meta_backward`` runs as one compiled graph: where compiling is allowed and,
        with the path search, where it won; with ``batched=True``, always; otherwise once the
        first call ran batched."""
        if self._compiled_gradient is None or self._vmap_failed:
            return False
        choice = self._choice(batch)
        if choice is not None:
            return choice[0] == "compiled"
        return self.batched is True or self.path == "batched"

    def _dispatch(self, batched: Callable[[], Any], looped: Callable[[], Any]) -> Any:
        """Run the batched (vmap) path, or the looped one when asked for or already fallen back to."""
        if self.batched is False or self._vmap_failed:
            self.path = "looped"
            return looped()
        try:
            out = batched()
        except Exception as error:  # noqa: BLE001 - auto mode falls back to the loop below
            if self.batched:
                if isinstance(error, ShapeError):  # maybe vmap's, not the input's
                    raise ShapeError(f"{error} (this ran under vmap, batched=True; where vmap "
                                     "cannot run a model, batched=None falls back to the looped "
                                     "path)") from error
                raise
            out = looped()  # a user error fails here too, and is raised
            self.path, self._vmap_failed = "looped", True
            warnings.warn(f"vmap could not run this model ({_first_line(error)}); using the "
                          "looped path", FastMAMLWarning, stacklevel=4)
            return out
        self.path = "batched"
        return out

    def _uncompiled_from_now(self, error: Exception, eager: Callable[[], Any]) -> Any:
        """Where ``torch.compile`` failed (on CPU, inductor needs a C++ compiler) but the eager
        call runs, compiling is off for this learner from now on, with a warning: ``compile`` is
        a speed option, never the reason a run stops. A user's error fails eagerly too; it is
        raised, and compiling stays on."""
        compiled = self._compiled_batched, self._compiled_gradient
        self._compiled_batched = self._compiled_gradient = None
        try:
            out = eager()
        except BaseException:
            self._compiled_batched, self._compiled_gradient = compiled
            raise
        warnings.warn(f"torch.compile failed ({_first_line(error)}); running uncompiled",
                      FastMAMLWarning, stacklevel=4)
        return out

    def _searches(self, batch: TaskBatch) -> str | None:
        """Whether this ``meta_backward`` times the candidate paths (see ``batched``): "alone",
        "together" (with every rank) or not (None). A choice made in this process for the same
        model, settings and shapes is reused, so that two runs with one seed take the same path.
        With ``gather_ranks``, the first call in each derivative order asks every rank (they
        make it together: the driver switches the order on all at once), and all search together
        where any has no choice; a choice missing at a later call (this rank's compiling fell
        back, which changes its key alone, or a new input shape) is searched alone. A rank
        whose vmap failed runs looped and searches only with the others."""
        if not self._auto or self._trying:
            return None
        key = self._path_key(batch)
        known = self.path_choices.get(key) or _PATHS_CHOSEN.get(self._signature(key))
        if known is not None:
            self.path_choices[key] = known
        missing = known is None and not self._vmap_failed
        if self.gather_ranks is not None and self.first_order not in self._asked_orders:
            self._asked_orders.add(self.first_order)
            if any(self.gather_ranks(missing)):
                return "together"
        return "alone" if missing else None

    def _path_key(self, batch: Sequence[Tensor]) -> str:
        """What the fastest path depends on, besides the model: the meta-batch's shapes, dtype
        and device, the derivative order (which ``first_order_until`` switches in a run), the
        thread count, the CPU's vector instructions, whether compiling is allowed and the paths'
        implementations. A run resumed with other threads, CPU, ``compile``, torch or paths so
        searches again instead of reusing a choice timed without its candidates or kernels."""
        order = "first" if self.first_order else "second"
        compiled = self._compiled_gradient is not None
        device = batch[0].device.type
        if device == "cpu":  # AVX2 and AVX512 kernels rank the paths differently
            device += f" {torch.backends.cpu.get_cpu_capability()}"
        return (f"{[tuple(t.shape) for t in batch]} {batch[0].dtype} {device} "
                f"{order} order, {torch.get_num_threads()} threads, compile={compiled}, "
                f"paths r{PATHS_REVISION}, torch {torch.__version__}")

    def _signature(self, key: str) -> str:
        params = [(n, tuple(p.shape)) for n, p in self.named_parameters() if p.requires_grad]
        return f"{type(self.model).__name__} {params} {self.inner_steps} {key}"

    def _search_path(self, batch: TaskBatch, step_weights: Tensor | None, trainable: Params,
                     together: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """``meta_backward`` by each candidate path (after a warm-up call of the default chunk,
        eager and compiled), then the two fastest once more, keeping the fastest for this input
        shape; ``.grad`` gets the chosen candidate's gradient, as later calls (and runs that
        reuse the choice) compute it (where a compiled winner differed from the eager gradient,
        the eager one, as ``_checked_compiled_gradient`` gives). Every call starts from the same
        random state (dropout), and the search leaves it as one call of the chosen path does, so
        a seeded run that searches draws what one reusing the choice draws."""
        default = min(self._chunk(batch) or batch.num_tasks, batch.num_tasks)
        roles = {"compiled": ("compiled", default), "default chunk": ("batched", default),
                 "one task": ("batched", 1), "all tasks": ("batched", batch.num_tasks),
                 "looped": ("looped", None)}  # the candidates as every rank names them
        candidates = [c for c in dict.fromkeys(roles.values())
                      if c[0] != "compiled" or self._compiled_gradient is not None]
        warm_ups = [c for c in candidates if c[1] == default]
        before = {n: p.grad for n, p in trainable.items()}
        timings: dict[tuple[str, int | None], float] = {}
        results: dict[tuple[str, int | None], tuple[Params, Tensor, dict[str, Tensor]]] = {}

        def runnable(candidate: tuple[str, int | None]) -> bool:  # vmap and compile may fail
            return candidate[0] == "looped" or not self._vmap_failed and (
                candidate[0] != "compiled" or self._compiled_gradient is not None)

        device = batch.support_x.device
        start_state = _random_state(device)
        end_states: dict[tuple[str, int | None], tuple[Tensor, ...]] = {}

        def run(candidate: tuple[str, int | None]) -> None:
            self._trying = candidate
            for p in trainable.values():
                p.grad = None
            _set_random_state(start_state, device)
            start = time.perf_counter()
            loss, metrics = self.meta_backward(batch, step_weights)
            if runnable(candidate):
                elapsed = time.perf_counter() - start
                timings[candidate] = min(elapsed, timings.get(candidate, elapsed))
                results[candidate] = ({n: p.grad for n, p in trainable.items()}, loss.detach(),
                                      metrics)
                end_states[candidate] = _random_state(device)

        try:
            for candidate in warm_ups:  # their timings (and compiling) are replaced below
                run(candidate)
            timings.clear()
            for candidate in filter(runnable, candidates):
                run(candidate)
            for candidate in sorted(timings, key=timings.get)[:2]:  # noise: time the two again
                run(candidate)
        finally:
            self._trying = None
        key = self._path_key(batch)
        best = self._agreed_path(key, roles, timings, together)
        self.path = _label(best)
        _set_random_state(end_states[best], device)
        # a graph that differed from the eager gradient gives the eager one, as later calls do
        grads, loss, metrics = results[("batched", best[1]) if key in self._compiled_misses
                                       and best[0] == "compiled" else best]
        for name, p in trainable.items():
            p.grad = (grads[name] if before[name] is None else before[name] if grads[name] is None
                      else before[name] + grads[name])
        return loss, metrics

    def _agreed_path(self, key: str, roles: dict[str, tuple[str, int | None]],
                     timings: dict[tuple[str, int | None], float], together: bool
                     ) -> tuple[str, int | None]:
        """The searched path to keep for this input shape (``key``), recorded, and the one this
        rank runs (looped where its vmap failed): the fastest here or, with every rank
        (``together``), the role (e.g. "all tasks") fastest on the slowest rank, which sets the
        pace of ranks that step together; each rank's choice is then recorded on every rank, so
        that the ranks' records (and checkpoints) agree. A role not timed here (compiling off)
        counts as infinitely slow; where vmap failed, every role runs looped."""
        def seconds(candidate: tuple[str, int | None]) -> float:
            return timings.get(("looped", None) if self._vmap_failed else candidate, math.inf)

        mine = (key, {role: (candidate, seconds(candidate)) for role, candidate in roles.items()})
        offers = self.gather_ranks(mine) if together else [mine]
        best = min(roles, key=lambda role: max(offer[role][1] for _, offer in offers))
        for rank_key, offer in offers:
            self.path_choices[rank_key] = _PATHS_CHOSEN[self._signature(rank_key)] = offer[best][0]
        return ("looped", None) if self._vmap_failed else roles[best]

    def _batched(self, fast: Params, frozen: Params, steps: int, create_graph: bool,
                 record: Sequence[int], chunk_size: int | None, *batch: Tensor) -> tuple[Tensor, ...]:
        """All tasks at once: ``vmap`` of the task function over the leading task dimension."""
        return _vmap_tasks(lambda *task: self._task(fast, frozen, steps, create_graph, record,
                                                    _functorch_grad, *task), chunk_size, *batch)

    def _chunk(self, batch: Sequence[Tensor]) -> int | None:
        if self.chunk_size is not None or batch[0].device.type != "cpu":
            return self.chunk_size
        per_task = (batch[0][0].numel() + batch[2][0].numel()) or 1
        return max(1, CPU_CHUNK_ELEMENTS // per_task)

    def _run_looped(self, args: tuple, batch: TaskBatch) -> tuple[Tensor, ...]:
        per_task = [self._task(*args, _autograd_grad, *task) for task in zip(*batch)]
        return tuple(torch.stack(column) for column in zip(*per_task))

    # ----- public API -----
    def meta_loss(self, batch: TaskBatch | Sequence[Tensor],
                  step_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean query loss after adaptation over the tasks of ``batch``; differentiable.

        With ``step_weights`` (length ``inner_steps``, see ``multi_step_loss_weights``) the
        per-task loss is the weighted sum of the query losses after every inner step (MAML++).
        Returns the loss and detached metrics: ``support_loss`` (before adaptation),
        ``query_loss`` (after the last step) and ``query_metric`` when a metric_fn is set.
        """
        batch = as_task_batch(batch)
        self._prepare(batch.support_x[0], of_batch=True)
        loss, metrics = self(batch, _as_weights(step_weights))
        self._check_finite(loss)
        return loss, metrics

    @_second_derivatives_explained
    def meta_backward(self, batch: TaskBatch | Sequence[Tensor],
                      step_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``meta_loss(batch, step_weights)[0].backward()`` as one functional pass.

        Accumulates the meta-gradient into ``.grad`` of every trainable parameter (the model's,
        the learned inner learning rates and the per-step sets) and returns the detached loss
        and the metrics. With ``compile=True``, on the batched path and after the first call,
        the outer gradient is ``torch.func.grad`` of the whole objective, compiled into one
        graph with the forward (sinusoid MLP: about twice as fast as ``meta_loss`` +
        ``backward`` compiled). Otherwise it is ``meta_loss`` and autograd: uncompiled, the
        functional form is slower and keeps more memory. With ``checkpoint_steps`` it is the
        step-by-step reverse pass of ``_checkpointed_task``.
        """
        if not torch.is_grad_enabled():
            raise ConfigError("meta_backward computes gradients, but gradients are off here "
                              "(torch.no_grad or inference_mode): call it outside, or use "
                              "evaluate for losses alone")
        batch, step_weights = as_task_batch(batch), _as_weights(step_weights)
        self._prepare(batch.support_x[0], of_batch=True)
        # Learned inner rates do not enter the objective without inner steps: autograd leaves
        # their .grad None, and so do the functional branches.
        trainable = {n: p for n, p in self.named_parameters()
                     if p.requires_grad and (self.inner_steps or not n.startswith("inner_lrs."))}
        if self.checkpoint_steps:
            if _has_active_dropout(self.model):
                raise ConfigError("checkpoint_steps recomputes the inner steps, so dropout would "
                                  "draw different masks: call model.eval() or turn it off")
            grads, (loss, metrics) = self._checkpointed_gradient(batch, step_weights)
        elif search := self._searches(batch):
            return self._search_path(batch, step_weights, trainable, search == "together")
        elif self._compiles_gradient(batch):
            choice = self._choice(batch)
            chunk = choice[1] if choice else self._chunk(batch)
            try:
                grads, (loss, metrics) = self._checked_compiled_gradient(trainable, batch,
                                                                         step_weights, chunk)
            except torch._dynamo.exc.TorchDynamoException as error:
                return self._uncompiled_from_now(error, lambda: self._backward(batch, step_weights))
            if self._compiled_gradient is None:  # it computed wrongly: the eager gradient
                choice = choice and ("batched", chunk)
            self.path = _label(choice) if choice else "batched"
        else:  # uncompiled, or the first call, which decides the path
            return self._backward_compiling_lazily(batch, step_weights, trainable)
        self._check_finite(loss)
        without = self._without_gradient(step_weights)
        for name, p in trainable.items():
            if name in without and not grads[name].any():
                continue  # torch.func's zeros where autograd leaves None
            p.grad = grads[name] if p.grad is None else p.grad + grads[name]
        return loss, metrics

    def _without_gradient(self, step_weights: Tensor | None) -> set[str]:
        """The trainable parameters that autograd may leave without ``.grad`` here: those the
        model's output does not use (``_unused_parameters``) and, in first order, the model's
        own per-step parameters, which only the first inner step uses, unless the multi-step
        loss takes the query loss after that step."""
        if self.first_order and step_weights is None:
            return self._unused_names | {f"model.{n}" for n in self.per_step.names}
        return self._unused_names

    def _backward(self, batch: TaskBatch, step_weights: Tensor | None
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        """``meta_loss`` and autograd's ``backward``."""
        loss, metrics = self(batch, step_weights)  # batch already validated
        self._check_finite(loss)
        loss.backward()
        return loss.detach(), metrics

    def _backward_compiling_lazily(self, batch: TaskBatch, step_weights: Tensor | None,
                                   trainable: Params) -> tuple[Tensor, dict[str, Tensor]]:
        """``_backward``; a compiled forward builds its backward graph only in ``backward``, so
        a compile failure there also falls back to the eager path (gradients as before it)."""
        before = {n: p.grad for n, p in trainable.items()}
        try:
            return self._backward(batch, step_weights)
        except torch._dynamo.exc.TorchDynamoException as error:
            if self._compiled_batched is None:
                raise
            for name, p in trainable.items():
                p.grad = before[name]
            return self._uncompiled_from_now(error, lambda: self._backward(batch, step_weights))

    def _checked_compiled_gradient(self, trainable: Params, batch: TaskBatch,
                                   step_weights: Tensor | None, chunk: int | None
                                   ) -> tuple[Params, tuple[Tensor, dict[str, Tensor]]]:
        """The compiled meta-gradient. The first of each input shape is compared with the eager
        one (same chunks, same random state, an eager forward). Where they differ by more than
        ``COMPILED_TOLERANCE``, the eager gradient is returned and the next call of the shape
        compares again (the path search compares at its first call only: its calls repeat one
        batch); after ``COMPILED_CHECKS`` such calls in a row, compiling is off from now on,
        with a warning. Measured once, setting unrecorded: inductor (torch 2.13) computed a
        transformer encoder layer's second-order meta-gradient 1.6% off (perhaps float32
        rounding too, see ``COMPILED_CHECKS``). Not compared, with a warning: under active
        dropout (the two would draw different masks) and where the eager pass runs out of
        accelerator memory. Where the eager gradient is not finite, the next call of the shape
        compares again."""
        key = self._path_key(batch)
        if key not in self._compiled_checked and _has_active_dropout(self.model):
            self._compiled_checked.add(key)
            warnings.warn("the compiled meta-gradient is not checked against the eager one "
                          "under active dropout (they draw different masks)", FastMAMLWarning,
                          stacklevel=3)
        if key in self._compiled_checked or self._trying and key in self._compiled_misses:
            # trusted; or timed by the path search, whose calls repeat the batch it compared
            return self._gradient_by_chunks(self._compiled_gradient, trainable, batch,
                                            step_weights, chunk)
        device = batch.support_x.device
        start = _random_state(device)
        grads, aux = self._gradient_by_chunks(self._compiled_gradient, trainable, batch,
                                              step_weights, chunk)
        end = _random_state(device)
        _set_random_state(start, device)
        trying, self._trying = self._trying, ("batched", chunk)  # an eager forward inside
        try:
            eager = self._gradient_by_chunks(self._gradient, trainable, batch, step_weights,
                                             chunk)
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            self._compiled_checked.add(key)
            warnings.warn("the compiled meta-gradient is not checked against the eager one: "
                          "the eager pass ran out of memory", FastMAMLWarning, stacklevel=3)
            return grads, aux
        finally:
            self._trying = trying
            _set_random_state(end, device)
        if not all(torch.isfinite(g).all() for g in eager[0].values() if g is not None):
            return grads, aux  # nothing to compare with: the next call of the shape checks
        error = _relative_difference(grads, eager[0])
        if error <= COMPILED_TOLERANCE:
            self._compiled_checked.add(key)
            self._compiled_misses.pop(key, None)
            return grads, aux
        misses = self._compiled_misses.setdefault(key, [])
        misses.append(error)
        if len(misses) == COMPILED_CHECKS:
            self._compiled_batched = self._compiled_gradient = None
            warnings.warn("torch.compile computed this model's meta-gradient off (relative) from "
                          f"the eager path's by {', '.join(f'{e:.1e}' for e in misses)}; running "
                          "uncompiled", FastMAMLWarning, stacklevel=3)
        return eager

    def _gradient_by_chunks(self, gradient: Callable, trainable: Params, batch: TaskBatch,
                            step_weights: Tensor | None, chunk: int | None
                            ) -> tuple[Params, tuple[Tensor, dict[str, Tensor]]]:
        """The meta-gradient by ``gradient`` (``_gradient`` or its compiled graph), one call per
        chunk of tasks. A graph holds one chunk, so its compile time does not grow with the
        meta-batch (vmap's chunks inside one graph are unrolled: a 16-task batch in chunks of one
        compiled for over 20 minutes); an uneven last chunk compiles one more graph. The
        objective is a mean over tasks, so each chunk's gradient, loss and metrics count by its
        share of the tasks."""
        params = _graph_layout({n: p.detach() for n, p in trainable.items()})
        grads: Params = {}
        loss: Tensor | float = 0.0
        metrics: dict[str, Tensor] = {}
        for part in _chunks(batch, chunk):
            part_grads, (part_loss, part_metrics) = gradient(params, part, step_weights)
            share = part.num_tasks / batch.num_tasks
            grads = {n: grads.get(n, 0.0) + share * g for n, g in part_grads.items()}
            metrics = {k: metrics.get(k, 0.0) + share * v for k, v in part_metrics.items()}
            loss = loss + share * part_loss
        return grads, (loss, metrics)

    def _gradient(self, params: Params, batch: TaskBatch,
                  step_weights: Tensor | None) -> tuple[Params, tuple[Tensor, dict[str, Tensor]]]:
        def objective(params: Params) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
            loss, metrics = functional_call(self, params, (batch, step_weights), strict=False)
            return loss, (loss.detach(), metrics)
        return torch.func.grad(objective, has_aux=True)(params)

    def _checkpointed_gradient(self, batch: TaskBatch, step_weights: Tensor | None
                               ) -> tuple[Params, tuple[Tensor, dict[str, Tensor]]]:
        """The meta-gradient by reverse mode over the inner steps, one step's graph at a time."""
        fast, constants = self._split_params(detach=True)
        outer = {n: constants.pop(n) for n in self.outer_only_names}
        step_params = {n: p.detach() for n, p in self.named_parameters()
                       if n.startswith(("inner_lrs.", "per_step."))}
        record = self._record(step_weights)
        weights = dict(zip(record, [1.0] if step_weights is None else step_weights))

        def task(*data: Tensor) -> tuple[Params, ...]:
            return self._checkpointed_task(fast, outer, constants, step_params, weights, *data)
        per_task = self._dispatch(
            lambda: _vmap_tasks(task, self._chunk(batch), *batch),
            lambda: tuple({n: torch.stack([d[n] for d in column]) for n in column[0]}
                          for column in zip(*(task(*data) for data in zip(*batch)))))
        *per_task_grads, values = per_task
        grads = {f"{prefix}{n}": g.mean(0) for prefix, part in
                 zip(("model.", "model.", ""), per_task_grads) for n, g in part.items()}
        metrics = {n: v.mean() for n, v in values.items() if n != "loss"}
        return grads, (values["loss"].mean(), metrics)

    def _checkpointed_task(self, fast: Params, outer: Params, constants: Params,
                           step_params: Params, weights: dict[int, Tensor | float], sx: Tensor,
                           sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Params, ...]:
        """Gradients of one task's (weighted) query losses w.r.t. the initialisation, the
        outer-only parameters and the per-step ones (``step_params``: the learning rates and
        the per-step copies, named as in MAML), and the task's losses.

        The inner loop runs without a graph and keeps only each step's parameters; the backward
        pass recomputes step k from them and applies its vector-Jacobian product
        (``torch.func.vjp``), from the last step to the first.
        """
        def frozen_at(k: int, outer: Params, step_params: Params) -> Params:
            copies = functional_call(self.per_step, _under("per_step.", step_params), (k,))
            return {**constants, **outer, **copies}

        def advance(k: int, fast: Params, outer: Params, step_params: Params
                    ) -> tuple[Params, Tensor]:
            lrs = functional_call(self.inner_lrs, _under("inner_lrs.", step_params), (k,))
            return self._inner_step(fast, frozen_at(k, outer, step_params), lrs, sx, sy,
                                    not self.first_order, _functorch_grad)

        def query_loss(k: int, fast: Params, outer: Params, step_params: Params
                       ) -> tuple[Tensor, Tensor]:  # after k steps: step k - 1's set
            loss = self._loss(fast, frozen_at(k - 1, outer, step_params), qx, qy)
            return loss, loss.detach()

        def add(total: Params, delta: Params, scale: Tensor | float = 1.0) -> Params:
            return {n: g + scale * delta[n] for n, g in total.items()}

        trajectory, values = [fast], {"loss": 0.0}
        for k in range(self.inner_steps):
            adapted, support_loss = advance(k, trajectory[-1], outer, step_params)
            trajectory.append(adapted)
            values.setdefault("support_loss", support_loss)
        if not self.inner_steps:
            values["support_loss"] = self._loss(fast, {**constants, **outer}, sx, sy)
        g_fast, g_outer, g_step = ({n: torch.zeros_like(p) for n, p in params.items()}
                                   for params in (fast, outer, step_params))
        for k in range(self.inner_steps, -1, -1):
            if k in weights:
                (d_fast, d_outer, d_step), loss = torch.func.grad(
                    functools.partial(query_loss, k), argnums=(0, 1, 2), has_aux=True)(
                        trajectory[k], outer, step_params)
                values["loss"] = values["loss"] + weights[k] * loss
                values.setdefault("query_loss", loss)  # the last step comes first
                g_fast, g_outer, g_step = (add(total, delta, weights[k]) for total, delta in
                                           ((g_fast, d_fast), (g_outer, d_outer), (g_step, d_step)))
            if k > 0:
                _, vjp_fn = torch.func.vjp(lambda *args: advance(k - 1, *args)[0],
                                           trajectory[k - 1], outer, step_params)
                g_fast, d_outer, d_step = vjp_fn(g_fast)
                g_outer, g_step = add(g_outer, d_outer), add(g_step, d_step)
        if self.metric_fn:
            values["query_metric"] = self._loss(
                trajectory[-1], frozen_at(self.inner_steps - 1, outer, step_params), qx, qy,
                self.metric_fn)
        return g_fast, g_outer, g_step, values

    def _record(self, step_weights: Tensor | None) -> list[int]:
        """The inner steps whose query loss enters the meta-loss."""
        steps = self.inner_steps
        if step_weights is None:
            return [steps]
        if len(step_weights) != steps or steps == 0:
            raise ConfigError(f"step_weights needs one weight per inner step ({steps}), "
                              f"got {len(step_weights)}")
        return list(range(1, steps + 1))

    def _check_finite(self, loss: Tensor) -> None:
        if self.check_finite and not torch.isfinite(loss):
            raise NonFiniteLossError(f"the meta-loss is {loss.item()}: lower inner_lr or the meta "
                                     "learning rate, or clip the meta-gradient")

    def forward(self, batch: TaskBatch, step_weights: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """The meta-objective of ``meta_loss`` without its input validation and finite check."""
        if not self._probed:  # (meta_loss and meta_backward have probed: no graph break)
            self._probe(batch.support_x[0])
        record = self._record(step_weights)
        support_loss, query_loss, *metric = self._run(batch, self.inner_steps,
                                                      not self.first_order, record)
        per_task = (query_loss[:, -1] if step_weights is None
                    else query_loss @ step_weights.to(query_loss))
        loss = per_task.mean()
        metrics = {"support_loss": support_loss.mean(), "query_loss": query_loss[:, -1].detach().mean()}
        if metric:
            metrics["query_metric"] = metric[0][:, -1].mean()
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch | Sequence[Tensor], steps: int | None = None) -> dict[str, Tensor]:
        """Query loss (and metric) of every task after 0..steps inner steps: (tasks, steps + 1)."""
        batch = as_task_batch(batch)
        if torch.is_inference_mode_enabled():  # the inner steps need autograd: as under no_grad
            with torch.inference_mode(False):
                return self.evaluate(TaskBatch(*(t.clone() for t in batch)), steps)
        steps = self.inner_steps if steps is None else steps
        check_steps("steps", steps)
        self._prepare(batch.support_x[0], of_batch=True)
        _, loss, *metric = self._run(batch, steps, False, list(range(steps + 1)))
        return {"loss": loss, **({"metric": metric[0]} if metric else {})}

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None,
              loss_fn: LossFn | None = None) -> Params:
        """Adapted parameters for one task (no task dimension).

        With ``per_step``, the dict also holds the last step's set of those parameters, under
        the model's names. Differentiable with respect to the initialisation when gradients are
        enabled, so a custom outer loss can be built on the result. ``loss_fn`` replaces the task loss for
        this adaptation (e.g. a cross-entropy over the first N outputs of a wider classifier).
        Under ``torch.no_grad`` or ``torch.inference_mode`` the result is detached.
        """
        _check_tensors(support_x=support_x, support_y=support_y)
        if torch.is_inference_mode_enabled():  # the inner steps need autograd: as under no_grad
            with torch.inference_mode(False), torch.no_grad():
                return self.adapt(support_x.clone(), support_y.clone(), steps, loss_fn)
        if support_x.shape[:1] != support_y.shape[:1]:
            raise ShapeError(f"support_x {tuple(support_x.shape)} and support_y "
                             f"{tuple(support_y.shape)} need the same number of examples")
        if not len(support_x):
            raise ShapeError(f"support_x {tuple(support_x.shape)} holds no examples: adapting "
                             "needs at least one")
        steps = self.inner_steps if steps is None else steps
        check_steps("steps", steps)
        if self._task_input_dims is not None and support_x.dim() == self._task_input_dims + 1:
            raise ShapeError(f"adapt takes one task's support set, and a task's inputs in the "
                             f"batches so far had {self._task_input_dims} dimensions; got "
                             f"support_x {tuple(support_x.shape)}, a batch of tasks? Adapt "
                             "each task alone (or evaluate the batch)")
        self._prepare(support_x)
        fast, frozen = self._split_params(detach=not torch.is_grad_enabled())
        create_graph = torch.is_grad_enabled() and not self.first_order
        adapted, _ = self._adapt(fast, frozen, support_x, support_y, steps, create_graph,
                                 _autograd_grad, loss_fn=loss_fn)
        # after 0 steps: copies, so that changing them in place leaves the model as it is
        adapted = adapted if steps else {name: p.clone() for name, p in adapted.items()}
        return {**adapted, **{name: p.clone() for name, p in self.per_step(steps - 1).items()}}

    def predict(self, adapted: Params, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The model's output on ``x`` with ``adapted`` parameters (from ``adapt``).

        With ``context`` (e.g. the task's support inputs), each row of ``x`` is predicted in one
        batch with the context alone (vectorised), so that batch statistics (transductive batch
        norm), and with them the prediction, do not depend on the other rows of ``x``; a single
        row is not normalised by itself alone.
        """
        if not isinstance(adapted, Mapping):
            raise ConfigError(f"adapted must be the parameters MAML.adapt returns (a dict), got "
                              f"{type(adapted).__name__}"
                              + (": a run's adaptation goes to run.predict" if
                                 hasattr(adapted, "params") else ""))
        _check_tensors(x=x, **({} if context is None else {"context": context}))
        fast, frozen = self._split_params(detach=False)
        unknown = sorted(set(adapted) - set(fast) - set(frozen))
        if unknown:
            raise ConfigError(f"adapted holds {', '.join(unknown[:3])}, not parameters of the "
                              "model: give the dict MAML.adapt returns")
        params = {**fast, **adapted}
        if context is None:
            self._prepare(x)
            return self._forward(params, frozen, x)
        if context.shape[1:] != x.shape[1:] or context.dim() != x.dim() or not len(context):
            raise ShapeError(f"context {tuple(context.shape)} must be examples shaped as x's "
                             f"examples (x {tuple(x.shape)}: one task's inputs, examples first; "
                             "context e.g. the task's support inputs), at least one")
        self._prepare(torch.cat([x[:1], context]))  # as each row is predicted
        if not len(x):  # vmap cannot map over no rows: the outputs' shapes, without rows
            return tree_map(lambda out: out[:0], self._forward(params, frozen, context))

        def alone_with_context(row: Tensor) -> Any:  # the row's output, of any structure
            outputs = self._forward(params, frozen, torch.cat([row[None], context]))
            return tree_map(lambda out: out[0], outputs)
        return vmap(alone_with_context, randomness="different",
                    chunk_size=max(1, PREDICT_BATCH // (len(context) + 1)))(x)


def _label(choice: tuple[str, int | None]) -> str:
    """A path choice as ``maml.path`` names it, e.g. ``batched, chunk 4`` or ``looped``."""
    path, chunk = choice
    return path if chunk is None else f"{path}, chunk {chunk}"


def _chunks(batch: TaskBatch, chunk: int | None) -> list[TaskBatch]:
    """``batch`` in consecutive chunks of ``chunk`` tasks (``None``: one chunk)."""
    return batch.split(chunk or batch.num_tasks)


def _concatenated(parts: Sequence[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """Per-task outputs of consecutive chunks of tasks, joined along the task dimension."""
    return parts[0] if len(parts) == 1 else tuple(torch.cat(column) for column in zip(*parts))


def _vmap_tasks(task: Callable[..., Any], chunk_size: int | None, *batch: Tensor) -> Any:
    """``vmap`` of ``task`` over the leading task dimension, ``chunk_size`` tasks at a time."""
    if chunk_size is not None and chunk_size >= batch[0].shape[0]:
        chunk_size = None  # one chunk: skip vmap's split and concatenation
    return vmap(task, randomness="different", chunk_size=chunk_size)(*batch)



def _listed(names: Sequence[str], most: int = 3) -> str:
    """``names`` joined by commas, the first ``most`` of them and how many more."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _matching(option: str, selection: Sequence[str] | Callable[[str, Tensor], bool] | None,
              params: Params) -> list[str]:
    """The names of ``params`` that ``selection`` (MAML's argument ``option``) selects; a
    ``ConfigError`` where it selects none, or one of its name prefixes matches none."""
    names = [n for n, p in params.items() if _selected(selection, n, p)]
    prefixes = ([selection] if isinstance(selection, str) else [] if callable(selection)
                else selection or [])
    unmatched = [prefix for prefix in prefixes
                 if not any(_selected([prefix], n, p) for n, p in params.items())]
    if not names or unmatched:
        what = (f"{option} prefix(es) {', '.join(map(repr, unmatched))} match"
                if unmatched else f"the {option} selection matches")
        raise ConfigError(f"{what} no trainable parameter of the model; its trainable "
                          f"parameters: {', '.join(params) or 'none'}")
    return names


def _selected(adapt: Sequence[str] | Callable[[str, Tensor], bool] | None, name: str,
              param: Tensor) -> bool:
    if adapt is None:
        return True
    if callable(adapt):
        return bool(adapt(name, param))
    if isinstance(adapt, str):
        adapt = [adapt]
    return any(name == prefix or name.startswith(prefix + ".") for prefix in adapt)


def _under(prefix: str, params: Params) -> Params:
    """The entries of ``params`` named under ``prefix``, without it."""
    return {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}


def _graph_layout(params: Params) -> Params:
    """Parameters as they enter a compiled graph: on CPU, 4-d (convolution) weights channels-last.

    Then the shared-weight convolutions (tasks in the batch) and the per-task ones (tasks in the
    channels) give activations in one layout, which inductor's fused kernels read without
    gathering (docs/results.md, session 6). ``clone`` sets the strides even with one channel.
    """
    return {n: p.clone(memory_format=torch.channels_last)
            if p.dim() == 4 and p.device.type == "cpu" else p for n, p in params.items()}


def _relative_difference(grads: Params, reference: Params) -> float:
    """||grads - reference|| / ||reference|| over every parameter that has a gradient."""
    names = [n for n, g in reference.items() if g is not None and grads.get(n) is not None]
    if not names:
        return 0.0
    difference = torch.cat([(grads[n] - reference[n]).flatten() for n in names]).norm()
    return (difference / torch.cat([reference[n].flatten() for n in names]).norm().clamp_min(
        torch.finfo(reference[names[0]].dtype).tiny)).item()


class _KernelsCalled(TorchFunctionMode):
    """Records whether a forward calls a norm function (``ExactNorms``), an embedding with a
    padding row or an embedding bag (``ExactEmbeddings``), or an embedding that scales its
    gradient by frequency."""

    def __init__(self) -> None:
        super().__init__()
        self.norms = self.exact_embeddings = self.frequency_scaling = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        self.norms |= func in NORM_FUNCTIONS
        if func is F.embedding:
            self.exact_embeddings |= pads(*args, **kwargs)
            self.frequency_scaling |= scales_gradient_by_frequency(*args, **kwargs)
        self.exact_embeddings |= func is F.embedding_bag and composes_bag(*args, **kwargs)
        return func(*args, **kwargs)


def _has_attention(model: nn.Module) -> bool:
    """True when ``model`` has an ``nn.MultiheadAttention`` (so any ``nn.Transformer*``) or a
    module whose ``forward`` calls ``scaled_dot_product_attention`` itself."""
    def names_in_forward(module: nn.Module) -> tuple[str, ...]:
        return getattr(getattr(type(module).forward, "__code__", None), "co_names", ())
    return any(isinstance(m, nn.MultiheadAttention)
               or "scaled_dot_product_attention" in names_in_forward(m) for m in model.modules())


def _has_active_dropout(model: nn.Module) -> bool:
    """Dropout layers, and recurrent layers' dropout between their layers, in training mode."""
    return any(m.training and (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
                               or isinstance(m, nn.RNNBase) and m.dropout > 0 and m.num_layers > 1)
               for m in model.modules())
