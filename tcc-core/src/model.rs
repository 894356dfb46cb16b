//! The data model: global transaction ids, branches, states and deadlines.
//!
//! Everything here is plain data. The rules that move a transaction from one state to another live in
//! [`crate::state`], in one place.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Longest id (global or branch) accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Milliseconds since the Unix epoch, the unit of every stored instant.
///
/// Wall-clock milliseconds (not a monotonic instant) because deadlines travel to participants on other
/// machines and survive restarts.
///
/// ```
/// use std::time::Duration;
/// use tcc_core::Timestamp;
/// let t = Timestamp(1_000);
/// assert_eq!(t + Duration::from_secs(2), Timestamp(3_000));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The instant `d` after `self`, saturating at the end of time.
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(ms))
    }

    /// The instant `d` before `self`, saturating at the epoch.
    pub fn saturating_sub(self, d: Duration) -> Timestamp {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_sub(ms))
    }

    /// How long from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        self.saturating_add(d)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

fn validate_id(kind: &'static str, s: &str) -> Result<(), Error> {
    if s.is_empty() || s.len() > MAX_ID_LEN {
        return Err(Error::InvalidInput(format!("{kind} must be 1 to {MAX_ID_LEN} bytes long")));
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')) {
        return Err(Error::InvalidInput(format!(
            "{kind} may only contain ASCII letters, digits, '-', '_', '.' and ':'"
        )));
    }
    Ok(())
}

/// Text, parsing, serde and display for a validated id newtype over `String`.
macro_rules! id_type {
    ($name:ident, $kind:literal) => {
        impl $name {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<$name, Error> {
                validate_id($kind, s)?;
                Ok($name(s.to_owned()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<$name, Error> {
                validate_id($kind, &s)?;
                Ok($name(s))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

/// A global transaction id.
///
/// Generated ids are UUIDv7 strings, so they sort by creation time (newest last) and listing in id
/// order is listing in time order. Ids chosen by a client (the DTM protocol lets clients pick them) are
/// accepted too when they are 1 to 128 bytes of `[A-Za-z0-9._:-]`.
///
/// ```
/// use tcc_core::Gid;
/// let a = Gid::generate();
/// let b = Gid::generate();
/// assert!(a < b);
/// assert!("not ok!".parse::<Gid>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Gid(String);

impl Gid {
    /// A new time-ordered id (UUIDv7).
    pub fn generate() -> Gid {
        Gid(uuid::Uuid::now_v7().to_string())
    }
}

id_type!(Gid, "transaction id");

/// A branch id, unique within its transaction (for example `"flight"` or DTM's `"01"`).
///
/// ```
/// use tcc_core::BranchId;
/// let b: BranchId = "hotel".parse().unwrap();
/// assert_eq!(b.as_str(), "hotel");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BranchId(String);

id_type!(BranchId, "branch id");

/// The global decision of a transaction once it leaves [`TxState::Trying`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Decision {
    /// Every branch is confirmed.
    Confirm,
    /// Every branch is cancelled.
    Cancel,
}

impl Decision {
    /// The state a transaction is in while this decision is carried out.
    pub fn working_state(self) -> TxState {
        match self {
            Decision::Confirm => TxState::Confirming,
            Decision::Cancel => TxState::Cancelling,
        }
    }

    /// The state a transaction ends in once this decision is carried out.
    pub fn final_state(self) -> TxState {
        match self {
            Decision::Confirm => TxState::Confirmed,
            Decision::Cancel => TxState::Cancelled,
        }
    }

    /// The state a branch ends in once this decision is carried out.
    pub fn branch_state(self) -> BranchState {
        match self {
            Decision::Confirm => BranchState::Confirmed,
            Decision::Cancel => BranchState::Cancelled,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Decision::Confirm => "confirm",
            Decision::Cancel => "cancel",
        })
    }
}

/// The state of a global transaction.
///
/// ```text
///  Trying ──confirm (before deadline)──▶ Confirming ──all branches confirmed──▶ Confirmed
///    │                                      │  ▲
///    │ cancel, or deadline reached          │  │ operator retry
///    ▼                                      ▼  │
///  Cancelling ──all branches cancelled──▶ Cancelled      Flagged (retry policy exhausted)
/// ```
/// `Flagged` keeps the [`Decision`]; an operator retries it or forces it to that decision's end state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TxState {
    /// Begun; branches register and run their try. No decision yet.
    Trying,
    /// Decided to confirm; phase two is confirming the branches.
    Confirming,
    /// Every branch is confirmed. Final.
    Confirmed,
    /// Decided to cancel; phase two is cancelling the branches.
    Cancelling,
    /// Every branch is cancelled. Final.
    Cancelled,
    /// Phase two exhausted its retry policy; waits for an operator. The decision still stands.
    Flagged,
}

impl TxState {
    /// All states, in a stable order.
    pub const ALL: [TxState; 6] = [
        TxState::Trying,
        TxState::Confirming,
        TxState::Confirmed,
        TxState::Cancelling,
        TxState::Cancelled,
        TxState::Flagged,
    ];

    /// Confirmed or cancelled: nothing more will happen to the transaction.
    pub fn is_final(self) -> bool {
        matches!(self, TxState::Confirmed | TxState::Cancelled)
    }

    /// The state's lower-case name, as used in APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            TxState::Trying => "trying",
            TxState::Confirming => "confirming",
            TxState::Confirmed => "confirmed",
            TxState::Cancelling => "cancelling",
            TxState::Cancelled => "cancelled",
            TxState::Flagged => "flagged",
        }
    }

    /// A one-byte code for store indexes; stable across versions.
    pub const fn code(self) -> u8 {
        match self {
            TxState::Trying => 1,
            TxState::Confirming => 2,
            TxState::Confirmed => 3,
            TxState::Cancelling => 4,
            TxState::Cancelled => 5,
            TxState::Flagged => 6,
        }
    }
}

impl FromStr for TxState {
    type Err = Error;
    fn from_str(s: &str) -> Result<TxState, Error> {
        TxState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| Error::InvalidInput(format!("unknown transaction state {s:?}")))
    }
}

impl fmt::Display for TxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of one branch as the coordinator knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BranchState {
    /// Registered; its try may have run. Phase two has not finished it.
    Registered,
    /// The participant acknowledged confirm.
    Confirmed,
    /// The participant acknowledged cancel.
    Cancelled,
}

/// One participant's part of a global transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branch {
    /// Unique within the transaction.
    pub id: BranchId,
    /// Where the participant is, for the transport to interpret (for HTTP, the base URL).
    pub target: String,
    /// Opaque bytes handed back to the participant with confirm and cancel (the try's request).
    pub payload: Vec<u8>,
    /// What phase two has done to this branch so far.
    pub state: BranchState,
    /// The last error phase two saw calling this branch.
    pub last_error: Option<String>,
}

/// Everything the coordinator knows about a global transaction; the unit the [`crate::Store`] keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    /// The global id.
    pub gid: Gid,
    /// Where the transaction is in its life.
    pub state: TxState,
    /// Set when the transaction leaves `Trying`; never changes after that.
    pub decision: Option<Decision>,
    /// When it began.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// Past this instant the transaction can only be cancelled; participants get it with every try.
    pub deadline: Timestamp,
    /// Branches in registration order.
    pub branches: Vec<Branch>,
    /// Phase-two rounds that ended with at least one branch failing, since the last operator retry.
    pub attempts: u32,
    /// The last phase-two error, kept for the operator.
    pub last_error: Option<String>,
    /// When some coordinator must look at this transaction next (the deadline while trying, the next
    /// retry or lease expiry during phase two). `None` once final or flagged: nothing is scheduled.
    pub due_at: Option<Timestamp>,
    /// The coordinator process currently working on phase two, if any.
    pub lease_owner: Option<String>,
    /// Per-transaction overrides of the coordinator's retry policy, given at begin.
    pub options: TxOptions,
    /// Bumped by every stored change; the store's compare-and-set compares it.
    pub version: u64,
    /// What happened to the transaction, oldest first: its last [`MAX_HISTORY`] transitions and
    /// phase-two rounds, for the operator (see [`HistoryEntry`]).
    pub history: Vec<HistoryEntry>,
    /// Which pattern the transaction follows: TCC (the default), a saga or a two-phase message.
    pub kind: TxKind,
}

/// Most entries a transaction's [`history`](Transaction::history) keeps; older ones are dropped.
pub const MAX_HISTORY: usize = 16;

/// Longest error text a [`HistoryEntry`] keeps, in bytes (cut at a character boundary).
pub const MAX_HISTORY_ERROR: usize = 200;

/// One thing that happened to a transaction, kept in its record for the operator.
///
/// The history is bounded ([`MAX_HISTORY`] entries of bounded size), so a transaction retried for
/// days still has a record of bounded size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When it happened.
    pub at: Timestamp,
    /// The transaction's state after it.
    pub state: TxState,
    /// What happened.
    pub what: Happening,
}

/// What a [`HistoryEntry`] records. Registrations are not recorded (the branches list shows them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Happening {
    /// The transaction began.
    Begun,
    /// The initiator decided (a cancel may come from an operator too).
    Decided(Decision),
    /// The deadline passed while trying: cancelled by the coordinator.
    Expired,
    /// A phase-two round ended.
    Round {
        /// Branches acknowledged in it.
        done: u32,
        /// Branches whose call failed in it.
        failed: u32,
        /// The first failure, cut to [`MAX_HISTORY_ERROR`] bytes.
        error: Option<String>,
    },
    /// An operator retried phase two.
    OperatorRetry,
    /// An operator forced the outcome.
    OperatorForce(Decision),
}

/// The pattern a transaction follows. Every kind goes through the same states ([`TxState`]); what
/// a branch call means differs (see [`crate::state`] for the transitions of each).
///
/// | kind | `Trying` | decision confirm | decision cancel |
/// |------|----------|------------------|-----------------|
/// | TCC | tries run, branches register | confirm every branch | cancel every branch |
/// | saga | never (created decided) | run the actions in order | compensate what ran, in reverse order |
/// | message | prepared: the local transaction runs | run every action until it succeeds | nothing is called |
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxKind {
    /// Try-Confirm-Cancel: each branch holds a reservation until confirm or cancel.
    #[default]
    Tcc,
    /// A saga: each branch is a step, an action with a compensation.
    Saga(Box<Saga>),
    /// A two-phase message: each branch is an action that runs if, and only if, the initiator's
    /// local transaction committed.
    Msg(Box<Msg>),
}

/// The steps of a saga beyond what their [`Branch`] holds (the action's target and the payload).
/// `steps[i]` belongs to `branches[i]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saga {
    /// Whether steps run as soon as the steps they come after are done (`true`), or one at a time
    /// in order (`false`, the default, ignoring [`SagaStep::after`]).
    pub concurrent: bool,
    /// One per branch, in branch order.
    pub steps: Vec<SagaStep>,
}

/// What a saga step adds to its branch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaStep {
    /// Where the compensation is called (for the transport to interpret, like [`Branch::target`]).
    pub compensate: String,
    /// Indexes of the steps whose actions must be done before this one starts (concurrent sagas).
    pub after: Vec<u32>,
    /// Set when the saga turns to compensating: this step's action ran or may have run, so its
    /// compensation must run.
    pub started: bool,
}

/// What a two-phase message adds to its branches (its actions).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msg {
    /// Where the coordinator asks whether the local transaction committed, when the message is
    /// still prepared at its deadline.
    pub query_prepared: String,
}

impl TxKind {
    /// The kind's lower-case name, as used in APIs: `tcc`, `saga` or `msg`.
    pub fn as_str(&self) -> &'static str {
        match self {
            TxKind::Tcc => "tcc",
            TxKind::Saga(_) => "saga",
            TxKind::Msg(_) => "msg",
        }
    }
}

/// Per-transaction settings a client may choose at begin (the DTM protocol's `TransOptions`).
/// Unset fields use the coordinator's [`RetryPolicy`](crate::RetryPolicy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxOptions {
    /// Delay before the first phase-two retry, in milliseconds (doubling from there, as usual).
    pub retry_interval_ms: Option<u64>,
    /// Longest one phase-two call to a participant may take, in milliseconds.
    pub call_timeout_ms: Option<u64>,
}

impl Transaction {
    /// The branch with id `id`.
    pub fn branch(&self, id: &BranchId) -> Option<&Branch> {
        self.branches.iter().find(|b| &b.id == id)
    }

    /// Branches that phase two has not finished yet.
    pub fn pending_branches(&self) -> impl Iterator<Item = &Branch> {
        self.branches.iter().filter(|b| b.state == BranchState::Registered)
    }

    /// Appends `what` (at `at`, in the current state) to the history, dropping the oldest entries
    /// past [`MAX_HISTORY`].
    pub fn record(&mut self, at: Timestamp, what: Happening) {
        let what = match what {
            Happening::Round { done, failed, error } => {
                Happening::Round { done, failed, error: error.map(|e| cut(e, MAX_HISTORY_ERROR)) }
            }
            other => other,
        };
        self.history.push(HistoryEntry { at, state: self.state, what });
        let extra = self.history.len().saturating_sub(MAX_HISTORY);
        self.history.drain(..extra);
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}
