"""``node/receipts.py``: cursors move forward only, acknowledgements cost no directory write
each (one batch per flush, one write when a member's last connection leaves), receipts are
coalesced, a failed write is kept for the next flush."""

from __future__ import annotations

from collections.abc import Sequence

import trio
import trio.testing

from chatnode.core import errors
from chatnode.core.models import Cursor, RoomEvent
from chatnode.node.receipts import Cursors


class FakeDirectory:
    def __init__(self) -> None:
        self.stored: dict[tuple[int, str], Cursor] = {}
        self.writes: list[list[Cursor]] = []
        self.reads = 0
        self.fail = False

    async def advance_cursors(self, cursors: Sequence[Cursor]) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail:
            raise errors.Unavailable("down")
        self.writes.append(list(cursors))
        for c in cursors:
            old = self.stored.get((c.room_id, c.user), Cursor(c.room_id, c.user))
            self.stored[(c.room_id, c.user)] = Cursor(
                c.room_id, c.user, max(old.delivered, c.delivered), max(old.read, c.read)
            )

    async def user_cursors(self, user: str, room_ids: Sequence[int]) -> dict[int, Cursor]:
        self.reads += 1
        await trio.sleep(0.01)
        return {r: c for (r, u), c in self.stored.items() if u == user and r in room_ids}


def make() -> tuple[Cursors, FakeDirectory, list[RoomEvent]]:
    directory = FakeDirectory()
    events: list[RoomEvent] = []

    async def signal(room_id: int, event: RoomEvent) -> None:
        events.append(event)

    return Cursors(directory, signal), directory, events  # type: ignore[arg-type]


async def test_a_reader_acknowledging_every_message_costs_one_write_per_flush() -> None:
    cursors, directory, _ = make()
    await cursors.open(1, "ann")
    for offset in range(1, 1001):
        assert cursors.advance(1, "ann", delivered=offset)
        assert cursors.advance(1, "ann", delivered=offset, read=offset)
    assert directory.writes == []
    await cursors.flush()
    assert directory.writes == [[Cursor(1, "ann", 1000, 1000)]]
    await cursors.flush()  # nothing pending: no write
    assert len(directory.writes) == 1


async def test_cursors_only_move_forward_and_read_implies_delivered() -> None:
    cursors, _, _ = make()
    await cursors.open(1, "ann")
    assert cursors.advance(1, "ann", delivered=0, read=5)
    assert cursors.get(1, "ann") == Cursor(1, "ann", 5, 5)
    assert not cursors.advance(1, "ann", delivered=3)
    assert not cursors.advance(1, "ann", delivered=5, read=4)
    assert not cursors.advance(2, "ann", delivered=9)  # no connection there: nothing
    assert cursors.get(1, "ann") == Cursor(1, "ann", 5, 5)


async def test_the_last_connection_leaving_writes_its_cursor() -> None:
    cursors, directory, _ = make()
    await cursors.open(1, "ann")
    await cursors.open(1, "ann")
    cursors.advance(1, "ann", delivered=7)
    await cursors.close(1, "ann")
    assert directory.writes == []
    await cursors.close(1, "ann")
    assert directory.writes == [[Cursor(1, "ann", 7, 0)]]
    assert cursors.get(1, "ann") is None
    assert await cursors.open(1, "ann") == Cursor(1, "ann", 7, 0)  # read back


async def test_connections_opening_at_once_share_one_read() -> None:
    cursors, directory, _ = make()
    directory.stored[(1, "ann")] = Cursor(1, "ann", 4, 2)
    got = []

    async def open_one() -> None:
        got.append(await cursors.open(1, "ann"))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(open_one)
    assert got == [Cursor(1, "ann", 4, 2)] * 3
    assert directory.reads == 1


async def test_a_failed_write_is_kept_for_the_next_flush() -> None:
    cursors, directory, _ = make()
    await cursors.open(1, "ann")
    cursors.advance(1, "ann", delivered=3)
    directory.fail = True
    await cursors.flush()
    cursors.advance(1, "ann", delivered=4)
    directory.fail = False
    await cursors.flush()
    assert directory.writes == [[Cursor(1, "ann", 4, 0)]]


async def test_receipts_are_coalesced_with_the_latest_values(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cursors, _, events = make()
    await cursors.open(1, "ann")
    with trio.move_on_after(0.3 + cursors.receipt_s * 3):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cursors.run)
            for offset in range(1, 201):
                cursors.advance(1, "ann", delivered=offset)
                await trio.sleep(0.001)
            await trio.sleep(cursors.receipt_s * 2)
            nursery.cancel_scope.cancel()
    fields = [dict(e.fields) for e in events]
    assert 1 <= len(fields) <= 1 + 0.3 / cursors.receipt_s + 1
    assert fields[-1] == {
        "type": "receipt",
        "chatroom": 1,
        "user": "ann",
        "delivered": 200,
        "read": 0,
    }


async def test_writes_keep_their_period_while_receipts_hang(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Rule 2's bound does not wait on rule 3: a bus that never answers a receipt leaves
    the cursors written every ``flush_s``."""
    directory = FakeDirectory()
    never = trio.Event()

    async def hanging(room_id: int, event: RoomEvent) -> None:
        await never.wait()

    cursors = Cursors(directory, hanging)  # type: ignore[arg-type]
    await cursors.open(1, "ann")
    await cursors.open(2, "ann")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cursors.run)
        cursors.advance(1, "ann", delivered=3)
        cursors.advance(2, "ann", delivered=5)
        await trio.sleep(cursors.receipt_s + cursors.flush_s * 1.5)  # mock clock
        assert directory.writes == [[Cursor(1, "ann", 3, 0), Cursor(2, "ann", 5, 0)]]
        cursors.advance(1, "ann", delivered=4)
        await trio.sleep(cursors.flush_s)
        assert directory.writes[-1] == [Cursor(1, "ann", 4, 0)]
        nursery.cancel_scope.cancel()
