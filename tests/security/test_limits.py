"""Rate limits and membership (docs/security.md, "Rate limits and membership"): one test per
attack of issue 14's part, each run against real sockets on loopback with the limits the
attack tries to exceed, measuring what the node answered, forwarded or stored. Figures are
printed (``pytest -s``).

Per-address limits are exercised through the node's trusted proxy path: the tests connect
from 127.0.0.1 (a trusted proxy by default) and name the client in ``X-Real-IP``, as nginx
does.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from chatnode.config import Config
from tests.e2e.harness import (
    PASSWORD,
    api_client,
    auth,
    grant_admin,
    join,
    next_of_type,
    node_config,
    running_node,
    until_live,
)

DEFAULTS = Config()
SECURE_LIMITS: dict[str, Any] = {
    # The e2e and cluster harnesses raise these for the other tests; here they are the defaults.
    "signup_address_burst": DEFAULTS.signup_address_burst,
    "login_address_burst": DEFAULTS.login_address_burst,
    "login_failures_burst": DEFAULTS.login_failures_burst,
    "room_create_burst": DEFAULTS.room_create_burst,
}


def from_address(address: str) -> dict[str, str]:
    return {"X-Real-IP": address}


def assert_rate_limited(r: httpx.Response) -> float:
    """A 429 as docs/protocol.md says: ``Retry-After`` and the JSON error; its retry time."""
    assert r.status_code == 429, r.text
    body = r.json()["error"]
    assert body["code"] == "rate_limited", body
    assert int(r.headers["retry-after"]) >= 1
    assert body["retry_after_s"] == int(r.headers["retry-after"])
    retry: float = body["retry_after_s"]
    return retry


async def make_user(api: httpx.AsyncClient, name: str, address: str = "192.0.2.1") -> None:
    r = await api.post(
        "/v1/users", json={"name": name, "password": PASSWORD}, headers=from_address(address)
    )
    assert r.status_code == 201, r.text


async def token_of(api: httpx.AsyncClient, name: str, address: str = "192.0.2.1") -> str:
    r = await api.post(
        "/v1/tokens", json={"name": name, "password": PASSWORD}, headers=from_address(address)
    )
    assert r.status_code == 200, r.text
    token: str = r.json()["token"]
    return token


# -- #6 password guessing ------------------------------------------------------------------------


async def test_password_guessing_is_refused_past_the_account_limit(tmp_path: Path) -> None:
    """60 wrong passwords, each from another address (no per-address limit helps) and the
    name in three cases (one account), then the right one: past ``login_failures_burst`` every attempt gets 429 -- the right password
    too, so the guesser learns nothing -- and so does the real user, from anywhere, until
    the next attempt is due (the documented price: docs/security.md)."""
    burst = DEFAULTS.login_failures_burst
    async with (
        running_node(node_config(str(tmp_path), **SECURE_LIMITS)) as node,
        api_client(node) as api,
    ):
        await make_user(api.client, "victim")
        statuses: list[int] = []
        retry_s = 0.0
        started = trio.current_time()
        for i in range(60):
            r = await api.client.post(
                "/v1/tokens",
                json={"name": ("victim", "Victim", "VICTIM")[i % 3], "password": f"guess-{i:04}"},
                headers=from_address(f"198.51.100.{i + 1}"),
            )
            statuses.append(r.status_code)
            if r.status_code == 429:
                retry_s = assert_rate_limited(r)
        elapsed = trio.current_time() - started
        right = await api.client.post(
            "/v1/tokens",
            json={"name": "victim", "password": PASSWORD},
            headers=from_address("198.51.100.200"),
        )
        real_user = await api.client.post(
            "/v1/tokens",
            json={"name": "victim", "password": PASSWORD},
            headers=from_address("203.0.113.9"),
        )
        other = await api.client.post(  # another account is not affected
            "/v1/tokens",
            json={"name": "nobody", "password": "whatever1"},
            headers=from_address("198.51.100.201"),
        )
    print(
        f"\n#6 60 wrong passwords in {elapsed:.2f}s: {statuses.count(401)} x 401, "
        f"{statuses.count(429)} x 429 (Retry-After {retry_s:.0f} s); right password -> "
        f"{right.status_code}; real user elsewhere -> {real_user.status_code}"
    )
    assert statuses == [401] * burst + [429] * (60 - burst)
    assert_rate_limited(right)
    assert_rate_limited(real_user)
    assert other.status_code == 401


async def test_the_real_user_gets_in_once_the_guessing_stops(tmp_path: Path) -> None:
    """Failed attempts refill at ``login_failures_interval_s``: a user locked out by a guesser
    gets in with the right password as soon as the next attempt is due."""
    config = node_config(str(tmp_path), login_failures_burst=3, login_failures_interval_s=1.0)
    async with running_node(config) as node, api_client(node) as api:
        await make_user(api.client, "victim")
        for i in range(5):
            r = await api.client.post(
                "/v1/tokens", json={"name": "victim", "password": f"guess-{i:04}"}
            )
        retry_s = assert_rate_limited(r)
        await trio.sleep(retry_s)  # what a client is told to wait
        r = await api.client.post("/v1/tokens", json={"name": "victim", "password": PASSWORD})
        assert r.status_code == 200, r.text
        # a success costs nothing: the budget of failures is what it was
        r = await api.client.post("/v1/tokens", json={"name": "victim", "password": "wrong-1"})
        assert r.status_code == 401


# -- #4 (part) token and account floods from one address -----------------------------------------


async def test_token_requests_are_limited_per_address(tmp_path: Path) -> None:
    """48 concurrent ``POST /v1/tokens`` from one address, for 48 accounts: only
    ``login_address_burst`` are served, the rest get 429 at once; another address is
    served."""
    burst = DEFAULTS.login_address_burst
    async with (
        running_node(node_config(str(tmp_path), **SECURE_LIMITS)) as node,
        api_client(node) as api,
    ):
        for i in range(48):
            await make_user(api.client, f"user{i}", address=f"192.0.2.{100 + i}")
        statuses: list[int] = []

        async def login(i: int) -> None:
            r = await api.client.post(
                "/v1/tokens",
                json={"name": f"user{i}", "password": PASSWORD},
                headers=from_address("192.0.2.7"),
            )
            if r.status_code == 429:
                assert_rate_limited(r)
            statuses.append(r.status_code)

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(48):
                nursery.start_soon(login, i)
        elapsed = trio.current_time() - started
        elsewhere = await api.client.post(
            "/v1/tokens",
            json={"name": "user0", "password": PASSWORD},
            headers=from_address("192.0.2.8"),
        )
    refill = math.floor(elapsed / DEFAULTS.login_address_interval_s)
    print(
        f"\n#4 48 concurrent token requests from one address in {elapsed:.2f}s: "
        f"{statuses.count(200)} x 200, {statuses.count(429)} x 429"
    )
    assert burst <= statuses.count(200) <= burst + refill, statuses
    assert statuses.count(200) + statuses.count(429) == 48
    assert elsewhere.status_code == 200


async def test_account_creation_is_limited_per_address(tmp_path: Path) -> None:
    """30 sign-ups from one address: ``signup_address_burst`` created, the rest 429 and not
    created; another address may still sign up."""
    burst = DEFAULTS.signup_address_burst
    async with (
        running_node(node_config(str(tmp_path), **SECURE_LIMITS)) as node,
        api_client(node) as api,
    ):
        statuses = []
        for i in range(30):
            r = await api.client.post(
                "/v1/users",
                json={"name": f"throwaway{i}", "password": PASSWORD},
                headers=from_address("2001:db8:7:7::1" if i % 2 else "2001:db8:7:7::2"),
            )
            if r.status_code == 429:
                assert_rate_limited(r)
            statuses.append(r.status_code)
        await make_user(api.client, "elsewhere", address="192.0.2.99")
        created = 0
        for i in range(30):  # what exists: a token works only for a created user
            r = await api.client.post(
                "/v1/tokens",
                json={"name": f"throwaway{i}", "password": PASSWORD},
                headers=from_address(f"10.9.{i}.1"),
            )
            created += r.status_code == 200
    print(
        f"\n#4 30 sign-ups from one /64: {statuses.count(201)} x 201, {statuses.count(429)} x 429"
    )
    assert statuses == [201] * burst + [429] * (30 - burst)
    assert created == burst


# -- #19 room creation -------------------------------------------------------------------------


async def test_room_creation_is_limited_per_user(tmp_path: Path) -> None:
    """One user asks for 200 rooms: ``room_create_burst`` are made, the rest 429 and not
    made; admins are not limited; both are counted in /metrics."""
    burst = DEFAULTS.room_create_burst
    async with (
        running_node(node_config(str(tmp_path), **SECURE_LIMITS)) as node,
        api_client(node) as api,
    ):
        await make_user(api.client, "ann")
        await make_user(api.client, "admin", address="192.0.2.2")
        await grant_admin(node, "admin")
        ann = await token_of(api.client, "ann")
        admin = await token_of(api.client, "admin")
        statuses = []
        started = trio.current_time()
        for i in range(200):
            r = await api.client.post(
                "/v1/chatrooms", json={"name": f"spam {i}"}, headers=auth(ann)
            )
            if r.status_code == 429:
                assert_rate_limited(r)
            statuses.append(r.status_code)
        elapsed = trio.current_time() - started
        for i in range(burst + 5):
            r = await api.client.post(
                "/v1/chatrooms", json={"name": f"ops {i}"}, headers=auth(admin)
            )
            assert r.status_code == 201, r.text
        rooms = (await api.client.get("/v1/chatrooms?limit=500", headers=auth(ann))).json()
        metrics = (await api.client.get("/metrics")).text
    print(
        f"\n#19 200 room creations by one user in {elapsed:.2f}s: {statuses.count(201)} x 201,"
        f" {statuses.count(429)} x 429"
    )
    assert statuses == [201] * burst + [429] * (200 - burst)
    assert len(rooms["ids"]) == burst + burst + 5
    assert f'chatnode_rooms_created_total{{node="test-node"}} {2 * burst + 5}' in metrics
    assert f'chatnode_rate_limited_rooms_total{{node="test-node"}} {200 - burst}' in metrics


# -- #9 typing and pings -----------------------------------------------------------------------


def node_ws(cluster: Any, i: int) -> str:
    return f"ws://127.0.0.1:{cluster.node_ports[i]}"


@asynccontextmanager
async def member(
    base: str, room: int, token: str, *, v1: bool = True
) -> AsyncIterator[WebSocketConnection]:
    url = f"{base}/v1/chatrooms/{room}/join?token={token}"
    async with open_websocket_url(url, subprotocols=["chatnode.v1"] if v1 else []) as ws:
        yield ws


async def test_a_typing_flood_is_forwarded_once_per_interval(tmp_path: Path) -> None:
    """One user sends 20,000 typing frames on two connections, one per node: the room's
    other members get at most one typing event per ``typing_interval_s``; nothing else
    changes (no error, no close)."""
    from tests.cluster.cluster import running_cluster
    from tests.cluster.harness import nginx_available

    if not nginx_available():
        pytest.skip("nginx not installed (scripts/services install)")
    interval_s = DEFAULTS.typing_interval_s
    async with running_cluster(nodes=2) as cluster, httpx.AsyncClient(base_url=cluster.url) as api:
        for name in ("typist", "watcher"):
            await make_user(api, name)
        typist, watcher = await token_of(api, "typist"), await token_of(api, "watcher")
        room = (await api.post("/v1/chatrooms", headers=auth(typist))).json()["id"]
        typing_seen = 0
        async with (
            member(node_ws(cluster, 0), room, watcher) as watch,
            member(node_ws(cluster, 0), room, typist) as one,
            member(node_ws(cluster, 1), room, typist) as two,
        ):
            for ws in (watch, one, two):
                await until_live(ws)
            started = trio.current_time()

            async def flood(ws: WebSocketConnection, tag: str) -> None:
                frame = json.dumps({"type": "typing"})
                for _ in range(10_000):
                    await ws.send_message(frame)
                # the node's reader handles frames in order: the pong follows every typing
                await ws.send_message(json.dumps({"type": "ping", "id": tag}))
                while (got := json.loads(await ws.get_message())).get("type") != "pong":
                    assert got["type"] in ("typing", "presence"), got

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood, one, "one")
                nursery.start_soon(flood, two, "two")
            elapsed = trio.current_time() - started
            await one.send_message(json.dumps({"type": "send", "message": "done"}))
            while (frame := json.loads(await watch.get_message()))["type"] != "message":
                typing_seen += frame["type"] == "typing"
    bound = math.floor(elapsed / interval_s) + 1
    print(
        f"\n#9 20,000 typing frames over 2 nodes in {elapsed:.2f}s: {typing_seen} forwarded"
        f" (bound {bound})"
    )
    assert 1 <= typing_seen <= bound


async def test_v1_pings_are_limited_per_user(tmp_path: Path) -> None:
    """200 pings at once, on two connections of one user: ``rate_ping_burst`` pongs (plus
    the refill), the rest ``rate_limited`` error frames with ``retry_after_s``; the
    connections stay open."""
    burst, rate = DEFAULTS.rate_ping_burst, DEFAULTS.rate_pings_per_s
    async with running_node(node_config(str(tmp_path))) as node, api_client(node) as api:
        token = await api.user_with_token("pinger")
        room = await api.create_room(token)
        answers: dict[str, int] = {"pong": 0, "error": 0}
        async with join(node, room, token=token) as one, join(node, room, token=token) as two:
            for ws in (one, two):
                await until_live(ws)
            started = trio.current_time()

            async def pings(ws: WebSocketConnection) -> None:
                for i in range(100):
                    await ws.send_message(json.dumps({"type": "ping", "id": str(i)}))
                got = 0
                while got < 100:
                    frame = json.loads(await ws.get_message())
                    if frame["type"] in answers:
                        got += 1
                        answers[frame["type"]] += 1
                        if frame["type"] == "error":
                            assert frame["code"] == "rate_limited" and frame["retry_after_s"] > 0

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pings, one)
                nursery.start_soon(pings, two)
            elapsed = trio.current_time() - started
            await one.send_message(json.dumps({"type": "send", "message": "still here"}))
            assert (await next_of_type(one, "ack"))["id"] is None
    print(f"\n#9 200 pings of one user in {elapsed:.2f}s: {answers}")
    assert burst <= answers["pong"] <= burst + math.floor(elapsed * rate) + 1
    assert answers["pong"] + answers["error"] == 200


# -- #10 messages per user across connections and nodes ----------------------------------------


async def test_one_user_cannot_exceed_the_burst_across_connections_and_nodes() -> None:
    """10 connections of one user, 5 on each node, send 40 messages each at once: together
    they get ``rate_burst`` stored (plus the refill at the sustained rate), the rest refused
    with ``rate_limited``; what is stored is what was acknowledged."""
    from tests.cluster.cluster import running_cluster
    from tests.cluster.harness import nginx_available

    if not nginx_available():
        pytest.skip("nginx not installed (scripts/services install)")
    burst, rate = DEFAULTS.rate_burst, 0.5
    async with (
        running_cluster(nodes=2, rate_messages_per_s=rate, rate_burst=burst) as cluster,
        httpx.AsyncClient(base_url=cluster.url) as api,
    ):
        await make_user(api, "flooder")
        token = await token_of(api, "flooder")
        room = (await api.post("/v1/chatrooms", headers=auth(token))).json()["id"]
        acks = refused = 0

        async def send_all(ws: WebSocketConnection, c: int) -> None:
            nonlocal acks, refused
            for i in range(40):
                await ws.send_message(
                    json.dumps({"type": "send", "id": f"{c}-{i}", "message": "x"})
                )
            answered = 0
            while answered < 40:
                frame = json.loads(await ws.get_message())
                if frame["type"] == "ack":
                    acks += 1
                elif frame["type"] == "error":
                    assert frame["code"] == "rate_limited" and frame["retry_after_s"] > 0, frame
                    refused += 1
                else:
                    continue
                answered += 1

        async with AsyncExitStack() as stack:
            sockets = [
                await stack.enter_async_context(member(node_ws(cluster, i % 2), room, token))
                for i in range(10)
            ]
            for ws in sockets:
                await until_live(ws)
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                for c, ws in enumerate(sockets):
                    nursery.start_soon(send_all, ws, c)
            elapsed = trio.current_time() - started
        stored = (
            await api.get(f"/v1/chatrooms/{room}/messages?limit=500", headers=auth(token))
        ).json()["messages"]
        leases = [
            await node_metric(f"http://127.0.0.1:{port}", "chatnode_rate_leases_total")
            for port in cluster.node_ports
        ]
    print(
        f"\n#10 10 connections x 40 messages over 2 nodes in {elapsed:.2f}s: {acks} acked,"
        f" {refused} refused, {len(stored)} stored; leases per node {leases}"
    )
    assert acks + refused == 400
    assert len(stored) == acks
    assert burst * 3 // 4 <= acks <= burst + math.floor(elapsed * rate) + 1


async def node_metric(base: str, name: str) -> float | None:
    async with httpx.AsyncClient(base_url=base) as client:
        for line in (await client.get("/metrics")).text.splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return None


# -- #8 membership ends ------------------------------------------------------------------------


async def closed_code(ws: WebSocketConnection) -> int | None:
    """Read until the node closes the connection; its close code."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed as exc:
        return exc.reason.code


async def test_a_full_room_frees_a_seat_when_a_member_leaves() -> None:
    """A room at its member limit refuses everyone else (409 ``room_full``) until a member
    leaves (``DELETE .../members/{name}``) or an admin removes one: the seat is free at once,
    the leaver's connection on the other node is closed with 4501, the next user gets in,
    and a member who left joins again only as a new member, within the limit."""
    from tests.cluster.cluster import running_cluster
    from tests.cluster.harness import nginx_available

    if not nginx_available():
        pytest.skip("nginx not installed (scripts/services install)")
    async with (
        running_cluster(nodes=2, max_room_members=3) as cluster,
        httpx.AsyncClient(base_url=cluster.url) as api,
    ):
        names = ("ann", "bob", "cid", "dan", "admin")
        for name in names:
            await make_user(api, name)
        await cluster.grant_admin("admin")
        tokens = {name: await token_of(api, name) for name in names}
        room = (await api.post("/v1/chatrooms", headers=auth(tokens["ann"]))).json()["id"]

        async def refused_as_full(name: str, node: int) -> None:
            with pytest.raises(ConnectionRejected) as rejected:
                async with member(node_ws(cluster, node), room, tokens[name]):
                    pass
            assert rejected.value.status_code == 409
            assert json.loads(rejected.value.body or b"{}")["error"]["code"] == "room_full"

        async def users() -> list[str]:
            r = await api.get(f"/v1/chatrooms/{room}/users", headers=auth(tokens["ann"]))
            members: list[str] = r.json()["users"]
            return members

        async def remove(who: str, by: str) -> httpx.Response:
            return await api.delete(f"/v1/chatrooms/{room}/members/{who}", headers=auth(tokens[by]))

        async with (
            member(node_ws(cluster, 0), room, tokens["ann"]) as ann,
            member(node_ws(cluster, 1), room, tokens["bob"]) as bob,
            member(node_ws(cluster, 0), room, tokens["cid"]) as cid,
        ):
            for ws in (ann, bob, cid):
                await until_live(ws)
            await refused_as_full("dan", 0)

            r = await remove("ann", by="cid")  # only oneself, the room's owner or an admin
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"

            r = await remove("bob", by="bob")  # bob leaves, through nginx; he is on node 2
            assert r.status_code == 200, r.text
            assert r.json() == {"chatroom": room, "user": "bob", "removed": True}
            with trio.fail_after(10):
                assert await closed_code(bob) == 4501
            assert await users() == ["ann", "cid"]

            async with member(node_ws(cluster, 1), room, tokens["dan"]) as dan:
                await until_live(dan)  # the freed seat
                await refused_as_full("bob", 0)  # leaving gave the seat away

                r = await remove("dan", by="admin")  # an admin removes anyone
                assert r.status_code == 200 and r.json()["removed"] is True
                with trio.fail_after(10):
                    assert await closed_code(dan) == 4501
            r = await remove("dan", by="admin")  # idempotent
            assert r.status_code == 200 and r.json()["removed"] is False

            async with member(node_ws(cluster, 1), room, tokens["bob"]) as again:
                await until_live(again)  # a member again
                assert sorted(await users()) == ["ann", "bob", "cid"]
            await refused_as_full("dan", 0)
            # the others never noticed
            await ann.send_message(json.dumps({"type": "send", "id": "a", "message": "hi"}))
            assert (await next_of_type(ann, "ack"))["id"] == "a"
            assert (await next_of_type(cid, "message"))["message"] == "hi"

        r = await api.delete(
            f"/v1/chatrooms/{room}/members/bad%20name", headers=auth(tokens["ann"])
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_name"
        r = await api.delete("/v1/chatrooms/999999/members/ann", headers=auth(tokens["ann"]))
        assert r.status_code == 404 and r.json()["error"]["code"] == "room_not_found"
        r = await api.delete(f"/v1/chatrooms/{room}/members/ann")
        assert r.status_code == 401


# -- plain dialect: slowed down, not thrown out ----------------------------------------------


async def test_a_pasted_paragraph_in_the_plain_dialect_is_slowed_not_cut(tmp_path: Path) -> None:
    """An old client pastes 200 lines at once in the plain dialect (one message each): the
    node reads them at the user's rate instead of closing the connection (4004); every line
    arrives, in order, and the connection stays open."""
    burst, rate = DEFAULTS.rate_burst, 100.0
    config = node_config(str(tmp_path), rate_messages_per_s=rate, rate_burst=burst)
    async with running_node(config) as node, api_client(node) as api:
        token = await api.user_with_token("oldtimer")
        watcher = await api.user_with_token("watcher")
        room = await api.create_room(token)
        async with (
            join(node, room, token=watcher) as watch,
            join(node, room, token=token, v1=False) as paster,
        ):
            await until_live(watch)
            started = trio.current_time()
            for i in range(200):
                await paster.send_message(f"line {i:03}")
            own: list[str] = []
            try:
                while len(own) < 200:
                    own.append(json.loads(await paster.get_message())["message"])
            except ConnectionClosed as exc:
                raise AssertionError(
                    f"the paster was closed with {exc.reason.code} after {len(own)} lines"
                ) from None
            elapsed = trio.current_time() - started
            lines = []
            while len(lines) < 200:
                frame = json.loads(await watch.get_message())
                if frame["type"] == "message":
                    lines.append(frame["message"])
            await paster.send_message("still connected")
            assert (await next_of_type(watch, "message"))["message"] == "still connected"
    print(f"\n plain paste of 200 lines: all delivered in {elapsed:.2f}s (no 4004)")
    assert lines == own == [f"line {i:03}" for i in range(200)]
    assert elapsed >= (200 - burst) / rate * 0.8  # it was slowed down to the user's rate


async def test_a_plain_client_held_back_is_not_idle(tmp_path: Path) -> None:
    """While the node holds a pasting client back it reads nothing, pongs included: that
    client is sending, not idle, and is not closed with 4003 however long the wait."""
    config = node_config(
        str(tmp_path),
        rate_messages_per_s=5.0,
        rate_burst=2,
        ws_ping_interval_s=0.25,
        ws_idle_timeout_s=1.0,
    )
    async with running_node(config) as node, api_client(node) as api:
        token = await api.user_with_token("oldtimer")
        room = await api.create_room(token)
        async with join(node, room, token=token, v1=False) as paster:
            started = trio.current_time()
            for i in range(20):
                await paster.send_message(f"line {i:02}")
            own: list[str] = []
            try:
                while len(own) < 20:
                    own.append(json.loads(await paster.get_message())["message"])
            except ConnectionClosed as exc:
                raise AssertionError(
                    f"closed with {exc.reason.code} after {len(own)} lines"
                ) from None
            elapsed = trio.current_time() - started
    print(f"\n plain paste held back {elapsed:.2f}s with a 1 s idle timeout: not closed")
    assert own == [f"line {i:02}" for i in range(20)]
    assert elapsed > 2 * config.ws_idle_timeout_s
