"""`GET /auth/me/export`: the user's data as one JSON document, written while it is read.

The body is `{"user": …, "sessions": [...], "conversations": [...], "messages": [...]}`,
produced piece by piece from MongoDB cursors read in batches of `BATCH_SIZE`:
at any moment the process holds one batch and one chunk of output, whatever
the number of messages, and the ASGI server's flow control holds the
generator while the client is slow. So memory does not grow with the size of
the account (README: the figure for 10 000 messages).

Conversations and messages go out whole (every field, so a field a later
version adds is exported without anyone remembering to), but for the owner's
`user_id` and the internal `session_key`; `_id` is renamed `id`. The user
and their sessions go out through an allow-list: never a password or token
hash. Only documents whose `user_id` is the user's are read.

A database failure mid-stream cuts the body short, so the client sees JSON
that does not parse, never a document that looks complete and is not.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import Any

from bson import ObjectId

from innova_server.auth.store import UserRecord
from innova_server.db import Database, Document

BATCH_SIZE = 500
# Output is sent in chunks of about this many bytes: fewer, larger writes.
CHUNK_BYTES = 64 * 1024

_DROPPED = frozenset({"user_id", "session_key"})
_USER_FIELDS = ("email", "name", "email_verified", "created_at", "updated_at")
_SESSION_FIELDS = ("created_at", "expires_at", "ip", "user_agent")


def _encode(value: Any) -> Any:
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)  # Decimal128 and other BSON types: their text form


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_encode, ensure_ascii=False, separators=(",", ":"))


def _public(doc: Document) -> Document:
    out: Document = {"id": doc["_id"]}
    out.update((key, value) for key, value in doc.items() if key != "_id" and key not in _DROPPED)
    return out


def _pick(doc: Document, fields: Iterable[str]) -> Document:
    out: Document = {"id": doc["_id"]}
    out.update((field, doc.get(field)) for field in fields)
    return out


async def _array(docs: AsyncIterator[Document], shape: Any) -> AsyncIterator[str]:
    """`[`, the documents, `]`, as pieces of about CHUNK_BYTES."""
    buffer = ["["]
    size, first = 1, True
    async for doc in docs:
        piece = ("" if first else ",") + _dumps(shape(doc))
        first = False
        buffer.append(piece)
        size += len(piece)
        if size >= CHUNK_BYTES:
            yield "".join(buffer)
            buffer, size = [], 0
    buffer.append("]")
    yield "".join(buffer)


async def export_chunks(db: Database, user: UserRecord) -> AsyncIterator[bytes]:
    oid = ObjectId(user.id)
    owned = {"user_id": oid}
    doc = await db.users.find_one({"_id": oid}) or {"_id": oid, "email": user.email}
    yield ('{"user":' + _dumps(_pick(doc, _USER_FIELDS))).encode()

    sessions = db.sessions.find(owned, batch_size=BATCH_SIZE).sort("_id", 1)
    conversations = db.conversations.find(owned, batch_size=BATCH_SIZE).sort("_id", 1)
    messages = db.messages.find(owned, batch_size=BATCH_SIZE).sort("_id", 1)
    sections: list[tuple[str, Any, Any]] = [
        ("sessions", sessions, lambda d: _pick(d, _SESSION_FIELDS)),
        ("conversations", conversations, _public),
        ("messages", messages, _public),
    ]
    for name, cursor, shape in sections:
        yield f',"{name}":'.encode()
        try:
            async for piece in _array(cursor, shape):
                yield piece.encode()
        finally:
            await cursor.close()
    yield b"}"
