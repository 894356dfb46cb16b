//! The coordinator's API as both sides see it: the request and answer bodies of the native API
//! (`/v1`) and of its batches (`/v1/batch`), and the bearer token. The server
//! (`tcc_http::server`) serves them; the client (`tcc_http::client`) sends and reads them.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tcc_core::{Branch, BranchState, Decision, Happening, HistoryEntry, Transaction, TxOptions, TxState};
#[cfg(feature = "server")]
use utoipa::ToSchema;

#[cfg(feature = "client")]
use crate::error::ApiError;

/// Longest a confirm or cancel may wait for phase two to finish before answering.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// A transaction or branch id in the OpenAPI document: `tcc_core`'s rule, 1 to 128 ASCII letters,
/// digits and `._:-`. The ids `.` and `..` are left out: they are valid, but no HTTP client keeps
/// them as a path segment, so a transaction named so can only be reached through a listing.
#[derive(Debug)]
pub struct Id;

#[cfg(feature = "server")]
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

#[cfg(feature = "server")]
impl ToSchema for Id {}

/// Begin a transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BeginRequest {
    /// The id to use; a time-ordered one is generated when absent. Letters, digits and `._:-`, 1 to
    /// 128 characters.
    #[serde(default)]
    #[cfg_attr(feature = "server", schema(value_type = Option<Id>))]
    pub gid: Option<String>,
    /// Milliseconds until the deadline: a transaction not decided by then is cancelled. The server's
    /// default when absent. At most the server's `--max-timeout` (a day by default; 422 beyond).
    #[serde(default, deserialize_with = "whole_ms")]
    #[cfg_attr(feature = "server", schema(minimum = 1))]
    pub timeout_ms: Option<u64>,
    /// Delay before the first phase-two retry of this transaction, in milliseconds (at most the
    /// server's `--max-timeout`; 422 beyond).
    #[serde(default, deserialize_with = "whole_ms")]
    #[cfg_attr(feature = "server", schema(minimum = 1))]
    pub retry_interval_ms: Option<u64>,
    /// Longest one phase-two call of this transaction may take, in milliseconds (below the server's
    /// lease; 422 beyond).
    #[serde(default, deserialize_with = "whole_ms")]
    #[cfg_attr(feature = "server", schema(minimum = 1))]
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

/// Step indexes, each a whole number (JSON writers may send `3.0`).
pub(crate) fn whole_indexes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    let numbers = Option::<Vec<serde_json::Number>>::deserialize(d)?.unwrap_or_default();
    numbers
        .into_iter()
        .map(|n| {
            let whole =
                n.as_u64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64));
            whole
                .and_then(|w| u32::try_from(w).ok())
                .ok_or_else(|| serde::de::Error::custom(format!("{n} is not a step index")))
        })
        .collect()
}

/// Register a branch before calling its try.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// The branch id, unique within the transaction. Letters, digits and `._:-`, 1 to 128 characters.
    #[cfg_attr(feature = "server", schema(value_type = Id))]
    pub branch: String,
    /// The base URL of the participant's operation: the coordinator posts to `{target}/confirm` and
    /// `{target}/cancel`. Must be allowed by the coordinator's participant allow-list.
    pub target: String,
    /// The bytes handed to the participant with confirm and cancel (usually the try's request), as
    /// UTF-8 text.
    #[serde(default)]
    pub payload: String,
}

/// Begin a saga and start running it (`POST /v1/sagas`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SagaRequest {
    /// The id to use; a time-ordered one is generated when absent.
    #[serde(default)]
    #[cfg_attr(feature = "server", schema(value_type = Option<Id>))]
    pub gid: Option<String>,
    /// Milliseconds until the deadline: a saga whose actions are not all done by then is
    /// compensated. The server's default when absent.
    #[serde(default, deserialize_with = "whole_ms")]
    #[cfg_attr(feature = "server", schema(minimum = 1))]
    pub timeout_ms: Option<u64>,
    /// Delay before the first retry of a failed call, in milliseconds.
    #[serde(default, deserialize_with = "whole_ms")]
    #[cfg_attr(feature = "server", schema(minimum = 1))]
    pub retry_interval_ms: Option<u64>,
    /// Longest one call may take, in milliseconds.
    #[serde(default, deserialize_with = "whole_ms")]
    #[cfg_attr(feature = "server", schema(minimum = 1))]
    pub call_timeout_ms: Option<u64>,
    /// Run each step as soon as the steps in its `after` are done (otherwise one at a time, in
    /// order).
    #[serde(default)]
    pub concurrent: bool,
    /// The steps, in order.
    #[serde(default, deserialize_with = "objects")]
    pub steps: Vec<StepRequest>,
}

/// One step of a saga or message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StepRequest {
    /// The step id, unique within the transaction.
    #[cfg_attr(feature = "server", schema(value_type = Id))]
    pub step: String,
    /// The action's URL: the coordinator posts the payload to it, with the `tcc-gid`, `tcc-branch`
    /// and `tcc-deadline` headers. 2xx is done; 409 (or another 4xx) refuses (a saga is then
    /// compensated); 5xx, 408, 425, 429 and no answer are retried.
    pub action: String,
    /// The compensation's URL (sagas only; required there), called the same way.
    #[serde(default)]
    pub compensate: Option<String>,
    /// The body of the action and the compensation, as UTF-8 text.
    #[serde(default)]
    pub payload: String,
    /// Indexes of the steps that must be done before this one starts (concurrent sagas).
    #[serde(default, deserialize_with = "whole_indexes")]
    pub after: Vec<u32>,
}

/// Prepare a two-phase message, or send one at once (`POST /v1/messages`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MessageRequest {
    /// The id to use; a time-ordered one is generated when absent.
    #[serde(default)]
    #[cfg_attr(feature = "server", schema(value_type = Option<Id>))]
    pub gid: Option<String>,
    /// Milliseconds until the coordinator asks `query_prepared` about a message still prepared.
    #[serde(default, deserialize_with = "whole_ms")]
    #[cfg_attr(feature = "server", schema(minimum = 1))]
    pub timeout_ms: Option<u64>,
    /// Delay before the first retry of a failed call, in milliseconds.
    #[serde(default, deserialize_with = "whole_ms")]
    #[cfg_attr(feature = "server", schema(minimum = 1))]
    pub retry_interval_ms: Option<u64>,
    /// Longest one call may take, in milliseconds.
    #[serde(default, deserialize_with = "whole_ms")]
    #[cfg_attr(feature = "server", schema(minimum = 1))]
    pub call_timeout_ms: Option<u64>,
    /// The back-check: `GET {query_prepared}?gid=` answers 2xx once the local transaction
    /// committed, 409 if it rolled back (or never will commit), anything else while unknown.
    /// Required unless `submit`.
    #[serde(default)]
    pub query_prepared: Option<String>,
    /// Submit at once (no local transaction to wait for); otherwise the message is prepared and
    /// submitted with `POST /v1/transactions/{gid}/confirm`, aborted with `.../cancel`.
    #[serde(default)]
    pub submit: bool,
    /// The actions, run in order once submitted (`compensate` and `after` must be absent).
    #[serde(default, deserialize_with = "objects")]
    pub steps: Vec<StepRequest>,
}

/// Force the outcome of a flagged transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ForceRequest {
    /// Must be the transaction's own decision.
    pub outcome: DecisionView,
}

/// A transaction's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
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
    /// What kind of transaction it is.
    #[serde(default)]
    pub kind: KindView,
    /// The options it was begun with (unset: the coordinator's retry policy).
    #[serde(default)]
    pub options: OptionsView,
    /// What happened to it, oldest first: its last 16 transitions and phase-two rounds
    /// (registrations are left out; the branches show them).
    #[serde(default)]
    pub history: Vec<HistoryView>,
}

/// The kind of a transaction (absent from older servers: `tcc`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum KindView {
    /// Try, then confirm or cancel every branch.
    #[default]
    Tcc,
    /// A saga: actions, compensated in reverse order when one refuses.
    Saga,
    /// A two-phase message: actions that run if, and only if, the local transaction committed.
    Msg,
}

impl KindView {
    /// `tcc`, `saga` or `msg`.
    pub fn as_str(self) -> &'static str {
        match self {
            KindView::Tcc => "tcc",
            KindView::Saga => "saga",
            KindView::Msg => "msg",
        }
    }
}

impl From<&tcc_core::TxKind> for KindView {
    fn from(k: &tcc_core::TxKind) -> KindView {
        match k {
            tcc_core::TxKind::Tcc => KindView::Tcc,
            tcc_core::TxKind::Saga(_) => KindView::Saga,
            tcc_core::TxKind::Msg(_) => KindView::Msg,
        }
    }
}

impl PartialEq<&str> for KindView {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Per-transaction options, as given at begin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
pub struct OptionsView {
    /// Delay before the first phase-two retry, in milliseconds.
    pub retry_interval_ms: Option<u64>,
    /// Longest one phase-two call may take, in milliseconds.
    pub call_timeout_ms: Option<u64>,
}

impl From<TxOptions> for OptionsView {
    fn from(o: TxOptions) -> OptionsView {
        OptionsView { retry_interval_ms: o.retry_interval_ms, call_timeout_ms: o.call_timeout_ms }
    }
}

/// What happened, in a [`HistoryView`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum HappeningView {
    /// The transaction began.
    Begun,
    /// It was decided (`decision` says how).
    Decided,
    /// Its deadline passed while trying: the coordinator cancelled it.
    Expired,
    /// A phase-two round ended (`done`, `failed`, `error`).
    Round,
    /// An operator retried phase two.
    OperatorRetry,
    /// An operator forced its outcome (`decision`).
    OperatorForce,
}

/// One entry of a transaction's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
pub struct HistoryView {
    /// When (unix ms).
    pub at_ms: u64,
    /// What happened.
    pub what: HappeningView,
    /// The transaction's state after it.
    pub state: StateView,
    /// The decision taken or forced.
    pub decision: Option<DecisionView>,
    /// Branches a round reached.
    pub done: Option<u32>,
    /// Branches whose call failed in a round.
    pub failed: Option<u32>,
    /// A round's first failure (at most 200 bytes).
    pub error: Option<String>,
}

impl From<&HistoryEntry> for HistoryView {
    fn from(h: &HistoryEntry) -> HistoryView {
        let mut v = HistoryView {
            at_ms: h.at.0,
            what: HappeningView::Begun,
            state: h.state.into(),
            decision: None,
            done: None,
            failed: None,
            error: None,
        };
        match &h.what {
            Happening::Begun => {}
            Happening::Decided(d) => (v.what, v.decision) = (HappeningView::Decided, Some((*d).into())),
            Happening::Expired => v.what = HappeningView::Expired,
            Happening::Round { done, failed, error } => {
                v.what = HappeningView::Round;
                (v.done, v.failed, v.error) = (Some(*done), Some(*failed), error.clone());
            }
            Happening::OperatorRetry => v.what = HappeningView::OperatorRetry,
            Happening::OperatorForce(d) => {
                (v.what, v.decision) = (HappeningView::OperatorForce, Some((*d).into()));
            }
        }
        v
    }
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
            kind: (&tx.kind).into(),
            options: tx.options.into(),
            history: tx.history.iter().map(Into::into).collect(),
        }
    }
}

/// A page of transactions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
pub struct ListView {
    /// The transactions, in id order (descending with `order=newest`).
    pub items: Vec<TransactionView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<String>,
}

/// Transactions per state, as `GET /v1/overview` counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
pub struct CountsView {
    /// Waiting for an operator.
    pub flagged: u64,
    /// Not decided yet.
    pub trying: u64,
    /// Decided to confirm, phase two running.
    pub confirming: u64,
    /// Decided to cancel, phase two running.
    pub cancelling: u64,
    /// Every branch confirmed.
    pub confirmed: u64,
    /// Every branch cancelled.
    pub cancelled: u64,
}

/// What happened in one slot of the recent past, in `GET /v1/overview`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
pub struct SlotView {
    /// When the slot ends (unix ms); it starts where the previous one ends.
    pub at_ms: u64,
    /// Transactions that ended confirmed in it.
    pub confirmed: u64,
    /// Transactions that ended cancelled in it.
    pub cancelled: u64,
    /// Transactions flagged in it.
    pub flagged: u64,
    /// Phase-two calls to participants in it.
    pub calls: u64,
    /// Of those, calls that failed.
    pub failed_calls: u64,
    /// The mean latency of its phase-two calls, in microseconds; absent without calls.
    pub mean_call_us: Option<u64>,
}

/// The coordinator at a glance: what the operator's console shows first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
pub struct OverviewView {
    /// Transactions per state, now.
    pub counts: CountsView,
    /// The length of a slot in milliseconds.
    pub slot_ms: u64,
    /// Outcomes and phase-two latency over the last five minutes, a slot each, oldest first. The
    /// coordinator samples when asked: a slot nobody asked for is merged into the next one.
    pub recent: Vec<SlotView>,
}

/// Path of the batch route.
pub const BATCH_PATH: &str = "/v1/batch";

/// Most operations one batch may carry; a longer one is refused (422) as a whole.
pub const MAX_BATCH_OPS: usize = 1024;

/// A batch of operations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BatchOps {
    /// The operations (at most 1,024); each is answered by a line carrying its index here.
    #[cfg_attr(feature = "server", schema(max_items = 1024))]
    pub ops: Vec<BatchOp>,
}

/// One operation of a batch: an object with one key, the operation's name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BatchOp {
    /// `POST /v1/transactions` with this body: answered 201 and the transaction.
    #[serde(deserialize_with = "object")]
    Begin(BeginRequest),
    /// `POST /v1/transactions/{gid}/confirm?wait_ms=`: answered 200 and the transaction.
    #[serde(deserialize_with = "object")]
    Confirm(DecideOp),
    /// `POST /v1/transactions/{gid}/cancel?wait_ms=`: answered 200 and the transaction.
    #[serde(deserialize_with = "object")]
    Cancel(DecideOp),
}

/// Written by hand: the derived schema lets an operation's object carry other keys besides the
/// operation's name, which the server refuses.
#[cfg(feature = "server")]
impl utoipa::PartialSchema for BatchOp {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Ref, Type};
        let op = |name: &str, body: &str, doc: &str| {
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property(name, Ref::from_schema_name(body))
                .required(name)
                .additional_properties(Some(AdditionalProperties::FreeForm(false)))
                .description(Some(doc))
        };
        OneOfBuilder::new()
            .item(op(
                "begin",
                "BeginRequest",
                "`POST /v1/transactions` with this body: answered 201 and the transaction.",
            ))
            .item(op(
                "confirm",
                "DecideOp",
                "`POST /v1/transactions/{gid}/confirm?wait_ms=`: answered 200 and the transaction.",
            ))
            .item(op(
                "cancel",
                "DecideOp",
                "`POST /v1/transactions/{gid}/cancel?wait_ms=`: answered 200 and the transaction.",
            ))
            .description(Some("One operation of a batch: an object with one key, the operation's name."))
            .into()
    }
}

#[cfg(feature = "server")]
impl ToSchema for BatchOp {
    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        use utoipa::PartialSchema;
        schemas.push((BeginRequest::name().into(), BeginRequest::schema()));
        BeginRequest::schemas(schemas);
        schemas.push((DecideOp::name().into(), DecideOp::schema()));
        DecideOp::schemas(schemas);
    }
}

#[cfg(feature = "client")]
impl BatchOp {
    /// Refuses what the OpenAPI document calls invalid, so that a batch holding such an operation
    /// is refused whole, as one that does not parse: a malformed id, a milliseconds option of 0
    /// or past an int64, a `wait_ms` past an int64. What only the engine can judge (a timeout past
    /// the server's limit, a participant URL not allowed, an unknown transaction) is answered per
    /// operation.
    pub(crate) fn check(&self) -> Result<(), ApiError> {
        match self {
            BatchOp::Begin(req) => {
                req.gid.as_deref().map(parse_gid).transpose()?;
                for (name, ms) in [
                    ("timeout_ms", req.timeout_ms),
                    ("retry_interval_ms", req.retry_interval_ms),
                    ("call_timeout_ms", req.call_timeout_ms),
                ] {
                    if ms.is_some_and(|ms| ms == 0 || i64::try_from(ms).is_err()) {
                        return Err(ApiError::malformed(format!(
                            "{name} must be between 1 and {}",
                            i64::MAX
                        )));
                    }
                }
                for b in &req.branches {
                    b.branch.parse::<tcc_core::BranchId>().map_err(|e| ApiError::malformed(e.to_string()))?;
                }
                Ok(())
            }
            BatchOp::Confirm(op) | BatchOp::Cancel(op) => {
                parse_gid(&op.gid)?;
                check_wait_ms(op.wait_ms)
            }
        }
    }
}

/// The transaction a confirm or cancel of a batch decides, and how long to wait for phase two.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DecideOp {
    /// The transaction id.
    #[cfg_attr(feature = "server", schema(value_type = Id))]
    pub gid: String,
    /// As the single request's `wait_ms`: wait up to this many milliseconds (at most 60,000) for
    /// phase two to finish. Not waiting when absent.
    #[serde(default, deserialize_with = "whole_ms")]
    pub wait_ms: Option<u64>,
}

/// The answer to one operation of a batch: one line of the answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchLine<B> {
    /// The operation's index in [`BatchOps::ops`].
    pub i: usize,
    /// The status its single request would have been answered with.
    pub status: u16,
    /// The body that request would have had: the transaction, or an [`ErrorBody`](crate::protocol::ErrorBody).
    pub body: B,
}

/// A secret bearer token. Its `Debug` never shows it, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A token; empty ones are refused.
    pub fn new(token: impl Into<String>) -> Result<Token, String> {
        let t = token.into();
        if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("a token must be non-empty, without spaces or control characters".to_owned());
        }
        Ok(Token(t))
    }

    /// The secret, for building an `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares in time independent of where the first difference is.
    #[cfg(feature = "server")]
    pub(crate) fn matches(&self, presented: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        let mut diff = mine.len() ^ presented.len();
        for (i, b) in presented.iter().enumerate() {
            diff |= usize::from(mine.get(i).copied().unwrap_or(0) ^ b);
        }
        diff == 0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// A transaction id from a request, or the 400 answer its malformation gets.
#[cfg(feature = "client")]
pub(crate) fn parse_gid(s: &str) -> Result<tcc_core::Gid, ApiError> {
    s.parse().map_err(|e: tcc_core::Error| ApiError::malformed(e.to_string()))
}

/// Refuses a `wait_ms` the document calls invalid: it is an int64 there (longer waits are cut to
/// [`MAX_WAIT`] anyway).
#[cfg(feature = "client")]
pub(crate) fn check_wait_ms(wait_ms: Option<u64>) -> Result<(), ApiError> {
    if wait_ms.is_some_and(|ms| i64::try_from(ms).is_err()) {
        return Err(ApiError::malformed(format!("wait_ms must be at most {}", i64::MAX)));
    }
    Ok(())
}
