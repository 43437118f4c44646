"""Attacks on the edge: connections, memory and input (docs/security.md, "Connections and
memory (edge)"). One test per attack, each against a real node on loopback (in this process,
or in its own process where its descriptors or memory must be its own), measuring what the
attack was after: the node's RSS, its descriptors, ``/healthz`` latency, status and close
codes. Every test failed on the code before the fix (the numbers in docs/security.md)."""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from chatnode.core import auth
from chatnode.core.models import Draft
from chatnode.node import accounts
from chatnode.node.room import RoomConnection
from chatnode.wire import websocket
from tests.e2e.harness import RunningNode, api_client, running_node
from tests.e2e.harness import auth as bearer
from tests.security.support import (
    NODE_DEFAULTS,
    FrameStream,
    client_frame,
    node_env_config,
    node_process,
    open_fds,
    rss_bytes,
    text_frame,
    upgrade,
)

SECRET = NODE_DEFAULTS["CHATNODE_JWT_SECRET"]
MiB = 1 << 20


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def make_room(node: RunningNode, *users: str) -> tuple[dict[str, str], int]:
    """Users (name -> token) and a room of the first."""
    async with api_client(node) as api:
        tokens = {user: await api.user_with_token(user) for user in users}
        room = await api.create_room(tokens[users[0]])
    return tokens, room


def token_for(token: str, ttl_s: int) -> str:
    """A token of the account ``token`` (one the API issued) names, expiring in ``ttl_s``."""
    now = time.time()
    claims = attrs.evolve(
        auth.verify_token(token, secret=SECRET, now_s=0),
        expires_at_s=int(now) + ttl_s,
        issued_at_ms=int(now * 1000),
        token_id=secrets.token_urlsafe(12),
    )
    return auth.issue_token(claims, secret=SECRET)


def closes(node: RunningNode, code: int) -> int:
    """Closes with ``code`` the node started (0 on a node that does not count them)."""
    assert node.app.edge is not None
    counted: dict[int, int] = getattr(node.app.edge.batcher, "closes", {})
    return counted.get(code, 0)


# -- 1: pings from a client that never reads ----------------------------------------------------

PING_FLOOD_BYTES = 64 * MiB


async def test_pongs_to_a_client_that_never_reads_count_against_its_backlog(
    tmp_path: Path,
) -> None:
    """Pings (125-byte payloads) sent without ever reading: every pong the node owes is
    queued. Before: pongs skipped the backlog check, so the queue grew with the flood
    (150 MiB of pings: +194 MiB RSS). Now they count: the connection is closed (4001) once
    ``send_backlog_bytes`` are queued, and RSS stays flat."""
    config = node_env_config(str(tmp_path), send_backlog_bytes=256 * 1024)
    async with running_node(config) as node:
        tokens, room = await make_room(node, "ann")
        answer = await upgrade(
            node.port, f"/v1/chatrooms/{room}/join?token={tokens['ann']}", rcvbuf=4096
        )
        assert answer.status == 101
        ping = client_frame(websocket.OPCODE_PING, b"p" * 125)
        burst = ping * (64 * 1024 // len(ping))
        before = peak = rss_bytes()
        sent, cut = 0, False
        with trio.fail_after(50):
            while sent < PING_FLOOD_BYTES:
                try:
                    await send_all(answer.sock, burst)
                except (BrokenPipeError, ConnectionResetError):
                    cut = True
                    break
                sent += len(burst)
                if sent % (4 * MiB) < len(burst):
                    peak = max(peak, rss_bytes())
        peak = max(peak, rss_bytes())
        growth = peak - before
        code = None
        with trio.move_on_after(10):  # the client reads at last: pongs, then the close
            code = await FrameStream(answer.sock).close_code()
        answer.sock.close()
        print(
            f"\n[security] ping flood: {sent / MiB:.1f} MiB of pings sent, node RSS"
            f" +{growth / MiB:.1f} MiB; cut while sending: {cut}; close code {code}"
        )
        assert growth < 24 * MiB, f"RSS grew {growth / MiB:.0f} MiB under a ping flood"
        assert closes(node, 4001) == 1, "the node queued pongs without bound"
        assert code in (4001, None), code


# -- 2: a join's replay that is never read ------------------------------------------------------

REPLAY_MESSAGES = 3000
REPLAY_TEXT_BYTES = 4000
REPLAY_CONNECTIONS = 10
REPLAY_TIMEOUT_S = 3.0


async def publish(node: RunningNode, room: int, count: int, size: int, *, start: int = 0) -> None:
    """``count`` messages of ``size`` bytes straight through the node's bus (the path a
    send takes after its frame is parsed)."""
    assert node.app.node is not None
    bus = node.app.node.backends.bus
    for i in range(start, start + count):
        text = f"{i:06d} " + "x" * (size - 7)
        await bus.publish(Draft(room, "ann", text, accounts.now_ms()))


async def test_an_unread_replay_holds_a_page_and_is_closed_at_its_deadline(
    tmp_path: Path,
) -> None:
    """Ten members join a room of 3,000 x 4 KB messages with ``since=0`` and never read.
    Before: each join queued its whole replay outside the backlog (43 MiB per connection
    for 10,000 messages; 10 connections: 432 MiB, still held 35 s later). Now the replay is
    written in pages as the socket drains, so each holds a page and its backlog, and one not
    read within ``replay_timeout_s`` is closed with 4001."""
    config = node_env_config(
        str(tmp_path), send_backlog_bytes=256 * 1024, replay_timeout_s=REPLAY_TIMEOUT_S
    )
    async with running_node(config) as node:
        tokens, room = await make_room(node, "ann")
        await publish(node, room, REPLAY_MESSAGES, REPLAY_TEXT_BYTES)
        before = peak = rss_bytes()
        members = []
        for _ in range(REPLAY_CONNECTIONS):
            answer = await upgrade(
                node.port,
                f"/v1/chatrooms/{room}/join?token={tokens['ann']}&since=0",
                rcvbuf=4096,
            )
            assert answer.status == 101
            members.append(answer)
            peak = max(peak, rss_bytes())
        # The figure: peak RSS while the replays wait for readers that never read, until the
        # node closes them (no event tells a test that; sampled every 50 ms, bounded).
        with trio.move_on_after(REPLAY_TIMEOUT_S + 10):
            while closes(node, 4001) < REPLAY_CONNECTIONS:
                peak = max(peak, rss_bytes())
                await trio.sleep(0.05)
        growth = peak - before
        print(
            f"\n[security] unread replays: {REPLAY_CONNECTIONS} x {REPLAY_MESSAGES} messages"
            f" of {REPLAY_TEXT_BYTES} B: node RSS +{growth / MiB:.1f} MiB at most"
            f" ({growth / REPLAY_CONNECTIONS / MiB:.2f} MiB per connection); closed with 4001:"
            f" {closes(node, 4001)}"
        )
        assert growth < 48 * MiB, f"RSS grew {growth / MiB:.0f} MiB for unread replays"
        assert closes(node, 4001) == REPLAY_CONNECTIONS, "unread replays were not closed"
        codes = []
        for answer in members:
            with trio.fail_after(10):
                codes.append(await FrameStream(answer.sock).close_code())
            answer.sock.close()
        assert set(codes) <= {4001, None}, codes


async def test_an_unread_replay_on_a_multi_room_connection_is_closed_at_its_deadline(
    tmp_path: Path,
) -> None:
    """The same on ``/v1/connect``: a room the connection opens with (here the user's only
    room, replayed in full: ``history_on_join`` covers it) whose replay is not read within
    ``replay_timeout_s`` closes the connection with 4001 (``edge/connect.py`` rule 3)."""
    config = node_env_config(
        str(tmp_path),
        send_backlog_bytes=256 * 1024,
        replay_timeout_s=REPLAY_TIMEOUT_S,
        history_on_join=REPLAY_MESSAGES,
    )
    async with running_node(config) as node:
        async with api_client(node) as api:
            token = await api.user_with_token("ann")
            r = await api.client.post(
                "/v1/chatrooms",
                json={"name": "mine", "visibility": "private"},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 201, r.text
            room = r.json()["id"]
        await publish(node, room, REPLAY_MESSAGES, REPLAY_TEXT_BYTES)
        answer = await upgrade(node.port, f"/v1/connect?token={token}", rcvbuf=4096)
        assert answer.status == 101
        # Not read until the node closed it (no event tells a test that: polled, bounded).
        with trio.move_on_after(REPLAY_TIMEOUT_S + 10):
            while closes(node, 4001) < 1:  # noqa: ASYNC110 -- no event for a close
                await trio.sleep(0.05)
        assert closes(node, 4001) == 1, "the unread replay was not closed"
        with trio.fail_after(10):
            assert await FrameStream(answer.sock).close_code() in (4001, None)
        answer.sock.close()


# -- 3: many WebSockets -------------------------------------------------------------------------


async def test_websockets_are_capped_per_user_and_per_client_address(tmp_path: Path) -> None:
    """One token opening WebSockets without end (before: 1,000 held by one user). Now a
    user gets ``max_websockets_per_user`` and a client address ``max_websockets_per_address``
    per node; the next gets 429 ``too_many_connections`` with ``Retry-After``, before the
    upgrade. This host's own addresses are not capped per address."""
    config = node_env_config(str(tmp_path), max_websockets_per_user=5, max_websockets_per_address=8)
    async with running_node(config) as node:
        users = ["ann"] + [f"u{i}" for i in range(10)]
        tokens, room = await make_room(node, *users)
        path = f"/v1/chatrooms/{room}/join?token="
        ann = [await upgrade(node.port, path + tokens["ann"]) for _ in range(7)]
        assert [a.status for a in ann] == [101] * 5 + [429] * 2, [a.status for a in ann]
        assert ann[-1].code == "too_many_connections"
        assert int(ann[-1].headers["retry-after"]) >= 1

        remote = {"X-Real-IP": "198.51.100.7"}  # as nginx forwards it (loopback is trusted)
        from_one_address = [
            await upgrade(node.port, path + tokens[f"u{i}"], headers=remote) for i in range(9)
        ]
        statuses = [a.status for a in from_one_address]
        assert statuses == [101] * 8 + [429], statuses
        assert from_one_address[-1].code == "too_many_connections"
        other = await upgrade(node.port, path + tokens["u9"], headers={"X-Real-IP": "198.51.100.8"})
        assert other.status == 101

        # a WebSocket that ends gives its place back
        ann[0].sock.close()
        assert node.app.edge is not None
        with trio.fail_after(10):  # no event says the node saw the end: bounded polling
            while node.app.edge.admission.websockets > 5 + 8 + 1 - 1:  # noqa: ASYNC110
                await trio.sleep(0.01)
        again = await upgrade(node.port, path + tokens["ann"])
        assert again.status == 101
        for answer in [*ann, *from_one_address, other, again]:
            answer.sock.close()


NOFILE = 256


async def test_the_node_caps_its_connections_below_its_descriptor_limit() -> None:
    """One user opening WebSockets on a node limited to 256 descriptors. Before: no cap, so
    accept failed with EMFILE (after 242 WebSockets), trio logged ~10 tracebacks a second
    and ``/healthz`` timed out for 50 s. Now the node takes at most ``max_websockets`` (90 %
    of RLIMIT_NOFILE less ``fd_reserve``) and answers the rest 503 ``node_full`` with
    ``Retry-After`` before the upgrade; ``/healthz`` answers at once."""
    async with node_process({"CHATNODE_MAX_WEBSOCKETS_PER_USER": "100000"}, nofile=NOFILE) as proc:
        node_url = f"http://127.0.0.1:{proc.port}"
        async with httpx.AsyncClient(base_url=node_url, timeout=10) as client:
            await client.post(
                "/v1/users", json={"name": "ann", "password": "correct-horse-battery"}
            )
            r = await client.post(
                "/v1/tokens", json={"name": "ann", "password": "correct-horse-battery"}
            )
            token = r.json()["token"]
            r = await client.post("/v1/chatrooms", json={"name": "x"}, headers=bearer(token))
            room = r.json()["id"]
        answers = []
        for attempt in range(NOFILE):
            with trio.move_on_after(5) as waited:
                answers.append(await upgrade(proc.port, f"/v1/chatrooms/{room}/join?token={token}"))
            assert not waited.cancelled_caught, (
                f"upgrade {attempt + 1} got no answer in 5 s"
                f" ({sum(a.status == 101 for a in answers)} WebSockets open):\n{proc.log_tail(8)}"
            )
        statuses = [a.status for a in answers]
        accepted = statuses.count(101)
        refused = [a for a in answers if a.status != 101]
        latencies = []
        async with httpx.AsyncClient(base_url=node_url, timeout=60) as client:
            for _ in range(5):
                t0 = time.monotonic()
                r = await client.get("/healthz", headers={"Connection": "close"})
                latencies.append(time.monotonic() - t0)
                assert r.status_code == 200
        fds = open_fds(proc.pid)
        log = proc.log.read_text()
        print(
            f"\n[security] {NOFILE} WebSockets of one user, RLIMIT_NOFILE {NOFILE}: {accepted}"
            f" accepted, {len(refused)} refused ({sorted({a.status for a in refused})}); node fds"
            f" {fds}; /healthz {max(latencies) * 1000:.1f} ms at most;"
            f" EMFILE in the log: {log.count('Too many open files')}"
        )
        assert refused and {a.status for a in refused} == {503}, statuses
        assert {a.code for a in refused} == {"node_full"}
        assert all(int(a.headers["retry-after"]) >= 1 for a in refused)
        assert statuses == sorted(statuses)  # accepted up to the cap, refused after it
        assert "Too many open files" not in log
        assert max(latencies) < 2.0, latencies
        for answer in answers:
            answer.sock.close()


async def test_a_silent_websocket_is_closed_with_4003(tmp_path: Path) -> None:
    """A member that never sends anything, not even pongs. Before: WebSockets never idled
    out. Now one silent for ``ws_idle_timeout_s`` is closed with 4003, while a member that
    answers the pings (every WebSocket client library does) stays."""
    config = node_env_config(str(tmp_path), ws_ping_interval_s=0.1, ws_idle_timeout_s=0.3)
    async with running_node(config) as node:
        tokens, room = await make_room(node, "ann")
        path = f"/v1/chatrooms/{room}/join?token={tokens['ann']}"
        silent = await upgrade(node.port, path)
        answering = await upgrade(node.port, path)
        assert silent.status == answering.status == 101
        frames = FrameStream(answering.sock, answering.rest)
        pong = trio.Event()

        async def answer_pings() -> None:
            while True:
                kind, payload = await frames.next()
                if kind == "ping":
                    await send_all(answering.sock, client_frame(websocket.OPCODE_PONG, payload))
                elif kind == "text" and json.loads(payload).get("type") == "pong":
                    pong.set()
                elif kind in ("close", "eof"):
                    raise AssertionError(f"the answering member was closed ({payload})")

        code = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_pings)
            with trio.move_on_after(10):
                code = await FrameStream(silent.sock, silent.rest).close_code()
            assert code == 4003, f"the silent WebSocket was not closed (close code {code})"
            # the other one answered every ping meanwhile: still open, and served
            await send_all(answering.sock, text_frame({"type": "ping", "id": "still"}))
            await pong.wait()
            nursery.cancel_scope.cancel()
        assert closes(node, 4003) == 1


# -- token expiry on open WebSockets --------------------------------------------------------


async def test_a_websocket_ends_when_its_token_expires_with_4500(tmp_path: Path) -> None:
    """Before: a WebSocket outlived its token for good. Now v1 and plain connections are
    closed with 4500 when the token they joined with expires."""
    async with running_node(node_env_config(str(tmp_path))) as node:
        tokens, room = await make_room(node, "ann")
        short = token_for(tokens["ann"], ttl_s=2)
        v1 = await upgrade(node.port, f"/v1/chatrooms/{room}/join?token={short}")
        plain = await upgrade(node.port, f"/v1/chatrooms/{room}/join?token={short}", v1=False)
        assert v1.status == plain.status == 101
        codes = []
        for answer in (v1, plain):
            with trio.move_on_after(10):
                codes.append(await FrameStream(answer.sock, answer.rest).close_code())
        assert codes == [4500, 4500], codes


async def test_a_refresh_frame_extends_a_websocket_only_with_its_users_later_token(
    tmp_path: Path,
) -> None:
    """``{"type": "refresh", "token"}`` replaces the connection's token with a later one of
    the same user; another user's token or an invalid one gets an ``error`` frame and the
    connection keeps its old expiry (then closes with 4500 like one never refreshed)."""
    async with running_node(node_env_config(str(tmp_path))) as node:
        tokens, room = await make_room(node, "ann", "bob")
        path = f"/v1/chatrooms/{room}/join?token="
        refreshed = await upgrade(node.port, path + token_for(tokens["ann"], ttl_s=3))
        refused = await upgrade(node.port, path + token_for(tokens["ann"], ttl_s=3))
        control = await upgrade(node.port, path + token_for(tokens["ann"], ttl_s=3))
        streams = {
            name: FrameStream(a.sock, a.rest)
            for name, a in (("refreshed", refreshed), ("refused", refused), ("control", control))
        }
        for stream in streams.values():
            while (await stream.json())["type"] != "live":
                pass

        async def answer(name: str, frame: dict[str, object]) -> dict[str, object]:
            sock = {"refreshed": refreshed, "refused": refused}[name].sock
            await send_all(sock, text_frame(frame))
            while (got := await streams[name].json())["type"] not in ("refreshed", "error"):
                pass
            return got

        later = token_for(tokens["ann"], ttl_s=3600)
        got = await answer("refreshed", {"type": "refresh", "token": later, "id": "r1"})
        assert got["type"] == "refreshed" and got["id"] == "r1", got
        assert got["expires_at"] == auth.verify_token(later, secret=SECRET, now_s=0).expires_at_s
        got = await answer("refused", {"type": "refresh", "token": token_for(tokens["bob"], 3600)})
        assert got["type"] == "error" and got["code"] == "token_invalid", got
        got = await answer("refused", {"type": "refresh", "token": "not.a.token"})
        assert got["type"] == "error" and got["code"] == "token_invalid", got
        got = await answer("refused", {"type": "refresh", "token": token_for(tokens["ann"], 1)})
        assert got["type"] == "error" and got["code"] == "token_invalid", got  # not later

        codes = {}
        for name in ("control", "refused"):
            with trio.move_on_after(10):
                codes[name] = await streams[name].close_code()
        assert codes == {"control": 4500, "refused": 4500}, codes
        # the refreshed one outlived its first token
        await send_all(refreshed.sock, text_frame({"type": "ping", "id": "alive"}))
        while (frame := await streams["refreshed"].json())["type"] != "pong":
            pass
        assert frame["id"] == "alive"


# -- 11: input ----------------------------------------------------------------------------------

DEEP = 30_000


async def test_malformed_input_gets_a_4xx_and_never_a_500(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: JSON nested 30,000 deep (also on the unauthenticated ``/v1/users``), integers
    >= 2^63 in ``after``/``chatroom``/``from``, and lone surrogates in names and passwords
    answered 500 with a traceback in the log; a v1 frame nested 12,000 deep dropped the
    connection without a close frame. Now each gets a 4xx with a stable code (v1: an
    ``error`` frame, the connection lives on), and the node logs no error."""
    caplog.set_level(logging.ERROR, logger="chatnode")
    async with running_node(node_env_config(str(tmp_path))) as node:
        tokens, room = await make_room(node, "ann")
        h = bearer(tokens["ann"])
        big = str(1 << 63)
        cases: list[tuple[str, str, dict[str, str], bytes | None, int, str]] = [
            ("POST", "/v1/users", {}, b"[" * DEEP + b"]" * DEEP, 400, "invalid_json"),
            (
                "POST",
                "/v1/users",
                {},
                b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
                400,
                "invalid_json",
            ),
            ("POST", "/v1/chatrooms", h, b"[" * DEEP + b"]" * DEEP, 400, "invalid_json"),
            (
                "POST",
                "/v1/users",
                {},
                b'{"name": "eve", "password": "\\ud800passw0rd"}',
                400,
                "invalid_json",
            ),
            (
                "POST",
                "/v1/users",
                {},
                b'{"name": "ev\\udfffe", "password": "password1"}',
                400,
                "invalid_json",
            ),
            (
                "POST",
                "/v1/tokens",
                {},
                b'{"name": "ann", "password": "\\udbffpassword"}',
                400,
                "invalid_json",
            ),
            ("POST", "/v1/chatrooms", h, b'{"name": "r\\ud800"}', 400, "invalid_json"),
            (
                "POST",
                "/v1/users",
                {},
                b'{"name": "eve", "password": "\xed\xa0\x80pass0rd"}',
                400,
                "invalid_json",
            ),  # a surrogate in UTF-8 bytes
            ("GET", f"/v1/chatrooms?after={big}", h, None, 400, "invalid_parameter"),
            ("GET", f"/v1/chatrooms?after=-{big}1", h, None, 400, "invalid_parameter"),
            ("GET", f"/v1/messages/search?q=x&chatroom={big}", h, None, 400, "invalid_parameter"),
            ("GET", f"/v1/messages/search?q=x&from={big}", h, None, 400, "invalid_parameter"),
            ("GET", f"/v1/messages/search?q=x&to={big}0", h, None, 400, "invalid_parameter"),
            (
                "GET",
                f"/v1/chatrooms/{room}/messages?before={big}",
                h,
                None,
                400,
                "invalid_parameter",
            ),
            ("GET", f"/v1/chatrooms?after={'9' * 5000}", h, None, 400, "invalid_parameter"),
        ]
        async with httpx.AsyncClient(base_url=node.http_url, timeout=30) as client:
            for method, url, headers, body, status, code in cases:
                r = await client.request(method, url, headers=headers, content=body)
                assert (r.status_code, r.json()["error"]["code"]) == (status, code), (
                    method,
                    url,
                    (body or b"")[:60],
                    r.status_code,
                    r.text[:200],
                )
            r = await client.get(f"/v1/chatrooms?after={(1 << 63) - 1}", headers=h)
            assert r.status_code == 200  # the largest 64-bit integer is fine
        refused = await upgrade(
            node.port, f"/v1/chatrooms/{room}/join?token={tokens['ann']}&since={1 << 64}"
        )
        assert (refused.status, refused.code) == (400, "invalid_parameter")

        member = await upgrade(node.port, f"/v1/chatrooms/{room}/join?token={tokens['ann']}")
        frames = FrameStream(member.sock, member.rest)
        while (await frames.json())["type"] != "live":
            pass
        for payload, code in [
            (b"[" * 12_000 + b"]" * 12_000, "invalid_json"),
            (
                b'{"type": "send", "message": "hi", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                "invalid_json",
            ),
            (b'{"type": "send", "message": "hi", "id": "\\ud800"}', "invalid_json"),
            (b'{"type": "send", "message": "\\udc00 hi"}', "invalid_json"),
            (b'{"type": "refresh", "token": 5}', "invalid_frame"),
        ]:
            await send_all(member.sock, client_frame(websocket.OPCODE_TEXT, payload))
            frame = await frames.reply()
            assert (frame["type"], frame.get("code")) == ("error", code), (payload[:60], frame)
        await send_all(member.sock, text_frame({"type": "ping", "id": "after"}))
        assert (await frames.reply()) == {"type": "pong", "id": "after"}
        member.sock.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def test_a_websocket_handler_failure_closes_with_1011_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a frame's handler (injected: ``typing`` raises). Before: the connection was
    dropped without a close frame (1006 at the client). Now it is closed with 1011, the
    failure logged once with its traceback, and the node serves on."""

    async def broken_typing(self: RoomConnection) -> None:
        raise RuntimeError("injected handler bug")

    monkeypatch.setattr(RoomConnection, "typing", broken_typing)
    caplog.set_level(logging.ERROR, logger="chatnode")
    async with running_node(node_env_config(str(tmp_path))) as node:
        tokens, room = await make_room(node, "ann")
        member = await upgrade(node.port, f"/v1/chatrooms/{room}/join?token={tokens['ann']}")
        frames = FrameStream(member.sock, member.rest)
        await send_all(member.sock, text_frame({"type": "typing"}))
        await send_all(member.sock, text_frame({"type": "typing"}))  # closing: not handled
        with trio.fail_after(10):
            code = await frames.close_code()
        assert code == 1011
        member.sock.close()
        async with httpx.AsyncClient(base_url=node.http_url) as client:
            assert (await client.get("/healthz")).status_code == 200
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    assert failures[0].exc_info and "injected handler bug" in str(failures[0].exc_info[1])


# -- 15: Transfer-Encoding with Content-Length ----------------------------------------------


async def test_transfer_encoding_with_content_length_is_refused_and_closed(
    tmp_path: Path,
) -> None:
    """RFC 9112 §6.1: a request with both may be an attempt to smuggle a request past a
    proxy that framed it by Content-Length. Before: read as chunked, connection kept open.
    Now: 400 ``malformed_request`` and the connection is closed (on both the h11 path and
    the hand-written fast path, which hands such heads to h11)."""
    async with running_node(node_env_config(str(tmp_path))) as node:
        body = b'{"name": "eve", "password": "correct-horse-battery"}'
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        smuggled = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        requests = [
            b"POST /v1/users HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(chunked), chunked),
            b"POST /v1/users HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%s" % chunked,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ]
        for request in requests:
            stream = await trio.open_tcp_stream("127.0.0.1", node.port)
            await stream.send_all(request + smuggled)
            received, closed = b"", False
            with trio.move_on_after(5):
                while chunk := await stream.receive_some(65536):
                    received += chunk
                closed = True
            await stream.aclose()
            assert closed, f"the connection was kept open after: {received[:300]!r}"
            head, _, rest = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 "), received[:200]
            assert b"connection: close" in head.lower()
            assert json.loads(rest)["error"]["code"] == "malformed_request"
            assert received.count(b"HTTP/1.1") == 1, received  # the smuggled GET is not read
        async with httpx.AsyncClient(base_url=node.http_url) as client:
            r = await client.post(
                "/v1/tokens", json={"name": "eve", "password": "correct-horse-battery"}
            )
            assert r.status_code == 401  # no user was created by either request


# -- 17: Origin ---------------------------------------------------------------------------------


async def test_websocket_origins_other_than_the_nodes_own_are_refused(tmp_path: Path) -> None:
    """Before: ``Origin`` was never checked, so in insecure mode any web page could join as
    any user (``?user=``). Now an upgrade whose ``Origin`` is neither the request's own host
    nor in ``CHATNODE_ALLOWED_ORIGINS`` gets 403 ``origin_not_allowed``; clients that send
    no ``Origin`` (not browsers) are let through."""
    config = node_env_config(str(tmp_path), insecure=1, allowed_origins="https://app.example.com")
    async with running_node(config) as node:
        _, room = await make_room(node, "ann")
        path = f"/v1/chatrooms/{room}/join?user=ann"
        host = f"127.0.0.1:{node.port}"
        expected = [
            ({"Host": host, "Origin": "http://evil.example"}, 403),
            ({"Host": host, "Origin": "null"}, 403),
            ({"Host": host, "Origin": f"http://127.0.0.1:{node.port + 1}"}, 403),
            ({"Host": host, "Origin": "https://app.example.com.evil.example"}, 403),
            ({"Host": host, "Origin": f"http://127.0.0.1:{node.port}"}, 101),
            ({"Host": "chat.example.com", "Origin": "https://chat.example.com:8443"}, 101),
            ({"Host": host, "Origin": "https://app.example.com"}, 101),
            ({"Host": host}, 101),
        ]
        for headers, status in expected:
            answer = await upgrade(node.port, path, headers=headers)
            assert answer.status == status, (headers, answer.status, answer.body)
            if status == 403:
                assert answer.code == "origin_not_allowed"
            answer.sock.close()


async def test_the_cli_says_why_a_join_was_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``chatnode chat`` over a cap (or refused otherwise): one clear line and exit status 1,
    not a traceback."""
    from chatnode.client import chat

    config = node_env_config(str(tmp_path), max_websockets_per_user=1)
    async with running_node(config) as node:
        tokens, room = await make_room(node, "ann")
        held = await upgrade(node.port, f"/v1/chatrooms/{room}/join?token={tokens['ann']}")
        assert held.status == 101
        assert await chat(node.ws_url, room, None, tokens["ann"]) == 1
        held.sock.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chatnode: join refused: 429 too_many_connections")
