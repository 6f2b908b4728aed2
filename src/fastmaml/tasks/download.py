"""Data files on disk, shared by the image data sets.

Verified downloads, atomic zip extraction and an atomic ``.npy`` cache.
Every write goes to a temporary name beside its target first and is renamed into place, so an
interrupted run never leaves a partial folder or cache file behind.
"""
from __future__ import annotations

import errno
import hashlib
import http.client
import os
import secrets
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
from filelock import FileLock

from ..atomic import replace_atomically
from ..errors import ConfigError, DataError

CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$FASTMAML_CACHE``, else ``~/.cache/fastmaml``."""
    return Path(os.environ.get("FASTMAML_CACHE") or Path.home() / ".cache" / "fastmaml")


def download(url: str, path: Path, md5: str, timeout: float = 60.0) -> None:
    """Download ``url`` to ``path`` through a temporary file; keep it only if its MD5 matches."""
    def fetch(out: IO[bytes]) -> None:
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DataError(f"MD5 mismatch for {path.name} downloaded from {url}: expected "
                            f"{md5}, got {digest.hexdigest()}; the download is corrupt or the "
                            "file changed")

    try:
        replace_atomically(path, fetch)
    except (OSError, http.client.HTTPException) as error:  # (a chunked body cut: IncompleteRead)
        raise DataError(f"could not download {url} to {path}: {error}") from error


def extract_zip(archive: Path, dest: Path, folder: str) -> Path:
    """Extract ``archive``, whose top-level folder is ``folder``, to ``dest/folder`` atomically."""
    target = dest / folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=dest))
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [n for n in zf.namelist() if n.startswith(f"{folder}/")]
            if not members:
                raise DataError(f"{archive} holds no folder {folder}/")
            zf.extractall(tmp, members)  # zipfile drops absolute paths and ".." components
        try:
            os.replace(tmp / folder, target)
        except OSError as error:  # another process (torchrun's rank on another machine) was first
            if not (error.errno in (errno.ENOTEMPTY, errno.EEXIST) and target.is_dir()):
                raise
    except zipfile.BadZipFile as error:
        raise DataError(f"{archive} is not a valid zip file: {error}") from error
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
    locks = _writable_cache_folder(default_cache_dir() / "locks", "$FASTMAML_CACHE")
    with FileLock(locks / f"fetch-{key}.lock"):
        if not target.is_dir():  # (fetched meanwhile by another process)
            fetch_zip(url, md5, dest, folder)


def fetch_zip(url: str, md5: str, dest: Path, folder: str) -> Path:
    """Download a zip of ``folder``, verify its MD5 and extract it to ``dest/folder``."""
    if dest.exists() and not dest.is_dir():
        raise DataError(f"the data root {dest} is a file: name a folder to download {folder} "
                        "into")
    if (dest / folder).exists() or (dest / folder).is_symlink():
        raise DataError(f"{dest / folder} is in the way of the downloaded {folder}: move it away")
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / f".{folder}.{secrets.token_hex(4)}.zip"  # its own: other machines fetch too
    try:
        download(url, archive, md5)
        return extract_zip(archive, dest, folder)
    finally:
        archive.unlink(missing_ok=True)


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
    _writable_cache_folder(path.parent, "$FASTMAML_CACHE (or cache_dir)")
    array = build()
    replace_atomically(path, lambda out: np.save(out, array))
    return array


def _writable_cache_folder(folder: Path, how: str) -> Path:
    """``folder``, made where missing; a ``DataError`` that names ``how`` to choose another
    where it cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(errno.EACCES, "not writable")
    except OSError as error:
        raise DataError(f"cannot write the cache directory {folder} ({error.strerror}): set {how} "
                        "to a writable folder") from None
    return folder
