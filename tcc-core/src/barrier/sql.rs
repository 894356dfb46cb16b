//! The barrier for a participant whose business state lives in PostgreSQL or MySQL (MariaDB), on
//! sqlx: the barrier row and the business statements commit in one database transaction.
//!
//! SPEC SKELETON (to be implemented): signatures and contracts are fixed; bodies are not.
//!
//! One row per (gid, branch) in a table (default [`BarrierTable::DEFAULT`]) with the fields of
//! [`BarrierRecord`] as columns: `gid`, `branch` (primary key), `state` (the state's `as_str`),
//! `deadline` and `updated_at` (BIGINT milliseconds), `request` and `result` (bytes), plus an index on
//! (`state`, `deadline`) for the expiry sweep. Created by [`SqlBarrier::migrate`]; the same SQL ships
//! as `tcc-core/migrations/{postgres,mysql}/…sql` for teams that run their own migrations.
//!
//! Every call is: `BEGIN`; read the branch's row `FOR UPDATE`; [`decide`](super::decide); then
//! - a call that runs a business method gets a [`Pending`] holding the open transaction: the method
//!   runs its own statements on [`Pending::conn`], then [`Pending::commit`] writes the row and commits
//!   both, or dropping / [`Pending::rollback`] rolls both back (nothing stored: a later cancel is empty);
//! - a first call for a branch (no row) first inserts its row with "insert unless present"
//!   (`ON CONFLICT DO NOTHING` / `ON DUPLICATE KEY UPDATE` no-op): if another replica's call got
//!   there first (a try racing its cancel), the insert waits for that transaction and inserts
//!   nothing, and `begin` starts over and sees the row. The database's primary key decides, not a lock
//!   in this process;
//! - an empty cancel is recorded and committed by `begin` itself;
//! - duplicates, refusals and "nothing to expire" roll back at once.
//!
//! Serialization failures, deadlocks and lock-wait timeouts ([`SqlBarrierError::is_retryable`])
//! roll the whole call back; the caller (the participant runtime) runs it again, bounded.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::barrier::{BarrierRecord, DueReservation, Op, Refusal};
use crate::clock::Clock;
use crate::model::{BranchId, Gid};

/// A database the SQL barrier runs on: [`sqlx::Postgres`] (feature `sqlx-postgres`) or
/// [`sqlx::MySql`] (feature `sqlx-mysql`). Sealed; carries the dialect's statements.
pub trait SqlDatabase: sqlx::Database + sealed::Sealed {
    // Dialect: statements for a given table (private helpers).
}

mod sealed {
    pub trait Sealed {}
}

/// A barrier table's name, validated once (`[A-Za-z_][A-Za-z0-9_]*`, at most 63 bytes, optionally
/// `schema.table`), so it can be put into SQL text safely and is typed once, not repeated as strings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BarrierTable(Arc<str>);

impl BarrierTable {
    /// `tcc_barrier`.
    pub const DEFAULT: &'static str = "tcc_barrier";
    /// The name, if valid.
    pub fn new(name: &str) -> Result<BarrierTable, InvalidTableName> {
        todo!()
    }
    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for BarrierTable {
    fn default() -> BarrierTable {
        BarrierTable(Arc::from(BarrierTable::DEFAULT))
    }
}

/// A table name that is not a plain SQL identifier.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid barrier table name {0:?}: expected letters, digits and '_' (optionally schema.table), not starting with a digit, at most 63 bytes each"
)]
pub struct InvalidTableName(pub String);

/// The barrier of a participant on a SQL database. Cheap to clone (the pool is shared).
pub struct SqlBarrier<DB: SqlDatabase> {
    pool: sqlx::Pool<DB>,
    table: BarrierTable,
    clock: Arc<dyn Clock>,
    grace: Duration,
}

impl<DB: SqlDatabase> Clone for SqlBarrier<DB> {
    fn clone(&self) -> Self {
        SqlBarrier {
            pool: self.pool.clone(),
            table: self.table.clone(),
            clock: Arc::clone(&self.clock),
            grace: self.grace,
        }
    }
}

impl<DB: SqlDatabase> fmt::Debug for SqlBarrier<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
    }
}

impl<DB: SqlDatabase> SqlBarrier<DB> {
    /// The barrier over `pool`'s database, in `table`.
    pub fn new(pool: sqlx::Pool<DB>, table: BarrierTable, clock: Arc<dyn Clock>, grace: Duration) -> Self {
        todo!()
    }
    /// The pool.
    pub fn pool(&self) -> &sqlx::Pool<DB> {
        &self.pool
    }
    /// The table.
    pub fn table(&self) -> &BarrierTable {
        &self.table
    }
    /// The clock deadlines are decided with.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
    /// The grace period after a deadline before the participant releases a hold itself.
    pub fn grace(&self) -> Duration {
        self.grace
    }
    /// Creates the table and its index if missing (idempotent; safe to run from several replicas).
    pub async fn migrate(&self) -> Result<(), SqlBarrierError> {
        todo!()
    }
    /// The SQL [`migrate`](Self::migrate) runs, for this table name (statements separated by `;\n`).
    pub fn migration_sql(&self) -> String {
        todo!()
    }
    /// Starts a call: see the module docs. `op` is a try, confirm or cancel ([`Op::Expire`] goes
    /// through [`begin_expire`](Self::begin_expire)).
    pub async fn begin(
        &self,
        gid: &Gid,
        branch: &BranchId,
        op: Op<'_>,
    ) -> Result<Begun<DB>, SqlBarrierError> {
        todo!()
    }
    /// Starts the release of one due reservation: `BEGIN`, lock its row `FOR UPDATE SKIP LOCKED`,
    /// decide [`Op::Expire`]. `None` (rolled back) when another replica holds the row or the branch
    /// is not held and due any more.
    pub async fn begin_expire(&self, due: &DueReservation) -> Result<Option<Pending<DB>>, SqlBarrierError> {
        todo!()
    }
    /// Up to `limit` held reservations due for release (deadline + grace at or before now), earliest
    /// deadline first, read without locks.
    pub async fn due(&self, limit: usize) -> Result<Vec<DueReservation>, SqlBarrierError> {
        todo!()
    }
    /// The branch's stored record.
    pub async fn get(&self, gid: &Gid, branch: &BranchId) -> Result<Option<BarrierRecord>, SqlBarrierError> {
        todo!()
    }
    /// How many reservations are held (state tried).
    pub async fn held(&self) -> Result<u64, SqlBarrierError> {
        todo!()
    }
}

/// What [`SqlBarrier::begin`] found.
#[derive(Debug)]
pub enum Begun<DB: SqlDatabase> {
    /// Run the business method on [`Pending::conn`], then [`Pending::commit`].
    Run(Pending<DB>),
    /// Nothing to run; already rolled back or (empty cancel) committed.
    Answered(Answer),
}

/// A call answered without running a business method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The call already took effect: this is the stored record (a duplicate try replies its `result`).
    Duplicate(BarrierRecord),
    /// Empty cancel: recorded and committed; a later try is refused.
    Empty,
    /// Refused; nothing stored.
    Refused(Refusal),
}

/// A call whose business method is to run, holding its open database transaction (row locked).
/// Dropping it rolls back.
pub struct Pending<DB: SqlDatabase> {
    tx: sqlx::Transaction<'static, DB>,
    gid: Gid,
    branch: BranchId,
    /// The record to store on commit (for a try, `result` is filled in by `commit`).
    record: BarrierRecord,
    // plus whatever the implementation needs
}

impl<DB: SqlDatabase> fmt::Debug for Pending<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
    }
}

impl<DB: SqlDatabase> Pending<DB> {
    /// The connection of the open transaction: run the business statements on it
    /// (`sqlx::query(..).execute(pending.conn())`).
    pub fn conn(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }
    /// The open transaction itself.
    pub fn transaction(&mut self) -> &mut sqlx::Transaction<'static, DB> {
        &mut self.tx
    }
    /// The request bytes: the try's, or for confirm, cancel and expiry the stored ones.
    pub fn request(&self) -> &[u8] {
        &self.record.request
    }
    /// The record that commit stores.
    pub fn record(&self) -> &BarrierRecord {
        &self.record
    }
    /// The transaction / branch.
    pub fn gid(&self) -> &Gid {
        &self.gid
    }
    /// The branch.
    pub fn branch(&self) -> &BranchId {
        &self.branch
    }
    /// Writes the barrier row (for a try with `result` as its result bytes; ignored otherwise) and
    /// commits it with everything run on [`conn`](Self::conn). Returns the stored record.
    pub async fn commit(self, result: Vec<u8>) -> Result<BarrierRecord, SqlBarrierError> {
        todo!()
    }
    /// Rolls back the business statements; nothing is stored.
    pub async fn rollback(self) -> Result<(), SqlBarrierError> {
        todo!()
    }
}

/// A SQL barrier call failed; nothing was stored.
#[derive(Debug, thiserror::Error)]
pub enum SqlBarrierError {
    /// The branch's row is damaged (unknown state, negative instant...). Nothing ran.
    #[error("barrier row of transaction {gid} branch {branch} is unreadable: {reason}")]
    Corrupt {
        /// The transaction.
        gid: Gid,
        /// The branch.
        branch: BranchId,
        /// What is wrong.
        reason: String,
    },
    /// The database failed.
    #[error("barrier database: {0}")]
    Database(#[from] sqlx::Error),
}

impl SqlBarrierError {
    /// A serialization failure, deadlock or lock-wait timeout: run the whole call again.
    pub fn is_retryable(&self) -> bool {
        todo!()
    }
    /// `corrupt` or `storage`.
    pub fn code(&self) -> &'static str {
        todo!()
    }
}

/// Whether `e` is a serialization failure (PostgreSQL `40001`), a deadlock (`40P01`, MySQL 1213) or
/// a lock-wait timeout (MySQL 1205): the transaction was rolled back and may simply run again.
pub fn is_retryable(e: &sqlx::Error) -> bool {
    todo!()
}
