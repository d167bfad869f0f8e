"""Edges of a turn: pings only after silence, the end written whatever happens, nothing left by a refusal.

Providers are in-process test plugins (`registered()`); server, database and
HTTP connection are real.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
from bson import ObjectId
from httpx_sse import connect_sse

from innova_server.auth.store import utcnow
from innova_server.chat import ChatChunk, ChatMessage, ChatRequest, ProviderUnavailable, Usage
from innova_server.chatlaya.messages import MessageStore
from innova_server.chatlaya.store import ConversationStore, StreamSlots
from innova_server.chatlaya.streams import LiveStream
from innova_server.chatlaya.turns import Turn, TurnContext, TurnRegistry, TurnTimings
from innova_server.db import Database
from innova_server.plugins import RegisterProvider, hookimpl
from innova_server.testing import registered
from innova_server.testing.chat_client import chat, signed_in
from innova_server.testing.server import wait_for


class ProviderPlugin:
    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make

    @hookimpl
    def innova_register_providers(self, register: RegisterProvider) -> None:
        register("endings", lambda settings: self.make(), models=("m1",), default_model="m1")


@pytest.fixture
def with_provider(start_server):
    stack: list[Any] = []

    def start(provider: Any, **overrides: Any):
        context = registered(ProviderPlugin(lambda: provider), name="endings-plugin")
        context.__enter__()
        stack.append(context)
        return start_server(provider="endings", **overrides)

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


def live_slots(db) -> int:
    return sum(len(doc.get("holders", [])) for doc in db.stream_slots.find({}))


class Gate:
    """A provider waits at the gate until the test opens it (from its own thread)."""

    def __init__(self) -> None:
        self.opened = threading.Event()

    async def wait(self) -> None:
        while not self.opened.is_set():  # noqa: ASYNC110 - set from the test's thread
            await asyncio.sleep(0.01)


class TextlessChunksProvider:
    """Many chunks without text (keep-alives, then usage), words among them, all quick."""

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        for index in range(20):
            yield ChatChunk()  # a keep-alive: no text, no finish
            await asyncio.sleep(0.01)
            yield ChatChunk(text=f"w{index} ")
            await asyncio.sleep(0.01)
            yield ChatChunk(usage=Usage(3, index + 1))
        yield ChatChunk(finish_reason="stop")

    async def aclose(self) -> None:
        return None


def test_text_less_chunks_are_no_reason_to_ping(with_provider):
    # 20 s of "silence" allowed: any ping here comes from a chunk, not from silence.
    server = with_provider(TextlessChunksProvider(), chat_ping_seconds=20)
    with signed_in(server.url) as client, client.stream("POST", "/chatlaya/message", json={"content": "x"}) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    assert ": ping" not in raw
    assert raw.count("event: token") == 20 and "\nevent: done\n" in raw.rstrip().split("\n\n")[-1]


class GatedProvider:
    """Says `words`, waits at `gate`, then says `after` (and raises `error` if given)."""

    def __init__(self, gate: Gate, words: list[str], after: list[str], error: Exception | None = None) -> None:
        self.gate = gate
        self.words = words
        self.after = after
        self.error = error

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        for word in self.words:
            yield ChatChunk(text=word)
        await self.gate.wait()
        for word in self.after:
            yield ChatChunk(text=word)
        if self.error is not None:
            raise self.error

    async def aclose(self) -> None:
        return None


def read_until(events, name: str, into: list[tuple[str, dict[str, Any]]]) -> None:
    for sse in events:
        into.append((sse.event, json.loads(sse.data)))
        if sse.event == name:
            return
    raise AssertionError(f"no {name} event")


@pytest.mark.parametrize("error", [None, ProviderUnavailable("model crashed")])
def test_a_database_failure_at_the_end_still_sends_error_and_done(with_provider, db, error):
    """The final write is refused by the server (a collection validator): a real server-side failure."""
    gate = Gate()
    server = with_provider(GatedProvider(gate, ["un "], ["deux"], error), chat_max_concurrent_streams=1)
    with signed_in(server.url) as client:
        received: list[tuple[str, dict[str, Any]]] = []
        with connect_sse(client, "POST", "/chatlaya/message", json={"content": "q"}) as source:
            events = source.iter_sse()
            read_until(events, "token", received)
            message_id = ObjectId(received[0][1]["message_id"])
            db.command({"collMod": "messages", "validator": {"status": {"$nin": ["complete", "error"]}}})
            try:
                gate.opened.set()
                read_until(events, "done", received)
            finally:
                db.command({"collMod": "messages", "validator": {}})
        names = [name for name, _ in received]
        assert names == ["start", "token", "token", "error", "done"]
        errors = [data for name, data in received if name == "error"]
        if error is None:
            assert errors[0]["code"] == "database_unavailable" and errors[0]["retryable"] is True
        else:
            assert errors[0]["code"] == "provider_unavailable"
        assert received[-1][1]["finish_reason"] == "error"
        # Not finished in the history: it stays `streaming` until its lease lapses (then `interrupted`).
        assert db.messages.find_one({"_id": message_id})["status"] == "streaming"
        # The slot was still given back: with a cap of 1 the next message is accepted.
        wait_for(lambda: live_slots(db) == 0)
        assert chat(client, "encore").status == 200


class SlowFirstProvider:
    """Waits at `gate` before its first word: the stream is open, no token sent yet."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        await self.gate.wait()
        yield ChatChunk(text="enfin")

    async def aclose(self) -> None:
        return None


def test_the_user_message_is_stored_before_the_first_token(with_provider, db):
    gate = Gate()
    server = with_provider(SlowFirstProvider(gate), chat_ping_seconds=0.2)
    with (
        signed_in(server.url) as client,
        connect_sse(client, "POST", "/chatlaya/message", json={"content": "premier"}) as source,
    ):
        events = source.iter_sse()
        start = json.loads(next(events).data)
        stored = db.messages.find_one({"_id": ObjectId(start["user_message_id"])})
        assert stored is not None and stored["content"] == "premier" and stored["role"] == "user"
        # The reply exists from the start, empty and `streaming`, following the question.
        reply = db.messages.find_one({"role": "assistant"})
        assert str(reply["_id"]) == start["message_id"] and reply["parent_id"] == stored["_id"]
        assert (reply["status"], reply["content"]) == ("streaming", "")
        gate.opened.set()
        rest: list[tuple[str, dict[str, Any]]] = []
        read_until(events, "done", rest)
    assert [data["text"] for name, data in rest if name == "token"] == ["enfin"]


def test_deleting_a_conversation_while_it_streams_leaves_no_message(with_provider, db):
    gate = Gate()
    server = with_provider(GatedProvider(gate, ["un "], ["deux"]))
    with signed_in(server.url) as client:
        received: list[tuple[str, dict[str, Any]]] = []
        with connect_sse(client, "POST", "/chatlaya/message", json={"content": "q"}) as source:
            events = source.iter_sse()
            read_until(events, "token", received)
            conversation_id = received[0][1]["conversation_id"]
            assert client.delete(f"/chatlaya/conversations/{conversation_id}").status_code == 204
            gate.opened.set()
            read_until(events, "done", received)
    assert db.messages.count_documents({}) == 0
    assert db.conversations.count_documents({}) == 0
    wait_for(lambda: live_slots(db) == 0)


class FailsFirstProvider:
    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        raise ProviderUnavailable("down")
        yield ChatChunk()  # pragma: no cover - makes this an async generator

    async def aclose(self) -> None:
        return None


def test_a_refused_turn_leaves_the_conversation_as_it_was(with_provider, db):
    server = with_provider(FailsFirstProvider())
    with signed_in(server.url) as client:
        conversation = client.post("/chatlaya/conversations").json()["conversation"]
        refused = chat(client, "un titre qui ne doit pas rester", conversation["id"])
        assert refused.status == 503 and refused.body["detail"]["code"] == "provider_unavailable"
        after = client.get("/chatlaya/conversations").json()["items"][0]
    assert after == conversation  # same title (none), same updated_at
    assert db.messages.count_documents({}) == 0
    assert live_slots(db) == 0


def test_line_separators_are_escaped_and_the_reply_is_exact(server):
    content = "avant\u2028après\u2029fin\x85là"
    with signed_in(server.url) as client:
        with client.stream("POST", "/chatlaya/message", json={"content": content}) as response:
            raw = response.read()
        assert "\u2028".encode() not in raw and "\u2029".encode() not in raw and "\x85".encode() not in raw
        text = raw.decode()
        data_lines = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
        # Each `data:` survives a client that splits lines with str.splitlines().
        assert all(len(line.splitlines()) == 1 for line in data_lines)
        assert "".join(json.loads(line).get("text", "") for line in data_lines) == content
        assert chat(client, content).text() == content


class SurrogateProvider:
    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        yield ChatChunk(text="a\ud800b")

    async def aclose(self) -> None:
        return None


def test_a_lone_surrogate_from_the_provider_becomes_a_replacement_character(with_provider, db):
    server = with_provider(SurrogateProvider())
    with signed_in(server.url) as client:
        stream = chat(client, "x")
    assert stream.names() == ["start", "token", "done"]
    assert stream.text() == "a\ufffdb"
    stored = db.messages.find_one({"_id": ObjectId(stream.data("start")["message_id"])})
    assert stored["content"] == "a\ufffdb" and stored["status"] == "complete"


class StubbornProvider:
    """Takes `cleanup` seconds to stop once cancelled (a model finishing its current step)."""

    def __init__(self, cleanup: float) -> None:
        self.cleanup = cleanup
        self.stopped = asyncio.Event()

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        yield ChatChunk(text="dit ")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(self.cleanup)
            self.stopped.set()
            raise

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def stores(mongo_uri: str, db_name: str, db):
    database = Database(mongo_uri, db_name)
    await database.ensure_indexes()
    yield ConversationStore(database), MessageStore(database), StreamSlots(database, lease=timedelta(minutes=5))
    await database.close()


TIMINGS = TurnTimings(checkpoint_seconds=0.1, lease=timedelta(seconds=30), detached_timeout_seconds=60)


async def a_running_turn(
    conversations: ConversationStore, messages: MessageStore, slots: StreamSlots, registry: TurnRegistry
) -> tuple[Turn, StubbornProvider]:
    """A turn as `ChatService.open_turn` leaves it: messages stored, slot held, accepted, one token said."""
    user_id = str(ObjectId())
    conversation = await conversations.create(user_id)
    message_id = str(ObjectId())
    slot = await slots.acquire(f"chat:{user_id}", 1, message_id)
    assert slot is not None
    user_message_id = await messages.open_turn(
        conversation_id=conversation.id, user_id=user_id, content="q", parent_id=None,
        assistant_id=ObjectId(message_id), provider="stubborn", model="m1", created_at=utcnow(), lease=TIMINGS.lease,
    )  # fmt: skip
    context = TurnContext(user_id, conversation.id, user_message_id, message_id, "stubborn", "m1", slot)
    provider = StubbornProvider(cleanup=3)
    turn = Turn(context, provider, ChatRequest([ChatMessage("user", "q")], "m1"), messages, slots, TIMINGS)
    registry.start(turn)
    await turn.first_item(5)
    turn.accept()
    assert turn.text() == "dit "
    return turn, provider


async def test_a_stop_ends_the_reply_without_waiting_for_a_slow_provider(stores, db):
    conversations, messages, slots = stores
    registry = TurnRegistry(messages, slots, TIMINGS)
    turn, provider = await a_running_turn(conversations, messages, slots, registry)
    stream = LiveStream(turn)
    stream.first_events()
    assert [e.name for e in await stream.next_events(5)] == ["token"]

    turn.stop("stopped")
    events = await asyncio.wait_for(stream.next_events(5), 2)  # the provider needs 3 s to stop
    assert [e.name for e in events] == ["done"] and events[0].data["finish_reason"] == "stopped"
    assert not provider.stopped.is_set()
    stored = db.messages.find_one({"_id": ObjectId(turn.message_id)})
    assert stored["status"] == "incomplete" and stored["finish_reason"] == "stopped" and stored["content"] == "dit "
    assert live_slots(db) == 0
    await asyncio.wait_for(provider.stopped.wait(), 5)  # still told to stop, in the background
    await stream.close()


async def test_shutdown_ends_running_replies_before_the_database_closes(mongo_uri: str, db_name: str, db):
    # What Services.aclose does: end the registry's turns, then close the database.
    database = Database(mongo_uri, db_name)
    conversations, messages = ConversationStore(database), MessageStore(database)
    slots = StreamSlots(database, lease=timedelta(minutes=5))
    registry = TurnRegistry(messages, slots, TIMINGS)
    turn, _ = await a_running_turn(conversations, messages, slots, registry)

    await registry.aclose()
    await database.close()  # right away, as at shutdown

    stored = db.messages.find_one({"_id": ObjectId(turn.message_id)})
    assert stored["status"] == "incomplete" and stored["finish_reason"] == "interrupted"
    assert stored["content"] == "dit "
    assert live_slots(db) == 0 and len(registry) == 0
