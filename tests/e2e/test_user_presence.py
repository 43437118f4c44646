"""User presence end to end on one embedded node: ``GET /v1/users/{name}``, the ``presence``
frames of ``/v1/connect`` (``online``, ``last_seen``) for direct-room partners, their
coalescing, and ``typing`` forwarded once per ``CHATNODE_TYPING_INTERVAL_S``."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import trio
from trio_websocket import open_websocket_url

from tests.e2e.harness import Api, api_client, auth, join, node_config, running_node, until_live
from tests.e2e.test_connect import FAST, Client, connect


async def direct(api: Api, token: str, other: str) -> int:
    r = await api.client.post("/v1/direct", json={"user": other}, headers=auth(token))
    assert r.status_code in (200, 201), r.text
    room_id: int = r.json()["id"]
    return room_id


async def presence_of(api: Api, token: str, name: str) -> tuple[int, dict[str, Any]]:
    r = await api.client.get(f"/v1/users/{name}", headers=auth(token))
    body: dict[str, Any] = r.json()
    return r.status_code, body


def is_user_presence(frame: dict[str, Any], user: str) -> bool:
    return frame["type"] == "presence" and "online" in frame and frame["user"] == user


async def next_user_presence(c: Client, user: str) -> dict[str, Any]:
    while True:
        frame = await c.next("presence", user=user)
        if "online" in frame:
            return frame


async def test_get_user_presence_for_self_and_contacts_only(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        bob = await api.user_with_token("bob")
        carol = await api.user_with_token("carol")
        await direct(api, ann, "bob")
        with trio.fail_after(20):
            assert await presence_of(api, ann, "bob") == (
                200,
                {"name": "bob", "online": False, "last_seen": None},
            )
            status, body = await presence_of(api, ann, "nobody")
            assert (status, body["error"]["code"]) == (404, "user_not_found")
            # a stranger (no direct or private room shared) sees no presence
            status, body = await presence_of(api, carol, "bob")
            assert (status, body["error"]["code"]) == (404, "user_not_found")
            status, body = await presence_of(api, carol, "carol")
            assert status == 200 and body["name"] == "carol"
            assert (await api.client.get("/v1/users/bob")).status_code == 401

            async with connect(node, ann) as watcher:
                async with connect(node, bob):
                    online = await next_user_presence(watcher, "bob")
                    status, body = await presence_of(api, ann, "bob")
                    assert status == 200 and body["online"] is True
                    assert body["last_seen"] >= online["last_seen"]
                offline = await next_user_presence(watcher, "bob")
            assert offline["online"] is False
            assert await presence_of(api, ann, "bob") == (
                200,
                {"name": "bob", "online": False, "last_seen": offline["last_seen"]},
            )


async def test_a_dm_partner_connecting_and_leaving_reaches_the_connection(
    tmp_path: Path,
) -> None:
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        bob = await api.user_with_token("bob")
        carol = await api.user_with_token("carol")
        dm = await direct(api, ann, "bob")
        lobby = await api.create_room(carol, "lobby")
        async with join(node, lobby, token=ann) as ws:  # a public room shares no presence
            await until_live(ws)
        with trio.fail_after(20):
            async with connect(node, ann) as c:
                await c.until_live(dm)
                async with connect(node, carol), connect(node, bob) as b:
                    await b.until_live(dm)
                    online = await next_user_presence(c, "bob")
                    assert online == {
                        "type": "presence",
                        "chatroom": None,
                        "user": "bob",
                        "online": True,
                        "last_seen": online["last_seen"],
                    }
                    assert isinstance(online["last_seen"], int)
                    # the room's own presence event is still there, per room
                    joined = await c.next("presence", chatroom=dm, user="bob")
                    assert joined["event"] == "join" and "online" not in joined
                offline = await next_user_presence(c, "bob")
                assert offline["online"] is False
                assert offline["last_seen"] >= online["last_seen"]
                assert not [f for f in c.frames if is_user_presence(f, "carol")]


async def test_a_flapping_partner_costs_at_most_a_frame_a_second(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        bob = await api.user_with_token("bob")
        await direct(api, ann, "bob")
        with trio.fail_after(30):
            async with connect(node, ann) as c:
                for _ in range(8):
                    url = f"{node.ws_url}/v1/connect?token={bob}&rooms=none"
                    async with open_websocket_url(url, subprotocols=["chatnode.v1"]):
                        pass
                # read until the frame that shows bob's final state: offline, and the store
                # says the same (every one of his connections' cleanups has run)
                received: list[tuple[float, dict[str, Any]]] = []
                while True:
                    frame = await next_user_presence(c, "bob")
                    received.append((trio.current_time(), frame))
                    if frame["online"]:
                        continue
                    _, state = await presence_of(api, ann, "bob")
                    if not state["online"] and state["last_seen"] == frame["last_seen"]:
                        break
        times = [at for at, _ in received]
        assert len(received) <= 4, received
        assert all(b - a >= 0.9 for a, b in itertools.pairwise(times)), times


async def test_typing_is_forwarded_once_per_interval(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        assert node.app.config.typing_interval_s == 2.0
        ann = await api.user_with_token("ann")
        bob = await api.user_with_token("bob")
        dm = await direct(api, ann, "bob")
        with trio.fail_after(20):
            async with connect(node, ann) as a, connect(node, bob) as b:
                await a.until_live(dm)
                await b.until_live(dm)
                for _ in range(5):
                    await a.send(type="typing", chatroom=dm)
                await a.send(type="send", chatroom=dm, message="done", id="m")
                await b.next("message", chatroom=dm)
                typing = [f for f in b.of(dm, "typing") if f["user"] == "ann"]
                assert len(typing) == 1


async def test_a_group_joined_while_connected_watches_its_members(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path), **FAST)) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        bob = await api.user_with_token("bob")
        with trio.fail_after(20):
            async with connect(node, ann) as c:
                r = await api.client.post(
                    "/v1/chatrooms",
                    json={"name": "group", "visibility": "private"},
                    headers=auth(bob),
                )
                assert r.status_code == 201, r.text
                group = r.json()["id"]
                r = await api.client.post(
                    f"/v1/chatrooms/{group}/members", json={"user": "ann"}, headers=auth(bob)
                )
                assert r.status_code == 201, r.text
                await c.until_live(group)  # subscribed: the membership reached the connection
                async with connect(node, bob) as b:
                    await b.until_live(group)
                    assert (await next_user_presence(c, "bob"))["online"] is True
