"""In-process Presence, Revocations, Tickets, RateLimits and PushGate for the embedded single node
(and any test that needs them).

:class:`MemoryRateLimits` holds the token buckets of the node's rate limits; with one node
there is nobody to share them with.

:class:`MemoryRevocations` holds revocations for the nodes of one process (tests: the
embedded node keeps them in its SQLite file, ``SqliteRevocations``). Token revocations are
kept until the token expires; the changes log keeps the newest ``max_changes`` records.

:class:`MemoryTickets` holds the embedded node's WebSocket tickets: a node alone needs to
share them with nobody. At most ``max_tickets`` live at once (the oldest are dropped first).

:class:`MemoryPresence` keeps, per node, the set of live connections and the node's heartbeat
deadline. It follows the same rules as the Redis implementation:

- An entry is identified by all its fields: adding it twice is adding it once.
- ``online`` counts every entry not yet reaped, expired node or not.
- ``reap`` removes every entry of a node whose heartbeat expired or that never sent one, and
  forgets the expired heartbeat. A later ``heartbeat`` brings the node back with no entries.
- A user is online while any entry of theirs is not removed or reaped; their ``last_seen`` is
  set (wall clock ``clock_ms``, never moving back) when an entry is added, when their last
  entry is removed and when a reap removes it. Kept in memory: an embedded node's restart
  forgets it (the node had all the connections anyway).

Time comes from an injectable ``clock`` (seconds, monotonic), so tests advance time instead of
sleeping. The default is ``trio.current_time``: it follows Trio's clock (``MockClock`` /
``autojump_clock`` included) and is only read inside the async methods, so the object may be
built outside ``trio.run``.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from chatnode.core import ports
from chatnode.core.models import (
    Grant,
    PresenceEntry,
    Reaped,
    Revocation,
    RevocationChanges,
    RevocationKind,
    RevocationState,
    UserPresence,
)


@attrs.define(eq=False)
class MemoryPresence:
    """``ports.Presence`` in process memory; every method is atomic (no await inside)."""

    clock: Callable[[], float] = attrs.field(default=trio.current_time, kw_only=True)
    clock_ms: Callable[[], int] = attrs.field(default=lambda: _wall_ms(), kw_only=True)
    _entries: dict[str, set[PresenceEntry]] = attrs.field(factory=dict, init=False)
    _deadlines: dict[str, float] = attrs.field(factory=dict, init=False)
    _per_user: dict[str, int] = attrs.field(factory=dict, init=False)  # user -> live entries
    _last_seen: dict[str, int] = attrs.field(factory=dict, init=False)

    async def check(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def add(self, entry: PresenceEntry) -> None:
        await trio.lowlevel.checkpoint()
        node_entries = self._entries.setdefault(entry.node_id, set())
        if entry not in node_entries:
            node_entries.add(entry)
            self._per_user[entry.user] = self._per_user.get(entry.user, 0) + 1
        self._seen(entry.user)

    async def remove(self, entry: PresenceEntry) -> None:
        await trio.lowlevel.checkpoint()
        node_entries = self._entries.get(entry.node_id)
        if node_entries is None or entry not in node_entries:
            return
        node_entries.discard(entry)
        if not node_entries:
            del self._entries[entry.node_id]
        self._dropped(entry.user)

    def _seen(self, user: str) -> None:
        self._last_seen[user] = max(self._last_seen.get(user, 0), self.clock_ms())

    def _dropped(self, user: str) -> bool:
        """One entry of ``user`` is gone: True if it was their last (last seen now)."""
        left = self._per_user.get(user, 0) - 1
        if left > 0:
            self._per_user[user] = left
            return False
        self._per_user.pop(user, None)
        self._seen(user)
        return True

    async def users(self, names: Sequence[str]) -> dict[str, UserPresence]:
        await trio.lowlevel.checkpoint()
        return {
            name: UserPresence(name in self._per_user, self._last_seen.get(name)) for name in names
        }

    async def online(self, room_id: int) -> list[str]:
        await trio.lowlevel.checkpoint()
        users = {
            entry.user
            for node_entries in self._entries.values()
            for entry in node_entries
            if entry.room_id == room_id
        }
        return sorted(users)

    async def heartbeat(self, node_id: str, *, ttl_ms: int) -> None:
        await trio.lowlevel.checkpoint()
        self._deadlines[node_id] = self.clock() + ttl_ms / 1000

    async def reap(self) -> Reaped:
        await trio.lowlevel.checkpoint()
        now = self.clock()
        expired = {node for node, deadline in self._deadlines.items() if deadline <= now}
        for node in expired:
            del self._deadlines[node]
        dead = [node for node in self._entries if node not in self._deadlines]
        removed, offline = 0, list[str]()
        for node in dead:
            for entry in self._entries.pop(node):
                removed += 1
                if self._dropped(entry.user):
                    offline.append(entry.user)
        return Reaped(removed, tuple(sorted(offline)))


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@attrs.define(eq=False)
class MemoryRevocations:
    """``ports.Revocations`` in process memory; every method is atomic (no await inside)."""

    max_changes: int = attrs.field(default=10_000, kw_only=True)
    clock_ms: Callable[[], int] = attrs.field(default=_wall_ms, kw_only=True)
    _tokens: dict[str, int] = attrs.field(factory=dict, init=False)  # id -> expires (ms)
    _accounts: dict[int, tuple[int, int]] = attrs.field(factory=dict, init=False)
    _all_before_ms: int = attrs.field(default=0, init=False)
    _changes: deque[Revocation] = attrs.field(factory=deque, init=False)
    _first_seq: int = attrs.field(default=1, init=False)  # the sequence number of _changes[0]

    async def record(self, revocation: Revocation) -> None:
        await trio.lowlevel.checkpoint()
        self._forget_expired()
        if revocation.kind is RevocationKind.TOKEN:
            held = self._tokens.get(revocation.token_id, 0)
            self._tokens[revocation.token_id] = max(held, revocation.expires_at_ms)
        elif revocation.kind is RevocationKind.ACCOUNT:
            at, until = self._accounts.get(revocation.account_id, (0, 0))
            self._accounts[revocation.account_id] = (
                max(at, revocation.at_ms),
                max(until, revocation.expires_at_ms),
            )
        else:
            self._all_before_ms = max(self._all_before_ms, revocation.at_ms)
        self._changes.append(revocation)
        while len(self._changes) > self.max_changes:
            self._changes.popleft()
            self._first_seq += 1

    async def lookup(self, *, account_id: int, token_id: str) -> RevocationState:
        await trio.lowlevel.checkpoint()
        self._forget_expired()
        return RevocationState(
            token_revoked=token_id in self._tokens,
            account_before_ms=self._accounts.get(account_id, (0, 0))[0],
            all_before_ms=self._all_before_ms,
        )

    async def changes(self, cursor: str | None, *, limit: int = 1000) -> RevocationChanges:
        await trio.lowlevel.checkpoint()
        end = self._first_seq + len(self._changes)  # the next record's sequence number
        if cursor is None:
            return RevocationChanges((), str(end - 1))
        after = int(cursor)
        start = max(after + 1, self._first_seq)
        taken = tuple(
            self._changes[i - self._first_seq] for i in range(start, min(end, start + limit))
        )
        return RevocationChanges(taken, str(start + len(taken) - 1), complete=after + 1 >= start)

    def _forget_expired(self) -> None:
        now = self.clock_ms()
        for token in [t for t, until in self._tokens.items() if until <= now]:
            del self._tokens[token]
        for account in [a for a, (_, until) in self._accounts.items() if until <= now]:
            del self._accounts[account]


@attrs.define(eq=False)
class MemoryTickets:
    """``ports.Tickets`` in process memory; every method is atomic (no await inside). Time
    comes from ``clock`` (seconds, monotonic; default ``trio.current_time``)."""

    max_tickets: int = attrs.field(default=100_000, kw_only=True)
    clock: Callable[[], float] = attrs.field(default=trio.current_time, kw_only=True)
    _tickets: OrderedDict[str, tuple[str, float]] = attrs.field(factory=OrderedDict, init=False)
    _issued: deque[tuple[float, int]] = attrs.field(factory=deque, init=False)  # (until, id)
    _counts: dict[int, int] = attrs.field(factory=dict, init=False)  # account -> in window

    async def issue(
        self, ticket: str, token: str, *, account_id: int, ttl_ms: int, max_per_account: int
    ) -> bool:
        await trio.lowlevel.checkpoint()
        now = self.clock()
        self._forget_expired(now)
        if self._counts.get(account_id, 0) >= max_per_account:
            return False
        until = now + ttl_ms / 1000
        self._counts[account_id] = self._counts.get(account_id, 0) + 1
        self._issued.append((until, account_id))
        self._tickets[ticket] = (token, until)
        while len(self._tickets) > self.max_tickets:
            self._tickets.popitem(last=False)
        return True

    async def redeem(self, ticket: str) -> str | None:
        await trio.lowlevel.checkpoint()
        held = self._tickets.pop(ticket, None)
        if held is None or held[1] <= self.clock():
            return None
        return held[0]

    def _forget_expired(self, now: float) -> None:
        while self._tickets and next(iter(self._tickets.values()))[1] <= now:
            self._tickets.popitem(last=False)
        while self._issued and self._issued[0][0] <= now:
            _, account = self._issued.popleft()
            left = self._counts[account] - 1
            if left:
                self._counts[account] = left
            else:
                del self._counts[account]


@attrs.define(eq=False)
class MemoryRateLimits:
    """``ports.RateLimits`` in process memory; every ``take`` is atomic (no await inside).

    A bucket is ``(level, at)``: ``level`` tokens at clock time ``at``. Buckets that have
    refilled are forgotten once the table doubled since the last sweep (a full bucket is the
    same as none), so memory follows the keys used within their refill time.
    """

    clock: Callable[[], float] = attrs.field(default=trio.current_time, kw_only=True)
    _buckets: dict[str, tuple[float, float, float]] = attrs.field(factory=dict, init=False)
    _sweep_at: int = attrs.field(default=1024, init=False)

    async def take(self, key: str, count: int, *, rate_per_s: float, burst: int) -> Grant:
        await trio.lowlevel.checkpoint()
        now = self.clock()
        held = self._buckets.get(key)
        level = float(burst)
        if held is not None:
            level = min(level, held[0] + max(0.0, now - held[1]) * rate_per_s)
        granted = min(count, int(level))
        if granted < 1:
            return Grant(0, (1.0 - level) / rate_per_s)
        level -= granted
        self._buckets[key] = (level, now, now + (burst - level) / rate_per_s)
        if len(self._buckets) >= self._sweep_at:
            self._sweep(now)
        return Grant(granted)

    def _sweep(self, now: float) -> None:
        self._buckets = {k: b for k, b in self._buckets.items() if b[2] > now}
        self._sweep_at = max(1024, 2 * len(self._buckets))


@attrs.define(eq=False)
class MemoryPushGate:
    """``ports.PushGate`` for one process (the embedded node): each window is
    ``[token, expires at, pending offset, pending note]``; expired windows are swept once
    there are twice as many as at the last sweep (at least 1,024). Time from ``clock``
    (seconds, default ``trio.current_time``)."""

    clock: Callable[[], float] = trio.current_time
    _windows: dict[tuple[int, str], list[Any]] = attrs.field(factory=dict, init=False)
    _sweep_at: int = attrs.field(default=1024, init=False)

    async def open(
        self,
        room_id: int,
        users: Sequence[str],
        *,
        offset: int,
        note: bytes,
        token: str,
        window_ms: int,
    ) -> list[str]:
        await trio.lowlevel.checkpoint()
        now, opened = self.clock(), []
        if len(self._windows) >= self._sweep_at:
            self._windows = {k: w for k, w in self._windows.items() if w[1] > now}
            self._sweep_at = max(1024, 2 * len(self._windows))
        for user in users:
            window = self._windows.get((room_id, user))
            if window is None or window[1] <= now:
                self._windows[(room_id, user)] = [token, now + 2 * window_ms / 1000, 0, None]
                opened.append(user)
            elif offset > window[2]:
                window[2], window[3] = offset, note
        return opened

    async def close(
        self, room_id: int, users: Sequence[str], *, token: str, window_ms: int
    ) -> list[bytes | None]:
        await trio.lowlevel.checkpoint()
        now, notes = self.clock(), list[bytes | None]()
        for user in users:
            window = self._windows.get((room_id, user))
            if window is None or window[0] != token or window[1] <= now:
                notes.append(None)
            elif window[3] is None:
                del self._windows[(room_id, user)]
                notes.append(None)
            else:
                notes.append(window[3])
                self._windows[(room_id, user)] = [token, now + 2 * window_ms / 1000, 0, None]
        return notes


if TYPE_CHECKING:  # mypy proves the adapters implement their ports

    def _implements_push_gate() -> ports.PushGate:
        return MemoryPushGate()

    def _implements_port() -> ports.Presence:
        return MemoryPresence()

    def _implements_revocations() -> ports.Revocations:
        return MemoryRevocations()

    def _implements_tickets() -> ports.Tickets:
        return MemoryTickets()

    def _implements_rate_limits() -> ports.RateLimits:
        return MemoryRateLimits()
