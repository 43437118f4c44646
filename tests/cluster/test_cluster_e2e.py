"""The clustered deployment for real: two chatnode processes behind nginx on MySQL, Redis and
Elasticsearch; one room's members spread over both nodes."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from tests.cluster.cluster import running_cluster
from tests.cluster.harness import nginx_available
from tests.redis_support import RedisAdmin

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not nginx_available(), reason="nginx not installed (scripts/services install)"
    ),
]


async def token_for(client: httpx.AsyncClient, name: str) -> str:
    r = await client.post("/v1/users", json={"name": name, "password": "correct-horse-battery"})
    assert r.status_code == 201, r.text
    r = await client.post("/v1/tokens", json={"name": name, "password": "correct-horse-battery"})
    token: str = r.json()["token"]
    return token


async def read_until_live(ws: WebSocketConnection) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    joined = json.loads(await ws.get_message())
    history = []
    while (frame := json.loads(await ws.get_message()))["type"] != "live":
        history.append(frame)
    return joined, history


async def chat_messages(ws: WebSocketConnection, count: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len(got) < count:
        frame = json.loads(await ws.get_message())
        if frame["type"] == "message":
            got.append(frame)
    return got


async def poll(what: str, check: Any, *, timeout_s: float = 30.0) -> Any:
    """An external system (the archiver into Elasticsearch) gets there eventually: poll it,
    bounded. Nothing in chatnode signals "indexed" to a client."""
    with trio.fail_after(timeout_s):
        while not (result := await check()):  # noqa: ASYNC110 -- Elasticsearch has no event to wait on
            await trio.sleep(0.2)
    return result


async def test_one_room_across_two_nodes_through_nginx(tmp_path: object) -> None:
    async with running_cluster(nodes=2) as cluster, httpx.AsyncClient(base_url=cluster.url) as api:
        tokens = {f"user{i}": await token_for(api, f"user{i}") for i in range(8)}
        r = await api.post(
            "/v1/chatrooms",
            json={"name": "spread"},
            headers={"Authorization": f"Bearer {tokens['user0']}"},
        )
        room = r.json()["id"]
        per_user = 5
        total = per_user * len(tokens)
        received: dict[str, list[tuple[int, str, str]]] = {}
        nodes: dict[str, str] = {}
        all_live = trio.Event()
        live_count = 0

        async def member(name: str, token: str) -> None:
            nonlocal live_count
            url = f"{cluster.ws_url}/v1/chatrooms/{room}/join?token={token}"
            async with open_websocket_url(url, subprotocols=["chatnode.v1"]) as ws:
                joined, _ = await read_until_live(ws)
                nodes[name] = joined["node"]
                live_count += 1
                if live_count == len(tokens):
                    all_live.set()
                await all_live.wait()
                for i in range(per_user):
                    await ws.send_message(
                        json.dumps({"type": "send", "message": f"{name} says {i}"})
                    )
                got = await chat_messages(ws, total)
                received[name] = [(m["offset"], m["user"], m["message"]) for m in got]

        async with trio.open_nursery() as nursery:
            for name, token in tokens.items():
                nursery.start_soon(member, name, token)

        assert set(nodes.values()) == {"node1", "node2"}, nodes  # the room spans both nodes
        orders = list(received.values())
        assert all(order == orders[0] for order in orders)  # same messages, same order, everywhere
        assert [offset for offset, _, _ in orders[0]] == list(range(1, total + 1))
        for name in tokens:  # each sender's own messages in the order it sent them
            mine = [text for _, user, text in orders[0] if user == name]
            assert mine == [f"{name} says {i}" for i in range(per_user)]

        r = await api.get(
            f"/v1/chatrooms/{room}/users", headers={"Authorization": f"Bearer {tokens['user0']}"}
        )
        assert sorted(r.json()["users"]) == sorted(tokens)


async def test_late_joiner_gets_history_from_elasticsearch_beyond_the_room_log() -> None:
    async with (
        running_cluster(nodes=2, room_log_length=10, history_on_join=400) as cluster,
        httpx.AsyncClient(base_url=cluster.url) as api,
    ):
        ann = await token_for(api, "ann")
        bob = await token_for(api, "bob")
        auth = {"Authorization": f"Bearer {ann}"}
        room = (await api.post("/v1/chatrooms", headers=auth)).json()["id"]
        total = 350
        url = f"{cluster.ws_url}/v1/chatrooms/{room}/join?token={ann}"
        async with open_websocket_url(url, subprotocols=["chatnode.v1"]) as ws:
            await read_until_live(ws)
            for i in range(total):
                await ws.send_message(json.dumps({"type": "send", "message": f"m{i}"}))
            await chat_messages(ws, total)

        async with RedisAdmin.from_url(cluster.env["CHATNODE_REDIS_URL"]) as redis:
            first = await redis.xrange(f"{cluster.prefix}:room:{room}:log", count=1)
        first_logged = int(first[0].identifier.split(b"-")[0])
        assert first_logged > 1, (
            "the room log was not trimmed: this test would not reach Elasticsearch"
        )

        async def archived() -> bool:
            r = await api.get(
                f"/v1/chatrooms/{room}/messages",
                params={"before": first_logged, "limit": 1},
                headers=auth,
            )
            return r.status_code == 200 and len(r.json()["messages"]) == 1

        await poll("archiver indexed the trimmed part", archived)

        url = f"{cluster.ws_url}/v1/chatrooms/{room}/join?token={bob}"
        async with open_websocket_url(url, subprotocols=["chatnode.v1"]) as ws:
            joined, history = await read_until_live(ws)
        assert joined["offset"] == total
        assert [m["offset"] for m in history] == list(range(1, total + 1))
        assert [m["message"] for m in history] == [f"m{i}" for i in range(total)]


async def test_search_through_either_node_finds_messages_sent_through_the_other() -> None:
    async with (
        running_cluster(nodes=2) as cluster,
        httpx.AsyncClient(base_url=cluster.node_url(0)) as node1,
        httpx.AsyncClient(base_url=cluster.node_url(1)) as node2,
    ):
        token = await token_for(node1, "ann")
        auth = {"Authorization": f"Bearer {token}"}
        room = (await node1.post("/v1/chatrooms", headers=auth)).json()["id"]
        for port, text in (
            (cluster.node_ports[0], "zebra crossing on node one"),
            (cluster.node_ports[1], "giraffe sighting on node two"),
        ):
            url = f"ws://127.0.0.1:{port}/v1/chatrooms/{room}/join?token={token}"
            async with open_websocket_url(url, subprotocols=["chatnode.v1"]) as ws:
                await read_until_live(ws)
                await ws.send_message(json.dumps({"type": "send", "message": text}))
                await chat_messages(ws, 1)

        async def found(client: httpx.AsyncClient, word: str) -> list[dict[str, Any]]:
            r = await client.get("/v1/messages/search", params={"q": word}, headers=auth)
            assert r.status_code == 200, r.text
            hits: list[dict[str, Any]] = r.json()["hits"]
            return hits

        zebra = await poll("zebra indexed", lambda: found(node2, "zebra"))
        giraffe = await poll("giraffe indexed", lambda: found(node1, "giraffe"))
        assert zebra[0]["message"] == "zebra crossing on node one" and zebra[0]["offset"] == 1
        assert giraffe[0]["message"] == "giraffe sighting on node two" and giraffe[0]["offset"] == 2
        assert zebra[0]["chatroom"] == room and zebra[0]["user"] == "ann"


async def test_a_send_retried_on_the_other_node_is_stored_once() -> None:
    """A client whose connection to node 1 dropped before the ``ack`` reconnects to node 2
    and sends again with the same ``id``: the same ack, one message for every member, one
    document in Elasticsearch."""
    async with running_cluster(nodes=2) as cluster, httpx.AsyncClient(base_url=cluster.url) as api:
        ann = await token_for(api, "ann")
        bob = await token_for(api, "bob")
        headers = {"Authorization": f"Bearer {ann}"}
        room = (await api.post("/v1/chatrooms", headers=headers)).json()["id"]
        frame = json.dumps({"type": "send", "id": "retry-1", "message": "once"})

        def url(node: int, token: str) -> str:
            return (
                f"ws://127.0.0.1:{cluster.node_ports[node]}/v1/chatrooms/{room}/join?token={token}"
            )

        async with open_websocket_url(url(0, bob), subprotocols=["chatnode.v1"]) as watcher:
            await read_until_live(watcher)
            async with open_websocket_url(url(0, ann), subprotocols=["chatnode.v1"]) as ws:
                await read_until_live(ws)
                await ws.send_message(frame)
                first = await next_ack(ws)
            async with open_websocket_url(url(1, ann), subprotocols=["chatnode.v1"]) as ws:
                joined, _ = await read_until_live(ws)
                assert joined["node"] == "node2"
                await ws.send_message(frame)
                again = await next_ack(ws)
                await ws.send_message(json.dumps({"type": "send", "id": "retry-2", "message": "2"}))
                second = await next_ack(ws)
            got = await chat_messages(watcher, 2)

        assert (again["offset"], again["timestamp"]) == (first["offset"], first["timestamp"])
        assert second["offset"] == first["offset"] + 1
        assert [(m["offset"], m["message"]) for m in got] == [(1, "once"), (2, "2")]
        r = await api.get(f"/v1/chatrooms/{room}/messages", headers=headers)
        assert [m["message"] for m in r.json()["messages"]] == ["once", "2"]


async def next_ack(ws: WebSocketConnection) -> dict[str, Any]:
    while (frame := json.loads(await ws.get_message()))["type"] != "ack":
        pass
    return frame


async def test_connect_through_nginx_gets_each_rooms_messages_from_the_other_node() -> None:
    """A ``/v1/connect`` client (through nginx, on one node) subscribed to three rooms gets
    what two senders send on the other node in two of them, once each, in offset order; a
    room its user joins on the other node meanwhile is subscribed too (hub Rule 9)."""
    async with running_cluster(nodes=2) as cluster, httpx.AsyncClient(base_url=cluster.url) as api:
        ann, bob, cid = [await token_for(api, name) for name in ("ann", "bob", "cid")]
        headers = {"Authorization": f"Bearer {bob}"}
        rooms = [(await api.post("/v1/chatrooms", headers=headers)).json()["id"] for _ in range(4)]
        r1, r2, r3, r4 = rooms

        def url(node: int, room: int, token: str) -> str:
            port = cluster.node_ports[node]
            return f"ws://127.0.0.1:{port}/v1/chatrooms/{room}/join?token={token}"

        for room in (r1, r2, r3):  # ann becomes a member, on node 1
            async with open_websocket_url(url(0, room, ann), subprotocols=["chatnode.v1"]) as ws:
                await read_until_live(ws)
        per_sender = 30
        with trio.fail_after(60):
            connect_url = f"{cluster.ws_url}/v1/connect?token={ann}"
            async with open_websocket_url(connect_url, subprotocols=["chatnode.v1"]) as c:
                frames: list[dict[str, Any]] = []
                live: set[int] = set()
                while live != {r1, r2, r3}:
                    frames.append(json.loads(await c.get_message()))
                    if frames[-1]["type"] == "live":
                        live.add(frames[-1]["chatroom"])
                mine = next(f["node"] for f in frames if f["type"] == "joined")
                other = 1 if mine == "node1" else 0

                async def sender(token: str, room: int, name: str) -> None:
                    async with open_websocket_url(
                        url(other, room, token), subprotocols=["chatnode.v1"]
                    ) as ws:
                        joined, _ = await read_until_live(ws)
                        assert joined["node"] != mine
                        for i in range(per_sender):
                            await ws.send_message(
                                json.dumps({"type": "send", "message": f"{name} {i}"})
                            )
                        for _ in range(per_sender):
                            await next_ack(ws)

                async with trio.open_nursery() as nursery:
                    for room in (r1, r2):
                        nursery.start_soon(sender, bob, room, "bob")
                        nursery.start_soon(sender, cid, room, "cid")
                got: dict[int, list[dict[str, Any]]] = {r1: [], r2: [], r3: []}
                while len(got[r1]) + len(got[r2]) < 4 * per_sender:
                    frame = json.loads(await c.get_message())
                    if frame["type"] == "message":
                        got[frame["chatroom"]].append(frame)
                for room in (r1, r2):
                    assert [m["offset"] for m in got[room]] == list(range(1, 2 * per_sender + 1))
                    for name in ("bob", "cid"):
                        texts = [m["message"] for m in got[room] if m["user"] == name]
                        assert texts == [f"{name} {i}" for i in range(per_sender)]
                assert got[r3] == []

                # ann joins r4 on the other node: her connection here subscribes it
                async with open_websocket_url(
                    url(other, r4, ann), subprotocols=["chatnode.v1"]
                ) as ws:
                    await read_until_live(ws)
                    await ws.send_message(json.dumps({"type": "send", "message": "new room"}))
                    await next_ack(ws)
                while True:
                    frame = json.loads(await c.get_message())
                    if frame["chatroom"] == r4 and frame["type"] == "message":
                        assert (frame["offset"], frame["message"]) == (1, "new room")
                        break
