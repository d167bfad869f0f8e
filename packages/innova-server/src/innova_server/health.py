"""Health probes: `GET /health/live` (is this process serving?) and `GET /health` (may it get traffic?).

Both answer without waiting on anything that a burst of requests queues on.
Under a burst, the application's MongoDB pool has hundreds of operations
waiting and the event loop is busy; a probe that pinged per request through
that pool took seconds to answer (7 s at p99 during a burst of 1 000 streams),
and a load balancer or the deploy's health poll then took the host out of
service exactly when it was busiest.

- **Liveness** (`/health/live`) is answered at the outermost layer of the app,
  before any middleware, with no database and no I/O: it proves the process
  and its event loop turn. It reports the loop's lag (how late a timer fires),
  the replies this process is generating, the turns waiting to open and the
  requests waiting to start (`pacing.py`). Use it
  for restarts (systemd, a container runtime): restarting a busy host helps no one.
- **Readiness** (`/health`) is 200 while the database answered this worker's
  most recent ping, at most `STALE_AFTER` seconds ago; 503 otherwise. The pings
  run in the background, every `INTERVAL`, over their own connection
  (`Database.probe_client`), so a ping is never queued behind the
  application's traffic, and the probe itself never waits for one (but the
  very first, before the monitor has an answer). Use it for a load balancer's
  pool and the deploy's health poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from innova_server import __version__, metrics

if TYPE_CHECKING:
    from innova_server.db import Database

log = logging.getLogger("innova")
router = APIRouter(tags=["operations"])

LIVE_PATH = "/health/live"
INTERVAL = 1.0  # seconds between two pings of one worker
PING_TIMEOUT = 2.0
# Readiness turns 503 when no ping has answered for this long: the last one
# failed, or one is stuck (a stalled server answers nothing, not an error).
STALE_AFTER = INTERVAL + PING_TIMEOUT


class HealthMonitor:
    """A worker's view of its database, kept fresh in the background, and its event loop's lag."""

    def __init__(self, db: Database, *, interval: float = INTERVAL, timeout: float = PING_TIMEOUT) -> None:
        self.db = db
        self.interval = interval
        self.timeout = timeout
        self.stale_after = interval + timeout
        self.loop_lag = 0.0
        self._answered_at: float | None = None  # loop time of the last successful ping
        self._last_ok = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="health-monitor")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self._ping()
            except Exception:  # `ping` never raises; if it did, readiness goes stale (503), not silent
                log.exception("health monitor: ping failed unexpectedly")
            before = loop.time()
            await asyncio.sleep(self.interval)
            self.loop_lag = max(0.0, loop.time() - before - self.interval)
            metrics.EVENT_LOOP_LAG.set(self.loop_lag)

    async def _ping(self) -> bool:
        ok = await self.db.shared_ping(self.timeout)
        self._last_ok = ok
        if ok:
            self._answered_at = asyncio.get_running_loop().time()
        return ok

    async def ready(self) -> bool:
        """Did the database answer this worker's last ping, at most `stale_after` seconds ago?"""
        if self._answered_at is None or self._task is None or self._task.done():
            # Nothing answered yet (starting, or never reached), or no monitor
            # running (an app served without its lifespan): ask now.
            return await self._ping()
        age = asyncio.get_running_loop().time() - self._answered_at
        return self._last_ok and age <= self.stale_after


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    services = request.app.state.services
    mongo_ok = await services.health.ready()
    body = {
        "status": "ok" if mongo_ok else "error",
        "mongo": "ok" if mongo_ok else "error",
        "version": __version__,
        "provider": services.provider_entry.name,
    }
    return JSONResponse(body, status_code=200 if mongo_ok else 503, headers={"Cache-Control": "no-store"})


class LivenessProbe:
    """Answers `GET /health/live` before anything else runs (outermost middleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != LIVE_PATH or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        services = scope["app"].state.services
        body = json.dumps(
            {
                "status": "ok",
                "version": __version__,
                "loop_lag_ms": round(services.health.loop_lag * 1000, 1),
                "replies_generating": len(services.turns),
                "turns_waiting_to_open": services.openings.waiting,
                "requests_waiting_to_start": scope["app"].state.request_gate.waiting,
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
