"""The cluster Archive in Elasticsearch, one job per module; each imports its siblings by
their own module, never this package::

    archive      EsArchive: ports.Archive on the messages and dead-letters indices
    documents    the bodies sent and read back (bulk lines, outcomes, dead letters, queries)
    indices      the indices' names from the key prefix
    http         HttpPool: the keep-alive HTTP/1.1 client the archive's calls go through
    admin        elasticsearch-py as the admin client (migrations, tests)
    migrations   the index templates of ``schema/``, put by ``chatnode migrate``

The names below are the package's public face, for the composition root and the tests.
"""

from chatnode.adapters.elasticsearch.admin import es_client, es_errors
from chatnode.adapters.elasticsearch.archive import MAX_WINDOW, EsArchive, EsRequestError
from chatnode.adapters.elasticsearch.documents import bulk_body, bulk_outcome, usable
from chatnode.adapters.elasticsearch.indices import dead_letters_index, messages_index

__all__ = [
    "MAX_WINDOW",
    "EsArchive",
    "EsRequestError",
    "bulk_body",
    "bulk_outcome",
    "dead_letters_index",
    "es_client",
    "es_errors",
    "messages_index",
    "usable",
]
