"""Scenario 6 — MySQL (the directory) goes away and comes back.

Both nodes reach MariaDB through a fault proxy that is cut and restored. Proves: operations
that need the directory answer 503 ``unavailable`` with ``Retry-After`` (create a room, create
a user, get a token); live chat in rooms members already joined goes on with no loss, no
duplicate, in order; after the restore the same operations succeed again without restarting a
node.

What a join does meanwhile (documented in docs/faults.md): a join the node has not seen before
reads the room and adds the membership in MySQL, so a new member's join is refused with HTTP 503
before the WebSocket handshake; a client retries it (FaultClient does) and gets in once MySQL
is back.
"""

from __future__ import annotations

import time

import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from tests.cluster.cluster import require_services, running_cluster
from tests.faults.client import FaultClient
from tests.faults.proxy import FaultProxy
from tests.faults.support import (
    FAULT_SETTINGS,
    PASSWORD,
    auth,
    clients_on_nodes,
    close_all,
    make_room,
    make_users,
    node_logs_on_failure,
    record,
    require_tools,
    send_series,
    settle_all,
    start_all,
    verify_room,
)

pytestmark = pytest.mark.integration

INTERVAL_S = 0.01
OUTAGE_S = 2.0


def assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    assert r.headers["Retry-After"].isdigit(), r.headers
    body = r.json()["error"]
    assert body["code"] == "unavailable" and body["retry_after_s"] >= 1, body


async def test_mysql_outage_live_chat_goes_on() -> None:
    require_tools()
    mysql_port = int(require_services()["CHATNODE_TEST_MYSQL_URL"].rsplit(":", 1)[1].split("/")[0])
    async with trio.open_nursery() as background:
        proxy = FaultProxy(mysql_port)
        await background.start(proxy.serve)

        def through_proxy(env: dict[str, str]) -> dict[str, str]:
            """The nodes reach the cluster's database through the proxy; migrations and
            clean-up use the real server."""
            url = env["CHATNODE_MYSQL_URL"].replace(f":{mysql_port}/", f":{proxy.port}/")
            return {"CHATNODE_MYSQL_URL": url}

        async with (
            running_cluster(nodes=2, node_env=through_proxy, **FAULT_SETTINGS) as cluster,
            httpx.AsyncClient(base_url=cluster.url) as api,
            node_logs_on_failure(cluster),
        ):
            names = [f"u{i}" for i in range(4)]
            tokens = await make_users(api, [*names, "late"])
            room = await make_room(api, tokens["u0"])
            clients = clients_on_nodes(cluster, {n: tokens[n] for n in names}, room, [0, 0, 1, 1])
            late = FaultClient(
                "late", tokens["late"], room, connect_url=cluster.ws_url, api_url=cluster.url
            )
            headers = auth(tokens["u0"])
            async with trio.open_nursery() as nursery:
                await start_all(nursery, clients)
                async with trio.open_nursery() as traffic:
                    for client in clients:
                        traffic.start_soon(send_series, client, 10, INTERVAL_S, "before ")
                await settle_all(clients)

                proxy.cut()
                cut_at = time.monotonic()
                # operations that need the directory: 503 with a retry hint
                assert_unavailable(await api.post("/v1/chatrooms", json={}, headers=headers))
                assert_unavailable(
                    await api.post("/v1/users", json={"name": "newbie", "password": PASSWORD})
                )
                assert_unavailable(
                    await api.post("/v1/tokens", json={"name": "u1", "password": PASSWORD})
                )
                # a new join (or a reconnection) is refused before the handshake
                url = f"{cluster.ws_url}/v1/chatrooms/{room}/join?token={tokens['late']}"
                with pytest.raises(ConnectionRejected) as refused:
                    async with open_websocket_url(url, subprotocols=["chatnode.v1"]):
                        pass
                assert refused.value.status_code == 503
                nursery.start_soon(late.run)  # keeps retrying until MySQL is back
                users_status = (
                    await api.get(f"/v1/chatrooms/{room}/users", headers=headers)
                ).status_code

                # live chat in the joined room goes on
                async with trio.open_nursery() as traffic:
                    for client in clients:
                        traffic.start_soon(send_series, client, 50, INTERVAL_S, "during ")
                await settle_all(clients)
                chat_s = time.monotonic() - cut_at
                assert not late.live and late.connect_failures  # still refused
                assert all(f == "HTTP 503" for f in late.connect_failures), late.connect_failures
                await trio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))

                proxy.restore()
                restored_at = time.monotonic()

                async def room_created() -> bool:
                    r = await api.post("/v1/chatrooms", json={}, headers=headers)
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

                late.send("late is in")
                everyone = [*clients, late]
                head = await settle_all(everyone)
                await close_all(everyone)
        background.cancel_scope.cancel()

    verify_room(everyone, "6 mysql outage", head=head)
    assert late.verify_stream()[0] == 1  # the late joiner got the whole room, in order
    for client in clients:
        assert not client.close_codes  # the joined members never noticed
    print(f"[faults] 6 mysql outage: GET /v1/chatrooms/{{id}}/users during it: {users_status}")
    record("6 mysql outage", "200 messages delivered to all during the outage", chat_s)
    record("6 mysql outage", "outage duration", restored_at - cut_at)
    record("6 mysql outage", "create room answers 201 again, after restore", recovered_s)
    record("6 mysql outage", "a join refused during the outage got in, after restore", late_s)
