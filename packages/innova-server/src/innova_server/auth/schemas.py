"""Request and response bodies of the auth API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, EmailStr, Field, StringConstraints

from innova_server.auth.passwords import MAX_PASSWORD_CHARS


def _normalise_email(value: object) -> object:
    if not isinstance(value, str):
        return value
    if len(value) > 320:  # refuse before the (costlier) address parser sees it
        raise ValueError("email address is too long")
    return value.strip().lower()


def _ascii_local_part(value: str) -> str:
    # An internationalised domain is fine (mails go to its IDNA form), but a
    # non-ASCII local part needs SMTPUTF8, which many mail providers refuse:
    # such an account could never receive its reset mail, so it is refused here.
    if not value.rsplit("@", 1)[0].isascii():
        raise ValueError("the part before @ must use ASCII characters only")
    return value


# Trimmed and lower-cased before validation, so " Ada@Example.COM " is ada@example.com.
Email = Annotated[EmailStr, BeforeValidator(_normalise_email), AfterValidator(_ascii_local_part)]
Password = Annotated[str, Field(min_length=8, max_length=MAX_PASSWORD_CHARS)]
# Login accepts any stored password; the bound only keeps argon2 off huge input.
LoginPassword = Annotated[str, Field(min_length=1, max_length=MAX_PASSWORD_CHARS)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, max_length=100)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=10_000)


class RegisterIn(Body):
    email: Email
    password: Password
    name: Name | None = None


class LoginIn(Body):
    email: Email
    password: LoginPassword


class ForgotIn(Body):
    email: Email


class ResetIn(Body):
    # No length bound of its own: any string that is not a well-formed token
    # (empty, short, 100 000 characters) is the contract's 400 `invalid_token`;
    # the request body cap bounds it.
    model_config = ConfigDict(str_max_length=None)

    token: str
    email: Email
    password: Password


class NameIn(Body):
    # Required (null clears it): an empty PATCH is a client bug, not a no-op.
    name: Name | None


class PasswordChangeIn(Body):
    current_password: LoginPassword
    new_password: Password


class PasswordConfirmIn(Body):
    password: LoginPassword


class VerifyIn(Body):
    # Like ResetIn: anything that is not a well-formed token is 400 `invalid_token`.
    model_config = ConfigDict(str_max_length=None)

    token: str


class UserOut(BaseModel):
    id: str
    email: str
    name: str | None
    email_verified: bool
    created_at: datetime


class SessionOut(BaseModel):
    id: str
    created_at: datetime
    expires_at: datetime
    ip: str | None
    user_agent: str | None
    current: bool


class SessionsOut(BaseModel):
    items: list[SessionOut]


class UserEnvelope(BaseModel):
    user: UserOut


class DetailOut(BaseModel):
    detail: str
