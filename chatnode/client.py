"""``chatnode chat``: a terminal client on the v1 dialect (trio-websocket)."""

from __future__ import annotations

import json
import sys
from urllib.parse import urlencode

import trio

try:
    from trio_websocket import (
        ConnectionClosed,
        ConnectionRejected,
        HandshakeError,
        open_websocket_url,
    )
except ImportError as exc:  # the `client` extra is not installed: chat() says so
    _missing: ImportError | None = exc
else:
    _missing = None

MISSING_EXTRA = "chatnode: `chatnode chat` needs the client extra: pip install 'chatnode[client]'"


async def chat(base_url: str, room: int, user: str | None, token: str | None) -> int:
    """Join and chat until the connection ends; a refused join is one line on stderr and
    exit status 1. The token goes in the ``Authorization`` header, never in the URL (where
    proxies log it). Without the ``client`` extra, one line on stderr and exit status 1."""
    if _missing is not None:
        print(MISSING_EXTRA, file=sys.stderr)
        return 1
    url = f"{base_url.rstrip('/')}/v1/chatrooms/{room}/join"
    if user:
        url += "?" + urlencode({"user": user})
    headers = [(b"Authorization", f"Bearer {token}".encode())] if token else None
    try:
        return await _chat(url, headers)
    except ConnectionRejected as exc:
        print(f"chatnode: join refused: {_refusal(exc.status_code, exc.body)}", file=sys.stderr)
    except (HandshakeError, OSError) as exc:
        print(f"chatnode: cannot join {base_url}: {exc}", file=sys.stderr)
    return 1


def _refusal(status: int, body: bytes | None) -> str:
    """``429 too_many_connections: <message>`` from an HTTP refusal's JSON error body."""
    try:
        error = json.loads(body or b"")["error"]
        return f"{status} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}"


async def _chat(url: str, headers: list[tuple[bytes, bytes]] | None) -> int:
    async with (
        open_websocket_url(url, subprotocols=["chatnode.v1"], extra_headers=headers) as ws,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_type_lines, ws)
        try:
            while True:
                frame = json.loads(await ws.get_message())
                _show(frame)
        except ConnectionClosed as exc:
            reason = exc.reason
            print(f"* closed: {reason.code if reason else ''} {reason.reason if reason else ''}")
        nursery.cancel_scope.cancel()
    return 0


def _show(frame: dict[str, object]) -> None:
    kind = frame.get("type")
    if kind == "message":
        print(f"[{frame['offset']}] {frame['user']}: {frame['message']}")
    elif kind == "presence":
        print(f"* {frame['user']} {frame['event']}s")
    elif kind == "error":
        print(f"! {frame['code']}: {frame['message']}")
    elif kind == "joined":
        print(f"* joined room {frame['chatroom']} as {frame['user']} at offset {frame['offset']}")


async def _type_lines(ws: object) -> None:
    stdin = trio.wrap_file(sys.stdin)
    counter = 0
    async for line in stdin:
        text = line.rstrip("\n")
        if text:
            counter += 1
            await ws.send_message(json.dumps({"type": "send", "id": str(counter), "message": text}))  # type: ignore[attr-defined]
