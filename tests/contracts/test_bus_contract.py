"""The Bus contract: dense room offsets, ordered fan-out to every node, the recent log.

Several buses made by one ``new_bus`` share a backend: they are the nodes of one deployment.
Tests wait for deliveries on the recording handler, never on time. Where a test proves that
something was *not* delivered, it publishes a later sentinel from the same bus and waits for
that: a bus delivers one publisher's traffic in publish order, across rooms too.

A membership change (``Draft.membership``) is published like a message: it takes the room's
next offset and is delivered and logged with its ``event`` and ``by``.
"""

from __future__ import annotations

import trio

from chatnode.core.models import ADDED, BANNED, LEFT, REMOVED, ChatMessage, Draft, RoomEvent

from .harness import NewBus, start_node

T0 = 1_700_000_000_000


def draft(room_id: int, text: str, user: str = "bob", at_ms: int = T0) -> Draft:
    return Draft(room_id=room_id, user=user, text=text, timestamp_ms=at_ms)


async def test_offsets_are_dense_from_1_and_per_room(new_bus: NewBus) -> None:
    bus = await new_bus()
    rooms = [1, 2, 1, 1, 2]

    published = [
        await bus.publish(draft(room, f"m{n}", at_ms=T0 + n)) for n, room in enumerate(rooms)
    ]

    assert [(m.room_id, m.offset) for m in published] == [(1, 1), (2, 1), (1, 2), (1, 3), (2, 2)]
    assert published[0] == ChatMessage(1, 1, "bob", "m0", T0)
    assert await bus.last_offset(1) == 3
    assert await bus.last_offset(2) == 2
    # A room nothing was published in: 0, or None from a bus that cannot tell it from a room
    # whose offset it lost (Redis); restoring it at 0 (what creating a room does) makes it 0.
    assert await bus.last_offset(3) in (0, None)
    assert await bus.restore(3, last_offset=0) == 0
    assert await bus.last_offset(3) == 0


async def test_subscribed_handler_gets_messages_in_offset_order(new_bus: NewBus) -> None:
    async with trio.open_nursery() as nursery:
        bus, recorder = await start_node(nursery, new_bus)
        await bus.subscribe(7)

        published = [await bus.publish(draft(7, f"hello {n}")) for n in range(10)]

        assert await recorder.wait_for_messages(7, 10) == published
        assert [m.offset for m in published] == list(range(1, 11))
        nursery.cancel_scope.cancel()


async def test_two_nodes_see_concurrent_publishers_in_the_same_order(new_bus: NewBus) -> None:
    tasks, per_task, room = 3, 30, 5
    async with trio.open_nursery() as nursery:
        node_a, seen_a = await start_node(nursery, new_bus)
        node_b, seen_b = await start_node(nursery, new_bus)
        await node_a.subscribe(room)
        await node_b.subscribe(room)
        published: list[ChatMessage] = []

        async def publisher(task: int) -> None:
            for n in range(per_task):
                bus = node_a if (task + n) % 2 == 0 else node_b
                published.append(await bus.publish(draft(room, f"{task}:{n}", user=f"u{task}")))

        async with trio.open_nursery() as publishers:
            for task in range(tasks):
                publishers.start_soon(publisher, task)

        total = tasks * per_task
        got_a = await seen_a.wait_for_messages(room, total)
        got_b = await seen_b.wait_for_messages(room, total)
        assert [m.offset for m in got_a] == list(range(1, total + 1))
        assert got_a == got_b == sorted(published, key=lambda m: m.offset)
        for task in range(tasks):  # each publisher's messages keep its own order
            mine = [m.text for m in got_a if m.user == f"u{task}"]
            assert mine == [f"{task}:{n}" for n in range(per_task)]
        nursery.cancel_scope.cancel()


async def test_only_subscribed_rooms_are_delivered(new_bus: NewBus) -> None:
    async with trio.open_nursery() as nursery:
        bus, recorder = await start_node(nursery, new_bus)
        await bus.subscribe(1)

        await bus.publish(draft(2, "not for us"))
        sentinel = await bus.publish(draft(1, "for us"))

        await recorder.wait_for_messages(1, 1)
        assert recorder.messages == [sentinel]
        nursery.cancel_scope.cancel()


async def test_unsubscribe_stops_delivery(new_bus: NewBus) -> None:
    async with trio.open_nursery() as nursery:
        bus, recorder = await start_node(nursery, new_bus)
        await bus.subscribe(1)
        await bus.subscribe(2)
        first = await bus.publish(draft(1, "before"))
        await recorder.wait_for_messages(1, 1)

        await bus.unsubscribe(1)
        await bus.publish(draft(1, "after"))
        sentinel = await bus.publish(draft(2, "sentinel"))

        await recorder.wait_for_messages(2, 1)
        assert recorder.messages == [first, sentinel]
        nursery.cancel_scope.cancel()


async def test_a_node_receives_what_another_node_publishes(new_bus: NewBus) -> None:
    async with trio.open_nursery() as nursery:
        node_a, _ = await start_node(nursery, new_bus)
        node_b, seen_b = await start_node(nursery, new_bus)
        await node_b.subscribe(3)

        message = await node_a.publish(draft(3, "across nodes"))

        assert await seen_b.wait_for_messages(3, 1) == [message]
        assert await node_b.last_offset(3) == 1
        nursery.cancel_scope.cancel()


async def test_read_log_after_offset_with_limit(new_bus: NewBus) -> None:
    bus = await new_bus()
    published = [await bus.publish(draft(4, f"m{n}")) for n in range(5)]
    await bus.publish(draft(9, "other room"))

    assert await bus.read_log(4, after_offset=0, limit=10) == published
    assert await bus.read_log(4, after_offset=2, limit=2) == published[2:4]
    assert await bus.read_log(4, after_offset=4, limit=10) == published[4:]
    assert await bus.read_log(4, after_offset=5, limit=10) == []
    assert await bus.read_log(8, after_offset=0, limit=10) == []


async def test_signals_reach_subscribers_only_and_take_no_offset(new_bus: NewBus) -> None:
    typing = RoomEvent.of(type="typing", user="bob", rooms=[1], text="ünïcode")
    sentinel, last = RoomEvent.of(type="sentinel"), RoomEvent.of(type="last")
    async with trio.open_nursery() as nursery:
        node_a, seen_a = await start_node(nursery, new_bus)
        node_b, seen_b = await start_node(nursery, new_bus)
        await node_a.subscribe(1)
        await node_b.subscribe(2)

        await node_a.signal(1, typing)
        await node_a.signal(2, sentinel)
        await node_a.signal(1, last)

        await seen_a.wait_until(lambda: len(seen_a.signals) == 2)
        await seen_b.wait_until(lambda: len(seen_b.signals) == 1)
        # Subscribers get each event's fields and the very bytes its origin encoded.
        got_a = [(room, dict(e.fields), e.data) for room, e in seen_a.signals]
        got_b = [(room, dict(e.fields), e.data) for room, e in seen_b.signals]
        assert got_a == [
            (1, {"type": "typing", "user": "bob", "rooms": [1], "text": "ünïcode"}, typing.data),
            (1, {"type": "last"}, last.data),
        ]
        assert got_b == [(2, {"type": "sentinel"}, sentinel.data)]
        assert seen_a.messages == seen_b.messages == []
        assert await node_a.last_offset(1) in (0, None)  # no offset taken (None: see above)
        nursery.cancel_scope.cancel()


async def test_check_answers_and_aclose_is_idempotent(new_bus: NewBus) -> None:
    bus = await new_bus()
    await bus.check()
    await bus.aclose()
    await bus.aclose()


async def test_a_client_id_sent_again_is_not_published_again(new_bus: NewBus) -> None:
    async with trio.open_nursery() as nursery:
        node_a, seen_a = await start_node(nursery, new_bus)
        node_b, _ = await start_node(nursery, new_bus)
        await node_a.subscribe(1)

        first = await node_a.publish(Draft(1, "bob", "hello", T0, client_id="c1"))
        # a retry, on another node, whose first attempt's ack was lost
        again = await node_b.publish(Draft(1, "bob", "hello", T0 + 900, client_id="c1"))
        others = [
            await node_b.publish(Draft(1, "ann", "hello", T0, client_id="c1")),  # another user
            await node_a.publish(Draft(2, "bob", "hello", T0, client_id="c1")),  # another room
            await node_a.publish(Draft(1, "bob", "next", T0, client_id="c2")),
            await node_a.publish(Draft(1, "bob", "no id", T0)),
            await node_a.publish(Draft(1, "bob", "no id", T0)),
        ]

        sentinel = await node_a.publish(Draft(1, "bob", "end", T0))

        assert (again.offset, again.timestamp_ms) == (first.offset, first.timestamp_ms)
        assert [(m.room_id, m.offset) for m in others] == [(1, 2), (2, 1), (1, 3), (1, 4), (1, 5)]
        assert sentinel.offset == 6  # the retry took no offset, and was delivered once:
        assert [m.offset for m in await seen_a.wait_for_messages(1, 6)] == [1, 2, 3, 4, 5, 6]
        logged = await node_b.read_log(1, after_offset=0, limit=10)
        assert [m.text for m in logged] == ["hello", "hello", "next", "no id", "no id", "end"]
        nursery.cancel_scope.cancel()


async def test_a_membership_change_takes_an_offset_and_keeps_its_event(new_bus: NewBus) -> None:
    async with trio.open_nursery() as nursery:
        node_a, seen_a = await start_node(nursery, new_bus)
        node_b, seen_b = await start_node(nursery, new_bus)
        await node_a.subscribe(1)
        await node_b.subscribe(1)

        published = [
            await node_a.publish(draft(1, "before")),
            await node_a.publish(Draft.membership(1, "eve", ADDED, by="bob", at_ms=T0 + 1)),
            await node_b.publish(draft(1, "hi eve", at_ms=T0 + 2)),
            await node_b.publish(Draft.membership(1, "eve", LEFT, by="eve", at_ms=T0 + 3)),
            await node_a.publish(Draft.membership(1, "dan", REMOVED, by="bob", at_ms=T0 + 4)),
            await node_a.publish(Draft.membership(1, "dan", BANNED, by="ann", at_ms=T0 + 5)),
        ]

        assert [m.offset for m in published] == [1, 2, 3, 4, 5, 6]
        assert published[1] == ChatMessage(1, 2, "eve", "", T0 + 1, ADDED, "bob")
        assert [(m.event, m.by) for m in published] == [
            (None, None),
            (ADDED, "bob"),
            (None, None),
            (LEFT, "eve"),
            (REMOVED, "bob"),
            (BANNED, "ann"),
        ]
        assert await seen_a.wait_for_messages(1, 6) == published
        assert await seen_b.wait_for_messages(1, 6) == published
        assert await node_b.last_offset(1) == 6
        assert await node_b.read_log(1, after_offset=0, limit=10) == published
        assert await node_a.read_log(1, after_offset=1, limit=1) == published[1:2]
        assert [m.document for m in published[1:2]] == [
            b'{"chatroom":1,"offset":2,"user":"eve","message":"","timestamp":%d,'
            b'"event":"added","by":"bob"}' % (T0 + 1)
        ]
        nursery.cancel_scope.cancel()
