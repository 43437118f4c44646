"""Scenario 6 — MySQL (the directory) goes away for longer than a node's user-check cache.

Both nodes reach MariaDB through a fault proxy, cut for ``OUTAGE_S`` (7.5 s: past
``USER_CHECK_TTL_S``, so every token's user check is due on both nodes during it). Proves:

- what needs no MySQL keeps working: with tokens issued before the outage, REST history and
  search answer 200 on both nodes; members leave and rejoin on their own node, on the other
  node, and in a room the other node never saw (the room and the membership are known in
  Redis); live chat goes on with no loss, no duplicate, in order;
- what needs MySQL answers 503 ``unavailable`` with ``Retry-After`` throughout: create a room,
  create a user, get a token, a new membership (a join refused before the handshake, on
  either node);
- after the restore those succeed again without restarting a node; the refused joiner (which
  kept retrying) gets in and gets the whole room.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from chatnode.node.accounts import USER_CHECK_TTL_S
from tests.cluster.cluster import Cluster
from tests.faults.client import FaultClient
from tests.faults.support import (
    PASSWORD,
    auth,
    clients_on_nodes,
    close_all,
    fault_cluster,
    fault_proxy,
    make_room,
    make_users,
    node_ws,
    record,
    send_series,
    send_until,
    settle_all,
    start_all,
    verify_room,
)

pytestmark = pytest.mark.integration

INTERVAL_S = 0.01
CHECKS_DUE_S = USER_CHECK_TTL_S + 0.5  # after the cut: no node trusts a user check any more
OUTAGE_S = USER_CHECK_TTL_S + 2.5


def assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, (r.request.method, r.request.url.path, r.status_code, r.text)
    assert r.headers["Retry-After"].isdigit(), r.headers
    body = r.json()["error"]
    assert body["code"] == "unavailable" and body["retry_after_s"] >= 1, body


async def assert_join_refused(base_url: str, room: int, token: str) -> None:
    """A join that needs a new membership: HTTP 503 before the WebSocket handshake."""
    url = f"{base_url}/v1/chatrooms/{room}/join?token={token}"
    with pytest.raises(ConnectionRejected) as refused:
        async with open_websocket_url(url, subprotocols=["chatnode.v1"]):
            pass
    assert refused.value.status_code == 503, refused.value


async def assert_needs_mysql(
    cluster: Cluster, api: httpx.AsyncClient, room: int, tokens: dict[str, str]
) -> None:
    """Everything that really needs MySQL answers 503 with a retry hint."""
    headers = auth(tokens["u0"])
    assert_unavailable(await api.post("/v1/chatrooms", json={}, headers=headers))
    assert_unavailable(await api.post("/v1/users", json={"name": "newbie", "password": PASSWORD}))
    assert_unavailable(await api.post("/v1/tokens", json={"name": "u1", "password": PASSWORD}))
    for i in range(len(cluster.node_ports)):
        await assert_join_refused(node_ws(cluster, i), room, tokens["late"])


async def assert_reads_answer(
    cluster: Cluster, room: int, tokens: dict[str, str], head: int
) -> None:
    """History and search answer 200 with tokens whose user checks are due, on every node
    and through nginx; each user is asked of each node."""
    for base in [*(cluster.node_url(i) for i in range(len(cluster.node_ports))), cluster.url]:
        async with httpx.AsyncClient(base_url=base) as api:
            for name in ("u0", "u1", "u2", "u3", "v"):
                headers = auth(tokens[name])
                r = await api.get(
                    f"/v1/chatrooms/{room}/messages", params={"limit": 500}, headers=headers
                )
                assert r.status_code == 200, (base, name, r.status_code, r.text)
                assert r.json()["messages"][-1]["offset"] == head, (base, r.json())
                params: dict[str, str | int] = {"q": "before", "chatroom": room}
                with trio.fail_after(10):  # archived long ago; ES shows it after a refresh
                    while True:
                        r = await api.get("/v1/messages/search", params=params, headers=headers)
                        assert r.status_code == 200, (base, name, r.status_code, r.text)
                        if r.json()["hits"]:
                            break
                        await trio.sleep(0.1)  # no event tells a client ES refreshed


async def rejoin(
    nursery: trio.Nursery, old: FaultClient, cluster: Cluster, node: int
) -> tuple[FaultClient, float]:
    """``old`` leaves (its sends settled) and comes back straight to ``node`` with
    ``since=<its last offset>``; return the new client, live, and the join-to-live time. The
    first attempt must get in: a refusal fails the test."""
    await old.close()
    new = FaultClient(
        old.name,
        old.token,
        old.room,
        connect_url=node_ws(cluster, node),
        api_url=cluster.url,
        reconnect_url=cluster.ws_url,
        since=old.last_offset,
        max_outage_s=0.0,  # a refused first attempt fails at once (ClientFailed)
    )
    started = time.monotonic()
    with trio.fail_after(5):
        await nursery.start(new.run)
    assert not new.connect_failures, (new.name, node, new.connect_failures)
    assert new.nodes == [f"node{node + 1}"], new.nodes
    return new, time.monotonic() - started


async def traffic(clients: Sequence[FaultClient], count: int, tag: str) -> None:
    async with trio.open_nursery() as senders:
        for client in clients:
            senders.start_soon(send_series, client, count, INTERVAL_S, tag)


async def test_mysql_outage_takes_down_only_what_needs_mysql() -> None:
    async with fault_proxy("CHATNODE_TEST_MYSQL_URL") as proxy:
        mysql_port = proxy.upstream_port

        def through_proxy(env: dict[str, str]) -> dict[str, str]:
            """The nodes reach the cluster's database through the proxy; migrations and
            clean-up use the real server."""
            url = env["CHATNODE_MYSQL_URL"].replace(f":{mysql_port}/", f":{proxy.port}/")
            return {"CHATNODE_MYSQL_URL": url}

        async with (
            fault_cluster(node_env=through_proxy) as (cluster, api),
            httpx.AsyncClient(base_url=cluster.node_url(0)) as node1_api,
        ):
            names = ["u0", "u1", "u2", "u3"]
            tokens = await make_users(api, [*names, "v", "late"])
            room = await make_room(api, tokens["u0"])
            # "side": created on node 1 and joined there only; node 2 never sees it before
            # the outage
            side = await make_room(node1_api, tokens["v"], "side")
            clients = clients_on_nodes(cluster, {n: tokens[n] for n in names}, room, [0, 0, 1, 1])
            (v,) = clients_on_nodes(cluster, {"v": tokens["v"]}, side, [0])
            late = FaultClient(
                "late", tokens["late"], room, connect_url=cluster.ws_url, api_url=cluster.url
            )
            left: list[FaultClient] = []
            async with trio.open_nursery() as nursery:
                await start_all(nursery, [*clients, v])
                await traffic([*clients, v], 10, "before ")
                await settle_all(clients)
                await settle_all([v])

                proxy.cut()
                cut_at = time.monotonic()
                await assert_needs_mysql(cluster, api, room, tokens)
                nursery.start_soon(late.run)  # keeps retrying until MySQL is back

                # live chat in the joined room goes on
                await traffic(clients, 50, "during ")
                await settle_all(clients)
                chat_s = time.monotonic() - cut_at
                # ... for as long as it takes every node's user checks to fall due (time
                # itself is what is waited for here: no event marks a cache entry expiring)
                stop = trio.Event()
                async with trio.open_nursery() as trickle:
                    for client in clients:
                        trickle.start_soon(send_until, client, stop, 0.1, "trickle ")
                    await trio.sleep(max(0.0, cut_at + CHECKS_DUE_S - time.monotonic()))
                    stop.set()
                head = await settle_all(clients)
                due_at = time.monotonic()

                # tokens issued before the outage still work: history and search answer
                await assert_reads_answer(cluster, room, tokens, head)
                reads_s = time.monotonic() - due_at

                # members leave and rejoin: own node, other node, a room the node never saw
                rejoin_s: dict[str, float] = {}
                back: list[FaultClient] = []
                for i, node in enumerate([0, 1, 1, 0]):  # homes were [0, 0, 1, 1]
                    left.append(clients[i])
                    new, rejoin_s[clients[i].name] = await rejoin(
                        nursery, clients[i], cluster, node
                    )
                    back.append(new)
                left.append(v)
                v_back, rejoin_s["v"] = await rejoin(nursery, v, cluster, 1)
                async with httpx.AsyncClient(base_url=cluster.node_url(1)) as node2_api:
                    r = await node2_api.get(
                        f"/v1/chatrooms/{side}/messages", headers=auth(tokens["v"])
                    )
                    assert r.status_code == 200, r.text
                    assert [m["message"] for m in r.json()["messages"]] == [
                        f"v before {i}" for i in range(10)
                    ]
                await traffic([*back, v_back], 20, "back ")
                await settle_all(back)
                await settle_all([v_back])
                rooms_status = (
                    await api.get("/v1/chatrooms", headers=auth(tokens["u0"]))
                ).status_code
                users_status = (
                    await api.get(f"/v1/chatrooms/{room}/users", headers=auth(tokens["u0"]))
                ).status_code

                # what needs MySQL still answers 503, past every cache
                await assert_needs_mysql(cluster, api, room, tokens)
                assert not late.live and late.connect_failures  # still refused
                assert all(f == "HTTP 503" for f in late.connect_failures), late.connect_failures
                await trio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))

                proxy.restore()
                restored_at = time.monotonic()

                async def room_created() -> bool:
                    r = await api.post("/v1/chatrooms", json={}, headers=auth(tokens["u0"]))
                    return r.status_code == 201

                with trio.fail_after(10):  # the directory answers again (poll: no event)
                    while not await room_created():  # noqa: ASYNC110
                        await trio.sleep(0.05)
                recovered_s = time.monotonic() - restored_at
                with trio.fail_after(10):
                    await late.wait_live()
                late_s = time.monotonic() - restored_at
                r = await api.post("/v1/tokens", json={"name": "u1", "password": PASSWORD})
                assert r.status_code == 200, r.text
                r = await api.post("/v1/users", json={"name": "newbie", "password": PASSWORD})
                assert r.status_code == 201, r.text

                late.send("late is in")
                everyone = [*back, late]
                head = await settle_all(everyone)
                await close_all([*everyone, v_back])

    verify_room(everyone, "6 mysql outage", head=head, left=left[:4])
    verify_room([v_back], "6 mysql outage, side room", left=[v])
    assert late.verify_stream()[0] == 1  # the late joiner got the whole room, in order
    for client in [*left, *back, v_back]:
        assert not client.close_codes  # nobody was cut off by the outage
    print(
        f"[faults] 6 mysql outage: during it (past the caches) GET /v1/chatrooms: {rooms_status}"
        f", GET /v1/chatrooms/{{id}}/users: {users_status}"
    )
    record("6 mysql outage", "200 messages delivered to all during the outage", chat_s)
    record("6 mysql outage", "outage duration", restored_at - cut_at)
    record(
        "6 mysql outage",
        "history and search on both nodes, 5 users, user checks due (15 of each)",
        reads_s,
    )
    record(
        "6 mysql outage",
        "slowest rejoin, join to live (own node, other node, unseen room)",
        max(rejoin_s.values()),
    )
    record("6 mysql outage", "create room answers 201 again, after restore", recovered_s)
    record("6 mysql outage", "a join refused during the outage got in, after restore", late_s)
