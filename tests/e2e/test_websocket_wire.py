"""The WebSocket wire against a real node, byte by byte: what a client gets for breaking the
framing rules, pings, fragments, the close handshake, and a member whose socket fills up."""

from __future__ import annotations

import base64
import json
import os
import socket
from pathlib import Path
from typing import Any

import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Event, Pong, TextMessage

from chatnode.wire import websocket
from tests.e2e.harness import RunningNode, api_client, join, node_config, running_node, until_live


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    """A client frame built by hand, so that it may break the rules."""
    key = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = bytes((fin << 7 | opcode, mask << 7 | length))
    else:
        head = bytes((fin << 7 | opcode, mask << 7 | 126)) + length.to_bytes(2, "big")
    return head + (key + websocket.unmask(payload, key) if mask else payload)


def send_frame(message: dict[str, Any], **kwargs: Any) -> bytes:
    return client_frame(websocket.OPCODE_TEXT, json.dumps(message).encode(), **kwargs)


class RawMember:
    """A v1 member on a bare socket; what the node sends is decoded by wsproto's client."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.ws = Connection(ConnectionType.CLIENT)
        self.eof = False

    @classmethod
    async def connect(
        cls, node: RunningNode, path: str, *, first: bytes = b"", rcvbuf: int | None = None
    ) -> RawMember:
        """Handshake for ``path``; ``first`` goes in the same write as the request head."""
        raw = socket.socket()
        if rcvbuf is not None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock = trio.socket.from_stdlib_socket(raw)
        await sock.connect(("127.0.0.1", node.port))
        key = base64.b64encode(os.urandom(16)).decode()
        head = (
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: chatnode.v1\r\n\r\n"
        ).encode()
        await sock.send(head + first)
        data = b""
        while b"\r\n\r\n" not in data:
            data += await sock.recv(1)
        assert data.startswith(b"HTTP/1.1 101"), data
        return cls(sock)

    async def next_event(self) -> Event | None:
        """The node's next frame, or None at end of file."""
        while True:
            for event in self.ws.events():
                return event
            if self.eof:
                return None
            data = await self.sock.recv(65536)
            if not data:
                self.eof = True
                self.ws.receive_data(None)
            else:
                self.ws.receive_data(data)

    async def next_json(self, kind: str) -> dict[str, Any]:
        """The next text frame of type ``kind``, skipping others (and pongs)."""
        text = ""
        while True:
            event = await self.next_event()
            assert isinstance(event, TextMessage | Pong), event
            if isinstance(event, TextMessage):
                text += event.data  # wsproto hands out a frame in the pieces that arrived
                if event.message_finished:
                    frame: dict[str, Any] = json.loads(text)
                    text = ""
                    if frame["type"] == kind:
                        return frame

    async def next_pong(self) -> Pong:
        """The next pong, skipping text frames (presence events, say)."""
        while True:
            event = await self.next_event()
            assert isinstance(event, TextMessage | Pong), event
            if isinstance(event, Pong):
                return event

    async def closed_with(self) -> int:
        """Read to the node's close frame, answer it, and see the node end the connection."""
        while True:
            event = await self.next_event()
            assert event is not None, "end of file before a close frame"
            if isinstance(event, CloseConnection):
                await self.sock.send(client_frame(websocket.OPCODE_CLOSE, event.code.to_bytes(2)))
                assert await self.sock.recv(1) == b""  # the node closes once answered
                self.sock.close()
                return int(event.code)


async def room_with_member(node: RunningNode) -> tuple[str, int]:
    async with api_client(node) as api:
        token = await api.user_with_token("ann")
        room = await api.create_room(token)
    return token, room


async def test_framing_violations_close_with_their_codes(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path), max_message_bytes=64)) as node:
        token, room = await room_with_member(node)
        path = f"/v1/chatrooms/{room}/join?token={token}"
        # After a 1002 the node parses nothing more, so it does not see the close reply and
        # cuts the connection after close_timeout_s; the others read on to the reply.
        cases = {
            "unmasked": (send_frame({"type": "ping"}, mask=False), 1002),
            "reserved opcode": (client_frame(0x3, b""), 1002),
            "invalid UTF-8": (client_frame(websocket.OPCODE_TEXT, b"\xc3\x28"), 1007),
            "binary": (client_frame(websocket.OPCODE_BINARY, b"\x00\x01"), 1003),
            "over 6 x 64 + 1024 bytes": (client_frame(websocket.OPCODE_TEXT, b"x" * 2000), 1009),
        }
        with trio.fail_after(20):
            for name, (data, code) in cases.items():
                member = await RawMember.connect(node, path)
                await member.next_json("live")
                await member.sock.send(data)
                assert await member.closed_with() == code, name
            async with join(node, room, token=token) as ws:  # and the node serves on
                await until_live(ws)


async def test_pings_fragments_and_the_close_handshake(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path))) as node:
        token, room = await room_with_member(node)
        with trio.fail_after(10):
            member = await RawMember.connect(node, f"/v1/chatrooms/{room}/join?token={token}")
            await member.next_json("live")
            await member.sock.send(client_frame(websocket.OPCODE_PING, b"are you there"))
            assert (await member.next_pong()).payload == b"are you there"
            text = json.dumps({"type": "send", "id": "f", "message": "in three pieces"}).encode()
            await member.sock.send(
                client_frame(websocket.OPCODE_TEXT, text[:10], fin=False)
                + client_frame(websocket.OPCODE_PING, b"")
                + client_frame(websocket.OPCODE_CONTINUATION, text[10:20], fin=False)
                + client_frame(websocket.OPCODE_CONTINUATION, text[20:])
            )
            assert (await member.next_pong()).payload == b""
            assert (await member.next_json("ack"))["id"] == "f"
            await member.sock.send(
                client_frame(websocket.OPCODE_CLOSE, (1000).to_bytes(2) + b"bye")
            )
            while True:
                event = await member.next_event()
                if isinstance(event, CloseConnection):
                    break
            assert (event.code, event.reason) == (1000, "bye")  # the node answers in kind
            assert await member.sock.recv(1) == b""
            member.sock.close()


async def test_a_frame_in_the_handshake_packet_is_served(tmp_path: Path) -> None:
    async with running_node(node_config(str(tmp_path))) as node:
        token, room = await room_with_member(node)
        with trio.fail_after(10):
            member = await RawMember.connect(
                node,
                f"/v1/chatrooms/{room}/join?token={token}",
                first=send_frame({"type": "send", "id": "early", "message": "at once"}),
            )
            assert (await member.next_json("ack"))["id"] == "early"
            member.sock.close()


async def test_a_member_whose_socket_fills_up_gets_everything_in_order(tmp_path: Path) -> None:
    config = node_config(str(tmp_path), rate_messages_per_s=1e6, rate_burst=1_000_000)
    total, text = 400, "y" * 2000  # 800 KB: more than the kernel buffers, less than the backlog
    async with running_node(config) as node:
        token, room = await room_with_member(node)
        with trio.fail_after(30):
            slow = await RawMember.connect(
                node, f"/v1/chatrooms/{room}/join?token={token}", rcvbuf=4096
            )
            async with join(node, room, token=token) as sender:
                await until_live(sender)
                for i in range(total):
                    await sender.send_message(
                        json.dumps({"type": "send", "message": f"{i} {text}"})
                    )
                got = 0
                while got < total:  # every message reached the node's fan-out
                    got += json.loads(await sender.get_message())["type"] == "message"
                assert node.app.edge is not None and node.app.edge.batcher.drains > 0
                await slow.next_json("live")
                offsets = [(await slow.next_json("message"))["offset"] for _ in range(total)]
                assert offsets == list(range(1, total + 1))
            slow.sock.close()
