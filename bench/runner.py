#!/usr/bin/env python3
"""The fan-out benchmark (issue 5): chatnode against the peers people would pick.

Run it with ``bench/run [--quick|--full]`` (which prepares bench/.venv and the services and
then runs this file with bench/.venv's Python). What it does, in order:

1. Fan-out: for each round, each system in turn (the order rotates per round: ours and the
   peers interleaved) is started, gets its users and rooms, the load generator connects every
   member, runs a discarded warm-up, then the offered-load steps. Per step it reads the
   servers' CPU from /proc before and after, and the generator reports latency, loss,
   duplication and reordering per connection.
   - cluster comparison, 10 rooms x 100 members through nginx with Redis: chatnode (2 nodes,
     MySQL, Redis, Elasticsearch, archiver on), the websockets reference (2 processes), and
     python-socketio (2 processes);
   - single-node comparison, direct: chatnode embedded (1 node) and libwebsockets-test-server.
     3 rooms x 100 members: lws-mirror-protocol serves at most 3 mirror instances (rooms).
2. Extras on chatnode's cluster: archiver catch-up rate vs Elasticsearch's raw bulk rate, join
   latency with 100 messages of history (Redis room log, then Elasticsearch), search through
   the API vs straight to Elasticsearch, memory per idle connection, ``GET /v1/chatrooms``
   through nginx vs nginx's own ``return 200``.
3. Figures against the targets of issue 5 (they live here only), a table on stdout and in
   ``bench/results/latest.md``, everything in ``bench/results/latest.json`` and the p99 plot
   in ``bench/results/latest.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import redis as redis_py

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    LOADGEN_CPUS,
    RESULTS,
    ROOT,
    SERVER_CPUS,
    WORK,
    Http,
    LoadGenProc,
    backend_pids,
    cpu_seconds,
    log,
    machine_busy_s,
    raise_nofile,
    rss_kib,
)
from systems import (
    HOST,
    UPSTREAM,
    ChatnodeCluster,
    ChatnodeSingle,
    Libwebsockets,
    Redis,
    SocketIO,
    System,
    WebsocketsRef,
)

MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "steps": [1000, 5000],
        "step_s": 8.0,
        "rounds": 1,
        "warmup_s": 3.0,
        "idle_per_node": 1000,
        "history_msgs": 20_000,
        "archiver_rounds": 1,
        "join_samples": 100,
        "search_samples": 200,
        "rest_s": 5,
    },
    "full": {
        "steps": [1000, 5000, 20000, 40000],
        "step_s": 15.0,
        "rounds": 3,
        "warmup_s": 5.0,
        "idle_per_node": 5000,
        "history_msgs": 100_000,
        "archiver_rounds": 3,
        "join_samples": 300,
        "search_samples": 500,
        "rest_s": 10,
    },
}

CLUSTER_WORKLOAD = {"rooms": 10, "members": 100, "senders": 10}
SINGLE_WORKLOAD = {"rooms": 3, "members": 100, "senders": 10}
P99_LIMIT_MS = 100.0
OVERLOAD_P99_MS = 2000.0  # past this a step is overloaded and higher steps are skipped

TARGETS = {
    "cpu_vs_websockets": 1.0,
    "cpu_vs_socketio": 0.33,
    "cpu_single_vs_lws": 1.5,
    "knee_min": 40_000,
    "idle_kib": 10.0,
    "rest_ratio": 0.05,
    "join_log_p99_ms": 25.0,
    "join_es_p99_ms": 60.0,
    "search_added_p50_ms": 2.0,
    "archiver_ratio": 0.8,
}
WORDS = [
    "apple",
    "banana",
    "cherry",
    "delta",
    "echo",
    "falcon",
    "garnet",
    "harbor",
    "indigo",
    "jasper",
    "kestrel",
    "lagoon",
    "marble",
    "nectar",
    "orchid",
    "pepper",
]


# -- fan-out -------------------------------------------------------------------------------


def run_fanout(system: System, workload: dict[str, int], mode: dict[str, Any]) -> dict[str, Any]:
    """Start ``system``, connect every member, warm up, run the steps; return the figures."""
    members = workload["members"]
    out: dict[str, Any] = {"system": system.name, "workload": workload, "steps": []}
    t0 = time.monotonic()
    system.start()
    lg: LoadGenProc | None = None
    try:
        specs = system.prepare(workload["rooms"], members, workload["senders"])
        lg = LoadGenProc()
        conn = lg.call({"cmd": "connect", "clients": specs, "concurrency": 64, "timeout_s": 60})
        out["connect"] = conn
        if conn["failed"]:
            raise RuntimeError(
                f"{conn['failed']} of {len(specs)} clients did not connect: {conn['errors']}"
            )
        time.sleep(1.0)
        warm_rate = 1000 / members
        out["warmup"] = lg.call(
            {
                "cmd": "step",
                "rate_msgs": warm_rate,
                "count": int(warm_rate * mode["warmup_s"]),
                "drain_s": 3.0,
            }
        )
        skip_reason = None
        for offered in mode["steps"]:
            if skip_reason:
                out["steps"].append({"offered": offered, "skipped": skip_reason})
                continue
            rate = offered / members
            count = int(rate * mode["step_s"])
            servers, infra = system.server_pids(), system.infra_pids()
            c_srv, c_inf = cpu_seconds(servers), cpu_seconds(infra)
            c_nodes = [cpu_seconds(g) for g in system.node_pid_groups()]
            c_lg, c_all = cpu_seconds([lg.pid]), machine_busy_s()
            backends = backend_pids() if system.name == "chatnode-cluster" else []
            c_be = cpu_seconds(backends)
            r = lg.call(
                {
                    "cmd": "step",
                    "rate_msgs": rate,
                    "count": count,
                    "drain_s": 5.0,
                    "max_drain_s": 60.0,
                }
            )
            d_srv = cpu_seconds(servers) - c_srv
            d_inf = cpu_seconds(infra) - c_inf
            d_nodes = [
                cpu_seconds(g) - c for g, c in zip(system.node_pid_groups(), c_nodes, strict=True)
            ]
            d_lg, d_all = cpu_seconds([lg.pid]) - c_lg, machine_busy_s() - c_all
            d_be = cpu_seconds(backends) - c_be
            system.check_alive()
            received = max(1, r["received"])
            step = {
                "offered": offered,
                "msgs_per_s": rate,
                "messages": count,
                **r,
                "server_cpu_s": d_srv,
                "server_cpu_per_node_s": d_nodes,
                "infra_cpu_s": d_inf,
                "server_cpu_us_per_delivery": d_srv / received * 1e6,
                "infra_cpu_us_per_delivery": d_inf / received * 1e6,
                "server_util": d_srv / r["wall_s"],
                # CPU of everything else on the machine during the step (other users' work):
                # a noisy neighbour shows here.
                "foreign_util": max(0.0, d_all - d_srv - d_inf - d_lg - d_be) / r["wall_s"],
                # Elasticsearch + MariaDB (shared services, unpinned; chatnode cluster only)
                "backend_cpu_us_per_delivery": d_be / received * 1e6,
                "achieved_deliveries_per_s": r["received"] / r["wall_s"],
            }
            step["clean"] = r["lost"] == 0 and r["dups"] == 0 and r["reorders"] == 0
            out["steps"].append(step)
            lat = r["latency_ms"]
            log(
                f"  {system.name:17s} {offered:>6}/s  p50 {fmt(lat['p50'])} p99 {fmt(lat['p99'])}"
                f" ms  cpu {step['server_cpu_us_per_delivery']:.1f} us/delivery"
                f" (+infra {step['infra_cpu_us_per_delivery']:.1f})  lost {r['lost']} dup"
                f" {r['dups']} reord {r['reorders']}  loadgen {r['loadgen_cpu_util']:.0%}"
                f"  other {step['foreign_util']:.0%}"
            )
            if (lat["p99"] or 0) > OVERLOAD_P99_MS or r["lost"] > 0:
                skip_reason = (
                    f"overloaded at {offered}/s (p99 {fmt(lat['p99'])} ms, lost {r['lost']})"
                )
    finally:
        if lg is not None:
            lg.close()
        system.stop()
    out["elapsed_s"] = time.monotonic() - t0
    return out


def fmt(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def aggregate(runs: list[dict[str, Any]], steps: list[int]) -> dict[str, Any]:
    """Per offered load: medians over rounds, sums of loss/dup/reorder, the knee."""
    per_step: dict[int, dict[str, Any]] = {}
    for offered in steps:
        ran = [
            s for r in runs for s in r["steps"] if s["offered"] == offered and "skipped" not in s
        ]
        skipped = [
            s for r in runs for s in r["steps"] if s["offered"] == offered and "skipped" in s
        ]
        if not ran:
            per_step[offered] = {
                "offered": offered,
                "rounds": 0,
                "skipped": skipped[0]["skipped"] if skipped else "not run",
            }
            continue
        per_step[offered] = {
            "offered": offered,
            "rounds": len(ran),
            "skipped_rounds": len(skipped),
            "p50_ms": median([s["latency_ms"]["p50"] for s in ran]),
            "p99_ms": median([s["latency_ms"]["p99"] for s in ran]),
            "max_ms": median([s["latency_ms"]["max"] for s in ran]),
            "cpu_us_per_delivery": median([s["server_cpu_us_per_delivery"] for s in ran]),
            "infra_cpu_us_per_delivery": median([s["infra_cpu_us_per_delivery"] for s in ran]),
            "backend_cpu_us_per_delivery": median([s["backend_cpu_us_per_delivery"] for s in ran]),
            "server_util": median([s["server_util"] for s in ran]),
            "loadgen_util": median([s["loadgen_cpu_util"] for s in ran]),
            "foreign_util": max(s["foreign_util"] for s in ran),
            "achieved_deliveries_per_s": median([s["achieved_deliveries_per_s"] for s in ran]),
            "deliveries": sum(s["received"] for s in ran),
            "lost": sum(s["lost"] for s in ran),
            "dups": sum(s["dups"] for s in ran),
            "reorders": sum(s["reorders"] for s in ran),
            "disconnects": sum(s["disconnects"] for s in ran),
        }
    knee = 0
    for offered in steps:
        st = per_step[offered]
        if (
            st.get("rounds")
            and not st.get("skipped_rounds")
            and st["p99_ms"] is not None
            and st["p99_ms"] <= P99_LIMIT_MS
            and st["lost"] == 0
            and st["dups"] == 0
            and st["reorders"] == 0
        ):
            knee = offered
        else:
            break
    return {"steps": per_step, "knee": knee, "knee_is_lower_bound": knee == steps[-1]}


# -- extras (chatnode cluster) ------------------------------------------------------------


class EsClient:
    def __init__(self, url: str) -> None:
        m = re.match(r"https?://([^:/]+):(\d+)", url)
        assert m, url
        self.http = Http(m.group(1), int(m.group(2)), timeout=120)

    def req(
        self, method: str, path: str, body: Any = None, ndjson: str | bytes | None = None
    ) -> Any:
        if ndjson is not None:
            import http.client

            for attempt in range(3):
                if self.http.conn is None:
                    self.http.conn = http.client.HTTPConnection(
                        self.http.host, self.http.port, timeout=120
                    )
                try:
                    self.http.conn.request(
                        method,
                        path,
                        body=ndjson.encode() if isinstance(ndjson, str) else ndjson,
                        headers={"Content-Type": "application/x-ndjson"},
                    )
                    resp = self.http.conn.getresponse()
                    return resp.status, json.loads(resp.read())
                except (OSError, http.client.HTTPException):
                    self.http.close()
                    if attempt == 2:
                        raise
            return None
        return self.http.request(method, path, body)

    def count(self, index: str, room: int) -> int:
        self.req("POST", f"/{index}/_refresh")
        status, body = self.req("POST", f"/{index}/_count", {"query": {"term": {"chatroom": room}}})
        return int(body.get("count", 0)) if status == 200 else -1


def index_work(es: EsClient, index: str) -> dict[str, Any]:
    """Where Elasticsearch's time went for ``index`` (its totals, from ``_stats``): indexing
    threads, refreshes, merges, flushes; to tell why a run cost ES more CPU per document."""
    status, body = es.req("GET", f"/{index}/_stats/indexing,refresh,merge,flush")
    if status != 200:
        return {}
    total = body.get("_all", {}).get("primaries", {})
    return {
        "index_ms": total.get("indexing", {}).get("index_time_in_millis", 0),
        "docs": total.get("indexing", {}).get("index_total", 0),
        "refreshes": total.get("refresh", {}).get("total", 0),
        "refresh_ms": total.get("refresh", {}).get("total_time_in_millis", 0),
        "merges": total.get("merges", {}).get("total", 0),
        "merge_ms": total.get("merges", {}).get("total_time_in_millis", 0),
        "flush_ms": total.get("flush", {}).get("total_time_in_millis", 0),
    }


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(p * len(v)))]


EXTRAS = ("archiver", "join", "search", "idle", "rest", "peers")


def run_extras(
    redis: Redis,
    mysql_url: str,
    es_url: str,
    prefix: str,
    mode: dict[str, Any],
    only: frozenset[str] = frozenset(EXTRAS),
) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    if only & {"archiver", "join", "search"}:
        extras.update(_history_extras(redis, mysql_url, es_url, prefix, mode, only))
    if only & {"idle", "rest"}:
        cluster = ChatnodeCluster(redis, mysql_url, es_url, prefix)
        cluster.start()
        try:
            if "idle" in only:
                # 5. Memory per idle connection (direct to each node).
                log(f"extras: idle connections ({mode['idle_per_node']} per node)")
                extras["idle"] = idle_memory(cluster, mode["idle_per_node"])
            if "rest" in only:
                # 6. GET /v1/chatrooms through nginx vs nginx's own return 200.
                log("extras: REST throughput (wrk)")
                extras["rest"] = rest_throughput(cluster, mode["rest_s"])
        finally:
            cluster.stop()
    if "peers" in only:
        extras["idle_peers"] = idle_peers(redis, mode)
    return extras


ARCHIVER_BATCH = 1000
ARCHIVER_COPIES = 3
"""The archiver's backlog is the history room's documents and copies of them under other
room ids (from COPY_ROOM_BASE): 300,000 in full mode (see the catch-up's comment)."""
COPY_ROOM_BASE = 2_000_000_000
"""chatnode's ``Archiver.batch_size``: the documents of one bulk request, ours and the raw
reference's."""


def _history_extras(
    redis: Redis,
    mysql_url: str,
    es_url: str,
    prefix: str,
    mode: dict[str, Any],
    only: frozenset[str],
) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    index = f"{prefix}-messages"
    es = EsClient(es_url)
    n_hist = mode["history_msgs"]

    # 1. Seed a history room while the archiver cannot reach Elasticsearch, so the archive
    #    stream holds a backlog of n_hist messages.
    log(f"extras: seeding {n_hist} messages of history (archiver held back)")
    seed = ChatnodeCluster(redis, mysql_url, "http://127.0.0.1:9", prefix, tag="seed")
    seed.start()
    room = 0
    try:
        seed._users(["hist0", "hist1", "seeder"])
        room = seed._rooms(1)[0]
        lg = LoadGenProc()
        try:
            url = f"ws://{HOST}:{seed.entry_port}/v1/chatrooms/{room}/join?user=seeder"
            c = lg.call(
                {
                    "cmd": "connect",
                    "clients": [{"url": url, "room": room, "kind": "plain", "sender": True}],
                }
            )
            if c["failed"]:
                raise RuntimeError(f"seeder did not connect: {c['errors']}")
            t = time.monotonic()
            r = lg.call(
                {
                    "cmd": "step",
                    "rate_msgs": 3000,
                    "count": n_hist,
                    "drain_s": 10.0,
                    "max_drain_s": 600.0,
                    "words": WORDS,
                },
                timeout=1200,
            )
            extras["seed"] = {
                "messages": n_hist,
                "received": r["received"],
                "lost": r["lost"],
                "seconds": time.monotonic() - t,
            }
        finally:
            lg.close()
    finally:
        seed.stop()
    stream = f"{prefix}:archive"
    group_of = redis_py.Redis(host=HOST, port=redis.port, decode_responses=True)
    raw_redis = redis_py.Redis(host=HOST, port=redis.port)
    extras["seed"]["archive_backlog"] = int(group_of.xlen(stream))
    # The backlog as the bus wrote it (one document per entry), kept to fill each round; the
    # seed's stream (never stored: ES was dead) and the lease its reader held are deleted, so
    # the cluster's archivers start on an empty stream.
    documents = [fields[b"d"] for _, fields in raw_redis.xrange(stream)]
    raw_redis.delete(stream, f"{stream}:lease")
    # Archiver runs catch up the documents and copies of them under other room ids: a round
    # of 100,000 documents lasted 1.3-1.6 s, about one refresh interval of the index (1 s),
    # so its figure was mostly its edges (ES indexed a raw run of 100,000 at 111-120k docs/s
    # with no refresh at all, of 300,000 at 92-99k/s, and made 300,000 searchable at 88-93k/s,
    # 2026-12-07). With 300,000 both sides run several intervals.
    copies = ARCHIVER_COPIES if "archiver" in only else 1
    head = b'{"chatroom":%d,' % room
    backlog_docs = [
        document if k == 0 else document.replace(head, b'{"chatroom":%d,' % (COPY_ROOM_BASE + k), 1)
        for k in range(copies)
        for document in documents
    ]
    backlog = len(backlog_docs)

    # 2. The real cluster's archiver catches up the backlog, in rounds; a round's rate runs
    #    from 5 % to 95 % archived (gone from the stream: the feed trims it below the oldest
    #    entry not acknowledged). Each round's backlog is built in a scratch stream, then
    #    RENAMEd onto the archive stream at once (and the reading node's blocked XREAD
    #    released with CLIENT UNBLOCK), so the archiver starts on a whole backlog, after both
    #    nodes are up and settled. One node reads the stream at a time (its lease); the other
    #    waits. Each round indexes into a fresh index.
    # ES's own bulk rate for the same documents, in the archiver's shape: as many concurrent
    # streams of ARCHIVER_BATCH-document bulks as the archiver keeps in flight (4; up to
    # 2026-12-07 two nodes read with 2 each),
    # into a scratch index with the same template, right before each round (after its fill)
    # and once after the last (ES's rate moves with its own background work and the
    # machine's other users: a round is compared with the mean of the raw runs before and
    # after it). The bodies are built
    # before the clock starts, so the figure is Elasticsearch's rate, not this Python
    # client's. Up to 2026-12-07 the reference used 2 streams, which left ES ~25 % of the
    # machine idle (82-123k docs/s with 4 streams against 74-89k with 2, same run); the
    # 2-stream rate is still recorded (es_raw_bulk_2_streams).
    key_of = re.compile(rb'\{"chatroom":([0-9]+),"offset":([0-9]+),')

    def bulk(batch: list[bytes]) -> bytes:
        """The bulk body of ``batch`` as the archiver's ES adapter makes it."""
        parts = []
        for document in batch:
            key = key_of.match(document)
            assert key is not None, document[:80]
            parts.append(b'{"create":{"_id":"%b:%b"}}\n%b\n' % (key[1], key[2], document))
        return b"".join(parts)

    # The very documents the archiver indexes, in its batches.
    bodies = [
        bulk(backlog_docs[first : first + ARCHIVER_BATCH])
        for first in range(0, backlog, ARCHIVER_BATCH)
    ]

    def raw_bulk(streams: int) -> dict[str, Any]:
        raw_index = f"{prefix}-messages-rawbulk"
        es.req("DELETE", f"/{raw_index}")
        es.req("PUT", f"/{raw_index}")
        results: list[float] = []

        def worker(part: int, parts: int) -> None:
            client = EsClient(es_url)
            for i in range(part, len(bodies), parts):
                status, body = client.req(
                    "POST", f"/{raw_index}/_bulk?filter_path=errors", ndjson=bodies[i]
                )
                if status != 200 or body.get("errors"):
                    results.append(-1)
                    return
            results.append(1)

        t, c_es, c_all = time.monotonic(), cpu_seconds(backend_pids()), machine_busy_s()
        threads = [threading.Thread(target=worker, args=(i, streams)) for i in range(streams)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        unrefreshed = time.monotonic() - t
        # Until the documents are searchable: a run shorter than the index's refresh interval
        # was deleted before any refresh wrote its segment (~4 us of ES CPU per document, the
        # refresh_ms of es_index_work), work that the archiver's catch-up, 1.5 s long, pays
        # within its window. Up to 2026-12-07 the raw rate was taken without it.
        es.req("POST", f"/{raw_index}/_refresh")
        elapsed = time.monotonic() - t
        d_es, d_all = cpu_seconds(backend_pids()) - c_es, machine_busy_s() - c_all
        work = index_work(es, raw_index)
        es.req("DELETE", f"/{raw_index}")
        return {
            "docs": backlog,
            "streams": streams,
            "seconds": elapsed,
            "docs_per_s": backlog / elapsed,
            "docs_per_s_unrefreshed": backlog / unrefreshed,
            "es_cpu_us_per_doc": d_es / backlog * 1e6,
            "machine_busy": d_all / elapsed / os.cpu_count(),
            "es_index_work": work,
            "ok": len(results) == streams and all(x > 0 for x in results),
        }

    cluster = ChatnodeCluster(redis, mysql_url, es_url, prefix)
    es.req("DELETE", f"/{index}")
    cluster.migrate()
    in_flight = 4  # Archiver.max_in_flight, of the one node reading
    raw_runs: list[dict[str, Any]] = []

    def raw_run() -> None:
        if "archiver" in only:
            log(f"extras: Elasticsearch raw bulk, {in_flight} streams")
            raw_runs.append(raw_bulk(in_flight))

    cluster.start()
    try:
        deadline = time.monotonic() + 60
        while not any(c["cmd"] == "xread" for c in group_of.client_list()):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster's archiver never read the archive stream")
            time.sleep(0.05)
        # The pids are listed once: listing a process tree reads every /proc/<pid>/stat
        # (~2.5 ms), which every 10 ms took a quarter of a core from ES (before 2026-12-07).
        node_pids, redis_pids, es_pids = cluster.server_pids(), redis.pids(), backend_pids()

        def catch_up() -> dict[str, Any]:
            """One round: the backlog onto the archive stream at once; until all acked. ES's
            raw run goes between the fill and the catch-up, so the catch-up starts on an ES as
            warm as the raw runs do (each follows a catch-up or a raw run): ES idle for the
            fill's few seconds indexed the next 100,000 documents at 17-25 us of CPU each,
            against 16-20 right after other bulks (/tmp runs of 4 streams, 2026-12-07)."""
            scratch = f"{stream}:next"
            raw_redis.delete(scratch)
            for first in range(0, backlog, 5000):
                pipe = raw_redis.pipeline(transaction=False)
                for document in backlog_docs[first : first + 5000]:
                    pipe.xadd(scratch, {"d": document})
                pipe.execute()
            es.req("DELETE", f"/{index}")
            es.req("PUT", f"/{index}")  # the template (chatnode migrate) gives its mapping
            if "archiver" in only:
                raw_run()  # also lets the fill's and the new index's work settle
            else:
                time.sleep(0.5)  # the fill's and the index's work settles
            # (time, archived, CPU seconds of the nodes, Redis, ES + MariaDB, whole machine),
            # sampled every 10 ms from Redis: an entry leaves the stream only once ES accepted
            # it and every older one, so archived = backlog - XLEN (it trails by the bulks
            # stored out of order, at most 3,000 entries). No ES refresh meanwhile.
            acked: list[tuple[float, int, float, float, float, float]] = []
            sampling = threading.Event()

            def cpus() -> tuple[float, float, float, float]:
                """CPU seconds of the nodes, Redis, ES + MariaDB and the whole machine."""
                return (
                    cpu_seconds(node_pids),
                    cpu_seconds(redis_pids),
                    cpu_seconds(es_pids),
                    machine_busy_s(),
                )

            def sample_acked() -> None:
                while not sampling.is_set():
                    done = backlog - int(group_of.xlen(stream))
                    acked.append((time.monotonic(), done, *cpus()))
                    time.sleep(0.01)

            started = (time.monotonic(), *cpus())
            raw_redis.rename(scratch, stream)
            # A RENAME wakes no blocked XREAD: released (as if timed out), the reader reads
            # again at once instead of up to the feed's wait later.
            for client in group_of.client_list():
                if client["cmd"] == "xread" and "b" in client["flags"]:
                    group_of.client_unblock(client["id"])
            sampler = threading.Thread(target=sample_acked, daemon=True)
            sampler.start()
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not (acked and acked[-1][1] >= backlog):
                time.sleep(0.05)
            sampling.set()
            sampler.join()
            refresh_started = time.monotonic()
            es.req("POST", f"/{index}/_refresh")
            refresh_s = time.monotonic() - refresh_started
            ended = cpus()
            es.req("POST", f"/{index}/_refresh")
            _, counted = es.req("GET", f"/{index}/_count")
            arch: dict[str, Any] = {"backlog": backlog, "indexed": int(counted.get("count", -1))}
            arch["es_index_work"] = index_work(es, index)
            # The whole round, like a raw run: from the RENAME until every document was
            # acknowledged (the first sample that saw it) and then searchable (a refresh).
            done_at = next((t for t, n, *_ in acked if n >= backlog), None)
            if done_at is not None:
                seconds = done_at - started[0] + refresh_s
                arch["docs_per_s"] = backlog / seconds
                arch["seconds"] = seconds
                for key, i in (("node", 1), ("redis", 2), ("es", 3)):
                    arch[f"whole_{key}_cpu_us_per_doc"] = (
                        (ended[i - 1] - started[i]) / backlog * 1e6
                    )

            def crossing(fraction: float) -> list[float] | None:
                """(time, then each CPU of a sample) when ``fraction`` of the backlog was
                acknowledged, interpolated between samples."""
                goal = fraction * backlog
                for (t0, n0, *c0), (t1, n1, *c1) in itertools.pairwise(acked):
                    if n0 < goal <= n1:
                        k = (goal - n0) / (n1 - n0)
                        return [a + k * (b - a) for a, b in zip((t0, *c0), (t1, *c1), strict=True)]
                return None

            lo, hi = crossing(0.05), crossing(0.95)
            if lo and hi and hi[0] > lo[0]:
                # Steady state: from 5 % to 95 % acknowledged (up to 2026-12-07 the figure).
                docs = 0.9 * backlog
                arch["window_docs_per_s"] = docs / (hi[0] - lo[0])
                # Where the CPU went, per document: the nodes, Redis, ES (+ MariaDB, idle
                # here), and the machine's busy fraction of its cores (the rest: this bench,
                # the kernel's work outside these processes, other users).
                for key, i in (("node", 1), ("redis", 2), ("es", 3)):
                    arch[f"{key}_cpu_us_per_doc"] = (hi[i] - lo[i]) / docs * 1e6
                arch["machine_busy"] = (hi[4] - lo[4]) / (hi[0] - lo[0]) / os.cpu_count()
            return arch

        rounds: list[dict[str, Any]] = []
        warmup: dict[str, Any] | None = None
        if "archiver" in only:
            # A discarded round first, its raw run with it: ES arrives here from the fan-out,
            # nearly idle, and its JIT was still warming over the first rounds (raw runs of
            # one full run of 8622f86, 2026-12-07: 28.9, 25.1, 22.8 and 17.9 us of ES CPU per
            # document, 66k -> 101k docs/s, in order; the round between each pair went the
            # same way), so the first round and its raw run measured a colder ES than the last.
            log("extras: archiver catch-up, warm-up round (discarded)")
            warmup = catch_up()
            warmup["raw_run"] = raw_runs.pop()
        for n in range(mode["archiver_rounds"] if "archiver" in only else 1):
            log(f"extras: archiver catch-up, round {n + 1}")
            rounds.append(catch_up())
        raw_run()
        if "archiver" in only:
            for n, one in enumerate(rounds):  # each against the raw runs before and after it
                if "docs_per_s" in one:
                    around = (raw_runs[n]["docs_per_s"] + raw_runs[n + 1]["docs_per_s"]) / 2
                    one["raw_docs_per_s"] = around
                    one["ratio_vs_raw"] = one["docs_per_s"] / around
                    # The method before 2026-12-07: the 5-95 % window against raw runs
                    # that were never refreshed.
                    unrefreshed = sum(raw_runs[k]["docs_per_s_unrefreshed"] for k in (n, n + 1))
                    if "window_docs_per_s" in one:
                        one["window_ratio_vs_raw_unrefreshed"] = one["window_docs_per_s"] / (
                            unrefreshed / 2
                        )
        if copies > 1:
            # Join and search read the history room in an index that holds it alone, as
            # before (the copies were the archiver's work only): the last round's documents
            # of that room, loaded again the raw way.
            es.req("DELETE", f"/{index}")
            es.req("PUT", f"/{index}")
            for body in bodies[: (len(documents) + ARCHIVER_BATCH - 1) // ARCHIVER_BATCH]:
                status, answer = es.req("POST", f"/{index}/_bulk?filter_path=errors", ndjson=body)
                if status != 200 or answer.get("errors"):
                    raise RuntimeError(f"reloading the history room failed: {answer}")
            es.req("POST", f"/{index}/_refresh")
        arch = {"messages": backlog, "backlog": backlog, "rounds": rounds}
        if warmup is not None:
            arch["warmup_round"] = warmup
        arch["indexed"] = min(r["indexed"] for r in rounds)
        ratios = [r["ratio_vs_raw"] for r in rounds if "ratio_vs_raw" in r]
        if ratios and len(ratios) == len(rounds):
            median = sorted(rounds, key=lambda r: r["ratio_vs_raw"])[len(rounds) // 2]
            arch.update({k: v for k, v in median.items() if k not in ("backlog", "indexed")})
            arch["ratio_vs_raw_rounds"] = ratios
        extras["archiver"] = arch
        if "archiver" in only:
            seconds = sum(r["seconds"] for r in raw_runs)
            extras["es_raw_bulk"] = {
                "docs": backlog * len(raw_runs),
                "streams": in_flight,
                "seconds": seconds,
                "docs_per_s": backlog * len(raw_runs) / seconds,
                "ok": all(r["ok"] for r in raw_runs),
                "runs": raw_runs,
            }
            extras["es_raw_bulk_2_streams"] = raw_bulk(2)

        if "join" in only:
            # 3. Join latency with 100 messages of history: from the Redis room log, then (log
            #    emptied) from Elasticsearch.
            log("extras: join latency")
            base = f"ws://{HOST}:{cluster.entry_port}/v1/chatrooms/{room}/join?user="
            urls = [base + "hist0", base + "hist1"]
            joins = {
                "cmd": "joins",
                "urls": urls,
                "count": mode["join_samples"],
                "expect": 100,
                "pause_s": 0.03,
            }
            lg = LoadGenProc()
            try:
                j_log = lg.call(joins, timeout=600)
                redis.cli("XTRIM", f"{prefix}:room:{room}:log", "MAXLEN", "0")
                j_es = lg.call(joins, timeout=600)
            finally:
                lg.close()
            extras["join"] = {"archived_messages": n_hist, "room_log": j_log, "elasticsearch": j_es}

        if "search" in only:
            # 4. Search through the API (nginx -> node -> ES) vs the same query straight to ES.
            log("extras: search")
            api = Http(HOST, cluster.entry_port)
            api_ms: list[float] = []
            direct_ms: list[float] = []
            es_body = lambda word: {  # noqa: E731 - the node's query (adapters/elasticsearch.py)
                "query": {
                    "bool": {
                        "must": [{"match": {"message": {"query": word, "operator": "and"}}}],
                        "filter": [{"term": {"chatroom": room}}],
                    }
                },
                "sort": [
                    {"_score": "desc"},
                    {"timestamp": "desc"},
                    {"chatroom": "asc"},
                    {"offset": "desc"},
                ],
                "size": 20,
                "_source": ["chatroom", "offset", "user", "message", "timestamp"],
                "track_scores": True,
                "track_total_hits": False,
            }
            errors = 0
            for i in range(mode["search_samples"]):
                word = WORDS[i % len(WORDS)]
                t = time.perf_counter()
                status, body = api.request("GET", f"/v1/messages/search?q={word}&chatroom={room}")
                api_ms.append((time.perf_counter() - t) * 1000)
                if status != 200 or len(body.get("hits", [])) != 20:
                    errors += 1
                t = time.perf_counter()
                status, body = es.req(
                    "POST",
                    f"/{index}/_search?filter_path=hits.hits._source,hits.hits._score,hits.hits.sort",
                    es_body(word),
                )
                direct_ms.append((time.perf_counter() - t) * 1000)
                if status != 200:
                    errors += 1
            api.close()
            extras["search"] = {
                "samples": len(api_ms),
                "errors": errors,
                "api_p50_ms": pct(api_ms, 0.5),
                "api_p99_ms": pct(api_ms, 0.99),
                "es_p50_ms": pct(direct_ms, 0.5),
                "es_p99_ms": pct(direct_ms, 0.99),
            }
            extras["search"]["added_p50_ms"] = (
                extras["search"]["api_p50_ms"] - extras["search"]["es_p50_ms"]
            )

    finally:
        cluster.stop()

    return extras


def idle_peers(redis: Redis, mode: dict[str, Any]) -> dict[str, Any]:
    """The same idle-memory measurement on the peers, for context (no target)."""
    result: dict[str, Any] = {}
    for peer in (WebsocketsRef(redis), ChatnodeSingle(), Libwebsockets()):
        log(f"extras: idle connections on {peer.name}")
        try:
            peer.start()
            if isinstance(peer, ChatnodeSingle):
                peer._users([f"b0m{m}" for m in range(100)])
            result[peer.name] = idle_memory(peer, mode["idle_per_node"])
        except Exception as exc:
            result[peer.name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            peer.stop()
    return result


def idle_memory(system: System, per_node: int) -> dict[str, Any]:
    groups = system.idle_clients(per_node)
    warm = system.idle_clients(50)
    lg = LoadGenProc()
    try:
        w = lg.call({"cmd": "connect", "clients": [c for g in warm for c in g]})
        lg.call({"cmd": "close"})
    finally:
        lg.close()
    time.sleep(2.0)
    before = [rss_kib(g) for g in system.node_pid_groups()]
    lg = LoadGenProc()
    try:
        c = lg.call(
            {
                "cmd": "connect",
                "clients": [c for g in groups for c in g],
                "concurrency": 64,
                "timeout_s": 60,
            },
            timeout=1200,
        )
        time.sleep(3.0)
        after = [rss_kib(g) for g in system.node_pid_groups()]
    finally:
        lg.close()
    connected = c["connected"]
    growth = sum(after) - sum(before)
    return {
        "per_node": per_node,
        "nodes": len(groups),
        "connected": connected,
        "failed": c["failed"],
        "errors": c["errors"],
        "warm_connected": w["connected"],
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": growth / connected if connected else None,
        "connect_s": c["elapsed_s"],
    }


def wrk(url: str, seconds: int, connections: int = 32) -> dict[str, Any]:
    binary = shutil.which("wrk")
    if binary is None:
        return {"error": "wrk not installed"}
    cpus = ",".join(str(c) for c in sorted(LOADGEN_CPUS))
    out = subprocess.run(
        [
            "taskset",
            "-c",
            cpus,
            binary,
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    m = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    total = re.search(r"(\d+) requests in", out.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out.stdout)
    p99 = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out.stdout)
    res: dict[str, Any] = {
        "url": url,
        "rps": float(m.group(1)) if m else None,
        "requests": int(total.group(1)) if total else None,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }
    if p99:
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
        res["p99_ms"] = float(p99.group(1)) * scale
    if m is None:
        res["error"] = out.stdout[-500:] + out.stderr[-500:]
    return res


def rest_throughput(system: System, seconds: int) -> dict[str, Any]:
    """``GET /v1/chatrooms`` through nginx vs nginx's own ``return 200``, wrk on the load
    generator's core.

    The figure (``ratio_per_node_cpu``) compares requests per CPU-second: what the nodes served
    per second of their CPU (/proc, like the fan-out CPU figures: one node process on a core of
    its own), against what nginx served per second of its CPU, at least its req/s on CPU 0
    (nginx may not fill the core when wrk is the limit). Both nodes and nginx share CPU 0, so
    the raw "all nodes' req/s ÷ 2" (``ratio_per_node``, kept beside it) is halved by the
    sharing, not by the nodes, and moves with whatever else runs on that core."""
    port = system.entry_port
    wrk(f"http://{HOST}:{port}/v1/chatrooms", 1)  # warm the caches and keep-alive pools
    nginx_pids = system.nginx.pids() if system.nginx else []
    n0 = cpu_seconds(nginx_pids)
    ngx = wrk(f"http://{HOST}:{port}/nginx-health", seconds)
    nginx_cpu = cpu_seconds(nginx_pids) - n0
    servers = system.server_pids()
    c0 = cpu_seconds(servers)
    api = wrk(f"http://{HOST}:{port}/v1/chatrooms", seconds)
    cpu = cpu_seconds(servers) - c0
    res: dict[str, Any] = {
        "nginx_return_200": ngx,
        "chatrooms": api,
        "nodes": system.nodes,
        "node_cpu_s": cpu,
        "nginx_cpu_s": nginx_cpu,
    }
    if api.get("rps") and ngx.get("rps") and api.get("requests") and cpu > 0:
        res["per_node_rps"] = api["rps"] / system.nodes
        res["ratio_per_node"] = res["per_node_rps"] / ngx["rps"]
        res["node_cpu_us_per_request"] = cpu / api["requests"] * 1e6
        res["rps_per_node_cpu"] = api["requests"] / cpu
        nginx_per_cpu = ngx["requests"] / nginx_cpu if ngx.get("requests") and nginx_cpu else 0
        res["nginx_rps_per_cpu"] = max(ngx["rps"], nginx_per_cpu)
        res["ratio_per_node_cpu"] = res["rps_per_node_cpu"] / res["nginx_rps_per_cpu"]
        if ngx.get("requests"):
            res["nginx_cores"] = nginx_cpu / (ngx["requests"] / ngx["rps"])
    return res


# -- report ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    def cmd(*argv: str) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
            return (out.stdout or out.stderr).strip()
        except OSError:
            return ""

    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    pkgs = {}
    for name in ("picows", "websockets", "python-socketio", "uvicorn", "redis"):
        try:
            from importlib.metadata import version

            pkgs[name] = version(name)
        except Exception:
            pkgs[name] = "?"
    chatnode_py = ROOT / ".venv" / "bin" / "python"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "chatnode_deps": cmd(
            str(chatnode_py),
            "-c",
            "import importlib.metadata as m; print(', '.join(f'{p} '+m.version(p) "
            "for p in ('trio','wsproto','h11','hiredis','elasticsearch')))",
        ),
        "nginx": cmd("nginx", "-v").replace("nginx version: ", ""),
        "redis": cmd("redis-server", "--version").split(" sha=")[0],
        "libwebsockets": cmd("dpkg-query", "-W", "-f=${Version}", "libwebsockets-test-server"),
        "bench_packages": pkgs,
        "server_cpus": sorted(SERVER_CPUS),
        "loadgen_cpus": sorted(LOADGEN_CPUS),
        "git": cmd("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"),
    }


def code_state() -> dict[str, Any]:
    """The chatnode code measured: HEAD and a hash of uncommitted changes under chatnode/."""

    def git(*argv: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(ROOT), *argv], capture_output=True, text=True, timeout=30, check=False
        )
        return out.stdout

    import hashlib

    diff = git("diff", "HEAD", "--", "chatnode")
    return {
        "head": git("rev-parse", "--short", "HEAD").strip(),
        # what is compared before and after a run: a commit of docs alone changes HEAD only
        "tree": git("rev-parse", "--short", "HEAD:chatnode").strip(),
        "dirty_files": [
            line[3:] for line in git("status", "--porcelain", "--", "chatnode").splitlines()
        ],
        "diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def headline_step(agg: dict[str, dict[str, Any]], names: list[str], steps: list[int]) -> int:
    """The highest offered load every system of the comparison ran cleanly within the p99
    limit; else the lowest step."""
    best = steps[0]
    for offered in steps:
        ok = True
        for n in names:
            st = agg.get(n, {}).get("steps", {}).get(offered, {})
            if (
                not st.get("rounds")
                or st.get("p99_ms") is None
                or st["p99_ms"] > P99_LIMIT_MS
                or st["lost"]
                or st["dups"]
                or st["reorders"]
            ):
                ok = False
        if ok:
            best = offered
    return best


def figures(
    agg: dict[str, Any], extras: dict[str, Any], mode_name: str, steps: list[int]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def cpu(name: str, offered: int) -> float | None:
        return agg.get(name, {}).get("steps", {}).get(offered, {}).get("cpu_us_per_delivery")

    def row(figure: str, target: str, value: str, met: bool | None, note: str = "") -> None:
        rows.append(
            {
                "figure": figure,
                "target": target,
                "value": value,
                "met": "met" if met else ("not met" if met is False else "not measured"),
                "note": note,
            }
        )

    cl = ["chatnode-cluster", "websockets-ref", "python-socketio"]
    if all(n in agg for n in cl):
        h = headline_step(agg, cl, steps)
        ours, ws, sio = cpu(cl[0], h), cpu(cl[1], h), cpu(cl[2], h)
        r1, r2 = ratio(ours, ws), ratio(ours, sio)
        row(
            "server CPU per delivery, cluster vs websockets-ref",
            f"<= {TARGETS['cpu_vs_websockets']}x",
            f"{fmt(ours)} vs {fmt(ws)} us = {fmt(r1, 2)}x",
            None if r1 is None else r1 <= TARGETS["cpu_vs_websockets"],
            f"at {h}/s offered",
        )
        row(
            "server CPU per delivery, cluster vs python-socketio",
            f"<= {TARGETS['cpu_vs_socketio']}x",
            f"{fmt(ours)} vs {fmt(sio)} us = {fmt(r2, 2)}x",
            None if r2 is None else r2 <= TARGETS["cpu_vs_socketio"],
            f"at {h}/s offered",
        )
    else:
        row(
            "server CPU per delivery, cluster comparison",
            "<= 1.0x ws-ref, <= 0.33x socketio",
            "-",
            None,
            "a system of the comparison did not run",
        )
    sn = ["chatnode-single", "libwebsockets"]
    if all(n in agg for n in sn):
        h = headline_step(agg, sn, steps)
        ours, lws = cpu(sn[0], h), cpu(sn[1], h)
        r = ratio(ours, lws)
        row(
            "server CPU per delivery, single node vs libwebsockets",
            f"<= {TARGETS['cpu_single_vs_lws']}x",
            f"{fmt(ours)} vs {fmt(lws)} us = {fmt(r, 2)}x",
            None if r is None else r <= TARGETS["cpu_single_vs_lws"],
            f"at {h}/s offered, 3 rooms",
        )
    else:
        row(
            "server CPU per delivery, single node vs libwebsockets",
            "<= 1.5x",
            "-",
            None,
            "a system of the comparison did not run",
        )
    if "chatnode-cluster" in agg:
        k = agg["chatnode-cluster"]["knee"]
        kb = agg["chatnode-cluster"]["knee_is_lower_bound"]
        wk = agg.get("websockets-ref", {}).get("knee")
        wkb = agg.get("websockets-ref", {}).get("knee_is_lower_bound")
        value = f"{'>= ' if kb else ''}{k}/s (websockets-ref {'>= ' if wkb else ''}{wk}/s)"
        if k >= TARGETS["knee_min"] and (wk is None or k >= wk or kb):
            met: bool | None = True
        elif kb and k < TARGETS["knee_min"]:
            met = None  # the steps stopped below the target: not measured
        else:
            met = False
        row(
            "knee (p99 <= 100 ms, zero loss), cluster through nginx",
            f">= {TARGETS['knee_min']}/s and >= websockets-ref",
            value,
            met,
            f"steps {steps}"
            + (" (quick mode stops at 5k: run --full)" if mode_name == "quick" else ""),
        )
    idle = extras.get("idle", {})
    if idle.get("kib_per_connection") is not None:
        v = idle["kib_per_connection"]
        peers = ", ".join(
            f"{n} {fmt(d.get('kib_per_connection'))}"
            for n, d in extras.get("idle_peers", {}).items()
        )
        row(
            "memory per idle connection",
            f"<= {TARGETS['idle_kib']} KiB",
            f"{v:.1f} KiB",
            v <= TARGETS["idle_kib"],
            f"{idle['per_node']} per node x {idle['nodes']} nodes"
            + (f"; peers, KiB: {peers}" if peers else ""),
        )
    else:
        row("memory per idle connection", "<= 10 KiB", "-", None, extras.get("error", ""))
    rest = extras.get("rest", {})
    if rest.get("ratio_per_node_cpu") is not None:
        ngx = rest["nginx_return_200"]
        row(
            "GET /v1/chatrooms through nginx, per node process",
            f">= {TARGETS['rest_ratio']}x nginx return 200",
            f"{rest['rps_per_node_cpu']:.0f} vs {rest['nginx_rps_per_cpu']:.0f} req per CPU-second"
            f" = {rest['ratio_per_node_cpu']:.3f}x",
            rest["ratio_per_node_cpu"] >= TARGETS["rest_ratio"],
            f"per CPU-second: nodes' requests ÷ their CPU ({fmt(rest['node_cpu_us_per_request'], 0)}"
            f" us/request, /proc) vs nginx's (its req/s at least); raw, with both nodes and nginx"
            f" on CPU 0: all nodes {rest['chatrooms']['rps']:.0f} req/s, per node"
            f" {rest['per_node_rps']:.0f} = {rest['ratio_per_node']:.3f}x nginx's"
            f" {ngx['rps']:.0f} req/s (nginx used {fmt(rest.get('nginx_cores'), 2)} cores);"
            f" p99 {fmt(rest['chatrooms'].get('p99_ms'))} ms",
        )
    else:
        row(
            "GET /v1/chatrooms through nginx, per node process",
            ">= 0.05x",
            "-",
            None,
            str(rest.get("chatrooms", {}).get("error", "")),
        )
    join = extras.get("join", {})
    for key, label, tkey in (
        ("room_log", "Redis room log", "join_log_p99_ms"),
        ("elasticsearch", "Elasticsearch", "join_es_p99_ms"),
    ):
        j = join.get(key, {})
        p99 = j.get("latency_ms", {}).get("p99")
        if p99 is not None:
            row(
                f"join with 100 messages of history, from the {label}",
                f"p99 <= {TARGETS[tkey]:.0f} ms",
                f"p99 {p99:.1f} ms (p50 {j['latency_ms']['p50']:.1f})",
                p99 <= TARGETS[tkey] and j.get("failures", 0) == 0,
                f"room with {join['archived_messages']} archived",
            )
        else:
            row(
                f"join with 100 messages of history, from the {label}",
                f"p99 <= {TARGETS[tkey]:.0f} ms",
                "-",
                None,
            )
    s = extras.get("search", {})
    if s.get("added_p50_ms") is not None:
        row(
            "search through the API vs straight to Elasticsearch",
            f"<= {TARGETS['search_added_p50_ms']:.0f} ms added at p50",
            f"+{s['added_p50_ms']:.2f} ms ({s['api_p50_ms']:.2f} vs {s['es_p50_ms']:.2f})",
            s["added_p50_ms"] <= TARGETS["search_added_p50_ms"] and not s["errors"],
        )
    else:
        row(
            "search through the API vs straight to Elasticsearch", "<= 2 ms added at p50", "-", None
        )
    a = extras.get("archiver", {})
    if a.get("ratio_vs_raw") is not None:
        row(
            "archiver indexing rate vs Elasticsearch raw bulk",
            f">= {TARGETS['archiver_ratio']}x",
            f"{a['docs_per_s']:.0f} vs {a['raw_docs_per_s']:.0f} docs/s = "
            f"{a['ratio_vs_raw']:.2f}x"
            + (
                f" (median of {len(a['rounds'])} rounds: "
                + ", ".join(f"{x:.2f}x" for x in a["ratio_vs_raw_rounds"])
                + ")"
                if len(a.get("rounds", [])) > 1
                else ""
            )
            + f"; ES {extras['es_raw_bulk']['streams']} streams"
            f" (in ES afterwards: {a['indexed']} of {a['messages']})"
            + (
                f"; until 2026-12-07's method (5-95 % window vs raw runs never refreshed): "
                f"{statistics.median(old):.2f}x"
                if (
                    old := [
                        r["window_ratio_vs_raw_unrefreshed"]
                        for r in a.get("rounds", [])
                        if "window_ratio_vs_raw_unrefreshed" in r
                    ]
                )
                else ""
            ),
            a["ratio_vs_raw"] >= TARGETS["archiver_ratio"] and a["indexed"] >= a["messages"],
        )
    else:
        row("archiver indexing rate vs Elasticsearch raw bulk", ">= 0.8x", "-", None)
    return rows


def integrity_row(agg: dict[str, Any]) -> dict[str, Any]:
    bad = []
    for name, a in agg.items():
        for offered, st in a["steps"].items():
            if st.get("rounds") and (st["lost"] or st["dups"] or st["reorders"]):
                bad.append(
                    f"{name}@{offered}: lost {st['lost']} dup {st['dups']} reord {st['reorders']}"
                )
    ours_bad = [b for b in bad if b.startswith("chatnode")]
    return {
        "figure": "loss / duplication / reordering (every step)",
        "target": "0",
        "value": "0 for chatnode" if not ours_bad else "; ".join(ours_bad),
        "met": "met" if not ours_bad else "not met",
        "note": ("peers: " + "; ".join(b for b in bad if not b.startswith("chatnode")))
        if len(bad) > len(ours_bad)
        else "peers: 0",
    }


def markdown(result: dict[str, Any]) -> str:
    lines = []
    m = result["machine"]
    code = result.get("code", {})
    state = f"commit {code.get('head', m['git'])}" + (
        f" + uncommitted changes to {', '.join(code['dirty_files'])} (diff {code['diff_sha1']})"
        if code.get("dirty_files")
        else ""
    )
    lines.append(
        f"Run: `bench/run --{result['mode']}` on {result['date']} ({state}); "
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}; "
        f"servers pinned to CPU {m['server_cpus']}, load generator to CPU "
        f"{m['loadgen_cpus']}; nginx reaches the processes behind it over "
        f"{'Unix sockets' if result['settings'].get('upstream', 'tcp') == 'unix' else 'TCP'}."
    )
    lines.append("")
    lines.append("| figure | target | measured | |")
    lines.append("|---|---|---|---|")
    for r in result["figures"]:
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['figure']} | {r['target']} | {r['value']}{note} | {r['met']} |")
    lines.append("")
    lines.append(
        "Fan-out per offered load (medians over rounds; CPU = server processes' "
        "utime+stime ÷ deliveries; infra = nginx + Redis):"
    )
    lines.append("")
    lines.append(
        "| system | offered deliveries/s | p50 ms | p99 ms | server CPU µs/delivery | "
        "+ infra µs | lost / dup / reord | load gen CPU | other CPU |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, a in result["fanout"].items():
        for offered, st in a["steps"].items():
            if not st.get("rounds"):
                lines.append(
                    f"| {name} | {offered} | - | - | - | - | {st.get('skipped', '')} | - | - |"
                )
                continue
            lines.append(
                f"| {name} | {offered} | {fmt(st['p50_ms'])} | {fmt(st['p99_ms'])} | "
                f"{fmt(st['cpu_us_per_delivery'])} | {fmt(st['infra_cpu_us_per_delivery'])} | "
                f"{st['lost']} / {st['dups']} / {st['reorders']} | "
                f"{st['loadgen_util'] * 100:.0f}% | {st['foreign_util'] * 100:.0f}% |"
            )
    lines.append("")
    knees = ", ".join(
        f"{n} {'>= ' if a['knee_is_lower_bound'] else ''}{a['knee']}/s"
        for n, a in result["fanout"].items()
    )
    be = [
        f"{fmt(st['backend_cpu_us_per_delivery'])} µs at {o}/s"
        for o, st in result["fanout"].get("chatnode-cluster", {}).get("steps", {}).items()
        if st.get("rounds")
    ]
    lines.append(
        f'Knees (p99 ≤ 100 ms, zero loss): {knees}. "other CPU": the busiest '
        "round's CPU of processes outside the benchmark (a noisy neighbour), in % of "
        "one core."
        + (
            f" Elasticsearch + MariaDB (unpinned, archiver and directory of "
            f"chatnode's cluster): {', '.join(be)} per delivery."
            if be
            else ""
        )
    )
    if result.get("missing"):
        lines.append("")
        lines.append("Missing from this run: " + "; ".join(result["missing"]) + ".")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, grid = plt.subplots(2, 2, figsize=(11, 8), sharex="col")
    groups = [
        (
            "cluster: 10 rooms x 100, 2 processes behind nginx + Redis",
            ["chatnode-cluster", "websockets-ref", "python-socketio"],
        ),
        ("single node: 3 rooms x 100, direct", ["chatnode-single", "libwebsockets"]),
    ]
    styles = {
        "chatnode-cluster": "o-",
        "chatnode-single": "o-",
        "websockets-ref": "s--",
        "python-socketio": "^--",
        "libwebsockets": "d--",
    }
    for col, (title, names) in enumerate(groups):
        for row_i, (key, label) in enumerate(
            (
                ("p99_ms", "p99 latency, ms (log)"),
                ("cpu_us_per_delivery", "server CPU, µs per delivery (log)"),
            )
        ):
            ax = grid[row_i][col]
            for n in names:
                a = result["fanout"].get(n)
                if not a:
                    continue
                xs, ys = [], []
                for offered, st in sorted(a["steps"].items(), key=lambda kv: int(kv[0])):
                    if st.get("rounds") and st.get(key) is not None:
                        xs.append(int(offered))
                        ys.append(max(st[key], 0.1))
                if xs:
                    ax.plot(xs, ys, styles.get(n, "o-"), label=n)
            if key == "p99_ms":
                ax.axhline(P99_LIMIT_MS, color="grey", lw=0.8, ls=":")
                ax.set_title(title, fontsize=9)
            else:
                ax.set_xlabel("offered deliveries/s (log)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_ylabel(label, fontsize=8)
            ax.grid(True, which="both", lw=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"chatnode fan-out benchmark ({result['mode']}, {result['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="1k and 5k deliveries/s, 1 round (default)")
    g.add_argument("--full", action="store_true", help="1k..40k deliveries/s, 3 rounds")
    parser.add_argument(
        "--systems",
        help="comma list (default: all): chatnode-cluster, "
        "websockets-ref, python-socketio, chatnode-single, libwebsockets",
    )
    parser.add_argument("--no-extras", action="store_true", help="fan-out only")
    parser.add_argument(
        "--extras",
        help=f"comma list of the extras to run (default: all): {', '.join(EXTRAS)}",
    )
    parser.add_argument("--rounds", type=int, help="override the mode's rounds")
    parser.add_argument(
        "--steps", help="override the mode's offered loads: comma list of deliveries/s"
    )
    parser.add_argument("--replot", metavar="JSON", help="only redraw the PNG of a results JSON")
    parser.add_argument(
        "--mysql-url",
        default=os.environ.get(
            "BENCH_MYSQL_URL", "mysql://chatnode:chatnode@127.0.0.1:33061/chatnode_bench"
        ),
    )
    parser.add_argument(
        "--es-url", default=os.environ.get("BENCH_ES_URL", "http://127.0.0.1:19200")
    )
    parser.add_argument("--prefix", default="chatnodebench")
    parser.add_argument(
        "--output", default=str(RESULTS / "latest"), help="path stem of the .json/.md/.png results"
    )
    args = parser.parse_args()
    if args.replot:
        src = Path(args.replot)
        plot(json.loads(src.read_text()), src.with_suffix(".png"))
        return 0
    mode_name = "full" if args.full else "quick"
    mode = dict(MODES[mode_name])
    if args.rounds:
        mode["rounds"] = args.rounds
    if args.steps:
        mode["steps"] = [int(x) for x in args.steps.split(",")]
    only = frozenset(args.extras.split(",")) if args.extras else frozenset(EXTRAS)
    if only - set(EXTRAS):
        raise SystemExit(f"unknown extras: {sorted(only - set(EXTRAS))}")
    wanted = (
        [s for s in args.systems.split(",") if s != "none"]
        if args.systems
        else [
            "chatnode-cluster",
            "websockets-ref",
            "python-socketio",
            "chatnode-single",
            "libwebsockets",
        ]
    )

    os.sched_setaffinity(0, LOADGEN_CPUS)  # the orchestrator stays off the servers' core
    nofile = raise_nofile()
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    log(
        f"mode {mode_name}: steps {mode['steps']}, {mode['rounds']} round(s), systems {wanted}; "
        f"nofile {nofile}"
    )

    code_at_start = code_state()
    redis = Redis()
    redis.start()
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in wanted}
    errors: dict[str, str] = {}
    extras: dict[str, Any] = {}
    try:
        cluster_probe = ChatnodeCluster(redis, args.mysql_url, args.es_url, args.prefix)
        if "chatnode-cluster" in wanted or not args.no_extras:
            cluster_probe.migrate()

        def make(name: str) -> tuple[System, dict[str, int]]:
            if name == "chatnode-cluster":
                return ChatnodeCluster(
                    redis, args.mysql_url, args.es_url, args.prefix
                ), CLUSTER_WORKLOAD
            if name == "websockets-ref":
                return WebsocketsRef(redis), CLUSTER_WORKLOAD
            if name == "python-socketio":
                return SocketIO(redis), CLUSTER_WORKLOAD
            if name == "chatnode-single":
                return ChatnodeSingle(), SINGLE_WORKLOAD
            if name == "libwebsockets":
                return Libwebsockets(), SINGLE_WORKLOAD
            raise SystemExit(f"unknown system {name}")

        for rnd in range(mode["rounds"] if wanted else 0):
            order = wanted[rnd % len(wanted) :] + wanted[: rnd % len(wanted)]
            log(f"round {rnd + 1}/{mode['rounds']}: {order}")
            for name in order:
                system, workload = make(name)
                try:
                    runs[name].append(run_fanout(system, workload, mode))
                except Exception as exc:
                    errors[f"{name} round {rnd + 1}"] = f"{type(exc).__name__}: {exc}"
                    log(f"{name}: FAILED: {exc}")
                    traceback.print_exc()
        if not args.no_extras:
            try:
                extras = run_extras(redis, args.mysql_url, args.es_url, args.prefix, mode, only)
            except Exception as exc:
                extras["error"] = f"{type(exc).__name__}: {exc}"
                log(f"extras FAILED: {exc}")
                traceback.print_exc()
    finally:
        redis.stop()

    code_at_end = code_state()
    if {k: v for k, v in code_at_end.items() if k != "head"} != {
        k: v for k, v in code_at_start.items() if k != "head"
    }:
        errors["code changed"] = (
            f"chatnode's code changed during the run ({code_at_start} -> "
            f"{code_at_end}): the figures mix versions; run again"
        )
    agg = {n: aggregate(r, mode["steps"]) for n, r in runs.items() if r}
    rows = figures(agg, extras, mode_name, mode["steps"])
    rows.insert(3, integrity_row(agg))
    missing = [r["figure"] for r in rows if r["met"] == "not measured"]
    result = {
        "mode": mode_name,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "machine": machine(),
        "code": code_at_end,
        "settings": {
            **mode,
            "cluster_workload": CLUSTER_WORKLOAD,
            "single_workload": SINGLE_WORKLOAD,
            "p99_limit_ms": P99_LIMIT_MS,
            "message_bytes": 64,
            "upstream": UPSTREAM,
            "targets": TARGETS,
        },
        "figures": rows,
        "fanout": agg,
        "extras": extras,
        "errors": errors,
        "missing": missing,
        "raw_runs": runs,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(out.with_suffix(".json"))
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    try:
        plot(result, out.with_suffix(".png"))
    except Exception as exc:
        log(f"plot failed: {exc}")
    print(md)
    if errors:
        print("Errors:", json.dumps(errors, indent=1))
    log(f"done in {result['elapsed_s']:.0f}s: {out.with_suffix('.json')}, .md, .png")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
