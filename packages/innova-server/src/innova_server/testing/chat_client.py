"""Driving Chatlaya over HTTP in tests: a signed-in client, and a whole reply read with httpx-sse.

Needs the test dependencies (httpx, httpx-sse)."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import connect_sse

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

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def text(self) -> str:
        return "".join(data["text"] for name, data in self.events if name == "token")

    def data(self, name: str) -> dict[str, Any]:
        return next(data for event, data in self.events if event == name)


def chat(client: httpx.Client, content: str, conversation_id: str | None = None) -> Stream:
    """Send a message and read the whole reply with httpx-sse."""
    body: dict[str, Any] = {"content": content}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    with connect_sse(client, "POST", "/chatlaya/message", json=body) as source:
        response = source.response
        if response.status_code != 200:
            response.read()
            return Stream(response.status_code, response.headers, body=response.json())
        stream = Stream(200, response.headers)
        for sse in source.iter_sse():
            stream.events.append((sse.event, json.loads(sse.data)))
        return stream
