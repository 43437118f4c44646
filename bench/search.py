"""Search through the API (nginx -> node -> Elasticsearch) against the node's exact query sent
straight to Elasticsearch, alternating."""

from __future__ import annotations

import time
from typing import Any

from common import Http, log
from esclient import EsClient
from settings import WORDS
from stats import pct
from systems import HOST, ChatnodeCluster


def es_body(word: str, room: int) -> dict[str, Any]:
    """The node's query (chatnode's Elasticsearch archive adapter)."""
    return {
        "query": {
            "bool": {
                "must": [{"match": {"message": {"query": word, "operator": "and"}}}],
                "filter": [{"term": {"chatroom": room}}],
            }
        },
        "sort": [
            {"_score": "desc"},
            {"timestamp": "desc"},
            {"chatroom": "asc"},
            {"offset": "desc"},
        ],
        "size": 20,
        "_source": ["chatroom", "offset", "user", "message", "timestamp"],
        "track_scores": True,
        "track_total_hits": False,
    }


def search_latency(
    cluster: ChatnodeCluster, es: EsClient, index: str, room: int, mode: dict[str, Any]
) -> dict[str, Any]:
    log("extras: search")
    api = Http(HOST, cluster.entry_port)
    api_ms: list[float] = []
    direct_ms: list[float] = []
    errors = 0
    for i in range(mode["search_samples"]):
        word = WORDS[i % len(WORDS)]
        t = time.perf_counter()
        status, body = api.request("GET", f"/v1/messages/search?q={word}&chatroom={room}")
        api_ms.append((time.perf_counter() - t) * 1000)
        if status != 200 or len(body.get("hits", [])) != 20:
            errors += 1
        t = time.perf_counter()
        status, body = es.req(
            "POST",
            f"/{index}/_search?filter_path=hits.hits._source,hits.hits._score,hits.hits.sort",
            es_body(word, room),
        )
        direct_ms.append((time.perf_counter() - t) * 1000)
        if status != 200:
            errors += 1
    api.close()
    search: dict[str, Any] = {
        "samples": len(api_ms),
        "errors": errors,
        "api_p50_ms": pct(api_ms, 0.5),
        "api_p99_ms": pct(api_ms, 0.99),
        "es_p50_ms": pct(direct_ms, 0.5),
        "es_p99_ms": pct(direct_ms, 0.99),
    }
    search["added_p50_ms"] = search["api_p50_ms"] - search["es_p50_ms"]
    return search
