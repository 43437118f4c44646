"""The embedded backend: Directory, Archive, Bus and Revocations on one SQLite database.

One job per module; each imports its siblings by their own module, never this package::

    runner        SqliteDatabase: the connection, the calls on it, upkeep, private files
    errors        what a failing SQLite call means (Unavailable or a bug)
    transaction   one write transaction
    schema        the schema's versions, the full-text index and client-id upkeep
    messages      the messages table: the room log and the archive are one
    directory     SqliteDirectory (users, rooms, memberships)
    revocations   SqliteRevocations
    archive       SqliteArchive (FTS5 search, dead letters)
    broker        LocalBroker: the order of deliveries to the buses of one database
    bus           SqliteBus

The database does not own the broker: the composition root (``chatnode/wiring.py``) gives
every bus of one database the same :class:`LocalBroker`. The names below are the package's
public face, for the composition root and the tests.
"""

from chatnode.adapters.sqlite.archive import SqliteArchive, fts_match_expression
from chatnode.adapters.sqlite.broker import LocalBroker
from chatnode.adapters.sqlite.bus import SqliteBus
from chatnode.adapters.sqlite.directory import SqliteDirectory
from chatnode.adapters.sqlite.revocations import SqliteRevocations
from chatnode.adapters.sqlite.runner import SqliteDatabase
from chatnode.adapters.sqlite.schema import MIGRATIONS, SCHEMA_VERSION

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "LocalBroker",
    "SqliteArchive",
    "SqliteBus",
    "SqliteDatabase",
    "SqliteDirectory",
    "SqliteRevocations",
    "fts_match_expression",
]
