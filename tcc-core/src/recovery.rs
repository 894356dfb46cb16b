//! The scheduler: resumes unfinished transactions, runs retries when they fall due and cancels
//! transactions still trying at their deadline.
//!
//! It reads only the store's due index ([`Store::claim_due`](crate::store::Store::claim_due)), so its
//! cost follows the number of unfinished transactions, never the finished history. Recovery after a
//! restart needs nothing special: on open the store hands back abandoned leases as due now, and the
//! first pass claims them.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::coordinator::Inner;
use crate::error::{Error, Result};
use crate::model::TxState;
use crate::state::Event;

impl Inner {
    /// Runs until the coordinator stops.
    pub(crate) async fn run_scheduler(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        loop {
            if *stop.borrow() {
                return;
            }
            let claimed = match self.sweep_once().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "scheduler pass failed");
                    0
                }
            };
            if claimed >= self.config.claim_batch {
                tokio::task::yield_now().await; // more is due: go on after letting others run
                continue;
            }
            tokio::select! {
                _ = self.clock.sleep(self.config.poll_interval) => {}
                _ = self.wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Claims what is due and starts working on it; returns how many transactions it claimed.
    pub(crate) async fn sweep_once(self: &Arc<Self>) -> Result<usize> {
        let (now, lease_until) = self.context();
        let claimed =
            self.store.claim_due(&self.config.owner, now, lease_until, self.config.claim_batch).await?;
        let n = claimed.len();
        for tx in claimed {
            match tx.state {
                TxState::Trying if now >= tx.deadline => {
                    match self.update(&tx.gid, &Event::DeadlineReached).await {
                        Ok((stored, effects)) => {
                            if !effects.is_empty() {
                                self.counters.expired.fetch_add(1, Ordering::Relaxed);
                                tracing::info!(tx = %tx.gid, deadline = %tx.deadline, "deadline reached; cancelling");
                            }
                            self.perform(&stored, effects);
                        }
                        // Decided concurrently before the deadline: that decision's round carries on.
                        Err(Error::IllegalTransition { .. }) => {}
                        Err(e) => tracing::error!(tx = %tx.gid, error = %e, "could not expire a transaction"),
                    }
                }
                TxState::Confirming | TxState::Cancelling => {
                    let me = self.clone();
                    self.spawn(async move { me.drive(tx).await });
                }
                _ => {}
            }
        }
        Ok(n)
    }
}
