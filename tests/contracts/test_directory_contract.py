"""The Directory contract: accounts, rooms and durable membership, for every implementation."""

from __future__ import annotations

import attrs
import pytest
import trio

from chatnode.core import errors
from chatnode.core.models import Room, User
from chatnode.core.ports import Directory

T0 = 1_700_000_000_000


async def make_users(directory: Directory, *names: str) -> None:
    for name in names:
        await directory.create_user(name, f"hash-of-{name}", created_at_ms=T0)


# --- users ---------------------------------------------------------------------------------


async def test_create_and_get_user(directory: Directory) -> None:
    bob = await directory.create_user("bob", "h1", created_at_ms=T0)
    zoe = await directory.create_user("Zoë", "h2", created_at_ms=T0 + 1, is_admin=True)

    assert bob == User("bob", "h1", T0, is_admin=False, id=bob.id)
    assert zoe == User("Zoë", "h2", T0 + 1, is_admin=True, id=zoe.id)
    assert 0 < bob.id < zoe.id
    assert await directory.get_user("bob") == bob
    assert await directory.get_user("Zoë") == zoe
    assert await directory.get_user_by_id(bob.id) == bob
    assert await directory.get_user_by_id(zoe.id) == zoe


async def test_get_unknown_user_is_none(directory: Directory) -> None:
    assert await directory.get_user("nobody") is None
    assert await directory.get_user_by_id(12345) is None


async def test_duplicate_user_name_conflicts(directory: Directory) -> None:
    original = await directory.create_user("bob", "h1", created_at_ms=T0)

    with pytest.raises(errors.Conflict):
        await directory.create_user("bob", "h2", created_at_ms=T0 + 5, is_admin=True)
    assert await directory.get_user("bob") == original


async def test_user_names_are_unique_ignoring_case(directory: Directory) -> None:
    ann = await directory.create_user("ann", "h1", created_at_ms=T0)
    for other in ("ANN", "Ann"):
        with pytest.raises(errors.Conflict):
            await directory.create_user(other, "h2", created_at_ms=T0 + 5)

    assert await directory.get_user("ANN") == ann  # found by its key, shown as registered
    assert await directory.get_user("aNn") == ann
    assert await directory.get_user("anne") is None


async def test_concurrent_sign_ups_of_one_name_make_one_account(directory: Directory) -> None:
    outcomes: list[str] = []

    async def sign_up(name: str) -> None:
        try:
            await directory.create_user(name, "h", created_at_ms=T0)
            outcomes.append("created")
        except errors.Conflict:
            outcomes.append("conflict")

    async with trio.open_nursery() as nursery:
        for name in ("eve", "EVE", "Eve", "eVe", "evE"):
            nursery.start_soon(sign_up, name)

    assert sorted(outcomes) == ["conflict"] * 4 + ["created"]


async def test_account_ids_are_never_reused(directory: Directory) -> None:
    first = await directory.create_user("ann", "h1", created_at_ms=T0)
    await directory.delete_all_users()
    again = await directory.create_user("ann", "h1", created_at_ms=T0 + 1)

    assert again.id > first.id  # the same name, a new account
    assert await directory.get_user_by_id(first.id) is None
    assert await directory.get_user_by_id(again.id) == again


async def test_set_password_revokes_earlier_tokens_in_one_write(directory: Directory) -> None:
    ann = await directory.create_user("ann", "h1", created_at_ms=T0)
    assert ann.revoked_before_ms == 0

    changed = await directory.set_password(ann.id, "h2", revoked_before_ms=T0 + 10)
    assert changed == User("ann", "h2", T0, id=ann.id, revoked_before_ms=T0 + 10)
    assert await directory.get_user("ann") == changed
    older = await directory.set_password(ann.id, "h3", revoked_before_ms=T0 + 5)
    assert older is not None and older.revoked_before_ms == T0 + 10  # only moves forward
    assert older.password_hash == "h3"
    assert await directory.set_password(ann.id + 1000, "h4", revoked_before_ms=T0) is None


async def test_set_admin_by_name_and_revoke_tokens_when_withdrawn(directory: Directory) -> None:
    ann = await directory.create_user("ann", "h1", created_at_ms=T0)

    granted = await directory.set_admin("ANN", True)
    assert granted == attrs.evolve(ann, is_admin=True)
    withdrawn = await directory.set_admin("ann", False, revoked_before_ms=T0 + 7)
    assert withdrawn == attrs.evolve(ann, is_admin=False, revoked_before_ms=T0 + 7)
    assert await directory.get_user_by_id(ann.id) == withdrawn
    assert await directory.set_admin("nobody", True) is None


async def test_delete_all_users_also_deletes_memberships(directory: Directory) -> None:
    await make_users(directory, "a", "b", "c")
    room = await directory.create_room("lobby", created_at_ms=T0)
    for name in ("a", "b"):
        await directory.add_member(room.id, name, max_members=10)

    assert await directory.delete_all_users() == 3

    assert await directory.get_user("a") is None
    assert await directory.list_members(room.id) == []
    assert await directory.get_room(room.id) == room
    assert await directory.delete_all_users() == 0


# --- rooms ---------------------------------------------------------------------------------


async def test_room_ids_increase_from_1(directory: Directory) -> None:
    rooms = [await directory.create_room(name, created_at_ms=T0) for name in ("a", "b", "a")]

    assert [room.id for room in rooms] == [1, 2, 3]
    assert rooms[0] == Room(1, "a", T0)
    assert await directory.get_room(3) == Room(3, "a", T0)


async def test_get_unknown_room_is_none(directory: Directory) -> None:
    await directory.create_room("a", created_at_ms=T0)

    assert await directory.get_room(2) is None
    assert await directory.get_room(0) is None


async def test_list_rooms_pages_by_id(directory: Directory) -> None:
    for n in range(5):
        await directory.create_room(f"room{n}", created_at_ms=T0 + n)

    async def page(after_id: int, limit: int) -> list[int]:
        return [room.id for room in await directory.list_rooms(after_id=after_id, limit=limit)]

    assert await page(0, 2) == [1, 2]
    assert await page(2, 2) == [3, 4]
    assert await page(4, 2) == [5]
    assert await page(5, 2) == []
    assert await page(0, 100) == [1, 2, 3, 4, 5]
    assert (await directory.list_rooms(after_id=1, limit=1)) == [Room(2, "room1", T0 + 1)]


# --- membership ----------------------------------------------------------------------------


async def test_add_member_twice_is_false_the_second_time(directory: Directory) -> None:
    await make_users(directory, "bob")
    room = await directory.create_room("lobby", created_at_ms=T0)

    assert await directory.add_member(room.id, "bob", max_members=10) is True
    assert await directory.add_member(room.id, "bob", max_members=10) is False
    assert await directory.list_members(room.id) == ["bob"]


async def test_add_member_unknown_room_or_user_is_not_found(directory: Directory) -> None:
    await make_users(directory, "bob")
    room = await directory.create_room("lobby", created_at_ms=T0)

    with pytest.raises(errors.NotFound):
        await directory.add_member(room.id + 1, "bob", max_members=10)
    with pytest.raises(errors.NotFound):
        await directory.add_member(room.id, "nobody", max_members=10)
    assert await directory.list_members(room.id) == []


async def test_rooms_of_a_user_ascending_within_the_limit(directory: Directory) -> None:
    await make_users(directory, "ann", "bob")
    rooms = [await directory.create_room(f"r{i}", created_at_ms=T0) for i in range(4)]
    for room in (rooms[2], rooms[0], rooms[3]):
        await directory.add_member(room.id, "ann", max_members=10)
    await directory.add_member(rooms[1].id, "bob", max_members=10)

    assert await directory.rooms_of("ann", limit=10) == [rooms[0].id, rooms[2].id, rooms[3].id]
    assert await directory.rooms_of("ann", limit=2) == [rooms[0].id, rooms[2].id]
    assert await directory.rooms_of("bob", limit=10) == [rooms[1].id]
    assert await directory.rooms_of("nobody", limit=10) == []

    await directory.remove_member(rooms[2].id, "ann")
    assert await directory.rooms_of("ann", limit=10) == [rooms[0].id, rooms[3].id]


async def test_list_members_in_name_order(directory: Directory) -> None:
    await make_users(directory, "carol", "alice", "Bob", "dave")
    lobby = await directory.create_room("lobby", created_at_ms=T0)
    other = await directory.create_room("other", created_at_ms=T0)
    for name in ("carol", "alice", "Bob"):
        await directory.add_member(lobby.id, name, max_members=10)
    await directory.add_member(other.id, "dave", max_members=10)

    assert await directory.list_members(lobby.id) == ["Bob", "alice", "carol"]
    assert await directory.list_members(other.id) == ["dave"]
    assert await directory.list_members(999) == []


async def test_remove_member(directory: Directory) -> None:
    await make_users(directory, "alice", "bob")
    room = await directory.create_room("lobby", created_at_ms=T0)
    await directory.add_member(room.id, "alice", max_members=10)
    await directory.add_member(room.id, "bob", max_members=10)

    assert await directory.remove_member(room.id, "alice") is True
    assert await directory.remove_member(room.id, "alice") is False
    assert await directory.remove_member(999, "bob") is False
    assert await directory.list_members(room.id) == ["bob"]


async def test_room_full_at_the_limit_but_members_may_rejoin(directory: Directory) -> None:
    await make_users(directory, "a", "b", "c")
    room = await directory.create_room("small", created_at_ms=T0)
    assert await directory.add_member(room.id, "a", max_members=2)
    assert await directory.add_member(room.id, "b", max_members=2)

    with pytest.raises(errors.RoomFull):
        await directory.add_member(room.id, "c", max_members=2)
    assert await directory.add_member(room.id, "a", max_members=2) is False

    await directory.remove_member(room.id, "b")
    assert await directory.add_member(room.id, "c", max_members=2) is True
    assert await directory.list_members(room.id) == ["a", "c"]


async def test_a_member_who_left_comes_back_only_as_a_new_member(directory: Directory) -> None:
    """Leaving frees the seat at once; coming back takes a seat again, within the limit
    (``DELETE /v1/chatrooms/{id}/members/{name}``, then a join)."""
    await make_users(directory, "a", "b", "c")
    room = await directory.create_room("small", created_at_ms=T0)
    await directory.add_member(room.id, "a", max_members=2)
    await directory.add_member(room.id, "b", max_members=2)

    assert await directory.remove_member(room.id, "a") is True
    assert await directory.list_members(room.id) == ["b"]
    assert await directory.add_member(room.id, "c", max_members=2) is True
    with pytest.raises(errors.RoomFull):
        await directory.add_member(room.id, "a", max_members=2)
    assert await directory.remove_member(room.id, "c") is True
    assert await directory.add_member(room.id, "a", max_members=2) is True
    assert await directory.list_members(room.id) == ["a", "b"]


async def test_concurrent_joins_never_overfill_a_room(directory: Directory) -> None:
    names = [f"user{n:02}" for n in range(20)]
    await make_users(directory, *names)
    room = await directory.create_room("hot", created_at_ms=T0)
    outcomes: list[bool | str] = []

    async def join(name: str) -> None:
        try:
            outcomes.append(await directory.add_member(room.id, name, max_members=5))
        except errors.RoomFull:
            outcomes.append("full")

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(join, name)

    assert outcomes.count(True) == 5
    assert outcomes.count("full") == 15
    members = await directory.list_members(room.id)
    assert len(members) == 5
    assert set(members) <= set(names)


# --- lifecycle -----------------------------------------------------------------------------


async def test_check_answers_and_aclose_is_idempotent(directory: Directory) -> None:
    await directory.check()
    await directory.aclose()
    await directory.aclose()
