"""Helpers of the security tests: nodes configured through the environment, raw WebSocket
clients that misbehave on purpose, and the figures the tests measure (RSS, descriptors,
``/healthz`` latency, close codes, metrics).

Nodes are configured with ``CHATNODE_*`` variables (:func:`node_env_config`), not ``Config``
keyword arguments, so that a test runs unchanged against an older node that lacks a setting
(it ignores the variable): that is how each test was seen to fail before its fix.
"""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import socket
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from chatnode.config import Config, load_config
from chatnode.wire import websocket
from tests.cluster.harness import (
    NodeProcess,
    _open_logged_process,
    _stop,
    _wait_ready,
    free_port,
    http_get,
    node_env,
)

NODE_DEFAULTS = {
    "CHATNODE_HOST": "127.0.0.1",
    "CHATNODE_PORT": "0",
    "CHATNODE_PASSWORD_COST_LOG2": "10",
    "CHATNODE_NODE_ID": "test-node",
    "CHATNODE_DRAIN_TIMEOUT_S": "3",
    "CHATNODE_JWT_SECRET": "security-tests-secret-of-at-least-32-chars",
    # Many users, tokens and rooms from this one address (test_limits.py tries the defaults).
    "CHATNODE_SIGNUP_ADDRESS_BURST": "100000",
    "CHATNODE_LOGIN_ADDRESS_BURST": "100000",
    "CHATNODE_LOGIN_FAILURES_BURST": "100000",
    "CHATNODE_ROOM_CREATE_BURST": "100000",
}


def node_env_config(data_dir: str, **settings: Any) -> Config:
    """A node's ``Config`` from the environment: the test defaults, then ``settings``
    (``send_backlog_bytes=...`` -> ``CHATNODE_SEND_BACKLOG_BYTES``)."""
    env = dict(NODE_DEFAULTS, CHATNODE_DATA_DIR=data_dir)
    env.update({f"CHATNODE_{k.upper()}": str(v) for k, v in settings.items()})
    return load_config(env)


def rss_bytes(pid: int | str | None = None, field: str = "VmRSS") -> int:
    """A process's resident memory (``VmRSS``) or its peak so far (``VmHWM``), from /proc
    (default: this process)."""
    status = Path(f"/proc/{pid or 'self'}/status")
    match = re.search(rf"^{field}:\s+(\d+) kB$", status.read_text(), re.M)
    assert match, f"no {field} in {status}"
    return int(match[1]) * 1024


def open_fds(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or 'self'}/fd"))


# -- raw WebSocket clients ------------------------------------------------------------------


def upgrade_head(path: str, *, v1: bool = True, headers: Mapping[str, str] = {}) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: " + headers.get("Host", "127.0.0.1"),
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if v1:
        lines.append("Sec-WebSocket-Protocol: chatnode.v1")
    lines += [f"{k}: {v}" for k, v in headers.items() if k != "Host"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@attrs.define
class Answer:
    """What the node answered to an upgrade: its status, headers and (refusals) JSON body."""

    status: int
    headers: dict[str, str]
    body: dict[str, Any] | None
    sock: trio.socket.SocketType
    rest: bytes = b""  # bytes past the head (the first frames)

    @property
    def code(self) -> str | None:
        return None if self.body is None else self.body.get("error", {}).get("code")


async def upgrade(
    port: int,
    path: str,
    *,
    v1: bool = True,
    headers: Mapping[str, str] = {},
    rcvbuf: int | None = None,
) -> Answer:
    """Send an upgrade on a fresh socket; return the node's answer (the socket stays open on
    101; a refusal's body is read to its Content-Length)."""
    raw = socket.socket()
    if rcvbuf is not None:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock = trio.socket.from_stdlib_socket(raw)
    await sock.connect(("127.0.0.1", port))
    await sock.send(upgrade_head(path, v1=v1, headers=headers))
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await sock.recv(1 if rcvbuf else 4096)
        if not chunk:
            raise ConnectionError(f"the node closed before answering: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    body = None
    if status != 101:
        length = int(fields.get("content-length", "0"))
        while len(rest) < length:
            chunk = await sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body = json.loads(rest[:length]) if length else None
        rest = b""
    return Answer(status, fields, body, sock, rest)


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame."""
    key = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    elif length < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    return head + key + websocket.unmask(payload, key)


def text_frame(obj: object) -> bytes:
    return client_frame(websocket.OPCODE_TEXT, json.dumps(obj).encode())


class FrameStream:
    """Server frames read off a raw socket: ``next()`` is ``("text", payload)``,
    ``("ping", payload)``, ``("close", code)`` or ``("eof", None)``."""

    def __init__(self, sock: trio.socket.SocketType, data: bytes = b"") -> None:
        self.sock = sock
        self.buffer = data

    async def next(self) -> tuple[str, Any]:
        while True:
            parsed = self._parse()
            if parsed is not None:
                return parsed
            try:
                chunk = await self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return ("eof", None)
            self.buffer += chunk

    def _parse(self) -> tuple[str, Any] | None:
        buf = self.buffer
        if len(buf) < 2:
            return None
        opcode, length, i = buf[0] & 0x0F, buf[1] & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return None
            (length,) = struct.unpack("!H", buf[2:4])
            i = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            (length,) = struct.unpack("!Q", buf[2:10])
            i = 10
        if len(buf) < i + length:
            return None
        payload, self.buffer = buf[i : i + length], buf[i + length :]
        if opcode == websocket.OPCODE_TEXT:
            return ("text", payload)
        if opcode == websocket.OPCODE_PING:
            return ("ping", payload)
        if opcode == websocket.OPCODE_CLOSE:
            return ("close", struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None)
        return ("other", payload)

    async def json(self) -> dict[str, Any]:
        """The next text frame as JSON (pings skipped); AssertionError on a close or EOF."""
        while True:
            kind, value = await self.next()
            if kind == "text":
                decoded: dict[str, Any] = json.loads(value)
                return decoded
            assert kind == "ping", (kind, value)

    async def reply(self) -> dict[str, Any]:
        """The next frame that is not a room event (``presence``, ``typing``)."""
        while (frame := await self.json())["type"] in ("presence", "typing"):
            pass
        return frame

    async def close_code(self) -> int | None:
        """Read until the node's close frame (its code) or end of file (None)."""
        while True:
            kind, value = await self.next()
            if kind == "close":
                return int(value) if value is not None else None
            if kind == "eof":
                return None


# -- a node process with a descriptor limit ---------------------------------------------------


@asynccontextmanager
async def node_process(
    env: Mapping[str, str], *, nofile: int | None = None
) -> AsyncIterator[NodeProcess]:
    """``chatnode serve`` in its own process (so its descriptors and memory are its own), with
    ``RLIMIT_NOFILE`` set to ``nofile`` first; yields once ``/healthz`` answers 200."""
    port = free_port()
    child_env = node_env({**NODE_DEFAULTS, **env})
    child_env.update(CHATNODE_HOST="127.0.0.1", CHATNODE_PORT=str(port))
    with tempfile.TemporaryDirectory(prefix="chatnode-security-") as tmp:
        child_env.setdefault("CHATNODE_DATA_DIR", tmp)
        log = Path(tmp) / "node.log"
        limit = (
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); " if nofile else ""
        )
        launcher = (
            f"import resource, sys; {limit}from chatnode.cli import main; sys.exit(main(['serve']))"
        )
        process = await _open_logged_process([sys.executable, "-c", launcher], log, env=child_env)
        try:

            async def ready() -> bool:
                try:
                    status, _ = await http_get(port, "/healthz")
                except OSError:
                    return False
                return status == 200

            await _wait_ready(process, "chatnode node", log, ready)
            yield NodeProcess(process, port, log)
        finally:
            await _stop(process)


def nofile_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- what the account tests measure ------------------------------------------------------


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
