"""One command at a time in a run directory.

Two ``fastmaml train`` commands on one folder (two terminals, by mistake) would both train,
interleave their metrics rows and race for the same checkpoint files. ``locked_run_dir`` holds
an OS-level file lock (``filelock``) for the duration of a command, so the second command is
refused at once and told which process holds the folder. The kernel releases the lock when its
process ends, killed or not, so a stale lock file never blocks the next run.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import ConfigError
from .train import write_text_atomic

LOCK_NAME, OWNER_NAME = ".fastmaml.lock", ".fastmaml.owner"


@contextmanager
def locked_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for this process; refuse with ``ConfigError`` if another holds it.

    A directory created here and left holding only the lock (a command that stopped on a bad
    value) is removed again, so a refused command leaves no trace.
    """
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(f"{run_dir} is in use by {_owner(run_dir)}; wait for it to finish or "
                          "stop it, or choose another --out") from None
    try:
        _write_owner(run_dir)
        yield
    finally:
        lock.release()
        if created and {p.name for p in run_dir.iterdir()} <= {LOCK_NAME, OWNER_NAME}:
            shutil.rmtree(run_dir, ignore_errors=True)


def _write_owner(run_dir: Path) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
             "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    write_text_atomic(json.dumps(owner), run_dir / OWNER_NAME)


def _owner(run_dir: Path) -> str:
    """The holding process in words, as far as it wrote them down."""
    try:
        owner = json.loads((run_dir / OWNER_NAME).read_text())
        return (f"process {owner['pid']} on {owner['host']} (`{owner['command']}`, since "
                f"{owner['since']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
