//! `#[tcc]` participants whose accounts live in PostgreSQL and in MySQL (MariaDB), each call in one
//! transaction of the service's own database with its barrier row: a transfer across the two
//! databases through a coordinator, a refusal on one that cancels the other, the anomalies over
//! HTTP, the service's own release of a hold nobody finished, and replicas racing on one database.
//!
//! Needs `TCC_TEST_POSTGRES_URL` and `TCC_TEST_MYSQL_URL` (CI starts both databases; with
//! `TCC_REQUIRE_POSTGRES=1` / `TCC_REQUIRE_MYSQL=1` a missing one fails instead of skipping).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Tcc, Where};
use tcc_core::barrier::BarrierState;
use tcc_core::barrier::sql::testing;
use tcc_http::participant::sql::Sql;
use tcc_http::server::native::StateView;
use tcc_http::sqlx::{self, MySql, Postgres};
use tcc_http::stub::TccCallError;
use tcc_http::{BarrierTable, Clock, ManualClock, Participant, SqlContext};

use api::{BankError, MyBank, MyBankClient, PgBank, PgBankClient};

const LONG: Duration = Duration::from_secs(20);
const GRACE: Duration = Duration::from_secs(30);

/// Set in the kill -9 test's child: a hold stops after its statements, before returning.
static PAUSE_MID_TRY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The definitions a shared API crate would hold.
mod api {
    use serde::{Deserialize, Serialize};
    use tcc_http::sqlx::{MySql, Postgres};
    use tcc_http::{Disposition, SqlContext, SqlError, TccError, tcc};

    #[derive(Debug, thiserror::Error, Serialize, Deserialize)]
    pub enum BankError {
        #[error("account {0} lacks the funds")]
        Insufficient(String),
        #[error(transparent)]
        Db(#[from] SqlError),
    }

    impl TccError for BankError {
        fn disposition(&self) -> Disposition {
            match self {
                BankError::Db(e) => e.disposition(),
                BankError::Insufficient(_) => Disposition::Refuse,
            }
        }
    }

    /// A bank whose accounts are in PostgreSQL: holding money moves it from `free` to `held`.
    #[tcc(client = PgBankClient)]
    pub trait PgBank {
        #[tcc(confirm = pay, cancel = release, branch = "pg-bank")]
        async fn hold(
            &self,
            ctx: &mut SqlContext<Postgres>,
            account: String,
            cents: i64,
        ) -> Result<i64, BankError>;
        async fn pay(
            &self,
            ctx: &mut SqlContext<Postgres>,
            account: String,
            cents: i64,
        ) -> Result<(), BankError>;
        async fn release(
            &self,
            ctx: &mut SqlContext<Postgres>,
            account: String,
            cents: i64,
        ) -> Result<(), BankError>;
    }

    /// The same bank on MySQL.
    #[tcc(client = MyBankClient)]
    pub trait MyBank {
        #[tcc(confirm = pay, cancel = release, branch = "my-bank")]
        async fn hold(
            &self,
            ctx: &mut SqlContext<MySql>,
            account: String,
            cents: i64,
        ) -> Result<i64, BankError>;
        async fn pay(
            &self,
            ctx: &mut SqlContext<MySql>,
            account: String,
            cents: i64,
        ) -> Result<(), BankError>;
        async fn release(
            &self,
            ctx: &mut SqlContext<MySql>,
            account: String,
            cents: i64,
        ) -> Result<(), BankError>;
    }
}

/// The implementation of one bank on one database, with that database's placeholders.
macro_rules! bank {
    ($name:ident, $trait:ident, $db:ty, ($account:ident, $cents:ident), $hold:literal [$($h:ident),*], $pay:literal [$($p:ident),*],
     $release:literal [$($r:ident),*], $free:literal) => {
        struct $name;

        impl $trait for $name {
            async fn hold(&self, ctx: &mut SqlContext<$db>, $account: String, $cents: i64) -> Result<i64, BankError> {
                let done = sqlx::query($hold)
                    $(.bind(&$h))*
                    .execute(ctx.conn())
                    .await
                    .map_err(tcc_http::SqlError::from)?;
                if done.rows_affected() == 0 {
                    return Err(BankError::Insufficient($account));
                }
                if PAUSE_MID_TRY.load(std::sync::atomic::Ordering::SeqCst) {
                    // The kill -9 test's child: the hold is written but not committed.
                    say("mid-try");
                    tokio::time::sleep(LONG).await;
                }
                let free: i64 = sqlx::query_scalar($free)
                    .bind(&$account)
                    .fetch_one(ctx.conn())
                    .await
                    .map_err(tcc_http::SqlError::from)?;
                Ok(free)
            }

            async fn pay(&self, ctx: &mut SqlContext<$db>, $account: String, $cents: i64) -> Result<(), BankError> {
                sqlx::query($pay)$(.bind(&$p))*.execute(ctx.conn()).await.map_err(tcc_http::SqlError::from)?;
                Ok(())
            }

            async fn release(&self, ctx: &mut SqlContext<$db>, $account: String, $cents: i64) -> Result<(), BankError> {
                sqlx::query($release)$(.bind(&$r))*.execute(ctx.conn()).await.map_err(tcc_http::SqlError::from)?;
                Ok(())
            }
        }
    };
}

bank!(
    PgAccounts,
    PgBank,
    Postgres,
    (account, cents),
    "UPDATE accounts SET free = free - $1, held = held + $1 WHERE id = $2 AND free >= $1" [cents, account],
    "UPDATE accounts SET held = held - $1, paid = paid + $1 WHERE id = $2" [cents, account],
    "UPDATE accounts SET held = held - $1, free = free + $1 WHERE id = $2" [cents, account],
    "SELECT free FROM accounts WHERE id = $1"
);
bank!(
    MyAccounts,
    MyBank,
    MySql,
    (account, cents),
    "UPDATE accounts SET free = free - ?, held = held + ? WHERE id = ? AND free >= ?" [cents, cents, account, cents],
    "UPDATE accounts SET held = held - ?, paid = paid + ? WHERE id = ?" [cents, cents, account],
    "UPDATE accounts SET held = held - ?, free = free + ? WHERE id = ?" [cents, cents, account],
    "SELECT free FROM accounts WHERE id = ?"
);

/// A fresh PostgreSQL schema of this test's own, or `None` (skipped) without a test database.
async fn pg_pool() -> Option<sqlx::PgPool> {
    let url = testing::test_postgres_url()?;
    let url = testing::create_scratch_postgres_schema(&url, "tcc_sqlp").await.unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE accounts (id TEXT PRIMARY KEY, free BIGINT NOT NULL, held BIGINT NOT NULL, paid BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    Some(pool)
}

/// A fresh MySQL database of this test's own, or `None` (skipped) without a test database.
async fn my_pool() -> Option<sqlx::MySqlPool> {
    let url = testing::test_mysql_url()?;
    let url = testing::create_scratch_mysql_database(&url, "tcc_sqlp").await.unwrap();
    let pool = sqlx::mysql::MySqlPoolOptions::new().max_connections(8).connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE accounts (id VARCHAR(64) PRIMARY KEY, free BIGINT NOT NULL, held BIGINT NOT NULL, paid BIGINT NOT NULL) ENGINE=InnoDB")
        .execute(&pool)
        .await
        .unwrap();
    Some(pool)
}

/// (free, held, paid) of an account.
type Balance = (i64, i64, i64);

async fn pg_balance(pool: &sqlx::PgPool, id: &str) -> Balance {
    sqlx::query_as("SELECT free, held, paid FROM accounts WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn my_balance(pool: &sqlx::MySqlPool, id: &str) -> Balance {
    sqlx::query_as("SELECT free, held, paid FROM accounts WHERE id = ?")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A participant's router on a loopback port; the base URL its typed client takes.
async fn serve(router: axum::Router, prefix: &str) -> (String, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new().nest(&format!("/tcc/{prefix}"), router);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/tcc/{prefix}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, task)
}

async fn pg_bank(pool: &sqlx::PgPool, builder: tcc_http::ParticipantBuilder) -> Participant<Sql<Postgres>> {
    let participant = builder.sql(pool.clone());
    participant.migrate().await.unwrap();
    PgAccounts.into_participant(participant)
}

async fn my_bank(pool: &sqlx::MySqlPool, builder: tcc_http::ParticipantBuilder) -> Participant<Sql<MySql>> {
    let participant = builder.sql(pool.clone());
    participant.migrate().await.unwrap();
    MyAccounts.into_participant(participant)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_from_postgres_and_mysql_accounts_confirms_both_or_cancels_both() {
    let (Some(pg), Some(my)) = (pg_pool().await, my_pool().await) else { return };
    for (pool_id, free) in [("ada", 100), ("bob", 10)] {
        sqlx::query("INSERT INTO accounts VALUES ($1, $2, 0, 0)")
            .bind(pool_id)
            .bind(free)
            .execute(&pg)
            .await
            .unwrap();
        sqlx::query("INSERT INTO accounts VALUES (?, ?, 0, 0)")
            .bind(pool_id)
            .bind(free)
            .execute(&my)
            .await
            .unwrap();
    }
    let pg_side = pg_bank(&pg, Participant::builder()).await;
    let my_side = my_bank(&my, Participant::builder()).await;
    let (pg_url, _pg_task) = serve(pg_side.router(), "pg").await;
    let (my_url, _my_task) = serve(my_side.router(), "my").await;
    let tcc = Tcc::start(Where::Embedded).await;

    // Both holds run; the decision confirms both databases.
    let (pg_client, my_client) = (PgBankClient::new(&pg_url), MyBankClient::new(&my_url));
    let gid = tcc
        .client
        .run(LONG, |tx| async move {
            assert_eq!(pg_client.hold(&tx, "ada".into(), 30).await?, 70);
            assert_eq!(my_client.hold(&tx, "ada".into(), 40).await?, 60);
            Ok(tx.gid().clone())
        })
        .await
        .unwrap();
    assert_eq!(tcc.client.wait(&gid, LONG).await.unwrap().state, StateView::Confirmed);
    support::eventually("both confirms", LONG, async || {
        pg_balance(&pg, "ada").await == (70, 0, 30) && my_balance(&my, "ada").await == (60, 0, 40)
    })
    .await;
    let pg_row = pg_side.sql_barrier().get(&gid, &"pg-bank".parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(pg_row.state, BarrierState::Confirmed);

    // A refusal on MySQL (bob has 10) cancels the hold already made on PostgreSQL.
    let (pg_client, my_client) = (PgBankClient::new(&pg_url), MyBankClient::new(&my_url));
    let tx = tcc.client.begin(LONG).await.unwrap();
    pg_client.hold(&tx, "bob".into(), 5).await.unwrap();
    match my_client.hold(&tx, "bob".into(), 50).await {
        Err(TccCallError::Refused { error: BankError::Insufficient(account), .. }) => {
            assert_eq!(account, "bob")
        }
        other => panic!("expected the typed refusal, got {other:?}"),
    }
    let gid = tx.gid().clone();
    tx.cancel().await.unwrap();
    assert_eq!(tcc.client.wait(&gid, LONG).await.unwrap().state, StateView::Cancelled);
    support::eventually("the PostgreSQL hold released", LONG, async || {
        pg_balance(&pg, "bob").await == (10, 0, 0)
    })
    .await;
    assert_eq!(my_balance(&my, "bob").await, (10, 0, 0), "the refused try left nothing");
    // The refused try left no row, so the coordinator's cancel was an empty cancel there.
    let my_row = my_side.sql_barrier().get(&gid, &"my-bank".parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(my_row.state, BarrierState::CancelledEmpty);
    tcc.client.shutdown().await;
}

/// Raw calls to one operation, as the coordinator makes them.
struct Calls {
    http: reqwest::Client,
    target: String,
}

impl Calls {
    fn new(url: &str) -> Calls {
        Calls { http: reqwest::Client::builder().no_proxy().build().unwrap(), target: format!("{url}/hold") }
    }

    /// (status, outcome header or error code).
    async fn call(&self, phase: &str, gid: &str, branch: &str, deadline: u64, body: &str) -> (u16, String) {
        let res = self
            .http
            .post(format!("{}/{phase}", self.target))
            .header("tcc-gid", gid)
            .header("tcc-branch", branch)
            .header("tcc-deadline", deadline.to_string())
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let outcome = res.headers().get("tcc-outcome").map(|v| v.to_str().unwrap().to_owned());
        let body: serde_json::Value = res.json().await.unwrap_or_default();
        (status, outcome.unwrap_or_else(|| body["code"].as_str().unwrap_or_default().to_owned()))
    }
}

/// The anomalies, the service's own release, and replicas racing, on one database: what the
/// PostgreSQL and the MySQL participants must both do.
macro_rules! anomalies_and_replicas {
    ($test:ident, $pool:ident, $bank:ident, $balance:ident, $insert:literal) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            let Some(pool) = $pool().await else { return };
            sqlx::query($insert).bind("ada").bind(100i64).execute(&pool).await.unwrap();
            let clock = ManualClock::new(tcc_core::Timestamp(1_000_000));
            let builder =
                || Participant::builder().clock(Arc::new(clock.clone())).grace(GRACE).without_expiry_loop();
            // Two replicas of the service on one database, each with its own pool.
            let replica_a = $bank(&pool, builder()).await;
            let other_pool = sqlx::Pool::connect_with(pool.connect_options().as_ref().clone()).await.unwrap();
            let replica_b = $bank(&other_pool, builder()).await;
            let (url_a, _a) = serve(replica_a.router(), "bank").await;
            let (url_b, _b) = serve(replica_b.router(), "bank").await;
            let (a, b) = (Calls::new(&url_a), Calls::new(&url_b));
            let deadline = clock.now().0 + 10_000;
            let req = r#"["ada",10]"#;

            // Empty cancel, then the late try is refused: nothing held.
            assert_eq!(a.call("cancel", "g1", "b", deadline, "").await, (200, "empty".into()));
            assert_eq!(b.call("try", "g1", "b", deadline, req).await, (409, "suspended".into()));
            assert_eq!($balance(&pool, "ada").await, (100, 0, 0));

            // A try, a duplicate try on the other replica, duplicate confirms on both: one run each.
            assert_eq!(a.call("try", "g2", "b", deadline, req).await, (200, "fresh".into()));
            assert_eq!(b.call("try", "g2", "b", deadline, req).await, (200, "duplicate".into()));
            let (c1, c2) = tokio::join!(
                a.call("confirm", "g2", "b", deadline, ""),
                b.call("confirm", "g2", "b", deadline, "")
            );
            let mut outcomes = [c1.1, c2.1];
            outcomes.sort();
            assert_eq!(outcomes, ["confirmed", "duplicate"], "exactly one confirm ran");
            assert_eq!($balance(&pool, "ada").await, (90, 0, 10));
            assert_eq!(a.call("cancel", "g2", "b", deadline, "").await, (409, "already_confirmed".into()));
            assert_eq!(a.call("confirm", "g3", "b", deadline, "").await, (409, "not_tried".into()));
            assert_eq!(a.call("try", "g3", "b", clock.now().0, req).await, (409, "deadline_passed".into()));
            // A refused try (not enough money) leaves nothing: the later cancel is empty.
            assert_eq!(a.call("try", "g4", "b", deadline, r#"["ada",1000]"#).await, (409, "refused".into()));
            assert_eq!(a.call("cancel", "g4", "b", deadline, "").await, (200, "empty".into()));
            assert_eq!($balance(&pool, "ada").await, (90, 0, 10));

            // Tries racing their cancels on two replicas: each pair ends "try ran, cancel released
            // it" or "cancel empty, try refused", never a hold left behind.
            let mut pairs = Vec::new();
            for i in 0..12 {
                let gid = format!("race-{i}");
                let (t, c) = tokio::join!(
                    a.call("try", &gid, "b", deadline, r#"["ada",1]"#),
                    b.call("cancel", &gid, "b", deadline, "")
                );
                pairs.push((t, c));
            }
            for (t, c) in &pairs {
                let ok =
                    matches!((t.1.as_str(), c.1.as_str()), ("fresh", "cancelled") | ("suspended", "empty"));
                assert!(ok, "a try {t:?} and its cancel {c:?} disagree");
            }
            assert_eq!(
                $balance(&pool, "ada").await,
                (90, 0, 10),
                "every raced hold was released or never made"
            );

            // A hold nobody finishes is released by the service itself at deadline + grace, by one
            // replica; a confirm arriving later is refused.
            assert_eq!(a.call("try", "g5", "b", deadline, req).await, (200, "fresh".into()));
            assert_eq!($balance(&pool, "ada").await, (80, 10, 10));
            assert_eq!(replica_a.expire_due().await.unwrap(), 0, "not due before deadline + grace");
            clock.advance(Duration::from_millis(10_000) + GRACE);
            let (ra, rb) = tokio::join!(replica_a.expire_due(), replica_b.expire_due());
            assert_eq!(ra.unwrap() + rb.unwrap(), 1, "released exactly once");
            assert_eq!($balance(&pool, "ada").await, (90, 0, 10));
            let row = replica_a
                .sql_barrier()
                .get(&"g5".parse().unwrap(), &"b".parse().unwrap())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(row.state, BarrierState::Expired);
            assert_eq!(a.call("confirm", "g5", "b", deadline, "").await, (410, "expired".into()));
            assert_eq!(b.call("cancel", "g5", "b", deadline, "").await, (200, "expired".into()));
            assert_eq!(replica_a.sql_barrier().held().await.unwrap(), 0);
        }
    };
}

anomalies_and_replicas!(
    postgres_participant_handles_anomalies_expiry_and_racing_replicas,
    pg_pool,
    pg_bank,
    pg_balance,
    "INSERT INTO accounts VALUES ($1, $2, 0, 0)"
);
anomalies_and_replicas!(
    mysql_participant_handles_anomalies_expiry_and_racing_replicas,
    my_pool,
    my_bank,
    my_balance,
    "INSERT INTO accounts VALUES (?, ?, 0, 0)"
);

#[test]
fn the_barrier_table_name_is_checked_once() {
    assert!(BarrierTable::new("tcc_barrier").is_ok());
    assert!(BarrierTable::new("bank.tcc_barrier").is_ok());
    assert!(BarrierTable::new("tcc_barrier; DROP TABLE accounts").is_err());
}

/// The kill -9 test's child: which database (`postgres` or `mysql`), and its URL.
const KILL_CHILD: &str = "TCC_SQL_KILL9_CHILD";
const KILL_URL: &str = "TCC_SQL_KILL9_URL";
const KILL_TEST: &str = "a_participant_killed_with_sigkill_mid_try_leaves_nothing_half_written";

/// The child: serves the bank on the database named, prints its URL, then pauses every hold after
/// its statements until it is killed.
async fn kill_child(kind: &str, url: &str) {
    PAUSE_MID_TRY.store(true, std::sync::atomic::Ordering::SeqCst);
    let router = match kind {
        "postgres" => {
            pg_bank(&sqlx::PgPool::connect(url).await.unwrap(), Participant::builder()).await.router()
        }
        _ => my_bank(&sqlx::MySqlPool::connect(url).await.unwrap(), Participant::builder()).await.router(),
    };
    let (base, task) = serve(router, "bank").await;
    say(&format!("serving {base}"));
    let _ = task.await;
}

/// Reads the child's lines until one holds `prefix`, and returns what follows it (bounded). The test
/// harness may print its own text before it on the same line.
async fn line_starting(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    prefix: &str,
) -> String {
    let wait = tokio::time::timeout(LONG, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(at) = line.find(prefix) {
                return line[at + prefix.len()..].to_owned();
            }
        }
        panic!("the child ended before printing {prefix:?}");
    });
    wait.await.unwrap_or_else(|_| panic!("no {prefix:?} from the child in {LONG:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_killed_with_sigkill_mid_try_leaves_nothing_half_written() {
    if let (Ok(kind), Ok(url)) = (std::env::var(KILL_CHILD), std::env::var(KILL_URL)) {
        return kill_child(&kind, &url).await;
    }
    let (Some(pg_url), Some(my_url)) = (testing::test_postgres_url(), testing::test_mysql_url()) else {
        return;
    };
    let pg_url = testing::create_scratch_postgres_schema(&pg_url, "tcc_kill").await.unwrap();
    let my_url = testing::create_scratch_mysql_database(&my_url, "tcc_kill").await.unwrap();
    for (kind, url) in [("postgres", pg_url), ("mysql", my_url)] {
        // The accounts, as the other tests make them.
        let create = "CREATE TABLE accounts (id VARCHAR(64) PRIMARY KEY, free BIGINT NOT NULL, held BIGINT NOT NULL, paid BIGINT NOT NULL)";
        let balance = async || -> Balance {
            match kind {
                "postgres" => pg_balance(&sqlx::PgPool::connect(&url).await.unwrap(), "ada").await,
                _ => my_balance(&sqlx::MySqlPool::connect(&url).await.unwrap(), "ada").await,
            }
        };
        match kind {
            "postgres" => {
                let pool = sqlx::PgPool::connect(&url).await.unwrap();
                sqlx::query(create).execute(&pool).await.unwrap();
                sqlx::query("INSERT INTO accounts VALUES ('ada', 100, 0, 0)").execute(&pool).await.unwrap();
            }
            _ => {
                let pool = sqlx::MySqlPool::connect(&url).await.unwrap();
                sqlx::query(create).execute(&pool).await.unwrap();
                sqlx::query("INSERT INTO accounts VALUES ('ada', 100, 0, 0)").execute(&pool).await.unwrap();
            }
        }
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", KILL_TEST, "--nocapture", "--test-threads=1"])
            .env(KILL_CHILD, kind)
            .env(KILL_URL, &url)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines =
            tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
        let serving = line_starting(&mut lines, "serving ").await;
        let calls = Calls::new(serving.trim());
        let deadline = tcc_core::SystemClock.now().0 + 60_000;
        let try_call =
            tokio::spawn(async move { calls.call("try", "k1", "b", deadline, r#"["ada",10]"#).await });
        line_starting(&mut lines, "mid-try").await;
        child.kill().await.unwrap(); // SIGKILL: the hold's statements and barrier row are not committed
        let _ = try_call.await; // the connection dropped: an error, or nothing

        // Nothing half-written: no hold, no barrier row; the coordinator's cancel is empty and the
        // try, should it come again, is refused.
        assert_eq!(balance().await, (100, 0, 0), "{kind}: the killed try's statements rolled back");
        let (base, _task) = match kind {
            "postgres" => {
                let p = pg_bank(&sqlx::PgPool::connect(&url).await.unwrap(), Participant::builder()).await;
                let gid = "k1".parse().unwrap();
                assert_eq!(p.sql_barrier().get(&gid, &"b".parse().unwrap()).await.unwrap(), None, "{kind}");
                serve(p.router(), "bank").await
            }
            _ => {
                let p = my_bank(&sqlx::MySqlPool::connect(&url).await.unwrap(), Participant::builder()).await;
                let gid = "k1".parse().unwrap();
                assert_eq!(p.sql_barrier().get(&gid, &"b".parse().unwrap()).await.unwrap(), None, "{kind}");
                serve(p.router(), "bank").await
            }
        };
        let calls = Calls::new(&base);
        assert_eq!(calls.call("cancel", "k1", "b", deadline, "").await, (200, "empty".into()), "{kind}");
        assert_eq!(
            calls.call("try", "k1", "b", deadline, r#"["ada",10]"#).await,
            (409, "suspended".into()),
            "{kind}"
        );
        assert_eq!(balance().await, (100, 0, 0), "{kind}");
    }
}

/// Batches of tries and of phase-two calls, as a busy initiator and a busy coordinator send them, on
/// the PostgreSQL participant: each call answered as its single call would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_tries_and_of_phase_two_calls_run_each_call_through_the_sql_barrier() {
    let Some(pool) = pg_pool().await else { return };
    sqlx::query("INSERT INTO accounts VALUES ('ada', 100, 0, 0)").execute(&pool).await.unwrap();
    let bank = pg_bank(&pool, Participant::builder().without_expiry_loop()).await;
    let (url, _task) = serve(bank.router(), "bank").await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = tcc_core::SystemClock.now().0 + 60_000;
    let tries: Vec<_> = ["t1", "t2", "t3", "t4"]
        .iter()
        .map(|gid| tcc_http::protocol::TryCall {
            gid: (*gid).into(),
            branch: "b".into(),
            deadline,
            // t4 asks for more than the account holds: refused alone (tries of different
            // transactions run concurrently, in no set order).
            request: if *gid == "t4" { r#"["ada",1000]"#.into() } else { r#"["ada",10]"#.into() },
        })
        .collect();
    let answer: tcc_http::protocol::TryBatchAnswer = http
        .post(format!("{url}/hold/tries"))
        .json(&tcc_http::protocol::TryBatch { tries })
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let statuses: Vec<u16> = answer.results.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 200, 409], "{answer:?}");
    assert_eq!(pg_balance(&pool, "ada").await, (70, 30, 0));

    let call = |gid: &str, decision| tcc_http::protocol::BatchCall {
        gid: gid.into(),
        branch: "b".into(),
        deadline,
        decision,
    };
    use tcc_core::Decision::{Cancel, Confirm};
    let calls = vec![call("t1", Confirm), call("t2", Cancel), call("t1", Confirm), call("t4", Cancel)];
    let answer: serde_json::Value = http
        .post(format!("{url}/hold/batch"))
        .json(&tcc_http::protocol::BatchRequest { calls })
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let outcomes: Vec<&str> =
        answer["results"].as_array().unwrap().iter().map(|r| r["outcome"].as_str().unwrap_or("?")).collect();
    let mut sorted = outcomes[..3].to_vec();
    sorted.sort_unstable();
    assert_eq!(sorted, ["cancelled", "confirmed", "duplicate"], "{answer}");
    assert_eq!(outcomes[3], "empty", "the refused try left no row: {answer}");
    // t1 paid 10, t2 released 10, t3 still held.
    assert_eq!(pg_balance(&pool, "ada").await, (80, 10, 10));
}

/// A business statement that fails with a serialization failure (SQLSTATE 40001, raised here on
/// purpose) rolls the call back and runs it again; one that keeps failing is answered 503
/// `contended`, never 500. Also the closure operations' API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serialization_failures_are_run_again_by_the_runtime_not_answered_500() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let Some(pool) = pg_pool().await else { return };
    sqlx::query("INSERT INTO accounts VALUES ('ada', 100, 0, 0)").execute(&pool).await.unwrap();
    // How many runs still fail before one goes through.
    let failing = Arc::new(AtomicUsize::new(2));
    let runs = Arc::new(AtomicUsize::new(0));
    let (f, r) = (Arc::clone(&failing), Arc::clone(&runs));
    let participant = Participant::builder().without_expiry_loop().sql(pool.clone());
    participant.migrate().await.unwrap();
    let participant = participant.sql_operation_fn(
        "hold",
        move |ctx: &mut SqlContext<Postgres>, _request: Vec<u8>| {
            let (f, r) = (Arc::clone(&f), Arc::clone(&r));
            Box::pin(async move {
                r.fetch_add(1, Ordering::SeqCst);
                sqlx::query("UPDATE accounts SET free = free - 1, held = held + 1 WHERE id = 'ada'")
                    .execute(ctx.conn())
                    .await?;
                if f.load(Ordering::SeqCst) > 0 {
                    f.fetch_sub(1, Ordering::SeqCst);
                    sqlx::query("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
                        .execute(ctx.conn())
                        .await?;
                }
                Ok::<_, tcc_http::SqlError>(b"held".to_vec())
            })
        },
        |_ctx: &mut SqlContext<Postgres>, _request: Vec<u8>| Box::pin(async move { Ok(()) }),
        |_ctx: &mut SqlContext<Postgres>, _request: Vec<u8>| Box::pin(async move { Ok(()) }),
    );
    let (url, _task) = serve(participant.router(), "bank").await;
    let calls = Calls::new(&url);
    let deadline = tcc_core::SystemClock.now().0 + 60_000;
    assert_eq!(calls.call("try", "s1", "b", deadline, "x").await, (200, "fresh".into()));
    assert_eq!(runs.load(Ordering::SeqCst), 3, "two runs rolled back, the third committed");
    assert_eq!(pg_balance(&pool, "ada").await, (99, 1, 0), "one hold: the rolled-back runs left nothing");

    failing.store(usize::MAX / 2, Ordering::SeqCst);
    assert_eq!(calls.call("try", "s2", "b", deadline, "x").await, (503, "contended".into()));
    assert_eq!(pg_balance(&pool, "ada").await, (99, 1, 0));
    assert_eq!(
        participant.sql_barrier().get(&"s2".parse().unwrap(), &"b".parse().unwrap()).await.unwrap(),
        None
    );
}
