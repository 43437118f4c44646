"""The cluster Archive: every message in Elasticsearch, searchable (elasticsearch-py, async).

One document per message in the index ``<prefix>-messages`` (mapping and settings:
``migrations/elasticsearch/messages_template.json``, put by ``chatnode migrate``), with the
seed's fields ``chatroom``, ``user``, ``message``, ``timestamp`` (epoch ms) plus ``offset``.

Guarantees:

- **Idempotent store.** ``store`` sends one ``_bulk`` request of ``create`` actions with
  ``_id = "<room>:<offset>"``: storing a message again is a version conflict, which counts as
  stored, and the first stored version wins (as in the SQLite archive). Any other item failure
  fails the whole call with ``Unavailable``: the archiver retries the batch and acknowledges
  nothing ES did not accept. The first ``store`` of an archive checks that the index exists,
  so a node started before ``chatnode migrate`` never auto-creates it with wrong mappings.
- **Reads are ordered and complete.** ``read``/``tail`` filter on ``chatroom`` and an
  ``offset`` range and sort by ``offset``; beyond ES's 10,000-hit window they page with
  ``search_after``. They see what ``refresh()`` made visible (ES refreshes every second too).
- **Search** matches every word of the query in ``message`` (standard analyzer), filters on
  room, user and an inclusive time range, and ranks by score, then newest first.

Running under Trio: the client uses the httpx async node (``node_class="httpxasync"``), never
sniffs (sniffing raises under Trio) and retries with ``retry_backoff_base=0`` (a backoff sleeps
with ``asyncio.sleep``, which fails under Trio). ``GET /`` is never called (``info``/``ping``):
the test distribution has no root endpoint; ``check()`` uses ``_cluster/health``.

Errors: connection errors, timeouts, 408/429/5xx answers, a missing index (run ``chatnode
migrate``) and a rejected bulk item map to :class:`~chatnode.core.errors.Unavailable`. Other
API errors (a malformed query) are bugs and propagate.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

import attrs
import elastic_transport
import trio
from elastic_transport import HttpxAsyncHttpNode
from elasticsearch import ApiError, AsyncElasticsearch

from chatnode.adapters.lifecycle import ClosesOnExit
from chatnode.core import errors, ports
from chatnode.core.models import ChatMessage, SearchHit, SearchQuery

log = logging.getLogger(__name__)

MAX_WINDOW: Final = 10_000
"""ES's ``index.max_result_window``: the most hits one search returns."""

_PREFIX_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.\-]*")
_UNAVAILABLE_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})
_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")
_SOURCE: Final = ["chatroom", "offset", "user", "message", "timestamp"]


def messages_index(prefix: str) -> str:
    """The archive index for ``prefix``; raise ``ValueError`` if ES would refuse the name."""
    if not _PREFIX_RE.fullmatch(prefix) or len(prefix) > 200:
        raise ValueError(
            f"the index prefix {prefix!r} must be lowercase letters, digits, '_', '.', '-' "
            "(an Elasticsearch index name)"
        )
    return f"{prefix}-messages"


def es_client(
    url: str, *, request_timeout_s: float = 5.0, max_retries: int = 1
) -> AsyncElasticsearch:
    """An ``AsyncElasticsearch`` that works under Trio (see the module header).

    Nothing connects until the first request.
    """
    return AsyncElasticsearch(
        url,
        node_class=HttpxAsyncHttpNode,
        request_timeout=request_timeout_s,
        retry_on_timeout=True,
        max_retries=max_retries,
        retry_backoff_base=0,
        retry_backoff_cap=0,
        sniff_on_start=False,
        sniff_on_node_failure=False,
        sniff_before_requests=False,
    )


@contextmanager
def es_errors(action: str) -> Iterator[None]:
    """Map what means "Elasticsearch cannot serve this now" to ``Unavailable``."""
    try:
        yield
    except (elastic_transport.ConnectionError, elastic_transport.ConnectionTimeout) as exc:
        raise errors.Unavailable(f"Elasticsearch is unreachable ({action}): {exc}") from exc
    except ApiError as exc:
        if exc.meta.status in _UNAVAILABLE_STATUSES:
            raise errors.Unavailable(
                f"Elasticsearch could not {action} (HTTP {exc.meta.status}): {exc.message}"
            ) from exc
        if exc.error == "index_not_found_exception":
            raise errors.Unavailable(
                f"the archive index is missing ({action}); run `chatnode migrate`"
            ) from exc
        raise


def _clean(text: str) -> str:
    """``text`` as valid UTF-8: a lone surrogate (JSON allows "\\ud800") becomes U+FFFD."""
    return _SURROGATE_RE.sub("\ufffd", text)


def _document(message: ChatMessage) -> dict[str, Any]:
    return {
        "chatroom": message.room_id,
        "offset": message.offset,
        "user": _clean(message.user),
        "message": _clean(message.text),
        "timestamp": message.timestamp_ms,
    }


def _message(source: dict[str, Any]) -> ChatMessage:
    return ChatMessage(
        int(source["chatroom"]),
        int(source["offset"]),
        str(source["user"]),
        str(source["message"]),
        int(source["timestamp"]),
    )


def bulk_failures(response: dict[str, Any]) -> list[str]:
    """The reasons of the bulk items that failed, a version conflict (already stored) aside."""
    if not response.get("errors"):
        return []
    failures = []
    for item in response.get("items", []):
        (result,) = item.values()
        status = int(result.get("status", 0))
        if status < 300 or status == 409:
            continue
        error = result.get("error") or {}
        reason = error.get("reason") if isinstance(error, dict) else str(error)
        kind = error.get("type") if isinstance(error, dict) else "error"
        failures.append(f"{result.get('_id')}: HTTP {status} {kind}: {reason}")
    return failures


@attrs.define(eq=False)
class EsArchive(ClosesOnExit):
    """``ports.Archive`` on an Elasticsearch index (see the module guarantees).

    Build with :meth:`from_url`; the archive owns its client and ``aclose()`` closes it.
    """

    es: AsyncElasticsearch
    index: str
    _closed: bool = attrs.field(default=False, init=False)
    _index_seen: bool = attrs.field(default=False, init=False)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str,
        request_timeout_s: float = 5.0,
        max_retries: int = 1,
    ) -> EsArchive:
        """An archive on ``<prefix>-messages`` at ``url``; connects lazily.

        ``request_timeout_s`` bounds each HTTP attempt; a connection error or timeout is
        retried ``max_retries`` times at once (no backoff under Trio).
        """
        index = messages_index(prefix)
        return cls(
            es_client(url, request_timeout_s=request_timeout_s, max_retries=max_retries), index
        )

    async def check(self) -> None:
        """Return if the archive index is searchable (health yellow or green)."""
        with es_errors("report health"):
            # A missing index answers 408 "red" at once with timeout=0s: read it, not raise.
            health = await self.es.options(ignore_status=408).cluster.health(
                index=self.index, timeout="0s"
            )
        status = health.get("status")
        if status not in ("green", "yellow"):
            raise errors.Unavailable(
                f"the archive index {self.index} is {status}: missing (run `chatnode migrate`) "
                "or its shards are not allocated"
            )

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            await self.es.close()

    async def store(self, messages: Sequence[ChatMessage]) -> None:
        if not messages:
            await trio.lowlevel.checkpoint()
            return
        if not self._index_seen:
            # A bulk write would auto-create a missing index with dynamic mappings that the
            # real mapping could never replace: refuse until `chatnode migrate` made it.
            with es_errors("find the archive index"):
                exists = await self.es.indices.exists(index=self.index)
            if not exists:
                raise errors.Unavailable(
                    f"the archive index {self.index} does not exist; run `chatnode migrate`"
                )
            self._index_seen = True
        operations: list[dict[str, Any]] = []
        for message in messages:
            operations.append({"create": {"_id": message.key}})
            operations.append(_document(message))
        with es_errors("store messages"):
            response = await self.es.bulk(
                index=self.index,
                operations=operations,
                filter_path=["errors", "items.*._id", "items.*.status", "items.*.error"],
            )
        failures = bulk_failures(dict(response))
        if failures:
            shown = " | ".join(failures[:3])
            raise errors.Unavailable(
                f"Elasticsearch rejected {len(failures)} of {len(messages)} messages: {shown}"
            )

    async def refresh(self) -> None:
        with es_errors("refresh"):
            await self.es.indices.refresh(index=self.index)

    async def read(
        self, room_id: int, *, after_offset: int, up_to_offset: int, limit: int
    ) -> list[ChatMessage]:
        if limit <= 0 or up_to_offset <= after_offset:
            await trio.lowlevel.checkpoint()
            return []
        query = self._range_query(room_id, {"gt": after_offset, "lte": up_to_offset})
        hits = await self._scan(query, [{"offset": "asc"}], limit, "read history")
        return [_message(hit["_source"]) for hit in hits]

    async def tail(self, room_id: int, *, up_to_offset: int, limit: int) -> list[ChatMessage]:
        if limit <= 0:
            await trio.lowlevel.checkpoint()
            return []
        query = self._range_query(room_id, {"lte": up_to_offset})
        hits = await self._scan(query, [{"offset": "desc"}], limit, "read history")
        return [_message(hit["_source"]) for hit in reversed(hits)]

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        if query.limit <= 0 or not query.text.strip():
            await trio.lowlevel.checkpoint()
            return []
        filters: list[dict[str, Any]] = []
        if query.room_id is not None:
            filters.append({"term": {"chatroom": query.room_id}})
        if query.user is not None:
            filters.append({"term": {"user": _clean(query.user)}})
        if query.from_ms is not None or query.to_ms is not None:
            bounds = {"gte": query.from_ms, "lte": query.to_ms}
            filters.append(
                {"range": {"timestamp": {k: v for k, v in bounds.items() if v is not None}}}
            )
        es_query = {
            "bool": {
                "must": [{"match": {"message": {"query": _clean(query.text), "operator": "and"}}}],
                "filter": filters,
            }
        }
        sort = [
            {"_score": "desc"},
            {"timestamp": "desc"},
            {"chatroom": "asc"},
            {"offset": "desc"},
        ]
        hits = await self._scan(es_query, sort, query.limit, "search", scored=True)
        return [SearchHit(_message(hit["_source"]), float(hit["_score"] or 0.0)) for hit in hits]

    @staticmethod
    def _range_query(room_id: int, offsets: dict[str, int]) -> dict[str, Any]:
        return {
            "bool": {"filter": [{"term": {"chatroom": room_id}}, {"range": {"offset": offsets}}]}
        }

    async def _scan(
        self,
        query: dict[str, Any],
        sort: list[dict[str, str]],
        limit: int,
        action: str,
        *,
        scored: bool = False,
    ) -> list[dict[str, Any]]:
        """The first ``limit`` hits in ``sort`` order, in pages of at most ``MAX_WINDOW``.

        ``sort`` must be a total order of the matching documents (it ends in ``offset``,
        unique per room), so ``search_after`` neither skips nor repeats a hit.
        """
        hits: list[dict[str, Any]] = []
        search_after: list[Any] | None = None
        while len(hits) < limit:
            size = min(limit - len(hits), MAX_WINDOW)
            with es_errors(action):
                response = await self.es.search(
                    index=self.index,
                    query=query,
                    sort=sort,
                    size=size,
                    search_after=search_after,
                    source_includes=_SOURCE,
                    track_scores=scored,
                    track_total_hits=False,
                    filter_path=["hits.hits._source", "hits.hits._score", "hits.hits.sort"],
                )
            page: list[dict[str, Any]] = response.get("hits", {}).get("hits", [])
            hits.extend(page)
            if len(page) < size:
                break
            search_after = page[-1]["sort"]
        return hits


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(archive: EsArchive) -> ports.Archive:
        return archive
