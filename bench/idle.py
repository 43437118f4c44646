"""Memory per idle connection: RSS growth of a system's processes per idle joined member, on
chatnode's cluster and, for context, on the peers."""

from __future__ import annotations

import time
from typing import Any

from common import LoadGenProc, log, rss_kib
from systems import ChatnodeSingle, Libwebsockets, Redis, System, WebsocketsRef


def idle_peers(redis: Redis, mode: dict[str, Any]) -> dict[str, Any]:
    """The same idle-memory measurement on the peers, for context (no target)."""
    result: dict[str, Any] = {}
    for peer in (WebsocketsRef(redis), ChatnodeSingle(), Libwebsockets()):
        log(f"extras: idle connections on {peer.name}")
        try:
            peer.start()
            if isinstance(peer, ChatnodeSingle):
                peer._users([f"b0m{m}" for m in range(100)])
            result[peer.name] = idle_memory(peer, mode["idle_per_node"])
        except Exception as exc:
            result[peer.name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            peer.stop()
    return result


def idle_memory(system: System, per_node: int) -> dict[str, Any]:
    groups = system.idle_clients(per_node)
    warm = system.idle_clients(50)
    lg = LoadGenProc()
    try:
        w = lg.call({"cmd": "connect", "clients": [c for g in warm for c in g]})
        lg.call({"cmd": "close"})
    finally:
        lg.close()
    time.sleep(2.0)
    before = [rss_kib(g) for g in system.node_pid_groups()]
    lg = LoadGenProc()
    try:
        c = lg.call(
            {
                "cmd": "connect",
                "clients": [c for g in groups for c in g],
                "concurrency": 64,
                "timeout_s": 60,
            },
            timeout=1200,
        )
        time.sleep(3.0)
        after = [rss_kib(g) for g in system.node_pid_groups()]
    finally:
        lg.close()
    connected = c["connected"]
    growth = sum(after) - sum(before)
    return {
        "per_node": per_node,
        "nodes": len(groups),
        "connected": connected,
        "failed": c["failed"],
        "errors": c["errors"],
        "warm_connected": w["connected"],
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": growth / connected if connected else None,
        "connect_s": c["elapsed_s"],
    }
