//! Participants whose business state lives in PostgreSQL or MySQL (features `sqlx-postgres` and
//! `sqlx-mysql`): each call runs inside one transaction of the service's own database, which holds
//! the barrier row and the business statements, and commits both or neither.
//!
//! The runtime, for each try, confirm or cancel (and each release by the expiry sweep):
//!
//! 1. begins a transaction on the service's pool and locks the branch's barrier row
//!    ([`SqlBarrier::begin`]): a duplicate, a refusal or an empty cancel is answered there, nothing
//!    run;
//! 2. runs the business method with a [`SqlContext`] giving `&mut` access to that transaction
//!    ([`SqlContext::conn`]), for the method's own queries;
//! 3. on `Ok`, writes the barrier row and commits both; on `Err`, rolls both back (a refused try then
//!    leaves no row, so a later cancel is recognised as empty);
//! 4. answers once the commit returned (the database's commit is the durability point).
//!
//! Several replicas of one service may share the database: the barrier's primary key and row locks
//! decide between them, not a lock in one process. A serialization failure, a deadlock or a lock
//! wait timeout (the database's or a business statement's, through [`SqlError`]) rolls the call back
//! and runs it again, at most [`MAX_RUNS`] times, then answers 503 `contended`.
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use tcc_http::participant::sql::{SqlContext, SqlError};
//! use tcc_http::sqlx::{self, Postgres};
//! use tcc_http::{Disposition, Participant, TccError, tcc};
//!
//! #[derive(Debug, thiserror::Error, Serialize, Deserialize)]
//! pub enum BankError {
//!     #[error("account {0} lacks the funds")]
//!     Insufficient(String),
//!     #[error(transparent)]
//!     Db(#[from] SqlError),
//! }
//!
//! impl TccError for BankError {
//!     fn disposition(&self) -> Disposition {
//!         match self {
//!             BankError::Db(e) => e.disposition(),
//!             _ => Disposition::Refuse,
//!         }
//!     }
//! }
//!
//! #[tcc]
//! pub trait Bank {
//!     /// Holds `cents` of `account`.
//!     #[tcc(confirm = debit, cancel = release)]
//!     async fn hold(&self, ctx: &mut SqlContext<Postgres>, account: String, cents: i64) -> Result<(), BankError>;
//!     async fn debit(&self, ctx: &mut SqlContext<Postgres>, account: String, cents: i64) -> Result<(), BankError>;
//!     async fn release(&self, ctx: &mut SqlContext<Postgres>, account: String, cents: i64) -> Result<(), BankError>;
//! }
//!
//! struct Accounts;
//!
//! impl Bank for Accounts {
//!     async fn hold(&self, ctx: &mut SqlContext<Postgres>, account: String, cents: i64) -> Result<(), BankError> {
//!         let held = sqlx::query("UPDATE accounts SET free = free - $2, held = held + $2 WHERE id = $1 AND free >= $2")
//!             .bind(&account)
//!             .bind(cents)
//!             .execute(ctx.conn())
//!             .await
//!             .map_err(SqlError::from)?;
//!         if held.rows_affected() == 0 {
//!             return Err(BankError::Insufficient(account));
//!         }
//!         Ok(())
//!     }
//!
//!     async fn debit(&self, ctx: &mut SqlContext<Postgres>, account: String, cents: i64) -> Result<(), BankError> {
//!         sqlx::query("UPDATE accounts SET held = held - $2 WHERE id = $1")
//!             .bind(&account).bind(cents).execute(ctx.conn()).await.map_err(SqlError::from)?;
//!         Ok(())
//!     }
//!
//!     async fn release(&self, ctx: &mut SqlContext<Postgres>, account: String, cents: i64) -> Result<(), BankError> {
//!         sqlx::query("UPDATE accounts SET held = held - $2, free = free + $2 WHERE id = $1")
//!             .bind(&account).bind(cents).execute(ctx.conn()).await.map_err(SqlError::from)?;
//!         Ok(())
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::PgPool::connect("postgres://bank@localhost/bank").await?;
//! let participant = Participant::builder().sql(pool);
//! participant.migrate().await?; // creates the barrier table if missing
//! let participant = Accounts.into_participant(participant);
//! let app = tcc_http::axum::Router::new().nest("/tcc/bank", participant.router());
//! # let _ = app; Ok(()) }
//! ```

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tcc_core::barrier::sql::{
    Answer, BarrierTable, Begun, Pending, SqlBarrier, SqlBarrierError, SqlDatabase,
};
use tcc_core::barrier::{
    ActionOutcome, BackCheckOutcome, BarrierRecord, BarrierState, CancelOutcome, CompensateOutcome,
    ConfirmOutcome, DueReservation, Op, Refusal, TryOutcome,
};
use tcc_core::{BranchId, Clock, Gid, Timestamp};
use tracing::{debug, error, warn};

use super::async_calls::{AsyncKind, MAX_RUNS, RunError, business_error, run_error};
use super::{
    Done, Ids, LocalError, Participant, ParticipantBuilder, ParticipantError, Phase, Registered, Runtime,
    Store, barrier_error_of_refusal, decode_stored_request, encode_stored_request,
};
use crate::error::ApiError;
use crate::protocol::{DEADLINE_HEADER, REFUSED};
use crate::staged::{Disposition, Phase as CtxPhase, TccError};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Marks a [`Participant`] whose barrier and business state live in the SQL database `DB`
/// ([`sqlx::Postgres`] or [`sqlx::MySql`]): `Participant<Sql<Postgres>>`. Never constructed.
pub struct Sql<DB>(PhantomData<fn() -> DB>);

impl<DB> fmt::Debug for Sql<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sql")
    }
}

impl ParticipantBuilder {
    /// A participant whose barrier and business state live in `pool`'s database, in the barrier
    /// table [`BarrierTable::DEFAULT`] (see [`sql_in`](ParticipantBuilder::sql_in)). Create the table
    /// with [`Participant::migrate`] (or the migration files shipped with `tcc-core`) before serving.
    pub fn sql<DB: SqlDatabase>(self, pool: sqlx::Pool<DB>) -> Participant<Sql<DB>> {
        self.sql_in(pool, BarrierTable::default())
    }

    /// As [`sql`](ParticipantBuilder::sql), with the barrier in `table`.
    pub fn sql_in<DB: SqlDatabase>(self, pool: sqlx::Pool<DB>, table: BarrierTable) -> Participant<Sql<DB>> {
        let barrier = SqlBarrier::new(pool, table, self.clock, self.grace);
        let mut p = Participant::from_store(Store::Sql(Arc::new(barrier)));
        p.rt.alive = Some(Arc::new(super::AutoExpiry { every: self.expiry, started: Default::default() }));
        p
    }
}

impl<DB: SqlDatabase> Participant<Sql<DB>> {
    /// The SQL barrier (for inspection: [`SqlBarrier::get`], [`SqlBarrier::held`]).
    pub fn sql_barrier(&self) -> &SqlBarrier<DB> {
        match &self.rt.store {
            Store::Sql(b) => match b.as_any().downcast_ref::<SqlBarrier<DB>>() {
                Some(b) => b,
                None => unreachable!("a Participant<Sql<DB>> holds a SqlBarrier<DB>"),
            },
            Store::Sled(_) => unreachable!("a Participant<Sql<DB>> over sled"),
        }
    }

    /// The service's pool, as given to [`ParticipantBuilder::sql`].
    pub fn pool(&self) -> &sqlx::Pool<DB> {
        self.sql_barrier().pool()
    }

    /// Creates the barrier table and its index if missing (idempotent; several replicas may run it
    /// at once). Teams that run their own migrations use `tcc-core/migrations/` instead.
    pub async fn migrate(&self) -> Result<(), SqlBarrierError> {
        self.sql_barrier().migrate().await
    }

    /// Runs the local transaction of the two-phase message `gid`: `f`'s statements, on the
    /// [`SqlContext`]'s transaction, commit with the barrier row that the message's back-check reads
    /// (see [`Participant::local_transaction`](crate::participant::Participant::local_transaction),
    /// the same on sled). A serialization failure or deadlock (an error whose disposition is
    /// [`Disposition::Retry`]) rolls back and runs `f` again; any other error commits nothing.
    ///
    /// ```no_run
    /// use tcc_http::participant::sql::{SqlContext, SqlError};
    /// use tcc_http::sqlx::{self, Postgres};
    /// use tcc_http::{Gid, Participant};
    ///
    /// # async fn place(orders: Participant<tcc_http::participant::sql::Sql<Postgres>>, gid: Gid) -> Result<(), Box<dyn std::error::Error>> {
    /// orders
    ///     .local_transaction(&gid, |ctx: &mut SqlContext<Postgres>| Box::pin(async move {
    ///         sqlx::query("INSERT INTO orders (id, state) VALUES ($1, 'placed')")
    ///             .bind(ctx.gid().as_str()).execute(ctx.conn()).await.map_err(SqlError::from)?;
    ///         Ok::<_, SqlError>(())
    ///     }))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn local_transaction<T, E, F>(&self, gid: &Gid, f: F) -> Result<T, LocalError<E>>
    where
        F: for<'c> Fn(&'c mut SqlContext<DB>) -> BoxFuture<'c, Result<T, E>>,
        E: TccError,
    {
        let barrier = self.sql_barrier();
        let branch = super::messages::local_branch();
        for attempt in 0..MAX_RUNS {
            let pending = match barrier.begin(gid, &branch, Op::Local { request: &[] }).await {
                Ok(Begun::Run(pending)) => pending,
                Ok(Begun::Answered(Answer::Duplicate(_))) => return Err(LocalError::AlreadyCommitted),
                Ok(Begun::Answered(Answer::Refused(Refusal::RolledBack))) => {
                    return Err(LocalError::RolledBack);
                }
                Ok(Begun::Answered(other)) => return Err(LocalError::Failed(format!("{other:?}"))),
                Err(e) if e.is_retryable() => {
                    back_off(attempt).await;
                    continue;
                }
                Err(e) => return Err(LocalError::Failed(e.to_string())),
            };
            let mut ctx = SqlContext {
                pending,
                deadline: Timestamp(0),
                phase: CtxPhase::Local,
                operation: Arc::from("local"),
            };
            match f(&mut ctx).await {
                Ok(value) => match ctx.pending.commit(Vec::new()).await {
                    Ok(_) => return Ok(value),
                    Err(e) if e.is_retryable() => back_off(attempt).await,
                    // A failed COMMIT may have committed or not: the back-check tells.
                    Err(e) => return Err(LocalError::Unknown(e.to_string())),
                },
                Err(e) => {
                    if let Err(rollback) = ctx.pending.rollback().await {
                        warn!(error = %rollback, "rolling back a failed local transaction failed");
                    }
                    if e.disposition() != Disposition::Retry {
                        return Err(LocalError::Business(e));
                    }
                    back_off(attempt).await;
                }
            }
        }
        Err(LocalError::Contended)
    }

    /// Adds the SQL operation `op` under `name`, served at `POST /{name}/try`, `/{name}/confirm` and
    /// `/{name}/cancel`. `#[tcc]` traits whose methods take a [`SqlContext`] register theirs with it.
    ///
    /// # Panics
    /// As [`Participant::operation`].
    pub fn sql_operation(self, name: &str, op: impl SqlOperation<Db = DB>) -> Self {
        let barrier = SqlBarrier::clone(self.sql_barrier());
        self.register(name, Registered::Async(AsyncKind::Sql(Arc::new(SqlOp { op, barrier }))))
    }

    /// Adds the saga step `step` under `name`: its action at `POST /{name}/action` and its
    /// compensation at `POST /{name}/compensate`, each in one transaction with the barrier row (see
    /// [Sagas and messages](super#sagas-and-messages)). `#[tcc]` traits register their
    /// `#[tcc(compensate = ...)]` methods with it.
    ///
    /// # Panics
    /// As [`Participant::operation`].
    pub fn sql_step(self, name: &str, step: impl SqlStep<Db = DB>) -> Self {
        let barrier = SqlBarrier::clone(self.sql_barrier());
        let kind = AsyncKind::Sql(Arc::new(SqlOp { op: SqlStepOp(step), barrier }));
        self.register(name, Registered::Step { kind, compensable: true })
    }

    /// Adds the message action `action` under `name`, at `POST /{name}/action`, in one transaction
    /// with the barrier row. `#[tcc]` traits register their `#[tcc(action)]` methods with it.
    ///
    /// # Panics
    /// As [`Participant::operation`].
    pub fn sql_action(self, name: &str, action: impl SqlAction<Db = DB>) -> Self {
        let barrier = SqlBarrier::clone(self.sql_barrier());
        let kind = AsyncKind::Sql(Arc::new(SqlOp { op: SqlActionOp(action), barrier }));
        self.register(name, Registered::Step { kind, compensable: false })
    }

    /// Adds an operation made of three async closures over the call's [`SqlContext`] and the raw
    /// request bytes: try (returning the result bytes), confirm and cancel. An `Err` rolls the call
    /// back and answers as its [`TccError::disposition`] says.
    ///
    /// ```no_run
    /// use tcc_http::participant::sql::{SqlContext, SqlError};
    /// use tcc_http::sqlx::{self, Postgres};
    /// use tcc_http::Participant;
    ///
    /// # fn build(pool: sqlx::PgPool) {
    /// let participant = Participant::builder().sql(pool).sql_operation_fn(
    ///     "reserve",
    ///     |ctx: &mut SqlContext<Postgres>, item: Vec<u8>| Box::pin(async move {
    ///         sqlx::query("UPDATE stock SET held = held + 1 WHERE item = $1")
    ///             .bind(item).execute(ctx.conn()).await.map_err(SqlError::from)?;
    ///         Ok::<_, SqlError>(b"held".to_vec())
    ///     }),
    ///     |_ctx: &mut SqlContext<Postgres>, _item: Vec<u8>| Box::pin(async move { Ok::<_, SqlError>(()) }),
    ///     |ctx: &mut SqlContext<Postgres>, item: Vec<u8>| Box::pin(async move {
    ///         sqlx::query("UPDATE stock SET held = held - 1 WHERE item = $1")
    ///             .bind(item).execute(ctx.conn()).await.map_err(SqlError::from)?;
    ///         Ok::<_, SqlError>(())
    ///     }),
    /// );
    /// # let _ = participant; }
    /// ```
    ///
    /// # Panics
    /// As [`Participant::operation`].
    pub fn sql_operation_fn<T, C, X, E>(self, name: &str, try_: T, confirm: C, cancel: X) -> Self
    where
        T: for<'c> Fn(&'c mut SqlContext<DB>, Vec<u8>) -> BoxFuture<'c, Result<Vec<u8>, E>>
            + Send
            + Sync
            + 'static,
        C: for<'c> Fn(&'c mut SqlContext<DB>, Vec<u8>) -> BoxFuture<'c, Result<(), E>>
            + Send
            + Sync
            + 'static,
        X: for<'c> Fn(&'c mut SqlContext<DB>, Vec<u8>) -> BoxFuture<'c, Result<(), E>>
            + Send
            + Sync
            + 'static,
        E: TccError,
    {
        self.sql_operation(name, FnSqlOperation { try_, confirm, cancel, marker: PhantomData })
    }
}

/// What a SQL business method gets: the call's identity and `&mut` access to the open database
/// transaction that will also hold the barrier row. Run every statement of the method on
/// [`conn`](SqlContext::conn) (or [`transaction`](SqlContext::transaction)): the runtime commits it
/// with the barrier row when the method returns `Ok`, and rolls it back otherwise. Do not commit or
/// roll back yourself, and keep anything outside the database (an e-mail, a call) out: the method may
/// run again after a serialization failure.
pub struct SqlContext<DB: SqlDatabase> {
    pending: Pending<DB>,
    deadline: Timestamp,
    phase: CtxPhase,
    operation: Arc<str>,
}

impl<DB: SqlDatabase> fmt::Debug for SqlContext<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlContext")
            .field("gid", self.pending.gid())
            .field("branch", self.pending.branch())
            .field("phase", &self.phase)
            .field("operation", &self.operation)
            .finish_non_exhaustive()
    }
}

impl<DB: SqlDatabase> SqlContext<DB> {
    /// The connection of the call's transaction: `sqlx::query(..).execute(ctx.conn())`.
    pub fn conn(&mut self) -> &mut DB::Connection {
        self.pending.conn()
    }

    /// The call's transaction itself.
    pub fn transaction(&mut self) -> &mut sqlx::Transaction<'static, DB> {
        self.pending.transaction()
    }

    /// The global transaction id.
    pub fn gid(&self) -> &Gid {
        self.pending.gid()
    }

    /// The branch id.
    pub fn branch(&self) -> &BranchId {
        self.pending.branch()
    }

    /// The transaction's deadline, as the try carried it.
    pub fn deadline(&self) -> Timestamp {
        self.deadline
    }

    /// The phase this call serves ([`CtxPhase::Expire`] for the participant's own release).
    pub fn phase(&self) -> CtxPhase {
        self.phase
    }

    /// The operation's name.
    pub fn operation(&self) -> &str {
        &self.operation
    }
}

/// One TCC operation over a SQL database: try, confirm and cancel as async methods over a
/// [`SqlContext`], typed request and response travelling as JSON. What `#[tcc]` generates for each
/// operation of a trait whose methods take `ctx: &mut SqlContext<DB>`; implement it by hand to serve
/// an operation without the macro ([`Participant::sql_operation`]).
pub trait SqlOperation: Send + Sync + 'static {
    /// The database ([`sqlx::Postgres`] or [`sqlx::MySql`]).
    type Db: SqlDatabase;
    /// The try's request (the JSON body of the try; confirm and cancel get the stored one back).
    type Request: DeserializeOwned + Send + 'static;
    /// The try's result (the JSON body of its answer).
    type Response: Serialize + Send + 'static;
    /// The business error.
    type Error: TccError;

    /// Phase one: check and reserve, in the call's transaction.
    fn try_(
        &self,
        ctx: &mut SqlContext<Self::Db>,
        request: Self::Request,
    ) -> impl Future<Output = Result<Self::Response, Self::Error>> + Send;

    /// Phase two: turn the reservation into the real effect.
    fn confirm(
        &self,
        ctx: &mut SqlContext<Self::Db>,
        request: Self::Request,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Phase two: release the reservation; also run by the participant's own expiry.
    fn cancel(
        &self,
        ctx: &mut SqlContext<Self::Db>,
        request: Self::Request,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The error as JSON for the answer's `detail` (`None`: no detail). `#[tcc]` fills it in with the
    /// error's `Serialize` implementation when it has one.
    fn error_detail(error: &Self::Error) -> Option<serde_json::Value> {
        let _ = error;
        None
    }
}

/// A message's action, or the action half of a saga step, over a SQL database: what `#[tcc]`
/// generates for a method marked `#[tcc(action)]` whose context is a [`SqlContext`] (see
/// [`AsyncAction`](crate::staged::AsyncAction) for the rules, the same on every store).
pub trait SqlAction: Send + Sync + 'static {
    /// The database ([`sqlx::Postgres`] or [`sqlx::MySql`]).
    type Db: SqlDatabase;
    /// The request (the JSON body of the call; the compensation gets the stored one back).
    type Request: DeserializeOwned + Send + 'static;
    /// The business error.
    type Error: TccError;

    /// Does the step's work, in the call's transaction.
    fn action(
        &self,
        ctx: &mut SqlContext<Self::Db>,
        request: Self::Request,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The error as JSON for the answer's `detail` (`None`: no detail).
    fn error_detail(error: &Self::Error) -> Option<serde_json::Value> {
        let _ = error;
        None
    }
}

/// A saga step over a SQL database: a [`SqlAction`] and the compensation that undoes it (see
/// [`AsyncStep`](crate::staged::AsyncStep) for the rules, the same on every store).
pub trait SqlStep: SqlAction {
    /// Undoes the action, with the action's stored request, in the call's transaction.
    fn compensate(
        &self,
        ctx: &mut SqlContext<Self::Db>,
        request: Self::Request,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// A saga step held as an operation: its try is the action, its cancel the compensation; its
/// confirm is never called (a step's routes are `action` and `compensate`).
struct SqlStepOp<S>(S);

/// A message action held as an operation: its try is the action; nothing else is ever called.
struct SqlActionOp<A>(A);

impl<S: SqlStep> SqlOperation for SqlStepOp<S> {
    type Db = S::Db;
    type Request = S::Request;
    type Response = ();
    type Error = S::Error;

    fn try_(
        &self,
        ctx: &mut SqlContext<S::Db>,
        request: S::Request,
    ) -> impl Future<Output = Result<(), S::Error>> + Send {
        self.0.action(ctx, request)
    }

    async fn confirm(&self, _ctx: &mut SqlContext<S::Db>, _request: S::Request) -> Result<(), S::Error> {
        unreachable!("a saga step has no confirm route")
    }

    fn cancel(
        &self,
        ctx: &mut SqlContext<S::Db>,
        request: S::Request,
    ) -> impl Future<Output = Result<(), S::Error>> + Send {
        self.0.compensate(ctx, request)
    }

    fn error_detail(error: &S::Error) -> Option<serde_json::Value> {
        S::error_detail(error)
    }
}

impl<A: SqlAction> SqlOperation for SqlActionOp<A> {
    type Db = A::Db;
    type Request = A::Request;
    type Response = ();
    type Error = A::Error;

    fn try_(
        &self,
        ctx: &mut SqlContext<A::Db>,
        request: A::Request,
    ) -> impl Future<Output = Result<(), A::Error>> + Send {
        self.0.action(ctx, request)
    }

    async fn confirm(&self, _ctx: &mut SqlContext<A::Db>, _request: A::Request) -> Result<(), A::Error> {
        unreachable!("a message action has no confirm route")
    }

    async fn cancel(&self, _ctx: &mut SqlContext<A::Db>, _request: A::Request) -> Result<(), A::Error> {
        unreachable!("a message action has no compensate route")
    }

    fn error_detail(error: &A::Error) -> Option<serde_json::Value> {
        A::error_detail(error)
    }
}

/// A database error inside a SQL business method. Put it in the business error type
/// (`#[error(transparent)] Db(#[from] SqlError)`) and answer [`SqlError::disposition`] for it in
/// [`TccError::disposition`]: a serialization failure or deadlock then runs the call again, any
/// other database failure answers 503 (the coordinator retries). It serializes as its message, so the
/// error type can still derive `Serialize` and `Deserialize` for typed clients.
#[derive(Clone, Debug, thiserror::Error, Serialize, Deserialize)]
#[error("{message}")]
pub struct SqlError {
    message: String,
    retry: bool,
    #[serde(skip)]
    source: Option<Arc<sqlx::Error>>,
}

impl From<sqlx::Error> for SqlError {
    fn from(e: sqlx::Error) -> SqlError {
        SqlError {
            message: format!("database: {e}"),
            retry: tcc_core::barrier::sql::is_retryable(&e),
            source: Some(Arc::new(e)),
        }
    }
}

impl SqlError {
    /// [`Disposition::Retry`] for a serialization failure, deadlock or lock wait timeout,
    /// [`Disposition::Transient`] for anything else.
    pub fn disposition(&self) -> Disposition {
        if self.retry { Disposition::Retry } else { Disposition::Transient }
    }

    /// The sqlx error (absent on an error decoded from an answer).
    pub fn sqlx_error(&self) -> Option<&sqlx::Error> {
        self.source.as_deref()
    }
}

impl TccError for SqlError {
    fn disposition(&self) -> Disposition {
        SqlError::disposition(self)
    }
}

/// A closure operation's business error type is its own; its detail is not sent.
struct FnSqlOperation<T, C, X, DB, E> {
    try_: T,
    confirm: C,
    cancel: X,
    marker: PhantomData<fn() -> (DB, E)>,
}

impl<T, C, X, DB, E> SqlOperation for FnSqlOperation<T, C, X, DB, E>
where
    DB: SqlDatabase,
    T: for<'c> Fn(&'c mut SqlContext<DB>, Vec<u8>) -> BoxFuture<'c, Result<Vec<u8>, E>>
        + Send
        + Sync
        + 'static,
    C: for<'c> Fn(&'c mut SqlContext<DB>, Vec<u8>) -> BoxFuture<'c, Result<(), E>> + Send + Sync + 'static,
    X: for<'c> Fn(&'c mut SqlContext<DB>, Vec<u8>) -> BoxFuture<'c, Result<(), E>> + Send + Sync + 'static,
    E: TccError,
{
    type Db = DB;
    type Request = RawRequest;
    type Response = RawResponse;
    type Error = E;

    async fn try_(&self, ctx: &mut SqlContext<DB>, request: RawRequest) -> Result<RawResponse, E> {
        (self.try_)(ctx, request.0).await.map(RawResponse)
    }

    async fn confirm(&self, ctx: &mut SqlContext<DB>, request: RawRequest) -> Result<(), E> {
        (self.confirm)(ctx, request.0).await
    }

    async fn cancel(&self, ctx: &mut SqlContext<DB>, request: RawRequest) -> Result<(), E> {
        (self.cancel)(ctx, request.0).await
    }
}

/// A closure operation's request: the bytes as they came.
#[derive(Debug)]
struct RawRequest(Vec<u8>);
/// A closure operation's result bytes, answered as they are.
#[derive(Debug)]
struct RawResponse(Vec<u8>);

impl<'de> Deserialize<'de> for RawRequest {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom("raw requests are not decoded"))
    }
}

impl Serialize for RawResponse {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

/// Decoding the request and encoding the response of an operation (raw for closure operations).
fn decode_request<O: SqlOperation>(bytes: &[u8]) -> Result<O::Request, String> {
    if let Some(raw) =
        (&mut Some(RawRequest(bytes.to_vec())) as &mut dyn Any).downcast_mut::<Option<O::Request>>()
    {
        return raw.take().ok_or_else(|| "request taken twice".to_owned());
    }
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

fn encode_response<O: SqlOperation>(response: O::Response) -> Result<Vec<u8>, String> {
    let mut slot = Some(response);
    if let Some(raw) = (&mut slot as &mut dyn Any).downcast_mut::<Option<RawResponse>>() {
        return raw.take().map(|r| r.0).ok_or_else(|| "response taken twice".to_owned());
    }
    match slot {
        Some(response) => serde_json::to_vec(&response).map_err(|e| e.to_string()),
        None => Err("response taken twice".to_owned()),
    }
}

/// A SQL operation as the runtime holds it, with the barrier it runs through.
struct SqlOp<O: SqlOperation> {
    op: O,
    barrier: SqlBarrier<O::Db>,
}

/// A SQL operation, its database type erased.
pub(crate) trait ErasedSql: Send + Sync + 'static {
    fn check(&self, request: &[u8]) -> Result<(), String>;
    fn call(
        self: Arc<Self>,
        name: &str,
        phase: Phase,
        ids: &Ids,
        try_deadline: Option<Timestamp>,
        body: Bytes,
    ) -> BoxFuture<'static, Result<Done, ApiError>>;
    fn expire(
        self: Arc<Self>,
        name: String,
        due: DueReservation,
    ) -> BoxFuture<'static, Result<bool, ParticipantError>>;
}

/// A SQL barrier, its database type erased: what the expiry sweep and `Debug` need.
pub(crate) trait ErasedBarrier: Send + Sync + 'static {
    fn describe(&self) -> String;
    fn clock(&self) -> Arc<dyn Clock>;
    fn as_any(&self) -> &dyn Any;
    fn due(&self, limit: usize) -> BoxFuture<'_, Result<Vec<DueReservation>, SqlBarrierError>>;
    fn get<'a>(
        &'a self,
        gid: &'a Gid,
        branch: &'a BranchId,
    ) -> BoxFuture<'a, Result<Option<BarrierRecord>, SqlBarrierError>>;
    fn back_check<'a>(
        &'a self,
        gid: &'a Gid,
        branch: &'a BranchId,
    ) -> BoxFuture<'a, Result<BackCheckOutcome, SqlBarrierError>>;
}

impl<DB: SqlDatabase> ErasedBarrier for SqlBarrier<DB> {
    fn describe(&self) -> String {
        format!("{self:?}")
    }
    fn clock(&self) -> Arc<dyn Clock> {
        Arc::clone(SqlBarrier::clock(self))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn due(&self, limit: usize) -> BoxFuture<'_, Result<Vec<DueReservation>, SqlBarrierError>> {
        Box::pin(SqlBarrier::due(self, limit))
    }
    fn get<'a>(
        &'a self,
        gid: &'a Gid,
        branch: &'a BranchId,
    ) -> BoxFuture<'a, Result<Option<BarrierRecord>, SqlBarrierError>> {
        Box::pin(SqlBarrier::get(self, gid, branch))
    }
    fn back_check<'a>(
        &'a self,
        gid: &'a Gid,
        branch: &'a BranchId,
    ) -> BoxFuture<'a, Result<BackCheckOutcome, SqlBarrierError>> {
        Box::pin(SqlBarrier::back_check(self, gid, branch))
    }
}

/// A SQL barrier failure as an answer.
pub(super) fn sql_error(e: SqlBarrierError) -> ApiError {
    match e {
        SqlBarrierError::Refused(r) => barrier_error_of_refusal(r),
        e @ SqlBarrierError::Corrupt { .. } => {
            error!(error = %e, "participant call on a damaged barrier row");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "corrupt", e.to_string())
        }
        e => {
            error!(error = %e, "participant barrier database failed");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage", e.to_string())
        }
    }
}

fn contended() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "contended",
        format!(
            "the database rolled the call back (serialization failure or deadlock) {MAX_RUNS} times; try again"
        ),
    )
}

fn mismatch(message: String) -> ApiError {
    ApiError::new(REFUSED, "operation_mismatch", message)
}

/// The request stored with the branch's record, checked to be this operation's.
fn stored_request<'r>(rec: &'r BarrierRecord, name: &str) -> Result<&'r [u8], ApiError> {
    match decode_stored_request(&rec.request) {
        Some((op, request)) if op == name => Ok(request),
        Some((op, _)) => {
            Err(mismatch(format!("the branch was tried through operation {op:?}, not {name:?}")))
        }
        None => {
            Err(mismatch("the branch's barrier record was not written by the participant runtime".into()))
        }
    }
}

/// A short pause before running a rolled-back call again, growing with the attempt.
async fn back_off(attempt: usize) {
    let ms = 2u64 << attempt.min(6);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// What came of running the business method once.
enum Ran {
    Done(Vec<u8>),
    /// Rolled back by the database: run the whole call again.
    Retry,
}

impl<O: SqlOperation> SqlOp<O> {
    /// Runs the business method of `phase` on its own task (a panic fails this call only), with the
    /// pending call's transaction, and commits or rolls back.
    async fn run(
        self: &Arc<Self>,
        pending: Pending<O::Db>,
        name: &str,
        phase: CtxPhase,
        request: Vec<u8>,
    ) -> Result<Ran, ApiError> {
        let deadline = pending.record().deadline;
        let ctx = SqlContext { pending, deadline, phase, operation: Arc::from(name) };
        let this = Arc::clone(self);
        let joined = tokio::spawn(async move {
            let mut ctx = ctx;
            let r = this.business(&mut ctx, phase, &request).await;
            (ctx, r)
        })
        .await;
        let (ctx, result) = match joined {
            Ok(v) => v,
            // The task's transaction was dropped with it: rolled back.
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("the business method failed: {e}"),
                ));
            }
        };
        match result {
            Ok(output) => match ctx.pending.commit(output.clone()).await {
                Ok(_) => Ok(Ran::Done(output)),
                Err(e) if e.is_retryable() => Ok(Ran::Retry),
                Err(e) => Err(sql_error(e)),
            },
            Err(e) => {
                if let Err(rollback) = ctx.pending.rollback().await {
                    warn!(error = %rollback, "rolling back a failed business method failed");
                }
                match e {
                    RunError::Business { disposition: Disposition::Retry, .. } => Ok(Ran::Retry),
                    e => Err(run_error(
                        e,
                        match phase {
                            CtxPhase::Try => Phase::Try,
                            CtxPhase::Confirm => Phase::Confirm,
                            CtxPhase::Cancel | CtxPhase::Expire | CtxPhase::Local => Phase::Cancel,
                            CtxPhase::Action => Phase::Action,
                            CtxPhase::Compensate => Phase::Compensate,
                        },
                    )),
                }
            }
        }
    }

    async fn business(
        &self,
        ctx: &mut SqlContext<O::Db>,
        phase: CtxPhase,
        request: &[u8],
    ) -> Result<Vec<u8>, RunError> {
        let request = decode_request::<O>(request).map_err(RunError::Request)?;
        let detail = |e: &O::Error| O::error_detail(e);
        match phase {
            // A step is held as an operation whose try is its action and whose cancel is its
            // compensation (see `SqlStepOp`).
            CtxPhase::Try | CtxPhase::Action => {
                let response =
                    self.op.try_(ctx, request).await.map_err(|e| business_error(&e, detail(&e)))?;
                encode_response::<O>(response).map_err(RunError::Response)
            }
            CtxPhase::Local => Err(RunError::Response("a local transaction is not an operation's".into())),
            CtxPhase::Confirm => {
                self.op.confirm(ctx, request).await.map_err(|e| business_error(&e, detail(&e)))?;
                Ok(Vec::new())
            }
            CtxPhase::Cancel | CtxPhase::Expire | CtxPhase::Compensate => {
                self.op.cancel(ctx, request).await.map_err(|e| business_error(&e, detail(&e)))?;
                Ok(Vec::new())
            }
        }
    }

    async fn call_once(
        self: &Arc<Self>,
        name: &str,
        phase: Phase,
        ids: &Ids,
        try_call: Option<&(Timestamp, Vec<u8>)>,
        body: &Bytes,
    ) -> Result<Option<Done>, ApiError> {
        let op = match (phase, try_call) {
            (Phase::Try, Some((deadline, stored))) => Op::Try { deadline: *deadline, request: stored },
            (Phase::Try, None) => {
                return Err(ApiError::malformed(format!("header {DEADLINE_HEADER} is missing")));
            }
            (Phase::Action, Some((_, stored))) => Op::Action { request: stored },
            (Phase::Action, None) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "an action without its request",
                ));
            }
            (Phase::Confirm, _) => Op::Confirm,
            (Phase::Cancel, _) => Op::Cancel,
            (Phase::Compensate, _) => Op::Compensate,
        };
        let pending = match self.barrier.begin(&ids.gid, &ids.branch, op).await {
            Ok(Begun::Run(pending)) => pending,
            Ok(Begun::Answered(answer)) => return answered(answer, phase, name).map(Some),
            Err(e) if e.is_retryable() => return Ok(None),
            Err(e) => return Err(sql_error(e)),
        };
        let (ctx_phase, request) = match phase {
            Phase::Try => (CtxPhase::Try, body.to_vec()),
            Phase::Action => (CtxPhase::Action, body.to_vec()),
            Phase::Confirm | Phase::Cancel | Phase::Compensate => {
                let request = match stored_request(pending.record(), name) {
                    Ok(r) => r.to_vec(),
                    Err(e) => {
                        let _ = pending.rollback().await;
                        return Err(e);
                    }
                };
                let ctx_phase = match phase {
                    Phase::Confirm => CtxPhase::Confirm,
                    Phase::Compensate => CtxPhase::Compensate,
                    _ => CtxPhase::Cancel,
                };
                (ctx_phase, request)
            }
        };
        Ok(match self.run(pending, name, ctx_phase, request).await? {
            Ran::Retry => None,
            Ran::Done(output) => Some(match phase {
                Phase::Try => Done::Try(TryOutcome::Fresh(output)),
                Phase::Confirm => Done::Confirm(ConfirmOutcome::Confirmed),
                Phase::Cancel => Done::Cancel(CancelOutcome::Cancelled),
                Phase::Action => Done::Action(ActionOutcome::Ran),
                Phase::Compensate => Done::Compensate(CompensateOutcome::Compensated),
            }),
        })
    }

    async fn expire_once(
        self: &Arc<Self>,
        name: &str,
        due: &DueReservation,
    ) -> Result<Option<bool>, ParticipantError> {
        let pending = match self.barrier.begin_expire(due).await {
            Ok(Some(pending)) => pending,
            Ok(None) => return Ok(Some(false)),
            Err(e) if e.is_retryable() => return Ok(None),
            Err(e @ SqlBarrierError::Corrupt { .. }) => {
                error!(error = %e, "cannot expire a damaged barrier row; skipped");
                return Ok(Some(false));
            }
            Err(e) => return Err(e.into()),
        };
        let request = match stored_request(pending.record(), name) {
            Ok(r) => r.to_vec(),
            Err(e) => {
                let _ = pending.rollback().await;
                warn!(gid = %due.gid, branch = %due.branch, error = %e, "cannot expire this reservation; skipped");
                return Ok(Some(false));
            }
        };
        match self.run(pending, name, CtxPhase::Expire, request).await {
            Ok(Ran::Done(_)) => Ok(Some(true)),
            Ok(Ran::Retry) => Ok(None),
            Err(e) => {
                warn!(gid = %due.gid, branch = %due.branch, error = %e,
                    "business cancel of an expired reservation failed; retrying next sweep");
                Ok(Some(false))
            }
        }
    }
}

/// The answer to a call the barrier answered without running anything.
fn answered(answer: Answer, phase: Phase, name: &str) -> Result<Done, ApiError> {
    match (answer, phase) {
        (Answer::Duplicate(rec), Phase::Try) => {
            stored_request(&rec, name)?;
            Ok(Done::Try(TryOutcome::Duplicate(rec.result)))
        }
        (Answer::Duplicate(_), Phase::Confirm) => Ok(Done::Confirm(ConfirmOutcome::Duplicate)),
        (Answer::Duplicate(rec), Phase::Cancel) if rec.state == BarrierState::Expired => {
            Ok(Done::Cancel(CancelOutcome::AlreadyExpired))
        }
        (Answer::Duplicate(_), Phase::Cancel) => Ok(Done::Cancel(CancelOutcome::Duplicate)),
        (Answer::Duplicate(rec), Phase::Action) => {
            stored_request(&rec, name)?;
            Ok(Done::Action(ActionOutcome::Duplicate))
        }
        (Answer::Duplicate(_), Phase::Compensate) => Ok(Done::Compensate(CompensateOutcome::Duplicate)),
        (Answer::Empty, Phase::Compensate) => Ok(Done::Compensate(CompensateOutcome::Empty)),
        (Answer::Empty, _) => Ok(Done::Cancel(CancelOutcome::Empty)),
        (Answer::Refused(r), _) => Err(barrier_error_of_refusal(r)),
    }
}

impl<O: SqlOperation> ErasedSql for SqlOp<O> {
    fn check(&self, request: &[u8]) -> Result<(), String> {
        decode_request::<O>(request).map(drop)
    }

    fn call(
        self: Arc<Self>,
        name: &str,
        phase: Phase,
        ids: &Ids,
        try_deadline: Option<Timestamp>,
        body: Bytes,
    ) -> BoxFuture<'static, Result<Done, ApiError>> {
        let (name, ids) = (name.to_owned(), ids.clone());
        Box::pin(async move {
            let try_call = try_deadline.map(|deadline| (deadline, encode_stored_request(&name, &body)));
            for attempt in 0..MAX_RUNS {
                match self.call_once(&name, phase, &ids, try_call.as_ref(), &body).await? {
                    Some(done) => return Ok(done),
                    None => {
                        debug!(gid = %ids.gid, branch = %ids.branch, ?phase, attempt, "rolled back by the database; running again");
                        back_off(attempt).await;
                    }
                }
            }
            Err(contended())
        })
    }

    fn expire(
        self: Arc<Self>,
        name: String,
        due: DueReservation,
    ) -> BoxFuture<'static, Result<bool, ParticipantError>> {
        Box::pin(async move {
            for attempt in 0..MAX_RUNS {
                match self.expire_once(&name, &due).await? {
                    Some(released) => return Ok(released),
                    None => back_off(attempt).await,
                }
            }
            warn!(gid = %due.gid, branch = %due.branch, "releasing the reservation kept being rolled back; retrying next sweep");
            Ok(false)
        })
    }
}

/// How many due reservations one sweep lists at once.
const SWEEP_BATCH: usize = 256;

/// The expiry sweep of a SQL participant: lists what is due, and releases each through the
/// operation that made it, one transaction each, skipping rows another replica holds.
pub(super) async fn expire_due(
    rt: &Runtime,
    barrier: &Arc<dyn ErasedBarrier>,
) -> Result<usize, ParticipantError> {
    let mut released = 0;
    loop {
        let batch = barrier.due(SWEEP_BATCH).await?;
        let mut released_now = 0;
        for due in &batch {
            let rec = match barrier.get(&due.gid, &due.branch).await {
                Ok(Some(rec)) => rec,
                Ok(None) => continue,
                Err(e @ SqlBarrierError::Corrupt { .. }) => {
                    error!(error = %e, "cannot expire a damaged barrier row; skipped");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let Some((name, _)) = decode_stored_request(&rec.request) else {
                error!(gid = %due.gid, branch = %due.branch, "a held reservation not stored by the runtime cannot be expired");
                continue;
            };
            match rt.ops.get(name) {
                Some(Registered::Async(AsyncKind::Sql(op))) => {
                    if Arc::clone(op).expire(name.to_owned(), due.clone()).await? {
                        released_now += 1;
                    }
                }
                _ => warn!(gid = %due.gid, branch = %due.branch, operation = %name,
                    "no SQL operation of this name is registered to release the reservation; retrying next sweep"),
            }
        }
        released += released_now;
        // A full page with releases may have more behind it; anything else waits for the next sweep
        // (what failed stays due and would only be listed again).
        if batch.len() < SWEEP_BATCH || released_now == 0 {
            return Ok(released);
        }
    }
}
