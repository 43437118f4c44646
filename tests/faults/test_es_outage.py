"""Scenario 5 — Elasticsearch goes away while traffic flows, and comes back.

Both nodes reach Elasticsearch through a fault proxy that is cut (connections closed, new
ones refused) and restored. Proves: chat goes on during the outage (every member gets every
message, in order, once); search answers 503 with ``Retry-After``; the archivers wait and
catch up when it returns; afterwards Elasticsearch holds every offset (zero missing).
"""

from __future__ import annotations

import time

import pytest
import trio

from tests.faults.support import (
    auth,
    clients_on_nodes,
    close_all,
    es_offsets,
    fault_cluster,
    fault_proxy,
    make_room,
    make_users,
    node_metric,
    record,
    send_series,
    settle_all,
    start_all,
    verify_room,
    wait_archived,
)

pytestmark = pytest.mark.integration

INTERVAL_S = 0.01


async def test_elasticsearch_outage_chat_goes_on_archive_catches_up() -> None:
    async with (
        fault_proxy("CHATNODE_TEST_ES_URL") as proxy,
        fault_cluster(
            node_env={"CHATNODE_ELASTICSEARCH_URL": f"http://127.0.0.1:{proxy.port}"}
        ) as (cluster, api),
    ):
        names = [f"u{i}" for i in range(4)]
        tokens = await make_users(api, names)
        room = await make_room(api, tokens["u0"])
        clients = clients_on_nodes(cluster, tokens, room, [0, 0, 1, 1])
        async with trio.open_nursery() as nursery:
            await start_all(nursery, clients)
            async with trio.open_nursery() as traffic:  # before: archived as it comes
                for client in clients:
                    traffic.start_soon(send_series, client, 10, INTERVAL_S, "before ")
            before = await settle_all(clients)
            await wait_archived(cluster, room, before, timeout_s=10)

            proxy.cut()
            cut_at = time.monotonic()
            async with trio.open_nursery() as traffic:  # during: chat goes on
                for client in clients:
                    traffic.start_soon(send_series, client, 50, INTERVAL_S, "during ")
            head = await settle_all(clients)
            chat_s = time.monotonic() - cut_at

            r = await api.get(
                "/v1/messages/search", params={"q": "during"}, headers=auth(tokens["u0"])
            )
            assert r.status_code == 503, r.text
            assert r.headers["Retry-After"].isdigit(), r.headers
            assert r.json()["error"]["code"] == "unavailable"
            assert await es_offsets(cluster, room) == set(range(1, before + 1))
            # every node's archiver met the outage and waits: the reading node hands the
            # archive stream over when a batch waited archive_claim_idle_s, the next too
            with trio.fail_after(10):
                for port in cluster.node_ports:
                    while not await node_metric(port, "chatnode_archive_failures_total"):  # noqa: ASYNC110
                        await trio.sleep(0.1)
            await trio.sleep(2.0)  # a longer outage: the archivers back off

            proxy.restore()
            restored_at = time.monotonic()
            caught_up_s = await wait_archived(cluster, room, head, timeout_s=20)
            r = await api.get(
                "/v1/messages/search", params={"q": "during"}, headers=auth(tokens["u0"])
            )
            assert r.status_code == 200 and r.json()["hits"], r.text
            search_s = time.monotonic() - restored_at
            await close_all(clients)

    verify_room(clients, "5 elasticsearch outage", head=head)
    record("5 elasticsearch outage", "200 messages delivered to all during the outage", chat_s)
    record("5 elasticsearch outage", "outage duration", restored_at - cut_at)
    record("5 elasticsearch outage", "archive caught up (every offset in ES), after restore",
           caught_up_s)  # fmt: skip
    record("5 elasticsearch outage", "search answers 200 again, after restore", search_s)
