"""The CPU allocator settings: large buffers stay on the heap, and users' own settings win."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from fastmaml.experiments import base, create_run

# Each case runs in a fresh interpreter: malloc settings are process-wide and cannot be undone.
PROBE = """
import ctypes, sys, torch
from fastmaml.allocator import tune_cpu_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
tuned = tune_cpu_allocator() if sys.argv[1] == "tune" else None
before = libc.mallinfo2().hblkhd
buffer = torch.empty(4 << 20, dtype=torch.uint8)  # 4 MB: above glibc's default mmap threshold
print(tuned, libc.mallinfo2().hblkhd - before)
"""


def probe(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1])


def has_glibc_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not has_glibc_mallinfo2(), reason="needs glibc >= 2.33")
def test_tuning_keeps_large_buffers_on_the_reusable_heap():
    assert probe("default")[1] >= 4 << 20  # glibc's default: a fresh mmap
    tuned, mapped = probe("tune")
    assert tuned == "True"
    assert mapped == 0  # served from the heap, which is kept for reuse, not a fresh mmap


@pytest.mark.skipif(not has_glibc_mallinfo2(), reason="needs glibc >= 2.33")
def test_users_own_malloc_settings_are_left_alone():
    tuned, mapped = probe("tune", MALLOC_MMAP_THRESHOLD_="131072")
    assert tuned == "False"
    assert mapped >= 4 << 20


def test_experiments_tune_the_allocator_on_cpu_unless_turned_off(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(base, "tune_cpu_allocator", lambda: calls.append("tuned") or True)
    create_run("sinusoid-demo", tmp_path / "default", ["device=cpu"])
    assert calls == ["tuned"]
    create_run("sinusoid-demo", tmp_path / "off", ["device=cpu", "tune_malloc=false"])
    assert calls == ["tuned"]
