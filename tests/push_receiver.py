"""A webhook receiver for push notification tests: a small Trio HTTP/1.1 server (h11) on
port 0 that records every request's JSON body, answers 204, or never answers (``hang``)."""

from __future__ import annotations

import json
from typing import Any

import h11
import trio


class Receiver:
    def __init__(self, *, hang: bool = False) -> None:
        self.hang = hang
        self.bodies: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.requests = 0  # heads received, answered or not
        self.port = 0
        self._changed = trio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?k=v"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def wait_for(self, count: int) -> None:
        """Until ``count`` requests were recorded (answered or not)."""
        while self.requests < count:
            await self._changed.wait()

    async def _handle(self, stream: trio.SocketStream) -> None:
        http = h11.Connection(h11.SERVER)
        body = b""
        try:
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    http.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    assert event.method == b"POST" and event.target == b"/hook?k=v", event
                    body = b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    self.bodies.append(json.loads(body))
                    self.times.append(trio.current_time())
                    self.requests += 1
                    self._changed.set()
                    self._changed = trio.Event()
                    if self.hang:
                        await trio.sleep_forever()
                    answer = h11.Response(status_code=204, headers=[])
                    await stream.send_all(http.send(answer) + http.send(h11.EndOfMessage()))
                    http.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (trio.BrokenResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)
