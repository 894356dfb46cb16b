//! Batches of tries: `POST {operation}/tries` (see [`crate::protocol`], "Batches of tries").
//!
//! Every try of a batch goes through the barrier exactly as the single try would: its request
//! checked by the operation, its own barrier transaction, its own refusal, its own panic (a 500 for
//! that try only); the batch runs and is answered as a phase-two batch is ([`super::phase_two_batches::run`]):
//! each try once what it changed is on disk, streamed when the request accepts it. A batch that is malformed as a batch (not JSON, a bad id) is
//! refused whole before any of it runs; a request the operation's check refuses is that try's own
//! 400, as it would be alone.

use std::sync::Arc;

use axum::body::Bytes;
use axum::response::Response;
use tcc_core::barrier::{BarrierError, SledBarrier};

use super::async_calls::AsyncKind;
use super::phase_two_batches::{Batched, batched_ids, run, within_limit};
use super::{
    CallAbort, Done, ErasedOperation, Ids, Phase, Registered, Runtime, encode_stored_request, sync_try,
    try_deadline,
};
use crate::error::ApiError;
use crate::protocol::{TryBatch, TryResult};

/// A try's request, as a batch carries it.
struct TryRequest(Bytes);

impl Batched for TryRequest {
    type Result = TryResult;
    const KIND: &'static str = "try";

    fn result(done: Result<Done, ApiError>) -> TryResult {
        match done {
            Ok(done) => TryResult::done(done.into_result()),
            Err(e) => TryResult { status: e.status.as_u16(), body: None, bytes: None, error: Some(e.body()) },
        }
    }

    fn run_sync(
        self,
        barrier: &SledBarrier,
        op: &dyn ErasedOperation,
        name: &str,
        ids: &Ids,
    ) -> Result<Result<Done, BarrierError<CallAbort>>, ApiError> {
        let deadline = try_deadline(ids, op.check(&self.0))?;
        let stored = encode_stored_request(name, &self.0);
        Ok(sync_try(barrier, op, name, ids, deadline, &stored))
    }

    async fn run_async(
        self,
        participant: &Runtime,
        name: &str,
        op: &AsyncKind,
        ids: &Ids,
    ) -> Result<Done, ApiError> {
        let deadline = try_deadline(ids, op.check(&self.0))?;
        super::async_calls::call(participant, name, op, Phase::Try, ids, Some(deadline), self.0).await
    }
}

/// Serves one batch of tries for operation `name`, streamed when `stream`.
pub(super) async fn serve(
    participant: Arc<Runtime>,
    name: String,
    registered: Registered,
    body: Bytes,
    stream: bool,
) -> Result<Response, ApiError> {
    Ok(run(participant, name, registered, parse(&body)?, stream).await)
}

/// The tries of a batch body, each with its ids checked as its single try's headers would be; the
/// first bad one refuses the whole batch.
fn parse(body: &[u8]) -> Result<Vec<(Ids, TryRequest)>, ApiError> {
    let batch: TryBatch = serde_json::from_slice(body)
        .map_err(|e| ApiError::malformed(format!("invalid batch of tries: {e}")))?;
    within_limit(batch.tries.len(), "tries")?;
    batch
        .tries
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let ids = batched_ids("try", i, &t.gid, &t.branch, t.deadline)?;
            Ok((ids, TryRequest(Bytes::from(t.request.into_bytes()))))
        })
        .collect()
}
