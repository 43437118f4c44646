"""``node/push.py``: who is notified, collapse windows (leading and trailing edge, shared by
nodes through the gate), retries with backoff, drops (queue full, gave up, refused). Time is
Trio's autojump clock: sleeps cost nothing and times are exact."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from chatnode.adapters.memory import MemoryPushGate
from chatnode.core.errors import Unavailable
from chatnode.core.models import PRIVATE, PUBLIC, ChatMessage, Cursor, Room, UserPresence
from chatnode.node.push import BACKOFF_FIRST_S, Notifier

ROOM = 7
pytestmark = pytest.mark.deadline(10_000)  # on the autojump clock: a hang still ends at once


class World:
    """The directory, presence and room log the notifier reads, and the webhook it posts to."""

    def __init__(self, members: Sequence[str], *, visibility: str = PRIVATE) -> None:
        self.members = list(members)
        self.visibility = visibility
        self.online: set[str] = set()
        self.reads: dict[str, int] = {}
        self.log: list[ChatMessage] = []
        self.posts: list[tuple[float, dict[str, Any]]] = []
        self.attempts: list[float] = []
        self.answers: list[int | None] = []  # None: Unavailable; past the end: 200
        self.hang = False
        self.posted = trio.Event()
        self.presence_reads = 0

    # Directory, Presence
    async def list_members(self, room_id: int) -> list[str]:
        await trio.lowlevel.checkpoint()
        return list(self.members)

    async def room_cursors(self, room_id: int) -> list[Cursor]:
        await trio.lowlevel.checkpoint()
        return [Cursor(room_id, u, r, r) for u, r in self.reads.items()]

    async def users(self, names: Sequence[str]) -> dict[str, UserPresence]:
        await trio.lowlevel.checkpoint()
        self.presence_reads += 1
        return {n: UserPresence(n in self.online, None) for n in names}

    async def room(self, room_id: int) -> Room:
        await trio.lowlevel.checkpoint()
        return Room(room_id, "r", 0, visibility=self.visibility)

    async def load_range(self, room_id: int, after: int, head: int) -> list[ChatMessage]:
        await trio.lowlevel.checkpoint()
        return [m for m in self.log if after < m.offset <= head]

    # Webhook
    async def post(self, body: bytes) -> int:
        self.attempts.append(trio.current_time())
        if self.hang:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        answer = self.answers.pop(0) if self.answers else 200
        if answer is None:
            raise Unavailable("refused")
        if answer == 200:
            self.posts.append((trio.current_time(), json.loads(body)))
            self.posted.set()
            self.posted = trio.Event()
        return answer

    def message(self, sender: str, text: str = "hello", event: str | None = None) -> ChatMessage:
        m = ChatMessage(ROOM, len(self.log) + 1, sender, text, 0, event=event)
        self.log.append(m)
        return m


def notifier(world: World, gate: MemoryPushGate | None = None, **kw: Any) -> Notifier:
    return Notifier(
        gate=gate or MemoryPushGate(),
        webhook=world,
        directory=world,  # type: ignore[arg-type]
        presence=world,  # type: ignore[arg-type]
        room=world.room,
        load_range=world.load_range,
        **{"collapse_s": 30.0, "give_up_s": 60.0, **kw},
    )


@asynccontextmanager
async def running(*notifiers: Notifier) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        for n in notifiers:
            await nursery.start(n.run)
        yield
        nursery.cancel_scope.cancel()


async def settle() -> None:
    await trio.sleep(0.001)  # autojump: everything runnable runs first


async def test_first_message_at_once_the_latest_at_the_window_end_then_quiet(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = World(["ann", "bob"])
    push = notifier(world)
    async with running(push):
        start = trio.current_time()
        push.published(world.message("ann", "first"))
        await world.posted.wait()
        for text in ("second", "third " + "x" * 200):
            push.published(world.message("ann", text))
        await world.posted.wait()
        await trio.sleep(100)  # two windows more: the second has nothing pending, closes
        push.published(world.message("ann", "after"))
        await world.posted.wait()
    times = [t - start for t, _ in world.posts]
    bodies = [b for _, b in world.posts]
    assert [b["offset"] for b in bodies] == [1, 3, 4]
    assert bodies[0] == {
        "user": "bob", "chatroom": ROOM, "offset": 1, "sender": "ann", "preview": "first",
        "unread": 1,
    }  # fmt: skip
    assert bodies[1]["unread"] == 3 and bodies[1]["preview"] == ("third " + "x" * 200)[:100]
    assert times[0] < 0.1 and 30 <= times[1] < 30.1 and times[2] >= 130
    assert push.sent_total == 3 and push.dropped_total == 0


async def test_never_the_sender_nor_connected_members_nor_membership_changes_nor_public_rooms(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = World(["ann", "bob", "cat", "dan"])
    world.online = {"cat"}
    push = notifier(world)
    async with running(push):
        push.published(world.message("dan", "", event="added"))
        push.published(world.message("ann"))
        await trio.sleep(1)
    assert sorted(b["user"] for _, b in world.posts) == ["bob", "dan"]
    assert world.presence_reads == 1  # one lookup for all members

    public = World(["ann", "bob"], visibility=PUBLIC)
    push = notifier(public)
    async with running(push):
        push.published(public.message("ann"))
        await trio.sleep(1)
    assert public.posts == [] and public.presence_reads == 0


async def test_unread_counts_others_messages_after_the_read_cursor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = World(["ann", "bob"])
    for sender in ("bob", "ann", "ann", "bob"):
        world.message(sender)
    world.reads["bob"] = 2
    push = notifier(world)
    async with running(push):
        push.published(world.message("ann"))
        await world.posted.wait()
    assert world.posts[0][1]["unread"] == 2  # offsets 3 and 5; 4 is bob's own


async def test_two_nodes_sharing_the_gate_post_once_per_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = World(["ann", "bob", "cat"])
    world.online = {"ann", "bob"}
    gate = MemoryPushGate()
    one, two = notifier(world, gate, node_id="one"), notifier(world, gate, node_id="two")
    async with running(one, two):
        for i in range(20):
            (one if i % 2 else two).published(world.message("ann" if i % 3 else "bob"))
            await trio.sleep(1)
        await trio.sleep(45)
    bodies = [b for _, b in world.posts]
    times = [t for t, _ in world.posts]
    assert [b["offset"] for b in bodies] == [1, 20]  # at once, then the latest at the end
    assert times[1] - times[0] >= 30
    assert bodies[1]["unread"] == 20


async def test_retries_back_off_exponentially(autojump_clock: trio.testing.MockClock) -> None:
    world = World(["ann", "bob"])
    world.answers = [None, 503, None, 200]
    push = notifier(world)
    async with running(push):
        push.published(world.message("ann"))
        await world.posted.wait()
    gaps = [b - a for a, b in zip(world.attempts, world.attempts[1:], strict=False)]
    assert gaps == [BACKOFF_FIRST_S, 2 * BACKOFF_FIRST_S, 4 * BACKOFF_FIRST_S]
    assert (push.sent_total, push.failed_total, push.dropped_total) == (1, 3, 0)


async def test_dropped_after_the_bound_when_down_or_hanging_and_at_once_when_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = World(["ann", "bob"])
    world.answers = [None] * 1000
    push = notifier(world, give_up_s=20.0)
    async with running(push):
        start = trio.current_time()
        push.published(world.message("ann"))
        await trio.sleep(100)
    assert push.dropped_total == 1 and push.sent_total == 0
    assert world.attempts[-1] - start < 20 and len(world.attempts) == 6  # 0 .5 1.5 3.5 7.5 15.5

    world = World(["ann", "bob"])
    world.hang = True
    push = notifier(world, give_up_s=20.0)
    async with running(push):
        push.published(world.message("ann"))
        await trio.sleep(100)
    assert push.dropped_total == 1 and len(world.attempts) == 1

    world = World(["ann", "bob"])
    world.answers = [400]
    push = notifier(world)
    async with running(push):
        push.published(world.message("ann"))
        await trio.sleep(100)
    assert push.dropped_total == 1 and len(world.attempts) == 1


async def test_a_full_queue_drops_and_publishing_never_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = World(["ann", "bob"])
    push = notifier(world, queue=2)
    for _ in range(5):
        push.published(world.message("ann"))  # not running: nothing reads the queue
    assert push.dropped_total == 3
