"""Email verification over real HTTP and a real database, with the console mailer."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from innova_server.auth.tokens import hash_token, new_token
from innova_server.testing.chat_client import PASSWORD, signed_in
from innova_server.testing.mailbox import (
    RESET,
    VERIFY,
    link_of,
    sent,
    text_of,
    token_of,
    verify_address,
    wait_for_mails,
    wait_idle,
)


def verify(server, token: str) -> httpx.Response:
    return httpx.post(f"{server.url}/auth/verify", json={"token": token})


def assert_invalid(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text
    assert response.json()["detail"]["code"] == "invalid_token"


def test_registration_mails_a_single_use_link_whose_hash_only_is_stored(start_server, db):
    server = start_server(frontend_url="https://front.example.org/app/")
    email = "newcomer@example.com"
    with signed_in(server.url, email) as client:
        assert client.get("/auth/me").json()["user"]["email_verified"] is False
        [message] = wait_for_mails(server, 1, about=VERIFY)
        assert message["To"] == email
        assert message.get_content_type() == "multipart/alternative"
        token = token_of(message, "verify")
        assert link_of(message, "verify") == f"https://front.example.org/app/verify?token={token}"
        assert "24 heures" in text_of(message)
        page = message.get_body(preferencelist=("html",)).get_content()
        assert set(re.findall(r'href="([^"]+)"', page)) == {f"https://front.example.org/app/verify?token={token}"}

        stored = db.verify_tokens.find_one({})
        assert db.verify_tokens.count_documents({}) == 1
        assert stored["token_hash"] == hash_token(token) and token not in str(stored)
        assert stored["user_id"] == db.users.find_one({"email": email})["_id"]
        assert stored["expires_at"] - stored["created_at"] == timedelta(hours=24)
        assert db.users.find_one({"email": email})["email_verified"] is False

        response = verify(server, token)
        assert response.status_code == 200, response.text
        assert response.json()["user"]["email_verified"] is True
        assert response.json()["user"]["email"] == email
        assert "set-cookie" not in response.headers  # verifying is not signing in
        assert client.get("/auth/me").json()["user"]["email_verified"] is True
        assert db.users.find_one({"email": email})["email_verified"] is True
        assert_invalid(verify(server, token))  # single use


def test_the_token_lifetime_follows_the_setting_and_the_ttl_index_exists(start_server, db):
    server = start_server(verify_token_ttl_hours=2)
    with signed_in(server.url, "ttl@example.com"):
        wait_for_mails(server, 1, about=VERIFY)
    stored = db.verify_tokens.find_one({})
    assert stored["expires_at"] - stored["created_at"] == timedelta(hours=2)
    assert "2 heures" in text_of(sent(server, VERIFY)[0])
    indexes = db.verify_tokens.index_information()
    assert indexes["expires_at_ttl"]["expireAfterSeconds"] == 0
    assert indexes["token_hash_unique"]["unique"] is True


def test_an_expired_token_is_refused_even_before_the_ttl_monitor_runs(server, db):
    with signed_in(server.url, "late@example.com"):
        token = token_of(wait_for_mails(server, 1, about=VERIFY)[0], "verify")
    db.verify_tokens.update_one({}, {"$set": {"expires_at": datetime.now(UTC) - timedelta(seconds=1)}})
    assert_invalid(verify(server, token))
    assert db.users.find_one({"email": "late@example.com"})["email_verified"] is False


@pytest.mark.parametrize("token", ["", "x", "a" * 42, "a" * 44, "!" * 43, "a" * 100_000, "é" * 43])
def test_garbage_tokens_are_400_invalid_token(server, token):
    assert_invalid(verify(server, token))


def test_a_well_formed_unknown_token_is_400(server):
    assert_invalid(verify(server, new_token()))


def test_a_link_for_a_deleted_account_is_400(server, db):
    with signed_in(server.url, "gone@example.com") as client:
        token = token_of(wait_for_mails(server, 1, about=VERIFY)[0], "verify")
        assert client.request("DELETE", "/auth/me", json={"password": PASSWORD}).status_code == 204
    assert_invalid(verify(server, token))


def test_request_mails_a_new_link_and_verifying_voids_the_others(server, db):
    email = "again@example.com"
    with signed_in(server.url, email) as client:
        wait_for_mails(server, 1, about=VERIFY)
        response = client.post("/auth/verify/request")
        assert response.status_code == 202
        assert set(response.json()) == {"detail"}
        first, second = (token_of(m, "verify") for m in wait_for_mails(server, 2, about=VERIFY))
        assert first != second
        assert verify(server, second).status_code == 200
        assert_invalid(verify(server, first))
        # Verified: a request answers the same and sends nothing.
        assert client.post("/auth/verify/request").status_code == 202
        wait_idle(server)
        assert len(sent(server, VERIFY)) == 2
    assert httpx.post(f"{server.url}/auth/verify/request").status_code == 401


def test_requests_are_rate_limited_per_user(start_server):
    server = start_server(rate_limit_verify_user="2/1h")
    with signed_in(server.url, "spammer@example.com") as client:
        codes = [client.post("/auth/verify/request").status_code for _ in range(3)]
        assert codes == [202, 202, 429]
        limited = client.post("/auth/verify/request")
        assert limited.json()["detail"]["code"] == "rate_limited"
        assert int(limited.headers["retry-after"]) >= 1
    with signed_in(server.url, "other@example.com") as other:  # per user, not global
        assert other.post("/auth/verify/request").status_code == 202


async def test_concurrent_submissions_of_one_token_give_exactly_one_200(server):
    async with httpx.AsyncClient(base_url=server.url) as client:
        email = "race-verify@example.com"
        assert (await client.post("/auth/register", json={"email": email, "password": PASSWORD})).status_code == 201
        token = token_of(wait_for_mails(server, 1, about=VERIFY)[0], "verify")
        results = await asyncio.gather(*(client.post("/auth/verify", json={"token": token}) for _ in range(8)))
    assert sorted(r.status_code for r in results) == [200] + [400] * 7


def test_mails_never_show_the_name_until_the_address_is_verified(server):
    email = "impostor-target@example.com"
    name = "Mallory says click here"
    with signed_in(server.url, email) as client:
        assert client.patch("/auth/me", json={"name": name}).status_code == 200
        [link] = wait_for_mails(server, 1, about=VERIFY)
        assert client.post("/auth/forgot", json={"email": email}).status_code == 202
        [reset] = wait_for_mails(server, 1, about=RESET)
        for message in (link, reset):
            assert "Mallory" not in message.as_string()
            assert text_of(message).startswith("Bonjour,\n")
        verify_address(client, server, email)
        assert client.post("/auth/forgot", json={"email": email}).status_code == 202
        assert text_of(wait_for_mails(server, 2, about=RESET)[1]).startswith(f"Bonjour {name},\n")


def test_chat_is_open_to_unverified_addresses_by_default(server):
    with signed_in(server.url) as client:
        assert client.post("/chatlaya/session").status_code == 200


def test_require_verified_email_closes_chat_until_verified(start_server):
    server = start_server(require_verified_email=True)
    email = "must-verify@example.com"
    with signed_in(server.url, email) as client:
        for method, path in [
            ("POST", "/chatlaya/session"),
            ("GET", "/chatlaya/conversations"),
            ("POST", "/chatlaya/conversations"),
        ]:
            refused = client.request(method, path)
            assert refused.status_code == 403, (path, refused.text)
            assert refused.json()["detail"]["code"] == "email_not_verified"
        streamed = client.post("/chatlaya/message", json={"content": "bonjour"})
        assert streamed.status_code == 403 and streamed.json()["detail"]["code"] == "email_not_verified"
        # The account itself still works: it can ask for a new link.
        assert client.get("/auth/me").status_code == 200
        verify_address(client, server, email)
        assert client.post("/chatlaya/session").status_code == 200
    # Without a session it is still 401, not 403.
    assert httpx.post(f"{server.url}/chatlaya/session").status_code == 401
