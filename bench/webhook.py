#!/usr/bin/env python3
"""bench/webhook.py: the push variant's webhook receiver (``push.py``; not part of the node).

``webhook.py PORT [--hang]``: an asyncio HTTP/1.1 server on 127.0.0.1:PORT, keep-alive,
requests framed by ``Content-Length`` (what the nodes' h11 client sends). Every ``POST`` is
counted and answered ``200`` at once, with an empty body; with ``--hang`` it is counted and
never answered (the connection stays open: a webhook that accepts and hangs). ``GET`` (any
path) answers ``{"posts": N}``, the POSTs counted since the start, in either mode.
"""

from __future__ import annotations

import asyncio
import json
import sys

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
POSTS = [0]


class Conn(asyncio.Protocol):
    def __init__(self, hang: bool) -> None:
        self.hang = hang
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v.strip())
            end = head_end + 4 + length
            if len(self.buf) < end:
                return
            self.buf = self.buf[end:]
            method = head[0].split(" ", 1)[0]
            assert self.transport is not None
            if method == "POST":
                POSTS[0] += 1
                if not self.hang:
                    self.transport.write(OK)
            else:
                body = json.dumps({"posts": POSTS[0]}).encode()
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )


async def main(port: int, hang: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Conn(hang), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), "--hang" in sys.argv[2:]))
