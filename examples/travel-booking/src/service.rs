//! Serving the flight or the hotel service on a loopback port, with its own database: sled,
//! PostgreSQL or MySQL ([`Db`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tcc_core::DurableDb;
use tcc_http::participant::Participant;
use tcc_http::participant::sql::Sql;
use tcc_http::sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use tcc_http::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tcc_http::sqlx::{self, MySql, Postgres};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tcc_core::Gid;
use tcc_http::ApiError;
use tcc_http::participant::LocalError;

use crate::api::{
    BookingError, Flights, FlightsOnMySql, FlightsOnPostgres, Hotels, HotelsOnMySql, HotelsOnPostgres,
};
use crate::confirmation::sql::{ConfirmationDb, SqlOutbox};
use crate::confirmation::{MAIL_ACTION, OUTBOX, Outbox, TICKETS, TICKETS_PATH, Ticket, TicketRequest};
use crate::inventory::sql::{InventoryDb, SqlInventory};
use crate::inventory::{BOOKINGS, Inventory, STOCK, Stock};
use crate::loyalty::sql::{LoyaltyDb, SqlLoyalty};
use crate::loyalty::{AWARDS, BLOCKED, Loyalty, MILES_STEP, POINTS_STEP};

/// How long after a booking's deadline a service waits for the coordinator's confirm or cancel
/// before releasing the hold itself.
pub const GRACE: Duration = Duration::from_secs(30);

/// How many connections a service on a SQL database keeps.
const POOL_SIZE: u32 = 16;

/// Where a service keeps its inventory and its barrier: `sled:DIR`, `postgres://…` or `mysql://…`
/// (as `--db` takes it).
#[derive(Clone, Debug)]
pub enum Db {
    /// A sled directory (created if missing).
    Sled(PathBuf),
    /// A PostgreSQL database.
    Postgres(PgConnectOptions),
    /// A MySQL or MariaDB database.
    MySql(MySqlConnectOptions),
}

impl FromStr for Db {
    type Err = String;

    fn from_str(url: &str) -> Result<Db, String> {
        if let Some(dir) = url.strip_prefix("sled:") {
            return Ok(Db::Sled(dir.into()));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return url.parse().map(Db::Postgres).map_err(|e| format!("{url}: {e}"));
        }
        if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            return url.parse().map(Db::MySql).map_err(|e| format!("{url}: {e}"));
        }
        Err(format!("{url}: expected sled:DIR, postgres://… or mysql://…"))
    }
}

impl Db {
    /// What the narration calls it.
    pub fn describe(&self) -> String {
        match self {
            Db::Sled(_) => "its own sled database".into(),
            Db::Postgres(o) => {
                let schema = o.get_options().and_then(|s| s.split("search_path=").nth(1)).unwrap_or("public");
                format!("PostgreSQL, database {}, schema {schema}", o.get_database().unwrap_or("?"))
            }
            Db::MySql(o) => format!("MySQL, database {}", o.get_database().unwrap_or("?")),
        }
    }

    /// A fresh, empty place in the same database server for one run, created now: a PostgreSQL
    /// schema or a MySQL database named `name` (sled: the directory `name` next to this one).
    pub async fn scratch(&self, name: &str) -> Result<Db, StartError> {
        let create = match self {
            Db::Sled(_) => None,
            Db::Postgres(_) => Some(format!("CREATE SCHEMA {name}")),
            Db::MySql(_) => Some(format!("CREATE DATABASE {name}")),
        };
        if let Some(create) = create {
            self.admin(create).await?;
        }
        Ok(self.at(name))
    }

    /// The place `name` in the same database server, as [`scratch`](Db::scratch) made it (not
    /// created here): a PostgreSQL schema, a MySQL database, a sled directory inside this one.
    pub fn at(&self, name: &str) -> Db {
        match self {
            Db::Sled(dir) => Db::Sled(dir.join(name)),
            Db::Postgres(o) => Db::Postgres(o.clone().options([("search_path", name)])),
            Db::MySql(o) => Db::MySql(o.clone().database(name)),
        }
    }

    /// Runs one statement on a connection of its own.
    async fn admin(&self, statement: String) -> Result<(), StartError> {
        match self {
            Db::Sled(_) => {}
            Db::Postgres(o) => {
                let mut conn = sqlx::ConnectOptions::connect(o).await?;
                sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut conn).await?;
            }
            Db::MySql(o) => {
                let mut conn = sqlx::ConnectOptions::connect(o).await?;
                sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut conn).await?;
            }
        }
        Ok(())
    }

    /// Removes what [`scratch`](Db::scratch) created for `name` (the tables in it included).
    pub async fn drop_scratch(&self, name: &str) -> Result<(), StartError> {
        match self {
            Db::Sled(dir) => Ok(std::fs::remove_dir_all(dir.join(name))?),
            Db::Postgres(_) => self.admin(format!("DROP SCHEMA IF EXISTS {name} CASCADE")).await,
            Db::MySql(_) => self.admin(format!("DROP DATABASE IF EXISTS {name}")).await,
        }
    }
}

/// Which service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Seats on flights.
    Flights,
    /// Rooms in hotels.
    Hotels,
}

impl Kind {
    /// The path the service's TCC operations are served under.
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Flights => "/tcc/flights",
            Kind::Hotels => "/tcc/hotels",
        }
    }

    /// What the narration calls it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Flights => "flights",
            Kind::Hotels => "hotels",
        }
    }

    /// The name of its loyalty saga step: miles at the flight service, points at the hotel.
    pub fn loyalty_step(self) -> &'static str {
        match self {
            Kind::Flights => MILES_STEP,
            Kind::Hotels => POINTS_STEP,
        }
    }

    /// The customers whose loyalty account the service has blocked (seeded at start): the hotel
    /// chain blocked mallory's, so a loyalty saga for mallory is refused at the hotel and the miles
    /// already awarded are taken back.
    pub fn blocked(self) -> &'static [&'static str] {
        match self {
            Kind::Flights => &[],
            Kind::Hotels => &["mallory"],
        }
    }
}

/// A service's participant over its database.
#[derive(Clone, Debug)]
pub enum Backend {
    /// On sled: the participant and its database.
    Sled(Participant, DurableDb),
    /// On PostgreSQL.
    Postgres(Participant<Sql<Postgres>>),
    /// On MySQL.
    MySql(Participant<Sql<MySql>>),
}

impl Backend {
    /// The participant's routes (its TCC operations, saga step and message action, the
    /// back-check), and the ticket's local transaction at [`TICKETS_PATH`].
    pub fn router(&self) -> axum::Router {
        let participant = match self {
            Backend::Sled(p, _) => p.router(),
            Backend::Postgres(p) => p.router(),
            Backend::MySql(p) => p.router(),
        };
        let tickets =
            axum::Router::new().route(TICKETS_PATH, axum::routing::post(tickets)).with_state(self.clone());
        participant.merge(tickets)
    }

    /// Issues the ticket of `req` as the local transaction of message `gid`: committed with the
    /// message's barrier record, so the back-check at `{base}/back-check` tells whether it did.
    pub async fn issue_ticket(
        &self,
        gid: &Gid,
        req: &TicketRequest,
    ) -> Result<Ticket, LocalError<BookingError>> {
        match self {
            Backend::Sled(p, _) => {
                p.local_transaction(gid, |ctx| crate::confirmation::issue_on_sled(ctx, req.clone())).await
            }
            Backend::Postgres(p) => {
                p.local_transaction(gid, |ctx| Box::pin(crate::confirmation::sql::issue(ctx, req.clone())))
                    .await
            }
            Backend::MySql(p) => {
                p.local_transaction(gid, |ctx| Box::pin(crate::confirmation::sql::issue(ctx, req.clone())))
                    .await
            }
        }
    }

    /// The service's books, read now.
    pub async fn books(&self) -> Result<crate::ledger::Books, String> {
        match self {
            Backend::Sled(p, db) => crate::ledger::read(p, db),
            Backend::Postgres(p) => sql_books(p.pool()).await.map_err(|e| e.to_string()),
            Backend::MySql(p) => sql_books(p.pool()).await.map_err(|e| e.to_string()),
        }
    }

    /// The barrier state of every branch of `gid` in `branches` that has a record.
    pub async fn barrier_states(
        &self,
        gid: &Gid,
        branches: &[tcc_core::BranchId],
    ) -> Result<Vec<(tcc_core::BranchId, tcc_core::barrier::BarrierState)>, String> {
        let mut states = Vec::new();
        for b in branches {
            if let Some(s) = self.barrier_state(gid, b).await? {
                states.push((b.clone(), s));
            }
        }
        Ok(states)
    }

    /// The barrier state of branch `branch` of transaction `gid` (`None`: no record).
    pub async fn barrier_state(
        &self,
        gid: &tcc_core::Gid,
        branch: &tcc_core::BranchId,
    ) -> Result<Option<tcc_core::barrier::BarrierState>, String> {
        let record = match self {
            Backend::Sled(p, _) => p.barrier().get(gid, branch).map_err(|e| e.to_string())?,
            Backend::Postgres(p) => p.sql_barrier().get(gid, branch).await.map_err(|e| e.to_string())?,
            Backend::MySql(p) => p.sql_barrier().get(gid, branch).await.map_err(|e| e.to_string())?,
        };
        Ok(record.map(|r| r.state))
    }

    /// Stocks every item of `stock` not stocked yet.
    async fn stock(&self, stock: &[(&str, u32)]) -> Result<(), StartError> {
        for (item, units) in stock {
            match self {
                Backend::Sled(p, _) => {
                    if p.read::<Stock>(STOCK, item.as_bytes())?.is_none() {
                        p.seed(STOCK, item.as_bytes(), &Stock { free: *units, ..Stock::default() })?;
                    }
                }
                Backend::Postgres(p) => Postgres::stock_if_missing(p.pool(), item, *units).await?,
                Backend::MySql(p) => MySql::stock_if_missing(p.pool(), item, *units).await?,
            }
        }
        Ok(())
    }

    /// Blocks the loyalty account of every customer in `customers` not blocked yet.
    async fn block(&self, customers: &[&str]) -> Result<(), StartError> {
        for customer in customers {
            match self {
                Backend::Sled(p, _) => {
                    if p.read::<bool>(BLOCKED, customer.as_bytes())?.is_none() {
                        p.seed(BLOCKED, customer.as_bytes(), &true)?;
                    }
                }
                Backend::Postgres(p) => Postgres::block(p.pool(), customer).await?,
                Backend::MySql(p) => MySql::block(p.pool(), customer).await?,
            }
        }
        Ok(())
    }
}

/// The books of a service on SQL: the inventory's, the loyalty awards and the confirmations.
async fn sql_books<DB: LoyaltyDb + ConfirmationDb>(
    pool: &sqlx::Pool<DB>,
) -> Result<crate::ledger::Books, tcc_http::SqlError> {
    let mut books = DB::read_books(pool).await?;
    (books.awards, books.blocked) = DB::read_awards(pool).await?;
    (books.tickets, books.outbox) = DB::read_confirmations(pool).await?;
    Ok(books)
}

/// The ticket route's query: the message whose local transaction this is.
#[derive(Debug, serde::Deserialize)]
struct TicketQuery {
    gid: String,
}

/// `POST {base}/tickets?gid=MSG` with a [`TicketRequest`]: issues the ticket as the local
/// transaction of message `MSG`. 200 with the [`Ticket`] (also when it was issued before); 409
/// `refused` (no seat booked for the trip) or `rolled_back` (the back-check came first): not
/// issued, abort the message; 503 `unknown` (may have committed: leave the message to its
/// back-check) or `unavailable`; 400 `malformed` for a bad gid or body, changing nothing.
async fn tickets(
    State(backend): State<Backend>,
    query: Result<Query<TicketQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Response {
    let Ok(Query(query)) = query else { return ApiError::malformed("the query needs a gid").into_response() };
    let gid: Gid = match query.gid.parse() {
        Ok(g) => g,
        Err(e) => return ApiError::malformed(format!("gid: {e}")).into_response(),
    };
    let req: TicketRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return ApiError::malformed(format!("a ticket request: {e}")).into_response(),
    };
    let answer = |ticket: Ticket| (StatusCode::OK, axum::Json(ticket)).into_response();
    match backend.issue_ticket(&gid, &req).await {
        Ok(ticket) => answer(ticket),
        Err(LocalError::AlreadyCommitted) => answer(Ticket { booking: req.booking, customer: req.customer }),
        Err(LocalError::Business(e)) => {
            ApiError::new(StatusCode::CONFLICT, "refused", e.to_string()).into_response()
        }
        Err(e @ LocalError::RolledBack) => {
            ApiError::new(StatusCode::CONFLICT, "rolled_back", e.to_string()).into_response()
        }
        Err(e @ LocalError::Unknown(_)) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unknown", e.to_string()).into_response()
        }
        Err(e) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()).into_response()
        }
    }
}

/// Opens the service's database (creating the barrier table and the inventory's tables if
/// missing) and its participant with this `grace`, without serving it: what [`Service::start`]
/// serves, and how a checker reads a stopped service's books and barrier records.
pub async fn open(kind: Kind, db: &Db, grace: Duration) -> Result<Backend, StartError> {
    let builder = Participant::builder().grace(grace);
    Ok(match db {
        Db::Sled(dir) => {
            let db = DurableDb::open(dir)?;
            let participant = builder.sled(&db, &[STOCK, BOOKINGS, AWARDS, BLOCKED, TICKETS, OUTBOX])?;
            let participant = match kind {
                Kind::Flights => Flights::into_participant(Inventory, participant),
                Kind::Hotels => Hotels::into_participant(Inventory, participant),
            };
            let participant =
                participant.async_step(kind.loyalty_step(), Loyalty).async_action(MAIL_ACTION, Outbox);
            Backend::Sled(participant, db)
        }
        Db::Postgres(options) => {
            let pool = PgPoolOptions::new().max_connections(POOL_SIZE).connect_with(options.clone()).await?;
            let participant = on_sql(builder, pool).await?;
            let participant = match kind {
                Kind::Flights => FlightsOnPostgres::into_participant(SqlInventory, participant),
                Kind::Hotels => HotelsOnPostgres::into_participant(SqlInventory, participant),
            };
            Backend::Postgres(
                participant
                    .sql_step(kind.loyalty_step(), SqlLoyalty::default())
                    .sql_action(MAIL_ACTION, SqlOutbox::default()),
            )
        }
        Db::MySql(options) => {
            let pool =
                MySqlPoolOptions::new().max_connections(POOL_SIZE).connect_with(options.clone()).await?;
            let participant = on_sql(builder, pool).await?;
            let participant = match kind {
                Kind::Flights => FlightsOnMySql::into_participant(SqlInventory, participant),
                Kind::Hotels => HotelsOnMySql::into_participant(SqlInventory, participant),
            };
            Backend::MySql(
                participant
                    .sql_step(kind.loyalty_step(), SqlLoyalty::default())
                    .sql_action(MAIL_ACTION, SqlOutbox::default()),
            )
        }
    })
}

/// A participant on `pool`'s database, the inventory's tables and the barrier table created if
/// missing.
async fn on_sql<DB: LoyaltyDb + ConfirmationDb>(
    builder: tcc_http::ParticipantBuilder,
    pool: sqlx::Pool<DB>,
) -> Result<Participant<Sql<DB>>, StartError> {
    crate::inventory::sql::create_tables(&pool).await?;
    crate::loyalty::sql::create_tables(&pool).await?;
    crate::confirmation::sql::create_tables(&pool).await?;
    let participant = builder.sql(pool);
    participant.migrate().await?;
    Ok(participant)
}

/// A running service. Dropping it stops serving.
#[derive(Debug)]
pub struct Service {
    kind: Kind,
    addr: SocketAddr,
    backend: Backend,
    serving: Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

/// Why a service could not start.
pub type StartError = Box<dyn std::error::Error + Send + Sync>;

impl Service {
    /// Opens the service's database `db` (stocking every item of `stock` not stocked yet) with this
    /// `grace` and serves it on `listen` (`127.0.0.1:0` picks a free port); the participant's own
    /// expiry sweep runs from then on.
    pub async fn start(
        kind: Kind,
        db: &Db,
        listen: &str,
        stock: &[(&str, u32)],
        grace: Duration,
    ) -> Result<Service, StartError> {
        let backend = open(kind, db, grace).await?;
        backend.stock(stock).await?;
        backend.block(kind.blocked()).await?;
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let mut service = Service { kind, addr, backend, serving: None };
        service.serve(listener);
        Ok(service)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new().nest(self.kind.prefix(), self.backend.router());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            // Slow or hostile clients are cut off: header and body read timeouts, a bounded header
            // buffer, a cap on connections (tcc_http::serve's defaults).
            let limits = tcc_http::serve::Limits::default();
            if let Err(e) = tcc_http::serve::serve(listener, app, &limits, shutdown).await {
                eprintln!("serving stopped: {e}");
            }
        });
        self.serving = Some((stop, task));
    }

    /// The base URL of the service's TCC operations (what its typed client is built with).
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.kind.prefix())
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The service's books, read now.
    pub async fn books(&self) -> Result<crate::ledger::Books, String> {
        self.backend.books().await
    }

    /// The service's participant over its database.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Stops answering (the port is closed; the database stays as it is): the service is down.
    pub async fn go_down(&mut self) {
        if let Some((stop, task)) = self.serving.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
    }

    /// Listens again on the same port.
    pub async fn come_back(&mut self) -> std::io::Result<()> {
        if self.serving.is_none() {
            let listener = tokio::net::TcpListener::bind(self.addr).await?;
            self.serve(listener);
        }
        Ok(())
    }

    /// Waits until every change is on disk (before reading the ledger from another handle; a SQL
    /// database's commit is on disk already).
    pub fn flush(&self) -> std::io::Result<()> {
        match &self.backend {
            Backend::Sled(_, db) => db.flush(),
            Backend::Postgres(_) | Backend::MySql(_) => Ok(()),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some((stop, task)) = self.serving.take() {
            let _ = stop.send(());
            task.abort();
        }
    }
}

/// The command line of a service run as its own process.
#[derive(Debug, clap::Parser)]
struct ServiceArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: Option<String>,
    /// The service's sled directory (created and stocked if missing); short for `--db sled:DIR`.
    #[arg(long, conflicts_with = "db")]
    data_dir: Option<std::path::PathBuf>,
    /// The service's database: `sled:DIR` (the default, `./flights-data` or `./hotels-data`),
    /// `postgres://…` or `mysql://…` (tables created and stocked if missing).
    #[arg(long)]
    db: Option<Db>,
}

/// Runs a service as its own process until SIGINT: the `flights` and `hotels` binaries.
pub fn run_standalone(kind: Kind) -> std::process::ExitCode {
    use clap::Parser;
    let args = ServiceArgs::parse();
    let (listen, stock): (&str, &[(&str, u32)]) = match kind {
        Kind::Flights => ("127.0.0.1:8081", &[("TC42", 10), ("TC43", 10)]),
        Kind::Hotels => ("127.0.0.1:8082", &[("Ritz", 10), ("Tiny Inn", 0)]),
    };
    let listen = args.listen.unwrap_or_else(|| listen.to_owned());
    let db = match (args.db, args.data_dir) {
        (Some(db), _) => db,
        (None, Some(dir)) => Db::Sled(dir),
        (None, None) => Db::Sled(format!("./{}-data", kind.name()).into()),
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: {e}", kind.name());
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        match Service::start(kind, &db, &listen, stock, GRACE).await {
            Ok(service) => {
                println!("{} serving at {} ({})", kind.name(), service.url(), db.describe());
                let _ = tokio::signal::ctrl_c().await;
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", kind.name());
                std::process::ExitCode::FAILURE
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;

    use super::*;

    #[test]
    fn db_urls_name_sled_postgres_or_mysql_and_nothing_else() {
        assert!(matches!("sled:./f".parse::<Db>().unwrap(), Db::Sled(d) if d == Path::new("./f")));
        assert!(matches!("postgres://u@127.0.0.1:5432/shop".parse::<Db>().unwrap(), Db::Postgres(_)));
        assert!(matches!("mysql://u:p@127.0.0.1:3306/shop".parse::<Db>().unwrap(), Db::MySql(_)));
        for bad in ["./f", "redis://127.0.0.1", "postgres://u@127.0.0.1:notaport/x"] {
            assert!(bad.parse::<Db>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_place_is_a_schema_a_database_or_a_directory_of_the_given_one() {
        let pg: Db = "postgres://u@127.0.0.1/shop".parse().unwrap();
        assert!(pg.at("run_1").describe().ends_with("schema run_1"), "{}", pg.at("run_1").describe());
        let my: Db = "mysql://u@127.0.0.1/shop".parse().unwrap();
        assert_eq!(my.at("run_1").describe(), "MySQL, database run_1");
        assert!(matches!(Db::Sled("d".into()).at("f"), Db::Sled(p) if p == Path::new("d/f")));
    }
}
