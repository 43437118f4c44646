#!/usr/bin/env python3
"""Where an idle WebSocket connection's memory goes, with tracemalloc.

Runs with the PROJECT's interpreter (it imports chatnode):

    .venv/bin/python bench/memprofile.py [--connections 1000]

Starts an embedded node in this process with tracemalloc on, connects ``--connections`` idle
plain-dialect members through bench/loadgen.py (bench/.venv), and prints the Python heap growth
per connection by allocation site, next to the RSS growth per connection.
"""

from __future__ import annotations

import argparse
import json
import os
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


async def main(n: int) -> None:
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
        room = (await trio.to_thread.run_sync(post, "/v1/chatrooms", {"name": "mem"}))["id"]
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
                    "url": f"ws://127.0.0.1:{PORT}/v1/chatrooms/{room}/join?user={users[i % 100]}",
                    "room": room,
                    "kind": "plain",
                    "sender": False,
                }
                for i in range(count)
            ]

        await call({"cmd": "connect", "clients": clients(50)})  # warm: imports, pools, caches
        await trio.sleep(1)
        snap1, rss1 = tracemalloc.take_snapshot(), rss_kib()
        answer = await call({"cmd": "connect", "clients": clients(n)})
        await trio.sleep(2)
        snap2, rss2 = tracemalloc.take_snapshot(), rss_kib()
        got = int(answer["connected"])  # type: ignore[arg-type]
        stats = snap2.compare_to(snap1, "lineno")
        heap = sum(s.size_diff for s in stats)
        print(
            f"{got} idle connections: RSS +{(rss2 - rss1) / got:.1f} KiB each, "
            f"Python heap (tracemalloc) +{heap / 1024 / got:.1f} KiB each"
        )
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
        await call({"cmd": "close"})
        app.request_stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=1000)
    tracemalloc.start(1)
    trio.run(main, p.parse_args().connections)
