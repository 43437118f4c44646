"""The bodies the archive sends to Elasticsearch and what it reads back: bulk lines, bulk
outcomes, stored documents, dead letters, queries. No I/O."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from typing import Any, Final

import attrs

from chatnode.core.models import (
    ChatMessage,
    DeadLetter,
    Refusal,
    RefusalKind,
    SearchQuery,
    document_key,
)

REFUSED_ITEM_STATUS: Final = 400
CONFLICT_ITEM_STATUS: Final = 409
_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")
BULK_FILTERS: Final = ("errors", "errors,items.*.status,items.*.error.type,items.*.error.reason")
"""A bulk is sent answering only ``errors``; if some item failed, again for every item's
outcome (``archive.py``, the module guarantees)."""


def _clean(text: str) -> str:
    """``text`` as valid UTF-8: a lone surrogate (JSON allows "\\ud800") becomes U+FFFD."""
    return _SURROGATE_RE.sub("\ufffd", text)


def bulk_body(documents: Sequence[bytes]) -> bytes:
    """The NDJSON body of a ``_bulk`` request creating each document under its key.

    ``ValueError`` if one is not a message document or holds a newline (it would split its
    NDJSON line): :func:`usable` sorts those out."""
    body = b"".join(
        [
            b'{"create":{"_id":"%b"}}\n%b\n' % (document_key(document), document)
            for document in documents
        ]
    )
    if body.count(b"\n") != 2 * len(documents):
        raise ValueError("a document holds a newline")
    return body


def usable(documents: Sequence[bytes]) -> tuple[list[bytes], list[tuple[bytes, str]]]:
    """``documents`` split into those :func:`bulk_body` takes and the others, with why."""
    good: list[bytes] = []
    bad: list[tuple[bytes, str]] = []
    for document in documents:
        try:
            bulk_body([document])
        except ValueError as exc:
            bad.append((document, f"not sent: {exc}"))
        else:
            good.append(document)
    return good, bad


def message_of(source: dict[str, Any]) -> ChatMessage:
    """The message a stored ``_source`` holds; a membership change with its event and by."""
    return ChatMessage.from_fields(source)


@attrs.frozen
class BulkOutcome:
    """What ES did not take of a bulk request."""

    retry: list[str]
    """Reasons of items ES may accept later (any failure status but 400 and 409)."""
    refused: list[tuple[int, str]]
    """Positions and reasons of items ES can never accept (400)."""
    conflicts: list[int] = attrs.Factory(list)
    """Positions of items whose id holds a document already (409): the same or another."""


def bulk_outcome(response: dict[str, Any]) -> BulkOutcome:
    """Classify the items of a ``_bulk`` response (filtered by ``BULK_FILTERS[1]``)."""
    outcome = BulkOutcome([], [])
    if not response.get("errors"):
        return outcome
    for position, item in enumerate(response.get("items", [])):
        (result,) = item.values()
        status = int(result.get("status", 0))
        if status < 300:
            continue
        if status == CONFLICT_ITEM_STATUS:
            outcome.conflicts.append(position)
            continue
        error = result.get("error") or {}
        reason = f"HTTP {status} {error.get('type')}: {error.get('reason')}"
        if status == REFUSED_ITEM_STATUS:
            outcome.refused.append((position, reason))
        else:
            outcome.retry.append(reason)
    return outcome


def stored_document(source: dict[str, Any]) -> bytes:
    """The bytes of a stored ``_source`` as ES was sent them, if it was sent compact, in its
    keys' order, non-ASCII unescaped: what every archive document is (``ChatMessage.document``)."""
    try:
        return json.dumps(source, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate: only an escaped form has bytes
        return json.dumps(source, separators=(",", ":")).encode()


def same_document(document: bytes, source: dict[str, Any]) -> bool:
    """Whether ``source``, stored under ``document``'s id, holds the same message: the same
    bytes, or the same fields and values however encoded."""
    if stored_document(source) == document:
        return True
    try:
        return bool(json.loads(document) == source)
    except ValueError:  # not JSON (UnicodeDecodeError is one): a refused one, never sent
        return False


def dead_letter_source(letter: DeadLetter) -> bytes:
    refusal = letter.refusal
    stored = refusal.stored
    source = {
        "digest": letter.digest,
        "kind": refusal.kind.value,
        "key": refusal.key,
        "document": base64.b64encode(refusal.document).decode(),
        "stored": None if stored is None else base64.b64encode(stored).decode(),
        "reason": refusal.reason,
        "kept_at": letter.kept_at_ms,
    }
    return json.dumps(source, separators=(",", ":")).encode()


def dead_letter_of(source: dict[str, Any]) -> DeadLetter:
    stored = source.get("stored")
    refusal = Refusal(
        RefusalKind(source["kind"]),
        base64.b64decode(source["document"]),
        str(source["reason"]),
        None if stored is None else base64.b64decode(stored),
    )
    return DeadLetter(refusal, int(source["kept_at"]))


def range_query(room_id: int, offsets: dict[str, int]) -> dict[str, Any]:
    return {"bool": {"filter": [{"term": {"chatroom": room_id}}, {"range": {"offset": offsets}}]}}


def search_query(query: SearchQuery) -> dict[str, Any]:
    """The query of a search: messages only, never a membership change (it has ``event``)."""
    filters: list[dict[str, Any]] = []
    if query.room_id is not None:
        filters.append({"term": {"chatroom": query.room_id}})
    if query.rooms is not None:
        filters.append({"terms": {"chatroom": list(query.rooms)}})
    if query.user is not None:
        filters.append({"term": {"user": _clean(query.user)}})
    if query.from_ms is not None or query.to_ms is not None:
        bounds = {"gte": query.from_ms, "lte": query.to_ms}
        filters.append({"range": {"timestamp": {k: v for k, v in bounds.items() if v is not None}}})
    return {
        "bool": {
            "must": [{"match": {"message": {"query": _clean(query.text), "operator": "and"}}}],
            "filter": filters,
            "must_not": [{"exists": {"field": "event"}}],
        }
    }


SEARCH_SORT: Final = [
    {"_score": "desc"},
    {"timestamp": "desc"},
    {"chatroom": "asc"},
    {"offset": "desc"},
]
