"""How many turns a worker opens at once.

Opening a turn is a few database rounds (see `chatlaya.replies`). A burst of
a thousand sends fired at once otherwise starts a thousand openings together:
their rounds interleave in the database's queue, every one of them finishes
late (the median opened after 22 s, the last after 30 s, some timed out
waiting for a connection), and the health probe waited behind them. Bounded,
openings finish in the order they came, and the pool keeps room for the
streams already running (checkpoints, final writes).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Openings:
    """At most `limit` turns opening at once; the others wait, first come first served."""

    def __init__(self, limit: int) -> None:
        self._semaphore = asyncio.Semaphore(limit)
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._semaphore.release()


__all__ = ["Openings"]
