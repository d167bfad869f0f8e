"""What both cloud providers share: timeouts, retries before the first token, error mapping helpers.

A provider subclass supplies `_open(request)`, an async generator that sends
the request through its SDK and yields `ChatChunk`s (text deltas, then the
finish reason and usage), closing the SDK's stream in its `finally`; and
`_map_error(exc)`, which turns an SDK or transport exception into a core
`ProviderError` from HTTP statuses and API error codes, never message text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx2

from innova_provider_cloud.settings import CloudSettings
from innova_server.chat import (
    ChatChunk,
    ChatRequest,
    ContextTooLong,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
    error_for_status,
    parse_retry_after,
)
from innova_server.settings import Settings

log = logging.getLogger("innova.provider.cloud")

# API error codes / types meaning "the prompt does not fit the context window":
# OpenAI and llama-cpp-python (`context_length_exceeded`), llama.cpp's C++
# server (`exceed_context_size_error`), and the same idea spelled by others.
# Mistral's own API has none: its context-length 400 carries code "3051",
# which it also gives to other invalid arguments (README, "Mistral and
# context length"), so it is not listed.
CONTEXT_LENGTH_CODES = frozenset(
    {"context_length_exceeded", "exceed_context_size_error", "context_window_exceeded", "prompt_too_long"}
)


@dataclass(frozen=True)
class Timeouts:
    """Seconds; all finite.

    `first_token` counts from the start of the reply (the first try) to its
    first chunk, retries and their waits included: it is the whole time a
    failure can take to become an HTTP error, and it fits inside the core's
    first-chunk wait (`CHAT_PING_SECONDS`) by default. `idle` is the longest
    silence between two chunks, `total` the whole reply.
    """

    connect: float
    first_token: float
    idle: float
    total: float

    @classmethod
    def from_settings(cls, settings: CloudSettings) -> Timeouts:
        return cls(
            connect=settings.cloud_connect_timeout_seconds,
            first_token=settings.cloud_first_token_timeout_seconds,
            idle=settings.cloud_idle_timeout_seconds,
            total=settings.cloud_total_timeout_seconds,
        )

    def http(self) -> httpx2.Timeout:
        """The transport's own timeouts: connect as set; reads bounded too, as a backstop to ours."""
        read = max(self.first_token, self.idle) + 1.0
        return httpx2.Timeout(connect=self.connect, read=read, write=max(self.connect, self.idle), pool=self.connect)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 2
    max_wait: float = 10.0
    base_delay: float = 0.5

    def delay(self, attempt: int, error: ProviderError) -> float | None:
        """Seconds to wait before retry number `attempt + 1`, or None not to retry."""
        if attempt >= self.max_retries or not error.retryable or isinstance(error, ProviderTimeout):
            return None
        retry_after: object = getattr(error, "retry_after", None)
        if isinstance(retry_after, int | float):
            return float(retry_after) if retry_after <= self.max_wait else None
        backoff: float = self.base_delay * 2.0**attempt
        return min(self.max_wait, backoff * (0.5 + random.random()))  # noqa: S311 - jitter, not crypto


def error_code_of(body: object) -> set[str]:
    """The API's error `code` and `type` from an error body (a dict, or JSON text), at top level or under `error`."""
    if isinstance(body, str | bytes):
        try:
            body = json.loads(body)
        except ValueError:
            return set()
    found: set[str] = set()
    for part in (body, body.get("error") if isinstance(body, Mapping) else None):
        if isinstance(part, Mapping):
            for key in ("code", "type"):
                value = part.get(key)
                if isinstance(value, str | int) and not isinstance(value, bool):
                    found.add(str(value))
    return found


def error_for_reply(status: int, headers: Mapping[str, str], body: object, provider: str) -> ProviderError:
    """A core error for an HTTP error reply: the API's error code first, then the status."""
    codes = error_code_of(body)
    if codes & CONTEXT_LENGTH_CODES:
        return ContextTooLong()
    retry_after = parse_retry_after(headers.get("retry-after"))
    if retry_after is None and headers.get("retry-after-ms"):
        ms = parse_retry_after(headers.get("retry-after-ms"))
        retry_after = ms / 1000 if ms is not None else None
    error = error_for_status(status, retry_after=retry_after)
    if type(error) is ProviderError:  # another 4xx: our request was refused
        error.message = f"The chat model provider refused the request (HTTP {status})."
        error.args = (error.message,)
    log.warning("%s: HTTP %s %s", provider, status, ",".join(sorted(codes)) or "")
    return error


def error_for_transport(exc: BaseException, provider: str) -> ProviderError:
    """Connection refused, reset, DNS, TLS, a broken stream: unavailable; a transport timeout: timeout."""
    log.warning("%s: %s", provider, type(exc).__name__)
    if isinstance(exc, httpx2.TimeoutException | TimeoutError):
        return ProviderTimeout()
    return ProviderUnavailable()


class CloudProvider:
    """The shared stream loop of the cloud providers."""

    name = "cloud"

    def __init__(self, timeouts: Timeouts, retry: RetryPolicy) -> None:
        self.timeouts = timeouts
        self.retry = retry
        self._closed = False

    # -- for subclasses -----------------------------------------------------

    def _open(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        raise NotImplementedError

    def _map_error(self, exc: Exception) -> ProviderError:
        raise NotImplementedError

    async def _close_client(self) -> None:
        raise NotImplementedError

    # -- the protocol -----------------------------------------------------------

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        """Chunks of the reply. Retries (with backoff) only while nothing has been yielded."""
        if self._closed:
            raise ProviderUnavailable("The chat model provider is shut down.")
        loop = asyncio.get_running_loop()
        started = loop.time()
        total_deadline = started + self.timeouts.total
        # One deadline for everything before the first chunk, retries included:
        # past it the core has opened the stream, and a failure could no longer
        # be an HTTP error (README: "Before the first token").
        first_deadline = min(started + self.timeouts.first_token, total_deadline)
        attempt = 0
        while True:
            upstream = self._open(request)
            yielded = False
            delay = 0.0
            try:
                deadline = first_deadline
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            chunk = await anext(upstream)
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        raise self._timeout(loop.time() >= total_deadline, yielded) from None
                    except ProviderError:
                        raise
                    except Exception as exc:
                        raise self._map_error(exc) from exc
                    yield chunk
                    yielded = True
                    deadline = min(loop.time() + self.timeouts.idle, total_deadline)
            except ProviderError as error:
                if yielded:
                    raise
                wait = self.retry.delay(attempt, error)
                if wait is None or loop.time() + wait >= first_deadline:
                    raise  # no retry can get a first token in time: this error, now
                delay = wait
                attempt += 1
                log.info("%s: %s before the first token; retry %d in %.2fs", self.name, error.code, attempt, delay)
            finally:
                # Closing our generator (the client left) lands here too: the
                # SDK's HTTP stream is closed at once, not drained.
                await upstream.aclose()
            await asyncio.sleep(delay)

    def _timeout(self, total: bool, yielded: bool) -> ProviderTimeout:
        if total:
            what = f"did not finish within {self.timeouts.total:g}s"
        elif yielded:
            what = f"sent nothing for {self.timeouts.idle:g}s"
        else:
            what = f"sent no first token within {self.timeouts.first_token:g}s"  # retries included
        log.warning("%s: the model %s", self.name, what)
        return ProviderTimeout(f"The chat model {what}.")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._close_client()


def warn_if_past_the_core_wait(timeouts: Timeouts, settings: Settings | None, provider: str) -> None:
    """Say at startup when a failure before the first token may arrive after the stream opened.

    The core waits `CHAT_PING_SECONDS` for a provider's first chunk, then
    opens the stream; only failures within that wait become HTTP errors.
    """
    if settings is not None and timeouts.first_token >= settings.chat_ping_seconds:
        log.warning(
            "%s: CLOUD_FIRST_TOKEN_TIMEOUT_SECONDS=%g is not below CHAT_PING_SECONDS=%g: a failure before the "
            "first token that comes later than %gs arrives as an `error` event in an open stream, not as an "
            "HTTP error",
            provider, timeouts.first_token, settings.chat_ping_seconds, settings.chat_ping_seconds,
        )  # fmt: skip


def usage_numbers(usage: Any) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) from an SDK usage object, when both are there."""
    if usage is None:
        return None
    prompt, completion = getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None)
    if isinstance(prompt, int) and isinstance(completion, int):
        return prompt, completion
    return None


__all__ = [
    "CONTEXT_LENGTH_CODES",
    "CloudProvider",
    "ProviderRateLimited",
    "RetryPolicy",
    "Timeouts",
    "error_code_of",
    "error_for_reply",
    "error_for_transport",
    "usage_numbers",
    "warn_if_past_the_core_wait",
]
