"""The cluster Archive: every message in Elasticsearch, searchable.

One document per message in the index ``<prefix>-messages`` (mapping and settings:
``schema/messages_template.json``, put by ``chatnode migrate``: ``migrations.py``), with the
fields ``chatroom``, ``offset``, ``user``, ``message``, ``timestamp`` (epoch ms), and for a
membership change ``event`` and ``by`` (keywords; ``chatnode migrate`` adds them to an
existing index's mapping). Dead letters, the documents the archive refused, are kept in
``<prefix>-dead-letters`` (``schema/dead_letters_template.json``, also put by ``chatnode
migrate``), one per letter with ``_id`` its digest, the documents as ``binary`` (base64: kept
byte for byte).

Guarantees:

- **Idempotent store.** ``store`` sends one ``_bulk`` request of ``create`` actions with
  ``_id = "<room>:<offset>"``, each followed by the message's archive document as it came
  (``ChatMessage.document``: the document is the message's canonical JSON, made once when it
  was published; a document that is not one, or that holds a newline, is refused without
  being sent). The request asks for
  ``errors`` alone (a bulk that went through answers ``{"errors":false}``; listing every item's
  status cost ES ~1 µs per document, 5-15 % of its bulk rate); if some item failed (a version
  conflict too: a batch stored again after a retry or a takeover), the same bulk is sent again
  asking for each item's status, which is sound because storing is idempotent (an item the
  first request stored answers 409).
- **A version conflict is checked, never assumed.** An item answered 409 already has a
  document under its id: the stored ones are read back (one realtime ``_mget`` of the
  conflicting ids only; a bulk that went through costs nothing more) and compared with ours:
  ES keeps the ``_source`` it was sent, and encoded as archive documents are (compact, keys in
  order, non-ASCII as it is) a stored document we sent gives back its bytes; one encoded
  otherwise is compared field by field. The same message counts as stored; a different one (offsets reused after a Redis data loss) is reported as a
  ``CONFLICT`` carrying the stored document, which stays: the first stored version wins, as in
  the SQLite archive. An id answered 409 that holds nothing when read is ``Unavailable``
  (retried). An item ES may accept
  later (a write block, a full queue, a missing shard: any status but 400) fails the whole call
  with ``Unavailable``: the archiver retries the batch and acknowledges nothing ES did not
  accept. An item ES can never accept (400: the document does not fit the mapping) is
  reported by :class:`~chatnode.core.ports.ArchiveRefused` once every other item is stored.
  The first ``store`` of an archive checks that the index exists, so a node started before
  ``chatnode migrate`` never auto-creates it with wrong mappings.
- **Reads are ordered and complete.** ``read``/``tail`` filter on ``chatroom`` and an
  ``offset`` range and sort by ``offset``; beyond ES's 10,000-hit window they page with
  ``search_after``. They see what ``refresh()`` made visible (ES refreshes every second too).
- **Search** matches every word of the query in ``message`` (standard analyzer), filters on
  room, user and an inclusive time range, and ranks by score, then newest first. It returns
  messages only: a document with ``event`` (a membership change) never; reads and
  ``last_offset`` count membership changes like messages.

The archive talks to ES through :class:`~chatnode.adapters.elasticsearch.http.HttpPool` (why:
its module docstring, measured), with request bodies built in ``documents.py``: the bulk body
is one bytes format per document as the feed handed it out (its id read from the document's
head), ~0.45 µs per document, where encoding each message here would cost ~0.7 µs and
decoding the feed's entries into messages ~2.4 µs more. Each attempt is bounded by
``request_timeout_s``; a connection failure or timeout is retried ``max_retries`` times at
once. ``GET /`` is never called: the test distribution has no root endpoint; ``check()`` uses
``_cluster/health``. elasticsearch-py (``admin.py``) stays the admin client of ``chatnode
migrate`` and the tests.

Errors: connection errors, timeouts, 408/429/5xx answers, a missing index (run ``chatnode
migrate``) and a bulk item ES may accept later map to
:class:`~chatnode.core.errors.Unavailable`. Other answers (a malformed query) are bugs and
raise :class:`EsRequestError`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from chatnode.adapters.elasticsearch.documents import (
    BULK_FILTERS,
    SEARCH_SORT,
    bulk_body,
    bulk_outcome,
    dead_letter_of,
    dead_letter_source,
    message_of,
    range_query,
    same_document,
    search_query,
    stored_document,
    usable,
)
from chatnode.adapters.elasticsearch.http import (
    UNAVAILABLE_STATUSES,
    HttpPool,
    HttpResponse,
    HttpUnreachable,
)
from chatnode.adapters.elasticsearch.indices import dead_letters_index, messages_index
from chatnode.adapters.lifecycle import ClosesOnExit
from chatnode.core import errors, ports
from chatnode.core.models import (
    EVENT_FIELDS,
    MESSAGE_FIELDS,
    ChatMessage,
    DeadLetter,
    Refusal,
    RefusalKind,
    SearchHit,
    SearchQuery,
    document_key,
)

log = logging.getLogger(__name__)

MAX_WINDOW: Final = 10_000
"""ES's ``index.max_result_window``: the most hits one search returns."""

_SOURCE: Final = [*MESSAGE_FIELDS, *EVENT_FIELDS]
_BULK_ACCEPTED: Final = b'{"errors":false'
_MGET_FILTER: Final = "docs._id,docs.found,docs._source"
_DEAD_LETTER_SOURCE: Final = ["kind", "document", "reason", "stored", "kept_at"]
_DEAD_LETTER_SORT: Final = [{"kept_at": "asc"}, {"digest": "asc"}]
_HITS_FILTER: Final = "hits.hits._source,hits.hits._score"
_PAGED_HITS_FILTER: Final = _HITS_FILTER + ",hits.hits.sort"
_NDJSON: Final = "application/x-ndjson"


class EsRequestError(Exception):
    """ES refused a request for a reason retrying cannot fix (a bug: a malformed query)."""

    def __init__(self, action: str, status: int, body: bytes) -> None:
        super().__init__(f"Elasticsearch refused to {action} (HTTP {status}): {body[:500]!r}")
        self.status = status


@attrs.define(eq=False)
class EsArchive(ClosesOnExit):
    """``ports.Archive`` on an Elasticsearch index (see the module guarantees).

    Build with :meth:`from_url`; the archive owns its connections and ``aclose()`` closes them.
    """

    http: HttpPool
    index: str
    dead_letter_index: str
    request_timeout_s: float = 5.0
    max_retries: int = 1
    _index_seen: bool = attrs.field(default=False, init=False)
    _dead_letter_index_seen: bool = attrs.field(default=False, init=False)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str,
        request_timeout_s: float = 5.0,
        max_retries: int = 1,
    ) -> EsArchive:
        """An archive on ``<prefix>-messages`` (and ``<prefix>-dead-letters``) at ``url``;
        connects lazily.

        ``request_timeout_s`` bounds each HTTP attempt; a connection error or timeout is
        retried ``max_retries`` times at once.
        """
        return cls(
            HttpPool.from_url(url),
            messages_index(prefix),
            dead_letters_index(prefix),
            request_timeout_s,
            max_retries,
        )

    async def check(self) -> None:
        """Return if the archive index is searchable (health yellow or green)."""
        # A missing index answers 408 "red" at once with timeout=0s: read it, not raise.
        response = await self._request(
            "GET",
            f"/_cluster/health/{self.index}?timeout=0s&filter_path=status",
            action="report health",
            ok=(200, 408),
        )
        status = json.loads(response.body).get("status")
        if status not in ("green", "yellow"):
            raise errors.Unavailable(
                f"the archive index {self.index} is {status}: missing (run `chatnode migrate`) "
                "or its shards are not allocated"
            )

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.http.aclose()

    async def store(self, documents: Sequence[bytes]) -> None:
        refused: list[Refusal] = []
        try:
            body = bulk_body(documents)
        except ValueError:  # rare: sort the documents out only then
            documents, unusable = usable(documents)
            refused = [Refusal(RefusalKind.UNINDEXABLE, d, why) for d, why in unusable]
            body = bulk_body(documents)
        if documents:
            refused += await self._bulk(body, documents)
        else:
            await trio.lowlevel.checkpoint()
        if refused:
            raise ports.ArchiveRefused(refused)

    async def _bulk(self, body: bytes, documents: Sequence[bytes]) -> list[Refusal]:
        """Send a bulk body of ``documents``; the ones ES refused or holds another document
        for (module guarantees)."""
        if not self._index_seen:
            await self._require_index(self.index)
            self._index_seen = True
        for filter_path in BULK_FILTERS:
            response = await self._request(
                "POST",
                f"/{self.index}/_bulk?filter_path={filter_path}",
                body,
                action="store messages",
                content_type=_NDJSON,
            )
            if response.body.startswith(_BULK_ACCEPTED):
                return []
        outcome = bulk_outcome(json.loads(response.body))
        if outcome.retry:
            shown = " | ".join(outcome.retry[:3])
            raise errors.Unavailable(
                f"Elasticsearch rejected {len(outcome.retry)} of {len(documents)} messages: {shown}"
            )
        refused = [
            Refusal(RefusalKind.UNINDEXABLE, documents[i], reason) for i, reason in outcome.refused
        ]
        if outcome.conflicts:
            refused += await self._conflicts([documents[i] for i in outcome.conflicts])
        return refused

    async def _conflicts(self, documents: list[bytes]) -> list[Refusal]:
        """Of ``documents``, answered 409, those whose id holds a different message."""
        ids = [document_key(document).decode() for document in documents]
        response = await self._request(
            "POST",
            f"/{self.index}/_mget?realtime=true&filter_path={_MGET_FILTER}",
            json.dumps({"ids": list(dict.fromkeys(ids))}).encode(),
            action="read the stored versions of conflicting messages",
        )
        held = {
            doc["_id"]: doc["_source"]
            for doc in json.loads(response.body).get("docs", [])
            if doc.get("found")
        }
        conflicts: list[Refusal] = []
        for document, key in zip(documents, ids, strict=True):
            source = held.get(key)
            if source is None:
                raise errors.Unavailable(
                    f"Elasticsearch answered 409 for {key} and then held nothing under it"
                )
            if not same_document(document, source):
                conflicts.append(
                    Refusal(
                        RefusalKind.CONFLICT,
                        document,
                        f"HTTP 409: a different message is stored under {key}",
                        stored_document(source),
                    )
                )
        return conflicts

    async def keep_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            await trio.lowlevel.checkpoint()
            return
        if not self._dead_letter_index_seen:
            await self._require_index(self.dead_letter_index)
            self._dead_letter_index_seen = True
        body = b"".join(
            b'{"create":{"_id":"%b"}}\n%b\n' % (letter.digest.encode(), dead_letter_source(letter))
            for letter in letters
        )
        response = await self._request(
            "POST",
            f"/{self.dead_letter_index}/_bulk?filter_path={BULK_FILTERS[1]}",
            body,
            action="keep dead letters",
            content_type=_NDJSON,
        )
        outcome = bulk_outcome(json.loads(response.body))
        failed = outcome.retry + [reason for _, reason in outcome.refused]
        if failed:  # a letter already kept answers 409: kept
            raise errors.Unavailable(
                f"Elasticsearch kept {len(letters) - len(failed)} of {len(letters)} dead "
                f"letters: {' | '.join(failed[:3])}"
            )

    async def dead_letters(self, *, limit: int) -> list[DeadLetter]:
        if limit <= 0:
            await trio.lowlevel.checkpoint()
            return []
        await self._request(
            "POST", f"/{self.dead_letter_index}/_refresh", action="refresh the dead letters"
        )
        hits = await self._scan(
            {"match_all": {}},
            _DEAD_LETTER_SORT,
            limit,
            "read the dead letters",
            index=self.dead_letter_index,
            source=_DEAD_LETTER_SOURCE,
        )
        return [dead_letter_of(hit["_source"]) for hit in hits]

    async def _require_index(self, index: str) -> None:
        """A bulk write would auto-create a missing index with dynamic mappings that the real
        mapping could never replace: refuse until ``chatnode migrate`` made it."""
        response = await self._request(
            "HEAD", f"/{index}", action="find the archive index", ok=(200, 404)
        )
        if response.status == 404:
            raise errors.Unavailable(f"the index {index} does not exist; run `chatnode migrate`")

    async def refresh(self) -> None:
        await self._request("POST", f"/{self.index}/_refresh", action="refresh")

    async def read(
        self, room_id: int, *, after_offset: int, up_to_offset: int, limit: int
    ) -> list[ChatMessage]:
        if limit <= 0 or up_to_offset <= after_offset:
            await trio.lowlevel.checkpoint()
            return []
        query = range_query(room_id, {"gt": after_offset, "lte": up_to_offset})
        hits = await self._scan(query, [{"offset": "asc"}], limit, "read history")
        return [message_of(hit["_source"]) for hit in hits]

    async def tail(self, room_id: int, *, up_to_offset: int, limit: int) -> list[ChatMessage]:
        if limit <= 0:
            await trio.lowlevel.checkpoint()
            return []
        query = range_query(room_id, {"lte": up_to_offset})
        hits = await self._scan(query, [{"offset": "desc"}], limit, "read history")
        return [message_of(hit["_source"]) for hit in reversed(hits)]

    async def last_offset(self, room_id: int) -> int:
        query = {"term": {"chatroom": room_id}}
        hits = await self._scan(query, [{"offset": "desc"}], 1, "read the newest offset")
        return int(hits[0]["_source"]["offset"]) if hits else 0

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        if query.limit <= 0 or not query.text.strip() or query.rooms == ():
            await trio.lowlevel.checkpoint()
            return []
        hits = await self._scan(
            search_query(query), SEARCH_SORT, query.limit, "search", scored=True
        )
        return [SearchHit(message_of(hit["_source"]), float(hit["_score"] or 0.0)) for hit in hits]

    async def _scan(
        self,
        query: dict[str, Any],
        sort: list[dict[str, str]],
        limit: int,
        action: str,
        *,
        scored: bool = False,
        index: str | None = None,
        source: list[str] = _SOURCE,
    ) -> list[dict[str, Any]]:
        """The first ``limit`` hits in ``sort`` order, in pages of at most ``MAX_WINDOW``, of
        the messages' index unless ``index`` names another.

        ``sort`` must be a total order of the matching documents (it ends in ``offset``,
        unique per room), so ``search_after`` neither skips nor repeats a hit.
        """
        hits: list[dict[str, Any]] = []
        search_after: list[Any] | None = None
        hits_filter = _PAGED_HITS_FILTER if limit > MAX_WINDOW else _HITS_FILTER
        while len(hits) < limit:
            size = min(limit - len(hits), MAX_WINDOW)
            body: dict[str, Any] = {
                "query": query,
                "sort": sort,
                "size": size,
                "_source": source,
                "track_scores": scored,
                "track_total_hits": False,
            }
            if search_after is not None:
                body["search_after"] = search_after
            response = await self._request(
                "POST",
                f"/{index or self.index}/_search?filter_path={hits_filter}",
                json.dumps(body, separators=(",", ":")).encode(),
                action=action,
            )
            page: list[dict[str, Any]] = json.loads(response.body).get("hits", {}).get("hits", [])
            hits.extend(page)
            if len(page) < size or len(hits) >= limit:
                break
            search_after = page[-1]["sort"]
        return hits

    async def _request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        *,
        action: str,
        content_type: str = "application/json",
        ok: tuple[int, ...] = (200,),
    ) -> HttpResponse:
        """One request, each attempt bounded by ``request_timeout_s``, retried at once
        ``max_retries`` times if ES could not be reached; answers mapped per the module header."""
        failure = "no attempt"
        for _attempt in range(1 + self.max_retries):
            with trio.move_on_after(self.request_timeout_s):
                try:
                    response = await self.http.request(
                        method, target, body, content_type=content_type
                    )
                except HttpUnreachable as exc:
                    failure = str(exc)
                    continue
                if response.status in ok:
                    return response
                raise _answer_error(action, response)
            failure = f"no answer within {self.request_timeout_s}s"
        raise errors.Unavailable(f"Elasticsearch is unreachable ({action}): {failure}")


def _answer_error(action: str, response: HttpResponse) -> Exception:
    """The exception for an answer that is not a success (see the module header)."""
    if response.status in UNAVAILABLE_STATUSES:
        return errors.Unavailable(
            f"Elasticsearch could not {action} (HTTP {response.status}): {response.body[:300]!r}"
        )
    if response.status == 404 and b"index_not_found_exception" in response.body:
        return errors.Unavailable(
            f"the archive index is missing ({action}); run `chatnode migrate`"
        )
    return EsRequestError(action, response.status, response.body)


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(archive: EsArchive) -> ports.Archive:
        return archive
