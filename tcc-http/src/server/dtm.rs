//! The DTM-compatible API: DTM's TCC, saga and two-phase message protocols under `/api/dtmsvr`, so
//! that unmodified DTM clients (for example the PyPI package `dtmcli` or Go's `dtmcli`) run their
//! transactions on tcc.
//!
//! # Calls
//!
//! | call | request | what tcc does |
//! |------|---------|---------------|
//! | `GET newGid` | | `{"gid": "...", "dtm_result": "SUCCESS"}`, a fresh time-ordered id |
//! | `POST prepare` | `{"gid", "trans_type": "tcc", TransOptions...}` | begins the transaction; again while it is `prepared`: success |
//! | `POST registerBranch` (alias `registerTccBranch`) | `{"gid", "trans_type", "branch_id", "confirm", "cancel", "data"}`, every value a string | registers the branch; `data` is handed back as the body of confirm or cancel |
//! | `POST submit` | `{"gid", "trans_type", "wait_result"?}` | decides confirm |
//! | `POST abort` | `{"gid", "trans_type", "wait_result"?}` | decides cancel |
//! | `GET query?gid=` | | `{"transaction": {...}, "branches": [...]}` |
//! | `POST submit` (`trans_type: "saga"`) | `{"gid", "steps": [{"action", "compensate"}], "payloads": [...], "custom_data"?, TransOptions...}` | begins the saga and runs it; again: success |
//! | `POST prepare` (`trans_type: "msg"`) | `{"gid", "steps": [{"action"}], "payloads", "query_prepared", TransOptions...}` | prepares the message; again while prepared: success |
//! | `POST submit` (`trans_type: "msg"`) | `{"gid", ...}` | submits a prepared message; one never prepared is prepared and submitted at once (with its `steps`) |
//! | `POST abort` (`trans_type: "msg"`) | `{"gid"}` | aborts a prepared message: no action is ever called |
//!
//! The try is called by the client itself, as in DTM. Fields DTM clients send that mean nothing for
//! a kind (`custom_data` for TCC, `rollback_reason`, ...) are ignored. Options tcc cannot honour are
//! refused with 400 rather than silently dropped: non-empty `branch_headers`, `passthrough_headers`
//! or `bin_payloads` (Go's byte payloads; send `payloads`), and a `protocol` other than HTTP. A
//! `trans_type` other than `tcc`, `saga` and `msg` is refused with 400 (absent means `tcc`), and so
//! is a kind on a call it has no use for (`registerBranch` of a saga, `prepare` or `abort` of a saga).
//!
//! # Sagas
//!
//! Step `i` (from 0) is DTM branch `01`, `02`, ...: its action and compensation are called with
//! `trans_type=saga`, `op=action` or `op=compensate`, its payload as the body. Steps run one at a
//! time in order; with `custom_data` `{"concurrent": true, "orders": {"2": [0, 1]}}` (or a top-level
//! `"concurrent": true`) every step runs as soon as the steps its `orders` entry names are done
//! (an order naming a missing step, or a cycle, is refused with 400, nothing stored). An action
//! answering 409 or `FAILURE` fails the saga: every step that ran or may have run is compensated, in
//! reverse order, and later steps never run. Any other failure is retried under the retry policy.
//! A compensation is retried until it succeeds; the saga is flagged once the policy is spent. A
//! saga still running at its deadline (`timeout_to_fail`, or the server's default) starts no new
//! action and is compensated. `wait_result` answers 200 once the saga succeeded and 409 `FAILURE`
//! once it failed (compensated), as DTM does.
//!
//! Differences from DTM: DTM remembers which actions it started only in memory, so a saga that
//! fails after a coordinator restart compensates only the actions recorded as finished; tcc records
//! each round before the next starts and compensates every step whose predecessors were done (an
//! empty compensation where the action never ran, which the participant's barrier absorbs). DTM
//! retries failing compensations forever in silence; tcc flags the saga for an operator. DTM's
//! default `timeout_to_fail` for a saga is none; tcc's is the server's default timeout. Every step
//! needs both URLs (DTM allows an empty compensation).
//!
//! # Messages
//!
//! A message's actions are called in order with `trans_type=msg`, `op=action`, each until it
//! succeeds (flagged once the retry policy is spent). A message still prepared at its deadline is
//! resolved by `GET query_prepared` with `gid`, `trans_type=msg`, `branch_id=00`, `op=msg` (as DTM
//! and `dtmcli`'s `do_and_submit` ask it): a 2xx without `FAILURE` or `ONGOING` submits it; 409 or
//! `FAILURE` aborts it; anything else asks again later, with backoff, and flags it once the policy
//! is spent (DTM asks forever). A submit is accepted whenever the message is prepared, even past
//! its deadline: the local transaction committed, which is all a submit says.
//!
//! # Results
//!
//! As in DTM (`dtmutil.WrapHandler2`), the status is what a client acts on:
//!
//! | status | body | meaning |
//! |--------|------|---------|
//! | 200 | `{"dtm_result": "SUCCESS"}` (never the word `FAILURE`) | done |
//! | 409 | `{"dtm_result": "FAILURE", "code", "message"}` | refused: an illegal state (registering, submitting or aborting after the other decision; registering or submitting past the deadline) or an unknown gid |
//! | 425 | `{"dtm_result": "ONGOING", "code", "message"}` | `wait_result`: decided, phase two still running (retrying) |
//! | 400, 413, 422 | `{"dtm_result": "FAILURE", "code", "message"}` | malformed request (400), too large (413), a participant URL the allow-list refuses or a value over the coordinator's limits (422); nothing stored |
//! | 401 | tcc's error body | a token is configured and the request has none (answered before this module) |
//! | 500, 503 | `{"code", "message"}` | `wait_result` on a transaction flagged for an operator; storage failure; try again |
//!
//! Every 4xx body carries `FAILURE`, so clients that read the body (DTM's pre-1.10 convention) see a
//! failure too. `dtmcli` (Python) raises `DTMFailureError` on 409 and a plain exception on any other
//! non-200 answer; either way `tcc_global_transaction` aborts.
//!
//! Repeating a decision is answered 200 whatever phase two has done since (submit twice, abort
//! twice). DTM answers 409 to a repeat that arrives after phase two finished; tcc does not, so the
//! answer to a retried request does not depend on timing.
//!
//! # Statuses
//!
//! | tcc state | DTM `status` |
//! |-----------|--------------|
//! | trying | `prepared` |
//! | confirming | `submitted` |
//! | confirmed | `succeed` |
//! | cancelling | `aborting` |
//! | cancelled | `failed` |
//! | flagged, decision confirm | `submitted` |
//! | flagged, decision cancel | `aborting` |
//! | flagged, no decision (a message whose back-check gave up) | `prepared` |
//!
//! A flagged transaction keeps its decision's working word: in DTM a transaction whose phase two
//! keeps failing stays `submitted` or `aborting`, and a DTM client must not read it as finished. The
//! flag itself is visible in `query` under `transaction.tcc` (`state: "flagged"`, `flagged: true`,
//! `last_error`), and in tcc's native API, logs and metrics.
//!
//! `query` names the kind in `trans_type` (`tcc`, `saga`, `msg`); a saga's step is two rows
//! (`compensate`, then `action`), a message's one (`action`), and a message's `query_prepared` is
//! in the transaction. `query` lists each TCC branch as DTM stores it: two rows, `op: "cancel"` then `op: "confirm"`,
//! with `url`, `bin_data` (the registered `data`, base64 as Go encodes bytes) and `status`
//! (`prepared`, or `succeed` for the operation phase two completed). An unknown gid is answered as
//! DTM does: 200 with `"transaction": null` and no branches.
//!
//! # TransOptions (given at `prepare`)
//!
//! - `timeout_to_fail` (seconds): the transaction's deadline; absent or 0 means the server's
//!   default. Still `prepared` at the deadline, it is aborted.
//! - `retry_interval` (seconds): the delay before the first phase-two retry (doubling from there).
//! - `request_timeout` (seconds): the longest one confirm or cancel call may take; a call without an
//!   answer by then counts as failed and is retried.
//! - `wait_result` (given with `submit` or `abort`, as DTM clients send it): answer only once phase
//!   two has finished (200), was flagged (500), or at the latest after the transaction's per-call
//!   timeout (`request_timeout`, or the coordinator's), capped at 60 s (then 425).
//!
//! Negative values and values of the wrong JSON type are refused with 400.
//!
//! # Calling branches
//!
//! Confirm and cancel are called as DTM's server calls them: `POST` to the registered URL with the
//! query parameters `gid`, `trans_type=tcc`, `branch_id` and `op` (`confirm` or `cancel`) appended,
//! the registered `data` as the body and `Content-Type: application/json`, plus tcc's `tcc-gid`,
//! `tcc-branch` and `tcc-deadline` headers. The answer is read as DTM reads it, except that tcc
//! never retries forever:
//!
//! | answer | result |
//! |--------|--------|
//! | 2xx whose body contains neither `FAILURE` nor `ONGOING` | done |
//! | anything else: 425 or `ONGOING`, 409 or `FAILURE` (whatever the status), 3xx (redirects are never followed), 4xx, 5xx, timeouts, connection errors | not done: retried with backoff under the retry policy; the transaction is flagged for an operator once the policy is spent |
//!
//! DTM's server reads an answer the same way (`getBranchResult` in `dtmsvr`) and treats only a
//! saga action's `FAILURE` as final: a TCC confirm or cancel must not fail, so DTM calls it again
//! until it succeeds. tcc retries it too, but not forever.
//!
//! At most 64 KiB of an answer is read.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tcc_core::{
    BranchId, BranchState, Decision, Gid, NewBranch, NewStep, Transaction, TxKind, TxOptions, TxState,
};
use url::Url;

use crate::error::ApiError;
use crate::protocol::dtm::{MSG, RESULT_FAILURE, RESULT_ONGOING, RESULT_SUCCESS, SAGA, TCC};
use crate::server::AppState;
use crate::target::{StepStyle, Target};

/// DTM's status of a transaction that is prepared (tcc: trying).
pub const STATUS_PREPARED: &str = "prepared";
/// DTM's status of a transaction decided to confirm, phase two running (tcc: confirming).
pub const STATUS_SUBMITTED: &str = "submitted";
/// DTM's status of a transaction whose branches are all confirmed (tcc: confirmed).
pub const STATUS_SUCCEED: &str = "succeed";
/// DTM's status of a transaction decided to cancel, phase two running (tcc: cancelling).
pub const STATUS_ABORTING: &str = "aborting";
/// DTM's status of a transaction whose branches are all cancelled (tcc: cancelled).
pub const STATUS_FAILED: &str = "failed";

/// Longest a `wait_result` submit or abort waits.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The DTM status word of a transaction (see the module documentation for the table).
///
/// ```
/// use std::time::Duration;
/// use tcc_core::{Decision, Gid, Timestamp, TxState};
/// let mut tx = tcc_core::state::begin(Gid::generate(), Timestamp(0), Timestamp(1_000));
/// assert_eq!(tcc_http::server::dtm::status(&tx), "prepared");
/// tx.state = TxState::Flagged;
/// tx.decision = Some(Decision::Cancel);
/// assert_eq!(tcc_http::server::dtm::status(&tx), "aborting");
/// ```
pub fn status(tx: &Transaction) -> &'static str {
    match tx.state {
        TxState::Trying => STATUS_PREPARED,
        TxState::Confirming => STATUS_SUBMITTED,
        TxState::Confirmed => STATUS_SUCCEED,
        TxState::Cancelling => STATUS_ABORTING,
        TxState::Cancelled => STATUS_FAILED,
        TxState::Flagged => match tx.decision {
            Some(Decision::Cancel) => STATUS_ABORTING,
            // A message whose back-check gave up: still waiting for its local transaction's word.
            None if matches!(tx.kind, TxKind::Msg(_)) => STATUS_PREPARED,
            // A flagged transaction always has a decision; confirm is the one that needs an operator
            // most, so an impossible missing one is not shown as finished either.
            Some(Decision::Confirm) | None => STATUS_SUBMITTED,
        },
    }
}

/// The DTM-compatible routes, nested under `/api/dtmsvr`.
pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/newGid", get(new_gid))
        .route("/prepare", post(prepare))
        .route("/registerBranch", post(register_branch))
        .route("/registerTccBranch", post(register_branch))
        .route("/submit", post(submit))
        .route("/abort", post(abort))
        .route("/query", get(query))
}

// ---------------------------------------------------------------------------------------------
// Answers

/// A DTM error answer: a status, tcc's stable code and a message. See the module documentation for
/// which statuses carry `FAILURE` or `ONGOING`.
#[derive(Debug)]
struct DtmError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl DtmError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> DtmError {
        DtmError { status, code, message: message.into() }
    }

    fn malformed(message: impl Into<String>) -> DtmError {
        DtmError::new(StatusCode::BAD_REQUEST, "malformed", message)
    }

    fn refused(code: &'static str, message: impl Into<String>) -> DtmError {
        DtmError::new(StatusCode::CONFLICT, code, message)
    }
}

impl From<ApiError> for DtmError {
    fn from(e: ApiError) -> DtmError {
        // DTM answers an unknown gid with a failure, not a 404.
        let status = if e.status == StatusCode::NOT_FOUND { StatusCode::CONFLICT } else { e.status };
        DtmError { status, code: e.code, message: e.message }
    }
}

impl From<tcc_core::Error> for DtmError {
    fn from(e: tcc_core::Error) -> DtmError {
        match e {
            // Lost every compare-and-set race: worth trying again, not a failure of the transaction.
            tcc_core::Error::Conflict(_) => {
                DtmError::new(StatusCode::SERVICE_UNAVAILABLE, e.code(), e.to_string())
            }
            // In DTM a transaction past its timeout is being aborted: an illegal state, 409.
            tcc_core::Error::DeadlinePassed { .. } => DtmError::refused(e.code(), e.to_string()),
            e => ApiError::from(e).into(),
        }
    }
}

impl IntoResponse for DtmError {
    fn into_response(self) -> Response {
        let body = if self.status == StatusCode::TOO_EARLY {
            json!({ "dtm_result": RESULT_ONGOING, "code": self.code, "message": self.message })
        } else if self.status.is_client_error() {
            // A client reading the body must not mistake a failure for "ongoing".
            let message = self.message.replace(RESULT_ONGOING, "ongoing");
            json!({ "dtm_result": RESULT_FAILURE, "code": self.code, "message": message })
        } else {
            // Neither a failure nor ongoing: a client reading the body must see neither word.
            json!({ "code": self.code, "message": neutral(&self.message) })
        };
        (self.status, Json(body)).into_response()
    }
}

/// An error as the DTM API answers it (a 4xx with `FAILURE`).
pub(crate) fn error_answer(e: ApiError) -> Response {
    DtmError::new(e.status, e.code, e.message).into_response()
}

/// `text` without DTM's result words, for answers and fields whose meaning they would change.
fn neutral(text: &str) -> String {
    text.replace(RESULT_FAILURE, "failure").replace(RESULT_ONGOING, "ongoing")
}

fn success() -> Response {
    Json(json!({ "dtm_result": RESULT_SUCCESS })).into_response()
}

type Answer = Result<Response, DtmError>;

// ---------------------------------------------------------------------------------------------
// Requests

/// The body of `prepare`, `submit` and `abort`: DTM's `TransBase`, of which tcc reads these fields.
#[derive(Debug, Default, Deserialize)]
struct TransBody {
    gid: Option<String>,
    #[serde(default)]
    trans_type: Option<String>,
    #[serde(default)]
    wait_result: Option<bool>,
    #[serde(default)]
    timeout_to_fail: Option<i64>,
    #[serde(default)]
    retry_interval: Option<i64>,
    #[serde(default)]
    request_timeout: Option<i64>,
    #[serde(default)]
    branch_headers: Option<HashMap<String, String>>,
    #[serde(default)]
    passthrough_headers: Option<Vec<String>>,
    #[serde(default)]
    protocol: Option<String>,
    /// Saga and message steps: `{"action", "compensate"}` (saga) or `{"action"}` (message).
    #[serde(default)]
    steps: Option<Vec<HashMap<String, String>>>,
    /// One body per step (JSON text as DTM's clients send it).
    #[serde(default)]
    payloads: Option<Vec<String>>,
    /// Go's clients send bytes here (base64); not read, so refused when given.
    #[serde(default)]
    bin_payloads: Option<Vec<Value>>,
    /// A saga's `{"orders": {"1": [0]}, "concurrent": true}`, as JSON text.
    #[serde(default)]
    custom_data: Option<String>,
    #[serde(default)]
    concurrent: Option<bool>,
    /// A message's back-check URL.
    #[serde(default)]
    query_prepared: Option<String>,
}

/// A saga's `custom_data`.
#[derive(Debug, Default, Deserialize)]
struct SagaCustom {
    #[serde(default)]
    orders: HashMap<String, Vec<u32>>,
    #[serde(default)]
    concurrent: bool,
}

/// The raw body, with the body-limit rejection answered the DTM way.
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, DtmError> {
    body.map_err(|r| {
        let e = crate::serve::body_rejection(&r, crate::protocol::MAX_BODY);
        DtmError::new(e.status, e.code, e.message)
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, DtmError> {
    let bytes = body_bytes(body)?;
    serde_json::from_slice(&bytes).map_err(|e| DtmError::malformed(format!("invalid JSON body: {e}")))
}

/// The transaction type named (absent means `tcc`), if it is one of `served`.
fn check_trans_type(trans_type: Option<&str>, served: &[&'static str]) -> Result<&'static str, DtmError> {
    let named = trans_type.unwrap_or(TCC);
    served.iter().copied().find(|t| *t == named).ok_or_else(|| {
        DtmError::malformed(format!(
            "trans_type {named:?} is not served here: this call takes {}",
            served.join(", ")
        ))
    })
}

/// The options every kind reads at `prepare` (or a saga's `submit`), with the body's checks.
fn trans_options(state: &AppState, req: &TransBody) -> Result<(Duration, TxOptions), DtmError> {
    if req.branch_headers.as_ref().is_some_and(|h| !h.is_empty()) {
        return Err(DtmError::malformed("branch_headers are not supported by this coordinator"));
    }
    if req.passthrough_headers.as_ref().is_some_and(|h| !h.is_empty()) {
        return Err(DtmError::malformed("passthrough_headers are not supported by this coordinator"));
    }
    if let Some(p) = req.protocol.as_deref().filter(|p| !p.is_empty() && *p != "http") {
        return Err(DtmError::malformed(format!(
            "protocol {p:?} is not supported: branches are called over HTTP"
        )));
    }
    let timeout = match seconds("timeout_to_fail", req.timeout_to_fail)? {
        Some(s) => Duration::from_secs(s),
        None => state.config.default_timeout,
    };
    let options = TxOptions {
        retry_interval_ms: millis("retry_interval", seconds("retry_interval", req.retry_interval)?)?,
        call_timeout_ms: millis("request_timeout", seconds("request_timeout", req.request_timeout)?)?,
    };
    Ok((timeout, options))
}

/// One step of a saga or message as sent: its DTM branch id (`01`, `02`, ...), its action, its
/// compensation (sagas) and its body.
struct WireStep {
    id: BranchId,
    action: Target,
    compensate: Option<Target>,
    payload: Vec<u8>,
}

/// The `steps` and `payloads` of a saga or message, each URL checked against the allow-list.
fn wire_steps(
    state: &AppState,
    req: &TransBody,
    trans_type: &'static str,
) -> Result<Vec<WireStep>, DtmError> {
    if req.bin_payloads.as_ref().is_some_and(|p| !p.is_empty()) {
        return Err(DtmError::malformed("bin_payloads are not supported: send payloads (JSON text)"));
    }
    let steps = req.steps.as_deref().unwrap_or_default();
    let payloads = req.payloads.as_deref().unwrap_or_default();
    if !payloads.is_empty() && payloads.len() != steps.len() {
        return Err(DtmError::malformed(format!(
            "{} steps but {} payloads: give one payload per step",
            steps.len(),
            payloads.len()
        )));
    }
    let url = |step: &HashMap<String, String>, i: usize, op: &'static str| -> Result<Target, DtmError> {
        match step.get(op).map(String::as_str) {
            None | Some("") => Err(DtmError::malformed(format!("step {i} has no {op} URL"))),
            Some(u) => {
                let url =
                    Url::parse(u).map_err(|e| DtmError::malformed(format!("invalid {op} URL {u:?}: {e}")))?;
                let target = Target::Step { style: StepStyle::Dtm { trans_type, op }, url };
                state.check_target(&target)?;
                Ok(target)
            }
        }
    };
    steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let id = format!("{:02}", i + 1)
                .parse()
                .map_err(|e: tcc_core::Error| DtmError::malformed(e.to_string()))?;
            Ok(WireStep {
                id,
                action: url(step, i, "action")?,
                compensate: if trans_type == SAGA { Some(url(step, i, "compensate")?) } else { None },
                payload: payloads.get(i).map(|p| p.as_bytes().to_vec()).unwrap_or_default(),
            })
        })
        .collect()
}

fn parse_gid(gid: Option<&str>) -> Result<Gid, DtmError> {
    match gid {
        None | Some("") => Err(DtmError::malformed("no gid specified")),
        Some(g) => g.parse().map_err(|e: tcc_core::Error| DtmError::malformed(e.to_string())),
    }
}

/// A non-negative number of seconds; 0 and absent mean "not set".
fn seconds(name: &str, value: Option<i64>) -> Result<Option<u64>, DtmError> {
    match value {
        None | Some(0) => Ok(None),
        Some(s) => match u64::try_from(s) {
            Ok(s) => Ok(Some(s)),
            Err(_) => Err(DtmError::malformed(format!("{name} must not be negative"))),
        },
    }
}

fn millis(name: &str, secs: Option<u64>) -> Result<Option<u64>, DtmError> {
    secs.map(|s| s.checked_mul(1000).ok_or_else(|| DtmError::malformed(format!("{name} is too large"))))
        .transpose()
}

// ---------------------------------------------------------------------------------------------
// Handlers

async fn new_gid() -> Response {
    Json(json!({ "gid": Gid::generate().as_str(), "dtm_result": RESULT_SUCCESS })).into_response()
}

async fn prepare(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Answer {
    let req: TransBody = parse_json(body)?;
    let trans_type = check_trans_type(req.trans_type.as_deref(), &[TCC, MSG])?;
    let gid = parse_gid(req.gid.as_deref())?;
    let (timeout, options) = trans_options(&state, &req)?;
    if trans_type == MSG {
        return prepare_message(&state, &req, gid, timeout, options).await;
    }
    let begun = state.coordinator.begin_with(Some(gid.clone()), timeout, options).await;
    prepared(&state, begun, &gid, |_| true).await
}

/// The answer to a `prepare` that stored `begun`. Preparing again is a retried request, answered
/// as before while the transaction is still prepared (and of a kind `same_kind` accepts); refused
/// once anything was decided.
async fn prepared<T>(
    state: &AppState,
    begun: Result<T, tcc_core::Error>,
    gid: &Gid,
    same_kind: impl Fn(&TxKind) -> bool,
) -> Answer {
    match begun {
        Ok(_) => Ok(success()),
        Err(tcc_core::Error::AlreadyExists(_)) => {
            let tx = state.coordinator.get(gid).await?;
            if tx.state == TxState::Trying && same_kind(&tx.kind) {
                Ok(success())
            } else {
                Err(DtmError::refused(
                    "illegal_transition",
                    format!("current status '{}', cannot prepare", status(&tx)),
                ))
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// `prepare` of a message: stored prepared with its steps and back-check; again while it is
/// prepared: success.
async fn prepare_message(
    state: &AppState,
    req: &TransBody,
    gid: Gid,
    timeout: Duration,
    options: TxOptions,
) -> Answer {
    let steps = wire_steps(state, req, MSG)?;
    let query = match req.query_prepared.as_deref() {
        None | Some("") => {
            return Err(DtmError::malformed("a message is prepared with a query_prepared URL"));
        }
        Some(u) => Url::parse(u)
            .map_err(|e| DtmError::malformed(format!("invalid query_prepared URL {u:?}: {e}")))?,
    };
    let query = Target::Step { style: StepStyle::Dtm { trans_type: MSG, op: "msg" }, url: query };
    state.check_target(&query)?;
    let steps = steps
        .into_iter()
        .map(|s| NewBranch { id: s.id, target: s.action.encode(), payload: s.payload })
        .collect();
    let begun =
        state.coordinator.prepare_message(Some(gid.clone()), timeout, options, steps, query.encode()).await;
    prepared(state, begun, &gid, |kind| matches!(kind, TxKind::Msg(_))).await
}

async fn register_branch(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Answer {
    // DTM reads this body as a map of strings: any other JSON type is a malformed request.
    let req: HashMap<String, String> = parse_json(body)?;
    let field = |name: &str| req.get(name).map(String::as_str);
    check_trans_type(field("trans_type"), &[TCC])?;
    let gid = parse_gid(field("gid"))?;
    let branch: BranchId = match field("branch_id") {
        None | Some("") => return Err(DtmError::malformed("no branch_id specified")),
        Some(b) => b.parse().map_err(|e: tcc_core::Error| DtmError::malformed(e.to_string()))?,
    };
    let url = |op: &str| -> Result<Url, DtmError> {
        match field(op) {
            None | Some("") => Err(DtmError::malformed(format!(
                "no {op} URL specified (this coordinator calls every branch's confirm and cancel)"
            ))),
            Some(u) => Url::parse(u).map_err(|e| DtmError::malformed(format!("invalid {op} URL {u:?}: {e}"))),
        }
    };
    let target = Target::Dtm { confirm: url("confirm")?, cancel: url("cancel")? };
    state.check_target(&target)?;
    let data = field("data").unwrap_or_default().as_bytes().to_vec();
    state.coordinator.register(&gid, branch, target.encode(), data).await?;
    Ok(success())
}

async fn submit(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Answer {
    decide(&state, body, Decision::Confirm).await
}

async fn abort(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Answer {
    decide(&state, body, Decision::Cancel).await
}

async fn decide(state: &AppState, body: Result<Bytes, BytesRejection>, decision: Decision) -> Answer {
    let req: TransBody = parse_json(body)?;
    let served: &[&'static str] = match decision {
        Decision::Confirm => &[TCC, SAGA, MSG],
        Decision::Cancel => &[TCC, MSG],
    };
    let trans_type = check_trans_type(req.trans_type.as_deref(), served)?;
    let gid = parse_gid(req.gid.as_deref())?;
    let tc = &state.coordinator;
    if decision == Decision::Confirm && trans_type != TCC {
        let tx = submit_steps(state, &req, gid.clone(), trans_type).await?;
        return answer_after(state, &req, tx, decision).await;
    }
    let decided = match decision {
        Decision::Confirm => tc.confirm(&gid).await,
        Decision::Cancel => tc.cancel(&gid).await,
    };
    let tx = match decided {
        Ok(tx) => tx,
        Err(tcc_core::Error::IllegalTransition { .. }) => {
            // Name the state in DTM's words, as DTM does.
            let current = tc.get(&gid).await?;
            let verb = match decision {
                Decision::Confirm => "submit",
                Decision::Cancel => "abort",
            };
            return Err(DtmError::refused(
                "illegal_transition",
                format!("current status '{}', cannot {verb}", status(&current)),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    answer_after(state, &req, tx, decision).await
}

/// `submit` of a saga (begun and started here) or a message (submitted once prepared, or prepared
/// and submitted at once, as DTM lets a client do). Submitting again is answered as the first.
async fn submit_steps(
    state: &AppState,
    req: &TransBody,
    gid: Gid,
    trans_type: &'static str,
) -> Result<Transaction, DtmError> {
    let tc = &state.coordinator;
    let existing = match tc.get(&gid).await {
        Ok(tx) => Some(tx),
        Err(tcc_core::Error::NotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let refused = |tx: &Transaction| {
        DtmError::refused("illegal_transition", format!("current status '{}', cannot submit", status(tx)))
    };
    match (existing, trans_type) {
        (Some(tx), SAGA) if matches!(tx.kind, TxKind::Saga(_)) => Ok(tx),
        (Some(tx), MSG) if matches!(tx.kind, TxKind::Msg(_)) => match tc.confirm(&gid).await {
            Ok(tx) => Ok(tx),
            Err(tcc_core::Error::IllegalTransition { .. }) => Err(refused(&tc.get(&gid).await?)),
            Err(e) => Err(e.into()),
        },
        (Some(tx), _) => Err(refused(&tx)),
        (None, SAGA) => {
            let (timeout, options) = trans_options(state, req)?;
            let custom: SagaCustom = match req.custom_data.as_deref() {
                None | Some("") => SagaCustom::default(),
                Some(text) => serde_json::from_str(text)
                    .map_err(|e| DtmError::malformed(format!("invalid custom_data: {e}")))?,
            };
            let concurrent = custom.concurrent || req.concurrent == Some(true);
            let mut steps = Vec::new();
            for (i, s) in wire_steps(state, req, SAGA)?.into_iter().enumerate() {
                let after = if concurrent {
                    custom.orders.get(&i.to_string()).cloned().unwrap_or_default()
                } else {
                    Vec::new()
                };
                let compensate = s.compensate.map(|c| c.encode()).unwrap_or_default();
                steps.push(NewStep {
                    id: s.id,
                    action: s.action.encode(),
                    compensate,
                    payload: s.payload,
                    after,
                });
            }
            if let Some(k) =
                custom.orders.keys().find(|k| k.parse::<usize>().map_or(true, |i| i >= steps.len()))
            {
                return Err(DtmError::malformed(format!(
                    "custom_data orders name step {k:?}, which does not exist"
                )));
            }
            Ok(tc.begin_saga(Some(gid), timeout, options, steps, concurrent).await?)
        }
        (None, _) => {
            let (timeout, options) = trans_options(state, req)?;
            let steps = wire_steps(state, req, MSG)?
                .into_iter()
                .map(|s| NewBranch { id: s.id, target: s.action.encode(), payload: s.payload })
                .collect();
            Ok(tc.submit_message(Some(gid), timeout, options, steps).await?)
        }
    }
}

/// The answer to a decision: at once, or with `wait_result` once the transaction is final or
/// flagged, or the wait is over. A saga that ended compensated answers 409 `FAILURE`, as DTM does.
async fn answer_after(state: &AppState, req: &TransBody, tx: Transaction, decision: Decision) -> Answer {
    let tc = &state.coordinator;
    let gid = tx.gid.clone();
    if req.wait_result != Some(true) {
        return Ok(success());
    }
    let per_call = tx
        .options
        .call_timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(tc.config().retry.call_timeout)
        .min(MAX_WAIT);
    let tx = tc.wait(&gid, per_call).await?;
    if matches!(tx.kind, TxKind::Saga(_)) && tx.state == TxState::Cancelled {
        return Err(DtmError::refused(
            "saga_failed",
            format!(
                "the saga failed and its steps were compensated: {}",
                tx.last_error.as_deref().map(neutral).unwrap_or_default()
            ),
        ));
    }
    if tx.state == decision.final_state() {
        Ok(success())
    } else if tx.state == TxState::Flagged {
        Err(DtmError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "flagged",
            format!(
                "the decision to {decision} stands, but phase two gave up and the transaction is \
                 flagged for an operator: {}",
                tx.last_error.as_deref().unwrap_or("no error recorded")
            ),
        ))
    } else if tx.state.is_final() {
        // Unreachable while decisions never change; answered as a failure if it ever happens.
        Err(DtmError::refused(
            "illegal_transition",
            format!("current status '{}', cannot {decision}", status(&tx)),
        ))
    } else {
        let mut message = format!("the decision to {decision} stands; phase two is still running");
        if let Some(e) = &tx.last_error {
            message.push_str(&format!(" (last error: {e})"));
        }
        Err(DtmError::new(StatusCode::TOO_EARLY, "ongoing", message))
    }
}

async fn query(State(state): State<Arc<AppState>>, RawQuery(raw): RawQuery) -> Answer {
    let gid = raw.as_deref().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "gid").map(|(_, v)| v.into_owned())
    });
    let gid = parse_gid(gid.as_deref())?;
    match state.coordinator.get(&gid).await {
        Ok(tx) => Ok(Json(render(&tx)).into_response()),
        Err(tcc_core::Error::NotFound(_)) => {
            Ok(Json(json!({ "transaction": null, "branches": [] })).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Query rendering

/// Whole seconds covering `ms`, as DTM's options are given.
fn ceil_secs(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

fn render(tx: &Transaction) -> Value {
    let mut t = json!({
        "gid": tx.gid.as_str(),
        "trans_type": tx.kind.as_str(),
        "status": status(tx),
        "protocol": "http",
        "create_time": rfc3339(tx.created_at.0),
        "update_time": rfc3339(tx.updated_at.0),
        "timeout_to_fail": ceil_secs(tx.deadline.0.saturating_sub(tx.created_at.0)),
        "concurrent": matches!(&tx.kind, TxKind::Saga(s) if s.concurrent),
        "tcc": {
            "state": tx.state.as_str(),
            "decision": tx.decision.map(|d| d.to_string()),
            "deadline_ms": tx.deadline.0,
            "flagged": tx.state == TxState::Flagged,
            "attempts": tx.attempts,
            "last_error": tx.last_error.as_deref().map(neutral),
        },
    });
    match tx.state {
        TxState::Confirmed => t["finish_time"] = json!(rfc3339(tx.updated_at.0)),
        TxState::Cancelled => t["rollback_time"] = json!(rfc3339(tx.updated_at.0)),
        _ => {}
    }
    if let Some(ms) = tx.options.retry_interval_ms {
        t["retry_interval"] = json!(ceil_secs(ms));
    }
    if let Some(ms) = tx.options.call_timeout_ms {
        t["request_timeout"] = json!(ceil_secs(ms));
    }
    if let TxKind::Msg(m) = &tx.kind
        && let Ok(Target::Step { url, .. }) = Target::parse(&m.query_prepared)
    {
        t["query_prepared"] = json!(url.to_string());
    }
    let mut branches = Vec::with_capacity(tx.branches.len() * 2);
    let row = |b: &tcc_core::Branch, op: &str, url: String, done: bool| {
        json!({
            "gid": tx.gid.as_str(),
            "url": url,
            "bin_data": base64(&b.payload),
            "branch_id": b.id.as_str(),
            "op": op,
            "status": if done { STATUS_SUCCEED } else { STATUS_PREPARED },
            "tcc": { "last_error": b.last_error.as_deref().map(neutral) },
        })
    };
    let step_url = |target: &str| match Target::parse(target) {
        Ok(Target::Step { url, .. }) => url.to_string(),
        _ => target.to_owned(),
    };
    match &tx.kind {
        TxKind::Tcc => {}
        TxKind::Saga(saga) => {
            // DTM stores a saga step as a compensate row, then an action row.
            for (b, step) in tx.branches.iter().zip(&saga.steps) {
                let compensated = b.state == BranchState::Cancelled;
                branches.push(row(b, "compensate", step_url(&step.compensate), compensated));
                let acted = b.state == BranchState::Confirmed || (compensated && step.started);
                branches.push(row(b, "action", step_url(&b.target), acted));
            }
            return json!({ "transaction": t, "branches": branches });
        }
        TxKind::Msg(_) => {
            for b in &tx.branches {
                branches.push(row(b, "action", step_url(&b.target), b.state == BranchState::Confirmed));
            }
            return json!({ "transaction": t, "branches": branches });
        }
    }
    for b in &tx.branches {
        let (confirm_url, cancel_url) = match Target::parse(&b.target) {
            Ok(Target::Dtm { confirm, cancel }) => (confirm.to_string(), cancel.to_string()),
            Ok(Target::Native(u) | Target::Step { url: u, .. }) => (u.to_string(), u.to_string()),
            Err(_) => (b.target.clone(), b.target.clone()),
        };
        // DTM stores a TCC branch as a cancel row, then a confirm row.
        for (op, url, done) in [
            ("cancel", cancel_url, b.state == BranchState::Cancelled),
            ("confirm", confirm_url, b.state == BranchState::Confirmed),
        ] {
            branches.push(json!({
                "gid": tx.gid.as_str(),
                "url": url,
                "bin_data": base64(&b.payload),
                "branch_id": b.id.as_str(),
                "op": op,
                "status": if done { STATUS_SUCCEED } else { STATUS_PREPARED },
                "tcc": { "last_error": b.last_error.as_deref().map(neutral) },
            }));
        }
    }
    json!({ "transaction": t, "branches": branches })
}

/// Milliseconds since the epoch as RFC 3339 in UTC (how Go encodes `time.Time`).
fn rfc3339(ms: u64) -> String {
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(i64::MAX / 2) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Standard base64 with padding (how Go's JSON encodes `[]byte`).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flagged_transactions_keep_their_decision_word() {
        let mut tx = tcc_core::state::begin(Gid::generate(), tcc_core::Timestamp(0), tcc_core::Timestamp(1));
        let cases = [
            (TxState::Trying, None, "prepared"),
            (TxState::Confirming, Some(Decision::Confirm), "submitted"),
            (TxState::Confirmed, Some(Decision::Confirm), "succeed"),
            (TxState::Cancelling, Some(Decision::Cancel), "aborting"),
            (TxState::Cancelled, Some(Decision::Cancel), "failed"),
            (TxState::Flagged, Some(Decision::Confirm), "submitted"),
            (TxState::Flagged, Some(Decision::Cancel), "aborting"),
        ];
        for (state, decision, word) in cases {
            tx.state = state;
            tx.decision = decision;
            assert_eq!(status(&tx), word, "{state:?}");
        }
    }

    #[test]
    fn base64_is_standard_with_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(br#"{"amount":10}"#), "eyJhbW91bnQiOjEwfQ==");
        assert_eq!(base64(&[0xff, 0xfe, 0xfd, 0x00]), "//79AA==");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn engine_errors_map_to_dtm_statuses() {
        assert_eq!(neutral("participant answered FAILURE, ONGOING"), "participant answered failure, ongoing");
        let status = |e: tcc_core::Error| DtmError::from(e).status;
        assert_eq!(status(tcc_core::Error::NotFound(Gid::generate())), StatusCode::CONFLICT);
        assert_eq!(status(tcc_core::Error::AlreadyExists(Gid::generate())), StatusCode::CONFLICT);
        assert_eq!(status(tcc_core::Error::Conflict(Gid::generate())), StatusCode::SERVICE_UNAVAILABLE);
        let late = tcc_core::Error::DeadlinePassed { gid: Gid::generate(), deadline: tcc_core::Timestamp(1) };
        assert_eq!(status(late), StatusCode::CONFLICT);
        assert_eq!(status(tcc_core::Error::InvalidInput("x".into())), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(status(tcc_core::Error::Storage("disk".into())), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
