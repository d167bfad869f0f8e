"""Server-Sent Events: framing, pings, and a response that notices the client leaving.

The response runs the stream in a task of its own and watches the ASGI
`receive` channel beside it. uvicorn (ASGI spec 2.3) silently drops writes to
a closed connection, so writing is no way to learn that the client is gone;
`http.disconnect` is. When it arrives the stream task is cancelled at once,
even while it waits for a slow model, and the event source's `close()` runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger("innova.chatlaya.sse")

PING = b": ping\n\n"
STREAM_HEADERS = {
    # no-transform: proxies must not compress or rewrite (and so buffer) the stream.
    "Cache-Control": "no-cache, no-transform",
    # nginx buffers proxied responses unless told otherwise.
    "X-Accel-Buffering": "no",
}


@dataclass(frozen=True)
class Event:
    name: str
    data: Mapping[str, Any]


# Left raw by `json.dumps(ensure_ascii=False)`, yet line breaks to clients that
# split with `str.splitlines()` (U+0085, U+2028, U+2029), or not encodable as
# UTF-8 at all (lone surrogates). Written as JSON `\uXXXX` escapes instead:
# the decoded string is unchanged.
_UNSAFE = re.compile("[\u0085\u2028\u2029\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match[0]):04x}"


def encode_event(event: Event) -> bytes:
    """One SSE event; its `data:` is always exactly one line, whatever the text.

    json.dumps escapes CR, LF and the other control characters; `_UNSAFE`
    covers the rest (see above). Everything else stays readable UTF-8.
    """
    data = _UNSAFE.sub(_escape, json.dumps(event.data, ensure_ascii=False))
    return f"event: {event.name}\ndata: {data}\n\n".encode()


class EventSource(Protocol):
    """What `EventStreamResponse` streams."""

    @property
    def finished(self) -> bool: ...

    def first_events(self) -> list[Event]:
        """Sent as soon as the headers are."""
        ...

    async def next_events(self, silence_seconds: float) -> list[Event]:
        """The next events, or `[]` when `silence_seconds` passed without any."""
        ...

    async def close(self) -> None:
        """The client went away (or the server is stopping): stop and record what was done."""
        ...


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, source: EventSource, *, ping_seconds: float, headers: Mapping[str, str] | None = None) -> None:
        # Not `Response.__init__`: it would render an empty body and send `Content-Length: 0`.
        self.status_code = 200
        self.background = None
        self.init_headers({**STREAM_HEADERS, **(headers or {})})
        self.source = source
        self.ping_seconds = ping_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.create_task(self._stream(send), name="sse-stream")
        watcher = asyncio.create_task(self._wait_for_disconnect(receive), name="sse-disconnect")
        try:
            await asyncio.wait({stream, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not stream.done():
                stream.cancel()
            # The stream task records the outcome in its `finally`, even when
            # this task is itself being cancelled (server shutdown).
            await asyncio.wait({stream, watcher})
        if not stream.cancelled() and stream.exception() is not None:
            log.error("chat stream failed", exc_info=stream.exception())

    async def _stream(self, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await self._send_body(send, b"".join(encode_event(e) for e in self.source.first_events()))
            while not self.source.finished:
                events = await self.source.next_events(self.ping_seconds)
                await self._send_body(send, b"".join(encode_event(e) for e in events) if events else PING)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if not self.source.finished:
                await self.source.close()

    @staticmethod
    async def _send_body(send: Send, body: bytes) -> None:
        await send({"type": "http.response.body", "body": body, "more_body": True})

    @staticmethod
    async def _wait_for_disconnect(receive: Receive) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                return


__all__ = ["PING", "STREAM_HEADERS", "Event", "EventSource", "EventStreamResponse", "encode_event"]
