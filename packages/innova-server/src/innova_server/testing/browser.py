"""A real headless Chromium driven over the DevTools protocol, for tests of what browsers enforce.

CORS, cookies (`SameSite`, `Secure`), the CSRF `Origin` header, and reading
SSE with fetch + ReadableStream are decided by the browser, not by an HTTP
client: only a browser can prove them. This drives Debian's `chromium`
(no browser downloaded at run time, no Playwright/Selenium) through the
DevTools protocol over a WebSocket (the `websockets` package):

    with Chromium.launch() as browser:
        page = browser.new_page("http://127.0.0.1:8000/playground")
        page.wait_for("document.documentElement.dataset.ready === 'yes'")
        page.evaluate("fetch('/auth/me').then(r => r.status)")

`find_chromium()` says where the browser is, or None (tests then skip).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium executable: `$CHROMIUM` if set, else the first candidate on PATH.

    Snap-packaged browsers (Ubuntu's `chromium`) are passed over: their
    confinement hides the temporary profile directory from them.
    """
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit
    for name in CANDIDATES:
        path = shutil.which(name)
        if path and not os.path.realpath(path).startswith("/snap/") and not _snap_wrapper(path):
            return path
    return None


def _snap_wrapper(path: str) -> bool:
    """Ubuntu's /usr/bin/chromium-browser is a script that execs the snap."""
    try:
        with open(path, "rb") as file:
            head = file.read(4096)
    except OSError:
        return False
    return head.startswith(b"#!") and b"/snap/" in head


class BrowserError(Exception):
    """The browser failed to start, a DevTools command failed, or a page script threw."""


class Page:
    """One tab, attached through a flat DevTools session."""

    def __init__(self, browser: Chromium, session_id: str, target_id: str) -> None:
        self.browser = browser
        self.session_id = session_id
        self.target_id = target_id

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        return self.browser.send(method, session_id=self.session_id, **params)

    def goto(self, url: str, *, ready: str = "document.readyState === 'complete'", timeout: float = 15) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for(ready, timeout=timeout)

    def reload(self, *, ready: str = "document.readyState === 'complete'", timeout: float = 15) -> None:
        """Reload the page (what a person pressing F5 does) and wait until `ready` is true in the new one."""
        marker = f"__innova_before_reload_{time.monotonic_ns()}"
        self.evaluate(f"window.{marker} = true")
        self.send("Page.reload", ignoreCache=True)
        self.wait_for(f"!window.{marker} && ({ready})", timeout=timeout)

    def evaluate(self, expression: str, *, timeout: float = 30) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise), as JSON."""
        result = self.browser.send(
            "Runtime.evaluate",
            session_id=self.session_id,
            timeout=timeout,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
            userGesture=True,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            description = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression[:80]!r} threw: {description}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float = 15, interval: float = 0.05) -> Any:
        """Poll `expression` until it is truthy; its value. Errors while a page loads count as false."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression, timeout=max(1.0, deadline - time.monotonic()))
            except BrowserError as error:  # the page is between two documents
                last_error = error
                value = None
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"{expression!r} still false after {timeout}s" + (f" ({last_error})" if last_error else ""))


class Chromium:
    """A headless Chromium process with a fresh profile, and its DevTools connection."""

    def __init__(self, process: subprocess.Popen[bytes], websocket: Any, profile: tempfile.TemporaryDirectory[str]):
        self.process = process
        self.ws = websocket
        self.profile = profile
        self._ids = itertools.count(1)

    @classmethod
    def launch(cls, executable: str | None = None, *, timeout: float = 30) -> Chromium:
        from websockets.sync.client import connect

        executable = executable or find_chromium()
        if executable is None:
            raise BrowserError("no Chromium found (apt-get install chromium, or set CHROMIUM)")
        profile = tempfile.TemporaryDirectory(prefix="innova-chromium-")
        args = [
            executable,
            "--headless=new",
            "--no-sandbox",  # tests may run as root (CI containers); the pages are our own
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile.name}",
            "about:blank",
        ]
        # Chromium logs much to stderr: into a file, never a pipe nobody drains.
        with open(Path(profile.name) / "chromium.log", "wb") as log:
            process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        try:
            url = _devtools_url(process, Path(profile.name), timeout)
            # Entered by hand (websockets >= 17 asks for a context manager); `close()` leaves it.
            websocket = connect(url, max_size=None, open_timeout=timeout).__enter__()
        except BaseException:
            _stop(process)
            profile.cleanup()
            raise
        return cls(process, websocket, profile)

    def send(self, method: str, *, session_id: str | None = None, timeout: float = 30, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result. Events received meanwhile are dropped."""
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if session_id is not None:
            message["sessionId"] = session_id
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"{method}: no answer in {timeout}s")
            reply = json.loads(self.ws.recv(timeout=remaining))
            if reply.get("id") != message_id:
                continue
            if "error" in reply:
                raise BrowserError(f"{method}: {reply['error'].get('message')}")
            result: dict[str, Any] = reply.get("result", {})
            return result

    def new_page(self, url: str = "about:blank") -> Page:
        target_id = self.send("Target.createTarget", url="about:blank")["targetId"]
        session_id = self.send("Target.attachToTarget", targetId=target_id, flatten=True)["sessionId"]
        page = Page(self, session_id, target_id)
        page.send("Page.enable")
        page.send("Runtime.enable")
        if url != "about:blank":
            page.goto(url)
        return page

    def cookies(self) -> list[dict[str, Any]]:
        """Every cookie the browser holds (name, domain, sameSite, secure...)."""
        cookies: list[dict[str, Any]] = self.send("Storage.getCookies")["cookies"]
        return cookies

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=5)
        with contextlib.suppress(Exception):
            self.ws.close()
        _stop(self.process)
        self.profile.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _devtools_url(process: subprocess.Popen[bytes], profile: Path, timeout: float) -> str:
    """The browser's DevTools WebSocket URL, from the file Chromium writes into its profile."""
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = (profile / "chromium.log").read_text(errors="replace")
            raise BrowserError(f"chromium exited with status {process.returncode}: {stderr[-2000:]}")
        with contextlib.suppress(FileNotFoundError, ValueError):
            lines = port_file.read_text().splitlines()
            if len(lines) >= 2:
                return f"ws://127.0.0.1:{int(lines[0])}{lines[1]}"
        time.sleep(0.05)
    raise BrowserError(f"chromium did not open its DevTools port in {timeout}s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextlib.contextmanager
def chromium() -> Iterator[Chromium]:
    browser = Chromium.launch()
    try:
        yield browser
    finally:
        browser.close()


__all__ = ["BrowserError", "Chromium", "Page", "chromium", "find_chromium"]
