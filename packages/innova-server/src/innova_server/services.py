"""The per-process service graph, built once in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from innova_server.auth.account import AccountManager
from innova_server.auth.devices import DeviceStore
from innova_server.auth.erasure import AccountEraser
from innova_server.auth.manager import AuthManager
from innova_server.auth.passwords import Passwords
from innova_server.auth.recovery import RecoveryManager
from innova_server.auth.store import SessionStore, UserStore, VerifyTokenStore
from innova_server.auth.verification import VerificationManager
from innova_server.background import BackgroundTasks
from innova_server.chat import ChatProvider
from innova_server.chatlaya.messages import MessageStore
from innova_server.chatlaya.openings import Openings
from innova_server.chatlaya.replies import Replies
from innova_server.chatlaya.service import ChatService
from innova_server.chatlaya.store import ConversationStore, StreamSlots
from innova_server.chatlaya.turns import TurnRegistry, TurnTimings
from innova_server.chatlaya.usage import UsageStore
from innova_server.db import Database
from innova_server.health import HealthMonitor
from innova_server.mail import Mailer
from innova_server.plugins import PluginRegistry, ProviderEntry
from innova_server.ratelimit import RateLimiter
from innova_server.settings import Settings


@dataclass
class Services:
    settings: Settings
    db: Database
    limiter: RateLimiter
    auth: AuthManager
    plugins: PluginRegistry
    provider_entry: ProviderEntry
    model: str
    provider: ChatProvider
    mailer: Mailer
    recovery: RecoveryManager
    tasks: BackgroundTasks
    turns: TurnRegistry
    chat: ChatService
    account: AccountManager
    verification: VerificationManager
    replies: Replies
    openings: Openings
    health: HealthMonitor

    async def aclose(self) -> None:
        try:
            await self.health.aclose()
            await self.account.aclose()  # late sweeps of erased accounts (see auth.account)
            await self.tasks.drain()  # mails being sent get a grace period
            await self.turns.aclose()  # replies still running are stored (interrupted), their slots freed
            await self.provider.aclose()
        finally:
            await self.db.close()


def build_services(settings: Settings, plugins: PluginRegistry, mongo_uri: str) -> Services:
    """Wire everything; raises `ConfigError` when a selected plugin cannot be built."""
    provider_entry, model, provider = plugins.build_provider(settings)
    mailer = plugins.build_mailer(settings)
    db = Database(mongo_uri, settings.db_name, timeout_ms=settings.mongo_timeout_ms)
    limiter = RateLimiter(db)
    passwords = Passwords(
        time_cost=settings.argon2_time_cost,
        memory_cost=settings.argon2_memory_cost,
        parallelism=settings.argon2_parallelism,
    )
    users, sessions = UserStore(db), SessionStore(db)
    eraser = AccountEraser(db)
    auth = AuthManager(settings, users, sessions, passwords, limiter, eraser, DeviceStore(db))
    tasks = BackgroundTasks()
    recovery = RecoveryManager(settings, db, users, sessions, passwords, limiter, mailer, tasks)
    account = AccountManager(settings, db, users, sessions, auth, recovery, eraser, limiter, tasks)
    verification = VerificationManager(settings, users, VerifyTokenStore(db), limiter, recovery, tasks)
    conversations, messages, usage = ConversationStore(db), MessageStore(db), UsageStore(db)
    slots = StreamSlots(db, lease=settings.chat_lease)
    turns = TurnRegistry(messages, slots, TurnTimings.from_settings(settings))
    chat = ChatService(
        settings, conversations, messages, limiter, usage, on_conversation_deleted=turns.stop_conversation
    )
    openings = Openings(settings.chat_openings_per_worker)
    replies = Replies(
        settings,
        conversations,
        messages,
        slots,
        turns,
        usage,
        tasks,
        openings,
        provider_name=provider_entry.name,
        model=model,
        provider=provider,
    )
    return Services(
        settings,
        db,
        limiter,
        auth,
        plugins,
        provider_entry,
        model,
        provider,
        mailer,
        recovery=recovery,
        tasks=tasks,
        turns=turns,
        chat=chat,
        account=account,
        verification=verification,
        replies=replies,
        openings=openings,
        health=HealthMonitor(db),
    )
