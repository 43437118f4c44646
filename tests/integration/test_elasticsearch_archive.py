"""EsArchive against a real Elasticsearch, beyond the Archive contract: thousands of messages,
paging past the 10,000-hit window, conflicts among hundreds, rejected bulk items, the dead
letters' own index, a missing index, an unreachable or hung server, and cancellation under
Trio. Each test gets its own index prefix."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio

pytest.importorskip("elasticsearch", reason="needs the cluster extra: pip install -e '.[cluster]'")

import chatnode.adapters.elasticsearch.archive as es_adapter
from chatnode.adapters.elasticsearch import EsArchive, es_client
from chatnode.core import errors
from chatnode.core.models import ChatMessage, DeadLetter, Refusal, RefusalKind, SearchQuery
from chatnode.core.ports import ArchiveRefused
from tests.contracts.conftest import es_test_prefix
from tests.contracts.harness import documents, require_service

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


@pytest.fixture
def es_url() -> str:
    return require_service("CHATNODE_TEST_ES_URL")


@pytest.fixture
async def archive(es_url: str) -> AsyncIterator[EsArchive]:
    async with es_test_prefix(es_url) as prefix, EsArchive.from_url(es_url, prefix=prefix) as a:
        yield a


def room(room_id: int, count: int, *, first: int = 1) -> list[ChatMessage]:
    """Messages ``first..first+count-1``; every 100th says "needle"; all texts have 4 words."""
    return [
        ChatMessage(
            room_id,
            offset,
            "alice" if offset % 2 else "bob",
            f"message {offset} {'needle' if offset % 100 == 0 else 'hay'}",
            T0 + room_id * 1_000_000 + offset,
        )
        for offset in range(first, first + count)
    ]


def keys(messages: list[ChatMessage]) -> list[str]:
    return [m.key for m in messages]


async def test_store_2000_messages_then_read_tail_and_search(archive: EsArchive) -> None:
    lobby, other = room(1, 1500), room(2, 500)

    await archive.store(documents(lobby + other))  # one bulk request
    await archive.refresh()

    assert await archive.read(1, after_offset=0, up_to_offset=1500, limit=5000) == lobby
    assert await archive.read(1, after_offset=100, up_to_offset=200, limit=50) == lobby[100:150]
    assert await archive.read(2, after_offset=450, up_to_offset=10_000, limit=100) == other[450:]
    assert await archive.tail(1, up_to_offset=1500, limit=100) == lobby[-100:]
    assert await archive.tail(2, up_to_offset=250, limit=10) == other[240:250]

    # Equal scores (same words, same length): newest first.
    hits = await archive.search(SearchQuery("needle", room_id=1, limit=100))
    assert [h.message.offset for h in hits] == list(range(1500, 0, -100))
    assert len({h.score for h in hits}) == 1
    assert len(await archive.search(SearchQuery("needle", limit=100))) == 20
    assert len(await archive.search(SearchQuery("needle"))) == 20  # default limit
    assert len(await archive.search(SearchQuery("hay", limit=7))) == 7
    bob = await archive.search(SearchQuery("needle", room_id=2, user="bob", limit=100))
    assert keys([h.message for h in bob]) == ["2:500", "2:400", "2:300", "2:200", "2:100"]
    window = SearchQuery("needle", room_id=1, from_ms=T0 + 1_000_200, to_ms=T0 + 1_000_400)
    assert [h.message.offset for h in await archive.search(window)] == [400, 300, 200]


async def test_storing_again_changes_nothing(archive: EsArchive) -> None:
    messages = room(1, 300)
    await archive.store(documents(messages))
    edited = [ChatMessage(m.room_id, m.offset, m.user, "edited", m.timestamp_ms) for m in messages]

    await archive.store(documents(messages[::-1] + room(1, 10, first=301)))  # the same: stored
    with pytest.raises(ArchiveRefused) as refused:  # different messages: conflicts
        await archive.store(documents(edited + room(1, 5, first=311)))
    await archive.refresh()

    assert [(r.kind, r.document, r.stored) for r in refused.value.refused] == [
        (RefusalKind.CONFLICT, e.document, m.document)
        for e, m in zip(edited, messages, strict=True)
    ]
    assert await archive.read(1, after_offset=0, up_to_offset=1000, limit=1000) == messages + room(
        1, 15, first=301
    )
    assert await archive.search(SearchQuery("edited")) == []


async def test_dead_letters_are_kept_in_their_own_strict_index(
    archive: EsArchive, es_url: str
) -> None:
    letter = DeadLetter(
        Refusal(RefusalKind.CONFLICT, room(1, 1)[0].document, "why", b'{"x":1}'), T0
    )

    await archive.keep_dead_letters([letter])

    admin = es_client(es_url)
    try:
        assert archive.dead_letter_index.endswith("-dead-letters")
        mapping = await admin.indices.get_mapping(index=archive.dead_letter_index)
        assert mapping[archive.dead_letter_index]["mappings"]["dynamic"] == "strict"
        kept = await admin.get(index=archive.dead_letter_index, id=letter.digest)
        assert kept["_source"]["key"] == "1:1" and kept["_source"]["kind"] == "conflict"
    finally:
        await admin.close()
    assert await archive.dead_letters(limit=5) == [letter]


async def test_reads_and_searches_page_past_the_window(
    archive: EsArchive, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = room(1, 250)
    await archive.store(documents(messages))
    await archive.refresh()
    unpaged_search = await archive.search(SearchQuery("message", limit=40))

    monkeypatch.setattr(es_adapter, "MAX_WINDOW", 7)

    assert await archive.read(1, after_offset=3, up_to_offset=250, limit=30) == messages[3:33]
    assert await archive.read(1, after_offset=0, up_to_offset=250, limit=1000) == messages
    assert await archive.tail(1, up_to_offset=200, limit=30) == messages[170:200]
    assert await archive.search(SearchQuery("message", limit=40)) == unpaged_search


async def test_reads_more_than_10000_messages(archive: EsArchive) -> None:
    messages = room(1, 10_500)
    for start in range(0, len(messages), 3500):
        await archive.store(documents(messages[start : start + 3500]))
    await archive.refresh()

    got = await archive.read(1, after_offset=0, up_to_offset=20_000, limit=20_000)
    assert keys(got) == keys(messages)
    tail = await archive.tail(1, up_to_offset=10_500, limit=10_001)
    assert keys(tail) == keys(messages[-10_001:])


async def test_rejected_bulk_items_are_unavailable_and_a_retry_stores_them(
    archive: EsArchive, es_url: str
) -> None:
    messages = room(1, 20)
    await archive.store(documents(messages[:5]))
    admin = es_client(es_url)
    try:
        await admin.indices.put_settings(index=archive.index, settings={"index.blocks.write": True})
        with pytest.raises(errors.Unavailable, match="rejected 20 of 20"):
            await archive.store(documents(messages))
    finally:
        await admin.indices.put_settings(index=archive.index, settings={"index.blocks.write": None})
        await admin.close()

    await archive.store(documents(messages))  # what the archiver does next
    await archive.refresh()
    assert await archive.read(1, after_offset=0, up_to_offset=20, limit=100) == messages


async def test_a_missing_index_is_unavailable_and_never_auto_created(es_url: str) -> None:
    async with EsArchive.from_url(es_url, prefix="chatnode-test-never-migrated") as archive:
        with pytest.raises(errors.Unavailable, match="chatnode migrate"):
            await archive.store(documents(room(1, 3)))
        letter = DeadLetter(Refusal(RefusalKind.UNINDEXABLE, b"x", "why"), T0)
        with pytest.raises(errors.Unavailable, match="chatnode migrate"):
            await archive.keep_dead_letters([letter])
        with pytest.raises(errors.Unavailable, match="chatnode migrate"):
            await archive.dead_letters(limit=10)
        with pytest.raises(errors.Unavailable, match="chatnode migrate"):
            await archive.read(1, after_offset=0, up_to_offset=10, limit=10)
        with pytest.raises(errors.Unavailable, match="chatnode migrate"):
            await archive.search(SearchQuery("message"))
        with pytest.raises(errors.Unavailable, match="chatnode migrate"):
            await archive.check()

        admin = es_client(es_url)
        try:
            assert not await admin.indices.exists(index=archive.index)
            assert not await admin.indices.exists(index=archive.dead_letter_index)
        finally:
            await admin.close()


async def test_an_unreachable_server_is_unavailable() -> None:
    async with EsArchive.from_url("http://127.0.0.1:1", prefix="chatnode-test") as archive:
        with pytest.raises(errors.Unavailable):
            await archive.check()
        with pytest.raises(errors.Unavailable):
            await archive.store(documents(room(1, 3)))
        with pytest.raises(errors.Unavailable):
            await archive.tail(1, up_to_offset=10, limit=10)
        with pytest.raises(errors.Unavailable):
            await archive.search(SearchQuery("message"))


async def serve_silence(stream: trio.SocketStream) -> None:
    """A server that accepts and never answers: what a hung Elasticsearch looks like."""
    async with stream:
        await trio.sleep_forever()


async def test_a_hung_server_times_out_as_unavailable(nursery: trio.Nursery) -> None:
    listeners = await nursery.start(partial(trio.serve_tcp, serve_silence, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    start = trio.current_time()

    async with EsArchive.from_url(
        f"http://127.0.0.1:{port}", prefix="chatnode-test", request_timeout_s=0.3, max_retries=1
    ) as archive:
        with pytest.raises(errors.Unavailable, match="unreachable"):
            await archive.search(SearchQuery("message"))

    assert trio.current_time() - start < 3.0  # two attempts of 0.3 s, no backoff sleep
    nursery.cancel_scope.cancel()


async def test_cancellation_stops_a_request_at_once(nursery: trio.Nursery) -> None:
    listeners = await nursery.start(partial(trio.serve_tcp, serve_silence, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]

    async with EsArchive.from_url(
        f"http://127.0.0.1:{port}", prefix="chatnode-test", request_timeout_s=30.0
    ) as archive:
        start = trio.current_time()
        with trio.move_on_after(0.2) as scope:
            await archive.read(1, after_offset=0, up_to_offset=10, limit=10)

    assert scope.cancelled_caught
    assert trio.current_time() - start < 2.0
    nursery.cancel_scope.cancel()


async def test_check_answers(archive: EsArchive) -> None:
    await archive.check()
