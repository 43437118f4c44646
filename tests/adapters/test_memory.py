"""MemoryPresence beyond the contract: its default clock is Trio's."""

from __future__ import annotations

import trio
import trio.testing

from chatnode.adapters.memory import MemoryPresence
from chatnode.core.models import PresenceEntry

PRESENCE = MemoryPresence()  # built outside trio.run: the clock is only read inside it


async def test_default_clock_follows_trio_time(autojump_clock: trio.testing.MockClock) -> None:
    presence = MemoryPresence()
    await presence.heartbeat("n1", ttl_ms=5_000)
    await presence.add(PresenceEntry(1, "bob", "n1", "c1"))

    await trio.sleep(4)
    assert (await presence.reap()).entries == 0
    await trio.sleep(2)
    assert (await presence.reap()).entries == 1
    assert await presence.online(1) == []


async def test_an_instance_built_outside_trio_works_inside() -> None:
    await PRESENCE.heartbeat("n1", ttl_ms=60_000)
    await PRESENCE.add(PresenceEntry(1, "bob", "n1", "c1"))

    assert await PRESENCE.online(1) == ["bob"]
    assert (await PRESENCE.reap()).entries == 0


async def test_revocation_changes_dropped_unread_read_incomplete() -> None:
    """``MemoryRevocations`` keeps the newest ``max_changes`` records: a follower whose cursor
    is older than what was dropped is told so (``complete=False``) and reads on."""
    from chatnode.adapters.memory import MemoryRevocations
    from chatnode.core.models import Revocation, RevocationKind

    store = MemoryRevocations(max_changes=3)
    start = await store.changes(None)
    revocations = [Revocation(RevocationKind.ALL, at, at + 1) for at in range(1, 6)]
    for revocation in revocations[:3]:
        await store.record(revocation)
    caught_up = await store.changes(start.cursor)
    assert caught_up.revocations == tuple(revocations[:3]) and caught_up.complete

    for revocation in revocations[3:]:
        await store.record(revocation)
    behind = await store.changes(start.cursor)
    assert behind.revocations == tuple(revocations[2:]) and not behind.complete
    assert (await store.changes(caught_up.cursor)).complete
