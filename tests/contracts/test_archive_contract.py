"""The Archive contract: idempotent storage that refuses what it cannot store and never takes
a different message for a stored one, dead letters kept for repair, offset ranges, and word
search.

Every test calls ``refresh()`` after storing, as the node does before reading: that is the
moment stored messages must be visible. Search semantics every implementation shares: a hit
contains every word of the query (case-insensitive), filters are exact (time bounds
inclusive), hits come best first and, among equal scores, newest first; a query is plain words,
never a query language, so any string is safe.

A membership change (``ChatMessage.event``/``by``) is a message of its room with its own
offset: stored, read and counted like one, its event and by intact; search never returns it.
"""

from __future__ import annotations

import pytest

from chatnode.core.models import (
    ADDED,
    BANNED,
    LEFT,
    REMOVED,
    ChatMessage,
    DeadLetter,
    Refusal,
    RefusalKind,
    SearchQuery,
)
from chatnode.core.ports import Archive, ArchiveRefused

from .harness import documents

T0 = 1_700_000_000_000


def message(
    room_id: int, offset: int, text: str = "", user: str = "bob", at_ms: int = 0
) -> ChatMessage:
    return ChatMessage(room_id, offset, user, text or f"message {offset}", at_ms or T0 + offset)


def room_messages(room_id: int, count: int) -> list[ChatMessage]:
    return [message(room_id, offset) for offset in range(1, count + 1)]


async def stored(archive: Archive, messages: list[ChatMessage]) -> None:
    await archive.store(documents(messages))
    await archive.refresh()


async def keys(archive: Archive, query: SearchQuery) -> list[str]:
    return [hit.message.key for hit in await archive.search(query)]


async def test_store_is_idempotent(archive: Archive) -> None:
    messages = room_messages(1, 7)

    await archive.store(documents(messages[:5]))
    await archive.store(documents(messages[:5]))
    await archive.store(documents(messages[2:]))
    await archive.store(documents([]))
    await archive.refresh()

    assert await archive.read(1, after_offset=0, up_to_offset=100, limit=100) == messages
    assert len(await keys(archive, SearchQuery("message"))) == 7


async def test_a_document_that_is_not_a_message_is_refused_after_the_others(
    archive: Archive,
) -> None:
    messages = room_messages(1, 3)
    bad = [
        b"garbage",
        b'{"chatroom":1,"offset":9,"user":"a","message":"x\ny","timestamp":1}',  # a raw newline
        b'{"chatroom":1,"offset":8,"user":"a"',  # cut short
    ]

    with pytest.raises(ArchiveRefused) as refused:
        await archive.store([messages[0].document, *bad[:2], *documents(messages[1:]), bad[2]])
    await archive.refresh()

    assert [r.document for r in refused.value.refused] == bad
    assert {r.kind for r in refused.value.refused} == {RefusalKind.UNINDEXABLE}
    assert all(r.reason and r.stored is None for r in refused.value.refused)
    assert await archive.read(1, after_offset=0, up_to_offset=100, limit=100) == messages


async def test_a_different_message_under_a_stored_id_is_a_conflict_not_stored(
    archive: Archive,
) -> None:
    first = room_messages(1, 3)
    await archive.store(documents(first))
    other = message(1, 2, "a message published after the offsets were reused", user="eve")
    later = message(1, 4)

    with pytest.raises(ArchiveRefused) as refused:
        await archive.store([other.document, later.document, first[0].document])
    await archive.refresh()

    (conflict,) = refused.value.refused
    assert (conflict.kind, conflict.document, conflict.stored) == (
        RefusalKind.CONFLICT,
        other.document,
        first[1].document,
    )
    assert conflict.key == "1:2" and "1:2" in conflict.reason
    assert await archive.read(1, after_offset=0, up_to_offset=100, limit=100) == [*first, later]
    assert await keys(archive, SearchQuery("reused")) == []


async def test_two_messages_under_one_id_in_one_batch_the_first_is_stored(
    archive: Archive,
) -> None:
    kept, clash = message(1, 1, "first"), message(1, 1, "second")

    with pytest.raises(ArchiveRefused) as refused:
        await archive.store([kept.document, clash.document])
    await archive.refresh()

    assert [(r.kind, r.document, r.stored) for r in refused.value.refused] == [
        (RefusalKind.CONFLICT, clash.document, kept.document)
    ]
    assert await archive.read(1, after_offset=0, up_to_offset=10, limit=10) == [kept]


async def test_the_same_message_encoded_otherwise_counts_as_stored(archive: Archive) -> None:
    stored = message(1, 1, "café ☕")
    escaped = (
        b'{"chatroom":1,"offset":1,"user":"bob","message":"caf\\u00e9 \\u2615",'
        b'"timestamp":%d}' % stored.timestamp_ms
    )
    assert ChatMessage.from_document(escaped) == stored and escaped != stored.document
    await archive.store([stored.document])

    await archive.store([escaped, stored.document])  # no conflict: the same message
    await archive.refresh()

    assert await archive.read(1, after_offset=0, up_to_offset=10, limit=10) == [stored]


def letter(
    kind: RefusalKind, document: bytes, at_ms: int, stored: bytes | None = None
) -> DeadLetter:
    return DeadLetter(Refusal(kind, document, f"{kind.value} because", stored), at_ms)


async def test_dead_letters_are_kept_byte_for_byte_once_and_read_oldest_first(
    archive: Archive,
) -> None:
    clash = letter(
        RefusalKind.CONFLICT, message(1, 2, "new").document, T0 + 2, message(1, 2).document
    )
    garbage = letter(RefusalKind.UNINDEXABLE, b'\xff{"not":"a message"\n', T0 + 1)
    same_time = letter(RefusalKind.UNINDEXABLE, b"garbage", T0 + 2)

    await archive.keep_dead_letters([clash, garbage])
    await archive.keep_dead_letters([garbage, same_time])  # a batch retried: kept once
    await archive.keep_dead_letters([])

    kept = await archive.dead_letters(limit=10)
    assert kept[0] == garbage
    assert sorted(kept[1:], key=lambda d: d.digest) == kept[1:]  # the same time: by digest
    assert set(kept[1:]) == {clash, same_time}
    assert await archive.dead_letters(limit=1) == [garbage]
    assert await archive.dead_letters(limit=0) == []
    assert clash.refusal.key == "1:2" and garbage.refusal.key is None


async def test_read_ranges(archive: Archive) -> None:
    messages = room_messages(1, 10)
    await stored(archive, messages + room_messages(2, 10))

    async def read(after: int, up_to: int, limit: int) -> list[ChatMessage]:
        return await archive.read(1, after_offset=after, up_to_offset=up_to, limit=limit)

    assert await read(2, 7, 3) == messages[2:5]
    assert await read(2, 4, 10) == messages[2:4]
    assert await read(0, 10, 100) == messages
    assert await read(10, 20, 5) == []
    assert await archive.read(3, after_offset=0, up_to_offset=10, limit=10) == []


async def test_tail_is_the_last_messages_ascending(archive: Archive) -> None:
    messages = room_messages(1, 10)
    await stored(archive, messages + room_messages(2, 3))

    assert await archive.tail(1, up_to_offset=7, limit=3) == messages[4:7]
    assert await archive.tail(1, up_to_offset=100, limit=100) == messages
    assert await archive.tail(1, up_to_offset=2, limit=5) == messages[:2]
    assert await archive.tail(1, up_to_offset=0, limit=5) == []
    assert await archive.tail(3, up_to_offset=10, limit=5) == []


CORPUS = [
    message(1, 1, "I like apple pie", user="alice", at_ms=T0 + 100),
    message(1, 2, "Apple season is here", user="bob", at_ms=T0 + 200),
    message(1, 3, "bananas only", user="alice", at_ms=T0 + 300),
    message(2, 1, "apple and banana smoothie", user="carol", at_ms=T0 + 400),
    message(2, 2, "APPLE!!! pie??", user="alice", at_ms=T0 + 500),
    message(3, 1, "rock AND roll NOT jazz", user="dave", at_ms=T0 + 600),
]


async def test_search_finds_a_word_case_insensitively(archive: Archive) -> None:
    await stored(archive, CORPUS)

    expected = {"1:1", "1:2", "2:1", "2:2"}
    assert set(await keys(archive, SearchQuery("apple"))) == expected
    assert set(await keys(archive, SearchQuery("APPLE"))) == expected
    assert await keys(archive, SearchQuery("kiwi")) == []
    hit = (await archive.search(SearchQuery("bananas")))[0]
    assert hit.message == CORPUS[2]
    assert isinstance(hit.score, float)


async def test_search_needs_every_word(archive: Archive) -> None:
    await stored(archive, CORPUS)

    assert set(await keys(archive, SearchQuery("apple pie"))) == {"1:1", "2:2"}
    assert await keys(archive, SearchQuery("pie smoothie")) == []


async def test_search_filters(archive: Archive) -> None:
    await stored(archive, CORPUS)

    async def found(query: SearchQuery) -> set[str]:
        return set(await keys(archive, query))

    assert await found(SearchQuery("apple", room_id=1)) == {"1:1", "1:2"}
    assert await found(SearchQuery("apple", room_id=3)) == set()
    assert await found(SearchQuery("apple", user="alice")) == {"1:1", "2:2"}
    assert await found(SearchQuery("apple", user="Alice")) == set()
    assert await found(SearchQuery("apple", room_id=2, user="alice")) == {"2:2"}
    assert await found(SearchQuery("apple", from_ms=T0 + 200)) == {"1:2", "2:1", "2:2"}
    assert await found(SearchQuery("apple", to_ms=T0 + 400)) == {"1:1", "1:2", "2:1"}
    assert await found(SearchQuery("apple", from_ms=T0 + 200, to_ms=T0 + 400)) == {"1:2", "2:1"}
    assert await found(SearchQuery("apple", from_ms=T0 + 201, to_ms=T0 + 399)) == set()


async def test_search_only_in_the_rooms_given(archive: Archive) -> None:
    """``rooms``: the rooms a caller may read (a private room's messages never reach anyone
    else's search); empty means none, None every room."""
    await stored(archive, CORPUS)

    async def found(query: SearchQuery) -> set[str]:
        return set(await keys(archive, query))

    everywhere = await found(SearchQuery("apple"))
    assert await found(SearchQuery("apple", rooms=None)) == everywhere
    assert await found(SearchQuery("apple", rooms=(1,))) == {"1:1", "1:2"}
    assert await found(SearchQuery("apple", rooms=(1, 2, 99))) == everywhere
    assert await found(SearchQuery("apple", rooms=(99,))) == set()
    assert await found(SearchQuery("apple", rooms=())) == set()
    assert await found(SearchQuery("apple", rooms=(2,), user="alice")) == {"2:2"}
    assert await found(SearchQuery("apple", rooms=tuple(range(3, 1003)))) == set()  # the bound


async def test_search_limit(archive: Archive) -> None:
    await stored(archive, CORPUS)

    assert len(await keys(archive, SearchQuery("apple", limit=2))) == 2
    assert len(await keys(archive, SearchQuery("apple", limit=1))) == 1


async def test_search_ranks_best_first_then_newest_first(archive: Archive) -> None:
    short = message(1, 1, "deploy", at_ms=T0 + 1)
    long = message(1, 2, "we will deploy after lunch once the review is finished", at_ms=T0 + 9)
    same = [message(2, n, "standup now", at_ms=T0 + at) for n, at in ((1, 30), (2, 10), (3, 20))]
    await stored(archive, [short, long, *same])

    hits = await archive.search(SearchQuery("deploy"))
    assert [hit.message for hit in hits] == [short, long]
    assert hits[0].score > hits[1].score
    assert await keys(archive, SearchQuery("standup")) == ["2:1", "2:3", "2:2"]


async def test_search_words_that_look_like_operators(archive: Archive) -> None:
    await stored(archive, CORPUS)

    assert set(await keys(archive, SearchQuery("and"))) == {"2:1", "3:1"}
    assert await keys(archive, SearchQuery("NOT")) == ["3:1"]
    assert set(await keys(archive, SearchQuery('"apple'))) == {"1:1", "1:2", "2:1", "2:2"}
    assert set(await keys(archive, SearchQuery("(pie)"))) == {"1:1", "2:2"}


def change(
    room_id: int, offset: int, user: str, event: str, by: str, at_ms: int = 0
) -> ChatMessage:
    """A membership change, as the bus publishes it: no text, its event and who made it."""
    return ChatMessage(room_id, offset, user, "", at_ms or T0 + offset, event, by)


MEMBERSHIP_LOG = [
    message(1, 1, "welcome everyone", user="ann"),
    change(1, 2, "apple", ADDED, by="ann"),
    message(1, 3, "hello apple", user="apple"),
    change(1, 4, "bob", ADDED, by="apple"),
    change(1, 5, "bob", REMOVED, by="ann"),
    change(1, 6, "apple", LEFT, by="apple"),
    change(1, 7, "eve", BANNED, by="ann"),
    change(2, 1, "apple", ADDED, by="bob"),
]


async def test_a_membership_change_is_stored_and_read_back_in_offset_order(
    archive: Archive,
) -> None:
    await archive.store(documents(MEMBERSHIP_LOG[4:]))
    await archive.store(documents(MEMBERSHIP_LOG[:5]))  # stored again: idempotent
    await archive.refresh()

    room = MEMBERSHIP_LOG[:7]
    read = await archive.read(1, after_offset=0, up_to_offset=100, limit=100)
    assert read == room
    assert [(m.event, m.by) for m in read] == [(m.event, m.by) for m in room]
    assert read[1].event == ADDED and read[1].by == "ann" and read[1].text == ""
    assert await archive.read(1, after_offset=1, up_to_offset=4, limit=2) == room[1:3]
    assert await archive.tail(1, up_to_offset=6, limit=3) == room[3:6]
    assert await archive.read(2, after_offset=0, up_to_offset=9, limit=9) == MEMBERSHIP_LOG[7:]
    assert [m.document for m in read] == documents(room)


async def test_last_offset_counts_membership_changes(archive: Archive) -> None:
    await stored(archive, MEMBERSHIP_LOG)

    assert await archive.last_offset(1) == 7  # the last one, 7, is a change
    assert await archive.last_offset(2) == 1  # a room holding only a change
    assert await archive.last_offset(3) == 0


async def test_search_never_returns_a_membership_change(archive: Archive) -> None:
    await stored(archive, MEMBERSHIP_LOG)

    async def found(query: SearchQuery) -> set[str]:
        return set(await keys(archive, query))

    assert await found(SearchQuery("apple")) == {"1:3"}  # a message, not the changes of apple
    assert await found(SearchQuery("apple", user="apple")) == {"1:3"}
    assert await found(SearchQuery("apple", room_id=2)) == set()
    for name in ("ann", "bob", "eve", "added", "removed", "left", "banned"):
        assert await found(SearchQuery(name)) == set(), name
        assert await found(SearchQuery(name, user=name)) == set(), name
    for text in ("", " ", "*", '""', "event", "by"):
        assert all(hit.message.event is None for hit in await archive.search(SearchQuery(text)))
    assert await found(SearchQuery("welcome", user="ann")) == {"1:1"}


async def test_a_different_membership_change_under_a_stored_id_is_a_conflict(
    archive: Archive,
) -> None:
    kept = change(1, 1, "bob", ADDED, by="ann")
    await archive.store([kept.document])

    await archive.store([kept.document])  # the same change: stored
    others = [
        change(1, 1, "bob", ADDED, by="eve"),  # another author
        change(1, 1, "bob", BANNED, by="ann"),  # another event
        ChatMessage(1, 1, "bob", "", kept.timestamp_ms),  # the same fields but no event
    ]
    for other in others:
        with pytest.raises(ArchiveRefused) as refused:
            await archive.store([other.document])
        (conflict,) = refused.value.refused
        assert (conflict.kind, conflict.stored) == (RefusalKind.CONFLICT, kept.document)
    await archive.refresh()

    assert await archive.read(1, after_offset=0, up_to_offset=9, limit=9) == [kept]


HOSTILE_QUERIES = [
    '"',
    '""',
    '"""',
    "AND (",
    "(",
    ")",
    "()",
    "*",
    "apple*",
    "-apple",
    "^apple",
    "+",
    ":",
    "text:apple",
    "{text}: apple",
    "NEAR(apple pie)",
    "NEAR(",
    "apple OR",
    "OR",
    "NOT",
    "apple AND",
    "'",
    "' OR 1=1 --",
    "\\",
    '\\"',
    "[",
    "]",
    "{",
    "}",
    "~",
    "/",
    "/.*/",
    "apple^2",
    "a:b:c",
    "?",
    "&&",
    "||",
    "!",
    "",
    " ",
    "\t\n",
    "🎉",
    "\x00",
    "\ud800",
    "apple \udfff",
    "é" * 300,
    "apple " * 200,
]


@pytest.mark.parametrize("text", HOSTILE_QUERIES, ids=range(len(HOSTILE_QUERIES)))
async def test_search_never_raises_on_hostile_queries(archive: Archive, text: str) -> None:
    await stored(archive, CORPUS)

    hits = await archive.search(SearchQuery(text))

    assert isinstance(hits, list)
    assert all(hit.message in CORPUS for hit in hits)


async def test_check_answers_and_aclose_is_idempotent(archive: Archive) -> None:
    await archive.check()
    await archive.aclose()
    await archive.aclose()
