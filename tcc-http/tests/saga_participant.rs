//! Saga steps, message actions and a message's local transaction through the participant runtime,
//! on every store (sled, PostgreSQL, MySQL), each effect written in the store's own transaction with
//! the barrier record (DESIGN.md guarantee 9 at the participant):
//! - an action runs once however often it is delivered; a compensation runs once, only after its
//!   action; a compensation arriving first is empty and the late action is refused;
//! - a local transaction and its back-check agree: committed means the writes are there, rolled
//!   back means they never will be (the late local transaction is refused);
//! - and the same through a coordinator: a saga whose later step refuses compensates this one, a
//!   message is sent only when its local transaction committed.
//!
//! PostgreSQL and MySQL come from `TCC_TEST_POSTGRES_URL` and `TCC_TEST_MYSQL_URL`; without one its
//! rig is skipped, unless `TCC_REQUIRE_POSTGRES=1` / `TCC_REQUIRE_MYSQL=1` (CI).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use support::{Tcc, Where, eventually, fast_core};
use tcc_core::barrier::BarrierState;
use tcc_core::barrier::sql::testing;
use tcc_http::client::{FinishError, Finished};
use tcc_http::participant::sql::{Sql, SqlAction, SqlStep};
use tcc_http::participant::{LOCAL_BRANCH, LocalError};
use tcc_http::server::ServerConfig;
use tcc_http::server::native::StateView;
use tcc_http::sqlx::{self, MySql, Postgres};
use tcc_http::staged::{AsyncAction, AsyncStep};
use tcc_http::{
    Disposition, DurableDb, Gid, Participant, SqlContext, SqlError, StoreError, TccContext, TccError,
};

const LONG: Duration = Duration::from_secs(20);
const EFFECTS: &str = "effects";

/// A step's request: whose points, and whether the business refuses it.
#[derive(Debug, Serialize, Deserialize)]
struct Points {
    customer: String,
    #[serde(default)]
    refuse: bool,
}

#[derive(Debug, thiserror::Error, Serialize, Deserialize)]
enum LoyaltyError {
    #[error("{0} may not collect points")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] SqlError),
}

impl TccError for LoyaltyError {
    fn disposition(&self) -> Disposition {
        match self {
            LoyaltyError::Refused(_) => Disposition::Refuse,
            LoyaltyError::Store(_) => Disposition::Transient,
            LoyaltyError::Db(e) => e.disposition(),
        }
    }
}

/// The effect key of one call: `{gid}/{branch}/{kind}`.
fn key(gid: &str, branch: &str, kind: &str) -> String {
    format!("{gid}/{branch}/{kind}")
}

/// Adds one to the count of an effect, staged in the call's sled context.
fn count(ctx: &TccContext, kind: &str) -> Result<(), StoreError> {
    let key = key(ctx.gid().as_str(), ctx.branch().as_str(), kind);
    match ctx.get::<u64>(EFFECTS, &key)? {
        Some(n) => ctx.put(EFFECTS, &key, &(n.value + 1), n.version).map(drop),
        None => ctx.insert_new(EFFECTS, &key, &1u64).map(drop),
    }
}

/// Loyalty points on sled: the saga step.
struct SledPoints;

impl AsyncAction for SledPoints {
    type Request = Points;
    type Error = LoyaltyError;

    async fn action(&self, ctx: TccContext, req: Points) -> Result<(), LoyaltyError> {
        if req.refuse {
            return Err(LoyaltyError::Refused(req.customer));
        }
        Ok(count(&ctx, "action")?)
    }
}

impl AsyncStep for SledPoints {
    async fn compensate(&self, ctx: TccContext, _req: Points) -> Result<(), LoyaltyError> {
        Ok(count(&ctx, "compensate")?)
    }
}

/// A confirmation e-mail on sled: the message action.
struct SledMail;

impl AsyncAction for SledMail {
    type Request = Points;
    type Error = LoyaltyError;

    async fn action(&self, ctx: TccContext, _req: Points) -> Result<(), LoyaltyError> {
        Ok(count(&ctx, "mail")?)
    }
}

/// The same on a SQL database, with that database's placeholders.
macro_rules! sql_services {
    ($points:ident, $mail:ident, $db:ty, $insert:literal) => {
        pub(super) struct $points;
        pub(super) struct $mail;

        pub(super) async fn record(ctx: &mut SqlContext<$db>, kind: &str) -> Result<(), LoyaltyError> {
            let key = key(ctx.gid().as_str(), ctx.branch().as_str(), kind);
            sqlx::query($insert).bind(key).execute(ctx.conn()).await.map_err(SqlError::from)?;
            Ok(())
        }

        impl SqlAction for $points {
            type Db = $db;
            type Request = Points;
            type Error = LoyaltyError;

            async fn action(&self, ctx: &mut SqlContext<$db>, req: Points) -> Result<(), LoyaltyError> {
                if req.refuse {
                    return Err(LoyaltyError::Refused(req.customer));
                }
                record(ctx, "action").await
            }
        }

        impl SqlStep for $points {
            async fn compensate(&self, ctx: &mut SqlContext<$db>, _req: Points) -> Result<(), LoyaltyError> {
                record(ctx, "compensate").await
            }
        }

        impl SqlAction for $mail {
            type Db = $db;
            type Request = Points;
            type Error = LoyaltyError;

            async fn action(&self, ctx: &mut SqlContext<$db>, _req: Points) -> Result<(), LoyaltyError> {
                record(ctx, "mail").await
            }
        }
    };
}

mod pg {
    use super::*;
    sql_services!(PgPoints, PgMail, Postgres, "INSERT INTO effects (k) VALUES ($1)");
}

mod my {
    use super::*;
    sql_services!(MyPoints, MyMail, MySql, "INSERT INTO effects (k) VALUES (?)");
}

/// One service on one store: its routes on a loopback port, its effects, its local transactions.
enum Service {
    Sled(Participant),
    Postgres(Participant<Sql<Postgres>>),
    MySql(Participant<Sql<MySql>>),
}

struct Rig {
    name: &'static str,
    service: Service,
    /// The base URL of the participant's routes.
    url: String,
    _db: Option<DurableDb>,
}

async fn serve(router: tcc_http::axum::Router) -> String {
    let app = tcc_http::axum::Router::new().nest("/tcc/loyalty", router);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/tcc/loyalty", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = tcc_http::axum::serve(listener, app).await;
    });
    url
}

/// Every rig this machine can run (sled always; PostgreSQL and MySQL when configured).
async fn rigs() -> Vec<Rig> {
    let mut rigs = Vec::new();
    let db = DurableDb::temporary().unwrap();
    let p = Participant::builder()
        .sled(&db, &[EFFECTS])
        .unwrap()
        .async_step("points", SledPoints)
        .async_action("mail", SledMail);
    let url = serve(p.router()).await;
    rigs.push(Rig { name: "sled", service: Service::Sled(p), url, _db: Some(db) });

    if let Some(url) = testing::test_postgres_url() {
        let url = testing::create_scratch_postgres_schema(&url, "tcc_sagap").await.unwrap();
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&url).await.unwrap();
        sqlx::query("CREATE TABLE effects (k TEXT NOT NULL)").execute(&pool).await.unwrap();
        let p = Participant::builder().sql(pool);
        p.migrate().await.unwrap();
        let p = p.sql_step("points", pg::PgPoints).sql_action("mail", pg::PgMail);
        let url = serve(p.router()).await;
        rigs.push(Rig { name: "postgres", service: Service::Postgres(p), url, _db: None });
    }
    if let Some(url) = testing::test_mysql_url() {
        let url = testing::create_scratch_mysql_database(&url, "tcc_sagap").await.unwrap();
        let pool = sqlx::mysql::MySqlPoolOptions::new().max_connections(8).connect(&url).await.unwrap();
        sqlx::query("CREATE TABLE effects (k VARCHAR(255) NOT NULL) ENGINE=InnoDB")
            .execute(&pool)
            .await
            .unwrap();
        let p = Participant::builder().sql(pool);
        p.migrate().await.unwrap();
        let p = p.sql_step("points", my::MyPoints).sql_action("mail", my::MyMail);
        let url = serve(p.router()).await;
        rigs.push(Rig { name: "mysql", service: Service::MySql(p), url, _db: None });
    }
    rigs
}

#[test]
fn the_sql_rigs_run_when_required() {
    for (var, url) in [
        ("TCC_REQUIRE_POSTGRES", testing::test_postgres_url()),
        ("TCC_REQUIRE_MYSQL", testing::test_mysql_url()),
    ] {
        if std::env::var(var).is_ok_and(|v| v == "1") {
            assert!(url.is_some(), "{var}=1 but no database URL is set");
        }
    }
}

impl Rig {
    /// How many times effect `kind` was committed for (gid, branch).
    async fn effects(&self, gid: &str, branch: &str, kind: &str) -> u64 {
        let k = key(gid, branch, kind);
        match &self.service {
            Service::Sled(p) => p.read::<u64>(EFFECTS, &k).unwrap().map_or(0, |v| v.value),
            Service::Postgres(p) => {
                let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM effects WHERE k = $1")
                    .bind(&k)
                    .fetch_one(p.pool())
                    .await
                    .unwrap();
                n as u64
            }
            Service::MySql(p) => {
                let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM effects WHERE k = ?")
                    .bind(&k)
                    .fetch_one(p.pool())
                    .await
                    .unwrap();
                n as u64
            }
        }
    }

    async fn state(&self, gid: &str, branch: &str) -> Option<BarrierState> {
        let (gid, branch) = (gid.parse().unwrap(), branch.parse().unwrap());
        match &self.service {
            Service::Sled(p) => p.barrier().get(&gid, &branch).unwrap().map(|r| r.state),
            Service::Postgres(p) => p.sql_barrier().get(&gid, &branch).await.unwrap().map(|r| r.state),
            Service::MySql(p) => p.sql_barrier().get(&gid, &branch).await.unwrap().map(|r| r.state),
        }
    }

    /// The message's local transaction, writing effect `local`, then failing if `fail`; the error's
    /// name.
    async fn local(&self, gid: &Gid, fail: bool) -> Result<(), String> {
        self.local_transaction(gid, fail).await.map_err(|e| match e {
            LocalError::Business(_) => "business".to_owned(),
            LocalError::RolledBack => "rolled_back".to_owned(),
            LocalError::AlreadyCommitted => "already_committed".to_owned(),
            other => format!("{other}"),
        })
    }

    async fn local_transaction(&self, gid: &Gid, fail: bool) -> Result<(), LocalError<LoyaltyError>> {
        let refuse = |fail: bool| if fail { Err(LoyaltyError::Refused("local".into())) } else { Ok(()) };
        match &self.service {
            Service::Sled(p) => {
                p.local_transaction(gid, |ctx| async move {
                    count(&ctx, "local")?;
                    refuse(fail)
                })
                .await
            }
            Service::Postgres(p) => {
                p.local_transaction(gid, |ctx| {
                    Box::pin(async move {
                        pg::record(ctx, "local").await?;
                        refuse(fail)
                    })
                })
                .await
            }
            Service::MySql(p) => {
                p.local_transaction(gid, |ctx| {
                    Box::pin(async move {
                        my::record(ctx, "local").await?;
                        refuse(fail)
                    })
                })
                .await
            }
        }
    }
}

/// (status, `tcc-outcome` or error code) of one call.
async fn call(http: &reqwest::Client, url: &str, gid: &str, branch: &str, body: &str) -> (u16, String) {
    let res = http
        .post(url)
        .header("tcc-gid", gid)
        .header("tcc-branch", branch)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let outcome = res.headers().get("tcc-outcome").map(|v| v.to_str().unwrap().to_owned());
    let text = res.text().await.unwrap();
    let code = outcome.unwrap_or_else(|| {
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_owned))
            .unwrap_or(text)
    });
    (status, code)
}

fn new_gid(tag: &str) -> String {
    format!("{tag}-{}", uuid::Uuid::now_v7().simple())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_steps_run_once_compensate_once_and_refuse_a_late_action_on_every_store() {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for rig in rigs().await {
        let (action, compensate) =
            (format!("{}/points/action", rig.url), format!("{}/points/compensate", rig.url));
        let body = r#"{"customer":"ada"}"#;
        let n = rig.name;

        // Delivered three times, the action runs once; so does its compensation.
        let g = new_gid("once");
        assert_eq!(call(&http, &action, &g, "01", body).await, (200, "done".into()), "{n}");
        assert_eq!(call(&http, &action, &g, "01", body).await, (200, "duplicate".into()), "{n}");
        assert_eq!(call(&http, &action, &g, "01", body).await, (200, "duplicate".into()), "{n}");
        assert_eq!(rig.state(&g, "01").await, Some(BarrierState::Done), "{n}");
        assert_eq!(call(&http, &compensate, &g, "01", "").await, (200, "compensated".into()), "{n}");
        assert_eq!(call(&http, &compensate, &g, "01", "").await, (200, "duplicate".into()), "{n}");
        // Redelivered after its compensation, the action is refused: it would never be undone.
        assert_eq!(call(&http, &action, &g, "01", body).await, (409, "compensated".into()), "{n}");
        assert_eq!(
            (rig.effects(&g, "01", "action").await, rig.effects(&g, "01", "compensate").await),
            (1, 1),
            "{n}"
        );

        // A compensation arriving first runs nothing, and the late action is refused.
        let g = new_gid("empty");
        assert_eq!(call(&http, &compensate, &g, "01", "").await, (200, "empty".into()), "{n}");
        assert_eq!(rig.state(&g, "01").await, Some(BarrierState::CompensatedEmpty), "{n}");
        assert_eq!(call(&http, &action, &g, "01", body).await, (409, "compensated".into()), "{n}");
        assert_eq!(
            (rig.effects(&g, "01", "action").await, rig.effects(&g, "01", "compensate").await),
            (0, 0),
            "{n}"
        );

        // A refused action stores nothing: its compensation is then empty.
        let g = new_gid("refused");
        let refuse = r#"{"customer":"eve","refuse":true}"#;
        assert_eq!(call(&http, &action, &g, "01", refuse).await, (409, "refused".into()), "{n}");
        assert_eq!(rig.state(&g, "01").await, None, "{n}");
        assert_eq!(call(&http, &compensate, &g, "01", "").await, (200, "empty".into()), "{n}");

        // Bad input changes nothing; a step has no TCC phases, a message action no compensation.
        let g = new_gid("bad");
        assert_eq!(call(&http, &action, &g, "01", "not json").await.0, 400, "{n}");
        assert_eq!(rig.state(&g, "01").await, None, "{n}");
        for phase in ["try", "confirm", "cancel", "batch", "tries"] {
            let url = format!("{}/points/{phase}", rig.url);
            assert_eq!(call(&http, &url, &g, "01", body).await, (404, "unknown_phase".into()), "{n} {phase}");
        }
        let url = format!("{}/mail/compensate", rig.url);
        assert_eq!(call(&http, &url, &g, "01", "").await, (404, "unknown_phase".into()), "{n}");
        assert_eq!(rig.state(&g, "01").await, None, "{n}");

        // A message action runs once however often it is delivered.
        let mail = format!("{}/mail/action", rig.url);
        assert_eq!(call(&http, &mail, &g, "02", body).await, (200, "done".into()), "{n}");
        assert_eq!(call(&http, &mail, &g, "02", body).await, (200, "duplicate".into()), "{n}");
        assert_eq!(rig.effects(&g, "02", "mail").await, 1, "{n}");
        // The same branch through the other step is refused.
        assert_eq!(call(&http, &action, &g, "02", body).await.0, 409, "{n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_transaction_and_its_back_check_agree_on_every_store() {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for rig in rigs().await {
        let n = rig.name;
        let check = |gid: &str| {
            let url = format!("{}/back-check?gid={gid}", rig.url);
            let http = http.clone();
            async move {
                let res = http.get(url).send().await.unwrap();
                let status = res.status().as_u16();
                (status, res.text().await.unwrap())
            }
        };

        // Committed: the writes are there, and the back-check says so, every time.
        let g: Gid = new_gid("msg").parse().unwrap();
        assert_eq!(rig.local(&g, false).await, Ok(()), "{n}");
        assert_eq!(rig.effects(g.as_str(), LOCAL_BRANCH, "local").await, 1, "{n}");
        for _ in 0..2 {
            let (status, body) = check(g.as_str()).await;
            assert_eq!(status, 200, "{n}: {body}");
            assert!(body.contains("SUCCESS"), "{n}: {body}");
        }
        assert_eq!(rig.local(&g, false).await, Err("already_committed".into()), "{n}");
        assert_eq!(rig.effects(g.as_str(), LOCAL_BRANCH, "local").await, 1, "{n}: not written twice");

        // Asked first, the back-check settles the message as rolled back; the late local
        // transaction is refused and writes nothing.
        let g: Gid = new_gid("late").parse().unwrap();
        let (status, body) = check(g.as_str()).await;
        assert_eq!(status, 409, "{n}: {body}");
        assert!(body.contains("rolled_back") && body.contains("FAILURE"), "{n}: {body}");
        assert_eq!(rig.state(g.as_str(), LOCAL_BRANCH).await, Some(BarrierState::RolledBack), "{n}");
        assert_eq!(rig.local(&g, false).await, Err("rolled_back".into()), "{n}");
        assert_eq!(rig.effects(g.as_str(), LOCAL_BRANCH, "local").await, 0, "{n}");
        assert_eq!(check(g.as_str()).await.0, 409, "{n}: still rolled back");

        // A failed local transaction commits nothing; the back-check then says rolled back.
        let g: Gid = new_gid("failed").parse().unwrap();
        assert_eq!(rig.local(&g, true).await, Err("business".into()), "{n}");
        assert_eq!(rig.effects(g.as_str(), LOCAL_BRANCH, "local").await, 0, "{n}");
        assert_eq!(check(g.as_str()).await.0, 409, "{n}");

        // Bad input: no gid, a bad gid, another branch, another method.
        for query in ["", "?gid=", "?gid=a%20b", "?gid=x&branch_id=01"] {
            let res = http.get(format!("{}/back-check{query}", rig.url)).send().await.unwrap();
            assert_eq!(res.status().as_u16(), 400, "{n} {query}");
            let body: serde_json::Value = res.json().await.unwrap();
            assert_eq!(body["code"], "malformed", "{n} {query}");
        }
        let res =
            http.get(format!("{}/back-check?gid=x", rig.url)).header("tcc-gid", "y").send().await.unwrap();
        assert_eq!(res.status().as_u16(), 400, "{n}: a query gid and a header gid that differ");
        let res = http.post(format!("{}/back-check?gid=x", rig.url)).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 405, "{n}");
        assert_eq!(rig.state("x", LOCAL_BRANCH).await, None, "{n}: bad calls record nothing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_coordinator_sagas_compensate_and_messages_go_out_only_when_committed() {
    let tcc = Tcc::start_with(Where::Embedded, fast_core(), ServerConfig::default()).await;
    for rig in rigs().await {
        let n = rig.name;
        let (action, compensate) =
            (format!("{}/points/action", rig.url), format!("{}/points/compensate", rig.url));
        let ok = r#"{"customer":"ada"}"#;
        let refuse = r#"{"customer":"eve","refuse":true}"#;

        let done = tcc
            .client
            .saga(Duration::from_secs(30))
            .step(&action, &compensate, ok)
            .step(&action, &compensate, ok)
            .submit_and_wait(LONG)
            .await
            .unwrap();
        assert_eq!(done.state, StateView::Confirmed, "{n}");
        let branches: Vec<String> = done.branches.iter().map(|b| b.branch.clone()).collect();
        for b in &branches {
            assert_eq!(rig.effects(&done.gid, b, "action").await, 1, "{n} {b}");
        }

        // The second step refuses: the first is compensated, once.
        let failed = tcc
            .client
            .saga(Duration::from_secs(30))
            .step(&action, &compensate, ok)
            .step(&action, &compensate, refuse)
            .submit_and_wait(LONG)
            .await
            .unwrap();
        assert_eq!(failed.state, StateView::Cancelled, "{n}");
        let first = &failed.branches[0].branch;
        assert_eq!(rig.effects(&failed.gid, first, "action").await, 1, "{n}");
        assert_eq!(rig.effects(&failed.gid, first, "compensate").await, 1, "{n}");
        let second = &failed.branches[1].branch;
        assert_eq!(rig.state(&failed.gid, second).await, Some(BarrierState::CompensatedEmpty), "{n}");

        // A message whose local transaction committed goes out, once.
        let back_check = format!("{}/back-check", rig.url);
        let mail = format!("{}/mail/action", rig.url);
        let msg =
            tcc.client.message(Duration::from_secs(30)).add(&mail, ok).prepare(&back_check).await.unwrap();
        rig.local(msg.gid(), false).await.unwrap();
        msg.submit().await.unwrap();
        let sent = tcc.client.wait(msg.gid(), LONG).await.unwrap();
        assert_eq!(sent.state, StateView::Confirmed, "{n}");
        assert_eq!(rig.effects(&sent.gid, &sent.branches[0].branch, "mail").await, 1, "{n}");

        // `finish` ends a message as its local transaction says.
        let prepare = || tcc.client.message(Duration::from_secs(30)).add(&mail, ok).prepare(&back_check);
        let msg = prepare().await.unwrap();
        let again = msg.gid().clone();
        assert_eq!(
            msg.finish(rig.local_transaction(msg.gid(), false).await).await.unwrap(),
            Finished::Sent(()),
            "{n}"
        );
        assert_eq!(tcc.client.wait(msg.gid(), LONG).await.unwrap().state, StateView::Confirmed, "{n}");
        let failed = prepare().await.unwrap();
        let outcome = failed.finish(rig.local_transaction(failed.gid(), true).await).await;
        assert!(matches!(outcome, Err(FinishError::Local(_))), "{n}: {outcome:?}");
        let aborted = tcc.client.wait(failed.gid(), LONG).await.unwrap();
        assert_eq!(
            aborted.state,
            StateView::Cancelled,
            "{n}: a local transaction that failed aborts the message"
        );
        assert_eq!(rig.effects(&aborted.gid, &aborted.branches[0].branch, "mail").await, 0, "{n}");
        let twice = tcc.client.message(Duration::from_secs(30)).gid(&again);
        let twice = twice.add(&mail, ok).prepare(&back_check).await;
        assert!(twice.is_err(), "{n}: a message id is used once");

        // Left prepared: the coordinator asks the back-check at the timeout. Committed goes out;
        // never committed is aborted, and its action never runs.
        let committed =
            tcc.client.message(Duration::from_millis(300)).add(&mail, ok).prepare(&back_check).await.unwrap();
        rig.local(committed.gid(), false).await.unwrap();
        let forgotten =
            tcc.client.message(Duration::from_millis(300)).add(&mail, ok).prepare(&back_check).await.unwrap();
        let a = tcc.client.wait(committed.gid(), LONG).await.unwrap();
        let b = tcc.client.wait(forgotten.gid(), LONG).await.unwrap();
        assert_eq!((a.state, b.state), (StateView::Confirmed, StateView::Cancelled), "{n}");
        eventually("the committed message's action", LONG, async || {
            rig.effects(&a.gid, &a.branches[0].branch, "mail").await == 1
        })
        .await;
        assert_eq!(rig.effects(&b.gid, &b.branches[0].branch, "mail").await, 0, "{n}");
        assert_eq!(rig.state(&b.gid, LOCAL_BRANCH).await, Some(BarrierState::RolledBack), "{n}");
        // The initiator's late local transaction cannot commit any more.
        assert_eq!(rig.local(forgotten.gid(), false).await, Err("rolled_back".into()), "{n}");
    }
    tcc.client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_and_a_message_sent_through_the_dtm_api_drive_the_runtime_steps() {
    let tcc = Tcc::start_with(Where::Standalone, fast_core(), ServerConfig::default()).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let dtm = format!("{}/api/dtmsvr", tcc.url());
    for rig in rigs().await {
        let n = rig.name;
        let (action, compensate) =
            (format!("{}/points/action", rig.url), format!("{}/points/compensate", rig.url));
        let step = serde_json::json!({ "action": action, "compensate": compensate });
        // As a DTM client sends it: the second step refuses, so the first is compensated.
        let gid = new_gid("dtm-saga");
        let saga = serde_json::json!({
            "gid": gid, "trans_type": "saga", "wait_result": true,
            "steps": [step, step],
            "payloads": [r#"{"customer":"ada"}"#, r#"{"customer":"eve","refuse":true}"#],
        });
        let res = http.post(format!("{dtm}/submit")).json(&saga).send().await.unwrap();
        assert!(res.status().is_success() || res.status().as_u16() == 409, "{n}: {}", res.status());
        let failed = tcc.client.wait(&gid.parse().unwrap(), LONG).await.unwrap();
        assert_eq!(failed.state, StateView::Cancelled, "{n}");
        let first = &failed.branches[0].branch;
        assert_eq!(rig.effects(&gid, first, "action").await, 1, "{n}");
        assert_eq!(rig.effects(&gid, first, "compensate").await, 1, "{n}");
        assert_eq!(
            rig.state(&gid, &failed.branches[1].branch).await,
            Some(BarrierState::CompensatedEmpty),
            "{n}"
        );

        // A DTM message whose local transaction committed: prepared, committed, submitted.
        let gid = new_gid("dtm-msg");
        let mail = format!("{}/mail/action", rig.url);
        let msg = serde_json::json!({
            "gid": gid, "trans_type": "msg", "query_prepared": format!("{}/back-check", rig.url),
            "steps": [{ "action": mail }], "payloads": [r#"{"customer":"ada"}"#],
        });
        assert!(http.post(format!("{dtm}/prepare")).json(&msg).send().await.unwrap().status().is_success());
        rig.local(&gid.parse().unwrap(), false).await.unwrap();
        assert!(http.post(format!("{dtm}/submit")).json(&msg).send().await.unwrap().status().is_success());
        let sent = tcc.client.wait(&gid.parse().unwrap(), LONG).await.unwrap();
        assert_eq!(sent.state, StateView::Confirmed, "{n}");
        assert_eq!(rig.effects(&gid, &sent.branches[0].branch, "mail").await, 1, "{n}");
    }
    tcc.client.shutdown().await;
}
