"""Fire-and-forget work that is never lost silently.

`asyncio.create_task` alone keeps only a weak reference to the task: it can be
garbage-collected mid-flight, and an exception it raises surfaces (if ever)
as "Task exception was never retrieved". `BackgroundTasks` keeps a strong
reference until the task ends, logs and counts every failure
(`innova_background_failures_total{task}`), and on shutdown gives pending
work a grace period before cancelling it; each cancelled task is logged by
name (and a cancelled mail delivery counts as a mail failure, see
`auth.recovery`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from innova_server import metrics

log = logging.getLogger("innova.background")


class BackgroundTasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, name: str, coro: Coroutine[Any, Any, object]) -> asyncio.Task[object]:
        """Run `coro` in the background; `name` is a fixed label (metrics), never user data."""
        task = asyncio.get_running_loop().create_task(coro, name=f"innova:{name}")
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._finished(name, done))
        return task

    def _finished(self, name: str, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            # Not a failure (shutdown cancels what is left), but never silent:
            # the name is a fixed label; a mail task counts its own lost mail.
            log.warning("background task %s cancelled before it finished", name)
            return
        exc = task.exception()
        if exc is not None:
            metrics.BACKGROUND_FAILURES.labels(name).inc()
            # Type only, never the text or traceback: an unexpected exception may
            # quote what it was working on (a reset link, an address, a body).
            log.error("background task %s failed: %s", name, type(exc).__name__)

    async def drain(self, grace_seconds: float = 10.0) -> None:
        """Wait up to `grace_seconds` for pending tasks, then cancel the rest."""
        pending = set(self._tasks)
        if not pending:
            return
        _, still = await asyncio.wait(pending, timeout=grace_seconds)
        for task in still:
            task.cancel()
        if still:
            log.warning("shutdown: cancelled %d unfinished background task(s)", len(still))
            await asyncio.gather(*still, return_exceptions=True)
