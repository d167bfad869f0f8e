"""The chat provider interface: what a provider plugin implements.

A provider only produces text. The core does everything else: history,
persistence, SSE framing, pings, rate limits, metrics.

Cancellation is closing the iterator (`await stream.aclose()`, which the core
does when the client goes away): the provider must then stop its work — close
its HTTP stream, or stop the model between two tokens. Blocking work (a local
model) runs in a thread, never on the event loop.
"""

from __future__ import annotations

import abc
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

    @property
    def last_user_text(self) -> str:
        """The newest user message's text ("" if none): what most simple providers answer."""
        return next((m.content for m in reversed(self.messages) if m.role == "user"), "")


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


class Provider(abc.ABC):
    """A base class for providers: write `stream`, inherit the rest.

    `stream` may yield bare `str` pieces of text as well as `ChatChunk`s (the
    core wraps a `str` into `ChatChunk(text=...)`); a final
    `ChatChunk(finish_reason=..., usage=...)` is optional. `aclose` does
    nothing unless overridden: most providers hold nothing to release, and
    should not have to say so. A subclass whose `__init__` takes no argument
    can be registered as its own factory: `register("mine", MineProvider)`.
    """

    @abc.abstractmethod
    def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk | str]:
        """An async generator of text (`str` or `ChatChunk`); raises only `ProviderError` subclasses."""

    async def aclose(self) -> None:
        """Release clients, threads, models. Safe to call twice. Nothing to release by default."""
        return None


def as_chunk(item: ChatChunk | str) -> ChatChunk:
    """What the core does with each item a provider yields: a `str` is a text chunk."""
    if isinstance(item, str):
        return ChatChunk(text=item)
    if not isinstance(item, ChatChunk):
        raise TypeError(f"stream() yielded {type(item).__name__}, not ChatChunk or str")
    return item


async def chunks_of(provider: ChatProvider | Provider, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
    """`provider.stream(request)` as `ChatChunk`s only; closing this closes the provider's stream."""
    stream: AsyncIterator[ChatChunk | str] = provider.stream(request)
    try:
        async for item in stream:
            yield as_chunk(item)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


# -- blocking producers ----------------------------------------------------

_DONE = object()


async def iterate_in_thread(
    make_iterator: Callable[[], Iterator[T]],
    *,
    max_buffer: int = 0,
    on_exit: Callable[[], None] | None = None,
) -> AsyncGenerator[T, None]:
    """Run a blocking iterator (a local model's token loop) in its own thread, as an async generator.

    For providers whose work blocks: the event loop only ever awaits a queue.
    Closing this generator (what the core does when the client leaves) stops
    the thread before its next item, and the blocking iterator is closed in
    its own thread — so a model stops after its current token.
    `make_iterator` runs in the thread too (loading a model blocks as well).
    Exceptions raised in the thread are re-raised here, unchanged. A
    dedicated thread, not the default executor: a long generation must not
    hold a slot that password hashing needs.

    `max_buffer` is how many items the thread may compute before they are
    asked for. The default, 0, is lockstep: the thread computes an item only
    when this generator is asked for one, so the event loop's work per item
    (the SSE write, the client's socket) never overlaps the model's. That is
    the fast path for a model that uses every core: letting the thread run
    ahead made the loop's work steal a core from llama.cpp's synchronised
    threads, about 25% of the tokens/s on 2 cores. A producer that mostly
    waits (on I/O) may set a few items of read-ahead instead.

    `on_exit` is called in the thread after its last call into the iterator
    (the iterator closed), however it ended — before the end or the error is
    handed to the reader. A provider releases there what guards the model,
    never from the event loop, where the thread may still be inside it.

    Inside a provider's own generator, wrap it in `contextlib.aclosing(...)`
    so that closing the provider's stream closes this one at once::

        async with contextlib.aclosing(iterate_in_thread(lambda: model.generate(prompt))) as tokens:
            async for token in tokens:
                yield ChatChunk(text=token)
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue()
    stop = threading.Event()
    # One credit per item the thread may compute: `max_buffer` to start with,
    # one more each time the reader asks. Back-pressure: a slow client slows the model.
    credits = threading.Semaphore(max_buffer)

    def deliver(item: object, error: BaseException | None = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))

    def work() -> None:
        iterator: Iterator[T] | None = None
        final: tuple[object, BaseException | None] | None = None
        try:
            while True:
                credits.acquire()
                if stop.is_set():
                    return  # the reader is gone: nothing to hand over
                if iterator is None:
                    iterator = make_iterator()
                try:
                    item = next(iterator)
                except StopIteration:
                    final = (_DONE, None)
                    return
                deliver(item)
        except BaseException as error:
            final = (_DONE, error)
        finally:
            try:
                close = getattr(iterator, "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        close()
                if on_exit is not None:
                    on_exit()
            finally:
                if final is not None:
                    deliver(*final)

    threading.Thread(target=work, name="innova-provider", daemon=True).start()
    try:
        while True:
            credits.release()  # ask for the next item
            item, error = await queue.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield cast(T, item)
    finally:
        stop.set()
        credits.release()  # wake the thread if it waits to be asked


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
    "Provider",
    "ProviderAuthError",
    "ProviderBusy",
    "ProviderError",
    "ProviderRateLimited",
    "ProviderTimeout",
    "ProviderUnavailable",
    "Role",
    "Usage",
    "as_chunk",
    "chunks_of",
    "error_for_status",
    "iterate_in_thread",
    "parse_retry_after",
]
