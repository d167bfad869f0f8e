"""The provider with the real SmolLM2-135M model: prompt trimming, usage, finish reasons, queueing, conformance."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from innova_provider_smollm.model import LlamaOptions, LocalModel
from innova_provider_smollm.provider import SmolLMProvider
from innova_server.chat import ChatChunk, ChatMessage, ChatProvider, ChatRequest, ContextTooLong, ProviderBusy
from innova_server.testing import ErrorCase, ProviderConformance

OPTIONS = LlamaOptions(n_ctx=512, n_threads=2)
LONG_PROMPT = "Count from 1 to 200, one number per line."


@pytest.fixture(scope="module")
def model(model_file: Path) -> Iterator[LocalModel]:
    loaded = LocalModel(model_file, OPTIONS)
    yield loaded
    loaded.close()


def request(text: str, *, history: list[ChatMessage] | None = None, **options: Any) -> ChatRequest:
    options = {"max_tokens": 12, "temperature": 0.0, **options}
    messages = [ChatMessage("system", "Tu es un assistant."), *(history or []), ChatMessage("user", text)]
    return ChatRequest(messages=messages, model="tiny", **options)


def collect(provider: SmolLMProvider, req: ChatRequest) -> list[ChatChunk]:
    async def main() -> list[ChatChunk]:
        try:
            return [chunk async for chunk in provider.stream(req)]
        finally:
            await provider.aclose()

    return asyncio.run(main())


def test_the_template_comes_from_the_gguf(model: LocalModel) -> None:
    tokens = model.count([ChatMessage("system", "S"), ChatMessage("user", "Bonjour")])
    text = model.llama.detokenize(tokens, special=True).decode()
    assert "<|im_start|>user\nBonjour<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_long_history_is_trimmed_keeping_the_newest(model: LocalModel) -> None:
    history = []
    for index in range(40):
        history += [ChatMessage("user", f"Question {index}: " + "mot " * 20), ChatMessage("assistant", "Réponse.")]
    messages = [ChatMessage("system", "Système."), *history, ChatMessage("user", "La dernière question ?")]
    prompt = model.prompt(messages, max_tokens=64)
    assert prompt.dropped_messages > 0
    assert len(prompt.tokens) + 64 <= model.n_ctx
    text = model.llama.detokenize(prompt.tokens, special=True).decode()
    assert "Système." in text and text.rstrip().endswith("La dernière question ?<|im_end|>\n<|im_start|>assistant")
    assert "Question 39:" in text and "Question 0:" not in text
    # The kept history starts with a user turn.
    assert text.split("<|im_start|>")[2].startswith("user")


def test_a_last_message_that_cannot_fit_is_context_too_long(model: LocalModel) -> None:
    with pytest.raises(ContextTooLong, match="512"):
        model.prompt([ChatMessage("user", "mot " * 2000)], max_tokens=16)


def test_the_reply_never_asks_for_more_than_the_window(model: LocalModel) -> None:
    prompt = model.prompt([ChatMessage("user", "mot " * 200)], max_tokens=1000)
    assert len(prompt.tokens) + prompt.max_tokens <= model.n_ctx


def test_usage_and_length_finish(model_file: Path) -> None:
    chunks = collect(SmolLMProvider(model_file, OPTIONS), request(LONG_PROMPT, max_tokens=5))
    final = chunks[-1]
    assert final.finish_reason == "length"
    assert final.usage is not None and final.usage.completion_tokens == 5 and final.usage.prompt_tokens > 10
    assert len([c for c in chunks if c.text]) >= 3


def test_stop_finish_at_the_end_of_turn_token(model_file: Path) -> None:
    chunks = collect(SmolLMProvider(model_file, OPTIONS), request("Say hello.", max_tokens=200))
    final = chunks[-1]
    assert final.finish_reason == "stop"
    assert final.usage is not None and 0 < final.usage.completion_tokens < 200
    assert "<|im_end|>" not in "".join(c.text for c in chunks)


def test_lazy_load_waits_for_the_first_request(model_file: Path) -> None:
    provider = SmolLMProvider(model_file, OPTIONS, load="lazy")
    assert not provider.loaded
    chunks = collect(provider, request("Bonjour", max_tokens=3))
    assert "".join(c.text for c in chunks)


def test_a_full_queue_is_busy_and_the_running_reply_is_not_interrupted(model_file: Path) -> None:
    async def main() -> None:
        provider = SmolLMProvider(model_file, OPTIONS, max_queue=1)
        try:
            first = provider.stream(request(LONG_PROMPT, max_tokens=40))
            head = await anext(first)  # running
            second = asyncio.create_task(_text(provider.stream(request("Bonjour", max_tokens=3))))
            await asyncio.sleep(0.05)
            assert provider.queued == 1
            with pytest.raises(ProviderBusy) as busy:
                await anext(provider.stream(request("Trop", max_tokens=3)))
            assert busy.value.retry_after is not None and busy.value.retry_after >= 1
            rest = [chunk async for chunk in first]
            assert rest[-1].finish_reason == "length"  # finished whole, while others waited
            assert head.text or rest
            assert await asyncio.wait_for(second, 30)
        finally:
            await provider.aclose()

    asyncio.run(main())


def test_closing_a_stream_frees_the_slot_after_the_current_token(model_file: Path) -> None:
    async def main() -> None:
        provider = SmolLMProvider(model_file, OPTIONS)
        try:
            stream = provider.stream(request(LONG_PROMPT, max_tokens=400))
            await anext(stream)
            started = time.monotonic()
            await stream.aclose()  # type: ignore[attr-defined]
            while provider._slot.held:  # noqa: ASYNC110 - released from the worker thread
                await asyncio.sleep(0.005)
            assert time.monotonic() - started < 0.5
            assert await _text(provider.stream(request("Bonjour", max_tokens=3)))
        finally:
            await provider.aclose()

    asyncio.run(main())


def test_aclose_during_a_generation_waits_for_the_thread(model_file: Path) -> None:
    async def main() -> None:
        provider = SmolLMProvider(model_file, OPTIONS)
        stream = provider.stream(request(LONG_PROMPT, max_tokens=400))
        await anext(stream)
        reader = asyncio.create_task(_text(stream))
        await asyncio.wait_for(provider.aclose(), 5)
        assert not provider.loaded
        await asyncio.wait_for(reader, 5)
        await provider.aclose()

    asyncio.run(main())


async def _text(stream: Any) -> str:
    return "".join([chunk.text async for chunk in stream])


@pytest.fixture(params=[1, 4], ids=["parallel_1", "parallel_4"])
def conformance_options(request: pytest.FixtureRequest) -> LlamaOptions:
    """The suite runs on both paths: `Llama.generate` (1) and the batch engine (4)."""
    return LlamaOptions(n_ctx=512, n_threads=2, parallel=request.param, prompt_chunk=16)


class TestSmolLMConformance(ProviderConformance):
    model = "SmolLM2-135M-Instruct.Q4_1"

    @pytest.fixture
    def make_provider(self, model_file: Path, conformance_options: LlamaOptions) -> Callable[[], ChatProvider]:
        return lambda: SmolLMProvider(model_file, conformance_options)

    def make_request(self, text: str | None = None, **options: Any) -> ChatRequest:
        # Short replies keep the suite fast; greedy decoding keeps it stable.
        options.setdefault("max_tokens", 16)
        options.setdefault("temperature", 0.0)
        return super().make_request(text, **options)

    @pytest.fixture
    def error_case(self, model_file: Path, conformance_options: LlamaOptions) -> ErrorCase:
        return ErrorCase(
            lambda: SmolLMProvider(model_file, conformance_options),
            ContextTooLong,
            request=self.make_request("mot " * 2000),
        )
