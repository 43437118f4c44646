#!/usr/bin/env python3
"""bench/loadgen.py: the fan-out benchmark's load generator (not part of the node).

One process, asyncio on uvloop, WebSocket clients from ``picows`` (Cython framing and masking),
so the generator costs a few microseconds per received frame and is not the bottleneck
(its own CPU time is measured and reported with every step).

Driven by JSON lines on stdin, answers JSON lines on stdout (one answer per command):

    {"cmd": "connect", "clients": [{"url", "room", "kind", "sender", "headers"}...],
     "concurrency": 64, "timeout_s": 60}
    {"cmd": "step", "rate_msgs": 50.0, "count": 400, "drain_s": 3.0, "max_drain_s": 20.0}
    {"cmd": "joins", "urls": [...], "count": 200, "expect": 100}   (join latency with history)
    {"cmd": "receipts", "on": true, "read_s": 1.0}   (v1connect: acknowledge, see below)
    {"cmd": "counters"}   (cumulative: receipt frames in, received/read frames out, errors)
    {"cmd": "close"}

``kind`` is the client's framing: ``plain`` (chatnode's plain dialect and the websockets
reference: a text frame is a message; what comes back is JSON with the text inside), ``raw``
(libwebsockets' mirror protocol: the text comes back as is) or ``socketio`` (Engine.IO v4 /
Socket.IO v5 over a WebSocket: ``40`` to join the namespace, ``42["message", text]`` events,
``2``/``3`` pings) or ``v1connect`` (one connection for several rooms, the messenger workload:
chatnode's ``GET /v1/connect`` and the websockets peer's mirror of it; the spec's ``rooms``
lists them; the client is ready once every one of them said ``live``; it sends
``{"type": "send", "chatroom", "message"}`` and parses ``{"type": "message", "chatroom",
"message", ...}`` frames; every other frame type is counted by type and otherwise ignored;
each (client, room) is a sender of its own, so order is checked per room and sender, and a
message must arrive in the room its sender sent it to). With ``receipts`` on, a v1connect
client answers every ``message`` frame it gets (its own echo included) with ``{"type":
"received", "chatroom", "offset"}`` at once, one per message, and every ``read_s`` (a timer
per connection, their phases spread over 10 slots) sends ``{"type": "read", "chatroom",
"offset"}`` for each room whose newest offset it has not read yet; ``receipt`` frames are
counted and otherwise ignored (the messenger's receipts variant, ``receipts.py``).

Open loop: a step sends ``count`` messages at ``rate_msgs`` per second on a fixed schedule,
round robin over the senders of all rooms, without waiting for anything. Each message is 64
bytes of text: ``~SSSSS QQQQQQQQQ TTTTTTTTTTTTTTTTTTT `` + padding, where S is the sender, Q
its sequence number and T the message's *scheduled* send time (perf_counter ns; charging the
schedule, not the actual send, keeps a late generator from hiding latency). Receivers find
the ``~`` in whatever frame carries it, record the latency, and check per connection and
sender that every sequence number arrives once and in order: loss, duplication and
reordering are counted, never inferred.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import resource
import sys
import time
from typing import Any

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

PAYLOAD_BYTES = 64
perf_ns = time.perf_counter_ns


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def percentiles(values: list[int], scale: float) -> dict[str, float | None]:
    if not values:
        return dict.fromkeys(("p50", "p90", "p99", "p999", "max", "mean"))
    values.sort()
    n = len(values)

    def q(p: float) -> float:
        return values[min(n - 1, int(p * n))] * scale

    return {
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "p999": q(0.999),
        "max": values[-1] * scale,
        "mean": sum(values) / n * scale,
    }


class Stats:
    """Counters of the step in progress, shared by every client."""

    def __init__(self) -> None:
        self.reset(first_seq={})

    def reset(self, first_seq: dict[int, int]) -> None:
        self.first_seq = first_seq  # sender -> first sequence number of this step
        self.latencies: list[int] = []
        self.received = 0  # unique messages of this step
        self.stale = 0  # unique messages of an earlier step arriving now
        self.dups = 0
        self.reorders = 0
        self.other = 0  # frames without a benchmark message (acks, presence, pings...)
        self.types: dict[str, int] = {}  # v1connect: frames by type
        self.wrong_room = 0  # v1connect: a message in another room than its sender's


class Client(WSListener):
    def __init__(
        self, gen: LoadGen, index: int, room: int, kind: str, rooms: list[int] | None = None
    ) -> None:
        self.gen = gen
        self.index = index
        self.room = room
        self.rooms = rooms or [room]
        self.pending_live = set(self.rooms)
        self.kind = kind
        self.transport: WSTransport | None = None
        self.ready = asyncio.get_running_loop().create_future()
        self.connected = False
        self.last: dict[int, int] = {}  # sender -> highest sequence number seen
        self.missing: dict[int, set[int]] = {}  # sender -> numbers skipped over (not yet seen)
        self.received_step = 0
        self.close_code: int | None = None
        self.newest: dict[int, int] = {}  # room -> newest offset seen (receipts mode)
        self.read_sent: dict[int, int] = {}  # room -> offset of the last read sent

    # picows callbacks -------------------------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.connected = True
        if self.kind not in ("socketio", "v1connect") and not self.ready.done():
            self.ready.set_result(True)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.connected:
            self.connected = False
            self.gen.disconnects += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("disconnected before ready"))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        mt = frame.msg_type
        if mt == WSMsgType.TEXT:
            data = frame.get_payload_as_bytes()
            if self.kind == "v1connect":
                self._v1(data)
                return
            i = data.find(b"~")
            if i >= 0:
                self._message(data, i)
            elif self.kind == "socketio":
                self._engineio(transport, data)
            else:
                self.gen.stats.other += 1
        elif mt == WSMsgType.CLOSE:
            self.close_code = frame.get_close_code()
            transport.send_close(frame.get_close_code())
            transport.disconnect()
        else:
            self.gen.stats.other += 1

    # ------------------------------------------------------------------------------------------
    def _v1(self, data: bytes) -> None:
        stats = self.gen.stats
        try:
            obj = json.loads(data)
            kind = obj.get("type")
        except (ValueError, AttributeError):
            stats.types["unparsable"] = stats.types.get("unparsable", 0) + 1
            return
        if kind == "message":
            gen = self.gen
            if gen.receipts_on and self.transport is not None:
                room, off = obj.get("chatroom"), obj.get("offset")
                if isinstance(room, int) and isinstance(off, int):
                    self.transport.send(
                        WSMsgType.TEXT,
                        b'{"type":"received","chatroom":%d,"offset":%d}' % (room, off),
                    )
                    gen.totals["received_out"] += 1
                    if off > self.newest.get(room, 0):
                        self.newest[room] = off
            text = obj.get("message")
            i = text.find("~") if isinstance(text, str) else -1
            if i >= 0:
                sender = int(text[i + 1 : i + 6])
                rooms = self.gen.sender_rooms
                if sender >= len(rooms) or rooms[sender] != obj.get("chatroom"):
                    stats.wrong_room += 1
                    return
                self._message(text, i)
                return
        elif kind == "live":
            self.pending_live.discard(obj.get("chatroom"))
            if not self.pending_live and not self.ready.done():
                self.ready.set_result(True)
        elif kind in ("unsubscribed", "error") and not self.ready.done():
            self.ready.set_exception(ConnectionError(data.decode(errors="replace")[:200]))
        key = str(kind)
        if key in ("receipt", "error"):
            self.gen.totals[key + "_in"] += 1
        stats.types[key] = stats.types.get(key, 0) + 1
        stats.other += 1

    def _message(self, data: bytes | str, i: int) -> None:
        now = perf_ns()
        sender = int(data[i + 1 : i + 6])
        seq = int(data[i + 7 : i + 16])
        sched = int(data[i + 17 : i + 36])
        stats = self.gen.stats
        prev = self.last.get(sender, -1)
        if seq == prev + 1:
            self.last[sender] = seq
        elif seq > prev + 1:
            self.missing.setdefault(sender, set()).update(range(prev + 1, seq))
            self.last[sender] = seq
        else:
            gaps = self.missing.get(sender)
            if gaps is not None and seq in gaps:
                gaps.discard(seq)
                stats.reorders += 1
            else:
                stats.dups += 1
                return
        if seq < stats.first_seq.get(sender, 0):
            stats.stale += 1
            return
        stats.received += 1
        self.received_step += 1
        stats.latencies.append(now - sched)

    def _engineio(self, transport: WSTransport, data: bytes) -> None:
        if data == b"2":  # Engine.IO ping
            transport.send(WSMsgType.TEXT, b"3")
        elif data.startswith(b"0{"):  # Engine.IO open: join the default namespace
            transport.send(WSMsgType.TEXT, b"40")
        elif data.startswith(b"40"):  # Socket.IO connected
            if not self.ready.done():
                self.ready.set_result(True)
        elif data.startswith(b"44"):  # connect error
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(data.decode(errors="replace")))
        else:
            self.gen.stats.other += 1


class Joiner(WSListener):
    """Counts text frames; resolves ``done`` with the time the ``expect``-th arrived."""

    def __init__(self, done: asyncio.Future[int], expect: int) -> None:
        self.done = done
        self.expect = expect
        self.seen = 0

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            self.seen += 1
            if self.seen == self.expect and not self.done.done():
                self.done.set_result(perf_ns())

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed after {self.seen} frames"))


class LoadGen:
    def __init__(self) -> None:
        self.clients: list[Client] = []
        self.senders: list[Client] = []
        self.sender_rooms: list[int] = []  # the room each sender sends to
        self.stats = Stats()
        self.disconnects = 0
        self.seq: list[int] = []  # next sequence number per sender
        self.receipts_on = False
        self.read_s = 1.0
        self.reader: asyncio.Task[None] | None = None
        self.totals = dict.fromkeys(("received_out", "read_out", "receipt_in", "error_in"), 0)

    def receipts(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.receipts_on = bool(spec.get("on"))
        self.read_s = float(spec.get("read_s", 1.0))
        if self.receipts_on and self.reader is None:
            self.reader = asyncio.get_running_loop().create_task(self._read_timer())
        return {"receipts": self.receipts_on, "read_s": self.read_s}

    async def _read_timer(self) -> None:
        """Each client's timer, every ``read_s``: ``read`` up to the newest offset of each
        room it got something new in (10 slots, client i in slot i % 10)."""
        tick = 0
        while True:
            await asyncio.sleep(self.read_s / 10)
            tick += 1
            for c in self.clients[tick % 10 :: 10]:
                if not c.newest or not c.connected or c.transport is None:
                    continue
                for room, off in c.newest.items():
                    if off > c.read_sent.get(room, 0):
                        c.read_sent[room] = off
                        c.transport.send(
                            WSMsgType.TEXT,
                            b'{"type":"read","chatroom":%d,"offset":%d}' % (room, off),
                        )
                        self.totals["read_out"] += 1

    async def connect(self, spec: dict[str, Any]) -> dict[str, Any]:
        t0, c0 = time.monotonic(), cpu_s()
        sem = asyncio.Semaphore(int(spec.get("concurrency", 64)))
        timeout = float(spec.get("timeout_s", 60))
        errors: list[str] = []
        base = len(self.clients)

        async def one(i: int, c: dict[str, Any]) -> Client | None:
            async with sem:
                client: Client | None = None

                def factory() -> Client:
                    nonlocal client
                    client = Client(self, base + i, int(c["room"]), c["kind"], c.get("rooms"))
                    return client

                try:
                    await asyncio.wait_for(
                        ws_connect(
                            factory,
                            c["url"],
                            extra_headers=c.get("headers") or None,
                            websocket_handshake_timeout=timeout,
                            max_frame_size=1 << 20,
                        ),
                        timeout,
                    )
                    assert client is not None
                    await asyncio.wait_for(client.ready, timeout)
                    return client
                except Exception as exc:
                    if len(errors) < 5:
                        errors.append(f"{c['url']}: {type(exc).__name__}: {exc}")
                    if client is not None and client.transport is not None:
                        client.transport.disconnect()
                    return None

        specs = spec["clients"]
        results = await asyncio.gather(*(one(i, c) for i, c in enumerate(specs)))
        ok = 0
        for c, client in zip(specs, results, strict=True):
            if client is None:
                continue
            ok += 1
            self.clients.append(client)
            if c.get("sender"):
                for room in c.get("send_rooms") or [client.room]:
                    self.senders.append(client)
                    self.sender_rooms.append(int(room))
                    self.seq.append(0)
        return {
            "ok": ok == len(specs),
            "connected": ok,
            "failed": len(specs) - ok,
            "errors": errors,
            "elapsed_s": time.monotonic() - t0,
            "cpu_s": cpu_s() - c0,
        }

    def _schedule(self, shuffle: int | None = None) -> list[int]:
        """Sender indexes in round-robin order that alternates rooms (or, with ``shuffle`` a
        seed, every sender once in a random order: spread over rooms and users)."""
        if shuffle is not None:
            order = list(range(len(self.senders)))
            random.Random(shuffle).shuffle(order)
            return order
        by_room: dict[int, list[int]] = {}
        for i, room in enumerate(self.sender_rooms):
            by_room.setdefault(room, []).append(i)
        order: list[int] = []
        rooms = sorted(by_room)
        depth = max((len(v) for v in by_room.values()), default=0)
        for k in range(depth):
            for r in rooms:
                if k < len(by_room[r]):
                    order.append(by_room[r][k])
        return order

    async def step(self, spec: dict[str, Any]) -> dict[str, Any]:
        rate = float(spec["rate_msgs"])
        count = int(spec["count"])
        drain_s = float(spec.get("drain_s", 3.0))
        max_drain_s = float(spec.get("max_drain_s", 30.0))
        shuffle = spec.get("shuffle")
        order = self._schedule(None if shuffle is None else int(shuffle))
        if not order:
            return {"error": "no senders"}
        self.stats.reset(first_seq={i: self.seq[i] for i in range(len(self.senders))})
        for c in self.clients:
            c.received_step = 0
        disconnects0 = self.disconnects
        live = [c for c in self.clients if c.connected]
        members: dict[int, int] = {}
        for c in live:
            for r in c.rooms:
                members[r] = members.get(r, 0) + 1
        sent_per_room: dict[int, int] = {}
        expected_per_client_room: dict[int, int] = {}
        lateness: list[int] = []
        pad = b"x" * PAYLOAD_BYTES
        words = [w.encode() + b" " for w in spec.get("words", [])]
        interval = 1e9 / rate
        # uvloop's timers have 1 ms resolution: a shorter sleep returns at once, so above
        # 1,000 msgs/s the loop would spin between sends (a full core of the generator's, for
        # nothing). ``min_sleep_ms`` (the messenger: 1) sends what is due every >= 1 ms instead;
        # the lateness counts in the latency, as always.
        min_sleep_ns = int(float(spec.get("min_sleep_ms", 0)) * 1e6)
        c0 = cpu_s()
        t_start = perf_ns() + 20_000_000
        k = 0
        send_errors = 0
        while k < count:
            now = perf_ns()
            due = t_start + int(k * interval)
            if due > now:
                await asyncio.sleep(max(due - now, min_sleep_ns) / 1e9)
                continue
            while k < count:
                sched = t_start + int(k * interval)
                if sched > now:
                    break
                si = order[k % len(order)]
                sender = self.senders[si]
                seq = self.seq[si]
                self.seq[si] = seq + 1
                head = b"~%05d %09d %019d " % (si, seq, sched)
                if words:
                    head += words[seq % len(words)]
                text = (head + pad)[:PAYLOAD_BYTES]
                room = self.sender_rooms[si]
                if sender.kind == "socketio":
                    payload = b'42["message","' + text + b'"]'
                elif sender.kind == "v1connect":
                    payload = b'{"type":"send","chatroom":%d,"message":"%s"}' % (room, text)
                else:
                    payload = text
                if sender.connected and sender.transport is not None:
                    sender.transport.send(WSMsgType.TEXT, payload)
                    sent_per_room[room] = sent_per_room.get(room, 0) + 1
                else:
                    send_errors += 1
                lateness.append(now - sched)
                k += 1
            # let the loop read replies between bursts
            await asyncio.sleep(0)
        t_sent = perf_ns()
        expected = sum(n * members.get(room, 0) for room, n in sent_per_room.items())
        for room, n in sent_per_room.items():
            expected_per_client_room[room] = n
        # drain: until everything expected arrived, or no progress for drain_s, or max_drain_s
        last_progress = time.monotonic()
        last_count = -1
        t_drain0 = time.monotonic()
        while self.stats.received < expected:
            await asyncio.sleep(0.01)
            now_m = time.monotonic()
            if self.stats.received != last_count:
                last_count = self.stats.received
                last_progress = now_m
            elif now_m - last_progress > drain_s:
                break
            if now_m - t_drain0 > max_drain_s:
                break
        t_end = perf_ns()
        cpu = cpu_s() - c0
        stats = self.stats
        short_clients = sum(
            1
            for c in live
            if c.received_step < sum(expected_per_client_room.get(r, 0) for r in c.rooms)
        )
        wall = (t_end - t_start) / 1e9
        return {
            "sent": k - send_errors,
            "send_errors": send_errors,
            "expected": expected,
            "received": stats.received,
            "lost": expected - stats.received,
            "dups": stats.dups,
            "reorders": stats.reorders,
            "stale": stats.stale,
            "other_frames": stats.other,
            "frame_types": stats.types,
            "wrong_room": stats.wrong_room,
            "short_connections": short_clients,
            "disconnects": self.disconnects - disconnects0,
            "latency_ms": percentiles(stats.latencies, 1e-6),
            "send_lateness_ms": percentiles(lateness, 1e-6),
            "send_window_s": (t_sent - t_start) / 1e9,
            "drain_s": (t_end - t_sent) / 1e9,
            "wall_s": wall,
            "loadgen_cpu_s": cpu,
            "loadgen_cpu_util": cpu / wall if wall > 0 else None,
            "live_connections": len(live),
        }

    async def joins(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Sequential joins: connect, wait for ``expect`` text frames (the replayed history),
        disconnect; the latency of each, from connect to the last history frame."""
        urls: list[str] = spec["urls"]
        count = int(spec["count"])
        expect = int(spec["expect"])
        pause = float(spec.get("pause_s", 0.02))
        timeout = float(spec.get("timeout_s", 10.0))
        latencies: list[int] = []
        failures: list[str] = []
        loop = asyncio.get_running_loop()
        for i in range(count):
            done = loop.create_future()

            t0 = perf_ns()
            transport = None
            try:
                transport, _ = await ws_connect(
                    functools.partial(Joiner, done, expect), urls[i % len(urls)]
                )
                t1 = await asyncio.wait_for(done, timeout)
                latencies.append(t1 - t0)
            except Exception as exc:
                if len(failures) < 5:
                    failures.append(f"{type(exc).__name__}: {exc}")
                else:
                    failures.append("")
            finally:
                if transport is not None:
                    with contextlib.suppress(Exception):
                        transport.send_close()
                        transport.disconnect()
            await asyncio.sleep(pause)
        return {
            "joins": len(latencies),
            "failures": len(failures),
            "errors": [f for f in failures if f][:5],
            "latency_ms": percentiles(latencies, 1e-6),
        }

    async def close(self) -> dict[str, Any]:
        for c in self.clients:
            if c.connected and c.transport is not None:
                with contextlib.suppress(Exception):
                    c.transport.send_close()
        await asyncio.sleep(0.2)
        for c in self.clients:
            if c.transport is not None:
                with contextlib.suppress(Exception):
                    c.transport.disconnect()
        return {"closed": len(self.clients)}


async def main() -> None:
    gen = LoadGen()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 28)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        name = cmd.get("cmd")
        if name == "connect":
            answer = await gen.connect(cmd)
        elif name == "step":
            answer = await gen.step(cmd)
        elif name == "joins":
            answer = await gen.joins(cmd)
        elif name == "close":
            answer = await gen.close()
            out.write(json.dumps(answer) + "\n")
            out.flush()
            break
        elif name == "receipts":
            answer = gen.receipts(cmd)
        elif name == "counters":
            answer = dict(gen.totals)
        elif name == "ping":
            answer = {"pong": True, "pid": os.getpid(), "cpu_s": cpu_s()}
        else:
            answer = {"error": f"unknown command {name!r}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    uvloop.run(main())
