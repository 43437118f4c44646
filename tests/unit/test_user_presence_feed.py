"""``node/presence.py`` rules 3-5: the coalesced presence frames of one node, on Trio's mock
clock, against the memory store."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from chatnode.adapters.memory import MemoryPresence
from chatnode.core.models import PresenceEntry
from chatnode.node.presence import UserPresenceFeed


class Watcher:
    def __init__(self, user: str) -> None:
        self.user = user
        self.frames: list[tuple[float, dict[str, Any]]] = []
        self.arrived = trio.Event()

    def send_nowait(self, frame: bytes) -> None:
        payload = frame[2:]  # a short unmasked text frame: two header bytes
        self.frames.append((trio.current_time(), json.loads(payload)))
        self.arrived.set()
        self.arrived = trio.Event()


async def test_a_flapping_user_is_read_once_a_second_and_the_latest_state_wins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryPresence()
    feed = UserPresenceFeed(store, interval_s=1.0)
    ann = Watcher("ann")
    feed.watch(ann, ["bob"])
    entry = PresenceEntry(0, "bob", "n1", "c1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.run)
        await store.add(entry)
        feed.changed("bob")
        await ann.arrived.wait()
        for _ in range(20):  # 20 flaps in 0.4 s
            await store.remove(entry)
            feed.changed("bob")
            await trio.sleep(0.01)
            await store.add(entry)
            feed.changed("bob")
            await trio.sleep(0.01)
        await store.remove(entry)
        feed.changed("bob")
        await ann.arrived.wait()
        feed.changed("carol")  # nobody watches carol: nothing
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    times = [at for at, _ in ann.frames]
    assert [frame["online"] for _, frame in ann.frames] == [True, False]
    assert times[1] - times[0] >= 1.0
    last = (await store.users(["bob"]))["bob"]
    assert ann.frames[-1][1] == {
        "type": "presence",
        "chatroom": None,
        "user": "bob",
        "online": False,
        "last_seen": last.last_seen_ms,
    }


async def test_an_unchanged_state_sends_nothing_and_unwatching_forgets(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryPresence()
    feed = UserPresenceFeed(store)
    ann = Watcher("ann")
    feed.watch(ann, ["bob"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.run)
        await store.add(PresenceEntry(0, "bob", "n1", "c1"))
        feed.changed("bob")
        await ann.arrived.wait()
        await store.add(PresenceEntry(5, "bob", "n2", "c2"))  # still online
        feed.changed("bob")
        await trio.sleep(3)
        assert len(ann.frames) == 1
        feed.unwatch(ann)
        assert feed.watched == 0
        nursery.cancel_scope.cancel()
