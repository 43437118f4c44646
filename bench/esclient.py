"""The bench's Elasticsearch client: plain HTTP/1.1 from the standard library, bulk bodies
sent as they are, and an index's own work counters."""

from __future__ import annotations

import json
import re
from typing import Any

from common import Http


class EsClient:
    def __init__(self, url: str) -> None:
        m = re.match(r"https?://([^:/]+):(\d+)", url)
        assert m, url
        self.http = Http(m.group(1), int(m.group(2)), timeout=120)

    def req(
        self, method: str, path: str, body: Any = None, ndjson: str | bytes | None = None
    ) -> Any:
        if ndjson is not None:
            import http.client

            for attempt in range(3):
                if self.http.conn is None:
                    self.http.conn = http.client.HTTPConnection(
                        self.http.host, self.http.port, timeout=120
                    )
                try:
                    self.http.conn.request(
                        method,
                        path,
                        body=ndjson.encode() if isinstance(ndjson, str) else ndjson,
                        headers={"Content-Type": "application/x-ndjson"},
                    )
                    resp = self.http.conn.getresponse()
                    return resp.status, json.loads(resp.read())
                except (OSError, http.client.HTTPException):
                    self.http.close()
                    if attempt == 2:
                        raise
            return None
        return self.http.request(method, path, body)

    def count(self, index: str, room: int) -> int:
        self.req("POST", f"/{index}/_refresh")
        status, body = self.req("POST", f"/{index}/_count", {"query": {"term": {"chatroom": room}}})
        return int(body.get("count", 0)) if status == 200 else -1


def index_work(es: EsClient, index: str) -> dict[str, Any]:
    """Where Elasticsearch's time went for ``index`` (its totals, from ``_stats``): indexing
    threads, refreshes, merges, flushes; to tell why a run cost ES more CPU per document."""
    status, body = es.req("GET", f"/{index}/_stats/indexing,refresh,merge,flush")
    if status != 200:
        return {}
    total = body.get("_all", {}).get("primaries", {})
    return {
        "index_ms": total.get("indexing", {}).get("index_time_in_millis", 0),
        "docs": total.get("indexing", {}).get("index_total", 0),
        "refreshes": total.get("refresh", {}).get("total", 0),
        "refresh_ms": total.get("refresh", {}).get("total_time_in_millis", 0),
        "merges": total.get("merges", {}).get("total", 0),
        "merge_ms": total.get("merges", {}).get("total_time_in_millis", 0),
        "flush_ms": total.get("flush", {}).get("total_time_in_millis", 0),
    }
