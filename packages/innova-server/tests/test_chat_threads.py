"""Helpers for provider authors: `iterate_in_thread` (blocking work) and `error_for_status` (HTTP APIs).

A blocking "model" runs in a thread; closing the async side must stop it
between two tokens and close it, and the event loop must stay free.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from innova_server.chat import (
    ChatChunk,
    ChatProvider,
    ChatRequest,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    Usage,
    error_for_status,
    iterate_in_thread,
    parse_retry_after,
)
from innova_server.testing import ErrorCase, ProviderConformance


class BlockingModel:
    """Generates tokens with blocking sleeps, like llama.cpp between two tokens."""

    def __init__(self, tokens: int = 1000, seconds_per_token: float = 0.01, fail_after: int | None = None) -> None:
        self.tokens = tokens
        self.seconds = seconds_per_token
        self.fail_after = fail_after
        self.produced = 0
        self.closed = threading.Event()
        self.thread_names: set[str] = set()

    def generate(self) -> Iterator[str]:
        try:
            for index in range(self.tokens):
                self.thread_names.add(threading.current_thread().name)
                if self.fail_after is not None and index == self.fail_after:
                    raise ProviderTimeout("the model took too long")
                time.sleep(self.seconds)  # blocking, on purpose
                self.produced += 1
                yield f"t{index} "
        finally:
            self.closed.set()


class ThreadedProvider:
    """A provider shaped like the local-model plugin: blocking work in a thread."""

    def __init__(self, model: BlockingModel) -> None:
        self.model = model

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        count = 0
        # aclosing: when the core closes *this* generator, the thread's is closed at once too.
        async with contextlib.aclosing(iterate_in_thread(self.model.generate)) as tokens:
            async for token in tokens:
                count += 1
                yield ChatChunk(text=token)
        yield ChatChunk(finish_reason="stop", usage=Usage(len(request.messages), count))

    async def aclose(self) -> None:
        return None


def test_tokens_arrive_from_a_thread_without_blocking_the_loop():
    model = BlockingModel(tokens=20, seconds_per_token=0.01)

    async def run() -> tuple[list[str], float]:
        worst, last, stop = 0.0, time.monotonic(), asyncio.Event()

        async def ticker() -> None:
            nonlocal worst, last
            while not stop.is_set():
                await asyncio.sleep(0.002)
                worst = max(worst, time.monotonic() - last)
                last = time.monotonic()

        tick = asyncio.create_task(ticker())
        tokens = [token async for token in iterate_in_thread(model.generate)]
        stop.set()
        await tick
        return tokens, worst

    tokens, worst = asyncio.run(run())
    assert tokens == [f"t{i} " for i in range(20)]
    assert worst < 0.05
    assert model.thread_names == {"innova-provider"}
    assert model.closed.is_set()


def test_closing_stops_the_thread_between_two_tokens():
    model = BlockingModel(tokens=10_000, seconds_per_token=0.01)

    async def run() -> None:
        stream = iterate_in_thread(model.generate, max_buffer=4)
        assert await anext(stream) == "t0 "
        await stream.aclose()

    asyncio.run(run())
    assert model.closed.wait(2), "the blocking iterator was not closed"
    produced = model.produced
    time.sleep(0.2)
    assert model.produced == produced < 50


def test_back_pressure_bounds_what_runs_ahead():
    model = BlockingModel(tokens=10_000, seconds_per_token=0.0)

    async def run() -> None:
        stream = iterate_in_thread(model.generate, max_buffer=8)
        await anext(stream)
        await asyncio.sleep(0.2)
        assert model.produced <= 8 + 2
        await stream.aclose()

    asyncio.run(run())
    assert model.closed.wait(2)


def test_by_default_the_thread_computes_only_what_is_asked_for():
    # Lockstep: the loop's per-token work never overlaps the model's (README of smollm: ≈ 25% of tokens/s).
    model = BlockingModel(tokens=10_000, seconds_per_token=0.0)

    async def run() -> None:
        stream = iterate_in_thread(model.generate)
        assert await anext(stream) == "t0 "
        await asyncio.sleep(0.2)
        assert model.produced == 1
        assert await anext(stream) == "t1 "
        await asyncio.sleep(0.1)
        assert model.produced == 2
        await stream.aclose()

    asyncio.run(run())
    assert model.closed.wait(2)


@pytest.mark.parametrize("max_buffer", [0, 4])
def test_on_exit_runs_in_the_thread_after_the_iterator_is_closed(max_buffer):
    # However the work ends: finished, failed, or abandoned by the reader.
    async def run(model: BlockingModel, take: int | None) -> list[tuple[str, bool]]:
        exits: list[tuple[str, bool]] = []
        done = threading.Event()

        def on_exit() -> None:
            exits.append((threading.current_thread().name, model.closed.is_set()))
            done.set()

        stream = iterate_in_thread(model.generate, max_buffer=max_buffer, on_exit=on_exit)
        try:
            count = 0
            async for _ in stream:
                count += 1
                if take is not None and count == take:
                    break
            if take is None:
                assert exits, "the end was handed over before on_exit ran"
        except ProviderTimeout:
            assert exits, "the error was handed over before on_exit ran"
        finally:
            await stream.aclose()
        assert await asyncio.to_thread(done.wait, 2)
        return exits

    finished = asyncio.run(run(BlockingModel(tokens=3, seconds_per_token=0.0), None))
    failed = asyncio.run(run(BlockingModel(tokens=10, seconds_per_token=0.0, fail_after=2), None))
    abandoned = asyncio.run(run(BlockingModel(tokens=10_000, seconds_per_token=0.001), 2))
    for exits in (finished, failed, abandoned):
        assert exits == [("innova-provider", True)]


def test_errors_in_the_thread_are_reraised_unchanged():
    model = BlockingModel(tokens=10, seconds_per_token=0.0, fail_after=3)

    async def run() -> list[str]:
        tokens: list[str] = []
        async for token in iterate_in_thread(model.generate):
            tokens.append(token)
        return tokens

    with pytest.raises(ProviderTimeout, match="took too long"):
        asyncio.run(run())


class TestThreadedProviderConformance(ProviderConformance):
    """The conformance suite holds for a blocking provider built on `iterate_in_thread`."""

    @pytest.fixture
    def make_provider(self) -> Callable[[], ChatProvider]:
        return lambda: ThreadedProvider(BlockingModel(tokens=30, seconds_per_token=0.002))

    def expected_reply(self, request: ChatRequest) -> str | None:
        return "".join(f"t{i} " for i in range(30))

    @pytest.fixture
    def error_case(self) -> ErrorCase:
        return ErrorCase(lambda: ThreadedProvider(BlockingModel(tokens=5, fail_after=2)), ProviderTimeout)


@pytest.mark.parametrize(
    ("status", "expected", "retryable"),
    [
        (401, "provider_auth", False),
        (403, "provider_auth", False),
        (429, "provider_rate_limited", True),
        (408, "provider_timeout", True),
        (504, "provider_timeout", True),
        (413, "context_too_long", False),
        (500, "provider_unavailable", True),
        (503, "provider_unavailable", True),
        (400, "provider_unavailable", False),
        (404, "provider_unavailable", False),
    ],
)
def test_error_for_status_maps_http_statuses(status, expected, retryable):
    error = error_for_status(status, retry_after=parse_retry_after("12"))
    assert isinstance(error, ProviderError)
    assert error.code == expected and error.retryable is retryable
    if status == 429:
        assert isinstance(error, ProviderRateLimited) and error.retry_after == 12.0
    assert error_for_status(status, message="détail").message == "détail"


def test_parse_retry_after():
    assert parse_retry_after(" 3 ") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("-1") is None
    assert parse_retry_after(None) is None
