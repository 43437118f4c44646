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
    assert await presence.reap() == 0
    await trio.sleep(2)
    assert await presence.reap() == 1
    assert await presence.online(1) == []


async def test_an_instance_built_outside_trio_works_inside() -> None:
    await PRESENCE.heartbeat("n1", ttl_ms=60_000)
    await PRESENCE.add(PresenceEntry(1, "bob", "n1", "c1"))

    assert await PRESENCE.online(1) == ["bob"]
    assert await PRESENCE.reap() == 0
