"""Who may see and be in a room, end to end on one embedded node (REST and WebSockets):
direct rooms, private groups with a member limit, roles, bans, and privacy for join,
history, members and search (docs/protocol.md, "Rooms, members and bans")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection

from tests.e2e.harness import (
    Api,
    api_client,
    auth,
    join,
    next_of_type,
    node_config,
    running_node,
    until_live,
)


def code_of(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


async def join_refused(node: Any, room: int, token: str) -> tuple[int, str]:
    with pytest.raises(ConnectionRejected) as rejected:
        async with join(node, room, token=token):
            pass
    body = json.loads(rejected.value.body or b"{}")
    return rejected.value.status_code, body["error"]["code"]


async def closed_code(ws: WebSocketConnection) -> int | None:
    with trio.fail_after(10):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as exc:
            return exc.reason.code if exc.reason is not None else None


async def send(ws: WebSocketConnection, text: str) -> int:
    await ws.send_message(json.dumps({"type": "send", "message": text}))
    offset: int = (await next_of_type(ws, "ack"))["offset"]
    return offset


async def users(api: Api, *names: str) -> dict[str, str]:
    return {name: await api.user_with_token(name) for name in names}


async def test_a_direct_room_is_made_once_and_seen_only_by_its_two_users(
    tmp_path: Path,
) -> None:
    async with running_node(node_config(str(tmp_path))) as node, api_client(node) as api:
        c = api.client
        t = await users(api, "ann", "bob", "cid")
        r = await c.post("/v1/direct", json={"user": "BOB"}, headers=auth(t["ann"]))
        assert r.status_code == 201, r.text
        dm = r.json()
        assert dm["visibility"] == "direct" and dm["name"] == "ann, bob"
        r = await c.post("/v1/direct", json={"user": "ann"}, headers=auth(t["bob"]))
        assert r.status_code == 200 and r.json() == dm  # the same room, whoever asks

        assert code_of(
            await c.post("/v1/direct", json={"user": "ann"}, headers=auth(t["ann"]))
        ) == (
            400,
            "direct_with_self",
        )
        r = await c.post("/v1/direct", json={"user": "nobody"}, headers=auth(t["ann"]))
        assert code_of(r) == (404, "user_not_found")
        r = await c.post("/v1/direct", json={}, headers=auth(t["ann"]))
        assert code_of(r) == (400, "invalid_name")

        room = dm["id"]
        async with join(node, room, token=t["ann"]) as ws:
            await until_live(ws)
            await send(ws, "a secret between us")
        # cid learns nothing: every way in answers as for a room that does not exist
        assert await join_refused(node, room, t["cid"]) == (404, "room_not_found")
        for path in (
            f"/v1/chatrooms/{room}/messages",
            f"/v1/chatrooms/{room}/members",
            f"/v1/chatrooms/{room}/users",
        ):
            assert code_of(await c.get(path, headers=auth(t["cid"]))) == (404, "room_not_found")
        r = await c.get(
            "/v1/messages/search", params={"q": "secret", "chatroom": room}, headers=auth(t["cid"])
        )
        assert code_of(r) == (404, "room_not_found")
        r = await c.get("/v1/messages/search", params={"q": "secret"}, headers=auth(t["cid"]))
        assert r.status_code == 200 and r.json()["hits"] == []
        r = await c.get("/v1/messages/search", params={"q": "secret"}, headers=auth(t["bob"]))
        assert [h["message"] for h in r.json()["hits"]] == ["a secret between us"]

        r = await c.get("/v1/chatrooms", headers=auth(t["cid"]))
        assert r.json()["ids"] == []
        r = await c.get("/v1/chatrooms", headers=auth(t["bob"]))
        assert r.json()["chatrooms"] == [{**dm, "member_count": 2}]
        r = await c.get(f"/v1/chatrooms/{room}/members", headers=auth(t["bob"]))
        assert [(m["user"], m["role"]) for m in r.json()] == [("ann", "member"), ("bob", "member")]

        r = await c.delete(f"/v1/chatrooms/{room}/members/bob", headers=auth(t["bob"]))
        assert code_of(r) == (400, "direct_room")
        r = await c.post(
            f"/v1/chatrooms/{room}/members", json={"user": "cid"}, headers=auth(t["ann"])
        )
        assert code_of(r) == (400, "direct_room")
        r = await c.post(f"/v1/chatrooms/{room}/bans", json={"user": "bob"}, headers=auth(t["ann"]))
        assert code_of(r) == (400, "direct_room")


async def test_a_private_group_full_frees_a_seat_when_a_member_leaves(tmp_path: Path) -> None:
    config = node_config(str(tmp_path), max_group_members=3)
    async with running_node(config) as node, api_client(node) as api:
        c = api.client
        t = await users(api, "ann", "bob", "cid", "dan")
        before = (await c.get("/v1/chatrooms", headers=auth(t["ann"]))).json()
        r = await c.post(
            "/v1/chatrooms",
            json={"name": "g", "visibility": "private", "members": ["bob", "zed"]},
            headers=auth(t["ann"]),
        )
        assert code_of(r) == (404, "user_not_found")
        r = await c.post(
            "/v1/chatrooms",
            json={"name": "g", "visibility": "private", "members": ["bob", "cid", "dan"]},
            headers=auth(t["ann"]),
        )
        assert code_of(r) == (409, "room_full")  # the owner takes a seat too
        assert (await c.get("/v1/chatrooms", headers=auth(t["ann"]))).json() == before

        r = await c.post(
            "/v1/chatrooms",
            json={"name": "g", "visibility": "private", "members": ["bob"]},
            headers=auth(t["ann"]),
        )
        assert r.status_code == 201 and r.json()["visibility"] == "private"
        room = r.json()["id"]
        members = f"/v1/chatrooms/{room}/members"

        async def add(who: str, by: str) -> httpx.Response:
            return await c.post(members, json={"user": who}, headers=auth(t[by]))

        assert code_of(await add("cid", by="bob")) == (403, "forbidden")
        assert code_of(await add("cid", by="dan")) == (404, "room_not_found")
        assert code_of(await add("nobody", by="ann")) == (404, "user_not_found")
        r = await add("cid", by="ann")
        assert r.status_code == 201 and r.json()["role"] == "member" and r.json()["added"]
        assert (await add("cid", by="ann")).status_code == 200  # already one
        assert code_of(await add("dan", by="ann")) == (409, "room_full")
        r = await c.get(members, headers=auth(t["cid"]))
        assert [(m["user"], m["role"]) for m in r.json()] == [
            ("ann", "owner"),
            ("bob", "member"),
            ("cid", "member"),
        ]
        assert all(isinstance(m["joined_at"], int) for m in r.json())
        assert await join_refused(node, room, t["dan"]) == (404, "room_not_found")

        async with join(node, room, token=t["bob"]) as bob:
            await until_live(bob)
            r = await c.delete(f"{members}/bob", headers=auth(t["bob"]))  # bob leaves
            assert r.json() == {"chatroom": room, "user": "bob", "removed": True}
            assert await closed_code(bob) == 4501
        assert (await add("dan", by="ann")).status_code == 201  # the freed seat
        assert code_of(await c.get(members, headers=auth(t["bob"]))) == (404, "room_not_found")
        r = await c.delete(f"{members}/cid", headers=auth(t["dan"]))
        assert code_of(r) == (403, "forbidden")
        r = await c.get("/v1/chatrooms", headers=auth(t["dan"]))
        assert [(x["id"], x["member_count"]) for x in r.json()["chatrooms"]] == [(room, 3)]

        r = await c.post("/v1/chatrooms", json={"visibility": "direct"}, headers=auth(t["ann"]))
        assert code_of(r) == (400, "invalid_parameter")
        r = await c.post("/v1/chatrooms", json={"members": ["bob"]}, headers=auth(t["ann"]))
        assert code_of(r) == (400, "invalid_parameter")  # members: private rooms only


async def test_history_and_search_of_a_group_only_for_its_members(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path))) as node, api_client(node) as api:
        c = api.client
        t = await users(api, "ann", "bob", "cid")
        r = await c.post(
            "/v1/chatrooms",
            json={"name": "g", "visibility": "private", "members": ["bob"]},
            headers=auth(t["ann"]),
        )
        group = r.json()["id"]
        lobby = await api.create_room(t["cid"], "lobby")
        async with join(node, group, token=t["ann"]) as ws:
            await until_live(ws)
            await send(ws, "plans for the party")
        async with join(node, lobby, token=t["cid"]) as ws:
            await until_live(ws)
            await send(ws, "party in the lobby")

        r = await c.get(f"/v1/chatrooms/{group}/messages", headers=auth(t["bob"]))
        assert [m["message"] for m in r.json()["messages"]] == ["plans for the party"]
        r = await c.get(f"/v1/chatrooms/{group}/messages", headers=auth(t["cid"]))
        assert code_of(r) == (404, "room_not_found")

        async def found(who: str) -> set[str]:
            r = await c.get("/v1/messages/search", params={"q": "party"}, headers=auth(t[who]))
            assert r.status_code == 200, r.text
            return {h["message"] for h in r.json()["hits"]}

        assert await found("ann") == {"plans for the party"}
        assert await found("cid") == {"party in the lobby"}
        r = await c.get(
            "/v1/messages/search", params={"q": "party", "chatroom": lobby}, headers=auth(t["ann"])
        )
        assert [h["message"] for h in r.json()["hits"]] == ["party in the lobby"]  # public

        r = await c.get("/v1/me/chatrooms", headers=auth(t["ann"]))
        assert r.status_code == 200
        (mine,) = r.json()
        assert mine["id"] == group and mine["visibility"] == "private"
        assert mine["last_offset"] == 1 and mine["last_message"]["message"] == "plans for the party"

        # most recent activity first: a new direct room (no message: when it was made) comes
        # first, then the group once someone writes there again
        r = await c.post("/v1/direct", json={"user": "bob"}, headers=auth(t["ann"]))
        dm = r.json()["id"]

        async def mine_in_order() -> list[int]:
            r = await c.get("/v1/me/chatrooms", headers=auth(t["ann"]))
            return [room["id"] for room in r.json()]

        assert await mine_in_order() == [dm, group]
        async with join(node, group, token=t["bob"]) as ws:
            await until_live(ws)
            await send(ws, "see you there")
        assert await mine_in_order() == [group, dm]
        r = await c.get("/v1/me/chatrooms", params={"limit": 1}, headers=auth(t["ann"]))
        assert [(x["id"], x["last_offset"], x["last_message"]) for x in r.json()] == [
            (group, 2, {**r.json()[0]["last_message"], "message": "see you there", "user": "bob"})
        ]


async def test_a_ban_closes_the_connection_and_keeps_the_user_out(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path))) as node, api_client(node) as api:
        c = api.client
        t = await users(api, "ann", "bob", "cid")
        room = await api.create_room(t["ann"], "lobby")
        bans = f"/v1/chatrooms/{room}/bans"
        async with join(node, room, token=t["ann"]) as ann:
            _, _ = await until_live(ann)
            async with join(node, room, token=t["bob"]) as bob:
                await until_live(bob)
                r = await c.post(bans, json={"user": "ann"}, headers=auth(t["bob"]))
                assert code_of(r) == (403, "forbidden")  # bob is a member, ann the owner
                r = await c.post(bans, json={"user": "bob"}, headers=auth(t["ann"]))
                assert r.json() == {"chatroom": room, "user": "bob", "banned": True}
                assert await closed_code(bob) == 4501
            assert await join_refused(node, room, t["bob"]) == (403, "banned")
            r = await c.post(
                f"/v1/chatrooms/{room}/members", json={"user": "bob"}, headers=auth(t["bob"])
            )
            assert code_of(r) == (403, "banned")
            r = await c.get(bans, headers=auth(t["ann"]))
            assert r.json() == {"bans": ["bob"]}
            assert code_of(await c.get(bans, headers=auth(t["cid"]))) == (403, "forbidden")

            r = await c.delete(f"{bans}/bob", headers=auth(t["ann"]))
            assert r.json() == {"chatroom": room, "user": "bob", "unbanned": True}
            async with join(node, room, token=t["bob"]) as bob:
                await until_live(bob)  # a member again
            await send(ann, "still here")  # the owner never noticed
        r = await c.get(f"/v1/chatrooms/{room}/members", headers=auth(t["cid"]))
        assert [(m["user"], m["role"]) for m in r.json()] == [("ann", "owner"), ("bob", "member")]

        members = f"/v1/chatrooms/{room}/members"
        r = await c.post(members, json={"user": "cid", "role": "admin"}, headers=auth(t["bob"]))
        assert code_of(r) == (403, "forbidden")  # only the owner makes admins
        r = await c.post(members, json={"user": "cid", "role": "admin"}, headers=auth(t["ann"]))
        assert r.status_code == 201 and r.json()["role"] == "admin"
        r = await c.post(bans, json={"user": "bob"}, headers=auth(t["cid"]))
        assert r.json()["banned"] is True  # an admin of the room bans
        r = await c.post(bans, json={"user": "ann"}, headers=auth(t["cid"]))
        assert code_of(r) == (403, "forbidden")  # not the owner
        r = await c.post(bans, json={"user": "nobody"}, headers=auth(t["cid"]))
        assert code_of(r) == (404, "user_not_found")
