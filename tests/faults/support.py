"""What every fault scenario shares: the setup (``fault_cluster``: a cluster with small
timeouts, an API client, the nodes' logs on failure; ``fault_proxy``: a fault-injecting proxy
in front of a test service), users and rooms, the zero-loss / zero-duplicate / offset-order
check of a room, Elasticsearch completeness, node
metrics, Redis inspection, and the figures each scenario measures (printed, appended to
``RESULTS_FILE`` and summarised at the end of the pytest run)."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from chatnode.adapters.elasticsearch import es_client, messages_index
from tests.cluster.cluster import Cluster, require_services, running_cluster
from tests.cluster.harness import http_get, nginx_available
from tests.fault_proxy import FaultProxy
from tests.faults.client import FaultClient
from tests.redis_support import RedisAdmin

# Small timeouts, so each fault resolves in seconds (docs/faults.md's guarantees with test-sized
# knobs).
FAULT_SETTINGS: dict[str, Any] = {
    "presence_ttl_s": 2,
    "archive_claim_idle_s": 2,
    "drain_timeout_s": 3,
    "backend_timeout_s": 1,
    "cache_ttl_s": 1,
}

PASSWORD = "correct-horse-battery"
RESULTS_FILE = Path(tempfile.gettempdir()) / "chatnode-faults-results.txt"
FIGURES: list[str] = []  # this session's figures, for the terminal summary (conftest.py)


def require_tools(*tools: str) -> None:
    """nginx (and e.g. redis-server) must be installed: fail under CI /
    CHATNODE_REQUIRE_SERVICES, skip otherwise (as ``require_services`` does)."""
    missing = [t for t in ("nginx", *tools) if not _installed(t)]
    if missing:
        message = f"fault tests need {', '.join(missing)} (scripts/services install)"
        if os.environ.get("CI") or os.environ.get("CHATNODE_REQUIRE_SERVICES"):
            pytest.fail(message)
        pytest.skip(message)


def _installed(tool: str) -> bool:
    return nginx_available() if tool == "nginx" else shutil.which(tool) is not None


def record(scenario: str, figure: str, value: float | int | str, unit: str = "s") -> None:
    """Print one measured figure and append it to ``RESULTS_FILE``."""
    shown = f"{value:.2f}" if isinstance(value, float) else str(value)
    line = f"{scenario}: {figure} = {shown}{unit}"
    print(f"[faults] {line}")
    FIGURES.append(line)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    with RESULTS_FILE.open("a") as results:
        results.write(f"{stamp} {line}\n")


@asynccontextmanager
async def node_logs_on_failure(cluster: Cluster, lines: int = 60) -> AsyncIterator[None]:
    """Print the tail of every node's log if the body fails (the logs go with the cluster's
    temporary directory). ``CHATNODE_FAULTS_LOGS=1`` prints them always."""
    failed = True
    try:
        yield
        failed = False
    finally:
        if failed or os.environ.get("CHATNODE_FAULTS_LOGS"):
            for i, node in enumerate(cluster.nodes):
                print(f"----- node{i + 1} (pid {node.pid}) log tail -----")
                print(node.log_tail(lines))
            if cluster.tmp is not None:
                error_log = cluster.tmp / "nginx" / "logs" / "error.log"
                if error_log.exists():
                    print("----- nginx error.log tail -----")
                    print("\n".join(error_log.read_text().splitlines()[-lines:]))


@asynccontextmanager
async def fault_cluster(
    nodes: int = 2,
    *,
    node_env: Mapping[str, str] | Callable[[dict[str, str]], Mapping[str, str]] | None = None,
    per_node_env: Sequence[Mapping[str, str]] = (),
    **settings: Any,
) -> AsyncIterator[tuple[Cluster, httpx.AsyncClient]]:
    """The setup of a scenario: ``nodes`` nodes behind nginx with ``FAULT_SETTINGS``
    (``settings`` override or add to them; ``node_env``, ``per_node_env`` as for
    ``running_cluster``) and an API client through nginx; the nodes' logs are printed if the
    body fails. Fails (CI) or skips without nginx."""
    require_tools()
    async with (
        running_cluster(
            nodes,
            node_env=node_env,
            per_node_env=per_node_env,
            **{**FAULT_SETTINGS, **settings},
        ) as cluster,
        httpx.AsyncClient(base_url=cluster.url) as api,
        node_logs_on_failure(cluster),
    ):
        yield cluster, api


@asynccontextmanager
async def fault_proxy(service_env: str) -> AsyncIterator[FaultProxy]:
    """A ``FaultProxy`` in front of the test service whose URL ``service_env`` holds
    (``CHATNODE_TEST_ES_URL``, ``CHATNODE_TEST_MYSQL_URL``), serving until the body ends."""
    require_tools()
    port = urlsplit(require_services()[service_env]).port
    assert port is not None, service_env
    async with trio.open_nursery() as background:
        proxy = FaultProxy(port)
        await background.start(proxy.serve)
        yield proxy
        background.cancel_scope.cancel()


# -- users, rooms, clients ----------------------------------------------------------------------


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def make_users(api: httpx.AsyncClient, names: Iterable[str]) -> dict[str, str]:
    """Create each user and return ``{name: token}``."""
    tokens = {}
    for name in names:
        r = await api.post("/v1/users", json={"name": name, "password": PASSWORD})
        assert r.status_code == 201, r.text
        r = await api.post("/v1/tokens", json={"name": name, "password": PASSWORD})
        assert r.status_code == 200, r.text
        tokens[name] = r.json()["token"]
    return tokens


async def make_room(api: httpx.AsyncClient, token: str, name: str = "faults") -> int:
    r = await api.post("/v1/chatrooms", json={"name": name}, headers=auth(token))
    assert r.status_code == 201, r.text
    room: int = r.json()["id"]
    return room


def node_ws(cluster: Cluster, i: int) -> str:
    return f"ws://127.0.0.1:{cluster.node_ports[i]}"


def clients_on_nodes(
    cluster: Cluster,
    tokens: dict[str, str],
    room: int,
    homes: Sequence[int],
    **options: Any,
) -> list[FaultClient]:
    """One client per user; user i first connects straight to node ``homes[i]`` (so the test
    knows who is where) and reconnects through nginx."""
    return [
        FaultClient(
            name,
            token,
            room,
            connect_url=node_ws(cluster, home),
            api_url=cluster.url,
            reconnect_url=cluster.ws_url,
            **options,
        )
        for (name, token), home in zip(tokens.items(), homes, strict=True)
    ]


async def start_all(nursery: trio.Nursery, clients: Iterable[FaultClient]) -> None:
    """Start every client; return once all are live (joined and replayed)."""
    async with trio.open_nursery() as starting:
        for client in clients:
            starting.start_soon(nursery.start, client.run)


async def send_series(client: FaultClient, count: int, interval_s: float, tag: str = "") -> None:
    """``count`` messages ``<name> <tag><i>``, one every ``interval_s``."""
    for i in range(count):
        client.send(f"{client.name} {tag}{i}")
        await trio.sleep(interval_s)


async def send_until(
    client: FaultClient, stop: trio.Event, interval_s: float, tag: str = ""
) -> None:
    """Messages ``<name> <tag><i>``, one every ``interval_s``, until ``stop`` is set."""
    i = 0
    while not stop.is_set():
        client.send(f"{client.name} {tag}{i}")
        i += 1
        with trio.move_on_after(interval_s):
            await stop.wait()


async def probe_reaches_everyone(
    probe: FaultClient, everyone: Sequence[FaultClient], text: str, timeout_s: float = 20.0
) -> None:
    """``probe`` sends ``text`` (retrying as the cluster recovers); return once every client
    received it."""
    probe.send(text)
    with trio.fail_after(timeout_s):
        for client in everyone:
            await client.wait_for(
                f"{text!r}", lambda c=client: any(m.text == text for m in c.received)
            )


async def settle_all(clients: Sequence[FaultClient], timeout_s: float = 20.0) -> int:
    """Wait until every send of every client is stored and every client received the room up
    to the newest offset any of them knows; return that offset."""
    head = 0
    try:
        with trio.fail_after(timeout_s):
            for client in clients:
                await client.wait_settled()
            head = max(c.last_offset for c in clients)
            head = max([head, *(o for c in clients for o in c.settled.values())])
            for client in clients:
                await client.wait_offset(head)
    except trio.TooSlowError:
        print_trio_tasks()
        state = [
            f"{c.name}: last offset {c.last_offset}, {len(c.unsettled)} unsettled, live {c.live}"
            f", closes {[int(x) if x else x for x in c.close_codes][-5:]}"
            f", connect failures {c.connect_failures[-3:]}"
            for c in clients
        ]
        raise AssertionError(
            f"not settled within {timeout_s}s (head {head}): " + "; ".join(state)
        ) from None
    return head


def print_trio_tasks() -> None:
    """Print every task of this run with the innermost frames it waits in (to see what a
    client that did not settle is stuck on)."""

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        frames = []
        coro: Any = task.coro
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                where = frame.f_code.co_filename.rsplit("site-packages/", 1)[-1]
                frames.append(f"{where}:{frame.f_lineno} {frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        print("  " * depth + task.name)
        for line in frames[-4:]:
            print("  " * depth + "   @ " + line)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)


async def close_all(clients: Iterable[FaultClient]) -> None:
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(client.close)


def verify_room(
    clients: Sequence[FaultClient],
    scenario: str,
    *,
    head: int | None = None,
    left: Sequence[FaultClient] = (),
) -> dict[int, tuple[str, str]]:
    """The guarantees of docs/faults.md for one room, from what the clients saw:

    - each client received offsets ``since+1 .. head``, each once, in offset order;
    - all clients agree on the message at each offset;
    - every text any client sent is in the room exactly once (zero lost, zero duplicated);
    - every ``ack`` named the offset the text really has.

    ``left`` are clients that left the room before the end (closed once their sends were
    settled): the same checks, except that their stream ends where they left.

    Print the per-client counts and return ``{offset: (user, text)}``."""
    everyone = [*clients, *left]
    room: dict[int, tuple[str, str]] = {}
    for client in everyone:
        client.verify_stream()
        for m in client.received:
            seen = room.setdefault(m.offset, (m.user, m.text))
            assert seen == (m.user, m.text), f"offset {m.offset}: {seen} vs {m} ({client.name})"
    newest = max(room) if room else 0
    if head is not None:
        assert newest == head, f"the room's newest offset is {newest}, expected {head}"
    for client in clients:
        assert client.last_offset == newest, f"{client.name} stopped at {client.last_offset}"
    counts = Counter(room.values())
    duplicated = [k for k, n in counts.items() if n > 1]
    assert not duplicated, f"stored more than once: {duplicated[:5]}"
    sent = [(c.name, t) for c in everyone for t in c.sent_texts]
    lost = [k for k in sent if k not in counts]
    assert not lost, f"lost: {lost[:5]}"
    for client in everyone:
        for text, offset in client.settled.items():
            assert room[offset] == (client.name, text), f"{client.name}: {text} at {offset}?"
    acked = [(c.name, text) for c in clients for text in c.acked]
    record(scenario, "acknowledged messages present once (all clients)",
           f"{sum(1 for a in acked if counts[a] == 1)} of {len(acked)}", "")  # fmt: skip
    print(f"[faults] {scenario}: per-client counts (room head {newest})")
    print(
        "  client      nodes                sent  acked  received  resent  found  reconnects"
        "  close codes"
    )
    for c in everyone:
        found = c.found_in_replay + c.found_in_history
        codes = [int(code) if code is not None else None for code in c.close_codes]
        label = f"{c.name} (left)" if any(c is gone for gone in left) else c.name
        print(
            f"  {label:<11} {','.join(dict.fromkeys(c.nodes)):<20} {len(c.sent_texts):>4}"
            f"  {len(c.acked):>5}  {len(c.received):>8}  {c.resent:>6}  {found:>5}"
            f"  {len(c.outages):>10}  {codes}"
        )
    return room


# -- Elasticsearch, metrics, Redis --------------------------------------------------------------


async def es_messages(cluster: Cluster, room: int) -> dict[int, tuple[str, str]]:
    """``{offset: (user, text)}`` of ``room`` as Elasticsearch holds it (after a refresh)."""
    es = es_client(cluster.env["CHATNODE_ELASTICSEARCH_URL"])
    index = messages_index(cluster.prefix)
    try:
        await es.indices.refresh(index=index)
        response = await es.search(
            index=index,
            query={"term": {"chatroom": room}},
            size=10_000,
            track_total_hits=False,
        )
        return {
            int(hit["_source"]["offset"]): (hit["_source"]["user"], hit["_source"]["message"])
            for hit in response["hits"]["hits"]
        }
    finally:
        await es.close()


async def history(api: httpx.AsyncClient, token: str, room: int) -> dict[int, tuple[str, str]]:
    """``{offset: (user, text)}`` of the whole room from its history pages (REST), checking
    that each page is offset-ordered and that no offset comes twice."""
    messages: dict[int, tuple[str, str]] = {}
    before: int | None = None
    while True:
        params = {"limit": 500} | ({"before": before} if before is not None else {})
        r = await api.get(f"/v1/chatrooms/{room}/messages", params=params, headers=auth(token))
        assert r.status_code == 200, r.text
        page = r.json()
        offsets = [m["offset"] for m in page["messages"]]
        assert offsets == sorted(offsets), offsets
        for m in page["messages"]:
            assert m["offset"] not in messages, f"offset {m['offset']} twice in the history"
            messages[m["offset"]] = (m["user"], m["message"])
        before = page["next_before"]
        if before is None:
            return messages


async def es_offsets(cluster: Cluster, room: int) -> set[int]:
    """The offsets of ``room`` that Elasticsearch holds (after a refresh), read directly."""
    es = es_client(cluster.env["CHATNODE_ELASTICSEARCH_URL"])
    index = messages_index(cluster.prefix)
    try:
        await es.indices.refresh(index=index)
        response = await es.search(
            index=index,
            query={"term": {"chatroom": room}},
            size=10_000,
            source_includes=["offset"],
            track_total_hits=False,
        )
        return {int(hit["_source"]["offset"]) for hit in response["hits"]["hits"]}
    finally:
        await es.close()


async def wait_archived(cluster: Cluster, room: int, head: int, timeout_s: float) -> float:
    """Bounded polling (Elasticsearch gives no event) until it holds every offset 1..head of
    ``room``; return the seconds it took. Fails naming the missing offsets."""
    start = time.monotonic()
    wanted = set(range(1, head + 1))
    held: set[int] = set()
    with trio.move_on_after(timeout_s):
        while (held := await es_offsets(cluster, room)) != wanted:  # noqa: ASYNC110
            await trio.sleep(0.2)
        return time.monotonic() - start
    missing = sorted(wanted - held)
    extra = sorted(held - wanted)
    raise AssertionError(
        f"after {timeout_s}s Elasticsearch misses {len(missing)} offsets {missing[:10]}"
        f" (unexpected: {extra[:10]})"
    )


async def node_metric(port: int, name: str) -> float:
    status, body = await http_get(port, "/metrics")
    assert status == 200, body
    for line in body.decode().splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics of port {port}")


@asynccontextmanager
async def redis_client(cluster: Cluster) -> AsyncIterator[RedisAdmin]:
    async with RedisAdmin.from_url(cluster.env["CHATNODE_REDIS_URL"]) as client:
        yield client


async def archive_reader(cluster: Cluster) -> str | None:
    """The node reading the archive stream (holding its lease), if any."""
    async with redis_client(cluster) as redis:
        holder = await redis.get(f"{cluster.prefix}:archive:lease")
    return holder.decode() if holder is not None else None


async def archive_backlog(cluster: Cluster) -> int:
    """Messages in the archive stream: not archived yet (or not yet trimmed)."""
    async with redis_client(cluster) as redis:
        return await redis.xlen(f"{cluster.prefix}:archive")


async def presence_entries(cluster: Cluster, room: int) -> list[list[str]]:
    """The raw presence entries ``[node, conn, user]`` of ``room`` in Redis."""
    async with redis_client(cluster) as redis:
        fields = await redis.hkeys(f"{cluster.prefix}:presence:room:{room}")
    return [json.loads(f) for f in fields]


async def online(api: httpx.AsyncClient, token: str, room: int) -> list[str]:
    r = await api.get(f"/v1/chatrooms/{room}/users", headers=auth(token))
    assert r.status_code == 200, r.text
    users: list[str] = r.json()["online"]
    return users
