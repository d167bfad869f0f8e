"""Account self-service: name, password change, sessions, deletion and export.

Every sensitive change (a new password, deleting the account) asks for the
current password again, checked like a login (`AuthManager.reauthenticate`):
a session cookie alone, stolen or left open on a shared computer, is not
enough to take the account over or to erase it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

from pymongo.errors import PyMongoError

from innova_server import metrics
from innova_server.auth.erasure import AccountEraser
from innova_server.auth.export import export_chunks
from innova_server.auth.manager import AuthManager, ClientInfo, NewSession
from innova_server.auth.recovery import RecoveryManager
from innova_server.auth.store import SessionRecord, SessionStore, UserRecord, UserStore, utcnow
from innova_server.auth.tokens import hash_token, is_well_formed
from innova_server.background import BackgroundTasks
from innova_server.db import Database
from innova_server.errors import AppError, ErrorCode
from innova_server.mails import account_deleted_mail, password_changed_mail
from innova_server.ratelimit import RateLimiter, limit_key
from innova_server.settings import Settings

log = logging.getLogger("innova.auth.account")

# `GET /auth/sessions` lists at most this many (the newest): each login opens a
# session, and a listing must stay small whatever a script did.
MAX_LISTED_SESSIONS = 100

# Delays between background attempts to finish an interrupted deletion; after
# the last one the next start of the server (or the operator CLI) finishes it.
ERASE_RETRY_DELAYS = (1.0, 2.0, 5.0, 15.0, 30.0, 60.0, 120.0)

# Work that was in flight for the user when the account was erased (a chat
# reply ending: it counts its usage as it stops) may write one last document.
# The erasure runs once more this long after, when no such work can be left:
# a reply notices its message is gone at its next checkpoint, and a reply's
# lease is 30 s.
LATE_SWEEP_SECONDS = 40.0


@dataclasses.dataclass(frozen=True)
class RevokedSession:
    was_current: bool


class AccountManager:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        users: UserStore,
        sessions: SessionStore,
        auth: AuthManager,
        recovery: RecoveryManager,
        eraser: AccountEraser,
        limiter: RateLimiter,
        tasks: BackgroundTasks,
    ) -> None:
        self.settings = settings
        self.db = db
        self.users = users
        self.sessions = sessions
        self.auth = auth
        self.recovery = recovery
        self.eraser = eraser
        self.limiter = limiter
        self.tasks = tasks
        # Not in `tasks`: shutdown must not wait for a sweep that sleeps for
        # LATE_SWEEP_SECONDS; `aclose` cancels them.
        self._sweeps: set[asyncio.Task[None]] = set()

    # -- profile ---------------------------------------------------------

    async def rename(self, user: UserRecord, name: str | None) -> UserRecord:
        updated = await self.users.set_name(user.id, name or None)
        if updated is None:  # deleted since the session was checked
            raise AppError(ErrorCode.NOT_AUTHENTICATED)
        return updated

    # -- password --------------------------------------------------------

    async def change_password(
        self, user: UserRecord, current_password: str, new_password: str, client: ClientInfo
    ) -> NewSession:
        """New hash and auth epoch; every other session ends; the caller gets a new session.

        The store only writes the new hash if the one just verified is still
        stored, so a change racing another change or a reset never resurrects
        an old password: the loser gets `wrong_password`. A login racing this
        change with the old password is refused by its own epoch check.
        """
        await self.auth.reauthenticate(user, current_password, client)
        new_hash = await self.auth.passwords.hash(new_password)
        epoch = await self.users.change_password(user.id, user.password_hash, new_hash)
        if epoch is None:
            raise AppError(ErrorCode.WRONG_PASSWORD)
        session = await self.auth.open_session(
            dataclasses.replace(user, password_hash=new_hash, auth_epoch=epoch), client
        )
        # Every session of an older epoch, the caller's old one included.
        revoked = await self.sessions.delete_all(user.id, except_epoch=epoch)
        await self.recovery.void_links(user.id)
        metrics.ACCOUNT_EVENTS.labels("password_changed").inc()
        log.info("password changed user_id=%s sessions_revoked=%d", user.id, revoked)
        notice = password_changed_mail(
            self.settings, to=user.email, name=user.mail_name, now=utcnow(), kept_current=True
        )
        self.tasks.spawn("password_changed_mail", self.recovery.deliver("password_changed", notice, user_id=user.id))
        return session

    # -- sessions --------------------------------------------------------

    async def list_sessions(self, user: UserRecord) -> list[SessionRecord]:
        return await self.sessions.live_for(user.id, user.auth_epoch, limit=MAX_LISTED_SESSIONS)

    async def revoke_session(self, user: UserRecord, session_id: str, current_token: str | None) -> RevokedSession:
        token_hash = await self.sessions.delete_one_of(user.id, session_id)
        if token_hash is None:  # unknown, or another user's: the same 404
            raise AppError(ErrorCode.SESSION_NOT_FOUND)
        current = is_well_formed(current_token) and hash_token(current_token or "") == token_hash
        metrics.ACCOUNT_EVENTS.labels("sessions_revoked").inc()
        log.info("session revoked user_id=%s current=%s", user.id, current)
        return RevokedSession(was_current=current)

    async def revoke_all(self, user: UserRecord) -> None:
        revoked = await self.sessions.delete_all(user.id)
        metrics.ACCOUNT_EVENTS.labels("sessions_revoked").inc()
        log.info("all sessions revoked user_id=%s count=%d", user.id, revoked)

    # -- deletion --------------------------------------------------------

    async def delete(self, user: UserRecord, password: str, client: ClientInfo) -> None:
        """`DELETE /auth/me`: confirm the password, then erase (see `auth.erasure` for the order).

        Once the account is marked it is gone for its owner, so a failure in a
        later step is not the client's to retry (their session is dead): the
        erasure is finished in the background, and the request succeeds.
        """
        await self.auth.reauthenticate(user, password, client)
        marked = await self.eraser.mark(user.id)
        if marked is None:  # erased meanwhile by a concurrent request
            return
        if marked.first:
            metrics.ACCOUNT_EVENTS.labels("deletion_started").inc()
            notice = account_deleted_mail(self.settings, to=user.email, name=user.mail_name, now=utcnow())
            self.tasks.spawn("account_deleted_mail", self.recovery.deliver("account_deleted", notice, user_id=user.id))
        try:
            await self.delete_account(user.id)
        except PyMongoError as exc:
            metrics.ACCOUNT_EVENTS.labels("erasure_interrupted").inc()
            log.warning("account deletion interrupted user_id=%s (%s); finishing in the background",
                        user.id, type(exc).__name__)
            self.tasks.spawn("account_erasure", self._finish_later(user.id))
        else:
            self._schedule_sweep(user.id)

    async def delete_account(self, user_id: str) -> bool:
        """Erase a marked account's data and then the account; idempotent. False if it is not marked."""
        return await self.eraser.finish(user_id)

    async def _finish_later(self, user_id: str) -> None:
        for delay in ERASE_RETRY_DELAYS:
            await asyncio.sleep(delay)
            try:
                await self.eraser.finish(user_id)
                self._schedule_sweep(user_id)
                return
            except PyMongoError as exc:
                log.warning("account deletion retry failed user_id=%s (%s)", user_id, type(exc).__name__)
        log.error("account deletion still unfinished user_id=%s; the next start finishes it", user_id)

    def _schedule_sweep(self, user_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._sweep_later(user_id), name="innova:account_late_sweep")
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)

    async def _sweep_later(self, user_id: str) -> None:
        await asyncio.sleep(LATE_SWEEP_SECONDS)
        try:
            await self.eraser.finish(user_id)
        except PyMongoError as exc:
            log.warning("late sweep of an erased account failed user_id=%s (%s)", user_id, type(exc).__name__)

    async def aclose(self) -> None:
        """Cancel the late sweeps still sleeping (at shutdown)."""
        for task in self._sweeps:
            task.cancel()
        await asyncio.gather(*self._sweeps, return_exceptions=True)

    async def finish_pending(self) -> int:
        """Deletions an earlier process left unfinished; run at startup."""
        return await self.eraser.finish_pending()

    # -- export ----------------------------------------------------------

    async def export(self, user: UserRecord) -> AsyncIterator[bytes]:
        """Count the export against its limit, then return the body's chunks (read lazily)."""
        await self.limiter.consume(
            "export_user", limit_key("export:user", user.id), self.settings.rate_limit_export_user
        )
        metrics.ACCOUNT_EVENTS.labels("export").inc()
        log.info("data export user_id=%s", user.id)
        return export_chunks(self.db, user)
