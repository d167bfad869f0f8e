"""The session cookie: set, read and cleared with one set of attributes."""

from __future__ import annotations

from fastapi import Request, Response

from innova_server.settings import Settings

COOKIE_NAME = "innova_session"
_MAX_COOKIE_CHARS = 256


def read_session_cookie(request: Request) -> str | None:
    """The session token, or None — also when the request carries the cookie twice.

    A sibling subdomain (or a man in the middle of its plain-http traffic) can
    set an `innova_session` cookie for the parent domain; the browser then
    sends both, ours and theirs, in an order we cannot trust ("cookie
    tossing"). Starlette would keep the last one; we keep neither.
    """
    if _occurrences(request.headers.getlist("cookie")) > 1:
        return None
    value = request.cookies.get(COOKIE_NAME)
    if value is None or len(value) > _MAX_COOKIE_CHARS:
        return None
    return value


def _occurrences(headers: list[str]) -> int:
    if sum(header.count(COOKIE_NAME) for header in headers) < 2:  # the usual request: no parsing
        return 1
    return sum(1 for header in headers for pair in header.split(";") if pair.split("=", 1)[0].strip() == COOKIE_NAME)


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
