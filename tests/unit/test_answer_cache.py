"""AnswerCache: an encoded answer is reused only for an equal value, and only so many."""

from __future__ import annotations

import json
from collections.abc import Callable

from chatnode.core.models import Room
from chatnode.edge.rest import ENTRY_OVERHEAD_BYTES, AnswerCache


def encoder(calls: list[object], value: object) -> Callable[[], object]:
    def encode() -> object:
        calls.append(value)
        return {"value": value}

    return encode


def test_an_equal_value_reuses_the_answer_and_a_different_one_does_not() -> None:
    cache = AnswerCache()
    calls: list[object] = []
    rooms = [Room(1, "lobby", 5)]
    body = cache.body("k", rooms, encoder(calls, "first"))
    assert json.loads(body) == {"value": "first"}

    assert cache.body("k", list(rooms), encoder(calls, "again")) == body
    assert cache.body("k", [Room(1, "lobby", 5)], encoder(calls, "equal copy")) == body
    assert calls == ["first"]

    changed = cache.body("k", [Room(1, "lobby", 5), Room(2, "new", 6)], encoder(calls, "second"))
    assert json.loads(changed) == {"value": "second"}
    assert cache.body("other key", rooms, encoder(calls, "third")) != body
    assert calls == ["first", "second", "third"]


def test_only_the_most_recently_used_keys_are_kept() -> None:
    answer_bytes = len(b'{"value": "a"}')
    cache = AnswerCache(max_bytes=2 * (ENTRY_OVERHEAD_BYTES + answer_bytes))
    calls: list[object] = []
    for key in ("a", "b", "a", "c"):  # c pushes out b
        cache.body(key, key, encoder(calls, key))
    cache.body("a", "a", encoder(calls, "a again"))
    cache.body("c", "c", encoder(calls, "c again"))
    cache.body("b", "b", encoder(calls, "b again"))
    assert calls == ["a", "b", "c", "b again"]
