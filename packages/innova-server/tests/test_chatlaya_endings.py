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

from innova_server.chat import ChatChunk, ChatMessage, ChatRequest, ProviderUnavailable, Usage
from innova_server.chatlaya.service import ChatTurn, TurnContext, drain_finalisers
from innova_server.chatlaya.store import ConversationStore, MessageStore, StreamSlots
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
    assert raw.count("event: token") == 20 and raw.rstrip().split("\n\n")[-1].startswith("event: done")


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
    """The assistant message cannot be stored (its id is taken by then): a real server-side failure."""
    gate = Gate()
    server = with_provider(GatedProvider(gate, ["un "], ["deux"], error), chat_max_concurrent_streams=1)
    with signed_in(server.url) as client:
        received: list[tuple[str, dict[str, Any]]] = []
        with connect_sse(client, "POST", "/chatlaya/message", json={"content": "q"}) as source:
            events = source.iter_sse()
            read_until(events, "token", received)
            message_id = ObjectId(received[0][1]["message_id"])
            db.messages.insert_one({"_id": message_id, "squatter": True})
            gate.opened.set()
            read_until(events, "done", received)
        names = [name for name, _ in received]
        assert names == ["start", "token", "token", "error", "done"]
        errors = [data for name, data in received if name == "error"]
        if error is None:
            assert errors[0]["code"] == "database_unavailable" and errors[0]["retryable"] is True
        else:
            assert errors[0]["code"] == "provider_unavailable"
        assert received[-1][1]["finish_reason"] == "error"
        assert db.messages.find_one({"_id": message_id}) == {"_id": message_id, "squatter": True}
        # The slot was still given back: with a cap of 1 the next message is accepted.
        wait_for(lambda: live_slots(db) == 0)
        gate.opened.set()
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
        assert db.messages.count_documents({"role": "assistant"}) == 0
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


async def a_close_cancelled_midway(
    conversations: ConversationStore, messages: MessageStore, slots: StreamSlots
) -> tuple[TurnContext, StubbornProvider]:
    """A turn whose client left after one token, its `close()` cancelled again while the provider stops."""
    user_id = str(ObjectId())
    conversation = await conversations.create(user_id)
    slot = await slots.acquire(f"chat:{user_id}", 1)
    assert slot is not None
    context = TurnContext(user_id, conversation.id, str(ObjectId()), ObjectId(), "stubborn", "m1", slot)
    provider = StubbornProvider(cleanup=0.5)
    turn = ChatTurn(context, provider, ChatRequest([ChatMessage("user", "q")], "m1"), messages, slots, conversations)
    turn.begin()
    assert [e.name for e in await turn.next_events(5)] == ["token"]

    closing = asyncio.create_task(turn.close())
    await asyncio.sleep(0.1)  # close() now waits for the provider to stop
    closing.cancel()  # ... and is cancelled again (the server stopping)
    with pytest.raises(asyncio.CancelledError):
        await closing
    return context, provider


async def test_a_second_cancellation_while_closing_still_writes_the_message_and_frees_the_slot(stores, db):
    conversations, messages, slots = stores
    context, provider = await a_close_cancelled_midway(conversations, messages, slots)
    slot = context.slot

    await asyncio.wait_for(provider.stopped.wait(), 5)
    for _ in range(500):
        if await messages.collection.find_one({"_id": context.message_id}) and await slots.held(slot.key) == 0:
            break
        await asyncio.sleep(0.01)
    stored = await messages.collection.find_one({"_id": context.message_id})
    assert stored is not None and stored["status"] == "incomplete" and stored["content"] == "dit "
    assert await slots.held(slot.key) == 0


async def test_shutdown_waits_for_cut_streams_before_the_database_closes(mongo_uri: str, db_name: str, db):
    # What Services.aclose does after uvicorn's graceful timeout cancelled the
    # request tasks: drain the shielded endings, then close the database.
    database = Database(mongo_uri, db_name)
    conversations, messages = ConversationStore(database), MessageStore(database)
    slots = StreamSlots(database, lease=timedelta(minutes=5))
    context, _ = await a_close_cancelled_midway(conversations, messages, slots)

    await drain_finalisers()
    await database.close()  # right away, as at shutdown

    stored = db.messages.find_one({"_id": context.message_id})
    assert stored is not None and stored["status"] == "incomplete" and stored["content"] == "dit "
    assert live_slots(db) == 0
