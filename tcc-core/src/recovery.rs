//! The scheduler: resumes unfinished transactions, runs retries when they fall due and cancels
//! transactions still trying at their deadline.
//!
//! It reads only the store's due index ([`Store::claim_due`](crate::store::Store::claim_due)), so its
//! cost follows the number of unfinished transactions, never the finished history. Recovery after a
//! restart needs nothing special: on open the store hands back abandoned leases as due now, and the
//! first pass claims them.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::coordinator::Inner;
use crate::error::{Error, Result};
use crate::model::{Gid, Transaction, TxState};
use crate::state::{self, Effect, Event, Transition};

/// The fewest transactions a scheduler pass claims, even with every round slot taken.
const MIN_CLAIM: usize = 16;

/// Records one pruning call looks at before the pruner lets others run. The sled store's calls
/// run on the calling thread: measured on 1,000,000 finished records, about 0.45 µs a record
/// looked at and 6.5 µs a record deleted, so a call holds its thread for at most about 7 ms.
const PRUNE_CHUNK: usize = 1024;

/// The longest pause between two pruning passes.
const MAX_PRUNE_PAUSE: Duration = Duration::from_secs(60);

impl Inner {
    /// Runs until the coordinator stops.
    pub(crate) async fn run_scheduler(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        loop {
            if *stop.borrow() {
                return;
            }
            let more = match self.sweep_once().await {
                Ok(more) => more,
                Err(e) => {
                    tracing::error!(error = %e, "scheduler pass failed");
                    false
                }
            };
            if more {
                tokio::task::yield_now().await; // more may be due: go on after letting others run
                continue;
            }
            tokio::select! {
                _ = self.clock.sleep(self.config.poll_interval) => {}
                _ = self.wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Deletes finished transactions older than `retain`, a pass every quarter of it (at least a
    /// second, at most [`MAX_PRUNE_PAUSE`] apart), until the coordinator stops. The first pass runs
    /// one pause after opening, so that it never competes with recovery.
    pub(crate) async fn run_pruner(self: Arc<Self>, retain: Duration) {
        let pause = (retain / 4).clamp(Duration::from_secs(1), MAX_PRUNE_PAUSE);
        let mut stop = self.stop.subscribe();
        loop {
            tokio::select! {
                _ = self.clock.sleep(pause) => {}
                _ = stop.changed() => return,
            }
            if let Err(e) = self.prune_pass(retain).await {
                tracing::error!(error = %e, "pruning finished transactions failed; trying again next pass");
            }
        }
    }

    /// One pass over the store deleting finished transactions that finished more than `older_than`
    /// ago: how many it deleted.
    pub(crate) async fn prune_pass(&self, older_than: Duration) -> Result<usize> {
        let before = self.clock.now().saturating_sub(older_than);
        let mut deleted = 0;
        loop {
            let pruned = self.store.prune_finished(before, PRUNE_CHUNK).await?;
            deleted += pruned.deleted;
            self.counters.pruned.fetch_add(pruned.deleted as u64, Ordering::Relaxed);
            if !pruned.more {
                break;
            }
            tokio::task::yield_now().await;
        }
        if deleted > 0 {
            tracing::info!(deleted, before = %before, "deleted finished transactions past their retention");
        }
        Ok(deleted)
    }

    /// Claims what is due, as much as there is room for in [`Config::max_rounds`](crate::Config),
    /// and starts working on it; returns whether it claimed all it asked for (so more may be due).
    ///
    /// Transactions still trying past their deadline are expired together: each cancel decision is
    /// written in its claim's write ([`Store::claim_due_with`](crate::store::Store::claim_due_with)),
    /// without waiting for the flush, then one flush covers the batch before any of their
    /// cancels is sent. (Past the deadline cancel is the only decision, so a crash before that flush
    /// only makes the sweep decide the same again.) Recovering a large backlog then costs one flush
    /// per batch, not one per transaction.
    pub(crate) async fn sweep_once(self: &Arc<Self>) -> Result<bool> {
        let pending = self.pending_rounds.load(Ordering::Acquire);
        let room = self.config.claim_batch.min(self.config.max_rounds.saturating_sub(pending));
        // Even with every round slot taken (by decisions coming in faster than participants answer),
        // a few are claimed each pass, so deadlines keep expiring and retries keep falling due; such
        // a pass then waits for the poll interval or a freed slot.
        let limit = room.max(self.config.claim_batch.min(MIN_CLAIM));
        let ctx = self.context();
        let (now, lease_until) = (ctx.now, ctx.lease_until);
        // A transaction still trying at its deadline is cancelled in the claim's own write (one
        // write, not a claim and then the decision); the effects wait here until it is stored.
        let decided: Mutex<HashMap<Gid, Vec<Effect>>> = Mutex::default();
        let expire = |tx: &Transaction| -> Option<Transaction> {
            if tx.state != TxState::Trying || now < tx.deadline {
                return None;
            }
            match state::apply(tx, &Event::DeadlineReached, &ctx) {
                Ok(Transition::Changed(next, effects)) => {
                    decided.lock().unwrap_or_else(PoisonError::into_inner).insert(tx.gid.clone(), effects);
                    Some(next)
                }
                _ => None,
            }
        };
        let claimed = self.store.claim_due_with(&self.config.owner, now, lease_until, limit, &expire).await?;
        let mut decided = decided.into_inner().unwrap_or_else(PoisonError::into_inner);
        let more = room == limit && claimed.len() >= limit;
        let mut expired = Vec::new();
        for (tx, changed) in claimed {
            if changed {
                let effects = decided.remove(&tx.gid).unwrap_or_default();
                expired.push((tx.deadline, (tx, effects)));
                continue;
            }
            match tx.state {
                // Not expired in the claim: a store whose `claim_due_with` does not apply `then`.
                TxState::Trying if now >= tx.deadline => {
                    match self.update_with(&tx.gid, &Event::DeadlineReached, false).await {
                        Ok(done) => expired.push((tx.deadline, done)),
                        // Decided concurrently before the deadline: that decision's round carries on.
                        Err(Error::IllegalTransition { .. }) => {}
                        Err(e) => tracing::error!(tx = %tx.gid, error = %e, "could not expire a transaction"),
                    }
                }
                TxState::Confirming | TxState::Cancelling => self.spawn_drive(tx),
                _ => {}
            }
        }
        if !expired.is_empty() {
            // Not one cancel is sent before the batch's decisions are on disk. Should the flush fail,
            // nothing is sent now; once their claims lapse a later pass sends the cancels (past the
            // deadline cancel is the only decision, so that is what a later flush records anyway).
            self.store.sync().await?;
            for (deadline, (stored, effects)) in expired {
                if effects.contains(&Effect::CallBackCheck) {
                    tracing::info!(tx = %stored.gid, deadline = %deadline, "message still prepared at its deadline; asking its back-check");
                } else if !effects.is_empty() {
                    self.counters.expired.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(tx = %stored.gid, deadline = %deadline, "deadline reached; cancelling");
                }
                self.perform(&stored, effects);
            }
        }
        Ok(more)
    }
}
