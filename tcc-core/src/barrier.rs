//! The participant barrier: duplicate calls, empty cancels and suspended tries become the framework's
//! problem, not the participant author's.
//!
//! Every participant keeps one [`BarrierRecord`] per (global id, branch id). Before a business try,
//! confirm or cancel runs, the barrier looks at that record and decides, in one pure function
//! ([`decide`]), whether the business method runs, is skipped as a duplicate, is replaced by a bare
//! record (empty cancel) or is refused. Then the business state and the new record commit together.
//!
//! ```text
//!           try (before deadline)               confirm
//!  (none) ────────────────────────▶ Tried ─────────────────────▶ Confirmed
//!    │                               │   │
//!    │ cancel: empty cancel,  cancel │   │ deadline + grace passed: the participant's own sweep
//!    │ business cancel not run       ▼   ▼ runs the business cancel
//!    ▼                         Cancelled  Expired
//!  CancelledEmpty
//! ```
//!
//! | call      | no record                  | Tried          | Confirmed           | Cancelled, CancelledEmpty | Expired             |
//! |-----------|----------------------------|----------------|---------------------|---------------------------|---------------------|
//! | try       | run (refused past deadline)| duplicate      | duplicate           | refused: [`Refusal::Suspended`] | refused: [`Refusal::Expired`] |
//! | confirm   | refused: [`Refusal::NotTried`] | run        | duplicate           | refused: [`Refusal::AlreadyCancelled`] | refused: [`Refusal::Expired`] |
//! | cancel    | record `CancelledEmpty`    | run            | refused: [`Refusal::AlreadyConfirmed`] | duplicate        | duplicate           |
//! | expire    | nothing                    | run when due   | nothing             | nothing                   | nothing             |
//!
//! Sagas and two-phase messages use the same record with states of their own. A saga step's
//! action holds nothing, so it never expires; its compensation undoes it, and a compensation that
//! arrives first is remembered so that the late action is refused (the saga's version of the
//! suspended try). A message's local transaction commits its record with the initiator's business
//! writes; the back-check reads that record, and where there is none it writes one saying "rolled
//! back", so that a local transaction still on its way can never commit after the answer.
//!
//! | call        | no record                      | Done             | Compensated, CompensatedEmpty | Committed | RolledBack |
//! |-------------|--------------------------------|------------------|-------------------------------|-----------|------------|
//! | action      | run                            | duplicate        | refused: [`Refusal::Compensated`] | | |
//! | compensate  | record `CompensatedEmpty`      | run              | duplicate                     | | |
//! | local       | run                            |                  |                               | duplicate | refused: [`Refusal::RolledBack`] |
//! | back-check  | record `RolledBack`            |                  |                               | duplicate: committed | duplicate: rolled back |
//!
//! A call on a record of another kind (a TCC try on a saga step's record, an action on a message's
//! local transaction, ...; the empty cells) is refused with [`Refusal::OtherKind`]; the expiry sweep
//! only ever touches held TCC reservations.
//!
//! Two ways to use it:
//! - [`SledBarrier`] when the participant's business state lives in sled: one sled transaction covers
//!   the barrier trees and the business trees.
//! - [`decide`] directly when the business state lives elsewhere (a SQL database, say): its docs walk
//!   through the steps. Both share this one function, so they cannot drift apart.
//!
//! A business method that cannot run inside a sled transaction (an async one) decides first with
//! [`decide`] on [`SledBarrier::get`]'s record, prepares its writes outside, then commits them through
//! the same [`SledBarrier`] call, whose check inside the transaction stays the authority; for expiry,
//! [`SledBarrier::due`] lists what is due and [`SledBarrier::expire`] releases one. `tcc-http`'s
//! participant runtime does this for its async operations.

use std::convert::Infallible;
use std::fmt;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError, TransactionalTree,
};
use sled::{Transactional, Tree};
use tracing::{error, info, warn};

use crate::clock::Clock;
use crate::durable::DurableDb;
use crate::model::{BranchId, Gid, Timestamp};

#[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
pub mod sql;

/// Name of the sled tree holding one [`BarrierRecord`] per (global id, branch id).
pub const BARRIER_TREE: &str = "tcc_barrier";

/// Name of the sled tree indexing reservations still in [`BarrierState::Tried`] by deadline, so the
/// expiry sweep reads only what is due and never scans finished history.
pub const EXPIRY_TREE: &str = "tcc_barrier_expiry";

/// The first byte of every encoded [`BarrierRecord`]; bumped when the layout changes.
pub const FORMAT_VERSION: u8 = 1;

/// How many due index entries the expiry sweep reads at once, to bound memory after a long outage.
const SWEEP_BATCH: usize = 256;

/// Where a branch stands on this participant.
///
/// Encoded by position: new states are only ever appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BarrierState {
    /// The business try ran; the reservation is held.
    Tried,
    /// The business confirm ran. Final.
    Confirmed,
    /// The business cancel ran after a try. Final.
    Cancelled,
    /// Cancel arrived before any try ran (empty cancel); no business method ran. Final: a try arriving
    /// later is refused (suspension).
    CancelledEmpty,
    /// Nobody confirmed or cancelled by deadline + grace, so the participant ran the business cancel
    /// on its own. Final: a confirm arriving later is refused with [`Refusal::Expired`].
    Expired,
    /// A saga step's action, or a message's action, ran. It holds nothing, so it never expires; a
    /// saga's compensation may still come and undo it.
    Done,
    /// A saga step's compensation ran after its action. Final.
    Compensated,
    /// A saga step's compensation arrived before (or without) its action: nothing ran. Final: the
    /// action arriving later is refused with [`Refusal::Compensated`].
    CompensatedEmpty,
    /// A message's local transaction committed (its business writes with this record). Final: the
    /// back-check answers committed.
    Committed,
    /// A message's back-check found no local transaction and settled it as rolled back by writing
    /// this record. Final: the local transaction arriving later is refused with
    /// [`Refusal::RolledBack`], so the back-check's answer stays true.
    RolledBack,
}

impl BarrierState {
    /// Anything but [`Tried`](BarrierState::Tried) and [`Done`](BarrierState::Done): no business
    /// method will run for this branch again.
    pub fn is_final(self) -> bool {
        !matches!(self, BarrierState::Tried | BarrierState::Done)
    }

    /// Every state, in encoding order (for stores that keep the state by name).
    pub const ALL: [BarrierState; 10] = [
        BarrierState::Tried,
        BarrierState::Confirmed,
        BarrierState::Cancelled,
        BarrierState::CancelledEmpty,
        BarrierState::Expired,
        BarrierState::Done,
        BarrierState::Compensated,
        BarrierState::CompensatedEmpty,
        BarrierState::Committed,
        BarrierState::RolledBack,
    ];

    /// The state named `name` (as [`as_str`](BarrierState::as_str) writes it).
    ///
    /// ```
    /// use tcc_core::barrier::BarrierState;
    /// assert_eq!(BarrierState::from_name("compensated_empty"), Some(BarrierState::CompensatedEmpty));
    /// assert_eq!(BarrierState::from_name("Tried"), None);
    /// ```
    pub fn from_name(name: &str) -> Option<BarrierState> {
        BarrierState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether the record was written by a TCC call (try, confirm, cancel, expiry), as opposed to a
    /// saga or message call.
    fn is_tcc(self) -> bool {
        matches!(
            self,
            BarrierState::Tried
                | BarrierState::Confirmed
                | BarrierState::Cancelled
                | BarrierState::CancelledEmpty
                | BarrierState::Expired
        )
    }

    /// The state's lower-case name, as used in APIs and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            BarrierState::Tried => "tried",
            BarrierState::Confirmed => "confirmed",
            BarrierState::Cancelled => "cancelled",
            BarrierState::CancelledEmpty => "cancelled_empty",
            BarrierState::Expired => "expired",
            BarrierState::Done => "done",
            BarrierState::Compensated => "compensated",
            BarrierState::CompensatedEmpty => "compensated_empty",
            BarrierState::Committed => "committed",
            BarrierState::RolledBack => "rolled_back",
        }
    }
}

impl fmt::Display for BarrierState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a participant remembers about one branch.
///
/// Stored as [`FORMAT_VERSION`] followed by the postcard encoding of this struct (fields in order).
///
/// ```
/// use tcc_core::Timestamp;
/// use tcc_core::barrier::{BarrierRecord, BarrierState};
/// let rec = BarrierRecord {
///     state: BarrierState::Tried,
///     deadline: Timestamp(5_000),
///     request: b"seat 12A".to_vec(),
///     result: b"held".to_vec(),
///     updated_at: Timestamp(1_000),
/// };
/// assert_eq!(BarrierRecord::decode(&rec.encode()?)?, rec);
/// assert!(BarrierRecord::decode(b"\x07garbage").is_err());
/// # Ok::<(), tcc_core::barrier::CodecError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarrierRecord {
    /// Where the branch stands.
    pub state: BarrierState,
    /// The transaction's deadline, as carried by the try. `Timestamp(0)` for
    /// [`BarrierState::CancelledEmpty`], since a cancel does not carry it, and for every saga and
    /// message state, which never expire.
    pub deadline: Timestamp,
    /// The try's request bytes, kept so confirm, cancel and expiry get the original request.
    pub request: Vec<u8>,
    /// The try's result bytes, returned again to a duplicate try.
    pub result: Vec<u8>,
    /// When this record last changed (participant's clock).
    pub updated_at: Timestamp,
}

impl BarrierRecord {
    /// The record with `state`, everything else carried over from `self`.
    fn advanced(&self, state: BarrierState, now: Timestamp) -> BarrierRecord {
        BarrierRecord { state, updated_at: now, ..self.clone() }
    }

    /// The stored form: [`FORMAT_VERSION`] then postcard.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        postcard::to_extend(self, vec![FORMAT_VERSION]).map_err(|e| CodecError::Encode(e.to_string()))
    }

    /// Reads the stored form back. Damaged bytes give an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<BarrierRecord, CodecError> {
        let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
        if version != FORMAT_VERSION {
            return Err(CodecError::UnknownVersion(version));
        }
        let (record, rest) = postcard::take_from_bytes::<BarrierRecord>(body)
            .map_err(|e| CodecError::Malformed(e.to_string()))?;
        // Trailing bytes mean the value is not what we wrote: refuse rather than guess.
        if !rest.is_empty() {
            return Err(CodecError::TrailingBytes(rest.len()));
        }
        Ok(record)
    }
}

/// A [`BarrierRecord`] could not be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The stored value is empty.
    #[error("empty barrier record")]
    Empty,
    /// The first byte names a format this build does not know.
    #[error("barrier record has unknown format version {0}")]
    UnknownVersion(u8),
    /// The body does not decode.
    #[error("malformed barrier record: {0}")]
    Malformed(String),
    /// The body decodes but is followed by extra bytes.
    #[error("barrier record has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
    /// Encoding failed (not expected with this record's field types).
    #[error("cannot encode barrier record: {0}")]
    Encode(String),
}

/// A call arriving at the barrier, with what [`decide`] needs to know about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op<'a> {
    /// Phase one: reserve.
    Try {
        /// The transaction's deadline; a try arriving at or after it is refused.
        deadline: Timestamp,
        /// The try's request bytes, stored in the record.
        request: &'a [u8],
    },
    /// Phase two: make the reservation real.
    Confirm,
    /// Phase two: release the reservation.
    Cancel,
    /// The participant's own sweep: release a reservation nobody finished by deadline + `grace`.
    Expire {
        /// How long after the deadline the participant waits for the coordinator's word.
        grace: Duration,
    },
    /// A saga step's action, or a message's action: do it, once.
    Action {
        /// The action's request bytes, stored in the record (the compensation gets them back).
        request: &'a [u8],
    },
    /// A saga step's compensation: undo the action if it ran; if it did not, remember that, so the
    /// action is refused should it arrive later.
    Compensate,
    /// A message's local transaction: the initiator's own business writes, committed with this
    /// record so that a back-check can tell it committed.
    Local {
        /// Stored in the record, for inspection.
        request: &'a [u8],
    },
    /// A message's back-check: did the local transaction commit? If it has not, it never will:
    /// settle it as rolled back.
    BackCheck,
}

impl Op<'_> {
    /// The call's lower-case name, for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Op::Try { .. } => "try",
            Op::Confirm => "confirm",
            Op::Cancel => "cancel",
            Op::Expire { .. } => "expire",
            Op::Action { .. } => "action",
            Op::Compensate => "compensate",
            Op::Local { .. } => "local",
            Op::BackCheck => "back_check",
        }
    }
}

/// What the caller of [`decide`] must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Run the business method (for [`Op::Expire`], the business cancel), then store this record in
    /// the same transaction. For [`Op::Try`], first set `result` to the business try's output.
    Run(BarrierRecord),
    /// Do not run any business method; store this record (an empty cancel, remembered so that a late
    /// try is refused).
    RecordOnly(BarrierRecord),
    /// The call already took effect: run nothing, store nothing, reply success. This is the stored
    /// record; a duplicate try replies with its `result`.
    Duplicate(BarrierRecord),
    /// [`Op::Expire`] only: nothing to release (not due yet, or already finished).
    Nothing,
    /// Run nothing, store nothing, reply with this error.
    Refuse(Refusal),
}

/// Why the barrier refused a call. Nothing was run and nothing was stored.
///
/// These are protocol facts the coordinator (or an operator) acts on, never silently accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Refusal {
    /// A try for a branch that is already cancelled. When the cancel was empty this is the
    /// suspension anomaly: the try arrived after its cancel and must never reserve anything.
    #[error("try refused: the branch is already cancelled")]
    Suspended,
    /// A try arriving at or after the transaction's deadline.
    #[error("try refused: the transaction's deadline {deadline} has passed")]
    DeadlinePassed {
        /// The deadline the try carried.
        deadline: Timestamp,
    },
    /// A confirm for a branch whose try never ran (or was refused or aborted).
    #[error("confirm refused: no try ran for this branch")]
    NotTried,
    /// A confirm for a branch that is already cancelled.
    #[error("confirm refused: the branch is already cancelled")]
    AlreadyCancelled,
    /// A cancel for a branch that is already confirmed.
    #[error("cancel refused: the branch is already confirmed")]
    AlreadyConfirmed,
    /// A confirm (or a repeated try) for a reservation the participant already released on its own
    /// because nobody finished it by deadline + grace. The coordinator should flag the transaction for
    /// an operator: the other branches may be confirmed.
    #[error("refused: the reservation expired and was released by the participant")]
    Expired,
    /// A saga action for a step whose compensation already came (empty, or after an earlier run).
    /// The saga is turning back: running the action now would leave an effect nobody undoes.
    #[error("action refused: the step is already compensated")]
    Compensated,
    /// A message's local transaction after its back-check settled it as rolled back. The
    /// coordinator has aborted the message (or is about to): committing now would be an effect
    /// whose message never goes out.
    #[error("local transaction refused: its back-check already settled it as rolled back")]
    RolledBack,
    /// The branch's record was written by a call of another kind (a TCC try and a saga action for
    /// the same transaction and branch, say): one of the two callers is confused.
    #[error("refused: the branch was used by another kind of call ({stored})")]
    OtherKind {
        /// The stored record's state.
        stored: BarrierState,
    },
}

impl Refusal {
    /// A stable machine-readable code.
    ///
    /// ```
    /// use tcc_core::barrier::Refusal;
    /// assert_eq!(Refusal::Suspended.code(), "suspended");
    /// ```
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Suspended => "suspended",
            Refusal::DeadlinePassed { .. } => "deadline_passed",
            Refusal::NotTried => "not_tried",
            Refusal::AlreadyCancelled => "already_cancelled",
            Refusal::AlreadyConfirmed => "already_confirmed",
            Refusal::Expired => "expired",
            Refusal::Compensated => "compensated",
            Refusal::RolledBack => "rolled_back",
            Refusal::OtherKind { .. } => "other_kind",
        }
    }
}

/// Every barrier rule, in one pure function of (call, stored record, time).
///
/// `existing` is the branch's stored record, if any; `now` is the participant's clock. The answer says
/// what to run and what to store (see [`Step`]); the module docs have the whole table.
///
/// # Using it with state kept outside sled
///
/// A participant whose business state lives in its own database (PostgreSQL, MySQL, ...) keeps the
/// barrier in that database too, in a table such as
/// `tcc_barrier(gid TEXT, branch TEXT, record BYTEA, PRIMARY KEY (gid, branch))` (store
/// [`BarrierRecord::encode`] bytes, or one column per field), and handles every call like this:
///
/// 1. Begin a transaction in the business database.
/// 2. Read the barrier row and lock it: `SELECT record FROM tcc_barrier WHERE gid = $1 AND branch = $2
///    FOR UPDATE`, and decode it ([`BarrierRecord::decode`]) if there is one.
/// 3. Call `decide(op, existing.as_ref(), now)`.
/// 4. Act on the [`Step`]:
///    - [`Step::Run`]: run the business method *inside the same transaction* (for a try, put its
///      output in the record's `result`), then write the record;
///    - [`Step::RecordOnly`]: write the record, run nothing;
///    - [`Step::Duplicate`], [`Step::Nothing`]: roll back (or commit the empty transaction) and reply
///      success; a duplicate try replies with the returned record's `result`;
///    - [`Step::Refuse`]: roll back and reply with the refusal.
/// 5. Write the row with `INSERT` when there was none and `UPDATE` otherwise. `FOR UPDATE` locks
///    nothing when the row is missing, so two first calls (a try racing its cancel) can both see no
///    row: the primary key makes the second `INSERT` fail. Treat that unique violation as "someone
///    else got there first": roll back and start again at step 1, where the row is now found. (Running
///    the transaction at `SERIALIZABLE` isolation and retrying serialization failures works too.)
/// 6. Commit, and only then reply to the coordinator. The commit is the durability point: barrier row
///    and business change become visible, and survive a crash, together.
/// 7. Expiry: index rows in state [`BarrierState::Tried`] by deadline. Periodically, for each row with
///    `deadline + grace <= now`, repeat steps 1 to 6 with [`Op::Expire`]; its [`Step::Run`] means "run
///    the business cancel with the stored `request`".
///
/// If the business method fails, roll back: no barrier row is written, exactly as if the call never
/// arrived (a later cancel is then an empty cancel, and refuses any later try).
///
/// ```
/// use std::time::Duration;
/// use tcc_core::Timestamp;
/// use tcc_core::barrier::{decide, BarrierState, Op, Refusal, Step};
///
/// // Cancel before any try: record the empty cancel, run nothing.
/// let Step::RecordOnly(cancelled) = decide(Op::Cancel, None, Timestamp(10)) else { panic!() };
/// assert_eq!(cancelled.state, BarrierState::CancelledEmpty);
///
/// // The late try is refused: suspension.
/// let late_try = Op::Try { deadline: Timestamp(100), request: b"seat" };
/// assert_eq!(decide(late_try, Some(&cancelled), Timestamp(20)), Step::Refuse(Refusal::Suspended));
///
/// // A fresh try runs; a try at its deadline does not.
/// assert!(matches!(decide(late_try, None, Timestamp(20)), Step::Run(_)));
/// assert!(matches!(decide(late_try, None, Timestamp(100)), Step::Refuse(Refusal::DeadlinePassed { .. })));
/// ```
pub fn decide(op: Op<'_>, existing: Option<&BarrierRecord>, now: Timestamp) -> Step {
    use BarrierState::{Cancelled, CancelledEmpty, Confirmed, Expired, Tried};
    // A record of one kind of call answers calls of another kind with a refusal, whatever they are.
    let tcc_op = matches!(op, Op::Try { .. } | Op::Confirm | Op::Cancel | Op::Expire { .. });
    if let Some(r) = existing {
        let same_kind = match op {
            _ if tcc_op => r.state.is_tcc(),
            Op::Action { .. } | Op::Compensate => {
                matches!(
                    r.state,
                    BarrierState::Done | BarrierState::Compensated | BarrierState::CompensatedEmpty
                )
            }
            _ => matches!(r.state, BarrierState::Committed | BarrierState::RolledBack),
        };
        if !same_kind {
            return match op {
                // The sweep only ever releases held reservations: anything else is nothing to do.
                Op::Expire { .. } => Step::Nothing,
                _ => Step::Refuse(Refusal::OtherKind { stored: r.state }),
            };
        }
    }
    match op {
        Op::Try { deadline, request } => match existing.map(|r| (r, r.state)) {
            // A record, whatever the time, answers a repeated try the same way every time.
            Some((r, Tried | Confirmed)) => Step::Duplicate(r.clone()),
            Some((_, Expired)) => Step::Refuse(Refusal::Expired),
            Some(_) => Step::Refuse(Refusal::Suspended),
            // The coordinator can only cancel past the deadline: reserving now would only be undone.
            None if now >= deadline => Step::Refuse(Refusal::DeadlinePassed { deadline }),
            None => Step::Run(BarrierRecord {
                state: Tried,
                deadline,
                request: request.to_vec(),
                result: Vec::new(),
                updated_at: now,
            }),
        },
        Op::Confirm => match existing.map(|r| (r, r.state)) {
            None => Step::Refuse(Refusal::NotTried),
            // Past deadline + grace but not yet swept: confirming still matches the global
            // decision, so the confirm wins over a release that has not happened.
            Some((r, Tried)) => Step::Run(r.advanced(Confirmed, now)),
            Some((r, Confirmed)) => Step::Duplicate(r.clone()),
            Some((_, Expired)) => Step::Refuse(Refusal::Expired),
            Some(_) => Step::Refuse(Refusal::AlreadyCancelled),
        },
        Op::Cancel => match existing.map(|r| (r, r.state)) {
            None => Step::RecordOnly(bare(CancelledEmpty, now)),
            Some((r, Tried)) => Step::Run(r.advanced(Cancelled, now)),
            Some((_, Confirmed)) => Step::Refuse(Refusal::AlreadyConfirmed),
            // Expired already ran the business cancel: the cancel's effect is there.
            Some((r, _)) => Step::Duplicate(r.clone()),
        },
        Op::Expire { grace } => match existing {
            Some(r) if r.state == Tried && r.deadline.saturating_add(grace) <= now => {
                Step::Run(r.advanced(Expired, now))
            }
            _ => Step::Nothing,
        },
        // An action holds nothing and has no deadline of its own: it is never refused for lateness
        // (the saga's coordinator decides when to turn back, and says so with the compensation).
        Op::Action { request } => match existing.map(|r| (r, r.state)) {
            None => Step::Run(BarrierRecord {
                state: BarrierState::Done,
                deadline: Timestamp(0),
                request: request.to_vec(),
                result: Vec::new(),
                updated_at: now,
            }),
            Some((r, BarrierState::Done)) => Step::Duplicate(r.clone()),
            Some(_) => Step::Refuse(Refusal::Compensated),
        },
        Op::Compensate => match existing.map(|r| (r, r.state)) {
            None => Step::RecordOnly(bare(BarrierState::CompensatedEmpty, now)),
            Some((r, BarrierState::Done)) => Step::Run(r.advanced(BarrierState::Compensated, now)),
            Some((r, _)) => Step::Duplicate(r.clone()),
        },
        Op::Local { request } => match existing.map(|r| (r, r.state)) {
            None => Step::Run(BarrierRecord {
                state: BarrierState::Committed,
                deadline: Timestamp(0),
                request: request.to_vec(),
                result: Vec::new(),
                updated_at: now,
            }),
            Some((r, BarrierState::Committed)) => Step::Duplicate(r.clone()),
            Some(_) => Step::Refuse(Refusal::RolledBack),
        },
        // The answer is the record's state: committed, or rolled back (now recorded, or earlier).
        Op::BackCheck => match existing {
            None => Step::RecordOnly(bare(BarrierState::RolledBack, now)),
            Some(r) => Step::Duplicate(r.clone()),
        },
    }
}

/// The record of a call that ran nothing (an empty cancel or compensation, a back-check that
/// settled a message as rolled back).
fn bare(state: BarrierState, now: Timestamp) -> BarrierRecord {
    BarrierRecord { state, deadline: Timestamp(0), request: Vec::new(), result: Vec::new(), updated_at: now }
}

/// Everything a [`SledBarrier`] operation can fail with. `E` is the business closures' error type.
///
/// Whenever one of these is returned, nothing the call asked for was stored, except for
/// [`NotFlushed`](BarrierError::NotFlushed), where the change is committed but not known to be on disk.
#[derive(Debug, thiserror::Error)]
pub enum BarrierError<E = Infallible> {
    /// The barrier refused the call; no business method ran.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The business closure aborted; its writes and the barrier record were both rolled back.
    #[error("business method failed: {0}")]
    Business(E),
    /// The stored barrier record for this branch is damaged (or from an unknown format version).
    /// Nothing was run. An operator has to look at it.
    #[error("barrier record of transaction {gid} branch {branch} is unreadable: {source}")]
    Corrupt {
        /// The transaction.
        gid: Gid,
        /// The branch.
        branch: BranchId,
        /// What is wrong with the bytes.
        source: CodecError,
    },
    /// sled failed.
    #[error("barrier storage: {0}")]
    Storage(#[from] sled::Error),
    /// The change committed but flushing it to disk failed: do not acknowledge the call. A retry is
    /// answered as a duplicate and flushes again.
    #[error("barrier change not flushed to disk: {0}")]
    NotFlushed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl<E> BarrierError<E> {
    /// A stable machine-readable code for this error (a refusal's own [`code`](Refusal::code)).
    pub fn code(&self) -> &'static str {
        match self {
            BarrierError::Refused(r) => r.code(),
            BarrierError::Business(_) => "business",
            BarrierError::Corrupt { .. } => "corrupt",
            BarrierError::Storage(_) => "storage",
            BarrierError::NotFlushed(_) => "not_flushed",
        }
    }

    /// The refusal, if the barrier refused the call.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            BarrierError::Refused(r) => Some(*r),
            _ => None,
        }
    }
}

impl BarrierError {
    /// This error of a call that runs no business code (a read), as the error of a call whose
    /// business closures fail with `E`.
    pub fn widen<E>(self) -> BarrierError<E> {
        match self {
            BarrierError::Refused(r) => BarrierError::Refused(r),
            BarrierError::Business(never) => match never {},
            BarrierError::Corrupt { gid, branch, source } => BarrierError::Corrupt { gid, branch, source },
            BarrierError::Storage(e) => BarrierError::Storage(e),
            BarrierError::NotFlushed(e) => BarrierError::NotFlushed(e),
        }
    }
}

/// What a business closure sees: the participant's business trees, inside the barrier's transaction,
/// and the call's identity and request.
///
/// Write through these transactional trees only. sled runs transactions one at a time under a
/// process-wide lock, so a closure that writes a plain [`sled::Tree`] or starts another transaction
/// deadlocks; keep closures short, since they hold that lock. sled may run a closure more than once.
pub struct BusinessTx<'a> {
    gid: &'a Gid,
    branch: &'a BranchId,
    trees: &'a [TransactionalTree],
    request: &'a [u8],
}

impl fmt::Debug for BusinessTx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusinessTx")
            .field("gid", self.gid)
            .field("branch", self.branch)
            .field("trees", &self.trees.len())
            .field("request_len", &self.request.len())
            .finish()
    }
}

impl<'a> BusinessTx<'a> {
    /// The global transaction id.
    pub fn gid(&self) -> &'a Gid {
        self.gid
    }

    /// The branch id.
    pub fn branch(&self) -> &'a BranchId {
        self.branch
    }

    /// The try's request bytes (for confirm, cancel and expiry: the stored ones); an action's or a
    /// local transaction's (for a compensation: the action's stored ones).
    pub fn request(&self) -> &'a [u8] {
        self.request
    }

    /// The business trees, in the order given to [`SledBarrier::open`].
    pub fn trees(&self) -> &'a [TransactionalTree] {
        self.trees
    }

    /// Business tree `i`, in the order given to [`SledBarrier::open`].
    ///
    /// # Panics
    /// If `i` is not below the number of business trees (a bug in the participant, not bad input).
    pub fn tree(&self, i: usize) -> &'a TransactionalTree {
        &self.trees[i]
    }
}

/// What a try did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TryOutcome {
    /// The business try ran now; these are its result bytes.
    Fresh(Vec<u8>),
    /// The try had already run; these are the result bytes stored then. Nothing ran now.
    Duplicate(Vec<u8>),
}

impl TryOutcome {
    /// The result bytes, fresh or stored.
    pub fn result(&self) -> &[u8] {
        match self {
            TryOutcome::Fresh(r) | TryOutcome::Duplicate(r) => r,
        }
    }

    /// Whether the business try ran during this call.
    pub fn is_fresh(&self) -> bool {
        matches!(self, TryOutcome::Fresh(_))
    }
}

/// What a confirm did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfirmOutcome {
    /// The business confirm ran now.
    Confirmed,
    /// The branch was already confirmed; nothing ran.
    Duplicate,
}

/// What a cancel did. Every variant is a success to report to the coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The business cancel ran now.
    Cancelled,
    /// No try had run (empty cancel): nothing ran, and a later try will be refused.
    Empty,
    /// The branch was already cancelled; nothing ran.
    Duplicate,
    /// The participant had already released the reservation at deadline + grace; nothing ran.
    AlreadyExpired,
}

/// What a saga action, a message action or a message's local transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionOutcome {
    /// The business method ran now.
    Ran,
    /// It had already run for this branch; nothing ran now.
    Duplicate,
}

/// What a saga compensation did. Every variant is a success to report to the coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompensateOutcome {
    /// The business compensation ran now, undoing the action.
    Compensated,
    /// The action had not run (empty compensation): nothing ran, and the action will be refused
    /// should it arrive later.
    Empty,
    /// The step was already compensated; nothing ran.
    Duplicate,
}

/// What a message's back-check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackCheckOutcome {
    /// The local transaction committed: the message must go out.
    Committed,
    /// The local transaction did not commit, and now never will (a late one is refused): the
    /// message must be aborted.
    RolledBack,
}

/// A function making committed changes durable, for [`Durability::Hook`].
pub type FlushHook = Arc<dyn Fn() -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + Sync>;

/// When a [`SledBarrier`] operation makes its change durable.
///
/// A participant must not acknowledge a call to the coordinator before the change is on disk: a
/// crash would otherwise forget a confirm the coordinator counts as done.
#[derive(Clone, Default)]
pub enum Durability {
    /// Each try, confirm and cancel calls [`DurableDb::flush`] (sled's flush, then `fdatasync`) before
    /// it returns, so `Ok` means on stable storage.
    /// Duplicates and refusals flush too, because what they reply is based on a record that a
    /// concurrent call may have committed but not flushed yet. Simple; about one fsync per call.
    #[default]
    FlushEachOp,
    /// Each operation calls this hook instead, for example to wait on a group-commit flusher thread
    /// shared with other writers to the same database, so concurrent calls share one fsync.
    Hook(FlushHook),
    /// Operations return once committed in memory; the caller must call [`SledBarrier::flush`] (or
    /// [`DurableDb::flush`] on the same database) before acknowledging anything.
    Deferred,
}

impl fmt::Debug for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Durability::FlushEachOp => "FlushEachOp",
            Durability::Hook(_) => "Hook(..)",
            Durability::Deferred => "Deferred",
        })
    }
}

/// The barrier for a participant whose business state lives in sled.
///
/// Every operation is one sled transaction over the barrier trees ([`BARRIER_TREE`],
/// [`EXPIRY_TREE`]) and the business trees given to [`open`](SledBarrier::open), so the barrier
/// record commits atomically with the business writes. If a business closure aborts, neither is
/// written. Closures return sled's [`ConflictableTransactionResult`], so `?` works on tree calls; abort
/// with [`sled::transaction::abort`] and the error comes back as [`BarrierError::Business`].
///
/// All methods block (sled I/O and, by default, an fsync): from async code call them inside
/// `tokio::task::spawn_blocking`. Durability is set by [`with_durability`](SledBarrier::with_durability).
/// The handle is cheap to clone.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use sled::transaction::abort;
/// use tcc_core::{BranchId, Clock, Gid, SystemClock};
/// use tcc_core::barrier::{CancelOutcome, ConfirmOutcome, SledBarrier};
///
/// let db = tcc_core::DurableDb::temporary()?;
/// let seats = db.open_tree("seats")?;
/// let clock: Arc<dyn Clock> = Arc::new(SystemClock);
/// let barrier = SledBarrier::open(&db, vec![seats.clone()], clock.clone(), Duration::from_secs(60))?;
///
/// let gid = Gid::generate();
/// let branch: BranchId = "flight".parse()?;
/// let deadline = clock.now() + Duration::from_secs(30);
///
/// // Try: hold the seat named in the request.
/// let out = barrier.try_op(&gid, &branch, deadline, b"12A", |tx| {
///     if tx.tree(0).get(tx.request())?.is_some() {
///         return abort("seat taken".to_string());
///     }
///     tx.tree(0).insert(tx.request(), "held")?;
///     Ok(b"held 12A".to_vec())
/// })?;
/// assert!(out.is_fresh());
///
/// // Confirm: sell it. The second confirm is a duplicate and runs nothing.
/// let sell = |tx: &tcc_core::barrier::BusinessTx<'_>| {
///     tx.tree(0).insert(tx.request(), "sold")?;
///     Ok::<_, sled::transaction::ConflictableTransactionError<String>>(())
/// };
/// assert_eq!(barrier.confirm(&gid, &branch, sell)?, ConfirmOutcome::Confirmed);
/// assert_eq!(barrier.confirm(&gid, &branch, sell)?, ConfirmOutcome::Duplicate);
/// assert_eq!(seats.get("12A")?.as_deref(), Some(&b"sold"[..]));
///
/// // A cancel for a branch whose try never ran is an empty cancel: nothing runs.
/// let other: BranchId = "hotel".parse()?;
/// let out = barrier.cancel(&gid, &other, |_| Ok::<_, sled::transaction::ConflictableTransactionError<String>>(()))?;
/// assert_eq!(out, CancelOutcome::Empty);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct SledBarrier {
    db: DurableDb,
    barrier: Tree,
    expiry: Tree,
    /// [barrier, expiry, business...]: the trees every operation's transaction covers.
    all: Arc<[Tree]>,
    clock: Arc<dyn Clock>,
    grace: Duration,
    durability: Durability,
}

impl fmt::Debug for SledBarrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledBarrier")
            .field("business_trees", &(self.all.len() - 2))
            .field("clock", &self.clock)
            .field("grace", &self.grace)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

/// What one barrier transaction did (internal: each public method turns it into its own outcome).
enum Applied {
    Ran(BarrierRecord),
    Recorded,
    Duplicate(BarrierRecord),
    Nothing,
    Refused(Refusal),
}

/// Why a barrier transaction aborted.
enum TxAbort<E> {
    Business(E),
    Corrupt(CodecError),
}

type BusinessFn<'f, E> = dyn Fn(&BusinessTx<'_>) -> ConflictableTransactionResult<Vec<u8>, E> + 'f;

impl SledBarrier {
    /// Opens (creating if needed) the barrier trees in `db`.
    ///
    /// `business` are the trees the business closures may write; they must belong to `db` (sled
    /// transactions cannot span databases) and must not be the barrier's own trees. `grace` is how
    /// long after a try's deadline the participant waits for confirm or cancel before releasing the
    /// reservation itself; it should cover the coordinator's phase-two retries.
    pub fn open(
        db: &DurableDb,
        business: Vec<Tree>,
        clock: Arc<dyn Clock>,
        grace: Duration,
    ) -> Result<SledBarrier, BarrierError> {
        let barrier = db.open_tree(BARRIER_TREE)?;
        let expiry = db.open_tree(EXPIRY_TREE)?;
        let mut all = Vec::with_capacity(business.len() + 2);
        all.push(barrier.clone());
        all.push(expiry.clone());
        all.extend(business);
        Ok(SledBarrier {
            db: db.clone(),
            barrier,
            expiry,
            all: all.into(),
            clock,
            grace,
            durability: Durability::default(),
        })
    }

    /// The same barrier with another [`Durability`] (the default is [`Durability::FlushEachOp`]).
    pub fn with_durability(mut self, durability: Durability) -> SledBarrier {
        self.durability = durability;
        self
    }

    /// The grace period after a deadline before the participant releases a reservation itself.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// The clock the barrier decides deadlines with.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The database the barrier lives in (for [`sled::Db::generate_id`], say).
    pub fn db(&self) -> &sled::Db {
        self.db.db()
    }

    /// The business trees given to [`open`](SledBarrier::open), in that order.
    pub fn business_trees(&self) -> &[Tree] {
        &self.all[2..]
    }

    /// Phase one: runs the business try `f` once per (gid, branch).
    ///
    /// `f` gets the business trees and `request`, and returns the result bytes, which are stored and
    /// handed back to any duplicate of this try. Refused with [`Refusal::DeadlinePassed`] at or after
    /// `deadline`, with [`Refusal::Suspended`] once the branch is cancelled (even by an empty cancel),
    /// with [`Refusal::Expired`] once it expired. If `f` aborts, nothing is stored and the call may
    /// be made again.
    pub fn try_op<F, E>(
        &self,
        gid: &Gid,
        branch: &BranchId,
        deadline: Timestamp,
        request: &[u8],
        f: F,
    ) -> Result<TryOutcome, BarrierError<E>>
    where
        F: Fn(&BusinessTx<'_>) -> ConflictableTransactionResult<Vec<u8>, E>,
    {
        let applied = self.apply(gid, branch, Op::Try { deadline, request }, None, &f)?;
        self.make_durable()?;
        match applied {
            Applied::Ran(rec) => Ok(TryOutcome::Fresh(rec.result)),
            Applied::Duplicate(rec) => Ok(TryOutcome::Duplicate(rec.result)),
            Applied::Refused(r) => Err(r.into()),
            Applied::Recorded | Applied::Nothing => unreachable!("decide never answers a try so"),
        }
    }

    /// Phase two: runs the business confirm `f` once per (gid, branch).
    ///
    /// `f` gets the business trees and the try's stored request. Refused with
    /// [`Refusal::NotTried`] if no try ran, [`Refusal::AlreadyCancelled`] after a cancel, and
    /// [`Refusal::Expired`] after the participant released the reservation itself.
    pub fn confirm<F, E>(&self, gid: &Gid, branch: &BranchId, f: F) -> Result<ConfirmOutcome, BarrierError<E>>
    where
        F: Fn(&BusinessTx<'_>) -> ConflictableTransactionResult<(), E>,
    {
        let run = |tx: &BusinessTx<'_>| f(tx).map(|()| Vec::new());
        let applied = self.apply(gid, branch, Op::Confirm, None, &run)?;
        self.make_durable()?;
        match applied {
            Applied::Ran(_) => Ok(ConfirmOutcome::Confirmed),
            Applied::Duplicate(_) => Ok(ConfirmOutcome::Duplicate),
            Applied::Refused(r) => Err(r.into()),
            Applied::Recorded | Applied::Nothing => unreachable!("decide never answers a confirm so"),
        }
    }

    /// Phase two: runs the business cancel `f` once per (gid, branch), and only if a try ran.
    ///
    /// `f` gets the business trees and the try's stored request. A cancel with no try before it
    /// records the branch as cancelled without running `f` ([`CancelOutcome::Empty`]), so a try
    /// arriving later is refused. Refused with [`Refusal::AlreadyConfirmed`] after a confirm.
    pub fn cancel<F, E>(&self, gid: &Gid, branch: &BranchId, f: F) -> Result<CancelOutcome, BarrierError<E>>
    where
        F: Fn(&BusinessTx<'_>) -> ConflictableTransactionResult<(), E>,
    {
        let run = |tx: &BusinessTx<'_>| f(tx).map(|()| Vec::new());
        let applied = self.apply(gid, branch, Op::Cancel, None, &run)?;
        self.make_durable()?;
        match applied {
            Applied::Ran(_) => Ok(CancelOutcome::Cancelled),
            Applied::Recorded => Ok(CancelOutcome::Empty),
            Applied::Duplicate(rec) if rec.state == BarrierState::Expired => {
                Ok(CancelOutcome::AlreadyExpired)
            }
            Applied::Duplicate(_) => Ok(CancelOutcome::Duplicate),
            Applied::Refused(r) => Err(r.into()),
            Applied::Nothing => unreachable!("decide never answers a cancel so"),
        }
    }

    /// A saga step's action, or a message's action: runs `f` once per (gid, branch).
    ///
    /// `f` gets the business trees and `request`, which is stored for the compensation. Never
    /// refused for lateness (an action holds nothing, so it never expires); refused with
    /// [`Refusal::Compensated`] once the step was compensated, even by an empty compensation. If `f`
    /// aborts, nothing is stored and the call may be made again.
    pub fn action<F, E>(
        &self,
        gid: &Gid,
        branch: &BranchId,
        request: &[u8],
        f: F,
    ) -> Result<ActionOutcome, BarrierError<E>>
    where
        F: Fn(&BusinessTx<'_>) -> ConflictableTransactionResult<(), E>,
    {
        self.once(gid, branch, Op::Action { request }, f)
    }

    /// A saga step's compensation: runs `f` once per (gid, branch), and only if the action ran.
    ///
    /// `f` gets the business trees and the action's stored request. A compensation with no action
    /// before it records the step as compensated without running `f` ([`CompensateOutcome::Empty`]),
    /// so an action arriving later is refused.
    pub fn compensate<F, E>(
        &self,
        gid: &Gid,
        branch: &BranchId,
        f: F,
    ) -> Result<CompensateOutcome, BarrierError<E>>
    where
        F: Fn(&BusinessTx<'_>) -> ConflictableTransactionResult<(), E>,
    {
        let run = |tx: &BusinessTx<'_>| f(tx).map(|()| Vec::new());
        let applied = self.apply(gid, branch, Op::Compensate, None, &run)?;
        self.make_durable()?;
        match applied {
            Applied::Ran(_) => Ok(CompensateOutcome::Compensated),
            Applied::Recorded => Ok(CompensateOutcome::Empty),
            Applied::Duplicate(_) => Ok(CompensateOutcome::Duplicate),
            Applied::Refused(r) => Err(r.into()),
            Applied::Nothing => unreachable!("decide never answers a compensation so"),
        }
    }

    /// A message's local transaction: runs `f` (the initiator's business writes) and records that it
    /// committed, in one transaction, once per (gid, branch).
    ///
    /// Refused with [`Refusal::RolledBack`] once a [`back_check`](SledBarrier::back_check) settled
    /// the message as rolled back: what the back-check answered stays true.
    pub fn local<F, E>(
        &self,
        gid: &Gid,
        branch: &BranchId,
        request: &[u8],
        f: F,
    ) -> Result<ActionOutcome, BarrierError<E>>
    where
        F: Fn(&BusinessTx<'_>) -> ConflictableTransactionResult<(), E>,
    {
        self.once(gid, branch, Op::Local { request }, f)
    }

    /// An action or a local transaction: `f` runs at most once per (gid, branch).
    fn once<F, E>(
        &self,
        gid: &Gid,
        branch: &BranchId,
        op: Op<'_>,
        f: F,
    ) -> Result<ActionOutcome, BarrierError<E>>
    where
        F: Fn(&BusinessTx<'_>) -> ConflictableTransactionResult<(), E>,
    {
        let run = |tx: &BusinessTx<'_>| f(tx).map(|()| Vec::new());
        let applied = self.apply(gid, branch, op, None, &run)?;
        self.make_durable()?;
        match applied {
            Applied::Ran(_) => Ok(ActionOutcome::Ran),
            Applied::Duplicate(_) => Ok(ActionOutcome::Duplicate),
            Applied::Refused(r) => Err(r.into()),
            Applied::Recorded | Applied::Nothing => unreachable!("decide never answers an action so"),
        }
    }

    /// A message's back-check: whether its local transaction committed. If it has not, it is settled
    /// as rolled back here (recorded, durably), so that it can never commit later.
    pub fn back_check(&self, gid: &Gid, branch: &BranchId) -> Result<BackCheckOutcome, BarrierError> {
        let nothing = |_: &BusinessTx<'_>| Ok::<_, ConflictableTransactionError<Infallible>>(Vec::new());
        let applied = self.apply(gid, branch, Op::BackCheck, None, &nothing)?;
        self.make_durable()?;
        match applied {
            Applied::Duplicate(rec) if rec.state == BarrierState::Committed => {
                Ok(BackCheckOutcome::Committed)
            }
            Applied::Recorded | Applied::Duplicate(_) => Ok(BackCheckOutcome::RolledBack),
            Applied::Refused(r) => Err(r.into()),
            Applied::Ran(_) | Applied::Nothing => unreachable!("decide never answers a back-check so"),
        }
    }

    /// Releases every reservation still held at deadline + grace, running the business cancel
    /// `f_cancel` with each one's stored request; returns how many were released.
    ///
    /// Each release is its own transaction. A business cancel that aborts, or a damaged record, is
    /// logged and left for the next sweep, without stopping the others; a storage failure stops the
    /// sweep and is returned. Reads only the index of held reservations that are due.
    pub fn expire_due<F, E>(&self, f_cancel: F) -> Result<usize, BarrierError<E>>
    where
        F: Fn(&BusinessTx<'_>) -> ConflictableTransactionResult<(), E>,
        E: fmt::Display,
    {
        let mut after = None;
        let mut released = 0;
        loop {
            let batch = self.due(after.as_ref(), SWEEP_BATCH).map_err(BarrierError::widen)?;
            for due in &batch {
                match self.release(due, &f_cancel) {
                    Ok(true) => released += 1,
                    Ok(false) => {}
                    Err(BarrierError::Business(e)) => {
                        warn!(gid = %due.gid, branch = %due.branch, error = %e,
                            "business cancel of an expired reservation failed; retrying next sweep");
                    }
                    Err(e @ BarrierError::Corrupt { .. }) => {
                        error!(error = %e, "cannot expire a damaged barrier record; skipped");
                    }
                    Err(e) => return Err(e),
                }
            }
            match batch.last() {
                Some(last) if batch.len() == SWEEP_BATCH => after = Some(last.clone()),
                _ => break,
            }
        }
        if released > 0 {
            self.make_durable()?;
        }
        Ok(released)
    }

    /// Up to `limit` held reservations due for release (deadline + grace at or before now), earliest
    /// deadline first, starting after `after` (a reservation from the previous page).
    ///
    /// With [`expire`](SledBarrier::expire) this is the sweep of [`expire_due`](SledBarrier::expire_due)
    /// taken apart, for a caller whose business cancel cannot run inside a sled transaction (an async
    /// method, say): list what is due, prepare each release outside, then commit it with `expire`,
    /// which checks the record again. Reads only the index of held reservations; an unreadable index
    /// key is logged and skipped.
    pub fn due(
        &self,
        after: Option<&DueReservation>,
        limit: usize,
    ) -> Result<Vec<DueReservation>, BarrierError> {
        // Due means deadline + grace <= now, that is deadline <= now - grace; decide checks it again.
        let grace_ms = u64::try_from(self.grace.as_millis()).unwrap_or(u64::MAX);
        let cutoff = self.clock.now().0.saturating_sub(grace_ms);
        let end = match cutoff.checked_add(1) {
            Some(after) => Bound::Excluded(after.to_be_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        let start = match after {
            Some(d) => Bound::Excluded(expiry_key(d.deadline, &d.gid, &d.branch)),
            None => Bound::Unbounded,
        };
        let mut due = Vec::new();
        for key in self.expiry.range::<Vec<u8>, _>((start, end)).keys() {
            if due.len() >= limit {
                break;
            }
            let key = key?;
            match parse_due(&key) {
                Some(d) => due.push(d),
                None => error!(key = ?key.as_ref(), "unreadable barrier expiry index key; skipped"),
            }
        }
        Ok(due)
    }

    /// Releases one reservation listed by [`due`](SledBarrier::due) if it is still held and due,
    /// running the business cancel `f_cancel` with its stored request in the same transaction as the
    /// barrier record ([`BarrierState::Expired`]). Returns whether it released it: `false` when the
    /// branch was confirmed, cancelled or expired meanwhile (nothing runs; a stale index entry is
    /// dropped). Durable as the other operations are (see [`Durability`]) when it released.
    pub fn expire<F, E>(&self, due: &DueReservation, f_cancel: F) -> Result<bool, BarrierError<E>>
    where
        F: Fn(&BusinessTx<'_>) -> ConflictableTransactionResult<(), E>,
    {
        let released = self.release(due, &f_cancel)?;
        if released {
            self.make_durable()?;
        }
        Ok(released)
    }

    /// One release, without making it durable.
    fn release<F, E>(&self, due: &DueReservation, f_cancel: &F) -> Result<bool, BarrierError<E>>
    where
        F: Fn(&BusinessTx<'_>) -> ConflictableTransactionResult<(), E>,
    {
        let run = |tx: &BusinessTx<'_>| f_cancel(tx).map(|()| Vec::new());
        let key = expiry_key(due.deadline, &due.gid, &due.branch);
        match self.apply(&due.gid, &due.branch, Op::Expire { grace: self.grace }, Some(&key), &run)? {
            Applied::Ran(rec) => {
                info!(gid = %due.gid, branch = %due.branch, deadline = %rec.deadline, "reservation expired; released");
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Spawns a Tokio task that runs [`expire_due`](SledBarrier::expire_due) now and then every
    /// `every` (sleeping on the barrier's [`Clock`]), so reservations are released at most `every`
    /// after deadline + grace. Each sweep runs on the blocking pool (`spawn_blocking`), since sled
    /// calls and the business cancel block. Failures are logged and the loop goes on.
    ///
    /// The task stops when the returned [`ExpiryTask`] is dropped or [`stop`](ExpiryTask::stop)ped;
    /// a sweep already running finishes (each release is its own transaction).
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn spawn_expiry<F, E>(&self, every: Duration, f_cancel: F) -> ExpiryTask
    where
        F: Fn(&BusinessTx<'_>) -> ConflictableTransactionResult<(), E> + Send + Sync + 'static,
        E: fmt::Display + Send + 'static,
    {
        let this = self.clone();
        let f_cancel = Arc::new(f_cancel);
        let handle = tokio::spawn(async move {
            loop {
                let barrier = this.clone();
                let f = Arc::clone(&f_cancel);
                match tokio::task::spawn_blocking(move || barrier.expire_due(&*f)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => error!(error = %e, "barrier expiry sweep failed"),
                    Err(e) => error!(error = %e, "barrier expiry sweep panicked"),
                }
                this.clock.sleep(every).await;
            }
        });
        ExpiryTask { handle }
    }

    /// The stored record of (gid, branch), if any call ever stored one.
    pub fn get(&self, gid: &Gid, branch: &BranchId) -> Result<Option<BarrierRecord>, BarrierError> {
        match self.barrier.get(barrier_key(gid, branch))? {
            None => Ok(None),
            Some(bytes) => BarrierRecord::decode(&bytes).map(Some).map_err(|source| BarrierError::Corrupt {
                gid: gid.clone(),
                branch: branch.clone(),
                source,
            }),
        }
    }

    /// How many reservations are held (tried, neither confirmed, cancelled nor expired).
    pub fn held(&self) -> usize {
        self.expiry.len()
    }

    /// Makes every change so far durable ([`DurableDb::flush`]: sled's flush, then `fdatasync`): for
    /// [`Durability::Deferred`], call this before acknowledging.
    pub fn flush(&self) -> Result<(), BarrierError> {
        self.db.flush().map_err(|e| BarrierError::NotFlushed(Box::new(e)))
    }

    fn make_durable<E>(&self) -> Result<(), BarrierError<E>> {
        match &self.durability {
            Durability::FlushEachOp => self.db.flush().map_err(|e| BarrierError::NotFlushed(Box::new(e)))?,
            Durability::Hook(hook) => hook().map_err(BarrierError::NotFlushed)?,
            Durability::Deferred => {}
        }
        Ok(())
    }

    /// One barrier transaction: read the record, [`decide`], run the business closure if told to,
    /// write record and expiry index. `index_key` is the expiry entry a sweep came from.
    fn apply<E>(
        &self,
        gid: &Gid,
        branch: &BranchId,
        op: Op<'_>,
        index_key: Option<&[u8]>,
        business: &BusinessFn<'_, E>,
    ) -> Result<Applied, BarrierError<E>> {
        let key = barrier_key(gid, branch);
        let outcome = self.all.transaction(|trees: &Vec<TransactionalTree>| {
            // `all` is built by `open` as [barrier, expiry, business...].
            let (barrier, expiry, business_trees) = (&trees[0], &trees[1], &trees[2..]);
            let existing = match barrier.get(&key)? {
                None => None,
                Some(bytes) => Some(
                    BarrierRecord::decode(&bytes)
                        .map_err(|e| ConflictableTransactionError::Abort(TxAbort::Corrupt(e)))?,
                ),
            };
            let was_held = existing.as_ref().filter(|r| r.state == BarrierState::Tried);
            match decide(op, existing.as_ref(), self.clock.now()) {
                Step::Run(mut record) => {
                    let tx = BusinessTx { gid, branch, trees: business_trees, request: &record.request };
                    let output = business(&tx).map_err(|e| match e {
                        ConflictableTransactionError::Abort(e) => {
                            ConflictableTransactionError::Abort(TxAbort::Business(e))
                        }
                        ConflictableTransactionError::Conflict => ConflictableTransactionError::Conflict,
                        ConflictableTransactionError::Storage(e) => ConflictableTransactionError::Storage(e),
                    })?;
                    if let Op::Try { .. } = op {
                        record.result = output;
                    }
                    let bytes = record
                        .encode()
                        .map_err(|e| ConflictableTransactionError::Abort(TxAbort::Corrupt(e)))?;
                    barrier.insert(key.as_slice(), bytes)?;
                    if let Some(prev) = was_held {
                        expiry.remove(expiry_key(prev.deadline, gid, branch))?;
                    }
                    if record.state == BarrierState::Tried {
                        expiry.insert(expiry_key(record.deadline, gid, branch), &[][..])?;
                    }
                    Ok(Applied::Ran(record))
                }
                Step::RecordOnly(record) => {
                    let bytes = record
                        .encode()
                        .map_err(|e| ConflictableTransactionError::Abort(TxAbort::Corrupt(e)))?;
                    barrier.insert(key.as_slice(), bytes)?;
                    Ok(Applied::Recorded)
                }
                Step::Duplicate(record) => Ok(Applied::Duplicate(record)),
                Step::Nothing => {
                    // An index entry whose record is not held any more cannot be released: drop it.
                    // (Commits always keep the two in step; this only heals outside damage.)
                    if let (Some(ix), None) = (index_key, was_held) {
                        expiry.remove(ix)?;
                    }
                    Ok(Applied::Nothing)
                }
                Step::Refuse(r) => Ok(Applied::Refused(r)),
            }
        });
        match outcome {
            Ok(applied) => Ok(applied),
            Err(TransactionError::Abort(TxAbort::Business(e))) => Err(BarrierError::Business(e)),
            Err(TransactionError::Abort(TxAbort::Corrupt(source))) => {
                Err(BarrierError::Corrupt { gid: gid.clone(), branch: branch.clone(), source })
            }
            Err(TransactionError::Storage(e)) => Err(BarrierError::Storage(e)),
        }
    }
}

/// A held reservation due for release, as listed by [`SledBarrier::due`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DueReservation {
    /// The transaction.
    pub gid: Gid,
    /// The branch.
    pub branch: BranchId,
    /// The deadline its try carried; it is due at deadline + grace.
    pub deadline: Timestamp,
}

/// The background expiry loop started by [`SledBarrier::spawn_expiry`]; dropping it stops the loop.
#[derive(Debug)]
#[must_use = "dropping the ExpiryTask stops the expiry loop"]
pub struct ExpiryTask {
    handle: tokio::task::JoinHandle<()>,
}

impl ExpiryTask {
    /// The handle of an expiry loop spawned elsewhere (a participant runtime's own loop, say), so
    /// that dropping it stops that loop the same way.
    pub fn from_handle(handle: tokio::task::JoinHandle<()>) -> ExpiryTask {
        ExpiryTask { handle }
    }

    /// Stops the loop (a sweep already running on the blocking pool finishes).
    pub fn stop(self) {
        // Drop does the work.
    }
}

impl Drop for ExpiryTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// `gid 0x00 branch`: ids never contain a zero byte (see [`crate::model`]), so the split is
/// unambiguous, and all branches of one transaction sort together.
fn barrier_key(gid: &Gid, branch: &BranchId) -> Vec<u8> {
    let mut key = Vec::with_capacity(gid.as_str().len() + 1 + branch.as_str().len());
    key.extend_from_slice(gid.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(branch.as_str().as_bytes());
    key
}

/// Big-endian deadline first, so a range scan from the start reads the earliest deadlines first.
fn expiry_key(deadline: Timestamp, gid: &Gid, branch: &BranchId) -> Vec<u8> {
    let mut key = deadline.0.to_be_bytes().to_vec();
    key.extend_from_slice(&barrier_key(gid, branch));
    key
}

fn parse_due(key: &[u8]) -> Option<DueReservation> {
    let deadline = Timestamp(u64::from_be_bytes(key.get(..8)?.try_into().ok()?));
    let (gid, branch) = parse_expiry_key(key)?;
    Some(DueReservation { gid, branch, deadline })
}

fn parse_expiry_key(key: &[u8]) -> Option<(Gid, BranchId)> {
    let ids = key.get(8..)?;
    let sep = ids.iter().position(|&b| b == 0)?;
    let gid = std::str::from_utf8(&ids[..sep]).ok()?.parse().ok()?;
    let branch = std::str::from_utf8(&ids[sep + 1..]).ok()?.parse().ok()?;
    Some((gid, branch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DEADLINE: Timestamp = Timestamp(10_000);
    const GRACE: Duration = Duration::from_secs(5);

    fn record(state: BarrierState) -> BarrierRecord {
        BarrierRecord {
            state,
            deadline: DEADLINE,
            request: b"req".to_vec(),
            result: b"res".to_vec(),
            updated_at: Timestamp(1_000),
        }
    }

    /// A compact name for a step, so the table below reads as the module docs' table.
    fn kind(step: &Step) -> String {
        match step {
            Step::Run(r) => format!("run->{}", r.state),
            Step::RecordOnly(r) => format!("record->{}", r.state),
            Step::Duplicate(_) => "duplicate".into(),
            Step::Nothing => "nothing".into(),
            Step::Refuse(r) => format!("refuse:{}", r.code()),
        }
    }

    #[test]
    fn decide_covers_every_call_in_every_state() {
        use BarrierState::*;
        let before = Timestamp(5_000);
        let after_deadline = DEADLINE;
        let due = DEADLINE + GRACE;
        let try_op = Op::Try { deadline: DEADLINE, request: b"req" };
        let expire = Op::Expire { grace: GRACE };
        // (op, now, [none, Tried, Confirmed, Cancelled, CancelledEmpty, Expired])
        #[rustfmt::skip]
        let table: [(Op<'_>, Timestamp, [&str; 6]); 8] = [
            (try_op, before, [
                "run->tried", "duplicate", "duplicate", "refuse:suspended", "refuse:suspended", "refuse:expired",
            ]),
            (try_op, after_deadline, [
                "refuse:deadline_passed", "duplicate", "duplicate", "refuse:suspended", "refuse:suspended",
                "refuse:expired",
            ]),
            (Op::Confirm, before, [
                "refuse:not_tried", "run->confirmed", "duplicate", "refuse:already_cancelled",
                "refuse:already_cancelled", "refuse:expired",
            ]),
            (Op::Confirm, due, [
                "refuse:not_tried", "run->confirmed", "duplicate", "refuse:already_cancelled",
                "refuse:already_cancelled", "refuse:expired",
            ]),
            (Op::Cancel, before, [
                "record->cancelled_empty", "run->cancelled", "refuse:already_confirmed", "duplicate", "duplicate",
                "duplicate",
            ]),
            (Op::Cancel, due, [
                "record->cancelled_empty", "run->cancelled", "refuse:already_confirmed", "duplicate", "duplicate",
                "duplicate",
            ]),
            (expire, Timestamp(due.0 - 1), ["nothing", "nothing", "nothing", "nothing", "nothing", "nothing"]),
            (expire, due, ["nothing", "run->expired", "nothing", "nothing", "nothing", "nothing"]),
        ];
        let states = [Tried, Confirmed, Cancelled, CancelledEmpty, Expired];
        for (op, now, expected) in table {
            let existing: Vec<Option<BarrierRecord>> =
                std::iter::once(None).chain(states.iter().map(|&s| Some(record(s)))).collect();
            for (existing, want) in existing.iter().zip(expected) {
                let got = kind(&decide(op, existing.as_ref(), now));
                assert_eq!(got, want, "{} at {now} on {:?}", op.as_str(), existing.as_ref().map(|r| r.state));
            }
        }
    }

    #[test]
    fn decide_covers_saga_and_message_calls_in_every_state() {
        let action = Op::Action { request: b"points" };
        let local = Op::Local { request: b"order" };
        let any_time = [Timestamp(0), DEADLINE + GRACE + GRACE];
        let tcc = ["refuse:other_kind"; 5];
        // (op, [none, the five TCC states, Done, Compensated, CompensatedEmpty, Committed, RolledBack])
        #[rustfmt::skip]
        let table: [(Op<'_>, [&str; 11]); 8] = [
            (action, ["run->done", tcc[0], tcc[0], tcc[0], tcc[0], tcc[0],
                "duplicate", "refuse:compensated", "refuse:compensated", "refuse:other_kind", "refuse:other_kind"]),
            (Op::Compensate, ["record->compensated_empty", tcc[0], tcc[0], tcc[0], tcc[0], tcc[0],
                "run->compensated", "duplicate", "duplicate", "refuse:other_kind", "refuse:other_kind"]),
            (local, ["run->committed", tcc[0], tcc[0], tcc[0], tcc[0], tcc[0],
                "refuse:other_kind", "refuse:other_kind", "refuse:other_kind", "duplicate", "refuse:rolled_back"]),
            (Op::BackCheck, ["record->rolled_back", tcc[0], tcc[0], tcc[0], tcc[0], tcc[0],
                "refuse:other_kind", "refuse:other_kind", "refuse:other_kind", "duplicate", "duplicate"]),
            // TCC calls on a saga's or a message's record: refused, never run.
            (Op::Try { deadline: Timestamp(u64::MAX), request: b"r" }, ["run->tried", "duplicate", "duplicate",
                "refuse:suspended", "refuse:suspended", "refuse:expired", tcc[0], tcc[1], tcc[2], tcc[3], tcc[4]]),
            (Op::Confirm, ["refuse:not_tried", "run->confirmed", "duplicate", "refuse:already_cancelled",
                "refuse:already_cancelled", "refuse:expired", tcc[0], tcc[1], tcc[2], tcc[3], tcc[4]]),
            (Op::Cancel, ["record->cancelled_empty", "run->cancelled", "refuse:already_confirmed", "duplicate",
                "duplicate", "duplicate", tcc[0], tcc[1], tcc[2], tcc[3], tcc[4]]),
            (Op::Expire { grace: Duration::ZERO }, ["nothing", "run->expired", "nothing", "nothing", "nothing",
                "nothing", "nothing", "nothing", "nothing", "nothing", "nothing"]),
        ];
        for (op, expected) in table {
            let existing: Vec<Option<BarrierRecord>> =
                std::iter::once(None).chain(BarrierState::ALL.iter().map(|&s| Some(record(s)))).collect();
            for now in any_time {
                // The expiry of a held reservation depends on the time (see the TCC table): test it
                // past the deadline only.
                if matches!(op, Op::Expire { .. }) && now < DEADLINE {
                    continue;
                }
                for (existing, want) in existing.iter().zip(expected) {
                    let got = kind(&decide(op, existing.as_ref(), now));
                    let state = existing.as_ref().map(|r| r.state);
                    assert_eq!(got, want, "{} at {now} on {state:?}", op.as_str());
                    if let (Some(stored), Step::Refuse(Refusal::OtherKind { stored: named })) =
                        (state, decide(op, existing.as_ref(), now))
                    {
                        assert_eq!(named, stored, "the refusal names the stored state");
                    }
                }
            }
        }
    }

    #[test]
    fn saga_and_message_records_carry_what_their_calls_need() {
        let Step::Run(done) = decide(Op::Action { request: b"points" }, None, Timestamp(7)) else {
            panic!("a first action runs");
        };
        assert_eq!(
            (done.state, done.deadline, done.request.as_slice(), done.updated_at),
            (BarrierState::Done, Timestamp(0), &b"points"[..], Timestamp(7)),
            "an action has no deadline (it never expires) and keeps its request for the compensation"
        );
        let Step::Run(undone) = decide(Op::Compensate, Some(&done), Timestamp(9)) else {
            panic!("a compensation after the action runs");
        };
        assert_eq!(
            (undone.state, undone.request.as_slice(), undone.updated_at),
            (BarrierState::Compensated, &b"points"[..], Timestamp(9))
        );
        let Step::RecordOnly(empty) = decide(Op::Compensate, None, Timestamp(11)) else { panic!() };
        assert_eq!(
            (empty.state, empty.updated_at, empty.request.len()),
            (BarrierState::CompensatedEmpty, Timestamp(11), 0)
        );
        let Step::Run(committed) = decide(Op::Local { request: b"order" }, None, Timestamp(13)) else {
            panic!()
        };
        assert_eq!(
            (committed.state, committed.request.as_slice(), committed.updated_at),
            (BarrierState::Committed, &b"order"[..], Timestamp(13))
        );
        let Step::RecordOnly(rolled_back) = decide(Op::BackCheck, None, Timestamp(15)) else { panic!() };
        assert_eq!((rolled_back.state, rolled_back.updated_at), (BarrierState::RolledBack, Timestamp(15)));
        assert_eq!(decide(Op::BackCheck, Some(&committed), Timestamp(16)), Step::Duplicate(committed));
    }

    #[test]
    fn states_are_named_and_only_two_await_more_calls() {
        for state in BarrierState::ALL {
            assert_eq!(BarrierState::from_name(state.as_str()), Some(state));
            assert_eq!(
                state.is_final(),
                !matches!(state, BarrierState::Tried | BarrierState::Done),
                "{state}"
            );
            // Encoded by position: every state round-trips.
            let rec = record(state);
            assert_eq!(BarrierRecord::decode(&rec.encode().unwrap_or_default()).ok(), Some(rec));
        }
        assert_eq!(BarrierState::from_name("unknown"), None);
    }

    #[test]
    fn fresh_try_records_deadline_request_and_time() {
        let Step::Run(rec) = decide(Op::Try { deadline: DEADLINE, request: b"seat" }, None, Timestamp(7))
        else {
            panic!("a fresh try runs");
        };
        assert_eq!(rec.state, BarrierState::Tried);
        assert_eq!(rec.deadline, DEADLINE);
        assert_eq!(rec.request, b"seat");
        assert!(rec.result.is_empty(), "the caller fills in the business result");
        assert_eq!(rec.updated_at, Timestamp(7));
    }

    #[test]
    fn phase_two_keeps_the_try_request_and_result() {
        for op in [Op::Confirm, Op::Cancel, Op::Expire { grace: GRACE }] {
            let Step::Run(rec) = decide(op, Some(&record(BarrierState::Tried)), Timestamp(20_000)) else {
                panic!("{} on a held reservation runs", op.as_str());
            };
            assert_eq!((rec.request.as_slice(), rec.result.as_slice()), (&b"req"[..], &b"res"[..]));
            assert_eq!(rec.deadline, DEADLINE);
            assert_eq!(rec.updated_at, Timestamp(20_000));
        }
    }

    #[test]
    fn duplicate_try_returns_the_stored_record() {
        let stored = record(BarrierState::Tried);
        let step = decide(Op::Try { deadline: DEADLINE, request: b"other" }, Some(&stored), Timestamp(1));
        assert_eq!(step, Step::Duplicate(stored));
    }

    #[test]
    fn empty_cancel_records_without_running() {
        let Step::RecordOnly(rec) = decide(Op::Cancel, None, Timestamp(3)) else { panic!("empty cancel") };
        assert_eq!(rec.state, BarrierState::CancelledEmpty);
        assert_eq!(rec.updated_at, Timestamp(3));
    }

    #[test]
    fn record_round_trips_through_its_encoding() {
        let rec = record(BarrierState::Expired);
        let bytes = rec.encode().expect("encodes");
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(BarrierRecord::decode(&bytes), Ok(rec));
    }

    #[test]
    fn damaged_record_bytes_are_errors() {
        let good = record(BarrierState::Tried).encode().expect("encodes");
        assert_eq!(BarrierRecord::decode(&[]), Err(CodecError::Empty));
        assert_eq!(BarrierRecord::decode(&[2, 0]), Err(CodecError::UnknownVersion(2)));
        assert!(matches!(BarrierRecord::decode(&good[..good.len() - 1]), Err(CodecError::Malformed(_))));
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(BarrierRecord::decode(&longer), Err(CodecError::TrailingBytes(1)));
        assert!(matches!(BarrierRecord::decode(&[FORMAT_VERSION, 9]), Err(CodecError::Malformed(_))));
    }

    #[test]
    fn keys_split_unambiguously() {
        let gid: Gid = "a".parse().expect("valid");
        let branch: BranchId = "b.c".parse().expect("valid");
        let key = expiry_key(Timestamp(42), &gid, &branch);
        assert_eq!(parse_expiry_key(&key), Some((gid.clone(), branch.clone())));
        // "a"+"bc" and "ab"+"c" must not collide.
        let ab: Gid = "ab".parse().expect("valid");
        let c: BranchId = "c".parse().expect("valid");
        let bc: BranchId = "bc".parse().expect("valid");
        assert_ne!(barrier_key(&gid, &bc), barrier_key(&ab, &c));
        assert_eq!(
            parse_due(&key),
            Some(DueReservation { gid: gid.clone(), branch: branch.clone(), deadline: Timestamp(42) })
        );
        assert_eq!(parse_expiry_key(b"short"), None);
        assert_eq!(parse_expiry_key(b"\0\0\0\0\0\0\0\x01no-separator"), None);
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = BarrierRecord::decode(&bytes);
            let mut versioned = vec![FORMAT_VERSION];
            versioned.extend_from_slice(&bytes);
            let _ = BarrierRecord::decode(&versioned);
        }

        #[test]
        fn index_keys_of_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
            let _ = parse_due(&bytes);
            let _ = parse_expiry_key(&bytes);
        }

        #[test]
        fn any_expiry_key_round_trips(deadline in any::<u64>(), gid in "[A-Za-z0-9_.:-]{1,64}", branch in "[A-Za-z0-9_.:-]{1,64}") {
            let (gid, branch): (Gid, BranchId) = (gid.parse().expect("valid"), branch.parse().expect("valid"));
            let key = expiry_key(Timestamp(deadline), &gid, &branch);
            prop_assert_eq!(parse_due(&key), Some(DueReservation { gid, branch, deadline: Timestamp(deadline) }));
        }

        #[test]
        fn any_record_round_trips(
            state in prop_oneof![
                Just(BarrierState::Tried), Just(BarrierState::Confirmed), Just(BarrierState::Cancelled),
                Just(BarrierState::CancelledEmpty), Just(BarrierState::Expired),
            ],
            deadline in any::<u64>(),
            request in proptest::collection::vec(any::<u8>(), 0..32),
            result in proptest::collection::vec(any::<u8>(), 0..32),
            updated_at in any::<u64>(),
        ) {
            let rec = BarrierRecord {
                state, deadline: Timestamp(deadline), request, result, updated_at: Timestamp(updated_at),
            };
            prop_assert_eq!(BarrierRecord::decode(&rec.encode().expect("encodes")), Ok(rec));
        }
    }
}
