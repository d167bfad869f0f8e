"""A real uvicorn server on loopback, in a background thread, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
import uvicorn
from fastapi import FastAPI

from innova_server.embedded import free_port

T = TypeVar("T")


class LiveServer:
    """Serve `app` on 127.0.0.1 until `stop()`; `url` is its base URL."""

    def __init__(self, app: FastAPI, *, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", proxy_headers=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the test server failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError("the test server did not start in time")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


class ServerProcess:
    """The production ASGI app (`innova_server.asgi:app`) under uvicorn, in a process of its own.

    For what a thread cannot show: a second host on the same database, or a
    worker killed mid-reply (`kill()` is SIGKILL: no shutdown code runs).
    Configured only by `env`, as in production; `cwd` should hold no `.env`.
    """

    def __init__(self, env: Mapping[str, str], *, cwd: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.cwd = cwd
        self.env = {**os.environ, **env}
        self.log = cwd / f"server-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        command = [
            sys.executable, "-m", "uvicorn", "innova_server.asgi:app",
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT)
        wait_until_healthy(self.url, process=self.process, timeout=timeout, log=self.log)
        return self

    def kill(self) -> None:
        """SIGKILL, as the kernel's OOM killer or a crash would: nothing is cleaned up."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def wait_until_healthy(
    url: str,
    *,
    process: subprocess.Popen[Any] | None = None,
    timeout: float = 60.0,
    path: str = "/health",
    log: Path | None = None,
) -> None:
    """Poll `url + path` until it answers 200; fail early if `process` (the server) exits.

    `path` serves other servers too (llama.cpp's `/v1/models`); the tail of
    `log`, if given, goes into the failure so a broken start explains itself.
    """
    target = f"{url}{path}"

    def tail() -> str:
        return f":\n{log.read_text(errors='replace')[-3000:]}" if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before {target} answered{tail()}")
        try:
            if httpx.get(target, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{target} did not answer 200 within {timeout:.0f}s{tail()}")
        time.sleep(0.2)


def start_of_a_fresh_window(period_seconds: float, needed_seconds: float = 30.0) -> None:
    """Sleep past the next rate-limit window boundary when fewer than `needed_seconds` are left before it.

    The rate limits count in fixed windows aligned on the epoch (`ratelimit.py`):
    a test that makes N attempts and expects the next one refused fails when a
    boundary falls between them (seen in CI at a quarter past the hour). Call it
    just before the attempts, with the limit's period.
    """
    left = period_seconds - time.time() % period_seconds
    if left < needed_seconds:
        time.sleep(left + 0.5)


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy, and return that; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
