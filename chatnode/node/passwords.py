"""Password work: every scrypt hash and check of the node, bounded.

scrypt is made to be expensive: at the default cost (``2**14``, r=8) one call holds 16 MiB
and a core for ~50 ms. Anyone can ask for one (``POST /v1/tokens`` needs no account), so
unbounded it is the cheapest way to take a node down: 48 concurrent token requests run 40
scrypt threads at once (Trio's default thread limit), RSS 48 -> 818 MB, `/healthz` up to
861 ms (docs/security.md; ``tests/security/test_accounts.py``).

Rules of :class:`PasswordWork`:

1. At most ``concurrency`` calls run at once, each in a worker thread (hashlib releases the
   GIL, so the event loop keeps its share of the cores): password memory is bounded by
   ``concurrency`` x 128 x r x N bytes.
2. At most ``max_waiting`` more callers wait for a turn, in arrival order (a
   ``trio.CapacityLimiter`` is fair). A caller beyond that gets ``Unavailable`` at once, with
   a ``retry_after_s`` of the time the queue ahead of it takes to drain: nothing is held for
   it, so the memory of waiting callers is bounded too.
3. A call is not abandoned once its thread started (Trio waits for the thread); a caller
   cancelled while waiting leaves the queue.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

import trio

from chatnode.core import auth
from chatnode.core.errors import Unavailable

T = TypeVar("T")


class PasswordWork:
    """The node's scrypt calls (module rules). ``refused`` counts callers turned away."""

    def __init__(self, *, concurrency: int, max_waiting: int, cost_log2: int) -> None:
        self.concurrency = concurrency
        self.max_waiting = max_waiting
        self.cost_log2 = cost_log2
        self.refused = 0
        self._limiter = trio.CapacityLimiter(concurrency)
        self._pending = 0  # running and waiting
        self._call_s = 0.05  # a running estimate of one call, for Retry-After

    @property
    def pending(self) -> int:
        return self._pending

    async def hash(self, password: str) -> str:
        return await self._run(lambda: auth.hash_password(password, cost_log2=self.cost_log2))

    async def verify(self, password: str, stored: str) -> bool:
        return await self._run(lambda: auth.verify_password(password, stored))

    async def _run(self, work: Callable[[], T]) -> T:
        if self._pending >= self.concurrency + self.max_waiting:
            self.refused += 1
            await trio.lowlevel.checkpoint()
            raise Unavailable(
                "too many sign-ins and sign-ups at once; retry after Retry-After seconds",
                retry_after_s=max(1.0, math.ceil(self._pending * self._call_s / self.concurrency)),
            )

        def timed() -> tuple[T, float]:
            started = time.perf_counter()
            return work(), time.perf_counter() - started

        self._pending += 1
        try:
            result, took_s = await trio.to_thread.run_sync(timed, limiter=self._limiter)
        finally:
            self._pending -= 1
        self._call_s = 0.8 * self._call_s + 0.2 * took_s
        return result
