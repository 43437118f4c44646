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

Multi-room mode (the messenger workload, mirroring chatnode's ``GET /v1/connect``):
``GET /v1/connect?user=NAME&rooms=1,2,3`` subscribes one connection to those rooms (the peer
has no directory: the client names its rooms). In: ``{"type": "send", "chatroom", "message"}``
(or ``"text"``); out: ``{"type": "message", "chatroom", "user", "message", "timestamp"}``, and
one ``{"type": "live", "chatroom"}`` per room once the room's channel is subscribed. Here every
room has a Redis channel of its own (``bench:ws:room:{id}``), SUBSCRIBEd on a process's own
pub/sub connection when the process gets its first local member of the room and
UNSUBSCRIBEd when its last one leaves, as chatnode's bus does.
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
ROOM_CHANNEL = "bench:ws:room:"
rooms: dict[int, set[ServerConnection]] = {}
# multi-room mode: room -> local /v1/connect members; room -> its channel's SUBSCRIBE confirmed
connect_rooms: dict[int, set[ServerConnection]] = {}
subscribed: dict[int, asyncio.Event] = {}
pubsub_conn: list[Any] = []  # the relay's PubSub (set once it is up)


async def handler(ws: ServerConnection, bus: aioredis.Redis) -> None:
    assert ws.request is not None
    url = urlsplit(ws.request.path)
    if url.path == "/v1/connect":
        await connect_handler(ws, bus, parse_qs(url.query))
        return
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


async def connect_handler(
    ws: ServerConnection, bus: aioredis.Redis, query: dict[str, list[str]]
) -> None:
    user = query.get("user", ["anonymous"])[0]
    try:
        mine = [int(r) for r in query.get("rooms", [""])[0].split(",") if r]
    except ValueError:
        await ws.close(4400, "bad rooms")
        return
    pubsub = pubsub_conn[0]
    try:
        for room in mine:
            members = connect_rooms.setdefault(room, set())
            members.add(ws)
            event = subscribed.get(room)
            if event is None:  # first local member: subscribe the room's channel
                event = subscribed[room] = asyncio.Event()
                await pubsub.subscribe(f"{ROOM_CHANNEL}{room}")
            await event.wait()
            await ws.send(json.dumps({"type": "live", "chatroom": room}))
        allowed = set(mine)
        async for raw in ws:
            if not isinstance(raw, str):
                continue
            try:
                frame = json.loads(raw)
                room = int(frame["chatroom"])
                text = frame.get("message", frame.get("text"))
            except (ValueError, KeyError, TypeError):
                continue
            if frame.get("type") != "send" or room not in allowed or not isinstance(text, str):
                continue
            out = json.dumps(
                {
                    "type": "message",
                    "chatroom": room,
                    "user": user,
                    "message": text,
                    "timestamp": int(time.time() * 1000),
                },
                separators=(",", ":"),
            )
            await bus.publish(f"{ROOM_CHANNEL}{room}", out)
    finally:
        for room in mine:
            members = connect_rooms.get(room)
            if members is None:
                continue
            members.discard(ws)
            if not members:  # last local member: unsubscribe
                connect_rooms.pop(room, None)
                subscribed.pop(room, None)
                with contextlib.suppress(Exception):
                    await pubsub.unsubscribe(f"{ROOM_CHANNEL}{room}")


async def relay(url: str, ready: asyncio.Event, name: str) -> None:
    sub = aioredis.from_url(url, client_name=name)
    pubsub = sub.pubsub()
    await pubsub.subscribe(CHANNEL)
    pubsub_conn.append(pubsub)
    ready.set()
    head_len = len(ROOM_CHANNEL)
    async for item in pubsub.listen():
        kind = item["type"]
        if kind == "message":
            channel: bytes = item["channel"]
            data: bytes = item["data"]
            if channel == b"bench:ws:rooms":
                head, _, frame = data.partition(b"\n")
                members = rooms.get(int(head))
                if members:
                    broadcast(members, frame.decode(), text=True)
                continue
            members = connect_rooms.get(int(channel[head_len:]))
            if members:
                broadcast(members, data.decode(), text=True)
        elif kind == "subscribe" and item["channel"] != b"bench:ws:rooms":
            event = subscribed.get(int(item["channel"][head_len:]))
            if event is not None:
                event.set()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--unix", help="also listen on this Unix socket path")
    args = parser.parse_args()
    # Publishes are awaited per connection; at most 64 Redis connections per process (the
    # fan-out's 100 senders never reach it; 2,000 messenger users would open thousands, past
    # Redis's client limit): beyond it a publish waits for a free connection.
    bus = aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(args.redis, max_connections=64)
    )
    ready = asyncio.Event()
    relay_task = asyncio.create_task(relay(args.redis, ready, f"websockets-ref:{args.port}"))
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
