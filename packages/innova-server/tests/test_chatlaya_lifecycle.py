"""Replies that outlive their request: resume, stop, detach, and a worker killed mid-reply.

Real servers on loopback, one real database; the cross-host cases run the
production ASGI app in separate processes (`spawn_server`), as two hosts
behind a load balancer would.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import httpx
import pytest
from bson import ObjectId
from httpx_sse import connect_sse

from innova_server.chat import ProviderUnavailable
from innova_server.testing import registered
from innova_server.testing.chat_client import PASSWORD, Stream, chat, resume, signed_in
from innova_server.testing.providers import ProviderPlugin, ScriptedProvider
from innova_server.testing.server import wait_for

WORDS = [f"mot{index} " for index in range(400)]


def words(count: int) -> str:
    return "".join(WORDS[:count])


def open_reply(client: httpx.Client, content: str, *, tokens: int) -> Stream:
    """Send `content` and read `start` plus `tokens` tokens, then cut the connection."""
    with connect_sse(client, "POST", "/chatlaya/message", json={"content": content}) as source:
        assert source.response.status_code == 200
        return Stream(200, source.response.headers).read(source, tokens=tokens)


def stored(db, message_id: str) -> dict[str, Any]:
    return db.messages.find_one({"_id": ObjectId(message_id)})


def message_view(client: httpx.Client, message_id: str) -> dict[str, Any]:
    conversation = client.get("/chatlaya/messages").json()["items"]
    return next(item for item in conversation if item["id"] == message_id)


def gauge(client: httpx.Client, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", client.get("/metrics").text, re.M)
    assert match is not None, name
    return float(match[1])


def cookie_client(base_url: str, client: httpx.Client) -> httpx.Client:
    """Another device (or host) with the same session."""
    return httpx.Client(base_url=base_url, cookies=client.cookies, timeout=30)


def test_every_event_has_an_id_naming_its_position(server):
    content = "Bonjour à toi 🌍 fin"
    with signed_in(server.url) as client:
        stream = chat(client, content)
    message_id = stream.data("start")["message_id"]
    assert all(event_id and re.fullmatch(r"[A-Za-z0-9._:-]{1,100}", event_id) for event_id in stream.ids)
    assert stream.ids[0] == f"{message_id}.0"
    # Each token's id is the position after it, whatever the characters.
    position = 0
    for (name, data), event_id in zip(stream.events, stream.ids, strict=True):
        if name == "token":
            position += len(data["text"])
        assert event_id == f"{message_id}.{position}"


def test_resume_on_the_same_process_has_no_gap_and_no_duplicate(start_server, db, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_MS", "20")
    server = start_server()
    content = words(60)
    with signed_in(server.url) as client:
        first = open_reply(client, content, tokens=5)
        start = first.data("start")
        message_id = start["message_id"]
        rest = resume(client, message_id, first.last_id)
        assert rest.status == 200
        assert rest.names()[0] == "start" and rest.names()[-1] == "done"
        assert rest.data("start") == start  # the original payload
        assert first.text() + rest.text() == content
        assert rest.data("done")["finish_reason"] == "stop"
        # From the beginning (no id), after the end: a replay of the whole reply.
        replay = resume(client, message_id)
        assert replay.text() == content and replay.data("done") == rest.data("done")
        # The query parameter works too (for clients that cannot set headers).
        query = client.get(f"/chatlaya/messages/{message_id}/events", params={"last_event_id": first.ids[3]})
        assert query.status_code == 200
    assert stored(db, message_id)["content"] == content and stored(db, message_id)["status"] == "complete"


def test_a_reply_goes_on_after_the_client_leaves(start_server, db, monkeypatch):
    """The default detached timeout (60 s) outlasts the reply: it completes with nobody watching."""
    monkeypatch.setenv("ECHO_DELAY_MS", "20")
    server = start_server()
    content = words(50)
    with signed_in(server.url) as client:
        first = open_reply(client, content, tokens=2)
        message_id = first.data("start")["message_id"]
        wait_for(lambda: stored(db, message_id)["status"] == "complete", timeout=20, what="the reply to complete")
        assert stored(db, message_id)["content"] == content
        rest = resume(client, message_id, first.last_id)
    assert first.text() + rest.text() == content


def test_a_reply_nobody_watches_ends_after_the_detached_timeout(start_server, db, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_MS", "50")
    server = start_server(chat_detached_timeout_seconds=1, chat_checkpoint_ms=100, chat_lease_seconds=5)
    with signed_in(server.url) as client:
        first = open_reply(client, words(400), tokens=2)
        message_id = first.data("start")["message_id"]
        left = time.monotonic()
        # Still generating with nobody attached: the checkpoints show it growing.
        wait_for(lambda: len(stored(db, message_id)["content"]) > len(first.text()), what="generation to go on")
        assert stored(db, message_id)["status"] == "streaming"
        detached = gauge(client, "innova_chat_detached_streams")
        assert detached >= 1
        ended = wait_for(
            lambda: (doc := stored(db, message_id))["status"] != "streaming" and doc, timeout=10, what="the timeout"
        )
        assert time.monotonic() - left >= 1
        assert (ended["status"], ended["finish_reason"]) == ("incomplete", "cancelled")
        assert words(400).startswith(ended["content"]) and len(ended["content"]) > len(first.text())
        # The gauge follows once the ending is written and the slot released.
        wait_for(lambda: gauge(client, "innova_chat_detached_streams") == detached - 1, what="the gauge")


def test_a_client_that_comes_back_keeps_the_reply_alive(start_server, db, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_MS", "20")
    server = start_server(chat_detached_timeout_seconds=1, chat_checkpoint_ms=100, chat_lease_seconds=5)
    content = words(150)  # about 3 s: longer than the timeout
    with signed_in(server.url) as client:
        first = open_reply(client, content, tokens=2)
        message_id = first.data("start")["message_id"]
        rest = resume(client, message_id, first.last_id)  # back within the second, and stays
    assert first.text() + rest.text() == content
    assert stored(db, message_id)["status"] == "complete"


def test_stop_ends_every_attached_stream_and_keeps_the_text(start_server, db, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_MS", "30")
    server = start_server()
    content = words(300)
    with signed_in(server.url) as client:
        with connect_sse(client, "POST", "/chatlaya/message", json={"content": content}) as source:
            original = Stream(200, source.response.headers).read(source, tokens=3)
            message_id = original.data("start")["message_id"]
            other: dict[str, Stream] = {}
            with cookie_client(server.url, client) as device:
                follower = threading.Thread(target=lambda: other.setdefault("s", resume(device, message_id)))
                follower.start()
                stop = client.post(f"/chatlaya/messages/{message_id}/stop")
                assert stop.status_code == 202
                assert stop.json()["message"]["id"] == message_id
                original.read(source)
                follower.join(10)
        assert original.names()[-1] == "done" and original.data("done")["finish_reason"] == "stopped"
        assert other["s"].data("done")["finish_reason"] == "stopped"
        doc = stored(db, message_id)
        assert (doc["status"], doc["finish_reason"]) == ("incomplete", "stopped")
        assert doc["content"] == original.text() == other["s"].text()
        # Stopping a finished reply changes nothing.
        again = client.post(f"/chatlaya/messages/{message_id}/stop")
        assert again.status_code == 202
        assert again.json()["message"]["status"] == "incomplete"
        assert again.json()["message"]["finish_reason"] == "stopped"
        assert stored(db, message_id) == doc


def test_the_message_list_shows_a_streaming_reply_with_its_text_so_far(start_server, db, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_MS", "30")
    server = start_server(chat_checkpoint_ms=100)
    with signed_in(server.url) as client:
        first = open_reply(client, words(200), tokens=5)
        message_id = first.data("start")["message_id"]
        view = wait_for(
            lambda: (item := message_view(client, message_id))["content"] and item, what="a checkpoint"
        )
        assert view["status"] == "streaming" and view["finish_reason"] is None
        assert words(200).startswith(view["content"])
        assert view["parent_id"] == first.data("start")["user_message_id"]
        client.post(f"/chatlaya/messages/{message_id}/stop")


@pytest.mark.slow
def test_another_host_resumes_and_stops_a_reply(spawn_server, db):
    """Two processes on one database: the reply runs on A; B resumes it exactly, and B's stop lands on A."""
    env = {"chat_checkpoint_ms": 200, "ECHO_DELAY_MS": "40"}
    host_a, host_b = spawn_server(**env), spawn_server(**env)
    with signed_in(host_a.url) as on_a, cookie_client(host_b.url, on_a) as on_b:
        # 1. Cut on A after a few tokens, resumed on B: B may have to wait for A's next checkpoint.
        content = words(80)
        first = open_reply(on_a, content, tokens=5)
        message_id = first.data("start")["message_id"]
        rest = resume(on_b, message_id, first.last_id)
        assert rest.status == 200 and rest.data("start") == first.data("start")
        assert first.text() + rest.text() == content
        assert stored(db, message_id)["content"] == content

        # 2. Attached on A, followed on B, stopped through B.
        long = words(400)
        with connect_sse(on_a, "POST", "/chatlaya/message", json={"content": long}) as source:
            on_host_a = Stream(200, source.response.headers).read(source, tokens=3)
            said_first = on_host_a.text()
            message_id = on_host_a.data("start")["message_id"]
            followed = resume(on_b, message_id, on_host_a.last_id, tokens=1)
            asked = time.monotonic()
            stop = on_b.post(f"/chatlaya/messages/{message_id}/stop")
            assert stop.status_code == 202 and stop.json()["message"]["status"] == "streaming"
            on_host_a.read(source)
            assert time.monotonic() - asked < 2, "the stop did not reach host A within 2 s"
        assert on_host_a.data("done")["finish_reason"] == "stopped"
        doc = stored(db, message_id)
        assert (doc["status"], doc["finish_reason"]) == ("incomplete", "stopped")
        assert doc["content"] == on_host_a.text()
        # B's follower, resumed again, ends with the same text and `done`.
        tail = resume(on_b, message_id, followed.last_id)
        assert tail.names()[-1] == "done"
        assert said_first + followed.text() + tail.text() == doc["content"]


@pytest.mark.slow
def test_a_worker_killed_mid_reply_is_interrupted_after_its_lease(spawn_server, start_server, db):
    settings = {"chat_checkpoint_ms": 200, "chat_lease_seconds": 2, "chat_max_concurrent_streams": 1}
    doomed = spawn_server(**settings, ECHO_DELAY_MS="40")
    survivor = start_server(**settings)
    with signed_in(doomed.url) as client, cookie_client(survivor.url, client) as elsewhere:
        first = open_reply(client, words(300), tokens=15)
        message_id = first.data("start")["message_id"]
        time.sleep(0.3)  # at least one checkpoint after those tokens
        doomed.kill()
        killed = time.monotonic()
        assert message_view(elsewhere, message_id)["status"] == "streaming"  # its lease still runs

        view = wait_for(
            lambda: (item := message_view(elsewhere, message_id))["status"] != "streaming" and item,
            timeout=10,
            what="the lease to lapse",
        )
        assert time.monotonic() - killed < 5
        assert (view["status"], view["finish_reason"]) == ("incomplete", "interrupted")
        assert view["content"] and first.text().startswith(view["content"][: len(first.text())])
        assert words(300).startswith(view["content"])
        doc = stored(db, message_id)
        assert (doc["status"], doc["finish_reason"]) == ("incomplete", "interrupted")  # made permanent
        # Its stream slot is free: with a cap of 1, the user can talk again, on the surviving host.
        assert chat(elsewhere, "encore").text() == "encore"
        replay = resume(elsewhere, message_id)
        assert replay.text() == view["content"] and replay.data("done")["finish_reason"] == "interrupted"


# -- bad input -------------------------------------------------------------------


def test_ids_that_are_not_the_callers_reply_are_404(server):
    with signed_in(server.url) as alice, signed_in(server.url) as bob:
        reply = chat(alice, "secret").data("start")
        for message_id in (reply["message_id"], reply["user_message_id"], str(ObjectId()), "nope", "0" * 64):
            for client in (alice, bob) if message_id != reply["message_id"] else (bob,):
                events = client.get(f"/chatlaya/messages/{message_id}/events")
                stop = client.post(f"/chatlaya/messages/{message_id}/stop")
                for response in (events, stop):
                    assert response.status_code == 404, (message_id, response.text)
                    assert response.json()["detail"]["code"] == "message_not_found"
        too_long = alice.get(f"/chatlaya/messages/{'a' * 65}/events")
        assert too_long.status_code == 422


def test_event_ids_naming_no_position_are_422(server):
    with signed_in(server.url) as client:
        first = chat(client, "un deux trois")
        other = chat(client, "quatre").data("start")["message_id"]
        message_id = first.data("start")["message_id"]
        end = len("un deux trois")
        bad = [
            "garbage",
            f"{other}.0",  # another message's position
            f"{message_id}.{end + 1}",  # past the end
            f"{message_id}.-1",
            f"{message_id}.01",
            f"{message_id}.1e3",
            f"{message_id}.{'9' * 30}",
            f"{message_id}.3\n",
            "x" * 101,
            "é",
        ]
        for value in bad:
            for response in (
                client.get(f"/chatlaya/messages/{message_id}/events", params={"last_event_id": value}),
                client.get(f"/chatlaya/messages/{message_id}/events", headers={"Last-Event-ID": value})
                if value.isascii() and "\n" not in value
                else None,
            ):
                if response is None:
                    continue
                assert response.status_code == 422, (value, response.status_code, response.text)
                assert "detail" in response.json()
        # The end itself is a position: start and done, nothing between.
        at_end = resume(client, message_id, f"{message_id}.{end}")
        assert at_end.names() == ["start", "done"]


def test_replay_of_a_failed_reply_says_error_then_done(start_server, db):
    provider = ScriptedProvider(["un ", "deux "], error=ProviderUnavailable("model crashed"))
    with registered(ProviderPlugin("failing", provider), name="failing-plugin"):
        server = start_server(provider="failing")
        with signed_in(server.url) as client:
            live = chat(client, "q")
            replay = resume(client, live.data("start")["message_id"])
    assert live.names() == ["start", "token", "token", "error", "done"]
    assert replay.names() == ["start", "token", "error", "done"]
    assert replay.text() == live.text() == "un deux "
    assert replay.data("error") == live.data("error") and replay.data("done") == live.data("done")


def test_signed_out_and_cross_site_requests_are_refused(server):
    with signed_in(server.url) as client:
        message_id = chat(client, "x").data("start")["message_id"]
        with httpx.Client(base_url=server.url) as anonymous:
            assert anonymous.get(f"/chatlaya/messages/{message_id}/events").status_code == 401
            assert anonymous.post(f"/chatlaya/messages/{message_id}/stop").status_code == 401
        evil = client.post(f"/chatlaya/messages/{message_id}/stop", headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403 and evil.json()["detail"]["code"] == "csrf_origin"


def test_concurrent_stops_and_resumes_never_fail(start_server, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_MS", "10")
    server = start_server()
    with signed_in(server.url) as client:
        first = open_reply(client, words(100), tokens=2)
        message_id = first.data("start")["message_id"]
        results: list[int] = []

        def hit(index: int) -> None:
            with cookie_client(server.url, client) as other:
                if index % 2:
                    results.append(other.post(f"/chatlaya/messages/{message_id}/stop").status_code)
                else:
                    results.append(resume(other, message_id, first.last_id).status)

        threads = [threading.Thread(target=hit, args=(index,)) for index in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert sorted(set(results)) == [200, 202] and len(results) == 10


def test_a_login_elsewhere_sees_the_same_reply(server):
    """Another device signs in on its own (a new session) and resumes the reply."""
    with signed_in(server.url) as client:
        email = client.get("/auth/me").json()["user"]["email"]
        reply = chat(client, "partout")
        with httpx.Client(base_url=server.url) as phone:
            assert phone.post("/auth/login", json={"email": email, "password": PASSWORD}).status_code == 200
            assert resume(phone, reply.data("start")["message_id"]).text() == "partout"
