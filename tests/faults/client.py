"""A reusable ``chatnode.v1`` room member for fault tests: it survives what the faults do to it
and records everything needed to prove that nothing was lost, duplicated or reordered.

``FaultClient(...)`` joins one room and keeps a member connected until ``close()``:

- **Resume.** It tracks the newest offset it saw (``last_offset``). When its connection drops
  (close codes 4000-4499, 1001, 1006 or 1011; a refused connection; an HTTP 502/503 answer to
  the handshake) it reconnects through ``reconnect_url`` (nginx) with ``since=<last_offset>``,
  retrying with a short backoff, bounded by ``max_outage_s`` (after which it fails).
- **No loss, no duplicate on send.** ``send(text)`` queues a message (texts must be unique per
  client). A send acknowledged with ``ack`` is settled. A send whose connection dropped before
  the ``ack`` may or may not have been stored: after the reconnect the client looks for it
  (same user and text) in the replay and in what arrived since, and resends only if it is not
  there. A send refused with ``error`` ``unavailable`` (Redis down) may also have been stored
  (a reply lost with the backend): after ``retry_after_s`` the client asks the room's history
  over REST (``GET /v1/chatrooms/{id}/messages``, authoritative once the backend answers) and
  resends only if it is not there. ``rate_limited`` is resent after ``retry_after_s``.
  ``max_inflight`` bounds the sends written without an answer (a sending window, so a fast
  sender cannot run ahead of reading its own echoes).
- **What it saw.** ``received`` is every chat message in arrival order; ``verify_stream()``
  checks that its offsets are exactly ``since+1, since+2, ...`` (no gap, no duplicate, offset
  order). ``settled`` maps each stored text to its offset (from its ``ack``, the stream or the
  history). ``nodes`` lists the node
  of each connection, ``close_codes`` why each one ended, ``outages`` how long each
  reconnection took (from the loss to ``live`` again).

Tests wait on the client's own state with ``wait_for(predicate)``: it re-checks whenever the
client's state changes (an event it sets itself), so nothing here polls.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import httpx
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

log = logging.getLogger(__name__)

SUBPROTOCOL = "chatnode.v1"
RECONNECT_CLOSE_CODES = frozenset({1001, 1006, 1011, *range(4000, 4500)})
RETRY_STATUSES = frozenset({502, 503, 504})


class ClientFailed(AssertionError):
    """The client saw something a correct server never does, or could not reconnect in time."""


@attrs.frozen
class Received:
    offset: int
    user: str
    text: str
    at: float  # time.monotonic() of arrival


@attrs.define
class Outage:
    lost_at: float
    live_at: float | None = None
    code: int | None = None

    @property
    def seconds(self) -> float | None:
        return None if self.live_at is None else self.live_at - self.lost_at


@attrs.define(eq=False)
class FaultClient:
    name: str
    token: str
    room: int
    connect_url: str  # ws://host:port of the first connection (a node, or nginx)
    api_url: str  # http://host:port for REST checks (nginx)
    reconnect_url: str | None = None  # ws://host:port for reconnections (default: connect_url)
    since: int = 0
    max_outage_s: float = 20.0
    backoff_s: float = 0.05
    max_backoff_s: float = 0.5
    join_timeout_s: float = 10.0
    max_inflight: int = 1_000_000  # sends written without an answer yet, at most

    received: list[Received] = attrs.Factory(list)
    last_offset: int = attrs.field(init=False)
    nodes: list[str] = attrs.Factory(list)
    close_codes: list[int | None] = attrs.Factory(list)
    connect_failures: list[str] = attrs.Factory(list)
    outages: list[Outage] = attrs.Factory(list)
    errors: list[dict[str, Any]] = attrs.Factory(list)
    unavailable_errors: int = 0
    resent: int = 0
    found_in_replay: int = 0
    found_in_history: int = 0
    sent_texts: list[str] = attrs.Factory(list)
    acked: dict[str, int] = attrs.Factory(dict)  # text -> offset from its ack
    in_history: dict[str, int] = attrs.Factory(dict)  # text -> offset found over REST
    mine: dict[str, list[int]] = attrs.Factory(dict)  # text -> offsets it arrived with
    live: bool = False

    _unsent: deque[str] = attrs.field(factory=deque, init=False)
    # id -> text, written on this connection, no answer yet
    _inflight: dict[str, str] = attrs.field(factory=dict, init=False)
    # texts whose outcome is unknown after a lost connection
    _unknown: list[str] = attrs.field(factory=list, init=False)
    # refused with a retry hint, waiting
    _retrying: set[str] = attrs.field(factory=set, init=False)
    # text -> frame id
    _ids: dict[str, str] = attrs.field(factory=dict, init=False)
    _id_prefix: str = attrs.field(factory=lambda: secrets.token_hex(4) + "-", init=False)
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)
    _wake_writer: trio.Event = attrs.field(factory=trio.Event, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _ws: WebSocketConnection | None = attrs.field(default=None, init=False)
    _tasks: trio.Nursery | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.last_offset = self.since

    # -- what tests call ------------------------------------------------------------------------

    def join_url(self, base: str, since: int) -> str:
        return f"{base}/v1/chatrooms/{self.room}/join?token={self.token}&since={since}"

    def send(self, text: str) -> None:
        """Queue ``text`` (unique for this client) to be sent, resent until settled."""
        if text in self._ids:
            raise ValueError(f"{text!r} was already sent by {self.name}")
        # Unique for the user: a client id the user already sent in the room within the dedup
        # window would get that earlier message's ack (docs/protocol.md).
        self._ids[text] = f"{self._id_prefix}{len(self._ids)}"
        self.sent_texts.append(text)
        self._unsent.append(text)
        self._wake_writer.set()

    @property
    def settled(self) -> dict[str, int]:
        """Every sent text whose offset is known (acked, or seen in the room)."""
        out = dict(self.in_history)
        out.update({text: offsets[0] for text, offsets in self.mine.items()})
        out.update(self.acked)
        return out

    @property
    def unsettled(self) -> list[str]:
        settled = self.settled
        return [t for t in self.sent_texts if t not in settled]

    async def wait_for(self, what: str, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; re-checked whenever this client's state changes
        (a frame arrived, a connection came up or went down). Bound it with the caller's
        ``trio.fail_after``."""
        while not predicate():
            await self._changed.wait()

    async def wait_offset(self, offset: int) -> None:
        await self.wait_for(f"offset {offset}", lambda: self.last_offset >= offset)

    async def wait_settled(self) -> None:
        """Every sent text is stored (acked or seen) and arrived in this client's stream."""
        await self.wait_for(
            "every send settled and seen",
            lambda: not self.unsettled and all(t in self.mine for t in self.sent_texts),
        )

    async def wait_live(self) -> None:
        await self.wait_for("live", lambda: self.live)

    async def close(self) -> None:
        """Leave the room (close code 1000); ``run`` returns."""
        self._closing = True
        self._poke()
        if self._ws is not None:
            with trio.move_on_after(2):
                await self._ws.aclose()

    def verify_stream(self) -> list[int]:
        """Check the offsets this client received: ``since+1 .. last`` each once, in order.
        Return them."""
        offsets = [m.offset for m in self.received]
        expected = list(range(self.since + 1, self.since + 1 + len(offsets)))
        if offsets != expected:
            dup = sorted({o for o in offsets if offsets.count(o) > 1})
            missing = sorted(set(expected) - set(offsets))
            raise ClientFailed(
                f"{self.name}: offsets not contiguous/ordered: duplicates {dup[:10]}, "
                f"missing {missing[:10]}, first wrong at index "
                f"{next(i for i, (a, b) in enumerate(zip(offsets, expected, strict=True)) if a != b)}"
            )
        return offsets

    # -- the connection loop --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected until ``close()``; ``started()`` once live the first time."""
        started = False
        first = True
        outage: Outage | None = None
        backoff = self.backoff_s
        async with trio.open_nursery() as tasks:
            self._tasks = tasks
            while not self._closing:
                base = self.connect_url if first else (self.reconnect_url or self.connect_url)
                url = self.join_url(base, self.since if first else self.last_offset)
                code: int | None = None
                lost_at = time.monotonic()
                # The handshake and the replay are bounded (trio-websocket can wait forever for
                # an answer that is not a valid handshake); once live, the connection is not.
                with trio.CancelScope(
                    deadline=trio.current_time() + self.join_timeout_s
                ) as attempt:
                    try:
                        async with open_websocket_url(
                            url,
                            subprotocols=[SUBPROTOCOL],
                            connect_timeout=5,
                            disconnect_timeout=2,
                            receive_buffer_size=65536,
                            message_queue_size=64,
                        ) as ws:
                            self._ws = ws
                            try:
                                await self._replay(ws)
                                attempt.deadline = math.inf
                                first = False
                                backoff = self.backoff_s
                                if outage is not None:
                                    outage.live_at = time.monotonic()
                                    outage = None
                                if not started:
                                    started = True
                                    task_status.started()
                                await self._serve(ws)
                            except ConnectionClosed as exc:
                                code = exc.reason.code
                                lost_at = time.monotonic()
                            finally:
                                self._ws = None
                                self._lost()
                    except ConnectionRejected as exc:
                        if exc.status_code not in RETRY_STATUSES:
                            raise ClientFailed(
                                f"{self.name}: join refused with HTTP {exc.status_code}: "
                                f"{exc.body!r}"
                            ) from exc
                        self.connect_failures.append(f"HTTP {exc.status_code}")
                    except (HandshakeError, OSError, trio.BrokenResourceError) as exc:
                        self.connect_failures.append(type(exc).__name__)
                    except ConnectionClosed as exc:  # closed while trio-websocket closed it
                        code = exc.reason.code
                        lost_at = time.monotonic()
                if attempt.cancelled_caught:
                    self.connect_failures.append(
                        f"no handshake and replay in {self.join_timeout_s}s"
                    )
                if self._closing:
                    break
                if code is not None:
                    self.close_codes.append(code)
                    if code not in RECONNECT_CLOSE_CODES:
                        raise ClientFailed(f"{self.name}: closed with {code}: do not reconnect")
                if outage is None:
                    outage = Outage(lost_at, code=code)
                    self.outages.append(outage)
                if time.monotonic() - outage.lost_at > self.max_outage_s:
                    raise ClientFailed(
                        f"{self.name}: could not reconnect within {self.max_outage_s}s "
                        f"(failures: {self.connect_failures[-5:]})"
                    )
                await trio.sleep(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
            tasks.cancel_scope.cancel()

    async def _replay(self, ws: WebSocketConnection) -> None:
        """Read ``joined``, the replay and ``live``; then settle or resend what was unknown."""
        joined = await self._frame(ws)
        if joined.get("type") != "joined":
            raise ClientFailed(f"{self.name}: first frame {joined}")
        self.nodes.append(str(joined.get("node")))
        while (frame := await self._frame(ws))["type"] != "live":
            if frame["type"] == "message":
                self._on_message(frame)
            elif frame["type"] not in ("presence", "typing"):
                raise ClientFailed(f"{self.name}: unexpected frame during the replay: {frame}")
        resend: list[str] = []
        for text in self._unknown:
            if text in self.mine:
                self.found_in_replay += 1
            else:
                resend.append(text)
        self._unknown = []
        self.resent += len(resend)
        self._unsent.extendleft(reversed(resend))
        self.live = True
        self._poke()

    async def _serve(self, ws: WebSocketConnection) -> None:
        """Read and write until the connection ends: raise its ``ConnectionClosed``."""
        closed: ConnectionClosed | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, ws)
            try:
                while True:
                    self._on_frame(await self._frame(ws))
            except ConnectionClosed as exc:  # not through the nursery: no exception group
                closed = exc
            finally:
                nursery.cancel_scope.cancel()
        if closed is not None:
            raise closed

    async def _writer(self, ws: WebSocketConnection) -> None:
        while True:
            while not self._unsent or len(self._inflight) >= self.max_inflight:
                self._wake_writer = trio.Event()
                await self._wake_writer.wait()
            text = self._unsent.popleft()
            frame_id = self._ids[text]
            self._inflight[frame_id] = text
            try:
                await ws.send_message(json.dumps({"type": "send", "message": text, "id": frame_id}))
            except ConnectionClosed:
                return  # the reader sees it too; the text is in flight: outcome unknown

    def _lost(self) -> None:
        """The connection ended: what was in flight has an unknown outcome."""
        self.live = False
        self._unknown.extend(self._inflight.values())
        self._inflight.clear()
        self._poke()

    # -- frames ---------------------------------------------------------------------------------

    async def _frame(self, ws: WebSocketConnection) -> dict[str, Any]:
        raw = await ws.get_message()
        frame = json.loads(raw)
        if not isinstance(frame, dict) or "type" not in frame:
            raise ClientFailed(f"{self.name}: not a v1 frame: {raw!r}")
        return frame

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "message":
            self._on_message(frame)
        elif kind == "ack":
            text = self._inflight.pop(frame["id"], None)
            if text is None:
                raise ClientFailed(f"{self.name}: ack for nothing in flight: {frame}")
            self.acked[text] = frame["offset"]
            self._wake_writer.set()
            self._poke()
        elif kind == "error":
            self._on_error(frame)
        elif kind in ("presence", "typing", "pong"):
            pass
        else:
            raise ClientFailed(f"{self.name}: unexpected frame {frame}")

    def _on_message(self, frame: dict[str, Any]) -> None:
        offset = frame["offset"]
        self.received.append(Received(offset, frame["user"], frame["message"], time.monotonic()))
        if offset != self.last_offset + 1:
            log.error("%s: offset %d after %d", self.name, offset, self.last_offset)
        self.last_offset = max(self.last_offset, offset)
        if frame["user"] == self.name and frame["message"] in self._ids:
            self.mine.setdefault(frame["message"], []).append(offset)
        self._poke()

    def _on_error(self, frame: dict[str, Any]) -> None:
        self.errors.append(frame)
        code = frame.get("code")
        text = self._inflight.pop(frame.get("id") or "", None)
        if text is None or code not in ("unavailable", "rate_limited"):
            raise ClientFailed(f"{self.name}: error frame {frame}")
        if code == "unavailable":
            self.unavailable_errors += 1
        self._retrying.add(text)
        self._wake_writer.set()
        assert self._tasks is not None
        self._tasks.start_soon(
            self._retry_later, text, float(frame.get("retry_after_s", 1.0)), code == "unavailable"
        )
        self._poke()

    async def _retry_later(self, text: str, retry_after_s: float, check: bool) -> None:
        """A refused send: wait as told; if it may have been stored, ask the history first."""
        await trio.sleep(retry_after_s)
        if check:
            # The history cannot answer while the backend is down: retry as the server said.
            while (stored := await self._stored_offset(text)) is None:  # noqa: ASYNC110
                await trio.sleep(retry_after_s)
            if stored > 0:
                self.found_in_history += 1
                self.in_history[text] = stored
                self._retrying.discard(text)
                self._poke()
                return
        self._retrying.discard(text)
        self.resent += 1
        self._unsent.appendleft(text)
        self._wake_writer.set()
        self._poke()

    async def _stored_offset(self, text: str) -> int | None:
        """The offset of my message ``text`` in the room's history; 0 if it is not there; None
        if the history cannot be read now."""
        if text in self.mine:
            return self.mine[text][0]
        headers = {"Authorization": f"Bearer {self.token}"}
        before: int | None = None
        try:
            async with httpx.AsyncClient(base_url=self.api_url, timeout=5) as api:
                for _ in range(100):  # pages of 500, newest first, down to what we had seen
                    params: dict[str, int] = {"limit": 500}
                    if before is not None:
                        params["before"] = before
                    r = await api.get(
                        f"/v1/chatrooms/{self.room}/messages", params=params, headers=headers
                    )
                    if r.status_code in RETRY_STATUSES:
                        return None
                    if r.status_code != 200:
                        raise ClientFailed(f"{self.name}: history answered {r.status_code}")
                    body = r.json()
                    for m in body["messages"]:
                        if m["user"] == self.name and m["message"] == text:
                            return int(m["offset"])
                    before = body["next_before"]
                    if before is None or before <= self.since + 1:
                        return 0
        except httpx.TransportError:
            return None
        return 0

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
