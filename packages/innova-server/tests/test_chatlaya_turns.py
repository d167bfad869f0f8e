"""How a turn ends: client disconnect, provider failures, pings, and the per-user limits.

The providers here are in-process test plugins registered with `registered()`;
the server, the database and the HTTP connection are real.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from bson import ObjectId
from httpx_sse import connect_sse

from innova_server.chat import ChatChunk, ChatRequest, ProviderRateLimited, ProviderUnavailable, Usage
from innova_server.plugins import RegisterProvider, hookimpl
from innova_server.testing import registered
from innova_server.testing.chat_client import chat, signed_in
from innova_server.testing.server import wait_for


class Probe:
    """What the provider saw, observable from the test thread."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.closed = threading.Event()
        self.chunks_made = 0


class SlowProvider:
    """Counts forever, one word every `delay` seconds, until its iterator is closed."""

    def __init__(self, probe: Probe, delay: float = 0.05, first_delay: float = 0.0) -> None:
        self.probe = probe
        self.delay = delay
        self.first_delay = first_delay

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        self.probe.started.set()
        try:
            await asyncio.sleep(self.first_delay)
            index = 0
            while True:
                self.probe.chunks_made += 1
                yield ChatChunk(text=f"w{index} ")
                index += 1
                await asyncio.sleep(self.delay)
        finally:
            self.probe.closed.set()

    async def aclose(self) -> None:
        return None


class FailingProvider:
    """Says `words`, then raises `error`."""

    def __init__(self, words: list[str], error: Exception) -> None:
        self.words = words
        self.error = error

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        for word in self.words:
            yield ChatChunk(text=word)
        raise self.error

    async def aclose(self) -> None:
        return None


class FixedProvider:
    """Replies `reply` and records every request it was sent."""

    def __init__(self, reply: str = "ok") -> None:
        self.reply = reply
        self.requests: list[ChatRequest] = []

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        self.requests.append(request)
        yield ChatChunk(text=self.reply)
        yield ChatChunk(finish_reason="length", usage=Usage(11, 1))

    async def aclose(self) -> None:
        return None


class ProviderPlugin:
    def __init__(self, name: str, make: Callable[[], Any]) -> None:
        self.name = name
        self.make = make

    @hookimpl
    def innova_register_providers(self, register: RegisterProvider) -> None:
        register(self.name, lambda settings: self.make(), models=("m1", "m2"), default_model="m1")


@pytest.fixture
def with_provider(start_server):
    """Start a server whose PROVIDER is `provider` (a test object).

    A client leaving stops the reply here (`CHAT_DETACHED_TIMEOUT_SECONDS=0`,
    the first version's behaviour): these tests are about how a stream ends.
    Replies that outlive their client are `test_chatlaya_lifecycle.py`'s.
    """
    stack: list[Any] = []

    def start(provider: Any, **overrides: Any):
        context = registered(ProviderPlugin("testprov", lambda: provider), name="test-plugin")
        context.__enter__()
        stack.append(context)
        return start_server(provider="testprov", **{"chat_detached_timeout_seconds": 0, **overrides})

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


def live_slots(db) -> int:
    return sum(len(doc.get("holders", [])) for doc in db.stream_slots.find({}))


def test_client_disconnect_stores_incomplete_closes_iterator_and_frees_slot(with_provider, db):
    probe = Probe()
    server = with_provider(SlowProvider(probe), chat_max_concurrent_streams=1)
    with signed_in(server.url) as client:
        received = []
        with connect_sse(client, "POST", "/chatlaya/message", json={"content": "compte"}) as source:
            assert source.response.status_code == 200
            for sse in source.iter_sse():
                received.append((sse.event, json.loads(sse.data)))
                if len([e for e, _ in received if e == "token"]) == 3:
                    break
            assert live_slots(db) == 1
        # The connection is closed here, mid-stream.
        assert probe.closed.wait(5), "the provider's iterator was not closed"
        message_id = ObjectId(received[0][1]["message_id"])
        stored = wait_for(lambda: db.messages.find_one({"_id": message_id}))
        made = probe.chunks_made
        time.sleep(0.3)
        assert probe.chunks_made == made, "generation went on after the client left"
        assert stored["status"] == "incomplete"
        assert stored["finish_reason"] == "cancelled"
        assert stored["content"].startswith("w0 w1 w2 ")
        wait_for(lambda: live_slots(db) == 0)
        # The slot is free again: with a cap of 1, a new stream is accepted.
        with connect_sse(client, "POST", "/chatlaya/message", json={"content": "encore"}) as source:
            assert source.response.status_code == 200


def test_provider_error_after_start_sends_error_then_done(with_provider, db):
    server = with_provider(FailingProvider(["un ", "deux "], ProviderUnavailable("model crashed")))
    with signed_in(server.url) as client:
        stream = chat(client, "question")
    assert stream.status == 200
    assert stream.names() == ["start", "token", "token", "error", "done"]
    assert stream.data("error") == {"code": "provider_unavailable", "message": "model crashed", "retryable": True}
    assert stream.data("done")["finish_reason"] == "error"
    stored = db.messages.find_one({"_id": ObjectId(stream.data("start")["message_id"])})
    assert stored["status"] == "error" and stored["content"] == "un deux "
    assert live_slots(db) == 0


def test_undocumented_exception_is_reported_as_provider_unavailable(with_provider, db):
    server = with_provider(FailingProvider(["un "], KeyError("bug")))
    with signed_in(server.url) as client:
        stream = chat(client, "question")
    assert stream.names() == ["start", "token", "error", "done"]
    assert stream.data("error")["code"] == "provider_unavailable"
    assert "KeyError" in stream.data("error")["message"] and "bug" not in stream.data("error")["message"]


class GarbageProvider:
    """Breaks the protocol: yields a dict, then (second instance) raises from `stream()` itself."""

    def __init__(self) -> None:
        self.calls = 0

    def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("not even an iterator")
        return self._garbage()

    async def _garbage(self) -> AsyncIterator[Any]:
        yield ChatChunk(text="ok ")
        yield {"text": "not a chunk"}

    async def aclose(self) -> None:
        return None


def test_a_provider_breaking_the_protocol_gets_a_clean_error(with_provider, db):
    server = with_provider(GarbageProvider())
    with signed_in(server.url) as client:
        garbage = chat(client, "question")
        assert garbage.names() == ["start", "token", "error", "done"]
        assert garbage.data("error")["code"] == "provider_unavailable"
        refused = chat(client, "question")  # raises before any chunk: a JSON error, no hang
        assert refused.status == 503 and refused.body["detail"]["code"] == "provider_unavailable"
    assert live_slots(db) == 0


def test_provider_error_before_first_chunk_is_a_json_error(with_provider, db):
    server = with_provider(FailingProvider([], ProviderRateLimited(retry_after=7)))
    with signed_in(server.url) as client:
        stream = chat(client, "question")
        assert stream.status == 503
        assert stream.body["detail"]["code"] == "provider_rate_limited"
        assert stream.headers["retry-after"] == "7"
        # Nothing left behind: the client can simply send again.
        assert db.messages.count_documents({}) == 0
        assert live_slots(db) == 0


def test_pings_during_silence_then_tokens(with_provider):
    probe = Probe()
    server = with_provider(SlowProvider(probe, delay=10, first_delay=0.7), chat_ping_seconds=0.2)
    with signed_in(server.url) as client, client.stream("POST", "/chatlaya/message", json={"content": "x"}) as response:
        assert response.status_code == 200
        seen = ""
        for text in response.iter_text():
            seen += text
            if "event: token" in seen:
                break
    assert seen.startswith("id: ") and "\nevent: start\ndata: {" in seen.split("\n\n")[0]
    assert seen.count(": ping\n\n") >= 1
    assert seen.index(": ping") < seen.index("event: token")


def test_history_has_system_prompt_and_fits_the_budget(with_provider):
    provider = FixedProvider("r" * 40)
    server = with_provider(provider, chat_system_prompt="Sois bref.", chat_history_chars=200, chat_model="m2")
    with signed_in(server.url) as client:
        first = chat(client, "a" * 50)
        conversation_id = first.data("start")["conversation_id"]
        assert first.data("start")["model"] == "m2"
        assert first.data("done") == {
            "message_id": first.data("start")["message_id"],
            "finish_reason": "length",
            "usage": {"prompt_tokens": 11, "completion_tokens": 1},
        }
        chat(client, "b" * 50, conversation_id)
        chat(client, "c" * 50, conversation_id)
    last = provider.requests[-1]
    assert last.model == "m2"
    assert last.messages[0].role == "system" and last.messages[0].content == "Sois bref."
    assert last.messages[-1].content == "c" * 50
    # 200 chars: the new message (50) + the newest earlier ones that fit whole.
    assert [m.content for m in last.messages[1:]] == ["r" * 40, "b" * 50, "r" * 40, "c" * 50]


def test_a_long_history_of_short_messages_costs_one_more_read(with_provider):
    """61 short messages: the first 24 come with the conversation, and the rest, not a batch of 24
    at a time, in one `find` sized from their lengths (it runs beside the turn's writes)."""
    provider = FixedProvider("r" * 10)
    server = with_provider(provider)
    with signed_in(server.url) as client:
        conversation_id = chat(client, "tour 00").data("start")["conversation_id"]
        for n in range(1, 30):
            assert chat(client, f"tour {n:02}", conversation_id).status == 200
        before = _mongo_commands(client)
        assert chat(client, "dernier", conversation_id).status == 200
        after = _mongo_commands(client)
    spent = {name: after[name] - before.get(name, 0) for name in after}
    # A turn: one `update` (its slot); a checkpoint, if the turn spanned one, one `update` and one `find`.
    history_finds = spent.get("find", 0) - (spent.get("update", 0) - 1)
    assert history_finds == 1
    sent = [m.content for m in provider.requests[-1].messages[1:]]  # after the system prompt
    assert sent == [c for n in range(30) for c in (f"tour {n:02}", "r" * 10)] + ["dernier"]


def _mongo_commands(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {
        match[1]: float(match[2])
        for match in re.finditer(r'^innova_mongo_commands_total\{command="([^"]+)"\} (\S+)$', text, re.M)
    }


def test_rate_limit_is_429_with_retry_after_before_the_stream(start_server, db):
    server = start_server(rate_limit_chat_user="2/1m")
    with signed_in(server.url) as client:
        assert chat(client, "un").status == 200
        assert chat(client, "deux").status == 200
        refused = chat(client, "trois")
    assert refused.status == 429
    assert refused.body["detail"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert db.messages.count_documents({"content": "trois"}) == 0


def test_concurrent_stream_cap_is_429_and_per_user(with_provider, db):
    probe = Probe()
    server = with_provider(SlowProvider(probe, delay=0.05), chat_max_concurrent_streams=2)
    with signed_in(server.url) as alice, signed_in(server.url) as bob:
        with (
            connect_sse(alice, "POST", "/chatlaya/message", json={"content": "1"}) as one,
            connect_sse(alice, "POST", "/chatlaya/message", json={"content": "2"}) as two,
        ):
            assert one.response.status_code == two.response.status_code == 200
            refused = chat(alice, "3")
            assert refused.status == 429
            assert refused.body["detail"]["code"] == "too_many_streams"
            assert int(refused.headers["retry-after"]) >= 1
            # Another user's streams are counted separately.
            with connect_sse(bob, "POST", "/chatlaya/message", json={"content": "b"}) as other:
                assert other.response.status_code == 200
        wait_for(lambda: live_slots(db) == 0)
        with connect_sse(alice, "POST", "/chatlaya/message", json={"content": "4"}) as again:
            assert again.response.status_code == 200


def test_stream_slots_hold_across_two_workers(with_provider, start_server, db):
    """Two app instances (as two gunicorn workers) share the cap through MongoDB."""
    probe = Probe()
    first = with_provider(SlowProvider(probe, delay=0.05), chat_max_concurrent_streams=1)
    second = start_server(provider="testprov", chat_max_concurrent_streams=1)
    with signed_in(first.url) as client, connect_sse(client, "POST", "/chatlaya/message", json={"content": "1"}) as one:
        assert one.response.status_code == 200
        with httpx.Client(base_url=second.url, cookies=client.cookies) as other_worker:
            refused = other_worker.post("/chatlaya/message", json={"content": "2"})
        assert refused.status_code == 429


def test_a_slot_left_by_a_crashed_worker_expires(with_provider, db):
    probe = Probe()
    server = with_provider(SlowProvider(probe, delay=0.01), chat_max_concurrent_streams=1)
    with signed_in(server.url) as client:
        user_id = client.get("/auth/me").json()["user"]["id"]
        stale = {"id": "crashed", "expires_at": datetime.now(UTC) - timedelta(seconds=1)}
        db.stream_slots.insert_one({"_id": f"chat:{user_id}", "holders": [stale], "expires_at": stale["expires_at"]})
        with connect_sse(client, "POST", "/chatlaya/message", json={"content": "x"}) as source:
            assert source.response.status_code == 200
            holders = db.stream_slots.find_one({"_id": f"chat:{user_id}"})["holders"]
            assert [h["id"] for h in holders] != ["crashed"] and len(holders) == 1
        live = {"id": "other-worker", "expires_at": datetime.now(UTC) + timedelta(minutes=5)}
        wait_for(lambda: live_slots(db) == 0)
        db.stream_slots.update_one({"_id": f"chat:{user_id}"}, {"$push": {"holders": live}})
        assert chat(client, "y").status == 429  # a live slot of another worker still counts


def test_disconnect_is_noticed_while_the_provider_is_silent(with_provider, db):
    """No write is pending (the model is "thinking" for 30 s): the disconnect itself must stop it."""
    probe = Probe()
    server = with_provider(SlowProvider(probe, delay=30), chat_ping_seconds=60)
    with signed_in(server.url) as client:
        with connect_sse(client, "POST", "/chatlaya/message", json={"content": "x"}) as source:
            events = source.iter_sse()
            start = next(events)
            assert next(events).event == "token"
        left = time.monotonic()
        assert probe.closed.wait(5), "the provider was not stopped"
        assert time.monotonic() - left < 2
        stored = wait_for(lambda: db.messages.find_one({"_id": ObjectId(json.loads(start.data)["message_id"])}))
    assert stored["status"] == "incomplete" and stored["content"] == "w0 "
    wait_for(lambda: live_slots(db) == 0)
