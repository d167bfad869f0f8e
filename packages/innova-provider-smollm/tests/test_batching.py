"""SMOLLM_PARALLEL > 1 with the real SmolLM2-135M model: several replies decoded together in one batch.

Behaviour only, never speed: who joins the batch when, what each reply
contains, that cells and slots are freed, that the queue and `ProviderBusy`
still work beyond the running ones.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from innova_provider_smollm.model import LlamaOptions, LocalModel
from innova_provider_smollm.provider import SmolLMProvider
from innova_server.chat import ChatChunk, ChatMessage, ChatRequest, ContextTooLong, ProviderBusy

PARALLEL = LlamaOptions(n_ctx=512, n_threads=2, parallel=4, prompt_chunk=16)
ALONE = LlamaOptions(n_ctx=512, n_threads=2)
LONG_PROMPT = "Count from 1 to 200, one number per line."
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a cooperative is, in two sentences.",
    "List three fruits that grow in Senegal.",
    "Bonjour ! Comment vas-tu aujourd'hui ?",
]


def request(text: str, *, history: list[ChatMessage] | None = None, **options: Any) -> ChatRequest:
    options = {"max_tokens": 24, "temperature": 0.0, **options}
    messages = [ChatMessage("system", "Tu es un assistant."), *(history or []), ChatMessage("user", text)]
    return ChatRequest(messages=messages, model="tiny", **options)


async def reply(provider: SmolLMProvider, req: ChatRequest) -> list[ChatChunk]:
    return [chunk async for chunk in provider.stream(req)]


def text(chunks: list[ChatChunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


def run(provider: SmolLMProvider, body: Callable[[SmolLMProvider], Any]) -> Any:
    async def main() -> Any:
        try:
            return await body(provider)
        finally:
            await provider.aclose()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def alone_replies(model_file: Path) -> dict[str, str]:
    """Each prompt's greedy reply with `SMOLLM_PARALLEL=1` (`Llama.generate`), one after the other."""

    async def body(provider: SmolLMProvider) -> dict[str, str]:
        return {prompt: text(await reply(provider, request(prompt))) for prompt in PROMPTS}

    return dict(run(SmolLMProvider(model_file, ALONE), body))


def test_greedy_output_is_the_same_alone_and_beside_three_others(
    model_file: Path, alone_replies: dict[str, str]
) -> None:
    async def body(provider: SmolLMProvider) -> tuple[dict[str, str], dict[str, str], int]:
        alone = {prompt: text(await reply(provider, request(prompt))) for prompt in PROMPTS}
        # Staggered, so sequences join a batch that is already running and
        # newcomers' prompts are chunked between the others' steps.
        tasks = {}
        for prompt in PROMPTS:
            tasks[prompt] = asyncio.create_task(reply(provider, request(prompt)))
            await asyncio.sleep(0.03)
        together = {prompt: text(await task) for prompt, task in tasks.items()}
        return alone, together, provider.reused_tokens

    alone, together, reused = run(SmolLMProvider(model_file, PARALLEL), body)
    assert all(alone.values())
    assert together == alone
    assert reused > 0  # the system prompt's cells, kept from the reply before
    # And the batch engine alone says what `Llama.generate` says.
    assert alone == alone_replies


def test_a_follow_up_reuses_the_conversations_cells_and_says_the_same(model_file: Path) -> None:
    # The second turn's prompt starts with the first turn's prompt and reply:
    # the slot that served the first keeps their cells, the second evaluates
    # only what is new — and replies exactly as without any kept cells, and
    # as `Llama.generate` (SMOLLM_PARALLEL=1).
    first = request(PROMPTS[1])

    def follow_up(answer: str) -> ChatRequest:
        history = [ChatMessage("user", PROMPTS[1]), ChatMessage("assistant", answer)]
        return request("Et en une phrase ?", history=history)

    async def conversation(provider: SmolLMProvider) -> tuple[str, str, int, int]:
        answer = text(await reply(provider, first))
        before = provider.reused_tokens
        assert provider._model is not None
        first_prompt = len(provider._model.prompt(first.messages, first.max_tokens).tokens)
        second = text(await reply(provider, follow_up(answer)))
        return answer, second, provider.reused_tokens - before, first_prompt

    answer, second, reused, first_prompt = run(SmolLMProvider(model_file, PARALLEL), conversation)
    assert second
    assert reused >= first_prompt  # at least the whole first prompt came from kept cells

    async def second_only(provider: SmolLMProvider) -> str:
        return text(await reply(provider, follow_up(answer)))

    assert run(SmolLMProvider(model_file, PARALLEL), second_only) == second  # no cells to reuse there
    assert run(SmolLMProvider(model_file, ALONE), second_only) == second


def test_a_cut_reply_leaves_only_what_its_cells_hold(model_file: Path) -> None:
    # A reply cancelled in the middle of its prompt or its reply keeps the
    # cells it has; the next prompt reuses only what matches, and says what a
    # fresh slot says.
    async def body(provider: SmolLMProvider) -> tuple[str, str, int]:
        stream = provider.stream(request(LONG_PROMPT, max_tokens=200))
        for _ in range(5):
            await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]
        same = text(await reply(provider, request(LONG_PROMPT)))
        other = text(await reply(provider, request(PROMPTS[2])))
        return same, other, provider.reused_tokens

    async def fresh(provider: SmolLMProvider) -> tuple[str, str]:
        return text(await reply(provider, request(LONG_PROMPT))), text(await reply(provider, request(PROMPTS[2])))

    same, other, reused = run(SmolLMProvider(model_file, PARALLEL), body)
    assert (same, other) == run(SmolLMProvider(model_file, ALONE), fresh)
    assert reused > 0


def test_a_newcomer_joins_the_running_batch_without_waiting_for_it_to_finish(model_file: Path) -> None:
    async def body(provider: SmolLMProvider) -> None:
        first = provider.stream(request(LONG_PROMPT, max_tokens=200))
        await anext(first)
        second_first_token = asyncio.get_running_loop().create_future()

        async def second() -> list[ChatChunk]:
            chunks = []
            async for chunk in provider.stream(request("Bonjour", max_tokens=8)):
                if not second_first_token.done():
                    second_first_token.set_result(None)
                chunks.append(chunk)
            return chunks

        task = asyncio.create_task(second())
        first_tokens = 0
        async for _chunk in first:
            first_tokens += 1
            if second_first_token.done():
                break
        assert second_first_token.done(), "the newcomer waited for the running reply to finish"
        assert first_tokens < 150
        assert provider.running == 2 and provider.queued == 0
        chunks = await task
        assert chunks[-1].finish_reason in ("stop", "length")
        await first.aclose()  # type: ignore[attr-defined]

    run(SmolLMProvider(model_file, PARALLEL), body)


def test_sampling_is_per_request(model_file: Path) -> None:
    async def body(provider: SmolLMProvider) -> list[list[ChatChunk]]:
        requests = [
            request(LONG_PROMPT, max_tokens=5),
            request(LONG_PROMPT, max_tokens=17),
            request(PROMPTS[0], max_tokens=30, temperature=0.9),
        ]
        return list(await asyncio.gather(*(reply(provider, req) for req in requests)))

    short, longer, warm = run(SmolLMProvider(model_file, PARALLEL), body)
    for chunks, count in ((short, 5), (longer, 17)):
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == count
    assert text(longer).startswith(text(short))  # the same greedy reply, cut at a different length
    assert warm[-1].usage is not None and 0 < warm[-1].usage.completion_tokens <= 30
    assert text(warm).strip()


def test_a_long_prompt_is_chunked_between_the_others_steps(model_file: Path) -> None:
    # A newcomer's 300-token prompt at 16 tokens per step takes ≈ 19 steps;
    # the running reply gets a token at each of them instead of waiting.
    paragraph = "Le marché de Sandaga ouvre tôt et les vendeurs installent leurs étals. " * 18

    async def body(provider: SmolLMProvider) -> None:
        first = provider.stream(request(LONG_PROMPT, max_tokens=300))
        await anext(first)
        arrived: list[float] = []
        newcomer_first: list[float] = []

        async def newcomer() -> None:
            async for _ in provider.stream(request(paragraph, max_tokens=4)):
                newcomer_first.append(time.monotonic())
                return

        sent = time.monotonic()
        task = asyncio.create_task(newcomer())
        async for _ in first:
            arrived.append(time.monotonic())
            if newcomer_first:
                break
        await task
        during = [t for t in arrived if sent < t < newcomer_first[0]]
        assert len(during) >= 5, f"the running reply got {len(during)} tokens during the newcomer's prompt"
        await first.aclose()  # type: ignore[attr-defined]

    run(SmolLMProvider(model_file, PARALLEL), body)


def test_beyond_the_slots_requests_queue_then_busy(model_file: Path) -> None:
    options = LlamaOptions(n_ctx=512, n_threads=2, parallel=2)

    async def body(provider: SmolLMProvider) -> None:
        running = [provider.stream(request(LONG_PROMPT, max_tokens=60)) for _ in range(2)]
        for stream in running:
            await anext(stream)
        assert provider.running == 2
        waiting = asyncio.create_task(reply(provider, request("Bonjour", max_tokens=3)))
        await asyncio.sleep(0.05)
        assert provider.queued == 1
        with pytest.raises(ProviderBusy) as busy:
            await anext(provider.stream(request("Trop", max_tokens=3)))
        assert busy.value.retry_after is not None and busy.value.retry_after >= 1
        for stream in running:  # finished whole, while the third waited
            rest = [chunk async for chunk in stream]
            assert rest[-1].finish_reason == "length"
        assert text(await asyncio.wait_for(waiting, 30))

    run(SmolLMProvider(model_file, options, max_queue=1), body)


def test_a_cancelled_reply_leaves_the_batch_and_frees_its_slot_at_once(model_file: Path) -> None:
    async def body(provider: SmolLMProvider) -> None:
        engine = provider._engine
        assert engine is not None
        streams = [provider.stream(request(LONG_PROMPT, max_tokens=300)) for _ in range(2)]
        for stream in streams:
            await anext(stream)
        assert engine.running == 2
        started = time.monotonic()
        await streams[0].aclose()  # type: ignore[attr-defined]
        while provider.running != 1 or engine.running != 1:  # freed by the engine thread
            assert time.monotonic() - started < 2
            await anext(streams[1])  # the other reply goes on meanwhile
        # The slot (and its sequence id, cells freed) serves a new reply.
        assert text(await reply(provider, request("Bonjour", max_tokens=3)))
        await streams[1].aclose()  # type: ignore[attr-defined]

    run(SmolLMProvider(model_file, PARALLEL), body)


def test_aclose_ends_every_running_reply_and_the_loop_thread(model_file: Path) -> None:
    async def body(provider: SmolLMProvider) -> list[list[ChatChunk]]:
        streams = [provider.stream(request(LONG_PROMPT, max_tokens=300)) for _ in range(3)]
        for stream in streams:
            await anext(stream)
        readers = [asyncio.create_task(_collect(stream)) for stream in streams]
        await asyncio.wait_for(provider.aclose(), 5)
        assert not provider.loaded
        return list(await asyncio.wait_for(asyncio.gather(*readers), 5))

    before = set(threading.enumerate())
    ends = run(SmolLMProvider(model_file, PARALLEL), body)
    assert all(chunks[-1].finish_reason == "cancelled" for chunks in ends)
    assert not [t for t in threading.enumerate() if t not in before and t.name == "innova-smollm-batch"]


def test_a_prompt_too_long_for_a_slot_is_refused_before_queueing(model_file: Path) -> None:
    async def body(provider: SmolLMProvider) -> None:
        streams = [provider.stream(request(LONG_PROMPT, max_tokens=100)) for _ in range(4)]
        for stream in streams:
            await anext(stream)
        with pytest.raises(ContextTooLong, match="512"):
            await anext(provider.stream(request("mot " * 2000)))
        assert provider.queued == 0
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]

    run(SmolLMProvider(model_file, PARALLEL), body)


def test_lazy_load_with_several_slots(model_file: Path) -> None:
    provider = SmolLMProvider(model_file, PARALLEL, load="lazy")
    assert not provider.loaded

    async def body(provider: SmolLMProvider) -> list[list[ChatChunk]]:
        return list(await asyncio.gather(*(reply(provider, request(p, max_tokens=4)) for p in PROMPTS[:2])))

    for chunks in run(provider, body):
        assert text(chunks)


async def _collect(stream: Any) -> list[ChatChunk]:
    return [chunk async for chunk in stream]


@pytest.fixture(scope="module")
def model(model_file: Path) -> Iterator[LocalModel]:
    loaded = LocalModel(model_file, PARALLEL)
    yield loaded
    loaded.close()


def test_the_tokenizer_works_without_the_llama_context(model: LocalModel) -> None:
    # With N > 1 the `Llama` object's own context is tiny; prompts are still built for the slot's window.
    prompt = model.prompt([ChatMessage("user", "mot " * 200)], max_tokens=1000)
    assert len(prompt.tokens) + prompt.max_tokens <= 512
