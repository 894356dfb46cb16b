//! `POST /v1/batch`: several begins, confirms and cancels in one request.
//!
//! An initiator process running many transactions at once folds its calls to the coordinator into
//! batches ([`TccClient`](crate::client::TccClient) does this by itself), as the coordinator folds
//! its phase-two calls to a participant. Each operation means exactly what its single request
//! means and gets the answer that request would get; the operations of one batch run concurrently,
//! and share flushes.
//!
//! The request is a JSON [`BatchOps`]. A well-formed batch is answered `200` with
//! `application/x-ndjson`: one [`BatchLine`] per operation, in the order they finish, each written
//! once that operation is done, so a confirm waiting for a slow phase two holds up no other answer.
//! (The lines of the operations that do not wait are written together, when the last of them is
//! done: they finish within a flush or two of each other, and one write is cheaper than many.)
//!
//! A batch that does not parse is refused as a whole (400), with the usual error answer, and
//! nothing in it is done; so is one holding an operation whose own request would be malformed (a
//! bad id, a milliseconds option of 0 or past an int64: what the OpenAPI document calls invalid).
//! So are a batch over [`MAX_BATCH_OPS`] operations (422) or [`MAX_BODY`](crate::protocol::MAX_BODY)
//! bytes (413), and one without the token (401). What only the engine can judge (an unknown
//! transaction, a timeout past the server's limit, a participant not allowed) is answered per
//! operation. A client that stops reading (the connection drops) stops the waits of the
//! operations not yet answered; what was decided stays decided.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tcc_core::{Decision, Transaction};
use tokio::sync::mpsc;

use super::AppState;
use super::native::{self, TransactionView, WaitQuery};
use crate::error::{ApiError, ApiJson};
use crate::ndjson::{self, Lines};
use crate::protocol::ErrorBody;

pub use crate::protocol::coordinator::{BATCH_PATH, BatchLine, BatchOp, BatchOps, DecideOp, MAX_BATCH_OPS};

/// Runs several begins, confirms and cancels concurrently, answering each as its own request would
/// be answered, one JSON line per operation: `{"i": INDEX, "status": STATUS, "body": TRANSACTION
/// or ERROR}`, each as soon as it is done (the lines of operations that do not wait for phase two
/// together, once the last of them is).
#[utoipa::path(post, path = "/v1/batch", tag = "transactions", request_body = BatchOps,
    responses(
        (status = 200, description = "One line per operation, in the order they finish: `{\"i\": INDEX, \"status\": STATUS, \"body\": BODY}`, where STATUS and BODY are what the operation's single request would have been answered (a transaction, or an error body)", content_type = "application/x-ndjson"),
        (status = 400, description = "Malformed batch: none of it runs", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 422, description = "Over 1,024 operations: none of them runs", body = ErrorBody),
    ))]
pub(crate) async fn batch(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<BatchOps>,
) -> Result<Response, ApiError> {
    let count = req.ops.len();
    if count > MAX_BATCH_OPS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "limit_exceeded",
            format!("a batch carries at most {MAX_BATCH_OPS} operations, not {count}"),
        ));
    }
    for (i, op) in req.ops.iter().enumerate() {
        op.check().map_err(|e| ApiError::malformed(format!("operation {i}: {}", e.message)))?;
    }
    let (lines, rx) = mpsc::channel(count.max(1));
    let quick = req.ops.iter().filter(|op| !op.waits()).count();
    for (i, op) in req.ops.into_iter().enumerate() {
        let (state, lines) = (Arc::clone(&state), lines.clone());
        tokio::spawn(async move {
            let (started, route, waits) = (Instant::now(), op.route(), op.waits());
            let answered = tokio::select! {
                answered = run(&state, op) => answered,
                // Nobody reads the answer any more: stop waiting (a decision taken stays taken).
                () = lines.closed() => return,
            };
            let status = answered.as_ref().map_or_else(|e| e.status, |(s, _)| *s);
            state.metrics.observe_request("POST", route, status.as_u16(), started.elapsed());
            let _ = lines.send((line(i, answered), waits)).await;
        });
    }
    let body = Lines::new(rx, quick);
    Ok(([(header::CONTENT_TYPE, ndjson::CONTENT_TYPE)], Body::new(body)).into_response())
}

impl BatchOp {
    /// The route of the operation's single request: each operation is counted in the request
    /// metrics under it, as if it had come alone (the batch itself is counted under its own route).
    fn route(&self) -> &'static str {
        match self {
            BatchOp::Begin(_) => "/v1/transactions",
            BatchOp::Confirm(_) => "/v1/transactions/{gid}/confirm",
            BatchOp::Cancel(_) => "/v1/transactions/{gid}/cancel",
        }
    }

    /// Whether the operation waits for phase two (and so may take long).
    fn waits(&self) -> bool {
        match self {
            BatchOp::Begin(_) => false,
            BatchOp::Confirm(op) | BatchOp::Cancel(op) => op.wait_ms.is_some_and(|ms| ms > 0),
        }
    }
}

async fn run(state: &AppState, op: BatchOp) -> Result<(StatusCode, Transaction), ApiError> {
    match op {
        BatchOp::Begin(req) => Ok((StatusCode::CREATED, native::begin_tx(state, req).await?)),
        BatchOp::Confirm(op) => decide(state, op, Decision::Confirm).await,
        BatchOp::Cancel(op) => decide(state, op, Decision::Cancel).await,
    }
}

async fn decide(
    state: &AppState,
    op: DecideOp,
    decision: Decision,
) -> Result<(StatusCode, Transaction), ApiError> {
    // `wait_ms` was checked with the whole batch (`BatchOp::check`).
    let wait = WaitQuery { wait_ms: op.wait_ms };
    let gid = native::parse_gid(&op.gid)?;
    Ok((StatusCode::OK, native::decide_tx(state, &gid, decision, wait).await?))
}

/// One answer line: `{"i":I,"status":S,"body":B}` and a newline.
fn line(i: usize, answered: Result<(StatusCode, Transaction), ApiError>) -> Bytes {
    let (status, body) = match answered {
        Ok((status, tx)) => (status, serde_json::to_vec(&TransactionView::from(&tx))),
        Err(e) => (e.status, serde_json::to_vec(&e.body())),
    };
    // Neither body can fail to encode (no maps with non-string keys, no failing serializers).
    let body = body.unwrap_or_else(|_| b"null".to_vec());
    let mut out = Vec::with_capacity(body.len() + 32);
    out.extend_from_slice(format!("{{\"i\":{i},\"status\":{},\"body\":", status.as_u16()).as_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}
