"""Smoke checks for the services started by `scripts/services up`.

Run with `scripts/services smoke` (which exports the CHATNODE_TEST_* URLs and picks the
repo's .venv python). Everything runs under **trio** to prove the clients chatnode uses work
there:

* Redis through coredis (anyio-based, so it runs on trio natively): set/get, pub/sub round
  trip, Lua via ``eval`` and ``register_script``, ``decode_responses`` on and off.
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


# --------------------------------------------------------------------------- redis / coredis
async def redis_checks(url: str) -> None:
    import coredis

    suffix = uuid.uuid4().hex[:8]

    async def basic_str() -> str:
        # from_url() only builds the client; connections are opened inside `async with`.
        client = coredis.Redis.from_url(url, decode_responses=True)
        async with client:
            key = f"smoke:{suffix}:str"
            assert await client.set(key, "héllo", ex=60) is True
            got = await client.get(key)
            assert got == "héllo", got
            assert await client.incr(f"smoke:{suffix}:n") == 1
            await client.delete([key, f"smoke:{suffix}:n"])  # keys are passed as a list
            return f"get -> {got!r} (str, decode_responses=True)"

    async def basic_bytes() -> str:
        client = coredis.Redis.from_url(url)  # decode_responses defaults to False
        async with client:
            key = f"smoke:{suffix}:bytes"
            await client.set(key, b"\x00\xff")
            got = await client.get(key)
            assert got == b"\x00\xff", got
            await client.delete([key])
            return f"get -> {got!r} (bytes, default)"

    async def pubsub_roundtrip() -> str:
        channel = f"smoke:{suffix}:chan"
        client = coredis.Redis.from_url(url, decode_responses=True)
        async with client:
            # PubSub is itself an async context manager (it runs a reader task in its own
            # task group); subscribe() returns once the server acknowledged the subscription.
            async with client.pubsub(ignore_subscribe_messages=True) as ps:
                await ps.subscribe(channel)
                receivers = await client.publish(channel, "ping-1")
                # GOTCHA: get_message() takes ONE item off the queue; the subscribe ack is
                # such an item and, when ignored, comes back as None. Loop until a message.
                skipped = 0
                with trio.fail_after(5):
                    while (msg := await ps.get_message()) is None:
                        skipped += 1
                assert msg["data"] == "ping-1", msg
                assert msg["channel"] == channel and msg["type"] == "message", msg

                # the same subscription consumed as an async iterator from a trio task
                got: list[str] = []

                async def consume() -> None:
                    async for m in ps:
                        got.append(m["data"])
                        if len(got) == 2:
                            return

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(consume)
                    await client.publish(channel, "ping-2")
                    await client.publish(channel, "ping-3")
                assert got == ["ping-2", "ping-3"], got
                await ps.unsubscribe(channel)
            return (f"publish reached {receivers} subscriber(s); get_message returned None "
                    f"{skipped}x (ignored subscribe ack) before the message; async-for ok")

    async def pubsub_pattern_handler() -> str:
        received = trio.Event()
        seen: list[object] = []

        def handler(message) -> None:  # sync or async callables are accepted
            seen.append(message["data"])
            received.set()

        client = coredis.Redis.from_url(url, decode_responses=True)
        async with client, client.pubsub(
            ignore_subscribe_messages=True,
            pattern_handlers={f"smoke:{suffix}:p.*": handler},
        ) as ps:
            assert ps.subscribed
            await client.publish(f"smoke:{suffix}:p.x", "via-pattern")
            with trio.fail_after(5):
                await received.wait()
        assert seen == ["via-pattern"], seen
        return "psubscribe with a callback handler ok"

    async def lua() -> str:
        client = coredis.Redis.from_url(url, decode_responses=True)
        async with client:
            key = f"smoke:{suffix}:lua"
            r1 = await client.eval(
                "return redis.call('INCRBY', KEYS[1], ARGV[1])", keys=[key], args=[5]
            )
            assert r1 == 5, r1
            script = client.register_script(
                "local v = redis.call('INCRBY', KEYS[1], ARGV[1]); return {v, ARGV[2]}"
            )
            r2 = await script(keys=[key], args=[2, "tag"])  # EVALSHA, falls back to EVAL
            r3 = await script(keys=[key], args=[1, "again"])
            assert r2 == [7, "tag"] and r3 == [8, "again"], (r2, r3)
            await client.delete([key])
            return f"eval -> {r1!r}; register_script -> {r2!r}, {r3!r}"

    async def pipeline() -> str:
        client = coredis.Redis.from_url(url, decode_responses=True)
        async with client:
            key = f"smoke:{suffix}:pipe"
            async with client.pipeline(transaction=True) as pipe:
                r_set = pipe.set(key, "1")
                r_incr = pipe.incr(key)
                pipe.expire(key, 60)
            # results are awaited after the block executed the pipeline
            assert await r_set is True and await r_incr == 2
            await client.delete([key])
            return "pipeline (MULTI/EXEC) ok"

    await check("redis: set/get (decode_responses=True)", basic_str)
    await check("redis: set/get bytes", basic_bytes)
    await check("redis: pub/sub round trip", pubsub_roundtrip)
    await check("redis: pattern subscription with handler", pubsub_pattern_handler)
    await check("redis: Lua eval + register_script", lua)
    await check("redis: pipeline", pipeline)


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
