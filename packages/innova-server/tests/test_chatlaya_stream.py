"""The streamed reply over a real connection, read with httpx-sse."""

from __future__ import annotations

import re
from datetime import datetime

import httpx
from bson import ObjectId

from innova_server.testing.chat_client import chat, signed_in


def test_event_sequence_and_payloads(server, db):
    content = "Bonjour  Chatlaya,\ncomment ça va ? 🌍\t fin "
    with signed_in(server.url) as client:
        stream = chat(client, content)
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-cache, no-transform"
    assert stream.headers["x-accel-buffering"] == "no"
    names = stream.names()
    assert names[0] == "start" and names[-1] == "done"
    assert set(names[1:-1]) == {"token"} and len(names) - 2 > 3
    start, done = stream.data("start"), stream.data("done")
    assert start["provider"] == "echo" and start["model"] == "echo"
    assert ObjectId.is_valid(start["conversation_id"]) and ObjectId.is_valid(start["user_message_id"])
    assert done["message_id"] == start["message_id"]
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == len(names) - 2
    assert stream.text() == content

    stored = list(db.messages.find({"conversation_id": ObjectId(start["conversation_id"])}).sort("created_at", 1))
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert str(stored[0]["_id"]) == start["user_message_id"]
    assert stored[0]["content"] == content
    assert str(stored[1]["_id"]) == start["message_id"]
    assert stored[1]["content"] == content
    assert stored[1]["status"] == "complete"
    assert stored[1]["provider"] == "echo" and stored[1]["finish_reason"] == "stop"
    conversation = db.conversations.find_one({"_id": ObjectId(start["conversation_id"])})
    assert conversation["title"].startswith("Bonjour Chatlaya,")
    # The stream's slot was given back when it completed.
    assert [doc["holders"] for doc in db.stream_slots.find({})] == [[]]


def test_messages_endpoint_returns_the_turn(server):
    with signed_in(server.url) as client:
        stream = chat(client, "un deux trois")
        conversation_id = stream.data("start")["conversation_id"]
        page = client.get("/chatlaya/messages", params={"conversation_id": conversation_id}).json()
    assert page["next_cursor"] is None
    user, assistant = page["items"]
    fields = {
        "id", "conversation_id", "parent_id", "sibling_ids", "feedback", "role", "content", "created_at", "status",
        "provider", "model", "finish_reason",
    }  # fmt: skip
    assert set(user) == fields and set(assistant) == fields
    assert user["parent_id"] is None and assistant["parent_id"] == user["id"] == stream.data("start")["user_message_id"]
    assert user["sibling_ids"] == [user["id"]] and assistant["sibling_ids"] == [assistant["id"]]
    assert user["feedback"] is None and assistant["feedback"] is None
    assert (user["role"], user["content"], user["status"]) == ("user", "un deux trois", "complete")
    assert (assistant["role"], assistant["content"], assistant["status"]) == ("assistant", "un deux trois", "complete")
    assert assistant["provider"] == "echo" and assistant["model"] == "echo" and assistant["finish_reason"] == "stop"
    assert datetime.fromisoformat(assistant["created_at"]) >= datetime.fromisoformat(user["created_at"])


def test_openapi_documents_the_chat_routes(server):
    with httpx.Client(base_url=server.url) as client:
        schema = client.get("/openapi.json").json()
    for path in (
        "/chatlaya/session",
        "/chatlaya/conversations",
        "/chatlaya/conversations/{conversation_id}",
        "/chatlaya/messages",
        "/chatlaya/message",
    ):
        assert path in schema["paths"]
    assert "text/event-stream" in schema["paths"]["/chatlaya/message"]["post"]["responses"]["200"]["content"]


def mongo_commands(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {
        match[1]: float(match[2])
        for match in re.finditer(r'^innova_mongo_commands_total\{command="([^"]+)"\} (\S+)$', text, re.M)
    }


def test_database_round_trips_per_turn_do_not_grow_with_the_reply(server):
    with signed_in(server.url) as client:
        conversation_id = chat(client, "échauffement").data("start")["conversation_id"]

        def per_turn(content: str) -> dict[str, float]:
            before = mongo_commands(client)
            for _ in range(3):
                stream = chat(client, content, conversation_id)
                assert stream.text() == content
            after = mongo_commands(client)
            return {
                name: (count - before.get(name, 0)) / 3 for name, count in after.items() if count != before.get(name)
            }

        short = per_turn("un deux trois")
        long = per_turn("mot " * 2000)
    # 2000 tokens cost no more than 3: at most a checkpoint (one `update` and one `find`
    # for all the replies of the process) if a turn happened to span its interval.
    assert set(short) <= set(long) <= set(short) | {"update", "find"}
    assert all(long.get(name, 0) - short.get(name, 0) <= (1 if name in ("update", "find") else 0) for name in long)
    # The session lookup, and the conversation with its newest messages (two aggregates); the rate
    # limit and the stream slot (one update); the two messages and the conversation's branch (one
    # bulkWrite); the reply's end, its slot given back and the day's usage (one bulkWrite).
    assert short == {"aggregate": 2, "update": 1, "bulkWrite": 2}
