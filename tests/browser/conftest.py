"""Fixtures for the browser test of the built site: a local server and headless Chromium, no network."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

# The built site: book/_build/html, or another build named by $VAELIB_SITE.
SITE = Path(os.environ.get("VAELIB_SITE") or Path(__file__).resolve().parents[2] / "book" / "_build" / "html")
CHROMIUM = os.environ.get("VAELIB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a root, headless, offline Chromium: no sandbox (root), no GPU, and none of the background
# connections Chromium makes at start (they would be refused on a closed network and logged).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


@pytest.fixture(scope="session")
def site_url() -> Iterator[str]:
    if not (SITE / "index.html").is_file():
        pytest.fail(f"no built site in {SITE}: run `make book` (or `jupyter-book build book`) first")
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary (the test starts one and opens every page in it); playwright must be installed."""
    pytest.importorskip("playwright.async_api")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `make browser` (as root: installs Debian's chromium), "
                    "or set VAELIB_CHROMIUM to a Chromium binary")
    return CHROMIUM
