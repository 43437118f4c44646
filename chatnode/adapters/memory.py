"""In-process Presence and Revocations for the embedded single node (and any test that needs
them).

:class:`MemoryRevocations` holds the latest time every user was deleted; one node needs to
share it with nobody.

:class:`MemoryPresence` keeps, per node, the set of live connections and the node's heartbeat
deadline. It follows the same rules as the Redis implementation:

- An entry is identified by all its fields: adding it twice is adding it once.
- ``online`` counts every entry not yet reaped, expired node or not.
- ``reap`` removes every entry of a node whose heartbeat expired or that never sent one, and
  forgets the expired heartbeat. A later ``heartbeat`` brings the node back with no entries.

Time comes from an injectable ``clock`` (seconds, monotonic), so tests advance time instead of
sleeping. The default is ``trio.current_time``: it follows Trio's clock (``MockClock`` /
``autojump_clock`` included) and is only read inside the async methods, so the object may be
built outside ``trio.run``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from chatnode.core import ports
from chatnode.core.models import PresenceEntry


@attrs.define(eq=False)
class MemoryPresence:
    """``ports.Presence`` in process memory; every method is atomic (no await inside)."""

    clock: Callable[[], float] = attrs.field(default=trio.current_time, kw_only=True)
    _entries: dict[str, set[PresenceEntry]] = attrs.field(factory=dict, init=False)
    _deadlines: dict[str, float] = attrs.field(factory=dict, init=False)

    async def check(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def add(self, entry: PresenceEntry) -> None:
        await trio.lowlevel.checkpoint()
        self._entries.setdefault(entry.node_id, set()).add(entry)

    async def remove(self, entry: PresenceEntry) -> None:
        await trio.lowlevel.checkpoint()
        node_entries = self._entries.get(entry.node_id)
        if node_entries is None:
            return
        node_entries.discard(entry)
        if not node_entries:
            del self._entries[entry.node_id]

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

    async def reap(self) -> int:
        await trio.lowlevel.checkpoint()
        now = self.clock()
        expired = {node for node, deadline in self._deadlines.items() if deadline <= now}
        for node in expired:
            del self._deadlines[node]
        dead = [node for node in self._entries if node not in self._deadlines]
        return sum(len(self._entries.pop(node)) for node in dead)


@attrs.define(eq=False)
class MemoryRevocations:
    """``ports.Revocations`` in process memory."""

    _users_deleted_at_ms: int = attrs.field(default=0, init=False)

    async def record_users_deleted(self, at_ms: int) -> None:
        await trio.lowlevel.checkpoint()
        self._users_deleted_at_ms = max(self._users_deleted_at_ms, at_ms)

    async def users_deleted_at(self) -> int:
        await trio.lowlevel.checkpoint()
        return self._users_deleted_at_ms


if TYPE_CHECKING:  # mypy proves the adapters implement their ports

    def _implements_port() -> ports.Presence:
        return MemoryPresence()

    def _implements_revocations() -> ports.Revocations:
        return MemoryRevocations()
