"""A message's archive document (``chatnode.core.models``): canonical JSON made once at publish
and passed through the feed into the archive as it is."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatnode.core.models import ChatMessage, document_head, document_key, document_tail

texts = st.text(st.characters(blacklist_categories=["Cs"]))  # no lone surrogates
messages = st.builds(
    ChatMessage,
    st.integers(1, 2**63 - 1),
    st.integers(1, 2**63 - 1),
    texts,
    texts,
    st.integers(0, 2**63 - 1),
)


@given(messages)
def test_a_document_is_the_messages_canonical_json(message: ChatMessage) -> None:
    document = message.document

    assert document == json.dumps(
        {
            "chatroom": message.room_id,
            "offset": message.offset,
            "user": message.user,
            "message": message.text,
            "timestamp": message.timestamp_ms,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")
    assert b"\n" not in document
    assert document_key(document) == message.key.encode()
    assert ChatMessage.from_document(document) == message


def test_a_document_is_made_of_a_head_an_offset_and_a_tail() -> None:
    message = ChatMessage(7, 42, "zoë", 'say "hi"\n', 1_700_000_000_000)

    assert document_head(7) + b"42" + document_tail("zoë", 'say "hi"\n', 1_700_000_000_000) == (
        message.document
    )


def test_a_lone_surrogate_becomes_the_replacement_character() -> None:
    document = ChatMessage(1, 1, "b\ud800b", "x \udfff", 5).document

    assert ChatMessage.from_document(document) == ChatMessage(1, 1, "b\ufffdb", "x \ufffd", 5)


@pytest.mark.parametrize(
    "document",
    [
        b"",
        b"garbage",
        b"[1, 2]",
        b'{"chatroom":1,"offset":2,"user":"a","message":"m","timestamp":3',  # cut short
        b'{"offset":2,"chatroom":1,"user":"a","message":"m","timestamp":3}',  # another order
        b'{"chatroom":1,"offset":0,"user":"a","message":"m","timestamp":3}',  # offset 0
        b'{"chatroom":1,"offset":2,"user":"a","message":"m","timestamp":"3"}',
        b'{"chatroom":1,"offset":2,"user":1,"message":"m","timestamp":3}',
        b'{"chatroom":1,"offset":2,"user":"a","message":"m","timestamp":3,"x":1}',
        b'{"chatroom":1,"offset":2,"user":"\xff","message":"m","timestamp":3}',  # not UTF-8
        b'{"chatroom":1,"offset":2,"user":"a","message":"m","timestamp":true}',
    ],
)
def test_from_document_refuses_what_is_not_one(document: bytes) -> None:
    with pytest.raises(ValueError):
        ChatMessage.from_document(document)
