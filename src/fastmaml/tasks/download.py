"""Data files on disk, shared by the image data sets.

Verified downloads, atomic zip extraction and an atomic ``.npy`` cache.
Every write goes to a temporary name beside its target first and is renamed into place, so an
interrupted run never leaves a partial folder or cache file behind.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
from filelock import FileLock

from ..atomic import PROCESS_SPACE, is_running, replace_atomically
from ..errors import ConfigError, DataError

CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$FASTMAML_CACHE``, else ``~/.cache/fastmaml``."""
    return Path(os.environ.get("FASTMAML_CACHE") or Path.home() / ".cache" / "fastmaml")


def download(url: str, path: Path, md5: str, timeout: float = 60.0) -> None:
    """Download ``url`` to ``path`` through a temporary file; keep it only if it arrived whole
    and its MD5 matches."""
    from tqdm.auto import tqdm

    def fetch(out: IO[bytes]) -> None:
        digest, received = hashlib.md5(), 0
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with tqdm(total=expected, desc=f"download {url.rsplit('/', 1)[-1]}", unit="B",
                      unit_scale=True, leave=False, disable=None) as bar:  # (None: a terminal)
                while chunk := response.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if expected is not None and received < expected:  # (read(n) does not say a cut body)
            raise DataError(f"the download of {url} stopped after {received:,} of {expected:,} "
                            "bytes (the connection dropped): run the command again")
        if digest.hexdigest() != md5:
            raise DataError(f"the file downloaded from {url} does not match its MD5: expected "
                            f"{md5}, got {digest.hexdigest()}; the download is corrupt or the "
                            "file at that address changed")

    try:
        replace_atomically(path, fetch)
    except (OSError, http.client.HTTPException) as error:  # (a chunked body cut: IncompleteRead)
        raise DataError(f"could not download {url} to {path}: {error}") from error


def extract_zip(archive: Path, dest: Path, folder: str, source: str = "") -> Path:
    """Extract ``archive``, whose top-level folder is ``folder``, to ``dest/folder`` atomically
    (through a temporary folder beside it); ``source`` (a URL) names the archive in errors."""
    target, named = dest / folder, f"the zip downloaded from {source}" if source else str(archive)
    tmp = Path(tempfile.mkdtemp(prefix=_own_prefix(folder), dir=dest))
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [n for n in zf.namelist() if n.startswith(f"{folder}/")]
            if not members:
                top = sorted({n.split("/")[0] + ("/" if "/" in n else "") for n in zf.namelist()})
                raise DataError(f"{named} holds no folder {folder}/ (at its top: "
                                f"{', '.join(top[:5]) or 'nothing'}"
                                f"{', ...' if len(top) > 5 else ''})")
            zf.extractall(tmp, members)  # zipfile drops absolute paths and ".." components
        try:
            os.replace(tmp / folder, target)
        except OSError as error:  # another process (torchrun's rank on another machine) was first
            if not (error.errno in (errno.ENOTEMPTY, errno.EEXIST) and target.is_dir()):
                raise
    except zipfile.BadZipFile as error:
        raise DataError(f"{named} is not a valid zip file: {error}") from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch_missing_zip(url: str, md5: str, dest: Path, folder: str) -> None:
    """``fetch_zip`` where ``dest/folder`` is not there yet, once among this machine's processes
    (torchrun's ranks): under a lock in fastmaml's cache folder (never in the data root), each
    looks again once it holds the lock, and the first to hold it fetches."""
    target = dest / folder
    if target.is_dir():
        return
    key = hashlib.md5(str(target.resolve()).encode()).hexdigest()
    locks = _writable_folder(default_cache_dir() / "locks", "the cache directory",
                             "set $FASTMAML_CACHE to a writable folder")
    with FileLock(locks / f"fetch-{key}.lock"):
        if not target.is_dir():  # (fetched meanwhile by another process)
            fetch_zip(url, md5, dest, folder)


def fetch_zip(url: str, md5: str, dest: Path, folder: str) -> Path:
    """Download a zip of ``folder``, verify its MD5 and extract it to ``dest/folder``.

    What fetches killed on this machine left in ``dest`` (an archive or its part, a
    part-extracted folder: ``kill -9`` skips the cleanup) is removed first: the files of
    processes that have ended (a live fetch's, and other machines', are kept)."""
    if dest.exists() and not dest.is_dir():
        raise DataError(f"the data root {dest} is a file: name a folder to download {folder} "
                        "into")
    if (dest / folder).exists() or (dest / folder).is_symlink():
        raise DataError(f"{dest / folder} is in the way of the downloaded {folder}: move it away")
    _writable_folder(dest, "the data root", f"choose a writable folder to download {folder} "
                     f"into, or download {url} and extract it there yourself")
    _remove_dead_fetches(dest, folder)
    archive = dest / f"{_own_prefix(folder)}zip"
    try:
        download(url, archive, md5)
        return extract_zip(archive, dest, folder, source=url)
    finally:
        archive.unlink(missing_ok=True)


def _own_prefix(folder: str) -> str:
    """How the names of this process's temporaries of a fetch of ``folder`` begin: its
    archive, the archive's part (one dot more), its extraction (``_remove_dead_fetches``)."""
    return f".{folder}.{PROCESS_SPACE}.{os.getpid()}."


def _remove_dead_fetches(dest: Path, folder: str) -> None:
    """Delete the temporaries in ``dest`` of fetches of ``folder`` on this machine whose
    process has ended."""
    machine = f".{folder}.{PROCESS_SPACE}."
    for leftover in [*dest.glob(f"{glob.escape(machine)}*"),
                     *dest.glob(f".{glob.escape(machine)}*")]:
        pid = leftover.name.lstrip(".").removeprefix(machine[1:]).split(".")[0]
        if pid.isdigit() and not is_running(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def cached_array(path: Path, build: Callable[[], np.ndarray], data_root: Path) -> np.ndarray:
    """The array saved at ``path``, else ``build()`` saved there atomically.

    The cache never goes inside ``data_root``, which may be read-only and shared.
    """
    if path.resolve().is_relative_to(data_root.resolve()):
        raise ConfigError(f"the cache file {path} would be inside the data root {data_root}; "
                          "choose a cache directory outside it (cache_dir or $FASTMAML_CACHE)")
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):  # unreadable: rebuild it below
            pass
    # said before the decoding, which may take minutes
    _writable_folder(path.parent, "the cache directory",
                     "set $FASTMAML_CACHE (or cache_dir) to a writable folder")
    array = build()
    replace_atomically(path, lambda out: np.save(out, array))
    return array


def _writable_folder(folder: Path, what: str, remedy: str) -> Path:
    """``folder``, made where missing; a ``DataError`` naming it as ``what``, and ``remedy``,
    where it cannot be written (also on a read-only mount, where even root cannot)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(errno.EACCES, "not writable")
    except OSError as error:
        raise DataError(f"cannot write {what} {folder} ({error.strerror}): {remedy}") from None
    return folder
