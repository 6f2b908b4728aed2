"""Atomic writes: a failed write leaves the old file and no temporary; permissions follow the umask."""
from __future__ import annotations

import os

import pytest

from fastmaml.atomic import replace_atomically, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "notes.txt"
    write_text_atomic("old", path)

    def crash(handle):
        handle.write(b"part of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(path, crash)
    assert path.read_text() == "old"
    assert os.listdir(path.parent) == ["notes.txt"]


def test_a_write_replaces_the_file_with_the_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = tmp_path / "notes.txt"
        write_text_atomic("old", path)
        write_text_atomic("new ünïcode", path)
    finally:
        os.umask(umask)
    assert path.read_text(encoding="utf-8") == "new ünïcode"
    assert path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["notes.txt"]
