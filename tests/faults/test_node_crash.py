"""Scenario 2 — a node crashes (``kill -9``) while traffic flows.

Proves: its clients reconnect through nginx to the surviving node and resume with no loss and
no duplicate (every client sees every offset once, in order); the dead node's presence is
reaped within ``presence_ttl_s`` plus one reaper period; the archive entries the dead node had
taken but not acknowledged are read again by the survivor once the dead node's lease on the
archive stream expired (``archive_claim_idle_s``), so Elasticsearch ends up with every offset.

To be sure the dead node holds unacknowledged archive entries when it dies, its own way to
Elasticsearch goes through a proxy that is cut: node1, started first, reads the archive stream
(holds its lease), takes batches and cannot store them.
"""

from __future__ import annotations

import time

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.faults.support import (
    FAULT_SETTINGS,
    archive_backlog,
    archive_reader,
    clients_on_nodes,
    close_all,
    fault_cluster,
    fault_proxy,
    make_room,
    make_users,
    node_ws,
    online,
    presence_entries,
    record,
    send_series,
    settle_all,
    start_all,
    verify_room,
    wait_archived,
)

pytestmark = pytest.mark.integration

PER_CLIENT = 40
INTERVAL_S = 0.02


async def watch_reaping(
    api: httpx.AsyncClient, token: str, room: int, reaped: trio.Event, at: list[float]
) -> None:
    """Note the time and set ``reaped`` once the ghost is no longer online (Redis state: poll
    it; the caller bounds the wait)."""
    while "ghost" in await online(api, token, room):  # noqa: ASYNC110
        await trio.sleep(0.02)
    at.append(time.monotonic())
    reaped.set()


async def test_kill_9_one_node_while_traffic_flows() -> None:
    async with fault_proxy("CHATNODE_TEST_ES_URL") as es_proxy:
        es_proxy.cut()  # node1 cannot archive: its taken entries stay unacknowledged
        async with fault_cluster(
            per_node_env=[{"CHATNODE_ELASTICSEARCH_URL": f"http://127.0.0.1:{es_proxy.port}"}]
        ) as (cluster, api):
            names = [f"u{i}" for i in range(6)]
            tokens = await make_users(api, [*names, "ghost"])
            room = await make_room(api, tokens["u0"])
            homes = [0, 0, 0, 1, 1, 1]  # u0-u2 start on node1 (the victim), u3-u5 on node2
            clients = clients_on_nodes(cluster, {n: tokens[n] for n in names}, room, homes)
            victim, survivor = cluster.nodes

            async with trio.open_nursery() as nursery:
                await start_all(nursery, clients)
                ghost_closed = trio.Event()

                async def ghost() -> None:
                    """A member on node1 that never reconnects: its presence must be reaped."""
                    url = f"{node_ws(cluster, 0)}/v1/chatrooms/{room}/join?token={tokens['ghost']}"
                    async with open_websocket_url(url, subprotocols=["chatnode.v1"]) as ws:
                        try:
                            while True:
                                await ws.get_message()
                        except ConnectionClosed:
                            ghost_closed.set()

                nursery.start_soon(ghost)
                with trio.fail_after(5):
                    while "ghost" not in await online(api, tokens["u0"], room):  # noqa: ASYNC110
                        await trio.sleep(0.05)  # presence is Redis state: poll it, bounded

                async with trio.open_nursery() as traffic:
                    for client in clients:
                        traffic.start_soon(send_series, client, PER_CLIENT, INTERVAL_S)
                    # kill once a third of the traffic is through and node1's archiver holds
                    # entries it could not store (Redis state: poll, bounded)
                    with trio.fail_after(10):
                        await clients[3].wait_offset(PER_CLIENT * len(clients) // 3)
                        while not (  # noqa: ASYNC110
                            await archive_reader(cluster) == "node1"
                            and await archive_backlog(cluster)
                        ):
                            await trio.sleep(0.02)
                    held_by_victim = await archive_backlog(cluster)
                    victim.kill()
                    killed_at = time.monotonic()
                    assert await victim.wait() == -9
                    reaped, reaped_at = trio.Event(), list[float]()
                    nursery.start_soon(watch_reaping, api, tokens["u3"], room, reaped, reaped_at)

                head = await settle_all(clients, timeout_s=20)
                recovered_at = max(
                    o.live_at for c in clients[:3] for o in c.outages if o.live_at is not None
                )
                with trio.fail_after(5):
                    await ghost_closed.wait()

                # the dead node's presence is reaped
                reap_bound_s = FAULT_SETTINGS["presence_ttl_s"] * (1 + 1 / 3) + 2.0
                with trio.fail_after(reap_bound_s + 5):
                    await reaped.wait()
                reaped_s = reaped_at[0] - killed_at
                assert not [e for e in await presence_entries(cluster, room) if e[0] == "node1"]
                assert sorted(await online(api, tokens["u3"], room)) == names

                await wait_archived(cluster, room, head, timeout_s=20)
                archived_s = time.monotonic() - killed_at
                assert await archive_reader(cluster) == "node2"
                assert survivor.returncode is None  # nothing restarted
                await close_all(clients)
                nursery.cancel_scope.cancel()  # the ghost task

    verify_room(clients, "2 node crash", head=PER_CLIENT * len(clients))
    for client in clients[:3]:  # the victim's clients came back on the survivor
        assert client.nodes[0] == "node1" and set(client.nodes[1:]) == {"node2"}, client.nodes
        assert client.close_codes == [1006], client.close_codes
    for client in clients[3:]:
        assert client.nodes == ["node2"] and not client.outages
    assert reaped_s <= reap_bound_s, f"presence reaped after {reaped_s:.1f}s"
    record("2 node crash", "victim's clients live again on the survivor after kill -9",
           recovered_at - killed_at)  # fmt: skip
    record("2 node crash", "dead node's presence reaped after kill -9", reaped_s)
    record("2 node crash", "archive entries waiting when the reading node died", held_by_victim, "")
    record("2 node crash", "Elasticsearch holds every offset, after kill -9", archived_s)
