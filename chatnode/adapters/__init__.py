"""Backends behind the ports of :mod:`chatnode.core.ports`, grouped by backend.

::

    sqlite/          embedded default: Directory, Bus, Archive (FTS5), Revocations on one file
    memory           in-process Presence, Tickets, RateLimits, Revocations
    mysql/           cluster Directory (and its schema)
    redis*, resp     cluster Bus, ArchiveFeed, Presence, Revocations, Tickets, RateLimits,
                     the directory's cache
    elasticsearch/   cluster Archive (and its index templates)
    lifecycle        ``async with`` for whatever has ``aclose()``
    migration        MigrationError, shared by the schema migrations

Rule: an adapter takes plain values (URLs, sizes, timeouts, key prefixes) and imports, of
chatnode, only ``core``, ``wire``, ``fdio`` and other adapters; ``chatnode/wiring.py`` reads
``Config`` and builds them (``tests/unit/test_layers.py`` holds the code to it). Nothing is
imported here: importing ``chatnode.adapters`` must not pull in a client library the
deployment did not install.
"""
