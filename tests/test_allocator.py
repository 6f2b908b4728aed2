"""The CPU allocator settings: large buffers stay on a heap kept for reuse; users' settings win."""
from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from fastmaml.experiments import base, create_run
from malloc_env import clean_env

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
mapped = libc.mallinfo2().hblkhd - before
del buffer  # the top of the heap: trimmed back to the OS, or kept for reuse
print(tuned, mapped, libc.mallinfo2().keepcost)
"""
MB = 1 << 20


def probe(mode: str, **env: str) -> tuple[str, int, int]:
    tuned, mapped, kept = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
        env=clean_env(**env)).stdout.split()
    return tuned, int(mapped), int(kept)


def has_glibc_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


needs_glibc = pytest.mark.skipif(not has_glibc_mallinfo2(), reason="needs glibc >= 2.33")


@needs_glibc
def test_tuning_keeps_large_buffers_on_the_heap_and_the_heap_for_reuse():
    _, mapped, _ = probe("default")
    assert mapped >= 4 * MB  # glibc's default: a fresh mmap, unmapped again when freed
    tuned, mapped, kept = probe("tune")
    assert tuned == "True"
    assert mapped == 0  # served from the heap (the mmap threshold)
    assert kept >= 4 * MB  # and still held after the free (no trimming)


@needs_glibc
@pytest.mark.parametrize("setting", [{"MALLOC_MMAP_THRESHOLD_": "131072"},
                                     {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_users_own_malloc_settings_are_left_alone(setting):
    tuned, mapped, _ = probe("tune", **setting)
    assert tuned == "False"
    assert mapped >= 4 * MB


def test_experiments_tune_the_allocator_on_cpu_unless_turned_off(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(base, "tune_cpu_allocator", lambda: calls.append("tuned") or True)
    create_run("sinusoid-demo", tmp_path / "default", ["device=cpu"])
    assert calls == ["tuned"]
    create_run("sinusoid-demo", tmp_path / "off", ["device=cpu", "tune_malloc=false"])
    assert calls == ["tuned"]
