"""Opaque secret tokens: only their SHA-256 is ever stored."""

from __future__ import annotations

import hashlib
import re
import secrets

# secrets.token_urlsafe(32): 256 random bits, 43 URL-safe characters.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_well_formed(token: str | None) -> bool:
    """Cheap shape check so garbage never reaches the database."""
    return token is not None and _TOKEN_RE.fullmatch(token) is not None
