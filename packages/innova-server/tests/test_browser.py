"""What only a browser can prove, with a real headless Chromium (Debian's package).

CORS with credentials, the session cookie's `SameSite`, the CSRF `Origin`
check, reading SSE with fetch + ReadableStream, and resuming a reply after a
page reload are decided by the browser: an HTTP client would prove nothing.
Two pages drive the real server:

- the playground (`/playground`, same origin), used as a person would: forms,
  buttons, a reload in the middle of a reply;
- a page served from another origin (a tiny static server on another loopback
  port, listed in ALLOWED_ORIGINS) that calls the API with
  `credentials: "include"`, as the INNOVAPLUS front end does.

What Chromium does with the cookie, observed here and asserted as such:
`127.0.0.1:<other port>` and `127.0.0.1:<api port>` are different origins but
the same *site* (a site is scheme + host; the port does not count), so the
`SameSite=Lax` session cookie is stored and sent on credentialed fetches. A
page on `localhost:<port>` calling `127.0.0.1` is cross-site: its fetches are
allowed by CORS, but the `SameSite=Lax` cookie is neither stored nor sent, so
it stays signed out. That is why the front end must be same-site with the API
(`innovaplus.africa` and `api.innovaplus.africa` are). And loopback is a
secure context for Chromium: a `Secure` cookie set over plain
`http://127.0.0.1` is kept and sent.

Skipped only when no Chromium can be found (`python3 dev.py -s tests` installs
Debian's `chromium` when it runs as root or with password-less sudo).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from innova_server.embedded import free_port
from innova_server.testing.browser import Chromium, Page, find_chromium
from innova_server.testing.chat_client import PASSWORD

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="no Chromium: `apt-get install chromium` (the tests session does it as root or with sudo -n)",
)

# Spaced echo words: a reply that lasts long enough to reload the page in the middle of it.
LONG = " ".join(f"mot{index}" for index in range(60))
ECHO_DELAY_MS = "40"

# The other origin's page: the API's client code a front end would have (no framework).
FRONT_END = """<!doctype html><meta charset="utf-8"><title>front end</title><script>
const API = %(api)s;
window.call = async (method, path, body, extra = {}) => {
  const init = { method, credentials: "include", headers: { ...(extra.headers || {}) } };
  if (extra.credentials) init.credentials = extra.credentials;
  if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  const response = await fetch(API + path, init);
  let json = null;
  try { json = await response.clone().json(); } catch {}
  return { status: response.status, body: json, retryAfter: response.headers.get("Retry-After") };
};
// Read `tokens` token events (or all, until done) with fetch + ReadableStream, keeping the last event id.
window.readEvents = async (response, tokens) => {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const seen = { names: [], text: "", lastId: null, start: null, done: null };
  let buffer = "", count = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return seen;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const block = buffer.slice(0, end); buffer = buffer.slice(end + 2);
      let name = "message", data = null, id = null;
      for (const line of block.split("\\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data = JSON.parse(line.slice(6));
        else if (line.startsWith("id: ")) id = line.slice(4);
      }
      if (data === null) continue;
      seen.names.push(name);
      if (id) seen.lastId = id;
      if (name === "start") seen.start = data;
      if (name === "token") { seen.text += data.text; count += 1; }
      if (name === "done") { seen.done = data; await reader.cancel(); return seen; }
      if (tokens && count >= tokens) { await reader.cancel(); return seen; }
    }
  }
};
window.send = async (content, tokens) => {
  const response = await fetch(API + "/chatlaya/message", {
    method: "POST", credentials: "include",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify({ content }),
  });
  if (!response.ok) return { status: response.status };
  const seen = await readEvents(response, tokens);
  const kept = { messageId: seen.start.message_id, lastId: seen.lastId, text: seen.text };
  localStorage.setItem("resume", JSON.stringify(kept));
  return { status: 200, ...seen, contentType: response.headers.get("Content-Type") };
};
window.resume = async () => {
  const stored = JSON.parse(localStorage.getItem("resume"));
  const response = await fetch(`${API}/chatlaya/messages/${stored.messageId}/events`, {
    credentials: "include", headers: { "Last-Event-ID": stored.lastId },
  });
  if (!response.ok) return { status: response.status };
  const seen = await readEvents(response);
  return { status: 200, before: stored.text, ...seen };
};
</script><p>front end</p>
"""


class _Static(BaseHTTPRequestHandler):
    page = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.page)))
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, format: str, *args: Any) -> None:
        return None


class StaticSite:
    """One HTML page served on its own loopback port: another origin than the API's."""

    def __init__(self, page: str, port: int | None = None) -> None:
        handler = type("Handler", (_Static,), {"page": page.encode()})
        self.port = port or free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StaticSite:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    with Chromium.launch() as chromium:
        yield chromium


@pytest.fixture
def api(start_server, monkeypatch):
    """The API with the playground on, and the other origin (pre-chosen port) in ALLOWED_ORIGINS."""
    monkeypatch.setenv("ECHO_DELAY_MS", ECHO_DELAY_MS)
    front_port = free_port()
    server = start_server(
        playground=True,
        provider="echo",
        chat_checkpoint_ms=100,
        allowed_origins=[f"http://127.0.0.1:{front_port}", f"http://localhost:{front_port}"],
    )
    server.front_port = front_port
    return server


@pytest.fixture
def front_end(api) -> Iterator[StaticSite]:
    """The front end's page, on the port listed in ALLOWED_ORIGINS."""
    with StaticSite(FRONT_END % {"api": json.dumps(api.url)}, port=api.front_port) as site:
        yield site


@pytest.fixture
def page(browser: Chromium) -> Iterator[Page]:
    tab = browser.new_page()
    yield tab
    browser.send("Target.closeTarget", targetId=tab.target_id)


def js(value: Any) -> str:
    return json.dumps(value)


# -- another origin, as the front end ------------------------------------------------


def test_a_front_end_on_another_origin_signs_in_streams_and_resumes_after_a_reload(api, front_end, page):
    page.goto(f"http://127.0.0.1:{front_end.port}/")
    email = f"front-{uuid.uuid4().hex[:8]}@example.com"
    registered = page.evaluate(f"call('POST', '/auth/register', {{email: {js(email)}, password: {js(PASSWORD)}}})")
    # A JSON POST needs a CORS preflight: allowed for this origin, with credentials.
    assert registered["status"] == 201 and registered["body"]["user"]["email"] == email
    # The cookie was stored by the browser and comes back on credentialed requests only.
    assert page.evaluate("call('GET', '/auth/me')")["status"] == 200
    assert page.evaluate("call('GET', '/auth/me', undefined, {credentials: 'omit'})")["status"] == 401
    cookie = next(c for c in page.browser.cookies() if c["name"] == "innova_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["domain"] == "127.0.0.1"
    # `document.cookie` cannot see it (HttpOnly), on either origin.
    assert "innova_session" not in page.evaluate("document.cookie")

    # SSE over fetch + ReadableStream: a few tokens, then the page is reloaded mid-reply.
    cut = page.evaluate(f"send({js(LONG)}, 5)")
    assert cut["status"] == 200 and cut["contentType"].startswith("text/event-stream")
    assert cut["names"][0] == "start" and cut["start"]["provider"] == "echo" and cut["lastId"]
    assert cut["done"] is None and 0 < len(cut["text"]) < len(LONG)
    page.reload()
    resumed = page.evaluate("resume()")  # Last-Event-ID is a CORS-allowed request header
    assert resumed["status"] == 200 and resumed["names"][0] == "start" and resumed["names"][-1] == "done"
    assert resumed["before"] + resumed["text"] == LONG  # no gap, no duplicate
    assert resumed["done"]["finish_reason"] == "stop"

    assert page.evaluate("call('POST', '/auth/logout')")["status"] == 204
    assert page.evaluate("call('GET', '/auth/me')")["status"] == 401


def test_an_origin_not_allowed_can_neither_read_nor_write(api, front_end, page):
    page.goto(f"http://127.0.0.1:{front_end.port}/")
    email = f"csrf-{uuid.uuid4().hex[:8]}@example.com"
    assert page.evaluate(f"call('POST', '/auth/register', {{email: {js(email)}, password: {js(PASSWORD)}}})")[
        "status"
    ] == 201
    with StaticSite("<!doctype html><title>elsewhere</title>") as elsewhere:
        # Same site as the API (127.0.0.1), so the browser does send the Lax cookie from here...
        page.goto(f"http://127.0.0.1:{elsewhere.port}/")
        # ...but CORS: the browser refuses to hand the answer to this page.
        me = js(api.url + "/auth/me")
        read = page.evaluate(f"fetch({me}, {{credentials: 'include'}}).then(r => 'read', e => e.name)")
        assert read == "TypeError"
        # A POST the browser sends without a preflight (no-cors, no body): the CSRF Origin check refuses it,
        # so this page cannot sign the user out.
        page.evaluate(
            f"fetch({js(api.url + '/auth/logout')}, {{method: 'POST', mode: 'no-cors', credentials: 'include'}})"
            ".then(() => 'sent')"
        )
    page.goto(f"http://127.0.0.1:{front_end.port}/")
    assert page.evaluate("call('GET', '/auth/me')")["status"] == 200
    assert page.evaluate("call('POST', '/auth/logout')")["status"] == 204
    assert page.evaluate("call('GET', '/auth/me')")["status"] == 401


def test_a_cross_site_page_is_allowed_by_cors_but_gets_no_lax_cookie(api, front_end, page):
    # localhost and 127.0.0.1 are different sites: CORS lets the answer through (the origin is
    # allowed), but Chromium does not keep a SameSite=Lax cookie set by a cross-site fetch.
    page.goto(f"http://localhost:{front_end.port}/")
    email = f"cross-{uuid.uuid4().hex[:8]}@example.com"
    registered = page.evaluate(f"call('POST', '/auth/register', {{email: {js(email)}, password: {js(PASSWORD)}}})")
    assert registered["status"] == 201
    assert page.evaluate("call('GET', '/auth/me')")["status"] == 401


def test_chromium_keeps_a_secure_cookie_over_plain_http_on_loopback(start_server, page):
    # Loopback counts as a secure context for Chromium: with COOKIE_SECURE=true the session still
    # works on http://127.0.0.1 (the tests use COOKIE_SECURE=false all the same, for other clients).
    server = start_server(playground=True, cookie_secure=True)
    page.goto(f"{server.url}/playground", ready="document.documentElement.dataset.ready === 'yes'")
    body = js({"email": f"secure-{uuid.uuid4().hex[:8]}@example.com", "password": PASSWORD})
    registered = page.evaluate(
        "fetch('/auth/register', {method: 'POST', headers: {'Content-Type': 'application/json'},"
        f" body: {js(body)}}}).then(r => r.status)"
    )
    assert registered == 201
    assert page.evaluate("fetch('/auth/me').then(r => r.status)") == 200
    assert next(c for c in page.browser.cookies() if c["name"] == "innova_session")["secure"]


# -- the playground, same origin ---------------------------------------------------------


def fill(page: Page, element_id: str, value: str) -> None:
    page.evaluate(f"document.getElementById({js(element_id)}).value = {js(value)}")


def click(page: Page, selector: str) -> None:
    page.evaluate(f"document.querySelector({js(selector)}).click()")


def last_reply(page: Page) -> dict[str, Any]:
    return page.evaluate(
        """(() => { const li = [...document.querySelectorAll('#messages li.assistant')].pop();
        return li ? {id: li.dataset.id, status: li.dataset.status, text: li.querySelector('.text').textContent,
                     meta: li.querySelector('.meta').textContent} : null; })()"""
    )


def wait_idle(page: Page, timeout: float = 20) -> dict[str, Any]:
    """Wait until no reply streams and the last one is stored; that reply."""
    try:
        page.wait_for(
            "document.documentElement.dataset.streaming === 'no' && "
            "[...document.querySelectorAll('#messages li.assistant')].pop()?.dataset.status !== 'streaming'",
            timeout=timeout,
        )
    except TimeoutError as error:
        shown = page.evaluate(
            "({status: document.getElementById('status').textContent, streaming: document.documentElement.dataset"
            ".streaming, messages: [...document.querySelectorAll('#messages li')].map(li => li.className + ' ' +"
            " li.dataset.status + ' ' + li.textContent.slice(0, 60))})"
        )
        raise AssertionError(f"the page never settled: {shown}") from error
    return last_reply(page)


def send(page: Page, content: str) -> None:
    fill(page, "content", content)
    click(page, "#send")
    page.wait_for("document.documentElement.dataset.streaming === 'yes'")


def test_the_playground_is_a_working_chat(api, page):
    page.goto(f"{api.url}/playground", ready="document.documentElement.dataset.ready === 'yes'")
    assert page.evaluate("document.getElementById('auth').hidden") is False
    fill(page, "email", f"play-{uuid.uuid4().hex[:8]}@example.com")
    fill(page, "password", PASSWORD)
    fill(page, "name", "Awa")
    click(page, "#register")  # a same-origin POST: accepted by the CSRF check while the playground is on
    page.wait_for("!document.getElementById('chat').hidden")
    assert "Awa" in page.evaluate("document.getElementById('user-info').textContent")

    # A whole reply, streamed into the page; the provider and model from `start`.
    send(page, "Bonjour  le monde 🌍")
    reply = wait_idle(page)
    assert reply["text"] == "Bonjour  le monde 🌍" and reply["status"] == "complete"
    assert page.evaluate("document.getElementById('model-info').textContent") == "echo · echo"
    assert page.evaluate("document.querySelectorAll('#conversations li').length") == 1

    # A reload in the middle of a reply: the page resumes from the last event id it stored.
    send(page, LONG)
    page.wait_for("(document.querySelector('#messages li[data-status=streaming] .text')?.textContent || '').length > 0")
    page.reload(ready="document.documentElement.dataset.ready === 'yes'")
    reply = wait_idle(page)
    assert reply["text"] == LONG and reply["status"] == "complete"
    assert page.evaluate("document.documentElement.dataset.resumedFrom")  # it resumed with an id, not from scratch
    assert page.evaluate("localStorage.getItem('chatlaya-playground:resume')") is None

    # Stop.
    send(page, LONG)
    page.wait_for("(document.querySelector('#messages li[data-status=streaming] .text')?.textContent || '').length > 0")
    click(page, "#stop")
    reply = wait_idle(page)
    assert reply["status"] == "incomplete" and "stopped" in reply["meta"]
    assert 0 < len(reply["text"]) < len(LONG) and LONG.startswith(reply["text"])

    if not has_tree(api):
        # A server without the conversation tree: its buttons are hidden, the rest works.
        assert not page.evaluate(
            "[...document.querySelectorAll('#messages button')].some(b => /Edit|Regenerate|👍/.test(b.textContent))"
        )
        assert "not on this server" in page.evaluate("document.getElementById('features').textContent")
    else:
        exercise_tree(page)

    click(page, "#logout")
    page.wait_for("!document.getElementById('auth').hidden")
    assert page.evaluate("fetch('/auth/me').then(r => r.status)") == 401


def has_tree(api) -> bool:
    """Whether this server has the conversation tree (`sibling_ids` on messages)."""
    answer = httpx.post(f"{api.url}/chatlaya/messages/{'0' * 24}/regenerate")
    return answer.status_code == 401  # the route exists (and wants a session); else 404 `not_found`


def exercise_tree(page: Page) -> None:
    """Regenerate, feedback, edit-and-resend and switching between siblings, through the page's buttons."""
    first = last_reply(page)
    page.evaluate(
        "[...[...document.querySelectorAll('#messages li.assistant')].pop().querySelectorAll('button')]"
        ".find(b => b.textContent.includes('Regenerate')).click()"
    )
    page.wait_for("document.documentElement.dataset.streaming === 'yes'")
    second = wait_idle(page)
    assert second["id"] != first["id"] and "2 / 2" in second["meta"]
    page.evaluate(
        "[...[...document.querySelectorAll('#messages li.assistant')].pop().querySelectorAll('button')]"
        ".find(b => b.textContent === '👍').click()"
    )
    page.wait_for(
        "[...document.querySelectorAll('#messages li.assistant')].pop()"
        ".querySelector('button.on')?.textContent === '👍'"
    )
    page.evaluate(
        "[...[...document.querySelectorAll('#messages li.assistant')].pop().querySelectorAll('button')]"
        ".find(b => b.textContent === '‹').click()"
    )
    page.wait_for("[...document.querySelectorAll('#messages li.assistant')].pop().textContent.includes('1 / 2')")
    assert last_reply(page)["id"] == first["id"]
    # Edit the last question: a sibling of it, and a new reply.
    page.evaluate(
        "[...[...document.querySelectorAll('#messages li.user')].pop().querySelectorAll('button')]"
        ".find(b => b.textContent === 'Edit').click()"
    )
    page.evaluate("document.querySelector('.edit textarea').value = 'Autre question'")
    page.evaluate("document.querySelector('.edit button[type=submit]').click()")
    page.wait_for("document.documentElement.dataset.streaming === 'yes'")
    edited = wait_idle(page)
    assert edited["text"] == "Autre question"
    assert page.evaluate("[...document.querySelectorAll('#messages li.user')].pop().textContent.includes('2 / 2')")
    # Search by title (the feature was detected: the box is shown).
    page.wait_for("!document.getElementById('search').hidden")
    for query, count in (("bonjour", 1), ("pas-un-titre", 0)):
        page.evaluate(
            f"(() => {{ const box = document.getElementById('search'); box.value = {js(query)};"
            " box.dispatchEvent(new Event('input')); })()"
        )
        page.wait_for(f"document.querySelectorAll('#conversations li').length === {count}")
