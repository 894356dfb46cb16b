//! A `#[tcc]` service with a saga step and a message action, served through the participant runtime
//! and driven by an embedded coordinator through its generated typed client (DESIGN.md guarantee 9
//! from the definition down):
//! - a saga whose steps all succeed leaves every step done;
//! - a saga whose later step refuses compensates the earlier one, and only it: the refused step's
//!   compensation is empty;
//! - a message prepared with the typed stub goes out once its local transaction
//!   (`Participant::local_transaction`) committed, and never when it did not.
//!
//! On sled always, and on PostgreSQL when `TCC_TEST_POSTGRES_URL` is set (required when
//! `TCC_REQUIRE_POSTGRES=1`).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{Tcc, Where, eventually};
use tcc_core::barrier::BarrierState;
use tcc_core::barrier::sql::testing;
use tcc_http::client::{ClientError, MessageBuilder, SagaBuilder};
use tcc_http::participant::sql::Sql;
use tcc_http::server::native::StateView;
use tcc_http::sqlx::{self, Postgres};
use tcc_http::{DurableDb, Gid, Participant, SqlContext, SqlError, TccContext};

use api::{Loyalty, LoyaltyClient, LoyaltyError, PgLoyalty, PgLoyaltyClient};

const LONG: Duration = Duration::from_secs(20);

/// What a shared API crate would hold: the definitions and their types.
mod api {
    use serde::{Deserialize, Serialize};
    use tcc_http::sqlx::Postgres;
    use tcc_http::staged::StoreError;
    use tcc_http::{Disposition, SqlContext, SqlError, TccContext, TccError, tcc};

    #[derive(Debug, thiserror::Error, Serialize, Deserialize)]
    pub enum LoyaltyError {
        #[error("{0} may not collect points")]
        Barred(String),
        #[error(transparent)]
        Store(#[from] StoreError),
        #[error(transparent)]
        Db(#[from] SqlError),
    }

    impl TccError for LoyaltyError {
        fn disposition(&self) -> Disposition {
            match self {
                LoyaltyError::Barred(_) => Disposition::Refuse,
                LoyaltyError::Store(_) => Disposition::Transient,
                LoyaltyError::Db(e) => e.disposition(),
            }
        }
    }

    /// The loyalty service on sled.
    #[tcc]
    pub trait Loyalty {
        /// Credits points to a customer; refused for a barred customer.
        #[tcc(compensate = debit)]
        async fn credit(&self, ctx: TccContext, customer: String, points: i64) -> Result<(), LoyaltyError>;
        /// Takes the credited points back.
        async fn debit(&self, ctx: TccContext, customer: String, points: i64) -> Result<(), LoyaltyError>;
        /// Mails the customer a welcome.
        #[tcc(action)]
        async fn welcome(&self, ctx: TccContext, customer: String) -> Result<(), LoyaltyError>;
    }

    /// The same service on PostgreSQL.
    #[tcc]
    pub trait PgLoyalty {
        #[tcc(compensate = debit)]
        async fn credit(
            &self,
            ctx: &mut SqlContext<Postgres>,
            customer: String,
            points: i64,
        ) -> Result<(), LoyaltyError>;
        async fn debit(
            &self,
            ctx: &mut SqlContext<Postgres>,
            customer: String,
            points: i64,
        ) -> Result<(), LoyaltyError>;
        #[tcc(action)]
        async fn welcome(&self, ctx: &mut SqlContext<Postgres>, customer: String)
        -> Result<(), LoyaltyError>;
    }
}

/// Adds `delta` to the count at `key` of `tree`, staged in the call's context.
fn add(ctx: &TccContext, tree: &str, key: &str, delta: i64) -> Result<(), LoyaltyError> {
    match ctx.get::<i64>(tree, key)? {
        Some(n) => ctx.put(tree, key, &(n.value + delta), n.version).map(drop)?,
        None => ctx.insert_new(tree, key, &delta).map(drop)?,
    }
    Ok(())
}

fn barred(customer: &str) -> bool {
    customer.starts_with("eve")
}

struct SledLoyalty;

impl Loyalty for SledLoyalty {
    async fn credit(&self, ctx: TccContext, customer: String, points: i64) -> Result<(), LoyaltyError> {
        if barred(&customer) {
            return Err(LoyaltyError::Barred(customer));
        }
        add(&ctx, "points", &customer, points)
    }
    async fn debit(&self, ctx: TccContext, customer: String, points: i64) -> Result<(), LoyaltyError> {
        add(&ctx, "points", &customer, -points)
    }
    async fn welcome(&self, ctx: TccContext, customer: String) -> Result<(), LoyaltyError> {
        add(&ctx, "mails", &customer, 1)
    }
}

struct PgLoyaltyService;

impl PgLoyalty for PgLoyaltyService {
    async fn credit(
        &self,
        ctx: &mut SqlContext<Postgres>,
        customer: String,
        points: i64,
    ) -> Result<(), LoyaltyError> {
        if barred(&customer) {
            return Err(LoyaltyError::Barred(customer));
        }
        sqlx::query(
            "INSERT INTO points (customer, balance) VALUES ($1, $2)
             ON CONFLICT (customer) DO UPDATE SET balance = points.balance + EXCLUDED.balance",
        )
        .bind(customer)
        .bind(points)
        .execute(ctx.conn())
        .await
        .map_err(SqlError::from)?;
        Ok(())
    }
    async fn debit(
        &self,
        ctx: &mut SqlContext<Postgres>,
        customer: String,
        points: i64,
    ) -> Result<(), LoyaltyError> {
        sqlx::query("UPDATE points SET balance = balance - $2 WHERE customer = $1")
            .bind(customer)
            .bind(points)
            .execute(ctx.conn())
            .await
            .map_err(SqlError::from)?;
        Ok(())
    }
    async fn welcome(&self, ctx: &mut SqlContext<Postgres>, customer: String) -> Result<(), LoyaltyError> {
        sqlx::query("INSERT INTO mails (customer) VALUES ($1)")
            .bind(customer)
            .execute(ctx.conn())
            .await
            .map_err(SqlError::from)?;
        Ok(())
    }
}

/// One deployment of the service: the participant, its typed client, its back-check URL.
enum Rig {
    Sled { participant: Participant, client: LoyaltyClient, _db: DurableDb },
    Postgres { participant: Participant<Sql<Postgres>>, client: PgLoyaltyClient },
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

/// Every rig this machine can run.
async fn rigs() -> Vec<(&'static str, Rig, String)> {
    let mut rigs = Vec::new();
    let db = DurableDb::temporary().unwrap();
    let participant = SledLoyalty
        .into_participant(Participant::builder().sled(&db, &["points", "mails", "orders"]).unwrap());
    let url = serve(participant.router()).await;
    let client = LoyaltyClient::new(url.clone());
    rigs.push(("sled", Rig::Sled { participant, client, _db: db }, url));

    if let Some(url) = testing::test_postgres_url() {
        let url = testing::create_scratch_postgres_schema(&url, "tcc_macro_sagas").await.unwrap();
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&url).await.unwrap();
        for ddl in [
            "CREATE TABLE points (customer TEXT PRIMARY KEY, balance BIGINT NOT NULL)",
            "CREATE TABLE mails (customer TEXT NOT NULL)",
            "CREATE TABLE orders (gid TEXT NOT NULL)",
        ] {
            sqlx::query(ddl).execute(&pool).await.unwrap();
        }
        let participant = Participant::builder().sql(pool);
        participant.migrate().await.unwrap();
        let participant = PgLoyaltyService.into_participant(participant);
        let url = serve(participant.router()).await;
        let client = PgLoyaltyClient::new(url.clone());
        rigs.push(("postgres", Rig::Postgres { participant, client }, url));
    }
    rigs
}

#[test]
fn the_postgres_rig_runs_when_required() {
    if std::env::var("TCC_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
        assert!(testing::test_postgres_url().is_some(), "TCC_REQUIRE_POSTGRES=1 but no database URL is set");
    }
}

impl Rig {
    /// The typed step stub of the rig's client.
    fn credit(&self, saga: SagaBuilder, customer: &str, points: i64) -> Result<SagaBuilder, ClientError> {
        match self {
            Rig::Sled { client, .. } => client.credit(saga, customer.to_owned(), points),
            Rig::Postgres { client, .. } => client.credit(saga, customer.to_owned(), points),
        }
    }

    /// The typed action stub of the rig's client.
    fn welcome(&self, message: MessageBuilder, customer: &str) -> Result<MessageBuilder, ClientError> {
        match self {
            Rig::Sled { client, .. } => client.welcome(message, customer.to_owned()),
            Rig::Postgres { client, .. } => client.welcome(message, customer.to_owned()),
        }
    }

    /// A customer's committed balance (0 when never credited).
    async fn balance(&self, customer: &str) -> i64 {
        match self {
            Rig::Sled { participant, .. } => {
                participant.read::<i64>("points", customer).unwrap().map_or(0, |v| v.value)
            }
            Rig::Postgres { participant, .. } => {
                sqlx::query_scalar::<_, i64>("SELECT balance FROM points WHERE customer = $1")
                    .bind(customer)
                    .fetch_optional(participant.pool())
                    .await
                    .unwrap()
                    .unwrap_or(0)
            }
        }
    }

    /// How many welcomes a customer was sent.
    async fn mails(&self, customer: &str) -> i64 {
        match self {
            Rig::Sled { participant, .. } => {
                participant.read::<i64>("mails", customer).unwrap().map_or(0, |v| v.value)
            }
            Rig::Postgres { participant, .. } => {
                sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM mails WHERE customer = $1")
                    .bind(customer)
                    .fetch_one(participant.pool())
                    .await
                    .unwrap()
            }
        }
    }

    async fn state(&self, gid: &str, branch: &str) -> Option<BarrierState> {
        let (gid, branch) = (gid.parse().unwrap(), branch.parse().unwrap());
        match self {
            Rig::Sled { participant, .. } => {
                participant.barrier().get(&gid, &branch).unwrap().map(|r| r.state)
            }
            Rig::Postgres { participant, .. } => {
                participant.sql_barrier().get(&gid, &branch).await.unwrap().map(|r| r.state)
            }
        }
    }

    /// The initiator's local transaction: records the order with the message's barrier record.
    async fn place_order(&self, gid: &Gid) {
        match self {
            Rig::Sled { participant, .. } => participant
                .local_transaction(gid, |ctx| async move { add(&ctx, "orders", ctx.gid().as_str(), 1) })
                .await
                .unwrap(),
            Rig::Postgres { participant, .. } => participant
                .local_transaction(gid, |ctx| {
                    Box::pin(async move {
                        let gid = ctx.gid().to_string();
                        sqlx::query("INSERT INTO orders (gid) VALUES ($1)")
                            .bind(gid)
                            .execute(ctx.conn())
                            .await
                            .map_err(SqlError::from)?;
                        Ok::<_, LoyaltyError>(())
                    })
                })
                .await
                .unwrap(),
        }
    }
}

/// A name no earlier run used, so that balances start at zero.
fn customer(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::now_v7().simple())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_saga_is_done_or_compensated_and_a_typed_message_goes_out_only_after_its_local_commit() {
    let tcc = Tcc::start(Where::Embedded).await;
    for (n, rig, url) in rigs().await {
        let (ada, bob, eve) = (customer("ada"), customer("bob"), customer("eve"));

        // Both steps succeed: both customers are credited, once.
        let saga = tcc.client.saga(Duration::from_secs(30));
        let saga = rig.credit(saga, &ada, 100).unwrap();
        let saga = rig.credit(saga, &bob, 50).unwrap();
        let done = saga.submit_and_wait(LONG).await.unwrap();
        assert_eq!(done.state, StateView::Confirmed, "{n}");
        assert_eq!((rig.balance(&ada).await, rig.balance(&bob).await), (100, 50), "{n}");

        // The second step refuses: the first is compensated, the refused one ran nothing.
        let saga = tcc.client.saga(Duration::from_secs(30));
        let saga = rig.credit(saga, &ada, 10).unwrap();
        let saga = rig.credit(saga, &eve, 5).unwrap();
        let failed = saga.submit_and_wait(LONG).await.unwrap();
        assert_eq!(failed.state, StateView::Cancelled, "{n}");
        assert_eq!(
            rig.state(&failed.gid, &failed.branches[0].branch).await,
            Some(BarrierState::Compensated),
            "{n}"
        );
        assert_eq!(
            rig.state(&failed.gid, &failed.branches[1].branch).await,
            Some(BarrierState::CompensatedEmpty),
            "{n}"
        );
        assert_eq!(
            (rig.balance(&ada).await, rig.balance(&eve).await),
            (100, 0),
            "{n}: credited then debited"
        );

        // A message prepared with the typed stub, sent after its local transaction committed.
        let back_check = format!("{url}/back-check");
        let message = rig.welcome(tcc.client.message(Duration::from_secs(30)), &ada).unwrap();
        let prepared = message.prepare(&back_check).await.unwrap();
        rig.place_order(prepared.gid()).await;
        prepared.submit().await.unwrap();
        let sent = tcc.client.wait(prepared.gid(), LONG).await.unwrap();
        assert_eq!(sent.state, StateView::Confirmed, "{n}");
        assert_eq!(rig.mails(&ada).await, 1, "{n}");

        // One whose local transaction never commits: the back-check at its deadline aborts it, and
        // its action never runs.
        let message = rig.welcome(tcc.client.message(Duration::from_millis(300)), &bob).unwrap();
        let forgotten = message.prepare(&back_check).await.unwrap();
        let aborted = tcc.client.wait(forgotten.gid(), LONG).await.unwrap();
        assert_eq!(aborted.state, StateView::Cancelled, "{n}");
        eventually("the aborted message's local branch rolled back", LONG, async || {
            rig.state(&aborted.gid, tcc_http::participant::LOCAL_BRANCH).await
                == Some(BarrierState::RolledBack)
        })
        .await;
        assert_eq!(rig.mails(&bob).await, 0, "{n}");
    }
    tcc.client.shutdown().await;
}
