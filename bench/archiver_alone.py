"""One archiver catching up a backlog alone: the node's CPU per archived message.

    .venv/bin/python bench/archiver_alone.py [--messages 100000] [--batch 1000]
        [--gc default|serve|off] [--null-archive] [--redis-url URL] [--es-url URL]

Seeds ``--messages`` archive documents (as ``RedisBus`` writes them) into a Redis stream under
a scratch prefix, then runs one ``Archiver`` (``RedisArchiveFeed`` + ``EsArchive``, or with
``--null-archive`` a store that only builds the bulk body) in this process until every entry
is acknowledged, and prints the rate and this process's CPU per message
(``time.process_time``). ``--gc serve`` applies ``chatnode serve``'s collector settings,
``off`` disables the collector. Runs on the project's ``.venv`` (it imports chatnode); the
defaults are ``scripts/services``' Redis and Elasticsearch (``CHATNODE_TEST_REDIS_URL``,
``CHATNODE_TEST_ES_URL``, as ``scripts/services env`` sets them). The stream, index and template
are removed at the end. The full benchmark's archiver figure is ``bench/run --full
--systems none --extras archiver`` (two nodes, against ES's raw rate); this isolates the
node's share (docs/benchmarks.md, "What limits").
"""

from __future__ import annotations

import argparse
import gc
import os
import secrets
import time
from collections.abc import Sequence

import trio

from chatnode.adapters.elasticsearch import EsArchive, bulk_body, es_client, messages_index
from chatnode.adapters.elasticsearch.migrations import migrate_elasticsearch
from chatnode.adapters.redis import RedisArchiveFeed, RespClient
from chatnode.cli import GC_YOUNG_THRESHOLD
from chatnode.core.models import ArchiveEntry, ChatMessage, DeadLetter
from chatnode.node.archiver import Archiver

SEED_CHUNK = 5000


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of ``pid`` from /proc (0 without one)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CountingFeed:
    """The feed, with an event set once ``goal`` entries were acknowledged."""

    def __init__(self, feed: RedisArchiveFeed, goal: int) -> None:
        self.feed, self.goal, self.acked, self.done = feed, goal, 0, trio.Event()

    async def take(self, *, max_count: int, wait_ms: int) -> list[ArchiveEntry]:
        return await self.feed.take(max_count=max_count, wait_ms=wait_ms)

    async def ack(self, entries: Sequence[ArchiveEntry]) -> None:
        await self.feed.ack(entries)
        self.acked += len(entries)
        if self.acked >= self.goal:
            self.done.set()

    async def keep_reading(self) -> bool:
        return await self.feed.keep_reading()

    async def release(self) -> None:
        await self.feed.release()


class NullArchive:
    """Builds each batch's bulk body and stores nothing: the node's share without ES."""

    async def store(self, documents: Sequence[bytes]) -> None:
        bulk_body(documents)
        await trio.lowlevel.checkpoint()

    async def keep_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Nothing is refused: no letters to keep."""


async def seed(redis: RespClient, stream: str, count: int) -> None:
    """XADD the documents, a chunk at a time: the client pipelines the commands of one
    scheduler pass into one write."""
    for first in range(1, count + 1, SEED_CHUNK):
        async with trio.open_nursery() as nursery:
            for offset in range(first, min(count, first + SEED_CHUNK - 1) + 1):
                message = ChatMessage(
                    7, offset, "seeder", f"~00000 {offset:09d} apple xxxxxxxxxxxx", offset
                )
                nursery.start_soon(redis.call, "XADD", stream, "*", "d", message.document)


async def main(args: argparse.Namespace) -> None:
    prefix = f"archiver-alone-{secrets.token_hex(4)}"
    redis = RespClient.from_url(args.redis_url, timeout_s=30.0)
    reads = RespClient.from_url(args.redis_url)  # the feed's blocking XREAD: its own connection
    stream = f"{prefix}:archive"
    try:
        await seed(redis, stream, args.messages)
        await migrate_elasticsearch(args.es_url, prefix)
        async with EsArchive.from_url(args.es_url, prefix=prefix) as es_archive:
            archive = NullArchive() if args.null_archive else es_archive
            feed = CountingFeed(
                RedisArchiveFeed(redis, prefix, consumer="alone", reads=reads), args.messages
            )
            archiver = Archiver(feed, archive, batch_size=args.batch)  # type: ignore[arg-type]
            if args.gc == "serve":
                gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
                gc.freeze()
            elif args.gc == "off":
                gc.disable()
            started, cpu = time.perf_counter(), time.process_time()
            es_cpu = process_cpu_s(args.es_pid)
            async with trio.open_nursery() as nursery:
                await nursery.start(archiver.run)
                await feed.done.wait()
                seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
                es_cpu = process_cpu_s(args.es_pid) - es_cpu
                await archiver.drain()
            gc.enable()
    finally:
        await redis.call("DEL", stream, f"{stream}:lease")
        await redis.aclose()
        await reads.aclose()
        es = es_client(args.es_url)
        try:
            index = messages_index(prefix)
            await es.options(ignore_status=404).indices.delete(index=index)
            await es.options(ignore_status=404).indices.delete_index_template(name=index)
        finally:
            await es.close()
    print(
        f"{args.messages} messages in {seconds:.2f} s = {args.messages / seconds:.0f}/s; "
        f"this process: {cpu / args.messages * 1e6:.2f} µs of CPU per message "
        f"(batch {args.batch}, collector {args.gc}, "
        f"{'null archive' if args.null_archive else 'Elasticsearch'})"
        + (f"; pid {args.es_pid}: {es_cpu / args.messages * 1e6:.2f} µs" if args.es_pid else "")
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--gc", choices=["default", "serve", "off"], default="serve")
    parser.add_argument("--null-archive", action="store_true")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("CHATNODE_TEST_REDIS_URL", "redis://127.0.0.1:63791/0"),
    )
    parser.add_argument(
        "--es-url", default=os.environ.get("CHATNODE_TEST_ES_URL", "http://127.0.0.1:19200")
    )
    parser.add_argument("--es-pid", type=int, help="report this process's CPU per message too")
    trio.run(main, parser.parse_args())
