"""End to end on one embedded node: real sockets, real WebSocket clients."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio
import trio.lowlevel
from trio_websocket import ConnectionClosed, ConnectionRejected

from tests.e2e.harness import (
    api_client,
    auth,
    grant_admin,
    join,
    messages,
    next_of_type,
    node_config,
    running_node,
    until_live,
)


async def test_rest_rooms_users_and_tokens(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path))) as node, api_client(node) as api:
        c = api.client
        r = await c.post(
            "/v1/chatrooms/users", json={"name": "ann", "password": "correct-horse-battery"}
        )
        assert r.status_code == 201 and r.json()["name"] == "ann"
        r = await c.post("/v1/users", json={"name": "ann", "password": "correct-horse-battery"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        r = await c.post("/v1/tokens", json={"name": "ann", "password": "wrong-password"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "bad_credentials"
        token = await api.user_with_token("ann")

        r = await c.get("/v1/chatrooms")
        assert r.status_code == 401 and r.json()["error"]["code"] == "token_required"
        first = await api.create_room(token, "first")
        r = await c.post("/v1/chatrooms", headers=auth(token))  # body optional
        assert r.status_code == 201
        second = r.json()["id"]
        assert second > first
        r = await c.get("/v1/chatrooms", headers=auth(token))
        assert r.json()["ids"] == [first, second]
        assert r.json()["chatrooms"][0]["name"] == "first"
        r = await c.get("/v1/chatrooms?limit=1", headers=auth(token))
        assert r.json()["ids"] == [first] and r.json()["next"] == first
        r = await c.get(f"/v1/chatrooms?after={first}", headers=auth(token))
        assert r.json()["ids"] == [second]

        r = await c.get(f"/v1/chatrooms/{first}/users", headers=auth(token))
        assert r.status_code == 200 and r.json()["users"] == []
        async with join(node, first, token=token) as ws:
            await until_live(ws)
            r = await c.get(f"/v1/chatrooms/{first}/users", headers=auth(token))
            assert r.json() == {"users": ["ann"], "online": ["ann"]}
        r = await c.get("/v1/chatrooms/999/users", headers=auth(token))
        assert r.status_code == 404 and r.json()["error"]["code"] == "room_not_found"

        r = await c.delete("/v1/users", headers=auth(token))
        assert r.status_code == 403
        await api.user_with_token("admin")  # not an admin yet: the flag is granted, below
        await grant_admin(node, "admin")
        admin = await api.user_with_token("admin")
        r = await c.delete("/v1/users", headers=auth(admin))
        assert r.status_code == 200 and r.json()["deleted"] == 2
        r = await c.get("/v1/chatrooms", headers=auth(token))
        assert r.status_code == 401  # the token's user is gone


async def test_two_users_chat_and_a_third_gets_history_then_live(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path))) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        bob = await api.user_with_token("bob")
        cid = await api.user_with_token("cid")
        room = await api.create_room(ann)
        async with join(node, room, token=ann) as a, join(node, room, token=bob) as b:
            await until_live(a)
            await until_live(b)
            await a.send_message(json.dumps({"type": "send", "id": "a1", "message": "hi bob"}))
            ack = await next_of_type(a, "ack")
            assert ack["id"] == "a1" and ack["offset"] == 1
            await b.send_message(json.dumps({"type": "send", "id": "b1", "message": "hi ann"}))
            seen_a = [m["message"] for m in await messages(a, 2)]
            seen_b = [m["message"] for m in await messages(b, 2)]
            assert seen_a == seen_b == ["hi bob", "hi ann"]

            async with join(node, room, token=cid) as c:
                joined, history = await until_live(c)
                assert joined["offset"] == 2
                assert [(m["offset"], m["user"]) for m in history] == [(1, "ann"), (2, "bob")]
                await a.send_message(json.dumps({"type": "send", "message": "welcome cid"}))
                live = await messages(c, 1)
                assert live[0]["offset"] == 3 and live[0]["message"] == "welcome cid"


async def test_join_during_traffic_sees_each_offset_once_in_order(tmp_path: Path) -> None:
    config = node_config(
        str(tmp_path), rate_messages_per_s=10_000.0, rate_burst=10_000, history_on_join=1000
    )
    async with running_node(config) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        bob = await api.user_with_token("bob")
        room = await api.create_room(ann)
        total = 300
        async with join(node, room, token=ann) as a:
            await until_live(a)

            async def blast() -> None:
                for i in range(total):
                    await a.send_message(json.dumps({"type": "send", "message": f"m{i}"}))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(blast)
                await (
                    trio.lowlevel.checkpoint()
                )  # let some traffic start before bob joins (order is checked, not timing)
                async with join(node, room, token=bob) as b:
                    _, history = await until_live(b)
                    offsets = [m["offset"] for m in history]
                    live = await messages(b, total - len(history))
                    offsets += [m["offset"] for m in live]
            assert offsets == list(range(1, total + 1))


async def test_plain_dialect_insecure_mode_is_the_seed_format(tmp_path: Path) -> None:
    async with (
        running_node(node_config(str(tmp_path), insecure=True)) as node,
        api_client(node) as api,
    ):
        c = api.client
        r = await c.post("/v1/chatrooms/users", json={"name": "ann"})  # no password in open mode
        assert r.status_code == 201
        r = await c.post("/v1/chatrooms/users", json={"name": "bob"})
        r = await c.post("/v1/chatrooms")
        room = r.json()["id"]
        r = await c.get("/v1/chatrooms")
        assert r.status_code == 200 and r.json()["ids"] == [room]
        async with (
            join(node, room, user="ann", v1=False) as a,
            join(node, room, user="bob", v1=False) as b,
        ):
            await a.send_message("hello from ann")
            for ws in (a, b):
                frame = json.loads(await ws.get_message())
                assert set(frame) == {"chatroom", "user", "message", "timestamp"}
                assert frame["chatroom"] == room and frame["user"] == "ann"
                assert frame["message"] == "hello from ann" and isinstance(frame["timestamp"], int)
        with pytest.raises(ConnectionRejected) as rejected:
            async with join(node, room, user="nobody", v1=False):
                pass
        assert rejected.value.status_code == 404
        r = await c.delete("/v1/users")  # admin operations need no token in open mode
        assert r.status_code == 200


async def test_restart_keeps_users_rooms_and_history(tmp_path: Path) -> None:
    config = node_config(str(tmp_path))
    async with running_node(config) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        room = await api.create_room(ann, "durable")
        async with join(node, room, token=ann) as a:
            await until_live(a)
            for text in ("one", "two", "three"):
                await a.send_message(json.dumps({"type": "send", "message": text}))
                await next_of_type(a, "ack")
    async with running_node(config) as node, api_client(node) as api:
        r = await api.client.get("/v1/chatrooms", headers=auth(ann))  # same token: secret persisted
        assert r.status_code == 200 and r.json()["chatrooms"][0]["name"] == "durable"
        async with join(node, room, token=ann) as a:
            _joined, history = await until_live(a)
            assert [m["message"] for m in history] == ["one", "two", "three"]
            await a.send_message(json.dumps({"type": "send", "message": "four"}))
            assert (await next_of_type(a, "ack"))["offset"] == 4
        r = await api.client.get(f"/v1/chatrooms/{room}/messages?limit=2", headers=auth(ann))
        assert [m["message"] for m in r.json()["messages"]] == ["three", "four"]
        assert r.json()["next_before"] == 3
        r = await api.client.get(f"/v1/chatrooms/{room}/messages?before=3", headers=auth(ann))
        assert [m["message"] for m in r.json()["messages"]] == ["one", "two"]


async def test_search_finds_a_message_by_a_word(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path))) as node, api_client(node) as api:
        ann = await api.user_with_token("ann")
        room = await api.create_room(ann)
        other = await api.create_room(ann, "other")
        for room_id, text in (
            (room, "the quick brown fox"),
            (room, "lazy dogs sleep"),
            (other, "a fox elsewhere"),
        ):
            async with join(node, room_id, token=ann) as a:
                await until_live(a)
                await a.send_message(json.dumps({"type": "send", "message": text}))
                await next_of_type(a, "ack")
        r = await api.client.get("/v1/messages/search", params={"q": "fox"}, headers=auth(ann))
        hits = r.json()["hits"]
        assert {h["message"] for h in hits} == {"the quick brown fox", "a fox elsewhere"}
        r = await api.client.get(
            "/v1/messages/search", params={"q": "fox", "chatroom": room}, headers=auth(ann)
        )
        hits = r.json()["hits"]
        assert len(hits) == 1
        assert hits[0]["chatroom"] == room and hits[0]["user"] == "ann" and hits[0]["offset"] == 1
        assert isinstance(hits[0]["timestamp"], int)
        r = await api.client.get(
            "/v1/messages/search", params={"q": '"AND ( NEAR'}, headers=auth(ann)
        )
        assert r.status_code == 200
        r = await api.client.get("/v1/messages/search", headers=auth(ann))
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_parameter"


async def test_bad_input_gets_documented_errors_and_node_keeps_serving(tmp_path: Path) -> None:
    async with (
        running_node(node_config(str(tmp_path), max_message_bytes=64)) as node,
        api_client(node) as api,
    ):
        c = api.client
        ann = await api.user_with_token("ann")
        room = await api.create_room(ann)

        r = await c.post(
            "/v1/chatrooms/users",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = await c.post(
            "/v1/chatrooms/users", json={"name": "bad name!", "password": "correct-horse-battery"}
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_name"
        r = await c.post("/v1/chatrooms/users", json={"name": "short", "password": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_password"
        r = await c.put("/v1/chatrooms", headers=auth(ann))
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        assert "GET" in r.headers["allow"]
        r = await c.get("/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "route_not_found"
        r = await c.get("/v1/chatrooms", headers=auth("not-a-token"))
        assert r.status_code == 401 and r.json()["error"]["code"] == "token_invalid"
        r = await c.get(f"/v1/chatrooms/{room}/join", headers=auth(ann))
        assert r.status_code == 426
        r = await c.post("/v1/chatrooms", content=b"x" * 70_000, headers=auth(ann))
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = await c.get("/v1/chatrooms?limit=abc", headers=auth(ann))
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_parameter"

        for bad in (None, "not-a-token"):
            with pytest.raises(ConnectionRejected) as rejected:
                async with join(node, room, token=bad):
                    pass
            assert rejected.value.status_code == 401
        with pytest.raises(ConnectionRejected) as rejected:
            async with join(node, 999, token=ann):
                pass
        assert rejected.value.status_code == 404

        async with join(node, room, token=ann) as a:
            await until_live(a)
            await a.send_message("{broken")
            assert (await next_of_type(a, "error"))["code"] == "invalid_json"
            await a.send_message(json.dumps({"type": "dance"}))
            assert (await next_of_type(a, "error"))["code"] == "unknown_type"
            await a.send_message(json.dumps({"type": "send", "id": "big", "message": "x" * 65}))
            error = await next_of_type(a, "error")
            assert error["code"] == "message_too_large" and error["id"] == "big"
            await a.send_message(json.dumps({"type": "send", "id": "ok", "message": "still here"}))
            assert (await next_of_type(a, "ack"))["id"] == "ok"

        async with join(node, room, token=ann, v1=False) as plain:
            await plain.get_message()  # history: "still here"
            await plain.send_message("y" * 65)
            with pytest.raises(ConnectionClosed) as closed:
                await plain.get_message()
            assert closed.value.reason.code == 1009

        # raw garbage on the socket gets a 400 and the node keeps serving
        stream = await trio.open_tcp_stream("127.0.0.1", node.port)
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        reply = await stream.receive_some(4096)
        assert reply.startswith(b"HTTP/1.1 400")
        await stream.aclose()
        stream = await trio.open_tcp_stream("127.0.0.1", node.port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        reply = await stream.receive_some(4096)
        assert reply.startswith(b"HTTP/1.1 431")
        await stream.aclose()

        r = await c.get("/healthz")
        assert r.status_code == 200
        r = await c.get("/readyz")
        assert r.status_code == 200 and r.json()["ready"] is True
        r = await c.get("/metrics")
        assert "chatnode_deliveries_total" in r.text


async def test_keep_alive_serves_many_requests_on_one_connection(tmp_path: Path) -> None:
    async with (
        running_node(node_config(str(tmp_path))) as node,
        httpx.AsyncClient(base_url=node.http_url) as client,
    ):
        for _ in range(20):
            assert (await client.get("/healthz")).status_code == 200


async def test_room_size_and_rate_limits(tmp_path: Path) -> None:
    config = node_config(str(tmp_path), max_room_members=2, rate_messages_per_s=1.0, rate_burst=2)
    async with running_node(config) as node, api_client(node) as api:
        tokens = [await api.user_with_token(name) for name in ("ann", "bob", "cid")]
        room = await api.create_room(tokens[0])
        async with join(node, room, token=tokens[0]) as a, join(node, room, token=tokens[1]):
            await until_live(a)
            with pytest.raises(ConnectionRejected) as rejected:
                async with join(node, room, token=tokens[2]):
                    pass
            assert rejected.value.status_code == 409
            assert json.loads(rejected.value.body)["error"]["code"] == "room_full"
            for i in range(3):
                await a.send_message(json.dumps({"type": "send", "id": str(i), "message": "hi"}))
            assert (await next_of_type(a, "ack"))["id"] == "0"
            assert (await next_of_type(a, "ack"))["id"] == "1"
            error = await next_of_type(a, "error")
            assert error["code"] == "rate_limited" and error["id"] == "2"
            assert error["retry_after_s"] > 0
        async with join(node, room, token=tokens[0]) as again:  # members may always rejoin
            await until_live(again)
