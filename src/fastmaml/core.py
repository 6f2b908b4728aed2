"""MAML's algorithm in one module: the inner loop (``adapt``) and the outer loop (``meta_loss``).

A meta-batch of tasks runs in one call: ``torch.func.vmap`` over the task dimension of a task
function that adapts with ``torch.func.grad`` and evaluates the adapted parameters through
``torch.func.functional_call``. The same task function also runs in a plain Python loop over tasks
with ``torch.autograd.grad``; that is the reference the tests compare against, and the fallback
for models that ``vmap`` cannot handle. Which of the two runs (and whether compiled) is decided
in ``fastmaml.paths``; the forms in which the model's functions run under them, in
``fastmaml.probe``; the inputs are checked in ``fastmaml.inputs``.
"""
from __future__ import annotations

import functools
import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import KeyPath, keystr, tree_map, tree_map_with_path

from .aliases import parameter_names, tensor_aliases, with_aliases
from .errors import (ConfigError, FastMAMLError, FastMAMLWarning, NonFiniteInputError,
                     NonFiniteLossError, ShapeError, first_line, is_out_of_memory, warn)
from .inner_lr import InnerLearningRates
from .inputs import (Params, TaskBatch, as_task_batch, as_weights, broadcasting_loss,
                     check_inner_lr, check_options, check_steps, check_tensors,
                     has_active_dropout, listed, matching, non_finite_input, random_state,
                     widened)
from .norms import spectral_normed
from .paths import ExecutionPaths
from .per_step import PerStepParameters
from .probe import ModelProbe
from .recurrent import has_recurrent

PREDICT_BATCH = 1024  # inputs in one forward pass when ``predict`` normalises each with a context
LossFn = Callable[[Tensor, Tensor], Tensor]
GradFn = Callable[[Callable, Params, bool], tuple[Params, Tensor]]


# why checkpoint_steps refuses a model that draws random numbers in training mode
RECOMPUTED_DRAWS = ("checkpoint_steps recomputes the inner steps, and the model draws random "
                    "numbers (dropout, say) that the recomputation would draw again, differently: "
                    "call model.eval() or turn them off")
# what mends a diverged meta-step
META_STEP_ADVICE = "lower inner_lr or the meta learning rate, or clip the meta-gradient"
# a loss not finite with finite inputs and parameters: loss_fn's own (0/0), or an overflow
LOSS_ADVICE = ("or loss_fn itself returns it (e.g. a cross-entropy whose labels of a task are all "
               "ignore_index)")


def _rows(at: KeyPath, output: Any, count: int) -> Tensor:
    """An output of ``predict``'s forward on a row and its context, ``count`` examples: a
    tensor of one row per example, else a ``ShapeError`` naming the output (a batch-level
    value, such as a regulariser or a set's embedding, has no row of its own)."""
    if isinstance(output, Tensor) and output.dim() and len(output) == count:
        return output
    what = (f"a tensor of shape {tuple(output.shape)}" if isinstance(output, Tensor)
            else type(output).__name__)
    raise ShapeError(f"predict with context takes each row's output out of the model's output "
                     f"on that row and the context ({count} examples), but the output"
                     f"{keystr(at) or ''} is {what}, not one row per example: predict without "
                     "context, or return such values from the model only when training")


def multi_step_loss_weights(steps: int, progress: float, min_fraction: float = 0.03) -> Tensor:
    """MAML++ multi-step loss weights over inner steps 1..steps.

    Uniform at ``progress`` 0; the non-final weights decay linearly to ``min_fraction / steps``
    at ``progress`` 1 and the final step takes the rest, so the weights always sum to one.
    """
    if not isinstance(steps, numbers.Integral) or steps < 1:
        raise ConfigError(f"multi-step loss weights need a whole number of inner steps >= 1, "
                          f"got {steps!r}")
    if not math.isfinite(progress):
        raise ConfigError(f"multi-step loss weights need a finite progress (0..1), got "
                          f"{progress}")
    nonfinal = max((1.0 - min(max(progress, 0.0), 1.0)) / steps, min_fraction / steps)
    weights = torch.full((steps,), nonfinal)
    weights[-1] = 1.0 - nonfinal * (steps - 1)
    return weights


# Without create_graph (first order, evaluation) the inner gradient is a constant of the outer
# graph, so both gradient functions compute it from detached parameters (``_inner_step`` also
# detaches the outer-only ones): the same values, with nothing recorded for the outer backward
# (sinusoid, first order: from 0.92x to 0.99x the speed of TorchOpt under vmap, measured side
# by side; docs/results.md, session 9). ``torch.func.grad``'s result is detached as well: it
# still depends on tensors the loss holds of its own (a learned temperature), as autograd's
# without create_graph does not.

def _functorch_grad(loss_of: Callable, fast: Params, create_graph: bool) -> tuple[Params, Tensor]:
    if create_graph:
        return torch.func.grad(loss_of, has_aux=True)(fast)
    grads, loss = torch.func.grad(loss_of, has_aux=True)({n: p.detach() for n, p in fast.items()})
    return {n: g.detach() for n, g in grads.items()}, loss


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
    calls: a ``ConfigError`` that says so and what to do, not torch's ``NotImplementedError``
    (or ``RuntimeError``: ``F.hardsigmoid``)."""
    @functools.wraps(meta_backward)
    def explained(self: MAML, *args: Any, **kwargs: Any) -> Any:
        try:
            return meta_backward(self, *args, **kwargs)
        except (NotImplementedError, RuntimeError) as error:  # (some kernels raise the latter)
            if self.first_order or not ("derivative for" in str(error)
                                        and "not implemented" in str(error)):
                raise
            raise ConfigError(f"second-order MAML differentiates the inner gradient, and torch "
                              f"{torch.__version__} cannot differentiate an operation of the "
                              f"model twice ({first_line(error)}): set first_order=True, or "
                              "replace that operation") from error
    return explained


class MAML(ExecutionPaths, ModelProbe, nn.Module):
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
            bool``; a parameter held under several names (a head tied to an embedding, a module
            registered twice) is selected by a prefix of any of them, and a predicate must
            agree on them all. The others are still trained by the outer loop. Both are fixed when
            MAML is built, with the parameters' ``requires_grad``: freeze or unfreeze before.
        per_step: outer-loop parameters (selected as by ``adapt``; ``None``: none) that get one
            meta-learned set per inner step, MAML++'s per-step batch-norm weights and biases:
            inner step k's support forward and the query forward after it use set k, set 0
            being the model's own (``fastmaml.per_step``; needs ``inner_steps >= 2``). ``adapt``
            returns the last step's set with the adapted parameters, for ``predict``. The sets
            start as the model's values when MAML is built: load weights into the model before,
            or into MAML (its ``state_dict``) after. In first order without the multi-step loss
            only the last step's set gets a meta-gradient (as in MAML++).
        metric_fn: optional ``metric_fn(predictions, targets) -> scalar`` (e.g. accuracy), taken
            of a copy of the query loss's own predictions: no forward pass of its own (but with
            ``checkpoint_steps``, which recomputes the steps' forwards anyway).
        batched: ``True`` for ``vmap`` over tasks, ``False`` for the looped reference, ``None``
            (default) to choose: the first ``meta_backward`` of each new input shape times the
            batched path at a few chunk sizes, the looped path and, with ``compile``, the
            compiled batched path, once each, and keeps the fastest for that shape
            (``path_choices``; every candidate computes the same meta-gradient); after four
            searched shapes, a new one within a factor of 2 of one takes the nearest one's path,
            uncompiled. An explicit ``batched``, ``chunk_size`` or ``checkpoint_steps`` turns
            the search off. If ``vmap`` cannot run the model, the looped path is used, with a
            warning.
        transductive_bn: normalise with batch statistics always, as the paper (default: on when
            the model has batch-norm layers). Running statistics are never updated, also with
            ``False``, where batch norm runs as the model's mode says (``eval()``: the running
            statistics as they are). Layer and instance norms run as written, their affine
            weight applied outside torch's kernel (exact under ``vmap``; ``fastmaml.norms``).
        compile: allow the batched path through ``torch.compile`` (fused kernels, less dispatch
            overhead; the first call of each shape compiles: seconds for a small MLP, minutes
            for a conv net from a cold inductor cache). With the default path search it is one
            more candidate (compiled once, at the default chunk size), kept only where it is
            the fastest; with an explicit ``batched=True`` it is used.
            Where compiling fails (e.g. no C++ compiler), it warns once and runs eager from then on.
        chunk_size: ``vmap`` this many tasks at a time. Default: all tasks on GPU; on CPU as many
            as hold about 2**18 input elements, which keeps the activations cache-sized (Omniglot
            with 75 queries per task: 4 tasks a chunk, 1.8x faster than all 32 at once).
        checkpoint_steps: trade compute for memory in ``meta_backward``: keep one inner step's
            activations at a time instead of all of them (each step is recomputed once in the
            backward pass), so activation memory stays flat in the number of inner steps; each
            step's adapted parameters are still kept. Not compiled; refuses active dropout.
        check_finite: raise on a NaN or infinite meta-loss, or on non-finite parameters from
            ``adapt`` (``NonFiniteLossError``; its ``NonFiniteInputError``, a ``DataError`` too,
            names the input that holds one): one synchronising check per call, which a GPU user
            may turn off.

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
        check_options(model, loss_fn, metric_fn, inner_lr, inner_steps, chunk_size, adapt,
                       per_step, first_order=first_order, batched=batched,
                       transductive_bn=transductive_bn, check_finite=check_finite, compile=compile,
                       checkpoint_steps=checkpoint_steps)
        self.model = model
        self.loss_fn, self.metric_fn = loss_fn, metric_fn
        # the steps the per-step learned values (per_layer_step rates, per_step sets) are for
        self._inner_steps = self._built_steps = inner_steps
        self.first_order = first_order
        self.batched, self.check_finite = batched, check_finite
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        names_of = parameter_names(model)
        self.adapted_names = matching("adapt", adapt, trainable, frozen, names_of)
        self.outer_only_names = [n for n in trainable if n not in self.adapted_names]
        per_step_names = ([] if per_step is None
                          else matching("per_step", per_step, trainable, frozen, names_of))
        adapted_per_step = [n for n in per_step_names if n in self.adapted_names]
        if adapted_per_step:
            raise ConfigError(f"per_step selects {listed(adapted_per_step)}, which the inner "
                              "loop adapts: per-step sets are the outer loop's; leave them out "
                              "of adapt, or choose other per_step parameters (per_step=norm "
                              "goes with adapt=no_norm)")
        if per_step_names and inner_steps < 2:
            raise ConfigError(f"per_step gives each inner step its own set of parameters, but "
                              f"with inner_steps={inner_steps} the model's own is the only one: "
                              "use inner_steps >= 2, or no per_step")
        self.per_step = PerStepParameters({n: trainable[n] for n in per_step_names}, inner_steps)
        # what it adapts and trains (adapted_names and outer_only_names), and their shapes
        self._trainable_shapes = {n: p.shape for n, p in trainable.items()}
        self.checkpoint_steps = checkpoint_steps
        adapted = {n: p for n, p in model.named_parameters() if n in self.adapted_names}
        self._rates_like = next(iter(adapted))  # the parameter whose dtype and device they take
        self.inner_lrs = InnerLearningRates(lr_mode, inner_lr,
                                            {n: p.shape for n, p in adapted.items()}, inner_steps,
                                            like=adapted[self._rates_like])
        self._init_probe(model, transductive_bn)
        self._said_column_targets = False  # (see _score)
        self._task_input_dims: int | None = None  # of one task's inputs in a batch of tasks
        self._buffer_names = [n for n, _ in model.named_buffers()]
        self._aliases = tensor_aliases(model)  # a tensor under several names (``aliases``)
        if normed := spectral_normed(model):
            warn(f"spectral_norm on {listed(normed)}: its power iteration keeps its vectors in "
                 "buffers, which MAML's forwards leave as they are (as batch norm's running "
                 "statistics), so every forward estimates the spectral norm afresh from the "
                 "initial vectors in n_power_iterations iterations: raise n_power_iterations "
                 "for a close estimate", FastMAMLWarning)
        # inductor under vmap: "Cannot access storage of BatchedTensorImpl"
        if compile and has_recurrent(model):
            warn("torch.compile cannot compile recurrent layers under vmap (torch "
                 f"{torch.__version__}); running uncompiled", FastMAMLWarning)
            compile = False
        if compile and checkpoint_steps:
            warn("compile=True with checkpoint_steps=True: meta_backward's recomputing backward "
                 "runs eager (it is not compiled); compile applies to meta_loss and evaluate",
                 FastMAMLWarning)
        self._init_paths(compile, batched, chunk_size, checkpoint_steps)

    @property
    def inner_lr(self) -> float:
        """The inner learning rate alpha; where it is learned, the rates' initial value."""
        return self.inner_lrs.init

    @inner_lr.setter
    def inner_lr(self, value: float) -> None:
        """A new fixed rate, from the next call on (a schedule of the user's own)."""
        if self.inner_lrs.mode != "fixed":
            raise ConfigError(f"with lr_mode={self.inner_lrs.mode!r} the inner learning rates "
                              "are parameters the meta-gradient trains (inner_lr was their "
                              "initial value): change them in maml.inner_lrs, or build MAML "
                              "again")
        check_inner_lr(value)
        self.inner_lrs.init = float(value)

    @property
    def inner_steps(self) -> int:
        """Inner gradient steps in meta-training, and ``adapt``'s and ``evaluate``'s default."""
        return self._inner_steps

    @inner_steps.setter
    def inner_steps(self, value: int) -> None:
        """A new number of steps, from the next call on; not more than a MAML with values
        learned per step was built for, as the added steps would train the last step's."""
        check_steps("inner_steps", value)
        if value > self._built_steps and self._learned_per_step():
            raise ConfigError(f"inner_steps={value}: this MAML's learned "
                              f"{' and '.join(self._learned_per_step())} are one per inner step "
                              f"for {self._built_steps} steps, so training more steps would "
                              f"train step {self._built_steps}'s for all of those past it: "
                              f"build MAML again with inner_steps={value} (or pass steps= to "
                              "adapt or evaluate, to use the last step's for the steps past it)")
        self._inner_steps = value

    def _learned_per_step(self) -> list[str]:
        """What this MAML learns one of per inner step."""
        return ((["inner learning rates"] if self.inner_lrs.mode == "per_layer_step" else [])
                + (["set of per-step parameters"] if self.per_step.names else []))

    # ----- the model as a function of its parameters -----
    def _split_params(self, detach: bool) -> tuple[Params, Params]:
        """(adapted params, the other params and the buffers), ``detach``ed: aliases whose
        ``requires_grad`` is theirs to set, never the model's."""
        fast, frozen = {}, {}
        for name, p in self.model.named_parameters():
            p = p.detach() if detach else p
            (fast if name in self.adapted_names else frozen)[name] = p
        frozen.update((name, b.detach() if detach else b) for name, b in self.model.named_buffers())
        return fast, frozen

    def _forward(self, fast: Params, frozen: Params, x: Tensor) -> Tensor:
        state = {**frozen, **fast}
        for name in self._buffer_names:  # fresh copies: a forward may count batches in place
            state[name] = state[name].clone()
        if self._changes_input:
            x = x.clone()
        try:
            with (self._norm_mode(), self._embedding_mode(), self._twice_mode(), self._rnn_mode(),
                  self._attention_mode()):
                return functional_call(self.model, with_aliases(state, self._aliases), (x,),
                                       tie_weights=False)
        except FastMAMLError:
            raise
        except (RuntimeError, ValueError) as error:
            if is_out_of_memory(error):  # not the model's input's fault
                raise
            weights = next((p.dtype for p in fast.values() if p.is_floating_point()), x.dtype)
            hint = ""
            if x.dtype != weights and x.is_floating_point():
                hint = (f" (the input is {x.dtype} but the model's parameters are {weights}: "
                        "convert one to the other)")
            elif x.dtype != weights and "type" in str(error):  # (token ids are integers too)
                hint = (f" (the input is {x.dtype} and the model's parameters {weights}: a "
                        "model of no embedding takes floating-point inputs, e.g. x.float(), "
                        "or images' pixels x.float() / 255)")
            raise ShapeError(f"the model's forward failed on a per-task input of shape "
                             f"{tuple(x.shape)}{hint}: {error}") from error

    def _prepare(self, x: Tensor, of_batch: bool = False) -> None:
        """At the start of a public call, outside any transform: refuse parameters resized since
        MAML was built, or converted without MAML's own tensors; where gradients are on, those
        frozen or unfrozen since (it chose what it adapts and trains then); and probe the model
        once (``_probe``) on ``x``, one task's inputs (``of_batch``: the first task of a batch,
        whose dimensions ``adapt`` then expects)."""
        if of_batch:
            self._task_input_dims = x.dim()
        named = dict(self.model.named_parameters())
        shapes = self._trainable_shapes
        resized = next((n for n, p in named.items() if n in shapes and p.shape != shapes[n]),
                       None)
        if resized:
            raise ConfigError(f"{resized} changed shape after MAML was built "
                              f"({tuple(shapes[resized])} -> {tuple(named[resized].shape)}): "
                              "build MAML again after changing the model's modules")
        own = next(itertools.chain(self.inner_lrs.parameters(), self.per_step.parameters()), None)
        model = named.get(self._rates_like)
        if own is not None and model is not None and (own.dtype, own.device) != (model.dtype,
                                                                                 model.device):
            raise ConfigError(f"the model's parameters are {model.dtype} on {model.device}, but "
                              f"MAML's own (learned inner rates, per-step sets) {own.dtype} on "
                              f"{own.device}: convert the MAML (maml.to(...), which converts its "
                              "model too), not the model alone")
        if torch.is_grad_enabled():
            gone = sorted(set(shapes) - set(named))
            if gone:  # e.g. a weight tied to another since (named once, by the other's name)
                raise ConfigError(f"the model's parameters changed after MAML was built "
                                  f"({listed(gone)} no longer named so): build MAML again "
                                  "after changing the model's modules")
            changed = next(((name, p.requires_grad) for name, p in named.items()
                            if p.requires_grad != (name in shapes)), None)
            if changed:
                raise ConfigError(
                    f"{changed[0]} was {'unfrozen' if changed[1] else 'frozen'} after MAML was "
                    "built, which chose the parameters it adapts and trains then: build MAML "
                    "again after freezing or unfreezing parameters")
        if not self._probed or self._unused_names is None and torch.is_grad_enabled():
            self._probe(x)  # again where the first probe ran under inference_mode, without graph

    def _loss(self, fast: Params, frozen: Params, x: Tensor, y: Tensor,
              fn: LossFn | None = None) -> Tensor:
        return self._score(self._forward(fast, frozen, x), y, fn or self.loss_fn)

    def _query(self, fast: Params, frozen: Params, x: Tensor, y: Tensor
               ) -> tuple[Tensor, Tensor | None]:
        """The loss on (x, y) and, where a metric_fn is set, its metric: both of the same
        predictions, so one forward pass (and, with dropout, one mask) serves them."""
        predictions = self._forward(fast, frozen, x)
        loss = self._score(predictions, y, self.loss_fn)
        return loss, self._metric(predictions, y) if self.metric_fn else None

    def _metric(self, predictions: Any, y: Tensor) -> Tensor:
        """``metric_fn`` of a detached copy of ``predictions``, so that a metric that changes
        them in place cannot reach the loss's graph."""
        copied = tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t,
                          predictions)
        return self._score(copied, y, self.metric_fn, metric=True).detach()

    def _score(self, predictions: Any, y: Tensor, fn: LossFn, metric: bool = False) -> Tensor:
        """``fn(predictions, y)``, refused with a clear error where it fails or is not a scalar
        (``metric``: a count or a bool is fine, as a float)."""
        broadcasting = broadcasting_loss(fn)
        if broadcasting and isinstance(predictions, Tensor) and predictions.shape != y.shape:
            shape = ", ".join(map(str, predictions.shape))
            example = (" (e.g. y[..., None])" if y.dim() < predictions.dim()
                       else f" (e.g. y.reshape({shape}))" if len(y) == len(predictions) else "")
            raise ShapeError(f"{broadcasting} would broadcast a task's predictions "
                             f"{tuple(predictions.shape)} and targets {tuple(y.shape)}: give "
                             f"targets shaped as the model's output{example}")
        if (not torch.compiler.is_compiling()  # (first: a compiled graph reads no flag)
                and not broadcasting and not metric and not self._said_column_targets
                and isinstance(predictions, Tensor) and y.dim() and y.is_floating_point()
                and predictions.shape[-1:] == (1,) and predictions.shape[:-1] == y.shape):
            self._said_column_targets = True  # (once: the shapes are those of every task)
            n = len(y)
            warn(f"loss_fn gets a task's predictions {tuple(predictions.shape)} and targets "
                 f"{tuple(y.shape)}: an element-wise loss of the two, such as "
                 f"((predictions - y) ** 2).mean(), broadcasts them to ({n}, {n}), every "
                 "prediction against every target; give targets shaped as the model's output "
                 "(y[..., None]), unless loss_fn reshapes them itself", FastMAMLWarning)
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
        if value.is_floating_point():
            return value
        if not metric:  # (a metric's count or bool is fine: no gradient needed)
            raise ConfigError(f"loss_fn returned a {value.dtype} value, which has no gradient "
                              "(a count, such as of wrong predictions?): return a floating-point "
                              "loss computed from the predictions, e.g. F.cross_entropy")
        return value.to(torch.get_default_dtype())

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
                # after the step just taken: with its set of per-step parameters
                loss, metric = self._query(params, self._at_step(frozen, step - 1), qx, qy)
                losses.append(loss)
                if metric is not None:
                    metrics.append(metric)

        _, support_loss = self._adapt(fast, frozen, sx, sy, steps, create_graph, grad_fn, on_step)
        out = (support_loss, torch.stack(losses))
        return (*out, torch.stack(metrics)) if self.metric_fn else out

    # ----- a meta-batch: every task at once under vmap, or one by one -----
    def _batched(self, fast: Params, frozen: Params, steps: int, create_graph: bool,
                 record: Sequence[int], chunk_size: int | None, *batch: Tensor) -> tuple[Tensor, ...]:
        """All tasks at once: ``vmap`` of the task function over the leading task dimension."""
        return _vmap_tasks(lambda *task: self._task(fast, frozen, steps, create_graph, record,
                                                    _functorch_grad, *task), chunk_size, *batch)

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
        step_weights = as_weights(step_weights)
        loss, metrics = self(batch, step_weights)
        self._check_finite(loss, batch, step_weights)
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
        ``backward`` compiled). Otherwise it is ``meta_loss`` and autograd. With
        ``checkpoint_steps`` it is the
        step-by-step reverse pass of ``_checkpointed_task``.
        """
        if not torch.is_grad_enabled():
            raise ConfigError("meta_backward computes gradients, but gradients are off here "
                              "(torch.no_grad or inference_mode): call it outside, or use "
                              "evaluate for losses alone")
        batch, step_weights = as_task_batch(batch), as_weights(step_weights)
        self._prepare(batch.support_x[0], of_batch=True)
        # Learned inner rates do not enter the objective without inner steps: autograd leaves
        # their .grad None, and so do the functional branches.
        trainable = {n: p for n, p in self.named_parameters()
                     if p.requires_grad and (self.inner_steps or not n.startswith("inner_lrs."))}
        if self.checkpoint_steps:
            others = [name for name in trainable
                      if not name.startswith(("model.", "inner_lrs.", "per_step."))]
            if others:  # (its reverse pass differentiates those alone)
                raise ConfigError(f"checkpoint_steps differentiates the model's parameters, "
                                  f"learned inner rates and per-step sets, not {listed(others)} "
                                  "(a loss module's): train them without checkpoint_steps")
            grads, (loss, metrics) = self._checkpointed_gradient(batch, step_weights)
        elif search := self._searches(batch):
            return self._search_path(batch, step_weights, trainable, search == "together")
        elif self._compiles_gradient(batch):
            try:
                grads, (loss, metrics) = self._compiled_meta_gradient(trainable, batch,
                                                                      step_weights)
            except torch._dynamo.exc.TorchDynamoException as error:
                return self._uncompiled_from_now(error, lambda: self._backward(batch, step_weights))
        else:  # uncompiled, or the first call, which decides the path
            return self._backward_compiling_lazily(batch, step_weights, trainable)
        self._check_finite(loss, batch, step_weights)
        without = self._without_gradient(step_weights)
        for name, p in trainable.items():
            if name in without and not grads[name].any():
                continue  # torch.func's zeros where autograd leaves None
            p.grad = grads[name] if p.grad is None else p.grad + grads[name]
        return loss, metrics

    def forward(self, batch: TaskBatch, step_weights: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """The meta-objective of ``meta_loss`` without its input validation and finite check."""
        if not self._probed:  # (meta_loss and meta_backward have probed: no graph break)
            self._probe(batch.support_x[0])
        record = self._record(step_weights)
        # all tasks by the path chosen for the batch (batched, looped or compiled; fastmaml.paths)
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
        self._warn_of_reuse(steps)
        self._warn_of_dropout("evaluate", "loss")
        self._prepare(batch.support_x[0], of_batch=True)
        _, loss, *metric = self._run(batch, steps, False, list(range(steps + 1)))
        if self.check_finite and not torch.isfinite(loss).all():  # the data's: said, as by
            bad = non_finite_input(batch, None)  # meta_backward (a diverging curve: returned)
            if bad:
                raise self._non_finite("the evaluated losses are not finite", bad, "")
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
        check_tensors(support_x=support_x, support_y=support_y)
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
        self._warn_of_reuse(steps)
        if self._task_input_dims is not None and support_x.dim() == self._task_input_dims + 1:
            raise ShapeError(f"adapt takes one task's support set, and a task's inputs in the "
                             f"batches so far had {self._task_input_dims} dimensions; got "
                             f"support_x {tuple(support_x.shape)}, a batch of tasks? Adapt "
                             "each task alone (or evaluate the batch)")
        self._prepare(support_x)
        support_y = widened(support_y)
        fast, frozen = self._split_params(detach=not torch.is_grad_enabled())
        create_graph = torch.is_grad_enabled() and not self.first_order
        adapted, _ = self._adapt(fast, frozen, support_x, support_y, steps, create_graph,
                                 _autograd_grad, loss_fn=loss_fn)
        if self.check_finite and not _all_finite(adapted):
            support = {"support_x": support_x, "support_y": support_y}
            raise self._non_finite(
                f"after {steps} inner step(s) on this support set the adapted parameters are "
                "not finite", next((name for name, t in support.items() if t.is_floating_point()
                                    and not torch.isfinite(t).all()), ""),
                "the adaptation diverged: give fewer steps or a lower inner_lr")
        # after 0 steps: copies, so that changing them in place leaves the model as it is
        adapted = adapted if steps else {name: p.clone() for name, p in adapted.items()}
        return {**adapted, **{name: p.clone() for name, p in self.per_step(steps - 1).items()}}

    def _warn_of_reuse(self, steps: int) -> None:
        """Say that inner steps past the trained ones reuse the last step's learned values."""
        built, learned = self._built_steps, self._learned_per_step()
        if steps > built and learned:
            later = (f"steps {built + 1} to {steps} reuse" if steps > built + 1
                     else f"step {steps} reuses")
            warn(f"inner {later} step {built}'s learned {' and '.join(learned)}: they were "
                 f"learned for inner_steps={built}", FastMAMLWarning)

    def _warn_of_dropout(self, call: str, outcome: str) -> None:
        """Say that ``call``, which users read as deterministic, draws dropout masks."""
        if has_active_dropout(self.model):
            warn(f"{call} runs the model as its mode says, and its dropout is active (training "
                 f"mode): every {outcome} is a random draw; call .eval() on the MAML or its "
                 f"model first for a deterministic {call}", FastMAMLWarning)

    def predict(self, adapted: Params, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The model's output on ``x`` with ``adapted`` parameters (from ``adapt``).

        With ``context`` (e.g. the task's support inputs), each row of ``x`` is predicted in one
        batch with the context alone (vectorised; row by row with ``batched=False`` or where
        vmap cannot run the model), so that batch statistics (transductive batch norm), and
        with them the prediction, do not depend on the other rows of ``x``; a single row is not
        normalised by itself alone.
        """
        if not isinstance(adapted, Mapping):
            raise ConfigError(f"adapted must be the parameters MAML.adapt returns (a dict), got "
                              f"{type(adapted).__name__}"
                              + (": a run's adaptation goes to run.predict" if
                                 hasattr(adapted, "params") else ""))
        check_tensors(x=x, **({} if context is None else {"context": context}))
        self._warn_of_dropout("predict", "prediction")
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
            outputs = self._forward(params, frozen, context)
            return tree_map_with_path(lambda at, out: _rows(at, out, len(context))[:0], outputs)

        def alone_with_context(row: Tensor) -> Any:  # the row's output, of any structure
            outputs = self._forward(params, frozen, torch.cat([row[None], context]))
            return tree_map_with_path(lambda at, out: _rows(at, out, len(context) + 1)[0],
                                      outputs)

        def looped() -> Any:  # a model that vmap cannot run: row by row
            return tree_map(lambda *rows: torch.stack(rows), *map(alone_with_context, x))
        return self._dispatch(lambda: vmap(alone_with_context, randomness="different",
                                           chunk_size=max(1, PREDICT_BATCH // (len(context) + 1))
                                           )(x), looped, lambda: alone_with_context(x[0]),
                              prediction=True)

    # ----- the parts of meta_backward: the plain backward, the checkpointed reverse pass -----
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
        self._check_finite(loss, batch, step_weights)
        loss.backward()
        return loss.detach(), metrics

    def _checkpointed_gradient(self, batch: TaskBatch, step_weights: Tensor | None
                               ) -> tuple[Params, tuple[Tensor, dict[str, Tensor]]]:
        """The meta-gradient by reverse mode over the inner steps, one step's graph at a time."""
        if has_active_dropout(self.model):  # (said before the work; any other draw after it)
            raise ConfigError(RECOMPUTED_DRAWS)
        randomness_before = random_state(batch.support_x.device)
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
                          for column in zip(*(task(*data) for data in zip(*batch)))),
            lambda: task(*(t[0] for t in batch)))
        if not all(map(torch.equal, randomness_before, random_state(batch.support_x.device))):
            raise ConfigError(RECOMPUTED_DRAWS)
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
        if self.metric_fn:  # by a forward of its own, outside torch.func.grad, where a metric
            # that leaves torch (numpy) can run; one more besides the steps' recomputed ones
            predictions = self._forward(trajectory[-1], frozen_at(self.inner_steps - 1, outer,
                                                                  step_params), qx)
            values["query_metric"] = self._metric(predictions, qy)
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

    def _check_finite(self, loss: Tensor, batch: TaskBatch, step_weights: Tensor | None) -> None:
        if self.check_finite and not torch.isfinite(loss):  # (no inner step: no inner_lr)
            advice = (f"{META_STEP_ADVICE}; {LOSS_ADVICE}" if self.inner_steps else
                      f"lower the meta learning rate, or clip the meta-gradient; {LOSS_ADVICE}")
            raise self._non_finite(f"the meta-loss is {loss.item()}",
                                   non_finite_input(batch, step_weights), advice)

    def _non_finite(self, outcome: str, bad_input: str, advice: str) -> NonFiniteLossError:
        """The error of a non-finite ``outcome``: the input that holds a NaN or infinite value
        (``bad_input``, "" if none), else this learner's own such tensor (a diverged meta-step's
        advice), else ``advice``."""
        if bad_input:
            return NonFiniteInputError(f"{outcome}: {bad_input} holds a NaN or infinite value")
        held = next((name for name, t in (*self.named_parameters(), *self.named_buffers())
                     if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if held:
            return NonFiniteLossError(f"{outcome}: {held} holds a NaN or infinite value (set so, "
                                      f"or after a diverged meta-step): {META_STEP_ADVICE}")
        return NonFiniteLossError(f"{outcome}: {advice}")


def _all_finite(params: Params) -> bool:
    """Whether every value of ``params`` is finite, in one host sync (devices mixed or not)."""
    flags = [p.isfinite().all() for p in params.values()]
    return bool(torch.stack([flag.to(flags[0].device) for flag in flags]).all())


def _vmap_tasks(task: Callable[..., Any], chunk_size: int | None, *batch: Tensor) -> Any:
    """``vmap`` of ``task`` over the leading task dimension, ``chunk_size`` tasks at a time."""
    if chunk_size is not None and chunk_size >= batch[0].shape[0]:
        chunk_size = None  # one chunk: skip vmap's split and concatenation
    return vmap(task, randomness="different", chunk_size=chunk_size)(*batch)


def _under(prefix: str, params: Params) -> Params:
    """The entries of ``params`` named under ``prefix``, without it."""
    return {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}
