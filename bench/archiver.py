"""Archiver catch-up against Elasticsearch's own bulk rate.

The real cluster's archiver catches up a backlog in rounds. Each round's backlog is built in
a scratch stream, then RENAMEd onto the archive stream at once (and the reading node's
blocked XREAD released with CLIENT UNBLOCK), so the archiver starts on a whole backlog, after
both nodes are up and settled. One node reads the stream at a time (its lease); the other
waits. Each round indexes into a fresh index. The figure is the whole round, timed like a raw
run: from the RENAME until every document was acknowledged and then searchable.

The reference is ES's own bulk rate for the same documents, in the archiver's shape: as many
concurrent streams of ARCHIVER_BATCH-document bulks as the archiver keeps in flight (4), into
a scratch index with the same template, right before each round (after its fill) and once
after the last. ES's rate moves with its own background work and the machine's other users,
so a round is compared with the mean of the raw runs before and after it. The bodies are
built before the clock starts, so the figure is Elasticsearch's rate, not this Python
client's. The 2-stream rate is recorded too (``es_raw_bulk_2_streams``).

Why the method is what it is (the figures are in docs/benchmarks.md, "Method and changes"):
the backlog is 300,000 documents so that a round lasts several refresh intervals; both
sides are timed until searchable; the raw run goes between the fill and the catch-up; a
discarded warm-up round comes first.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from typing import Any

import redis as redis_py
from common import backend_pids, cpu_seconds, log, machine_busy_s
from esclient import EsClient, index_work
from systems import HOST, ChatnodeCluster, Redis

ARCHIVER_BATCH = 1000
"""chatnode's ``Archiver.batch_size``: the documents of one bulk request, ours and the raw
reference's."""
ARCHIVER_COPIES = 3
"""The archiver's backlog is the history room's documents and copies of them under other
room ids (from COPY_ROOM_BASE): 300,000 in full mode. A round of the history room's 100,000
alone lasted 1.3-1.6 s, about one refresh interval of the index (1 s), so its figure was
mostly its edges; with 300,000 both sides run several intervals."""
COPY_ROOM_BASE = 2_000_000_000
IN_FLIGHT = 4
"""``Archiver.max_in_flight`` of the one node reading: the raw reference's streams."""

KEY_OF = re.compile(rb'\{"chatroom":([0-9]+),"offset":([0-9]+),')


def backlog_documents(documents: list[bytes], room: int, copies: int) -> list[bytes]:
    """The history room's ``documents`` and ``copies - 1`` copies under other room ids."""
    head = b'{"chatroom":%d,' % room
    return [
        document if k == 0 else document.replace(head, b'{"chatroom":%d,' % (COPY_ROOM_BASE + k), 1)
        for k in range(copies)
        for document in documents
    ]


def bulk(batch: list[bytes]) -> bytes:
    """The bulk body of ``batch`` as the archiver's ES adapter makes it."""
    parts = []
    for document in batch:
        key = KEY_OF.match(document)
        assert key is not None, document[:80]
        parts.append(b'{"create":{"_id":"%b:%b"}}\n%b\n' % (key[1], key[2], document))
    return b"".join(parts)


def bulk_bodies(backlog_docs: list[bytes]) -> list[bytes]:
    """The very documents the archiver indexes, in its batches."""
    return [
        bulk(backlog_docs[first : first + ARCHIVER_BATCH])
        for first in range(0, len(backlog_docs), ARCHIVER_BATCH)
    ]


class ArchiverRounds:
    """The catch-up rounds and raw runs over one backlog (``measure``: the archiver extra
    itself; without it one round only loads the index for join and search)."""

    def __init__(
        self,
        es: EsClient,
        es_url: str,
        prefix: str,
        redis: Redis,
        backlog_docs: list[bytes],
        bodies: list[bytes],
        measure: bool,
    ) -> None:
        self.es = es
        self.es_url = es_url
        self.prefix = prefix
        self.redis = redis
        self.index = f"{prefix}-messages"
        self.stream = f"{prefix}:archive"
        self.group_of = redis_py.Redis(host=HOST, port=redis.port, decode_responses=True)
        self.raw_redis = redis_py.Redis(host=HOST, port=redis.port)
        self.backlog_docs = backlog_docs
        self.backlog = len(backlog_docs)
        self.bodies = bodies
        self.measure = measure
        self.raw_runs: list[dict[str, Any]] = []
        self.pids: tuple[list[int], list[int], list[int]] = ([], [], [])

    def raw_bulk(self, streams: int) -> dict[str, Any]:
        es, bodies, backlog = self.es, self.bodies, self.backlog
        raw_index = f"{self.prefix}-messages-rawbulk"
        es.req("DELETE", f"/{raw_index}")
        es.req("PUT", f"/{raw_index}")
        results: list[float] = []

        def worker(part: int, parts: int) -> None:
            client = EsClient(self.es_url)
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
        # would be deleted before any refresh wrote its segment (~4 us of ES CPU per document,
        # the refresh_ms of es_index_work), work that the archiver's catch-up pays within its
        # window. The rate without the refresh is kept beside it.
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

    def raw_run(self) -> None:
        if self.measure:
            log(f"extras: Elasticsearch raw bulk, {IN_FLIGHT} streams")
            self.raw_runs.append(self.raw_bulk(IN_FLIGHT))

    def wait_for_reader(self, cluster: ChatnodeCluster) -> None:
        """Until a node of the started ``cluster`` reads the archive stream; then the pids
        whose CPU is read. They are listed once: listing a process tree reads every
        /proc/<pid>/stat (~2.5 ms), which every 10 ms would take a quarter of a core from ES."""
        deadline = time.monotonic() + 60
        while not any(c["cmd"] == "xread" for c in self.group_of.client_list()):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster's archiver never read the archive stream")
            time.sleep(0.05)
        self.pids = (cluster.server_pids(), self.redis.pids(), backend_pids())

    def catch_up(self) -> dict[str, Any]:
        """One round: the backlog onto the archive stream at once; until all acked. ES's
        raw run goes between the fill and the catch-up, so the catch-up starts on an ES as
        warm as the raw runs do (each follows a catch-up or a raw run): ES idle for the
        fill's few seconds indexed the next 100,000 documents at 17-25 us of CPU each,
        against 16-20 right after other bulks (runs of 4 streams)."""
        es, index, stream, backlog = self.es, self.index, self.stream, self.backlog
        raw_redis, group_of = self.raw_redis, self.group_of
        node_pids, redis_pids, es_pids = self.pids
        scratch = f"{stream}:next"
        raw_redis.delete(scratch)
        for first in range(0, backlog, 5000):
            pipe = raw_redis.pipeline(transaction=False)
            for document in self.backlog_docs[first : first + 5000]:
                pipe.xadd(scratch, {"d": document})
            pipe.execute()
        es.req("DELETE", f"/{index}")
        es.req("PUT", f"/{index}")  # the template (chatnode migrate) gives its mapping
        if self.measure:
            self.raw_run()  # also lets the fill's and the new index's work settle
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
                arch[f"whole_{key}_cpu_us_per_doc"] = (ended[i - 1] - started[i]) / backlog * 1e6

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
            # Steady state: from 5 % to 95 % acknowledged (recorded beside the figure).
            docs = 0.9 * backlog
            arch["window_docs_per_s"] = docs / (hi[0] - lo[0])
            # Where the CPU went, per document: the nodes, Redis, ES (+ MariaDB, idle
            # here), and the machine's busy fraction of its cores (the rest: this bench,
            # the kernel's work outside these processes, other users).
            for key, i in (("node", 1), ("redis", 2), ("es", 3)):
                arch[f"{key}_cpu_us_per_doc"] = (hi[i] - lo[i]) / docs * 1e6
            arch["machine_busy"] = (hi[4] - lo[4]) / (hi[0] - lo[0]) / os.cpu_count()
        return arch

    def run(self, rounds_wanted: int) -> list[dict[str, Any]]:
        """The rounds (a discarded warm-up round first when measuring), each compared with
        the raw runs before and after it; returns them, the warm-up in ``self.warmup``."""
        rounds: list[dict[str, Any]] = []
        self.warmup: dict[str, Any] | None = None
        if self.measure:
            # A discarded round first, its raw run with it: ES arrives here from the fan-out,
            # nearly idle, and its JIT was still warming over the first rounds (raw runs of
            # one full run: 28.9, 25.1, 22.8 and 17.9 us of ES CPU per document, 66k -> 101k
            # docs/s, in order; the round between each pair went the same way), so the first
            # round and its raw run measured a colder ES than the last.
            log("extras: archiver catch-up, warm-up round (discarded)")
            self.warmup = self.catch_up()
            self.warmup["raw_run"] = self.raw_runs.pop()
        for n in range(rounds_wanted if self.measure else 1):
            log(f"extras: archiver catch-up, round {n + 1}")
            rounds.append(self.catch_up())
        self.raw_run()
        if self.measure:
            raw_runs = self.raw_runs
            for n, one in enumerate(rounds):  # each against the raw runs before and after it
                if "docs_per_s" in one:
                    around = (raw_runs[n]["docs_per_s"] + raw_runs[n + 1]["docs_per_s"]) / 2
                    one["raw_docs_per_s"] = around
                    one["ratio_vs_raw"] = one["docs_per_s"] / around
                    # The other method, recorded beside it: the 5-95 % window against raw
                    # runs that were never refreshed.
                    unrefreshed = sum(raw_runs[k]["docs_per_s_unrefreshed"] for k in (n, n + 1))
                    if "window_docs_per_s" in one:
                        one["window_ratio_vs_raw_unrefreshed"] = one["window_docs_per_s"] / (
                            unrefreshed / 2
                        )
        return rounds

    def reload_history(self, documents: int) -> None:
        """Join and search read the history room in an index that holds it alone (the
        copies were the archiver's work only): the last round's first ``documents``, loaded
        again the raw way."""
        es, index = self.es, self.index
        es.req("DELETE", f"/{index}")
        es.req("PUT", f"/{index}")
        for body in self.bodies[: (documents + ARCHIVER_BATCH - 1) // ARCHIVER_BATCH]:
            status, answer = es.req("POST", f"/{index}/_bulk?filter_path=errors", ndjson=body)
            if status != 200 or answer.get("errors"):
                raise RuntimeError(f"reloading the history room failed: {answer}")
        es.req("POST", f"/{index}/_refresh")

    def summary(self, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        """The extras of the rounds: ``archiver`` (the median round's figures), and when
        measuring ``es_raw_bulk`` and ``es_raw_bulk_2_streams``."""
        backlog = self.backlog
        extras: dict[str, Any] = {}
        arch = {"messages": backlog, "backlog": backlog, "rounds": rounds}
        if self.warmup is not None:
            arch["warmup_round"] = self.warmup
        arch["indexed"] = min(r["indexed"] for r in rounds)
        ratios = [r["ratio_vs_raw"] for r in rounds if "ratio_vs_raw" in r]
        if ratios and len(ratios) == len(rounds):
            median = sorted(rounds, key=lambda r: r["ratio_vs_raw"])[len(rounds) // 2]
            arch.update({k: v for k, v in median.items() if k not in ("backlog", "indexed")})
            arch["ratio_vs_raw_rounds"] = ratios
        extras["archiver"] = arch
        if self.measure:
            raw_runs = self.raw_runs
            seconds = sum(r["seconds"] for r in raw_runs)
            extras["es_raw_bulk"] = {
                "docs": backlog * len(raw_runs),
                "streams": IN_FLIGHT,
                "seconds": seconds,
                "docs_per_s": backlog * len(raw_runs) / seconds,
                "ok": all(r["ok"] for r in raw_runs),
                "runs": raw_runs,
            }
            extras["es_raw_bulk_2_streams"] = self.raw_bulk(2)
        return extras
