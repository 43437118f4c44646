"""The Elasticsearch schema: the index templates of ``schema/`` (package data), put in place.

For each index of the archive -- the messages (``schema/messages_template.json``,
``<prefix>-messages``) and the dead letters (``schema/dead_letters_template.json``,
``<prefix>-dead-letters``) -- :func:`migrate_elasticsearch` puts the index template for
``<index>*``, creates the index if missing (a concurrent creation counts as created), applies
the template's mappings to an existing index (new fields are added; a conflicting change fails
loudly with :class:`~chatnode.adapters.migration.MigrationError`) and waits until the index is
usable. Every step is idempotent. The nodes never create an index (its mapping would be
dynamic): they wait for this. The templates are read with ``importlib.resources``: an
installed wheel carries them.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, Final

import trio
from elasticsearch import ApiError, AsyncElasticsearch

from chatnode.adapters.elasticsearch.admin import es_client, es_errors
from chatnode.adapters.elasticsearch.indices import dead_letters_index, messages_index
from chatnode.adapters.migration import MigrationError

log = logging.getLogger(__name__)

SCHEMA_DIR: Final[Traversable] = resources.files("chatnode.adapters.elasticsearch") / "schema"
"""The shipped index templates (package data)."""
ES_TIMEOUT_S: Final = 30.0  # one request, and the wait for the new index to be allocated


def messages_template(
    prefix: str, template: Traversable = SCHEMA_DIR / "messages_template.json"
) -> dict[str, Any]:
    """The index template body for ``prefix`` (``${prefix}`` in its patterns substituted)."""
    messages_index(prefix)  # validates the prefix
    body: dict[str, Any] = json.loads(template.read_text(encoding="utf-8"))
    body["index_patterns"] = [p.replace("${prefix}", prefix) for p in body["index_patterns"]]
    return body


def dead_letters_template(prefix: str) -> dict[str, Any]:
    """The dead letters' index template body for ``prefix``."""
    return messages_template(prefix, SCHEMA_DIR / "dead_letters_template.json")


async def migrate_elasticsearch(url: str, prefix: str) -> bool:
    """Put the templates and create the indices if missing; return True if this call created
    the messages index. See the module docstring. Raises ``MigrationError`` (also for what
    Elasticsearch refused) or ``Unavailable``."""
    es = es_client(url, request_timeout_s=ES_TIMEOUT_S)
    try:
        created = await _migrate_index(es, messages_index(prefix), messages_template(prefix))
        await _migrate_index(es, dead_letters_index(prefix), dead_letters_template(prefix))
        return created
    except ApiError as exc:
        raise MigrationError(f"Elasticsearch refused a migration: {exc}") from exc
    finally:
        with trio.CancelScope(shield=True):
            await es.close()


async def _migrate_index(es: AsyncElasticsearch, index: str, template: dict[str, Any]) -> bool:
    """Put ``index``'s template, create it or update its mapping; whether this call created it."""
    with es_errors("put the index template"):
        await es.indices.put_index_template(name=index, body=template)
    created = True
    try:
        with es_errors(f"create the index {index}"):
            await es.indices.create(index=index)
    except ApiError as exc:
        if exc.error != "resource_already_exists_exception":
            raise
        created = False
    if created:
        log.info("created the Elasticsearch index %s", index)
    else:
        try:
            with es_errors(f"update the mapping of {index}"):
                await es.indices.put_mapping(index=index, body=template["template"]["mappings"])
        except ApiError as exc:
            raise MigrationError(
                f"the index {index} has a mapping chatnode cannot update in place: {exc}"
            ) from exc
    with es_errors(f"wait for the index {index}"):
        await es.cluster.health(
            index=index, wait_for_status="yellow", timeout=f"{int(ES_TIMEOUT_S)}s"
        )
    return created
