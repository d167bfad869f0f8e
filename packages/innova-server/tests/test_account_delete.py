"""Deleting an account (`DELETE /auth/me`), over real HTTP and a real database.

OWASP points proven here: account deletion ends every session at once, and
asks for the password again (re-authentication for a sensitive change).
The interrupted cases fail a step for real inside the running server (the
database "goes away" between two collections) or run only the first steps
through the same service the CLI uses, then check that the account cannot
sign in and that a retry finishes the job.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie

import httpx
import pytest
from bson import ObjectId
from httpx_sse import connect_sse
from pymongo.errors import AutoReconnect

from innova_server.auth import account as account_module
from innova_server.auth.erasure import (
    STEP_ORDER,
    USER_COLLECTIONS,
    USER_LIMIT_KINDS,
    AccountEraser,
    stream_slot_id,
)
from innova_server.auth.tokens import hash_token, new_token
from innova_server.db import Database
from innova_server.ratelimit import limit_key
from innova_server.testing.chat_client import PASSWORD, chat, signed_in
from innova_server.testing.mailbox import ACCOUNT_DELETED, VERIFY, sent, text_of, wait_for_mails, wait_idle
from innova_server.testing.server import start_of_a_fresh_window, wait_for

STEP_NAMES = list(STEP_ORDER)


@dataclass
class Seeded:
    email: str
    user_id: ObjectId
    cookies: list[str]


def seed(server, db, email: str) -> Seeded:
    """An account with something in every collection that holds a user's data."""
    with signed_in(server.url, email) as client:
        assert chat(client, "bonjour à tous").status == 200
        conversation = client.post("/chatlaya/conversations").json()["conversation"]
        assert chat(client, "une autre question", conversation["id"]).status == 200
        second = httpx.post(f"{server.url}/auth/login", json={"email": email, "password": PASSWORD})
        assert second.status_code == 200
        cookies = [client.cookies["innova_session"], second.cookies["innova_session"]]
    user_id = db.users.find_one({"email": email})["_id"]
    wait_for(lambda: db.verify_tokens.count_documents({"user_id": user_id}), what="the verification link")
    now = datetime.now(UTC)
    db.password_reset_tokens.insert_one(
        {"token_hash": hash_token(new_token()), "user_id": user_id, "email": email, "created_at": now,
         "expires_at": now + timedelta(minutes=30), "used": False}
    )
    # Collections other features keep per user (device cookies, daily usage).
    db.devices.insert_one({"user_id": user_id, "token_hash": hash_token(new_token()), "created_at": now})
    day = now.date().isoformat()
    db.usage_daily.update_one(  # Chatlaya may have counted the replies above already
        {"_id": f"{user_id}:{day}"}, {"$set": {"user_id": user_id, "day": day}, "$inc": {"prompt_tokens": 3}},
        upsert=True,
    )
    db.rate_limits.insert_one(
        {"key": limit_key("export:user", str(user_id)), "window_start": now, "count": 1,
         "expires_at": now + timedelta(hours=1)}  # not before the test ends: the TTL monitor runs meanwhile
    )
    return Seeded(email, user_id, cookies)


def owned(db, user_id: ObjectId) -> dict[str, int]:
    """How many documents of each kind belong to `user_id`."""
    counts = {name: db[name].count_documents({"user_id": user_id}) for name in USER_COLLECTIONS}
    counts["users"] = db.users.count_documents({"_id": user_id})
    counts["stream_slots"] = db.stream_slots.count_documents({"_id": stream_slot_id(str(user_id))})
    keys = [limit_key(kind, str(user_id)) for kind in USER_LIMIT_KINDS]
    counts["rate_limits"] = db.rate_limits.count_documents({"key": {"$in": keys}})
    return counts


def everything_but(db, user_id: ObjectId) -> dict[str, list]:
    """Every document not belonging to `user_id`, to prove nothing else was touched.

    Rate-limit counters are compared by key only: the deletion's own password
    check counts in the login windows (per address and per IP) like a login.
    """
    mine = {user_id, stream_slot_id(str(user_id))}
    my_keys = {limit_key(kind, str(user_id)) for kind in USER_LIMIT_KINDS}
    out: dict[str, list] = {}
    for name in db.list_collection_names():
        docs = [doc for doc in db[name].find({}) if doc.get("user_id") not in mine and doc["_id"] not in mine]
        if name == "rate_limits":
            out[name] = sorted(doc["key"] for doc in docs if doc["key"] not in my_keys)
        else:
            out[name] = sorted(docs, key=lambda doc: str(doc["_id"]))
    return out


def assert_untouched(db, user_id: ObjectId, before: dict[str, list]) -> None:
    """Nothing but `user_id`'s data went; rate-limit windows may have been added since (logins)."""
    after = everything_but(db, user_id)
    assert set(after["rate_limits"]) >= set(before.pop("rate_limits"))
    after.pop("rate_limits")
    assert after == before


def delete_me(client: httpx.Client, password: str = PASSWORD) -> httpx.Response:
    return client.request("DELETE", "/auth/me", json={"password": password})


def me_status(server, cookie: str) -> int:
    return httpx.get(f"{server.url}/auth/me", headers={"Cookie": f"innova_session={cookie}"}).status_code


def login_status(server, email: str) -> int:
    return httpx.post(f"{server.url}/auth/login", json={"email": email, "password": PASSWORD}).status_code


def test_seed_covers_every_kind_of_data(server, db):
    seeded = seed(server, db, "full@example.com")
    counts = owned(db, seeded.user_id)
    assert all(counts.values()), counts


def test_delete_removes_everything_of_the_user_and_nothing_else(server, db):
    victim = seed(server, db, "leaver@example.com")
    bystander = seed(server, db, "stayer@example.com")
    untouched = everything_but(db, victim.user_id)
    with httpx.Client(base_url=server.url, cookies={"innova_session": victim.cookies[0]}) as client:
        response = delete_me(client)
    assert response.status_code == 204, response.text
    cleared = SimpleCookie(response.headers["set-cookie"])["innova_session"]
    assert cleared.value == "" and cleared["max-age"] == "0"

    assert set(owned(db, victim.user_id).values()) == {0}
    assert_untouched(db, victim.user_id, untouched)
    assert all(owned(db, bystander.user_id).values())
    for cookie in victim.cookies:  # every session ended
        assert me_status(server, cookie) == 401
    assert login_status(server, victim.email) == 401
    assert me_status(server, bystander.cookies[0]) == 200

    notice = wait_for_mails(server, 1, about=ACCOUNT_DELETED)[0]
    assert notice["To"] == victim.email
    assert "supprimé" in text_of(notice)

    # The address can register again, as a new and empty account.
    with signed_in(server.url, victim.email) as again:
        user = again.get("/auth/me").json()["user"]
        assert user["id"] != str(victim.user_id) and user["email_verified"] is False
        new_id = ObjectId(user["id"])
        assert owned(db, new_id)["conversations"] == 0 and owned(db, new_id)["messages"] == 0


def test_wrong_password_is_403_and_deletes_nothing(server, db):
    seeded = seed(server, db, "keeper@example.com")
    before = owned(db, seeded.user_id)
    with httpx.Client(base_url=server.url, cookies={"innova_session": seeded.cookies[0]}) as client:
        response = delete_me(client, "not my password")
        assert response.status_code == 403
        assert response.json()["detail"]["code"] == "wrong_password"
        assert "set-cookie" not in response.headers
        assert client.get("/auth/me").status_code == 200
    assert owned(db, seeded.user_id) == before
    wait_idle(server)
    assert sent(server, ACCOUNT_DELETED) == []


def test_a_wrong_password_here_counts_as_a_failed_login(start_server, db):
    server = start_server(rate_limit_login_email="2/15m")
    start_of_a_fresh_window(15 * 60)
    with signed_in(server.url, "brute@example.com") as client:
        codes = [delete_me(client, f"guess {i}").status_code for i in range(3)]
        assert codes == [403, 403, 429]
        assert delete_me(client).status_code == 429  # even the right one, until the window passes
    assert db.users.count_documents({"email": "brute@example.com"}) == 1


async def test_two_concurrent_deletions_erase_once_and_mail_once(server, db):
    seeded = seed(server, db, "twice@example.com")

    async def delete(cookie: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.url, cookies={"innova_session": cookie}) as client:
            return await client.request("DELETE", "/auth/me", json={"password": PASSWORD})

    results = await asyncio.gather(*(delete(cookie) for cookie in seeded.cookies * 2))
    codes = [r.status_code for r in results]
    assert 204 in codes and set(codes) <= {204, 401}, [r.text for r in results]
    assert set(owned(db, seeded.user_id).values()) == {0}
    wait_idle(server)
    assert len(sent(server, ACCOUNT_DELETED)) == 1


def test_the_account_deleted_mail_never_shows_an_unverified_name(server, db):
    with signed_in(server.url, "anyone@example.com") as client:
        assert client.patch("/auth/me", json={"name": "Mallory the Impostor"}).status_code == 200
        assert delete_me(client).status_code == 204
    [notice] = wait_for_mails(server, 1, about=ACCOUNT_DELETED)
    assert "Mallory" not in notice.as_string()
    assert text_of(notice).startswith("Bonjour,\n")


def test_a_late_write_for_an_erased_account_is_swept(server, db, monkeypatch):
    monkeypatch.setattr(account_module, "LATE_SWEEP_SECONDS", 1.0)
    seeded = seed(server, db, "late-write@example.com")
    with httpx.Client(base_url=server.url, cookies={"innova_session": seeded.cookies[0]}) as client:
        assert delete_me(client).status_code == 204
    assert set(owned(db, seeded.user_id).values()) == {0}
    # A reply that was ending as the account went counts its usage, after the erasure.
    db.usage_daily.insert_one({"_id": f"{seeded.user_id}:late", "user_id": seeded.user_id, "day": "late"})
    db.messages.insert_one({"user_id": seeded.user_id, "conversation_id": ObjectId(), "content": "late"})
    wait_for(lambda: set(owned(db, seeded.user_id).values()) == {0}, 10, what="the late sweep")


# -- interrupted half-way ---------------------------------------------------------


@pytest.mark.parametrize("failing", STEP_NAMES)
def test_a_deletion_interrupted_at_any_step_is_finished_by_the_retry(server, db, monkeypatch, failing):
    victim = seed(server, db, "interrupted@example.com")
    bystander = seed(server, db, "neighbour@example.com")
    untouched = everything_but(db, victim.user_id)
    eraser = server.services.account.eraser
    original = eraser.steps
    failed: list[str] = []
    release = threading.Event()

    def steps(user_id: str):
        result = original(user_id)
        index = [name for name, _ in result].index(failing)
        name, run = result[index]

        async def flaky(oid: ObjectId) -> object:
            if not failed:
                failed.append(name)
                raise AutoReconnect("simulated: the database went away between two collections")
            # The retry waits until the test has looked (a thread's event: the test is another thread).
            await asyncio.to_thread(release.wait, 30)
            return await run(oid)

        result[index] = (name, flaky)
        return result

    monkeypatch.setattr(eraser, "steps", steps)
    monkeypatch.setattr(account_module, "ERASE_RETRY_DELAYS", (0.05, 0.05))
    with httpx.Client(base_url=server.url, cookies={"innova_session": victim.cookies[0]}) as client:
        response = delete_me(client)
    # Marked before any data went: for the owner the account is gone, so the request succeeded.
    assert response.status_code == 204, response.text
    assert failed == [failing]

    # Half done: the account can no longer be used, whatever step failed.
    left = owned(db, victim.user_id)
    assert left["users"] == 1 and db.users.find_one({"_id": victim.user_id})["deleting_at"] is not None
    if failing != "users":
        assert left[failing] >= 1  # the failing step really did not happen
    for cookie in victim.cookies:
        assert me_status(server, cookie) == 401
    assert login_status(server, victim.email) == 401
    assert httpx.post(f"{server.url}/auth/forgot", json={"email": victim.email}).status_code == 202
    reset_tokens = db.password_reset_tokens.count_documents({"user_id": victim.user_id})

    release.set()  # the background retry now finishes the job
    wait_for(lambda: db.users.count_documents({"_id": victim.user_id}) == 0, 15, what="the retry")
    assert set(owned(db, victim.user_id).values()) == {0}
    assert_untouched(db, victim.user_id, untouched)
    assert all(owned(db, bystander.user_id).values())
    assert reset_tokens <= 1  # no new reset link was issued for the account being deleted
    wait_idle(server)
    assert [m["To"] for m in sent(server, ACCOUNT_DELETED)] == [victim.email]


def test_if_the_first_step_fails_nothing_is_deleted_and_the_account_works(server, db, monkeypatch):
    seeded = seed(server, db, "unmarked@example.com")
    before = owned(db, seeded.user_id)

    async def down(user_id: str) -> None:
        raise AutoReconnect("simulated: the database is down")

    monkeypatch.setattr(server.services.account.eraser, "mark", down)
    with httpx.Client(base_url=server.url, cookies={"innova_session": seeded.cookies[0]}) as client:
        response = delete_me(client)
        assert response.status_code == 503
        assert response.json()["detail"]["code"] == "database_unavailable"
        assert "set-cookie" not in response.headers
        assert client.get("/auth/me").status_code == 200
    assert owned(db, seeded.user_id) == before
    assert login_status(server, seeded.email) == 200
    wait_idle(server)
    assert sent(server, ACCOUNT_DELETED) == []


def run_first_steps(mongo_uri: str, db_name: str, user_id: ObjectId, count: int) -> None:
    """Mark the account and run only its first `count` deletion steps, then "crash"."""

    async def partial() -> None:
        database = Database(mongo_uri, db_name)
        try:
            eraser = AccountEraser(database)
            assert (await eraser.mark(str(user_id))) is not None
            for _name, run in eraser.steps(str(user_id))[:count]:
                await run(user_id)
        finally:
            await database.close()

    asyncio.run(partial())


@pytest.mark.parametrize("done", [0, 3, len(STEP_NAMES) - 1])
def test_the_service_finishes_a_deletion_a_crash_left_half_done(server, db, mongo_uri, db_name, done):
    victim = seed(server, db, "crashed@example.com")
    bystander = seed(server, db, "survivor@example.com")
    untouched = everything_but(db, victim.user_id)
    run_first_steps(mongo_uri, db_name, victim.user_id, done)
    assert owned(db, victim.user_id)["users"] == 1
    assert login_status(server, victim.email) == 401
    assert all(me_status(server, cookie) == 401 for cookie in victim.cookies)

    async def retry() -> list[bool]:
        database = Database(mongo_uri, db_name)
        try:
            eraser = AccountEraser(database)
            # Idempotent: a second run finds nothing left and still succeeds.
            return [await eraser.finish(str(victim.user_id)), await eraser.finish(str(victim.user_id))]
        finally:
            await database.close()

    assert asyncio.run(retry()) == [True, True]
    assert set(owned(db, victim.user_id).values()) == {0}
    assert_untouched(db, victim.user_id, untouched)
    assert all(owned(db, bystander.user_id).values())


def test_finish_never_erases_an_account_that_was_not_marked(server, db, mongo_uri, db_name):
    seeded = seed(server, db, "unconfirmed@example.com")
    before = owned(db, seeded.user_id)

    async def finish() -> bool:
        database = Database(mongo_uri, db_name)
        try:
            return await AccountEraser(database).finish(str(seeded.user_id))
        finally:
            await database.close()

    assert asyncio.run(finish()) is False
    assert owned(db, seeded.user_id) == before


def test_a_new_server_finishes_deletions_left_pending(start_server, db, mongo_uri, db_name):
    first = start_server()
    victim = seed(first, db, "pending@example.com")
    run_first_steps(mongo_uri, db_name, victim.user_id, 2)
    assert owned(db, victim.user_id)["users"] == 1
    start_server()  # its startup finishes what the "crashed" one left
    wait_for(lambda: db.users.count_documents({"_id": victim.user_id}) == 0, 15, what="the startup sweep")
    assert set(owned(db, victim.user_id).values()) == {0}


def test_the_address_of_a_pending_deletion_can_register_again_at_once(server, db, mongo_uri, db_name):
    victim = seed(server, db, "comeback@example.com")
    run_first_steps(mongo_uri, db_name, victim.user_id, 4)
    with signed_in(server.url, victim.email) as client:
        assert client.get("/auth/me").json()["user"]["id"] != str(victim.user_id)
    assert set(owned(db, victim.user_id).values()) == {0}
    wait_for(lambda: len([m for m in sent(server, VERIFY) if m["To"] == victim.email]) >= 2, what="the new link")


def test_a_reply_streaming_for_the_user_ends_and_leaves_nothing(start_server, db, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_MS", "100")
    monkeypatch.setattr(account_module, "LATE_SWEEP_SECONDS", 3.0)
    server = start_server()
    email = "streaming@example.com"
    words = " ".join(f"mot{i}" for i in range(80))  # 8 s of reply at 100 ms a word
    with signed_in(server.url, email) as client:
        other = httpx.post(f"{server.url}/auth/login", json={"email": email, "password": PASSWORD})
        user_id = db.users.find_one({"email": email})["_id"]
        first_token = threading.Event()
        ended: list[float] = []

        def listen() -> None:
            with connect_sse(client, "POST", "/chatlaya/message", json={"content": words}) as source:
                try:
                    for event in source.iter_sse():
                        if event.event == "token":
                            first_token.set()
                except httpx.HTTPError:
                    pass
            ended.append(time.monotonic())

        listener = threading.Thread(target=listen)
        listener.start()
        assert first_token.wait(10)
        started = time.monotonic()
        with httpx.Client(base_url=server.url, cookies=other.cookies) as deleter:
            assert delete_me(deleter).status_code == 204
        listener.join(20)
        assert ended and ended[0] - started < 4, "the reply went on after the account was deleted"
    # What the reply still wrote as it stopped (its usage) goes with the late sweep.
    wait_for(lambda: set(owned(db, user_id).values()) == {0}, 10, what="nothing of the user left")
