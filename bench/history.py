"""The history extras on chatnode's cluster: a room with a long history, then the archiver's
catch-up of it (``archiver.py``), join latency (``joins.py``) and search (``search.py``)
against the real cluster."""

from __future__ import annotations

import time
from typing import Any

import redis as redis_py
from archiver import ARCHIVER_COPIES, ArchiverRounds, backlog_documents, bulk_bodies
from common import LoadGenProc, log
from esclient import EsClient
from joins import join_latency
from search import search_latency
from settings import WORDS
from systems import HOST, ChatnodeCluster, Redis


def seed_history(
    redis: Redis, mysql_url: str, prefix: str, n_hist: int
) -> tuple[int, dict[str, Any]]:
    """A history room of ``n_hist`` messages, sent while the archiver cannot reach
    Elasticsearch, so the archive stream holds them all as the bus wrote them. Returns the
    room and the seeding's figures."""
    log(f"extras: seeding {n_hist} messages of history (archiver held back)")
    seeding = ChatnodeCluster(redis, mysql_url, "http://127.0.0.1:9", prefix, tag="seed")
    seeding.start()
    room = 0
    try:
        seeding._users(["hist0", "hist1", "seeder"])
        room = seeding._rooms(1)[0]
        lg = LoadGenProc()
        try:
            url = f"ws://{HOST}:{seeding.entry_port}/v1/chatrooms/{room}/join?user=seeder"
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
            figures = {
                "messages": n_hist,
                "received": r["received"],
                "lost": r["lost"],
                "seconds": time.monotonic() - t,
            }
        finally:
            lg.close()
    finally:
        seeding.stop()
    return room, figures


def history_extras(
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

    room, extras["seed"] = seed_history(redis, mysql_url, prefix, n_hist)
    stream = f"{prefix}:archive"
    raw_redis = redis_py.Redis(host=HOST, port=redis.port)
    extras["seed"]["archive_backlog"] = int(raw_redis.xlen(stream))
    # The backlog as the bus wrote it (one document per entry), kept to fill each round; the
    # seeding's stream (never stored: ES was dead) and the lease its reader held are deleted,
    # so the cluster's archivers start on an empty stream.
    documents = [fields[b"d"] for _, fields in raw_redis.xrange(stream)]
    raw_redis.delete(stream, f"{stream}:lease")
    copies = ARCHIVER_COPIES if "archiver" in only else 1
    backlog_docs = backlog_documents(documents, room, copies)
    rounds = ArchiverRounds(
        es, es_url, prefix, redis, backlog_docs, bulk_bodies(backlog_docs), "archiver" in only
    )

    cluster = ChatnodeCluster(redis, mysql_url, es_url, prefix)
    es.req("DELETE", f"/{index}")
    cluster.migrate()
    cluster.start()
    try:
        rounds.wait_for_reader(cluster)
        done = rounds.run(mode["archiver_rounds"])
        if copies > 1:
            rounds.reload_history(len(documents))
        extras.update(rounds.summary(done))
        if "join" in only:
            extras["join"] = join_latency(cluster, redis, prefix, room, n_hist, mode)
        if "search" in only:
            extras["search"] = search_latency(cluster, es, index, room, mode)
    finally:
        cluster.stop()
    return extras
