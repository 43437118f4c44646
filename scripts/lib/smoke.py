"""Smoke checks for the services started by `scripts/services up`.

Run with `scripts/services smoke` (which exports the CHATNODE_TEST_* URLs and picks the
repo's .venv python). Everything runs under **trio** to prove the clients chatnode uses work
there:

* Redis through chatnode's own client (``chatnode.adapters.redis``): set/get, pub/sub round
  trip, a Lua script.
* Elasticsearch 9 through ``AsyncElasticsearch(node_class="httpxasync", retry_backoff_base=0)``:
  create index, bulk 3 docs, refresh, search, delete index.
* MariaDB through the ``mariadb`` CLI as the chatnode user over TCP, including creating and
  dropping a per-run ``chatnode_test_<random>`` database.

Exit status 0 when every check passed; prints one line per check.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import uuid
from urllib.parse import urlsplit

import trio

RESULTS: list[tuple[str, bool, str]] = []


def record(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}{'  -- ' + detail if detail else ''}", flush=True)


async def check(name: str, fn) -> None:
    t0 = time.monotonic()
    try:
        with trio.fail_after(60):
            detail = await fn()
        record(name, True, f"{detail or ''} ({time.monotonic() - t0:.2f}s)".strip())
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        traceback.print_exc()
        record(name, False, repr(exc))


# --------------------------------------------------------------------------- redis
async def redis_checks(url: str) -> None:
    from chatnode.adapters.redis import RespClient
    from chatnode.adapters.redis.client import Script

    suffix = uuid.uuid4().hex[:8]

    async def basic() -> str:
        async with RespClient.from_url(url) as client:
            key = f"smoke:{suffix}:str"
            assert await client.call("SET", key, "héllo", "EX", 60) == b"OK"
            got = await client.call("GET", key)
            assert got == "héllo".encode(), got
            await client.call("SET", key, b"\x00\xff")
            raw = await client.call("GET", key)
            assert raw == b"\x00\xff", raw
            assert await client.call("INCR", f"smoke:{suffix}:n") == 1
            await client.call("DEL", key, f"smoke:{suffix}:n")
            return f"get -> {got!r}, {raw!r}"

    async def pubsub_roundtrip() -> str:
        channel = f"smoke:{suffix}:chan"
        async with RespClient.from_url(url) as client:
            conn = await client.connect()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.write_forever)
                    conn.send_nowait("SUBSCRIBE", channel)
                    pushes = await conn.receive()
                    assert pushes[0] == [b"subscribe", channel.encode(), 1], pushes
                    receivers = await client.call("PUBLISH", channel, "ping-1")
                    pushes = await conn.receive()
                    assert pushes == [[b"message", channel.encode(), b"ping-1"]], pushes
                    nursery.cancel_scope.cancel()
            finally:
                await conn.aclose()
            return f"publish reached {receivers} subscriber(s)"

    async def lua() -> str:
        async with RespClient.from_url(url) as client:
            key = f"smoke:{suffix}:lua"
            script = Script(
                f"-- {suffix}\nlocal v = redis.call('INCRBY', KEYS[1], ARGV[1]); return {{v, ARGV[2]}}"
            )
            r1 = await script.run(client, [key], [2, "tag"])  # NOSCRIPT, then EVAL
            r2 = await script.run(client, [key], [1, "again"])  # EVALSHA
            assert r1 == [2, b"tag"] and r2 == [3, b"again"], (r1, r2)
            await client.call("DEL", key)
            return f"script -> {r1!r}, {r2!r}"

    await check("redis: set/get", basic)
    await check("redis: pub/sub round trip", pubsub_roundtrip)
    await check("redis: Lua script (EVALSHA, EVAL)", lua)


# --------------------------------------------------------------------------- elasticsearch
async def es_checks(url: str) -> None:
    from elasticsearch import AsyncElasticsearch
    from elasticsearch.helpers import async_bulk

    index = f"chatnode-smoke-{uuid.uuid4().hex[:8]}"

    async def crud() -> str:
        # retry_backoff_base=0: a non-zero backoff would call asyncio.sleep (fails on trio).
        es = AsyncElasticsearch(url, node_class="httpxasync", retry_backoff_base=0,
                                request_timeout=30)
        try:
            health = await es.cluster.health(wait_for_status="yellow", timeout="30s")
            await es.indices.create(
                index=index,
                settings={"number_of_shards": 1, "number_of_replicas": 0},
                mappings={"properties": {"room": {"type": "keyword"}, "text": {"type": "text"},
                                         "ts": {"type": "date"}}},
            )
            ops = []
            for i, text in enumerate(["hello trio world", "hello chat", "goodbye"]):
                ops.append({"index": {"_index": index, "_id": str(i)}})
                ops.append({"room": "lobby", "text": text, "ts": 1_700_000_000_000 + i})
            resp = await es.bulk(operations=ops)
            assert not resp["errors"], resp
            await es.indices.refresh(index=index)
            hits = await es.search(index=index, query={"match": {"text": "hello"}}, sort=[{"ts": "asc"}])
            ids = [h["_id"] for h in hits["hits"]["hits"]]
            assert hits["hits"]["total"]["value"] == 2 and ids == ["0", "1"], hits
            count = (await es.count(index=index))["count"]
            assert count == 3, count
            # helpers.async_bulk also works on trio (its backoff sleep is trio-aware)
            ok, errs = await async_bulk(es, ({"_index": index, "_id": f"h{i}", "text": "x"} for i in range(3)),
                                        refresh="wait_for")
            assert ok == 3 and not errs, (ok, errs)
            info = await es.cluster.health()
            return f"health={health['status']} bulk=3 search hits={ids} async_bulk={ok} nodes={info['number_of_nodes']}"
        finally:
            try:
                await es.indices.delete(index=index, ignore_unavailable=True)
            finally:
                await es.close()

    await check("elasticsearch: create/bulk/refresh/search", crud)


# --------------------------------------------------------------------------- mariadb
async def mysql_checks(url: str) -> None:
    u = urlsplit(url)
    cli = os.environ.get("CHATNODE_MYSQL_CLI") or "mariadb"
    base = [cli, "--no-defaults", "--protocol=tcp", "-h", u.hostname or "127.0.0.1",
            "-P", str(u.port or 3306), "-u", u.username or "", f"-p{u.password or ''}", "-N", "-B"]
    testdb = f"chatnode_test_{uuid.uuid4().hex[:8]}"

    async def run_sql(sql: str, db: str = "") -> str:
        cmd = base + ["-e", sql] + ([db] if db else [])
        proc = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:6])} ... failed: {proc.stderr.decode().strip()}")
        return proc.stdout.decode().strip()

    async def connect() -> str:
        dbname = u.path.lstrip("/")
        out = await run_sql("SELECT CONCAT(VERSION(), ' ', CURRENT_USER(), ' ', @@character_set_server)", dbname)
        return out

    async def per_run_db() -> str:
        await run_sql(f"CREATE DATABASE `{testdb}`")
        try:
            await run_sql("CREATE TABLE t (id INT PRIMARY KEY, s VARCHAR(20)); "
                          "INSERT INTO t VALUES (1, 'héllo 🎉'); SELECT s FROM t", testdb)
            out = await run_sql("SELECT s FROM t WHERE id = 1", testdb)
            assert out == "héllo 🎉", out
        finally:
            await run_sql(f"DROP DATABASE IF EXISTS `{testdb}`")
        return f"created/dropped {testdb}, utf8mb4 round trip ok"

    await check("mariadb: connect as chatnode over TCP", connect)
    await check("mariadb: per-run test database", per_run_db)


async def main() -> int:
    wanted = set(sys.argv[1:]) or {"mariadb", "redis", "elasticsearch"}
    if "redis" in wanted:
        await redis_checks(os.environ["CHATNODE_TEST_REDIS_URL"])
    if "elasticsearch" in wanted or "es" in wanted:
        await es_checks(os.environ["CHATNODE_TEST_ES_URL"])
    if "mariadb" in wanted or "mysql" in wanted:
        await mysql_checks(os.environ["CHATNODE_TEST_MYSQL_URL"])
    failed = sum(1 for _, ok, _ in RESULTS if not ok)
    print(f"smoke: {len(RESULTS) - failed} of {len(RESULTS)} checks ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
