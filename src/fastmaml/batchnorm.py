"""Transductive batch norm: batch statistics always, exact under vmap to second order.

The paper's official code normalises with the statistics of the current batch at train *and*
test time and never keeps running statistics. We get that behaviour from any unmodified
``nn.BatchNorm*`` (or a direct ``F.batch_norm`` call) by intercepting ``F.batch_norm`` with a
``TorchFunctionMode``. Under ``vmap`` the fused batch-norm kernel gives second-order
meta-gradients off by ~3e-3 on torch 2.13 (``tests/test_core.py`` checks it); the replacement
runs ``layer_norm`` over a channels-first view, which is exact under ``vmap`` to second order and
1.1-1.3x faster than the same normalisation written with elementwise ops (memory-bound here).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


def batch_stats_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Normalise ``x`` (N, C, ...) per channel with its own batch mean and biased variance."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    # Channels first, then layer norm over (batch, spatial): per-channel batch statistics from a
    # fused kernel whose derivatives (to second order) are exact under vmap.
    channels_first = x.transpose(0, 1)
    out = F.layer_norm(channels_first, channels_first.shape[1:], eps=eps).transpose(0, 1)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


class TransductiveBatchNorm(TorchFunctionMode):
    """Inside this mode every ``F.batch_norm`` uses batch statistics and updates no buffers."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = _bind_batch_norm(*args, **kwargs)
            return batch_stats_norm(bound["input"], bound["weight"], bound["bias"], bound["eps"])
        return func(*args, **kwargs)


def _bind_batch_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                     training=False, momentum=0.1, eps=1e-5) -> dict:
    return {"input": input, "weight": weight, "bias": bias, "eps": eps}


def has_batch_norm(model: nn.Module) -> bool:
    """True when ``model`` contains a batch-norm layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
