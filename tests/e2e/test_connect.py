"""``GET /v1/connect`` end to end on one embedded node: one WebSocket for all of a user's
rooms, each room with the guarantees of its own join."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from tests.e2e.harness import (
    PASSWORD,
    Api,
    api_client,
    auth,
    join,
    node_config,
    raw_websocket,
    running_node,
    until_live,
)

FAST = {"rate_messages_per_s": 10_000.0, "rate_burst": 10_000}


@asynccontextmanager
async def connect(node: Any, token: str) -> AsyncIterator[Client]:
    url = f"{node.ws_url}/v1/connect?token={token}"
    async with open_websocket_url(url, subprotocols=["chatnode.v1"]) as ws:
        yield Client(ws)


class Client:
    """A /v1/connect client that sorts what it reads by room."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def send(self, **frame: Any) -> None:
        await self.ws.send_message(json.dumps(frame))

    async def next(self, kind: str | None = None, **match: Any) -> dict[str, Any]:
        """The next frame (of ``kind``, with ``match``'s fields); every frame read is kept."""
        while True:
            frame: dict[str, Any] = json.loads(await self.ws.get_message())
            assert "chatroom" in frame, frame  # every server frame names its room
            self.frames.append(frame)
            if (kind is None or frame["type"] == kind) and all(
                frame.get(k) == v for k, v in match.items()
            ):
                return frame

    async def until_live(self, room: int) -> list[int]:
        """Read until the room's latest replay went ``live`` (rooms replay in any order);
        the offsets of that replay."""
        while True:
            mine = [f for f in self.frames if f["chatroom"] == room]
            starts = [i for i, f in enumerate(mine) if f["type"] == "joined"]
            if starts:
                replay = mine[starts[-1] :]
                ends = [i for i, f in enumerate(replay) if f["type"] == "live"]
                if ends:
                    return [f["offset"] for f in replay[: ends[0]] if f["type"] == "message"]
            await self.next()

    def of(self, room: int, kind: str = "message") -> list[dict[str, Any]]:
        return [f for f in self.frames if f["chatroom"] == room and f["type"] == kind]


async def member_of(node: Any, token: str, *rooms: int) -> None:
    """Make the token's user a member of ``rooms`` the way users become members today."""
    for room in rooms:
        async with join(node, room, token=token) as ws:
            await until_live(ws)


async def send_via_join(node: Any, token: str, room: int, texts: list[str]) -> None:
    async with join(node, room, token=token) as ws:
        await until_live(ws)
        for text in texts:
            await ws.send_message(json.dumps({"type": "send", "message": text, "id": text}))
        acked = 0
        while acked < len(texts):
            if json.loads(await ws.get_message())["type"] == "ack":
                acked += 1


async def users_and_rooms(api: Api, count: int) -> tuple[str, str, list[int]]:
    ann = await api.user_with_token("ann")
    bob = await api.user_with_token("bob")
    rooms = [await api.create_room(bob, f"r{i}") for i in range(count)]
    return ann, bob, rooms


async def test_connect_subscribes_my_rooms_and_frames_name_their_room(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        ann, bob, (r1, r2, r3) = await users_and_rooms(api, 3)
        await member_of(node, ann, r1, r2)
        await send_via_join(node, bob, r1, ["a", "b"])
        await send_via_join(node, bob, r3, ["c"])
        with trio.fail_after(20):
            async with connect(node, ann) as c:
                replays = {r1: await c.until_live(r1), r2: await c.until_live(r2)}
                assert replays == {r1: [1, 2], r2: []}
                assert not c.of(r3, "joined")

                await c.send(type="send", chatroom=r2, message="hi", id="s1")
                ack = await c.next("ack", id="s1")
                assert ack["chatroom"] == r2 and ack["offset"] == 1
                assert (await c.next("message", chatroom=r2))["message"] == "hi"

                # without a room, or a room it is not subscribed to: an error, the connection
                # stays open
                await c.send(type="send", message="where?", id="s2")
                error = await c.next("error", id="s2")
                assert (error["code"], error["chatroom"]) == ("invalid_frame", None)
                await c.send(type="send", chatroom=r3, message="not mine", id="s3")
                error = await c.next("error", id="s3")
                assert (error["code"], error["chatroom"]) == ("not_subscribed", r3)
                await c.send(type="typing", chatroom=r3)
                assert (await c.next("error"))["code"] == "not_subscribed"
                await c.send(type="unsubscribe", chatroom=r3)
                assert (await c.next("error"))["code"] == "not_subscribed"
                await c.send(type="ping", id="p1")
                assert (await c.next("pong"))["id"] == "p1"

                # subscribe with since: exactly what follows it
                await c.send(type="subscribe", chatroom=r3, since=0)
                assert await c.until_live(r3) == [1]
                await c.send(type="subscribe", chatroom=r3)
                assert (await c.next("error", chatroom=r3))["code"] == "already_subscribed"

                # unsubscribe: acknowledged, and nothing more of the room
                await c.send(type="unsubscribe", chatroom=r1)
                gone = await c.next("unsubscribed", chatroom=r1)
                assert gone["reason"] == "unsubscribed"
                seen = len(c.frames)
                await send_via_join(node, bob, r1, ["after"])
                await send_via_join(node, bob, r2, ["marker"])
                await c.next("message", chatroom=r2, message="marker")
                assert [f for f in c.frames[seen:] if f["chatroom"] == r1] == []

                # a room that does not exist: refused by its join, the connection lives on
                await c.send(type="subscribe", chatroom=999)
                gone = await c.next("unsubscribed", chatroom=999)
                assert gone["reason"] == "room_not_found"
                await c.send(type="send", chatroom=r3, message="still here", id="s4")
                assert (await c.next("ack", id="s4"))["offset"] == 2


async def test_each_room_replays_then_goes_live_without_gap_or_duplicate(tmp_path: Path) -> None:
    config = node_config(str(tmp_path), history_on_join=1000, **FAST)
    async with running_node(config) as node, api_client(node) as api:
        ann, bob, rooms = await users_and_rooms(api, 3)
        await member_of(node, ann, *rooms)
        total = 150
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def blast(room: int) -> None:
                    await send_via_join(node, bob, room, [f"m{i}" for i in range(total)])

                for room in rooms:
                    nursery.start_soon(blast, room)
                await trio.lowlevel.checkpoint()  # traffic has started (order is checked)
                async with connect(node, ann) as c:
                    for room in rooms:
                        await c.until_live(room)
                    while any(len(c.of(room)) < total for room in rooms):
                        await c.next("message")
            for room in rooms:
                assert [m["offset"] for m in c.of(room)] == list(range(1, total + 1))


async def test_reconnect_with_no_rooms_then_since_per_room(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        ann, bob, (r1, r2) = await users_and_rooms(api, 2)
        await member_of(node, ann, r1, r2)
        await send_via_join(node, bob, r1, ["a", "b", "c"])
        with trio.fail_after(20):
            url = f"{node.ws_url}/v1/connect?rooms=none&token={ann}"
            async with open_websocket_url(url, subprotocols=["chatnode.v1"]) as ws:
                c = Client(ws)
                await c.send(type="subscribe", chatroom=r1, since=2)
                assert await c.until_live(r1) == [3]
                await c.send(type="ping", id="p")
                await c.next("pong", id="p")
                assert not c.of(r2, "joined")
            r = await api.client.get(
                "/v1/connect?rooms=some",
                headers={
                    **auth(ann),
                    "Upgrade": "websocket",
                    "Connection": "Upgrade",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                    "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Protocol": "chatnode.v1",
                },
            )
            assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_parameter")


async def test_resume_of_a_room_with_since(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        ann, bob, (r1,) = await users_and_rooms(api, 1)
        await member_of(node, ann, r1)
        await send_via_join(node, bob, r1, [f"m{i}" for i in range(5)])
        with trio.fail_after(20):
            async with connect(node, ann) as c:
                assert await c.until_live(r1) == [1, 2, 3, 4, 5]
                await c.send(type="unsubscribe", chatroom=r1)
                await c.next("unsubscribed", chatroom=r1)
                await send_via_join(node, bob, r1, ["m5", "m6"])
                await c.send(type="subscribe", chatroom=r1, since=5)
                joined = await c.next("joined", chatroom=r1)
                assert (joined["offset"], joined["history"]) == (7, 2)
                assert await c.until_live(r1) == [6, 7]


async def test_room_limit_and_subscription_rate(tmp_path: Path) -> None:
    config = node_config(
        str(tmp_path), max_connection_rooms=2, rate_subscribe_burst=3, rate_subscribes_per_s=0.01
    )
    async with running_node(config) as node, api_client(node) as api:
        ann, _, (r1, r2, r3) = await users_and_rooms(api, 3)
        await member_of(node, ann, r1)
        with trio.fail_after(20):
            async with connect(node, ann) as c:
                await c.until_live(r1)
                await c.send(type="subscribe", chatroom=r2)
                await c.until_live(r2)
                await c.send(type="subscribe", chatroom=r3)
                error = await c.next("error", chatroom=r3)
                assert error["code"] == "too_many_rooms"
                await c.send(type="unsubscribe", chatroom=r2)
                await c.next("unsubscribed", chatroom=r2)
                await c.send(type="subscribe", chatroom=r3)
                await c.until_live(r3)
                await c.send(type="unsubscribe", chatroom=r3)  # the 4th change: over the burst
                error = await c.next("error", chatroom=r3)
                assert error["code"] == "rate_limited" and error["retry_after_s"] > 0


async def test_removal_from_one_room_unsubscribes_it_and_keeps_the_rest(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        ann, bob, (r1, r2) = await users_and_rooms(api, 2)
        await member_of(node, ann, r1, r2)
        with trio.fail_after(20):
            async with connect(node, ann) as c:
                await c.until_live(r1)
                await c.until_live(r2)
                r = await api.client.delete(f"/v1/chatrooms/{r1}/members/ann", headers=auth(ann))
                assert r.status_code == 200 and r.json()["removed"], r.text
                gone = await c.next("unsubscribed", chatroom=r1)
                assert gone["reason"] == "removed"
                await send_via_join(node, bob, r2, ["still"])
                assert (await c.next("message", chatroom=r2))["message"] == "still"
                await c.send(type="send", chatroom=r1, message="x", id="x")
                assert (await c.next("error", id="x"))["code"] == "not_subscribed"


async def test_a_room_joined_elsewhere_while_connected_is_subscribed(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        ann, bob, (r1, r2) = await users_and_rooms(api, 2)
        await member_of(node, ann, r1)
        with trio.fail_after(20):
            async with connect(node, ann) as c:
                await c.until_live(r1)
                await send_via_join(node, ann, r2, ["from my phone"])  # ann's new room
                assert await c.until_live(r2) in ([1], [])
                await send_via_join(node, bob, r2, ["hello"])
                assert (await c.next("message", chatroom=r2, user="bob"))["message"] == "hello"


async def test_handshake_refusals(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path))) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        headers = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        }
        async with httpx.AsyncClient(base_url=node.http_url, timeout=10) as client:
            r = await client.get(f"/v1/connect?token={ann}", headers=headers)
            assert (r.status_code, r.json()["error"]["code"]) == (400, "bad_handshake")
            v1 = {**headers, "Sec-WebSocket-Protocol": "chatnode.v1"}
            r = await client.get("/v1/connect", headers=v1)
            assert (r.status_code, r.json()["error"]["code"]) == (401, "token_required")
            r = await client.get("/v1/connect", headers=auth(ann))
            assert (r.status_code, r.json()["error"]["code"]) == (426, "upgrade_required")


async def test_slow_consumer_on_a_multi_room_connection_gets_4001(tmp_path: Path) -> None:
    config = node_config(
        str(tmp_path), send_backlog_bytes=64 * 1024, rate_messages_per_s=1e6, rate_burst=1_000_000
    )
    async with running_node(config) as node, api_client(node) as api:
        ann, bob, (r1, r2) = await users_and_rooms(api, 2)
        await member_of(node, ann, r1, r2)
        slow = await raw_websocket(node.port, f"/v1/connect?token={ann}")
        total, text = 3000, "x" * 2000
        with trio.fail_after(120):
            async with (
                connect(node, ann) as fast,
                join(node, r1, token=bob) as s1,
                join(node, r2, token=bob) as s2,
            ):
                await fast.until_live(r1)
                await fast.until_live(r2)
                await until_live(s1)
                await until_live(s2)
                # the sender stays at most `window` messages ahead of the reading connection,
                # so its backlog stays far below the bound; the one that never reads is cut
                window, got = 8, 0
                progressed = trio.Event()

                async def read() -> None:
                    nonlocal got, progressed
                    while got < total:
                        await fast.next("message")
                        got += 1
                        progressed.set()
                        progressed = trio.Event()

                async def send_all() -> None:
                    for i in range(total):
                        while i - got >= window:
                            await progressed.wait()
                        sender = s1 if i % 2 else s2
                        await sender.send_message(
                            json.dumps({"type": "send", "message": f"{i} {text}"})
                        )

                async def drain(ws: WebSocketConnection) -> None:
                    while True:
                        await ws.get_message()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(drain, s1)
                    nursery.start_soon(drain, s2)
                    async with trio.open_nursery() as traffic:
                        traffic.start_soon(send_all)
                        traffic.start_soon(read)
                    nursery.cancel_scope.cancel()
                for room in (r1, r2):
                    assert [m["offset"] for m in fast.of(room)] == list(range(1, total // 2 + 1))
            received = 0
            while chunk := await slow.recv(65536):
                received += len(chunk)
            assert received < total * len(text)
            slow.close()
            metrics = (await api.client.get("/metrics")).text
            assert 'code="4001"} 1' in metrics, metrics


async def test_the_connection_is_online_in_each_room(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path))) as node, api_client(node) as api:
        ann, bob, (r1, r2) = await users_and_rooms(api, 2)
        await member_of(node, ann, r1, r2)
        with trio.fail_after(20):
            async with connect(node, ann) as c:
                await c.until_live(r1)
                await c.until_live(r2)
                for room in (r1, r2):
                    r = await api.client.get(f"/v1/chatrooms/{room}/users", headers=auth(bob))
                    assert r.json()["online"] == ["ann"]


async def test_a_revoked_token_closes_the_connection_in_any_or_no_room(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path))) as node, api_client(node) as api:
        ann, _, (r1,) = await users_and_rooms(api, 1)
        await member_of(node, ann, r1)
        second = (
            await api.client.post("/v1/tokens", json={"name": "ann", "password": PASSWORD})
        ).json()["token"]
        with trio.fail_after(20):
            async with connect(node, ann) as c:
                await c.until_live(r1)
                url = f"{node.ws_url}/v1/connect?rooms=none&token={second}"
                async with open_websocket_url(url, subprotocols=["chatnode.v1"]) as bare:
                    for token in (ann, second):
                        r = await api.client.delete("/v1/tokens/current", headers=auth(token))
                        assert r.status_code == 204, r.text
                    for ws in (c.ws, bare):
                        with pytest.raises(ConnectionClosed) as closed:
                            while True:
                                await ws.get_message()
                        assert closed.value.reason.code == 4501


async def test_a_member_added_to_a_group_while_connected_is_subscribed(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        bob = await api.user_with_token("bob")
        r = await api.client.post(
            "/v1/chatrooms", json={"name": "team", "visibility": "private"}, headers=auth(bob)
        )
        assert r.status_code == 201, r.text
        group = r.json()["id"]
        await send_via_join(node, bob, group, ["before ann"])  # offset 1
        with trio.fail_after(20):
            async with connect(node, ann) as c:
                await c.send(type="subscribe", chatroom=group)  # not a member yet: hidden
                refused = await c.next("unsubscribed", chatroom=group)
                assert refused["reason"] == "room_not_found"
                r = await api.client.post(
                    f"/v1/chatrooms/{group}/members", json={"user": "ann"}, headers=auth(bob)
                )
                assert r.status_code == 201, r.text
                # subscribed at once, from her "added" change (offset 2) on: nothing before it
                assert await c.until_live(group) == []
                (added,) = c.of(group, "member")
                assert {k: added[k] for k in ("offset", "user", "event", "by")} == {
                    "offset": 2,
                    "user": "ann",
                    "event": "added",
                    "by": "bob",
                }
                await send_via_join(node, bob, group, ["welcome"])
                got = await c.next("message", chatroom=group, user="bob")
                assert (got["message"], got["offset"]) == ("welcome", 3)


async def test_rooms_made_while_connected_are_subscribed_by_their_members(tmp_path: Path) -> None:
    """A direct room and a private group made while their users are connected reach every
    member's ``/v1/connect`` at once (hub Rule 9)."""
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        bob = await api.user_with_token("bob")
        with trio.fail_after(20):
            async with connect(node, ann) as a, connect(node, bob) as b:
                r = await api.client.post("/v1/direct", json={"user": "bob"}, headers=auth(ann))
                assert r.status_code == 201, r.text
                direct = r.json()["id"]
                assert await a.until_live(direct) == []
                assert await b.until_live(direct) == []
                r = await api.client.post(
                    "/v1/chatrooms",
                    json={"name": "team", "visibility": "private", "members": ["ann"]},
                    headers=auth(bob),
                )
                assert r.status_code == 201, r.text
                group = r.json()["id"]
                assert await a.until_live(group) == []
                assert await b.until_live(group) == []
                await a.send(type="send", chatroom=direct, message="hello bob", id="d1")
                got = await b.next("message", chatroom=direct)
                assert (got["user"], got["message"]) == ("ann", "hello bob")
