//! Phase-two batches: `POST {operation}/batch` (see [`crate::protocol`], "Phase-two batches").
//!
//! Every call of a batch goes through the barrier exactly as the single call would (its own barrier
//! transaction, so one call's failure changes nothing of the others), and each call is answered once
//! what it changed is on disk: streamed, one line per call as it finishes, when the request accepts
//! `application/x-ndjson` (the tcc clients do), else all at once. A batch that is malformed
//! anywhere is refused as a whole before any of it runs.
//!
//! [`run`] is the runner of both kinds of batch: phase-two calls here, tries in [`super::tries`].

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tcc_core::barrier::{BarrierError, SledBarrier};
use tcc_core::{BranchId, Decision, Gid, Timestamp};
use tokio::sync::mpsc;
use tracing::{debug, error};

use super::async_calls::AsyncKind;
use super::{
    CallAbort, Done, ErasedOperation, Ids, Phase, Registered, Runtime, barrier_error, needs_flush,
    not_flushed, panicked, phase_two,
};
use crate::error::ApiError;
use crate::ndjson;
use crate::protocol::{AnswerLine, BatchRequest, BatchResult, MAX_BATCH_CALLS};

/// One call of a batch (a phase-two call, or a try with its request): how it runs on each kind of
/// operation, exactly as its single call would.
pub(super) trait Batched: Send + 'static {
    /// What the answer says of one call: [`BatchResult`] or [`TryResult`](crate::protocol::TryResult).
    type Result: Serialize + Send + 'static;

    /// What the calls are, for the log.
    const KIND: &'static str;

    /// The call's result in the answer, from what came of it.
    fn result(done: Result<Done, ApiError>) -> Self::Result;

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
        participant: &Runtime,
        name: &str,
        op: &AsyncKind,
        ids: &Ids,
    ) -> impl Future<Output = Result<Done, ApiError>> + Send;
}

impl Batched for Phase {
    type Result = BatchResult;
    const KIND: &'static str = "phase-two call";

    fn result(done: Result<Done, ApiError>) -> BatchResult {
        match done {
            Ok(done) => BatchResult {
                status: StatusCode::OK.as_u16(),
                outcome: Some(done.outcome().to_owned()),
                error: None,
            },
            Err(e) => BatchResult { status: e.status.as_u16(), outcome: None, error: Some(e.body()) },
        }
    }

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
        participant: &Runtime,
        name: &str,
        op: &AsyncKind,
        ids: &Ids,
    ) -> Result<Done, ApiError> {
        super::async_calls::call(participant, name, op, self, ids, None, Bytes::new()).await
    }
}

/// How long the calls of a batch that are done wait for the rest of it before they are flushed and
/// answered on their own. The calls of a batch normally finish within this of each other, and then
/// share one flush and one write, with the answer's head; a call slower than this holds up no other
/// call's answer for longer.
const HOLD: Duration = Duration::from_millis(10);

/// One call of a batch done: its index in the batch, what came of it, and whether answering it
/// needs the flush first.
type Ran = (usize, Result<Done, ApiError>, bool);

/// Runs the calls of a batch for operation `name` as their single calls would run, and answers
/// each once the flush that covers what it did is done, with its [`Batched::result`].
///
/// On a synchronous operation the calls run one after the other on the blocking pool, each in its
/// own barrier transaction, a panicking business method failing its own call only (500); on an
/// async operation concurrently, except that the calls of one branch run in the batch's order (each
/// business method runs on its own task already). Every call runs to its end even if the caller
/// goes away.
///
/// With `stream`, the answer is `application/x-ndjson`: one [`AnswerLine`] per call, in the order
/// they finish, those finished together after one flush in one write; so one slow call holds up no
/// other's answer. Otherwise it is one JSON object, `{"results": [...]}`, in the batch's order,
/// once every call is done.
pub(super) async fn run<C: Batched>(
    participant: Arc<Runtime>,
    name: String,
    registered: Registered,
    calls: Vec<(Ids, C)>,
    stream: bool,
) -> Response {
    let ids: Vec<Ids> = calls.iter().map(|(ids, _)| ids.clone()).collect();
    let (done, ran) = mpsc::unbounded_channel::<Ran>();
    match registered {
        Registered::Sync(op) => {
            // One after the other on one thread: a synchronous business method runs inside a sled
            // transaction, and sled runs one transaction at a time in a process anyway.
            let barrier = match participant.sled() {
                Ok(sled) => sled.barrier.clone(),
                Err(e) => return e.into_response(),
            };
            let done = done.clone();
            tokio::task::spawn_blocking(move || {
                for (i, (ids, call)) in calls.into_iter().enumerate() {
                    let (r, flush) = run_sync(&barrier, &*op, &name, &ids, call);
                    let _ = done.send((i, r, flush));
                }
            });
        }
        Registered::Async(op) | Registered::Step { kind: op, .. } => {
            for group in by_branch(calls) {
                let (participant, name, op, done) =
                    (Arc::clone(&participant), name.clone(), op.clone(), done.clone());
                tokio::spawn(async move {
                    for (i, (ids, call)) in group {
                        let r = {
                            let _branch = participant.locks.lock(&ids.gid, &ids.branch).await;
                            call.run_async(&participant, &name, &op, &ids).await
                        };
                        let flush = super::async_calls::needs_flush(&r);
                        let _ = done.send((i, r, flush));
                    }
                });
            }
        }
    }
    drop(done);
    let answer = Answer::<C> { participant, ids, ran, calls: PhantomData };
    if stream {
        let (lines, mut rx) = mpsc::channel(answer.ids.len().max(1));
        tokio::spawn(answer.stream(lines));
        // The head waits for the first lines (usually the whole answer), so that both go in one
        // write: lines written after a head sent alone wait for the caller's delayed ACK on a
        // connection without TCP_NODELAY (measured: a fifth of a participant's batched throughput).
        let body = match rx.recv().await {
            Some((first, _)) => ndjson::Lines::starting_with(rx, first),
            None => ndjson::Lines::new(rx, 0),
        };
        ([(header::CONTENT_TYPE, ndjson::CONTENT_TYPE)], Body::new(body)).into_response()
    } else {
        answer.whole().await
    }
}

/// Runs one call of a batch on a synchronous operation: what came of it, and whether answering it
/// needs the flush first.
fn run_sync<C: Batched>(
    barrier: &SledBarrier,
    op: &dyn ErasedOperation,
    name: &str,
    ids: &Ids,
    call: C,
) -> (Result<Done, ApiError>, bool) {
    let done =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call.run_sync(barrier, op, name, ids)));
    match done {
        Ok(Ok(done)) => {
            let flush = needs_flush(&done);
            (done.map_err(barrier_error), flush)
        }
        // Answered without touching the barrier: nothing to flush.
        Ok(Err(e)) => (Err(e), false),
        Err(_) => {
            error!(gid = %ids.gid, branch = %ids.branch, "participant call panicked (batched)");
            (Err(panicked()), false)
        }
    }
}

/// What answers a batch of `C` calls: the calls' ids, and where the calls send what came of them.
struct Answer<C> {
    participant: Arc<Runtime>,
    ids: Vec<Ids>,
    ran: mpsc::UnboundedReceiver<Ran>,
    calls: PhantomData<fn() -> C>,
}

/// What came from the calls of a batch.
enum Ready {
    /// Calls done: the first one waited for, and every other one there already.
    Calls(Vec<Ran>),
    /// Nothing came before the time given.
    Due,
    /// Every call has sent what came of it.
    Ended,
}

impl<C: Batched> Answer<C> {
    /// Waits for calls done, until `due` if given.
    async fn ready(&mut self, due: Option<tokio::time::Instant>) -> Ready {
        let first = match due {
            None => self.ran.recv().await,
            Some(at) => tokio::select! {
                first = self.ran.recv() => first,
                () = tokio::time::sleep_until(at) => return Ready::Due,
            },
        };
        let Some(first) = first else { return Ready::Ended };
        let mut ready = vec![first];
        while let Ok(more) = self.ran.try_recv() {
            ready.push(more);
        }
        Ready::Calls(ready)
    }

    /// The results of calls done, after the flush that covers them (none is needed for none). A
    /// failed flush fails the calls that needed it (503, as their single calls would).
    async fn flushed(&self, ready: Vec<Ran>) -> Vec<(usize, C::Result)> {
        let flushed = match ready.iter().any(|(_, _, flush)| *flush) {
            true => self.participant.durable().await.map_err(|e| e.to_string()),
            false => Ok(()),
        };
        ready
            .into_iter()
            .filter_map(|(i, done, flush)| {
                let done = match (&flushed, flush) {
                    (Err(e), true) => Err(not_flushed(e.clone())),
                    _ => done,
                };
                Some((i, Self::result(self.ids.get(i)?, done)))
            })
            .collect()
    }

    /// The result of a call whose task ended without answering (it cannot, short of a bug: every
    /// panic of a business method is caught and answered).
    fn lost(&self, i: usize) -> Option<C::Result> {
        let ids = self.ids.get(i)?;
        error!(gid = %ids.gid, branch = %ids.branch, "participant batch call ended without an answer");
        Some(Self::result(ids, Err(panicked())))
    }

    /// The result of the call `ids` in the answer, logged.
    fn result(ids: &Ids, done: Result<Done, ApiError>) -> C::Result {
        match &done {
            Ok(done) => {
                debug!(gid = %ids.gid, branch = %ids.branch, outcome = done.outcome(), "participant {} (batched)", C::KIND)
            }
            Err(e) => {
                debug!(gid = %ids.gid, branch = %ids.branch, code = e.code, "participant {} not done (batched)", C::KIND)
            }
        }
        C::result(done)
    }

    /// Sends the answer lines on `lines` as calls finish: the calls done wait up to [`HOLD`] for
    /// the rest of the batch, then share one flush and one write, so that a batch whose calls
    /// finish together costs one flush, as a whole answer does. Stops early when nobody reads the
    /// lines any more (the calls still run to their end).
    async fn stream(mut self, lines: mpsc::Sender<(Bytes, bool)>) {
        let mut answered = vec![false; self.ids.len()];
        let mut left = self.ids.len();
        let (mut done, mut due) = (Vec::new(), None);
        while left > 0 {
            match self.ready(due).await {
                Ready::Calls(ready) => {
                    for (i, _, _) in &ready {
                        if let Some(seen) = answered.get_mut(*i).filter(|seen| !**seen) {
                            *seen = true;
                            left -= 1;
                        }
                    }
                    done.extend(ready);
                    let at = *due.get_or_insert_with(|| tokio::time::Instant::now() + HOLD);
                    if left > 0 && tokio::time::Instant::now() < at {
                        continue;
                    }
                }
                Ready::Due => {}
                Ready::Ended => break,
            }
            let mut chunk = Vec::new();
            for (i, r) in self.flushed(std::mem::take(&mut done)).await {
                line(&mut chunk, i, &r);
            }
            if lines.send((Bytes::from(chunk), true)).await.is_err() {
                return;
            }
            due = None;
        }
        let mut chunk = Vec::new();
        for (i, r) in self.flushed(done).await {
            line(&mut chunk, i, &r);
        }
        for i in answered.iter().enumerate().filter(|(_, seen)| !**seen).map(|(i, _)| i) {
            if let Some(r) = self.lost(i) {
                line(&mut chunk, i, &r);
            }
        }
        if !chunk.is_empty() {
            let _ = lines.send((Bytes::from(chunk), true)).await;
        }
    }

    /// The whole answer, `{"results": [...]}` in the batch's order, once every call is done, after
    /// one flush.
    async fn whole(mut self) -> Response {
        let mut done = Vec::new();
        while let Ready::Calls(ready) = self.ready(None).await {
            done.extend(ready);
        }
        let mut slots: Vec<Option<C::Result>> =
            std::iter::repeat_with(|| None).take(self.ids.len()).collect();
        for (i, r) in self.flushed(done).await {
            if let Some(slot) = slots.get_mut(i) {
                *slot = Some(r);
            }
        }
        let results: Vec<C::Result> =
            slots.into_iter().enumerate().filter_map(|(i, r)| r.or_else(|| self.lost(i))).collect();
        (StatusCode::OK, Json(Whole { results })).into_response()
    }
}

/// A whole batch answer: [`BatchAnswer`](crate::protocol::BatchAnswer) or
/// [`TryBatchAnswer`](crate::protocol::TryBatchAnswer).
#[derive(Serialize)]
struct Whole<R> {
    results: Vec<R>,
}

/// Appends the answer line of call `i` to `out`.
fn line<R: Serialize>(out: &mut Vec<u8>, i: usize, result: &R) {
    let start = out.len();
    if serde_json::to_writer(&mut *out, &AnswerLine { i, result }).is_err() {
        // The results hold nothing that fails to encode; should one, the call failed.
        out.truncate(start);
        out.extend_from_slice(format!("{{\"i\":{i},\"status\":500}}").as_bytes());
    }
    out.push(b'\n');
}

/// Serves one batch of phase-two calls for operation `name`, streamed when `stream`.
pub(super) async fn serve(
    participant: Arc<Runtime>,
    name: String,
    registered: Registered,
    body: Bytes,
    stream: bool,
) -> Result<Response, ApiError> {
    Ok(run(participant, name, registered, parse(&body)?, stream).await)
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
