-- 0001: users, rooms and durable room membership (the Directory port).
--
-- Rules for every file in this directory (chatnode/adapters/migrations.py applies them):
--   * files run in name order; the number before the first "_" is the schema version;
--   * a file is never edited once released: change the schema with a new file;
--   * MySQL commits DDL implicitly, so a file interrupted half-way is run again from its
--     first statement: every statement must be safe to repeat (IF NOT EXISTS ...);
--   * a statement ends with ";" at the end of a line; "--" lines are comments.
--
-- Names compare exactly: utf8mb4_bin (code point order, so "Bob" < "alice"). utf8mb4_bin is
-- a PAD SPACE collation: "bob" and "bob " would compare equal, which user name validation
-- rules out (no spaces). Times are epoch milliseconds in BIGINT.

CREATE TABLE IF NOT EXISTS users (
    name VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    password_hash VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    is_admin BOOLEAN NOT NULL DEFAULT FALSE,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (name)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE IF NOT EXISTS rooms (
    id BIGINT NOT NULL AUTO_INCREMENT,
    name VARCHAR(1000) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin AUTO_INCREMENT = 1;

CREATE TABLE IF NOT EXISTS memberships (
    room_id BIGINT NOT NULL,
    user VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    joined_at_ms BIGINT NOT NULL,
    PRIMARY KEY (room_id, user),
    KEY memberships_by_user (user),
    CONSTRAINT memberships_room FOREIGN KEY (room_id) REFERENCES rooms (id) ON DELETE CASCADE,
    CONSTRAINT memberships_user FOREIGN KEY (user) REFERENCES users (name) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
