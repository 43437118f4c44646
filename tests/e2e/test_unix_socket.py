"""A node listening on a Unix socket beside TCP (``CHATNODE_UNIX_SOCKET``): the same HTTP and
WebSocket service on both, a stale socket file replaced, a live one refused, the file removed
on stop. nginx in front of nodes on Unix sockets: tests/cluster/test_nginx_harness.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from chatnode.edge.server import UnixListener
from tests.e2e.harness import node_config, running_node


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="cn-unix-"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


async def unix_request(path: Path, request: bytes) -> bytes:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(request)
        chunks = []
        while chunk := await stream.receive_some():
            chunks.append(chunk)
    return b"".join(chunks)


async def unix_post(path: Path, target: str, body: object) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return await unix_request(path, head.encode() + payload)


async def test_http_and_websocket_over_the_unix_socket(tmp_path: Path, sock_dir: Path) -> None:
    path = sock_dir / "node.sock"
    config = node_config(str(tmp_path), unix_socket=str(path), insecure=True)
    with trio.fail_after(20):
        async with running_node(config) as node:
            assert stat.S_ISSOCK(os.stat(path).st_mode)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
            head, _, body = (
                await unix_request(
                    path, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
            ).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            assert json.loads(body)["node"] == "test-node"
            await (await trio.open_tcp_stream("127.0.0.1", node.port)).aclose()  # TCP too

            answer = await unix_post(path, "/v1/chatrooms/users", {"name": "ann"})
            assert answer.startswith(b"HTTP/1.1 201"), answer
            answer = await unix_post(path, "/v1/chatrooms", {"name": "lobby"})
            assert answer.startswith(b"HTTP/1.1 201"), answer
            room = json.loads(answer.partition(b"\r\n\r\n")[2])["id"]

            # A WebSocket over the Unix socket (seed dialect): send, get it back.
            stream = await trio.open_unix_socket(str(path))
            async with stream:
                await stream.send_all(
                    f"GET /v1/chatrooms/{room}/join?user=ann HTTP/1.1\r\nHost: x\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n".encode()
                )
                data = b""
                while b"\r\n\r\n" not in data:
                    data += await stream.receive_some()
                head, _, data = data.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101"), head
                text = b"hello over unix"
                mask = b"\x01\x02\x03\x04"
                masked = bytes(b ^ mask[i % 4] for i, b in enumerate(text))
                await stream.send_all(bytes([0x81, 0x80 | len(text)]) + mask + masked)
                while text not in data:
                    data += await stream.receive_some()
                frame_start = data.index(b"\x81")
                payload_len = data[frame_start + 1]
                message = json.loads(data[frame_start + 2 : frame_start + 2 + payload_len])
                assert (message["user"], message["message"]) == ("ann", "hello over unix")
    assert not path.exists()  # removed on stop


async def test_a_stale_socket_file_is_replaced(tmp_path: Path, sock_dir: Path) -> None:
    path = sock_dir / "node.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening: what a killed node leaves behind
    stale.close()
    config = node_config(str(tmp_path), unix_socket=str(path), unix_socket_mode="600")
    with trio.fail_after(20):
        async with running_node(config):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            answer = await unix_request(
                path, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert answer.startswith(b"HTTP/1.1 200")


def test_a_live_socket_or_another_file_is_not_taken(sock_dir: Path) -> None:
    live = sock_dir / "live.sock"
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(live))
    listening.listen()
    try:
        with pytest.raises(OSError) as info:
            UnixListener.open(str(live), 0o660)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        listening.close()
    other = sock_dir / "file"
    other.write_text("not a socket")
    with pytest.raises(OSError) as info:
        UnixListener.open(str(other), 0o660)
    assert info.value.errno == errno.EEXIST
    assert other.read_text() == "not a socket"


async def test_unlink_leaves_a_newer_listeners_file(sock_dir: Path) -> None:
    path = sock_dir / "node.sock"
    first = UnixListener.open(str(path), 0o660)
    await first.listener.aclose()
    second = UnixListener.open(str(path), 0o660)  # the first one's file is stale: replaced
    first.unlink()
    assert path.exists()  # the second one listens on it
    await second.listener.aclose()
    second.unlink()
    assert not path.exists()
