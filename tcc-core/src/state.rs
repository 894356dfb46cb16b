//! Every transition of a global transaction, in one place.
//!
//! [`apply`] is a pure function of (transaction, event, context) to a new transaction plus the
//! [`Effect`]s the driver (the [`Coordinator`](crate::Coordinator)) must perform. It reads no clock and
//! does no I/O, which is what lets the model-based tests run thousands of histories cheaply.
//!
//! | state       | event                      | result                                         |
//! |-------------|----------------------------|------------------------------------------------|
//! | Trying      | Register (before deadline) | Trying, branch added                           |
//! | Trying      | Confirm (before deadline)  | Confirming (Confirmed if no branch), drive     |
//! | Trying      | Confirm (after deadline)   | error `DeadlinePassed`                         |
//! | Trying      | Cancel / DeadlineReached   | Cancelling (Cancelled if no branch), drive     |
//! | Confirming  | Confirm                    | unchanged (idempotent)                         |
//! | Cancelling  | Cancel / DeadlineReached   | unchanged (idempotent)                         |
//! | working     | RoundFinished, all done    | Confirmed / Cancelled                          |
//! | working     | RoundFinished, retry left  | same state, due at the retry time              |
//! | working     | RoundFinished, exhausted   | Flagged, last error kept                       |
//! | Flagged, working | OperatorRetry         | working state, attempts reset, drive           |
//! | Flagged     | OperatorForce(decision)    | the decision's final state                     |
//! | anything else                            || error `IllegalTransition`, nothing changes      |
//!
//! Every change but a registration also appends an entry to the transaction's bounded
//! [`history`](Transaction::history): the decision, an expiry, each phase-two round, an operator's
//! action.
//!
//! # Sagas
//!
//! A saga is created decided ([`saga`]): `Confirming`, its actions run a round at a time
//! ([`runnable_steps`]: one step at a time in order, or, when concurrent, every step whose
//! predecessors are done). Its rounds end with [`Event::StepsFinished`]:
//!
//! | state                  | StepsFinished                                 | result                                   |
//! |------------------------|-----------------------------------------------|------------------------------------------|
//! | Confirming             | every action done                             | Confirmed                                |
//! | Confirming             | progress, nothing failed                      | Confirming, next round at once           |
//! | Confirming             | an action refused, or the deadline passed     | turns: Cancelling, decision cancel; every step that ran or may have run (its predecessors were done) is marked `started` |
//! | Cancelling             | every started step compensated                | Cancelled                                |
//! | either                 | a call failed, retry left / policy spent      | due at the retry / Flagged               |
//! | anything else, or a round of the other direction || unchanged (a stale round)                  |
//!
//! The turn is the one place a decision changes: a saga's confirm means "go forward", and a refusal
//! sends it back. Compensations run in reverse order: a step is compensated once every started step
//! that comes after it is.
//!
//! # Messages
//!
//! A two-phase message is created prepared ([`message`]): `Trying` while the initiator's local
//! transaction runs.
//!
//! | state          | event                              | result                                      |
//! |----------------|------------------------------------|---------------------------------------------|
//! | Trying         | Confirm (submit; any time)          | Confirming, actions run in order until done |
//! | Trying         | Cancel (abort)                      | Cancelled at once; no action is ever called |
//! | Trying         | DeadlineReached                     | Trying with a lease, effect `CallBackCheck`  |
//! | Trying         | BackChecked committed / rolled back | as Confirm / as Cancel                      |
//! | Trying         | BackChecked unknown                 | due at the retry, or Flagged (no decision)  |
//! | Flagged, no decision | Confirm, Cancel, OperatorForce | as Confirm / as Cancel                     |
//! | Flagged, no decision | OperatorRetry                  | Trying, back-check again                    |
//! | Confirming     | StepsFinished                       | as a saga's forward rounds (never turns)    |

use crate::error::Error;
use crate::model::{
    Branch, BranchId, BranchState, Decision, Gid, Happening, Msg, Saga, Timestamp, Transaction, TxKind,
    TxState,
};

/// Something that happens to a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A participant joins: its try is about to run.
    Register {
        /// The branch id, unique within the transaction.
        id: BranchId,
        /// Where phase two reaches the participant.
        target: String,
        /// Bytes handed back to the participant with confirm and cancel.
        payload: Vec<u8>,
    },
    /// The initiator asks to confirm every branch.
    Confirm,
    /// The initiator (or an operator) asks to cancel every branch.
    Cancel,
    /// The deadline sweep found the transaction still trying at its deadline.
    DeadlineReached,
    /// A phase-two round ended: every call made in it, with its result.
    RoundFinished {
        /// Branches the participant acknowledged.
        done: Vec<BranchId>,
        /// Branches whose call failed, with the error.
        failed: Vec<(BranchId, String)>,
        /// When to try again; `None` when the retry policy is exhausted or a failure is permanent.
        retry_at: Option<Timestamp>,
    },
    /// An operator asks to retry phase two now, with a fresh retry budget.
    OperatorRetry,
    /// An operator declares the flagged transaction finished with this outcome, having resolved the
    /// remaining branches by hand. Only the transaction's own decision can be forced: anything else
    /// could leave some branches confirmed and others cancelled.
    OperatorForce(Decision),
    /// A round of saga or message steps ended: the calls made with `decision` (confirm: actions,
    /// cancel: compensations), with their results. A round of the other direction is stale.
    StepsFinished {
        /// What the round's calls carried out.
        decision: Decision,
        /// Steps the participant acknowledged.
        done: Vec<BranchId>,
        /// Steps whose call failed, with the error (retried).
        failed: Vec<(BranchId, String)>,
        /// A saga action that refused (DTM: 409 or `FAILURE`): the saga turns to compensating.
        refused: Option<(BranchId, String)>,
        /// When to try the failed steps again; `None` when the retry policy is exhausted.
        retry_at: Option<Timestamp>,
    },
    /// The back-check of a prepared message answered.
    BackChecked {
        /// What it said of the initiator's local transaction.
        outcome: LocalOutcome,
        /// When to ask again if it said nothing definite; `None` when the retry policy is exhausted.
        retry_at: Option<Timestamp>,
    },
}

/// What a message's back-check (DTM's `query_prepared`) says of the initiator's local transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalOutcome {
    /// It committed: the message is submitted.
    Committed,
    /// It rolled back (or never will commit): the message is aborted.
    RolledBack,
    /// No definite answer (still running, an error, no answer): ask again later.
    Unknown(String),
}

impl Event {
    fn action(&self) -> &'static str {
        match self {
            Event::Register { .. } => "register a branch on",
            Event::Confirm => "confirm",
            Event::Cancel => "cancel",
            Event::DeadlineReached => "expire",
            Event::RoundFinished { .. } => "record phase-two results of",
            Event::OperatorRetry => "retry",
            Event::OperatorForce(_) => "force",
            Event::StepsFinished { .. } => "record step results of",
            Event::BackChecked { .. } => "record the back-check of",
        }
    }
}

/// What the driver must do after storing a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Call the pending branches with the transaction's decision (this process holds the lease).
    DrivePhaseTwo,
    /// The transaction reached a final state; wake whoever waits for it.
    Finished(TxState),
    /// The retry policy is exhausted: tell the operator (log and metrics) with this error.
    Flagged(String),
    /// Ask a prepared message's back-check whether its local transaction committed (this process
    /// holds the lease).
    CallBackCheck,
}

/// Facts about the caller that a transition may need; no clock is read inside [`apply`].
#[derive(Clone, Debug)]
pub struct Context<'a> {
    /// The time of the event.
    pub now: Timestamp,
    /// The coordinator process applying it, which takes the phase-two lease on a decision.
    pub owner: &'a str,
    /// Until when that lease holds if the process dies silently.
    pub lease_until: Timestamp,
    /// Most branches a transaction may have; registering one more is refused.
    pub max_branches: usize,
    /// Most payload bytes a transaction's branches may hold together; registering a branch that
    /// would take the sum past it is refused.
    pub max_tx_payload: usize,
}

/// The result of applying an event.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // built and consumed once per request; boxing buys nothing
pub enum Transition {
    /// The event changes nothing (a duplicate of something already done); nothing to store.
    Unchanged,
    /// Store this transaction (its version is bumped by the store), then perform the effects.
    Changed(Transaction, Vec<Effect>),
}

/// Applies `event` to `tx`. Pure: equal inputs give equal outputs, and an error leaves nothing to store.
///
/// ```
/// use std::time::Duration;
/// use tcc_core::state::{apply, Context, Event, Transition};
/// use tcc_core::{Gid, Timestamp, Transaction, TxState};
///
/// let now = Timestamp(1_000);
/// let tx = tcc_core::state::begin(Gid::generate(), now, now + Duration::from_secs(10));
/// let lease_until = now + Duration::from_secs(5);
/// let ctx = Context { now, owner: "me", lease_until, max_branches: 8, max_tx_payload: 1 << 20 };
/// match apply(&tx, &Event::Confirm, &ctx).unwrap() {
///     Transition::Changed(next, _) => assert_eq!(next.state, TxState::Confirmed), // no branches
///     Transition::Unchanged => unreachable!(),
/// }
/// ```
pub fn apply(tx: &Transaction, event: &Event, ctx: &Context<'_>) -> Result<Transition, Error> {
    let mut transition = transition(tx, event, ctx)?;
    if let (Transition::Changed(next, _), Some(what)) = (&mut transition, happening(event)) {
        next.record(ctx.now, what);
    }
    Ok(transition)
}

/// What the history records of `event` applied to `tx` (which it changed); `None` for what it
/// leaves out (registrations: the branch list shows them).
fn happening(event: &Event) -> Option<Happening> {
    Some(match event {
        Event::Register { .. } => return None,
        Event::Confirm => Happening::Decided(Decision::Confirm),
        Event::Cancel => Happening::Decided(Decision::Cancel),
        Event::DeadlineReached => Happening::Expired,
        Event::RoundFinished { done, failed, .. } => Happening::Round {
            done: u32::try_from(done.len()).unwrap_or(u32::MAX),
            failed: u32::try_from(failed.len()).unwrap_or(u32::MAX),
            error: failed.first().map(|(id, e)| format!("branch {id}: {e}")),
        },
        Event::OperatorRetry => Happening::OperatorRetry,
        Event::OperatorForce(d) => Happening::OperatorForce(*d),
        // A round of saga or message steps reads as a phase-two round; a refusal counts as a failure.
        Event::StepsFinished { done, failed, refused, .. } => Happening::Round {
            done: u32::try_from(done.len()).unwrap_or(u32::MAX),
            failed: u32::try_from(failed.len() + usize::from(refused.is_some())).unwrap_or(u32::MAX),
            error: refused
                .iter()
                .map(|(id, e)| format!("step {id} refused: {e}"))
                .chain(failed.iter().map(|(id, e)| format!("step {id}: {e}")))
                .next(),
        },
        // A definite back-check decides the message; an unknown one is a failed round.
        Event::BackChecked { outcome: LocalOutcome::Committed, .. } => Happening::Decided(Decision::Confirm),
        Event::BackChecked { outcome: LocalOutcome::RolledBack, .. } => Happening::Decided(Decision::Cancel),
        Event::BackChecked { outcome: LocalOutcome::Unknown(e), .. } => {
            Happening::Round { done: 0, failed: 1, error: Some(format!("back-check: {e}")) }
        }
    })
}

/// [`apply`] before the history entry is added.
fn transition(tx: &Transaction, event: &Event, ctx: &Context<'_>) -> Result<Transition, Error> {
    let illegal =
        || Error::IllegalTransition { gid: tx.gid.clone(), state: tx.state, action: event.action() };
    let undecided_msg = matches!(tx.kind, TxKind::Msg(_)) && tx.decision.is_none();
    let steps = !matches!(tx.kind, TxKind::Tcc);
    match (tx.state, event) {
        // Saga steps and message actions are fixed when the transaction is created.
        (_, Event::Register { .. }) if steps => Err(illegal()),
        // A message may be submitted whenever its local transaction committed, even past its
        // deadline (the back-check would find it committed anyway); an abort calls nothing.
        (TxState::Trying | TxState::Flagged, Event::Confirm | Event::OperatorForce(Decision::Confirm))
            if undecided_msg =>
        {
            Ok(decide(tx, Decision::Confirm, ctx))
        }
        (TxState::Trying | TxState::Flagged, Event::Cancel | Event::OperatorForce(Decision::Cancel))
            if undecided_msg =>
        {
            Ok(abort_message(tx, ctx))
        }
        (TxState::Trying, Event::DeadlineReached) if undecided_msg => {
            if ctx.now < tx.deadline {
                return Err(illegal());
            }
            Ok(start_back_check(tx, ctx))
        }
        (TxState::Flagged, Event::OperatorRetry) if undecided_msg => {
            let mut next = tx.clone();
            next.state = TxState::Trying;
            next.attempts = 0;
            Ok(start_back_check(&next, ctx))
        }
        (TxState::Trying, Event::BackChecked { outcome, retry_at }) if undecided_msg => {
            Ok(back_checked(tx, outcome, *retry_at, ctx))
        }
        // Resolved otherwise while the back-check ran (submitted, aborted, flagged).
        (_, Event::BackChecked { .. }) if matches!(tx.kind, TxKind::Msg(_)) => Ok(Transition::Unchanged),
        (
            TxState::Confirming | TxState::Cancelling,
            Event::StepsFinished { decision, done, failed, refused, retry_at },
        ) if steps && tx.decision == Some(*decision) => {
            Ok(finish_steps(tx, *decision, done, failed, refused.as_ref(), *retry_at, ctx))
        }
        // A round of the other direction, or one ending after the transaction was finished or
        // flagged by someone else, adds nothing.
        (_, Event::StepsFinished { .. }) if steps && tx.state != TxState::Trying => Ok(Transition::Unchanged),
        (TxState::Trying, Event::Register { id, target, payload }) => {
            if ctx.now >= tx.deadline {
                return Err(Error::DeadlinePassed { gid: tx.gid.clone(), deadline: tx.deadline });
            }
            if let Some(existing) = tx.branch(id) {
                // The same registration twice is a retried request; a different one is a mistake.
                return if &existing.target == target && &existing.payload == payload {
                    Ok(Transition::Unchanged)
                } else {
                    Err(Error::InvalidInput(format!(
                        "branch {id} is already registered on {} with other details",
                        tx.gid
                    )))
                };
            }
            if tx.branches.len() >= ctx.max_branches {
                return Err(Error::InvalidInput(format!(
                    "a transaction has at most {} branches",
                    ctx.max_branches
                )));
            }
            let held: usize = tx.branches.iter().map(|b| b.payload.len()).sum();
            if held.saturating_add(payload.len()) > ctx.max_tx_payload {
                return Err(Error::InvalidInput(format!(
                    "a transaction's branches hold at most {} payload bytes together; {} holds {held} \
                     and this branch brings {}",
                    ctx.max_tx_payload,
                    tx.gid,
                    payload.len()
                )));
            }
            let mut next = tx.clone();
            next.branches.push(Branch {
                id: id.clone(),
                target: target.clone(),
                payload: payload.clone(),
                state: BranchState::Registered,
                last_error: None,
            });
            next.updated_at = ctx.now;
            Ok(Transition::Changed(next, Vec::new()))
        }
        (TxState::Trying, Event::Confirm) => {
            if ctx.now >= tx.deadline {
                return Err(Error::DeadlinePassed { gid: tx.gid.clone(), deadline: tx.deadline });
            }
            Ok(decide(tx, Decision::Confirm, ctx))
        }
        (TxState::Trying, Event::Cancel) => Ok(decide(tx, Decision::Cancel, ctx)),
        (TxState::Trying, Event::DeadlineReached) => {
            if ctx.now < tx.deadline {
                return Err(illegal());
            }
            Ok(decide(tx, Decision::Cancel, ctx))
        }
        // Asking again for the decision already taken is a retried request: answer it, change nothing.
        (TxState::Confirming | TxState::Confirmed, Event::Confirm)
        | (TxState::Cancelling | TxState::Cancelled, Event::Cancel | Event::DeadlineReached) => {
            Ok(Transition::Unchanged)
        }
        (TxState::Flagged, Event::Confirm) if tx.decision == Some(Decision::Confirm) => {
            Ok(Transition::Unchanged)
        }
        (TxState::Flagged, Event::Cancel | Event::DeadlineReached)
            if tx.decision == Some(Decision::Cancel) =>
        {
            Ok(Transition::Unchanged)
        }
        (TxState::Confirming | TxState::Cancelling, Event::RoundFinished { done, failed, retry_at }) => {
            let decision = tx.decision.ok_or_else(illegal)?;
            Ok(finish_round(tx, decision, done, failed, *retry_at, ctx))
        }
        // A round that ends after the transaction was finished or flagged by someone else adds nothing.
        (TxState::Confirmed | TxState::Cancelled | TxState::Flagged, Event::RoundFinished { .. }) => {
            Ok(Transition::Unchanged)
        }
        (TxState::Flagged | TxState::Confirming | TxState::Cancelling, Event::OperatorRetry) => {
            let decision = tx.decision.ok_or_else(illegal)?;
            let mut next = tx.clone();
            next.state = decision.working_state();
            next.attempts = 0;
            next.updated_at = ctx.now;
            take_lease(&mut next, ctx);
            Ok(Transition::Changed(next, vec![Effect::DrivePhaseTwo]))
        }
        (TxState::Flagged, Event::OperatorForce(outcome)) => {
            if tx.decision != Some(*outcome) {
                return Err(illegal());
            }
            let mut next = tx.clone();
            let forced: Vec<usize> = match (&tx.kind, outcome) {
                // What a forced compensation covers: the steps that ran or may have run.
                (TxKind::Saga(saga), Decision::Cancel) => {
                    (0..tx.branches.len()).filter(|&i| needs_compensation(tx, saga, i)).collect()
                }
                _ => (0..tx.branches.len())
                    .filter(|&i| tx.branches[i].state == BranchState::Registered)
                    .collect(),
            };
            for i in forced {
                let b = &mut next.branches[i];
                b.state = outcome.branch_state();
                b.last_error = Some(format!("{outcome} forced by an operator"));
            }
            next.state = outcome.final_state();
            next.updated_at = ctx.now;
            next.due_at = None;
            next.lease_owner = None;
            let finished = next.state;
            Ok(Transition::Changed(next, vec![Effect::Finished(finished)]))
        }
        _ => Err(illegal()),
    }
}

/// A new transaction in `Trying`, due for the deadline sweep at its deadline.
pub fn begin(gid: crate::model::Gid, now: Timestamp, deadline: Timestamp) -> Transaction {
    Transaction {
        gid,
        state: TxState::Trying,
        decision: None,
        created_at: now,
        updated_at: now,
        deadline,
        branches: Vec::new(),
        attempts: 0,
        last_error: None,
        due_at: Some(deadline),
        lease_owner: None,
        options: Default::default(),
        version: 0,
        history: vec![crate::model::HistoryEntry { at: now, state: TxState::Trying, what: Happening::Begun }],
        kind: TxKind::Tcc,
    }
}

/// Largest number of steps a saga or message may have (step indexes are `u32` in the record).
const MAX_STEPS: usize = u32::MAX as usize;

/// A new saga, decided at once to run forward: `Confirming` with this process's lease and the
/// effect that starts its first round. `branches[i]` is step `i`'s action (its target and payload),
/// `saga.steps[i]` its compensation and, for a concurrent saga, the steps it comes after. Refused
/// with [`Error::InvalidInput`] when the two lists differ in length, a step comes after itself or a
/// step that does not exist, the order has a cycle, or there are more branches than
/// [`Context::max_branches`] or payload bytes than [`Context::max_tx_payload`].
pub fn saga(
    gid: Gid,
    deadline: Timestamp,
    branches: Vec<Branch>,
    mut saga: Saga,
    ctx: &Context<'_>,
) -> Result<Transition, Error> {
    if saga.steps.len() != branches.len() {
        return Err(Error::InvalidInput("a saga needs one compensation per action".into()));
    }
    check_steps(&branches, ctx)?;
    let n = branches.len();
    if !saga.concurrent {
        for s in &mut saga.steps {
            s.after.clear();
        }
    }
    for (i, s) in saga.steps.iter_mut().enumerate() {
        s.started = false;
        s.after.sort_unstable();
        s.after.dedup();
        if let Some(bad) = s.after.iter().find(|&&a| a as usize >= n || a as usize == i) {
            return Err(Error::InvalidInput(format!("step {i} cannot come after step {bad}")));
        }
    }
    // Kahn's algorithm: every step must be reachable in some order.
    let mut waiting: Vec<usize> = saga.steps.iter().map(|s| s.after.len()).collect();
    let mut ready: Vec<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut seen = 0;
    while let Some(i) = ready.pop() {
        seen += 1;
        for (j, s) in saga.steps.iter().enumerate() {
            if s.after.contains(&(i as u32)) {
                waiting[j] -= 1;
                if waiting[j] == 0 {
                    ready.push(j);
                }
            }
        }
    }
    if seen != n {
        return Err(Error::InvalidInput("the saga's step order has a cycle".into()));
    }
    let mut tx = begin(gid, ctx.now, deadline);
    tx.branches = branches;
    tx.kind = TxKind::Saga(Box::new(saga));
    Ok(decide(&tx, Decision::Confirm, ctx))
}

/// A new two-phase message, prepared: `Trying` until submitted or aborted, due at `deadline`,
/// when its back-check is called. `branches` are its actions, run in order once submitted.
pub fn message(
    gid: Gid,
    deadline: Timestamp,
    branches: Vec<Branch>,
    msg: Msg,
    ctx: &Context<'_>,
) -> Result<Transaction, Error> {
    check_steps(&branches, ctx)?;
    let mut tx = begin(gid, ctx.now, deadline);
    tx.branches = branches;
    tx.kind = TxKind::Msg(Box::new(msg));
    Ok(tx)
}

fn check_steps(branches: &[Branch], ctx: &Context<'_>) -> Result<(), Error> {
    if branches.len() > ctx.max_branches.min(MAX_STEPS) {
        return Err(Error::InvalidInput(format!("a transaction has at most {} branches", ctx.max_branches)));
    }
    let held: usize = branches.iter().map(|b| b.payload.len()).sum();
    if held > ctx.max_tx_payload {
        return Err(Error::InvalidInput(format!(
            "a transaction's branches hold at most {} payload bytes together; these hold {held}",
            ctx.max_tx_payload
        )));
    }
    for (i, b) in branches.iter().enumerate() {
        if branches[..i].iter().any(|o| o.id == b.id) {
            return Err(Error::InvalidInput(format!("step id {} is given twice", b.id)));
        }
        if b.state != BranchState::Registered {
            return Err(Error::InvalidInput(format!("step {} must start registered", b.id)));
        }
    }
    Ok(())
}

/// The steps a saga's or message's action must be done before step `i` starts.
fn predecessors(tx: &Transaction, i: usize) -> Vec<usize> {
    match &tx.kind {
        TxKind::Saga(s) if s.concurrent => {
            s.steps.get(i).map(|s| s.after.iter().map(|&a| a as usize).collect()).unwrap_or_default()
        }
        _ if i > 0 => vec![i - 1],
        _ => Vec::new(),
    }
}

/// Whether every predecessor of step `i` has its action done (a predecessor missing from a
/// damaged record counts as not done: nothing runs on it).
fn predecessors_done(tx: &Transaction, i: usize) -> bool {
    predecessors(tx, i).iter().all(|&p| tx.branches.get(p).is_some_and(|b| b.state == BranchState::Confirmed))
}

/// Whether step `i`'s action ran or may have run, and its compensation has not been done.
fn needs_compensation(tx: &Transaction, saga: &Saga, i: usize) -> bool {
    saga.steps.get(i).is_some_and(|s| s.started)
        && tx.branches.get(i).is_some_and(|b| b.state != BranchState::Cancelled)
}

/// The steps the next round of a saga or message calls, by index: in `Confirming`, the actions
/// not done whose predecessors are all done; in a saga's `Cancelling`, the compensations still
/// owed whose every started successor is compensated (reverse order). Empty for TCC and in every
/// other state.
///
/// ```
/// use tcc_core::state::{Context, saga, runnable_steps, Transition};
/// use tcc_core::{Branch, BranchState, Gid, Saga, SagaStep, Timestamp};
/// let step = |id: &str| Branch {
///     id: id.parse().unwrap(), target: format!("mem://{id}"), payload: vec![],
///     state: BranchState::Registered, last_error: None,
/// };
/// let ctx = Context { now: Timestamp(0), owner: "me", lease_until: Timestamp(10), max_branches: 8, max_tx_payload: 64 };
/// let steps = vec![SagaStep { compensate: "mem://undo".into(), ..Default::default() }; 2];
/// let Transition::Changed(tx, _) =
///     saga(Gid::generate(), Timestamp(100), vec![step("a"), step("b")], Saga { concurrent: false, steps }, &ctx).unwrap()
/// else { unreachable!() };
/// assert_eq!(runnable_steps(&tx), vec![0]); // one at a time, in order
/// ```
pub fn runnable_steps(tx: &Transaction) -> Vec<usize> {
    let n = tx.branches.len();
    match (&tx.kind, tx.state, tx.decision) {
        (TxKind::Tcc, ..) => Vec::new(),
        (_, TxState::Confirming, Some(Decision::Confirm)) => (0..n)
            .filter(|&i| tx.branches[i].state == BranchState::Registered && predecessors_done(tx, i))
            .collect(),
        (TxKind::Saga(saga), TxState::Cancelling, Some(Decision::Cancel)) => (0..n)
            .filter(|&i| {
                needs_compensation(tx, saga, i)
                    && (0..n).all(|j| !(needs_compensation(tx, saga, j) && predecessors(tx, j).contains(&i)))
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Whether the steps of `decision`'s direction are all carried out.
fn steps_finished(tx: &Transaction, decision: Decision) -> bool {
    match (&tx.kind, decision) {
        (TxKind::Saga(saga), Decision::Cancel) => {
            (0..tx.branches.len()).all(|i| !needs_compensation(tx, saga, i))
        }
        _ => tx.branches.iter().all(|b| b.state == decision.branch_state()),
    }
}

fn abort_message(tx: &Transaction, ctx: &Context<'_>) -> Transition {
    let mut next = tx.clone();
    next.decision = Some(Decision::Cancel);
    next.state = TxState::Cancelled;
    next.updated_at = ctx.now;
    next.due_at = None;
    next.lease_owner = None;
    Transition::Changed(next, vec![Effect::Finished(TxState::Cancelled)])
}

fn start_back_check(tx: &Transaction, ctx: &Context<'_>) -> Transition {
    let mut next = tx.clone();
    next.updated_at = ctx.now;
    take_lease(&mut next, ctx);
    Transition::Changed(next, vec![Effect::CallBackCheck])
}

fn back_checked(
    tx: &Transaction,
    outcome: &LocalOutcome,
    retry_at: Option<Timestamp>,
    ctx: &Context<'_>,
) -> Transition {
    match outcome {
        LocalOutcome::Committed => decide(tx, Decision::Confirm, ctx),
        LocalOutcome::RolledBack => abort_message(tx, ctx),
        LocalOutcome::Unknown(error) => {
            let mut next = tx.clone();
            next.updated_at = ctx.now;
            next.lease_owner = None;
            failed_round(next, format!("back-check: {error}"), retry_at)
        }
    }
}

fn finish_steps(
    tx: &Transaction,
    decision: Decision,
    done: &[BranchId],
    failed: &[(BranchId, String)],
    refused: Option<&(BranchId, String)>,
    retry_at: Option<Timestamp>,
    ctx: &Context<'_>,
) -> Transition {
    let mut next = tx.clone();
    record_calls(&mut next, decision, done, failed, refused);
    next.updated_at = ctx.now;
    next.lease_owner = None;
    if !done.is_empty() {
        next.attempts = 0; // progress: the retry budget is per step, not per saga
    }
    let forward = decision == Decision::Confirm;
    if forward && matches!(next.kind, TxKind::Saga(_)) && !steps_finished(&next, decision) {
        let reason = match refused {
            Some((id, e)) => Some(format!("step {id} refused: {e}")),
            None if ctx.now >= next.deadline => {
                Some(format!("the deadline {} passed before every step was done", next.deadline))
            }
            None => None,
        };
        if let Some(reason) = reason {
            return turn_to_compensation(next, reason, ctx);
        }
    }
    if steps_finished(&next, decision) {
        next.state = decision.final_state();
        next.due_at = None;
        return Transition::Changed(next, vec![Effect::Finished(decision.final_state())]);
    }
    let Some((id, e)) = failed.first().or(refused) else {
        if done.is_empty() {
            // Nothing ran and nothing failed: no step can run (a message action refused is
            // handled as a failure). Cannot happen with a validated order; never loop on it.
            let error = "no step can run".to_owned();
            next.state = TxState::Flagged;
            next.due_at = None;
            next.last_error = Some(error.clone());
            return Transition::Changed(next, vec![Effect::Flagged(error)]);
        }
        take_lease(&mut next, ctx);
        return Transition::Changed(next, vec![Effect::DrivePhaseTwo]);
    };
    failed_round(next, format!("branch {id}: {e}"), retry_at)
}

/// Marks what one round's calls did: the branches (or steps) in `done` reached `decision`'s
/// state, those in `failed` (and a saga's `refused` action) keep their error.
fn record_calls(
    next: &mut Transaction,
    decision: Decision,
    done: &[BranchId],
    failed: &[(BranchId, String)],
    refused: Option<&(BranchId, String)>,
) {
    for b in next.branches.iter_mut() {
        if done.contains(&b.id) {
            b.state = decision.branch_state();
            b.last_error = None;
        } else if let Some((_, err)) = failed.iter().chain(refused).find(|(id, _)| id == &b.id) {
            b.last_error = Some(err.clone());
        }
    }
}

/// The end of a round in which a call failed: the error kept, one more attempt counted, then due
/// at `retry_at`, or flagged for an operator when the retry policy is spent (`None`).
fn failed_round(mut next: Transaction, error: String, retry_at: Option<Timestamp>) -> Transition {
    next.last_error = Some(error.clone());
    next.attempts = next.attempts.saturating_add(1);
    match retry_at {
        Some(at) => {
            next.due_at = Some(at);
            Transition::Changed(next, Vec::new())
        }
        None => {
            next.state = TxState::Flagged;
            next.due_at = None;
            Transition::Changed(next, vec![Effect::Flagged(error)])
        }
    }
}

/// A saga going forward turns back: every step that ran or may have run (done, or its
/// predecessors done so that a round may have called it) is marked started, and compensating
/// begins (or ends at once if no step ever ran).
fn turn_to_compensation(mut next: Transaction, reason: String, ctx: &Context<'_>) -> Transition {
    let started: Vec<bool> = (0..next.branches.len())
        .map(|i| next.branches[i].state == BranchState::Confirmed || predecessors_done(&next, i))
        .collect();
    if let TxKind::Saga(saga) = &mut next.kind {
        for (s, started) in saga.steps.iter_mut().zip(started) {
            s.started = started;
        }
    }
    next.decision = Some(Decision::Cancel);
    next.last_error = Some(reason);
    next.attempts = 0;
    if steps_finished(&next, Decision::Cancel) {
        next.state = TxState::Cancelled;
        next.due_at = None;
        next.lease_owner = None;
        return Transition::Changed(next, vec![Effect::Finished(TxState::Cancelled)]);
    }
    next.state = TxState::Cancelling;
    take_lease(&mut next, ctx);
    Transition::Changed(next, vec![Effect::DrivePhaseTwo])
}

fn take_lease(tx: &mut Transaction, ctx: &Context<'_>) {
    tx.lease_owner = Some(ctx.owner.to_owned());
    tx.due_at = Some(ctx.lease_until);
}

fn decide(tx: &Transaction, decision: Decision, ctx: &Context<'_>) -> Transition {
    let mut next = tx.clone();
    next.decision = Some(decision);
    next.updated_at = ctx.now;
    if next.pending_branches().next().is_none() {
        next.state = decision.final_state();
        next.due_at = None;
        next.lease_owner = None;
        return Transition::Changed(next, vec![Effect::Finished(decision.final_state())]);
    }
    next.state = decision.working_state();
    take_lease(&mut next, ctx);
    Transition::Changed(next, vec![Effect::DrivePhaseTwo])
}

fn finish_round(
    tx: &Transaction,
    decision: Decision,
    done: &[BranchId],
    failed: &[(BranchId, String)],
    retry_at: Option<Timestamp>,
    ctx: &Context<'_>,
) -> Transition {
    let mut next = tx.clone();
    record_calls(&mut next, decision, done, failed, None);
    next.updated_at = ctx.now;
    next.lease_owner = None;
    if next.pending_branches().next().is_none() {
        next.state = decision.final_state();
        next.due_at = None;
        return Transition::Changed(next, vec![Effect::Finished(decision.final_state())]);
    }
    let error = failed
        .first()
        .map(|(id, e)| format!("branch {id}: {e}"))
        .unwrap_or_else(|| "phase two did not reach every branch".to_owned());
    failed_round(next, error, retry_at)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{Gid, HistoryEntry};

    const NOW: Timestamp = Timestamp(10_000);
    const DEADLINE: Timestamp = Timestamp(20_000);

    fn ctx(now: Timestamp) -> Context<'static> {
        Context {
            now,
            owner: "node-a",
            lease_until: now + Duration::from_secs(5),
            max_branches: 3,
            max_tx_payload: 100,
        }
    }

    fn bid(s: &str) -> BranchId {
        s.parse().unwrap()
    }

    fn register(id: &str) -> Event {
        Event::Register { id: bid(id), target: format!("mem://{id}"), payload: id.as_bytes().to_vec() }
    }

    fn changed(t: Transition) -> (Transaction, Vec<Effect>) {
        match t {
            Transition::Changed(tx, eff) => (tx, eff),
            Transition::Unchanged => panic!("expected a change"),
        }
    }

    /// A transaction in `state` with two registered branches.
    fn tx_in(state: TxState) -> Transaction {
        let mut tx = begin(Gid::generate(), NOW, DEADLINE);
        for id in ["a", "b"] {
            tx = changed(apply(&tx, &register(id), &ctx(NOW)).unwrap()).0;
        }
        let decision = match state {
            TxState::Trying => return tx,
            TxState::Confirming | TxState::Confirmed => Decision::Confirm,
            _ => Decision::Cancel,
        };
        let ev = if decision == Decision::Confirm { Event::Confirm } else { Event::Cancel };
        tx = changed(apply(&tx, &ev, &ctx(NOW)).unwrap()).0;
        match state {
            TxState::Confirmed | TxState::Cancelled => {
                let done = vec![bid("a"), bid("b")];
                let ev = Event::RoundFinished { done, failed: vec![], retry_at: None };
                changed(apply(&tx, &ev, &ctx(NOW)).unwrap()).0
            }
            TxState::Flagged => {
                let ev = Event::RoundFinished {
                    done: vec![bid("a")],
                    failed: vec![(bid("b"), "boom".into())],
                    retry_at: None,
                };
                changed(apply(&tx, &ev, &ctx(NOW)).unwrap()).0
            }
            _ => tx,
        }
    }

    #[test]
    fn register_adds_a_branch_while_trying() {
        let tx = tx_in(TxState::Trying);
        assert_eq!(tx.branches.len(), 2);
        assert!(tx.branches.iter().all(|b| b.state == BranchState::Registered));
    }

    #[test]
    fn registering_the_same_branch_twice_is_idempotent_but_different_details_are_refused() {
        let tx = tx_in(TxState::Trying);
        assert_eq!(apply(&tx, &register("a"), &ctx(NOW)).unwrap(), Transition::Unchanged);
        // Either detail differing alone makes it another registration, not a retry.
        let other_target =
            Event::Register { id: bid("a"), target: "mem://elsewhere".into(), payload: b"a".to_vec() };
        let other_payload =
            Event::Register { id: bid("a"), target: "mem://a".into(), payload: b"other".to_vec() };
        for other in [other_target, other_payload] {
            assert!(matches!(apply(&tx, &other, &ctx(NOW)), Err(Error::InvalidInput(_))), "{other:?}");
        }
    }

    #[test]
    fn registering_past_the_branch_limit_is_refused() {
        let mut tx = tx_in(TxState::Trying);
        tx = changed(apply(&tx, &register("c"), &ctx(NOW)).unwrap()).0;
        let err = apply(&tx, &register("d"), &ctx(NOW)).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
        // Repeating a registration already there is still answered.
        assert_eq!(apply(&tx, &register("c"), &ctx(NOW)).unwrap(), Transition::Unchanged);
    }

    #[test]
    fn registering_past_the_payload_cap_of_the_transaction_is_refused() {
        // tx_in holds "a" and "b" (2 bytes); the cap is 100.
        let tx = tx_in(TxState::Trying);
        let big = |id: &str, n: usize| Event::Register {
            id: bid(id),
            target: "mem://x".into(),
            payload: vec![b'x'; n],
        };
        let err = apply(&tx, &big("c", 99), &ctx(NOW)).unwrap_err();
        assert!(matches!(&err, Error::InvalidInput(m) if m.contains("at most 100 payload bytes")), "{err}");
        let (next, _) = changed(apply(&tx, &big("c", 98), &ctx(NOW)).unwrap());
        assert!(apply(&next, &big("d", 1), &ctx(NOW)).is_err());
        // Repeating a registration already there is still answered.
        assert_eq!(apply(&next, &big("c", 98), &ctx(NOW)).unwrap(), Transition::Unchanged);
    }

    #[test]
    fn register_after_the_deadline_is_refused() {
        let tx = tx_in(TxState::Trying);
        let err = apply(&tx, &register("c"), &ctx(DEADLINE)).unwrap_err();
        assert!(matches!(err, Error::DeadlinePassed { .. }));
    }

    #[test]
    fn confirm_before_the_deadline_starts_confirming_with_a_lease() {
        let tx = tx_in(TxState::Trying);
        let (next, eff) = changed(apply(&tx, &Event::Confirm, &ctx(NOW)).unwrap());
        assert_eq!(next.state, TxState::Confirming);
        assert_eq!(next.decision, Some(Decision::Confirm));
        assert_eq!(next.lease_owner.as_deref(), Some("node-a"));
        assert_eq!(next.due_at, Some(NOW + Duration::from_secs(5)));
        assert_eq!(eff, vec![Effect::DrivePhaseTwo]);
    }

    #[test]
    fn confirm_at_or_after_the_deadline_is_refused() {
        let tx = tx_in(TxState::Trying);
        for now in [DEADLINE, DEADLINE + Duration::from_secs(1)] {
            assert!(matches!(apply(&tx, &Event::Confirm, &ctx(now)), Err(Error::DeadlinePassed { .. })));
        }
    }

    #[test]
    fn cancel_is_allowed_after_the_deadline() {
        let tx = tx_in(TxState::Trying);
        let (next, _) = changed(apply(&tx, &Event::Cancel, &ctx(DEADLINE)).unwrap());
        assert_eq!(next.state, TxState::Cancelling);
    }

    #[test]
    fn deadline_reached_cancels_only_once_the_deadline_has_passed() {
        let tx = tx_in(TxState::Trying);
        assert!(apply(&tx, &Event::DeadlineReached, &ctx(NOW)).is_err());
        let (next, eff) = changed(apply(&tx, &Event::DeadlineReached, &ctx(DEADLINE)).unwrap());
        assert_eq!((next.state, next.decision), (TxState::Cancelling, Some(Decision::Cancel)));
        assert_eq!(eff, vec![Effect::DrivePhaseTwo]);
    }

    #[test]
    fn a_decision_without_branches_is_final_at_once() {
        let tx = begin(Gid::generate(), NOW, DEADLINE);
        let (next, eff) = changed(apply(&tx, &Event::Cancel, &ctx(NOW)).unwrap());
        assert_eq!(next.state, TxState::Cancelled);
        assert_eq!(next.due_at, None);
        assert_eq!(eff, vec![Effect::Finished(TxState::Cancelled)]);
    }

    #[test]
    fn repeating_the_decision_already_taken_changes_nothing() {
        for (state, ev) in [
            (TxState::Confirming, Event::Confirm),
            (TxState::Confirmed, Event::Confirm),
            (TxState::Cancelling, Event::Cancel),
            (TxState::Cancelled, Event::Cancel),
            (TxState::Cancelled, Event::DeadlineReached),
        ] {
            let tx = tx_in(state);
            assert_eq!(apply(&tx, &ev, &ctx(NOW)).unwrap(), Transition::Unchanged, "{state} {ev:?}");
        }
    }

    #[test]
    fn the_opposite_decision_is_an_illegal_transition() {
        for (state, ev) in [
            (TxState::Confirming, Event::Cancel),
            (TxState::Confirmed, Event::Cancel),
            (TxState::Cancelling, Event::Confirm),
            (TxState::Cancelled, Event::Confirm),
            (TxState::Confirming, Event::DeadlineReached),
        ] {
            let tx = tx_in(state);
            let err = apply(&tx, &ev, &ctx(NOW)).unwrap_err();
            assert!(matches!(err, Error::IllegalTransition { .. }), "{state} {ev:?}: {err}");
        }
    }

    #[test]
    fn registering_on_a_decided_transaction_is_an_illegal_transition() {
        for state in [TxState::Confirming, TxState::Confirmed, TxState::Cancelling, TxState::Cancelled] {
            let err = apply(&tx_in(state), &register("c"), &ctx(NOW)).unwrap_err();
            assert!(matches!(err, Error::IllegalTransition { .. }), "{state}");
        }
        let err = apply(&tx_in(TxState::Flagged), &register("c"), &ctx(NOW)).unwrap_err();
        assert!(matches!(err, Error::IllegalTransition { .. }));
    }

    #[test]
    fn a_round_that_reaches_every_branch_finishes_the_transaction() {
        let tx = tx_in(TxState::Confirming);
        let ev = Event::RoundFinished { done: vec![bid("a"), bid("b")], failed: vec![], retry_at: None };
        let (next, eff) = changed(apply(&tx, &ev, &ctx(NOW)).unwrap());
        assert_eq!(next.state, TxState::Confirmed);
        assert!(next.branches.iter().all(|b| b.state == BranchState::Confirmed));
        assert_eq!((next.due_at, next.lease_owner.clone()), (None, None));
        assert_eq!(eff, vec![Effect::Finished(TxState::Confirmed)]);
    }

    #[test]
    fn a_round_with_a_failure_and_retries_left_schedules_the_retry() {
        let tx = tx_in(TxState::Cancelling);
        let at = NOW + Duration::from_secs(2);
        let ev = Event::RoundFinished {
            done: vec![bid("a")],
            failed: vec![(bid("b"), "503".into())],
            retry_at: Some(at),
        };
        let (next, eff) = changed(apply(&tx, &ev, &ctx(NOW)).unwrap());
        assert_eq!(next.state, TxState::Cancelling);
        assert_eq!(next.attempts, 1);
        assert_eq!(next.due_at, Some(at));
        assert_eq!(next.lease_owner, None);
        assert_eq!(next.branch(&bid("a")).unwrap().state, BranchState::Cancelled);
        assert_eq!(next.branch(&bid("b")).unwrap().last_error.as_deref(), Some("503"));
        assert_eq!(next.last_error.as_deref(), Some("branch b: 503"));
        assert!(eff.is_empty());
    }

    #[test]
    fn an_exhausted_round_flags_the_transaction_with_its_last_error() {
        let tx = tx_in(TxState::Flagged);
        assert_eq!(tx.state, TxState::Flagged);
        assert_eq!(tx.decision, Some(Decision::Cancel));
        assert_eq!(tx.due_at, None);
        assert_eq!(tx.last_error.as_deref(), Some("branch b: boom"));
    }

    /// A transaction flagged after deciding `decision`: branch b failed for good.
    fn flagged(decision: Decision) -> Transaction {
        let tx = tx_in(TxState::Trying);
        let ev = if decision == Decision::Confirm { Event::Confirm } else { Event::Cancel };
        let tx = changed(apply(&tx, &ev, &ctx(NOW)).unwrap()).0;
        let ev =
            Event::RoundFinished { done: vec![], failed: vec![(bid("b"), "boom".into())], retry_at: None };
        changed(apply(&tx, &ev, &ctx(NOW)).unwrap()).0
    }

    #[test]
    fn flagged_transactions_keep_their_decision_for_repeated_requests() {
        for decision in [Decision::Confirm, Decision::Cancel] {
            let tx = flagged(decision);
            assert_eq!((tx.state, tx.decision), (TxState::Flagged, Some(decision)));
            let (same, opposite): (&[Event], &[Event]) = match decision {
                Decision::Confirm => (&[Event::Confirm], &[Event::Cancel, Event::DeadlineReached]),
                Decision::Cancel => (&[Event::Cancel, Event::DeadlineReached], &[Event::Confirm]),
            };
            for ev in same {
                assert_eq!(
                    apply(&tx, ev, &ctx(DEADLINE)).unwrap(),
                    Transition::Unchanged,
                    "{decision} {ev:?}"
                );
            }
            for ev in opposite {
                let err = apply(&tx, ev, &ctx(DEADLINE)).unwrap_err();
                assert!(matches!(err, Error::IllegalTransition { .. }), "{decision} {ev:?}: {err}");
            }
        }
    }

    #[test]
    fn an_illegal_transition_names_what_was_asked() {
        let tx = tx_in(TxState::Cancelled);
        for (ev, action) in [
            (register("c"), "cannot register a branch on transaction"),
            (Event::Confirm, "cannot confirm transaction"),
            (Event::OperatorRetry, "cannot retry transaction"),
            (Event::OperatorForce(Decision::Cancel), "cannot force transaction"),
        ] {
            let err = apply(&tx, &ev, &ctx(NOW)).unwrap_err().to_string();
            assert!(err.starts_with(action) && err.ends_with("it is cancelled"), "{ev:?}: {err}");
        }
        let err = apply(&tx_in(TxState::Trying), &Event::DeadlineReached, &ctx(NOW)).unwrap_err();
        assert!(err.to_string().starts_with("cannot expire transaction"), "{err}");
        let err = apply(&tx_in(TxState::Trying), &Event::OperatorRetry, &ctx(NOW)).unwrap_err();
        assert!(err.to_string().starts_with("cannot retry transaction"), "{err}");
    }

    #[test]
    fn operator_retry_resumes_phase_two_with_a_fresh_budget() {
        let tx = tx_in(TxState::Flagged);
        let (next, eff) = changed(apply(&tx, &Event::OperatorRetry, &ctx(NOW)).unwrap());
        assert_eq!((next.state, next.attempts), (TxState::Cancelling, 0));
        assert_eq!(eff, vec![Effect::DrivePhaseTwo]);
        for state in [TxState::Trying, TxState::Confirmed, TxState::Cancelled] {
            assert!(apply(&tx_in(state), &Event::OperatorRetry, &ctx(NOW)).is_err(), "{state}");
        }
    }

    #[test]
    fn operator_force_ends_a_flagged_transaction_only_with_its_own_decision() {
        let tx = tx_in(TxState::Flagged);
        let err = apply(&tx, &Event::OperatorForce(Decision::Confirm), &ctx(NOW)).unwrap_err();
        assert!(matches!(err, Error::IllegalTransition { .. }));
        let (next, eff) = changed(apply(&tx, &Event::OperatorForce(Decision::Cancel), &ctx(NOW)).unwrap());
        assert_eq!(next.state, TxState::Cancelled);
        assert!(next.branches.iter().all(|b| b.state == BranchState::Cancelled));
        assert_eq!(eff, vec![Effect::Finished(TxState::Cancelled)]);
        for state in [TxState::Trying, TxState::Confirming, TxState::Confirmed] {
            let err = apply(&tx_in(state), &Event::OperatorForce(Decision::Confirm), &ctx(NOW));
            assert!(err.is_err(), "{state}");
        }
    }

    #[test]
    fn the_history_records_the_decision_each_round_and_the_operator_in_order() {
        let tx = flagged(Decision::Confirm);
        let (tx, _) = changed(apply(&tx, &Event::OperatorRetry, &ctx(NOW)).unwrap());
        let ev = Event::RoundFinished { done: vec![bid("a"), bid("b")], failed: vec![], retry_at: None };
        let (tx, _) = changed(apply(&tx, &ev, &ctx(DEADLINE)).unwrap());
        let seen: Vec<(TxState, Happening)> = tx.history.iter().map(|h| (h.state, h.what.clone())).collect();
        let round = |done, failed, error: Option<&str>| Happening::Round {
            done,
            failed,
            error: error.map(Into::into),
        };
        assert_eq!(
            seen,
            vec![
                (TxState::Trying, Happening::Begun),
                (TxState::Confirming, Happening::Decided(Decision::Confirm)),
                (TxState::Flagged, round(0, 1, Some("branch b: boom"))),
                (TxState::Confirming, Happening::OperatorRetry),
                (TxState::Confirmed, round(2, 0, None)),
            ],
            "registrations are left out"
        );
        assert_eq!(tx.history.last().map(|h| h.at), Some(DEADLINE));
    }

    #[test]
    fn the_history_keeps_only_the_last_entries_and_cuts_long_errors() {
        let mut tx = tx_in(TxState::Confirming);
        let long = "é".repeat(crate::model::MAX_HISTORY_ERROR);
        for i in 0..40u64 {
            let ev = Event::RoundFinished {
                done: vec![],
                failed: vec![(bid("a"), long.clone())],
                retry_at: Some(NOW + Duration::from_secs(i + 1)),
            };
            tx = changed(apply(&tx, &ev, &ctx(NOW + Duration::from_secs(i))).unwrap()).0;
        }
        assert_eq!(tx.history.len(), crate::model::MAX_HISTORY);
        assert_eq!(tx.history.last().map(|h| h.at), Some(NOW + Duration::from_secs(39)), "the newest kept");
        assert_eq!(tx.history[0].at, NOW + Duration::from_secs(40 - crate::model::MAX_HISTORY as u64));
        for h in &tx.history {
            let Happening::Round { error: Some(e), .. } = &h.what else { panic!("{h:?}") };
            assert!(e.len() <= crate::model::MAX_HISTORY_ERROR && e.starts_with("branch a: é"), "{e}");
        }
    }

    #[test]
    fn a_late_round_on_a_finished_transaction_changes_nothing() {
        for state in [TxState::Confirmed, TxState::Cancelled, TxState::Flagged] {
            let ev = Event::RoundFinished { done: vec![bid("a")], failed: vec![], retry_at: None };
            assert_eq!(apply(&tx_in(state), &ev, &ctx(NOW)).unwrap(), Transition::Unchanged);
        }
        let ev = Event::RoundFinished { done: vec![], failed: vec![], retry_at: None };
        assert!(apply(&tx_in(TxState::Trying), &ev, &ctx(NOW)).is_err());
    }

    fn step_branch(id: &str) -> Branch {
        Branch {
            id: bid(id),
            target: format!("mem://{id}"),
            payload: Vec::new(),
            state: BranchState::Registered,
            last_error: None,
        }
    }

    fn new_saga(ids: &[&str], concurrent: bool, after: &[&[u32]]) -> Transaction {
        let steps = ids
            .iter()
            .enumerate()
            .map(|(i, id)| crate::model::SagaStep {
                compensate: format!("mem://{id}/undo"),
                after: after.get(i).map(|a| a.to_vec()).unwrap_or_default(),
                started: false,
            })
            .collect();
        let branches = ids.iter().map(|id| step_branch(id)).collect();
        changed(saga(Gid::generate(), DEADLINE, branches, Saga { concurrent, steps }, &ctx(NOW)).unwrap()).0
    }

    fn steps_round(decision: Decision, done: &[&str], refused: Option<&str>) -> Event {
        Event::StepsFinished {
            decision,
            done: done.iter().map(|d| bid(d)).collect(),
            failed: vec![],
            refused: refused.map(|r| (bid(r), "409".to_owned())),
            retry_at: None,
        }
    }

    #[test]
    fn a_saga_starts_decided_and_refuses_registrations_and_cancels() {
        let tx = new_saga(&["a", "b"], false, &[]);
        assert_eq!((tx.state, tx.decision), (TxState::Confirming, Some(Decision::Confirm)));
        assert_eq!(runnable_steps(&tx), vec![0]);
        for ev in [register("z"), Event::Cancel] {
            assert!(matches!(apply(&tx, &ev, &ctx(NOW)), Err(Error::IllegalTransition { .. })), "{ev:?}");
        }
        assert_eq!(apply(&tx, &Event::Confirm, &ctx(NOW)).unwrap(), Transition::Unchanged);
    }

    #[test]
    fn a_saga_order_with_a_cycle_or_a_missing_step_is_refused() {
        for after in [&[&[1u32][..], &[0][..]][..], &[&[2][..]], &[&[0][..]]] {
            let steps = after
                .iter()
                .map(|a| crate::model::SagaStep { after: a.to_vec(), ..Default::default() })
                .chain(std::iter::repeat_with(Default::default))
                .take(2)
                .collect();
            let saga_def = Saga { concurrent: true, steps };
            let r = saga(
                Gid::generate(),
                DEADLINE,
                vec![step_branch("a"), step_branch("b")],
                saga_def,
                &ctx(NOW),
            );
            assert!(matches!(r, Err(Error::InvalidInput(_))), "{after:?}");
        }
    }

    #[test]
    fn a_refusal_turns_the_saga_back_marking_what_ran_or_may_have_run() {
        let tx = new_saga(&["a", "b", "c"], false, &[]);
        let tx = changed(apply(&tx, &steps_round(Decision::Confirm, &["a"], None), &ctx(NOW)).unwrap()).0;
        assert_eq!(runnable_steps(&tx), vec![1]);
        let (tx, eff) =
            changed(apply(&tx, &steps_round(Decision::Confirm, &[], Some("b")), &ctx(NOW)).unwrap());
        assert_eq!((tx.state, tx.decision), (TxState::Cancelling, Some(Decision::Cancel)));
        assert_eq!(eff, vec![Effect::DrivePhaseTwo]);
        let TxKind::Saga(s) = &tx.kind else { unreachable!() };
        assert_eq!(s.steps.iter().map(|s| s.started).collect::<Vec<_>>(), [true, true, false]);
        // Reverse order: b first, then a; c is never called.
        assert_eq!(runnable_steps(&tx), vec![1]);
        // A late round of actions is stale: it changes nothing.
        let stale = steps_round(Decision::Confirm, &["b"], None);
        assert_eq!(apply(&tx, &stale, &ctx(NOW)).unwrap(), Transition::Unchanged);
        let tx = changed(apply(&tx, &steps_round(Decision::Cancel, &["b"], None), &ctx(NOW)).unwrap()).0;
        assert_eq!(runnable_steps(&tx), vec![0]);
        let (tx, eff) = changed(apply(&tx, &steps_round(Decision::Cancel, &["a"], None), &ctx(NOW)).unwrap());
        assert_eq!(tx.state, TxState::Cancelled);
        assert_eq!(eff, vec![Effect::Finished(TxState::Cancelled)]);
        assert_eq!(tx.branches[2].state, BranchState::Registered, "c never ran");
    }

    #[test]
    fn a_saga_round_ending_past_the_deadline_turns_back() {
        let tx = new_saga(&["a", "b"], false, &[]);
        let (tx, _) =
            changed(apply(&tx, &steps_round(Decision::Confirm, &["a"], None), &ctx(DEADLINE)).unwrap());
        assert_eq!((tx.state, tx.decision), (TxState::Cancelling, Some(Decision::Cancel)));
        assert!(tx.last_error.as_deref().is_some_and(|e| e.contains("deadline")));
    }

    fn new_message() -> Transaction {
        let msg = Msg { query_prepared: "mem://q".into() };
        message(Gid::generate(), DEADLINE, vec![step_branch("a"), step_branch("b")], msg, &ctx(NOW)).unwrap()
    }

    #[test]
    fn an_aborted_message_is_final_at_once_and_calls_nothing() {
        let tx = new_message();
        assert_eq!(runnable_steps(&tx), Vec::<usize>::new());
        let (tx, eff) = changed(apply(&tx, &Event::Cancel, &ctx(NOW)).unwrap());
        assert_eq!(tx.state, TxState::Cancelled);
        assert_eq!(eff, vec![Effect::Finished(TxState::Cancelled)]);
        assert!(apply(&tx, &Event::Confirm, &ctx(NOW)).is_err());
    }

    #[test]
    fn a_message_at_its_deadline_asks_its_back_check_and_follows_the_answer() {
        let tx = new_message();
        assert!(apply(&tx, &Event::DeadlineReached, &ctx(NOW)).is_err());
        let (asking, eff) = changed(apply(&tx, &Event::DeadlineReached, &ctx(DEADLINE)).unwrap());
        assert_eq!((asking.state, eff), (TxState::Trying, vec![Effect::CallBackCheck]));
        let answer = |outcome, retry_at| Event::BackChecked { outcome, retry_at };
        let (sent, eff) =
            changed(apply(&asking, &answer(LocalOutcome::Committed, None), &ctx(DEADLINE)).unwrap());
        assert_eq!((sent.state, eff), (TxState::Confirming, vec![Effect::DrivePhaseTwo]));
        assert_eq!(runnable_steps(&sent), vec![0], "actions run in order");
        let (gone, _) =
            changed(apply(&asking, &answer(LocalOutcome::RolledBack, None), &ctx(DEADLINE)).unwrap());
        assert_eq!(gone.state, TxState::Cancelled);
        let later = DEADLINE + Duration::from_secs(1);
        let unknown = answer(LocalOutcome::Unknown("425".into()), Some(later));
        let (again, eff) = changed(apply(&asking, &unknown, &ctx(DEADLINE)).unwrap());
        assert_eq!((again.state, again.due_at, eff), (TxState::Trying, Some(later), vec![]));
        let spent = answer(LocalOutcome::Unknown("425".into()), None);
        let (flagged, _) = changed(apply(&asking, &spent, &ctx(DEADLINE)).unwrap());
        assert_eq!((flagged.state, flagged.decision), (TxState::Flagged, None));
        // An operator retry asks again; a late submit is still taken.
        let (retried, eff) = changed(apply(&flagged, &Event::OperatorRetry, &ctx(DEADLINE)).unwrap());
        assert_eq!((retried.state, eff), (TxState::Trying, vec![Effect::CallBackCheck]));
        let (submitted, _) = changed(apply(&flagged, &Event::Confirm, &ctx(later)).unwrap());
        assert_eq!(submitted.state, TxState::Confirming);
        // A back-check answering after a submit changes nothing.
        let late = answer(LocalOutcome::RolledBack, None);
        assert_eq!(apply(&submitted, &late, &ctx(later)).unwrap(), Transition::Unchanged);
    }

    #[test]
    fn registrations_rounds_and_back_checks_of_another_kind_are_illegal() {
        // A message is prepared (Trying), but its actions are fixed: no registration.
        let msg = new_message();
        assert!(matches!(apply(&msg, &register("z"), &ctx(NOW)), Err(Error::IllegalTransition { .. })));
        // A message still prepared takes no round of steps.
        let round = steps_round(Decision::Confirm, &["a"], None);
        assert!(matches!(apply(&msg, &round, &ctx(NOW)), Err(Error::IllegalTransition { .. })));
        // A TCC transaction has no steps to run, and takes neither rounds of steps nor back-check
        // answers, in any state.
        for state in [TxState::Trying, TxState::Confirming] {
            let tcc = tx_in(state);
            assert!(runnable_steps(&tcc).is_empty(), "{state:?}");
            for ev in [
                steps_round(Decision::Confirm, &["a"], None),
                Event::BackChecked { outcome: LocalOutcome::Committed, retry_at: None },
            ] {
                assert!(
                    matches!(apply(&tcc, &ev, &ctx(NOW)), Err(Error::IllegalTransition { .. })),
                    "{state:?} {ev:?}"
                );
            }
        }
    }

    #[test]
    fn a_refused_step_counts_as_a_failure_in_the_history() {
        let tx = new_saga(&["a", "b"], false, &[]);
        let (turned, _) =
            changed(apply(&tx, &steps_round(Decision::Confirm, &[], Some("a")), &ctx(NOW)).unwrap());
        let Some(HistoryEntry { what: Happening::Round { done, failed, error }, .. }) = turned.history.last()
        else {
            panic!("a round entry: {:?}", turned.history);
        };
        assert_eq!((*done, *failed), (0, 1));
        assert!(error.as_deref().is_some_and(|e| e.contains("refused")), "{error:?}");
        let failing = Event::StepsFinished {
            decision: Decision::Cancel,
            done: vec![],
            failed: vec![(bid("a"), "503".into())],
            refused: None,
            retry_at: Some(NOW + Duration::from_secs(1)),
        };
        let (again, _) = changed(apply(&turned, &failing, &ctx(NOW)).unwrap());
        let Some(HistoryEntry { what: Happening::Round { failed, .. }, .. }) = again.history.last() else {
            panic!("a round entry: {:?}", again.history);
        };
        assert_eq!(*failed, 1);
    }

    #[test]
    fn a_forced_compensation_covers_the_steps_that_ran_or_may_have_run_only() {
        let tx = new_saga(&["a", "b", "c"], false, &[]);
        let tx = changed(apply(&tx, &steps_round(Decision::Confirm, &["a"], None), &ctx(NOW)).unwrap()).0;
        let tx = changed(apply(&tx, &steps_round(Decision::Confirm, &[], Some("b")), &ctx(NOW)).unwrap()).0;
        let spent = Event::StepsFinished {
            decision: Decision::Cancel,
            done: vec![],
            failed: vec![(bid("b"), "boom".into())],
            refused: None,
            retry_at: None,
        };
        let flagged = changed(apply(&tx, &spent, &ctx(NOW)).unwrap()).0;
        assert_eq!((flagged.state, flagged.decision), (TxState::Flagged, Some(Decision::Cancel)));
        let (forced, _) =
            changed(apply(&flagged, &Event::OperatorForce(Decision::Cancel), &ctx(NOW)).unwrap());
        let states: Vec<BranchState> = forced.branches.iter().map(|b| b.state).collect();
        assert_eq!(
            states,
            [BranchState::Cancelled, BranchState::Cancelled, BranchState::Registered],
            "a (done) and b (may have run) compensated; c never ran"
        );
    }

    #[test]
    fn a_valid_concurrent_order_is_accepted_and_runs_what_is_ready() {
        // b after a; c after nothing.
        let tx = new_saga(&["a", "b", "c"], true, &[&[], &[0], &[]]);
        assert_eq!((tx.state, tx.decision), (TxState::Confirming, Some(Decision::Confirm)));
        assert_eq!(runnable_steps(&tx), vec![0, 2], "every step without a predecessor at once");
        let tx =
            changed(apply(&tx, &steps_round(Decision::Confirm, &["a", "c"], None), &ctx(NOW)).unwrap()).0;
        assert_eq!(runnable_steps(&tx), vec![1]);
    }

    #[test]
    fn a_step_after_itself_or_after_a_missing_step_is_named_as_such() {
        for after in [&[&[0u32][..]][..], &[&[7][..]]] {
            let steps = after
                .iter()
                .map(|a| crate::model::SagaStep { after: a.to_vec(), ..Default::default() })
                .chain(std::iter::repeat_with(Default::default))
                .take(2)
                .collect();
            let r = saga(
                Gid::generate(),
                DEADLINE,
                vec![step_branch("a"), step_branch("b")],
                Saga { concurrent: true, steps },
                &ctx(NOW),
            );
            match r {
                Err(Error::InvalidInput(m)) => assert!(m.contains("cannot come after"), "{after:?}: {m}"),
                other => panic!("{after:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn steps_are_checked_like_branches_at_creation() {
        let make = |branches: Vec<Branch>| {
            let steps = branches.iter().map(|_| crate::model::SagaStep::default()).collect();
            let s = saga(
                Gid::generate(),
                DEADLINE,
                branches.clone(),
                Saga { concurrent: false, steps },
                &ctx(NOW),
            );
            let m = message(
                Gid::generate(),
                DEADLINE,
                branches,
                Msg { query_prepared: "mem://q".into() },
                &ctx(NOW),
            );
            (s.is_ok(), m.is_ok())
        };
        // ctx allows 3 branches and 100 payload bytes.
        let three: Vec<Branch> = ["a", "b", "c"].iter().map(|id| step_branch(id)).collect();
        assert_eq!(make(three.clone()), (true, true), "exactly the cap");
        let mut four = three.clone();
        four.push(step_branch("d"));
        assert_eq!(make(four), (false, false), "one over the cap");
        assert_eq!(make(vec![step_branch("a"), step_branch("a")]), (false, false), "an id twice");
        let mut heavy = step_branch("a");
        heavy.payload = vec![0; 100];
        assert_eq!(make(vec![heavy.clone()]), (true, true), "payload at the cap");
        heavy.payload.push(0);
        assert_eq!(make(vec![heavy]), (false, false), "payload over the cap");
        let mut done = step_branch("a");
        done.state = BranchState::Confirmed;
        assert_eq!(make(vec![done]), (false, false), "a step that does not start registered");
    }

    #[test]
    fn a_saga_runs_forward_to_confirmed_and_progress_resets_the_retry_budget() {
        let tx = new_saga(&["a", "b"], false, &[]);
        let failing = Event::StepsFinished {
            decision: Decision::Confirm,
            done: vec![],
            failed: vec![(bid("a"), "503".into())],
            refused: None,
            retry_at: Some(NOW + Duration::from_secs(1)),
        };
        let (tx, _) = changed(apply(&tx, &failing, &ctx(NOW)).unwrap());
        assert_eq!(tx.attempts, 1);
        let errors: Vec<Option<&str>> = tx.branches.iter().map(|b| b.last_error.as_deref()).collect();
        assert_eq!(errors, [Some("503"), None], "the error is the failed step's only");
        let (tx, _) = changed(apply(&tx, &steps_round(Decision::Confirm, &["a"], None), &ctx(NOW)).unwrap());
        assert_eq!((tx.state, tx.attempts), (TxState::Confirming, 0), "progress renews the budget");
        let (tx, eff) =
            changed(apply(&tx, &steps_round(Decision::Confirm, &["b"], None), &ctx(NOW)).unwrap());
        assert_eq!((tx.state, eff), (TxState::Confirmed, vec![Effect::Finished(TxState::Confirmed)]));
    }

    #[test]
    fn a_submitted_message_never_turns_back_even_past_its_deadline() {
        let (sent, _) = changed(apply(&new_message(), &Event::Confirm, &ctx(NOW)).unwrap());
        let late = DEADLINE + Duration::from_secs(1);
        let (tx, _) =
            changed(apply(&sent, &steps_round(Decision::Confirm, &["a"], None), &ctx(late)).unwrap());
        assert_eq!((tx.state, tx.decision), (TxState::Confirming, Some(Decision::Confirm)));
        assert_eq!(runnable_steps(&tx), vec![1]);
        let (tx, _) = changed(apply(&tx, &steps_round(Decision::Confirm, &["b"], None), &ctx(late)).unwrap());
        assert_eq!(tx.state, TxState::Confirmed);
    }

    #[test]
    fn a_compensation_round_past_the_deadline_keeps_compensating() {
        let tx = new_saga(&["a", "b", "c"], false, &[]);
        let tx = changed(apply(&tx, &steps_round(Decision::Confirm, &["a"], None), &ctx(NOW)).unwrap()).0;
        let tx = changed(apply(&tx, &steps_round(Decision::Confirm, &[], Some("b")), &ctx(NOW)).unwrap()).0;
        let (tx, _) =
            changed(apply(&tx, &steps_round(Decision::Cancel, &["b"], None), &ctx(DEADLINE)).unwrap());
        assert_eq!((tx.state, tx.decision), (TxState::Cancelling, Some(Decision::Cancel)));
        assert!(tx.last_error.as_deref().is_some_and(|e| e.contains("refused")), "{:?}", tx.last_error);
        assert_eq!(runnable_steps(&tx), vec![0]);
    }

    #[test]
    fn errors_never_produce_a_change() {
        // Every (state, event) pair either changes the transaction or errs; an error must not
        // mutate the input (it is borrowed immutably, so the type system proves it), and a change
        // must bump nothing but what the table says. Exercise all pairs for panics.
        let events = [
            register("z"),
            Event::Confirm,
            Event::Cancel,
            Event::DeadlineReached,
            Event::RoundFinished { done: vec![bid("a")], failed: vec![], retry_at: None },
            Event::OperatorRetry,
            Event::OperatorForce(Decision::Confirm),
            Event::OperatorForce(Decision::Cancel),
        ];
        for state in TxState::ALL {
            let tx = tx_in(state);
            for ev in &events {
                for now in [NOW, DEADLINE] {
                    if let Ok(Transition::Changed(next, _)) = apply(&tx, ev, &ctx(now)) {
                        assert_eq!(next.gid, tx.gid);
                        assert_eq!(next.version, tx.version, "the store bumps versions, not apply");
                        if tx.decision.is_some() {
                            assert_eq!(next.decision, tx.decision, "a decision never changes");
                        }
                    }
                }
            }
        }
    }
}
