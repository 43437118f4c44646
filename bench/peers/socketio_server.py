#!/usr/bin/env python3
"""The python-socketio peer: what a Python team picks today.

``socketio.AsyncServer`` with ``AsyncRedisManager`` (Redis pub/sub between processes) as an
ASGI app on uvicorn (uvloop, httptools, the ``websockets`` WebSocket implementation,
per-message deflate off), WebSocket transport only. One process of N; run two behind nginx
(bench/run does). The Engine.IO endpoint sits on ``/v1/chatrooms/0/join`` so the shipped nginx
config routes it like a chatnode join (hash by ``?user=``); the room is ``?room=<id>``.

Room semantics as chatnode's plain dialect: on connect the client enters its room; a
``message`` event with a text is stamped into ``{"chatroom", "user", "message", "timestamp"}``
and emitted to the whole room (sender included) through the Redis manager.

    python socketio_server.py --port 18201 --redis redis://127.0.0.1:16379/0 \\
        [--unix /tmp/sio-1.sock]  # also on a Unix socket (nginx on the same host), like chatnode
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from typing import Any
from urllib.parse import parse_qs

import socketio
import uvicorn

SOCKETIO_PATH = "v1/chatrooms/0/join"


def build(redis_url: str) -> socketio.ASGIApp:
    manager = socketio.AsyncRedisManager(redis_url, channel="bench:socketio")
    sio = socketio.AsyncServer(
        async_mode="asgi",
        client_manager=manager,
        transports=["websocket"],
        cors_allowed_origins=None,
        http_compression=False,
        compression_threshold=1 << 30,
    )

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        query = parse_qs(environ.get("QUERY_STRING", ""))
        room = int(query.get("room", ["0"])[0])
        user = query.get("user", ["anonymous"])[0]
        await sio.save_session(sid, {"room": room, "user": user})
        await sio.enter_room(sid, f"room:{room}")

    @sio.on("message")
    async def message(sid: str, text: str) -> None:
        session = await sio.get_session(sid)
        room = session["room"]
        await sio.emit(
            "message",
            {
                "chatroom": room,
                "user": session["user"],
                "message": text,
                "timestamp": int(time.time() * 1000),
            },
            room=f"room:{room}",
        )

    return socketio.ASGIApp(sio, socketio_path=SOCKETIO_PATH)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--unix", help="also listen on this Unix socket path")
    args = parser.parse_args()
    config = uvicorn.Config(
        build(args.redis),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        ws="websockets",
        ws_per_message_deflate=False,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    sockets = [config.bind_socket()]
    if args.unix:
        if os.path.exists(args.unix):
            os.unlink(args.unix)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(args.unix)
        unix.listen(config.backlog)
        sockets.append(unix)
    uvicorn.Server(config).run(sockets=sockets)


if __name__ == "__main__":
    main()
