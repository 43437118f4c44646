#!/usr/bin/env python3
"""Profile a chatnode node under the fan-out workload with py-spy.

    bench/.venv/bin/python bench/profile.py [--system chatnode-cluster|chatnode-single]
        [--offered 5000] [--seconds 20] [--idle | --rest] [--isolate]

Starts the system like bench/run does (pinned, same workload), connects the members, then runs
one step at ``--offered`` deliveries/s while ``py-spy record`` samples node 1 (``--idle``: no
traffic, what the node burns on its own; ``--rest``: wrk on ``GET /v1/chatrooms``). Writes the
collapsed stacks and the report to ``bench/results/profile-<system>-<offered>{.txt,.top.txt}``:
node 1's measured CPU split over its code paths (per message and per local delivery), then the
top frames by own and by inclusive time.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, LOADGEN_CPUS, RESULTS, LoadGenProc, cpu_seconds, log, raise_nofile
from settings import CLUSTER_WORKLOAD, SINGLE_WORKLOAD
from systems import ChatnodeCluster, ChatnodeSingle, Redis

PY_SPY = BENCH / ".venv" / "bin" / "py-spy"


def top_frames(collapsed: Path, n: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        own[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    out = [f"{total} samples", "", "own time:"]
    for f, c in own.most_common(n):
        out.append(f"  {c / total:6.1%}  {f}")
    out += ["", "inclusive time:"]
    for f, c in incl.most_common(n + 15):
        out.append(f"  {c / total:6.1%}  {f}")
    return "\n".join(out)


# Code paths of a node, by a frame that roots them (inclusive time).
CATEGORIES = {
    "write syscalls: batcher flush (WriteBatcher.run)": "WriteBatcher.run",
    "hub fan-out: frame encode + send_nowait (Hub._fan_out)": "Hub._fan_out",
    "bus receive: pub/sub dispatch (RedisBus._run_link)": "RedisBus._run_link",
    "Redis client, every port (adapters/redis/client.py)": "redis/client.py",
    "client frame -> publish (RoomConnection.send)": "RoomConnection.send",
    "  of which RedisBus.publish (Lua EVALSHA)": "RedisBus.publish",
    "  of which SqliteBus.publish (embedded)": "SqliteBus.publish",
    "worker threads (SQLite / mysqlclient via trio.to_thread)": "WorkerThread._work",
    "archiver (Archiver.run)": "Archiver.run",
    "  of which ES bulk (elasticsearch-py + httpx)": "EsArchive.store",
    "  of which archive feed take/ack (RedisArchiveFeed)": "RedisArchiveFeed",
    "REST handler (Api.handle)": "Api.handle",
    "  of which JSON encode of the answer": "JSONEncoder.iterencode",
}
IDLE_FRAME = "EpollIOManager.get_events"  # epoll_wait: waiting, not CPU


def breakdown(collapsed: Path, node_cpu_s: float, messages: int, local_deliveries: int) -> str:
    """Inclusive share of each code path among the non-idle samples, scaled to the node's
    measured CPU time, per message and per local delivery."""
    incl: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        if IDLE_FRAME in frames[-1]:
            idle += c
            continue
        for name, key in CATEGORIES.items():
            if any(key in f for f in frames):
                incl[name] += c
    active = max(1, total - idle)
    per_sample = node_cpu_s / active
    out = [
        f"node 1: {node_cpu_s:.2f} s CPU, {active} busy samples ({idle} in epoll_wait), "
        f"{messages} messages, ~{local_deliveries} local deliveries",
        "",
        "| code path | share of busy | CPU s | µs / message | µs / local delivery |",
        "|---|---|---|---|---|",
    ]
    for name in CATEGORIES:
        if not incl[name]:
            continue
        sec = incl[name] * per_sample
        per_msg = f"{sec / messages * 1e6:.0f}" if messages else "-"
        per_del = f"{sec / local_deliveries * 1e6:.1f}" if local_deliveries else "-"
        out.append(f"| {name} | {incl[name] / active:.1%} | {sec:.2f} | {per_msg} | {per_del} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--system", default="chatnode-cluster")
    p.add_argument("--offered", type=int, default=5000)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--idle", action="store_true")
    p.add_argument(
        "--rest",
        action="store_true",
        help="instead of fan-out: wrk on GET /v1/chatrooms through nginx",
    )
    p.add_argument(
        "--isolate",
        action="store_true",
        help="node 1 alone on CPU 0, everything else on CPU 1: py-spy samples wall "
        "time, so on a shared core a node preempted inside a syscall (e.g. by Redis "
        "it just woke) would be charged for the other process's time",
    )
    p.add_argument(
        "--mysql-url", default="mysql://chatnode:chatnode@127.0.0.1:33061/chatnode_bench"
    )
    p.add_argument("--es-url", default="http://127.0.0.1:19200")
    args = p.parse_args()
    import os

    if args.isolate:
        import common

        common.SERVER_CPUS.clear()
        common.SERVER_CPUS.update(LOADGEN_CPUS)
    os.sched_setaffinity(0, LOADGEN_CPUS)
    raise_nofile()
    RESULTS.mkdir(parents=True, exist_ok=True)
    redis = Redis()
    redis.start()
    tag = f"{args.system}-{'rest' if args.rest else 'idle' if args.idle else args.offered}"
    try:
        if args.system == "chatnode-cluster":
            system = ChatnodeCluster(redis, args.mysql_url, args.es_url, "chatnodebench")
            system.migrate()
            workload = CLUSTER_WORKLOAD
        else:
            system = ChatnodeSingle()
            workload = SINGLE_WORKLOAD
        system.start()
        lg = LoadGenProc()
        try:
            specs = system.prepare(workload["rooms"], workload["members"], workload["senders"])
            c = lg.call({"cmd": "connect", "clients": specs})
            log(f"connected {c['connected']}")
            lg.call({"cmd": "step", "rate_msgs": 10, "count": 30})
            target = system.procs[0].pid
            if args.isolate:
                subprocess.run(
                    ["taskset", "-a", "-p", "-c", "0", str(target)],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
            c_node0 = cpu_seconds([target])
            raw = RESULTS / f"profile-{tag}.txt"
            spy = subprocess.Popen(
                [
                    str(PY_SPY),
                    "record",
                    "--pid",
                    str(target),
                    "--duration",
                    str(int(args.seconds)),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(1.0)
            c0 = cpu_seconds(system.server_pids())
            if args.rest:
                from rest import wrk

                w = wrk(f"http://127.0.0.1:{system.entry_port}/v1/chatrooms", int(args.seconds - 2))
                log(f"wrk: {w}")
                r: dict = {"received": 0}
            elif args.idle:
                time.sleep(args.seconds - 1)
                r = {"received": 0}
            else:
                rate = args.offered / workload["members"]
                r = lg.call(
                    {"cmd": "step", "rate_msgs": rate, "count": int(rate * (args.seconds - 2))}
                )
            cpu = cpu_seconds(system.server_pids()) - c0
            node_cpu = cpu_seconds([target]) - c_node0
            log(f"node 1 cpu during the profile: {node_cpu:.2f}s")
            spy.wait(args.seconds + 30)
            log(
                f"step: received {r['received']}, server cpu {cpu:.2f}s"
                + (f" = {cpu / r['received'] * 1e6:.1f} us/delivery" if r["received"] else "")
            )
            if raw.exists():
                messages = r.get("sent", 0)
                local = r["received"] // max(1, system.nodes)
                report = breakdown(raw, node_cpu, messages, local) + "\n\n" + top_frames(raw)
                (RESULTS / f"profile-{tag}.top.txt").write_text(report)
                print(report)
            else:
                print(spy.stderr.read().decode() if spy.stderr else "py-spy wrote nothing")
        finally:
            lg.close()
            system.stop()
    finally:
        redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
