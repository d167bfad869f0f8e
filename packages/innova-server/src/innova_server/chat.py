"""The chat provider interface: what a provider plugin implements.

A provider only produces text. The core does everything else: history,
persistence, SSE framing, pings, rate limits, metrics.

Cancellation is closing the iterator (`await stream.aclose()`, which the core
does when the client goes away): the provider must then stop its work — close
its HTTP stream, or stop the model between two tokens. Blocking work (a local
model) runs in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar, cast, runtime_checkable

T = TypeVar("T")

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "error", "cancelled"]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True)
class ChatRequest:
    messages: list[ChatMessage]
    model: str
    max_tokens: int = 512
    temperature: float = 0.7


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ChatChunk:
    """A piece of the reply. The last chunk may carry only `finish_reason`/`usage`."""

    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@runtime_checkable
class ChatProvider(Protocol):
    def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        """An async generator of chunks; raises only `ProviderError` subclasses."""
        ...

    async def aclose(self) -> None:
        """Release clients, threads, models. Safe to call twice."""
        ...


# -- blocking producers ----------------------------------------------------

_DONE = object()


async def iterate_in_thread(
    make_iterator: Callable[[], Iterator[T]], *, max_buffer: int = 64
) -> AsyncGenerator[T, None]:
    """Run a blocking iterator (a local model's token loop) in its own thread, as an async generator.

    For providers whose work blocks: the event loop only ever awaits a queue.
    Closing this generator (what the core does when the client leaves) sets a
    flag the thread checks between two items, and the blocking iterator is
    closed in its own thread — so a model stops after its current token.
    `make_iterator` runs in the thread too (loading a model blocks as well).
    Exceptions raised in the thread are re-raised here, unchanged. A
    dedicated thread, not the default executor: a long generation must not
    hold a slot that password hashing needs.

    Inside a provider's own generator, wrap it in `contextlib.aclosing(...)`
    so that closing the provider's stream closes this one at once::

        async with contextlib.aclosing(iterate_in_thread(lambda: model.generate(prompt))) as tokens:
            async for token in tokens:
                yield ChatChunk(text=token)
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue()
    stop = threading.Event()
    space = threading.Semaphore(max_buffer)  # back-pressure: a slow client slows the model

    def deliver(item: object, error: BaseException | None = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))

    def work() -> None:
        iterator: Iterator[T] | None = None
        try:
            iterator = make_iterator()
            for item in iterator:
                while not space.acquire(timeout=0.05):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                deliver(item)
            deliver(_DONE)
        except BaseException as error:
            deliver(_DONE, error)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

    threading.Thread(target=work, name="innova-provider", daemon=True).start()
    try:
        while True:
            item, error = await queue.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            space.release()
            yield cast(T, item)
    finally:
        stop.set()


# -- errors ---------------------------------------------------------------


@dataclass(eq=False)
class ProviderError(Exception):
    """Base of every error a provider may raise; `code` is the API error code."""

    message: str = "The chat model failed."
    retryable: bool = False
    code: str = field(default="provider_unavailable", init=False)

    def __post_init__(self) -> None:
        Exception.__init__(self, self.message)


@dataclass(eq=False)
class ProviderAuthError(ProviderError):
    """The provider refused our credentials (HTTP 401/403)."""

    message: str = "The chat model provider refused our credentials."
    code: str = field(default="provider_auth", init=False)


@dataclass(eq=False)
class ProviderRateLimited(ProviderError):
    """The provider asked us to slow down (HTTP 429); `retry_after` in seconds if known."""

    message: str = "The chat model provider is rate limiting us."
    retryable: bool = True
    retry_after: float | None = None
    code: str = field(default="provider_rate_limited", init=False)


@dataclass(eq=False)
class ContextTooLong(ProviderError):
    """The conversation does not fit the model's context window."""

    message: str = "The conversation is too long for the model."
    code: str = field(default="context_too_long", init=False)


@dataclass(eq=False)
class ProviderTimeout(ProviderError):
    """No answer (or no next token) in the configured time."""

    message: str = "The chat model did not answer in time."
    retryable: bool = True
    code: str = field(default="provider_timeout", init=False)


@dataclass(eq=False)
class ProviderUnavailable(ProviderError):
    """Server errors, refused connections, a model that failed to load."""

    message: str = "The chat model is unavailable."
    retryable: bool = True
    code: str = field(default="provider_unavailable", init=False)


@dataclass(eq=False)
class ProviderBusy(ProviderError):
    """Too many requests queued for a single-slot model; `retry_after` in seconds."""

    message: str = "The chat model is busy."
    retryable: bool = True
    retry_after: float | None = None
    code: str = field(default="provider_busy", init=False)


def error_for_status(status: int, *, retry_after: float | None = None, message: str | None = None) -> ProviderError:
    """The documented error for an HTTP status from a provider's API (cloud SDKs, inference servers).

    Chosen from the status, never from message text, which changes between
    versions and languages. A 400 stays generic: whether it means "context
    too long" is in the API's own error code, which the plugin checks first.
    """
    error: ProviderError
    if status in (401, 403):
        error = ProviderAuthError()
    elif status == 429:
        error = ProviderRateLimited(retry_after=retry_after)
    elif status in (408, 504):
        error = ProviderTimeout()
    elif status == 413:
        error = ContextTooLong()
    elif status >= 500:
        error = ProviderUnavailable()
    else:
        error = ProviderError(retryable=False)
    if message:
        error.message = message
        error.args = (message,)
    return error


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header given in seconds (dates are rare from APIs: None)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


__all__ = [
    "ChatChunk",
    "ChatMessage",
    "ChatProvider",
    "ChatRequest",
    "ContextTooLong",
    "FinishReason",
    "ProviderAuthError",
    "ProviderBusy",
    "ProviderError",
    "ProviderRateLimited",
    "ProviderTimeout",
    "ProviderUnavailable",
    "Role",
    "Usage",
    "error_for_status",
    "iterate_in_thread",
    "parse_retry_after",
]
