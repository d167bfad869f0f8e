"""Conversations and messages: get-or-create, listing, ownership, bad input."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime

import httpx
import pytest
from bson import ObjectId

from innova_server.testing.chat_client import chat, signed_in


def test_session_returns_the_same_conversation_until_archived(server, db):
    with signed_in(server.url) as client:
        first = client.post("/chatlaya/session")
        assert first.status_code == 200
        conversation = first.json()["conversation"]
        assert set(conversation) == {"id", "title", "created_at", "updated_at", "archived"}
        assert conversation["archived"] is False and conversation["title"] is None
        assert datetime.fromisoformat(conversation["created_at"]).tzinfo is not None
        assert client.post("/chatlaya/session").json()["conversation"]["id"] == conversation["id"]

        archived = client.patch(f"/chatlaya/conversations/{conversation['id']}", json={"archived": True})
        assert archived.status_code == 200 and archived.json()["conversation"]["archived"] is True
        fresh = client.post("/chatlaya/session").json()["conversation"]
        assert fresh["id"] != conversation["id"]
    assert db.conversations.count_documents({}) == 2


def test_twenty_concurrent_session_calls_give_one_conversation(server, db):
    with signed_in(server.url) as client:
        cookies = client.cookies

    async def call_all() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, cookies=cookies, timeout=30) as aclient:
            responses = await asyncio.gather(*[aclient.post("/chatlaya/session") for _ in range(20)])
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return [r.json()["conversation"]["id"] for r in responses]

    ids = asyncio.run(call_all())
    assert len(set(ids)) == 1
    assert db.conversations.count_documents({}) == 1


def test_new_conversation_is_201_and_becomes_active(server):
    with signed_in(server.url) as client:
        old = client.post("/chatlaya/session").json()["conversation"]
        created = client.post("/chatlaya/conversations")
        assert created.status_code == 201
        new = created.json()["conversation"]
        assert new["id"] != old["id"]
        assert client.post("/chatlaya/session").json()["conversation"]["id"] == new["id"]
        # A message without conversation_id goes to the active one.
        stream = chat(client, "bonjour")
        assert stream.data("start")["conversation_id"] == new["id"]


def test_title_from_first_message_until_renamed(server):
    long_text = "Comment préparer un plan d'affaires solide pour une startup agricole au Sénégal en 2026 ?"
    with signed_in(server.url) as client:
        stream = chat(client, long_text)
        conversation_id = stream.data("start")["conversation_id"]
        title = client.get("/chatlaya/conversations").json()["items"][0]["title"]
        assert title.endswith("…") and len(title) <= 61
        assert long_text.startswith(title[:-1]) and long_text[len(title) - 1] == " "  # cut at a word boundary
        chat(client, "deuxième message", conversation_id)
        assert client.get("/chatlaya/conversations").json()["items"][0]["title"] == title

        renamed = client.patch(f"/chatlaya/conversations/{conversation_id}", json={"title": "  Mon plan  "})
        assert renamed.json()["conversation"]["title"] == "Mon plan"
        chat(client, "troisième", conversation_id)
        assert client.get("/chatlaya/conversations").json()["items"][0]["title"] == "Mon plan"

        # Renamed before any message: the user's title stays.
        other = client.post("/chatlaya/conversations").json()["conversation"]["id"]
        client.patch(f"/chatlaya/conversations/{other}", json={"title": "Choisi"})
        chat(client, "premier message", other)
        titles = {c["id"]: c["title"] for c in client.get("/chatlaya/conversations").json()["items"]}
        assert titles[other] == "Choisi"


def test_updated_at_moves_and_orders_the_list(server):
    with signed_in(server.url) as client:
        a = client.post("/chatlaya/conversations").json()["conversation"]
        b = client.post("/chatlaya/conversations").json()["conversation"]
        assert [c["id"] for c in client.get("/chatlaya/conversations").json()["items"]] == [b["id"], a["id"]]
        chat(client, "a bouge", a["id"])
        items = client.get("/chatlaya/conversations").json()["items"]
        assert [c["id"] for c in items] == [a["id"], b["id"]]
        assert datetime.fromisoformat(items[0]["updated_at"]) > datetime.fromisoformat(a["updated_at"])


def test_conversation_list_pages_by_keyset_and_filters_archived(server):
    with signed_in(server.url) as client:
        ids = [client.post("/chatlaya/conversations").json()["conversation"]["id"] for _ in range(7)]
        client.patch(f"/chatlaya/conversations/{ids[0]}", json={"archived": True})
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, object] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/chatlaya/conversations", params=params).json()
            assert len(page["items"]) <= 2
            seen += [c["id"] for c in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == list(reversed(ids[1:]))
        archived = client.get("/chatlaya/conversations", params={"archived": "true"}).json()
        assert [c["id"] for c in archived["items"]] == [ids[0]] and archived["next_cursor"] is None


@pytest.mark.parametrize("limit", [0, 101, -1, "x"])
def test_list_limits_outside_1_to_100_are_422(server, limit):
    with signed_in(server.url) as client:
        assert client.get("/chatlaya/conversations", params={"limit": limit}).status_code == 422
        assert client.get("/chatlaya/messages", params={"limit": limit}).status_code == 422


def test_delete_removes_the_conversation_and_its_messages(server, db):
    with signed_in(server.url) as client:
        keep = chat(client, "garde").data("start")["conversation_id"]
        gone = client.post("/chatlaya/conversations").json()["conversation"]["id"]
        chat(client, "efface", gone)
        assert db.messages.count_documents({"conversation_id": ObjectId(gone)}) == 2
        response = client.delete(f"/chatlaya/conversations/{gone}")
        assert response.status_code == 204 and response.content == b""
        assert db.messages.count_documents({"conversation_id": ObjectId(gone)}) == 0
        assert db.messages.count_documents({"conversation_id": ObjectId(keep)}) == 2
        assert client.delete(f"/chatlaya/conversations/{gone}").status_code == 404


def test_another_users_conversation_is_404(server, db):
    with signed_in(server.url) as alice, signed_in(server.url) as bob:
        theirs = chat(alice, "secret d'Alice").data("start")["conversation_id"]
        attempts = [
            bob.get("/chatlaya/messages", params={"conversation_id": theirs}),
            bob.patch(f"/chatlaya/conversations/{theirs}", json={"title": "pris"}),
            bob.patch(f"/chatlaya/conversations/{theirs}", json={}),
            bob.delete(f"/chatlaya/conversations/{theirs}"),
            bob.post("/chatlaya/message", json={"content": "salut", "conversation_id": theirs}),
        ]
        for response in attempts:
            assert response.status_code == 404, response.text
            assert response.json()["detail"]["code"] == "conversation_not_found"
        assert bob.get("/chatlaya/conversations").json()["items"] == []
        assert bob.post("/chatlaya/session").json()["conversation"]["id"] != theirs
    assert db.conversations.find_one({"_id": ObjectId(theirs)})["title"].startswith("secret")
    assert db.messages.count_documents({"conversation_id": ObjectId(theirs)}) == 2


@pytest.mark.parametrize("bad_id", ["nope", "123", "0" * 24, "zzzzzzzzzzzzzzzzzzzzzzzz", "%00", "a" * 60])
def test_invalid_ids_are_404_never_500(server, bad_id):
    with signed_in(server.url) as client:
        responses = [
            client.get("/chatlaya/messages", params={"conversation_id": bad_id}),
            client.patch(f"/chatlaya/conversations/{bad_id}", json={"archived": True}),
            client.delete(f"/chatlaya/conversations/{bad_id}"),
            client.post("/chatlaya/message", json={"content": "x", "conversation_id": bad_id}),
        ]
    for response in responses:
        assert response.status_code in (404, 422), response.text
        if response.status_code == 404:
            assert response.json()["detail"]["code"] in ("conversation_not_found", "not_found")


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"content": ""}, 422),
        ({"content": "   \n\t "}, 422),
        ({}, 422),
        ({"content": 42}, 422),
        ({"content": None}, 422),
        ({"content": "x", "extra": 1}, 422),
        ({"content": "x" * 32_001}, 422),
        ({"content": "é" * 32_001}, 422),
    ],
)
def test_bad_message_bodies(server, db, body, status):
    with signed_in(server.url) as client:
        response = client.post("/chatlaya/message", json=body)
    assert response.status_code == status
    assert db.messages.count_documents({}) == 0


def test_content_of_exactly_32000_chars_is_accepted(server):
    with signed_in(server.url) as client:
        stream = chat(client, "mot " * 8000)
    assert stream.status == 200 and stream.text() == "mot " * 8000


@pytest.mark.parametrize("cursor", ["garbage", "AAAA", "MTIzOm5vcGU", "!!"])
def test_bad_cursors_are_422(server, cursor):
    with signed_in(server.url) as client:
        assert client.get("/chatlaya/conversations", params={"cursor": cursor}).status_code == 422
        conversation_id = client.post("/chatlaya/session").json()["conversation"]["id"]
        response = client.get("/chatlaya/messages", params={"conversation_id": conversation_id, "before": cursor})
        assert response.status_code == 422


def test_bad_patch_bodies_are_422(server):
    with signed_in(server.url) as client:
        conversation_id = client.post("/chatlaya/session").json()["conversation"]["id"]
        for body in ({"title": ""}, {"title": "   "}, {"title": "x" * 201}, {"archived": "maybe"}, {"owner": "me"}):
            assert client.patch(f"/chatlaya/conversations/{conversation_id}", json=body).status_code == 422


def test_everything_requires_a_session(server):
    with httpx.Client(base_url=server.url) as anonymous:
        responses = [
            anonymous.post("/chatlaya/session"),
            anonymous.post("/chatlaya/conversations"),
            anonymous.get("/chatlaya/conversations"),
            anonymous.get("/chatlaya/messages"),
            anonymous.post("/chatlaya/message", json={"content": "x"}),
            anonymous.delete(f"/chatlaya/conversations/{ObjectId()}"),
        ]
    assert [r.status_code for r in responses] == [401] * len(responses)


def test_messages_pages_are_complete_and_duplicate_free_while_messages_arrive(server):
    with signed_in(server.url) as client:
        conversation_id = client.post("/chatlaya/session").json()["conversation"]["id"]
        for index in range(12):
            chat(client, f"ancien {index}", conversation_id)
        before_walk = client.get("/chatlaya/messages", params={"conversation_id": conversation_id, "limit": 100})
        existing = [m["id"] for m in before_walk.json()["items"]]
        assert len(existing) == 24

        stop = threading.Event()

        def writer() -> None:
            with httpx.Client(base_url=server.url, cookies=client.cookies, timeout=30) as other:
                index = 0
                while not stop.is_set():
                    chat(other, f"nouveau {index}", conversation_id)
                    index += 1

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            walked: list[dict[str, object]] = []
            before = None
            while True:
                params: dict[str, object] = {"conversation_id": conversation_id, "limit": 5}
                if before:
                    params["before"] = before
                page = client.get("/chatlaya/messages", params=params).json()
                walked = page["items"] + walked  # each page is older than the previous one
                before = page["next_cursor"]
                if before is None:
                    break
        finally:
            stop.set()
            thread.join()
    ids = [m["id"] for m in walked]
    assert len(ids) == len(set(ids)), "a message was returned twice"
    assert set(existing) <= set(ids), "a message that existed before the walk was missed"
    created = [(datetime.fromisoformat(str(m["created_at"])), str(m["id"])) for m in walked]
    assert created == sorted(created), "items are not oldest→newest"


def test_messages_without_conversation_id_use_the_active_conversation(server):
    with signed_in(server.url) as client:
        assert client.get("/chatlaya/messages").json() == {"items": [], "next_cursor": None}
        chat(client, "coucou")
        items = client.get("/chatlaya/messages").json()["items"]
    assert [m["content"] for m in items] == ["coucou", "coucou"]
