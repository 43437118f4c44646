"""The Directory contract: accounts, rooms and durable membership, for every implementation."""

from __future__ import annotations

import contextlib
from functools import partial

import attrs
import pytest
import trio

from chatnode.core import errors
from chatnode.core.models import Listed, Member, Room, User
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


# --- visibility, roles, direct rooms, bans -------------------------------------------------


async def test_rooms_are_public_unless_made_otherwise(directory: Directory) -> None:
    await make_users(directory, "ann")
    plain = await directory.create_room("plain", created_at_ms=T0)
    owned = await directory.create_room("owned", created_at_ms=T0, owner="ann")

    assert plain == Room(plain.id, "plain", T0, "public", None)
    assert await directory.get_room(owned.id) == Room(owned.id, "owned", T0, "public", "ann")
    assert await directory.list_members(owned.id) == []  # the creator joins like anyone


async def test_the_creator_of_a_public_room_joins_as_its_owner(directory: Directory) -> None:
    await make_users(directory, "ann", "bob")
    room = await directory.create_room("lobby", created_at_ms=T0, owner="ann")
    await directory.add_member(room.id, "bob", max_members=10)
    await directory.add_member(room.id, "ann", max_members=10)

    roles = await directory.list_roles(room.id)
    assert [(m.user, m.role) for m in roles] == [("ann", "owner"), ("bob", "member")]
    assert all(m.joined_at_ms > 0 for m in roles)
    assert await directory.get_member(room.id, "bob") == roles[1]
    assert await directory.get_member(room.id, "carl") is None


async def test_a_private_room_is_made_with_its_owner_and_members(directory: Directory) -> None:
    await make_users(directory, "ann", "bob", "cid", "dan")
    room = await directory.create_room(
        "group",
        created_at_ms=T0,
        visibility="private",
        owner="ann",
        members=["bob", "cid", "bob", "ann"],
        max_members=5,
    )

    assert room.visibility == "private" and room.created_by == "ann"
    assert await directory.list_roles(room.id) == [
        Member("ann", "owner", T0),
        Member("bob", "member", T0),
        Member("cid", "member", T0),
    ]
    assert await directory.add_member(room.id, "dan", max_members=5, role="admin")
    dan = await directory.get_member(room.id, "dan")
    assert dan is not None and dan.role == "admin" and dan.joined_at_ms > 0


async def test_a_private_room_with_an_unknown_or_too_many_members_is_not_made(
    directory: Directory,
) -> None:
    await make_users(directory, "ann", "bob", "cid")
    with pytest.raises(errors.NotFound) as unknown:
        await directory.create_room(
            "g",
            created_at_ms=T0,
            visibility="private",
            owner="ann",
            members=["bob", "zed"],
            max_members=10,
        )
    assert unknown.value.code == "user_not_found"
    with pytest.raises(errors.RoomFull):
        await directory.create_room(
            "g",
            created_at_ms=T0,
            visibility="private",
            owner="ann",
            members=["bob", "cid"],
            max_members=2,
        )
    assert await directory.list_rooms(after_id=0, limit=10) == []
    assert await directory.user_rooms("bob", limit=10) == []


async def test_visible_rooms_are_the_public_ones_and_the_callers(directory: Directory) -> None:
    await make_users(directory, "ann", "bob", "cid")
    lobby = await directory.create_room("lobby", created_at_ms=T0)
    group = await directory.create_room(
        "g", created_at_ms=T0, visibility="private", owner="ann", members=["bob"], max_members=9
    )
    dm, _ = await directory.direct_room("ann", "cid", created_at_ms=T0)
    await directory.add_member(lobby.id, "cid", max_members=9)

    async def seen(user: str, after_id: int = 0, limit: int = 10) -> list[tuple[int, int]]:
        listed = await directory.visible_rooms(user, after_id=after_id, limit=limit)
        return [(entry.room.id, entry.member_count) for entry in listed]

    assert await seen("ann") == [(lobby.id, 1), (group.id, 2), (dm.id, 2)]
    assert await seen("bob") == [(lobby.id, 1), (group.id, 2)]
    assert await seen("cid") == [(lobby.id, 1), (dm.id, 2)]
    assert await seen("ann", after_id=lobby.id, limit=1) == [(group.id, 2)]
    listed = await directory.visible_rooms("cid", after_id=0, limit=1)
    assert listed == [Listed(lobby, 1)]
    assert [r.id for r in await directory.list_rooms(after_id=0, limit=10)] == [
        lobby.id,
        group.id,
        dm.id,
    ]


async def test_user_rooms_newest_membership_first_and_bounded(directory: Directory) -> None:
    await make_users(directory, "ann", "bob")
    rooms = [await directory.create_room(f"r{n}", created_at_ms=T0) for n in range(3)]
    for room in rooms:
        await directory.add_member(room.id, "ann", max_members=9)  # (ties: newest room first)

    assert [r.id for r in await directory.user_rooms("ann", limit=10)] == [3, 2, 1]
    assert [r.id for r in await directory.user_rooms("ann", limit=2)] == [3, 2]
    assert await directory.user_rooms("bob", limit=10) == []


async def test_one_direct_room_per_pair_whoever_asks(directory: Directory) -> None:
    await make_users(directory, "ann", "bob", "cid")
    room, made = await directory.direct_room("ann", "bob", created_at_ms=T0)
    again, made_again = await directory.direct_room("bob", "ann", created_at_ms=T0 + 1)
    other, _ = await directory.direct_room("ann", "cid", created_at_ms=T0)

    assert made and not made_again and again == room
    assert room.visibility == "direct" and other.id != room.id
    assert await directory.list_members(room.id) == ["ann", "bob"]
    assert await directory.find_direct("bob", "ann") == room
    assert await directory.find_direct("bob", "cid") is None
    assert await directory.find_direct("bob", "nobody") is None
    with pytest.raises(errors.NotFound) as unknown:
        await directory.direct_room("ann", "nobody", created_at_ms=T0)
    assert unknown.value.code == "user_not_found"


async def test_concurrent_requests_make_one_direct_room(directory: Directory) -> None:
    await make_users(directory, "ann", "bob")
    outcomes: list[tuple[Room, bool]] = []

    async def ask(user: str, other: str) -> None:
        outcomes.append(await directory.direct_room(user, other, created_at_ms=T0))

    async with trio.open_nursery() as nursery:
        for n in range(8):
            nursery.start_soon(ask, *(("ann", "bob") if n % 2 else ("bob", "ann")))

    assert len({room.id for room, _ in outcomes}) == 1
    assert [made for _, made in outcomes].count(True) == 1
    assert await directory.list_members(outcomes[0][0].id) == ["ann", "bob"]
    assert [r.visibility for r in await directory.list_rooms(after_id=0, limit=10)] == ["direct"]


async def test_a_direct_room_belongs_to_the_accounts_not_the_names(directory: Directory) -> None:
    await make_users(directory, "ann", "bob")
    room, _ = await directory.direct_room("ann", "bob", created_at_ms=T0)
    await directory.delete_all_users()
    await make_users(directory, "ann", "bob")

    fresh, made = await directory.direct_room("ann", "bob", created_at_ms=T0)
    assert made and fresh.id != room.id


async def test_a_ban_ends_the_membership_and_keeps_the_user_out(directory: Directory) -> None:
    await make_users(directory, "ann", "bob")
    room = await directory.create_room("lobby", created_at_ms=T0, owner="ann")
    await directory.add_member(room.id, "bob", max_members=9)

    assert await directory.ban(room.id, "bob", by="ann", at_ms=T0) is True
    assert await directory.ban(room.id, "bob", by="ann", at_ms=T0) is False
    assert await directory.list_members(room.id) == []
    assert await directory.list_bans(room.id, limit=10) == ["bob"]
    with pytest.raises(errors.Forbidden) as refused:
        await directory.add_member(room.id, "bob", max_members=9)
    assert refused.value.code == "banned"
    assert await directory.list_members(room.id) == []

    assert await directory.unban(room.id, "bob") is True
    assert await directory.unban(room.id, "bob") is False
    assert await directory.list_members(room.id) == []  # unbanned, not added back
    assert await directory.add_member(room.id, "bob", max_members=9) is True
    with pytest.raises(errors.NotFound):
        await directory.ban(room.id + 99, "bob", by="ann", at_ms=T0)
    with pytest.raises(errors.NotFound):
        await directory.ban(room.id, "nobody", by="ann", at_ms=T0)


async def test_a_ban_frees_the_seat_of_a_full_room(directory: Directory) -> None:
    await make_users(directory, "a", "b", "c")
    room = await directory.create_room("small", created_at_ms=T0)
    await directory.add_member(room.id, "a", max_members=2)
    await directory.add_member(room.id, "b", max_members=2)

    await directory.ban(room.id, "b", by="a", at_ms=T0)
    assert await directory.add_member(room.id, "c", max_members=2) is True
    assert await directory.list_members(room.id) == ["a", "c"]


async def test_concurrent_joins_and_a_ban_leave_the_banned_user_out(directory: Directory) -> None:
    await make_users(directory, "ann", "bob")
    room = await directory.create_room("lobby", created_at_ms=T0)

    async def join() -> None:
        with contextlib.suppress(errors.Forbidden):
            await directory.add_member(room.id, "bob", max_members=9)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(join)
        nursery.start_soon(partial(directory.ban, room.id, "bob", by="ann", at_ms=T0))
    # whatever the order, once the ban is in a join fails: bob is out or is removed by it
    if await directory.get_member(room.id, "bob") is not None:
        pytest.fail("a join slipped past the ban")


# --- lifecycle -----------------------------------------------------------------------------


async def test_check_answers_and_aclose_is_idempotent(directory: Directory) -> None:
    await directory.check()
    await directory.aclose()
    await directory.aclose()
