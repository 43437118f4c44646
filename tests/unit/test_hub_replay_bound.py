"""Hub Rule 3's bound: a seat that is not live yet queues at most ``cache_size`` messages and
hands over at most ``max_bytes`` of frames when it goes live; what it dropped is read from
history, and the member still sees every offset once, in order."""

from __future__ import annotations

import trio

from chatnode.adapters.sqlite import LocalBroker, SqliteArchive, SqliteBus, SqliteDatabase
from chatnode.node.hub import Hub, RoomSession, Seat
from tests.unit.test_hub import FakeMember, LossyHandler, _frame, publish

CACHE = 8


async def catch_up(hub: Hub, session: RoomSession, seat: Seat, sent_up_to: int) -> int:
    """What ``RoomConnection.replay`` does after the history: go live, or send what the seat
    dropped from history first. Returns how many history reads it took."""
    reads = 0
    while not hub.go_live(session, seat, sent_up_to=sent_up_to, max_bytes=2048):
        reads += 1
        for message in await hub.history(session, sent_up_to, seat.skipped_to):
            seat.member.send_nowait(_frame(message))
        sent_up_to = seat.skipped_to
    return reads


async def test_a_seat_queues_a_bounded_number_and_the_rest_comes_from_history() -> None:
    async with await SqliteDatabase.open(":memory:") as db:
        bus = SqliteBus(db, LocalBroker())
        hub = Hub(bus, SqliteArchive(db), cache_size=CACHE)
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.serve, LossyHandler(hub))
            await publish(bus, 5)
            ann = FakeMember("ann")
            session, seat = await hub.attach(1, ann)
            head = session.last_offset
            for message in await hub.history(session, 0, head):
                ann.send_nowait(_frame(message))
            await publish(bus, 3 * CACHE + 3)  # applied while the replay "runs"
            await ann_waits_for(hub, session, head + 3 * CACHE + 3)
            assert seat.pending is not None and len(seat.pending) <= CACHE
            assert seat.skipped_to > head
            reads = await catch_up(hub, session, seat, head)
            assert reads >= 1 and seat.live
            await publish(bus, 2)
            assert await ann.until(5 + 3 * CACHE + 3 + 2) == list(range(1, 5 + 3 * CACHE + 6))
            nursery.cancel_scope.cancel()


async def test_a_queue_over_max_bytes_is_sent_from_history_instead() -> None:
    async with await SqliteDatabase.open(":memory:") as db:
        bus = SqliteBus(db, LocalBroker())
        hub = Hub(bus, SqliteArchive(db), cache_size=1000)
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.serve, LossyHandler(hub))
            ann = FakeMember("ann")
            session, seat = await hub.attach(1, ann)
            await publish(bus, 100)  # ~100 frames of ~90 bytes: over 2048 bytes
            await ann_waits_for(hub, session, 100)
            assert not hub.go_live(session, seat, sent_up_to=0, max_bytes=2048)
            assert seat.pending is None and seat.skipped_to == 100 and not ann.frames
            assert await catch_up(hub, session, seat, 0) == 1
            assert ann.offsets == list(range(1, 101))
            nursery.cancel_scope.cancel()


async def ann_waits_for(hub: Hub, session: RoomSession, offset: int) -> None:
    """Until the session applied ``offset`` (the bus delivers in its own task)."""
    with trio.fail_after(10):
        while session.last_offset < offset:  # noqa: ASYNC110 -- no event for "applied"
            await trio.sleep(0.001)
