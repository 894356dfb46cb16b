//! Batches of tries: `POST {operation}/tries` (see [`crate::protocol`], "Batches of tries").
//!
//! Every try of a batch goes through the barrier exactly as the single try would: its request
//! checked by the operation, its own barrier transaction, its own refusal, its own panic (a 500 for
//! that try only). The whole batch waits for one flush before it is answered. A batch that is
//! malformed as a batch (not JSON, a bad id) is refused whole before any of it runs; a request the
//! operation's check refuses is that try's own 400, as it would be alone.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tcc_core::Timestamp;
use tracing::{debug, error};

use super::batch::by_branch;
use super::{
    Done, Ids, Participant, Phase, Registered, barrier_error, encode_stored_request, needs_flush,
    not_flushed, panicked, sync_try, try_deadline,
};
use crate::error::ApiError;
use crate::protocol::{MAX_BATCH_CALLS, TryBatch, TryBatchAnswer, TryResult};

/// One try of a batch, run: its ids and what came of it.
type Ran = (Ids, Result<Done, ApiError>);

/// Serves one batch of tries for operation `name`.
pub(super) async fn serve(
    participant: Arc<Participant>,
    name: String,
    registered: Registered,
    body: Bytes,
) -> Result<Response, ApiError> {
    let tries = parse(&body)?;
    let (results, flush): (Vec<Ran>, bool) = match registered {
        Registered::Sync(op) => {
            let barrier = participant.barrier.clone();
            let run = move || {
                let mut flush = false;
                let results = tries
                    .into_iter()
                    .map(|(ids, request)| {
                        // A request the operation refuses is answered without touching the barrier.
                        let deadline = match try_deadline(&ids, op.check(&request)) {
                            Ok(deadline) => deadline,
                            Err(e) => return (ids, Err(e)),
                        };
                        let stored = encode_stored_request(&name, &request);
                        // A business try that panics fails its own try only, as it would alone.
                        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            sync_try(&barrier, &*op, &name, &ids, deadline, &stored)
                        }));
                        let done = match done {
                            Ok(done) => {
                                flush |= needs_flush(&done);
                                done.map_err(barrier_error)
                            }
                            Err(_) => {
                                error!(gid = %ids.gid, branch = %ids.branch, "participant try panicked (batched)");
                                Err(panicked())
                            }
                        };
                        (ids, done)
                    })
                    .collect();
                (results, flush)
            };
            tokio::task::spawn_blocking(run).await.map_err(|e| {
                error!(error = %e, "participant batch of tries panicked");
                panicked()
            })?
        }
        Registered::Async(op) => {
            // Concurrently, as single tries would run, except that the tries of one branch run in
            // the batch's order.
            let mut tasks = tokio::task::JoinSet::new();
            let count = tries.len();
            for group in by_branch(tries) {
                let (participant, name, op) = (Arc::clone(&participant), name.clone(), Arc::clone(&op));
                tasks.spawn(async move {
                    let mut done = Vec::with_capacity(group.len());
                    for (i, (ids, request)) in group {
                        let r = match try_deadline(&ids, op.check(&request)) {
                            Ok(deadline) => {
                                let _branch = participant.locks.lock(&ids.gid, &ids.branch).await;
                                super::staged_calls::call(
                                    &participant,
                                    &name,
                                    &op,
                                    Phase::Try,
                                    &ids,
                                    Some(deadline),
                                    request,
                                )
                                .await
                            }
                            Err(e) => Err(e),
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
                    error!(error = %e, "participant batch of tries panicked");
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
    let results = results
        .into_iter()
        .map(|(ids, done)| match done {
            Ok(done) => {
                let outcome = done.outcome();
                debug!(gid = %ids.gid, branch = %ids.branch, outcome, "participant try (batched)");
                TryResult::done(done.into_result())
            }
            Err(e) => {
                debug!(gid = %ids.gid, branch = %ids.branch, code = e.code, "participant try not done (batched)");
                TryResult { status: e.status.as_u16(), body: None, bytes: None, error: Some(e.body()) }
            }
        })
        .collect();
    Ok((StatusCode::OK, Json(TryBatchAnswer { results })).into_response())
}

/// The tries of a batch body, each with its ids checked as its single try's headers would be; the
/// first bad one refuses the whole batch.
fn parse(body: &[u8]) -> Result<Vec<(Ids, Bytes)>, ApiError> {
    let batch: TryBatch = serde_json::from_slice(body)
        .map_err(|e| ApiError::malformed(format!("invalid batch of tries: {e}")))?;
    if batch.tries.len() > MAX_BATCH_CALLS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("a batch carries at most {MAX_BATCH_CALLS} tries, not {}", batch.tries.len()),
        ));
    }
    batch
        .tries
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let invalid =
                |what: &str, e: tcc_core::Error| ApiError::malformed(format!("try {i}: {what}: {e}"));
            let ids = Ids {
                gid: t.gid.parse().map_err(|e| invalid("gid", e))?,
                branch: t.branch.parse().map_err(|e| invalid("branch", e))?,
                deadline: Some(Timestamp(t.deadline)),
            };
            Ok((ids, Bytes::from(t.request.into_bytes())))
        })
        .collect()
}
