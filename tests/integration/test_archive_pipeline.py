"""The archive path against the real Redis and Elasticsearch: a message Elasticsearch can never
index dead-lettered instead of retried forever, a message whose id holds a different one kept
as a dead letter and never counted as archived, and two archivers (one reading at a time)
catching up a backlog. The feed's trimming is in ``test_redis_archive_feed.py``.

The archive stream is filled with XADD in ``RedisBus``' entry format (field d, the message's
archive document), so these tests need no bus."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

pytest.importorskip("elasticsearch", reason="needs the cluster extra: pip install -e '.[cluster]'")

from chatnode.adapters.elasticsearch import EsArchive
from chatnode.adapters.redis import RedisArchiveFeed, RespClient
from chatnode.core.models import ChatMessage, RefusalKind
from chatnode.core.ports import ArchiveRefused
from chatnode.node.archiver import Archiver
from tests.contracts.conftest import es_test_prefix, redis_test_clients
from tests.contracts.harness import require_service
from tests.redis_support import RedisAdmin

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


@pytest.fixture
async def redis() -> AsyncIterator[tuple[RedisAdmin, str, list[RespClient]]]:
    """An admin client, the test's key prefix and two clients for feeds (a feed's blocking
    read holds its client's connection)."""
    url = require_service("CHATNODE_TEST_REDIS_URL")
    async with redis_test_clients(url) as (clients, prefix):
        feeds = [RespClient.from_url(url, timeout_s=5.0) for _ in range(2)]
        try:
            yield clients[0], prefix, feeds
        finally:
            for feed in feeds:
                await feed.aclose()


@pytest.fixture
async def archive() -> AsyncIterator[EsArchive]:
    url = require_service("CHATNODE_TEST_ES_URL")
    async with es_test_prefix(url) as prefix, EsArchive.from_url(url, prefix=prefix) as archive:
        yield archive


async def fill(redis: RedisAdmin, prefix: str, room_id: int, offsets: range) -> None:
    for offset in offsets:
        message = ChatMessage(room_id, offset, "bob", f"m{offset}", T0 + offset)
        await redis.xadd(f"{prefix}:archive", {"d": message.document})


async def test_a_document_elasticsearch_cannot_index_is_refused_after_the_others(
    archive: EsArchive,
) -> None:
    good = [ChatMessage(1, offset, "bob", f"m{offset}", T0 + offset) for offset in (1, 3)]
    bad = ChatMessage(1, 2, "bob", "from the far future", 10**19)  # beyond a date's range

    with pytest.raises(ArchiveRefused) as refused:
        await archive.store([good[0].document, bad.document, good[1].document])

    assert [(r.kind, r.document, r.reason.split()[:2]) for r in refused.value.refused] == [
        (RefusalKind.UNINDEXABLE, bad.document, ["HTTP", "400"])
    ]
    await archive.refresh()
    assert await archive.read(1, after_offset=0, up_to_offset=10, limit=10) == good


async def test_a_message_under_an_id_that_holds_another_is_a_kept_dead_letter(
    redis: tuple[RedisAdmin, str, list[RespClient]], archive: EsArchive
) -> None:
    client, prefix, feeds = redis
    key = f"{prefix}:archive"
    before_the_loss = ChatMessage(1, 3, "alice", "published before Redis lost its data", T0)
    await archive.store([before_the_loss.document])
    await fill(client, prefix, 1, range(1, 6))  # offsets reused: 3 is another message now
    again = ChatMessage(1, 2, "bob", "m2", T0 + 2)
    await client.xadd(key, {"d": again.document})  # the same message twice: fine
    archiver = Archiver(
        RedisArchiveFeed(feeds[0], prefix, reads=feeds[1], consumer="node-1"), archive
    )

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(archiver.run)
            while await client.xlen(key):  # noqa: ASYNC110 - Redis state
                await trio.sleep(0.05)
            await archiver.drain()

    assert (archiver.archived, archiver.conflicts, archiver.refused) == (5, 1, 0)
    ours = ChatMessage(1, 3, "bob", "m3", T0 + 3)
    (letter,) = await archive.dead_letters(limit=10)
    assert (letter.refusal.kind, letter.refusal.document, letter.refusal.stored) == (
        RefusalKind.CONFLICT,
        ours.document,
        before_the_loss.document,
    )
    await archive.refresh()
    stored = await archive.read(1, after_offset=0, up_to_offset=10, limit=10)
    assert [m.text for m in stored] == ["m1", "m2", before_the_loss.text, "m4", "m5"]


async def test_two_archivers_catch_up_a_backlog_and_dead_letter_bad_messages(
    redis: tuple[RedisAdmin, str, list[RespClient]], archive: EsArchive
) -> None:
    client, prefix, feeds = redis
    key = f"{prefix}:archive"
    await fill(client, prefix, 1, range(1, 1201))
    # an entry in an older chatnode's layout that ES refuses (a date beyond its range),
    # and one whose document is not a message document (never sent)
    await client.xadd(key, {"r": 2, "o": 1, "u": "bob", "t": "x", "ts": 10**19})
    await client.xadd(key, {"d": b'{"chatroom":2,"offset":2,"garbage'})
    await fill(client, prefix, 1, range(1201, 3001))
    # A lease longer than the test's deadline: the second archiver reads only because the
    # first one released the feed when it was drained.
    archivers = [
        Archiver(
            RedisArchiveFeed(feed, prefix, reads=feed, consumer=f"node-{n}", lease_ms=60_000),
            archive,
            batch_size=100,
        )
        for n, feed in enumerate(feeds)
    ]

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(archivers[0].run)
            while await client.xlen(key) > 2000:  # noqa: ASYNC110 - Redis state
                await trio.sleep(0.01)
            await nursery.start(archivers[1].run)
            await archivers[0].drain()  # midway: the other one reads on
            while await client.xlen(key):  # noqa: ASYNC110 - Redis state
                await trio.sleep(0.05)
            await archivers[1].drain()

    assert archivers[0].archived >= 1000 and archivers[1].archived >= 1
    assert sum(a.archived for a in archivers) >= 3000  # a message may be stored twice
    assert sum(a.refused for a in archivers) == 2
    await archive.refresh()
    stored = await archive.read(1, after_offset=0, up_to_offset=5000, limit=5000)
    assert [m.offset for m in stored] == list(range(1, 3001))
