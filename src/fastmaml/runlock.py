"""One command at a time in a run directory.

Two ``fastmaml train`` commands on one folder (two terminals, by mistake) would both train,
interleave their metrics rows and race for the same checkpoint files. ``locked_run_dir`` holds
an OS-level file lock (``filelock``) for the duration of a command, so the second command is
refused at once and told which process holds the folder. The kernel releases the lock when its
process ends, killed or not, so a stale lock file never blocks the next run.

One learner of a run (``fastmaml train --learner pretrained``) may train while another process
trains a different learner of the same run, so that both cores work on one run. Such a command
holds that learner's lock only; a command on the whole run holds the run's lock and every
learner's. Each takes its own lock first and then checks the other kind, so two commands that
would overlap cannot both go on. Two learners of a new run that start together also take turns
to start (``one_starting``), so the second trains with the settings the first wrote.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from filelock import FileLock, Timeout

from .atomic import write_text_atomic
from .errors import ConfigError

LOCK_NAME, OWNER_NAME = ".fastmaml.lock", ".fastmaml.owner"
START_LOCK_NAME = ".fastmaml.start.lock"
# how long a command waits for a lock before it refuses: long enough for ``others_training``'s
# momentary probe of a learner's lock, short enough to refuse a held run at once to the eye
LOCK_WAIT_S = 0.5


@contextmanager
def locked_run_dir(run_dir: Path, learner: str | None = None) -> Iterator[None]:
    """Hold ``run_dir`` (or, with ``learner``, that learner's part of it) for this process;
    refuse with ``ConfigError`` if another process holds it (``learner``: or the whole run).

    A directory created here and left holding only lock files that no process holds (a command
    that stopped on a bad value, alone) is removed again, with the folders above it made for it,
    so a refused command leaves no trace.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"the run directory {run_dir} is a file: give --out a folder (new or "
                          "a run's)")
    made = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _held(run_dir, learner):
            if learner is not None:  # no command holds the whole run: checked for an instant,
                _acquired(run_dir, None).release()  # its owner file left to such a command
            yield
    finally:
        if made and _removed_if_unused(run_dir):
            for folder in made[1:]:  # deepest first; one that holds something else stays
                with suppress(OSError):
                    folder.rmdir()


def _removed_if_unused(run_dir: Path) -> bool:
    """Remove ``run_dir`` if it holds only our lock and owner files and no process holds any of
    its locks: a command that started meanwhile (waiting to start, or loading) keeps its folder
    and its locks. The locks are held while the folder goes, so none is taken meanwhile."""
    entries = list(run_dir.iterdir())
    if not all(p.name.startswith(".fastmaml") for p in entries):
        return False
    with ExitStack() as probes:
        for path in entries:
            if path.suffix == ".lock":
                probe = FileLock(path, timeout=0)
                try:
                    probe.acquire()
                except Timeout:
                    return False
                probes.callback(probe.release)
        shutil.rmtree(run_dir, ignore_errors=True)
    return True


@contextmanager
def learners_held(run_dir: Path, learners: Sequence[str]) -> Iterator[None]:
    """Hold every learner's lock too (a command on the whole run, once it knows its learners)."""
    with ExitStack() as stack:
        for learner in learners:
            stack.enter_context(_held(run_dir, learner))
        yield


def others_training(run_dir: Path, learner: str) -> list[str]:
    """The learners of ``run_dir`` other than ``learner`` that a process holds (trains) now.
    Each lock is probed for an instant; a command taking it meanwhile waits (``LOCK_WAIT_S``)."""
    held = []
    for path in sorted(run_dir.glob(".fastmaml-*.lock")):
        name = path.name[len(".fastmaml-"):-len(".lock")]
        if name == learner:
            continue
        probe = FileLock(path, timeout=0)
        try:
            probe.acquire()
        except Timeout:
            held.append(name)
        else:
            probe.release()
    return held


@contextmanager
def one_starting(run_dir: Path) -> Iterator[None]:
    """Hold the start of a ``--learner`` command, from reading the run's settings until it has
    written them: a learner starting meanwhile waits (while the first loads its data), so it
    does not train with settings of its own beside another learner's."""
    lock = FileLock(run_dir / START_LOCK_NAME)
    try:
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        print(f"fastmaml: another learner of {run_dir} is starting; waiting until it has "
              "written the run's settings", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _held(run_dir: Path, learner: str | None) -> Iterator[None]:
    """Hold the lock of ``run_dir`` (None) or of one learner, with this process named its owner."""
    lock = _acquired(run_dir, learner)
    try:
        lock_name, owner_name = _names(learner)
        _write_owner(run_dir / owner_name, run_dir / lock_name)
        yield
    finally:
        lock.release()


def _acquired(run_dir: Path, learner: str | None) -> FileLock:
    """The lock of ``run_dir`` (None) or of one learner, acquired; ``ConfigError`` naming its
    owner if another process holds it."""
    lock_name, owner_name = _names(learner)
    lock = FileLock(run_dir / lock_name, timeout=LOCK_WAIT_S)
    what = run_dir if learner is None else f"learner {learner!r} of {run_dir}"
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(f"{what} is in use by {_owner(run_dir / owner_name)}; wait for it to "
                          "finish or stop it, or choose another --out") from None
    if _owner_runs(run_dir / owner_name, run_dir / lock_name):  # its lock file was removed
        lock.release()
        raise ConfigError(f"{what} is in use by {_owner(run_dir / owner_name)}, whose lock file "
                          f"{lock_name} was removed; wait for it to finish or stop it, or "
                          "choose another --out")
    return lock


def _names(learner: str | None) -> tuple[str, str]:
    """The lock and owner files of the whole run (None) or of one learner."""
    if learner is None:
        return LOCK_NAME, OWNER_NAME
    return f".fastmaml-{learner}.lock", f".fastmaml-{learner}.owner"


def _write_owner(path: Path, lock_path: Path) -> None:
    """Note this process as the owner of the lock at ``lock_path`` (which file it locked too)."""
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
             "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
             "started": _process_start(os.getpid()), "lock": _file_id(lock_path)}
    write_text_atomic(json.dumps(owner), path)


def _owner_runs(path: Path, lock_path: Path) -> bool:
    """Whether the owner that ``path`` notes (another process on this machine) still runs and
    locked another file than ``lock_path`` is now: its lock file was removed (and a new one
    made), so that a lock taken now would not exclude it. The process is known by its number
    and start time, the file by its device and inode."""
    try:
        owner = json.loads(path.read_text())
        pid, started, locked = int(owner["pid"]), owner.get("started"), owner.get("lock")
        here = owner["host"] == socket.gethostname()
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (here and pid != os.getpid() and started is not None and locked is not None
            and _process_start(pid) == started and locked != _file_id(lock_path))


def _file_id(path: Path) -> list[int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return [status.st_dev, status.st_ino]


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks since boot, in /proc/<pid>/stat), which
    with its number names one process even where numbers are reused; None where unknown or
    where it has ended (a zombie, not yet waited for)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # from field 3 on: the name before may hold spaces
    return None if fields[0] in "ZX" else fields[19]


def _owner(path: Path) -> str:
    """The holding process in words, as far as it wrote them down in ``path``."""
    try:
        owner = json.loads(path.read_text())
        return (f"process {owner['pid']} on {owner['host']} (`{owner['command']}`, since "
                f"{owner['since']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
