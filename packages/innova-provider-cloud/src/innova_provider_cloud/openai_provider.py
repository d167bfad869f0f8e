"""PROVIDER=openai: OpenAI, or any OpenAI-compatible server (llama.cpp, vLLM, Ollama, LM Studio) via OPENAI_BASE_URL."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import openai
from openai import AsyncOpenAI

from innova_provider_cloud.base import (
    CONTEXT_LENGTH_CODES,
    CloudProvider,
    RetryPolicy,
    Timeouts,
    error_code_of,
    error_for_reply,
    error_for_transport,
    log,
    usage_numbers,
)
from innova_server.chat import (
    ChatChunk,
    ChatRequest,
    ContextTooLong,
    FinishReason,
    ProviderError,
    ProviderUnavailable,
    Usage,
)

FINISH_REASONS: dict[str, FinishReason] = {"length": "length"}  # stop, tool_calls, content_filter…: "stop"


class OpenAIProvider(CloudProvider):
    name = "openai"

    def __init__(
        self, *, api_key: str, base_url: str | None, timeouts: Timeouts, retry: RetryPolicy | None = None
    ) -> None:
        super().__init__(timeouts, retry or RetryPolicy())
        # One client per process: its connection pool is reused by every stream.
        # The SDK's own retries are off: retrying is ours (before the first token only).
        self.client = AsyncOpenAI(
            api_key=api_key,
            base_url=base_url or "https://api.openai.com/v1",
            timeout=timeouts.http(),
            max_retries=0,
        )

    async def _open(self, request: ChatRequest) -> AsyncGenerator[ChatChunk, None]:
        messages: Any = [{"role": m.role, "content": m.content} for m in request.messages]
        upstream = await self.client.chat.completions.create(
            model=request.model,
            messages=messages,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            stream=True,
            stream_options={"include_usage": True},
        )
        try:
            finish_reason: FinishReason | None = None
            usage: tuple[int, int] | None = None
            async for event in upstream:
                usage = usage_numbers(event.usage) or usage
                for choice in event.choices[:1]:
                    if choice.finish_reason:
                        finish_reason = FINISH_REASONS.get(choice.finish_reason, "stop")
                    text = choice.delta.content if choice.delta is not None else None
                    if text:
                        yield ChatChunk(text=text)
            if finish_reason is None:
                # A stream that ends without a finish reason was cut (or, with
                # llama-cpp-python, refused after its 200 headers): not a reply.
                raise ProviderUnavailable("The chat model's stream ended before the reply was finished.")
            yield ChatChunk(finish_reason=finish_reason, usage=Usage(*usage) if usage else None)
        finally:
            await upstream.close()

    def _map_error(self, exc: Exception) -> ProviderError:
        if isinstance(exc, openai.APIStatusError):
            headers = {k.lower(): v for k, v in exc.response.headers.items()}
            return error_for_reply(exc.status_code, headers, exc.body, self.name)
        if isinstance(exc, openai.APITimeoutError):
            return error_for_transport(TimeoutError(), self.name)
        if isinstance(exc, openai.APIConnectionError):
            return error_for_transport(exc, self.name)
        if isinstance(exc, openai.APIError):
            # An error event inside a 200 stream: only its code tells what it is.
            if error_code_of(exc.body) & CONTEXT_LENGTH_CODES:
                return ContextTooLong()
            log.warning("%s: error in the stream (%s)", self.name, ",".join(sorted(error_code_of(exc.body))))
            return error_for_transport(exc, self.name)
        log.warning("%s: unexpected %s", self.name, type(exc).__name__)
        return error_for_transport(exc, self.name)

    async def _close_client(self) -> None:
        await self.client.close()
