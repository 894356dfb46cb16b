//! The barrier for a participant whose business state lives in PostgreSQL or MySQL (MariaDB), on
//! sqlx: the barrier row and the business statements commit in one database transaction.
//!
//! One row per (gid, branch) in a table (default [`BarrierTable::DEFAULT`]) with the fields of
//! [`BarrierRecord`] as columns: `gid`, `branch` (primary key), `state` (the state's `as_str`),
//! `deadline` and `updated_at` (BIGINT milliseconds), `request` and `result` (bytes), plus an index on
//! (`state`, `deadline`) for the expiry sweep. Created by [`SqlBarrier::migrate`]; the same SQL ships
//! as `tcc-core/migrations/{postgres,mysql}/0001_tcc_barrier.sql` for teams that run their own
//! migrations.
//!
//! Every call is: `BEGIN`; read the branch's row `FOR UPDATE`; [`decide`]; then
//! - a call that runs a business method gets a [`Pending`] holding the open transaction: the method
//!   runs its own statements on [`Pending::conn`], then [`Pending::commit`] writes the row and commits
//!   both, or dropping / [`Pending::rollback`] rolls both back (nothing stored: a later cancel is empty);
//! - a first call for a branch (no row) first inserts its row with "insert unless present"
//!   (`ON CONFLICT DO NOTHING` / `ON DUPLICATE KEY UPDATE`): if another replica's call got
//!   there first (a try racing its cancel), the insert waits for that transaction and inserts
//!   nothing, and `begin` starts over and sees the row. The database's primary key decides, not a lock
//!   in this process. A try, nearly always the first call, skips the read and inserts straight
//!   away (a round trip fewer); when the row was there after all, it rolls back and reads it;
//! - an empty cancel is recorded and committed by `begin` itself;
//! - duplicates, refusals and "nothing to expire" roll back at once.
//!
//! Serialization failures, deadlocks and lock-wait timeouts ([`SqlBarrierError::is_retryable`])
//! roll the whole call back; the caller (the participant runtime) runs it again, bounded.
//!
//! On MySQL every barrier transaction runs at `READ COMMITTED`: at InnoDB's default `REPEATABLE
//! READ`, `SELECT ... FOR UPDATE` of a missing row takes a gap lock, and concurrent first calls of
//! unrelated branches (whose keys fall into the same gap) would deadlock each other on insert.
//! The expiry sweep needs `FOR UPDATE SKIP LOCKED`: PostgreSQL 9.5, MySQL 8.0, MariaDB 10.6 or later.
//!
//! PostgreSQL transactions run at the database's default level (`READ COMMITTED` unless changed; a
//! stricter level only adds serialization failures, which are retryable).
//!
//! ```no_run
//! # #[cfg(feature = "sqlx-postgres")]
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tcc_core::barrier::Op;
//! use tcc_core::barrier::sql::{Answer, BarrierTable, Begun, SqlBarrier};
//! use tcc_core::{BranchId, Clock, Gid, SystemClock};
//!
//! let pool = sqlx::PgPool::connect("postgres://localhost/flights").await?;
//! let clock: Arc<dyn Clock> = Arc::new(SystemClock);
//! let barrier = SqlBarrier::new(pool, BarrierTable::default(), clock.clone(), Duration::from_secs(60));
//! barrier.migrate().await?;
//!
//! let (gid, branch): (Gid, BranchId) = ("tx-1".parse()?, "flight".parse()?);
//! let deadline = clock.now() + Duration::from_secs(30);
//! match barrier.begin(&gid, &branch, Op::Try { deadline, request: b"12A" }).await? {
//!     Begun::Run(mut pending) => {
//!         // The business try, in the barrier's transaction.
//!         sqlx::query("UPDATE seats SET held_by = $1 WHERE seat = '12A' AND held_by IS NULL")
//!             .bind(gid.as_str())
//!             .execute(pending.conn())
//!             .await?;
//!         pending.commit(b"held".to_vec()).await?; // barrier row and seat, together
//!     }
//!     Begun::Answered(Answer::Duplicate(stored)) => println!("already held: {:?}", stored.result),
//!     Begun::Answered(answer) => println!("not run: {answer:?}"),
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};
use tracing::{error, info};

use crate::barrier::{
    BackCheckOutcome, BarrierRecord, BarrierState, DueReservation, Op, Refusal, Step, decide,
};
use crate::clock::Clock;
use crate::model::{BranchId, Gid, Timestamp};

/// How many times [`SqlBarrier::begin`] starts over because another transaction inserted the
/// branch's row first. Once is the normal case (the row is then found); more means rows are being
/// deleted under the barrier.
const MAX_INSERT_RACES: usize = 8;

/// A database the SQL barrier runs on: `sqlx::Postgres` (feature `sqlx-postgres`) or
/// `sqlx::MySql` (feature `sqlx-mysql`). Sealed; carries the dialect's statements.
///
/// Name it once, through the pool type: `SqlBarrier<sqlx::Postgres>` is built from a `PgPool`.
///
/// ```
/// # #[cfg(feature = "sqlx-postgres")]
/// fn on_postgres(_: &tcc_core::barrier::sql::SqlBarrier<sqlx::Postgres>) {}
/// # #[cfg(feature = "sqlx-mysql")]
/// fn on_mysql(_: &tcc_core::barrier::sql::SqlBarrier<sqlx::MySql>) {}
/// ```
pub trait SqlDatabase: sqlx::Database + sealed::Sealed {}

impl<DB: sqlx::Database + sealed::Sealed> SqlDatabase for DB {}

mod sealed {
    use super::*;

    /// Which SQL the statements are written in.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Dialect {
        Postgres,
        MySql,
    }

    /// A barrier row as read, every column nullable so that a damaged row is reported, not a
    /// decode error: (state, deadline, request, result, updated_at).
    pub type RawRow = (Option<String>, Option<i64>, Option<Vec<u8>>, Option<Vec<u8>>, Option<i64>);

    /// A due row as read: (gid, branch, deadline).
    pub type RawDue = (Option<String>, Option<String>, Option<i64>);

    /// The values of a row to insert.
    #[derive(Debug)]
    pub struct NewRow<'a> {
        pub gid: &'a str,
        pub branch: &'a str,
        pub state: &'static str,
        pub deadline: i64,
        pub request: &'a [u8],
        pub result: &'a [u8],
        pub updated_at: i64,
    }

    /// The per-database part: each method runs one prepared statement. Implemented for concrete
    /// databases only, where sqlx's executor bounds are plain facts rather than where-clauses the
    /// generic code would have to repeat.
    pub trait Sealed: sqlx::Database {
        const DIALECT: Dialect;

        /// `BEGIN` (on MySQL at `READ COMMITTED`, see the module docs).
        fn begin_tx(
            pool: &sqlx::Pool<Self>,
        ) -> impl Future<Output = Result<sqlx::Transaction<'static, Self>, sqlx::Error>> + Send + '_;

        /// Runs a statement without parameters.
        fn execute<'c>(
            conn: &'c mut Self::Connection,
            sql: SqlStr,
        ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c;

        /// Reads one barrier row (`sql` takes gid, branch).
        fn fetch_row<'c>(
            conn: &'c mut Self::Connection,
            sql: SqlStr,
            gid: &'c str,
            branch: &'c str,
        ) -> impl Future<Output = Result<Option<RawRow>, sqlx::Error>> + Send + 'c;

        /// Inserts unless present; `true` if this call inserted the row.
        fn insert_row<'c>(
            conn: &'c mut Self::Connection,
            sql: SqlStr,
            row: &'c NewRow<'c>,
        ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send + 'c;

        /// Updates state, result and updated_at (`sql` takes them, then gid, branch).
        #[allow(clippy::too_many_arguments)]
        fn update_row<'c>(
            conn: &'c mut Self::Connection,
            sql: SqlStr,
            state: &'static str,
            result: &'c [u8],
            updated_at: i64,
            gid: &'c str,
            branch: &'c str,
        ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c;

        /// Lists due rows (`sql` takes the cutoff deadline and the limit).
        fn fetch_due<'c>(
            conn: &'c mut Self::Connection,
            sql: SqlStr,
            cutoff: i64,
            limit: i64,
        ) -> impl Future<Output = Result<Vec<RawDue>, sqlx::Error>> + Send + 'c;

        /// One number (`sql` takes no parameters).
        fn fetch_count<'c>(
            conn: &'c mut Self::Connection,
            sql: SqlStr,
        ) -> impl Future<Output = Result<i64, sqlx::Error>> + Send + 'c;
    }

    macro_rules! impl_sealed {
        ($db:ty, $dialect:expr, $begin:expr) => {
            impl Sealed for $db {
                const DIALECT: Dialect = $dialect;

                fn begin_tx(
                    pool: &sqlx::Pool<Self>,
                ) -> impl Future<Output = Result<sqlx::Transaction<'static, Self>, sqlx::Error>> + Send + '_
                {
                    let begin: Option<&'static str> = $begin;
                    async move {
                        match begin {
                            Some(statement) => pool.begin_with(statement).await,
                            None => pool.begin().await,
                        }
                    }
                }

                fn execute<'c>(
                    conn: &'c mut Self::Connection,
                    sql: SqlStr,
                ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c {
                    async move { sqlx::query(sql).execute(&mut *conn).await.map(|_| ()) }
                }

                fn fetch_row<'c>(
                    conn: &'c mut Self::Connection,
                    sql: SqlStr,
                    gid: &'c str,
                    branch: &'c str,
                ) -> impl Future<Output = Result<Option<RawRow>, sqlx::Error>> + Send + 'c {
                    async move {
                        sqlx::query_as::<_, RawRow>(sql)
                            .bind(gid)
                            .bind(branch)
                            .fetch_optional(&mut *conn)
                            .await
                    }
                }

                fn insert_row<'c>(
                    conn: &'c mut Self::Connection,
                    sql: SqlStr,
                    row: &'c NewRow<'c>,
                ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send + 'c {
                    async move {
                        let done = sqlx::query(sql)
                            .bind(row.gid)
                            .bind(row.branch)
                            .bind(row.state)
                            .bind(row.deadline)
                            .bind(row.request)
                            .bind(row.result)
                            .bind(row.updated_at)
                            .execute(&mut *conn)
                            .await?;
                        // PostgreSQL: 1 inserted, 0 conflict. MySQL: 1 inserted, 2 the duplicate's
                        // row changed (see `Statements::new`), whatever CLIENT_FOUND_ROWS says.
                        Ok(done.rows_affected() == 1)
                    }
                }

                fn update_row<'c>(
                    conn: &'c mut Self::Connection,
                    sql: SqlStr,
                    state: &'static str,
                    result: &'c [u8],
                    updated_at: i64,
                    gid: &'c str,
                    branch: &'c str,
                ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c {
                    async move {
                        sqlx::query(sql)
                            .bind(state)
                            .bind(result)
                            .bind(updated_at)
                            .bind(gid)
                            .bind(branch)
                            .execute(&mut *conn)
                            .await
                            .map(|_| ())
                    }
                }

                fn fetch_due<'c>(
                    conn: &'c mut Self::Connection,
                    sql: SqlStr,
                    cutoff: i64,
                    limit: i64,
                ) -> impl Future<Output = Result<Vec<RawDue>, sqlx::Error>> + Send + 'c {
                    async move {
                        sqlx::query_as::<_, RawDue>(sql).bind(cutoff).bind(limit).fetch_all(&mut *conn).await
                    }
                }

                fn fetch_count<'c>(
                    conn: &'c mut Self::Connection,
                    sql: SqlStr,
                ) -> impl Future<Output = Result<i64, sqlx::Error>> + Send + 'c {
                    async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&mut *conn).await }
                }
            }
        };
    }

    #[cfg(feature = "sqlx-postgres")]
    impl_sealed!(sqlx::Postgres, Dialect::Postgres, None);

    // One round trip: the text protocol runs both statements (sqlx enables multi-statements).
    #[cfg(feature = "sqlx-mysql")]
    impl_sealed!(
        sqlx::MySql,
        Dialect::MySql,
        Some("SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION")
    );
}

use sealed::{Dialect, NewRow, RawRow};

/// Every statement of one barrier table in one dialect, built once per [`SqlBarrier`].
#[derive(Debug)]
struct Statements {
    /// The `CREATE` statements, in order.
    migration: Vec<String>,
    /// PostgreSQL: taken in the migration's transaction, so replicas migrating at once queue up
    /// (concurrent `CREATE TABLE IF NOT EXISTS` can fail there).
    migration_lock: Option<SqlStr>,
    select: SqlStr,
    select_for_update: SqlStr,
    select_skip_locked: SqlStr,
    insert: SqlStr,
    update: SqlStr,
    due: SqlStr,
    held: SqlStr,
}

impl Statements {
    fn new(dialect: Dialect, table: &BarrierTable) -> Statements {
        let t = table.as_str();
        let tried = BarrierState::Tried.as_str();
        // Written with `?`; PostgreSQL numbers them.
        let sql = |text: String| -> SqlStr {
            let text = match dialect {
                Dialect::MySql => text,
                Dialect::Postgres => number_placeholders(&text),
            };
            // Safe: `t` is a validated identifier, everything else is fixed text.
            AssertSqlSafe(text).into_sql_str()
        };
        let columns = "state, deadline, request, result, updated_at";
        let select = format!("SELECT {columns} FROM {t} WHERE gid = ? AND branch = ?");
        let insert = match dialect {
            Dialect::Postgres => format!(
                "INSERT INTO {t} (gid, branch, {columns}) VALUES (?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (gid, branch) DO NOTHING"
            ),
            // A no-op update would count as 1 "found" row under CLIENT_FOUND_ROWS (sqlx's default),
            // like an insert; this one always changes the row, so a duplicate counts 2. The change is
            // never kept: `begin` rolls back when the row was there.
            Dialect::MySql => format!(
                "INSERT INTO {t} (gid, branch, {columns}) VALUES (?, ?, ?, ?, ?, ?, ?) \
                 ON DUPLICATE KEY UPDATE updated_at = IF(updated_at = 0, 1, 0)"
            ),
        };
        let migration = match dialect {
            Dialect::Postgres => vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {t} (\n    \
                     gid TEXT NOT NULL,\n    \
                     branch TEXT NOT NULL,\n    \
                     state TEXT NOT NULL,\n    \
                     deadline BIGINT NOT NULL,\n    \
                     request BYTEA NOT NULL,\n    \
                     result BYTEA NOT NULL,\n    \
                     updated_at BIGINT NOT NULL,\n    \
                     PRIMARY KEY (gid, branch)\n)"
                ),
                // PostgreSQL puts the index in the table's schema, named without it.
                format!("CREATE INDEX IF NOT EXISTS {}_due ON {t} (state, deadline)", table.name()),
            ],
            // Ids are ASCII (see `crate::model`) and compared byte for byte, as everywhere else.
            Dialect::MySql => vec![format!(
                "CREATE TABLE IF NOT EXISTS {t} (\n    \
                 gid VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,\n    \
                 branch VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,\n    \
                 state VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,\n    \
                 deadline BIGINT NOT NULL,\n    \
                 request LONGBLOB NOT NULL,\n    \
                 result LONGBLOB NOT NULL,\n    \
                 updated_at BIGINT NOT NULL,\n    \
                 PRIMARY KEY (gid, branch),\n    \
                 KEY {}_due (state, deadline)\n) ENGINE=InnoDB",
                table.name()
            )],
        };
        let migration_lock = match dialect {
            // Any fixed key: "tcc_barr".
            Dialect::Postgres => {
                Some(AssertSqlSafe("SELECT pg_advisory_xact_lock(8386656192417591922)").into_sql_str())
            }
            Dialect::MySql => None,
        };
        Statements {
            migration,
            migration_lock,
            select: sql(select.clone()),
            select_for_update: sql(format!("{select} FOR UPDATE")),
            select_skip_locked: sql(format!("{select} FOR UPDATE SKIP LOCKED")),
            insert: sql(insert),
            update: sql(format!(
                "UPDATE {t} SET state = ?, result = ?, updated_at = ? WHERE gid = ? AND branch = ?"
            )),
            due: sql(format!(
                "SELECT gid, branch, deadline FROM {t} WHERE state = '{tried}' AND deadline <= ? \
                 ORDER BY deadline LIMIT ?"
            )),
            held: sql(format!("SELECT COUNT(*) FROM {t} WHERE state = '{tried}'")),
        }
    }
}

impl Statements {
    /// The migration as one script, each statement ending in `;\n`.
    fn migration_script(&self) -> String {
        self.migration.iter().map(|s| format!("{s};\n")).collect()
    }
}

/// `?` placeholders as PostgreSQL's `$1, $2, ...` (the statements here contain no other `?`).
fn number_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// A barrier table's name, validated once (`[A-Za-z_][A-Za-z0-9_]*`, at most 63 bytes, optionally
/// `schema.table`), so it can be put into SQL text safely and is typed once, not repeated as strings.
///
/// ```
/// use tcc_core::barrier::sql::BarrierTable;
/// assert_eq!(BarrierTable::default().as_str(), "tcc_barrier");
/// assert_eq!(BarrierTable::new("flights.tcc_barrier")?.as_str(), "flights.tcc_barrier");
/// assert!(BarrierTable::new("tcc_barrier; DROP TABLE seats").is_err());
/// # Ok::<(), tcc_core::barrier::sql::InvalidTableName>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BarrierTable(Arc<str>);

impl BarrierTable {
    /// `tcc_barrier`.
    ///
    /// ```
    /// use tcc_core::barrier::sql::BarrierTable;
    /// assert_eq!(BarrierTable::default(), BarrierTable::new(BarrierTable::DEFAULT)?);
    /// # Ok::<(), tcc_core::barrier::sql::InvalidTableName>(())
    /// ```
    pub const DEFAULT: &'static str = "tcc_barrier";

    /// The name, if valid.
    ///
    /// ```
    /// use tcc_core::barrier::sql::BarrierTable;
    /// assert!(BarrierTable::new("shop_barrier").is_ok());
    /// assert!(BarrierTable::new("1st").is_err());
    /// assert!(BarrierTable::new("a.b.c").is_err());
    /// ```
    pub fn new(name: &str) -> Result<BarrierTable, InvalidTableName> {
        let valid_part = |p: &str| {
            let mut bytes = p.bytes();
            matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
                && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && p.len() <= 63
        };
        let valid = match name.split_once('.') {
            Some((schema, table)) => valid_part(schema) && valid_part(table),
            None => valid_part(name),
        };
        if valid { Ok(BarrierTable(Arc::from(name))) } else { Err(InvalidTableName(name.to_owned())) }
    }

    /// The name as given.
    ///
    /// ```
    /// use tcc_core::barrier::sql::BarrierTable;
    /// assert_eq!(BarrierTable::new("s.t")?.as_str(), "s.t");
    /// # Ok::<(), tcc_core::barrier::sql::InvalidTableName>(())
    /// ```
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The table's own name, without its schema.
    fn name(&self) -> &str {
        self.0.rsplit('.').next().unwrap_or(&self.0)
    }
}

impl Default for BarrierTable {
    fn default() -> BarrierTable {
        BarrierTable(Arc::from(BarrierTable::DEFAULT))
    }
}

impl fmt::Display for BarrierTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A table name that is not a plain SQL identifier.
///
/// ```
/// use tcc_core::barrier::sql::BarrierTable;
/// let e = BarrierTable::new("no spaces").unwrap_err();
/// assert_eq!(e.0, "no spaces");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid barrier table name {0:?}: expected letters, digits and '_' (optionally schema.table), not starting with a digit, at most 63 bytes each"
)]
pub struct InvalidTableName(pub String);

/// The barrier of a participant on a SQL database. Cheap to clone (the pool is shared).
///
/// See the [module docs](self) for the protocol and a whole try.
///
/// ```no_run
/// # #[cfg(feature = "sqlx-mysql")]
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tcc_core::barrier::sql::{BarrierTable, SqlBarrier};
/// use tcc_core::SystemClock;
///
/// let pool = sqlx::MySqlPool::connect("mysql://tcc:secret@127.0.0.1/hotels").await?;
/// let barrier = SqlBarrier::new(pool, BarrierTable::new("hotel_barrier")?, Arc::new(SystemClock), Duration::from_secs(60));
/// barrier.migrate().await?;
/// println!("{} reservations held", barrier.held().await?);
/// # Ok(()) }
/// ```
pub struct SqlBarrier<DB: SqlDatabase> {
    pool: sqlx::Pool<DB>,
    table: BarrierTable,
    clock: Arc<dyn Clock>,
    grace: Duration,
    sql: Arc<Statements>,
}

impl<DB: SqlDatabase> Clone for SqlBarrier<DB> {
    fn clone(&self) -> Self {
        SqlBarrier {
            pool: self.pool.clone(),
            table: self.table.clone(),
            clock: Arc::clone(&self.clock),
            grace: self.grace,
            sql: Arc::clone(&self.sql),
        }
    }
}

impl<DB: SqlDatabase> fmt::Debug for SqlBarrier<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlBarrier")
            .field("database", &DB::NAME)
            .field("table", &self.table.as_str())
            .field("clock", &self.clock)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl<DB: SqlDatabase> SqlBarrier<DB> {
    /// The barrier over `pool`'s database, in `table`. Connects to nothing yet; call
    /// [`migrate`](Self::migrate) to create the table.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # fn example() {
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use tcc_core::barrier::sql::{BarrierTable, SqlBarrier};
    /// let pool = sqlx::PgPool::connect_lazy("postgres://localhost/shop").expect("a valid URL");
    /// let barrier = SqlBarrier::new(pool, BarrierTable::default(), Arc::new(tcc_core::SystemClock), Duration::from_secs(60));
    /// assert_eq!(barrier.table().as_str(), "tcc_barrier");
    /// # }
    /// ```
    pub fn new(pool: sqlx::Pool<DB>, table: BarrierTable, clock: Arc<dyn Clock>, grace: Duration) -> Self {
        let sql = Arc::new(Statements::new(DB::DIALECT, &table));
        SqlBarrier { pool, table, clock, grace, sql }
    }

    /// The pool.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # async fn example(barrier: tcc_core::barrier::sql::SqlBarrier<sqlx::Postgres>) -> Result<(), sqlx::Error> {
    /// let seats: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM seats").fetch_one(barrier.pool()).await?;
    /// # Ok(()) }
    /// ```
    pub fn pool(&self) -> &sqlx::Pool<DB> {
        &self.pool
    }

    /// The table.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # fn example(barrier: tcc_core::barrier::sql::SqlBarrier<sqlx::Postgres>) {
    /// println!("barrier rows live in {}", barrier.table());
    /// # }
    /// ```
    pub fn table(&self) -> &BarrierTable {
        &self.table
    }

    /// The clock deadlines are decided with.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # fn example(barrier: tcc_core::barrier::sql::SqlBarrier<sqlx::Postgres>) {
    /// let now = barrier.clock().now();
    /// # }
    /// ```
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The grace period after a deadline before the participant releases a hold itself.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # fn example(barrier: tcc_core::barrier::sql::SqlBarrier<sqlx::Postgres>) {
    /// println!("holds are released {:?} after their deadline", barrier.grace());
    /// # }
    /// ```
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Creates the table and its index if missing (idempotent; safe to run from several replicas).
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # async fn example(barrier: tcc_core::barrier::sql::SqlBarrier<sqlx::Postgres>) -> Result<(), tcc_core::barrier::sql::SqlBarrierError> {
    /// barrier.migrate().await?;
    /// barrier.migrate().await?; // nothing to do the second time
    /// # Ok(()) }
    /// ```
    pub async fn migrate(&self) -> Result<(), SqlBarrierError> {
        match &self.sql.migration_lock {
            // DDL is transactional there: lock, create, commit.
            Some(lock) => {
                let mut tx = self.pool.begin().await?;
                DB::execute(&mut tx, lock.clone()).await?;
                for statement in &self.sql.migration {
                    DB::execute(&mut tx, AssertSqlSafe(statement.clone()).into_sql_str()).await?;
                }
                tx.commit().await?;
            }
            // MySQL commits each DDL statement by itself; `IF NOT EXISTS` is safe concurrently.
            None => {
                let mut conn = self.pool.acquire().await?;
                for statement in &self.sql.migration {
                    DB::execute(&mut conn, AssertSqlSafe(statement.clone()).into_sql_str()).await?;
                }
            }
        }
        Ok(())
    }

    /// The SQL [`migrate`](Self::migrate) runs, for this table name (statements separated by `;\n`).
    /// For the default table it is the file `tcc-core/migrations/{postgres,mysql}/0001_tcc_barrier.sql`
    /// without its comment lines.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # fn example(barrier: tcc_core::barrier::sql::SqlBarrier<sqlx::Postgres>) {
    /// assert!(barrier.migration_sql().starts_with("CREATE TABLE IF NOT EXISTS tcc_barrier ("));
    /// # }
    /// ```
    pub fn migration_sql(&self) -> String {
        self.sql.migration_script()
    }

    /// Starts a call: see the module docs. `op` is a try, confirm or cancel ([`Op::Expire`] goes
    /// through [`begin_expire`](Self::begin_expire); given here, it waits for the row's lock
    /// instead of skipping it, and "nothing to release" is answered as the stored record's
    /// [`Answer::Duplicate`], or [`Refusal::NotTried`] when there is none).
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # async fn example(barrier: tcc_core::barrier::sql::SqlBarrier<sqlx::Postgres>) -> Result<(), Box<dyn std::error::Error>> {
    /// use tcc_core::barrier::Op;
    /// use tcc_core::barrier::sql::{Answer, Begun};
    /// let (gid, branch) = ("tx-1".parse()?, "flight".parse()?);
    /// match barrier.begin(&gid, &branch, Op::Cancel).await? {
    ///     Begun::Run(mut pending) => {
    ///         sqlx::query("UPDATE seats SET held_by = NULL WHERE held_by = $1")
    ///             .bind(gid.as_str())
    ///             .execute(pending.conn())
    ///             .await?;
    ///         pending.commit(Vec::new()).await?;
    ///     }
    ///     Begun::Answered(Answer::Empty) => println!("no try ran: recorded, a late try is refused"),
    ///     Begun::Answered(other) => println!("{other:?}"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn begin(
        &self,
        gid: &Gid,
        branch: &BranchId,
        op: Op<'_>,
    ) -> Result<Begun<DB>, SqlBarrierError> {
        for _ in 0..MAX_INSERT_RACES {
            let mut tx = DB::begin_tx(&self.pool).await?;
            // A first call (try, action, local transaction) that would run on a missing row (the
            // usual case: they come first) inserts at once, a round trip fewer. Inserted means there
            // was no row, which is what it decided on; otherwise (MySQL's insert touched the row)
            // roll back and read the row as any call does.
            let first_call = matches!(op, Op::Try { .. } | Op::Action { .. } | Op::Local { .. });
            if let (true, Step::Run(record)) = (first_call, decide(op, None, self.clock.now())) {
                if self.insert(&mut tx, gid, branch, &record).await? {
                    let (gid, branch, sql) = (gid.clone(), branch.clone(), Arc::clone(&self.sql));
                    return Ok(Begun::Run(Pending {
                        tx,
                        gid,
                        branch,
                        record,
                        sql,
                        inserted: true,
                        is_try: matches!(op, Op::Try { .. }),
                    }));
                }
                tx.rollback().await?;
                tx = DB::begin_tx(&self.pool).await?;
            }
            let existing = self.read(&mut tx, self.sql.select_for_update.clone(), gid, branch).await?;
            let now = self.clock.now();
            match decide(op, existing.as_ref(), now) {
                Step::Run(record) => {
                    let inserted = existing.is_none();
                    if inserted && !self.insert(&mut tx, gid, branch, &record).await? {
                        tx.rollback().await?;
                        continue;
                    }
                    let is_try = matches!(op, Op::Try { .. });
                    let sql = Arc::clone(&self.sql);
                    let (gid, branch) = (gid.clone(), branch.clone());
                    return Ok(Begun::Run(Pending { tx, gid, branch, record, sql, inserted, is_try }));
                }
                Step::RecordOnly(record) => {
                    match existing {
                        None => {
                            if !self.insert(&mut tx, gid, branch, &record).await? {
                                tx.rollback().await?;
                                continue;
                            }
                        }
                        // decide records only where there is no row; kept general all the same.
                        Some(_) => update::<DB>(&mut tx, &self.sql, gid, branch, &record).await?,
                    }
                    tx.commit().await?;
                    return Ok(Begun::Answered(Answer::Empty));
                }
                Step::Duplicate(record) => {
                    finish_read_only(tx).await;
                    return Ok(Begun::Answered(Answer::Duplicate(record)));
                }
                Step::Refuse(refusal) => {
                    finish_read_only(tx).await;
                    return Ok(Begun::Answered(Answer::Refused(refusal)));
                }
                Step::Nothing => {
                    finish_read_only(tx).await;
                    return Ok(Begun::Answered(match existing {
                        Some(record) => Answer::Duplicate(record),
                        None => Answer::Refused(Refusal::NotTried),
                    }));
                }
            }
        }
        Err(SqlBarrierError::Database(sqlx::Error::Protocol(format!(
            "barrier row of transaction {gid} branch {branch} was inserted and removed by others {MAX_INSERT_RACES} times"
        ))))
    }

    /// A message's back-check: whether its local transaction (run through [`begin`](Self::begin)
    /// with [`Op::Local`] on (`gid`, `branch`)) committed. If no row is there, one saying "rolled
    /// back" is committed now, so that a local transaction still on its way fails on the primary key
    /// or is refused: the answer stays true. A local transaction still running holds the row's key,
    /// and this waits for it.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # async fn example(barrier: tcc_core::barrier::sql::SqlBarrier<sqlx::Postgres>) -> Result<(), Box<dyn std::error::Error>> {
    /// use tcc_core::barrier::BackCheckOutcome;
    /// match barrier.back_check(&"order-7".parse()?, &"00".parse()?).await? {
    ///     BackCheckOutcome::Committed => println!("send the message"),
    ///     BackCheckOutcome::RolledBack => println!("abort it"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn back_check(
        &self,
        gid: &Gid,
        branch: &BranchId,
    ) -> Result<BackCheckOutcome, SqlBarrierError> {
        match self.begin(gid, branch, Op::BackCheck).await? {
            Begun::Answered(Answer::Empty) => Ok(BackCheckOutcome::RolledBack),
            Begun::Answered(Answer::Duplicate(rec)) if rec.state == BarrierState::Committed => {
                Ok(BackCheckOutcome::Committed)
            }
            Begun::Answered(Answer::Duplicate(_)) => Ok(BackCheckOutcome::RolledBack),
            Begun::Answered(Answer::Refused(r)) => Err(SqlBarrierError::Refused(r)),
            Begun::Run(pending) => {
                pending.rollback().await?;
                Err(SqlBarrierError::Database(sqlx::Error::Protocol(
                    "a back-check never runs anything".into(),
                )))
            }
        }
    }

    /// Starts the release of one due reservation: `BEGIN`, lock its row `FOR UPDATE SKIP LOCKED`,
    /// decide [`Op::Expire`]. `None` (rolled back) when another replica holds the row or the branch
    /// is not held and due any more.
    ///
    /// The caller runs the business cancel with [`Pending::request`] on [`Pending::conn`] and
    /// commits; the stored state becomes [`BarrierState::Expired`].
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # async fn example(barrier: tcc_core::barrier::sql::SqlBarrier<sqlx::Postgres>) -> Result<(), Box<dyn std::error::Error>> {
    /// for due in barrier.due(100).await? {
    ///     let Some(mut pending) = barrier.begin_expire(&due).await? else { continue };
    ///     sqlx::query("UPDATE seats SET held_by = NULL WHERE held_by = $1")
    ///         .bind(due.gid.as_str())
    ///         .execute(pending.conn())
    ///         .await?;
    ///     pending.commit(Vec::new()).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn begin_expire(&self, due: &DueReservation) -> Result<Option<Pending<DB>>, SqlBarrierError> {
        let (gid, branch) = (&due.gid, &due.branch);
        let mut tx = DB::begin_tx(&self.pool).await?;
        let Some(existing) = self.read(&mut tx, self.sql.select_skip_locked.clone(), gid, branch).await?
        else {
            finish_read_only(tx).await;
            return Ok(None);
        };
        match decide(Op::Expire { grace: self.grace }, Some(&existing), self.clock.now()) {
            Step::Run(record) => Ok(Some(Pending {
                tx,
                gid: gid.clone(),
                branch: branch.clone(),
                record,
                sql: Arc::clone(&self.sql),
                inserted: false,
                is_try: false,
            })),
            _ => {
                finish_read_only(tx).await;
                Ok(None)
            }
        }
    }

    /// Up to `limit` held reservations due for release (deadline + grace at or before now), earliest
    /// deadline first, read without locks. A row whose ids or deadline cannot be read is logged and
    /// skipped.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # async fn example(barrier: tcc_core::barrier::sql::SqlBarrier<sqlx::Postgres>) -> Result<(), tcc_core::barrier::sql::SqlBarrierError> {
    /// for due in barrier.due(10).await? {
    ///     println!("{} / {} held past {}", due.gid, due.branch, due.deadline);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn due(&self, limit: usize) -> Result<Vec<DueReservation>, SqlBarrierError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Due means deadline + grace <= now, that is deadline <= now - grace; decide checks it again.
        let grace_ms = u64::try_from(self.grace.as_millis()).unwrap_or(u64::MAX);
        let cutoff = to_sql(Timestamp(self.clock.now().0.saturating_sub(grace_ms)));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut conn = self.pool.acquire().await?;
        let rows = DB::fetch_due(&mut conn, self.sql.due.clone(), cutoff, limit).await?;
        let mut due = Vec::with_capacity(rows.len());
        for (gid, branch, deadline) in rows {
            let parsed = (|| {
                let gid: Gid = gid.as_deref()?.parse().ok()?;
                let branch: BranchId = branch.as_deref()?.parse().ok()?;
                let deadline = Timestamp(u64::try_from(deadline?).ok()?);
                Some(DueReservation { gid, branch, deadline })
            })();
            match parsed {
                Some(d) => due.push(d),
                None => {
                    error!(table = %self.table, ?gid, ?branch, ?deadline, "unreadable barrier row; not expired")
                }
            }
        }
        Ok(due)
    }

    /// The branch's stored record.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # async fn example(barrier: tcc_core::barrier::sql::SqlBarrier<sqlx::Postgres>) -> Result<(), Box<dyn std::error::Error>> {
    /// if let Some(record) = barrier.get(&"tx-1".parse()?, &"flight".parse()?).await? {
    ///     println!("flight branch is {}", record.state);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn get(&self, gid: &Gid, branch: &BranchId) -> Result<Option<BarrierRecord>, SqlBarrierError> {
        let mut conn = self.pool.acquire().await?;
        self.read(&mut conn, self.sql.select.clone(), gid, branch).await
    }

    /// How many reservations are held (state tried).
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # async fn example(barrier: tcc_core::barrier::sql::SqlBarrier<sqlx::Postgres>) -> Result<(), tcc_core::barrier::sql::SqlBarrierError> {
    /// println!("{} reservations held", barrier.held().await?);
    /// # Ok(()) }
    /// ```
    pub async fn held(&self) -> Result<u64, SqlBarrierError> {
        let mut conn = self.pool.acquire().await?;
        let n = DB::fetch_count(&mut conn, self.sql.held.clone()).await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Reads and checks one row with `sql` (plain, `FOR UPDATE` or `SKIP LOCKED`).
    async fn read(
        &self,
        conn: &mut DB::Connection,
        sql: SqlStr,
        gid: &Gid,
        branch: &BranchId,
    ) -> Result<Option<BarrierRecord>, SqlBarrierError> {
        match DB::fetch_row(conn, sql, gid.as_str(), branch.as_str()).await? {
            None => Ok(None),
            Some(raw) => parse_row(raw).map(Some).map_err(|reason| SqlBarrierError::Corrupt {
                gid: gid.clone(),
                branch: branch.clone(),
                reason,
            }),
        }
    }

    /// Inserts the branch's first row unless another transaction did; whether this one did.
    async fn insert(
        &self,
        conn: &mut DB::Connection,
        gid: &Gid,
        branch: &BranchId,
        record: &BarrierRecord,
    ) -> Result<bool, SqlBarrierError> {
        let row = NewRow {
            gid: gid.as_str(),
            branch: branch.as_str(),
            state: record.state.as_str(),
            deadline: to_sql(record.deadline),
            request: &record.request,
            result: &record.result,
            updated_at: to_sql(record.updated_at),
        };
        Ok(DB::insert_row(conn, self.sql.insert.clone(), &row).await?)
    }
}

/// Writes state, result and time of an existing row.
async fn update<DB: SqlDatabase>(
    conn: &mut DB::Connection,
    sql: &Statements,
    gid: &Gid,
    branch: &BranchId,
    record: &BarrierRecord,
) -> Result<(), SqlBarrierError> {
    let (state, updated_at) = (record.state.as_str(), to_sql(record.updated_at));
    DB::update_row(
        conn,
        sql.update.clone(),
        state,
        &record.result,
        updated_at,
        gid.as_str(),
        branch.as_str(),
    )
    .await?;
    Ok(())
}

/// Ends a transaction that wrote nothing. Its answer stands whatever happens here: a failed
/// rollback leaves the connection to the pool, which discards it.
async fn finish_read_only<DB: SqlDatabase>(tx: sqlx::Transaction<'static, DB>) {
    if let Err(e) = tx.rollback().await {
        info!(error = %e, "rolling back a read-only barrier transaction failed");
    }
}

/// An instant as stored: milliseconds, saturating at `i64::MAX` (some 292 million years).
fn to_sql(t: Timestamp) -> i64 {
    i64::try_from(t.0).unwrap_or(i64::MAX)
}

/// A row as a record, or what is wrong with it.
fn parse_row((state, deadline, request, result, updated_at): RawRow) -> Result<BarrierRecord, String> {
    let state = state.ok_or("state is NULL")?;
    let state = BarrierState::from_name(&state).ok_or_else(|| format!("unknown state {state:?}"))?;
    let instant = |name: &str, v: Option<i64>| -> Result<Timestamp, String> {
        let v = v.ok_or_else(|| format!("{name} is NULL"))?;
        u64::try_from(v).map(Timestamp).map_err(|_| format!("{name} is negative ({v})"))
    };
    Ok(BarrierRecord {
        state,
        deadline: instant("deadline", deadline)?,
        request: request.ok_or("request is NULL")?,
        result: result.ok_or("result is NULL")?,
        updated_at: instant("updated_at", updated_at)?,
    })
}

/// What [`SqlBarrier::begin`] found.
///
/// ```no_run
/// # #[cfg(feature = "sqlx-postgres")]
/// # fn example(begun: tcc_core::barrier::sql::Begun<sqlx::Postgres>) {
/// use tcc_core::barrier::sql::{Answer, Begun};
/// let ran_now = matches!(begun, Begun::Run(_));
/// # }
/// ```
#[derive(Debug)]
pub enum Begun<DB: SqlDatabase> {
    /// Run the business method on [`Pending::conn`], then [`Pending::commit`].
    Run(Pending<DB>),
    /// Nothing to run; already rolled back or (empty cancel) committed.
    Answered(Answer),
}

/// A call answered without running a business method.
///
/// ```
/// use tcc_core::barrier::Refusal;
/// use tcc_core::barrier::sql::Answer;
/// let answer = Answer::Refused(Refusal::Suspended);
/// assert_ne!(answer, Answer::Empty);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The call already took effect: this is the stored record (a duplicate try replies its `result`).
    /// A cancel of a reservation the participant released itself is one too, its record's state
    /// [`BarrierState::Expired`] (what the sled barrier calls `CancelOutcome::AlreadyExpired`).
    Duplicate(BarrierRecord),
    /// Nothing ran, and the call's record is committed: an empty cancel (a later try is refused),
    /// an empty compensation (a later action is refused), or a back-check that found no local
    /// transaction and settled the message as rolled back (a later one is refused).
    Empty,
    /// Refused; nothing stored.
    Refused(Refusal),
}

/// A call whose business method is to run, holding its open database transaction (row locked).
/// Dropping it rolls back.
///
/// ```no_run
/// # #[cfg(feature = "sqlx-postgres")]
/// # async fn example(mut pending: tcc_core::barrier::sql::Pending<sqlx::Postgres>) -> Result<(), Box<dyn std::error::Error>> {
/// let seat = String::from_utf8(pending.request().to_vec())?;
/// let sold = sqlx::query("UPDATE seats SET sold = TRUE WHERE seat = $1").bind(&seat).execute(pending.conn()).await?;
/// if sold.rows_affected() == 1 {
///     pending.commit(Vec::new()).await?;
/// } else {
///     pending.rollback().await?; // nothing stored
/// }
/// # Ok(()) }
/// ```
pub struct Pending<DB: SqlDatabase> {
    tx: sqlx::Transaction<'static, DB>,
    gid: Gid,
    branch: BranchId,
    /// The record to store on commit (for a try, `result` is filled in by `commit`).
    record: BarrierRecord,
    sql: Arc<Statements>,
    /// The row was inserted by this call (with `record`, but an empty `result`).
    inserted: bool,
    /// A try: `commit` stores its result.
    is_try: bool,
}

impl<DB: SqlDatabase> fmt::Debug for Pending<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pending")
            .field("gid", &self.gid)
            .field("branch", &self.branch)
            .field("state", &self.record.state)
            .field("request_len", &self.record.request.len())
            .finish_non_exhaustive()
    }
}

impl<DB: SqlDatabase> Pending<DB> {
    /// The connection of the open transaction: run the business statements on it
    /// (`sqlx::query(..).execute(pending.conn())`).
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-mysql")]
    /// # async fn example(mut pending: tcc_core::barrier::sql::Pending<sqlx::MySql>) -> Result<(), sqlx::Error> {
    /// sqlx::query("UPDATE rooms SET held = held + 1 WHERE id = 7").execute(pending.conn()).await?;
    /// # Ok(()) }
    /// ```
    pub fn conn(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }

    /// The open transaction itself.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # async fn example(mut pending: tcc_core::barrier::sql::Pending<sqlx::Postgres>) -> Result<(), sqlx::Error> {
    /// let tx: &mut sqlx::Transaction<'static, sqlx::Postgres> = pending.transaction();
    /// sqlx::query("SELECT 1").execute(&mut **tx).await?;
    /// # Ok(()) }
    /// ```
    pub fn transaction(&mut self) -> &mut sqlx::Transaction<'static, DB> {
        &mut self.tx
    }

    /// The request bytes: the try's, or for confirm, cancel and expiry the stored ones.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # fn example(pending: tcc_core::barrier::sql::Pending<sqlx::Postgres>) {
    /// let seat = String::from_utf8_lossy(pending.request());
    /// # }
    /// ```
    pub fn request(&self) -> &[u8] {
        &self.record.request
    }

    /// The record that commit stores.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # fn example(pending: tcc_core::barrier::sql::Pending<sqlx::Postgres>) {
    /// println!("committing moves the branch to {}", pending.record().state);
    /// # }
    /// ```
    pub fn record(&self) -> &BarrierRecord {
        &self.record
    }

    /// The transaction.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # fn example(pending: tcc_core::barrier::sql::Pending<sqlx::Postgres>) {
    /// println!("running for {} / {}", pending.gid(), pending.branch());
    /// # }
    /// ```
    pub fn gid(&self) -> &Gid {
        &self.gid
    }

    /// The branch.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # fn example(pending: tcc_core::barrier::sql::Pending<sqlx::Postgres>) {
    /// let branch: &tcc_core::BranchId = pending.branch();
    /// # }
    /// ```
    pub fn branch(&self) -> &BranchId {
        &self.branch
    }

    /// Writes the barrier row (for a try with `result` as its result bytes; ignored otherwise) and
    /// commits it with everything run on [`conn`](Self::conn). Returns the stored record.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # async fn example(pending: tcc_core::barrier::sql::Pending<sqlx::Postgres>) -> Result<(), tcc_core::barrier::sql::SqlBarrierError> {
    /// let stored = pending.commit(b"held 12A".to_vec()).await?;
    /// println!("{} at {}", stored.state, stored.updated_at);
    /// # Ok(()) }
    /// ```
    pub async fn commit(self, result: Vec<u8>) -> Result<BarrierRecord, SqlBarrierError> {
        let Pending { mut tx, gid, branch, mut record, sql, inserted, is_try } = self;
        if is_try {
            record.result = result;
        }
        // A fresh try's row went in whole by `begin`, save its result: skip a round trip when
        // there is none.
        if !(inserted && record.result.is_empty()) {
            update::<DB>(&mut tx, &sql, &gid, &branch, &record).await?;
        }
        tx.commit().await?;
        Ok(record)
    }

    /// Rolls back the business statements; nothing is stored.
    ///
    /// ```no_run
    /// # #[cfg(feature = "sqlx-postgres")]
    /// # async fn example(pending: tcc_core::barrier::sql::Pending<sqlx::Postgres>) -> Result<(), tcc_core::barrier::sql::SqlBarrierError> {
    /// pending.rollback().await?; // as if the call never arrived
    /// # Ok(()) }
    /// ```
    pub async fn rollback(self) -> Result<(), SqlBarrierError> {
        Ok(self.tx.rollback().await?)
    }
}

/// A SQL barrier call failed; nothing was stored.
///
/// ```
/// use tcc_core::barrier::sql::SqlBarrierError;
/// let e = SqlBarrierError::Database(sqlx::Error::PoolTimedOut);
/// assert_eq!(e.code(), "storage");
/// assert!(!e.is_retryable());
/// ```
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
    /// The barrier refused the call (for [`SqlBarrier::back_check`]: the row was written by a call
    /// of another kind). Nothing was stored.
    #[error(transparent)]
    Refused(Refusal),
}

impl SqlBarrierError {
    /// A serialization failure, deadlock or lock-wait timeout: run the whole call again.
    ///
    /// ```
    /// use tcc_core::barrier::sql::SqlBarrierError;
    /// assert!(!SqlBarrierError::Database(sqlx::Error::RowNotFound).is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        match self {
            SqlBarrierError::Database(e) => is_retryable(e),
            SqlBarrierError::Corrupt { .. } | SqlBarrierError::Refused(_) => false,
        }
    }

    /// `corrupt`, `storage`, or the refusal's own code.
    ///
    /// ```
    /// use tcc_core::barrier::sql::SqlBarrierError;
    /// let e = SqlBarrierError::Corrupt { gid: "g".parse()?, branch: "b".parse()?, reason: "unknown state".into() };
    /// assert_eq!(e.code(), "corrupt");
    /// # Ok::<(), tcc_core::Error>(())
    /// ```
    pub fn code(&self) -> &'static str {
        match self {
            SqlBarrierError::Corrupt { .. } => "corrupt",
            SqlBarrierError::Database(_) => "storage",
            SqlBarrierError::Refused(r) => r.code(),
        }
    }
}

/// Whether `e` is a serialization failure (PostgreSQL `40001`), a deadlock (`40P01`, MySQL 1213) or
/// a lock-wait timeout (MySQL 1205): the transaction was rolled back and may simply run again.
///
/// ```
/// assert!(!tcc_core::barrier::sql::is_retryable(&sqlx::Error::PoolTimedOut));
/// ```
pub fn is_retryable(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else { return false };
    #[cfg(feature = "sqlx-postgres")]
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return matches!(pg.code(), "40001" | "40P01");
    }
    #[cfg(feature = "sqlx-mysql")]
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return matches!(my.number(), 1213 | 1205);
    }
    let _ = db;
    false
}

/// The test databases of this workspace's SQL participant tests (not part of the API).
///
/// `TCC_TEST_POSTGRES_URL` and `TCC_TEST_MYSQL_URL` name them. Without one, a test prints
/// "skipped: ..." and passes, unless `TCC_REQUIRE_POSTGRES=1` / `TCC_REQUIRE_MYSQL=1` (CI sets both),
/// which turns the skip into a failure.
#[doc(hidden)]
pub mod testing {
    /// The PostgreSQL test database's URL, or `None` after saying the test is skipped.
    ///
    /// # Panics
    /// When it is missing and `TCC_REQUIRE_POSTGRES=1`.
    pub fn test_postgres_url() -> Option<String> {
        test_url("TCC_TEST_POSTGRES_URL", "TCC_REQUIRE_POSTGRES", "postgres://")
    }

    /// The MySQL (MariaDB) test database's URL, or `None` after saying the test is skipped.
    ///
    /// # Panics
    /// When it is missing and `TCC_REQUIRE_MYSQL=1`.
    pub fn test_mysql_url() -> Option<String> {
        test_url("TCC_TEST_MYSQL_URL", "TCC_REQUIRE_MYSQL", "mysql://")
    }

    fn test_url(var: &str, require: &str, scheme: &str) -> Option<String> {
        match std::env::var(var) {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                assert!(std::env::var(require).as_deref() != Ok("1"), "{require}=1 but {var} is not set");
                println!("skipped: {var} is not set (a {scheme} URL of a test database)");
                None
            }
        }
    }

    /// A fresh name `PREFIX_<unique>`; `prefix` is lower-case letters, digits and `_`.
    fn scratch_name(prefix: &str) -> Result<String, sqlx::Error> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 24
            && prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(sqlx::Error::Configuration("a scratch prefix is 1 to 24 of a-z, 0-9 and '_'".into()));
        }
        Ok(format!("{prefix}_{}", uuid::Uuid::now_v7().simple()))
    }

    /// Creates an empty schema in the PostgreSQL database at `url` and returns a URL whose
    /// connections work in it (`options=-c search_path=...`), so that tests sharing one database
    /// do not see each other's rows.
    #[cfg(feature = "sqlx-postgres")]
    pub async fn create_scratch_postgres_schema(url: &str, prefix: &str) -> Result<String, sqlx::Error> {
        use sqlx::Connection;
        let schema = scratch_name(prefix)?;
        let mut conn = sqlx::PgConnection::connect(url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&mut conn).await?;
        conn.close().await?;
        let sep = if url.contains('?') { '&' } else { '?' };
        Ok(format!("{url}{sep}options=-c%20search_path%3D{schema}"))
    }

    /// Creates an empty database on the MySQL server at `url` and returns `url` naming it instead
    /// (the user needs the CREATE privilege), so that tests do not see each other's rows.
    #[cfg(feature = "sqlx-mysql")]
    pub async fn create_scratch_mysql_database(url: &str, prefix: &str) -> Result<String, sqlx::Error> {
        use sqlx::Connection;
        let database = scratch_name(prefix)?;
        let mut conn = sqlx::MySqlConnection::connect(url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}"))).execute(&mut conn).await?;
        conn.close().await?;
        // mysql://user:password@host:port/db?params: replace (or add) the path.
        let bad = || sqlx::Error::Configuration("expected mysql://host[:port]/[database][?params]".into());
        let after_scheme = url.find("://").ok_or_else(bad)? + 3;
        let (base, query) = match url.find('?') {
            Some(q) => url.split_at(q),
            None => (url, ""),
        };
        let authority_end = base[after_scheme..].find('/').map_or(base.len(), |i| after_scheme + i);
        Ok(format!("{}/{database}{query}", &base[..authority_end]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        for good in ["tcc_barrier", "_x", "A1", "s.t", &"a".repeat(63), &format!("{0}.{0}", "b".repeat(63))] {
            assert!(BarrierTable::new(good).is_ok(), "{good}");
        }
        for bad in ["", "1a", "a-b", "a b", "a.b.c", ".a", "a.", "a;b", "\"a\"", "é", &"a".repeat(64)] {
            assert_eq!(BarrierTable::new(bad), Err(InvalidTableName(bad.to_owned())), "{bad}");
        }
    }

    /// The shipped migration files are what `migrate` runs, so they cannot drift apart.
    #[test]
    fn migration_files_are_the_migration_sql() {
        let files = [
            (Dialect::Postgres, include_str!("../../migrations/postgres/0001_tcc_barrier.sql")),
            (Dialect::MySql, include_str!("../../migrations/mysql/0001_tcc_barrier.sql")),
        ];
        for (dialect, file) in files {
            let statements: String =
                file.lines().filter(|l| !l.starts_with("--")).map(|l| format!("{l}\n")).collect();
            assert_eq!(
                statements,
                Statements::new(dialect, &BarrierTable::default()).migration_script(),
                "{dialect:?}"
            );
        }
    }

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(number_placeholders("a = ? AND b = ? LIMIT ?"), "a = $1 AND b = $2 LIMIT $3");
    }

    #[test]
    fn damaged_rows_are_named() {
        let good = || (Some("tried".to_owned()), Some(5), Some(vec![1]), Some(vec![]), Some(7));
        let rec = parse_row(good()).expect("a good row");
        assert_eq!(
            (rec.state, rec.deadline, rec.updated_at),
            (BarrierState::Tried, Timestamp(5), Timestamp(7))
        );
        let mut row = good();
        row.0 = Some("frozen".into());
        assert_eq!(parse_row(row), Err("unknown state \"frozen\"".into()));
        let mut row = good();
        row.1 = Some(-1);
        assert_eq!(parse_row(row), Err("deadline is negative (-1)".into()));
        let mut row = good();
        row.3 = None;
        assert_eq!(parse_row(row), Err("result is NULL".into()));
        let mut row = good();
        row.4 = None;
        assert_eq!(parse_row(row), Err("updated_at is NULL".into()));
    }

    #[test]
    fn instants_saturate_into_bigint() {
        assert_eq!(to_sql(Timestamp(42)), 42);
        assert_eq!(to_sql(Timestamp(u64::MAX)), i64::MAX);
    }
}
