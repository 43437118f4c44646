"""Scenario 3 — graceful stop: SIGTERM to one of two nodes while traffic flows.

Proves: the node stops accepting connections, closes its members with 4000 (who reconnect
through nginx to the other node and resume with no loss and no duplicate), flushes its
archiver and releases the archive stream (node1, started first, read it: its lease is gone at
exit, and Elasticsearch holds every offset long before the lease could have expired:
``archive_claim_idle_s`` is 60 s here), and exits within the drain timeout.
"""

from __future__ import annotations

import time

import pytest
import trio

from tests.faults.support import (
    FAULT_SETTINGS,
    archive_reader,
    clients_on_nodes,
    close_all,
    fault_cluster,
    make_room,
    make_users,
    record,
    send_until,
    settle_all,
    start_all,
    verify_room,
    wait_archived,
)

pytestmark = pytest.mark.integration

INTERVAL_S = 0.02
CLAIM_IDLE_S = 60.0


async def refuses(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def test_sigterm_drains_one_node_while_traffic_flows() -> None:
    async with fault_cluster(archive_claim_idle_s=CLAIM_IDLE_S) as (cluster, api):
        names = [f"u{i}" for i in range(6)]
        tokens = await make_users(api, names)
        room = await make_room(api, tokens["u0"])
        clients = clients_on_nodes(cluster, tokens, room, [0, 0, 0, 1, 1, 1])
        stopping, survivor = cluster.nodes
        drain_timeout_s = float(FAULT_SETTINGS["drain_timeout_s"])

        async with trio.open_nursery() as nursery:
            await start_all(nursery, clients)
            stop_traffic = trio.Event()
            async with trio.open_nursery() as traffic:
                # traffic goes on past the stopping node's exit: its archiver has work to the end
                for client in clients:
                    traffic.start_soon(send_until, client, stop_traffic, INTERVAL_S)
                with trio.fail_after(10):
                    await clients[3].wait_offset(100)
                assert await archive_reader(cluster) == "node1"  # started first
                stopping.terminate()
                stopped_at = time.monotonic()
                with trio.fail_after(drain_timeout_s + 5):
                    await clients[0].wait_for("told to go", lambda: bool(clients[0].close_codes))
                    told_s = max(c.outages[0].lost_at for c in clients[:3]) - stopped_at
                    # it no longer accepts connections (bounded: the listener closes at once)
                    while not await refuses(stopping.port):  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    refused_s = time.monotonic() - stopped_at
                    assert await stopping.wait() == 0
                    exited_s = time.monotonic() - stopped_at
                # right after the exit, the stopped node no longer reads: flushed, released
                assert await archive_reader(cluster) != "node1"
                await trio.sleep(0.5)
                stop_traffic.set()

            head = await settle_all(clients, timeout_s=20)
            await wait_archived(cluster, room, head, timeout_s=CLAIM_IDLE_S / 4)
            archived_s = time.monotonic() - stopped_at
            recovered_at = max(
                o.live_at for c in clients[:3] for o in c.outages if o.live_at is not None
            )
            assert survivor.returncode is None
            await close_all(clients)

    verify_room(clients, "3 graceful stop", head=head)
    for client in clients[:3]:
        assert client.close_codes == [4000], client.close_codes
        assert client.nodes[0] == "node1" and set(client.nodes[1:]) == {"node2"}, client.nodes
    for client in clients[3:]:
        assert not client.close_codes and client.nodes == ["node2"]
    assert exited_s <= drain_timeout_s + 1.5, f"exited {exited_s:.2f}s after SIGTERM"
    assert archived_s < CLAIM_IDLE_S / 2
    record("3 graceful stop", "members closed with 4000 after SIGTERM", told_s)
    record("3 graceful stop", "port refuses connections after SIGTERM (at most)", refused_s)
    record("3 graceful stop", f"process exited after SIGTERM (drain timeout {drain_timeout_s:g}s)",
           exited_s)  # fmt: skip
    record("3 graceful stop", "its members live again on the other node after SIGTERM",
           recovered_at - stopped_at)  # fmt: skip
    record("3 graceful stop", "Elasticsearch holds every offset, after SIGTERM", archived_s)
