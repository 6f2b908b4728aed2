"""Errors that name the problem, so users never have to read a traceback from inside torch."""
from __future__ import annotations

import os
import sys
import warnings

import torch


class FastMAMLError(Exception):
    """Base class of every error fastmaml raises on purpose."""


class ConfigError(FastMAMLError, ValueError):
    """A bad preset name, config key or value."""


class ShapeError(FastMAMLError, ValueError):
    """Task tensors whose shapes do not fit together or do not fit the model."""


class DataError(FastMAMLError, ValueError):
    """A missing, corrupt or too small data set."""


class CheckpointError(FastMAMLError):
    """A checkpoint file that is missing or cannot be read (e.g. truncated)."""


class NonFiniteLossError(FastMAMLError, FloatingPointError):
    """A loss became NaN or infinite."""


class NonFiniteInputError(DataError, NonFiniteLossError):
    """A non-finite meta-loss whose cause is a NaN or infinite input (a ``DataError``), not
    divergence; a loop that skips batches of a non-finite loss skips it too."""


class GroupError(FastMAMLError, RuntimeError):
    """A collective of the processes under torchrun failed (most often another process stopped,
    or the connection between them broke)."""


def is_out_of_memory(error: BaseException) -> bool:
    """torch's out-of-memory errors: a device's ``OutOfMemoryError``, or the CPU allocator's
    plain ``RuntimeError`` (e.g. for a meta-batch far too large)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


class FastMAMLWarning(UserWarning):
    """Something fastmaml worked around and the user should know of (the CLI shows one line)."""


class PathWarning(FastMAMLWarning):
    """One process's execution path changed (vmap or compiling fell back, a compiled gradient
    was off): under torchrun each rank says its own."""


# frames of these packages are not where a warning points: the caller's own code is
_INSIDE = tuple(os.path.dirname(os.path.abspath(module.__file__)) + os.sep
                for module in (sys.modules[__package__], torch))


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointing at the caller's own line: the first frame outside fastmaml and
    torch (e.g. a user's ``maml.meta_backward(batch)``), however deep inside it the warning
    arises and whichever public function led there."""
    frame, stacklevel = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, category, stacklevel=stacklevel)


def first_line(error: Exception) -> str:
    """An error's message in one line (a warning's), or its type where it has none. A first
    line that only introduces the next (inductor's "backend='inductor' raised:") takes it along."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
