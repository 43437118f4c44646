-- 0004: members' delivered and read cursors (MysqlDirectory.advance_cursors): how far each
-- member's client received and how far the member read, per room; only ever moving forward.
--
-- Safe on a database in use: a new table, nothing existing changes. No foreign keys: a
-- cursor of a former member stays (it is listed only while they are a member) and the
-- batched writes take no locks on users or rooms.

CREATE TABLE IF NOT EXISTS cursors (
    room_id BIGINT NOT NULL,
    user VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    delivered_offset BIGINT NOT NULL,
    read_offset BIGINT NOT NULL,
    PRIMARY KEY (room_id, user)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
