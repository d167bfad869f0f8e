"""A conformance suite for chat providers, for third-party plugins to run with pytest.

Subclass `ProviderConformance` in your plugin's tests and supply a factory::

    import pytest
    from innova_server.testing import ErrorCase, ProviderConformance
    from innova_server.chat import ProviderAuthError

    class TestMyProvider(ProviderConformance):
        model = "my-model"

        @pytest.fixture
        def make_provider(self):
            return lambda: MyProvider(api_key="test", base_url=fake_server_url)

        # Optional: the exact reply, when the provider is deterministic.
        def expected_reply(self, request):
            return None

        # Optional: ways to make your provider fail, each with the documented
        # error it must raise (skipped when not supplied).
        @pytest.fixture(params=["bad-key"])
        def error_case(self, request):
            return ErrorCase(lambda: MyProvider(api_key="wrong"), ProviderAuthError)

Each test builds its provider, uses it and closes it inside one event loop
(`asyncio.run`), so providers holding loop-bound clients work, and the suite
needs neither pytest-asyncio nor any other plugin.

What it checks (the provider contract of docs/architecture.md, "Plugins"):
the stream yields text, as `ChatChunk`s or bare `str`s; their
concatenation is the reply; closing the iterator (and cancelling the task
reading it) stops the stream promptly; failures are `ProviderError`
subclasses only, with a known code; `aclose()` is safe twice; the event loop
is never blocked for long; and once `aclose()` returned, the provider's work
has really stopped: within `stop_timeout`, the threads it started have ended
and the asyncio tasks it started are done (the loop's default executor,
shut down by `asyncio.run` itself, is not counted). Override `assert_stopped`
to check more (a subprocess gone, a server that saw the connection close).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from innova_server.chat import ChatChunk, ChatMessage, ChatProvider, ChatRequest, ProviderError, as_chunk
from innova_server.errors import ErrorCode

T = TypeVar("T")

FINISH_REASONS = {"stop", "length", "error", "cancelled"}
PROVIDER_CODES = {code.value for code in ErrorCode if code.value.startswith("provider_")} | {"context_too_long"}


@dataclass(frozen=True)
class ErrorCase:
    """A provider set up to fail, and the documented error it must raise."""

    make_provider: Callable[[], ChatProvider]
    expected: type[ProviderError]
    request: ChatRequest | None = None


# The thread-name prefix of the event loop's default executor (`asyncio.to_thread`,
# DNS lookups): idle workers that `asyncio.run` joins when the loop closes.
# Pools that outlive their work by design: asyncio's default executor and
# AnyIO's worker threads (`anyio.to_thread.run_sync`, kept idle for reuse).
_DEFAULT_EXECUTOR_PREFIX = ("asyncio_", "AnyIO worker thread")


@dataclass(frozen=True)
class _Baseline:
    threads: frozenset[threading.Thread]
    tasks: frozenset[asyncio.Task[Any]]

    @classmethod
    def now(cls) -> _Baseline:
        return cls(frozenset(threading.enumerate()), frozenset(asyncio.all_tasks()))

    def leftovers(self) -> list[str]:
        """What runs now that did not before: threads (but the default executor's) and tasks."""
        threads = [
            f"thread {thread.name!r}"
            for thread in threading.enumerate()
            if thread not in self.threads and thread.is_alive() and not thread.name.startswith(_DEFAULT_EXECUTOR_PREFIX)
        ]
        current = asyncio.current_task()
        tasks = [
            f"task {task.get_name()!r} ({task.get_coro()!r})"
            for task in asyncio.all_tasks()
            if task not in self.tasks and task is not current and not task.done()
        ]
        return threads + tasks


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


class ProviderConformance:
    """Base class of a provider's conformance tests; see the module docstring."""

    #: The model name put in requests.
    model: str = "default"
    #: The prompt of the ordinary requests.
    prompt: str = "Bonjour !\nPeux-tu répondre en quelques mots ? 🙂"
    #: How long a closed or cancelled stream may take to stop.
    stop_timeout: float = 5.0
    #: How long one step of the stream may hold the event loop.
    max_loop_block: float = 0.25
    #: Bound on a whole reply, so a hung provider fails instead of hanging the suite.
    reply_timeout: float = 120.0

    @pytest.fixture
    def make_provider(self) -> Callable[[], ChatProvider]:
        raise NotImplementedError("override the `make_provider` fixture: return a callable that builds the provider")

    @pytest.fixture
    def error_case(self) -> ErrorCase:
        pytest.skip("no error case supplied (override the `error_case` fixture)")

    # -- hooks ----------------------------------------------------------------

    def make_request(self, text: str | None = None, **options: Any) -> ChatRequest:
        return ChatRequest(
            messages=[ChatMessage("system", "Réponds brièvement."), ChatMessage("user", text or self.prompt)],
            model=self.model,
            **options,
        )

    def expected_reply(self, request: ChatRequest) -> str | None:
        """The exact reply to `request` if the provider is deterministic, else None."""
        return None

    # -- helpers ----------------------------------------------------------------

    async def _collect(self, provider: ChatProvider, request: ChatRequest) -> list[ChatChunk]:
        chunks: list[ChatChunk] = []
        async with asyncio.timeout(self.reply_timeout):
            async for item in provider.stream(request):
                assert isinstance(item, ChatChunk | str), f"stream() yielded {type(item).__name__}"
                chunks.append(as_chunk(item))
        return chunks

    async def _with_provider(
        self, make_provider: Callable[[], ChatProvider], body: Callable[[ChatProvider], Awaitable[T]]
    ) -> T:
        baseline = _Baseline.now()
        provider = make_provider()
        try:
            result = await body(provider)
        finally:
            await provider.aclose()
        await self._check_stopped(provider, baseline)
        return result

    async def _check_stopped(self, provider: ChatProvider, baseline: _Baseline) -> None:
        deadline = time.monotonic() + self.stop_timeout
        # Polling: a thread ending signals nothing one could await.
        while (leftovers := baseline.leftovers()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        assert not leftovers, f"still running {self.stop_timeout}s after aclose(): {', '.join(leftovers)}"
        checked = self.assert_stopped(provider)
        if inspect.isawaitable(checked):
            await checked

    def assert_stopped(self, provider: ChatProvider) -> Awaitable[None] | None:
        """Hook: after `aclose()` (and the thread/task check), assert the provider's work stopped.

        May be a plain method or `async def`; the default checks nothing more.
        """
        return None

    # -- the suite ----------------------------------------------------------------

    def test_implements_the_protocol(self, make_provider: Callable[[], ChatProvider]) -> None:
        async def body(provider: ChatProvider) -> None:
            assert isinstance(provider, ChatProvider)
            stream = provider.stream(self.make_request())
            assert isinstance(stream, AsyncIterator), "stream() must return an async iterator"
            await _close(stream)

        _run(lambda: self._with_provider(make_provider, body))

    def test_streams_text_chunks(self, make_provider: Callable[[], ChatProvider]) -> None:
        chunks = _run(lambda: self._with_provider(make_provider, lambda p: self._collect(p, self.make_request())))
        assert chunks, "the stream yielded nothing"
        assert all(isinstance(chunk, ChatChunk) for chunk in chunks)
        assert all(isinstance(chunk.text, str) for chunk in chunks)
        assert "".join(chunk.text for chunk in chunks), "the reply is empty"
        for chunk in chunks:
            assert chunk.finish_reason is None or chunk.finish_reason in FINISH_REASONS
            if chunk.usage is not None:
                assert chunk.usage.prompt_tokens >= 0 and chunk.usage.completion_tokens >= 0
        finished = [index for index, chunk in enumerate(chunks) if chunk.finish_reason]
        if finished:
            assert all(not chunk.text for chunk in chunks[finished[0] + 1 :]), "text after the finish_reason"

    def test_concatenation_is_the_reply(self, make_provider: Callable[[], ChatProvider]) -> None:
        request = self.make_request()
        chunks = _run(lambda: self._with_provider(make_provider, lambda p: self._collect(p, request)))
        reply = "".join(chunk.text for chunk in chunks)
        expected = self.expected_reply(request)
        if expected is not None:
            assert reply == expected
        else:
            assert reply.strip(), "the reply is empty"

    def test_closing_the_iterator_stops_the_stream(self, make_provider: Callable[[], ChatProvider]) -> None:
        async def body(provider: ChatProvider) -> None:
            stream = provider.stream(self.make_request())
            first = await asyncio.wait_for(anext(stream), self.reply_timeout)
            assert isinstance(first, ChatChunk | str)
            started = time.monotonic()
            await asyncio.wait_for(_close(stream), self.stop_timeout)
            assert time.monotonic() - started < self.stop_timeout
            with pytest.raises(StopAsyncIteration):
                await anext(stream)
            # The provider is still usable after a cancelled stream.
            again = await self._collect(provider, self.make_request())
            assert "".join(chunk.text for chunk in again)

        _run(lambda: self._with_provider(make_provider, body))

    def test_cancelling_the_reading_task_stops_the_stream(self, make_provider: Callable[[], ChatProvider]) -> None:
        async def body(provider: ChatProvider) -> None:
            first_chunk = asyncio.Event()

            async def read() -> None:
                async for _ in provider.stream(self.make_request()):
                    first_chunk.set()
                    await asyncio.sleep(0)

            task = asyncio.create_task(read())
            waiter = asyncio.create_task(first_chunk.wait())
            await asyncio.wait({task, waiter}, timeout=self.reply_timeout, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=self.stop_timeout)
            assert done, "the stream did not stop after its task was cancelled"

        _run(lambda: self._with_provider(make_provider, body))

    def test_raises_only_documented_errors(self, error_case: ErrorCase) -> None:
        async def body(provider: ChatProvider) -> BaseException | None:
            try:
                await self._collect(provider, error_case.request or self.make_request())
            except Exception as exc:
                return exc
            return None

        error = _run(lambda: self._with_provider(error_case.make_provider, body))
        assert error is not None, f"expected {error_case.expected.__name__}, the stream ended normally"
        assert isinstance(error, ProviderError), f"undocumented error {type(error).__name__}: {error}"
        assert isinstance(error, error_case.expected), f"expected {error_case.expected.__name__}, got {error!r}"
        assert error.code in PROVIDER_CODES
        assert isinstance(error.message, str) and error.message
        assert isinstance(error.retryable, bool)

    def test_aclose_is_safe_twice(self, make_provider: Callable[[], ChatProvider]) -> None:
        async def body() -> None:
            baseline = _Baseline.now()
            provider = make_provider()
            await self._collect(provider, self.make_request())
            await provider.aclose()
            await provider.aclose()
            await self._check_stopped(provider, baseline)
            unused = make_provider()
            await unused.aclose()
            await unused.aclose()
            await self._check_stopped(unused, baseline)

        _run(body)

    def test_never_blocks_the_event_loop(self, make_provider: Callable[[], ChatProvider]) -> None:
        async def body(provider: ChatProvider) -> float:
            worst = 0.0
            stop = asyncio.Event()

            async def ticker() -> None:
                nonlocal worst
                last = time.monotonic()
                while not stop.is_set():
                    await asyncio.sleep(0.005)
                    now = time.monotonic()
                    worst = max(worst, now - last)
                    last = now

            tick = asyncio.create_task(ticker())
            await asyncio.sleep(0.01)
            try:
                await self._collect(provider, self.make_request())
            finally:
                stop.set()
                await tick
            return worst

        worst = _run(lambda: self._with_provider(make_provider, body))
        assert worst < self.max_loop_block, f"the event loop was blocked for {worst:.3f}s"


async def _close(stream: AsyncIterator[ChatChunk]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


__all__ = ["ErrorCase", "ProviderConformance"]
