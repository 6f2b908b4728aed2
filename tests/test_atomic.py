"""Atomic writes: a failed write leaves the old file and no temporary; permissions follow the umask."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import urllib.error
from unittest import mock
from pathlib import Path

import pytest

from fastmaml import atomic
from fastmaml.atomic import remove_stale_temporaries, replace_atomically, write_text_atomic


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


def test_an_error_of_the_writer_that_is_not_the_disks_passes_unchanged(tmp_path):
    def download(handle):  # e.g. the network failing while a download is written
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    with pytest.raises(urllib.error.URLError, match="Connection refused"):
        replace_atomically(tmp_path / "x.zip", download)
    assert os.listdir(tmp_path) == []


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


def test_a_named_output_link_keeps_pointing_at_its_file_which_is_replaced(tmp_path):
    (tmp_path / "reports").mkdir()
    target = tmp_path / "reports" / "REPORT.md"
    target.write_text("old")
    link = tmp_path / "latest.md"
    link.symlink_to(target)
    write_text_atomic("new", link, follow_links=True)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    dangling = tmp_path / "next.md"
    dangling.symlink_to(tmp_path / "reports" / "NEXT.md")
    write_text_atomic("made", dangling, follow_links=True)  # the link's target is created
    assert dangling.is_symlink() and (tmp_path / "reports" / "NEXT.md").read_text() == "made"
    # a run's own file linked from another run (cp -as) is replaced, not the other run's
    write_text_atomic("this run's", link)
    assert not link.is_symlink() and link.read_text() == "this run's"
    assert target.read_text() == "new"


@pytest.mark.skipif(not os.path.exists("/dev/stdout"), reason="needs /dev/stdout")
def test_dev_stdout_sent_to_a_file_is_appended_to_not_replaced(tmp_path):
    log = tmp_path / "log.md"
    log.write_text("before\n")
    script = ("import sys; from pathlib import Path; from fastmaml.atomic import write_text_atomic;"
              " print('printed'); write_text_atomic('report\\n', Path('/dev/stdout'))")
    with open(log, "a") as out:  # as `>> log.md`
        subprocess.run([sys.executable, "-c", script], stdout=out, check=True)
    assert log.read_text() == "before\nprinted\nreport\n"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_pipe_is_written_to_not_replaced(tmp_path):
    """``--out /dev/stdout`` or a named pipe: renaming a file over it would replace it."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    read = []
    reader = threading.Thread(target=lambda: read.append(pipe.read_text()), daemon=True)
    reader.start()
    write_text_atomic("through the pipe", pipe)
    reader.join(timeout=10)
    assert read == ["through the pipe"] and stat.S_ISFIFO(pipe.stat().st_mode)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_place_that_takes_no_new_file_is_named_not_the_temporary(tmp_path):
    """/proc (as a read-only folder) refuses the temporary beside the file: the error names the
    file the user asked for, not a hidden ``.name.pid.token.tmp``."""
    with pytest.raises(OSError) as raised:
        write_text_atomic("x", Path("/proc/fastmaml-report.md"))
    assert raised.value.filename == "/proc/fastmaml-report.md"
    assert ".tmp" not in str(raised.value)


@pytest.mark.parametrize("letter", ["a", "\u20ac"])  # 1 and 3 bytes in UTF-8 (cut in two)
def test_a_name_near_the_file_systems_limit_is_written_and_its_stale_temporaries_removed(
        tmp_path, letter):
    """A 250-byte name (the limit is 255) took a temporary name too long to create."""
    path = tmp_path / (letter * (250 // len(letter.encode())))
    replace_atomically(path, lambda handle: handle.write(b"kept"))
    assert path.read_bytes() == b"kept" and os.listdir(tmp_path) == [path.name]

    def killed(handle):  # a writer killed mid-write leaves its temporary
        raise KeyboardInterrupt
    with mock.patch.object(Path, "unlink"), pytest.raises(KeyboardInterrupt):
        replace_atomically(path, killed)
    assert len(os.listdir(tmp_path)) == 2
    remove_stale_temporaries(path)
    assert os.listdir(tmp_path) == [path.name]


def test_the_file_reaches_the_disk_before_the_rename_and_the_rename_after_it(tmp_path,
                                                                           monkeypatch):
    """The order that makes a write survive a power loss: the temporary's contents synced,
    then renamed over the file, then the folder's entry synced."""
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda descriptor: (
        calls.append("fsync folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode)
                     else "fsync file"), fsync(descriptor)))
    monkeypatch.setattr(atomic.os, "replace", lambda *args: (calls.append("rename"),
                                                              replace(*args)))
    write_text_atomic("x", tmp_path / "f.txt")
    assert calls == ["fsync file", "rename", "fsync folder"]


def test_a_write_removes_the_temporaries_that_killed_writers_on_this_machine_left(tmp_path):
    """A writer killed mid-write (kill -9: no cleanup) left its temporary for good beside
    eval.json, figures, caches; the next write of the file removes it, and keeps those of live
    writers and of another machine's or container's (whose processes it cannot see)."""
    path = tmp_path / "eval.json"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    here = atomic.PROCESS_SPACE  # this machine and its process numbers, in 8 hex digits
    elsewhere = f"{(int(here, 16) + 1) % 16 ** 8:08x}"
    left = {"dead": f".eval.json.{here}.{ended}.0badf00d.tmp",
            "live": f".eval.json.{here}.{os.getpid()}.0badf00d.tmp",
            "elsewhere": f".eval.json.{elsewhere}.{ended}.0badf00d.tmp"}
    for name in left.values():
        (tmp_path / name).write_bytes(b"half")
    write_text_atomic("{}", path)
    assert sorted(os.listdir(tmp_path)) == sorted(["eval.json", left["live"], left["elsewhere"]])
    # another user's live process (signalling it is not permitted) keeps its temporary too
    with mock.patch.object(atomic.os, "kill", side_effect=PermissionError):
        write_text_atomic("{}", path)
    assert left["live"] in os.listdir(tmp_path) and (tmp_path / left["live"]).is_file()
