"""Request pacing: a burst starts a few requests per event-loop iteration, in arrival order, and loses none."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest

from innova_server.app import create_app
from innova_server.pacing import IterationGate, RequestPacer


class Ticker:
    """Counts the event loop's iterations: a callback that re-schedules itself runs once per iteration."""

    def __init__(self) -> None:
        self.iteration = 0
        self._stopped = False

    def start(self) -> None:
        asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._stopped = True

    def _tick(self) -> None:
        if not self._stopped:
            self.iteration += 1
            asyncio.get_running_loop().call_soon(self._tick)


def test_a_burst_passes_a_few_per_iteration_in_arrival_order():
    async def main() -> tuple[list[int], list[int]]:
        gate, ticker = IterationGate(per_iteration=3), Ticker()
        ticker.start()
        order: list[int] = []
        iterations: list[int] = []

        async def request(n: int) -> None:
            await gate.enter()
            order.append(n)
            iterations.append(ticker.iteration)

        await asyncio.gather(*(request(n) for n in range(20)))
        ticker.stop()
        assert gate.waiting == 0
        return order, iterations

    order, iterations = asyncio.run(main())
    assert order == list(range(20))
    per_iteration = Counter(iterations)
    assert max(per_iteration.values()) <= 3
    assert len(per_iteration) >= 7  # 20 requests, 3 at a time


def test_a_lone_request_passes_without_waiting_for_the_loop():
    async def main() -> None:
        gate = IterationGate(per_iteration=2)
        for _ in range(5):
            entering = gate.enter()
            with pytest.raises(StopIteration):
                entering.send(None)  # passes at once, without suspending
            await asyncio.sleep(0)  # the loop turns: a fresh allowance

        # Three arriving in one iteration: two pass in it, the third when the loop has turned.
        ticker = Ticker()
        ticker.start()
        passed_at: list[int] = []

        async def request() -> None:
            await gate.enter()
            passed_at.append(ticker.iteration)

        await asyncio.gather(*(request() for _ in range(3)))
        ticker.stop()
        assert passed_at[0] == passed_at[1] < passed_at[2]

    asyncio.run(main())


def test_a_request_cancelled_while_queued_leaves_the_queue_and_holds_nobody_up():
    async def main() -> list[int]:
        gate = IterationGate(per_iteration=1)
        passed: list[int] = []

        async def request(n: int) -> None:
            await gate.enter()
            passed.append(n)

        tasks = [asyncio.create_task(request(n)) for n in range(6)]
        await asyncio.sleep(0)  # all have arrived; one passed, five queued
        tasks[3].cancel()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2)
        assert isinstance(results[3], asyncio.CancelledError)
        assert gate.waiting == 0
        return passed

    assert asyncio.run(main()) == [0, 1, 2, 4, 5]


def test_the_gate_works_again_on_a_new_loop():
    """An app served again on another loop (tests, a restarted server): a turn left scheduled on the closed
    loop must not leave the gate believing the allowance is spent."""
    gate = IterationGate(per_iteration=2)

    async def burst() -> None:
        await asyncio.wait_for(asyncio.gather(*(gate.enter() for _ in range(7))), 2)

    async def leave_a_turn_pending() -> None:
        await gate.enter()
        await gate.enter()  # allowance spent; the loop closes before its turn runs

    asyncio.run(leave_a_turn_pending())
    asyncio.run(burst())
    asyncio.run(burst())


def test_the_exempt_paths_pass_while_a_burst_is_queued():
    """`/health` is answered in the iteration it arrives in, even behind a hundred queued requests."""

    async def main() -> None:
        ticker = Ticker()
        reached: dict[str, list[int]] = {"/chatlaya/message": [], "/health": []}

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            reached[scope["path"]].append(ticker.iteration)

        pacer = RequestPacer(app, gate=IterationGate(per_iteration=4), exempt=frozenset({"/health"}))

        async def call(path: str) -> None:
            await pacer({"type": "http", "path": path}, None, None)

        ticker.start()
        burst = [asyncio.create_task(call("/chatlaya/message")) for _ in range(100)]
        await asyncio.sleep(0)
        arrived = ticker.iteration
        await call("/health")
        assert reached["/health"] == [arrived]
        assert pacer.gate.waiting > 50
        await asyncio.gather(*burst)
        ticker.stop()
        assert len(reached["/chatlaya/message"]) == 100
        assert max(Counter(reached["/chatlaya/message"]).values()) <= 4

    asyncio.run(main())


def test_the_app_paces_every_request_but_the_probes(settings):
    app = create_app(settings)
    pacers = [m for m in app.user_middleware if m.cls is RequestPacer]
    assert len(pacers) == 1
    assert pacers[0].kwargs["exempt"] == frozenset({"/health"})
    assert pacers[0].kwargs["gate"] is app.state.request_gate  # what /health/live reports
    # Inside the metrics middleware (its latency includes the wait), outside everything else.
    names = [m.cls.__name__ for m in app.user_middleware]
    assert names.index("MetricsMiddleware") < names.index("RequestPacer") < names.index("CORSMiddleware")


def test_a_stampede_of_requests_is_answered_whole(server):
    """Two hundred requests at once through the real server: every one gets its own, normal answer."""

    async def stampede() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:
            return await asyncio.gather(
                *(client.get("/auth/me") for _ in range(150)), *(client.get("/health") for _ in range(50))
            )

    answers = asyncio.run(stampede())
    assert [a.status_code for a in answers[:150]] == [401] * 150
    assert all(a.json()["detail"]["code"] == "not_authenticated" for a in answers[:150])
    assert [a.status_code for a in answers[150:]] == [200] * 50
