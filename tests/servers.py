"""Real servers for the serving tests: `gptlab serve` in a subprocess, or uvicorn in a thread.

Starting `gptlab serve` costs about ten seconds on two cores (torch, gradio, the model), so test
modules share one subprocess per set of flags (`shared_server`), stopped when pytest exits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 120.0


class Server:
    """`python -m gptlab serve ARGS --port 0` (or another serving `command`) in a subprocess; `url` once its banner is printed."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, command: str = "serve",
                 cwd: str | Path | None = None) -> None:
        self.args = [sys.executable, "-m", "gptlab", command, *map(str, args), "--port", "0"]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env, start_new_session=True, cwd=cwd)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(STARTUP_TIMEOUT) or not self.url:
            self.stop()
            raise RuntimeError("gptlab serve did not start:\n" + self.output)
        wait_healthy(self.url)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            found = re.search(r" at (http://\S+)", line)
            if found and not self.url:
                self.url = found.group(1)
                self.ready.set()
        self.ready.set()  # the process ended

    @property
    def output(self) -> str:
        """Everything the server printed so far."""
        return "".join(self.lines)

    def stop(self) -> None:
        """Ctrl-C, then a kill if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


_SHARED: dict[tuple[str, ...], Server] = {}


def shared_server(*args: str) -> Server:
    """One server per set of arguments for the whole pytest run."""
    key = tuple(map(str, args))
    server = _SHARED.get(key)
    if server is None or server.proc.poll() is not None:
        server = _SHARED[key] = Server(*key)
    return server


@atexit.register
def _stop_shared() -> None:
    for server in _SHARED.values():
        server.stop()


def wait_healthy(url: str, timeout: float = 30.0) -> dict[str, Any]:
    """GET /health until it answers."""
    end = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            if time.monotonic() > end:
                raise
        time.sleep(0.1)


def wait_idle(url: str, model: str, timeout: float = 5.0) -> float:
    """Seconds until /health shows no generation running or waiting for `model`, and no rows in its batch; fails after `timeout`."""
    start = time.monotonic()
    while True:
        stats = httpx.get(f"{url}/health", timeout=5).json()["models"][model]
        if stats["running"] == 0 and stats["waiting"] == 0 and stats.get("batch_rows", 0) == 0:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"{model} still busy after {timeout} s: {stats}"
        time.sleep(0.05)


class ThreadServer:
    """uvicorn serving `app` on 127.0.0.1 in a background thread of this process."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        from gptlab.serve.app import bind

        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_healthy(self.url)

    def stop(self) -> None:
        """Shut uvicorn down and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def find_chromium() -> str | None:
    """The Chromium to drive: $GPTLAB_CHROMIUM, else chromium (or a Chrome) on PATH."""
    if os.environ.get("GPTLAB_CHROMIUM"):
        return os.environ["GPTLAB_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


# The flags of the server most serving tests share: long generations possible (to see them
# cancelled), small ceilings on n and the prompt (to see them enforced).
SHARED_FLAGS = ("--max-new-tokens-limit", "20000", "--max-n", "4", "--max-prompt-chars", "2000",
                "--concurrency", "2", "--queue-size", "16")


def main_server(run: Path) -> Server:
    """The shared `gptlab serve RUN` of the serving tests."""
    return shared_server(str(run), *SHARED_FLAGS)


@contextlib.contextmanager
def browser_page(chromium: str, requests: list[str], viewport: tuple[int, int] = (1280, 900)) -> Iterator[Any]:
    """A page of a headless Chromium that notes every URL it requests (websockets too) in `requests`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]}, accept_downloads=True)
            page.on("request", lambda r: requests.append(r.url))
            page.on("websocket", lambda ws: requests.append(ws.url))
            yield page
        finally:
            browser.close()
