"""Join latency with 100 messages of history: sequential joins (plain dialect, alternating two
users, so both nodes) that wait for the replayed history; first from the Redis room log, then
with the room's log trimmed to empty so all 100 come from Elasticsearch."""

from __future__ import annotations

from typing import Any

from common import LoadGenProc, log
from systems import HOST, ChatnodeCluster, Redis


def join_latency(
    cluster: ChatnodeCluster,
    redis: Redis,
    prefix: str,
    room: int,
    archived: int,
    mode: dict[str, Any],
) -> dict[str, Any]:
    log("extras: join latency")
    base = f"ws://{HOST}:{cluster.entry_port}/v1/chatrooms/{room}/join?user="
    urls = [base + "hist0", base + "hist1"]
    joins = {
        "cmd": "joins",
        "urls": urls,
        "count": mode["join_samples"],
        "expect": 100,
        "pause_s": 0.03,
    }
    lg = LoadGenProc()
    try:
        j_log = lg.call(joins, timeout=600)
        redis.cli("XTRIM", f"{prefix}:room:{room}:log", "MAXLEN", "0")
        j_es = lg.call(joins, timeout=600)
    finally:
        lg.close()
    return {"archived_messages": archived, "room_log": j_log, "elasticsearch": j_es}
