-- The table of tcc's SQL participant barrier on MySQL or MariaDB (tcc-core, `barrier::sql`), for
-- teams that run their own migrations. `SqlBarrier::migrate` runs this same statement (a test keeps
-- them equal); for another table name, replace `tcc_barrier` (and the index name `tcc_barrier_due`).
-- One row per (transaction, branch); instants are milliseconds since the Unix epoch. Ids are ASCII
-- and compared byte for byte (ascii_bin).
CREATE TABLE IF NOT EXISTS tcc_barrier (
    gid VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    branch VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    state VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    deadline BIGINT NOT NULL,
    request LONGBLOB NOT NULL,
    result LONGBLOB NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (gid, branch),
    KEY tcc_barrier_due (state, deadline)
) ENGINE=InnoDB;
