-- 0003: who may see and be in a room. Rooms get a visibility (public, private, direct), the
-- name of their creator and, for a direct room, the key of its pair of accounts (unique:
-- one room per pair, decided by the server however many nodes ask at once); members get a
-- role (owner, admin, member); a room keeps its bans.
--
-- Safe on a database in use: existing rooms become public (the column's default), existing
-- members members (the role's default); no room recorded its creator before, so none gets
-- an owner. Each ALTER is prepared only when its column or key is missing, so the file can
-- run again from its first statement (MySQL has no ADD COLUMN IF NOT EXISTS).

SET @ddl = IF((SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name = 'rooms' AND column_name = 'visibility') = 0, 'ALTER TABLE rooms ADD COLUMN visibility VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT ''public''', 'DO 0');
PREPARE ddl FROM @ddl;
EXECUTE ddl;
DEALLOCATE PREPARE ddl;

SET @ddl = IF((SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema = DATABASE() AND table_name = 'rooms' AND index_name = 'rooms_by_visibility') = 0, 'ALTER TABLE rooms ADD KEY rooms_by_visibility (visibility, id)', 'DO 0');
PREPARE ddl FROM @ddl;
EXECUTE ddl;
DEALLOCATE PREPARE ddl;

SET @ddl = IF((SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name = 'rooms' AND column_name = 'created_by') = 0, 'ALTER TABLE rooms ADD COLUMN created_by VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL', 'DO 0');
PREPARE ddl FROM @ddl;
EXECUTE ddl;
DEALLOCATE PREPARE ddl;

SET @ddl = IF((SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name = 'rooms' AND column_name = 'direct_key') = 0, 'ALTER TABLE rooms ADD COLUMN direct_key VARCHAR(48) CHARACTER SET ascii COLLATE ascii_bin NULL, ADD UNIQUE KEY rooms_by_direct_key (direct_key)', 'DO 0');
PREPARE ddl FROM @ddl;
EXECUTE ddl;
DEALLOCATE PREPARE ddl;

SET @ddl = IF((SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name = 'memberships' AND column_name = 'role') = 0, 'ALTER TABLE memberships ADD COLUMN role VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT ''member''', 'DO 0');
PREPARE ddl FROM @ddl;
EXECUTE ddl;
DEALLOCATE PREPARE ddl;

SET @ddl = IF((SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema = DATABASE() AND table_name = 'memberships' AND index_name = 'memberships_by_user_joined') = 0, 'ALTER TABLE memberships ADD KEY memberships_by_user_joined (user, joined_at_ms)', 'DO 0');
PREPARE ddl FROM @ddl;
EXECUTE ddl;
DEALLOCATE PREPARE ddl;

CREATE TABLE IF NOT EXISTS bans (
    room_id BIGINT NOT NULL,
    user VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    by_user VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (room_id, user),
    CONSTRAINT bans_room FOREIGN KEY (room_id) REFERENCES rooms (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
