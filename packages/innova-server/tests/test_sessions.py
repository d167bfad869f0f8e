"""Listing and ending one's sessions, over real HTTP and a real database.

OWASP point proven here: session listing and revocation (a user sees where
they are signed in and can end any of those sessions, or all of them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from http.cookies import SimpleCookie

import httpx
from bson import ObjectId

from innova_server.auth.tokens import hash_token
from innova_server.testing.chat_client import PASSWORD, signed_in


@contextlib.contextmanager
def login(server, email: str, user_agent: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"User-Agent": user_agent}) as client:
        assert client.post("/auth/login", json={"email": email, "password": PASSWORD}).status_code == 200
        yield client


def assert_cleared(response: httpx.Response) -> None:
    cookie = SimpleCookie(response.headers["set-cookie"])["innova_session"]
    assert cookie.value == "" and cookie["max-age"] == "0"


def test_listing_is_newest_first_marks_the_current_one_and_never_shows_a_token(server, db):
    email = "lister@example.com"
    with (
        signed_in(server.url, email, headers={"User-Agent": "laptop"}) as laptop,
        login(server, email, "phone") as phone,
        login(server, email, "tablet") as tablet,
    ):
        response = phone.get("/auth/sessions")
        assert response.status_code == 200
        items = response.json()["items"]
        assert [item["user_agent"] for item in items] == ["tablet", "phone", "laptop"]
        assert [item["current"] for item in items] == [False, True, False]
        assert set(items[0]) == {"id", "created_at", "expires_at", "ip", "user_agent", "current"}
        assert all(item["ip"] == "127.0.0.1" for item in items)
        cookies = [c.cookies["innova_session"] for c in (laptop, phone, tablet)]
        secrets = {*cookies, *(hash_token(c) for c in cookies)}
        for item in items:
            assert ObjectId.is_valid(item["id"])
            assert item["id"] not in secrets
        for secret in secrets:
            assert secret not in response.text
        stored = {str(doc["_id"]) for doc in db.sessions.find({})}
        assert {item["id"] for item in items} == stored
        assert items[0]["created_at"] >= items[1]["created_at"] >= items[2]["created_at"]


def test_another_users_sessions_are_not_listed_and_their_ids_are_404(server):
    with signed_in(server.url, "mine@example.com") as mine, signed_in(server.url, "theirs@example.com") as theirs:
        [their_session] = theirs.get("/auth/sessions").json()["items"]
        assert len(mine.get("/auth/sessions").json()["items"]) == 1
        for session_id in (their_session["id"], str(ObjectId()), "not-an-id", "x" * 500):
            response = mine.delete(f"/auth/sessions/{session_id}")
            assert response.status_code == 404
            assert response.json()["detail"]["code"] == "session_not_found"
            assert "set-cookie" not in response.headers
        assert theirs.get("/auth/me").status_code == 200


def test_ending_another_session_by_id(server):
    email = "ender@example.com"
    with signed_in(server.url, email) as laptop, login(server, email, "lost phone") as phone:
        items = laptop.get("/auth/sessions").json()["items"]
        lost = next(item for item in items if item["user_agent"] == "lost phone")
        response = laptop.delete(f"/auth/sessions/{lost['id']}")
        assert response.status_code == 204
        assert "set-cookie" not in response.headers
        assert phone.get("/auth/me").status_code == 401
        assert laptop.get("/auth/me").status_code == 200
        assert [item["id"] for item in laptop.get("/auth/sessions").json()["items"]] != [lost["id"]]
        assert len(laptop.get("/auth/sessions").json()["items"]) == 1
        again = laptop.delete(f"/auth/sessions/{lost['id']}")
        assert again.status_code == 404


def test_ending_the_current_session_by_id_clears_the_cookie(server):
    with signed_in(server.url, "self@example.com") as client:
        [current] = client.get("/auth/sessions").json()["items"]
        old_cookie = client.cookies["innova_session"]
        response = client.delete(f"/auth/sessions/{current['id']}")
        assert response.status_code == 204
        assert_cleared(response)
        me = httpx.get(f"{server.url}/auth/me", headers={"Cookie": f"innova_session={old_cookie}"})
        assert me.status_code == 401


def test_log_out_everywhere(server, db):
    email = "everywhere@example.com"
    with signed_in(server.url, email) as laptop, login(server, email, "phone") as phone:
        with signed_in(server.url, "bystander@example.com") as bystander:
            old_cookie = laptop.cookies["innova_session"]
            response = laptop.delete("/auth/sessions")
            assert response.status_code == 204
            assert_cleared(response)
            assert phone.get("/auth/me").status_code == 401
            me = httpx.get(f"{server.url}/auth/me", headers={"Cookie": f"innova_session={old_cookie}"})
            assert me.status_code == 401
            user = db.users.find_one({"email": email})
            assert db.sessions.count_documents({"user_id": user["_id"]}) == 0
            assert bystander.get("/auth/me").status_code == 200
        # Logging in again works as usual.
        assert laptop.post("/auth/login", json={"email": email, "password": PASSWORD}).status_code == 200


def test_sessions_of_an_older_password_are_not_listed(server, db):
    email = "epochs@example.com"
    with signed_in(server.url, email) as client:
        user = db.users.find_one({"email": email})
        # A session left behind by a login that raced a password change: dead, so not shown.
        db.sessions.insert_one({**db.sessions.find_one({"user_id": user["_id"]}), "_id": ObjectId(),
                                "token_hash": "0" * 64, "auth_epoch": 99})
        assert len(client.get("/auth/sessions").json()["items"]) == 1
        response = client.post(
            "/auth/password", json={"current_password": PASSWORD, "new_password": "un autre mot de passe"}
        )
        assert response.status_code == 200
        [only] = client.get("/auth/sessions").json()["items"]
        assert only["current"] is True


def test_the_listing_shows_at_most_the_100_newest(server, db):
    with signed_in(server.url, "many@example.com") as client:
        user = db.users.find_one({"email": "many@example.com"})
        template = db.sessions.find_one({"user_id": user["_id"]})
        older = template["created_at"] - timedelta(hours=1)
        db.sessions.insert_many(
            [
                {**template, "_id": ObjectId(), "token_hash": f"{i:064x}", "created_at": older + timedelta(seconds=i)}
                for i in range(150)
            ]
        )
        items = client.get("/auth/sessions").json()["items"]
        assert len(items) == 100
        assert items[0]["current"] is True  # the newest: the one just opened
        assert db.sessions.count_documents({"user_id": user["_id"]}) == 151
        # Ending them all still ends every one, listed or not.
        assert client.delete("/auth/sessions").status_code == 204
        assert db.sessions.count_documents({"user_id": user["_id"]}) == 0
