"""elasticsearch-py as the admin client (``chatnode migrate``, tests), made to work under Trio.

The archive's own calls go through ``http.py``; this client is for what runs rarely: index
templates, index creation, health, and the tests' inspection of what was stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import elastic_transport
from elastic_transport import HttpxAsyncHttpNode
from elasticsearch import ApiError, AsyncElasticsearch

from chatnode.adapters.elasticsearch.http import UNAVAILABLE_STATUSES
from chatnode.core import errors


def es_client(
    url: str, *, request_timeout_s: float = 5.0, max_retries: int = 1
) -> AsyncElasticsearch:
    """An elasticsearch-py ``AsyncElasticsearch`` that works under Trio, for administration.

    It uses the httpx async node, never sniffs (sniffing raises under Trio) and retries with
    ``retry_backoff_base=0`` (a backoff sleeps with ``asyncio.sleep``, which fails under Trio).
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
    """Map what means "Elasticsearch cannot serve this now" to ``Unavailable`` (for
    :func:`es_client` calls)."""
    try:
        yield
    except (elastic_transport.ConnectionError, elastic_transport.ConnectionTimeout) as exc:
        raise errors.Unavailable(f"Elasticsearch is unreachable ({action}): {exc}") from exc
    except ApiError as exc:
        if exc.meta.status in UNAVAILABLE_STATUSES:
            raise errors.Unavailable(
                f"Elasticsearch could not {action} (HTTP {exc.meta.status}): {exc.message}"
            ) from exc
        if exc.error == "index_not_found_exception":
            raise errors.Unavailable(
                f"the archive index is missing ({action}); run `chatnode migrate`"
            ) from exc
        raise
