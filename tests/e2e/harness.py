"""Start real nodes on port 0 and drive them with real clients (httpx, trio-websocket)."""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from chatnode.app import App
from chatnode.config import Config

PASSWORD = "correct-horse-battery"
"""A password every test user may have: strong enough for ``validation.new_password``."""
REPO = Path(__file__).resolve().parents[2]


def node_config(data_dir: str, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "data_dir": data_dir,
        "password_cost_log2": 10,
        "node_id": "test-node",
        "drain_timeout_s": 3.0,
        # Tests make many users, tokens and rooms from one address; tests/security/ sets these
        # limits back to what they try to exceed.
        "signup_address_burst": 100_000,
        "login_address_burst": 100_000,
        "login_failures_burst": 100_000,
        "room_create_burst": 100_000,
    }
    values.update(overrides)
    return Config(**values)


@attrs.define
class RunningNode:
    app: App
    port: int

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@asynccontextmanager
async def running_node(config: Config) -> AsyncIterator[RunningNode]:
    app = App(config)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(app.run)
        try:
            yield RunningNode(app, ports[0])
        finally:
            app.request_stop()


class Api:
    """A REST client that knows the node's conventions."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def user_with_token(self, name: str, password: str = PASSWORD) -> str:
        r = await self.client.post("/v1/chatrooms/users", json={"name": name, "password": password})
        assert r.status_code in (201, 409), r.text
        r = await self.client.post("/v1/tokens", json={"name": name, "password": password})
        assert r.status_code == 200, r.text
        token: str = r.json()["token"]
        return token

    async def create_room(self, token: str, name: str = "lobby") -> int:
        r = await self.client.post("/v1/chatrooms", json={"name": name}, headers=auth(token))
        assert r.status_code == 201, r.text
        room_id: int = r.json()["id"]
        return room_id


async def chatnode_cli(
    *args: str, env: Mapping[str, str], check: bool = True
) -> trio.CompletedProcess[bytes]:
    """``python -m chatnode ARGS`` as an operator runs it, with only ``env`` (and PATH)."""
    result = await trio.run_process(
        [sys.executable, "-m", "chatnode", *args],
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=REPO,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr.decode()
    return result


async def grant_admin(node: RunningNode, name: str) -> None:
    """``chatnode users grant-admin NAME`` on the node's data directory (its SQLite file)."""
    with trio.fail_after(30):
        await chatnode_cli(
            "users", "grant-admin", name, env={"CHATNODE_DATA_DIR": node.app.config.data_dir}
        )


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def api_client(node: RunningNode) -> AsyncIterator[Api]:
    async with httpx.AsyncClient(base_url=node.http_url, timeout=10) as client:
        yield Api(client)


@asynccontextmanager
async def join(
    node: RunningNode,
    room_id: int,
    *,
    token: str | None = None,
    user: str | None = None,
    v1: bool = True,
    since: int | None = None,
) -> AsyncIterator[WebSocketConnection]:
    query = []
    if token:
        query.append(f"token={token}")
    if user:
        query.append(f"user={user}")
    if since is not None:
        query.append(f"since={since}")
    url = f"{node.ws_url}/v1/chatrooms/{room_id}/join" + ("?" + "&".join(query) if query else "")
    async with open_websocket_url(url, subprotocols=["chatnode.v1"] if v1 else []) as ws:
        yield ws


async def next_of_type(ws: WebSocketConnection, kind: str) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(await ws.get_message())
        if frame.get("type") == kind:
            return frame


async def until_live(ws: WebSocketConnection) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read the joined frame and the replay; return (joined, history messages). Membership
    changes in the replay are skipped."""
    joined = json.loads(await ws.get_message())
    assert joined["type"] == "joined", joined
    history = []
    while True:
        frame = json.loads(await ws.get_message())
        if frame["type"] == "live":
            return joined, history
        assert frame["type"] in ("message", "member"), frame
        if frame["type"] == "message":
            history.append(frame)


async def messages(ws: WebSocketConnection, count: int) -> list[dict[str, Any]]:
    """The next ``count`` chat messages, skipping acks and events."""
    got = []
    while len(got) < count:
        frame = json.loads(await ws.get_message())
        if frame.get("type", "message") == "message":
            got.append(frame)
    return got


async def raw_websocket(port: int, path: str) -> trio.socket.SocketType:
    """A v1 member that completes the handshake and then never reads (a slow consumer): a
    small receive buffer so the node's backlog fills fast."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    tsock = trio.socket.from_stdlib_socket(sock)
    await tsock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await tsock.send(
        (
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: chatnode.v1\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await tsock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return tsock
