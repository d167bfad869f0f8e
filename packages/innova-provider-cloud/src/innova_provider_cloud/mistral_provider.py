"""PROVIDER=mistral: Mistral's API (or a server speaking it) through the official `mistralai` SDK, streamed."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import httpx2
from mistralai.client import Mistral
from mistralai.client.errors import MistralError, NoResponseError, ResponseValidationError
from mistralai.client.utils.logger import NoOpLogger

from innova_provider_cloud.base import (
    CloudProvider,
    RetryPolicy,
    Timeouts,
    error_for_reply,
    error_for_transport,
    log,
    usage_numbers,
)
from innova_server.chat import ChatChunk, ChatRequest, FinishReason, ProviderError, ProviderUnavailable, Usage

FINISH_REASONS: dict[str, FinishReason] = {"length": "length", "model_length": "length"}


def _text_of(content: Any) -> str:
    """A delta's content: a string, or a list of content chunks (text ones kept)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.text for part in content if isinstance(getattr(part, "text", None), str))
    return ""


class MistralProvider(CloudProvider):
    name = "mistral"

    def __init__(self, *, api_key: str, server_url: str, timeouts: Timeouts, retry: RetryPolicy | None = None) -> None:
        super().__init__(timeouts, retry or RetryPolicy())
        http_timeout = timeouts.http()

        async def our_timeouts(request: httpx2.Request) -> None:
            # The SDK puts one number (timeout_ms) on every request; ours has a
            # separate connect timeout and bounded reads.
            request.extensions["timeout"] = http_timeout.as_dict()

        # One client per process, closed by aclose(). The SDK's retries are
        # off (retry_config=None): retrying is ours, before the first token only.
        # Its debug logger (MISTRAL_DEBUG) would print the request headers, key
        # included: never used.
        self._http = httpx2.AsyncClient(
            timeout=http_timeout, follow_redirects=True, event_hooks={"request": [our_timeouts]}
        )
        self._sync_http = httpx2.Client(timeout=http_timeout)
        self.client = Mistral(
            api_key=api_key,
            server_url=server_url,
            client=self._sync_http,
            async_client=self._http,
            retry_config=None,
            timeout_ms=int(timeouts.total * 1000),
            debug_logger=NoOpLogger(),
        )

    async def _open(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        messages: Any = [{"role": m.role, "content": m.content} for m in request.messages]
        upstream = await self.client.chat.stream_async(
            model=request.model,
            messages=messages,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            retries=None,
        )
        try:
            finish_reason: FinishReason | None = None
            usage: tuple[int, int] | None = None
            async for event in upstream:
                chunk = event.data
                usage = usage_numbers(chunk.usage) or usage
                for choice in chunk.choices[:1]:
                    if choice.finish_reason == "error":
                        raise ProviderUnavailable("The chat model stopped with an error.")
                    if isinstance(choice.finish_reason, str):
                        finish_reason = FINISH_REASONS.get(choice.finish_reason, "stop")
                    text = _text_of(choice.delta.content)
                    if text:
                        yield ChatChunk(text=text)
            if finish_reason is None:
                # A stream that ends without a finish reason was cut (or, with
                # llama-cpp-python, refused after its 200 headers): not a reply.
                raise ProviderUnavailable("The chat model's stream ended before the reply was finished.")
            yield ChatChunk(finish_reason=finish_reason, usage=Usage(*usage) if usage else None)
        finally:
            await upstream.response.aclose()  # EventStreamAsync.close(), which is untyped

    def _map_error(self, exc: Exception) -> ProviderError:
        if isinstance(exc, ResponseValidationError):
            log.warning("%s: a reply the SDK could not read", self.name)
            return ProviderUnavailable("The chat model provider sent a reply we could not read.")
        if isinstance(exc, MistralError):  # every HTTP error status (SDKError, HTTPValidationError)
            headers = {k.lower(): v for k, v in exc.headers.items()}
            return error_for_reply(exc.status_code, headers, exc.body, self.name)
        if isinstance(exc, httpx2.TransportError | NoResponseError):
            return error_for_transport(exc, self.name)
        log.warning("%s: unexpected %s", self.name, type(exc).__name__)
        return ProviderUnavailable()

    async def _close_client(self) -> None:
        try:
            await self._http.aclose()
        finally:
            self._sync_http.close()
