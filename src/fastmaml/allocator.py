"""glibc malloc settings for CPU training: reuse freed buffers instead of faulting in new pages.

Every meta-iteration allocates and frees the same large activation buffers. With glibc's
defaults the larger ones are fresh ``mmap`` s each step and freed memory at the top of the heap
goes back to the OS, so each step pays page faults to zero-fill them again. A 32 MB mmap
threshold, no trimming and a 256 MB top pad keep them for reuse (Omniglot steps up to 1.5x
faster, docs/results.md). The cost: resident memory stays near its peak.
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>
SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 256 << 20}
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def user_chose_malloc_settings() -> bool:
    """True when glibc's malloc was configured through the environment."""
    return (any(name in os.environ for name in USER_SETTINGS)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))


def tune_cpu_allocator() -> bool:
    """Apply ``SETTINGS`` to this process with ``mallopt``.

    Returns False, changing nothing, where the C library has no ``mallopt`` (not glibc) or the
    user already chose malloc settings through the environment.
    """
    if user_chose_malloc_settings():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = [mallopt(param, value) == 1 for param, value in SETTINGS.items()]
    return all(applied)
