"""Profile and password change over real HTTP and a real database; CSRF and bad input on every new route.

OWASP points proven here: re-authentication for sensitive changes (a password
change asks for the current password, counted like a login), and a password
change ends every other session.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from http.cookies import SimpleCookie

import httpx
import pytest

from innova_server.auth.tokens import hash_token
from innova_server.testing.accounts import plant_reset_token
from innova_server.testing.chat_client import PASSWORD, signed_in
from innova_server.testing.mailbox import PASSWORD_CHANGED, text_of, wait_for_mails
from innova_server.testing.server import start_of_a_fresh_window

NEW_PASSWORD = "un tout nouveau mot de passe"
EVIL = {"Origin": "https://evil.example"}


def cookie_of(client: httpx.Client | httpx.AsyncClient) -> str:
    return client.cookies["innova_session"]


def me_status(server, cookie: str) -> int:
    return httpx.get(f"{server.url}/auth/me", headers={"Cookie": f"innova_session={cookie}"}).status_code


def login(server, email: str, password: str) -> httpx.Response:
    return httpx.post(f"{server.url}/auth/login", json={"email": email, "password": password})


def account_events(server, event: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(rf'^innova_account_events_total\{{event="{event}"\}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def change(client: httpx.Client, current: str = PASSWORD, new: str = NEW_PASSWORD) -> httpx.Response:
    return client.post("/auth/password", json={"current_password": current, "new_password": new})


# -- PATCH /auth/me ------------------------------------------------------------


def test_rename(server, db):
    with signed_in(server.url, "named@example.com") as client:
        renamed = client.patch("/auth/me", json={"name": "  Ada Lovelace  "})
        assert renamed.status_code == 200, renamed.text
        assert renamed.json()["user"]["name"] == "Ada Lovelace"
        assert client.get("/auth/me").json()["user"]["name"] == "Ada Lovelace"
        assert db.users.find_one({"email": "named@example.com"})["name"] == "Ada Lovelace"
        cleared = client.patch("/auth/me", json={"name": None})
        assert cleared.status_code == 200 and cleared.json()["user"]["name"] is None
        assert client.patch("/auth/me", json={"name": ""}).json()["user"]["name"] is None
    assert httpx.patch(f"{server.url}/auth/me", json={"name": "x"}).status_code == 401


# -- POST /auth/password -------------------------------------------------------


def test_password_change_ends_every_other_session_and_rotates_the_caller(server, db):
    email = "changer@example.com"
    with signed_in(server.url, email) as client:
        other = login(server, email, PASSWORD)
        assert other.status_code == 200
        other_cookie = other.cookies["innova_session"]
        old_cookie = cookie_of(client)
        changes = account_events(server, "password_changed")

        response = change(client)
        assert response.status_code == 200, response.text
        assert response.json()["user"]["email"] == email
        new_cookie = SimpleCookie(response.headers["set-cookie"])["innova_session"].value
        assert new_cookie != old_cookie and cookie_of(client) == new_cookie

        assert account_events(server, "password_changed") == changes + 1
        assert client.get("/auth/me").status_code == 200  # the caller continues
        assert me_status(server, old_cookie) == 401  # its old cookie does not
        assert me_status(server, other_cookie) == 401  # nor does any other session
        user = db.users.find_one({"email": email})
        assert [s["token_hash"] for s in db.sessions.find({"user_id": user["_id"]})] == [hash_token(new_cookie)]

    assert login(server, email, PASSWORD).status_code == 401
    assert login(server, email, NEW_PASSWORD).status_code == 200
    notice = wait_for_mails(server, 1, about=PASSWORD_CHANGED)[0]
    assert notice["To"] == email
    assert "Vos autres sessions ont été fermées" in text_of(notice)
    assert NEW_PASSWORD not in notice.as_string()


def test_wrong_current_password_is_403_and_changes_nothing(server, db):
    email = "wrong@example.com"
    with signed_in(server.url, email) as client:
        before = db.users.find_one({"email": email})
        response = change(client, current="not my password")
        assert response.status_code == 403
        assert response.json()["detail"]["code"] == "wrong_password"
        assert "set-cookie" not in response.headers
        assert client.get("/auth/me").status_code == 200
    after = db.users.find_one({"email": email})
    assert after["password_hash"] == before["password_hash"]
    assert login(server, email, PASSWORD).status_code == 200


def test_a_wrong_current_password_counts_as_a_failed_login(start_server):
    server = start_server(rate_limit_login_email="3/15m")
    start_of_a_fresh_window(15 * 60)
    email = "guesser@example.com"
    with signed_in(server.url, email) as client:
        codes = [change(client, current=f"guess number {i}").status_code for i in range(4)]
        assert codes == [403, 403, 403, 429]
        # The same window as /auth/login: that is now refused too, even with the right password.
        refused = login(server, email, PASSWORD)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        # And the other way round: login failures fill the window this route counts against.
        assert change(client).status_code == 429


def test_a_right_current_password_does_not_use_up_the_window(start_server):
    server = start_server(rate_limit_login_email="2/15m")
    start_of_a_fresh_window(15 * 60)
    email = "often@example.com"
    with signed_in(server.url, email) as client:
        passwords = [PASSWORD, *(f"{NEW_PASSWORD} {i}" for i in range(4))]
        for current, new in itertools.pairwise(passwords):
            assert change(client, current=current, new=new).status_code == 200


def test_password_change_voids_pending_reset_links(server, db):
    email = "links@example.com"
    with signed_in(server.url, email) as client:
        token = plant_reset_token(db, email)
        assert change(client).status_code == 200
        late = client.post("/auth/reset", json={"token": token, "email": email, "password": "an attacker's pick"})
    assert late.status_code == 400 and late.json()["detail"]["code"] == "invalid_token"


async def test_logins_with_the_old_password_racing_a_change_never_keep_a_session(start_server):
    # Costlier argon2 than the test default, so logins are mid-verification when the change lands.
    server = start_server(argon2_time_cost=2, argon2_memory_cost=8192, argon2_parallelism=1)
    email = "race-change@example.com"
    async with httpx.AsyncClient(base_url=server.url) as owner:
        assert (await owner.post("/auth/register", json={"email": email, "password": PASSWORD})).status_code == 201

        async def old_login() -> httpx.Response:
            async with httpx.AsyncClient(base_url=server.url) as client:
                return await client.post("/auth/login", json={"email": email, "password": PASSWORD})

        logins = [asyncio.create_task(old_login()) for _ in range(8)]
        await asyncio.sleep(0.01)
        changed = await owner.post(
            "/auth/password", json={"current_password": PASSWORD, "new_password": NEW_PASSWORD}
        )
        results = await asyncio.gather(*logins)
        assert changed.status_code == 200, changed.text
        assert (await owner.get("/auth/me")).status_code == 200
        assert {r.status_code for r in results} <= {200, 401}
        async with httpx.AsyncClient(base_url=server.url) as probe:
            for result in results:
                if result.status_code == 200:  # it won its race, but must not outlive the change
                    cookie = result.cookies["innova_session"]
                    me = await probe.get("/auth/me", headers={"Cookie": f"innova_session={cookie}"})
                    assert me.status_code == 401


async def test_two_concurrent_changes_one_wins(server):
    email = "double-change@example.com"
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.post("/auth/register", json={"email": email, "password": PASSWORD})).status_code == 201
        cookie = cookie_of(client)

        async def attempt(new: str) -> httpx.Response:
            async with httpx.AsyncClient(base_url=server.url, cookies={"innova_session": cookie}) as c:
                return await c.post("/auth/password", json={"current_password": PASSWORD, "new_password": new})

        first, second = await asyncio.gather(attempt("première version !"), attempt("seconde version !"))
    codes = sorted([first.status_code, second.status_code])
    assert codes in ([200, 401], [200, 403]), (first.text, second.text)
    winner = "première version !" if first.status_code == 200 else "seconde version !"
    loser = "seconde version !" if winner == "première version !" else "première version !"
    assert login(server, email, winner).status_code == 200
    assert login(server, email, loser).status_code == 401


# -- every new unsafe route: CSRF origin check, documented 4xx on bad input -------


UNSAFE_ROUTES = [
    ("PATCH", "/auth/me", {"name": "x"}),
    ("DELETE", "/auth/me", {"password": PASSWORD}),
    ("POST", "/auth/password", {"current_password": PASSWORD, "new_password": NEW_PASSWORD}),
    ("DELETE", "/auth/sessions", None),
    ("DELETE", "/auth/sessions/0123456789abcdef01234567", None),
    ("POST", "/auth/verify/request", None),
    ("POST", "/auth/verify", {"token": "x" * 43}),
]


@pytest.mark.parametrize(("method", "path", "body"), UNSAFE_ROUTES)
def test_every_new_unsafe_route_is_behind_the_csrf_origin_check(server, db, method, path, body):
    with signed_in(server.url, "csrf@example.com") as client:
        refused = client.request(method, path, json=body, headers=EVIL)
        assert refused.status_code == 403
        assert refused.json()["detail"]["code"] == "csrf_origin"
        # The allowed origin passes the check (whatever the route then answers).
        allowed = client.request(method, path, json=body, headers={"Origin": "http://localhost:3000"})
        assert allowed.status_code != 403 or allowed.json()["detail"]["code"] != "csrf_origin"
    assert db.users.count_documents({"email": "csrf@example.com"}) == 1 or method == "DELETE"


BAD_BODIES = [
    ("PATCH", "/auth/me", {}),
    ("PATCH", "/auth/me", {"name": 5}),
    ("PATCH", "/auth/me", {"name": "x" * 101}),
    ("PATCH", "/auth/me", {"name": "Ada", "email": "other@example.com"}),
    ("POST", "/auth/password", {}),
    ("POST", "/auth/password", {"current_password": PASSWORD}),
    ("POST", "/auth/password", {"current_password": PASSWORD, "new_password": "short"}),
    ("POST", "/auth/password", {"current_password": PASSWORD, "new_password": "x" * 129}),
    ("POST", "/auth/password", {"current_password": "", "new_password": NEW_PASSWORD}),
    ("POST", "/auth/password", {"current_password": "x" * 129, "new_password": NEW_PASSWORD}),
    ("DELETE", "/auth/me", None),
    ("DELETE", "/auth/me", {}),
    ("DELETE", "/auth/me", {"password": ["a"]}),
    ("DELETE", "/auth/me", {"password": "x" * 129}),
    ("POST", "/auth/verify", {}),
    ("POST", "/auth/verify", {"token": None}),
    ("POST", "/auth/verify", []),
]


@pytest.mark.parametrize(("method", "path", "body"), BAD_BODIES)
def test_malformed_bodies_are_422_and_change_nothing(server, db, method, path, body):
    email = "bad-input@example.com"
    with signed_in(server.url, email) as client:
        before = db.users.find_one({"email": email})
        response = client.request(method, path, json=body)
        assert response.status_code == 422, response.text
        assert PASSWORD not in response.text
        assert client.get("/auth/me").status_code == 200
    assert db.users.find_one({"email": email}) == before


@pytest.mark.parametrize("path", ["/auth/me", "/auth/password", "/auth/verify"])
def test_non_json_bodies_are_refused_not_500(server, path):
    with signed_in(server.url) as client:
        method = "PATCH" if path == "/auth/me" else "POST"
        response = client.request(method, path, content=b"name=x", headers={"Content-Type": "text/plain"})
        assert 400 <= response.status_code < 500
        garbage = client.request(method, path, content=b"{not json", headers={"Content-Type": "application/json"})
        assert garbage.status_code == 422


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PATCH", "/auth/me", {"name": "x"}),
        ("POST", "/auth/password", {"current_password": PASSWORD, "new_password": NEW_PASSWORD}),
        ("DELETE", "/auth/me", {"password": PASSWORD}),
        ("GET", "/auth/sessions", None),
        ("DELETE", "/auth/sessions", None),
        ("DELETE", "/auth/sessions/0123456789abcdef01234567", None),
        ("GET", "/auth/me/export", None),
        ("POST", "/auth/verify/request", None),
    ],
)
def test_signed_in_routes_are_401_without_a_session(server, method, path, body):
    response = httpx.request(method, f"{server.url}{path}", json=body)
    assert response.status_code == 401
    assert response.json()["detail"]["code"] == "not_authenticated"
