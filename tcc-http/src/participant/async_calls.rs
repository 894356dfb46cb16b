//! The calls of async operations: check the barrier, run the business method on a staged
//! [`TccContext`], commit record and staged writes in one barrier transaction (see the parent
//! module's "Async operations").

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::Response;
use sled::transaction::ConflictableTransactionError;
use tcc_core::barrier::{
    ActionOutcome, BarrierError, BarrierRecord, BusinessTx, DueReservation, Op, Step, TryOutcome, decide,
};
use tcc_core::{BranchId, Gid, Timestamp};
use tracing::{debug, error, warn};

use super::{
    Call, CallAbort, Done, Ids, ParticipantError, Phase, Registered, Runtime, SledParts, answer,
    barrier_error, decode_stored_request, encode_stored_request, stringify, try_deadline,
};
use crate::error::ApiError;
use crate::protocol::{DEADLINE_HEADER, REFUSED};
use crate::staged::{
    AsyncAction, AsyncOperation, AsyncStep, CommitAbort, Disposition, Phase as CtxPhase, Stage, StoreError,
    TccContext, TccError,
};

/// How many times one call runs its business method when its staged writes keep conflicting with
/// other calls' commits, before it answers 503 `contended`.
pub const MAX_RUNS: usize = 8;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Why one run of an async business method produced nothing to commit.
#[derive(Debug)]
pub(super) enum RunError {
    /// The request does not decode as the operation's request type.
    Request(String),
    /// The business method returned an error.
    Business { disposition: Disposition, message: String, detail: Option<serde_json::Value> },
    /// The try's response does not encode.
    Response(String),
}

/// [`AsyncOperation`] with its types erased, so operations of different types share one map.
pub(super) trait ErasedAsync: Send + Sync + 'static {
    /// Whether `request` decodes as the operation's request.
    fn check(&self, request: &[u8]) -> Result<(), String>;
    /// One run of the business method of `phase` (`Expire` runs the cancel); a try answers its
    /// response as JSON, confirm and cancel nothing.
    fn run(
        self: Arc<Self>,
        phase: CtxPhase,
        ctx: TccContext,
        request: Bytes,
    ) -> BoxFuture<Result<Vec<u8>, RunError>>;
}

/// An [`AsyncOperation`] as the runtime holds it.
pub(super) struct AsyncOp<O>(pub(super) O);

/// An async operation as registered: staged writes over sled, or statements in a SQL transaction.
#[derive(Clone)]
pub(crate) enum AsyncKind {
    Staged(Arc<dyn ErasedAsync>),
    #[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
    Sql(Arc<dyn super::sql::ErasedSql>),
}

impl AsyncKind {
    /// Checks a try's request: it must decode as the operation's request type.
    pub(super) fn check(&self, request: &[u8]) -> Result<(), String> {
        match self {
            AsyncKind::Staged(op) => op.check(request),
            #[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
            AsyncKind::Sql(op) => op.check(request),
        }
    }
}

/// A business error as the runtime answers it, with its JSON `detail` if it has one.
pub(super) fn business_error<E: TccError>(e: &E, detail: Option<serde_json::Value>) -> RunError {
    RunError::Business { disposition: e.disposition(), message: e.to_string(), detail }
}

impl<O: AsyncOperation> ErasedAsync for AsyncOp<O> {
    fn check(&self, request: &[u8]) -> Result<(), String> {
        serde_json::from_slice::<O::Request>(request).map(drop).map_err(|e| e.to_string())
    }

    fn run(
        self: Arc<Self>,
        phase: CtxPhase,
        ctx: TccContext,
        request: Bytes,
    ) -> BoxFuture<Result<Vec<u8>, RunError>> {
        Box::pin(async move {
            let request: O::Request =
                serde_json::from_slice(&request).map_err(|e| RunError::Request(e.to_string()))?;
            match phase {
                // A step is held as an operation whose try is its action and whose cancel is its
                // compensation (see `StepOp`).
                CtxPhase::Try | CtxPhase::Action => {
                    let response = self
                        .0
                        .try_(ctx, request)
                        .await
                        .map_err(|e| business_error(&e, O::error_detail(&e)))?;
                    serde_json::to_vec(&response).map_err(|e| RunError::Response(e.to_string()))
                }
                CtxPhase::Confirm => self
                    .0
                    .confirm(ctx, request)
                    .await
                    .map(|()| Vec::new())
                    .map_err(|e| business_error(&e, O::error_detail(&e))),
                CtxPhase::Local => {
                    Err(RunError::Response("a local transaction is not an operation's".into()))
                }
                CtxPhase::Cancel | CtxPhase::Expire | CtxPhase::Compensate => self
                    .0
                    .cancel(ctx, request)
                    .await
                    .map(|()| Vec::new())
                    .map_err(|e| business_error(&e, O::error_detail(&e))),
            }
        })
    }
}

/// A saga step held as an operation: its try is the action, its cancel the compensation. Its
/// confirm is never called: a step's routes are `action` and `compensate` only.
pub(super) struct StepOp<S>(pub(super) S);

/// A message action held as an operation: its try is the action. Its confirm and cancel are never
/// called: a message action's route is `action` only.
pub(super) struct ActionOp<A>(pub(super) A);

impl<S: AsyncStep> AsyncOperation for StepOp<S> {
    type Request = S::Request;
    type Response = ();
    type Error = S::Error;

    fn try_(
        &self,
        ctx: TccContext,
        request: S::Request,
    ) -> impl Future<Output = Result<(), S::Error>> + Send {
        self.0.action(ctx, request)
    }

    async fn confirm(&self, _ctx: TccContext, _request: S::Request) -> Result<(), S::Error> {
        unreachable!("a saga step has no confirm route")
    }

    fn cancel(
        &self,
        ctx: TccContext,
        request: S::Request,
    ) -> impl Future<Output = Result<(), S::Error>> + Send {
        self.0.compensate(ctx, request)
    }

    fn error_detail(error: &S::Error) -> Option<serde_json::Value> {
        S::error_detail(error)
    }
}

impl<A: AsyncAction> AsyncOperation for ActionOp<A> {
    type Request = A::Request;
    type Response = ();
    type Error = A::Error;

    fn try_(
        &self,
        ctx: TccContext,
        request: A::Request,
    ) -> impl Future<Output = Result<(), A::Error>> + Send {
        self.0.action(ctx, request)
    }

    async fn confirm(&self, _ctx: TccContext, _request: A::Request) -> Result<(), A::Error> {
        unreachable!("a message action has no confirm route")
    }

    async fn cancel(&self, _ctx: TccContext, _request: A::Request) -> Result<(), A::Error> {
        unreachable!("a message action has no compensate route")
    }

    fn error_detail(error: &A::Error) -> Option<serde_json::Value> {
        A::error_detail(error)
    }
}

/// One lock per (transaction, branch) with a call in progress, so that a duplicate call waits for the
/// first and then finds its record instead of running the business method alongside it. This is an
/// optimisation, not what keeps effects single: if a call's request is dropped (its client gave up),
/// the lock is released while the business method it spawned may still be running, and the next
/// call can run the method again meanwhile; only one of them can commit, because the barrier
/// decides again inside the sled transaction. Entries live while someone holds or waits for them
/// (a waiter dropped at the wrong instant can leave one behind: a few bytes, never a wrong answer).
#[derive(Debug, Default)]
pub(super) struct BranchLocks {
    held: Mutex<HashMap<(Gid, BranchId), BranchMutex>>,
}

type BranchMutex = Arc<tokio::sync::Mutex<()>>;

/// A held branch lock; released (and forgotten when nobody waits) on drop.
pub(super) struct BranchGuard<'a> {
    locks: &'a BranchLocks,
    key: (Gid, BranchId),
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl BranchLocks {
    pub(super) async fn lock(&self, gid: &Gid, branch: &BranchId) -> BranchGuard<'_> {
        let key = (gid.clone(), branch.clone());
        let mutex = {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(held.entry(key.clone()).or_default())
        };
        let guard = mutex.lock_owned().await;
        BranchGuard { locks: self, key, guard: Some(guard) }
    }
}

impl Drop for BranchGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut held = self.locks.held.lock().unwrap_or_else(PoisonError::into_inner);
        // Clones are only taken under this lock: one reference left means nobody holds or waits.
        if held.get(&self.key).is_some_and(|m| Arc::strong_count(m) == 1) {
            held.remove(&self.key);
        }
    }
}

/// Serves one call of an async operation.
pub(super) async fn serve(
    participant: Arc<Runtime>,
    name: String,
    op: AsyncKind,
    phase: Phase,
    ids: Ids,
    body: Bytes,
) -> Result<Response, ApiError> {
    let try_deadline = match phase {
        Phase::Try => Some(try_deadline(&ids, op.check(&body))?),
        // An action has no deadline of its own (it holds nothing); its request is checked as a try's.
        Phase::Action => {
            op.check(&body).map_err(|m| ApiError::malformed(format!("invalid request: {m}")))?;
            Some(Timestamp(0))
        }
        // Confirm, cancel and compensate run on the stored request: their body is not used.
        Phase::Confirm | Phase::Cancel | Phase::Compensate => None,
    };
    let done = {
        let _branch = participant.locks.lock(&ids.gid, &ids.branch).await;
        call(&participant, &name, &op, phase, &ids, try_deadline, body).await
    };
    let flush = needs_flush(&done);
    answer(&participant, &ids, phase, flush, done).await
}

/// Whether answering `done` needs the flush first: whatever read or wrote barrier state does (as on
/// the synchronous path), which is everything but a failure of the participant itself (5xx).
pub(super) fn needs_flush(done: &Result<Done, ApiError>) -> bool {
    done.as_ref().map_or_else(|e| e.status.as_u16() < 500, |_| true)
}

fn internal(message: impl Into<String>) -> ApiError {
    let message = message.into();
    error!(error = %message, "participant call failed");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
}

fn mismatch(message: String) -> ApiError {
    ApiError::new(REFUSED, "operation_mismatch", message)
}

/// The answer to a [`TccContext`] fault: nothing was committed.
fn fault(e: &StoreError) -> ApiError {
    match e {
        StoreError::Storage(m) => {
            error!(error = %m, "participant business storage failed");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage", format!("business storage: {m}"))
        }
        other => internal(format!("the business method's store access failed: {other}")),
    }
}

/// The answer to a run that produced nothing to commit.
pub(super) fn run_error(e: RunError, phase: Phase) -> ApiError {
    match e {
        RunError::Request(m) if matches!(phase, Phase::Try | Phase::Action) => {
            ApiError::malformed(format!("invalid request: {m}"))
        }
        RunError::Request(m) => internal(format!("the stored request of this branch does not decode: {m}")),
        RunError::Business { disposition: Disposition::Refuse, message, detail } => {
            let e = ApiError::new(REFUSED, "refused", message);
            match detail {
                Some(d) => e.with_detail(d),
                None => e,
            }
        }
        RunError::Business { disposition: Disposition::Transient | Disposition::Retry, message, detail } => {
            let e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
            match detail {
                Some(d) => e.with_detail(d),
                None => e,
            }
        }
        RunError::Response(m) => internal(format!("the try's response does not encode: {m}")),
    }
}

/// Runs `f` on the blocking pool (sled transactions and flushes block).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| internal(format!("the participant failed handling the call: {e}")))
}

/// The barrier's answer to a commit, as the call's result; `None` means run again.
fn committed<T>(r: Result<T, BarrierError<CommitAbort>>) -> Option<Result<T, ApiError>> {
    match r {
        Ok(v) => Some(Ok(v)),
        Err(BarrierError::Business(CommitAbort::Conflict | CommitAbort::Retry)) => None,
        Err(BarrierError::Business(CommitAbort::Mismatch(m))) => Some(Err(mismatch(m))),
        Err(BarrierError::Business(CommitAbort::Failed(m))) => Some(Err(internal(m))),
        Err(BarrierError::Refused(r)) => Some(Err(barrier_error(BarrierError::Refused(r)))),
        Err(BarrierError::Corrupt { gid, branch, source }) => {
            Some(Err(barrier_error(BarrierError::Corrupt { gid, branch, source })))
        }
        Err(BarrierError::Storage(e)) => Some(Err(barrier_error(BarrierError::Storage(e)))),
        Err(BarrierError::NotFlushed(e)) => Some(Err(barrier_error(BarrierError::NotFlushed(e)))),
    }
}

/// The try's request of a stored record, if it was made through operation `name`.
fn stored_request(rec: &BarrierRecord, name: &str) -> Result<Bytes, ApiError> {
    match decode_stored_request(&rec.request) {
        Some((op, request)) if op == name => Ok(Bytes::copy_from_slice(request)),
        Some((op, _)) => {
            Err(mismatch(format!("the branch was tried through operation {op:?}, not {name:?}")))
        }
        None => {
            Err(mismatch("the branch's barrier record was not written by the participant runtime".into()))
        }
    }
}

/// One business run on a fresh context: what it staged and what it returned. Faults win over the
/// method's result.
async fn run_once(
    participant: &SledParts,
    op: &Arc<dyn ErasedAsync>,
    name: &str,
    ids: (&Gid, &BranchId),
    deadline: Timestamp,
    phase: CtxPhase,
    request: Bytes,
) -> (Stage, Result<Result<Vec<u8>, RunError>, ApiError>) {
    let (ctx, handle) =
        TccContext::new(Arc::clone(&participant.trees), ids.0.clone(), ids.1.clone(), deadline, phase, name);
    let joined = tokio::spawn(Arc::clone(op).run(phase, ctx, request)).await;
    let stage = handle.close();
    let result = match joined {
        Err(e) => Err(internal(format!("the business method failed: {e}"))),
        Ok(_) if stage.fault().is_some() => {
            Err(stage.fault().map(fault).unwrap_or_else(|| internal("fault")))
        }
        Ok(r) => Ok(r),
    };
    (stage, result)
}

/// What a barrier transaction runs in place of the business method: the commit of a run's stage,
/// or (when the check found nothing to run) nothing at all.
type Commit =
    Box<dyn Fn(&BusinessTx<'_>) -> Result<Vec<u8>, ConflictableTransactionError<CommitAbort>> + Send>;

/// A closure for a barrier call that must not run any business method: if the barrier would run
/// one after all (the record changed since the check), abort so that the call starts over.
fn run_nothing() -> Commit {
    Box::new(|_| Err(ConflictableTransactionError::Abort(CommitAbort::Retry)))
}

/// One barrier transaction for `phase` on the blocking pool: `commit` runs if the barrier runs the
/// business method; duplicates, refusals and empty cancels are the barrier's answer.
async fn through_barrier(
    participant: &SledParts,
    phase: Phase,
    ids: &Ids,
    try_call: Option<(Timestamp, Vec<u8>)>,
    commit: Commit,
) -> Result<Option<Result<Done, ApiError>>, ApiError> {
    let (b, gid, branch) = (participant.barrier.clone(), ids.gid.clone(), ids.branch.clone());
    let r = blocking(move || match (phase, try_call) {
        (Phase::Try, Some((deadline, stored))) => {
            b.try_op(&gid, &branch, deadline, &stored, &*commit).map(Done::Try)
        }
        (Phase::Try, None) => {
            Err(BarrierError::Business(CommitAbort::Failed("a try without its deadline".into())))
        }
        (Phase::Action, Some((_, stored))) => {
            b.action(&gid, &branch, &stored, |tx| commit(tx).map(drop)).map(Done::Action)
        }
        (Phase::Action, None) => {
            Err(BarrierError::Business(CommitAbort::Failed("an action without its request".into())))
        }
        (Phase::Confirm, _) => b.confirm(&gid, &branch, |tx| commit(tx).map(drop)).map(Done::Confirm),
        (Phase::Cancel, _) => b.cancel(&gid, &branch, |tx| commit(tx).map(drop)).map(Done::Cancel),
        (Phase::Compensate, _) => {
            b.compensate(&gid, &branch, |tx| commit(tx).map(drop)).map(Done::Compensate)
        }
    })
    .await?;
    Ok(committed(r))
}

/// Check, run, commit; again after a conflict.
pub(super) async fn call(
    participant: &Runtime,
    name: &str,
    op: &AsyncKind,
    phase: Phase,
    ids: &Ids,
    try_deadline: Option<Timestamp>,
    body: Bytes,
) -> Result<Done, ApiError> {
    match op {
        AsyncKind::Staged(op) => {
            staged_call(participant.sled()?, name, op, phase, ids, try_deadline, body).await
        }
        #[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
        AsyncKind::Sql(op) => Arc::clone(op).call(name, phase, ids, try_deadline, body).await,
    }
}

/// One call of an async operation over sled: check, run on a staged context, commit through the
/// barrier, again on a conflict.
async fn staged_call(
    participant: &SledParts,
    name: &str,
    op: &Arc<dyn ErasedAsync>,
    phase: Phase,
    ids: &Ids,
    try_deadline: Option<Timestamp>,
    body: Bytes,
) -> Result<Done, ApiError> {
    let barrier = &participant.barrier;
    let try_call = try_deadline.map(|deadline| (deadline, encode_stored_request(name, &body)));
    for _ in 0..MAX_RUNS {
        // 1. Check, read-only: does the business method run at all?
        let existing = barrier.get(&ids.gid, &ids.branch).map_err(|e| barrier_error(e.widen()))?;
        let barrier_op = match (phase, &try_call) {
            (Phase::Try, Some((deadline, stored))) => Op::Try { deadline: *deadline, request: stored },
            (Phase::Try, None) => {
                return Err(ApiError::malformed(format!("header {DEADLINE_HEADER} is missing")));
            }
            (Phase::Action, Some((_, stored))) => Op::Action { request: stored },
            (Phase::Action, None) => return Err(internal("an action without its request")),
            (Phase::Confirm, _) => Op::Confirm,
            (Phase::Cancel, _) => Op::Cancel,
            (Phase::Compensate, _) => Op::Compensate,
        };
        let (commit, ran) = match decide(barrier_op, existing.as_ref(), barrier.clock().now()) {
            Step::Run(rec) => {
                // 2. Run the business method on a fresh context.
                let (request, ctx_phase) = match phase {
                    Phase::Try => (body.clone(), CtxPhase::Try),
                    Phase::Action => (body.clone(), CtxPhase::Action),
                    Phase::Confirm => (stored_request(&rec, name)?, CtxPhase::Confirm),
                    Phase::Cancel => (stored_request(&rec, name)?, CtxPhase::Cancel),
                    Phase::Compensate => (stored_request(&rec, name)?, CtxPhase::Compensate),
                };
                let ids_ref = (&ids.gid, &ids.branch);
                let (stage, result) =
                    run_once(participant, op, name, ids_ref, rec.deadline, ctx_phase, request).await;
                let output = match result? {
                    // The business method's own database rolled back: run it again on fresh reads.
                    Err(RunError::Business { disposition: Disposition::Retry, .. }) => continue,
                    r => r.map_err(|e| run_error(e, phase))?,
                };
                // 3. Commit the stage, if the barrier still runs the method. The record it runs on
                // must be the one checked (a try's request never changes once stored).
                let tried = rec.request;
                let commit: Commit = Box::new(move |tx| {
                    if tx.request() != tried.as_slice() {
                        return Err(ConflictableTransactionError::Abort(CommitAbort::Retry));
                    }
                    stage.commit(tx.trees())?;
                    Ok(output.clone())
                });
                (commit, true)
            }
            // A duplicate, a refusal or an empty cancel: the barrier answers, nothing runs.
            _ => (run_nothing(), false),
        };
        match through_barrier(participant, phase, ids, try_call.clone(), commit).await? {
            // A duplicate try answers the first one's result, through this operation only.
            Some(Ok(Done::Try(TryOutcome::Duplicate(result)))) => {
                super::same_operation(barrier, ids, name).map_err(barrier_error)?;
                return Ok(Done::Try(TryOutcome::Duplicate(result)));
            }
            Some(Ok(Done::Action(ActionOutcome::Duplicate))) => {
                super::same_operation(barrier, ids, name).map_err(barrier_error)?;
                return Ok(Done::Action(ActionOutcome::Duplicate));
            }
            Some(r) => return r,
            None if ran => {
                debug!(gid = %ids.gid, branch = %ids.branch, ?phase, "staged writes conflicted; running again");
            }
            None => {}
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "contended",
        format!("the business method's writes conflicted with other calls {MAX_RUNS} times; try again"),
    ))
}

/// Releases one due reservation, running the cancel of the operation that made it; whether it was
/// released. Storage failures stop the sweep; anything else is logged and left for the next sweep.
pub(super) async fn expire_one(
    runtime: &Runtime,
    participant: &SledParts,
    due: &DueReservation,
) -> Result<bool, ParticipantError> {
    let _branch = runtime.locks.lock(&due.gid, &due.branch).await;
    let barrier = &participant.barrier;
    for _ in 0..MAX_RUNS {
        let existing = match barrier.get(&due.gid, &due.branch) {
            Ok(r) => r,
            Err(e @ BarrierError::Corrupt { .. }) => {
                error!(error = %e, "cannot expire a damaged barrier record; skipped");
                return Ok(false);
            }
            Err(e) => return Err(ParticipantError::Barrier(stringify(e.widen::<String>()))),
        };
        let now = barrier.clock().now();
        let rec = match decide(Op::Expire { grace: barrier.grace() }, existing.as_ref(), now) {
            Step::Run(rec) => rec,
            // Finished or not due: let the barrier say so (it drops a stale index entry).
            _ => {
                return release(participant, due, |_| {
                    Err(ConflictableTransactionError::Abort(CommitAbort::Retry))
                })
                .await;
            }
        };
        let Some((name, request)) = decode_stored_request(&rec.request) else {
            error!(gid = %due.gid, branch = %due.branch, "a held reservation not stored by the runtime cannot be expired");
            return Ok(false);
        };
        let (name, request) = (name.to_owned(), Bytes::copy_from_slice(request));
        let op = match runtime.ops.get(&name) {
            Some(Registered::Async(AsyncKind::Staged(op))) => Arc::clone(op),
            #[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
            Some(Registered::Async(AsyncKind::Sql(_))) => {
                error!(gid = %due.gid, branch = %due.branch, operation = %name,
                    "a SQL operation's reservation in a sled barrier cannot be expired");
                return Ok(false);
            }
            Some(Registered::Sync(op)) => {
                let op = Arc::clone(op);
                let n = name.clone();
                return release(participant, due, move |tx| {
                    let call = Call::open_as(tx, &n).map_err(|e| match e {
                        ConflictableTransactionError::Abort(
                            CallAbort::Business(m) | CallAbort::Mismatch(m),
                        ) => ConflictableTransactionError::Abort(CommitAbort::Mismatch(m)),
                        ConflictableTransactionError::Conflict => ConflictableTransactionError::Conflict,
                        ConflictableTransactionError::Storage(e) => ConflictableTransactionError::Storage(e),
                    })?;
                    op.cancel(&call).map_err(|e| match e {
                        ConflictableTransactionError::Abort(e) => {
                            ConflictableTransactionError::Abort(CommitAbort::Failed(e.to_string()))
                        }
                        ConflictableTransactionError::Conflict => ConflictableTransactionError::Conflict,
                        ConflictableTransactionError::Storage(e) => ConflictableTransactionError::Storage(e),
                    })
                })
                .await;
            }
            Some(Registered::Step { .. }) | None => {
                warn!(gid = %due.gid, branch = %due.branch, operation = %name,
                    "no operation of this name is registered to release the reservation; retrying next sweep");
                return Ok(false);
            }
        };
        let (stage, result) = run_once(
            participant,
            &op,
            &name,
            (&due.gid, &due.branch),
            rec.deadline,
            CtxPhase::Expire,
            request,
        )
        .await;
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                let e = run_error(e, Phase::Cancel);
                warn!(gid = %due.gid, branch = %due.branch, error = %e,
                    "business cancel of an expired reservation failed; retrying next sweep");
                return Ok(false);
            }
            Err(e) => {
                warn!(gid = %due.gid, branch = %due.branch, error = %e,
                    "business cancel of an expired reservation failed; retrying next sweep");
                return Ok(false);
            }
        }
        let tried = rec.request;
        let stage = Arc::new(stage);
        let r = {
            let (b, due) = (barrier.clone(), due.clone());
            tokio::task::spawn_blocking(move || {
                b.expire(&due, |tx| {
                    if tx.request() != tried.as_slice() {
                        return Err(ConflictableTransactionError::Abort(CommitAbort::Retry));
                    }
                    stage.commit(tx.trees())
                })
            })
            .await
            .map_err(|e| ParticipantError::Panicked(e.to_string()))?
        };
        match r {
            Ok(released) => return Ok(released),
            Err(BarrierError::Business(CommitAbort::Conflict | CommitAbort::Retry)) => continue,
            Err(e) => return expire_failed(due, e),
        }
    }
    warn!(gid = %due.gid, branch = %due.branch, "releasing the reservation kept conflicting; retrying next sweep");
    Ok(false)
}

/// One `SledBarrier::expire` on the blocking pool.
async fn release<F>(participant: &SledParts, due: &DueReservation, f: F) -> Result<bool, ParticipantError>
where
    F: Fn(&BusinessTx<'_>) -> Result<(), ConflictableTransactionError<CommitAbort>> + Send + 'static,
{
    let (b, d) = (participant.barrier.clone(), due.clone());
    let r = tokio::task::spawn_blocking(move || b.expire(&d, f))
        .await
        .map_err(|e| ParticipantError::Panicked(e.to_string()))?;
    match r {
        Ok(released) => Ok(released),
        Err(BarrierError::Business(CommitAbort::Retry | CommitAbort::Conflict)) => Ok(false),
        Err(e) => expire_failed(due, e),
    }
}

fn expire_failed(due: &DueReservation, e: BarrierError<CommitAbort>) -> Result<bool, ParticipantError> {
    match e {
        e @ (BarrierError::Storage(_) | BarrierError::NotFlushed(_)) => {
            Err(ParticipantError::Barrier(stringify(e)))
        }
        e => {
            warn!(gid = %due.gid, branch = %due.branch, error = %e,
                "releasing an expired reservation failed; retrying next sweep");
            Ok(false)
        }
    }
}
