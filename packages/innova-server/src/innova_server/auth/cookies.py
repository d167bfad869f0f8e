"""The session cookie: set, read and cleared with one set of attributes."""

from __future__ import annotations

from fastapi import Request, Response

from innova_server.settings import Settings

COOKIE_NAME = "innova_session"
_MAX_COOKIE_CHARS = 256


def read_session_cookie(request: Request) -> str | None:
    value = request.cookies.get(COOKIE_NAME)
    if value is None or len(value) > _MAX_COOKIE_CHARS:
        return None
    return value


def set_session_cookie(response: Response, token: str, settings: Settings) -> None:
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=settings.session_ttl_days * 86400,
        path="/",
        secure=settings.cookie_secure,
        httponly=True,
        samesite="lax",
    )


def clear_session_cookie(response: Response, settings: Settings) -> None:
    # Same attributes as when set, or browsers keep the original cookie.
    response.set_cookie(
        COOKIE_NAME, "", max_age=0, path="/", secure=settings.cookie_secure, httponly=True, samesite="lax"
    )
