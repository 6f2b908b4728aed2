"""Errors that name the problem, so users never have to read a traceback from inside torch."""
from __future__ import annotations

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


def is_out_of_memory(error: BaseException) -> bool:
    """torch's out-of-memory errors: a device's ``OutOfMemoryError``, or the CPU allocator's
    plain ``RuntimeError`` (e.g. for a meta-batch far too large)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


class FastMAMLWarning(UserWarning):
    """Something fastmaml worked around and the user should know of (the CLI shows one line)."""


def first_line(error: Exception) -> str:
    """An error's message in one line (a warning's), or its type where it has none. A first
    line that only introduces the next (inductor's "backend='inductor' raised:") takes it along."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
