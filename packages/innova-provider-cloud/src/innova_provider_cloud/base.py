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

log = logging.getLogger("innova.provider.cloud")

# API error codes / types meaning "the prompt does not fit the context window":
# OpenAI and llama-cpp-python (`context_length_exceeded`), llama.cpp's C++
# server (`exceed_context_size_error`), and the same idea spelled by others.
CONTEXT_LENGTH_CODES = frozenset(
    {"context_length_exceeded", "exceed_context_size_error", "context_window_exceeded", "prompt_too_long"}
)


@dataclass(frozen=True)
class Timeouts:
    """Seconds; all finite. `first_token` counts from the request being sent, `idle` between two chunks."""

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
        total_deadline = loop.time() + self.timeouts.total
        attempt = 0
        while True:
            upstream = self._open(request)
            yielded = False
            delay = 0.0
            try:
                deadline = min(loop.time() + self.timeouts.first_token, total_deadline)
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
                if wait is None or loop.time() + wait >= total_deadline:
                    raise
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
            what = f"sent no first token within {self.timeouts.first_token:g}s"
        log.warning("%s: the model %s", self.name, what)
        return ProviderTimeout(f"The chat model {what}.")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._close_client()


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
]
