"""Request pacing: a burst of new requests starts a few per event-loop iteration, not all in one.

uvicorn creates a task per request as soon as its headers are parsed. When a
thousand arrive together (a front end reconnecting its users after a network
blip, a balancer moving a host's traffic, the burst benchmark), the next
iteration of the event loop runs the first step of every one of them back to
back: middleware, routing, dependencies, up to each request's first database
wait. Measured with 1 000 chat streams fired at once at one worker: one such
iteration took 0.55–0.78 s, during which no timer fired, no reply was streamed and
no probe was answered (benchmarks/README.md, "A burst of streams").

`RequestPacer` lets `per_iteration` requests start per iteration and queues
the rest in arrival order; the loop turns between batches. The total work is
the same and a lone request never waits (it passes straight through); what
changes is that nothing else waits half a second for the loop. The probes are
not paced: `/health/live` is answered before this middleware, and `/health`
is exempt, so both still answer during the burst they are there to survive.

The wait is inside `MetricsMiddleware`, so the latency histogram includes it,
and `/health/live` reports how many requests are waiting to start.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from starlette.types import ASGIApp, Receive, Scope, Send

# A request's first step took ~0.75 ms in the burst above (756 ms for 1 000,
# on a machine the burst saturated); 16 per iteration keeps an iteration's
# share of them near 10 ms.
PER_ITERATION = 16


class IterationGate:
    """At most `per_iteration` callers pass per event-loop iteration; the others wait, first come first served."""

    def __init__(self, per_iteration: int = PER_ITERATION) -> None:
        if per_iteration < 1:
            raise ValueError("per_iteration must be at least 1")
        self.per_iteration = per_iteration
        self._passed = 0  # passes granted since the last turn of the loop
        self._waiters: deque[asyncio.Future[None]] = deque()
        # The loop a turn is due on; None when idle. A pass granted or a
        # waiter queued always has a turn due, so None means a clean state.
        self._turn_due_on: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def enter(self) -> None:
        loop = asyncio.get_running_loop()
        if self._turn_due_on is not None and self._turn_due_on is not loop:
            # That loop stopped before its turn ran (an app served again on a
            # new loop, in tests): what waited there waits no more.
            self._passed, self._waiters, self._turn_due_on = 0, deque(), None
        self._schedule_turn(loop)
        if not self._waiters and self._passed < self.per_iteration:
            self._passed += 1
            return
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                # Still queued (the client went away): leave the queue. A
                # waiter already granted its pass simply does not use it.
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _schedule_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._turn_due_on is None:
            self._turn_due_on = loop
            # `call_soon` from inside a callback runs in the *next* iteration:
            # the callbacks of this one are already counted.
            loop.call_soon(self._turn, loop)

    def _turn(self, loop: asyncio.AbstractEventLoop) -> None:
        """Once per iteration while there is traffic: a fresh allowance, handed to the oldest waiters first."""
        if loop is not self._turn_due_on:
            return  # due on a loop the gate has since left
        self._turn_due_on = None
        self._passed = 0
        while self._waiters and self._passed < self.per_iteration:
            waiter = self._waiters.popleft()
            if waiter.done():  # cancelled while queued
                continue
            waiter.set_result(None)
            self._passed += 1
        if self._waiters or self._passed:
            self._schedule_turn(loop)


class RequestPacer:
    """ASGI middleware: every HTTP request but the exempt paths passes an `IterationGate` before anything else."""

    def __init__(
        self, app: ASGIApp, *, gate: IterationGate | None = None, exempt: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.exempt = exempt
        self.gate = gate if gate is not None else IterationGate()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.exempt:
            await self.gate.enter()
        await self.app(scope, receive, send)


__all__ = ["PER_ITERATION", "IterationGate", "RequestPacer"]
