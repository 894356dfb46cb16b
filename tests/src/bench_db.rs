//! The database modes of `tcc-bench` (`--participant-db URL`, PostgreSQL or MySQL): two
//! participants whose business state is a row per account, each step one database transaction.
//!
//! - `raw_db`: the business statements run directly, no tcc: per transaction, on each participant's
//!   pool, `BEGIN; UPDATE (try); COMMIT`, then both confirms at once, each
//!   `BEGIN; UPDATE (confirm); COMMIT`: four transactions, as the participants run them;
//! - `participant_db`: the same statements as `#[tcc]`-style SQL operations
//!   (`Participant<Sql<DB>>`, barrier row in the same transaction) served over HTTP on loopback,
//!   driven by an embedded, durable coordinator.
//!
//! Both pick the account of a transaction uniformly among [`ACCOUNTS`] per participant, so that
//! the figures measure the framework's cost over the database's, not contention on one row.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use tcc_http::participant::Participant;
use tcc_http::participant::sql::Sql;
use tcc_http::sqlx::mysql::MySqlPoolOptions;
use tcc_http::sqlx::postgres::PgPoolOptions;
use tcc_http::sqlx::{self, MySql, Postgres};
use tcc_http::{SqlContext, SqlError};
use travel_booking::service::Db;

/// Accounts per participant.
pub const ACCOUNTS: u64 = 1000;
/// Connections of each participant's pool (the same for both modes).
const POOL: u32 = 32;
/// The operation's name: served at `/db{n}/hold/{try,confirm,cancel}`.
const OPERATION: &str = "hold";

/// The business statements, one set per database.
struct Statements {
    create: &'static str,
    seed: &'static str,
    try_: &'static str,
    confirm: &'static str,
    cancel: &'static str,
}

const POSTGRES: Statements = Statements {
    create: "CREATE TABLE bench_accounts (id VARCHAR(32) PRIMARY KEY, free BIGINT NOT NULL, held BIGINT NOT NULL, sold BIGINT NOT NULL)",
    seed: "INSERT INTO bench_accounts (id, free, held, sold) VALUES ($1, 1000000000, 0, 0)",
    try_: "UPDATE bench_accounts SET free = free - 1, held = held + 1 WHERE id = $1",
    confirm: "UPDATE bench_accounts SET held = held - 1, sold = sold + 1 WHERE id = $1",
    cancel: "UPDATE bench_accounts SET held = held - 1, free = free + 1 WHERE id = $1",
};

const MYSQL: Statements = Statements {
    create: "CREATE TABLE bench_accounts (id VARCHAR(32) PRIMARY KEY, free BIGINT NOT NULL, held BIGINT NOT NULL, sold BIGINT NOT NULL) ENGINE=InnoDB",
    seed: "INSERT INTO bench_accounts (id, free, held, sold) VALUES (?, 1000000000, 0, 0)",
    try_: "UPDATE bench_accounts SET free = free - 1, held = held + 1 WHERE id = ?",
    confirm: "UPDATE bench_accounts SET held = held - 1, sold = sold + 1 WHERE id = ?",
    cancel: "UPDATE bench_accounts SET held = held - 1, free = free + 1 WHERE id = ?",
};

/// The account of participant `n` for draw `k`.
fn account(n: usize, k: u64) -> String {
    format!("p{n}-{}", k % ACCOUNTS)
}

/// The account a tcc transaction uses at participant `n`: drawn from its gid.
fn account_of(n: usize, gid: &tcc_core::Gid) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    gid.as_str().hash(&mut h);
    account(n, h.finish())
}

/// The two participants' pools.
#[derive(Debug)]
enum Pools {
    Postgres([sqlx::PgPool; 2]),
    MySql([sqlx::MySqlPool; 2]),
}

/// The database modes' set-up: a scratch schema (PostgreSQL) or database (MySQL) with the accounts
/// table, both participants' pools, and the participants served on loopback.
#[derive(Debug)]
pub struct DbBench {
    db: Db,
    scratch: String,
    pools: Pools,
    targets: Vec<String>,
    server: tokio::task::JoinHandle<()>,
}

/// Runs `statement` for `id` in a transaction of its own on `pool`.
macro_rules! step {
    ($pool:expr, $statement:expr, $id:expr) => {{
        let mut tx = $pool.begin().await.map_err(|e| e.to_string())?;
        sqlx::query($statement).bind($id).execute(&mut *tx).await.map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())
    }};
}

/// The SQL participant `n` on `pool`, running `s`'s statements.
macro_rules! participant {
    ($db:ty, $pool:expr, $n:expr, $s:expr) => {{
        let participant = Participant::builder().sql($pool.clone());
        participant.migrate().await.map_err(|e| e.to_string())?;
        let n: usize = $n;
        participant.sql_operation_fn(
            OPERATION,
            move |ctx: &mut SqlContext<$db>, _req: Vec<u8>| {
                Box::pin(async move {
                    let id = account_of(n, ctx.gid());
                    sqlx::query($s.try_).bind(id).execute(ctx.conn()).await.map_err(SqlError::from)?;
                    Ok::<_, SqlError>(b"held".to_vec())
                })
            },
            move |ctx: &mut SqlContext<$db>, _req: Vec<u8>| {
                Box::pin(async move {
                    let id = account_of(n, ctx.gid());
                    sqlx::query($s.confirm).bind(id).execute(ctx.conn()).await.map_err(SqlError::from)?;
                    Ok::<_, SqlError>(())
                })
            },
            move |ctx: &mut SqlContext<$db>, _req: Vec<u8>| {
                Box::pin(async move {
                    let id = account_of(n, ctx.gid());
                    sqlx::query($s.cancel).bind(id).execute(ctx.conn()).await.map_err(SqlError::from)?;
                    Ok::<_, SqlError>(())
                })
            },
        )
    }};
}

/// Creates the table and its accounts in `pool`'s database.
macro_rules! stock {
    ($pool:expr, $s:expr) => {{
        sqlx::query($s.create).execute($pool).await.map_err(|e| e.to_string())?;
        let mut tx = $pool.begin().await.map_err(|e| e.to_string())?;
        for n in 0..2 {
            for k in 0..ACCOUNTS {
                sqlx::query($s.seed)
                    .bind(account(n, k))
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        tx.commit().await.map_err(|e| e.to_string())?;
    }};
}

impl DbBench {
    /// Sets up the database at `url` (`postgres://…` or `mysql://…`) in a scratch schema or
    /// database of its own, and serves both participants.
    pub async fn start(url: &str) -> Result<Arc<DbBench>, String> {
        let db: Db = url.parse()?;
        let scratch = format!("tcc_bench_{}", uuid_like());
        let place = db.scratch(&scratch).await.map_err(|e| e.to_string())?;
        let app;
        let pools = match &place {
            Db::Postgres(o) => {
                let pool = || PgPoolOptions::new().max_connections(POOL).connect_with(o.clone());
                let pools =
                    [pool().await.map_err(|e| e.to_string())?, pool().await.map_err(|e| e.to_string())?];
                stock!(&pools[0], POSTGRES);
                let p0: Participant<Sql<Postgres>> = participant!(Postgres, pools[0], 0, POSTGRES);
                let p1: Participant<Sql<Postgres>> = participant!(Postgres, pools[1], 1, POSTGRES);
                app = axum::Router::new().nest("/db0", p0.router()).nest("/db1", p1.router());
                Pools::Postgres(pools)
            }
            Db::MySql(o) => {
                let pool = || MySqlPoolOptions::new().max_connections(POOL).connect_with(o.clone());
                let pools =
                    [pool().await.map_err(|e| e.to_string())?, pool().await.map_err(|e| e.to_string())?];
                stock!(&pools[0], MYSQL);
                let p0: Participant<Sql<MySql>> = participant!(MySql, pools[0], 0, MYSQL);
                let p1: Participant<Sql<MySql>> = participant!(MySql, pools[1], 1, MYSQL);
                app = axum::Router::new().nest("/db0", p0.router()).nest("/db1", p1.router());
                Pools::MySql(pools)
            }
            Db::Sled(_) => return Err("--participant-db takes a postgres:// or mysql:// URL".into()),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let targets = (0..2).map(|n| format!("http://{addr}/db{n}/{OPERATION}")).collect();
        Ok(Arc::new(DbBench { db, scratch, pools, targets, server }))
    }

    /// The base URLs of the two participants' operation (what a coordinator calls).
    pub fn targets(&self) -> Vec<String> {
        self.targets.clone()
    }

    /// One transaction of `raw_db`: the tries one after the other, then both confirms at once.
    pub async fn raw_one(&self) -> Result<(), String> {
        let k = rand::random::<u64>();
        // Both tries one after the other, then both confirms at once.
        macro_rules! transaction {
            ($p:expr, $s:expr) => {{
                step!($p[0], $s.try_, account(0, k))?;
                step!($p[1], $s.try_, account(1, k))?;
                let (a, b) = tokio::join!(async { step!($p[0], $s.confirm, account(0, k)) }, async {
                    step!($p[1], $s.confirm, account(1, k))
                });
                a.and(b)
            }};
        }
        match &self.pools {
            Pools::Postgres(p) => transaction!(p, POSTGRES),
            Pools::MySql(p) => transaction!(p, MYSQL),
        }
    }

    /// Which database, for the report.
    pub fn describe(&self) -> &'static str {
        match self.pools {
            Pools::Postgres(_) => "PostgreSQL",
            Pools::MySql(_) => "MySQL",
        }
    }

    /// Stops serving and drops the scratch schema or database.
    pub async fn finish(&self) -> Result<(), String> {
        self.server.abort();
        match &self.pools {
            Pools::Postgres(p) => {
                for pool in p {
                    pool.close().await;
                }
            }
            Pools::MySql(p) => {
                for pool in p {
                    pool.close().await;
                }
            }
        }
        self.db.drop_scratch(&self.scratch).await.map_err(|e| e.to_string())
    }
}

/// A name part unique to this run.
fn uuid_like() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{}_{nanos}", std::process::id())
}
