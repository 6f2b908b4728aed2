"""Atomic file writes: a reader, or a run killed at any moment, sees the old file or the new one.

Every file fastmaml writes that a later run reads back (checkpoints, configs, metrics logs,
reports, downloads, caches) goes through ``replace_atomically``; ``read_json`` reads its JSON
records back, with an error that names a damaged file.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import secrets
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError, DataError


# the errors of a write or flush that the disk refuses: full, over a quota or a size limit,
# read-only, failing
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def read_json(path: Path, remedy: str = "") -> Any:
    """The JSON in ``path``; a file that is not JSON (edited, or damaged outside fastmaml) is a
    ``DataError`` naming it and ``remedy``."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is damaged ({error})"
                        + (f": {remedy}" if remedy else "")) from None


def refuse_unwritable(path: Path, what: str) -> None:
    """A ``ConfigError`` before any work where ``path`` (``what``: e.g. "--out") cannot be
    written because a folder on its way is a file."""
    for folder in Path(path).absolute().parents:
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"cannot write {what} {path}: {folder} is a file, not a folder")
            return


def replace_atomically(path: Path, write: Callable[[IO[bytes]], object],
                       follow_links: bool = False) -> None:
    """``write`` into a new temporary file beside ``path``, flush it to disk, then rename it
    over ``path``. If ``write`` raises, ``path`` is left as it was and no temporary remains.

    The temporary's name is unique to this call (machine, process id and a random token), and
    it is created with the usual permissions (the umask's), unlike ``tempfile.mkstemp``'s owner-only.
    With ``follow_links`` (a file the user named, e.g. ``--out``) a symbolic link keeps pointing
    where it did and the file it names is replaced; without, the link itself is (a run's file
    linked from another run never overwrites that run's). A path that is no regular file (a
    pipe, a terminal) or a system one (``/dev/stdout``, also when the shell sent it to a file)
    is written to as it is: renaming over it would replace the device, pipe or file.
    """
    if path.exists() and (not path.is_file()  # (both follow links)
                          or os.path.abspath(path).startswith(("/dev/", "/proc/"))):
        sys.stdout.flush()  # what was printed before comes first
        with open(path, "ab" if path.is_file() else "wb") as handle:  # after it, in a file
            write(handle)
        return
    if follow_links:
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_temporaries(path)
    tmp = path.with_name(f"{_temporary_prefix(path)}{PROCESS_SPACE}.{os.getpid()}."
                         f"{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _sync_directory(path.parent)
    except OSError as error:
        if (error.filename is None and error.errno in DISK_ERRORS  # a write or flush: name it
                or error.filename == str(tmp)):  # the temporary's, e.g. in /proc: the user's
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise  # e.g. a download's network error, raised inside ``write``
    finally:
        tmp.unlink(missing_ok=True)


def _sync_directory(folder: Path) -> None:
    """Flush a rename in ``folder`` to disk, so that it survives a power loss (POSIX)."""
    if os.name == "posix":
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _temporary_prefix(path: Path) -> str:
    """How the names of ``path``'s temporaries start: its name, cut to 200 bytes so that a name
    near the file system's limit (255) gets one too."""
    return f".{os.fsdecode(os.fsencode(path.name)[:200])}."


def _process_space() -> str:
    """This machine and its process-number space, in 8 hex digits for temporaries' names: a
    writer on another machine sharing the folder, or in another container (its own process
    numbers), is never taken for one of ours that has ended."""
    try:
        space = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:  # no /proc (not Linux): the machine alone
        space = ""
    return hashlib.sha256(f"{socket.gethostname()}/{space}".encode()).hexdigest()[:8]


PROCESS_SPACE = _process_space()


def _remove_dead_writers_temporaries(path: Path) -> None:
    """Delete the temporaries of ``path`` that writers here left when killed (``kill -9`` skips
    the cleanup): those whose process has ended. Others may be live writes."""
    for temporary in _temporaries(path, f"{PROCESS_SPACE}."):
        pid = temporary.name.split(".")[-3]
        if pid.isdigit() and not is_running(int(pid)):
            temporary.unlink(missing_ok=True)


def is_running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (a reused number counts: kept is safe)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporaries of ``replace_atomically(path)`` that a killed writer left behind
    (``kill -9`` during a write skips the cleanup). Only for a caller that holds ``path``
    alone, e.g. a training run under its run lock."""
    for stale in _temporaries(path):
        stale.unlink(missing_ok=True)


def _temporaries(path: Path, start: str = "") -> Iterator[Path]:
    """The temporaries of ``replace_atomically(path)`` beside it (whose part after ``path``'s
    name begins with ``start``)."""
    return path.parent.glob(f"{glob.escape(_temporary_prefix(path) + start)}*.tmp")


def write_text_atomic(text: str, path: Path, follow_links: bool = False) -> None:
    """Replace ``path`` with ``text`` (UTF-8): it holds the old text or the new, never a part.
    A file name that is not UTF-8 (decoded by Python as surrogates) is written as its bytes."""
    replace_atomically(path, lambda handle: handle.write(text.encode("utf-8", "surrogateescape")),
                       follow_links)
