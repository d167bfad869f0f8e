"""No lockout by strangers: the owner's browser gets in whatever others fail (OWASP device cookies)."""

from __future__ import annotations

import httpx

from innova_server.testing.chat_client import PASSWORD
from innova_server.testing.server import start_of_a_fresh_window

EMAIL = "owner@example.com"


def login(client: httpx.Client, password: str, ip: str = "198.51.100.7") -> httpx.Response:
    return client.post("/auth/login", json={"email": EMAIL, "password": password}, headers={"X-Forwarded-For": ip})


def test_strangers_failing_never_lock_the_owners_browser_out(start_server, db):
    server = start_server(rate_limit_login_email="3/15m", rate_limit_login_ip="5/15m", rate_limit_login_device="4/15m")
    start_of_a_fresh_window(15 * 60)
    with httpx.Client(base_url=server.url) as browser:
        assert browser.post("/auth/register", json={"email": EMAIL, "password": PASSWORD}).status_code == 201
        first = login(browser, PASSWORD)
        assert first.status_code == 200
        device = first.cookies["innova_device"]
        cookie_header = first.headers["set-cookie"].lower()
        assert "samesite=strict" in cookie_header and "path=/auth" in cookie_header and "httponly" in cookie_header
        assert db.devices.count_documents({}) == 1 and device not in str(list(db.devices.find()))  # only a hash
        browser.post("/auth/logout")

        # Strangers, from many addresses (each under its per-IP limit), exhaust the address's window.
        with httpx.Client(base_url=server.url) as stranger:
            codes = [login(stranger, "wrong password!", ip=f"203.0.113.{index}").status_code for index in range(8)]
            assert codes[:3] == [401, 401, 401] and set(codes[3:]) == {429}
            assert login(stranger, PASSWORD, ip="203.0.113.99").status_code == 429  # even with the password

        # The owner's browser holds its device cookie: it gets in.
        back = login(browser, PASSWORD, ip="198.51.100.7")
        assert back.status_code == 200, back.text
        assert browser.get("/auth/me").status_code == 200
        assert back.cookies["innova_device"] == device  # the same device, trusted on
        # A new browser of the owner (no device cookie) is a stranger like the others.
        with httpx.Client(base_url=server.url) as new_browser:
            assert login(new_browser, PASSWORD).status_code == 429


def test_a_trusted_browser_has_its_own_limit_and_no_trust_for_other_accounts(start_server):
    server = start_server(rate_limit_login_email="100/15m", rate_limit_login_device="3/15m")
    start_of_a_fresh_window(15 * 60)
    with httpx.Client(base_url=server.url) as browser:
        browser.post("/auth/register", json={"email": EMAIL, "password": PASSWORD})
        assert login(browser, PASSWORD).status_code == 200
        # Guessing from a trusted browser is limited too, by its own window.
        assert [login(browser, "wrong password!").status_code for _ in range(4)] == [401, 401, 401, 429]
        # That browser's cookie is no trust for another account: its failures count as usual.
        browser.post("/auth/register", json={"email": "other@example.com", "password": PASSWORD})
        other = browser.post("/auth/login", json={"email": "other@example.com", "password": "wrong password!"})
        assert other.status_code == 401
        # A forged or unknown device cookie is just absent.
        with httpx.Client(base_url=server.url, cookies={"innova_device": "A" * 43}) as forged:
            assert login(forged, "wrong password!").status_code == 401
