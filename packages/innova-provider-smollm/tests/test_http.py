"""PROVIDER=local through the real HTTP/SSE path, the real server and database, and the real 135M model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from bson import ObjectId
from httpx_sse import connect_sse

from innova_provider_smollm.provider import SmolLMProvider
from innova_server.testing.chat_client import Stream, chat, signed_in
from innova_server.testing.server import wait_for

MODEL = "SmolLM2-135M-Instruct.Q4_1"
LONG = "Count from 1 to 300, one number per line."


@pytest.fixture
def local_server(
    start_server: Callable[..., Any], local_env: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Any]:
    """A server with PROVIDER=local; `parallel` sets SMOLLM_PARALLEL (the default: the setting's own)."""

    def start(parallel: int | None = None, **overrides: Any) -> Any:
        if parallel is not None:
            monkeypatch.setenv("SMOLLM_PARALLEL", str(parallel))
        values: dict[str, Any] = {"provider": "local", "chat_max_tokens": 24, "chat_temperature": 0.0}
        return start_server(**{**values, **overrides})

    return start


def provider_of(server: Any) -> SmolLMProvider:
    provider = server.services.provider
    assert isinstance(provider, SmolLMProvider)
    return provider


def test_a_reply_streams_in_several_tokens_and_is_stored(local_server: Callable[..., Any], db: Any) -> None:
    server = local_server()
    assert provider_of(server).loaded  # SMOLLM_LOAD=startup: loaded before the first request
    with signed_in(server.url) as client:
        stream = chat(client, "Bonjour ! Présente-toi en une phrase.")
    assert stream.status == 200, stream.body
    names = stream.names()
    assert names[0] == "start" and names[-1] == "done" and names.count("token") >= 3
    start, done = stream.data("start"), stream.data("done")
    assert start["provider"] == "local" and start["model"] == MODEL
    assert done["finish_reason"] in ("stop", "length")
    usage = done["usage"]
    assert usage["prompt_tokens"] > 5 and 3 <= usage["completion_tokens"] <= 24
    stored = db.messages.find_one({"_id": ObjectId(start["message_id"])})
    assert stored["status"] == "complete" and stored["content"] == stream.text() and stream.text().strip()
    assert stored["provider"] == "local" and stored["model"] == MODEL


def test_with_one_slot_two_concurrent_requests_are_served_one_after_the_other(
    local_server: Callable[..., Any],
) -> None:
    server = local_server(parallel=1, chat_max_tokens=40)
    spans: dict[str, tuple[float, float]] = {}
    results: dict[str, Stream] = {}

    def one(name: str) -> None:
        with signed_in(server.url) as client:
            first: float | None = None
            last = 0.0
            with connect_sse(client, "POST", "/chatlaya/message", json={"content": LONG}) as source:
                assert source.response.status_code == 200
                stream = Stream(200, source.response.headers)
                for sse in source.iter_sse():
                    if sse.event == "token":
                        last = time.monotonic()
                        first = last if first is None else first
                    stream.events.append((sse.event, json.loads(sse.data)))
            assert first is not None
            spans[name], results[name] = (first, last), stream

    threads = [threading.Thread(target=one, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(results) == {"a", "b"}
    for stream in results.values():
        assert stream.names()[-1] == "done" and stream.data("done")["finish_reason"] == "length"
        assert stream.data("done")["usage"]["completion_tokens"] == 40
    (_, first_last), (second_first, _) = sorted(spans.values())
    # The second reply's first token comes after the first reply's last one:
    # no interleaving (it needs the slot, then a prompt evaluation).
    assert second_first > first_last


def test_with_one_slot_three_requests_are_served_first_come_first_served(local_server: Callable[..., Any]) -> None:
    server = local_server(parallel=1, chat_max_tokens=30)
    provider = provider_of(server)
    spans: dict[str, tuple[float, float]] = {}

    def one(name: str) -> None:
        with signed_in(server.url) as client:
            times: list[float] = []
            with connect_sse(client, "POST", "/chatlaya/message", json={"content": LONG}) as source:
                assert source.response.status_code == 200
                times += [time.monotonic() for sse in source.iter_sse() if sse.event == "token"]
            spans[name] = (times[0], times[-1])

    threads = {name: threading.Thread(target=one, args=(name,)) for name in "abc"}
    threads["a"].start()
    wait_for(lambda: provider._slot.held, timeout=30)
    threads["b"].start()
    wait_for(lambda: provider.queued == 1, timeout=30)  # b waits before c is even sent
    threads["c"].start()
    wait_for(lambda: provider.queued == 2 or "a" in spans, timeout=30)
    for thread in threads.values():
        thread.join(120)
    assert set(spans) == {"a", "b", "c"}
    # In arrival order, each after the previous one's last token.
    assert spans["a"][1] < spans["b"][0] and spans["b"][1] < spans["c"][0]


def test_with_several_slots_concurrent_replies_stream_together(local_server: Callable[..., Any]) -> None:
    server = local_server(parallel=4, chat_max_tokens=40)
    assert provider_of(server).parallel == 4
    spans: dict[str, tuple[float, float]] = {}
    texts: dict[str, str] = {}

    def one(name: str) -> None:
        with signed_in(server.url) as client:
            times: list[float] = []
            with connect_sse(client, "POST", "/chatlaya/message", json={"content": LONG}) as source:
                assert source.response.status_code == 200
                stream = Stream(200, source.response.headers)
                for sse in source.iter_sse():
                    if sse.event == "token":
                        times.append(time.monotonic())
                    stream.events.append((sse.event, json.loads(sse.data)))
            assert stream.data("done")["usage"]["completion_tokens"] == 40
            spans[name], texts[name] = (times[0], times[-1]), stream.text()

    threads = [threading.Thread(target=one, args=(name,)) for name in "abc"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(spans) == {"a", "b", "c"}
    # Each reply's first token comes before the others' last: decoded together, not one after the other.
    for name, (first, _) in spans.items():
        assert all(first < last for other, (_, last) in spans.items() if other != name)
    # The same question, greedy: the same reply whatever its neighbours.
    assert len(set(texts.values())) == 1


def test_a_message_too_long_is_413_at_once_even_while_another_reply_runs(
    local_server: Callable[..., Any], db: Any
) -> None:
    # The prompt is built and checked before queueing: a request behind a long
    # generation still gets its 413 before the stream opens, not `start` +
    # `error` once its turn comes (or after CHAT_PING_SECONDS in the queue).
    server = local_server(chat_max_tokens=400)
    provider = provider_of(server)
    paragraph = "Le marché de Sandaga ouvre tôt et les vendeurs installent leurs étals. " * 32  # > 512 tokens
    with (
        signed_in(server.url) as client,
        connect_sse(client, "POST", "/chatlaya/message", json={"content": LONG}) as source,
    ):
        events = source.iter_sse()
        next(events), next(events)  # start, first token: the slot is held for ≈ 400 tokens
        with signed_in(server.url) as other:
            too_long = other.post("/chatlaya/message", json={"content": paragraph})
        assert too_long.status_code == 413, too_long.text
        assert too_long.json()["detail"]["code"] == "context_too_long"
        # Answered while the first reply still runs: it never waited for the slot.
        assert provider._slot.held and provider.queued == 0
        assert next(e for e in events if e.event in ("token", "done")).event == "token"
    wait_for(lambda: db.messages.count_documents({"role": "assistant"}) == 1)
    assert db.messages.count_documents({"role": "user"}) == 1  # the refused one left nothing


def test_a_full_queue_answers_503_provider_busy_with_retry_after(
    local_server: Callable[..., Any], db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMOLLM_MAX_QUEUE", "0")  # as a deployer sets it: none may wait
    server = local_server(parallel=2, chat_max_tokens=300)
    assert provider_of(server).max_queue == 0
    with (
        signed_in(server.url) as client,
        signed_in(server.url) as second,
        connect_sse(client, "POST", "/chatlaya/message", json={"content": LONG}) as source,
        connect_sse(second, "POST", "/chatlaya/message", json={"content": LONG}) as source2,
    ):
        assert source.response.status_code == 200 and source2.response.status_code == 200
        events = source.iter_sse()
        next(events), next(events)  # start, first token: one slot of two busy
        events2 = source2.iter_sse()
        next(events2), next(events2)  # and the second: both slots busy
        assert provider_of(server).running == 2
        with signed_in(server.url) as other:
            busy = other.post("/chatlaya/message", json={"content": "Bonjour"})
            assert busy.status_code == 503, busy.text
            assert busy.json()["detail"]["code"] == "provider_busy"
            assert int(busy.headers["retry-after"]) >= 1
    # The refused request left no message behind: only the two running users' questions.
    wait_for(lambda: db.messages.count_documents({"role": "assistant"}) == 2)
    assert db.messages.count_documents({"role": "user"}) == 2


def test_a_disconnect_stops_the_generation_and_the_next_request_starts_at_once(
    local_server: Callable[..., Any], db: Any
) -> None:
    # CHAT_DETACHED_TIMEOUT_SECONDS=0: a reply stops as soon as its client leaves
    # (by default it would go on for a minute, for a client coming back).
    server = local_server(chat_max_tokens=400, chat_detached_timeout_seconds=0)
    provider = provider_of(server)
    with signed_in(server.url) as client:
        with connect_sse(client, "POST", "/chatlaya/message", json={"content": LONG}) as source:
            assert source.response.status_code == 200
            events = [json.loads(sse.data) for sse, _ in zip(source.iter_sse(), range(4), strict=False)]
        # Gone after 3 tokens of 400 (seconds of work left): the slot is free
        # well before the abandoned reply could have finished.
        wait_for(lambda: not provider._slot.held, timeout=2)
        started = time.monotonic()
        with connect_sse(client, "POST", "/chatlaya/message", json={"content": "Bonjour"}) as source:
            assert source.response.status_code == 200
            first = next(sse for sse in source.iter_sse() if sse.event == "token")
            # The new reply did not wait for the rest of the abandoned one
            # (≈ 400 tokens: seconds with this model on this machine).
            assert json.loads(first.data)["text"] is not None
            # Loose bound (a loaded machine): the content check below is the proof.
            assert time.monotonic() - started < 5
        stored = wait_for(
            lambda: db.messages.find_one({"_id": ObjectId(events[0]["message_id"]), "status": "incomplete"})
        )
    assert stored["finish_reason"] == "cancelled"
    assert len(stored["content"]) < 200  # a few tokens, not the 400 asked for


def test_health_stays_fast_during_a_generation(local_server: Callable[..., Any]) -> None:
    server = local_server(chat_max_tokens=300)
    with (
        signed_in(server.url) as client,
        connect_sse(client, "POST", "/chatlaya/message", json={"content": LONG}) as source,
    ):
        events = source.iter_sse()
        next(events), next(events)
        slowest = 0.0
        with httpx.Client(base_url=server.url, timeout=5) as probe:
            for _ in range(10):
                started = time.monotonic()
                assert probe.get("/health").status_code == 200
                slowest = max(slowest, time.monotonic() - started)
                next(events)  # the reply is still streaming meanwhile
        assert provider_of(server)._slot.held
    # On the loop, a generation would hold /health for its seconds of tokens.
    assert slowest < 1.0, f"/health took {slowest:.3f}s during a generation"


def test_innova_chat_with_the_local_provider(local_env: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PROVIDER": "local", "CHAT_MAX_TOKENS": "8", "CHAT_TEMPERATURE": "0", "ENV": "test"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "innova"), "chat", "Bonjour !"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert f"[local/{MODEL}]" in result.stderr and "usage prompt=" in result.stderr


def test_a_long_conversation_is_trimmed_and_a_message_too_long_is_413(local_server: Callable[..., Any]) -> None:
    server = local_server(chat_max_tokens=8)
    paragraph = "Le marché de Sandaga ouvre tôt et les vendeurs installent leurs étals. " * 8  # ≈ 150 tokens
    with signed_in(server.url) as client:
        conversation: str | None = None
        for turn in range(5):  # the history passes the 512-token window by the fourth turn
            stream = chat(client, f"{turn}. {paragraph}", conversation)
            assert stream.status == 200, stream.body
            assert stream.names()[-1] == "done" and stream.data("done")["finish_reason"] in ("stop", "length")
            conversation = stream.data("start")["conversation_id"]
        assert stream.data("done")["usage"]["prompt_tokens"] <= 512 - 8
        # A single message longer than the window: refused before the stream opens.
        too_long = chat(client, paragraph * 4, conversation)
        assert too_long.status == 413
        assert too_long.body["detail"]["code"] == "context_too_long"
