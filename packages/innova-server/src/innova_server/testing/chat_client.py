"""Driving Chatlaya over HTTP in tests: a signed-in client, a whole reply read with httpx-sse,
and a reply read in part (to cut it) then resumed from its last event id.

Needs the test dependencies (httpx, httpx-sse)."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import EventSource, ServerSentEvent, connect_sse

PASSWORD = "correct horse battery"  # noqa: S105 - a test account


@contextlib.contextmanager
def signed_in(base_url: str, email: str | None = None, **client_options: Any) -> Iterator[httpx.Client]:
    """A client holding the session cookie of a newly registered user."""
    with httpx.Client(base_url=base_url, timeout=30, **client_options) as client:
        email = email or f"user-{uuid.uuid4().hex[:8]}@example.com"
        response = client.post("/auth/register", json={"email": email, "password": PASSWORD})
        assert response.status_code == 201, response.text
        yield client


@dataclass
class Stream:
    status: int
    headers: httpx.Headers
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    body: Any = None
    ids: list[str | None] = field(default_factory=list)
    _sse: Iterator[ServerSentEvent] | None = field(default=None, repr=False)

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def text(self) -> str:
        return "".join(data["text"] for name, data in self.events if name == "token")

    def data(self, name: str) -> dict[str, Any]:
        return next(data for event, data in self.events if event == name)

    @property
    def last_id(self) -> str | None:
        return self.ids[-1] if self.ids else None

    def read(self, source: EventSource, *, tokens: int | None = None) -> Stream:
        """Append events from `source` until `done`, or until `tokens` token events were read here.

        Call it again with the same `source` to read on (its events are one iterator).
        """
        if self._sse is None:
            self._sse = source.iter_sse()
        seen = 0
        for sse in self._sse:
            self.events.append((sse.event, json.loads(sse.data)))
            self.ids.append(sse.id or None)
            seen += sse.event == "token"
            if sse.event == "done" or (tokens is not None and seen >= tokens):
                break
        return self


def sse(client: httpx.Client, method: str, path: str, *, tokens: int | None = None, **options: Any) -> Stream:
    """Any Chatlaya event stream: read until `done` (or `tokens` tokens); a JSON error's body otherwise."""
    with connect_sse(client, method, path, **options) as source:
        response = source.response
        if response.status_code != 200:
            response.read()
            return Stream(response.status_code, response.headers, body=response.json())
        return Stream(200, response.headers).read(source, tokens=tokens)


def chat(
    client: httpx.Client, content: str, conversation_id: str | None = None, *, edit_of: str | None = None
) -> Stream:
    """Send a message and read the whole reply with httpx-sse."""
    body: dict[str, Any] = {"content": content}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    if edit_of is not None:
        body["edit_of"] = edit_of
    return sse(client, "POST", "/chatlaya/message", json=body)


def regenerate(client: httpx.Client, message_id: str) -> Stream:
    """Another reply to the question `message_id` answers."""
    return sse(client, "POST", f"/chatlaya/messages/{message_id}/regenerate")


def resume(
    client: httpx.Client, message_id: str, last_event_id: str | None = None, *, tokens: int | None = None
) -> Stream:
    """`GET /chatlaya/messages/{id}/events` with `Last-Event-ID`, read until `done` (or `tokens` tokens)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    return sse(client, "GET", f"/chatlaya/messages/{message_id}/events", headers=headers, tokens=tokens)
