//! The PostgreSQL store: several coordinator processes share one database, active-active.
//!
//! Enabled by the `postgres` feature. [`PgStore::connect`] takes a URL such as
//! `postgres://tcc@db.internal:5432/tcc` (any `tokio-postgres` connection string; the tables go to the
//! first schema of the connection's `search_path`, so `?options=-c%20search_path%3Dtcc` picks one).
//! TLS is not built in: reach the server over a trusted network, a Unix socket
//! (`postgres://tcc@%2Frun%2Fpostgresql/tcc`) or a local TLS proxy.
//!
//! ## Schema
//! Created or migrated on connect, under a transaction-scoped advisory lock so that coordinators
//! starting together do not race. `tcc_schema` holds the schema version; a database newer than this
//! build is refused rather than misread.
//!
//! ```sql
//! CREATE TABLE tcc_tx (
//!     gid         text COLLATE "C" PRIMARY KEY,  -- byte order, as the sled store lists
//!     state       smallint NOT NULL,             -- TxState::code
//!     version     bigint   NOT NULL,             -- compare-and-set compares this
//!     due_at      bigint,                        -- ms since the epoch; NULL when nothing is due
//!     lease_owner text,                          -- the coordinator holding a phase-two lease
//!     updated_at  bigint   NOT NULL,
//!     record      bytea    NOT NULL              -- the transaction, as the codec writes it
//! );
//! CREATE INDEX tcc_tx_due ON tcc_tx (due_at) WHERE due_at IS NOT NULL;
//! CREATE INDEX tcc_tx_state ON tcc_tx (state, gid);
//! ```
//!
//! The record is the [`codec`](super::codec)'s bytes (format byte + postcard). `version`, `due_at`
//! and `lease_owner` are the truth for those three fields (a claim changes them in SQL without
//! rewriting the record), so reading a row decodes the record and takes those three from the
//! columns. A row whose record does not decode, or disagrees with its `gid` and `state` columns, is
//! an [`Error::Storage`], never a panic. Instants above `i64::MAX` ms (some 292 million years) are
//! stored as `i64::MAX`.
//!
//! ## Deciding, claiming, leasing
//! - **Compare-and-set** is `UPDATE ... WHERE gid = $gid AND version = $expected` (batched, see
//!   below): of two coordinators that read the same version, exactly one updates the row; the other
//!   sees it unchanged and re-reads.
//! - **Claims** are one statement: the due rows are picked with `SELECT ... FOR UPDATE SKIP LOCKED`
//!   in due order, and updated with the new owner, `due_at = lease_until` and `version + 1`. Two
//!   coordinators claiming at once never get the same row, and a row being written is skipped.
//! - **Leases of a dead coordinator** are not taken over at open: in a shared database their owner
//!   may well be alive. [`Store::reclaim_abandoned`] returns 0, and the lease falls due at its end
//!   like any other due work, when a live coordinator claims it.
//!
//! ## Group commit
//! Writes (`insert`, `compare_and_set`, and their `_unsynced` forms, which are durable here too) are
//! queued for the store's writer connections ([`PgOptions::writers`]). Whenever one is free it
//! takes every queued write as one batch and runs it as **one statement** in autocommit: the
//! inserts as one `INSERT ... SELECT FROM unnest($arrays) ON CONFLICT (gid) DO NOTHING`, the
//! compare-and-sets as one `UPDATE ... FROM unnest($arrays) WHERE version = expected` after locking
//! their rows in `gid` order, returning the `gid` of every write that applied. One round trip, one
//! commit, one WAL flush for the whole batch, and the next batch gathers meanwhile. A writer is
//! answered only after the commit returned, with `synchronous_commit` on (it is turned back on for
//! the store's sessions if the server has it off): acknowledged means committed.
//!
//! - Every batch of every coordinator locks rows in `gid` order, so batches cannot deadlock one
//!   another.
//! - A batch writing one transaction twice runs as several statements, in order.
//! - If the database refuses the statement (a constraint, a deadlock with some other client), the
//!   batch runs again one statement per write in a transaction, dropping the refused write and
//!   retrying the others, so that only the refused write fails.
//! - A lost connection fails the batch with [`Error::Storage`] (the outcome of a commit in flight
//!   is then unknown, as with any database); the next batch connects again.
//!
//! Reads and claims use a few other connections, each shared by concurrent callers (pipelined), and
//! reconnect on their next use once a connection is lost. Every call is bounded by
//! [`PgOptions::op_timeout`].

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement};

use super::codec::{decode, encode};
use super::{Cas, ListQuery, MAX_PAGE, Page, Pruned, Store};
use crate::error::{Error, Result};
use crate::join::join_all;
use crate::model::{Gid, Timestamp, Transaction, TxState};

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i32 = 2;

/// `MIGRATIONS[i]` moves the schema from version `i` to `i + 1`.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [
    r#"
CREATE TABLE tcc_tx (
    gid         text COLLATE "C" PRIMARY KEY,
    state       smallint NOT NULL,
    version     bigint   NOT NULL,
    due_at      bigint,
    lease_owner text,
    updated_at  bigint   NOT NULL,
    record      bytea    NOT NULL
);
CREATE INDEX tcc_tx_due ON tcc_tx (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX tcc_tx_state ON tcc_tx (state, gid);
"#,
    // Finished (confirmed: 3, cancelled: 5) transactions by when they finished, for pruning.
    r#"
CREATE INDEX tcc_tx_finished ON tcc_tx (updated_at) WHERE state IN (3, 5);
"#,
];

// The codes the index above names.
const _: () = assert!(TxState::Confirmed.code() == 3 && TxState::Cancelled.code() == 5);

const COLUMNS: &str = "gid, state, version, due_at, lease_owner, record";

/// After a failed connection attempt, callers fail at once for this long instead of each trying
/// again (a database that is down must not make every request wait for its own connect timeout).
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

/// Settings of a [`PgStore`].
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Connections for reads and claims (each is shared by concurrent callers). At least 1.
    pub readers: usize,
    /// Connections that commit batches of writes; while one commits, the next batch gathers and
    /// goes to another. At least 1.
    pub writers: usize,
    /// Most writes one commit carries.
    pub max_batch: usize,
    /// Longest any one database call may take before it fails with [`Error::Storage`] (the connection
    /// it used is then dropped and opened again on next use).
    pub op_timeout: Duration,
    /// Longest opening a connection may take, unless the URL sets `connect_timeout`.
    pub connect_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> PgOptions {
        PgOptions {
            readers: 4,
            writers: 2,
            max_batch: 512,
            op_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters of a [`PgStore`]'s writer (for benchmarks and tests of group commit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PgStats {
    /// Writes (inserts and compare-and-sets) that reached a committed transaction.
    pub writes: u64,
    /// Transactions committed by the writer: `writes / commits` is the average batch.
    pub commits: u64,
}

/// The PostgreSQL store. See the [module docs](self) for the schema and how writes are batched.
///
/// ```no_run
/// # async fn demo() -> tcc_core::Result<()> {
/// use std::sync::Arc;
/// use tcc_core::store::postgres::PgStore;
/// let store = Arc::new(PgStore::connect("postgres://tcc@127.0.0.1:5432/tcc").await?);
/// // Coordinator::open(store, transport, clock, config) in as many processes as you like.
/// # Ok(()) }
/// ```
pub struct PgStore {
    shared: Arc<Shared>,
    writer: mpsc::Sender<Request>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.shared.target)
            .field("readers", &self.shared.readers.len())
            .finish_non_exhaustive()
    }
}

struct Shared {
    config: tokio_postgres::Config,
    /// `postgres://user@host:port/db`, never the password.
    target: String,
    options: PgOptions,
    readers: Vec<Slot>,
    next_reader: AtomicUsize,
    writes: AtomicU64,
    commits: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are replaced whole; a panic elsewhere cannot leave them half-written.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Errors and conversions

fn describe_pg(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

fn pg_error(what: &str, e: &tokio_postgres::Error) -> Error {
    Error::Storage(format!("postgres {what}: {}", describe_pg(e)))
}

/// The message of a storage error, to hand the same failure to several waiters.
fn message(e: &Error) -> String {
    match e {
        Error::Storage(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Milliseconds as stored: instants past `i64::MAX` ms are stored as `i64::MAX`.
fn ms(t: Timestamp) -> i64 {
    i64::try_from(t.0).unwrap_or(i64::MAX)
}

fn limit_param(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn state_code(state: TxState) -> i16 {
    i16::from(state.code())
}

/// A row of `COLUMNS` as a transaction (see the module docs on which column wins).
fn from_row(row: &Row) -> Result<Transaction> {
    let damaged = |what: String| Error::Storage(format!("damaged transaction row: {what}"));
    let col = |e: tokio_postgres::Error| damaged(describe_pg(&e));
    let gid: String = row.try_get(0).map_err(col)?;
    let state: i16 = row.try_get(1).map_err(col)?;
    let version: i64 = row.try_get(2).map_err(col)?;
    let due_at: Option<i64> = row.try_get(3).map_err(col)?;
    let lease_owner: Option<String> = row.try_get(4).map_err(col)?;
    let record: &[u8] = row.try_get(5).map_err(col)?;
    let mut tx = decode(record).map_err(|e| Error::Storage(format!("transaction {gid}: {e}")))?;
    if tx.gid.as_str() != gid {
        return Err(damaged(format!("row {gid:?} holds the record of {}", tx.gid)));
    }
    if state_code(tx.state) != state {
        return Err(damaged(format!(
            "transaction {gid}: state column {state} but the record is {}",
            tx.state
        )));
    }
    tx.version =
        u64::try_from(version).map_err(|_| damaged(format!("transaction {gid}: version {version}")))?;
    tx.due_at = due_at
        .map(|d| u64::try_from(d).map(Timestamp))
        .transpose()
        .map_err(|_| damaged(format!("transaction {gid}: due_at {due_at:?}")))?;
    tx.lease_owner = lease_owner;
    Ok(tx)
}

fn from_rows(rows: &[Row]) -> Result<Vec<Transaction>> {
    rows.iter().map(from_row).collect()
}

// ---------------------------------------------------------------------------------------------
// Connections

/// The prepared statements of one connection.
struct Statements {
    get: Statement,
    list_all: Statement,
    list_state: Statement,
    list_all_desc: Statement,
    list_state_desc: Statement,
    count: Statement,
    claim: Statement,
    prune: Statement,
    insert: Statement,
    cas: Statement,
    write_many: Statement,
}

/// One statement for a whole batch of writes (no two of the same transaction): the inserts, and
/// the compare-and-sets after locking their rows in `gid` order, so that the batches of several
/// coordinators cannot deadlock. Returns the `gid` of every write that applied.
const WRITE_MANY: &str = r#"
WITH ins AS (
    INSERT INTO tcc_tx (gid, state, version, due_at, lease_owner, updated_at, record)
    SELECT * FROM unnest($1::text[], $2::int2[], $3::int8[], $4::int8[], $5::text[], $6::int8[], $7::bytea[])
    ORDER BY 1
    ON CONFLICT (gid) DO NOTHING
    RETURNING gid
),
locked AS MATERIALIZED (
    SELECT gid FROM tcc_tx WHERE gid = ANY($8::text[]) ORDER BY gid FOR UPDATE
),
upd AS (
    UPDATE tcc_tx t
    SET state = u.state, version = u.version, due_at = u.due_at, lease_owner = u.lease_owner,
        updated_at = u.updated_at, record = u.record
    FROM unnest($8::text[], $9::int8[], $10::int2[], $11::int8[], $12::int8[], $13::text[], $14::int8[], $15::bytea[])
             AS u(gid, expected, state, version, due_at, lease_owner, updated_at, record),
         locked l
    WHERE l.gid = u.gid AND t.gid = u.gid AND t.version = u.expected
    RETURNING t.gid
)
SELECT gid FROM ins UNION ALL SELECT gid FROM upd
"#;

/// Deletes up to `$2` finished transactions last changed before `$1`, oldest first (through the
/// `tcc_tx_finished` index); rows another coordinator is deleting are skipped.
const PRUNE: &str = "DELETE FROM tcc_tx WHERE gid IN (
        SELECT gid FROM tcc_tx WHERE state IN (3, 5) AND updated_at < $1
        ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED
    ) AND state IN (3, 5)";

fn claim_sql() -> String {
    let working =
        [TxState::Trying, TxState::Confirming, TxState::Cancelling].map(|s| s.code().to_string()).join(", ");
    format!(
        "WITH due AS MATERIALIZED (
             SELECT gid FROM tcc_tx
             WHERE due_at <= $1 AND state IN ({working})
             ORDER BY due_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         )
         UPDATE tcc_tx t SET lease_owner = $3, due_at = $4, version = t.version + 1
         FROM due WHERE t.gid = due.gid
         RETURNING t.gid, t.state, t.version, t.due_at, t.lease_owner, t.record"
    )
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
        let get = format!("SELECT {COLUMNS} FROM tcc_tx WHERE gid = $1");
        let list_all = format!("SELECT {COLUMNS} FROM tcc_tx WHERE gid > $1 ORDER BY gid LIMIT $2");
        let list_state =
            format!("SELECT {COLUMNS} FROM tcc_tx WHERE state = $1 AND gid > $2 ORDER BY gid LIMIT $3");
        let list_all_desc = format!("SELECT {COLUMNS} FROM tcc_tx WHERE gid < $1 ORDER BY gid DESC LIMIT $2");
        let list_state_desc =
            format!("SELECT {COLUMNS} FROM tcc_tx WHERE state = $1 AND gid < $2 ORDER BY gid DESC LIMIT $3");
        let claim = claim_sql();
        let (
            get,
            list_all,
            list_state,
            list_all_desc,
            list_state_desc,
            count,
            claim,
            prune,
            insert,
            cas,
            write_many,
        ) = tokio::try_join!(
            client.prepare(&get),
            client.prepare(&list_all),
            client.prepare(&list_state),
            client.prepare(&list_all_desc),
            client.prepare(&list_state_desc),
            client.prepare("SELECT count(*) FROM tcc_tx WHERE state = $1"),
            client.prepare(&claim),
            client.prepare(PRUNE),
            client.prepare(
                "INSERT INTO tcc_tx (gid, state, version, due_at, lease_owner, updated_at, record)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (gid) DO NOTHING"
            ),
            client.prepare(
                "UPDATE tcc_tx SET state = $3, version = $4, due_at = $5, lease_owner = $6,
                     updated_at = $7, record = $8
                 WHERE gid = $1 AND version = $2"
            ),
            client.prepare(WRITE_MANY),
        )?;
        Ok(Statements {
            get,
            list_all,
            list_state,
            list_all_desc,
            list_state_desc,
            count,
            claim,
            prune,
            insert,
            cas,
            write_many,
        })
    }
}

/// One connection with its statements.
struct Session {
    client: Client,
    st: Statements,
}

async fn connect_client(config: &tokio_postgres::Config) -> Result<Client> {
    let (client, connection) = config.connect(NoTls).await.map_err(|e| pg_error("connect", &e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %describe_pg(&e), "PostgreSQL connection lost");
        }
    });
    // Acknowledged must mean durable: never run with the server's synchronous_commit off.
    let row = client.query_one("SHOW synchronous_commit", &[]).await.map_err(|e| pg_error("connect", &e))?;
    let mode: String = row.try_get(0).map_err(|e| pg_error("connect", &e))?;
    if mode == "off" {
        client.batch_execute("SET synchronous_commit TO on").await.map_err(|e| pg_error("connect", &e))?;
    }
    // A server running with fsync off cannot be made durable from a session: say so, loudly.
    let row = client.query_one("SHOW fsync", &[]).await.map_err(|e| pg_error("connect", &e))?;
    let fsync: String = row.try_get(0).map_err(|e| pg_error("connect", &e))?;
    if fsync == "off" {
        tracing::error!(
            "the PostgreSQL server runs with fsync off: a power cut can lose acknowledged decisions"
        );
    }
    Ok(client)
}

impl Session {
    async fn open(shared: &Shared) -> Result<Session> {
        let open = async {
            let client = connect_client(&shared.config).await?;
            let st = Statements::prepare(&client).await.map_err(|e| pg_error("preparing statements", &e))?;
            Ok(Session { client, st })
        };
        match tokio::time::timeout(shared.options.op_timeout, open).await {
            Ok(r) => r,
            Err(_) => Err(Error::Storage(format!(
                "postgres connect: no answer within {} ms",
                shared.options.op_timeout.as_millis()
            ))),
        }
    }
}

/// A reader connection, opened on first use and again after it is lost.
#[derive(Default)]
struct Slot {
    current: Mutex<Option<Arc<Session>>>,
    /// Held while connecting, so concurrent callers wait for one attempt instead of making their own.
    connecting: tokio::sync::Mutex<Option<(Instant, String)>>,
}

impl Slot {
    fn live(&self) -> Option<Arc<Session>> {
        lock(&self.current).as_ref().filter(|s| !s.client.is_closed()).cloned()
    }

    async fn session(&self, shared: &Shared) -> Result<Arc<Session>> {
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let mut last_failure = self.connecting.lock().await;
        if let Some(s) = self.live() {
            return Ok(s);
        }
        if let Some((at, error)) = &*last_failure
            && at.elapsed() < RECONNECT_PAUSE
        {
            return Err(Error::Storage(error.clone()));
        }
        match Session::open(shared).await {
            Ok(s) => {
                let s = Arc::new(s);
                *lock(&self.current) = Some(s.clone());
                *last_failure = None;
                Ok(s)
            }
            Err(e) => {
                *last_failure = Some((Instant::now(), message(&e)));
                Err(e)
            }
        }
    }

    /// Drops `s` (a connection that failed or hung), so the next caller opens a fresh one.
    fn forget(&self, s: &Arc<Session>) {
        let mut current = lock(&self.current);
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, s)) {
            *current = None;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The writer: group commit

#[derive(Clone, Copy)]
enum Kind {
    Insert,
    Cas { expected: i64 },
}

/// One write, with its parameters ready.
struct Write {
    kind: Kind,
    gid: String,
    state: i16,
    version: i64,
    due_at: Option<i64>,
    lease_owner: Option<String>,
    updated_at: i64,
    record: Vec<u8>,
}

impl Write {
    /// Checks here what the database would refuse, so one bad write cannot fail a whole batch.
    fn new(kind: Kind, tx: &Transaction) -> Result<Write> {
        let version = i64::try_from(tx.version).map_err(|_| {
            Error::Storage(format!("transaction {}: version {} is too large", tx.gid, tx.version))
        })?;
        if tx.lease_owner.as_deref().is_some_and(|o| o.contains('\0')) {
            return Err(Error::Storage(format!(
                "transaction {}: a lease owner cannot hold a NUL byte",
                tx.gid
            )));
        }
        Ok(Write {
            kind,
            gid: tx.gid.as_str().to_owned(),
            state: state_code(tx.state),
            version,
            due_at: tx.due_at.map(ms),
            lease_owner: tx.lease_owner.clone(),
            updated_at: ms(tx.updated_at),
            record: encode(tx)?,
        })
    }

    async fn run(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        st: &Statements,
    ) -> Result<u64, tokio_postgres::Error> {
        let common: [&(dyn ToSql + Sync); 6] =
            [&self.state, &self.version, &self.due_at, &self.lease_owner, &self.updated_at, &self.record];
        match self.kind {
            Kind::Insert => {
                let mut p: Vec<&(dyn ToSql + Sync)> = vec![&self.gid];
                p.extend_from_slice(&common);
                tx.execute(&st.insert, &p).await
            }
            Kind::Cas { expected } => {
                let mut p: Vec<&(dyn ToSql + Sync)> = vec![&self.gid, &expected];
                p.extend_from_slice(&common);
                tx.execute(&st.cas, &p).await
            }
        }
    }
}

/// A queued write, answered with whether it applied (inserted, or the version matched).
struct Request {
    write: Box<Write>,
    reply: oneshot::Sender<Result<bool>>,
}

/// How the writer runs a batch.
#[derive(Clone, Copy)]
enum Mode {
    /// One statement for all (the normal way; see `WRITE_MANY`).
    OneStatement,
    /// One statement per write, to find which write the database refuses.
    EachWrite,
}

/// Splits a batch into rounds in which no transaction appears twice; a transaction's writes keep
/// their order across rounds. Almost every batch is one round.
fn rounds(writes: &[Box<Write>]) -> Vec<Vec<usize>> {
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for (i, w) in writes.iter().enumerate() {
        let k = seen.entry(w.gid.as_str()).or_insert(0);
        if rounds.len() <= *k {
            rounds.push(Vec::new());
        }
        rounds[*k].push(i);
        *k += 1;
    }
    rounds
}

/// Why one attempt at a batch failed.
enum BatchError {
    /// The one statement of the batch failed by itself (a database error); the connection is fine.
    Statement(Error),
    /// The statement of this write (an index into the attempt's writes) failed by itself; the
    /// transaction was rolled back, the connection is fine.
    Write(usize, Error),
    /// The connection failed, hung or was lost: every write of the attempt fails.
    Connection(Error),
}

/// One writer connection (opened on first use and again after it is lost).
struct Writer {
    shared: Arc<Shared>,
    session: Option<Session>,
    last_failure: Option<(Instant, String)>,
}

/// The group commit: takes the queued writes as a batch whenever one of the writer connections is
/// free, so that while some batches commit the next one gathers.
async fn run_writers(first: Writer, mut rx: mpsc::Receiver<Request>) {
    let shared = first.shared.clone();
    let n = shared.options.writers.max(1);
    let (free, mut idle) = mpsc::channel::<Writer>(n);
    let mut writers = vec![first];
    writers.extend((1..n).map(|_| Writer { shared: shared.clone(), session: None, last_failure: None }));
    for w in writers {
        // The channel holds n: room for every writer.
        let _ = free.try_send(w);
    }
    let max = shared.options.max_batch.max(1);
    // Ends when the store is dropped: nobody can queue a write any more.
    while let Some(first) = rx.recv().await {
        // Writes queue up meanwhile, if every connection is busy committing.
        let Some(mut writer) = idle.recv().await else { return };
        let mut batch = Vec::with_capacity(max.min(64));
        batch.push(first);
        while batch.len() < max {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let free = free.clone();
        tokio::spawn(async move {
            writer.commit(batch).await;
            let _ = free.send(writer).await;
        });
    }
}

impl Writer {
    async fn commit(&mut self, batch: Vec<Request>) {
        let (writes, replies): (Vec<Box<Write>>, Vec<_>) =
            batch.into_iter().map(|r| (r.write, r.reply)).unzip();
        let mut results: Vec<Option<Result<bool>>> = writes.iter().map(|_| None).collect();
        let mut lost: Option<String> = None;
        for round in rounds(&writes) {
            if let Some(e) = &lost {
                for i in round {
                    results[i] = Some(Err(Error::Storage(e.clone())));
                }
                continue;
            }
            let attempt: Vec<&Write> = round.iter().map(|&i| &*writes[i]).collect();
            match self.attempt(&attempt, Mode::OneStatement).await {
                Ok(applied) => {
                    for (&i, a) in round.iter().zip(applied) {
                        results[i] = Some(Ok(a));
                    }
                }
                Err(BatchError::Connection(e)) => {
                    tracing::error!(error = %e, writes = writes.len(), "PostgreSQL batch failed");
                    lost = Some(message(&e));
                    for i in round {
                        results[i] = Some(Err(Error::Storage(message(&e))));
                    }
                }
                Err(BatchError::Statement(_) | BatchError::Write(..)) => {
                    // Some write of the round is refused by the database: find which, one by one.
                    if let Err(e) = self.isolate(&writes, round, &mut results).await {
                        lost = Some(e);
                    }
                }
            }
        }
        for (reply, result) in replies.into_iter().zip(results) {
            // A writer that gave up waiting needs no answer.
            let _ = reply.send(result.unwrap_or_else(|| Err(Error::Storage("write not attempted".into()))));
        }
    }

    /// Runs `round` one statement per write in one transaction, dropping a refused write and trying
    /// the others again, so that only the refused one fails. Returns the error if the connection
    /// fails on the way.
    async fn isolate(
        &mut self,
        writes: &[Box<Write>],
        mut pending: Vec<usize>,
        results: &mut [Option<Result<bool>>],
    ) -> Result<(), String> {
        // The same lock order in every batch of every coordinator: no deadlocks between them.
        pending.sort_by(|&a, &b| writes[a].gid.cmp(&writes[b].gid));
        // Each pass either ends or removes one write: bounded.
        while !pending.is_empty() {
            let attempt: Vec<&Write> = pending.iter().map(|&i| &*writes[i]).collect();
            match self.attempt(&attempt, Mode::EachWrite).await {
                Ok(applied) => {
                    for (&i, a) in pending.iter().zip(applied) {
                        results[i] = Some(Ok(a));
                    }
                    return Ok(());
                }
                Err(BatchError::Write(k, e)) => {
                    let i = pending.remove(k);
                    tracing::warn!(tx = %writes[i].gid, error = %e, "PostgreSQL refused a write");
                    results[i] = Some(Err(e));
                }
                Err(BatchError::Connection(e) | BatchError::Statement(e)) => {
                    tracing::error!(error = %e, writes = pending.len(), "PostgreSQL batch failed");
                    for &i in &pending {
                        results[i] = Some(Err(Error::Storage(message(&e))));
                    }
                    return Err(message(&e));
                }
            }
        }
        Ok(())
    }

    async fn session(&mut self) -> Result<&mut Session, Error> {
        if self.session.as_ref().is_some_and(|s| s.client.is_closed()) {
            self.session = None;
        }
        if self.session.is_none() {
            if let Some((at, error)) = &self.last_failure
                && at.elapsed() < RECONNECT_PAUSE
            {
                return Err(Error::Storage(error.clone()));
            }
            match Session::open(&self.shared).await {
                Ok(s) => {
                    self.session = Some(s);
                    self.last_failure = None;
                }
                Err(e) => {
                    self.last_failure = Some((Instant::now(), message(&e)));
                    return Err(e);
                }
            }
        }
        self.session.as_mut().ok_or_else(|| Error::Storage("no connection".into()))
    }

    /// One transaction over `writes`; returns, per write, whether it applied.
    async fn attempt(&mut self, writes: &[&Write], mode: Mode) -> Result<Vec<bool>, BatchError> {
        let timeout = self.shared.options.op_timeout;
        let session = self.session().await.map_err(BatchError::Connection)?;
        let outcome = match mode {
            Mode::OneStatement => tokio::time::timeout(timeout, run_one_statement(session, writes)).await,
            Mode::EachWrite => tokio::time::timeout(timeout, run_each_write(session, writes)).await,
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(_) => Err(BatchError::Connection(Error::Storage(format!(
                "postgres write: no answer within {} ms",
                timeout.as_millis()
            )))),
        };
        match &outcome {
            Ok(_) => {
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                self.shared.writes.fetch_add(writes.len() as u64, Ordering::Relaxed);
            }
            // A connection mid-transaction, hung or lost is not used again.
            Err(BatchError::Connection(_)) => self.session = None,
            Err(BatchError::Write(..) | BatchError::Statement(_)) => {
                if self.session.as_ref().is_some_and(|s| s.client.is_closed()) {
                    self.session = None;
                }
            }
        }
        outcome
    }
}

/// The parameter arrays of some writes, column by column.
type Columns<'a> =
    (Vec<&'a str>, Vec<i16>, Vec<i64>, Vec<Option<i64>>, Vec<Option<&'a str>>, Vec<i64>, Vec<&'a [u8]>);

fn columns<'a>(ws: &[&'a Write]) -> Columns<'a> {
    (
        ws.iter().map(|w| w.gid.as_str()).collect(),
        ws.iter().map(|w| w.state).collect(),
        ws.iter().map(|w| w.version).collect(),
        ws.iter().map(|w| w.due_at).collect(),
        ws.iter().map(|w| w.lease_owner.as_deref()).collect(),
        ws.iter().map(|w| w.updated_at).collect(),
        ws.iter().map(|w| w.record.as_slice()).collect(),
    )
}

/// The writes (of different transactions) in one autocommit statement: one round trip, one commit.
async fn run_one_statement(session: &mut Session, writes: &[&Write]) -> Result<Vec<bool>, BatchError> {
    let (ins, upd): (Vec<&Write>, Vec<&Write>) = writes.iter().partition(|w| matches!(w.kind, Kind::Insert));
    let i = columns(&ins);
    let u = columns(&upd);
    let expected: Vec<i64> =
        upd.iter().map(|w| if let Kind::Cas { expected } = w.kind { expected } else { -1 }).collect();
    let params: [&(dyn ToSql + Sync); 15] =
        [&i.0, &i.1, &i.2, &i.3, &i.4, &i.5, &i.6, &u.0, &expected, &u.1, &u.2, &u.3, &u.4, &u.5, &u.6];
    let rows = session.client.query(&session.st.write_many, &params).await.map_err(|e| {
        let error = pg_error("write", &e);
        if e.code().is_some() && !session.client.is_closed() {
            BatchError::Statement(error)
        } else {
            BatchError::Connection(error)
        }
    })?;
    let mut applied = std::collections::HashSet::with_capacity(rows.len());
    for row in &rows {
        let gid: &str = row.try_get(0).map_err(|e| BatchError::Connection(pg_error("write", &e)))?;
        applied.insert(gid.to_owned());
    }
    // No two writes of a round share a gid, so the gid says which write applied.
    Ok(writes.iter().map(|w| applied.contains(&w.gid)).collect())
}

/// The writes one statement each in one transaction, pipelined; tells which write a database
/// error belongs to.
async fn run_each_write(session: &mut Session, writes: &[&Write]) -> Result<Vec<bool>, BatchError> {
    let conn = |what: &str, e: &tokio_postgres::Error| BatchError::Connection(pg_error(what, e));
    let Session { client, st } = session;
    let tx = client.transaction().await.map_err(|e| conn("begin", &e))?;
    // Pipelined: every statement is sent before the first answer is awaited.
    let results = join_all(writes.iter().map(|w| w.run(&tx, st))).await;
    let first_error = results.iter().enumerate().find_map(|(i, r)| r.as_ref().err().map(|e| (i, e)));
    if let Some((i, e)) = first_error {
        let error = pg_error("write", e);
        // Statements after a failed one answer "transaction aborted"; the first error is the cause.
        let by_itself = e.code().is_some_and(|c| *c != SqlState::IN_FAILED_SQL_TRANSACTION);
        let rolled_back = tx.rollback().await.is_ok();
        return Err(if by_itself && rolled_back {
            BatchError::Write(i, error)
        } else {
            BatchError::Connection(error)
        });
    }
    tx.commit().await.map_err(|e| conn("commit", &e))?;
    Ok(results.into_iter().map(|r| r.is_ok_and(|n| n == 1)).collect())
}

// ---------------------------------------------------------------------------------------------
// Schema

async fn migrate(client: &mut Client) -> Result<()> {
    let e = |e: tokio_postgres::Error| pg_error("creating the schema", &e);
    let tx = client.transaction().await.map_err(e)?;
    // One coordinator at a time creates or migrates the tables of one schema.
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtext('tcc schema ' || coalesce(current_schema(), '')))",
    )
    .await
    .map_err(e)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tcc_schema (
             id boolean PRIMARY KEY DEFAULT true CHECK (id),
             version integer NOT NULL
         )",
    )
    .await
    .map_err(e)?;
    let found: Option<i32> = match tx.query_opt("SELECT version FROM tcc_schema", &[]).await.map_err(e)? {
        Some(row) => Some(row.try_get(0).map_err(e)?),
        None => None,
    };
    let from = found.unwrap_or(0);
    if from > SCHEMA_VERSION {
        return Err(Error::Storage(format!(
            "the database's tcc schema is at version {from}, newer than this build understands \
             ({SCHEMA_VERSION}); upgrade the coordinator"
        )));
    }
    let first =
        usize::try_from(from).map_err(|_| Error::Storage(format!("bad tcc schema version {from}")))?;
    for (i, step) in MIGRATIONS.iter().enumerate().skip(first) {
        tx.batch_execute(step).await.map_err(e)?;
        tracing::info!(version = i + 1, "PostgreSQL schema migrated");
    }
    if found.is_none() {
        tx.execute("INSERT INTO tcc_schema (version) VALUES ($1)", &[&SCHEMA_VERSION]).await.map_err(e)?;
    } else if from < SCHEMA_VERSION {
        tx.execute("UPDATE tcc_schema SET version = $1", &[&SCHEMA_VERSION]).await.map_err(e)?;
    }
    tx.commit().await.map_err(e)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// URLs

fn parse_config(url: &str) -> Result<tokio_postgres::Config> {
    // The parser's message never contains the URL, so no password leaks through it.
    url.parse::<tokio_postgres::Config>()
        .map_err(|e| Error::InvalidInput(format!("not a PostgreSQL connection string: {}", describe_pg(&e))))
}

/// Checks that `url` is a PostgreSQL connection string this store can use, without connecting.
///
/// ```
/// use tcc_core::store::postgres::check_url;
/// assert!(check_url("postgres://tcc@127.0.0.1:5432/tcc").is_ok());
/// assert!(check_url("postgres://tcc@127.0.0.1:notaport/tcc").is_err());
/// ```
pub fn check_url(url: &str) -> Result<()> {
    parse_config(url).map(|_| ())
}

fn describe_config(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let user = config.get_user().unwrap_or_default();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    let db = config.get_dbname().unwrap_or(user);
    let mut s = format!("postgres://{user}@{}/{db}", hosts.join(","));
    if let Some(options) = config.get_options() {
        s.push_str(&format!(" (options {options:?})"));
    }
    s
}

/// `url` without its password, fit for logs: `postgres://user@host:port/db`.
///
/// ```
/// use tcc_core::store::postgres::describe_url;
/// let shown = describe_url("postgres://tcc:s3cret@127.0.0.1:5432/tcc");
/// assert_eq!(shown, "postgres://tcc@127.0.0.1:5432/tcc");
/// ```
pub fn describe_url(url: &str) -> String {
    match parse_config(url) {
        Ok(c) => describe_config(&c),
        Err(_) => "(not a PostgreSQL connection string)".to_owned(),
    }
}

/// The test database named by `TCC_TEST_POSTGRES_URL`, for the PostgreSQL tests of this workspace:
/// `None`, after printing that the test is skipped, when it is not set. With
/// `TCC_REQUIRE_POSTGRES=1` (CI sets it) a missing URL panics instead, so no test is skipped there.
#[doc(hidden)]
pub fn test_database_url() -> Option<String> {
    match std::env::var("TCC_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("TCC_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "TCC_REQUIRE_POSTGRES=1 but TCC_TEST_POSTGRES_URL is not set"
            );
            println!("skipped: TCC_TEST_POSTGRES_URL is not set (a postgres:// URL of a test database)");
            None
        }
    }
}

/// Creates a new empty schema `PREFIX_<unique>` in the database at `url` and returns a URL whose
/// connections work in it (through `options=-c search_path=...`). For tests and benchmarks that
/// share one database but must not see each other's transactions. `url` must be a URL
/// (`postgres://...`); `prefix` lower-case letters, digits and `_`.
pub async fn create_scratch_schema(url: &str, prefix: &str) -> Result<String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(Error::InvalidInput("a scratch schema needs a postgres:// URL".into()));
    }
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(Error::InvalidInput("a schema prefix is lower-case letters, digits and '_'".into()));
    }
    let mut config = parse_config(url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(PgOptions::default().connect_timeout);
    }
    let client = connect_client(&config).await?;
    let schema = format!("{prefix}_{}", uuid::Uuid::now_v7().simple());
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .map_err(|e| pg_error("creating a schema", &e))?;
    let sep = if url.contains('?') { '&' } else { '?' };
    Ok(format!("{url}{sep}options=-c%20search_path%3D{schema}"))
}

// ---------------------------------------------------------------------------------------------
// The store

impl PgStore {
    /// Connects to the database at `url` with the default [`PgOptions`], creating or migrating the
    /// schema. Fails with [`Error::Storage`] if the database cannot be reached.
    pub async fn connect(url: &str) -> Result<PgStore> {
        PgStore::connect_with(url, PgOptions::default()).await
    }

    /// [`connect`](Self::connect) with settings.
    pub async fn connect_with(url: &str, options: PgOptions) -> Result<PgStore> {
        let mut config = parse_config(url)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("tcc-coordinator");
        }
        let target = describe_config(&config);
        let readers = (0..options.readers.max(1)).map(|_| Slot::default()).collect();
        let shared = Arc::new(Shared {
            config,
            target,
            options,
            readers,
            next_reader: AtomicUsize::new(0),
            writes: AtomicU64::new(0),
            commits: AtomicU64::new(0),
        });
        let start = async {
            let mut client = connect_client(&shared.config).await?;
            migrate(&mut client).await?;
            let st = Statements::prepare(&client).await.map_err(|e| pg_error("preparing statements", &e))?;
            Ok::<_, Error>(Session { client, st })
        };
        let first = tokio::time::timeout(shared.options.op_timeout, start).await.map_err(|_| {
            Error::Storage(format!(
                "postgres connect: no answer within {} ms",
                shared.options.op_timeout.as_millis()
            ))
        })??;
        let (writer, rx) = mpsc::channel(shared.options.max_batch.max(1) * 4);
        let w = Writer { shared: shared.clone(), session: Some(first), last_failure: None };
        tokio::spawn(run_writers(w, rx));
        tracing::info!(database = %shared.target, "PostgreSQL store ready");
        Ok(PgStore { shared, writer })
    }

    /// The writer's counters.
    pub fn stats(&self) -> PgStats {
        PgStats {
            writes: self.shared.writes.load(Ordering::Relaxed),
            commits: self.shared.commits.load(Ordering::Relaxed),
        }
    }

    /// The database, without password (as `postgres://user@host:port/db`).
    pub fn target(&self) -> &str {
        &self.shared.target
    }

    async fn submit(&self, write: Write) -> Result<bool> {
        let stopped = || Error::Storage("the PostgreSQL writer has stopped".into());
        let (reply, answer) = oneshot::channel();
        self.writer.send(Request { write: Box::new(write), reply }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Runs one read on a reader connection, bounded by the operation timeout. A read that finds
    /// its connection lost is tried once more on a fresh one (reads change nothing).
    async fn read<T, F, Fut>(&self, what: &str, retry: bool, f: F) -> Result<T>
    where
        F: Fn(Arc<Session>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let shared = &self.shared;
        let i = shared.next_reader.fetch_add(1, Ordering::Relaxed) % shared.readers.len();
        let slot = &shared.readers[i];
        let mut tries = if retry { 2 } else { 1 };
        loop {
            tries -= 1;
            let session = slot.session(shared).await?;
            match tokio::time::timeout(shared.options.op_timeout, f(session.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    let lost = e.is_closed() || session.client.is_closed();
                    if lost {
                        slot.forget(&session);
                        if tries > 0 {
                            continue;
                        }
                    }
                    return Err(pg_error(what, &e));
                }
                Err(_) => {
                    slot.forget(&session);
                    return Err(Error::Storage(format!(
                        "postgres {what}: no answer within {} ms",
                        shared.options.op_timeout.as_millis()
                    )));
                }
            }
        }
    }
}

#[async_trait]
impl Store for PgStore {
    async fn insert(&self, tx: &Transaction) -> Result<()> {
        let write = Write::new(Kind::Insert, tx)?;
        if self.submit(write).await? { Ok(()) } else { Err(Error::AlreadyExists(tx.gid.clone())) }
    }

    async fn get(&self, gid: &Gid) -> Result<Option<Transaction>> {
        let key = gid.as_str();
        let row =
            self.read("read", true, |s| async move { s.client.query_opt(&s.st.get, &[&key]).await }).await?;
        row.as_ref().map(from_row).transpose()
    }

    async fn compare_and_set(&self, expected_version: u64, tx: &Transaction) -> Result<Cas> {
        let Ok(expected) = i64::try_from(expected_version) else {
            return Ok(Cas::Conflict(self.get(&tx.gid).await?)); // no stored version is that large
        };
        let write = Write::new(Kind::Cas { expected }, tx)?;
        if self.submit(write).await? { Ok(Cas::Stored) } else { Ok(Cas::Conflict(self.get(&tx.gid).await?)) }
    }

    async fn list(&self, query: &ListQuery) -> Result<Page> {
        let limit = if query.limit == 0 { MAX_PAGE } else { query.limit.min(MAX_PAGE) };
        let desc = query.newest_first;
        // Newest first starts below every id: "~" sorts (in the "C" collation) after every
        // character an id may hold.
        let after = query.after.as_ref().map(Gid::as_str).unwrap_or(if desc { "~" } else { "" });
        let n = limit_param(limit + 1);
        let rows = match query.state {
            None => {
                self.read("list", true, |s| async move {
                    let st = if desc { &s.st.list_all_desc } else { &s.st.list_all };
                    s.client.query(st, &[&after, &n]).await
                })
                .await?
            }
            Some(state) => {
                let code = state_code(state);
                self.read("list", true, |s| async move {
                    let st = if desc { &s.st.list_state_desc } else { &s.st.list_state };
                    s.client.query(st, &[&code, &after, &n]).await
                })
                .await?
            }
        };
        let more = rows.len() > limit;
        let items = from_rows(&rows[..rows.len().min(limit)])?;
        let next = if more { items.last().map(|t| t.gid.clone()) } else { None };
        Ok(Page { items, next })
    }

    async fn claim_due(
        &self,
        owner: &str,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> Result<Vec<Transaction>> {
        if owner.contains('\0') {
            return Err(Error::InvalidInput("a lease owner cannot hold a NUL byte".into()));
        }
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (now, until, n) = (ms(now), ms(lease_until), limit_param(limit));
        // Not retried: a claim whose answer was lost holds its rows until the lease ends.
        let rows = self
            .read("claim", false, |s| async move {
                s.client.query(&s.st.claim, &[&now, &n, &owner, &until]).await
            })
            .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            match from_row(row) {
                Ok(tx) => claimed.push(tx),
                // One damaged row must not stop recovery of all the others; it stays leased and
                // reported here each time it falls due.
                Err(e) => tracing::error!(error = %e, "skipping a damaged transaction row"),
            }
        }
        claimed.sort_by(|a, b| a.gid.cmp(&b.gid));
        Ok(claimed)
    }

    async fn reclaim_abandoned(&self, _now: Timestamp) -> Result<usize> {
        // Shared by several live coordinators: a lease is only taken over once it expires.
        Ok(0)
    }

    async fn count(&self, state: TxState) -> Result<u64> {
        let code = state_code(state);
        let row = self
            .read("count", true, |s| async move { s.client.query_one(&s.st.count, &[&code]).await })
            .await?;
        let n: i64 = row.try_get(0).map_err(|e| pg_error("count", &e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn prune_finished(&self, before: Timestamp, limit: usize) -> Result<Pruned> {
        let (before, n) = (ms(before), limit_param(limit.max(1)));
        let deleted = self
            .read("prune", false, |s| async move { s.client.execute(&s.st.prune, &[&before, &n]).await })
            .await?;
        let deleted = usize::try_from(deleted).unwrap_or(usize::MAX);
        Ok(Pruned { deleted, more: deleted >= limit.max(1) })
    }

    async fn sync(&self) -> Result<()> {
        // Every write this store acknowledged is committed, and whatever any connection can read is
        // committed too, with synchronous_commit on: durable already. (The `*_unsynced` writes are
        // the durable ones here.)
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A role or URL that turns `synchronous_commit` off would make the store acknowledge commits
    /// before PostgreSQL flushed its WAL: the store's own connections turn it back on.
    #[tokio::test]
    async fn a_connection_asking_for_asynchronous_commit_gets_synchronous_commit() {
        let Some(url) = test_database_url() else { return };
        let mut config: tokio_postgres::Config = url.parse().expect("test URL");
        config.options("-c synchronous_commit=off");
        let (plain, conn) = config.connect(NoTls).await.expect("connect");
        tokio::spawn(conn);
        let off: String = plain.query_one("SHOW synchronous_commit", &[]).await.expect("show").get(0);
        assert_eq!(off, "off", "the test's own connection takes the option");

        let client = connect_client(&config).await.expect("store connection");
        let mode: String = client.query_one("SHOW synchronous_commit", &[]).await.expect("show").get(0);
        assert_eq!(mode, "on");
    }
}
