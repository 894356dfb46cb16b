//! Async TCC operations whose business methods stage their writes: [`TccContext`],
//! [`AsyncOperation`] and the error mapping [`TccError`].
//!
//! The barrier record must commit atomically with the business state (DESIGN.md guarantee 6): one
//! sled transaction over the barrier trees and the business trees. A sled transaction closure is
//! synchronous and may be run more than once, so an `async fn` business method cannot run inside
//! it. Instead the method runs first, against a [`TccContext`]:
//!
//! - reads ([`get`](TccContext::get)) see the committed state of the participant's business trees,
//!   each value with its [`Version`];
//! - writes ([`insert_new`](TccContext::insert_new), [`put`](TccContext::put),
//!   [`remove`](TccContext::remove)) are only *staged*, each with the version it expects to replace
//!   (optimistic concurrency: an update succeeds only if the version it read is still current).
//!
//! Then the participant runtime commits, in *one* sled transaction through the barrier, the barrier
//! record and the staged writes, after checking again, inside that transaction, that every key the
//! method read or wrote still has the version it saw. If another call changed one of them meanwhile,
//! nothing is written and the method runs again on fresh reads (see
//! [`participant`](crate::participant) for the bounds and the answers).
//!
//! Values are stored as JSON after a one-byte tag and an 8-byte version; versions come from
//! [`sled::Db::generate_id`], so a key removed and inserted again never gets back a version it had
//! (no ABA). Seed and inspect such trees with [`Participant::seed`](crate::participant::Participant::seed)
//! and [`Participant::read`](crate::participant::Participant::read).
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use tcc_http::staged::{StoreError, TccContext};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Flight { free: u32, held: u32 }
//!
//! /// The business try of a seat hold: one free seat becomes held, if there is one.
//! fn hold_one(ctx: &TccContext, flight: &str) -> Result<bool, StoreError> {
//!     let Some(f) = ctx.get::<Flight>("flights", flight)? else { return Ok(false) };
//!     if f.value.free == 0 {
//!         return Ok(false);
//!     }
//!     let next = Flight { free: f.value.free - 1, held: f.value.held + 1 };
//!     ctx.put("flights", flight, &next, f.version)?;
//!     Ok(true)
//! }
//! ```

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use tcc_core::{BranchId, Gid, Timestamp};

/// First byte of every value written through a [`TccContext`].
const VALUE_TAG: u8 = 1;

/// The version of a value in a business tree, as returned with every read and write.
///
/// Opaque and unique within the participant's database: every write gives the key a version it never
/// had before. It serializes as a number, so a client may carry it in a request ("update this only if
/// it is still the version I saw").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Version(u64);

impl Version {
    /// The version as a number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl From<u64> for Version {
    fn from(v: u64) -> Version {
        Version(v)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// A value read from a business tree with its [`Version`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// Its version: pass it to [`TccContext::put`] or [`TccContext::remove`] to change it.
    pub version: Version,
}

/// A [`TccContext`] operation failed.
///
/// [`Conflict`](StoreError::Conflict) is the business method's to handle (the version it was given is
/// not the current one). Every other variant is a *fault*: the runtime never commits a call during
/// which one happened, whatever the method returned, and answers 503 (`storage`) or 500
/// (`internal`). It serializes, so a business error type can carry it as a variant
/// (`#[error(transparent)] Store(#[from] StoreError)`) and `?` works on context calls.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum StoreError {
    /// The key does not have the version the write expected (`None`: absent).
    #[error("version conflict on {tree}/{key}: expected {}, found {}", show(*.expected), show(*.found))]
    Conflict {
        /// The tree.
        tree: String,
        /// The key (lossy UTF-8).
        key: String,
        /// The version the write expected.
        expected: Option<Version>,
        /// The version the key has.
        found: Option<Version>,
    },
    /// No business tree of this participant has that name.
    #[error("no business tree named {0:?} on this participant")]
    UnknownTree(String),
    /// The stored bytes are not a value written through a context, or not of the type asked for.
    #[error("value {tree}/{key} does not decode: {message}")]
    Undecodable {
        /// The tree.
        tree: String,
        /// The key (lossy UTF-8).
        key: String,
        /// Why.
        message: String,
    },
    /// The value could not be encoded as JSON.
    #[error("value does not encode: {0}")]
    Encode(String),
    /// sled failed.
    #[error("storage: {0}")]
    Storage(String),
    /// The context was used after its call returned: it takes no more operations.
    #[error("this TccContext belongs to a call that is over")]
    Closed,
}

fn show(v: Option<Version>) -> String {
    v.map_or_else(|| "absent".to_owned(), |v| v.to_string())
}

impl StoreError {
    /// Whether this is a version conflict rather than a fault.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}

/// How the participant runtime answers a business error (see [`TccError::disposition`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// A business refusal: answered 409 `refused`, with the error as JSON in the body's `detail`. At
    /// try, the initiator's typed client returns it as
    /// [`TccCallError::Refused`](crate::stub::TccCallError::Refused) and the transaction is cancelled.
    /// At confirm or cancel (which must not fail for business reasons) the coordinator flags the
    /// transaction for an operator at once.
    Refuse,
    /// A transient failure (a dependency is down, say): answered 503 `unavailable`, nothing stored.
    /// At try, the typed client tries again (a bounded number of times); at confirm or cancel, the
    /// coordinator retries with backoff and flags the transaction when its retry policy is spent.
    Transient,
    /// The business method's database rolled its transaction back (a serialization failure or a
    /// deadlock, see [`SqlError`](crate::participant::sql::SqlError)): the runtime runs the whole call
    /// again, at most [`MAX_RUNS`](crate::participant::MAX_RUNS) times, then answers 503 (`contended`
    /// on SQL, `unavailable` otherwise), which the coordinator and the typed client retry.
    Retry,
}

/// The business error type of `#[tcc]` operations and [`AsyncOperation`]s: it says how the runtime
/// answers it, and travels to the initiator as its message and, when the type is `Serialize`, as JSON
/// in the answer's `detail` (which `#[tcc]`'s typed client decodes when the type is `Deserialize`).
///
/// Only `Display` is required: an error holding a `sqlx::Error` or an `std::io::Error` is fine (the
/// typed client then needs `Deserialize`, which [`SqlError`](crate::participant::sql::SqlError)
/// provides by serializing as its message).
///
/// The default [`disposition`](TccError::disposition) makes every error a refusal; override it to
/// make some transient.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tcc_http::staged::{Disposition, StoreError, TccError};
///
/// #[derive(Debug, thiserror::Error, Serialize, Deserialize)]
/// pub enum FlightError {
///     #[error("flight {0} is full")]
///     Full(String),
///     #[error("the fare service is down")]
///     FaresDown,
///     #[error(transparent)]
///     Store(#[from] StoreError),
/// }
///
/// impl TccError for FlightError {
///     fn disposition(&self) -> Disposition {
///         match self {
///             FlightError::FaresDown => Disposition::Transient,
///             _ => Disposition::Refuse,
///         }
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a TCC business error",
    label = "the error type of a TCC operation, saga step or message action must implement `tcc_http::TccError`",
    note = "add `impl tcc_http::TccError for {Self} {{}}` (every error then refuses: a try cancels its transaction, a saga action turns its saga back)"
)]
pub trait TccError: fmt::Display + Send + 'static {
    /// How the runtime answers this error; [`Disposition::Refuse`] unless overridden.
    fn disposition(&self) -> Disposition {
        Disposition::Refuse
    }
}

/// A method whose only errors are its context's can return [`StoreError`] itself: a version
/// conflict runs the call again on fresh reads ([`Disposition::Retry`]), anything else is answered
/// as a fault of the participant (503 or 500, retried by the coordinator), never as a refusal.
impl TccError for StoreError {
    fn disposition(&self) -> Disposition {
        match self {
            StoreError::Conflict { .. } => Disposition::Retry,
            _ => Disposition::Transient,
        }
    }
}

/// Which phase a [`TccContext`] serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Phase one: reserve.
    Try,
    /// Phase two: make the reservation real.
    Confirm,
    /// Phase two: release the reservation.
    Cancel,
    /// The participant's own release of a reservation nobody finished by deadline + grace; runs the
    /// operation's cancel.
    Expire,
    /// A saga step's action, or a message's action ([`AsyncStep`], [`AsyncAction`]).
    Action,
    /// A saga step's compensation ([`AsyncStep`]).
    Compensate,
    /// A message's local transaction
    /// ([`Participant::local_transaction`](crate::participant::Participant::local_transaction)).
    Local,
}

impl Phase {
    /// The phase's lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Try => "try",
            Phase::Confirm => "confirm",
            Phase::Cancel => "cancel",
            Phase::Expire => "expire",
            Phase::Action => "action",
            Phase::Compensate => "compensate",
            Phase::Local => "local",
        }
    }
}

/// One async TCC operation: try, confirm and cancel as async methods over a [`TccContext`], typed
/// request and response travelling as JSON. What `#[tcc]` generates for each operation of a trait;
/// implement it by hand to serve an operation without the macro
/// ([`Participant::async_operation`](crate::participant::Participant::async_operation)).
///
/// Each method may run more than once for one call (after a version conflict, on fresh reads); only
/// the writes it stages in the context of the run that commits take effect. Keep every effect in the
/// context: anything else (an email, a call to another service) may happen again.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use serde::{Deserialize, Serialize};
/// use tcc_http::participant::Participant;
/// use tcc_http::staged::{AsyncOperation, StoreError, TccContext, TccError};
///
/// #[derive(Debug, Serialize, Deserialize, thiserror::Error)]
/// #[error("{0}")]
/// pub struct Refused(String);
///
/// impl TccError for Refused {}
///
/// fn fault(e: StoreError) -> Refused {
///     Refused(e.to_string()) // the runtime answers a store fault as such, whatever is returned
/// }
///
/// /// Holds one unit of the item named by the request; the stock is a counter in tree "stock".
/// struct Hold;
///
/// impl AsyncOperation for Hold {
///     type Request = String;
///     type Response = u32;
///     type Error = Refused;
///
///     async fn try_(&self, ctx: TccContext, item: String) -> Result<u32, Refused> {
///         let free = ctx.get::<u32>("stock", &item).map_err(fault)?;
///         let Some(free) = free.filter(|f| f.value > 0) else {
///             return Err(Refused(format!("{item} is sold out")));
///         };
///         ctx.put("stock", &item, &(free.value - 1), free.version).map_err(fault)?;
///         Ok(free.value - 1)
///     }
///
///     async fn confirm(&self, _ctx: TccContext, _item: String) -> Result<(), Refused> {
///         Ok(()) // the unit left the stock at try
///     }
///
///     async fn cancel(&self, ctx: TccContext, item: String) -> Result<(), Refused> {
///         if let Some(free) = ctx.get::<u32>("stock", &item).map_err(fault)? {
///             ctx.put("stock", &item, &(free.value + 1), free.version).map_err(fault)?;
///         }
///         Ok(())
///     }
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let db = tcc_core::DurableDb::temporary()?;
/// let stock = db.open_tree("stock")?;
/// let clock = Arc::new(tcc_core::SystemClock);
/// let barrier = tcc_core::SledBarrier::open(&db, vec![stock], clock, Duration::from_secs(60))?;
/// let participant = Participant::with_barrier_durability(barrier).async_operation("hold", Hold);
/// participant.seed("stock", "lamp", &3u32)?;
/// assert_eq!(participant.read::<u32>("stock", "lamp")?.map(|v| v.value), Some(3));
/// // Serve `participant.router()`: `POST /hold/try` with body `"lamp"` holds one.
/// # Ok(()) }
/// ```
pub trait AsyncOperation: Send + Sync + 'static {
    /// The try's request (the JSON body of the try; confirm and cancel get the stored one back).
    type Request: DeserializeOwned + Send + 'static;
    /// The try's result (the JSON body of its answer).
    type Response: Serialize + Send + 'static;
    /// The business error.
    type Error: TccError;

    /// Phase one: check and reserve. Runs at most once per (transaction, branch) to effect; a
    /// duplicate try gets the stored response.
    fn try_(
        &self,
        ctx: TccContext,
        request: Self::Request,
    ) -> impl Future<Output = Result<Self::Response, Self::Error>> + Send;

    /// Phase two: turn the reservation into the real effect. Runs only after a try, at most once to
    /// effect.
    fn confirm(
        &self,
        ctx: TccContext,
        request: Self::Request,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Phase two: release the reservation. Runs only after a try, at most once to effect; also run by
    /// the participant's own expiry ([`Phase::Expire`]).
    fn cancel(
        &self,
        ctx: TccContext,
        request: Self::Request,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The error as JSON for the answer's `detail` (`None`: no detail). `#[tcc]` fills it in with the
    /// error's `Serialize` implementation when it has one; a hand-written operation returns
    /// `serde_json::to_value(error).ok()` for the same.
    fn error_detail(error: &Self::Error) -> Option<serde_json::Value> {
        let _ = error;
        None
    }
}

/// A message's action, or the action half of a saga step, as an async method over a [`TccContext`]:
/// what `#[tcc]` generates for a method marked `#[tcc(action)]`; implement it by hand to serve an
/// action without the macro ([`Participant::async_action`](crate::participant::Participant::async_action)).
///
/// The barrier runs it at most once per (transaction, branch) to effect: a duplicate call answers
/// success and runs nothing. An action holds nothing, so nothing ever expires it; it may run again
/// (for another run of the same call) only as an [`AsyncOperation`] method may, after a version
/// conflict, with only the last run's staged writes committed.
pub trait AsyncAction: Send + Sync + 'static {
    /// The request (the JSON body of the call; the compensation gets the stored one back).
    type Request: DeserializeOwned + Send + 'static;
    /// The business error. A refusal ([`Disposition::Refuse`]) of a saga's action turns the saga
    /// back; any other error is retried by the coordinator. A message's action is retried whatever
    /// it answers, so it should not refuse.
    type Error: TccError;

    /// Does the step's work.
    fn action(
        &self,
        ctx: TccContext,
        request: Self::Request,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The error as JSON for the answer's `detail`, as [`AsyncOperation::error_detail`].
    fn error_detail(error: &Self::Error) -> Option<serde_json::Value> {
        let _ = error;
        None
    }
}

/// A saga step: an [`AsyncAction`] and the compensation that undoes it, what `#[tcc]` generates for
/// a method marked `#[tcc(compensate = ...)]` ([`Participant::async_step`](crate::participant::Participant::async_step)).
///
/// The barrier runs the compensation only after the action ran, at most once to effect; a
/// compensation arriving first (the action is late, or never came) runs nothing, is recorded, and
/// the late action is then refused, so nothing is left done that nobody undoes.
pub trait AsyncStep: AsyncAction {
    /// Undoes the action, with the action's stored request. Should not refuse: the coordinator
    /// retries it, then flags the saga for an operator.
    fn compensate(
        &self,
        ctx: TccContext,
        request: Self::Request,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// The participant's business trees by name, and the database they live in.
#[derive(Debug)]
pub(crate) struct Trees {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    by_name: HashMap<String, usize>,
}

impl Trees {
    pub(crate) fn new(db: &sled::Db, trees: &[sled::Tree]) -> Trees {
        let by_name = trees
            .iter()
            .enumerate()
            .map(|(i, t)| (String::from_utf8_lossy(&t.name()).into_owned(), i))
            .collect();
        Trees { db: db.clone(), trees: trees.to_vec(), by_name }
    }

    fn index(&self, name: &str) -> Result<usize, StoreError> {
        self.by_name.get(name).copied().ok_or_else(|| StoreError::UnknownTree(name.to_owned()))
    }

    /// The tree named `name`.
    pub(crate) fn tree(&self, name: &str) -> Result<&sled::Tree, StoreError> {
        Ok(&self.trees[self.index(name)?])
    }

    /// A version no key of this database ever had.
    fn fresh_version(&self) -> Result<Version, StoreError> {
        let id = self.db.generate_id().map_err(|e| StoreError::Storage(e.to_string()))?;
        Ok(Version(id.saturating_add(1)))
    }

    /// Writes `value` at `key` now, outside any call, in a transaction of its own.
    pub(crate) fn seed<T: Serialize>(
        &self,
        tree: &str,
        key: &[u8],
        value: &T,
    ) -> Result<Version, StoreError> {
        let t = self.tree(tree)?;
        let version = self.fresh_version()?;
        let bytes = encode_value(version, value)?;
        t.transaction(|tx| {
            tx.insert(key, bytes.as_slice())?;
            Ok::<_, ConflictableTransactionError<()>>(())
        })
        .map_err(|e| StoreError::Storage(format!("{e:?}")))?;
        Ok(version)
    }

    /// Reads `key` now, outside any call.
    pub(crate) fn read<T: DeserializeOwned>(
        &self,
        tree: &str,
        key: &[u8],
    ) -> Result<Option<Versioned<T>>, StoreError> {
        let t = self.tree(tree)?;
        let raw = t.get(key).map_err(|e| StoreError::Storage(e.to_string()))?;
        match raw {
            None => Ok(None),
            Some(bytes) => decode_value(tree, key, &bytes).map(Some),
        }
    }
}

/// A stored business value and its version, or why the bytes are not one.
fn decode_value<T: DeserializeOwned>(
    tree: &str,
    key: &[u8],
    bytes: &[u8],
) -> Result<Versioned<T>, StoreError> {
    let (version, json) =
        split_value(bytes).ok_or_else(|| undecodable(tree, key, "not a versioned value"))?;
    let value = serde_json::from_slice(json).map_err(|e| undecodable(tree, key, &e.to_string()))?;
    Ok(Versioned { value, version })
}

fn undecodable(tree: &str, key: &[u8], message: &str) -> StoreError {
    StoreError::Undecodable {
        tree: tree.to_owned(),
        key: String::from_utf8_lossy(key).into_owned(),
        message: message.to_owned(),
    }
}

fn encode_value<T: Serialize>(version: Version, value: &T) -> Result<Vec<u8>, StoreError> {
    let mut bytes = Vec::with_capacity(64);
    bytes.push(VALUE_TAG);
    bytes.extend_from_slice(&version.0.to_be_bytes());
    serde_json::to_writer(&mut bytes, value).map_err(|e| StoreError::Encode(e.to_string()))?;
    Ok(bytes)
}

/// The version and JSON of a stored value; `None` if it was not written through a context.
fn split_value(bytes: &[u8]) -> Option<(Version, &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    if tag != VALUE_TAG || rest.len() < 8 {
        return None;
    }
    let (version, json) = rest.split_at(8);
    Some((Version(u64::from_be_bytes(version.try_into().ok()?)), json))
}

/// The version of stored bytes (`None`: absent), for the commit's check.
fn version_of(bytes: Option<&[u8]>) -> Result<Option<Version>, ()> {
    match bytes {
        None => Ok(None),
        Some(b) => split_value(b).map(|(v, _)| Some(v)).ok_or(()),
    }
}

type Key = (usize, Vec<u8>);

/// What one run of a business method read and staged.
#[derive(Debug, Default)]
pub(crate) struct Stage {
    /// Every key read or written: the committed bytes seen at the first read (`None`: absent).
    seen: BTreeMap<Key, Option<Vec<u8>>>,
    /// The staged new state of each written key (`None`: removed).
    writes: BTreeMap<Key, Option<Vec<u8>>>,
    /// The first fault of the run; a run with a fault never commits.
    fault: Option<StoreError>,
    /// Set once the run is over: the context takes no more operations.
    closed: bool,
}

/// Why a commit of staged writes aborted.
#[derive(Debug)]
pub(crate) enum CommitAbort {
    /// A key read or written no longer has the version the run saw: run again.
    Conflict,
    /// The barrier record changed between the runtime's check and the commit in a way that needs
    /// the check again (a try landed before an empty cancel, say): start over.
    Retry,
    /// The branch was tried through another operation, or its record is not the runtime's.
    Mismatch(String),
    /// A synchronous business cancel aborted (during expiry).
    Failed(String),
}

impl fmt::Display for CommitAbort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommitAbort::Conflict => f.write_str("a value read by the business method changed"),
            CommitAbort::Retry => f.write_str("the branch changed while the business method ran"),
            CommitAbort::Mismatch(m) | CommitAbort::Failed(m) => f.write_str(m),
        }
    }
}

impl Stage {
    /// The fault of the run, if any.
    pub(crate) fn fault(&self) -> Option<&StoreError> {
        self.fault.as_ref()
    }

    /// Inside the barrier's transaction: checks that every key seen still has the version seen, then
    /// applies the staged writes. `trees` are the business trees, in the barrier's order.
    pub(crate) fn commit(
        &self,
        trees: &[TransactionalTree],
    ) -> Result<(), ConflictableTransactionError<CommitAbort>> {
        for ((tree, key), seen) in &self.seen {
            let now = trees[*tree].get(key)?;
            let same = match (version_of(seen.as_deref()), version_of(now.as_deref())) {
                (Ok(a), Ok(b)) => a == b,
                // Bytes the context cannot read were refused at read time; compare them as they are.
                _ => seen.as_deref() == now.as_deref(),
            };
            if !same {
                return Err(ConflictableTransactionError::Abort(CommitAbort::Conflict));
            }
        }
        for ((tree, key), value) in &self.writes {
            match value {
                Some(bytes) => trees[*tree].insert(key.as_slice(), bytes.as_slice())?,
                None => trees[*tree].remove(key.as_slice())?,
            };
        }
        Ok(())
    }
}

struct Inner {
    gid: Gid,
    branch: BranchId,
    deadline: Timestamp,
    phase: Phase,
    operation: String,
    trees: Arc<Trees>,
    stage: Mutex<Stage>,
}

/// What a business method of an [`AsyncOperation`] (or of a `#[tcc]` trait) gets: the call's
/// identity and deadline, and a staged, versioned view of the participant's business trees.
///
/// Reads see the committed state (and this run's own staged writes); writes are staged and commit,
/// with the barrier record, only if the method returns `Ok` and every key it read or wrote is still
/// at the version it saw (see the [module docs](self)). Trees are named as when they were opened
/// (`db.open_tree("seats")`) and given to the barrier.
///
/// Reads are plain sled reads on the calling task (served from sled's cache once warm).
pub struct TccContext {
    inner: Arc<Inner>,
}

impl fmt::Debug for TccContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TccContext")
            .field("gid", &self.inner.gid)
            .field("branch", &self.inner.branch)
            .field("deadline", &self.inner.deadline)
            .field("phase", &self.inner.phase)
            .field("operation", &self.inner.operation)
            .finish_non_exhaustive()
    }
}

/// The runtime's handle on a [`TccContext`] it gave away: the stage, after the run.
pub(crate) struct ContextHandle {
    inner: Arc<Inner>,
}

impl ContextHandle {
    /// Ends the run: the context takes no more operations; returns what it staged.
    pub(crate) fn close(self) -> Stage {
        let mut stage = lock(&self.inner.stage);
        let taken = std::mem::take(&mut *stage);
        stage.closed = true;
        taken
    }
}

fn lock(stage: &Mutex<Stage>) -> MutexGuard<'_, Stage> {
    // Only this module's code runs under the lock, and none of it panics; a poisoned lock still
    // holds a consistent stage.
    stage.lock().unwrap_or_else(PoisonError::into_inner)
}

impl TccContext {
    /// A context for one run of a business method, and the runtime's handle on it.
    pub(crate) fn new(
        trees: Arc<Trees>,
        gid: Gid,
        branch: BranchId,
        deadline: Timestamp,
        phase: Phase,
        operation: &str,
    ) -> (TccContext, ContextHandle) {
        let inner = Arc::new(Inner {
            gid,
            branch,
            deadline,
            phase,
            operation: operation.to_owned(),
            trees,
            stage: Mutex::default(),
        });
        (TccContext { inner: Arc::clone(&inner) }, ContextHandle { inner })
    }

    /// The global transaction id.
    pub fn gid(&self) -> &Gid {
        &self.inner.gid
    }

    /// The branch id.
    pub fn branch(&self) -> &BranchId {
        &self.inner.branch
    }

    /// The transaction's deadline, as carried by the try.
    pub fn deadline(&self) -> Timestamp {
        self.inner.deadline
    }

    /// The phase this run serves.
    pub fn phase(&self) -> Phase {
        self.inner.phase
    }

    /// The operation's name (the method name of a `#[tcc]` operation).
    pub fn operation(&self) -> &str {
        &self.inner.operation
    }

    /// Runs `f` on the stage, recording a fault it returns.
    fn with_stage<R>(
        &self,
        f: impl FnOnce(&Trees, &mut Stage) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut stage = lock(&self.inner.stage);
        if stage.closed {
            return Err(StoreError::Closed);
        }
        let r = f(&self.inner.trees, &mut stage);
        if let Err(e) = &r
            && !e.is_conflict()
            && stage.fault.is_none()
        {
            stage.fault = Some(e.clone());
        }
        r
    }

    /// The value at `key` in tree `tree`, with its version; `None` if there is none.
    ///
    /// Within one run, reading a key again returns what the first read saw, or what this run staged
    /// for it since.
    pub fn get<T: DeserializeOwned>(
        &self,
        tree: &str,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        let key = key.as_ref();
        self.with_stage(|trees, stage| {
            let bytes = current(trees, stage, tree, key)?;
            match bytes {
                None => Ok(None),
                Some(bytes) => decode_value(tree, key, &bytes).map(Some),
            }
        })
    }

    /// Stages `value` at `key`, which must be absent; returns the version it will have.
    pub fn insert_new<T: Serialize>(
        &self,
        tree: &str,
        key: impl AsRef<[u8]>,
        value: &T,
    ) -> Result<Version, StoreError> {
        self.stage_write(tree, key.as_ref(), None, Some(value))
    }

    /// Stages `value` at `key`, which must be at version `expected`; returns the version it will have.
    pub fn put<T: Serialize>(
        &self,
        tree: &str,
        key: impl AsRef<[u8]>,
        value: &T,
        expected: Version,
    ) -> Result<Version, StoreError> {
        self.stage_write(tree, key.as_ref(), Some(expected), Some(value))
    }

    /// Stages the removal of `key`, which must be at version `expected`.
    pub fn remove(&self, tree: &str, key: impl AsRef<[u8]>, expected: Version) -> Result<(), StoreError> {
        self.stage_write::<()>(tree, key.as_ref(), Some(expected), None).map(drop)
    }

    fn stage_write<T: Serialize>(
        &self,
        tree: &str,
        key: &[u8],
        expected: Option<Version>,
        value: Option<&T>,
    ) -> Result<Version, StoreError> {
        self.with_stage(|trees, stage| {
            let found = match current(trees, stage, tree, key)? {
                None => None,
                Some(bytes) => Some(
                    split_value(&bytes).ok_or_else(|| undecodable(tree, key, "not a versioned value"))?.0,
                ),
            };
            if found != expected {
                return Err(StoreError::Conflict {
                    tree: tree.to_owned(),
                    key: String::from_utf8_lossy(key).into_owned(),
                    expected,
                    found,
                });
            }
            let index = trees.index(tree)?;
            match value {
                Some(value) => {
                    let version = trees.fresh_version()?;
                    let bytes = encode_value(version, value)?;
                    stage.writes.insert((index, key.to_vec()), Some(bytes));
                    Ok(version)
                }
                None => {
                    stage.writes.insert((index, key.to_vec()), None);
                    Ok(expected.unwrap_or(Version(0)))
                }
            }
        })
    }
}

/// The bytes at `key` as this run sees them: staged, else first seen, else read now (and remembered).
fn current(trees: &Trees, stage: &mut Stage, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
    let index = trees.index(tree)?;
    let k = (index, key.to_vec());
    if let Some(staged) = stage.writes.get(&k) {
        return Ok(staged.clone());
    }
    if let Some(seen) = stage.seen.get(&k) {
        return Ok(seen.clone());
    }
    let read = trees.trees[index].get(key).map_err(|e| StoreError::Storage(e.to_string()))?;
    let read = read.map(|v| v.to_vec());
    stage.seen.insert(k, read.clone());
    Ok(read)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Stored business values are read back through `split_value`: damaged bytes are "not a
        /// versioned value" or undecodable JSON, never a panic.
        #[test]
        fn damaged_values_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = split_value(&bytes);
            let (db, trees) = fixture();
            db.open_tree("seats").expect("tree").insert("k", bytes).expect("insert");
            let ctx = ctx(&trees).0;
            let _ = ctx.get::<u32>("seats", "k");
        }

        #[test]
        fn any_value_round_trips(version in any::<u64>(), value in any::<Option<u32>>()) {
            let bytes = encode_value(Version(version), &value).expect("encodes");
            let (v, json) = split_value(&bytes).expect("splits");
            prop_assert_eq!(v, Version(version));
            prop_assert_eq!(serde_json::from_slice::<Option<u32>>(json).expect("decodes"), value);
        }
    }

    fn fixture() -> (tcc_core::DurableDb, Arc<Trees>) {
        let db = tcc_core::DurableDb::temporary().expect("db");
        let seats = db.open_tree("seats").expect("tree");
        let trees = Arc::new(Trees::new(&db, &[seats]));
        (db, trees)
    }

    fn ctx(trees: &Arc<Trees>) -> (TccContext, ContextHandle) {
        let gid: Gid = "tx-1".parse().expect("gid");
        let branch: BranchId = "b".parse().expect("branch");
        TccContext::new(Arc::clone(trees), gid, branch, Timestamp(10), Phase::Try, "hold")
    }

    /// Commits a stage in a transaction of its own over the one business tree.
    fn commit(db: &sled::Db, stage: &Stage) -> Result<(), String> {
        let seats = db.open_tree("seats").expect("tree");
        seats.transaction(|t| stage.commit(std::slice::from_ref(t))).map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn writes_are_staged_until_committed_and_reads_see_them() {
        let (db, trees) = fixture();
        let (c, handle) = ctx(&trees);
        assert_eq!(c.get::<u32>("seats", "12A"), Ok(None));
        let v = c.insert_new("seats", "12A", &7u32).expect("staged");
        assert_eq!(c.get::<u32>("seats", "12A"), Ok(Some(Versioned { value: 7, version: v })));
        assert_eq!(trees.read::<u32>("seats", b"12A"), Ok(None), "nothing committed yet");
        let stage = handle.close();
        commit(&db, &stage).expect("commits");
        assert_eq!(trees.read::<u32>("seats", b"12A"), Ok(Some(Versioned { value: 7, version: v })));
        assert_eq!(c.get::<u32>("seats", "12A"), Err(StoreError::Closed));
    }

    #[test]
    fn a_write_expecting_another_version_is_a_conflict_not_a_fault() {
        let (_db, trees) = fixture();
        let v1 = trees.seed("seats", b"12A", &1u32).expect("seeded");
        let (c, handle) = ctx(&trees);
        let err = c.put("seats", "12A", &2u32, Version(v1.get() + 100)).expect_err("stale");
        assert!(err.is_conflict(), "{err}");
        assert!(c.insert_new("seats", "12A", &2u32).expect_err("present").is_conflict());
        let v2 = c.put("seats", "12A", &2u32, v1).expect("current");
        assert_ne!(v1, v2);
        // A second write in the same run expects the staged version.
        c.put("seats", "12A", &3u32, v2).expect("staged version");
        assert!(handle.close().fault().is_none());
    }

    #[test]
    fn a_change_committed_by_someone_else_makes_the_commit_conflict() {
        let (db, trees) = fixture();
        let v1 = trees.seed("seats", b"12A", &1u32).expect("seeded");
        trees.seed("seats", b"other", &1u32).expect("seeded");
        let (c, handle) = ctx(&trees);
        // Reads alone are checked too: the run's decision rested on them.
        c.get::<u32>("seats", "other").expect("read");
        c.put("seats", "12A", &2u32, v1).expect("staged");
        trees.seed("seats", b"other", &5u32).expect("concurrent write");
        let stage = handle.close();
        let err = commit(&db, &stage).expect_err("conflict");
        assert!(err.contains("Conflict"), "{err}");
        assert_eq!(trees.read::<u32>("seats", b"12A").expect("read").map(|v| v.value), Some(1));
    }

    #[test]
    fn a_key_removed_and_inserted_again_never_gets_an_old_version_back() {
        let (db, trees) = fixture();
        let v1 = trees.seed("seats", b"12A", &1u32).expect("seeded");
        let (c, handle) = ctx(&trees);
        c.remove("seats", "12A", v1).expect("staged");
        assert_eq!(c.get::<u32>("seats", "12A"), Ok(None));
        commit(&db, &handle.close()).expect("commits");
        let v2 = trees.seed("seats", b"12A", &1u32).expect("seeded again");
        assert_ne!(v1, v2);
        let (c, _handle) = ctx(&trees);
        assert!(c.put("seats", "12A", &9u32, v1).expect_err("old version").is_conflict());
    }

    #[test]
    fn faults_are_recorded_and_damaged_bytes_are_errors() {
        let (db, trees) = fixture();
        db.open_tree("seats").expect("tree").insert("raw", "not versioned").expect("insert");
        let (c, handle) = ctx(&trees);
        assert!(matches!(c.get::<u32>("seats", "raw"), Err(StoreError::Undecodable { .. })));
        assert_eq!(c.get::<u32>("nope", "k"), Err(StoreError::UnknownTree("nope".into())));
        let stage = handle.close();
        assert!(matches!(stage.fault(), Some(StoreError::Undecodable { .. })), "the first fault is kept");
        // A value of another type does not decode either.
        trees.seed("seats", b"text", &"hello").expect("seeded");
        let (c, _h) = ctx(&trees);
        assert!(matches!(c.get::<u32>("seats", "text"), Err(StoreError::Undecodable { .. })));
        assert_eq!(split_value(b""), None);
        assert_eq!(split_value(&[VALUE_TAG, 0, 0]), None);
    }
}
