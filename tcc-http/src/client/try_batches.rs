//! An initiator's tries, folded into `POST {target}/tries` requests, one lane per participant
//! operation (see [`crate::protocol`], "Batches of tries", for the batch and its answer, and
//! [`crate::lane`] for when batches go).
//!
//! Tries of many transactions under way at once share requests; a lone try goes at once, as a batch
//! of one. Each try gets the answer its own request would have got. A try whose request is not text
//! or is longer than [`MAX_BATCHED_REQUEST`] goes alone, and so does every try to an operation that
//! serves no batches of tries (for [`crate::lane::ALONE_FOR`] after it refused one).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use reqwest::StatusCode;
use tcc_core::{BranchId, Gid, Timestamp};
use url::Url;

use super::ClientError;
use crate::lane::{Answer, Carrier, Lane, Reply, take_reply};
use crate::ndjson::{self, ReadError};
use crate::protocol::{
    AnswerLine, ErrorBody, GONE, MAX_BODY, REFUSED, TRIES_PATH, TryBatch, TryBatchAnswer, TryCall, TryResult,
};
use crate::transport::{
    Batching, ClientConfig, bounded_body, classify, error_text, phase_url, transport_error,
};

/// Most tries in one batch. With requests of at most [`MAX_BATCHED_REQUEST`] bytes (up to six times
/// that once escaped as JSON text) and their ids, a batch stays under a participant's body limit.
const MAX_TRIES: usize = 128;

/// Longest request sent in a batch; a longer one goes alone.
const MAX_BATCHED_REQUEST: usize = 1024;

/// Most operations given lanes; tries to further ones go alone.
const MAX_LANES: usize = 1024;

/// Longest whole batch answer read: every try's result.
const MAX_ANSWER: usize = 16 * MAX_BODY;

/// Longest line of a streamed batch answer read: one try's result (at most a body's worth, up to
/// six times that once escaped as JSON text).
const MAX_LINE: usize = 6 * MAX_BODY + 1024;

/// A client's lanes of tries, one per participant operation.
#[derive(Debug)]
pub(super) struct TryLanes {
    batching: Batching,
    http: reqwest::Client,
    lanes: Mutex<HashMap<String, Arc<Lane<ToParticipant>>>>,
}

impl TryLanes {
    /// The lanes, or `None` when `batching` sends every try alone.
    pub(super) fn new(http: reqwest::Client, batching: Batching) -> Option<TryLanes> {
        (batching.max_calls > 1).then(|| TryLanes {
            batching: Batching { max_calls: batching.max_calls.min(MAX_TRIES), ..batching },
            http,
            lanes: Mutex::default(),
        })
    }

    /// Sends the try of branch `branch` of transaction `gid` (deadline `deadline`) with `request` to
    /// the operation at `target` in a batch: its answer, or `None` when the caller is to send it
    /// alone (its request is not UTF-8 text or is longer than [`MAX_BATCHED_REQUEST`], or the
    /// operation takes no batches of tries).
    pub(super) async fn call(
        &self,
        target: &Url,
        gid: &Gid,
        branch: &BranchId,
        deadline: Timestamp,
        request: &[u8],
    ) -> Option<Result<Bytes, ClientError>> {
        if request.len() > MAX_BATCHED_REQUEST {
            return None;
        }
        let request = std::str::from_utf8(request).ok()?.to_owned();
        let call =
            TryCall { gid: gid.to_string(), branch: branch.to_string(), deadline: deadline.0, request };
        let lane = self.lane(target)?;
        match lane.call(self.batching, call).await {
            Reply::Done(answer) => Some(answer),
            Reply::Alone => None,
        }
    }

    fn lane(&self, target: &Url) -> Option<Arc<Lane<ToParticipant>>> {
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(lane) = lanes.get(target.as_str()) {
            return Some(Arc::clone(lane));
        }
        if lanes.len() >= MAX_LANES {
            return None;
        }
        let url = phase_url(target, TRIES_PATH);
        let lane = Arc::new(Lane::new(ToParticipant { url, http: self.http.clone() }));
        lanes.insert(target.as_str().to_owned(), Arc::clone(&lane));
        Some(lane)
    }
}

/// The answer to a try that was not done, read as a single try's answer is read: a refusal (409)
/// or an expired reservation (410) with an error body is the participant's [`ClientError::Refused`];
/// anything else failed the try. `text` is the answer's body as text, for when it is not an error
/// body.
pub(super) fn try_error(
    branch: &str,
    status: StatusCode,
    body: Option<ErrorBody>,
    text: String,
) -> ClientError {
    match (status, body) {
        (REFUSED | GONE, Some(b)) => ClientError::Refused {
            branch: branch.to_owned(),
            code: b.code,
            message: b.message,
            detail: b.detail,
        },
        (_, body) => ClientError::TryFailed {
            branch: branch.to_owned(),
            message: format!("participant answered {status}: {}", body.map_or(text, |b| b.message)),
        },
    }
}

/// One try's result in a batch answer, as its single answer would have been read.
fn read_result(branch: &str, result: TryResult) -> Result<Bytes, ClientError> {
    match StatusCode::from_u16(result.status) {
        Ok(status) if status.is_success() => Ok(Bytes::from(result.result())),
        Ok(status) => Err(try_error(branch, status, result.error, String::new())),
        Err(_) => Err(ClientError::TryFailed {
            branch: branch.to_owned(),
            message: format!("participant answered status {} for a batched try", result.status),
        }),
    }
}

/// Sends one participant operation's batches of tries.
#[derive(Debug)]
struct ToParticipant {
    /// `{target}/tries`.
    url: Url,
    http: reqwest::Client,
}

impl Carrier for ToParticipant {
    type Call = TryCall;
    type Answer = Result<Bytes, ClientError>;

    async fn send(&self, calls: Vec<TryCall>, replies: &mut [Option<Answer<Self>>]) -> Result<(), String> {
        let branches: Vec<String> = calls.iter().map(|c| c.branch.clone()).collect();
        let fail_all = |replies: &mut [Option<Answer<Self>>], message: &str| {
            for (reply, branch) in replies.iter_mut().zip(&branches) {
                if let Some(reply) = reply.take() {
                    let e = ClientError::TryFailed { branch: branch.clone(), message: message.to_owned() };
                    let _ = reply.send(Reply::Done(Err(e)));
                }
            }
        };
        let body = serde_json::to_vec(&TryBatch { tries: calls })
            .map_err(|e| format!("the batch of tries does not encode: {e}"))?;
        let res = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, ndjson::ACCEPT)
            .timeout(ClientConfig::default().request_timeout)
            .body(body)
            .send()
            .await;
        let mut res = match res {
            Ok(res) => res,
            Err(e) => {
                fail_all(replies, &transport_error(&e).to_string());
                return Ok(());
            }
        };
        let status = res.status();
        if status != StatusCode::OK {
            // 408, 425, 429 and 5xx fail each try as they would fail it alone; anything else means
            // the operation takes no batches of tries.
            return match classify(status, error_text(res).await) {
                tcc_core::transport::CallError::Transient(m) => {
                    fail_all(replies, &m);
                    Ok(())
                }
                tcc_core::transport::CallError::Permanent(m) => Err(m),
            };
        }
        if ndjson::is_ndjson(&res) {
            let read = ndjson::read_lines(&mut res, MAX_LINE, |line| {
                let line: AnswerLine<TryResult> = serde_json::from_slice(line)
                    .map_err(|e| format!("an answer line of a batch of tries does not decode: {e}"))?;
                let branch = branches.get(line.i).map_or("", String::as_str);
                let reply = take_reply(replies, line.i)?;
                let _ = reply.send(Reply::Done(read_result(branch, line.result)));
                Ok(())
            })
            .await;
            return match read {
                Ok(()) => Ok(()),
                Err(ReadError::Transport(e)) => {
                    fail_all(replies, &transport_error(&e).to_string());
                    Ok(())
                }
                Err(ReadError::Line(why)) => Err(why),
            };
        }
        let bytes = match bounded_body(&mut res, MAX_ANSWER).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Err(format!("the answer to a batch of tries is over {MAX_ANSWER} bytes")),
            Err(e) => {
                fail_all(replies, &transport_error(&e).to_string());
                return Ok(());
            }
        };
        let answer: TryBatchAnswer = serde_json::from_slice(&bytes)
            .map_err(|e| format!("the answer to a batch of tries does not decode: {e}"))?;
        if answer.results.len() != branches.len() {
            return Err(format!("{} results answered for {} tries", answer.results.len(), branches.len()));
        }
        for ((reply, result), branch) in replies.iter_mut().zip(answer.results).zip(&branches) {
            if let Some(reply) = reply.take() {
                let _ = reply.send(Reply::Done(read_result(branch, result)));
            }
        }
        Ok(())
    }

    fn dropped() -> Result<Bytes, ClientError> {
        Err(ClientError::TryFailed {
            branch: String::new(),
            message: "the batch carrying this try was dropped".into(),
        })
    }

    fn destination(&self) -> String {
        crate::lane::without_query(&self.url)
    }
}
