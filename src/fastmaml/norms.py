"""Normalisation layers made exact to second order, under vmap and in a loop, in any unmodified
model.

The paper's official code normalises with the statistics of the current batch at train *and*
test time and never keeps running statistics (transductive batch norm). Torch 2.13's fused
kernels give wrong second-order meta-gradients under ``vmap`` in one case (``tests/test_core.py``
checks each kernel against the looped reference), and everywhere in another:

- ``F.batch_norm``, ``F.layer_norm`` and ``F.instance_norm`` with a weight that differs per task
  (adapted in the inner loop): the gradient of the parameters before them is off, by 7e-3
  relative (batch norm, ``tests/test_core.py``'s conv net), up to 4e-2 (layer norm) and 1e-1
  (instance norm) in float64. The same kernels without their affine weight and bias, which are
  then applied outside the kernel, are exact. (Batch norm of images and sequences ran as
  ``layer_norm`` over a channels-first view until session 55: exact too, and slower;
  docs/results.md.)
- ``torch._weight_norm`` (``nn.utils.parametrizations.weight_norm`` and the older
  ``nn.utils.weight_norm``): its double backward is wrong in the direction of ``v``, batched or
  looped (a meta-gradient off by 2e-2 to 4e-2; torch's ``gradgradcheck`` fails on it).
  ``g * v / ||v||`` in elementwise ops is exact (``tests/test_core.py``, finite differences).

``ExactNorms`` makes the replacements inside the model's forward with a ``TorchFunctionMode``;
``MAML`` enters it for a model whose forward calls one of ``NORM_FUNCTIONS`` (its modules'
layers, or its own code).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations
from torch.nn.utils.spectral_norm import SpectralNorm as SpectralNormHook
from torch.overrides import TorchFunctionMode

from .errors import ShapeError


def batch_stats_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Normalise ``x`` (N, C, ...) per channel with its own batch mean and biased variance."""
    if x.shape[0] * math.prod(x.shape[2:]) == 1:  # as torch's kernel refuses in training mode
        raise ShapeError(f"batch norm over a batch of one value per channel (input "
                         f"{tuple(x.shape)}) would turn every input into the same output: give "
                         "more than one example (predict: context=, e.g. the task's support "
                         "inputs; fastmaml adapt: --norm each)")
    # The kernel without its weight and bias, which are applied after it: under vmap its
    # second derivative is wrong with a weight that differs per task, and exact without one.
    if x.dim() <= 2:  # (N, C): torch's CPU kernel loses float32 digits where |mean| >> sd
        # (2.8e-5 at mean 10, sd 1 against 1.5e-6), layer norm over the transpose does not
        out = F.layer_norm(x.transpose(0, 1), x.shape[:1], eps=eps).transpose(0, 1)
    elif _untransformed():  # the looped path: torch's kernel is exact whole
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    else:
        out = F.batch_norm(x, None, None, training=True, eps=eps)
    return _affine(out, weight, bias, [1, -1] + [1] * (x.dim() - 2))


def _untransformed() -> bool:
    """Outside ``torch.func``'s transforms and ``torch.compile`` (plain autograd), where the
    weight applied after the kernel would only cost a pass over the activations (11% of the
    looped path's time on first-order 5-way 1-shot tasks with 75 queries)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is None


def _affine(out: Tensor, weight: Tensor | None, bias: Tensor | None, shape: list[int]) -> Tensor:
    """``out * weight + bias``, each reshaped to ``shape`` (and left out where None)."""
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def plain_weight_norm(v: Tensor, g: Tensor, dim: int) -> Tensor:
    """``torch._weight_norm``'s weight, ``g * v / ||v||``, the norm over every dimension of ``v``
    but ``dim`` (over all of them for ``dim=-1``, as torch; another negative ``dim`` counts from
    the end), in ops differentiable to any order."""
    kept = None if dim == -1 else dim % v.dim()
    over = [d for d in range(v.dim()) if d != kept]
    return v * (g / (v * v).sum(over, keepdim=True).sqrt())


NORM_FUNCTIONS = (F.batch_norm, F.layer_norm, F.instance_norm, torch._weight_norm)


class ExactNorms(TorchFunctionMode):
    """Inside this mode ``F.layer_norm`` and ``F.instance_norm`` apply their weight and bias
    outside the fused kernel, ``torch._weight_norm`` runs as ``plain_weight_norm``, and an
    ``F.batch_norm`` with batch statistics (with ``transductive``, every one; otherwise one in
    training mode) runs as ``batch_stats_norm``; batch and instance norm update no buffers.
    ``on_norm`` is called for each of the ``NORM_FUNCTIONS`` the forward calls (as it wrote
    them: a replacement may call none)."""

    def __init__(self, transductive: bool, on_norm: Callable[[], None] | None = None):
        super().__init__()
        self.transductive, self.on_norm = transductive, on_norm

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.on_norm and func in NORM_FUNCTIONS:
            self.on_norm()
        if func is torch._weight_norm:
            return plain_weight_norm(*args, **kwargs)
        if func is F.batch_norm:
            x, _, _, weight, bias, training, eps = _bind_batch_norm(*args, **kwargs)
            if self.transductive or training:
                return batch_stats_norm(x, weight, bias, eps)
        if func is F.layer_norm:
            x, shape, weight, bias, eps = _bind_layer_norm(*args, **kwargs)
            if weight is not None or bias is not None:
                return _affine(F.layer_norm(x, shape, eps=eps), weight, bias, list(shape))
        if func is F.instance_norm:
            x, mean, var, weight, bias, use_input_stats, momentum, eps = _bind_instance_norm(
                *args, **kwargs)
            if use_input_stats:  # running statistics kept (track_running_stats) are not
                mean = var = None  # updated, as batch norm's: vmap cannot write them per task
            out = F.instance_norm(x, mean, var, None, None, use_input_stats, momentum, eps)
            return _affine(out, weight, bias, [1, -1] + [1] * (x.dim() - 2))
        return func(*args, **kwargs)


def _bind_batch_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                     training=False, momentum=0.1, eps=1e-5) -> tuple:
    return input, running_mean, running_var, weight, bias, training, eps


def _bind_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5) -> tuple:
    return input, tuple(normalized_shape), weight, bias, eps


def _bind_instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                        use_input_stats=True, momentum=0.1, eps=1e-5) -> tuple:
    return input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps


def spectral_normed(model: nn.Module) -> list[str]:
    """The weights of ``model`` under ``spectral_norm`` (either API): its power iteration keeps
    its vectors in buffers, which MAML's forwards leave as they are."""
    normed = []
    for name, module in model.named_modules():
        if isinstance(module, parametrizations._SpectralNorm):  # <owner>.parametrizations.<w>.<i>
            owner, _, weight = f".{name}".rpartition(".")[0].partition(".parametrizations.")
            normed.append(f"{owner[1:]}.{weight}" if owner else weight)
        normed += [f"{name}.{hook.name}" if name else hook.name
                   for hook in module._forward_pre_hooks.values()
                   if isinstance(hook, SpectralNormHook)]
    return normed


def has_batch_norm(model: nn.Module) -> bool:
    """True when ``model`` contains a batch-norm layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
