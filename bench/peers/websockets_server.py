#!/usr/bin/env python3
"""The websockets-library reference peer: what the best plain-Python room server does.

One process of N; run two behind nginx (bench/run does). Same room semantics as chatnode's
plain dialect: ``GET /v1/chatrooms/{id}/join?user=NAME`` upgrades; every text frame a member
sends is a message; the server stamps it into ``{"chatroom", "user", "message", "timestamp"}``
JSON, publishes it on Redis, and every process (this one included) hands it to its local members
of that room with ``websockets.broadcast()`` (encode once, write to every socket, no await per
member). Compression off. Redis pub/sub carries the traffic between processes; publishes from
one connection are awaited in order, so each sender's messages keep their order.

    python websockets_server.py --port 18101 --redis redis://127.0.0.1:16379/0 \\
        [--unix /tmp/ws-1.sock]   # also on a Unix socket (nginx on the same host), like chatnode
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve, unix_serve

CHANNEL = "bench:ws:rooms"
rooms: dict[int, set[ServerConnection]] = {}


async def handler(ws: ServerConnection, bus: aioredis.Redis) -> None:
    assert ws.request is not None
    url = urlsplit(ws.request.path)
    parts = url.path.strip("/").split("/")
    try:
        room = int(parts[2])
    except (IndexError, ValueError):
        await ws.close(4404, "no such room")
        return
    user = parse_qs(url.query).get("user", ["anonymous"])[0]
    members = rooms.setdefault(room, set())
    members.add(ws)
    prefix = f"{room}\n".encode()
    try:
        async for text in ws:
            if not isinstance(text, str):
                continue
            frame = json.dumps(
                {
                    "chatroom": room,
                    "user": user,
                    "message": text,
                    "timestamp": int(time.time() * 1000),
                },
                separators=(",", ":"),
            )
            await bus.publish(CHANNEL, prefix + frame.encode())
    finally:
        members.discard(ws)
        if not members:
            rooms.pop(room, None)


async def relay(url: str, ready: asyncio.Event) -> None:
    sub = aioredis.from_url(url)
    pubsub = sub.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(CHANNEL)
    ready.set()
    async for item in pubsub.listen():
        data: bytes = item["data"]
        head, _, frame = data.partition(b"\n")
        members = rooms.get(int(head))
        if members:
            broadcast(members, frame.decode(), text=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--unix", help="also listen on this Unix socket path")
    args = parser.parse_args()
    bus = aioredis.from_url(args.redis)
    ready = asyncio.Event()
    relay_task = asyncio.create_task(relay(args.redis, ready))
    await ready.wait()
    options: dict[str, Any] = {"compression": None, "max_queue": 1024, "server_header": None}
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            serve(lambda ws: handler(ws, bus), args.host, args.port, **options)
        )
        if args.unix:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.unix)  # left by an earlier run (nginx reaches us only here)
            await stack.enter_async_context(
                unix_serve(lambda ws: handler(ws, bus), args.unix, **options)
            )
        print(f"listening on {args.host}:{args.port} {args.unix or ''}", flush=True)
        await server.serve_forever()
    relay_task.cancel()


if __name__ == "__main__":
    uvloop.run(main())
