"""Admission to the model: `capacity` requests run at once, the others wait in strict arrival order.

With `SMOLLM_PARALLEL=1` the capacity is one (a `Llama` object serves one
generation at a time); with N it is the N sequences the batch decoder holds.
Either way a newcomer never overtakes the queue, and the provider can tell
how many are waiting (for `SMOLLM_MAX_QUEUE` and `Retry-After`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class FifoSlots:
    """An asyncio semaphore that is strictly first-come first-served and tells how many are waiting.

    Release hands the freed slot straight to the oldest waiter, so a newcomer
    can never overtake the queue between a release and the waiter waking up.
    """

    def __init__(self, capacity: int = 1) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def held(self) -> bool:
        """At least one slot is taken."""
        return self._in_use > 0

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def full(self) -> bool:
        return self._in_use >= self.capacity

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def acquire(self) -> None:
        if not self.full and not self._waiters:
            self._in_use += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed to us just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # still in use: handed over
                return
        self._in_use -= 1


class FifoSlot(FifoSlots):
    """One slot: the lock of `SMOLLM_PARALLEL=1`."""

    def __init__(self) -> None:
        super().__init__(1)


__all__ = ["FifoSlot", "FifoSlots"]
