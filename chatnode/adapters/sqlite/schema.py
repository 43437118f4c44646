"""The embedded database's schema: its versions, and the upkeep of its tables.

Rules:

1. **Versions only go up, in one transaction.** Each step of :data:`MIGRATIONS` moves the schema
   one version up and is never edited once released; :func:`migrate` runs the steps the
   database lacks and records ``SCHEMA_VERSION``, all in one transaction, and refuses a
   database newer than this chatnode.
2. **The full-text index is kept in batches.** An insert into ``messages`` lists the row in
   ``messages_fts_pending``; :func:`index_pending` adds every listed row to the FTS5 index in
   one transaction (the runner's upkeep, and every search first). Indexing a message with the
   others of its batch costs ~3 us; an FTS5 trigger indexing each in its own commit doubled
   the append (8.4 WAL pages, ~80 us instead of ~40 us of CPU per message). The delete and
   update triggers keep the index exact for listed and indexed rows alike.
3. **Client ids expire.** :func:`forget_expired_sends` drops the ``sent_ids`` whose dedup
   window ended (the runner's upkeep).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Final

from chatnode.adapters.sqlite.transaction import Transaction

# Each step moves the schema one version up; a step is never edited once released.
# ``messages`` has its own INTEGER PRIMARY KEY because the FTS5 index refers to rows by rowid,
# and VACUUM may renumber an implicit rowid; ``(room_id, offset)`` is its unique key.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE users (
            name TEXT PRIMARY KEY,
            password_hash TEXT NOT NULL,
            is_admin INTEGER NOT NULL DEFAULT 0,
            created_at_ms INTEGER NOT NULL
        )""",
        """CREATE TABLE rooms (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            created_at_ms INTEGER NOT NULL
        )""",
        """CREATE TABLE memberships (
            room_id INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
            user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
            PRIMARY KEY (room_id, user)
        ) WITHOUT ROWID""",
        "CREATE INDEX memberships_by_user ON memberships(user)",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            room_id INTEGER NOT NULL,
            "offset" INTEGER NOT NULL,
            user TEXT NOT NULL,
            text TEXT NOT NULL,
            timestamp_ms INTEGER NOT NULL,
            UNIQUE (room_id, "offset")
        )""",
        "CREATE INDEX messages_by_user ON messages(user, timestamp_ms)",
        """CREATE VIRTUAL TABLE messages_fts USING fts5(
            text, content='messages', content_rowid='id',
            tokenize='unicode61 remove_diacritics 2'
        )""",
        """CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text);
        END""",
        """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text);
        END""",
        """CREATE TRIGGER messages_fts_update AFTER UPDATE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text);
            INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text);
        END""",
    ),
    # 2: the FTS5 index is brought up to date in batches (rule 2), not per insert.
    (
        "DROP TRIGGER messages_fts_insert",
        "DROP TRIGGER messages_fts_delete",
        "DROP TRIGGER messages_fts_update",
        "CREATE TABLE messages_fts_pending (id INTEGER PRIMARY KEY)",
        """CREATE TRIGGER messages_fts_pending_insert AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts_pending(id) VALUES (new.id);
        END""",
        """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, text) SELECT 'delete', old.id, old.text
                WHERE NOT EXISTS (SELECT 1 FROM messages_fts_pending WHERE id = old.id);
            DELETE FROM messages_fts_pending WHERE id = old.id;
        END""",
        """CREATE TRIGGER messages_fts_update AFTER UPDATE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, text) SELECT 'delete', old.id, old.text
                WHERE NOT EXISTS (SELECT 1 FROM messages_fts_pending WHERE id = old.id);
            INSERT INTO messages_fts(rowid, text) SELECT new.id, new.text
                WHERE NOT EXISTS (SELECT 1 FROM messages_fts_pending WHERE id = old.id);
            UPDATE messages_fts_pending SET id = new.id WHERE id = old.id;
        END""",
    ),
    # 3: the client ids of recent sends (idempotent send: ``SqliteBus``, dedup window).
    (
        """CREATE TABLE sent_ids (
            room_id INTEGER NOT NULL,
            user TEXT NOT NULL,
            client_id TEXT NOT NULL,
            "offset" INTEGER NOT NULL,
            expires_at_ms INTEGER NOT NULL,
            PRIMARY KEY (room_id, user, client_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX sent_ids_by_expiry ON sent_ids(expires_at_ms)",
    ),
    # 4: documents the archive refused, kept for repair (``SqliteArchive.keep_dead_letters``).
    (
        """CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY,
            digest TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            document BLOB NOT NULL,
            reason TEXT NOT NULL,
            stored BLOB,
            kept_at_ms INTEGER NOT NULL
        )""",
    ),
    # 5: accounts and revocations (``SqliteDirectory`` rule 1, ``SqliteRevocations``).
    # Existing users get ids in row order, and keys: where names collide by key, the oldest
    # account keeps the plain key, the others get "<key>#<name>" ('#' is in no valid name),
    # so every account stays, reached by its exact name.
    (
        "ALTER TABLE users ADD COLUMN id INTEGER",
        "ALTER TABLE users ADD COLUMN name_key TEXT",
        "ALTER TABLE users ADD COLUMN revoked_before_ms INTEGER NOT NULL DEFAULT 0",
        "UPDATE users SET id = rowid",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
        "INSERT INTO counters (name, value) SELECT 'account_id', COALESCE(MAX(id), 0) FROM users",
        """UPDATE users SET name_key = ranked.name_key FROM (
            SELECT name, CASE
                WHEN ROW_NUMBER() OVER (
                    PARTITION BY chatnode_name_key(name) ORDER BY created_at_ms, name
                ) = 1 THEN chatnode_name_key(name)
                ELSE chatnode_name_key(name) || '#' || name
            END AS name_key FROM users
        ) AS ranked WHERE users.name = ranked.name""",
        "CREATE UNIQUE INDEX users_by_id ON users(id)",
        "CREATE UNIQUE INDEX users_by_name_key ON users(name_key)",
        """CREATE TABLE revocations (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            at_ms INTEGER NOT NULL,
            expires_at_ms INTEGER NOT NULL,
            account_id INTEGER NOT NULL,
            token_id TEXT NOT NULL
        )""",
        "CREATE INDEX revocations_by_token ON revocations(token_id)",
        "CREATE INDEX revocations_by_account ON revocations(account_id, at_ms)",
        "CREATE INDEX revocations_by_kind ON revocations(kind, at_ms)",
        "CREATE INDEX revocations_by_expiry ON revocations(expires_at_ms)",
    ),
    # 6: who may see and be in a room (``SqliteDirectory`` rule 3). Existing rooms are public,
    # existing members are members (no room recorded its creator before).
    (
        "ALTER TABLE rooms ADD COLUMN visibility TEXT NOT NULL DEFAULT 'public'",
        "ALTER TABLE rooms ADD COLUMN created_by TEXT",
        "ALTER TABLE rooms ADD COLUMN direct_key TEXT",
        "CREATE UNIQUE INDEX rooms_by_direct_key ON rooms(direct_key)",
        "CREATE INDEX rooms_by_visibility ON rooms(visibility, id)",
        "ALTER TABLE memberships ADD COLUMN role TEXT NOT NULL DEFAULT 'member'",
        "ALTER TABLE memberships ADD COLUMN joined_at_ms INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX memberships_by_user_joined ON memberships(user, joined_at_ms)",
        """CREATE TABLE bans (
            room_id INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
            user TEXT NOT NULL,
            by_user TEXT NOT NULL,
            at_ms INTEGER NOT NULL,
            PRIMARY KEY (room_id, user)
        ) WITHOUT ROWID""",
    ),
    # 7: a membership change is a message of its room (``chatnode.core.models``): its
    # ``event`` and who made it, ``by_user``; both NULL for a message (every existing row).
    (
        "ALTER TABLE messages ADD COLUMN event TEXT",
        "ALTER TABLE messages ADD COLUMN by_user TEXT",
    ),
    # 8: members' delivered and read cursors (``SqliteDirectory.advance_cursors``).
    (
        """CREATE TABLE cursors (
            room_id INTEGER NOT NULL,
            user TEXT NOT NULL,
            delivered_offset INTEGER NOT NULL,
            read_offset INTEGER NOT NULL,
            PRIMARY KEY (room_id, user)
        ) WITHOUT ROWID""",
    ),
)

SCHEMA_VERSION: Final = len(MIGRATIONS)


def index_pending(conn: sqlite3.Connection) -> None:
    """Add the messages listed in ``messages_fts_pending`` to the FTS5 index, one transaction."""
    if conn.execute("SELECT 1 FROM messages_fts_pending LIMIT 1").fetchone() is None:
        return
    with Transaction(conn):
        conn.execute(
            "INSERT INTO messages_fts(rowid, text) SELECT m.id, m.text"
            " FROM messages_fts_pending AS p JOIN messages AS m ON m.id = p.id ORDER BY p.id"
        )
        conn.execute("DELETE FROM messages_fts_pending")


def forget_expired_sends(conn: sqlite3.Connection) -> None:
    """Drop the client ids whose dedup window ended (upkeep, rule 3)."""
    with Transaction(conn):
        conn.execute(
            "DELETE FROM sent_ids WHERE expires_at_ms <= ?", (time.time_ns() // 1_000_000,)
        )


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to ``SCHEMA_VERSION`` in one transaction; a no-op when it is there."""
    with Transaction(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
        )
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        current = 0 if row is None else int(row[0])
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"the database has schema version {current}, newer than this chatnode's "
                f"{SCHEMA_VERSION}: upgrade chatnode"
            )
        for step in MIGRATIONS[current:]:
            for statement in step:
                conn.execute(statement)
        conn.execute(
            "INSERT OR REPLACE INTO schema_version (id, version) VALUES (1, ?)", (SCHEMA_VERSION,)
        )
