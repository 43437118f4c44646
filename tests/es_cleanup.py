"""Removing a test run's Elasticsearch archive (indices and templates), shared by every suite
that creates one under a unique prefix."""

from __future__ import annotations

import trio

from chatnode.adapters.elasticsearch import dead_letters_index, es_client, messages_index


async def drop_es_prefix(url: str, prefix: str) -> None:
    """Delete ``<prefix>-messages``, ``<prefix>-dead-letters`` and their index templates;
    shielded, so a cancelled test still cleans up. Missing ones are fine."""
    with trio.CancelScope(shield=True):
        es = es_client(url, request_timeout_s=30.0)
        try:
            for index in (messages_index(prefix), dead_letters_index(prefix)):
                await es.indices.delete(index=index, ignore_unavailable=True)
                await es.options(ignore_status=404).indices.delete_index_template(name=index)
        finally:
            await es.close()
