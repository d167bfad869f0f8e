"""Email verification: a single-use link proves the account's owner reads its address.

Without it anyone could register someone else's address and have our mails
reach that person. A link is mailed at registration and on request
(`POST /auth/verify/request`, rate limited per user: each one is a mail to an
address that may not be the requester's). Its token is 256 random bits; only
the SHA-256 is stored (`verify_tokens`), with an expiry enforced both by the
TTL index and in the query, and it is consumed by one atomic
`find_one_and_update`, so of two concurrent submissions exactly one wins.
A successful verification voids the user's other pending links.

Until verified, mails never show the account's name (`UserRecord.mail_name`),
and with `REQUIRE_VERIFIED_EMAIL=true` Chatlaya refuses the account.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import NoReturn

from innova_server import metrics
from innova_server.auth.recovery import RecoveryManager
from innova_server.auth.store import UserRecord, UserStore, VerifyTokenStore
from innova_server.auth.tokens import hash_token, is_well_formed, new_token
from innova_server.background import BackgroundTasks
from innova_server.errors import AppError, ErrorCode
from innova_server.mails import verify_mail
from innova_server.ratelimit import RateLimiter, limit_key
from innova_server.settings import Settings

log = logging.getLogger("innova.auth.verification")


class VerificationManager:
    def __init__(
        self,
        settings: Settings,
        users: UserStore,
        tokens: VerifyTokenStore,
        limiter: RateLimiter,
        recovery: RecoveryManager,
        tasks: BackgroundTasks,
    ) -> None:
        self.settings = settings
        self.users = users
        self.tokens = tokens
        self.limiter = limiter
        self.recovery = recovery
        self.tasks = tasks

    @property
    def token_ttl(self) -> timedelta:
        return timedelta(hours=self.settings.verify_token_ttl_hours)

    def schedule(self, user: UserRecord) -> None:
        """Mail a new link in the background: the response never waits for SMTP."""
        if not user.email_verified:
            self.tasks.spawn("verify_mail", self.send_link(user))

    async def send_link(self, user: UserRecord) -> None:
        token = new_token()
        now = await self.tokens.create(hash_token(token), user.id, user.email, self.token_ttl)
        log.info("verification token issued user_id=%s", user.id)
        message = verify_mail(self.settings, to=user.email, token=token, now=now)
        await self.recovery.deliver("verify_email", message, user_id=user.id)

    async def request(self, user: UserRecord) -> None:
        """`POST /auth/verify/request`: a new link, unless the address is verified already (then nothing)."""
        await self.limiter.consume(
            "verify_user", limit_key("verify:user", user.id), self.settings.rate_limit_verify_user
        )
        if not user.email_verified:
            metrics.ACCOUNT_EVENTS.labels("verify_mail_requested").inc()
        self.schedule(user)

    async def verify(self, token: str) -> UserRecord:
        if not is_well_formed(token):  # garbage of any length never reaches the database
            self._invalid()
        doc = await self.tokens.consume(hash_token(token))
        if doc is None:  # unknown, used or expired
            self._invalid()
        user_id = str(doc["user_id"])
        # Only while the account still has the address the link went to.
        user = await self.users.mark_verified(user_id, doc["email"])
        if user is None:  # account deleted (or being deleted) since
            self._invalid()
        await self.tokens.void_all(user_id)
        metrics.ACCOUNT_EVENTS.labels("email_verified").inc()
        log.info("email verified user_id=%s", user_id)
        return user

    @staticmethod
    def _invalid() -> NoReturn:
        metrics.ACCOUNT_EVENTS.labels("verify_invalid_token").inc()
        raise AppError(ErrorCode.INVALID_TOKEN)
