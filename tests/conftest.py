"""Shared test fixtures."""
from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The full Omniglot folder: ``$FASTMAML_OMNIGLOT``, default ``<repo>/../shared/data/omniglot``.

    Tests that need it are skipped when it is missing, and fail instead under
    ``FASTMAML_REQUIRE_DATA=1`` (CI), so that a missing data set never passes silently there.
    """
    root = Path(os.environ.get("FASTMAML_OMNIGLOT") or REPO.parent / "shared" / "data" / "omniglot")
    if not all((root / folder).is_dir() for folder in ("images_background", "images_evaluation")):
        reason = (f"Omniglot not found at {root} (needs images_background/ and "
                  "images_evaluation/); set FASTMAML_OMNIGLOT to its folder")
        if os.environ.get("FASTMAML_REQUIRE_DATA") == "1":
            pytest.fail(f"{reason}; FASTMAML_REQUIRE_DATA=1 requires it")
        pytest.skip(reason)
    return root


@pytest.fixture(autouse=True)
def process_state() -> Iterator[None]:
    """Each test starts with Ctrl-C raising ``KeyboardInterrupt`` (also where pytest was started
    with SIGINT ignored, as a shell's background job is) and leaves torch's thread count as it
    found it (a run's ``threads`` setting is process-wide, and part of a path choice's key)."""
    threads = torch.get_num_threads()
    interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, signal.SIG_DFL if interrupt is None else interrupt)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def fastmaml_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The caches that tests write (decoded images, a fetch's lock) go to a folder of the test
    session, never to the user's own ``~/.cache/fastmaml``, which would keep one file per
    temporary data folder for good. The real Omniglot is decoded once per session."""
    folder = tmp_path_factory.mktemp("fastmaml-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTMAML_CACHE", str(folder))
        yield folder


@pytest.fixture
def float64() -> Iterator[None]:
    """float64 as torch's default dtype for the test (restored after it), for exact comparisons."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """(folder, base URL): files put in the folder are served over HTTP on 127.0.0.1."""
    folder = tmp_path / "served"
    folder.mkdir()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("FASTMAML_CACHE", str(tmp_path / "cache"))  # (a fetch's lock goes there)
    handler = functools.partial(_QuietHandler, directory=str(folder))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield folder, f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            thread.join(timeout=10)
