"""The conversation tree (regenerate, edit and resend, branches), titles, feedback, search and usage.

Real server on loopback, real database; providers are the echo plugin or a
scripted test provider.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from bson import ObjectId
from httpx_sse import connect_sse

from innova_server.chat import ChatChunk, ChatRequest, ProviderUnavailable, Usage
from innova_server.chatlaya.titles import TITLE_PROMPT, clean_title
from innova_server.testing import registered
from innova_server.testing.chat_client import Stream, chat, regenerate, signed_in
from innova_server.testing.providers import ProviderPlugin, ScriptedProvider
from innova_server.testing.server import wait_for


def send(
    client: httpx.Client, content: str, conversation_id: str | None = None, edit_of: str | None = None
) -> Stream:
    return chat(client, content, conversation_id, edit_of=edit_of)


def branch(client: httpx.Client, conversation_id: str, limit: int = 100) -> list[dict[str, Any]]:
    page = client.get("/chatlaya/messages", params={"conversation_id": conversation_id, "limit": limit})
    assert page.status_code == 200, page.text
    return page.json()["items"]


def contents(items: list[dict[str, Any]]) -> list[str]:
    return [item["content"] for item in items]


def test_edit_regenerate_and_switch_walk_the_tree(server, db):
    with signed_in(server.url) as client:
        first = send(client, "q1")
        conversation_id = first.data("start")["conversation_id"]
        q2 = send(client, "q2", conversation_id)
        q2_id = q2.data("start")["user_message_id"]

        # Edit and resend: a sibling of q2, on a new branch that becomes current.
        q2b = send(client, "q2b", conversation_id, edit_of=q2_id)
        q2b_id = q2b.data("start")["user_message_id"]
        items = branch(client, conversation_id)
        assert contents(items) == ["q1", "q1", "q2b", "q2b"]
        assert items[2]["sibling_ids"] == [q2_id, q2b_id] and items[2]["parent_id"] == items[1]["id"]

        # An edit of the edit: three versions of the second question.
        q2c = send(client, "q2c", conversation_id, edit_of=q2b_id)
        q2c_id = q2c.data("start")["user_message_id"]
        assert branch(client, conversation_id)[2]["sibling_ids"] == [q2_id, q2b_id, q2c_id]

        # Regenerate, then regenerate the regenerated reply: siblings under q2c.
        a2c = q2c.data("start")["message_id"]
        again = regenerate(client, a2c)
        assert again.status == 200 and again.data("start")["user_message_id"] == q2c_id
        assert again.text() == "q2c"
        third = regenerate(client, again.data("start")["message_id"])
        items = branch(client, conversation_id)
        assert [item["id"] for item in items][-1] == third.data("start")["message_id"]
        assert items[-1]["sibling_ids"] == [a2c, again.data("start")["message_id"], third.data("start")["message_id"]]
        assert items[-1]["parent_id"] == q2c_id

        # Switch to the old q2: its branch, continued to its newest leaf.
        switched = client.post(f"/chatlaya/conversations/{conversation_id}/branch", json={"message_id": q2_id})
        assert switched.status_code == 200 and switched.json()["conversation"]["id"] == conversation_id
        assert contents(branch(client, conversation_id)) == ["q1", "q1", "q2", "q2"]
        # A message sent now follows that branch's leaf.
        send(client, "q3", conversation_id)
        items = branch(client, conversation_id)
        assert contents(items) == ["q1", "q1", "q2", "q2", "q3", "q3"]
        assert items[4]["parent_id"] == q2.data("start")["message_id"]
        # Switching to q2c continues to its newest child: the last regeneration.
        client.post(f"/chatlaya/conversations/{conversation_id}/branch", json={"message_id": q2c_id})
        assert branch(client, conversation_id)[-1]["id"] == third.data("start")["message_id"]
        # Switching to a message in the middle of a branch keeps going down from it.
        a1 = first.data("start")["message_id"]
        client.post(f"/chatlaya/conversations/{conversation_id}/branch", json={"message_id": a1})
        assert contents(branch(client, conversation_id))[:3] == ["q1", "q1", "q2c"]  # newest child of a1: q2c

    assert db.messages.count_documents({}) == 12


def test_history_sent_is_the_branch_up_to_the_parent(start_server):
    provider = ScriptedProvider(["ok"])
    with registered(ProviderPlugin("scripted", provider), name="scripted-plugin"):
        server = start_server(provider="scripted", chat_system_prompt="SYS")
        with signed_in(server.url) as client:
            first = send(client, "un")
            conversation_id = first.data("start")["conversation_id"]
            second = send(client, "deux", conversation_id)
            send(client, "deux bis", conversation_id, edit_of=second.data("start")["user_message_id"])
            regenerate(client, second.data("start")["message_id"])

    def roles_and_texts(request: ChatRequest) -> list[tuple[str, str]]:
        return [(m.role, m.content) for m in request.messages]

    assert roles_and_texts(provider.requests[1]) == [
        ("system", "SYS"), ("user", "un"), ("assistant", "ok"), ("user", "deux"),
    ]  # fmt: skip
    # The edit: the branch up to the edited message's parent, then the new text.
    assert roles_and_texts(provider.requests[2]) == [
        ("system", "SYS"), ("user", "un"), ("assistant", "ok"), ("user", "deux bis"),
    ]  # fmt: skip
    # The regeneration (of the first "deux" reply, on the old branch): its question again, not the edit.
    assert roles_and_texts(provider.requests[3]) == [
        ("system", "SYS"), ("user", "un"), ("assistant", "ok"), ("user", "deux"),
    ]  # fmt: skip


def test_concurrent_regenerations_and_sends_keep_a_valid_branch(start_server, db, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_MS", "5")
    server = start_server(chat_max_concurrent_streams=50)
    with signed_in(server.url) as client:
        first = send(client, "un deux trois")
        conversation_id, reply_id = first.data("start")["conversation_id"], first.data("start")["message_id"]
        statuses: list[int] = []

        def hit(index: int) -> None:
            with httpx.Client(base_url=server.url, cookies=client.cookies, timeout=30) as other:
                stream = regenerate(other, reply_id) if index % 2 else send(other, f"m{index}", conversation_id)
                statuses.append(stream.status)
                assert stream.status != 200 or stream.names()[-1] == "done"

        threads = [threading.Thread(target=hit, args=(index,)) for index in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert statuses == [200] * 12
        items = branch(client, conversation_id)
    # The current branch is one real path: each message follows the one before it.
    assert items[0]["parent_id"] is None
    assert all(item["parent_id"] == before["id"] for before, item in itertools.pairwise(items))
    assert all(item["id"] in item["sibling_ids"] for item in items)
    # And every stored message hangs from a message that exists.
    ids = {doc["_id"] for doc in db.messages.find({}, {"_id": 1})}
    assert all(doc["parent_id"] in ids for doc in db.messages.find({"parent_id": {"$ne": None}}))
    assert db.messages.count_documents({}) == 2 + 6 * 2 + 6


def test_a_long_branch_pages_toward_the_root(server):
    with signed_in(server.url) as client:
        conversation_id = send(client, "m0").data("start")["conversation_id"]
        for index in range(1, 15):
            send(client, f"m{index}", conversation_id)
        full = branch(client, conversation_id)
        assert len(full) == 30
        pages: list[list[dict[str, Any]]] = []
        before = None
        while True:
            params: dict[str, Any] = {"conversation_id": conversation_id, "limit": 7}
            if before:
                params["before"] = before
            page = client.get("/chatlaya/messages", params=params).json()
            pages.append(page["items"])
            before = page["next_cursor"]
            if len(pages) == 2:
                # The branch changes between two pages (an edit far back): the walk still completes exactly.
                send(client, "autre", conversation_id, edit_of=full[2]["id"])
            if before is None:
                break
        walked = [item["id"] for page in reversed(pages) for item in page]
        assert walked == [item["id"] for item in full]
        assert [len(page) for page in pages] == [7, 7, 7, 7, 2]
        bad = client.get("/chatlaya/messages", params={"conversation_id": conversation_id, "before": "x"})
        assert bad.status_code == 422


def test_ids_of_someone_else_are_404_everywhere(server):
    with signed_in(server.url) as alice, signed_in(server.url) as bob:
        reply = send(alice, "secret").data("start")
        conversation_id, reply_id, question_id = reply["conversation_id"], reply["message_id"], reply["user_message_id"]
        assert regenerate(bob, reply_id).body["detail"]["code"] == "message_not_found"
        assert regenerate(alice, question_id).body["detail"]["code"] == "message_not_found"  # not a reply
        assert bob.put(f"/chatlaya/messages/{reply_id}/feedback", json={"rating": "up"}).status_code == 404
        assert bob.delete(f"/chatlaya/messages/{reply_id}/feedback").status_code == 404
        moved = bob.post(f"/chatlaya/conversations/{conversation_id}/branch", json={"message_id": question_id})
        assert moved.status_code == 404 and moved.json()["detail"]["code"] == "conversation_not_found"
        # Bob's own conversation, Alice's message: not found there.
        own = send(bob, "à moi").data("start")["conversation_id"]
        moved = bob.post(f"/chatlaya/conversations/{own}/branch", json={"message_id": question_id})
        assert moved.status_code == 404 and moved.json()["detail"]["code"] == "message_not_found"
        edit = send(bob, "vol", own, edit_of=question_id)
        assert edit.status == 404 and edit.body["detail"]["code"] == "message_not_found"
        # An assistant message is no `edit_of`.
        edit = send(alice, "x", conversation_id, edit_of=reply_id)
        assert edit.status == 404 and edit.body["detail"]["code"] == "message_not_found"
        for bad in ("nope", str(ObjectId())):
            assert regenerate(alice, bad).status == 404
            moved = alice.post(f"/chatlaya/conversations/{conversation_id}/branch", json={"message_id": bad})
            assert moved.status_code == 404
        assert alice.post(f"/chatlaya/conversations/{conversation_id}/branch", json={}).status_code == 422


def test_deleting_a_conversation_removes_every_branch(server, db):
    with signed_in(server.url) as client:
        first = send(client, "un")
        conversation_id = first.data("start")["conversation_id"]
        send(client, "deux", conversation_id, edit_of=first.data("start")["user_message_id"])
        regenerate(client, first.data("start")["message_id"])
        assert db.messages.count_documents({}) == 5
        assert client.delete(f"/chatlaya/conversations/{conversation_id}").status_code == 204
    assert db.messages.count_documents({}) == 0


def test_a_first_version_conversation_gets_its_parents(server, db):
    """Messages stored before the tree (no parent_id, no branch) read as one branch, in time order."""
    with signed_in(server.url) as client:
        conversation_id = client.post("/chatlaya/conversations").json()["conversation"]["id"]
        oid = ObjectId(conversation_id)
        conversation = db.conversations.find_one({"_id": oid})
        db.conversations.update_one({"_id": oid}, {"$unset": {"branch": ""}})
        base = conversation["created_at"]
        old = [
            {"_id": ObjectId(), "conversation_id": oid, "user_id": conversation["user_id"], "role": role,
             "content": text, "created_at": base.replace(microsecond=index * 1000), "status": "complete"}
            for index, (role, text) in enumerate([("user", "a"), ("assistant", "a"), ("user", "b"), ("assistant", "b")])
        ]  # fmt: skip
        db.messages.insert_many(old)
        items = branch(client, conversation_id)
        assert [item["id"] for item in items] == [str(doc["_id"]) for doc in old]
        assert items[0]["parent_id"] is None and items[3]["parent_id"] == items[2]["id"]
        follow = send(client, "c", conversation_id)
        assert branch(client, conversation_id)[-2]["parent_id"] == str(old[-1]["_id"])
        assert regenerate(client, str(old[1]["_id"])).text() == "a"
        assert follow.status == 200


# -- titles ------------------------------------------------------------------------


class TitleProvider:
    """Replies to messages; title requests (recognised by their prompt) succeed, fail or hang."""

    def __init__(self, title: str = "« Voyage au Sénégal »", mode: str = "ok") -> None:
        self.title = title
        self.mode = mode
        self.title_asked = threading.Event()
        self.release = threading.Event()

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        if request.messages[0].content == TITLE_PROMPT:
            self.title_asked.set()
            if self.mode == "fail":
                raise ProviderUnavailable("no titles today")
            if self.mode == "hang":
                await asyncio.sleep(3600)
            while not self.release.is_set() and self.mode == "gated":  # noqa: ASYNC110 - set from the test thread
                await asyncio.sleep(0.01)
            yield ChatChunk(text=self.title)
            return
        yield ChatChunk(text="réponse")
        yield ChatChunk(finish_reason="stop", usage=Usage(5, 1))

    async def aclose(self) -> None:
        return None


def titled(client: httpx.Client, conversation_id: str) -> str | None:
    return next(c["title"] for c in client.get("/chatlaya/conversations").json()["items"] if c["id"] == conversation_id)


@pytest.mark.parametrize("mode", ["ok", "fail", "hang"])
def test_model_titles_never_delay_done_and_fall_back(start_server, mode):
    provider = TitleProvider(mode=mode)
    with registered(ProviderPlugin("titled", provider), name="titled-plugin"):
        server = start_server(provider="titled", chat_titles="model", chat_title_timeout_seconds=1)
        with signed_in(server.url) as client:
            started = time.monotonic()
            stream = chat(client, "Je prépare un voyage au Sénégal en mars")
            assert stream.names()[-1] == "done" and time.monotonic() - started < 1  # not behind the title
            conversation_id = stream.data("start")["conversation_id"]
            assert provider.title_asked.wait(5)
            if mode == "ok":
                wait_for(lambda: titled(client, conversation_id) == "Voyage au Sénégal", what="the model title")
            else:
                time.sleep(1.5)  # past the timeout
                assert titled(client, conversation_id) == "Je prépare un voyage au Sénégal en mars"
            # A second reply is never titled again.
            chat(client, "et en avril ?", conversation_id)
            assert "innova_chat_titles_total" in client.get("/metrics").text


def test_a_title_the_user_set_meanwhile_is_never_overwritten(start_server):
    provider = TitleProvider(mode="gated")
    with registered(ProviderPlugin("titled", provider), name="titled-plugin"):
        server = start_server(provider="titled", chat_titles="model")
        with signed_in(server.url) as client:
            conversation_id = chat(client, "bonjour").data("start")["conversation_id"]
            assert provider.title_asked.wait(5)
            renamed = client.patch(f"/chatlaya/conversations/{conversation_id}", json={"title": "Le mien"})
            assert renamed.status_code == 200
            provider.release.set()
            time.sleep(0.5)
            assert titled(client, conversation_id) == "Le mien"


def test_clean_title():
    assert clean_title("« Voyage au Sénégal »\nblabla") == "Voyage au Sénégal"
    assert clean_title('Titre : "Budget 2026"') == "Budget 2026"
    assert len(clean_title("mot " * 40)) <= 61
    assert clean_title("   \n  ") == ""


# -- feedback, search, usage -----------------------------------------------------------


def test_feedback_is_stored_shown_counted_and_cleared(server):
    with signed_in(server.url) as client:
        reply = chat(client, "note-moi").data("start")
        message_id = reply["message_id"]
        given = client.put(f"/chatlaya/messages/{message_id}/feedback", json={"rating": "up", "comment": " super "})
        assert given.status_code == 200
        assert given.json()["message"]["feedback"] == {"rating": "up", "comment": "super"}
        assert branch(client, reply["conversation_id"])[-1]["feedback"] == {"rating": "up", "comment": "super"}
        metrics = client.get("/metrics").text
        assert re.search(r'innova_chat_feedback_total\{model="echo",provider="echo",rating="up"\} [1-9]', metrics)
        changed = client.put(f"/chatlaya/messages/{message_id}/feedback", json={"rating": "down"})
        assert changed.json()["message"]["feedback"] == {"rating": "down", "comment": None}
        assert client.delete(f"/chatlaya/messages/{message_id}/feedback").status_code == 204
        assert branch(client, reply["conversation_id"])[-1]["feedback"] is None
        for body in ({"rating": "meh"}, {"rating": "up", "comment": "x" * 1001}, {}, {"rating": "up", "extra": 1}):
            assert client.put(f"/chatlaya/messages/{message_id}/feedback", json=body).status_code == 422
        user_message = client.put(f"/chatlaya/messages/{reply['user_message_id']}/feedback", json={"rating": "up"})
        assert user_message.status_code == 404 and user_message.json()["detail"]["code"] == "message_not_found"


def test_search_is_literal_and_case_insensitive(server):
    titles = ["Prix (en €) ?", "a.b*c [x]", "Éléphant rose", "ÉCOLE du soir", "straße", "rien"]
    with signed_in(server.url) as client:
        ids = {}
        for title in titles:
            conversation = client.post("/chatlaya/conversations").json()["conversation"]
            client.patch(f"/chatlaya/conversations/{conversation['id']}", json={"title": title})
            ids[title] = conversation["id"]

        def found(q: str, **params: Any) -> list[str]:
            response = client.get("/chatlaya/conversations", params={"q": q, **params})
            assert response.status_code == 200, response.text
            return [item["title"] for item in response.json()["items"]]

        assert found("(en €)") == ["Prix (en €) ?"]
        assert found(".*") == [] and found("b*c [") == ["a.b*c [x]"]
        assert found("éléphant") == ["Éléphant rose"] and found("ÉLÉPHANT") == ["Éléphant rose"]
        assert found("école") == ["ÉCOLE du soir"]
        assert found("STRASSE") == ["straße"]  # full case folding
        assert found("^") == [] and found("$") == [] and found("\\") == []
        # Same ordering and cursor as the plain list.
        client.patch(f"/chatlaya/conversations/{ids['rien']}", json={"title": "encore rien (2)"})
        page = client.get("/chatlaya/conversations", params={"q": "r", "limit": 2}).json()
        rest = client.get("/chatlaya/conversations", params={"q": "r", "limit": 2, "cursor": page["next_cursor"]})
        assert len(page["items"]) == 2 and page["next_cursor"] and rest.status_code == 200
        for bad in ("", "x" * 101):
            assert client.get("/chatlaya/conversations", params={"q": bad}).status_code == 422


def test_usage_counts_replies_errors_and_stops(start_server, monkeypatch):
    provider = ScriptedProvider(["un ", "deux"], usage=Usage(7, 2))
    failing = ScriptedProvider(["a"], error=ProviderUnavailable("down"))
    chosen = {"provider": provider}

    class Switch:
        async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
            async for chunk in chosen["provider"].stream(request):
                yield chunk

        async def aclose(self) -> None:
            return None

    with registered(ProviderPlugin("switch", Switch()), name="switch-plugin"):
        server = start_server(provider="switch", chat_daily_tokens_user=5000)
        with signed_in(server.url) as client:
            empty = client.get("/chatlaya/usage").json()
            zero = {"messages": 0, "prompt_tokens": 0, "completion_tokens": 0}
            assert empty == {"today": zero, "daily_token_limit": 5000}
            chat(client, "q")
            chat(client, "q")
            chosen["provider"] = failing
            assert chat(client, "q").names()[-1] == "done"  # an error after a token
            chosen["provider"] = ScriptedProvider(["w "] * 200, delay=0.02)
            with connect_sse(client, "POST", "/chatlaya/message", json={"content": "long"}) as source:
                stream = Stream(200, source.response.headers).read(source, tokens=2)
                client.post(f"/chatlaya/messages/{stream.data('start')['message_id']}/stop")
                stream.read(source)
            assert stream.data("done")["finish_reason"] == "stopped"
            usage = client.get("/chatlaya/usage").json()["today"]
    assert usage["messages"] == 4
    # Two replies with the provider's counts (7 + 2 each), two estimated (characters / 4, at least 1).
    assert usage["prompt_tokens"] >= 14 + 2 and usage["completion_tokens"] >= 4 + 2


def test_a_refused_regeneration_keeps_the_question_and_the_branch(start_server, db):
    class FailsSecondTime:
        def __init__(self) -> None:
            self.calls = 0

        async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
            self.calls += 1
            if self.calls > 1:
                raise ProviderUnavailable("down")
            yield ChatChunk(text="ok")

        async def aclose(self) -> None:
            return None

    with registered(ProviderPlugin("flaky", FailsSecondTime()), name="flaky-plugin"):
        server = start_server(provider="flaky")
        with signed_in(server.url) as client:
            first = send(client, "question").data("start")
            before = branch(client, first["conversation_id"])
            refused = regenerate(client, first["message_id"])
            assert refused.status == 503 and refused.body["detail"]["code"] == "provider_unavailable"
            assert branch(client, first["conversation_id"]) == before
    assert db.messages.count_documents({}) == 2  # the question and its reply, nothing else
