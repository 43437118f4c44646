"""REST throughput: ``GET /v1/chatrooms`` through nginx against nginx's own ``return 200``,
driven by wrk on the load generator's core."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

from common import LOADGEN_CPUS, cpu_seconds
from systems import HOST, System


def wrk(url: str, seconds: int, connections: int = 32) -> dict[str, Any]:
    binary = shutil.which("wrk")
    if binary is None:
        return {"error": "wrk not installed"}
    cpus = ",".join(str(c) for c in sorted(LOADGEN_CPUS))
    out = subprocess.run(
        [
            "taskset",
            "-c",
            cpus,
            binary,
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    m = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    total = re.search(r"(\d+) requests in", out.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out.stdout)
    p99 = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out.stdout)
    res: dict[str, Any] = {
        "url": url,
        "rps": float(m.group(1)) if m else None,
        "requests": int(total.group(1)) if total else None,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }
    if p99:
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
        res["p99_ms"] = float(p99.group(1)) * scale
    if m is None:
        res["error"] = out.stdout[-500:] + out.stderr[-500:]
    return res


def rest_throughput(system: System, seconds: int) -> dict[str, Any]:
    """``GET /v1/chatrooms`` through nginx vs nginx's own ``return 200``, wrk on the load
    generator's core.

    The figure (``ratio_per_node_cpu``) compares requests per CPU-second: what the nodes served
    per second of their CPU (/proc, like the fan-out CPU figures: one node process on a core of
    its own), against what nginx served per second of its CPU, at least its req/s on CPU 0
    (nginx may not fill the core when wrk is the limit). Both nodes and nginx share CPU 0, so
    the raw "all nodes' req/s ÷ 2" (``ratio_per_node``, kept beside it) is halved by the
    sharing, not by the nodes, and moves with whatever else runs on that core."""
    port = system.entry_port
    wrk(f"http://{HOST}:{port}/v1/chatrooms", 1)  # warm the caches and keep-alive pools
    nginx_pids = system.nginx.pids() if system.nginx else []
    n0 = cpu_seconds(nginx_pids)
    ngx = wrk(f"http://{HOST}:{port}/nginx-health", seconds)
    nginx_cpu = cpu_seconds(nginx_pids) - n0
    servers = system.server_pids()
    c0 = cpu_seconds(servers)
    api = wrk(f"http://{HOST}:{port}/v1/chatrooms", seconds)
    cpu = cpu_seconds(servers) - c0
    res: dict[str, Any] = {
        "nginx_return_200": ngx,
        "chatrooms": api,
        "nodes": system.nodes,
        "node_cpu_s": cpu,
        "nginx_cpu_s": nginx_cpu,
    }
    if api.get("rps") and ngx.get("rps") and api.get("requests") and cpu > 0:
        res["per_node_rps"] = api["rps"] / system.nodes
        res["ratio_per_node"] = res["per_node_rps"] / ngx["rps"]
        res["node_cpu_us_per_request"] = cpu / api["requests"] * 1e6
        res["rps_per_node_cpu"] = api["requests"] / cpu
        nginx_per_cpu = ngx["requests"] / nginx_cpu if ngx.get("requests") and nginx_cpu else 0
        res["nginx_rps_per_cpu"] = max(ngx["rps"], nginx_per_cpu)
        res["ratio_per_node_cpu"] = res["rps_per_node_cpu"] / res["nginx_rps_per_cpu"]
        if ngx.get("requests"):
            res["nginx_cores"] = nginx_cpu / (ngx["requests"] / ngx["rps"])
    return res
