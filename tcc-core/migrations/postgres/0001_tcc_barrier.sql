-- The table of tcc's SQL participant barrier on PostgreSQL (tcc-core, `barrier::sql`), for teams
-- that run their own migrations. `SqlBarrier::migrate` runs these same statements (a test keeps
-- them equal); for another table name, replace `tcc_barrier` (and the index name `tcc_barrier_due`).
-- One row per (transaction, branch); instants are milliseconds since the Unix epoch.
CREATE TABLE IF NOT EXISTS tcc_barrier (
    gid TEXT NOT NULL,
    branch TEXT NOT NULL,
    state TEXT NOT NULL,
    deadline BIGINT NOT NULL,
    request BYTEA NOT NULL,
    result BYTEA NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (gid, branch)
);
CREATE INDEX IF NOT EXISTS tcc_barrier_due ON tcc_barrier (state, deadline);
