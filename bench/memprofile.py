#!/usr/bin/env python3
"""Where an idle WebSocket connection's memory goes.

Runs with the PROJECT's interpreter (it imports chatnode):

    .venv/bin/python bench/memprofile.py [--connections 1000] [--rss-only] [--rooms 10]

Starts an embedded node in this process, connects 50 warm-up members, then ``--connections``
idle plain-dialect members (over ``--rooms`` rooms, as the benchmark does) through
bench/loadgen.py (bench/.venv), and prints per connection:

* the RSS growth (what the benchmark measures; without ``--rss-only`` tracemalloc's own
  bookkeeping inflates it, so take the RSS figure from an ``--rss-only`` run);
* the live objects the connections added, by type, with their ``sys.getsizeof`` (the census
  shows what a connection is made of: tasks, coroutine frames, cancel scopes, dicts...);
* with tracemalloc (the default): the Python heap growth by package and by allocation site.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import sys
import tempfile
import tracemalloc
import urllib.request
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
PORT = 18391


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def post(path: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{PORT}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def census() -> collections.Counter[str]:
    """Live objects by type name (gc-tracked objects and their direct referents: strings,
    bytes and ints are not tracked by the gc themselves)."""
    gc.collect()
    tracked = gc.get_objects()
    seen = {id(o) for o in tracked}
    counts: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    for o in tracked:
        name = type(o).__qualname__
        counts[name] += 1
        sizes[name] += sys.getsizeof(o)
        for r in gc.get_referents(o):
            if id(r) not in seen and not gc.is_tracked(r) and not isinstance(r, type):
                seen.add(id(r))
                rname = type(r).__qualname__
                counts[rname] += 1
                sizes[rname] += sys.getsizeof(r)
    del tracked, seen
    return collections.Counter({f"{k}\0{counts[k]}": v for k, v in sizes.items()})


def print_census(before: collections.Counter[str], after: collections.Counter[str], n: int) -> None:
    b = {k.split("\0")[0]: (int(k.split("\0")[1]), v) for k, v in before.items()}
    a = {k.split("\0")[0]: (int(k.split("\0")[1]), v) for k, v in after.items()}
    rows = []
    for name, (count, size) in a.items():
        count0, size0 = b.get(name, (0, 0))
        if size - size0 > 0:
            rows.append((size - size0, count - count0, name))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"live objects added (sys.getsizeof, gc census): {total / 1024 / n:.1f} KiB each")
    for size, count, name in rows[:30]:
        if size / n >= 16:
            print(f"  {size / n:8.0f} B  {count / n:5.2f} objects  {name}")


async def main(n: int, rooms: int, trace: bool) -> None:
    from chatnode.app import App
    from chatnode.config import load_config

    data = tempfile.mkdtemp(prefix="chatnode-mem-")
    config = load_config(
        {
            "CHATNODE_INSECURE": "1",
            "CHATNODE_DATA_DIR": data,
            "CHATNODE_PORT": str(PORT),
            "CHATNODE_LOG_LEVEL": "WARNING",
        },
        {},
    )
    app = App(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run)
        users = [f"m{i}" for i in range(100)]
        for u in users:
            await trio.to_thread.run_sync(post, "/v1/users", {"name": u})
        room_ids = [
            (await trio.to_thread.run_sync(post, "/v1/chatrooms", {"name": f"mem{r}"}))["id"]
            for r in range(rooms)
        ]
        proc = await trio.lowlevel.open_process(
            [str(HERE / ".venv" / "bin" / "python"), str(HERE / "loadgen.py")], stdin=-1, stdout=-1
        )
        assert proc.stdin is not None and proc.stdout is not None
        buf = b""

        async def call(cmd: dict[str, object]) -> dict[str, object]:
            nonlocal buf
            await proc.stdin.send_all((json.dumps(cmd) + "\n").encode())
            while b"\n" not in buf:
                buf += await proc.stdout.receive_some(65536)
            line, _, buf = buf.partition(b"\n")
            return json.loads(line)

        def clients(count: int) -> list[dict[str, object]]:
            return [
                {
                    "url": f"ws://127.0.0.1:{PORT}/v1/chatrooms/{room_ids[i % rooms]}/join"
                    f"?user={users[i % 100]}",
                    "room": room_ids[i % rooms],
                    "kind": "plain",
                    "sender": False,
                }
                for i in range(count)
            ]

        await call({"cmd": "connect", "clients": clients(50)})  # warm: imports, pools, caches
        await trio.sleep(1)
        if trace:
            tracemalloc.start(1)
        snap1 = tracemalloc.take_snapshot() if trace else None
        census1 = census()  # after snap1 and before rss1: both censuses count the snapshot
        rss1 = rss_kib()
        answer = await call({"cmd": "connect", "clients": clients(n), "concurrency": 64})
        await trio.sleep(2)
        rss2 = rss_kib()
        census2 = census()
        snap2 = tracemalloc.take_snapshot() if trace else None
        tracemalloc.stop()
        got = int(answer["connected"])  # type: ignore[arg-type]
        print(f"{got} idle connections: RSS +{(rss2 - rss1) / got:.1f} KiB each")
        print_census(census1, census2, got)
        if snap1 is not None and snap2 is not None:
            print_heap(snap1, snap2, got)
        await call({"cmd": "close"})
        app.request_stop()


def print_heap(snap1: tracemalloc.Snapshot, snap2: tracemalloc.Snapshot, got: int) -> None:
    stats = snap2.compare_to(snap1, "lineno")
    heap = sum(s.size_diff for s in stats)
    print(f"Python heap (tracemalloc) +{heap / 1024 / got:.1f} KiB each")
    groups: dict[str, int] = {}
    for s in stats:
        f = s.traceback[0].filename
        key = (
            "trio"
            if "/trio/" in f
            else "wsproto"
            if "/wsproto/" in f
            else "h11"
            if "/h11/" in f
            else "chatnode"
            if "/chatnode/" in f or f.startswith("chatnode")
            else "attrs-generated (trio)"
            if f.startswith("<attrs")
            else os.path.basename(f)
        )
        groups[key] = groups.get(key, 0) + s.size_diff
    print(
        "by package, KiB per connection: "
        + ", ".join(
            f"{k} {v / 1024 / got:.1f}"
            for k, v in sorted(groups.items(), key=lambda kv: -kv[1])
            if v / got >= 100
        )
    )
    print("top allocation sites, bytes per connection:")
    for s in stats[:25]:
        frame = s.traceback[0]
        print(
            f"  {s.size_diff / got:8.0f}  {s.count_diff / got:5.1f} blocks  "
            f"{frame.filename.removeprefix(os.getcwd() + '/')}:{frame.lineno}"
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--rooms", type=int, default=10)
    p.add_argument("--rss-only", action="store_true", help="no tracemalloc: a true RSS figure")
    args = p.parse_args()
    trio.run(main, args.connections, args.rooms, not args.rss_only)
