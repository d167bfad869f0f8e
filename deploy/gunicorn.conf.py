"""Gunicorn configuration for the INNOVAPLUS backend (`innova_server.asgi:app`).

Used by deploy/systemd/innovaplus-backend.service:

    gunicorn -c /opt/innovaplus/backend/deploy/gunicorn.conf.py innova_server.asgi:app

Everything comes from the environment (systemd's EnvironmentFile
/etc/innovaplus/backend.env), with production defaults:

- HOST / PORT (packages/innova-server/README.md, "Configuration"): bind address, default 127.0.0.1:8000. nginx is the
  only thing that talks to it; never bind a public address.
- WEB_CONCURRENCY: number of worker processes (default: number of CPUs, at
  least 2). Workers are asynchronous (uvicorn): one per core is enough;
  each argon2 hash needs ARGON2_MEMORY_COST KiB of RAM while it runs.
- GUNICORN_TIMEOUT, GUNICORN_GRACEFUL_TIMEOUT, GUNICORN_KEEPALIVE: see below.
- TRUSTED_PROXIES: who may set X-Forwarded-For/-Proto (forwarded_allow_ips).
- PROMETHEUS_MULTIPROC_DIR: where the workers' metric files go; the unit sets
  it to /run/innovaplus-backend. Without it a private temporary directory is
  made. Either way it is emptied when gunicorn starts.

Command-line options override this file (the tests use `--bind`).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import sys
import tempfile

from gunicorn import glogging


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def _bind_address() -> str:
    host = os.environ.get("HOST", "").strip() or "127.0.0.1"
    port = _int("PORT", 8000)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


# -- where and how many ---------------------------------------------------------

def _binds() -> list[str]:
    """HOST:PORT, and also 127.0.0.1:PORT when HOST is a private address (several
    hosts): the deploy's health check and a local scrape of /metrics ask loopback."""
    host = os.environ.get("HOST", "").strip() or "127.0.0.1"
    binds = [_bind_address()]
    if host not in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::"):
        binds.append(f"127.0.0.1:{_int('PORT', 8000)}")
    return binds


wsgi_app = "innova_server.asgi:app"
bind = _binds()
worker_class = "uvicorn_worker.UvicornWorker"
workers = max(1, _int("WEB_CONCURRENCY", max(2, os.cpu_count() or 1)))
proc_name = "innovaplus-backend"
# The app is imported in each worker, not in the master: a configuration
# error makes every worker exit with status 3 and gunicorn stop (no
# respawn loop), and `systemctl restart` always loads fresh code.
preload_app = False

# gunicorn's control socket (`gunicornc`, in $HOME/.gunicorn): not used, the
# unit drives gunicorn with signals (reload = SIGHUP); one thing less listening.
control_socket_disable = True

# -- timeouts ---------------------------------------------------------------------
# With uvicorn workers `timeout` is NOT a request timeout: it is the
# heartbeat. A worker whose event loop has not checked in for `timeout`
# seconds is killed and replaced. A chat stream (SSE) may last minutes; it
# never blocks the loop, so it is never cut by this. nginx's
# proxy_read_timeout for /chatlaya/message bounds the silence on a stream
# (the app sends a `: ping` every 15 s).
timeout = _int("GUNICORN_TIMEOUT", 60)
# On stop/restart (SIGTERM) workers stop accepting, let running requests
# and streams finish for up to this long, then are killed. The unit's
# TimeoutStopSec is larger.
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 30)
# Idle keep-alive between nginx and the workers: longer than nginx's
# upstream keepalive_timeout (60 s) so nginx always closes first.
keepalive = _int("GUNICORN_KEEPALIVE", 75)

# -- proxy ------------------------------------------------------------------------
# X-Forwarded-For / X-Forwarded-Proto are believed only from the proxies in
# TRUSTED_PROXIES (addresses or networks, comma-separated; default nginx on
# loopback), the same list the app applies to the client address. On a host
# behind nginx on another machine, that machine's private address goes there.
_TRUSTED = os.environ.get("TRUSTED_PROXIES", "").strip() or "127.0.0.1,::1"
forwarded_allow_ips = ",".join(item.strip() for item in _TRUSTED.split(",") if item.strip())

# -- logs: stdout/stderr, collected by journald -------------------------------------
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"'


# Under systemd each line starts with its syslog priority (`<3>` for an
# error...), which journald stores as the entry's priority: `journalctl -p
# warning` then shows gunicorn's warnings and errors (a worker timeout, a
# boot failure) with the app's. The app's own lines get the same from
# innova_server.logconfig; that module is not imported here, in the master,
# so that a reload (SIGHUP: new workers forked from this master) never hands
# the new workers a module of the previous release.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def _to_journal(stream: object) -> bool:
    """`stream` is the journald socket of JOURNAL_STREAM ("dev:inode", set by systemd)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(stream.fileno())  # type: ignore[attr-defined]
    except (OSError, ValueError, AttributeError):
        return False
    return ":" in expected and expected == f"{info.st_dev}:{info.st_ino}"


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in _PRIORITIES if record.levelno >= level), 7)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines() or [""])


class JournalLogger(glogging.Logger):  # type: ignore[misc]
    """gunicorn's logger, its lines on journald prefixed with their priority."""

    def _set_handler(self, log: object, output: str | None, fmt: logging.Formatter, stream: object = None) -> None:
        if output == "-" and _to_journal(stream or sys.stderr):
            fmt = _JournalFormatter(fmt._fmt, fmt.datefmt)
        super()._set_handler(log, output, fmt, stream)


logger_class = JournalLogger
# Worker heartbeat files in RAM (/dev/shm stays writable under ProtectSystem=strict).
_SHM = "/dev/shm"  # noqa: S108 - gunicorn's documented choice, not a temp file name
worker_tmp_dir = _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None

# -- Prometheus multiprocess mode -----------------------------------------------------
# PROMETHEUS_MULTIPROC_DIR must be in the environment before a worker imports
# prometheus_client: on_starting runs in the master before any worker forks.


def on_starting(server: object) -> None:
    """Once, in the master, before any worker: an empty metrics directory."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        directory = tempfile.mkdtemp(prefix="innova-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        os.environ["INNOVA_METRICS_DIR_TEMPORARY"] = "1"  # ours: removed on exit
    os.makedirs(directory, exist_ok=True)
    for path in glob.glob(os.path.join(directory, "*.db")):
        os.remove(path)


def child_exit(server: object, worker: object) -> None:
    """A worker is gone: fold its live gauges out of /metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]


def on_exit(server: object) -> None:
    if os.environ.get("INNOVA_METRICS_DIR_TEMPORARY") == "1":
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
