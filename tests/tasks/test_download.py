from __future__ import annotations

import hashlib
import http.server
import os
import socket
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fastmaml import ConfigError, DataError
from fastmaml.atomic import PROCESS_SPACE
from fastmaml.tasks import download as dl


def write_zip(path: Path, files: dict[str, bytes]) -> str:
    """A zip of ``files`` (archive name -> content); returns its MD5."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_fetch_zip_over_loopback(http_folder: tuple[Path, str], tmp_path: Path) -> None:
    served, url = http_folder
    md5 = write_zip(served / "things.zip", {"things/a.txt": b"a", "things/sub/b.txt": b"b",
                                            "__MACOSX/things/._a.txt": b"junk"})
    dest = tmp_path / "data"
    assert dl.fetch_zip(f"{url}/things.zip", md5, dest, "things") == dest / "things"
    assert (dest / "things" / "sub" / "b.txt").read_bytes() == b"b"
    assert sorted(p.name for p in dest.iterdir()) == ["things"]  # no zip, temp dir or junk left


def test_bad_md5_is_rejected_and_leaves_nothing(http_folder: tuple[Path, str],
                                                 tmp_path: Path) -> None:
    served, url = http_folder
    md5 = write_zip(served / "things.zip", {"things/a.txt": b"a"})
    dest = tmp_path / "data"
    with pytest.raises(DataError) as info:
        dl.fetch_zip(f"{url}/things.zip", "0" * 32, dest, "things")
    assert all(word in str(info.value) for word in ("things.zip", "0" * 32, md5))
    assert list(dest.iterdir()) == []


def test_http_error_is_a_data_error(http_folder: tuple[Path, str], tmp_path: Path) -> None:
    _, url = http_folder
    with pytest.raises(DataError, match="missing.zip"):
        dl.download(f"{url}/missing.zip", tmp_path / "missing.zip", "0" * 32)
    assert list(tmp_path.iterdir()) == [tmp_path / "served"]


class _CutChunkedBody(http.server.BaseHTTPRequestHandler):
    """A chunked response whose connection drops inside its first chunk."""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"1000\r\n" + b"x" * 100)
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def test_a_chunked_download_cut_short_is_a_data_error(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """http.client's IncompleteRead is no OSError: it went up as a traceback."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CutChunkedBody) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/things.zip"
        try:
            with pytest.raises(DataError, match=f"could not download {url} to .*IncompleteRead"):
                dl.download(url, tmp_path / "things.zip", "0" * 32)
        finally:
            server.shutdown()
    assert list(tmp_path.iterdir()) == []


class _CutBody(http.server.BaseHTTPRequestHandler):
    """A response whose connection drops after 100 of the 1,000 bytes its length says."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 100)
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def test_a_download_cut_short_says_so_rather_than_a_wrong_md5(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``read(n)`` ends quietly at a dropped connection: the MD5 mismatch it led to hid why."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CutBody) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/things.zip"
        try:
            with pytest.raises(DataError, match=f"the download of {url} stopped after 100 of "
                               "1,000 bytes"):
                dl.download(url, tmp_path / "things.zip", "0" * 32)
        finally:
            server.shutdown()
    assert list(tmp_path.iterdir()) == []


def test_a_data_root_that_cannot_be_written_is_said_before_downloading(tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("a file where a folder of the path goes")
    with pytest.raises(DataError, match=f"cannot write the data root {tmp_path}/notes/data "
                       r"\(Not a directory\): choose a writable folder to download things "
                       "into, or download http://127.0.0.1:9/things.zip and extract it there"):
        dl.fetch_zip("http://127.0.0.1:9/things.zip", "0" * 32, tmp_path / "notes" / "data",
                     "things")


def test_what_killed_fetches_of_this_machine_left_is_removed(
        http_folder: tuple[Path, str], tmp_path: Path) -> None:
    """A fetch killed mid-download or mid-extraction (``kill -9``) left its archive's part or
    its folder hidden in the data root for good: the next fetch removes those of processes
    that have ended on this machine, and keeps a live fetch's and another machine's."""
    served, url = http_folder
    md5 = write_zip(served / "things.zip", {"things/a.txt": b"a"})
    dest = tmp_path / "data"
    dest.mkdir()
    process = subprocess.Popen(["true"])
    process.wait()
    ended, live, here = process.pid, os.getppid(), f".things.{PROCESS_SPACE}"
    dead = [dest / f".{here}.{ended}.zip.{PROCESS_SPACE}.{ended}.ab12cd34.tmp",
            dest / f"{here}.{ended}.zip", dest / f"{here}.{ended}.x1y2"]
    kept = [dest / f"{here}.{live}.q9r8", dest / ".things.0badcafe.123.zip"]
    for path in (*dead, *kept):
        if path.name.endswith(("x1y2", "q9r8")):
            (path / "things").mkdir(parents=True)
        else:
            path.write_bytes(b"part of a zip")
    dl.fetch_zip(f"{url}/things.zip", md5, dest, "things")
    assert sorted(p.name for p in dest.iterdir()) == sorted([*(p.name for p in kept), "things"])


def test_a_file_where_the_folder_goes_is_said_before_downloading(tmp_path: Path) -> None:
    (tmp_path / "things").write_text("notes")
    with pytest.raises(DataError, match=f"{tmp_path / 'things'} is in the way of the downloaded "
                       "things: move it away"):  # (no server at this address: nothing fetched)
        dl.fetch_zip("http://127.0.0.1:9/things.zip", "0" * 32, tmp_path, "things")


def test_processes_fetching_one_folder_together_fetch_it_once(
        http_folder: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's ranks each ask for the missing folder: one downloads and extracts it, the
    others find it there (the second extraction failed with 'Directory not empty')."""
    served, url = http_folder
    md5 = write_zip(served / "things.zip", {"things/a.txt": b"a"})
    downloads, download = [], dl.download
    def slow_download(*args: object, **kwargs: object) -> None:
        downloads.append(args[0])
        time.sleep(0.3)  # the other rank arrives while this one fetches
        download(*args, **kwargs)
    monkeypatch.setattr(dl, "download", slow_download)
    dest, start, errors = tmp_path / "data", threading.Barrier(3), []
    def rank() -> None:
        start.wait()
        try:
            dl.fetch_missing_zip(f"{url}/things.zip", md5, dest, "things")
        except Exception as error:  # noqa: BLE001 - the test reports it below
            errors.append(error)
    ranks = [threading.Thread(target=rank) for _ in range(3)]
    for thread in ranks:
        thread.start()
    for thread in ranks:
        thread.join(timeout=60)
    assert errors == [] and downloads == [f"{url}/things.zip"]
    assert sorted(p.name for p in dest.iterdir()) == ["things"]  # no lock file in the data root
    assert len(list((tmp_path / "cache" / "locks").glob("fetch-*.lock"))) == 1  # but in the cache
    assert (dest / "things" / "a.txt").read_bytes() == b"a"


def test_an_extraction_another_machine_placed_first_is_kept(tmp_path: Path) -> None:
    """Ranks on two machines sharing the data root each extract; the second finds the folder
    the first put in place and takes it."""
    write_zip(tmp_path / "things.zip", {"things/a.txt": b"a"})
    (tmp_path / "things").mkdir()
    (tmp_path / "things" / "a.txt").write_bytes(b"a")  # the other machine's extraction
    assert dl.extract_zip(tmp_path / "things.zip", tmp_path, "things") == tmp_path / "things"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["things", "things.zip"]


def test_extract_zip_rejects_archives_without_the_folder(tmp_path: Path) -> None:
    write_zip(tmp_path / "other.zip", {"other/a.txt": b"a"})
    with pytest.raises(DataError, match=r"other.zip holds no folder things/ \(at its top: "
                       r"other/\)"):
        dl.extract_zip(tmp_path / "other.zip", tmp_path, "things")
    write_zip(tmp_path / "flat.zip", {"things": b"a file of the folder's name"})
    with pytest.raises(DataError, match=r"^the zip downloaded from http://x/flat.zip holds no "
                       r"folder things/ \(at its top: things\)$"):
        dl.extract_zip(tmp_path / "flat.zip", tmp_path, "things", source="http://x/flat.zip")
    (tmp_path / "flat.zip").unlink()
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a valid zip"):
        dl.extract_zip(tmp_path / "bad.zip", tmp_path, "things")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip", "other.zip"]


def test_cached_array_builds_once_atomically(tmp_path: Path) -> None:
    calls = []

    def build() -> np.ndarray:
        calls.append(1)
        return np.arange(6, dtype=np.uint8).reshape(2, 3)

    path = tmp_path / "cache" / "a.npy"
    first = dl.cached_array(path, build, tmp_path / "data")
    second = dl.cached_array(path, build, tmp_path / "data")
    assert len(calls) == 1 and np.array_equal(first, second)
    assert [p.name for p in path.parent.iterdir()] == ["a.npy"]
    path.write_bytes(b"truncated")  # an unreadable cache is rebuilt
    assert np.array_equal(dl.cached_array(path, build, tmp_path / "data"), first)
    assert len(calls) == 2


def test_an_unwritable_cache_folder_is_said_before_the_decoding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not after minutes of decoding, as a PermissionError of the atomic write. (Faked: these
    tests run as root, whom os.access never refuses.)"""
    monkeypatch.setattr(dl.os, "access", lambda path, mode: False)
    built = []
    with pytest.raises(DataError, match="cannot write the cache directory .*cache .*set "
                                        r"\$FASTMAML_CACHE"):
        dl.cached_array(tmp_path / "cache" / "a.npy", lambda: built.append(1) or np.zeros(1),
                        tmp_path / "data")
    assert built == []


def test_cache_never_inside_the_data_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="inside the data root"):
        dl.cached_array(tmp_path / "data" / "a.npy", lambda: np.zeros(1), tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASTMAML_CACHE", str(tmp_path))
    assert dl.default_cache_dir() == tmp_path
    monkeypatch.delenv("FASTMAML_CACHE")
    assert dl.default_cache_dir() == Path.home() / ".cache" / "fastmaml"
