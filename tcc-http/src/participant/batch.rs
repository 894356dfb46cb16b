//! Phase-two batches: `POST {operation}/batch` (see [`crate::protocol`], "Phase-two batches").
//!
//! Every call of a batch goes through the barrier exactly as the single call would (its own barrier
//! transaction, so one call's failure changes nothing of the others), and the whole batch waits for
//! one flush before it is answered. A batch that is malformed anywhere is refused as a whole before
//! any of it runs.
//!
//! [`run`] is the runner of both kinds of batch: phase-two calls here, tries in [`super::tries`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tcc_core::barrier::{BarrierError, SledBarrier};
use tcc_core::{BranchId, Decision, Gid, Timestamp};
use tracing::{debug, error};

use super::staged_calls::ErasedAsync;
use super::{
    CallAbort, Done, ErasedOperation, Ids, Participant, Phase, Registered, barrier_error, needs_flush,
    not_flushed, panicked, phase_two,
};
use crate::error::ApiError;
use crate::protocol::{BatchAnswer, BatchRequest, BatchResult, MAX_BATCH_CALLS};

/// One call of a batch, run: its ids and what came of it.
pub(super) type Ran = (Ids, Result<Done, ApiError>);

/// One call of a batch (a phase-two call, or a try with its request): how it runs on each kind of
/// operation, exactly as its single call would.
pub(super) trait Batched: Send + 'static {
    /// Runs on a synchronous operation, on the calling thread (the blocking pool): what the barrier
    /// said, or an answer given without touching the barrier (`Err`: a request the operation
    /// refuses).
    fn run_sync(
        self,
        barrier: &SledBarrier,
        op: &dyn ErasedOperation,
        name: &str,
        ids: &Ids,
    ) -> Result<Result<Done, BarrierError<CallAbort>>, ApiError>;

    /// Runs on an async operation; the caller holds the branch's lock.
    fn run_async(
        self,
        participant: &Participant,
        name: &str,
        op: &Arc<dyn ErasedAsync>,
        ids: &Ids,
    ) -> impl Future<Output = Result<Done, ApiError>> + Send;
}

impl Batched for Phase {
    fn run_sync(
        self,
        barrier: &SledBarrier,
        op: &dyn ErasedOperation,
        name: &str,
        ids: &Ids,
    ) -> Result<Result<Done, BarrierError<CallAbort>>, ApiError> {
        Ok(phase_two(barrier, op, name, ids, self))
    }

    async fn run_async(
        self,
        participant: &Participant,
        name: &str,
        op: &Arc<dyn ErasedAsync>,
        ids: &Ids,
    ) -> Result<Done, ApiError> {
        super::staged_calls::call(participant, name, op, self, ids, None, Bytes::new()).await
    }
}

/// Runs the calls of a batch for operation `name` as their single calls would run, and waits for
/// the flush that covers what they did: on a synchronous operation one after the other on the
/// blocking pool, each in its own barrier transaction, a panicking business method failing its own
/// call only (500); on an async operation concurrently, except that the calls of one branch run in
/// the batch's order (each business method runs on its own task already). Returns each call's
/// result, in the batch's order.
pub(super) async fn run<C: Batched>(
    participant: Arc<Participant>,
    name: String,
    registered: Registered,
    calls: Vec<(Ids, C)>,
) -> Result<Vec<Ran>, ApiError> {
    let (results, flush) = match registered {
        Registered::Sync(op) => {
            let barrier = participant.barrier.clone();
            let run = move || {
                let mut flush = false;
                let results: Vec<Ran> = calls
                    .into_iter()
                    .map(|(ids, call)| {
                        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            call.run_sync(&barrier, &*op, &name, &ids)
                        }));
                        let done = match done {
                            Ok(Ok(done)) => {
                                flush |= needs_flush(&done);
                                done.map_err(barrier_error)
                            }
                            // Answered without touching the barrier: nothing to flush.
                            Ok(Err(e)) => Err(e),
                            Err(_) => {
                                error!(gid = %ids.gid, branch = %ids.branch, "participant call panicked (batched)");
                                Err(panicked())
                            }
                        };
                        (ids, done)
                    })
                    .collect();
                (results, flush)
            };
            tokio::task::spawn_blocking(run).await.map_err(|e| {
                error!(error = %e, "participant batch panicked");
                panicked()
            })?
        }
        Registered::Async(op) => {
            let mut tasks = tokio::task::JoinSet::new();
            let count = calls.len();
            for group in by_branch(calls) {
                let (participant, name, op) = (Arc::clone(&participant), name.clone(), Arc::clone(&op));
                tasks.spawn(async move {
                    let mut done = Vec::with_capacity(group.len());
                    for (i, (ids, call)) in group {
                        let r = {
                            let _branch = participant.locks.lock(&ids.gid, &ids.branch).await;
                            call.run_async(&participant, &name, &op, &ids).await
                        };
                        done.push((i, ids, r));
                    }
                    done
                });
            }
            let mut slots: Vec<Option<Ran>> = std::iter::repeat_with(|| None).take(count).collect();
            let mut flush = false;
            while let Some(joined) = tasks.join_next().await {
                let group = joined.map_err(|e| {
                    error!(error = %e, "participant batch call panicked");
                    panicked()
                })?;
                for (i, ids, done) in group {
                    flush |= super::staged_calls::needs_flush(&done);
                    if let Some(slot) = slots.get_mut(i) {
                        *slot = Some((ids, done));
                    }
                }
            }
            (slots.into_iter().flatten().collect(), flush)
        }
    };
    if flush {
        participant.durable().await.map_err(|e| not_flushed(e.to_string()))?;
    }
    Ok(results)
}

/// Serves one batch for operation `name`.
pub(super) async fn serve(
    participant: Arc<Participant>,
    name: String,
    registered: Registered,
    body: Bytes,
) -> Result<Response, ApiError> {
    let calls = parse(&body)?;
    let phases: Vec<Phase> = calls.iter().map(|(_, phase)| *phase).collect();
    let results = run(participant, name, registered, calls).await?;
    let results = results
        .into_iter()
        .zip(phases)
        .map(|((ids, done), phase)| match done {
            Ok(done) => {
                let outcome = done.outcome();
                debug!(gid = %ids.gid, branch = %ids.branch, ?phase, outcome, "participant call (batched)");
                BatchResult { status: StatusCode::OK.as_u16(), outcome: Some(outcome.to_owned()), error: None }
            }
            Err(e) => {
                debug!(gid = %ids.gid, branch = %ids.branch, ?phase, code = e.code, "participant call not done (batched)");
                BatchResult {
                    status: e.status.as_u16(),
                    outcome: None,
                    error: Some(e.body()),
                }
            }
        })
        .collect();
    Ok((StatusCode::OK, Json(BatchAnswer { results })).into_response())
}

/// The calls of a batch, numbered, grouped by branch (each group in the batch's order).
pub(super) fn by_branch<T>(calls: Vec<(Ids, T)>) -> Vec<Vec<(usize, (Ids, T))>> {
    let mut groups: Vec<Vec<(usize, (Ids, T))>> = Vec::new();
    let mut index: HashMap<(Gid, BranchId), usize> = HashMap::new();
    for (i, call) in calls.into_iter().enumerate() {
        let key = (call.0.gid.clone(), call.0.branch.clone());
        match index.get(&key).and_then(|&g| groups.get_mut(g)) {
            Some(group) => group.push((i, call)),
            None => {
                index.insert(key, groups.len());
                groups.push(vec![(i, call)]);
            }
        }
    }
    groups
}

/// Refuses a batch of more than [`MAX_BATCH_CALLS`] `items` (413; `items` names them, plural).
pub(super) fn within_limit(count: usize, items: &str) -> Result<(), ApiError> {
    if count > MAX_BATCH_CALLS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("a batch carries at most {MAX_BATCH_CALLS} {items}, not {count}"),
        ));
    }
    Ok(())
}

/// The ids of `what` number `i` of a batch, checked as its single call's headers would be.
pub(super) fn batched_ids(
    what: &str,
    i: usize,
    gid: &str,
    branch: &str,
    deadline: u64,
) -> Result<Ids, ApiError> {
    let invalid = |field: &str, e: tcc_core::Error| ApiError::malformed(format!("{what} {i}: {field}: {e}"));
    Ok(Ids {
        gid: gid.parse().map_err(|e| invalid("gid", e))?,
        branch: branch.parse().map_err(|e| invalid("branch", e))?,
        deadline: Some(Timestamp(deadline)),
    })
}

/// The calls of a batch body, each checked as its single call's headers would be; the first bad
/// one refuses the whole batch.
fn parse(body: &[u8]) -> Result<Vec<(Ids, Phase)>, ApiError> {
    let request: BatchRequest =
        serde_json::from_slice(body).map_err(|e| ApiError::malformed(format!("invalid batch: {e}")))?;
    within_limit(request.calls.len(), "calls")?;
    request
        .calls
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let ids = batched_ids("call", i, &c.gid, &c.branch, c.deadline)?;
            let phase = match c.decision {
                Decision::Confirm => Phase::Confirm,
                Decision::Cancel => Phase::Cancel,
            };
            Ok((ids, phase))
        })
        .collect()
}
