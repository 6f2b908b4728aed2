"""The forms in which ``MAML`` runs a model's functions, found from its modules when ``MAML`` is
built and by one eager forward on its first call (``ModelProbe._probe``).

Some of torch's kernels are wrong or missing under ``vmap`` and higher derivatives: batch norm
with batch statistics, and layer and instance norm with a weight adapted per task,
differentiate wrongly under ``vmap`` (``fastmaml.norms``); so does an embedding's padding row,
and an embedding bag has no second derivative at all (``fastmaml.embeddings``), nor have a few
other kernels (``fastmaml.twice``); recurrent layers' fused kernels have no batching rule
(``fastmaml.recurrent``), nor do the fused attention kernels. ``ModelProbe`` chooses the exact
form of each function the model calls (``MAML._forward`` enters them), sends a model whose
embedding scales its gradient by frequency (no exact form) to the looped path, and finds which
trainable parameters the model's output does not depend on.

``ModelProbe`` is a part of ``MAML`` (``fastmaml.core``).
"""
from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .attention import math_attention
from .embeddings import ExactEmbeddings, composes_bag, pads, scales_gradient_by_frequency
from .errors import ConfigError, FastMAMLWarning, warn
from .inputs import Params
from .norms import ExactNorms, has_batch_norm
from .paths import random_state, set_random_state
from .recurrent import StepwiseRNNs, has_recurrent
from .twice import TwiceDifferentiable, plain_form


Function = TypeVar("Function", bound=Callable[..., Any])


def eager_under_compile(function: Function) -> Function:
    """``torch.compiler.disable(function)``, applied at its first call under a loaded dynamo:
    the decorator imports ``torch._dynamo`` (over a second of every ``import fastmaml``), and
    nothing is compiled before that import."""
    disabled = None

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if "torch._dynamo" not in sys.modules:
            return function(*args, **kwargs)
        disabled = disabled or torch.compiler.disable(function)
        return disabled(*args, **kwargs)
    return run  # type: ignore[return-value]


class ModelProbe:
    """The model's forms and its unused parameters, for ``MAML``. ``MAML._forward`` runs under
    ``_norm_mode``, ``_embedding_mode``, ``_twice_mode``, ``_rnn_mode`` and ``_attention_mode``;
    ``MAML._prepare`` and ``MAML.forward`` call ``_probe``; ``MAML._without_gradient`` reads
    ``_unused_names``. It reads ``MAML``'s ``_split_params``, ``_forward``,
    ``_trainable_shapes``, ``inner_lrs``, ``per_step`` and ``batched``, and reads and may set
    ``_vmap_failed`` (``fastmaml.paths``)."""

    def _init_probe(self, model: nn.Module, transductive_bn: bool | None) -> None:
        """The forms known from the model's modules, at ``MAML``'s construction (see its
        ``transductive_bn``); the rest are set by ``_probe``."""
        self._transductive = has_batch_norm(model) if transductive_bn is None else transductive_bn
        # the exact forms of the norm and embedding functions the model calls, and the twice
        # differentiable forms of the kernels torch differentiates once: set by ``_probe``
        self._norm_mode = self._embedding_mode = self._twice_mode = contextlib.nullcontext
        self._probed = False
        # trainable parameters the model's output does not depend on (set by ``_probe``)
        self._unused_names: set[str] | None = None
        # whether the model changes its input in place (``x /= 255``): set by ``_probe``
        self._changes_input = False
        self._rnn_mode = StepwiseRNNs if has_recurrent(model) else contextlib.nullcontext
        self._attention_mode = math_attention if has_attention(model) else contextlib.nullcontext

    @eager_under_compile  # one graph break where a user compiles the learner
    def _probe(self, x: Tensor) -> None:
        """Once, before the first forward of any path: an eager forward on ``x`` (one task's
        inputs) shows which functions the model calls, from its modules or its own code; the
        norms and the embeddings whose kernels ``vmap`` differentiates wrongly, and the embedding
        bags and other kernels that torch differentiates only once, run in their exact forms
        (``ExactNorms``, ``ExactEmbeddings``, ``TwiceDifferentiable``) from then on, on every
        path, and an embedding's ``scale_grad_by_freq``, which has none, on the looped path. Its
        graph shows the parameters the output does not depend on (``_unused_parameters``). A
        model that changes its input in place gets a copy at every forward from then on (else
        each inner step, and the caller's batch, would see the input changed again). The
        random state is left as it was, so that a resumed run draws what an uninterrupted one
        does."""
        # as in training (torch's fused fast paths run only without gradients), and under
        # ExactNorms, whose errors are clearer, and which tells ``calls`` of the norms called
        calls, state = KernelsCalled(), random_state(x.device)
        self._norm_mode = functools.partial(ExactNorms, self._transductive, calls.saw_norm)
        # stand-ins for the parameters (the same storage), whose gradients no hook of the
        # model's own parameters sees
        fast, frozen = self._split_params(detach=True)
        if not torch.is_inference_mode_enabled():
            fast, frozen = ({n: t.requires_grad_(n in self._trainable_shapes) for n, t in
                             params.items()} for params in (fast, frozen))
        with torch.inference_mode(False):  # a tensor that counts its in-place changes
            x = x.clone()  # (not the caller's, where the model changes its input in place)
        try:
            with torch.enable_grad(), calls:
                output = self._forward(fast, frozen, x)
        finally:
            set_random_state(state, x.device)
        self._changes_input = self._changes_input or x._version > 0
        self._unused_names = self._unused_parameters(output, {**frozen, **fast})
        self._norm_mode = (functools.partial(ExactNorms, self._transductive) if calls.norms
                           else contextlib.nullcontext)
        if calls.exact_embeddings:
            self._embedding_mode = ExactEmbeddings
        if calls.once_differentiable:
            self._twice_mode = TwiceDifferentiable
        if calls.frequency_scaling:
            if self.batched:
                raise ConfigError("scale_grad_by_freq: vmap scales an embedding's gradient by "
                                  "the wrong counts (torch's kernel): use batched=None or False")
            if self.batched is None and not self._vmap_failed:
                self._vmap_failed = True
                warn("scale_grad_by_freq: vmap scales an embedding's gradient by the "
                     "wrong counts (torch's kernel); using the looped path",
                     FastMAMLWarning)
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
        names = sorted(self._trainable_shapes)
        grads = torch.autograd.grad(outputs, [params[n] for n in names],
                                    [torch.ones_like(t) for t in outputs], allow_unused=True)
        unused = {name for name, grad in zip(names, grads) if grad is None}
        return ({f"model.{n}" for n in unused}
                | {f"inner_lrs.{n}" for n in self.inner_lrs.own_rates(unused)}
                | {f"per_step.{n}" for n in self.per_step.own_copies(unused)})


class KernelsCalled(TorchFunctionMode):
    """Records whether a forward calls a norm function (``ExactNorms``, which runs inside it,
    says so: ``saw_norm``), an embedding with a padding row or an embedding bag
    (``ExactEmbeddings``), an embedding that scales its gradient by frequency, or a kernel
    torch differentiates only once (``TwiceDifferentiable``)."""

    def __init__(self) -> None:
        super().__init__()
        self.norms = self.exact_embeddings = self.frequency_scaling = False
        self.once_differentiable = False

    def saw_norm(self) -> None:
        self.norms = True

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        self.once_differentiable |= plain_form(func, *args, **kwargs) is not None
        if func is F.embedding:
            self.exact_embeddings |= pads(*args, **kwargs)
            self.frequency_scaling |= scales_gradient_by_frequency(*args, **kwargs)
        self.exact_embeddings |= func is F.embedding_bag and composes_bag(*args, **kwargs)
        return func(*args, **kwargs)


def has_attention(model: nn.Module) -> bool:
    """True when ``model`` has an ``nn.MultiheadAttention`` (so any ``nn.Transformer*``) or a
    module whose ``forward`` calls ``scaled_dot_product_attention`` itself."""
    def names_in_forward(module: nn.Module) -> tuple[str, ...]:
        return getattr(getattr(type(module).forward, "__code__", None), "co_names", ())
    return any(isinstance(m, nn.MultiheadAttention)
               or "scaled_dot_product_attention" in names_in_forward(m) for m in model.modules())
