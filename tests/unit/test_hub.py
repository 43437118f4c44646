"""The hub's ordering rules, driven deterministically: a gate holds the history load open
while messages arrive, so "messages during the replay" is not left to timing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from wsproto.frame_protocol import FrameDecoder

from chatnode.adapters.sqlite import LocalBroker, SqliteArchive, SqliteBus, SqliteDatabase
from chatnode.core.models import ADDED, BANNED, LEFT, REMOVED, ChatMessage, Draft, RoomEvent
from chatnode.node.hub import Hub
from chatnode.wire import frames
from chatnode.wire.frames import CloseCode, Dialect, Encoder, Recipient


class FakeMember(Recipient):
    def __init__(self, conn_id: str, dialect: Dialect = Dialect.V1) -> None:
        self.conn_id = conn_id
        self.user = conn_id
        self.dialect = dialect
        self.encoder = Encoder(dialect)
        self.frames: list[dict[str, Any]] = []
        self.closed: CloseCode | None = None
        self._changed = trio.Event()

    def send_nowait(self, frame: bytes) -> None:
        decoder = FrameDecoder(client=True)
        decoder.receive_bytes(frame)
        decoded = decoder.process_buffer()
        assert decoded is not None
        self.frames.append(json.loads(bytes(decoded.payload)))
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, count: int) -> list[int]:
        """Wait until ``count`` chat messages arrived; return their offsets."""
        while len(self.offsets) < count:
            await self._changed.wait()
        return self.offsets

    def close_nowait(self, code: CloseCode, reason: str) -> None:
        self.closed = code

    def removed(self) -> None:  # as a room's WebSocket does
        self.close_nowait(CloseCode.FORBIDDEN, "no longer a member")

    @property
    def offsets(self) -> list[int]:
        return [f["offset"] for f in self.frames if f.get("type") == "message"]


class GatedBus(SqliteBus):
    """read_log waits for ``gate`` and counts calls."""

    def __init__(self, db: SqliteDatabase) -> None:
        super().__init__(db, LocalBroker())
        self.gate = trio.Event()
        self.entered = trio.Event()
        self.log_reads = 0

    async def read_log(self, room_id: int, *, after_offset: int, limit: int) -> list[ChatMessage]:
        self.log_reads += 1
        self.entered.set()
        await self.gate.wait()
        return await super().read_log(room_id, after_offset=after_offset, limit=limit)


class LossyHandler:
    """Passes bus traffic to the hub, except offsets in ``drop`` (a lossy bus)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.drop: set[int] = set()

    async def deliver(self, message: ChatMessage) -> None:
        if message.offset not in self.drop:
            await self.hub.deliver(message)

    async def signal(self, room_id: int, event: RoomEvent) -> None:
        await self.hub.signal(room_id, event)

    async def resubscribed(self) -> None:
        await self.hub.resubscribed()


LOSSY: dict[int, LossyHandler] = {}


@pytest.fixture
async def setup() -> AsyncIterator[tuple[Hub, GatedBus]]:
    db = await SqliteDatabase.open(":memory:")
    bus = GatedBus(db)
    hub = Hub(bus, SqliteArchive(db), cache_size=256)
    handler = LOSSY[id(hub)] = LossyHandler(hub)
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.serve, handler)
        yield hub, bus
        nursery.cancel_scope.cancel()
    await db.aclose()


async def publish(bus: SqliteBus, n: int, room: int = 1) -> None:
    for i in range(n):
        await bus.publish(Draft(room, "ann", f"m{i}", 0))


async def join(hub: Hub, member: FakeMember, room: int = 1, after: int | None = None) -> None:
    session, seat = await hub.attach(room, member)
    head = session.last_offset
    history = await hub.history(session, 0 if after is None else after, head)
    for m in history:
        member.send_nowait(_frame(m))
    hub.go_live(session, seat, sent_up_to=head)


def _frame(message: ChatMessage) -> bytes:
    from chatnode.wire import frames

    return frames.ws_text_frame(frames.server_frame(message, Dialect.V1))


async def test_messages_during_replay_are_sent_once_in_order(setup: tuple[Hub, GatedBus]) -> None:
    hub, bus = setup
    ann = FakeMember("ann")
    bus.gate.set()
    await join(hub, ann)
    await publish(bus, 5)
    bus.gate = trio.Event()
    hub._sessions[1].recent.clear()  # force a real load for bob
    bob = FakeMember("bob")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(join, hub, bob)
        await bus.entered.wait()
        await publish(bus, 3)  # arrive while bob's history load is held open
        assert bob.offsets == []
        bus.gate.set()
    assert await bob.until(8) == list(range(1, 9))
    assert await ann.until(8) == list(range(1, 9))


async def test_history_is_loaded_once_per_room_then_served_from_cache(
    setup: tuple[Hub, GatedBus],
) -> None:
    hub, bus = setup
    await publish(bus, 10)
    bus.gate = trio.Event()
    members = [FakeMember(f"u{i}") for i in range(20)]
    async with trio.open_nursery() as nursery:
        for member in members:
            nursery.start_soon(join, hub, member)
        await bus.entered.wait()
        bus.gate.set()
    assert bus.log_reads == 1
    assert hub.history_loads_total == 1
    assert all(m.offsets == list(range(1, 11)) for m in members)


async def test_a_gap_on_the_bus_is_filled_from_the_room_log(setup: tuple[Hub, GatedBus]) -> None:
    hub, bus = setup
    bus.gate.set()
    ann = FakeMember("ann")
    await join(hub, ann)
    LOSSY[id(hub)].drop = {3, 4}
    await publish(bus, 4)
    assert await ann.until(2) == [1, 2]
    await publish(bus, 1)  # offset 5 reveals the gap: 3 and 4 come from the room log first
    assert await ann.until(5) == [1, 2, 3, 4, 5]


async def test_resubscribed_catches_up_from_the_room_log(setup: tuple[Hub, GatedBus]) -> None:
    hub, bus = setup
    bus.gate.set()
    ann = FakeMember("ann")
    await join(hub, ann)
    LOSSY[id(hub)].drop = {1, 2}
    await publish(bus, 2)
    await hub.resubscribed()
    assert await ann.until(2) == [1, 2]


async def test_duplicates_from_the_bus_are_dropped(setup: tuple[Hub, GatedBus]) -> None:
    hub, bus = setup
    bus.gate.set()
    ann = FakeMember("ann")
    await join(hub, ann)
    await publish(bus, 2)
    await ann.until(2)
    first = (await bus.read_log(1, after_offset=0, limit=1))[0]
    await hub.deliver(first)
    assert ann.offsets == [1, 2]


async def test_last_member_leaving_unsubscribes(setup: tuple[Hub, GatedBus]) -> None:
    hub, bus = setup
    bus.gate.set()
    ann, bob = FakeMember("ann"), FakeMember("bob")
    await join(hub, ann)
    await join(hub, bob)
    await hub.detach(1, ann)
    assert hub.rooms == 1
    await hub.detach(1, bob)
    assert hub.rooms == 0
    watcher = FakeMember("watcher")
    await publish(bus, 1)
    await join(hub, watcher, room=1)  # resubscribes; sees offset 1 only as history
    await publish(bus, 1)
    assert await watcher.until(2) == [1, 2]
    assert bob.offsets == [] and ann.offsets == []


async def test_a_removed_member_gets_the_change_and_nothing_after(
    setup: tuple[Hub, GatedBus],
) -> None:
    """Rule 8: the change is applied like a message, then ends the user's seats."""
    hub, bus = setup
    bus.gate.set()
    ann1, ann2, bob = FakeMember("ann/1"), FakeMember("ann/2"), FakeMember("bob")
    ann1.user = ann2.user = "ann"
    plain = FakeMember("carl", Dialect.PLAIN)
    for m in (ann1, ann2, bob, plain):
        await join(hub, m)
    session = hub._sessions[1]
    session.members.update({"ann": 1, "bob": 2})
    removals = session.removals
    await hub.deliver(ChatMessage(1, 1, "ann", "", 5, REMOVED, "bob"))
    assert ann1.closed == ann2.closed == CloseCode.FORBIDDEN and bob.closed is None
    assert session.members == {"bob": 2} and session.removals == removals + 1
    change = {
        "type": "member",
        "chatroom": 1,
        "offset": 1,
        "user": "ann",
        "event": "removed",
        "by": "bob",
        "timestamp": 5,
    }
    assert ann1.frames == ann2.frames == bob.frames == [change]
    assert plain.frames == []  # the plain dialect has no frame for it
    await hub.deliver(ChatMessage(2, 1, "bob", "", 5, BANNED, "ann"))  # no session: nothing
    assert bob.closed is None


async def test_a_change_that_does_not_end_a_membership_ends_nothing(
    setup: tuple[Hub, GatedBus],
) -> None:
    hub, bus = setup
    bus.gate.set()
    ann = FakeMember("ann")
    await join(hub, ann)
    await hub.deliver(ChatMessage(1, 1, "ann", "", 5, ADDED, "bob"))
    await hub.deliver(ChatMessage(1, 2, "bob", "hi", 6))
    assert ann.closed is None and [f["type"] for f in ann.frames] == ["member", "message"]


async def test_a_queued_seat_is_ended_by_its_removal(setup: tuple[Hub, GatedBus]) -> None:
    """A seat whose replay runs (Rule 3) is told too: its replay stops there."""
    hub, bus = setup
    bus.gate.set()
    ann = FakeMember("ann")
    _, seat = await hub.attach(1, ann)
    await hub.deliver(ChatMessage(1, 1, "ann", "", 5, LEFT, "ann"))
    assert ann.closed == CloseCode.FORBIDDEN and seat.pending is not None


async def test_a_bus_reconnect_forgets_confirmed_memberships(setup: tuple[Hub, GatedBus]) -> None:
    """Removals signalled while the bus was away were missed (Rule 8)."""
    hub, bus = setup
    bus.gate.set()
    await join(hub, FakeMember("ann"))
    session = hub._sessions[1]
    session.members["ann"] = 1
    await hub.resubscribed()
    assert session.members == {}


class Watcher:
    """A multi-room connection as the hub sees it (Rule 9)."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.added: list[int] = []
        self.since: list[int | None] = []

    def room_added(self, room_id: int, since: int | None = None) -> None:
        self.added.append(room_id)
        self.since.append(since)


async def test_a_new_membership_reaches_the_users_watchers_only(
    setup: tuple[Hub, GatedBus],
) -> None:
    hub, _ = setup
    ann, ann2, bob = Watcher("ann"), Watcher("ann"), Watcher("bob")
    for watcher in (ann, ann2, bob):
        hub.watch_rooms(watcher)
    before = hub.user_room_events

    await hub.signal(frames.USERS_CHANNEL, frames.user_room_added_event(5, "ann"))
    hub.unwatch_rooms(ann2)
    await hub.signal(frames.USERS_CHANNEL, frames.user_room_added_event(6, "ann", offset=9))
    await hub.signal(frames.USERS_CHANNEL, frames.typing_event(0, "ann"))  # not one
    await hub.signal(frames.USERS_CHANNEL, RoomEvent.of(type=frames.USER_ROOM_ADDED, user="ann"))

    assert (ann.added, ann2.added, bob.added) == ([5, 6], [5], [])
    assert ann.since == [None, 8]  # from the offset before the room's "added" change on
    assert hub.user_room_events == before + 3


async def test_a_removal_tells_the_seat_not_the_connection(setup: tuple[Hub, GatedBus]) -> None:
    """Rule 8 through ``Member.removed``: each member decides what the end of its room is."""
    hub, _ = setup

    class MultiRoom(FakeMember):
        removals = 0

        def removed(self) -> None:
            self.removals += 1

    member = MultiRoom("ann")
    _, seat = await hub.attach(1, member)
    seat.live = True
    await hub.deliver(ChatMessage(1, 1, "ann", "", 5, REMOVED, "bob"))
    assert (member.removals, member.closed) == (1, None)
