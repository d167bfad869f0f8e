"""Account and session logic; the routers only translate HTTP to these calls."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from innova_server import metrics
from innova_server.auth.devices import DeviceStore
from innova_server.auth.erasure import AccountEraser
from innova_server.auth.passwords import Passwords
from innova_server.auth.store import EmailTaken, SessionStore, UserRecord, UserStore
from innova_server.auth.tokens import hash_token, is_well_formed, new_token
from innova_server.errors import AppError, ErrorCode
from innova_server.ratelimit import Hit, RateLimiter, limit_key
from innova_server.settings import Settings

log = logging.getLogger("innova.auth")


@dataclass(frozen=True)
class ClientInfo:
    ip: str
    user_agent: str | None
    # What per-IP rate limits count: the address, or its network for IPv6 (see `netutil.rate_limit_subject`).
    network: str | None = None

    @property
    def limit_ip(self) -> str:
        return self.network or self.ip


@dataclass(frozen=True)
class NewSession:
    user: UserRecord
    token: str
    # Set on a login: the device cookie to (re)send (`auth.devices`).
    device_token: str | None = None


class AuthManager:
    def __init__(
        self,
        settings: Settings,
        users: UserStore,
        sessions: SessionStore,
        passwords: Passwords,
        limiter: RateLimiter,
        eraser: AccountEraser,
        devices: DeviceStore,
    ) -> None:
        self.settings = settings
        self.users = users
        self.sessions = sessions
        self.passwords = passwords
        self.limiter = limiter
        self.eraser = eraser
        self.devices = devices

    @property
    def session_ttl(self) -> timedelta:
        return timedelta(days=self.settings.session_ttl_days)

    async def open_session(self, user: UserRecord, client: ClientInfo) -> NewSession:
        token = new_token()
        await self.sessions.create(
            hash_token(token),
            user.id,
            auth_epoch=user.auth_epoch,
            ttl=self.session_ttl,
            ip=client.ip,
            user_agent=client.user_agent,
        )
        return NewSession(user, token)

    async def register(self, email: str, password: str, name: str | None, client: ClientInfo) -> NewSession:
        await self.limiter.consume(
            "register_ip", limit_key("register:ip", client.limit_ip), self.settings.rate_limit_register_ip
        )
        # Hash before touching the database: the unique index, not a lookup,
        # decides between two concurrent registrations of one address.
        password_hash = await self.passwords.hash(password)
        try:
            user = await self.users.create(email, name, password_hash)
        except EmailTaken:
            # The address may still be held by an account whose deletion was
            # interrupted: finish that deletion, then the address is free.
            pending = await self.users.being_deleted(email)
            if pending is None or not await self.eraser.finish(pending):
                raise AppError(ErrorCode.EMAIL_TAKEN) from None
            try:
                user = await self.users.create(email, name, password_hash)
            except EmailTaken:
                raise AppError(ErrorCode.EMAIL_TAKEN) from None
        log.info("account created user_id=%s", user.id)
        return await self.open_session(user, client)

    async def login(
        self,
        email: str,
        password: str,
        client: ClientInfo,
        current_token: str | None,
        device_token: str | None = None,
    ) -> NewSession:
        """Check the password and open a session; failures are limited per address and per IP, or —
        for a browser holding a device cookie of that account — per device (`auth.devices`)."""
        user = await self.users.by_email(email)
        trusted = user is not None and await self.devices.trusted(device_token, user.id)
        # Reserve one failure in each window first; a success gives it back.
        if trusted:
            assert device_token is not None
            windows = [
                await self.limiter.consume(
                    "login_device", limit_key("login:device", device_token), self.settings.rate_limit_login_device
                )
            ]
        else:
            windows = await self._reserve_login_failure(email, client)
        checked = await self.passwords.verify(user.password_hash if user else None, password)
        if user is None or not checked.ok:
            metrics.LOGIN_FAILURES.inc()
            raise AppError(ErrorCode.INVALID_CREDENTIALS)
        await self.limiter.refund(*windows)
        if user.disabled_at is not None:
            # Only with the right password: a wrong one stays `invalid_credentials`, so
            # whether an account is disabled is never revealed to someone without it.
            raise AppError(ErrorCode.ACCOUNT_DISABLED)
        if checked.needs_rehash:
            new_hash = await self.passwords.hash(password)
            if await self.users.upgrade_password_hash(user.id, user.password_hash, new_hash):
                log.info("password hash upgraded user_id=%s", user.id)
        if is_well_formed(current_token):
            assert current_token is not None
            await self.sessions.delete(hash_token(current_token))  # rotation
        session = await self.open_session(user, client)
        # argon2 took a while: a reset may have changed the password (and
        # deleted every session) since `user` was read. Checked after the
        # insert, so either the reset's delete sees this session or this read
        # sees the reset. /auth/me also refuses a session of an older epoch.
        if await self.users.auth_epoch(user.id) != user.auth_epoch:
            await self.sessions.delete(hash_token(session.token))
            metrics.LOGIN_FAILURES.inc()
            log.info("login raced a password reset user_id=%s; session withdrawn", user.id)
            raise AppError(ErrorCode.INVALID_CREDENTIALS)
        device = await self.devices.remember(device_token if trusted else None, user.id)
        return NewSession(session.user, session.token, device)

    async def _reserve_login_failure(self, email: str, client: ClientInfo) -> list[Hit]:
        """One failure reserved in the per-address and per-IP windows (a success gives them back)."""
        by_email = await self.limiter.consume(
            "login_email", limit_key("login:email", email), self.settings.rate_limit_login_email
        )
        try:
            by_ip = await self.limiter.consume(
                "login_ip", limit_key("login:ip", client.limit_ip), self.settings.rate_limit_login_ip
            )
        except AppError:
            # Refused by the IP window before any check: the address's window
            # must not pay for it (or one noisy IP could lock a victim out).
            await self.limiter.refund(by_email)
            raise
        return [by_email, by_ip]

    async def reauthenticate(self, user: UserRecord, password: str, client: ClientInfo) -> None:
        """Check the signed-in user's password before a sensitive change (OWASP re-authentication).

        Counted exactly like a login for that account, against the same windows
        (per address and per IP), so a stolen session cannot guess the password
        here faster than at /auth/login. Wrong: 403 `wrong_password`.
        """
        windows = await self._reserve_login_failure(user.email, client)
        checked = await self.passwords.verify(user.password_hash, password)
        if not checked.ok:
            metrics.LOGIN_FAILURES.inc()
            metrics.ACCOUNT_EVENTS.labels("wrong_password").inc()
            log.info("wrong current password user_id=%s", user.id)
            raise AppError(ErrorCode.WRONG_PASSWORD)
        await self.limiter.refund(*windows)

    async def logout(self, token: str | None) -> None:
        if is_well_formed(token):
            assert token is not None
            await self.sessions.delete(hash_token(token))

    async def current_user(self, token: str | None) -> UserRecord:
        if not is_well_formed(token):
            raise AppError(ErrorCode.NOT_AUTHENTICATED)
        assert token is not None
        user = await self.sessions.user_for(hash_token(token))
        if user is None:
            raise AppError(ErrorCode.NOT_AUTHENTICATED)
        return user
