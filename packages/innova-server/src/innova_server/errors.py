"""Error codes and their HTTP mapping, in one place.

Services raise `AppError(ErrorCode.X)`; the handlers installed by
`install_error_handlers` turn it (and Starlette's own 404/405/413) into the
contract's body `{"detail": {"code": …, "message": …}}`. Validation errors
(422) keep FastAPI's standard shape, as the contract says, minus the fields
that echo the request (`input`, `ctx`): a password must never come back in a
response. A body FastAPI cannot parse at all (JSON nested too deeply, an
integer past Python's 4300-digit limit) is a 422 `json_invalid` like any other
malformed JSON, not FastAPI's bare 400.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pymongo.errors import ConnectionFailure, PyMongoError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("innova.errors")


class ErrorCode(StrEnum):
    EMAIL_TAKEN = "email_taken"
    INVALID_CREDENTIALS = "invalid_credentials"
    ACCOUNT_DISABLED = "account_disabled"
    NOT_AUTHENTICATED = "not_authenticated"
    INVALID_TOKEN = "invalid_token"  # noqa: S105 - an error code, not a secret
    CSRF_ORIGIN = "csrf_origin"
    RATE_LIMITED = "rate_limited"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    FORBIDDEN = "forbidden"
    CONVERSATION_NOT_FOUND = "conversation_not_found"
    MESSAGE_NOT_FOUND = "message_not_found"
    TOO_MANY_STREAMS = "too_many_streams"
    QUOTA_EXCEEDED = "quota_exceeded"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    PROVIDER_BUSY = "provider_busy"
    PROVIDER_AUTH = "provider_auth"
    PROVIDER_RATE_LIMITED = "provider_rate_limited"
    PROVIDER_TIMEOUT = "provider_timeout"
    CONTEXT_TOO_LONG = "context_too_long"
    DATABASE_UNAVAILABLE = "database_unavailable"
    INTERNAL = "internal_error"
    WRONG_PASSWORD = "wrong_password"  # noqa: S105 - an error code, not a secret
    SESSION_NOT_FOUND = "session_not_found"
    EMAIL_NOT_VERIFIED = "email_not_verified"


# code -> (HTTP status, default message). French would suit the users, but
# these messages are for developers of the front end; it shows its own texts.
HTTP_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.EMAIL_TAKEN: (409, "An account already exists for this email."),
    ErrorCode.INVALID_CREDENTIALS: (401, "Invalid email or password."),
    ErrorCode.ACCOUNT_DISABLED: (403, "This account is disabled; contact the support."),
    ErrorCode.NOT_AUTHENTICATED: (401, "Not authenticated."),
    ErrorCode.INVALID_TOKEN: (400, "This link is invalid, already used or expired."),
    ErrorCode.CSRF_ORIGIN: (403, "Cross-site request refused: origin not allowed."),
    ErrorCode.RATE_LIMITED: (429, "Too many requests; retry later."),
    ErrorCode.PAYLOAD_TOO_LARGE: (413, "Request body too large."),
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: (415, "Bodies must be JSON (Content-Type: application/json)."),
    ErrorCode.NOT_FOUND: (404, "Not found."),
    ErrorCode.METHOD_NOT_ALLOWED: (405, "Method not allowed."),
    ErrorCode.FORBIDDEN: (403, "Forbidden."),
    ErrorCode.CONVERSATION_NOT_FOUND: (404, "Conversation not found."),
    ErrorCode.MESSAGE_NOT_FOUND: (404, "Message not found."),
    ErrorCode.TOO_MANY_STREAMS: (429, "Too many replies in progress; wait for one to finish."),
    ErrorCode.QUOTA_EXCEEDED: (429, "Daily quota reached; it resets at midnight UTC."),
    ErrorCode.PROVIDER_UNAVAILABLE: (503, "The chat model is unavailable; retry later."),
    ErrorCode.PROVIDER_BUSY: (503, "The chat model is busy; retry later."),
    ErrorCode.PROVIDER_AUTH: (502, "The chat model provider refused our credentials."),
    ErrorCode.PROVIDER_RATE_LIMITED: (503, "The chat model provider is rate limiting us; retry later."),
    ErrorCode.PROVIDER_TIMEOUT: (504, "The chat model did not answer in time."),
    ErrorCode.CONTEXT_TOO_LONG: (413, "The conversation is too long for the model."),
    ErrorCode.DATABASE_UNAVAILABLE: (503, "The database is unavailable; retry later."),
    ErrorCode.INTERNAL: (500, "Internal error."),
    ErrorCode.WRONG_PASSWORD: (403, "The current password is wrong."),
    ErrorCode.SESSION_NOT_FOUND: (404, "Session not found."),
    ErrorCode.EMAIL_NOT_VERIFIED: (403, "Confirm your email address first (see the mail we sent)."),
}


class AppError(Exception):
    """A failure with a contract error code; `headers` carries e.g. `Retry-After`."""

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.code = code
        self.status, default = HTTP_STATUS[code]
        self.message = message or default
        self.headers = headers or {}
        super().__init__(f"{code}: {self.message}")


def error_body(code: ErrorCode, message: str | None = None) -> dict[str, dict[str, str]]:
    return {"detail": {"code": code.value, "message": message or HTTP_STATUS[code][1]}}


def error_response(error: AppError) -> JSONResponse:
    return JSONResponse(error_body(error.code, error.message), status_code=error.status, headers=error.headers)


def is_unavailable(error: PyMongoError) -> bool:
    """True when `error` means "MongoDB is unreachable or too slow", not a bug or a bad query.

    `ConnectionFailure` covers refused connections, network and server
    selection timeouts; `error.timeout` the operation timeout (`timeoutMS`)
    however PyMongo reports it (`ExecutionTimeout`, `WTimeoutError`, …).
    """
    return isinstance(error, ConnectionFailure) or error.timeout


_STARLETTE_CODES = {
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}


# What FastAPI raises (HTTPException 400) when parsing the body itself fails.
_UNPARSABLE_BODY = {
    "loc": ["body"],
    "msg": "JSON body could not be parsed (nested too deeply, or a number too long)",
    "type": "json_invalid",
}
_LOC_PART_MAX = 100


def validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """FastAPI's error list with only `loc`, `msg` and `type`: nothing the client sent comes back.

    `loc` parts are field names, or keys the client chose: cut to 100 characters.
    """
    return [
        {
            "loc": [part[:_LOC_PART_MAX] if isinstance(part, str) else part for part in error.get("loc", ())],
            "msg": str(error.get("msg", "")),
            "type": str(error.get("type", "")),
        }
        for error in errors
    ]


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": validation_errors(exc.errors())}, status_code=422)

    async def on_app_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AppError)
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            return JSONResponse({"detail": [_UNPARSABLE_BODY]}, status_code=422)
        code = _STARLETTE_CODES.get(exc.status_code)
        if code is None:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return error_response(AppError(code, headers=dict(exc.headers or {})))

    async def on_database_error(request: Request, exc: Exception) -> JSONResponse:
        # A MongoDB outage or stall (connection refused, server selection or
        # operation timeout) is not the client's fault and not a bug: 503, so
        # clients and nginx retry, and the service recovers when it returns.
        assert isinstance(exc, PyMongoError)
        if not is_unavailable(exc):
            log.error("database error on %s %s", request.method, request.url.path, exc_info=exc)
            return JSONResponse(error_body(ErrorCode.INTERNAL), status_code=500)
        log.warning("database unavailable during %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return error_response(AppError(ErrorCode.DATABASE_UNAVAILABLE, headers={"Retry-After": "5"}))

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(AppError, on_app_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(PyMongoError, on_database_error)

