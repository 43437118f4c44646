"""Scenario 4 — Redis crashes and comes back while traffic flows.

The cluster runs on a dedicated ``redis-server`` of its own (its own port, AOF with
``appendfsync always`` in a temporary directory, so a restart keeps every acknowledged write),
started and killed by PID: the shared Redis of the other tests is never touched.

Proves: while Redis is down a ``send`` is answered with an ``error`` frame ``unavailable`` and
a ``retry_after_s`` (never a silent drop); when Redis is back the nodes reconnect and
resubscribe by themselves (the node processes are the same ones) and traffic flows again; the
clients' retries lose nothing and duplicate nothing (a send whose reply was lost with Redis is
looked up in the history before it is resent); every offset reaches Elasticsearch; presence
is right again (every connected member is online).
"""

from __future__ import annotations

import time

import pytest
import trio

from tests.faults.client import FaultClient
from tests.faults.redis_server import dedicated_redis
from tests.faults.support import (
    clients_on_nodes,
    close_all,
    fault_cluster,
    make_room,
    make_users,
    online,
    probe_reaches_everyone,
    record,
    require_tools,
    send_until,
    settle_all,
    start_all,
    verify_room,
    wait_archived,
)

pytestmark = pytest.mark.integration

INTERVAL_S = 0.05
OUTAGE_S = 2.5


async def test_redis_crash_and_restart_under_traffic() -> None:
    require_tools("redis-server")
    async with dedicated_redis() as redis, fault_cluster(redis_url=redis.url) as (cluster, api):
        names = [f"u{i}" for i in range(4)]
        tokens = await make_users(api, [*names, "probe"])
        room = await make_room(api, tokens["u0"])
        clients = clients_on_nodes(cluster, {n: tokens[n] for n in names}, room, [0, 0, 1, 1])
        probe = FaultClient(
            "probe", tokens["probe"], room, connect_url=cluster.ws_url, api_url=cluster.url
        )
        everyone = [*clients, probe]
        pids = [node.pid for node in cluster.nodes]

        async with trio.open_nursery() as nursery:
            await start_all(nursery, everyone)
            stop_traffic = trio.Event()
            async with trio.open_nursery() as traffic:
                for client in clients:
                    traffic.start_soon(send_until, client, stop_traffic, INTERVAL_S)
                with trio.fail_after(10):
                    await clients[0].wait_offset(40)

                await redis.kill()
                killed_at = time.monotonic()
                with trio.fail_after(10):  # a send during the outage is refused, not dropped
                    await clients[0].wait_for(
                        "an unavailable error", lambda: clients[0].unavailable_errors > 0
                    )
                    first_error_s = time.monotonic() - killed_at
                await trio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - killed_at)))
                await redis.start()
                restarted_at = time.monotonic()

                # recovery: a message sent now reaches every member (the probe retries while
                # the nodes reconnect)
                await probe_reaches_everyone(probe, everyone, "probe after restart")
                recovered_at = time.monotonic()
                await trio.sleep(0.5)  # traffic on the recovered cluster
                stop_traffic.set()

            head = await settle_all(everyone, timeout_s=20)
            assert [node.pid for node in cluster.nodes] == pids
            assert all(node.returncode is None for node in cluster.nodes)  # no node restarted
            with trio.fail_after(10):  # presence is written again (Redis state: poll, bounded)
                while sorted(await online(api, tokens["u0"], room)) != sorted([*names, "probe"]):  # noqa: ASYNC110
                    await trio.sleep(0.1)
            presence_s = time.monotonic() - restarted_at
            await wait_archived(cluster, room, head, timeout_s=20)
            archived_s = time.monotonic() - restarted_at
            await close_all(everyone)

    verify_room(everyone, "4 redis outage", head=head)
    unavailable = sum(c.unavailable_errors for c in clients)
    assert unavailable > 0
    for client in clients:
        assert not client.close_codes, client.close_codes  # the connections lived through it
    record("4 redis outage", "first 'unavailable' error frame after Redis died", first_error_s)
    record("4 redis outage", "outage (Redis down) duration", restarted_at - killed_at)
    record("4 redis outage", "message delivered to every member again, after restart",
           recovered_at - restarted_at)  # fmt: skip
    record("4 redis outage", "presence right again (checked after settling), after restart",
           presence_s)  # fmt: skip
    record("4 redis outage", "sends refused with 'unavailable' (all retried)", unavailable, "")
    record("4 redis outage", "Elasticsearch holds every offset, after restart", archived_s)
