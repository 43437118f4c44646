"""The Presence contract: live connections per room, the reaping of dead nodes, and each
user's presence (online, last seen) that follows from them.

Time passes through the rig's ``advance`` (a fake clock for the memory implementation, a real
short wait for a service), so heartbeat TTLs here are small: 200 ms.
"""

from __future__ import annotations

import time

from chatnode.core.models import PresenceEntry, Reaped, UserPresence

from .harness import PresenceRig

TTL_MS = 200


def entry(room_id: int, user: str, node_id: str, conn_id: str) -> PresenceEntry:
    return PresenceEntry(room_id=room_id, user=user, node_id=node_id, conn_id=conn_id)


async def test_online_lists_distinct_users_in_name_order(presence_rig: PresenceRig) -> None:
    presence = presence_rig.presence
    for e in (
        entry(1, "carol", "n1", "c1"),
        entry(1, "Bob", "n1", "c2"),
        entry(1, "carol", "n2", "c3"),
        entry(1, "alice", "n2", "c4"),
        entry(2, "dave", "n1", "c5"),
    ):
        await presence.add(e)

    assert await presence.online(1) == ["Bob", "alice", "carol"]
    assert await presence.online(2) == ["dave"]
    assert await presence.online(3) == []


async def test_a_user_stays_online_until_the_last_connection_goes(
    presence_rig: PresenceRig,
) -> None:
    presence = presence_rig.presence
    laptop, phone = entry(1, "bob", "n1", "c1"), entry(1, "bob", "n2", "c2")
    await presence.add(laptop)
    await presence.add(phone)

    await presence.remove(laptop)
    assert await presence.online(1) == ["bob"]
    await presence.remove(phone)
    assert await presence.online(1) == []


async def test_adding_an_entry_twice_adds_it_once(presence_rig: PresenceRig) -> None:
    presence = presence_rig.presence
    e = entry(1, "bob", "n1", "c1")
    await presence.add(e)
    await presence.add(e)

    await presence.remove(e)

    assert await presence.online(1) == []


async def test_removing_an_unknown_entry_is_harmless(presence_rig: PresenceRig) -> None:
    presence = presence_rig.presence
    await presence.add(entry(1, "bob", "n1", "c1"))

    await presence.remove(entry(1, "bob", "n1", "other-conn"))
    await presence.remove(entry(9, "nobody", "n9", "c9"))

    assert await presence.online(1) == ["bob"]


async def test_reap_removes_only_the_entries_of_expired_nodes(presence_rig: PresenceRig) -> None:
    presence, advance = presence_rig.presence, presence_rig.advance
    await presence.heartbeat("alive", ttl_ms=TTL_MS)
    await presence.heartbeat("dying", ttl_ms=TTL_MS)
    await presence.add(entry(1, "alice", "alive", "c1"))
    await presence.add(entry(1, "bob", "dying", "c2"))
    await presence.add(entry(2, "bob", "dying", "c3"))
    await presence.add(entry(1, "carol", "dying", "c4"))
    await presence.add(entry(1, "carol", "alive", "c5"))

    assert (await presence.reap()).entries == 0
    await advance(TTL_MS / 2 / 1000)
    await presence.heartbeat("alive", ttl_ms=TTL_MS)
    await advance(TTL_MS * 0.75 / 1000)

    assert (await presence.reap()).entries == 3
    assert await presence.online(1) == ["alice", "carol"]
    assert await presence.online(2) == []
    assert (await presence.reap()).entries == 0


async def test_entries_of_a_node_without_heartbeat_are_reaped(presence_rig: PresenceRig) -> None:
    presence = presence_rig.presence
    await presence.heartbeat("alive", ttl_ms=10 * TTL_MS)
    await presence.add(entry(1, "alice", "alive", "c1"))
    await presence.add(entry(1, "ghost", "never-heartbeat", "c2"))

    assert (await presence.reap()).entries == 1
    assert await presence.online(1) == ["alice"]


async def test_a_reaped_node_comes_back_with_a_new_heartbeat(presence_rig: PresenceRig) -> None:
    presence, advance = presence_rig.presence, presence_rig.advance
    await presence.heartbeat("n1", ttl_ms=TTL_MS)
    await presence.add(entry(1, "bob", "n1", "c1"))
    await advance(TTL_MS * 1.5 / 1000)
    assert (await presence.reap()).entries == 1

    await presence.heartbeat("n1", ttl_ms=TTL_MS)
    await presence.add(entry(1, "bob", "n1", "c2"))

    assert (await presence.reap()).entries == 0
    assert await presence.online(1) == ["bob"]


async def test_check_answers_and_aclose_is_idempotent(presence_rig: PresenceRig) -> None:
    await presence_rig.presence.check()
    await presence_rig.presence.aclose()
    await presence_rig.presence.aclose()


# -- user presence ---------------------------------------------------------------------------


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_a_user_never_seen_is_offline_with_no_last_seen(presence_rig: PresenceRig) -> None:
    presence = presence_rig.presence
    assert await presence.users(["nobody"]) == {"nobody": UserPresence(False, None)}
    assert await presence.users([]) == {}


async def test_a_user_is_online_while_any_entry_of_theirs_lives(
    presence_rig: PresenceRig,
) -> None:
    presence = presence_rig.presence
    connect, room = entry(0, "bob", "n1", "c1"), entry(7, "bob", "n2", "c2")
    before = wall_ms()
    await presence.add(connect)
    await presence.add(room)
    await presence.add(entry(7, "carol", "n1", "c3"))

    states = await presence.users(["bob", "carol", "dave"])
    assert states["bob"].online and states["carol"].online
    assert states["dave"] == UserPresence(False, None)
    seen = states["bob"].last_seen_ms
    assert seen is not None and before <= seen <= wall_ms()

    await presence.remove(connect)
    assert (await presence.users(["bob"]))["bob"].online
    await presence.remove(room)
    after = (await presence.users(["bob"]))["bob"]
    assert not after.online
    assert after.last_seen_ms is not None and seen <= after.last_seen_ms <= wall_ms()


async def test_removing_an_unknown_entry_changes_no_last_seen(presence_rig: PresenceRig) -> None:
    presence = presence_rig.presence
    await presence.remove(entry(1, "ghost", "n1", "c1"))
    assert await presence.users(["ghost"]) == {"ghost": UserPresence(False, None)}


async def test_last_seen_never_moves_back(presence_rig: PresenceRig) -> None:
    presence = presence_rig.presence
    e = entry(1, "bob", "n1", "c1")
    seen: list[int] = []
    for _ in range(3):
        await presence.add(e)
        await presence.remove(e)
        state = (await presence.users(["bob"]))["bob"]
        assert state.last_seen_ms is not None
        seen.append(state.last_seen_ms)
    assert seen == sorted(seen)


async def test_a_reap_takes_users_offline_and_names_them(presence_rig: PresenceRig) -> None:
    presence, advance = presence_rig.presence, presence_rig.advance
    await presence.heartbeat("alive", ttl_ms=10 * TTL_MS)
    await presence.heartbeat("dying", ttl_ms=TTL_MS)
    await presence.add(entry(1, "alice", "dying", "c1"))
    await presence.add(entry(2, "alice", "dying", "c2"))
    await presence.add(entry(1, "bob", "dying", "c3"))
    await presence.add(entry(0, "bob", "alive", "c4"))
    await advance(TTL_MS * 1.5 / 1000)
    before = wall_ms()

    assert await presence.reap() == Reaped(3, ("alice",))

    states = await presence.users(["alice", "bob"])
    assert not states["alice"].online and states["bob"].online
    seen = states["alice"].last_seen_ms
    assert seen is not None and before <= seen <= wall_ms()
    assert await presence.reap() == Reaped(0, ())
