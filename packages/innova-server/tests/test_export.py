"""`GET /auth/me/export` over real HTTP and a real database: complete, private, rate limited, constant memory."""

from __future__ import annotations

import gc
import tracemalloc
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from bson import ObjectId

from innova_server.auth.tokens import hash_token
from innova_server.testing.chat_client import PASSWORD, chat, signed_in


def export(client: httpx.Client) -> httpx.Response:
    return client.get("/auth/me/export")


def test_the_export_holds_everything_of_the_user_and_nothing_else(server, db):
    with signed_in(server.url, "owner@example.com") as owner, signed_in(server.url, "other@example.com") as other:
        assert owner.patch("/auth/me", json={"name": "Ada « l'exportée »"}).status_code == 200
        assert chat(owner, "première question").status == 200
        conversation = owner.post("/chatlaya/conversations").json()["conversation"]
        assert chat(owner, "seconde question, accentuée : é", conversation["id"]).status == 200
        assert chat(other, "un secret de l'autre compte").status == 200

        response = export(owner)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert response.headers["content-disposition"].startswith("attachment")
        assert response.headers["cache-control"] == "no-store"
        assert "content-length" not in response.headers  # streamed, not built whole
        data = response.json()

        assert set(data) == {"user", "sessions", "conversations", "messages"}
        user_id = db.users.find_one({"email": "owner@example.com"})["_id"]
        assert data["user"]["id"] == str(user_id)
        assert data["user"]["email"] == "owner@example.com"
        assert data["user"]["name"] == "Ada « l'exportée »"
        assert data["user"]["email_verified"] is False
        assert set(data["user"]) == {"id", "email", "name", "email_verified", "created_at", "updated_at"}
        datetime.fromisoformat(data["user"]["created_at"])

        stored_conversations = {str(d["_id"]) for d in db.conversations.find({"user_id": user_id})}
        stored_messages = {str(d["_id"]) for d in db.messages.find({"user_id": user_id})}
        assert {c["id"] for c in data["conversations"]} == stored_conversations and len(stored_conversations) == 2
        assert {m["id"] for m in data["messages"]} == stored_messages and len(stored_messages) == 4
        assert [m["id"] for m in data["messages"]] == sorted(m["id"] for m in data["messages"])
        contents = {m["content"] for m in data["messages"]}
        assert {"première question", "seconde question, accentuée : é"} <= contents
        assert all(m["conversation_id"] in stored_conversations for m in data["messages"])
        assert {s["id"] for s in data["sessions"]} == {str(d["_id"]) for d in db.sessions.find({"user_id": user_id})}

        # Nothing of the other account, and no secret of any kind.
        assert "secret de l'autre" not in response.text and "other@example.com" not in response.text
        other_id = str(db.users.find_one({"email": "other@example.com"})["_id"])
        assert other_id not in response.text
        assert "password_hash" not in response.text and "$argon2" not in response.text
        assert "token_hash" not in response.text
        for session in db.sessions.find({}):
            assert session["token_hash"] not in response.text
        assert owner.cookies["innova_session"] not in response.text
        assert hash_token(owner.cookies["innova_session"]) not in response.text
        assert PASSWORD not in response.text


def test_an_empty_account_exports_empty_lists(server):
    with signed_in(server.url) as client:
        data = export(client).json()
    assert data["conversations"] == [] and data["messages"] == [] and len(data["sessions"]) == 1


def test_the_export_is_rate_limited_per_user(start_server):
    server = start_server(rate_limit_export_user="2/1h")
    with signed_in(server.url) as client:
        assert [export(client).status_code for _ in range(2)] == [200, 200]
        limited = export(client)
        assert limited.status_code == 429
        assert limited.json()["detail"]["code"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 3600
    with signed_in(server.url) as another:
        assert export(another).status_code == 200


def test_the_default_limit_is_three_an_hour(settings):
    assert (settings.rate_limit_export_user.count, settings.rate_limit_export_user.seconds) == (3, 3600)


def seed_messages(db, user_id: ObjectId, count: int) -> None:
    """`count` messages of about 300 characters in 10 conversations, as Chatlaya stores them."""
    now = datetime.now(UTC)
    conversations = [
        {"_id": ObjectId(), "user_id": user_id, "title": f"Conversation {i}", "created_at": now,
         "updated_at": now, "archived": False}
        for i in range(10)
    ]
    db.conversations.insert_many(conversations)
    batch = []
    for i in range(count):
        batch.append(
            {"conversation_id": conversations[i % 10]["_id"], "user_id": user_id,
             "role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " + "é" * 290,
             "created_at": now + timedelta(milliseconds=i), "status": "complete", "provider": "echo",
             "model": "echo", "finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 5}}
        )
        if len(batch) == 1000:
            db.messages.insert_many(batch)
            batch = []
    if batch:
        db.messages.insert_many(batch)


def peak_growth_of_export(server, db, email: str, messages: int) -> tuple[int, int]:
    """(peak bytes the process allocated above its baseline during the export, body size)."""
    # A new connection per request: seeding 10 000 messages can outlast the server's keep-alive
    # (uvicorn's 5 s), and a request sent on a connection the server is closing is reset.
    with signed_in(server.url, email, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        seed_messages(db, db.users.find_one({"email": email})["_id"], messages)
        export(client)  # warm up: imports, connection pool, caches
        gc.collect()
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            size = 0
            with client.stream("GET", "/auth/me/export") as response:
                assert response.status_code == 200
                for chunk in response.iter_raw():  # read and dropped, as a browser saves to disk
                    size += len(chunk)
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
    return peak, size


@pytest.mark.slow
def test_export_memory_does_not_grow_with_the_number_of_messages(start_server, db):
    server = start_server(rate_limit_export_user="100/1h")
    small_peak, small_size = peak_growth_of_export(server, db, "small@example.com", 1_000)
    big_peak, big_size = peak_growth_of_export(server, db, "big@example.com", 10_000)
    print(
        f"\nexport peak memory growth: {small_peak / 2**20:.2f} MiB for 1 000 messages "
        f"({small_size / 2**20:.1f} MiB of JSON), {big_peak / 2**20:.2f} MiB for 10 000 messages "
        f"({big_size / 2**20:.1f} MiB of JSON)"
    )
    assert big_size > 9 * small_size
    # Ten times the data, about the same memory: far below the body's size.
    assert big_peak < 2 * small_peak + 2**20
    assert big_peak < big_size / 4
