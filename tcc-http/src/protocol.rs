//! The wire protocol between initiators, the coordinator and participants (the native one; the
//! DTM-compatible one is in `tcc_http::server::dtm`).
//!
//! A branch's *target* is the base URL of one TCC operation at a participant, for example
//! `http://127.0.0.1:8081/tcc/flights/hold_seat`. Its three phases are
//!
//! | phase   | request                  | body                                   | success |
//! |---------|--------------------------|----------------------------------------|---------|
//! | try     | `POST {target}/try`      | the request                            | 200, the result as the body |
//! | confirm | `POST {target}/confirm`  | the payload registered with the branch | 200 |
//! | cancel  | `POST {target}/cancel`   | the payload registered with the branch | 200 |
//!
//! Every call carries the transaction id, the branch id and the transaction's deadline in the
//! headers [`GID_HEADER`], [`BRANCH_HEADER`] and [`DEADLINE_HEADER`] (unix milliseconds), so a
//! participant cut off from the coordinator still knows when to release what it holds.
//!
//! Answers other than 200 carry an [`ErrorBody`]. The coordinator reads them as follows:
//! - 409 ([`REFUSED`]): the participant refused (business refusal, late try, suspended try). At try,
//!   the initiator cancels the transaction. Confirm and cancel are never refused for business
//!   reasons, so at phase two it is a permanent failure and the transaction is flagged.
//! - 410 ([`GONE`]): the reservation expired on the participant's own deadline: permanent.
//! - 400, 404, 405, 413, 422 and other 4xx: the call can never succeed as made: permanent.
//! - 3xx: never followed (the coordinator would otherwise call a URL nobody allowed): permanent.
//! - 408, 425, 429, 5xx, timeouts and connection errors: transient, retried with backoff.
//!
//! ## Phase-two batches
//! A busy coordinator folds the confirms and cancels it owes one operation into one request,
//! `POST {target}/batch` with a JSON [`BatchRequest`]. Each call in it means exactly what the single
//! call with the same transaction id, branch id and deadline means (a batch carries no payloads: a
//! participant serving batches keeps what the try asked, as the tcc runtime's barrier does). The
//! participant answers 200 with one [`BatchResult`] per call, each with the status and error body the
//! single call would have answered, read by the rules above, in one of two forms (see "Streamed
//! answers" below): a [`BatchAnswer`], or a stream of [`AnswerLine`]s. A call's result is given
//! only once everything that call changed is on disk. A batch answered with
//! anything else is read as a whole: 408, 425, 429, 5xx and transport errors are transient for every
//! call in it; any other status (a participant that serves no batches answers 404) makes the
//! coordinator send those calls one by one, and for a while every call to that target.
//!
//! ## Batches of tries
//! An initiator with many transactions under way (the tcc client shared by its tasks) folds the
//! tries it sends one operation at once into one request, `POST {target}/tries` with a JSON
//! [`TryBatch`]. Each try in it means exactly what the single try with the same transaction id,
//! branch id, deadline and request body means (the request travels as text: a try whose request is
//! not UTF-8 is sent alone). The participant answers 200 with one [`TryResult`] per try, with the
//! status the single try would have answered and its result body or its error body, in one of two
//! forms (see "Streamed answers" below): a [`TryBatchAnswer`], or a stream of [`AnswerLine`]s. A
//! try's result is given only once everything that try changed is on disk. A batch answered with
//! anything else is read as a whole, as a phase-two batch is: 408, 425,
//! 429, 5xx and transport errors fail every try in it as they would fail a single try; any other
//! status (a participant that serves no batches of tries answers 404) makes the initiator send
//! those tries one by one, and for a while every try to that target.
//!
//! ## Streamed answers
//! The tcc clients send both kinds of batch with `Accept: application/x-ndjson, application/json`,
//! and read either answer:
//! - `application/json`: one object, `{"results": [...]}`, a result per call in the batch's order,
//!   given once every call is done. Simple to write by hand; but one slow call holds up every
//!   other call's answer.
//! - `application/x-ndjson`: one [`AnswerLine`] per call, `{"i": INDEX, ...result}` and a newline,
//!   in the order the calls finish, each written once what its call changed is on disk. The tcc
//!   participant runtime answers so whenever the request accepts it: one slow business method then
//!   holds up its own call's answer only. (It holds lines up to 10 ms for the rest of their batch,
//!   so that a batch finishing together goes in one write, with the answer's head.) A call the stream ends without answering fails as a
//!   call whose batch failed in transit; a line that does not decode, answers a call the batch
//!   does not have, or answers one twice is read as an answer that is not a batch answer.

pub mod coordinator;
pub mod dtm;

use http::StatusCode;
use serde::{Deserialize, Serialize};

/// Header carrying the global transaction id.
pub const GID_HEADER: &str = "tcc-gid";
/// Header carrying the branch id.
pub const BRANCH_HEADER: &str = "tcc-branch";
/// Header carrying the transaction's deadline, in milliseconds since the unix epoch.
pub const DEADLINE_HEADER: &str = "tcc-deadline";

/// Path suffix of the try phase under a branch target.
pub const TRY_PATH: &str = "try";
/// Path suffix of the confirm phase under a branch target.
pub const CONFIRM_PATH: &str = "confirm";
/// Path suffix of the cancel phase under a branch target.
pub const CANCEL_PATH: &str = "cancel";

/// Path suffix of a saga step's action, or a message's action, under a step's target.
pub const ACTION_PATH: &str = "action";
/// Path suffix of a saga step's compensation under a step's target.
pub const COMPENSATE_PATH: &str = "compensate";
/// Path, under a participant's routes, of the back-check of the messages whose local transactions
/// it runs (`GET {base}/back-check?gid=...`).
pub const BACK_CHECK_PATH: &str = "back-check";

/// Path suffix of a phase-two batch under a branch target.
pub const BATCH_PATH: &str = "batch";
/// Path suffix of a batch of tries under a branch target.
pub const TRIES_PATH: &str = "tries";
/// Most calls one batch may carry; a participant answers 413 to a longer one.
pub const MAX_BATCH_CALLS: usize = 1024;

/// Status of a refusal by a participant.
pub const REFUSED: StatusCode = StatusCode::CONFLICT;
/// Status of a call for a reservation the participant already released on its own deadline.
pub const GONE: StatusCode = StatusCode::GONE;

/// Largest request body the coordinator and participants accept: 1 MiB.
pub const MAX_BODY: usize = 1 << 20;

/// The one shape of every error answer, from the coordinator and from participants.
///
/// ```
/// let body: tcc_http::protocol::ErrorBody =
///     serde_json::from_str(r#"{"code":"not_found","message":"transaction x not found"}"#).unwrap();
/// assert_eq!(body.code, "not_found");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// A stable machine-readable code, for example `not_found` or `illegal_transition`.
    pub code: String,
    /// A human-readable explanation.
    pub message: String,
    /// Machine-readable details, when there are any: for a participant's business refusal, the
    /// refusal itself as JSON (the typed error a `#[tcc]` client decodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// The body of `POST {target}/batch`: phase-two calls for one operation.
///
/// ```
/// use tcc_http::protocol::{BatchCall, BatchRequest};
/// use tcc_core::Decision;
/// let body = r#"{"calls":[{"gid":"g1","branch":"b1","deadline":1700000000000,"decision":"confirm"}]}"#;
/// let batch: BatchRequest = serde_json::from_str(body).unwrap();
/// assert_eq!(batch.calls[0], BatchCall {
///     gid: "g1".into(), branch: "b1".into(), deadline: 1_700_000_000_000, decision: Decision::Confirm,
/// });
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The calls, at most [`MAX_BATCH_CALLS`].
    pub calls: Vec<BatchCall>,
}

/// One call of a [`BatchRequest`]: what the headers of a single call say, and its phase.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchCall {
    /// The global transaction id (as in [`GID_HEADER`]).
    pub gid: String,
    /// The branch id (as in [`BRANCH_HEADER`]).
    pub branch: String,
    /// The transaction's deadline, in milliseconds since the unix epoch (as in [`DEADLINE_HEADER`]).
    pub deadline: u64,
    /// Confirm or cancel: `"confirm"` or `"cancel"`.
    #[serde(with = "decision_text")]
    pub decision: tcc_core::Decision,
}

impl BatchCall {
    /// The phase path of the single call this stands for: [`CONFIRM_PATH`] or [`CANCEL_PATH`].
    pub fn phase(&self) -> &'static str {
        decision_text::phase(self.decision)
    }
}

/// The answer to a [`BatchRequest`]: one result per call, in the request's order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchAnswer {
    /// The results.
    pub results: Vec<BatchResult>,
}

/// What one call of a batch came to: the status the single call would have answered, and its
/// error body when that status is not 200.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResult {
    /// The HTTP status of the single call.
    pub status: u16,
    /// What the participant did (`confirmed`, `cancelled`, `duplicate`, `empty`, `expired`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Why the call was not done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// One line of a streamed batch answer (`application/x-ndjson`): the index of the call it answers
/// in the batch, and that call's result ([`BatchResult`] or [`TryResult`]) beside it.
///
/// ```
/// use tcc_http::protocol::{AnswerLine, BatchResult};
/// let line: AnswerLine<BatchResult> =
///     serde_json::from_str(r#"{"i":3,"status":200,"outcome":"confirmed"}"#).unwrap();
/// assert_eq!((line.i, line.result.status), (3, 200));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerLine<T> {
    /// The index of the call in the batch.
    pub i: usize,
    /// What the call came to.
    #[serde(flatten)]
    pub result: T,
}

/// The body of `POST {target}/tries`: tries of one operation.
///
/// ```
/// use tcc_http::protocol::TryBatch;
/// let body = r#"{"tries":[{"gid":"g1","branch":"b1","deadline":1700000000000,"request":"{\"seat\":\"1A\"}"}]}"#;
/// let batch: TryBatch = serde_json::from_str(body).unwrap();
/// assert_eq!(batch.tries[0].request, r#"{"seat":"1A"}"#);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TryBatch {
    /// The tries, at most [`MAX_BATCH_CALLS`].
    pub tries: Vec<TryCall>,
}

/// One try of a [`TryBatch`]: what the headers and the body of a single try say.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TryCall {
    /// The global transaction id (as in [`GID_HEADER`]).
    pub gid: String,
    /// The branch id (as in [`BRANCH_HEADER`]).
    pub branch: String,
    /// The transaction's deadline, in milliseconds since the unix epoch (as in [`DEADLINE_HEADER`]).
    pub deadline: u64,
    /// The try's request body.
    pub request: String,
}

/// The answer to a [`TryBatch`]: one result per try, in the request's order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TryBatchAnswer {
    /// The results.
    pub results: Vec<TryResult>,
}

/// What one try of a batch came to: the status the single try would have answered, and its result
/// (status 200) or its error body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TryResult {
    /// The HTTP status of the single try.
    pub status: u16,
    /// The try's result, when it is UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The try's result, when it is not UTF-8 text: its bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<Vec<u8>>,
    /// Why the try was not done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl TryResult {
    /// The result of a try that was done: `result` as text when it is UTF-8, else as bytes.
    pub fn done(result: Vec<u8>) -> TryResult {
        match String::from_utf8(result) {
            Ok(text) => TryResult { status: 200, body: Some(text), bytes: None, error: None },
            Err(e) => TryResult { status: 200, body: None, bytes: Some(e.into_bytes()), error: None },
        }
    }

    /// The result bytes of a try that was done (empty when neither field is there).
    pub fn result(self) -> Vec<u8> {
        match (self.body, self.bytes) {
            (Some(text), _) => text.into_bytes(),
            (None, Some(bytes)) => bytes,
            (None, None) => Vec::new(),
        }
    }
}

/// A decision on the wire: `"confirm"` or `"cancel"`, as the phase paths spell them.
mod decision_text {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use tcc_core::Decision;

    use super::{CANCEL_PATH, CONFIRM_PATH};

    pub fn phase(d: Decision) -> &'static str {
        match d {
            Decision::Confirm => CONFIRM_PATH,
            Decision::Cancel => CANCEL_PATH,
        }
    }

    pub fn serialize<S: Serializer>(d: &Decision, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(phase(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Decision, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        match &*text {
            CONFIRM_PATH => Ok(Decision::Confirm),
            CANCEL_PATH => Ok(Decision::Cancel),
            other => Err(D::Error::custom(format!(
                "decision {other:?}: expected {CONFIRM_PATH:?} or {CANCEL_PATH:?}"
            ))),
        }
    }
}
