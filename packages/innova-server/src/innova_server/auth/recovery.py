"""Password recovery: `forgot` issues a single-use link by mail, `reset` consumes it.

`forgot` answers the same way, in about the same time, whether or not the
address has an account: after the rate limits it only schedules the work
(user lookup, token, mail) as a background task. The token is 256 random
bits (`secrets.token_urlsafe(32)`); only its SHA-256 is stored, with
`user_id`, `email`, `created_at`, `expires_at` and `used: false`.

`reset` first looks the token up (a cheap read, so a wrong token never
costs an argon2 hash), then hashes the new password, and only then consumes
the token with one `find_one_and_update` on
`{token_hash, email, used: false, expires_at > now}`, so of two concurrent
submissions exactly one wins, and a failure while hashing leaves the link
usable. Then the new hash is stored with a new auth epoch, every session of
the user opened before it is deleted, every other pending link of the user
is voided, and a "your password was changed" mail goes out. It never logs in.

Mail failures are logged (kind and user id, never the address, link, token,
password or body) and counted (`innova_mail_failures_total{kind}`); the
client never sees them. So is a delivery cancelled at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from datetime import timedelta
from email.message import EmailMessage
from typing import NoReturn

from bson import ObjectId

from innova_server import metrics
from innova_server.auth.manager import ClientInfo
from innova_server.auth.passwords import Passwords
from innova_server.auth.store import SessionStore, UserStore, utcnow
from innova_server.auth.tokens import hash_token, is_well_formed, new_token
from innova_server.background import BackgroundTasks
from innova_server.db import Database, write_then_confirm
from innova_server.errors import AppError, ErrorCode
from innova_server.mail import Mailer, MailerError
from innova_server.mails import password_changed_mail, reset_mail
from innova_server.ratelimit import RateLimiter, limit_key
from innova_server.settings import Settings

log = logging.getLogger("innova.auth.recovery")

# The core's bound on one delivery, whatever the mailer does inside: only a
# guard against a mailer that never answers. A mailer with a send timeout of
# its own may say so with a `send_timeout_seconds` attribute; the deadline is
# then at least that plus a margin, so the core never cuts a send the mailer
# is still allowed to finish.
MAIL_DEADLINE_SECONDS = 60.0
_MAILER_MARGIN_SECONDS = 5.0

FORGOT_ACCEPTED = (
    "Si un compte existe pour cette adresse, un e-mail contenant un lien de réinitialisation vient d'être envoyé."
)
RESET_DONE = "Mot de passe modifié. Connectez-vous avec le nouveau mot de passe."


class RecoveryManager:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        users: UserStore,
        sessions: SessionStore,
        passwords: Passwords,
        limiter: RateLimiter,
        mailer: Mailer,
        tasks: BackgroundTasks,
    ) -> None:
        self.settings = settings
        self.tokens = db.password_reset_tokens
        self.users = users
        self.sessions = sessions
        self.passwords = passwords
        self.limiter = limiter
        self.mailer = mailer
        self.tasks = tasks

    @property
    def token_ttl(self) -> timedelta:
        return timedelta(minutes=self.settings.reset_token_ttl_minutes)

    @property
    def mail_deadline(self) -> float:
        """The core's own bound on one delivery (see MAIL_DEADLINE_SECONDS)."""
        candidates = [MAIL_DEADLINE_SECONDS, self.settings.smtp_timeout_seconds * 4]
        own = getattr(self.mailer, "send_timeout_seconds", None)
        if isinstance(own, int | float) and not isinstance(own, bool) and own > 0:
            candidates.append(float(own) + _MAILER_MARGIN_SECONDS)
        return max(candidates)

    # -- forgot ----------------------------------------------------------

    async def forgot(self, email: str, client: ClientInfo) -> None:
        """Count the request against both limits, then do the rest in the background."""
        await self.limiter.consume(
            "forgot_ip", limit_key("forgot:ip", client.limit_ip), self.settings.rate_limit_forgot_ip
        )
        await self.limiter.consume(
            "forgot_email", limit_key("forgot:email", email), self.settings.rate_limit_forgot_email
        )
        self.tasks.spawn("password_reset_mail", self.issue(email))

    async def issue(self, email: str) -> None:
        """Create a token for `email`'s account, if there is one, and mail the link."""
        user = await self.users.by_email(email)
        if user is None:
            log.info("password reset requested for an address without an account")
            return
        if user.disabled_at is not None:
            log.info("password reset requested for a disabled account user_id=%s: nothing sent", user.id)
            return
        token = new_token()
        now = utcnow()
        await self.tokens.insert_one(
            {
                "token_hash": hash_token(token),
                "user_id": ObjectId(user.id),
                "email": user.email,
                "created_at": now,
                "expires_at": now + self.token_ttl,
                "used": False,
            }
        )
        log.info("password reset token issued user_id=%s", user.id)
        message = reset_mail(self.settings, to=user.email, token=token, name=user.mail_name, now=now)
        await self.deliver("password_reset", message, user_id=user.id)

    # -- reset -----------------------------------------------------------

    async def reset(self, token: str, email: str, password: str) -> None:
        if not is_well_formed(token):  # garbage of any length never reaches the database
            self._invalid()
        token_hash = hash_token(token)
        valid = {"token_hash": token_hash, "email": email, "used": False}
        # A cheap read first: a wrong, used or expired token never costs argon2.
        pending = await self.tokens.find_one({**valid, "expires_at": {"$gt": utcnow()}}, {"user_id": True})
        if pending is None:
            self._invalid()
        user_id = str(pending["user_id"])
        user = await self.users.by_id(user_id)
        if user is None or user.disabled_at is not None:  # deleted or disabled since the link was sent
            self._invalid()
        # Hash before consuming: if this fails, the link still works.
        password_hash = await self.passwords.hash(password)
        now = utcnow()
        claim = secrets.token_hex(16)
        doc = await write_then_confirm(
            self.tokens,
            {**valid, "expires_at": {"$gt": now}},
            {"$set": {"used": True, "used_at": now, "claim": claim}},
            confirm={"token_hash": token_hash, "claim": claim},  # only our own claim can match
            projection={"user_id": True},
        )
        if doc is None:  # another submission of this link won
            self._invalid()
        epoch = await self.users.replace_password(user_id, password_hash)
        if epoch is None:  # account deleted meanwhile
            self._invalid()
        # Sessions of the new epoch (a login with the new password, just now) stay.
        revoked = await self.sessions.delete_all(user_id, except_epoch=epoch)
        # Any other link mailed earlier dies with this one.
        await self.void_links(user_id)
        metrics.PASSWORD_RESETS.labels("ok").inc()
        log.info("password reset done user_id=%s sessions_revoked=%d", user_id, revoked)
        notice = password_changed_mail(self.settings, to=user.email, name=user.mail_name, now=now)
        self.tasks.spawn("password_changed_mail", self.deliver("password_changed", notice, user_id=user_id))

    async def void_links(self, user_id: str) -> None:
        """Every pending reset link of the user dies: the password they were meant to replace is gone."""
        await self.tokens.update_many(
            {"user_id": ObjectId(user_id), "used": False}, {"$set": {"used": True, "used_at": utcnow()}}
        )

    @staticmethod
    def _invalid() -> NoReturn:
        metrics.PASSWORD_RESETS.labels("invalid_token").inc()
        raise AppError(ErrorCode.INVALID_TOKEN)

    # -- delivery --------------------------------------------------------

    async def deliver(self, kind: str, message: EmailMessage, *, user_id: str) -> bool:
        """Hand `message` to the mailer; log and count a failure instead of raising."""
        try:
            async with asyncio.timeout(self.mail_deadline):
                await self.mailer.send(message)
        except MailerError as exc:
            metrics.MAIL_FAILURES.labels(kind).inc()
            # MailerError texts are written to be logged (no credentials, no body).
            log.error("mail %s for user_id=%s not delivered: %s", kind, user_id, exc)
            return False
        except asyncio.CancelledError:
            # Shutdown cancelled the delivery: the mail is lost all the same.
            metrics.MAIL_FAILURES.labels(kind).inc()
            log.error("mail %s for user_id=%s not delivered: cancelled at shutdown", kind, user_id)
            raise
        except TimeoutError:
            metrics.MAIL_FAILURES.labels(kind).inc()
            log.error(
                "mail %s for user_id=%s not delivered: mailer gave no answer in %.0fs",
                kind,
                user_id,
                self.mail_deadline,
            )
            return False
        except Exception as exc:
            metrics.MAIL_FAILURES.labels(kind).inc()
            # A mailer bug: its text may quote the message, so only the type.
            log.error(
                "mail %s for user_id=%s not delivered: unexpected %s from the mailer", kind, user_id, type(exc).__name__
            )
            return False
        metrics.MAIL_SENT.labels(kind).inc()
        log.info("mail %s for user_id=%s handed to the mailer", kind, user_id)
        return True
