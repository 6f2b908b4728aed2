"""MAML's inputs, checked: the task batch, the learner's options and what a model has that they
must allow for (active dropout), each refused with an error that names it (a wrong shape, a
swapped model and loss, a flag given as a string) before torch would fail deep inside a
transform."""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from .errors import ConfigError, ShapeError

Params = dict[str, Tensor]
# element-wise losses that broadcast predictions and targets of different shapes with only a
# warning (e.g. (K, 1) against (K,) gives a K x K loss): a wrong loss, refused here instead
_BROADCASTING_LOSSES = (torch.nn.functional.mse_loss, torch.nn.functional.l1_loss,
                        torch.nn.functional.smooth_l1_loss, torch.nn.functional.huber_loss)
_BROADCASTING_LOSS_MODULES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)


class TaskBatch(NamedTuple):
    """Support and query tensors of a meta-batch, each with a leading task dimension."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str | torch.dtype | None = None,
           dtype: torch.dtype | None = None) -> TaskBatch:
        """The tensors on ``device`` and the floating ones of ``dtype`` (integer labels stay
        so), as ``Tensor.to`` takes them (``batch.to(torch.float64)`` too); asynchronous only
        towards a GPU (a copy to the host must be complete before the host reads it)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        to_gpu = device is not None and torch.device(device).type == "cuda"
        return TaskBatch(*(t.to(device, dtype if t.is_floating_point() else None,
                                non_blocking=to_gpu) for t in self))

    def split(self, size: int) -> list[TaskBatch]:
        """Consecutive chunks of at most ``size`` tasks (bounded memory, one graph each)."""
        if size < 1:
            raise ConfigError(f"chunks of {size} tasks: give a size of at least 1")
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
    return batch._replace(support_y=widened(batch.support_y), query_y=widened(batch.query_y))


def widened(targets: Tensor) -> Tensor:
    """Integer targets of another width (numpy's int32, uint8) as int64, the class indices that
    torch's losses take: vmap's batching rules accept the other widths, so without this the
    batched and looped paths (and ``adapt``) would disagree on the same data."""
    integer = not targets.is_floating_point() and not targets.is_complex()
    return (targets.long() if integer and targets.dtype not in (torch.int64, torch.bool)
            else targets)


def broadcasting_loss(fn: Any) -> str | None:
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


def _required_inputs(model: nn.Module) -> list[inspect.Parameter]:
    """The arguments ``model``'s forward needs (none known: []; a forward pre-hook or the
    model's own ``__call__`` may give those beyond the input)."""
    if (model._forward_pre_hooks or nn.modules.module._global_forward_pre_hooks
            or type(model).__call__ is not nn.Module.__call__):
        return []
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # (a builtin's, or a C extension's)
        return []
    return [p for p in parameters
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def check_inner_lr(inner_lr: Any) -> None:
    """A finite number >= 0 (a learned rate's start, or the fixed rate)."""
    if isinstance(inner_lr, Tensor):
        raise ConfigError("inner_lr is the inner learning rate's (initial) value, a number, not "
                          "a tensor: to learn it, give lr_mode='scalar' (one rate), 'per_param' "
                          "(Meta-SGD) or 'per_layer_step' (MAML++), and MAML holds it as a "
                          "parameter")
    if (not isinstance(inner_lr, numbers.Real) or isinstance(inner_lr, bool)
            or not 0 <= inner_lr < math.inf):  # NaN fails too
        raise ConfigError(f"inner_lr must be a number >= 0 and finite, got {inner_lr!r}")


def check_options(model: Any, loss_fn: Any, metric_fn: Any, inner_lr: Any, inner_steps: Any,
                   chunk_size: Any, adapt: Any, per_step: Any, **flags: Any) -> None:
    """``MAML``'s arguments, each of its kind, or a ``ConfigError`` naming the first that is not
    (a swapped model and loss, a YAML string for a flag, a tensor for a learned rate)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got a {type(model).__name__}"
                          + (" (are model and loss_fn swapped?)" if callable(model) else ""))
    lazy = [name for name, tensor in (*model.named_parameters(), *model.named_buffers())
            if is_lazy(tensor)]
    if lazy:
        raise ConfigError(f"the model's {listed(lazy)} {'is' if len(lazy) == 1 else 'are'} not "
                          "initialized yet (a lazy module, e.g. nn.LazyLinear): run the model "
                          "once on an example input, e.g. model(support_x[0]), before MAML, so "
                          "that their shapes are known")
    required = _required_inputs(model)
    if len(required) > 1 or required and required[0].kind is inspect.Parameter.KEYWORD_ONLY:
        inputs = f"{len(required)} input{'s' * (len(required) > 1)}"
        names = ", ".join(p.name + (" (keyword-only)" if p.kind is p.KEYWORD_ONLY else "")
                          for p in required)
        raise ConfigError(f"the model's forward takes {inputs} ({names}), but "
                          "MAML calls it with one tensor, a task's inputs, as its first "
                          "argument: concatenate them into one, or wrap the model in a module "
                          "whose forward takes one and splits it")
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
    check_inner_lr(inner_lr)
    if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral)
                                   or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ConfigError(f"chunk_size must be an integer >= 1 (or None: automatic), got "
                          f"{chunk_size!r}")


def check_tensors(**named: Any) -> None:
    """A ``ShapeError`` naming the first of ``named`` that is not a tensor."""
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise ShapeError(f"{name} must be a tensor, got {type(value).__name__}"
                             + (" (torch.as_tensor converts arrays and lists)"
                                if isinstance(value, (np.ndarray, list, tuple)) else ""))


def as_weights(step_weights: Tensor | Sequence[float] | None) -> Tensor | None:
    """Step weights as a 1-d tensor (a list or tuple of floats is taken too)."""
    if step_weights is None:
        return None
    if not isinstance(step_weights, Tensor):
        step_weights = torch.as_tensor(step_weights, dtype=torch.get_default_dtype())
    if step_weights.dim() != 1:
        raise ShapeError(f"step_weights must be 1-d, one weight per inner step (see "
                         f"multi_step_loss_weights), got shape {tuple(step_weights.shape)}")
    return step_weights


def non_finite_input(batch: TaskBatch, step_weights: Tensor | None) -> str:
    """Which input holds a NaN or infinite value (``"support_x of task 2"``), "" if none: the
    cause of a non-finite meta-loss that no learning rate mends."""
    for name, values in (*zip(TaskBatch._fields, batch), ("step_weights", step_weights)):
        if values is None or not values.is_floating_point():
            continue
        bad = ~torch.isfinite(values)
        if bad.any():
            if name == "step_weights":
                return name
            return f"{name} of task {int(bad.flatten(1).any(1).nonzero()[0])}"
    return ""


def listed(names: Sequence[str], most: int = 3) -> str:
    """``names`` joined by commas, the first ``most`` of them and how many more."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def matching(option: str, selection: Sequence[str] | Callable[[str, Tensor], bool] | None,
             params: Params, frozen: Params, names_of: dict[str, list[str]]) -> list[str]:
    """The names of ``params`` that ``selection`` (MAML's argument ``option``) selects; a
    parameter held under several names (``names_of``: a module registered twice, weights
    tied) is selected by a name prefix of any of them, and a predicate must agree on them all.
    A ``ConfigError`` where it selects none, or one of its name prefixes matches none (saying
    which of the model's ``frozen`` parameters, requires_grad=False, it matches instead)."""
    def selected(chosen: Sequence[str] | Callable[[str, Tensor], bool] | None, name: str,
                 param: Tensor) -> bool:
        names = names_of.get(name, [name])
        taken = [each for each in names if _selected_as(option, chosen, each, name, param)]
        if callable(chosen) and 0 < len(taken) < len(names):
            raise ConfigError(
                f"the {option} predicate takes {name} as {taken[0]} but not as "
                f"{next(each for each in names if each not in taken)}: one tensor under several "
                "names (weights tied, or a module registered twice) is selected under all of them "
                "or none; make the predicate agree on its names")
        return bool(taken)
    names = [n for n, p in params.items() if selected(selection, n, p)]
    prefixes = ([selection] if isinstance(selection, str) else [] if callable(selection)
                else selection or [])
    unmatched = [prefix for prefix in prefixes
                 if not any(selected([prefix], n, p) for n, p in params.items())]
    if not names or unmatched:
        what = (f"{option} prefix(es) {', '.join(map(repr, unmatched))} match"
                if unmatched else f"the {option} selection matches")
        only_frozen = [n for n, p in frozen.items() if selected(unmatched or selection, n, p)]
        why = (f" ({listed(only_frozen)}: frozen, requires_grad=False)" if only_frozen else "")
        raise ConfigError(f"{what} no trainable parameter of the model{why}; its trainable "
                          f"parameters: {', '.join(params) or 'none'}")
    return names


def _selected_as(option: str, chosen: Sequence[str] | Callable[[str, Tensor], bool] | None,
                 alias: str, name: str, param: Tensor) -> bool:
    """``_selected`` under ``alias``, one of the names of the parameter ``name``: where a
    predicate fails on another name than ``named_parameters()`` gives (one that looks names up
    in ``dict(model.named_parameters())``), a ``ConfigError`` says why it was asked."""
    try:
        return _selected(chosen, alias, param)
    except Exception as error:
        if alias == name:
            raise
        raise ConfigError(
            f"the {option} predicate failed on {alias!r} ({type(error).__name__}: {error}): that "
            f"is another name of the tensor named_parameters() calls {name!r} (weights tied, or "
            "a module registered twice), and a predicate is asked under every name of such a "
            "tensor, as prefixes match any; make it take them all (model.named_parameters("
            "remove_duplicate=False) lists them)") from error


def _selected(adapt: Sequence[str] | Callable[[str, Tensor], bool] | None, name: str,
              param: Tensor) -> bool:
    if adapt is None:
        return True
    if callable(adapt):
        return bool(adapt(name, param))
    if isinstance(adapt, str):
        adapt = [adapt]
    return any(name == prefix or name.startswith(prefix + ".") for prefix in adapt)


def has_active_dropout(model: nn.Module) -> bool:
    """Dropout layers, recurrent layers' dropout between their layers and attention's dropout
    (``nn.MultiheadAttention``'s, a number), in training mode. Dropout a forward calls itself
    (``F.dropout``) shows only as random draws (``random_state``)."""
    return any(m.training and (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
                               or isinstance(m, nn.RNNBase) and m.dropout > 0 and m.num_layers > 1
                               or isinstance(m, nn.MultiheadAttention) and m.dropout > 0)
               for m in model.modules())


def random_state(device: torch.device) -> list[Tensor]:
    """The states of the random generators that a forward on ``device`` draws from: any draw
    (dropout, a module's or a forward's own, or noise) changes them."""
    return [torch.get_rng_state(), *([torch.cuda.get_rng_state(device)]
                                     if device.type == "cuda" else [])]
