"""`/playground` over HTTP: when it is served, what it serves, and the same-origin CSRF rule it needs.

What the page does in a browser is tested with Chromium in test_browser.py.
"""

from __future__ import annotations

import httpx
import pytest

from innova_server.cli import playground_url
from innova_server.settings import Settings


@pytest.mark.parametrize(
    ("env", "flag", "served"),
    [("development", False, True), ("test", False, False), ("production", False, False), ("production", True, True)],
)
def test_served_in_development_or_when_asked_for(env, flag, served):
    assert Settings(_env_file=None, env=env, playground=flag).playground_enabled is served


def test_not_served_unless_enabled(server):
    assert httpx.get(f"{server.url}/playground").status_code == 404
    assert httpx.get(f"{server.url}/playground/app.js").status_code == 404


def test_one_page_its_script_and_style_from_this_origin_only(start_server):
    server = start_server(playground=True)
    page = httpx.get(f"{server.url}/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    # Nothing from a CDN: scripts, styles and API calls are all this origin's.
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "default-src 'none'" in policy
    assert '<script src="/playground/app.js"' in page.text and "https://" not in page.text
    script = httpx.get(f"{server.url}/playground/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "/chatlaya/message" in script.text and "Last-Event-ID" in script.text
    style = httpx.get(f"{server.url}/playground/style.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert httpx.get(f"{server.url}/playground/", follow_redirects=False).status_code == 308


def test_same_origin_writes_are_accepted_only_while_the_playground_is_served(start_server):
    on = start_server(playground=True)
    off = start_server()
    for server, expected in ((on, 204), (off, 403)):
        own = httpx.post(f"{server.url}/auth/logout", headers={"Origin": server.url})
        assert own.status_code == expected, server.settings.playground
    # Another origin stays refused, playground or not; the allow-list still counts.
    other = httpx.post(f"{on.url}/auth/logout", headers={"Origin": "http://127.0.0.1:1"})
    assert other.status_code == 403 and other.json()["detail"]["code"] == "csrf_origin"
    listed = httpx.post(f"{off.url}/auth/logout", headers={"Origin": "http://localhost:3000"})
    assert listed.status_code == 204
    # A Host that does not match the Origin is no same-origin request.
    spoofed = httpx.post(f"{on.url}/auth/logout", headers={"Origin": "http://evil.example", "Host": "evil.example:80"})
    assert spoofed.status_code == 403


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000/playground"),
        ("0.0.0.0", "http://127.0.0.1:8000/playground"),
        ("::", "http://[::1]:8000/playground"),
        ("example.org", "http://example.org:8000/playground"),
    ],
)
def test_the_url_serve_prints(host, url):
    assert playground_url(host, 8000) == url
