-- 0002: accounts. Users get a stable id (AUTO_INCREMENT: never reused, MariaDB >= 10.2.4 and
-- MySQL >= 8.0 keep the counter across restarts; never TRUNCATE users), names become unique
-- ignoring case, and an account can revoke its tokens issued up to a time.
--
-- Names are unique by name_key: the name in lower case (the key chatnode computes,
-- validation.name_key, is exactly that for every name it accepts: ASCII after NFKC).
-- Existing accounts whose names collide ignoring case all stay ("don't lose data"): the
-- oldest (by created_at_ms, then name) keeps the plain key, the others are twins, keyed
-- "<key>#<name>" ('#' is in no valid name), reached by their exact name only.
--
-- MySQL has no ADD COLUMN IF NOT EXISTS: each ALTER is prepared only when its column is
-- missing, so the file can run again from its first statement. A twin created by a node of
-- the previous version while this ran (the unique key then fails to build) is marked by
-- running `chatnode migrate` again.

SET @ddl = IF((SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name = 'users' AND column_name = 'id') = 0, 'ALTER TABLE users ADD COLUMN id BIGINT NOT NULL AUTO_INCREMENT, ADD UNIQUE KEY users_by_id (id)', 'DO 0');
PREPARE ddl FROM @ddl;
EXECUTE ddl;
DEALLOCATE PREPARE ddl;

SET @ddl = IF((SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name = 'users' AND column_name = 'revoked_before_ms') = 0, 'ALTER TABLE users ADD COLUMN revoked_before_ms BIGINT NOT NULL DEFAULT 0', 'DO 0');
PREPARE ddl FROM @ddl;
EXECUTE ddl;
DEALLOCATE PREPARE ddl;

SET @ddl = IF((SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name = 'users' AND column_name = 'name_twin') = 0, 'ALTER TABLE users ADD COLUMN name_twin BOOLEAN NOT NULL DEFAULT FALSE', 'DO 0');
PREPARE ddl FROM @ddl;
EXECUTE ddl;
DEALLOCATE PREPARE ddl;

UPDATE users AS u
JOIN (
    SELECT name FROM (
        SELECT name, ROW_NUMBER() OVER (PARTITION BY LOWER(name) ORDER BY created_at_ms, name) AS n
        FROM users
    ) AS ranked
    WHERE n > 1
) AS twins ON twins.name = u.name
SET u.name_twin = TRUE;

SET @ddl = IF((SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name = 'users' AND column_name = 'name_key') = 0, 'ALTER TABLE users ADD COLUMN name_key VARCHAR(130) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin AS (IF(name_twin, CONCAT(LOWER(name), ''#'', name), LOWER(name))) STORED, ADD UNIQUE KEY users_by_name_key (name_key)', 'DO 0');
PREPARE ddl FROM @ddl;
EXECUTE ddl;
DEALLOCATE PREPARE ddl;
