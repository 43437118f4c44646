"""Delivered/read cursors end to end on one embedded node: the ``received`` and ``read``
frames, ``receipt`` frames to the other members, their errors, ``GET .../receipts``, a
member resuming from their ``delivered`` cursor, and unread counts after ``read``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection

from tests.e2e.harness import api_client, auth, join, node_config, running_node, until_live
from tests.e2e.test_connect import connect, send_via_join

FAST = {"rate_messages_per_s": 10_000.0, "rate_burst": 10_000}


async def frames_until(ws: WebSocketConnection, kind: str, **match: Any) -> list[dict[str, Any]]:
    """Frames read up to and including the first of ``kind`` with ``match``'s fields."""
    seen = []
    while True:
        frame: dict[str, Any] = json.loads(await ws.get_message())
        seen.append(frame)
        if frame.get("type") == kind and all(frame.get(k) == v for k, v in match.items()):
            return seen


async def send(ws: WebSocketConnection, **frame: Any) -> None:
    await ws.send_message(json.dumps(frame))


async def test_received_and_read_become_receipts_for_the_others(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        bob = await api.user_with_token("bob")
        room = await api.create_room(bob, "lobby")
        await send_via_join(node, bob, room, ["one", "two", "three"])
        with trio.fail_after(20):
            async with join(node, room, token=bob) as bob_ws, join(node, room, token=ann) as ann_ws:
                await until_live(bob_ws)
                await until_live(ann_ws)

                await send(ann_ws, type="received", chatroom=room, offset=2)
                receipt = (await frames_until(bob_ws, "receipt", user="ann"))[-1]
                assert receipt == {
                    "type": "receipt",
                    "chatroom": room,
                    "user": "ann",
                    "delivered": 2,
                    "read": 0,
                }
                # read implies delivered; many acknowledgements coalesce into the latest
                for offset in (1, 2, 3):
                    await send(ann_ws, type="read", offset=offset)  # chatroom: optional here
                receipt = (await frames_until(bob_ws, "receipt", user="ann", read=3))[-1]
                assert receipt["delivered"] == 3

                # backwards: ignored; beyond the last offset, or another room: an error
                await send(ann_ws, type="read", chatroom=room, offset=1)
                await send(ann_ws, type="received", chatroom=room, offset=4)
                await send(ann_ws, type="read", chatroom=room + 1, offset=1)
                await send(ann_ws, type="received", chatroom=room, offset="x")
                await send(ann_ws, type="ping", id="p")
                seen = await frames_until(ann_ws, "pong", id="p")
                errors = [f["code"] for f in seen if f["type"] == "error"]
                assert errors == ["invalid_parameter", "not_subscribed", "invalid_frame"]
                assert not [f for f in seen if f["type"] == "receipt"]  # never one's own

                r = await api.client.get(f"/v1/chatrooms/{room}/receipts", headers=auth(bob))
                assert r.status_code == 200, r.text
                assert r.json() == {"receipts": [{"user": "ann", "delivered": 3, "read": 3}]}
        # written when the connection left: the same from the directory
        r = await api.client.get(f"/v1/chatrooms/{room}/receipts", headers=auth(ann))
        assert r.json() == {"receipts": [{"user": "ann", "delivered": 3, "read": 3}]}


async def test_receipts_of_a_private_room_are_for_its_members(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        eve = await api.user_with_token("eve")
        r = await api.client.post(
            "/v1/chatrooms", json={"name": "p", "visibility": "private"}, headers=auth(ann)
        )
        room = r.json()["id"]
        r = await api.client.get(f"/v1/chatrooms/{room}/receipts", headers=auth(eve))
        assert (r.status_code, r.json()["error"]["code"]) == (404, "room_not_found")
        r = await api.client.get(f"/v1/chatrooms/{room}/receipts", headers=auth(ann))
        assert r.json() == {"receipts": []}


async def test_connect_frames_name_a_subscribed_room(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        bob = await api.user_with_token("bob")
        room = await api.create_room(bob, "lobby")
        other = await api.create_room(bob, "other")
        await send_via_join(node, ann, room, ["hi"])
        with trio.fail_after(20):
            async with connect(node, ann) as c, join(node, room, token=bob) as bob_ws:
                await until_live(bob_ws)
                await c.until_live(room)
                await c.send(type="received", chatroom=other, offset=0)
                assert (await c.next("error"))["code"] == "not_subscribed"
                await c.send(type="read", offset=1)
                assert (await c.next("error"))["code"] == "invalid_frame"
                await c.send(type="read", chatroom=room, offset=9)
                assert (await c.next("error"))["code"] == "invalid_parameter"
                await c.send(type="read", chatroom=room, offset=1)
                receipt = (await frames_until(bob_ws, "receipt"))[-1]
                assert (receipt["user"], receipt["delivered"], receipt["read"]) == ("ann", 1, 1)


SENT = [0]


async def _send_many(node: Any, token: str, room: int, count: int) -> None:
    """``count`` messages, each with a client id of its own (the same id is sent once)."""
    first = SENT[0]
    SENT[0] += count
    await send_via_join(node, token, room, [f"m{i}" for i in range(first, first + count)])


async def test_a_member_resumes_from_their_delivered_cursor(tmp_path: Path) -> None:
    config = node_config(str(tmp_path), history_on_join=5, max_replay=40, **FAST)
    async with running_node(config) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        bob = await api.user_with_token("bob")
        room = await api.create_room(bob, "lobby")
        await _send_many(node, bob, room, 3)  # offsets 1..3 (bob's join is no message)
        with trio.fail_after(30):
            async with connect(node, ann) as c:  # ann is no member yet: rooms=all is empty
                await c.send(type="subscribe", chatroom=room)
                first = await c.until_live(room)
                assert first  # the newest history_on_join
                head = first[-1]
                await c.send(type="received", chatroom=room, offset=head)
                await c.send(type="ping", id="p")
                await c.next("pong")
            await _send_many(node, bob, room, 30)
            async with connect(node, ann) as c:  # rooms=all, no since: from the cursor
                replay = await c.until_live(room)
            assert replay == list(range(head + 1, head + 31))
            assert not c.of(room, "gap")

            # a join without since resumes the same way (nothing was acknowledged since)
            async with join(node, room, token=ann) as ws:
                _, history = await until_live(ws)
                assert [m["offset"] for m in history] == replay
                await send(ws, type="received", offset=replay[-1])

            # more than max_replay missed: gap, then the newest max_replay
            await _send_many(node, bob, room, 50)
            async with connect(node, ann) as c:
                replay2 = await c.until_live(room)
            gap = c.of(room, "gap")
            last = replay[-1] + 50
            assert gap == [
                {"type": "gap", "chatroom": room, "from": replay[-1] + 1, "to": last - 40}
            ]
            assert replay2 == list(range(last - 39, last + 1))

            # the plain dialect cannot acknowledge nor be told of a gap: newest history_on_join
            async with join(node, room, token=ann, v1=False) as ws:
                got = [json.loads(await ws.get_message()) for _ in range(5)]
            sent = [f"m{i}" for i in range(SENT[0] - 5, SENT[0])]  # plain shows no offset
            assert [m["message"] for m in got] == sent


async def test_unread_counts_after_read(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        bob = await api.user_with_token("bob")
        room = await api.create_room(bob, "lobby")
        quiet = await api.create_room(bob, "quiet")
        await send_via_join(node, ann, quiet, [])
        await send_via_join(node, ann, room, ["mine"])  # ann's own: never unread
        await _send_many(node, bob, room, 4)

        async def mine() -> tuple[dict[int, dict[str, Any]], int]:
            r = await api.client.get("/v1/me/chatrooms", headers=auth(ann))
            assert r.status_code == 200, r.text
            return {x["id"]: x for x in r.json()}, int(r.headers["chatnode-unread"])

        rooms, total = await mine()
        head = rooms[room]["last_offset"]
        assert (rooms[room]["read_offset"], rooms[room]["unread"]) == (0, 4)
        assert (rooms[quiet]["unread"], total) == (0, 4)
        with trio.fail_after(20):
            async with join(node, room, token=ann) as ws:
                await until_live(ws)
                await send(ws, type="read", offset=head - 2)
                await send(ws, type="ping", id="p")
                await frames_until(ws, "pong")
                rooms, total = await mine()  # not written yet: this node knows it
                assert (rooms[room]["read_offset"], rooms[room]["unread"]) == (head - 2, 2)
                await send(ws, type="read", offset=head)
                await send(ws, type="ping", id="p2")
                await frames_until(ws, "pong", id="p2")
        rooms, total = await mine()
        assert (rooms[room]["read_offset"], rooms[room]["unread"], total) == (head, 0, 0)


def _metric(text: str, name: str) -> float:
    return next(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{")
    )


async def test_acknowledging_every_message_writes_once_a_second(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        bob = await api.user_with_token("bob")
        room = await api.create_room(bob, "lobby")
        count = 500
        with trio.fail_after(30):
            async with join(node, room, token=ann) as ws:
                await until_live(ws)
                started = trio.current_time()
                await _send_many(node, bob, room, count)
                got = 0
                while got < count:
                    frame = json.loads(await ws.get_message())
                    if frame["type"] == "message":
                        got += 1
                        await send(ws, type="received", offset=frame["offset"])
                        await send(ws, type="read", offset=frame["offset"])
                await send(ws, type="ping", id="p")
                await frames_until(ws, "pong")
                elapsed_s = trio.current_time() - started
        text = (await api.client.get("/metrics")).text
        assert _metric(text, "chatnode_cursor_advances_total") >= count
        # one batch a second at most, plus the one as ann left
        assert _metric(text, "chatnode_cursor_writes_total") <= elapsed_s + 2
