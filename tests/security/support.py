"""What the security tests measure: the process's memory, a node's responsiveness, close
codes and metrics, from outside (real sockets on loopback)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import attrs
import httpx
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection


def rss_bytes(pid: int | str = "self", field: str = "VmRSS") -> int:
    """A process's resident memory (``VmRSS``) or its peak so far (``VmHWM``), from /proc."""
    status = Path(f"/proc/{pid}/status")
    match = re.search(rf"^{field}:\s+(\d+) kB$", status.read_text(), re.M)
    assert match, f"no {field} in {status}"
    return int(match[1]) * 1024


@attrs.define
class Probe:
    """``GET /healthz`` one after another on one keep-alive connection, for as long as it
    runs: what a load balancer's health check sees. ``latencies_s`` of every answer."""

    client: httpx.AsyncClient
    latencies_s: list[float] = attrs.Factory(list)
    statuses: list[int] = attrs.Factory(list)

    async def run(self, *, interval_s: float = 0.02) -> None:
        while True:
            started = time.perf_counter()
            r = await self.client.get("/healthz")
            self.latencies_s.append(time.perf_counter() - started)
            self.statuses.append(r.status_code)
            await trio.sleep(interval_s)

    @property
    def worst_ms(self) -> float:
        return max(self.latencies_s, default=0.0) * 1000

    @property
    def median_ms(self) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[len(ordered) // 2] * 1000 if ordered else 0.0


async def close_code(ws: WebSocketConnection) -> int | None:
    """Read until the server closes the connection; its close code."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed as closed:
        return closed.reason.code if closed.reason else None


def metric(text: str, name: str) -> float:
    """The value of metric ``name`` in Prometheus text."""
    match = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match[1])
