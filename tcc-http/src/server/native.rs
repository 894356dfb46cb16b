//! The native JSON API under `/v1`.
//!
//! | call | request | answer |
//! |------|---------|--------|
//! | begin | `POST /v1/transactions` | 201, the transaction |
//! | list | `GET /v1/transactions?state=&kind=&order=&after=&limit=` | a page |
//! | overview | `GET /v1/overview` | counts per state, recent outcomes and latency |
//! | get one | `GET /v1/transactions/{gid}` | the transaction |
//! | register a branch | `POST /v1/transactions/{gid}/branches` | the transaction |
//! | confirm | `POST /v1/transactions/{gid}/confirm?wait_ms=` | the transaction |
//! | cancel | `POST /v1/transactions/{gid}/cancel?wait_ms=` | the transaction |
//! | operator retry | `POST /v1/transactions/{gid}/retry` | the transaction |
//! | operator force | `POST /v1/transactions/{gid}/force` | the transaction |
//! | several begins, confirms and cancels | `POST /v1/batch` | a line per operation (see [`super::batch`]) |
//! | begin and run a saga | `POST /v1/sagas` | 201, the transaction |
//! | prepare (or send at once) a message | `POST /v1/messages` | 201, the transaction; submit and abort it with confirm and cancel |

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::Deserialize;
use tcc_core::store::{ListQuery, MAX_PAGE};
use tcc_core::{BranchId, Decision, Gid, NewBranch, NewStep, Transaction, TxOptions};
use utoipa::IntoParams;

use super::AppState;
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::protocol::ErrorBody;
use crate::target::{StepStyle, Target};

pub(crate) use crate::protocol::coordinator::parse_gid;
pub use crate::protocol::coordinator::{
    BeginRequest, BranchStateView, BranchView, CountsView, DecisionView, ForceRequest, HappeningView,
    HistoryView, Id, KindView, ListView, MAX_WAIT, MessageRequest, OptionsView, OverviewView,
    RegisterRequest, SagaRequest, SlotView, StateView, StepRequest, TransactionView,
};

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/transactions", post(begin).get(list))
        .route("/v1/transactions/{gid}", get(get_one))
        .route("/v1/transactions/{gid}/branches", post(register))
        .route("/v1/transactions/{gid}/confirm", post(confirm))
        .route("/v1/transactions/{gid}/cancel", post(cancel))
        .route("/v1/transactions/{gid}/retry", post(retry))
        .route("/v1/transactions/{gid}/force", post(force))
        .route("/v1/overview", get(overview))
        .route(super::batch::BATCH_PATH, post(super::batch::batch))
        .route("/v1/sagas", post(begin_saga))
        .route("/v1/messages", post(prepare_message))
}

/// A step URL as the engine stores it: checked against the allow-list, called as is.
fn step_target(state: &AppState, url: &str) -> Result<String, ApiError> {
    let url = state.config.allow.check(url).map_err(ApiError::participant_not_allowed)?;
    Ok(Target::Step { style: StepStyle::Native, url }.encode())
}

fn step_id(step: &str) -> Result<BranchId, ApiError> {
    step.parse().map_err(|e: tcc_core::Error| ApiError::malformed(e.to_string()))
}

fn timing(
    state: &AppState,
    timeout_ms: Option<u64>,
    retry: Option<u64>,
    call: Option<u64>,
) -> (Duration, TxOptions) {
    let timeout = timeout_ms.map_or(state.config.default_timeout, Duration::from_millis);
    (timeout, TxOptions { retry_interval_ms: retry, call_timeout_ms: call })
}

/// Begins a saga and starts running it: its actions one at a time in order (or, `concurrent`, each
/// once the steps in its `after` are done). An action refusing (409 or another 4xx) fails the saga:
/// the steps that ran or may have run are compensated in reverse order; a saga still running at
/// its deadline is compensated too. Wait for the outcome with `GET /v1/transactions/{gid}`.
#[utoipa::path(post, path = "/v1/sagas", tag = "sagas and messages", request_body = SagaRequest,
    responses(
        (status = 201, description = "Begun and on disk; its steps run in the background", body = TransactionView),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 409, description = "The id exists already", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 422, description = "A step without a compensation, an order naming a missing step or with a cycle, a participant URL not allowed, an option out of range, or limits exceeded", body = ErrorBody),
    ))]
pub async fn begin_saga(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<SagaRequest>,
) -> Result<(StatusCode, ApiJson<TransactionView>), ApiError> {
    let gid = req.gid.as_deref().map(parse_gid).transpose()?;
    let (timeout, options) = timing(&state, req.timeout_ms, req.retry_interval_ms, req.call_timeout_ms);
    let mut steps = Vec::with_capacity(req.steps.len());
    for s in req.steps {
        let compensate = s.compensate.as_deref().ok_or_else(|| {
            ApiError::from(tcc_core::Error::InvalidInput(format!("step {} has no compensate URL", s.step)))
        })?;
        steps.push(NewStep {
            id: step_id(&s.step)?,
            action: step_target(&state, &s.action)?,
            compensate: step_target(&state, compensate)?,
            payload: s.payload.into_bytes(),
            after: s.after,
        });
    }
    let tx = state.coordinator.begin_saga(gid, timeout, options, steps, req.concurrent).await?;
    Ok((StatusCode::CREATED, view(&tx)))
}

/// Prepares a two-phase message (its actions run, in order, once it is submitted with
/// `POST /v1/transactions/{gid}/confirm`; aborted with `.../cancel`, none ever runs), or sends one
/// at once with `submit`. A message still prepared at its deadline is resolved by its
/// `query_prepared`.
#[utoipa::path(post, path = "/v1/messages", tag = "sagas and messages", request_body = MessageRequest,
    responses(
        (status = 201, description = "Prepared (or submitted) and on disk", body = TransactionView),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 409, description = "The id exists already", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 422, description = "No query_prepared for a prepared message, a step with a compensation or an order, a participant URL not allowed, an option out of range, or limits exceeded", body = ErrorBody),
    ))]
pub async fn prepare_message(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<MessageRequest>,
) -> Result<(StatusCode, ApiJson<TransactionView>), ApiError> {
    let gid = req.gid.as_deref().map(parse_gid).transpose()?;
    let (timeout, options) = timing(&state, req.timeout_ms, req.retry_interval_ms, req.call_timeout_ms);
    let invalid = |m: String| ApiError::from(tcc_core::Error::InvalidInput(m));
    let mut steps = Vec::with_capacity(req.steps.len());
    for s in req.steps {
        if s.compensate.is_some() || !s.after.is_empty() {
            return Err(invalid(format!("message step {} takes neither compensate nor after", s.step)));
        }
        steps.push(NewBranch {
            id: step_id(&s.step)?,
            target: step_target(&state, &s.action)?,
            payload: s.payload.into_bytes(),
        });
    }
    let tc = &state.coordinator;
    let tx = if req.submit {
        tc.submit_message(gid, timeout, options, steps).await?
    } else {
        let query = req.query_prepared.as_deref().ok_or_else(|| {
            invalid("a message is prepared with a query_prepared URL (or sent at once with submit)".into())
        })?;
        tc.prepare_message(gid, timeout, options, steps, step_target(&state, query)?).await?
    };
    Ok((StatusCode::CREATED, view(&tx)))
}

/// Optionally wait for phase two to finish before answering.
#[derive(Clone, Copy, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Wait up to this many milliseconds (at most 60,000) for the transaction to finish or be
    /// flagged; the answer is then the transaction as it is. Not waiting when absent.
    pub wait_ms: Option<u64>,
}

impl WaitQuery {
    /// Refuses what the document calls invalid: `wait_ms` is an int64 there (longer waits are cut
    /// to [`MAX_WAIT`] anyway).
    pub(crate) fn check(self) -> Result<WaitQuery, ApiError> {
        crate::protocol::coordinator::check_wait_ms(self.wait_ms)?;
        Ok(self)
    }
}

/// Filters and paging of a listing.
#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only transactions in this state.
    pub state: Option<StateView>,
    /// Only transactions of this kind.
    pub kind: Option<KindView>,
    /// `oldest` (the default): ascending id order; `newest`: descending, newest first for
    /// generated ids (ids chosen by clients sort as text).
    pub order: Option<OrderView>,
    /// Start after this id, in the listing's order: the `next` of the previous page.
    #[param(value_type = Option<Id>)]
    pub after: Option<String>,
    /// At most this many (1 to 1000; 100 when absent).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// The order of a listing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrderView {
    /// Ascending id order: oldest first for generated ids.
    #[default]
    Oldest,
    /// Descending id order: newest first for generated ids.
    Newest,
}

fn view(tx: &Transaction) -> ApiJson<TransactionView> {
    ApiJson(tx.into())
}

/// Begins a transaction.
#[utoipa::path(post, path = "/v1/transactions", tag = "transactions", request_body = BeginRequest,
    responses(
        (status = 201, description = "Begun (with its branches, if any); the fact is on disk", body = TransactionView, links(
            ("get" = (operation_id = "get_one", parameters(("gid" = "$response.body#/gid")))),
            ("register" = (operation_id = "register", parameters(("gid" = "$response.body#/gid")))),
            ("confirm" = (operation_id = "confirm", parameters(("gid" = "$response.body#/gid")))),
            ("cancel" = (operation_id = "cancel", parameters(("gid" = "$response.body#/gid")))),
        )),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 409, description = "The id exists already", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 422, description = "Timeout or option out of range, a participant URL not allowed, or limits exceeded", body = ErrorBody),
    ))]
pub async fn begin(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<BeginRequest>,
) -> Result<(StatusCode, ApiJson<TransactionView>), ApiError> {
    let tx = begin_tx(&state, req).await?;
    Ok((StatusCode::CREATED, view(&tx)))
}

/// Begins the transaction `req` asks for (the begin request, alone or in a batch).
pub(crate) async fn begin_tx(state: &AppState, req: BeginRequest) -> Result<Transaction, ApiError> {
    let gid = req.gid.as_deref().map(parse_gid).transpose()?;
    let timeout = req.timeout_ms.map_or(state.config.default_timeout, Duration::from_millis);
    let options =
        TxOptions { retry_interval_ms: req.retry_interval_ms, call_timeout_ms: req.call_timeout_ms };
    let branches = req
        .branches
        .into_iter()
        .map(|b| new_branch(state, b))
        .collect::<Result<Vec<NewBranch>, ApiError>>()?;
    Ok(state.coordinator.begin_registered(gid, timeout, options, branches).await?)
}

/// A registration as the engine takes it: the id parsed, the URL checked against the allow-list.
fn new_branch(state: &AppState, req: RegisterRequest) -> Result<NewBranch, ApiError> {
    let id: BranchId = req.branch.parse().map_err(|e: tcc_core::Error| ApiError::malformed(e.to_string()))?;
    let target =
        Target::Native(state.config.allow.check(&req.target).map_err(ApiError::participant_not_allowed)?);
    Ok(NewBranch { id, target: target.encode(), payload: req.payload.into_bytes() })
}

/// Registers a branch. Registering the same branch again with the same details is answered as before.
#[utoipa::path(post, path = "/v1/transactions/{gid}/branches", tag = "transactions", request_body = RegisterRequest,
    params(("gid" = Id, Path, description = "Transaction id")),
    responses(
        (status = 200, description = "Registered; the fact is on disk", body = TransactionView, links(
            ("get" = (operation_id = "get_one", parameters(("gid" = "$response.body#/gid")))),
            ("confirm" = (operation_id = "confirm", parameters(("gid" = "$response.body#/gid")))),
            ("cancel" = (operation_id = "cancel", parameters(("gid" = "$response.body#/gid")))),
        )),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown transaction", body = ErrorBody),
        (status = 409, description = "The transaction is decided already", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 422, description = "Participant URL not allowed, deadline passed, or limits exceeded", body = ErrorBody),
    ))]
pub async fn register(
    State(state): State<Arc<AppState>>,
    Path(gid): Path<String>,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<ApiJson<TransactionView>, ApiError> {
    let gid = parse_gid(&gid)?;
    let NewBranch { id, target, payload } = new_branch(&state, req)?;
    let tx = state.coordinator.register(&gid, id, target, payload).await?;
    Ok(view(&tx))
}

/// Decides `gid` (a confirm or cancel, alone or in a batch), then waits as `wait` says.
pub(crate) async fn decide_tx(
    state: &AppState,
    gid: &Gid,
    decision: Decision,
    wait: WaitQuery,
) -> Result<Transaction, ApiError> {
    let wait = wait.wait_ms.map_or(Duration::ZERO, |ms| Duration::from_millis(ms).min(MAX_WAIT));
    Ok(state.coordinator.decide_and_wait(gid, None, decision, wait).await?)
}

/// Decides to confirm every branch. Refused after the deadline and after a cancel.
#[utoipa::path(post, path = "/v1/transactions/{gid}/confirm", tag = "transactions",
    params(("gid" = Id, Path, description = "Transaction id"), WaitQuery),
    responses(
        (status = 200, description = "Decided; the decision is on disk", body = TransactionView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown transaction", body = ErrorBody),
        (status = 409, description = "Cancelled already", body = ErrorBody),
        (status = 422, description = "The deadline passed: only cancel is possible", body = ErrorBody),
    ))]
pub async fn confirm(
    State(state): State<Arc<AppState>>,
    Path(gid): Path<String>,
    ApiQuery(wait): ApiQuery<WaitQuery>,
) -> Result<ApiJson<TransactionView>, ApiError> {
    let wait = wait.check()?;
    Ok(view(&decide_tx(&state, &parse_gid(&gid)?, Decision::Confirm, wait).await?))
}

/// Decides to cancel every branch. Refused once confirm was decided.
#[utoipa::path(post, path = "/v1/transactions/{gid}/cancel", tag = "transactions",
    params(("gid" = Id, Path, description = "Transaction id"), WaitQuery),
    responses(
        (status = 200, description = "Decided; the decision is on disk", body = TransactionView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown transaction", body = ErrorBody),
        (status = 409, description = "Confirmed already", body = ErrorBody),
    ))]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(gid): Path<String>,
    ApiQuery(wait): ApiQuery<WaitQuery>,
) -> Result<ApiJson<TransactionView>, ApiError> {
    let wait = wait.check()?;
    Ok(view(&decide_tx(&state, &parse_gid(&gid)?, Decision::Cancel, wait).await?))
}

/// One transaction.
#[utoipa::path(get, path = "/v1/transactions/{gid}", tag = "transactions",
    params(("gid" = Id, Path, description = "Transaction id")),
    responses(
        (status = 200, description = "The transaction", body = TransactionView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "Unknown transaction", body = ErrorBody),
    ))]
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Path(gid): Path<String>,
) -> Result<ApiJson<TransactionView>, ApiError> {
    let tx = state.coordinator.get(&parse_gid(&gid)?).await?;
    Ok(view(&tx))
}

/// Transactions, optionally in one state or of one kind, a page at a time, in id order (ascending,
/// or descending with `order=newest`).
#[utoipa::path(get, path = "/v1/transactions", tag = "transactions", params(ListParams),
    responses(
        (status = 200, description = "A page", body = ListView),
        (status = 400, description = "Malformed parameters", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<ApiJson<ListView>, ApiError> {
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::malformed(format!("limit must be between 1 and {MAX_PAGE}")));
    }
    let after = params.after.as_deref().map(parse_gid).transpose()?;
    let newest_first = params.order.unwrap_or_default() == OrderView::Newest;
    let state_filter = params.state.map(Into::into);
    let Some(kind) = params.kind else {
        let query = ListQuery { state: state_filter, after, limit, newest_first };
        let page = state.coordinator.list(&query).await?;
        return Ok(ApiJson(ListView {
            items: page.items.iter().map(Into::into).collect(),
            next: page.next.map(|g| g.to_string()),
        }));
    };
    // The store lists by state, not by kind: read store pages and keep the transactions of this kind,
    // at most KIND_SCAN_PAGES store pages per request (bounded work; a short page with a `next`
    // cursor means "more may follow").
    let mut items = Vec::new();
    let mut cursor = after;
    let mut next = None;
    'pages: for _ in 0..KIND_SCAN_PAGES {
        let query = ListQuery { state: state_filter, after: cursor.clone(), limit, newest_first };
        let page = state.coordinator.list(&query).await?;
        for tx in page.items {
            if KindView::from(&tx.kind) == kind {
                items.push(tx);
                if items.len() == limit {
                    next = items.last().map(|t| t.gid.clone());
                    break 'pages;
                }
            }
        }
        match page.next {
            Some(n) => {
                cursor = Some(n.clone());
                next = Some(n);
            }
            None => {
                next = None;
                break;
            }
        }
    }
    Ok(ApiJson(ListView { items: items.iter().map(Into::into).collect(), next: next.map(|g| g.to_string()) }))
}

/// How many store pages one listing filtered by kind reads at most.
const KIND_SCAN_PAGES: usize = 8;

/// Operator action: runs phase two of a flagged transaction again now, with a fresh retry budget.
#[utoipa::path(post, path = "/v1/transactions/{gid}/retry", tag = "operator",
    params(("gid" = Id, Path, description = "Transaction id")),
    responses(
        (status = 200, description = "Phase two restarted", body = TransactionView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown transaction", body = ErrorBody),
        (status = 409, description = "Not flagged or waiting for a retry", body = ErrorBody),
    ))]
pub async fn retry(
    State(state): State<Arc<AppState>>,
    Path(gid): Path<String>,
) -> Result<ApiJson<TransactionView>, ApiError> {
    let tx = state.coordinator.retry(&parse_gid(&gid)?).await?;
    Ok(view(&tx))
}

/// Operator action: declares a flagged transaction finished with its own decision, after its
/// remaining branches were resolved by hand.
#[utoipa::path(post, path = "/v1/transactions/{gid}/force", tag = "operator", request_body = ForceRequest,
    params(("gid" = Id, Path, description = "Transaction id")),
    responses(
        (status = 200, description = "Finished", body = TransactionView),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown transaction", body = ErrorBody),
        (status = 409, description = "Not flagged, or not its decision", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
    ))]
pub async fn force(
    State(state): State<Arc<AppState>>,
    Path(gid): Path<String>,
    ApiJson(req): ApiJson<ForceRequest>,
) -> Result<ApiJson<TransactionView>, ApiError> {
    let tx = state.coordinator.force(&parse_gid(&gid)?, req.outcome.into()).await?;
    Ok(view(&tx))
}

/// The coordinator at a glance: transactions per state (flagged first), and the outcomes and
/// phase-two latency of the last five minutes, a five-second slot each.
#[utoipa::path(get, path = "/v1/overview", tag = "operator",
    responses(
        (status = 200, description = "Counts and the recent past", body = OverviewView),
        (status = 500, description = "The store failed", body = ErrorBody),
    ))]
pub async fn overview(State(state): State<Arc<AppState>>) -> Result<ApiJson<OverviewView>, ApiError> {
    let c = &state.coordinator;
    let (flagged, trying, confirming, cancelling, confirmed, cancelled) = tokio::try_join!(
        c.count(tcc_core::TxState::Flagged),
        c.count(tcc_core::TxState::Trying),
        c.count(tcc_core::TxState::Confirming),
        c.count(tcc_core::TxState::Cancelling),
        c.count(tcc_core::TxState::Confirmed),
        c.count(tcc_core::TxState::Cancelled),
    )?;
    let counts = CountsView { flagged, trying, confirming, cancelling, confirmed, cancelled };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let recent = state
        .metrics
        .recent(now_ms, &c.stats())
        .into_iter()
        .map(|s| SlotView {
            at_ms: s.at_ms,
            confirmed: s.confirmed,
            cancelled: s.cancelled,
            flagged: s.flagged,
            calls: s.calls,
            failed_calls: s.failed_calls,
            mean_call_us: s.mean_call_us,
        })
        .collect();
    let slot_ms = u64::try_from(crate::metrics::SLOT.as_millis()).unwrap_or(u64::MAX);
    Ok(ApiJson(OverviewView { counts, slot_ms, recent }))
}
