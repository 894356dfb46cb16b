//! The participant runtime: an axum router serving a participant's TCC operations through the
//! `tcc-core` barrier.
//!
//! A participant registers one or more operations by name on a [`Participant`] and serves
//! [`Participant::router`], usually nested under a prefix: synchronous [`Operation`]s, whose methods
//! run inside the barrier's sled transaction, or [`AsyncOperation`]s (what `#[tcc]` generates), whose
//! async methods stage their writes in a [`TccContext`] that the runtime then commits through the
//! barrier (see [Async operations](#async-operations)). For an operation `hold_seat` nested under
//! `/tcc/flights`, the branch target is `http://host/tcc/flights/hold_seat` and the three phases are
//! `POST …/hold_seat/try`, `…/confirm` and `…/cancel` (see [`crate::protocol`]).
//!
//! Every call goes through the participant's barrier, so the three TCC anomalies are the
//! framework's problem: a duplicate confirm or cancel runs nothing, a cancel for a try that never ran
//! is recorded without running the business cancel, and a try arriving after that is refused. The
//! barrier record commits in the same sled transaction as the operation's business writes, or, for a
//! participant on PostgreSQL or MySQL ([`sql`], features `sqlx-postgres` / `sqlx-mysql`), in the same
//! database transaction as its statements.
//!
//! # Answers
//!
//! | situation                                                    | status | code |
//! |--------------------------------------------------------------|--------|------|
//! | try ran, or is a duplicate (body: the try's result bytes)     | 200    | |
//! | confirm ran, or is a duplicate                                | 200    | |
//! | cancel ran, was empty, is a duplicate, or the reservation had already expired | 200 | |
//! | the operation's business method aborted (a refusal)           | 409    | `refused` (async: the error as JSON in `detail`) |
//! | an async business method returned a [transient](crate::staged::Disposition::Transient) error | 503 | `unavailable` (with `detail`) |
//! | an async business method kept conflicting with other calls ([`MAX_RUNS`] runs) | 503 | `contended` |
//! | try at or after its deadline                                  | 409    | `deadline_passed` |
//! | try after the branch was cancelled (suspension)               | 409    | `suspended` |
//! | confirm with no try before it                                 | 409    | `not_tried` |
//! | confirm after cancel                                          | 409    | `already_cancelled` |
//! | cancel after confirm                                          | 409    | `already_confirmed` |
//! | the branch was tried through another operation               | 409    | `operation_mismatch` |
//! | confirm or try after the participant released the reservation itself | 410 | `expired` |
//! | missing, repeated or malformed `tcc-*` header, or a request [`Operation::check`] rejects | 400 | `malformed` |
//! | unknown operation / phase                                     | 404    | `unknown_operation` / `unknown_phase` |
//! | a method other than `POST`                                    | 405    | `method_not_allowed` |
//! | body over [`MAX_BODY`]                                        | 413    | `too_large` |
//! | damaged barrier record (needs an operator)                    | 500    | `corrupt` |
//! | the business method panicked, or its request or response does not (de)serialize | 500 | `internal` |
//! | sled failed (for an async method: a [`TccContext`] storage fault) | 503 (I/O) or 500 | `storage` |
//! | the change could not be flushed to disk                       | 503    | `not_flushed` |
//!
//! `POST …/hold_seat/batch` takes phase-two calls in bulk (see [`crate::protocol`], "Phase-two
//! batches"): each call runs through the barrier exactly as its single call would, in its own
//! barrier transaction, and is answered in the batch's body with the status and code of the table
//! above, once what it changed is on disk (one `application/x-ndjson` line per call as it finishes,
//! when the request accepts that, as the tcc clients' do; else one JSON object once all are done).
//! A batch malformed anywhere (400) or of more than
//! [`MAX_BATCH_CALLS`](crate::protocol::MAX_BATCH_CALLS) calls (413) runs none of them.
//!
//! `POST …/hold_seat/tries` takes tries in bulk, as a busy initiator's client sends them (see
//! [`crate::protocol`], "Batches of tries"): each try is checked by the operation, runs through the
//! barrier in its own transaction (tries of one branch in the batch's order, others concurrently
//! for an async operation) and is answered in the batch's body with the status and code of the
//! table above, or its result, streamed as a phase-two batch is; a try whose business method panics
//! fails alone (500). A batch that is not a batch of tries or holds a malformed id (400),
//! or of more than [`MAX_BATCH_CALLS`](crate::protocol::MAX_BATCH_CALLS) tries (413), runs none of
//! them.
//!
//! Every answer but 200 carries an [`ErrorBody`](crate::ErrorBody). A 200 also carries the
//! [`OUTCOME_HEADER`] saying what happened (`fresh`, `duplicate`, `confirmed`, `cancelled`, `empty`,
//! `expired`), for logs and tests; the coordinator does not need it.
//!
//! # Sagas and messages
//!
//! A saga step ([`Participant::async_step`], [`sql::SqlStep`], or a `#[tcc(compensate = ...)]`
//! method) is served at `POST …/{name}/action` and `…/{name}/compensate`; a message's action
//! ([`Participant::async_action`], [`sql::SqlAction`], `#[tcc(action)]`) at `…/{name}/action`.
//! The coordinator calls them with the same `tcc-gid` and `tcc-branch` headers (and, for a saga
//! that came through the DTM API, DTM's query parameters, which are ignored), with the step's
//! payload as the JSON body. Through the same barrier, in its saga and message states:
//!
//! | situation | status | code / outcome |
//! |---|---|---|
//! | action ran, or is a duplicate | 200 | `done` / `duplicate` |
//! | compensation ran, was empty (no action before it), or is a duplicate | 200 | `compensated` / `empty` / `duplicate` |
//! | action after its compensation | 409 | `compensated` |
//! | the business method refused (a saga then turns back) | 409 | `refused` |
//! | the branch was used by a call of another kind (a TCC try, say) | 409 | `other_kind` |
//! | `try`, `confirm`, `cancel`, `batch` or `tries` on a step, `compensate` on a message action | 404 | `unknown_phase` |
//!
//! The rest (malformed headers or request, transient errors, storage faults) answers as the table
//! above says for an operation. An action holds nothing, so the expiry sweep never touches it.
//!
//! A two-phase message's initiator runs its local transaction through
//! [`Participant::local_transaction`] (on SQL, [`Participant::local_transaction`] of
//! `Participant<Sql<DB>>`): the business writes commit with the barrier record of branch
//! [`LOCAL_BRANCH`]. The coordinator's back-check is `GET …/back-check?gid=…` on the participant's
//! routes (the message's `query_prepared`): 200 `{"dtm_result":"SUCCESS"}` when the local
//! transaction committed; 409 `rolled_back` (with `detail` `{"dtm_result":"FAILURE"}`) when it did
//! not, after recording so, so that it never commits later; 400 `malformed` without a valid `gid`.
//!
//! # Durability
//!
//! No answer is sent before the change it reports is on disk. [`Participant::new`] switches the
//! barrier to [`Durability::Deferred`] and runs a group-commit flusher thread: each call commits in
//! memory on the blocking pool, then waits (asynchronously, holding no thread) for the next flush,
//! which covers every call that committed before it. Refusals and duplicates wait too, since what
//! they answer may rest on another call's change that is not flushed yet.
//! [`Participant::with_barrier_durability`] keeps the barrier's own setting instead.
//!
//! # Expiry
//!
//! A try carries the transaction's deadline. A reservation neither confirmed nor cancelled by
//! deadline plus the barrier's grace period is released by the participant itself, running the
//! business cancel of the operation that made it ([`Participant::spawn_expiry`],
//! [`Participant::expire_due`]). All operations of a participant share one barrier (one record per
//! (transaction, branch), one expiry index), so the runtime stores the operation's name with the
//! try's request in the barrier record (see [`decode_stored_request`]); the sweep reads it back and
//! calls that operation's cancel.
//!
//! # Async operations
//!
//! An [`AsyncOperation`]'s methods are `async` and cannot run inside a sled transaction (which is
//! synchronous and may be re-run). Each call goes like this, one call per (transaction, branch) at a
//! time in this process (a second call for the same branch waits for the first):
//!
//! 1. **Check.** The barrier record is read and [`decide`] tells what the call would do. A duplicate,
//!    a refusal (late try, suspended try, confirm after cancel, ...) or an empty cancel is answered
//!    without running any business method.
//! 2. **Run.** The business method runs (on its own task, so a panic is a 500) with a fresh
//!    [`TccContext`]: reads see committed state with versions, writes are staged.
//! 3. **Commit.** One sled transaction through the barrier ([`SledBarrier::try_op`], `confirm`,
//!    `cancel` or `expire`) checks the record again, as the authority, and only if the call still
//!    runs there checks that every key the method read or wrote still has the version it saw and
//!    applies the staged writes with the new record. If the record changed since step 1 (a cancel
//!    overtook a try), the staged writes are dropped and the new state answers. If a key changed,
//!    nothing is written and the call goes back to step 1, at most [`MAX_RUNS`] times, then answers
//!    503 `contended` (retryable: the coordinator retries confirm and cancel; the typed client
//!    retries a try).
//! 4. **Answer**, after the group-commit flush.
//!
//! A business error answers as its [`TccError::disposition`] says: a refusal 409 `refused`, a
//! transient error 503 `unavailable`, both with the error as JSON in the body's `detail`, nothing
//! stored. A [`TccContext`] fault (storage, undecodable value, unknown tree) answers 503 or 500 and
//! nothing is committed, whatever the method returned. The expiry sweep runs the async cancel the
//! same way.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use sled::transaction::{ConflictableTransactionError, ConflictableTransactionResult, TransactionalTree};
#[cfg(doc)]
use tcc_core::barrier::decide;
use tcc_core::barrier::{
    ActionOutcome, BarrierError, BusinessTx, CancelOutcome, CompensateOutcome, ConfirmOutcome, Durability,
    ExpiryTask, Refusal, SledBarrier, TryOutcome,
};
use tcc_core::store::group_commit::GroupCommit;
use tcc_core::{BranchId, Gid, Timestamp};
use tracing::{debug, error};

use crate::error::ApiError;
use crate::ndjson;
use crate::protocol::{
    ACTION_PATH, BACK_CHECK_PATH, BATCH_PATH, BRANCH_HEADER, CANCEL_PATH, COMPENSATE_PATH, CONFIRM_PATH,
    DEADLINE_HEADER, GID_HEADER, GONE, MAX_BODY, REFUSED, TRIES_PATH, TRY_PATH,
};
#[cfg(doc)]
use crate::staged::TccContext;
#[cfg(doc)]
use crate::staged::TccError;
use crate::staged::{AsyncAction, AsyncOperation, AsyncStep, StoreError, Trees, Versioned};

mod async_calls;
mod messages;
mod phase_two_batches;
mod try_batches;

pub use messages::{LOCAL_BRANCH, LocalError};

pub use async_calls::MAX_RUNS;

#[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
pub mod sql;

/// Response header of a 200 saying what the call did: `fresh` or `duplicate` (try), `confirmed` or
/// `duplicate` (confirm), `cancelled`, `empty`, `duplicate` or `expired` (cancel).
pub const OUTCOME_HEADER: &str = "tcc-outcome";

/// Longest operation name accepted, in bytes.
pub const MAX_OPERATION_NAME: usize = 64;

/// First byte of a request stored by the runtime (see [`decode_stored_request`]).
const STORED_REQUEST_TAG: u8 = 1;

/// One TCC operation of a participant: its business try, confirm and cancel over the participant's
/// sled trees.
///
/// Each method runs inside the barrier's sled transaction, which also writes the barrier record, so
/// the business writes and the record commit together or not at all. Write only through the
/// [`Call`]'s transactional trees; sled may run a method more than once (on a transaction conflict),
/// and runs transactions one at a time, so keep the methods short and free of other I/O. The runtime
/// calls them on Tokio's blocking pool.
///
/// Returning `Err(ConflictableTransactionError::Abort(e))` (see [`sled::transaction::abort`]) rolls
/// back the business writes and answers 409 with code `refused` and `e` as the message; nothing is
/// recorded, so a later cancel is an empty cancel. Confirm and cancel should never abort: the
/// coordinator treats a refused confirm or cancel as permanent and flags the transaction.
pub trait Operation: Send + Sync + 'static {
    /// The business refusal, reported to the caller through its `Display`.
    type Error: fmt::Display;

    /// Checks a try's request before anything runs or is stored; an error answers 400 (`malformed`).
    /// The default accepts every request. Confirm and cancel are not checked: they get the try's
    /// stored request.
    fn check(&self, request: &[u8]) -> Result<(), String> {
        let _ = request;
        Ok(())
    }

    /// Phase one: checks and reserves, returning the result bytes (the try's answer body). Runs at
    /// most once per (transaction, branch); a duplicate try gets the stored result.
    fn try_(&self, call: &Call<'_>) -> ConflictableTransactionResult<Vec<u8>, Self::Error>;

    /// Phase two: turns the reservation into the real effect. Runs at most once, and only after a try.
    fn confirm(&self, call: &Call<'_>) -> ConflictableTransactionResult<(), Self::Error>;

    /// Phase two: releases the reservation. Runs at most once, only after a try; also run by the
    /// participant's own expiry at deadline + grace.
    fn cancel(&self, call: &Call<'_>) -> ConflictableTransactionResult<(), Self::Error>;
}

/// What an [`Operation`]'s method sees: the call's identity, the try's request, and the
/// participant's business trees inside the barrier's transaction.
pub struct Call<'a> {
    tx: &'a BusinessTx<'a>,
    operation: &'a str,
    request: &'a [u8],
}

impl fmt::Debug for Call<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("gid", self.tx.gid())
            .field("branch", self.tx.branch())
            .field("operation", &self.operation)
            .field("request_len", &self.request.len())
            .finish()
    }
}

impl<'a> Call<'a> {
    /// The global transaction id.
    pub fn gid(&self) -> &'a Gid {
        self.tx.gid()
    }

    /// The branch id.
    pub fn branch(&self) -> &'a BranchId {
        self.tx.branch()
    }

    /// The name of the operation being called.
    pub fn operation(&self) -> &'a str {
        self.operation
    }

    /// The try's request body (for confirm, cancel and expiry: the one stored by the try).
    pub fn request(&self) -> &'a [u8] {
        self.request
    }

    /// The business trees, in the order given to [`SledBarrier::open`].
    pub fn trees(&self) -> &'a [TransactionalTree] {
        self.tx.trees()
    }

    /// Business tree `i`, in the order given to [`SledBarrier::open`].
    ///
    /// # Panics
    /// If `i` is not below the number of business trees (a bug in the participant, not bad input).
    pub fn tree(&self, i: usize) -> &'a TransactionalTree {
        self.tx.tree(i)
    }

    /// The barrier's view of the call, whose [`request`](BusinessTx::request) is the stored form
    /// (operation name included, see [`decode_stored_request`]).
    pub fn business_tx(&self) -> &'a BusinessTx<'a> {
        self.tx
    }

    /// The call for `tx`, whose stored request must name `expected` (when given).
    fn open(tx: &'a BusinessTx<'a>, expected: Option<&str>) -> Result<Call<'a>, CallAbort> {
        let (operation, request) = decode_stored_request(tx.request()).ok_or_else(|| {
            CallAbort::Mismatch(
                "the branch's barrier record was not written by the participant runtime".into(),
            )
        })?;
        if let Some(expected) = expected.filter(|e| *e != operation) {
            return Err(CallAbort::Mismatch(format!(
                "the branch was tried through operation {operation:?}, not {expected:?}"
            )));
        }
        Ok(Call { tx, operation, request })
    }

    /// The call for `tx` through operation `name`, or the transaction's abort.
    fn open_as(
        tx: &'a BusinessTx<'a>,
        name: &str,
    ) -> Result<Call<'a>, ConflictableTransactionError<CallAbort>> {
        Call::open(tx, Some(name)).map_err(ConflictableTransactionError::Abort)
    }
}

/// Splits a request stored in a [`BarrierRecord`](tcc_core::barrier::BarrierRecord) by the runtime
/// into the operation's name and the try's request body; `None` if it was not stored by the runtime.
///
/// The stored form is one tag byte (`1`), one length byte, the operation name, then the body.
///
/// ```
/// use tcc_http::participant::decode_stored_request;
/// assert_eq!(decode_stored_request(b"\x01\x04seat12A"), Some(("seat", &b"12A"[..])));
/// assert_eq!(decode_stored_request(b"12A"), None);
/// ```
pub fn decode_stored_request(stored: &[u8]) -> Option<(&str, &[u8])> {
    let (&tag, rest) = stored.split_first()?;
    let (&len, rest) = rest.split_first()?;
    if tag != STORED_REQUEST_TAG || rest.len() < usize::from(len) {
        return None;
    }
    let (name, body) = rest.split_at(usize::from(len));
    let name = std::str::from_utf8(name).ok().filter(|n| valid_name(n))?;
    Some((name, body))
}

fn encode_stored_request(operation: &str, body: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(2 + operation.len() + body.len());
    stored.push(STORED_REQUEST_TAG);
    // Names are validated to at most MAX_OPERATION_NAME (< 256) bytes.
    stored.push(u8::try_from(operation.len()).unwrap_or(u8::MAX));
    stored.extend_from_slice(operation.as_bytes());
    stored.extend_from_slice(body);
    stored
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_OPERATION_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why a business transaction aborted.
#[derive(Debug)]
enum CallAbort {
    /// The operation's method aborted with this message.
    Business(String),
    /// The branch's record belongs to another operation (or was not written by the runtime).
    Mismatch(String),
}

impl fmt::Display for CallAbort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallAbort::Business(m) | CallAbort::Mismatch(m) => f.write_str(m),
        }
    }
}

/// The business error of an operation as the runtime carries it.
fn lift<T, E: fmt::Display>(
    r: ConflictableTransactionResult<T, E>,
) -> ConflictableTransactionResult<T, CallAbort> {
    r.map_err(|e| match e {
        ConflictableTransactionError::Abort(e) => {
            ConflictableTransactionError::Abort(CallAbort::Business(e.to_string()))
        }
        ConflictableTransactionError::Conflict => ConflictableTransactionError::Conflict,
        ConflictableTransactionError::Storage(e) => ConflictableTransactionError::Storage(e),
    })
}

/// [`Operation`] with its error type erased, so operations of different types share one map.
trait ErasedOperation: Send + Sync + 'static {
    fn check(&self, request: &[u8]) -> Result<(), String>;
    fn try_(&self, call: &Call<'_>) -> ConflictableTransactionResult<Vec<u8>, CallAbort>;
    fn confirm(&self, call: &Call<'_>) -> ConflictableTransactionResult<(), CallAbort>;
    fn cancel(&self, call: &Call<'_>) -> ConflictableTransactionResult<(), CallAbort>;
}

impl<O: Operation> ErasedOperation for O {
    fn check(&self, request: &[u8]) -> Result<(), String> {
        Operation::check(self, request)
    }
    fn try_(&self, call: &Call<'_>) -> ConflictableTransactionResult<Vec<u8>, CallAbort> {
        lift(Operation::try_(self, call))
    }
    fn confirm(&self, call: &Call<'_>) -> ConflictableTransactionResult<(), CallAbort> {
        lift(Operation::confirm(self, call))
    }
    fn cancel(&self, call: &Call<'_>) -> ConflictableTransactionResult<(), CallAbort> {
        lift(Operation::cancel(self, call))
    }
}

/// An [`Operation`] made of three closures ([`Participant::operation_fn`]).
struct FnOperation<T, C, X, E> {
    try_: T,
    confirm: C,
    cancel: X,
    error: PhantomData<fn() -> E>,
}

impl<T, C, X, E> Operation for FnOperation<T, C, X, E>
where
    T: Fn(&Call<'_>) -> ConflictableTransactionResult<Vec<u8>, E> + Send + Sync + 'static,
    C: Fn(&Call<'_>) -> ConflictableTransactionResult<(), E> + Send + Sync + 'static,
    X: Fn(&Call<'_>) -> ConflictableTransactionResult<(), E> + Send + Sync + 'static,
    E: fmt::Display + 'static,
{
    type Error = E;
    fn try_(&self, call: &Call<'_>) -> ConflictableTransactionResult<Vec<u8>, E> {
        (self.try_)(call)
    }
    fn confirm(&self, call: &Call<'_>) -> ConflictableTransactionResult<(), E> {
        (self.confirm)(call)
    }
    fn cancel(&self, call: &Call<'_>) -> ConflictableTransactionResult<(), E> {
        (self.cancel)(call)
    }
}

/// A registered operation: synchronous or async; or a saga step or message action (async), with
/// whether it has a compensation.
#[derive(Clone)]
enum Registered {
    Sync(Arc<dyn ErasedOperation>),
    Async(async_calls::AsyncKind),
    Step { kind: async_calls::AsyncKind, compensable: bool },
}

type Operations = HashMap<String, Registered>;

/// Something the participant runtime could not do outside of a call: start, sweep, flush.
#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    /// The group-commit flusher thread could not be started.
    #[error("cannot start the participant's flusher: {0}")]
    Start(#[source] tcc_core::Error),
    /// The barrier failed (for a sweep, a storage failure; damaged records and failing business
    /// cancels are logged and skipped instead).
    #[error(transparent)]
    Barrier(#[from] BarrierError<String>),
    /// Changes were committed but could not be flushed to disk.
    #[error("barrier changes not flushed to disk: {0}")]
    NotFlushed(#[source] tcc_core::Error),
    /// A business cancel panicked during a sweep.
    #[error("the expiry sweep panicked: {0}")]
    Panicked(String),
    /// The SQL barrier failed (for a sweep, the database; damaged rows and failing business cancels
    /// are logged and skipped instead).
    #[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
    #[error(transparent)]
    Sql(#[from] tcc_core::barrier::sql::SqlBarrierError),
}

/// A participant: named TCC operations served over HTTP through one barrier, on the store `B`:
/// [`Sled`] (the default: a [`SledBarrier`] and business trees in one sled database) or
/// [`Sql<DB>`](sql::Sql) (the barrier row and the business statements in one transaction of the
/// service's PostgreSQL or MySQL database, see [`sql`]).
///
/// Build it with [`Participant::builder`] (or [`new`](Participant::new) over a hand-made barrier),
/// add operations ([`operation`](Participant::operation), [`operation_fn`](Participant::operation_fn),
/// [`async_operation`](Participant::async_operation), or a `#[tcc]` trait's `into_participant`), then
/// serve [`router`](Participant::router). The handle is cheap to clone; clones share the barrier, the
/// flusher and the expiry loop.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use sled::transaction::abort;
/// use tcc_core::barrier::SledBarrier;
/// use tcc_core::{Clock, SystemClock};
/// use tcc_http::participant::Participant;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let db = tcc_core::DurableDb::temporary()?;
/// let seats = db.open_tree("seats")?;
/// let clock: Arc<dyn Clock> = Arc::new(SystemClock);
/// let grace = Duration::from_secs(60);
/// let barrier = SledBarrier::open(&db, vec![seats.clone()], clock.clone(), grace)?;
///
/// // The request is a seat number: try holds it, confirm sells it, cancel frees it.
/// let participant = Participant::new(barrier)?.operation_fn(
///     "hold_seat",
///     |call| {
///         if call.tree(0).get(call.request())?.is_some() {
///             return abort(format!("seat {} is taken", String::from_utf8_lossy(call.request())));
///         }
///         call.tree(0).insert(call.request(), "held")?;
///         Ok(b"held".to_vec())
///     },
///     |call| {
///         call.tree(0).insert(call.request(), "sold")?;
///         Ok(())
///     },
///     |call| {
///         call.tree(0).remove(call.request())?;
///         Ok(())
///     },
/// );
/// // Releases what nobody confirmed or cancelled by deadline + grace; stops when dropped.
/// let _expiry = participant.spawn_expiry(Duration::from_secs(5));
///
/// // The target of this operation is http://{addr}/tcc/flights/hold_seat.
/// let app = axum::Router::new().nest("/tcc/flights", participant.router());
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let addr = listener.local_addr()?;
/// tokio::spawn(async move { axum::serve(listener, app).await });
///
/// // What the initiator and the coordinator send (tcc-http's client and transport do this).
/// let http = reqwest::Client::builder().no_proxy().build()?;
/// let target = format!("http://{addr}/tcc/flights/hold_seat");
/// let deadline = clock.now() + Duration::from_secs(30);
/// let call = |phase: &str| {
///     http.post(format!("{target}/{phase}"))
///         .header("tcc-gid", "tx-1")
///         .header("tcc-branch", "flight")
///         .header("tcc-deadline", deadline.0.to_string())
/// };
/// let held = call("try").body("12A").send().await?;
/// assert_eq!(held.status(), 200);
/// assert_eq!(held.bytes().await?, "held");
/// assert_eq!(call("confirm").body("12A").send().await?.status(), 200);
/// assert_eq!(seats.get("12A")?.as_deref(), Some(&b"sold"[..]));
/// // A repeated confirm runs nothing and succeeds.
/// assert_eq!(call("confirm").send().await?.status(), 200);
/// # Ok(())
/// # }
/// ```
pub struct Participant<B = Sled> {
    rt: Runtime,
    backend: PhantomData<fn() -> B>,
}

/// Where a [`Participant`]'s barrier and business state live: sled (this type, the default), or a
/// SQL database ([`Sql`](crate::participant::sql::Sql), features `sqlx-postgres` and `sqlx-mysql`).
/// Only a marker: an operation written for one store cannot be registered on a participant of
/// another (a compile error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sled {}

impl<B> Clone for Participant<B> {
    fn clone(&self) -> Self {
        Participant { rt: self.rt.clone(), backend: PhantomData }
    }
}

/// The runtime behind every [`Participant`], whatever its store: the operations, the barrier and
/// what serving a call needs.
#[derive(Clone)]
pub(crate) struct Runtime {
    store: Store,
    ops: Arc<Operations>,
    locks: Arc<async_calls::BranchLocks>,
    /// Every handle given out holds this; the expiry loop started by [`Participant::router`] keeps
    /// only a weak reference and stops once the last handle is gone.
    alive: Option<Arc<AutoExpiry>>,
}

/// The expiry loop a participant built by [`ParticipantBuilder`] runs on its own.
#[derive(Debug)]
struct AutoExpiry {
    every: Option<Duration>,
    started: std::sync::OnceLock<()>,
}

/// The store a participant's barrier and business state live in.
#[derive(Clone)]
pub(crate) enum Store {
    Sled(SledParts),
    #[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
    Sql(Arc<dyn sql::ErasedBarrier>),
}

/// A sled participant's barrier, business trees and group commit.
#[derive(Clone)]
pub(crate) struct SledParts {
    barrier: SledBarrier,
    group_commit: Option<GroupCommit>,
    trees: Arc<Trees>,
}

impl<B> fmt::Debug for Participant<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.operations().collect();
        names.sort_unstable();
        let mut d = f.debug_struct("Participant");
        d.field("operations", &names);
        match &self.rt.store {
            Store::Sled(s) => d.field("barrier", &s.barrier).field("group_commit", &s.group_commit.is_some()),
            #[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
            Store::Sql(b) => d.field("barrier", &b.describe()),
        };
        d.finish()
    }
}

/// How a participant is set up: clock, grace period and expiry, then its store
/// ([`sled`](ParticipantBuilder::sled), or [`sql`](ParticipantBuilder::sql) with a sqlx pool).
///
/// The defaults suit a service: the system clock, a grace period of [`DEFAULT_GRACE`], and the
/// participant's own expiry sweep every [`DEFAULT_EXPIRY_EVERY`], started by the first
/// [`router`](Participant::router) and stopped when the last handle of the participant is dropped:
/// nothing to keep alive.
///
/// ```
/// use std::time::Duration;
/// use tcc_http::{DurableDb, Participant};
///
/// const STOCK: &str = "stock";
/// let db = DurableDb::temporary()?;
/// let participant = Participant::builder().grace(Duration::from_secs(30)).sled(&db, &[STOCK])?;
/// participant.seed(STOCK, "lamp", &3u32)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct ParticipantBuilder {
    clock: Arc<dyn tcc_core::Clock>,
    grace: Duration,
    expiry: Option<Duration>,
}

impl fmt::Debug for ParticipantBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParticipantBuilder")
            .field("clock", &self.clock)
            .field("grace", &self.grace)
            .field("expiry", &self.expiry)
            .finish()
    }
}

/// The grace period of [`ParticipantBuilder`] unless set: how long after a try's deadline the
/// participant waits for the coordinator's confirm or cancel before releasing the hold itself. It
/// should cover the coordinator's phase-two retries.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);

/// How often a participant built by [`ParticipantBuilder`] sweeps for expired holds, unless set.
pub const DEFAULT_EXPIRY_EVERY: Duration = Duration::from_secs(1);

impl Default for ParticipantBuilder {
    fn default() -> Self {
        ParticipantBuilder {
            clock: Arc::new(tcc_core::SystemClock),
            grace: DEFAULT_GRACE,
            expiry: Some(DEFAULT_EXPIRY_EVERY),
        }
    }
}

impl ParticipantBuilder {
    /// The clock deadlines are decided with (a [`ManualClock`](tcc_core::ManualClock) in tests).
    pub fn clock(mut self, clock: Arc<dyn tcc_core::Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The grace period after a try's deadline (default [`DEFAULT_GRACE`]).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// How often the participant's own expiry sweep runs (default [`DEFAULT_EXPIRY_EVERY`]).
    pub fn expiry_every(mut self, every: Duration) -> Self {
        self.expiry = Some(every);
        self
    }

    /// No expiry loop of its own: the caller runs [`Participant::expire_due`] or
    /// [`Participant::spawn_expiry`] (tests that step time by hand, say).
    pub fn without_expiry_loop(mut self) -> Self {
        self.expiry = None;
        self
    }

    /// A participant whose barrier and business trees live in `db`, with group commit (see
    /// [`Participant::new`]). `trees` are the business trees' names, each typed once (as
    /// constants, say) and used with [`TccContext`] and [`Participant::seed`].
    pub fn sled(self, db: &tcc_core::DurableDb, trees: &[&str]) -> Result<Participant, ParticipantError> {
        let trees = trees
            .iter()
            .map(|t| db.open_tree(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ParticipantError::Barrier(BarrierError::Storage(e)))?;
        let barrier = SledBarrier::open(db, trees, self.clock, self.grace)
            .map_err(|e| ParticipantError::Barrier(stringify(e)))?;
        let mut p = Participant::new(barrier)?;
        p.rt.alive = Some(Arc::new(AutoExpiry { every: self.expiry, started: Default::default() }));
        Ok(p)
    }
}

impl Participant {
    /// How to set up a participant, with defaults (see [`ParticipantBuilder`]).
    pub fn builder() -> ParticipantBuilder {
        ParticipantBuilder::default()
    }

    /// A participant with no operations yet, over `barrier`, with group commit: the barrier is
    /// switched to [`Durability::Deferred`] and a flusher thread makes each call's change durable
    /// before it is answered, one flush shared by every call waiting at that moment. It runs no
    /// expiry loop of its own ([`spawn_expiry`](Participant::spawn_expiry)); [`Participant::builder`]
    /// sets one up with the rest.
    ///
    /// The barrier belongs to the participant from now on: its records must all be written by the
    /// runtime, which the expiry sweep relies on to find each reservation's operation.
    pub fn new(barrier: SledBarrier) -> Result<Participant, ParticipantError> {
        let barrier = barrier.with_durability(Durability::Deferred);
        let flushed = barrier.clone();
        let group_commit =
            GroupCommit::start("tcc-participant", move || flushed.flush().map_err(|e| e.to_string()))
                .map_err(ParticipantError::Start)?;
        Ok(Participant::assemble(barrier, Some(group_commit)))
    }

    /// A participant over `barrier` keeping the barrier's own [`Durability`]: with the default
    /// [`Durability::FlushEachOp`], one fsync per call on the blocking pool; with
    /// [`Durability::Hook`], a flusher shared with other writers to the same database. Do not use it
    /// with [`Durability::Deferred`]: calls would be answered before they are on disk.
    pub fn with_barrier_durability(barrier: SledBarrier) -> Participant {
        Participant::assemble(barrier, None)
    }

    fn assemble(barrier: SledBarrier, group_commit: Option<GroupCommit>) -> Participant {
        let trees = Arc::new(Trees::new(barrier.db(), barrier.business_trees()));
        Participant::from_store(Store::Sled(SledParts { barrier, group_commit, trees }))
    }

    /// Adds `op` under `name`, served at `POST /{name}/try`, `/{name}/confirm` and `/{name}/cancel`.
    ///
    /// Register every operation before calling [`router`](Participant::router) and
    /// [`spawn_expiry`](Participant::spawn_expiry), which take the operations registered so far.
    ///
    /// # Panics
    /// If `name` is not 1 to [`MAX_OPERATION_NAME`] bytes of ASCII letters, digits, `_` and `-`, or
    /// is already registered (both programming errors, as with axum's routes).
    pub fn operation(self, name: &str, op: impl Operation) -> Participant {
        self.register(name, Registered::Sync(Arc::new(op)))
    }

    /// Adds the async operation `op` under `name`, served at `POST /{name}/try`, `/{name}/confirm`
    /// and `/{name}/cancel` like [`operation`](Participant::operation)'s (see
    /// [Async operations](self#async-operations)). `#[tcc]` traits register theirs with it.
    ///
    /// # Panics
    /// As [`operation`](Participant::operation).
    pub fn async_operation(self, name: &str, op: impl AsyncOperation) -> Participant {
        self.register(
            name,
            Registered::Async(async_calls::AsyncKind::Staged(Arc::new(async_calls::AsyncOp(op)))),
        )
    }

    /// Adds the saga step `step` under `name`: its action served at `POST /{name}/action`, its
    /// compensation at `POST /{name}/compensate` (see [Sagas and messages](self#sagas-and-messages)).
    /// `#[tcc]` traits register their `#[tcc(compensate = ...)]` methods with it.
    ///
    /// # Panics
    /// As [`operation`](Participant::operation).
    pub fn async_step(self, name: &str, step: impl AsyncStep) -> Participant {
        let kind = async_calls::AsyncKind::Staged(Arc::new(async_calls::AsyncOp(async_calls::StepOp(step))));
        self.register(name, Registered::Step { kind, compensable: true })
    }

    /// Adds the message action `action` under `name`, served at `POST /{name}/action` (see
    /// [Sagas and messages](self#sagas-and-messages)). `#[tcc]` traits register their
    /// `#[tcc(action)]` methods with it.
    ///
    /// # Panics
    /// As [`operation`](Participant::operation).
    pub fn async_action(self, name: &str, action: impl AsyncAction) -> Participant {
        let kind =
            async_calls::AsyncKind::Staged(Arc::new(async_calls::AsyncOp(async_calls::ActionOp(action))));
        self.register(name, Registered::Step { kind, compensable: false })
    }

    fn sled_parts(&self) -> &SledParts {
        match &self.rt.store {
            Store::Sled(s) => s,
            // `Participant<Sled>` is only ever built over sled.
            #[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
            Store::Sql(_) => unreachable!("a Participant<Sled> over a SQL store"),
        }
    }

    /// Writes `value` at `key` in business tree `tree` now, outside any call, in the versioned form a
    /// [`TccContext`] reads (to seed stock before serving, say); returns its new version.
    pub fn seed<T: serde::Serialize>(
        &self,
        tree: &str,
        key: impl AsRef<[u8]>,
        value: &T,
    ) -> Result<crate::staged::Version, StoreError> {
        self.sled_parts().trees.seed(tree, key.as_ref(), value)
    }

    /// Reads the value at `key` in business tree `tree` as a [`TccContext`] wrote it, with its
    /// version (committed state; for inspection and tests).
    pub fn read<T: serde::de::DeserializeOwned>(
        &self,
        tree: &str,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        self.sled_parts().trees.read(tree, key.as_ref())
    }

    /// Adds an operation made of three closures: try (returning the result bytes), confirm and
    /// cancel. See [`operation`](Participant::operation) and [`Operation`].
    ///
    /// # Panics
    /// As [`operation`](Participant::operation).
    pub fn operation_fn<T, C, X, E>(self, name: &str, try_: T, confirm: C, cancel: X) -> Participant
    where
        T: Fn(&Call<'_>) -> ConflictableTransactionResult<Vec<u8>, E> + Send + Sync + 'static,
        C: Fn(&Call<'_>) -> ConflictableTransactionResult<(), E> + Send + Sync + 'static,
        X: Fn(&Call<'_>) -> ConflictableTransactionResult<(), E> + Send + Sync + 'static,
        E: fmt::Display + 'static,
    {
        self.operation(name, FnOperation { try_, confirm, cancel, error: PhantomData })
    }

    /// The barrier, for inspection ([`SledBarrier::get`], [`SledBarrier::held`]).
    pub fn barrier(&self) -> &SledBarrier {
        &self.sled_parts().barrier
    }
}

impl<B> Participant<B> {
    fn from_store(store: Store) -> Participant<B> {
        let rt = Runtime { store, ops: Arc::default(), locks: Arc::default(), alive: None };
        Participant { rt, backend: PhantomData }
    }

    fn register(mut self, name: &str, op: Registered) -> Participant<B> {
        assert!(
            valid_name(name),
            "operation name {name:?} must be 1 to {MAX_OPERATION_NAME} bytes of ASCII letters, digits, '_' and '-'"
        );
        let ops = Arc::make_mut(&mut self.rt.ops);
        assert!(!ops.contains_key(name), "operation {name:?} is registered twice");
        ops.insert(name.to_owned(), op);
        self
    }

    /// The names of the registered operations, in no particular order.
    pub fn operations(&self) -> impl Iterator<Item = &str> {
        self.rt.ops.keys().map(String::as_str)
    }

    /// The routes `POST /{operation}/try|confirm|cancel` of every registered operation (and
    /// `/{step}/action|compensate` of every saga step and message action), and `GET /back-check`
    /// for the messages whose local transactions this participant runs, with the [`MAX_BODY`] body
    /// limit. Nest it under a prefix (`Router::nest("/tcc/flights", ...)`): it answers every
    /// two-segment path, with 404 for unknown operations.
    ///
    /// A participant built by [`Participant::builder`] starts its own expiry loop here (once, inside
    /// a Tokio runtime); it stops when the last handle of the participant and its routers is gone.
    pub fn router(&self) -> Router {
        self.rt.start_auto_expiry();
        Router::new()
            .route("/{operation}/{phase}", post(handle).fallback(method_not_allowed))
            .route(
                &format!("/{BACK_CHECK_PATH}"),
                axum::routing::get(messages::back_check).fallback(messages::get_only),
            )
            .layer(DefaultBodyLimit::max(MAX_BODY))
            // A Content-Length past the limit is refused before any of the body is waited for.
            .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY))
            .layer(axum::middleware::map_response(crate::serve::json_errors))
            .with_state(Arc::new(self.rt.clone()))
    }

    /// Releases now every reservation held past deadline + grace, running the cancel of the
    /// operation that made it; returns how many were released, once they are on disk. A business
    /// cancel that fails, an operation that is not registered any more, or a damaged record is
    /// logged and left for the next sweep. On a SQL store, several replicas may sweep at once: each
    /// reservation is released by one of them (its row is locked `FOR UPDATE SKIP LOCKED`).
    pub async fn expire_due(&self) -> Result<usize, ParticipantError> {
        self.rt.expire_due().await
    }

    /// Spawns the expiry loop: [`expire_due`](Participant::expire_due) now and then every `every`
    /// on the barrier's clock, so a reservation is released at most `every` after deadline + grace.
    /// Failures are logged and the loop goes on; it stops when the returned task is dropped.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn spawn_expiry(&self, every: Duration) -> ExpiryTask {
        let this = self.rt.clone();
        ExpiryTask::from_handle(tokio::spawn(async move {
            loop {
                if let Err(e) = this.expire_due().await {
                    error!(error = %e, "participant expiry sweep failed");
                }
                this.clock().sleep(every).await;
            }
        }))
    }
}

impl Runtime {
    fn clock(&self) -> Arc<dyn tcc_core::Clock> {
        match &self.store {
            Store::Sled(s) => Arc::clone(s.barrier.clock()),
            #[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
            Store::Sql(b) => b.clock(),
        }
    }

    /// The sled parts, for the calls of sled operations (only ever registered on a sled store).
    fn sled(&self) -> Result<&SledParts, ApiError> {
        match &self.store {
            Store::Sled(s) => Ok(s),
            #[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
            Store::Sql(_) => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "a sled operation on a participant whose store is SQL",
            )),
        }
    }

    /// Starts the expiry loop of a participant built by [`ParticipantBuilder`], once.
    fn start_auto_expiry(&self) {
        let Some(alive) = &self.alive else { return };
        let Some(every) = alive.every else { return };
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        if alive.started.set(()).is_err() {
            return;
        }
        let weak = Arc::downgrade(alive);
        let sweeper = Runtime { alive: None, ..self.clone() };
        handle.spawn(async move {
            let clock = sweeper.clock();
            // Runs while some handle of the participant (or a router's state) is alive.
            while weak.strong_count() > 0 {
                if let Err(e) = sweeper.expire_due().await {
                    error!(error = %e, "participant expiry sweep failed");
                }
                clock.sleep(every).await;
            }
        });
    }

    async fn expire_due(&self) -> Result<usize, ParticipantError> {
        let sled = match &self.store {
            Store::Sled(s) => s,
            #[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
            Store::Sql(b) => return sql::expire_due(self, b).await,
        };
        let mut after = None;
        let mut released = 0;
        loop {
            let barrier = sled.barrier.clone();
            let cursor = after.clone();
            let batch = tokio::task::spawn_blocking(move || barrier.due(cursor.as_ref(), SWEEP_BATCH))
                .await
                .map_err(|e| ParticipantError::Panicked(e.to_string()))?
                .map_err(|e| ParticipantError::Barrier(e.widen()))?;
            for due in &batch {
                if async_calls::expire_one(self, sled, due).await? {
                    released += 1;
                }
            }
            match batch.last() {
                Some(last) if batch.len() == SWEEP_BATCH => after = Some(last.clone()),
                _ => break,
            }
        }
        if released > 0 {
            self.durable().await.map_err(ParticipantError::NotFlushed)?;
        }
        Ok(released)
    }

    /// Waits until every change committed so far is on disk (with group commit; otherwise the
    /// barrier flushed already; a SQL commit is durable when it returns).
    async fn durable(&self) -> Result<(), tcc_core::Error> {
        match &self.store {
            Store::Sled(SledParts { group_commit: Some(gc), .. }) => gc.durable().await,
            _ => Ok(()),
        }
    }
}

/// How many due reservations the expiry sweep lists at once.
const SWEEP_BATCH: usize = 256;

/// A barrier error with its business error as text.
fn stringify<E: fmt::Display>(e: BarrierError<E>) -> BarrierError<String> {
    match e {
        BarrierError::Refused(r) => BarrierError::Refused(r),
        BarrierError::Business(e) => BarrierError::Business(e.to_string()),
        BarrierError::Corrupt { gid, branch, source } => BarrierError::Corrupt { gid, branch, source },
        BarrierError::Storage(e) => BarrierError::Storage(e),
        BarrierError::NotFlushed(e) => BarrierError::NotFlushed(e),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Try,
    Confirm,
    Cancel,
    Action,
    Compensate,
}

/// The identity headers of a call.
#[derive(Clone)]
pub(crate) struct Ids {
    gid: Gid,
    branch: BranchId,
    deadline: Option<Timestamp>,
}

/// The one value of header `name`, if present.
fn header<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(ApiError::malformed(format!("header {name} is given more than once")));
    }
    value.to_str().map(Some).map_err(|_| ApiError::malformed(format!("header {name} is not visible ASCII")))
}

fn required<'h>(headers: &'h HeaderMap, name: &str) -> Result<&'h str, ApiError> {
    header(headers, name)?.ok_or_else(|| ApiError::malformed(format!("header {name} is missing")))
}

impl Ids {
    /// Reads the headers; the deadline is required for a try and checked when present otherwise.
    fn parse(headers: &HeaderMap, phase: Phase) -> Result<Ids, ApiError> {
        let invalid = |name: &str, e: tcc_core::Error| ApiError::malformed(format!("header {name}: {e}"));
        let gid = required(headers, GID_HEADER)?.parse().map_err(|e| invalid(GID_HEADER, e))?;
        let branch = required(headers, BRANCH_HEADER)?.parse().map_err(|e| invalid(BRANCH_HEADER, e))?;
        let deadline = match (header(headers, DEADLINE_HEADER)?, phase) {
            (None, Phase::Try) => {
                return Err(ApiError::malformed(format!("header {DEADLINE_HEADER} is missing")));
            }
            (None, _) => None,
            (Some(text), _) => Some(parse_deadline(text)?),
        };
        Ok(Ids { gid, branch, deadline })
    }
}

fn parse_deadline(text: &str) -> Result<Timestamp, ApiError> {
    let bad =
        || ApiError::malformed(format!("header {DEADLINE_HEADER} must be milliseconds since the unix epoch"));
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    text.parse().map(Timestamp).map_err(|_| bad())
}

/// What a call asks of the barrier.
enum Job {
    Try { deadline: Timestamp, stored: Vec<u8> },
    Confirm,
    Cancel,
}

/// What a call did, to answer 200 with.
pub(crate) enum Done {
    Try(TryOutcome),
    Confirm(ConfirmOutcome),
    Cancel(CancelOutcome),
    Action(ActionOutcome),
    Compensate(CompensateOutcome),
}

impl Done {
    fn outcome(&self) -> &'static str {
        match self {
            Done::Try(TryOutcome::Fresh(_)) => "fresh",
            Done::Try(TryOutcome::Duplicate(_))
            | Done::Confirm(ConfirmOutcome::Duplicate)
            | Done::Cancel(CancelOutcome::Duplicate)
            | Done::Action(ActionOutcome::Duplicate)
            | Done::Compensate(CompensateOutcome::Duplicate) => "duplicate",
            Done::Action(ActionOutcome::Ran) => "done",
            Done::Compensate(CompensateOutcome::Compensated) => "compensated",
            Done::Compensate(CompensateOutcome::Empty) => "empty",
            Done::Confirm(ConfirmOutcome::Confirmed) => "confirmed",
            Done::Cancel(CancelOutcome::Cancelled) => "cancelled",
            Done::Cancel(CancelOutcome::Empty) => "empty",
            Done::Cancel(CancelOutcome::AlreadyExpired) => "expired",
        }
    }

    /// What the answer's body carries: a try's result, nothing for confirm and cancel.
    fn into_result(self) -> Vec<u8> {
        match self {
            Done::Try(TryOutcome::Fresh(r) | TryOutcome::Duplicate(r)) => r,
            Done::Confirm(_) | Done::Cancel(_) | Done::Action(_) | Done::Compensate(_) => Vec::new(),
        }
    }

    fn into_response(self) -> Response {
        let outcome = self.outcome();
        let body = self.into_result();
        let mut res =
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/octet-stream")], body).into_response();
        res.headers_mut().insert(OUTCOME_HEADER, HeaderValue::from_static(outcome));
        res
    }
}

/// Whether answering `r` needs the flush first: everything that read or wrote barrier state.
fn needs_flush(r: &Result<Done, BarrierError<CallAbort>>) -> bool {
    matches!(r, Ok(_) | Err(BarrierError::Refused(_) | BarrierError::Business(_)))
}

/// The answer to a call the barrier refused.
#[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
fn barrier_error_of_refusal(r: Refusal) -> ApiError {
    barrier_error(BarrierError::Refused(r))
}

fn barrier_error(e: BarrierError<CallAbort>) -> ApiError {
    match e {
        BarrierError::Refused(r @ Refusal::Expired) => ApiError::new(GONE, r.code(), r.to_string()),
        BarrierError::Refused(r) => ApiError::new(REFUSED, r.code(), r.to_string()),
        BarrierError::Business(CallAbort::Business(m)) => ApiError::new(REFUSED, "refused", m),
        BarrierError::Business(CallAbort::Mismatch(m)) => ApiError::new(REFUSED, "operation_mismatch", m),
        e @ BarrierError::Corrupt { .. } => {
            error!(error = %e, "participant call on a damaged barrier record");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.code(), e.to_string())
        }
        BarrierError::Storage(e) => {
            error!(error = %e, "participant barrier storage failed");
            let status = match e {
                sled::Error::Io(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            ApiError::new(status, "storage", format!("barrier storage: {e}"))
        }
        e @ BarrierError::NotFlushed(_) => not_flushed(e.to_string()),
    }
}

fn not_flushed(message: String) -> ApiError {
    error!(error = %message, "participant change not flushed");
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_flushed", message)
}

/// A duplicate try must come through the operation that ran the first one.
fn same_operation(barrier: &SledBarrier, ids: &Ids, name: &str) -> Result<(), BarrierError<CallAbort>> {
    let stored = barrier.get(&ids.gid, &ids.branch).map_err(BarrierError::widen)?;
    match stored.as_ref().and_then(|rec| decode_stored_request(&rec.request)) {
        Some((op, _)) if op == name => Ok(()),
        Some((op, _)) => Err(BarrierError::Business(CallAbort::Mismatch(format!(
            "the branch was tried through operation {op:?}, not {name:?}"
        )))),
        None => Err(BarrierError::Business(CallAbort::Mismatch(
            "the branch's barrier record was not written by the participant runtime".into(),
        ))),
    }
}

async fn handle(
    State(participant): State<Arc<Runtime>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match serve(participant, path, headers, body).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    }
}

async fn serve(
    participant: Arc<Runtime>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path((name, phase)) = path.map_err(|e| ApiError::malformed(e.body_text()))?;
    let registered = participant.ops.get(&name).cloned().ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "unknown_operation", format!("no operation {name:?} here"))
    })?;
    let unknown_phase = |expected: &str| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_phase",
            format!("no phase {phase:?}: expected {expected}"),
        )
    };
    let phase = match (&registered, phase.as_str()) {
        (Registered::Step { compensable, .. }, p) => match p {
            ACTION_PATH => Phase::Action,
            COMPENSATE_PATH if *compensable => Phase::Compensate,
            _ if *compensable => return Err(unknown_phase(&format!("{ACTION_PATH} or {COMPENSATE_PATH}"))),
            _ => return Err(unknown_phase(&format!("{ACTION_PATH} (a message action has no compensation)"))),
        },
        (_, TRY_PATH) => Phase::Try,
        (_, CONFIRM_PATH) => Phase::Confirm,
        (_, CANCEL_PATH) => Phase::Cancel,
        (_, BATCH_PATH) => {
            let stream = ndjson::accepted(&headers);
            return phase_two_batches::serve(participant, name, registered, read_body(body)?, stream).await;
        }
        (_, TRIES_PATH) => {
            let stream = ndjson::accepted(&headers);
            return try_batches::serve(participant, name, registered, read_body(body)?, stream).await;
        }
        _ => {
            return Err(unknown_phase(&format!(
                "{TRY_PATH}, {CONFIRM_PATH}, {CANCEL_PATH}, {BATCH_PATH} or {TRIES_PATH}"
            )));
        }
    };
    let ids = Ids::parse(&headers, phase)?;
    let body = read_body(body)?;
    let op = match registered {
        Registered::Sync(op) => op,
        Registered::Async(op) | Registered::Step { kind: op, .. } => {
            return async_calls::serve(participant, name, op, phase, ids, body).await;
        }
    };
    let job = match phase {
        Phase::Try => {
            let deadline = try_deadline(&ids, op.check(&body))?;
            Job::Try { deadline, stored: encode_stored_request(&name, &body) }
        }
        // Confirm and cancel run on the try's stored request: their body is not used.
        Phase::Confirm => Job::Confirm,
        Phase::Cancel => Job::Cancel,
        // Only steps have these phases, and steps are async.
        Phase::Action | Phase::Compensate => return Err(panicked()),
    };

    let barrier = participant.sled()?.barrier.clone();
    let run = move || -> (Ids, Result<Done, BarrierError<CallAbort>>) {
        let done = match job {
            Job::Try { deadline, stored } => sync_try(&barrier, &*op, &name, &ids, deadline, &stored),
            Job::Confirm => phase_two(&barrier, &*op, &name, &ids, Phase::Confirm),
            Job::Cancel => phase_two(&barrier, &*op, &name, &ids, Phase::Cancel),
        };
        (ids, done)
    };
    let (ids, done) = tokio::task::spawn_blocking(run).await.map_err(|e| {
        error!(error = %e, "participant call panicked");
        panicked()
    })?;
    let flush = needs_flush(&done);
    answer(&participant, &ids, phase, flush, done.map_err(barrier_error)).await
}

/// The try of a synchronous operation through the barrier, on the calling thread (sled blocks:
/// call it on the blocking pool). `stored` is the request as the barrier keeps it.
fn sync_try(
    barrier: &SledBarrier,
    op: &dyn ErasedOperation,
    name: &str,
    ids: &Ids,
    deadline: Timestamp,
    stored: &[u8],
) -> Result<Done, BarrierError<CallAbort>> {
    barrier
        .try_op(&ids.gid, &ids.branch, deadline, stored, |tx| op.try_(&Call::open_as(tx, name)?))
        .and_then(|out| match out {
            TryOutcome::Duplicate(_) => same_operation(barrier, ids, name).map(|()| out),
            TryOutcome::Fresh(_) => Ok(out),
        })
        .map(Done::Try)
}

/// The confirm (or, for [`Phase::Cancel`], the cancel) of a synchronous operation through the
/// barrier, on the calling thread (sled blocks: call it on the blocking pool).
fn phase_two(
    barrier: &SledBarrier,
    op: &dyn ErasedOperation,
    name: &str,
    ids: &Ids,
    phase: Phase,
) -> Result<Done, BarrierError<CallAbort>> {
    let (gid, branch) = (&ids.gid, &ids.branch);
    match phase {
        Phase::Cancel => {
            barrier.cancel(gid, branch, |tx| op.cancel(&Call::open_as(tx, name)?)).map(Done::Cancel)
        }
        Phase::Confirm | Phase::Try | Phase::Action | Phase::Compensate => {
            barrier.confirm(gid, branch, |tx| op.confirm(&Call::open_as(tx, name)?)).map(Done::Confirm)
        }
    }
}

/// The answer to a call whose handling panicked.
fn panicked() -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the participant failed handling the call")
}

/// The request body, or the error its rejection means (413 over [`MAX_BODY`]).
fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| crate::serve::body_rejection(&r, MAX_BODY))
}

/// The deadline of a try (its header is required), once its request passed the operation's
/// `check`.
fn try_deadline(ids: &Ids, check: Result<(), String>) -> Result<Timestamp, ApiError> {
    let deadline =
        ids.deadline.ok_or_else(|| ApiError::malformed(format!("header {DEADLINE_HEADER} is missing")))?;
    check.map_err(|m| ApiError::malformed(format!("invalid request: {m}")))?;
    Ok(deadline)
}

/// Answers a call that is done, after the flush when `flush` (whatever read or wrote barrier state
/// waits for it), and logs what happened.
async fn answer(
    participant: &Runtime,
    ids: &Ids,
    phase: Phase,
    flush: bool,
    done: Result<Done, ApiError>,
) -> Result<Response, ApiError> {
    if flush {
        participant.durable().await.map_err(|e| not_flushed(e.to_string()))?;
    }
    match done {
        Ok(done) => {
            debug!(gid = %ids.gid, branch = %ids.branch, ?phase, outcome = done.outcome(), "participant call");
            Ok(done.into_response())
        }
        Err(e) => {
            debug!(gid = %ids.gid, branch = %ids.branch, ?phase, code = e.code, "participant call not done");
            Err(e)
        }
    }
}

/// 405 for anything but `POST` on a phase route.
async fn method_not_allowed() -> Response {
    let mut res = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "participant phases take POST only",
    )
    .into_response();
    res.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
    res
}
