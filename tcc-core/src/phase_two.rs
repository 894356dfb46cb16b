//! Phase two: one round of confirm or cancel calls to every pending branch of a transaction, at once.
//!
//! A round calls all pending branches concurrently, each bounded by the per-call timeout, and stores
//! its results in one write: branches acknowledged, errors seen, and either the final state, the time
//! of the next round (exponential backoff with jitter) or, when the policy is spent, the flag. Later
//! rounds are started by the scheduler (the `recovery` module) when they fall due, so a retry after a
//! crash and a retry after a failure are the same code path.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::Rng;

use crate::coordinator::Inner;
use crate::join::join_all;
use crate::model::{Branch, BranchId, Decision, Transaction, TxKind, TxState};
use crate::state::{self, Event, LocalOutcome};
use crate::transport::{BackCheckCall, BranchCall, CallError};

impl Inner {
    /// Runs one phase-two round for `tx` (which this process has leased) and stores the outcome.
    pub(crate) async fn drive(self: Arc<Self>, tx: Transaction) {
        let Some(decision) = tx.decision else { return };
        if !matches!(tx.state, TxState::Confirming | TxState::Cancelling) {
            return;
        }
        // At most `max_rounds` at once (the semaphore is never closed). A round that had to wait
        // for a slot gives up if the coordinator is stopping (its lease lapses and the work resumes
        // on the next start), and looks again at the transaction: if it changed meanwhile (another
        // process took over a lapsed lease, or it finished), this round is stale.
        let mut tx = tx;
        if *self.stop.borrow() {
            return; // stopping: no new round starts here (the work resumes on the next start)
        }
        let _slot = match self.rounds.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let mut stop = self.stop.subscribe();
                let slot = tokio::select! {
                    biased;
                    _ = stop.wait_for(|stopping| *stopping) => return,
                    slot = self.rounds.clone().acquire_owned() => slot,
                };
                // The slot may have come free as the coordinator began stopping.
                let Ok(slot) = slot else { return };
                if *self.stop.borrow() {
                    return;
                }
                match self.store.get(&tx.gid).await {
                    Ok(Some(now)) if now.version == tx.version => tx = now,
                    Ok(_) => return,
                    Err(e) => {
                        tracing::error!(tx = %tx.gid, error = %e, "could not read a transaction");
                        return;
                    }
                }
                slot
            }
        };
        if !matches!(tx.kind, TxKind::Tcc) {
            return self.drive_steps(tx, decision).await;
        }
        let Some(_guard) = Driving::enter(&self, &tx) else {
            return; // a round for it is already running here
        };
        if tx.attempts > 0 {
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
        }
        let policy = self.config.retry.for_transaction(&tx.options);
        let pending: Vec<Branch> = tx.pending_branches().cloned().collect();
        let results = self.call_all(&tx, &pending, decision, policy.call_timeout).await;

        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut permanent = false;
        for (id, r) in results {
            self.counters.phase_two_calls.fetch_add(1, Ordering::Relaxed);
            match r {
                Ok(()) => done.push(id),
                Err(e) => {
                    self.counters.phase_two_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(tx = %tx.gid, branch = %id, decision = %decision, error = %e, "branch call failed");
                    permanent |= matches!(e, CallError::Permanent(_));
                    failed.push((id, e.to_string()));
                }
            }
        }
        let retry_at = if permanent || failed.is_empty() {
            None
        } else {
            let random: f64 = rand::rng().random();
            policy.next_retry(tx.attempts + 1, self.clock.now(), random)
        };
        let event = Event::RoundFinished { done, failed, retry_at };
        // Recording a round's results is not an acknowledgement of anything: lost in a crash, the
        // round runs again and the participants answer it as a duplicate. So it does not wait for
        // the flush, and waiters hear of a finished transaction one flush earlier. It starts from
        // this round's copy, which is the stored record unless someone changed it meanwhile.
        match self.update_from(&tx.gid, Some(&tx), &event, false).await {
            Ok((stored, effects)) => {
                drop(_guard);
                self.perform(&stored, effects);
            }
            Err(e) => {
                // The lease runs out and the scheduler runs the round again.
                tracing::error!(tx = %tx.gid, error = %e, "could not store a phase-two round");
            }
        }
    }
}

impl Inner {
    /// Calls `branches` of `tx` with `decision`, all at once, each bounded by `timeout` (no answer
    /// in time is a transient failure); every branch's result, with its id.
    async fn call_all(
        &self,
        tx: &Transaction,
        branches: &[Branch],
        decision: Decision,
        timeout: std::time::Duration,
    ) -> Vec<(BranchId, Result<(), CallError>)> {
        let calls = branches.iter().map(|branch| {
            let call = BranchCall { gid: &tx.gid, branch, decision, deadline: tx.deadline };
            async move {
                let result = tokio::select! {
                    r = self.transport.call(call) => r,
                    _ = self.clock.sleep(timeout) => {
                        Err(CallError::Transient(format!("no answer within {} ms", timeout.as_millis())))
                    }
                };
                (branch.id.clone(), result)
            }
        });
        join_all(calls).await
    }

    /// One round of a saga or message: calls the steps [`state::runnable_steps`] names (a saga's
    /// actions or compensations, a message's actions), then stores the results durably: the next
    /// round's choice of steps, and which steps a turned saga compensates, rest on them.
    async fn drive_steps(self: &Arc<Self>, tx: Transaction, decision: Decision) {
        let Some(guard) = Driving::enter(self, &tx) else {
            return; // a round for it is already running here
        };
        if tx.attempts > 0 {
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
        }
        let policy = self.config.retry.for_transaction(&tx.options);
        let saga = match &tx.kind {
            TxKind::Saga(saga) => Some(saga),
            _ => None,
        };
        // Past its deadline a saga starts no action: the round records nothing and it turns back.
        let late = saga.is_some() && decision == Decision::Confirm && self.clock.now() >= tx.deadline;
        let steps = if late { Vec::new() } else { state::runnable_steps(&tx) };
        let branches: Vec<Branch> = steps
            .iter()
            .map(|&i| {
                let mut b = tx.branches[i].clone();
                if let (Some(saga), Decision::Cancel) = (saga, decision)
                    && let Some(step) = saga.steps.get(i)
                {
                    b.target = step.compensate.clone();
                }
                b
            })
            .collect();
        let results = self.call_all(&tx, &branches, decision, policy.call_timeout).await;
        let (mut done, mut failed, mut refused, mut permanent) = (Vec::new(), Vec::new(), None, false);
        for (id, r) in results {
            self.counters.phase_two_calls.fetch_add(1, Ordering::Relaxed);
            match r {
                Ok(()) => done.push(id),
                Err(e) => {
                    self.counters.phase_two_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(tx = %tx.gid, step = %id, decision = %decision, error = %e, "step call failed");
                    match e {
                        // Only a saga's action may refuse; a compensation or a message's action
                        // that cannot succeed waits for an operator.
                        CallError::Permanent(e) if saga.is_some() && decision == Decision::Confirm => {
                            refused.get_or_insert((id, e));
                        }
                        e => {
                            permanent |= matches!(e, CallError::Permanent(_));
                            failed.push((id, e.to_string()));
                        }
                    }
                }
            }
        }
        let attempts = if done.is_empty() { tx.attempts } else { 0 };
        let retry_at = if permanent || failed.is_empty() {
            None
        } else {
            let random: f64 = rand::rng().random();
            policy.next_retry(attempts + 1, self.clock.now(), random)
        };
        let event = Event::StepsFinished { decision, done, failed, refused, retry_at };
        match self.update_from(&tx.gid, Some(&tx), &event, true).await {
            Ok((stored, effects)) => {
                drop(guard);
                self.perform(&stored, effects);
            }
            Err(e) => tracing::error!(tx = %tx.gid, error = %e, "could not store a round of steps"),
        }
    }

    /// Starts a message's back-check in the background (this process holds its lease).
    pub(crate) fn spawn_back_check(self: &Arc<Self>, tx: Transaction) {
        let me = self.clone();
        self.spawn(async move { me.back_check(tx).await });
    }

    /// Asks the back-check of `tx` (a prepared message past its deadline) and stores what it said.
    async fn back_check(self: Arc<Self>, tx: Transaction) {
        let TxKind::Msg(msg) = &tx.kind else { return };
        let Some(guard) = Driving::enter(&self, &tx) else { return };
        let policy = self.config.retry.for_transaction(&tx.options);
        let check = BackCheckCall { gid: &tx.gid, target: &msg.query_prepared, deadline: tx.deadline };
        let outcome = tokio::select! {
            o = self.transport.back_check(check) => o,
            _ = self.clock.sleep(policy.call_timeout) => {
                LocalOutcome::Unknown(format!("no answer within {} ms", policy.call_timeout.as_millis()))
            }
        };
        tracing::info!(tx = %tx.gid, outcome = ?outcome, "message back-check answered");
        let retry_at = match &outcome {
            LocalOutcome::Unknown(_) => {
                let random: f64 = rand::rng().random();
                policy.next_retry(tx.attempts + 1, self.clock.now(), random)
            }
            _ => None,
        };
        let event = Event::BackChecked { outcome, retry_at };
        match self.update_from(&tx.gid, Some(&tx), &event, true).await {
            Ok((stored, effects)) => {
                drop(guard);
                self.perform(&stored, effects);
            }
            Err(e) => tracing::error!(tx = %tx.gid, error = %e, "could not store a back-check"),
        }
    }
}

/// Marks a transaction as having a round running in this process, until dropped (also on abort).
struct Driving<'a> {
    inner: &'a Inner,
    gid: crate::model::Gid,
}

impl<'a> Driving<'a> {
    fn enter(inner: &'a Inner, tx: &Transaction) -> Option<Driving<'a>> {
        let mut set = inner.driving.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        set.insert(tx.gid.clone()).then(|| Driving { inner, gid: tx.gid.clone() })
    }
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        self.inner.driving.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.gid);
    }
}
