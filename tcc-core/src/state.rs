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

use crate::error::Error;
use crate::model::{Branch, BranchId, BranchState, Decision, Happening, Timestamp, Transaction, TxState};

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
    })
}

/// [`apply`] before the history entry is added.
fn transition(tx: &Transaction, event: &Event, ctx: &Context<'_>) -> Result<Transition, Error> {
    let illegal =
        || Error::IllegalTransition { gid: tx.gid.clone(), state: tx.state, action: event.action() };
    match (tx.state, event) {
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
            for b in next.branches.iter_mut().filter(|b| b.state == BranchState::Registered) {
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
    }
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
    for b in next.branches.iter_mut() {
        if done.contains(&b.id) {
            b.state = decision.branch_state();
            b.last_error = None;
        } else if let Some((_, err)) = failed.iter().find(|(id, _)| id == &b.id) {
            b.last_error = Some(err.clone());
        }
    }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::Gid;

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
