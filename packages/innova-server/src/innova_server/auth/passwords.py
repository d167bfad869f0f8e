"""argon2id hashing, always off the event loop, on its own bounded set of threads.

A hash takes tens of milliseconds of CPU and 64 MiB of memory on purpose;
run on the loop it would stall every other request, so both directions go
through a worker thread (argon2-cffi releases the GIL while it works).

Those threads are bounded by a `CapacityLimiter` of their own, sized to the
CPU count by default: more concurrent hashes than cores only add memory
(64 MiB each) and latency, and a login burst must not occupy anyio's shared
default pool (40 threads), which other blocking work still needs.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import anyio
import anyio.to_thread
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from innova_server import metrics

MAX_PASSWORD_CHARS = 128


@dataclass(frozen=True)
class Verification:
    ok: bool
    needs_rehash: bool = False


class Passwords:
    def __init__(
        self, *, time_cost: int, memory_cost: int, parallelism: int, max_concurrency: int | None = None
    ) -> None:
        # Per process: each gunicorn worker bounds itself to the host's CPU count.
        self.max_concurrency = max_concurrency or os.cpu_count() or 1
        self.limiter = anyio.CapacityLimiter(self.max_concurrency)
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism, type=Type.ID
        )
        # Verified instead of a real hash when the email is unknown, so that
        # both failures cost the same time.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    async def hash(self, password: str) -> str:
        metrics.ARGON2_OPERATIONS.labels("hash").inc()
        return await anyio.to_thread.run_sync(self._hasher.hash, password, limiter=self.limiter)

    async def verify(self, password_hash: str | None, password: str) -> Verification:
        """Check a password; with `password_hash=None` burn the same time and fail."""
        if len(password) > MAX_PASSWORD_CHARS:  # never spend argon2 on oversized input
            return Verification(False)
        target = password_hash or self._dummy_hash
        metrics.ARGON2_OPERATIONS.labels("verify").inc()
        ok = await anyio.to_thread.run_sync(self._check, target, password, limiter=self.limiter)
        if not ok or password_hash is None:
            return Verification(False)
        return Verification(True, self._hasher.check_needs_rehash(password_hash))

    def _check(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
