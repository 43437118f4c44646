"""The Directory's cursors (delivered/read receipts), for every implementation: forward
only, per member and room, written in batches."""

from __future__ import annotations

import trio

from chatnode.core.models import Cursor
from chatnode.core.ports import Directory

T0 = 1_700_000_000_000


async def _room_with(directory: Directory, *names: str) -> int:
    for name in names:
        await directory.create_user(name, f"hash-of-{name}", created_at_ms=T0)
    room = await directory.create_room("lobby", created_at_ms=T0)
    for name in names:
        await directory.add_member(room.id, name, max_members=10)
    return room.id


async def test_no_cursor_until_one_is_written(directory: Directory) -> None:
    room = await _room_with(directory, "ann")
    assert await directory.room_cursors(room) == []
    assert await directory.user_cursors("ann", [room]) == {}
    assert await directory.user_cursors("ann", []) == {}
    await directory.advance_cursors([])


async def test_cursors_only_move_forward(directory: Directory) -> None:
    room = await _room_with(directory, "ann")
    await directory.advance_cursors([Cursor(room, "ann", 10, 4)])
    await directory.advance_cursors([Cursor(room, "ann", 7, 2)])  # behind: no change
    assert await directory.user_cursors("ann", [room]) == {room: Cursor(room, "ann", 10, 4)}
    await directory.advance_cursors([Cursor(room, "ann", 3, 8)])  # read on, delivered not
    assert await directory.user_cursors("ann", [room]) == {room: Cursor(room, "ann", 10, 8)}


async def test_read_implies_delivered(directory: Directory) -> None:
    room = await _room_with(directory, "ann")
    await directory.advance_cursors([Cursor(room, "ann", 0, 12)])
    assert await directory.room_cursors(room) == [Cursor(room, "ann", 12, 12)]


async def test_cursors_are_per_member_and_room_in_one_batch(directory: Directory) -> None:
    r1 = await _room_with(directory, "ann", "bob")
    r2 = (await directory.create_room("other", created_at_ms=T0)).id
    await directory.add_member(r2, "ann", max_members=10)
    await directory.advance_cursors(
        [
            Cursor(r1, "ann", 5, 1),
            Cursor(r1, "bob", 9, 9),
            Cursor(r2, "ann", 2, 0),
            Cursor(r1, "ann", 6, 0),  # the same member twice: the greatest of each
        ]
    )
    assert await directory.room_cursors(r1) == [Cursor(r1, "ann", 6, 1), Cursor(r1, "bob", 9, 9)]
    assert await directory.user_cursors("ann", [r1, r2, r2 + 50]) == {
        r1: Cursor(r1, "ann", 6, 1),
        r2: Cursor(r2, "ann", 2, 0),
    }
    assert await directory.user_cursors("bob", [r2]) == {}


async def test_a_former_member_is_not_listed(directory: Directory) -> None:
    room = await _room_with(directory, "ann", "bob")
    await directory.advance_cursors([Cursor(room, "ann", 3, 3), Cursor(room, "bob", 4, 1)])
    await directory.remove_member(room, "bob")
    assert [c.user for c in await directory.room_cursors(room)] == ["ann"]


async def test_concurrent_batches_keep_the_greatest(directory: Directory) -> None:
    room = await _room_with(directory, "ann", "bob")

    async def write(n: int) -> None:
        await directory.advance_cursors([Cursor(room, "ann", n, n // 2), Cursor(room, "bob", n, 0)])

    async with trio.open_nursery() as nursery:
        for n in range(1, 21):
            nursery.start_soon(write, n)
    assert await directory.room_cursors(room) == [
        Cursor(room, "ann", 20, 10),
        Cursor(room, "bob", 20, 0),
    ]


async def test_a_large_batch_is_written_whole(directory: Directory) -> None:
    room = await _room_with(directory, "ann")
    await directory.advance_cursors([Cursor(room + i, "ann", i, 0) for i in range(1, 1201)])
    found = await directory.user_cursors("ann", [room + i for i in range(1, 1201)])
    assert len(found) == 1200
    assert found[room + 700] == Cursor(room + 700, "ann", 700, 0)
