"""Attention in plain ops inside the engine: ``F.scaled_dot_product_attention`` in its math
kernel, and ``nn.MultiheadAttention`` without torch's native fast path (which an eval-mode module,
as in a model put in ``eval()`` for no dropout, takes). The fused kernels have no vmap batching
rule (a slow per-task fallback) and their backward no derivative (second order failed, batched or
looped; the fast path's none at all, first order batched too).

The fast path's switch is one flag for the process: it is off while any learner's forward (or
compiled call) runs, on whichever thread, and back as it was once the last one ends. Compiled
code cannot set it (dynamo skips the function), so a compiled call of an attention model's
learner runs inside ``math_attention`` too (``paths._CompiledMethod``)."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

MATH = [SDPBackend.MATH]  # (read here: compiled code cannot read the enum's attributes)
_switch = threading.Lock()
_users = 0  # the forwards running with the fast path off
_fast_path_before = True  # its setting when the first of them began


@contextlib.contextmanager
def mha_fast_path_off() -> Iterator[None]:
    """``nn.MultiheadAttention``'s native fast path off while this runs (nested or in threads:
    restored when the last such block ends)."""
    global _users, _fast_path_before
    with _switch:
        if not _users:
            _fast_path_before = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        _users += 1
    try:
        yield
    finally:
        with _switch:
            _users -= 1
            if not _users:
                torch.backends.mha.set_fastpath_enabled(_fast_path_before)


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Attention in plain ops (see the module docstring) for a forward of the model."""
    with sdpa_kernel(MATH):
        if torch.compiler.is_compiling():  # (set around the compiled call)
            yield
        else:
            with mha_fast_path_off():
                yield
