"""The Presence contract: live connections per room, and the reaping of dead nodes.

Time passes through the rig's ``advance`` (a fake clock for the memory implementation, a real
short wait for a service), so heartbeat TTLs here are small: 200 ms.
"""

from __future__ import annotations

from chatnode.core.models import PresenceEntry

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

    assert await presence.reap() == 0
    await advance(TTL_MS / 2 / 1000)
    await presence.heartbeat("alive", ttl_ms=TTL_MS)
    await advance(TTL_MS * 0.75 / 1000)

    assert await presence.reap() == 3
    assert await presence.online(1) == ["alice", "carol"]
    assert await presence.online(2) == []
    assert await presence.reap() == 0


async def test_entries_of_a_node_without_heartbeat_are_reaped(presence_rig: PresenceRig) -> None:
    presence = presence_rig.presence
    await presence.heartbeat("alive", ttl_ms=10 * TTL_MS)
    await presence.add(entry(1, "alice", "alive", "c1"))
    await presence.add(entry(1, "ghost", "never-heartbeat", "c2"))

    assert await presence.reap() == 1
    assert await presence.online(1) == ["alice"]


async def test_a_reaped_node_comes_back_with_a_new_heartbeat(presence_rig: PresenceRig) -> None:
    presence, advance = presence_rig.presence, presence_rig.advance
    await presence.heartbeat("n1", ttl_ms=TTL_MS)
    await presence.add(entry(1, "bob", "n1", "c1"))
    await advance(TTL_MS * 1.5 / 1000)
    assert await presence.reap() == 1

    await presence.heartbeat("n1", ttl_ms=TTL_MS)
    await presence.add(entry(1, "bob", "n1", "c2"))

    assert await presence.reap() == 0
    assert await presence.online(1) == ["bob"]


async def test_check_answers_and_aclose_is_idempotent(presence_rig: PresenceRig) -> None:
    await presence_rig.presence.check()
    await presence_rig.presence.aclose()
    await presence_rig.presence.aclose()
