"""Account state planted straight into the test database, as the server itself would have stored it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from innova_server.auth.tokens import hash_token, new_token


def plant_reset_token(db: Any, email: str, *, ttl: timedelta = timedelta(minutes=30)) -> str:
    """A pending reset link for `email`'s account, as `/auth/forgot` stores it; the token (never stored)."""
    token = new_token()
    user = db.users.find_one({"email": email})
    now = datetime.now(UTC)
    db.password_reset_tokens.insert_one(
        {
            "token_hash": hash_token(token),
            "user_id": user["_id"],
            "email": email,
            "created_at": now,
            "expires_at": now + ttl,
            "used": False,
        }
    )
    return token


__all__ = ["plant_reset_token"]
