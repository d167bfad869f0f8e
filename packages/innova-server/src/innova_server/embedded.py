"""The embedded development database: SecantusDB in a child process.

SecantusDB (GPL-2.0) is only ever run as a separate program (`python -m
secantus`), never imported, and only when installed (`innova-server[embedded]`).
It speaks the MongoDB wire protocol over TCP on loopback, stores its data
(WiredTiger) in a directory kept across restarts, and is stopped with the
server.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from pymongo import MongoClient
from pymongo.errors import PyMongoError


def _die_with_parent() -> None:
    """In the child (Linux): get SIGTERM if `innova serve` itself dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedDatabaseError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def secantus_available() -> bool:
    return importlib.util.find_spec("secantus") is not None


class EmbeddedMongo:
    """Start SecantusDB on a free loopback port; `uri` once started."""

    def __init__(self, storage_path: Path | str, *, port: int | None = None, log_path: Path | None = None) -> None:
        self.storage_path = Path(storage_path)
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """The URI for this database, with retryable writes turned off.

        A retryable write only helps when the network drops between a write
        and its reply; a child process on loopback has no such network, only
        a crash that a retry cannot cure. Meanwhile SecantusDB keeps the
        record of every retryable write for 30 minutes (up to 10 000), and
        scans them all on each write, sorting them once the cap is reached:
        measured here, one `update_one` cost 3.6 ms on a fresh database and
        21 ms after 10 000 writes, against a flat 2.3–2.8 ms with
        `retryWrites=false`. A reply sends at least three write commands (its
        slot, its messages, its end), so ~3 000 replies in half an hour reach
        the cap. MongoDB itself (`MONGO_URI`) keeps the driver's default.
        """
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true&retryWrites=false"

    def start(self, timeout: float = 30.0) -> EmbeddedMongo:
        if not secantus_available():
            raise EmbeddedDatabaseError(
                "the embedded database is not installed: pip install 'innova-server[embedded]' "
                "(or set MONGO_URI to a MongoDB server)"
            )
        if str(self.storage_path) != ":memory:":
            self.storage_path.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path or (
            self.storage_path.parent / "secantus.log" if str(self.storage_path) != ":memory:" else None
        )
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        command = [
            sys.executable, "-m", "secantus",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--storage-path", str(self.storage_path),
            "--log-level", "WARNING",
        ]
        # Its own process group: Ctrl-C in `innova serve` reaches us, and we
        # stop the database ourselves after the web server has drained.
        self.process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent
        )
        if out is not subprocess.DEVNULL:
            out.close()  # type: ignore[union-attr]
        self._wait_ready(timeout, log_path)
        return self

    def _wait_ready(self, timeout: float, log_path: Path | None) -> None:
        deadline = time.monotonic() + timeout
        client: MongoClient[dict[str, object]] = MongoClient(self.uri, serverSelectionTimeoutMS=500)
        try:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    where = f"; see {log_path}" if log_path else ""
                    raise EmbeddedDatabaseError(
                        f"the embedded database exited with status {self.process.returncode}{where} "
                        f"(is another `innova serve` using {self.storage_path}?)"
                    )
                with contextlib.suppress(PyMongoError):
                    # Ours, not another server that took the port between
                    # `free_port()` and our bind (parallel test runs do that):
                    # then ours is about to exit, and the next turn says so.
                    status = client.admin.command("serverStatus")
                    if status.get("pid") in (None, self.process.pid):
                        return
                time.sleep(0.1)
        finally:
            client.close()
        self.stop()
        raise EmbeddedDatabaseError(f"the embedded database did not answer within {timeout:.0f}s")

    def stop(self, timeout: float = 15.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)  # SecantusDB checkpoints WiredTiger on SIGTERM
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedMongo:
        return self.start()

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        self.stop()


def default_storage(data_dir: Path) -> Path:
    return Path(os.path.abspath(data_dir)) / "db"
