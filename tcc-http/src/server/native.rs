//! The native JSON API under `/v1`.
//!
//! | call | request | answer |
//! |------|---------|--------|
//! | begin | `POST /v1/transactions` | 201, the transaction |
//! | list | `GET /v1/transactions?state=&after=&limit=` | a page |
//! | get one | `GET /v1/transactions/{gid}` | the transaction |
//! | register a branch | `POST /v1/transactions/{gid}/branches` | the transaction |
//! | confirm | `POST /v1/transactions/{gid}/confirm?wait_ms=` | the transaction |
//! | cancel | `POST /v1/transactions/{gid}/cancel?wait_ms=` | the transaction |
//! | operator retry | `POST /v1/transactions/{gid}/retry` | the transaction |
//! | operator force | `POST /v1/transactions/{gid}/force` | the transaction |
//! | several begins, confirms and cancels | `POST /v1/batch` | a line per operation (see [`super::batch`]) |

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tcc_core::store::{ListQuery, MAX_PAGE};
use tcc_core::{Branch, BranchId, BranchState, Decision, Gid, NewBranch, Transaction, TxOptions, TxState};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::protocol::ErrorBody;
use crate::target::Target;

/// Longest a confirm or cancel may wait for phase two to finish before answering.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// A transaction or branch id in the OpenAPI document: `tcc_core`'s rule, 1 to 128 ASCII letters,
/// digits and `._:-`. The ids `.` and `..` are left out: they are valid, but no HTTP client keeps
/// them as a path segment, so a transaction named so can only be reached through a listing.
#[derive(Debug)]
pub struct Id;

impl utoipa::PartialSchema for Id {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(r"^(?!\.\.?$)[A-Za-z0-9._:-]{1,128}$"))
            .min_length(Some(1))
            .max_length(Some(tcc_core::model::MAX_ID_LEN))
            .description(Some("Letters, digits and `._:-`, 1 to 128 characters."))
            .into()
    }
}

impl ToSchema for Id {}

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/transactions", post(begin).get(list))
        .route("/v1/transactions/{gid}", get(get_one))
        .route("/v1/transactions/{gid}/branches", post(register))
        .route("/v1/transactions/{gid}/confirm", post(confirm))
        .route("/v1/transactions/{gid}/cancel", post(cancel))
        .route("/v1/transactions/{gid}/retry", post(retry))
        .route("/v1/transactions/{gid}/force", post(force))
        .route(super::batch::BATCH_PATH, post(super::batch::batch))
}

/// Begin a transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BeginRequest {
    /// The id to use; a time-ordered one is generated when absent. Letters, digits and `._:-`, 1 to
    /// 128 characters.
    #[serde(default)]
    #[schema(value_type = Option<Id>)]
    pub gid: Option<String>,
    /// Milliseconds until the deadline: a transaction not decided by then is cancelled. The server's
    /// default when absent. At most the server's `--max-timeout` (a day by default; 422 beyond).
    #[serde(default, deserialize_with = "whole_ms")]
    #[schema(minimum = 1)]
    pub timeout_ms: Option<u64>,
    /// Delay before the first phase-two retry of this transaction, in milliseconds (at most the
    /// server's `--max-timeout`; 422 beyond).
    #[serde(default, deserialize_with = "whole_ms")]
    #[schema(minimum = 1)]
    pub retry_interval_ms: Option<u64>,
    /// Longest one phase-two call of this transaction may take, in milliseconds (below the server's
    /// lease; 422 beyond).
    #[serde(default, deserialize_with = "whole_ms")]
    #[schema(minimum = 1)]
    pub call_timeout_ms: Option<u64>,
    /// Branches to register with the begin, in the same write: for an initiator that knows every
    /// branch and its request before the first try, one request and one flush instead of one per
    /// branch. Each follows the rules of `POST /v1/transactions/{gid}/branches`; one refused branch
    /// refuses the begin, and nothing is stored.
    #[serde(default, deserialize_with = "objects")]
    pub branches: Vec<RegisterRequest>,
}

/// A `T` read from a JSON object only. serde reads a struct from an array of its fields too, which
/// the API does not take (its document says objects).
pub(crate) fn object<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    struct Object<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Object<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_map(Object(std::marker::PhantomData))
}

/// A list of `T`, each read from a JSON object only (see [`object`]).
fn objects<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    struct Item<T>(T);
    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Item<T> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Item<T>, D::Error> {
            object(d).map(Item)
        }
    }
    Ok(Vec::<Item<T>>::deserialize(d)?.into_iter().map(|Item(t)| t).collect())
}

/// A count of milliseconds in a request body: a JSON integer, or a number with no fractional part
/// (`500.0`), which JSON Schema, and so the OpenAPI document, counts as an integer too.
pub(crate) fn whole_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else { return Ok(None) };
    if let Some(ms) = n.as_u64() {
        return Ok(Some(ms));
    }
    match n.as_f64() {
        // `as` saturates: a whole number past u64::MAX is out of every range the server accepts
        // anyway, and is refused as such.
        Some(f) if f.fract() == 0.0 && f >= 0.0 => Ok(Some(f as u64)),
        _ => Err(serde::de::Error::custom(format!("{n} is not a whole number of milliseconds"))),
    }
}

/// Register a branch before calling its try.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The branch id, unique within the transaction. Letters, digits and `._:-`, 1 to 128 characters.
    #[schema(value_type = Id)]
    pub branch: String,
    /// The base URL of the participant's operation: the coordinator posts to `{target}/confirm` and
    /// `{target}/cancel`. Must be allowed by the coordinator's participant allow-list.
    pub target: String,
    /// The bytes handed to the participant with confirm and cancel (usually the try's request), as
    /// UTF-8 text.
    #[serde(default)]
    pub payload: String,
}

/// Force the outcome of a flagged transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForceRequest {
    /// Must be the transaction's own decision.
    pub outcome: DecisionView,
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
        if self.wait_ms.is_some_and(|ms| i64::try_from(ms).is_err()) {
            return Err(ApiError::malformed(format!("wait_ms must be at most {}", i64::MAX)));
        }
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
    /// Start after this id: the `next` of the previous page.
    #[param(value_type = Option<Id>)]
    pub after: Option<String>,
    /// At most this many (1 to 1000; 100 when absent).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// A transaction's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StateView {
    /// Branches may be registered and tried; not decided yet.
    Trying,
    /// Decided to confirm; phase two is running.
    Confirming,
    /// Every branch confirmed.
    Confirmed,
    /// Decided to cancel; phase two is running.
    Cancelling,
    /// Every branch cancelled.
    Cancelled,
    /// Phase two gave up; waiting for an operator.
    Flagged,
}

impl From<TxState> for StateView {
    fn from(s: TxState) -> StateView {
        match s {
            TxState::Trying => StateView::Trying,
            TxState::Confirming => StateView::Confirming,
            TxState::Confirmed => StateView::Confirmed,
            TxState::Cancelling => StateView::Cancelling,
            TxState::Cancelled => StateView::Cancelled,
            TxState::Flagged => StateView::Flagged,
        }
    }
}

impl From<StateView> for TxState {
    fn from(s: StateView) -> TxState {
        match s {
            StateView::Trying => TxState::Trying,
            StateView::Confirming => TxState::Confirming,
            StateView::Confirmed => TxState::Confirmed,
            StateView::Cancelling => TxState::Cancelling,
            StateView::Cancelled => TxState::Cancelled,
            StateView::Flagged => TxState::Flagged,
        }
    }
}

/// A global decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DecisionView {
    /// Confirm every branch.
    Confirm,
    /// Cancel every branch.
    Cancel,
}

impl From<Decision> for DecisionView {
    fn from(d: Decision) -> DecisionView {
        match d {
            Decision::Confirm => DecisionView::Confirm,
            Decision::Cancel => DecisionView::Cancel,
        }
    }
}

impl From<DecisionView> for Decision {
    fn from(d: DecisionView) -> Decision {
        match d {
            DecisionView::Confirm => Decision::Confirm,
            DecisionView::Cancel => Decision::Cancel,
        }
    }
}

/// A branch's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BranchStateView {
    /// Registered; phase two has not finished it.
    Registered,
    /// The participant acknowledged confirm.
    Confirmed,
    /// The participant acknowledged cancel.
    Cancelled,
}

/// One branch of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BranchView {
    /// The branch id.
    pub branch: String,
    /// Where the participant is.
    pub target: String,
    /// The registered payload (as text; invalid UTF-8 is replaced).
    pub payload: String,
    /// What phase two has done to it.
    pub state: BranchStateView,
    /// The last error calling it.
    pub last_error: Option<String>,
}

/// A global transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TransactionView {
    /// The id.
    pub gid: String,
    /// Where it is in its life.
    pub state: StateView,
    /// The decision, once taken.
    pub decision: Option<DecisionView>,
    /// When it began (unix ms).
    pub created_at_ms: u64,
    /// When it last changed (unix ms).
    pub updated_at_ms: u64,
    /// Its deadline (unix ms): past it, it can only be cancelled.
    pub deadline_ms: u64,
    /// Failed phase-two rounds since the last operator retry.
    pub attempts: u32,
    /// The last phase-two error.
    pub last_error: Option<String>,
    /// Branches in registration order.
    pub branches: Vec<BranchView>,
}

impl From<&Branch> for BranchView {
    fn from(b: &Branch) -> BranchView {
        BranchView {
            branch: b.id.to_string(),
            target: b.target.clone(),
            payload: String::from_utf8_lossy(&b.payload).into_owned(),
            state: match b.state {
                BranchState::Registered => BranchStateView::Registered,
                BranchState::Confirmed => BranchStateView::Confirmed,
                BranchState::Cancelled => BranchStateView::Cancelled,
            },
            last_error: b.last_error.clone(),
        }
    }
}

impl From<&Transaction> for TransactionView {
    fn from(tx: &Transaction) -> TransactionView {
        TransactionView {
            gid: tx.gid.to_string(),
            state: tx.state.into(),
            decision: tx.decision.map(Into::into),
            created_at_ms: tx.created_at.0,
            updated_at_ms: tx.updated_at.0,
            deadline_ms: tx.deadline.0,
            attempts: tx.attempts,
            last_error: tx.last_error.clone(),
            branches: tx.branches.iter().map(Into::into).collect(),
        }
    }
}

/// A page of transactions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ListView {
    /// The transactions, in id order.
    pub items: Vec<TransactionView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<String>,
}

pub(crate) fn parse_gid(s: &str) -> Result<Gid, ApiError> {
    s.parse().map_err(|e: tcc_core::Error| ApiError::malformed(e.to_string()))
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

/// Transactions, optionally in one state, a page at a time, in id order.
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
    let page =
        state.coordinator.list(&ListQuery { state: params.state.map(Into::into), after, limit }).await?;
    Ok(ApiJson(ListView {
        items: page.items.iter().map(Into::into).collect(),
        next: page.next.map(|g| g.to_string()),
    }))
}

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
