//! A remote client's calls to its coordinator, folded into `POST /v1/batch` requests (see
//! [`crate::protocol::coordinator`] for the batch and its answer, [`crate::lane`] for when batches go).
//!
//! Two lanes: calls answered once their write is on disk (begin; confirm and cancel without
//! waiting), and confirms and cancels that wait for phase two. A batch is done when its last answer
//! has come, so a begin never waits behind a phase two.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::value::RawValue;
use url::Url;

use super::{ClientError, coordinator_error};
use crate::lane::{Answer, Carrier, Lane, Reply, take_reply};
use crate::ndjson::{self, ReadError};
use crate::protocol::MAX_BODY;
use crate::protocol::coordinator::{BATCH_PATH, BatchLine, BatchOp, BatchOps, Token, TransactionView};
use crate::transport::{Batching, ClientConfig, error_text, transport_error};

/// A remote client's two lanes to its coordinator.
#[derive(Debug)]
pub(super) struct Lanes {
    batching: Batching,
    quick: Arc<Lane<ToCoordinator>>,
    waiting: Arc<Lane<ToCoordinator>>,
}

impl Lanes {
    /// The lanes to the coordinator at `base`, or `None` when `batching` sends every call alone.
    pub(super) fn new(
        base: &Url,
        token: Option<Token>,
        http: reqwest::Client,
        batching: Batching,
    ) -> Result<Option<Lanes>, ClientError> {
        if batching.max_calls <= 1 {
            return Ok(None);
        }
        let url = base.join(BATCH_PATH).map_err(|e| ClientError::Invalid(format!("coordinator URL: {e}")))?;
        let lane = || {
            Arc::new(Lane::new(ToCoordinator { url: url.clone(), token: token.clone(), http: http.clone() }))
        };
        Ok(Some(Lanes { batching, quick: lane(), waiting: lane() }))
    }

    /// Sends `op` in a batch: its answer, or `None` when the coordinator takes no batches and the
    /// caller is to send `op` alone. `wait` is how long the operation waits for phase two.
    pub(super) async fn call(
        &self,
        op: BatchOp,
        wait: Duration,
    ) -> Option<Result<TransactionView, ClientError>> {
        // An operation the coordinator would find malformed (a zero timeout, say) would get the
        // whole batch refused, and batching turned off for a while: it goes alone, and gets its
        // own answer.
        op.check().ok()?;
        let lane = if wait.is_zero() { &self.quick } else { &self.waiting };
        match lane.call(self.batching, (op, wait)).await {
            Reply::Done(answer) => Some(answer),
            Reply::Alone => None,
        }
    }
}

/// Sends batches to one coordinator.
#[derive(Debug)]
pub(super) struct ToCoordinator {
    /// `{base}/v1/batch`.
    url: Url,
    token: Option<Token>,
    http: reqwest::Client,
}

/// Longest answer line read: one transaction, at most a request body's worth of payloads, encoded.
const MAX_LINE: usize = 4 * MAX_BODY;

impl Carrier for ToCoordinator {
    type Call = (BatchOp, Duration);
    type Answer = Result<TransactionView, ClientError>;

    async fn send(
        &self,
        calls: Vec<(BatchOp, Duration)>,
        replies: &mut [Option<Answer<Self>>],
    ) -> Result<(), String> {
        let wait = calls.iter().map(|(_, w)| *w).max().unwrap_or_default();
        let ops = BatchOps { ops: calls.into_iter().map(|(op, _)| op).collect() };
        let body = serde_json::to_vec(&ops).map_err(|e| format!("the batch does not encode: {e}"))?;
        let mut req = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if !wait.is_zero() {
            // The waits happen on the server: give the request that much longer than usual, as a
            // single confirm or cancel with a wait gets.
            req = req.timeout(ClientConfig::default().request_timeout + wait);
        }
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        let fail_all = |replies: &mut [Option<Answer<Self>>], e: &dyn Fn() -> ClientError| {
            for reply in replies.iter_mut().filter_map(Option::take) {
                let _ = reply.send(Reply::Done(Err(e())));
            }
        };
        let mut res = match req.send().await {
            Ok(res) => res,
            Err(e) => {
                let e = transport_error(&e).to_string();
                fail_all(replies, &|| ClientError::Unreachable(e.clone()));
                return Ok(());
            }
        };
        let status = res.status();
        if status != StatusCode::OK {
            // What the single requests would have been answered too: a coordinator that is down or
            // overloaded, or a wrong token. Anything else (no batch route on an older coordinator)
            // sends the calls alone.
            let whole = status.is_server_error()
                || matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
                || matches!(status.as_u16(), 408 | 429);
            if !whole {
                return Err(format!("the coordinator answered {status} to a batch"));
            }
            let text = error_text(res).await;
            fail_all(replies, &|| coordinator_error(status.as_u16(), text.clone()));
            return Ok(());
        }
        match ndjson::read_lines(&mut res, MAX_LINE, |line| answer(line, replies)).await {
            Ok(()) => {}
            Err(ReadError::Transport(e)) => {
                let e = transport_error(&e).to_string();
                fail_all(replies, &|| ClientError::Unreachable(e.clone()));
            }
            Err(ReadError::Line(e)) => fail_all(replies, &|| ClientError::Unreachable(e.clone())),
        }
        Ok(())
    }

    fn dropped() -> Result<TransactionView, ClientError> {
        Err(ClientError::Unreachable(
            "the coordinator's batch answer ended without answering this call".into(),
        ))
    }

    fn destination(&self) -> String {
        crate::lane::without_query(&self.url)
    }
}

/// Hands the answer on `line` to its caller; an error when the line is not an answer line.
fn answer(line: &[u8], replies: &mut [Option<Answer<ToCoordinator>>]) -> Result<(), String> {
    let unreadable = |e: serde_json::Error| format!("unreadable batch answer from the coordinator: {e}");
    // The body is decoded once the status says what it is.
    let line: BatchLine<&RawValue> = serde_json::from_slice(line).map_err(unreadable)?;
    let reply = take_reply(replies, line.i)?;
    let result = if (200..300).contains(&line.status) {
        serde_json::from_str::<TransactionView>(line.body.get())
            .map_err(|e| ClientError::Unreachable(format!("unreadable answer from the coordinator: {e}")))
    } else {
        Err(coordinator_error(line.status, line.body.get().to_owned()))
    };
    let _ = reply.send(Reply::Done(result));
    Ok(())
}
