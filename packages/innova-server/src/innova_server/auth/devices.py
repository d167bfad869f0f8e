"""Device cookies: a browser where an account has logged in before is not locked out by strangers.

OWASP's answer to the lockout denial of service ("Slow down online guessing
attacks with device cookies"): a successful login sets `innova_device`
(random, 256 bits, only its SHA-256 stored, `HttpOnly; Secure;
SameSite=Strict; Path=/auth`, one year). Failed logins for an address from a
client without a valid device cookie *for that account* count against the
per-address and per-IP windows as before; a client presenting one counts
against its own window (`RATE_LIMIT_LOGIN_DEVICE`) instead, so the owner's
browser is never refused because others failed — whatever they do, from
however many addresses. One browser may be trusted for several accounts:
one document per (cookie, account).
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

from bson import ObjectId
from fastapi import Request, Response
from pymongo.errors import DuplicateKeyError

from innova_server.auth.store import utcnow
from innova_server.auth.tokens import hash_token, is_well_formed, new_token
from innova_server.db import Database
from innova_server.settings import Settings

DEVICE_COOKIE = "innova_device"
DEVICE_TTL = timedelta(days=365)


def read_device_cookie(request: Request) -> str | None:
    value = request.cookies.get(DEVICE_COOKIE)
    return value if is_well_formed(value) else None


def set_device_cookie(response: Response, token: str, settings: Settings) -> None:
    response.set_cookie(
        DEVICE_COOKIE,
        token,
        max_age=int(DEVICE_TTL.total_seconds()),
        path="/auth",
        secure=settings.cookie_secure,
        httponly=True,
        samesite="strict",
    )


class DeviceStore:
    def __init__(self, db: Database) -> None:
        self.collection = db.devices

    async def trusted(self, token: str | None, user_id: str) -> bool:
        """True when `token` is a live device cookie of `user_id`'s account."""
        if token is None:
            return False
        doc = await self.collection.find_one(
            {"token_hash": hash_token(token), "user_id": ObjectId(user_id), "expires_at": {"$gt": utcnow()}},
            projection={"_id": 1},
        )
        return doc is not None

    async def remember(self, token: str | None, user_id: str) -> str:
        """Trust this browser for the account (a new token unless it has one); the token to set again."""
        token = token or new_token()
        now = utcnow()
        # DuplicateKeyError: the same browser logging in twice at once; the document exists.
        with contextlib.suppress(DuplicateKeyError):
            await self.collection.update_one(
                {"token_hash": hash_token(token), "user_id": ObjectId(user_id)},
                {"$set": {"expires_at": now + DEVICE_TTL}, "$setOnInsert": {"created_at": now}},
                upsert=True,
            )
        return token


__all__ = ["DEVICE_COOKIE", "DeviceStore", "read_device_cookie", "set_device_cookie"]
