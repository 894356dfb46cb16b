//! Group commit: many writers, one flush.
//!
//! Measured on the target machine (see DESIGN.md): sled `flush()` after each insert gives about 7,500
//! durable writes/s, and many tokio tasks each awaiting `flush_async()` stalled for over a minute. So
//! one dedicated thread owns flushing. A writer applies its change in memory, then asks for a flush
//! ticket and waits. The thread takes every ticket that queued up while the previous flush ran and
//! covers them all with one `flush()`. A change applied before its ticket was queued is in the flush
//! that answers the ticket, so an answered ticket means durable.
//!
//! ## Lingering under load
//! Each sled flush hands the sealed buffer to sled's IO thread pool, which wakes all of its idle
//! threads for every piece of work; under load the flusher would run back to back with about two
//! tickets per flush, and that wake-up churn, not the disk, was a fifth of the CPU of an embedded
//! coordinator (measured with `perf`; see the README's benchmark notes). So when tickets were
//! already queued as a flush ended (writers are busy), the thread lingers a moment
//! ([`DEFAULT_LINGER`]) to gather more before the next flush. An idle flusher never lingers: the
//! first ticket after a quiet spell is flushed at once, so a lone writer waits no longer.

use std::fmt;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::error::{Error, Result};

type Ticket = oneshot::Sender<Result<(), String>>;

/// How long a busy flusher gathers tickets before its next flush. Measured on the 2-core target
/// machine with `tcc-bench --modes embedded`: no linger gave about 2,900 flushes/s of 2 tickets
/// each; 500 µs gave about 950 of 8 each and 12% to 24% more transactions/s in interleaved runs,
/// with lower latency at full load; 1 and 2 ms gained nothing more. The price is at moderate load,
/// where a durable wait can take up to this much longer.
pub const DEFAULT_LINGER: Duration = Duration::from_micros(500);

/// The handle writers use to wait for durability. Cloning shares the flusher thread.
#[derive(Clone)]
pub struct GroupCommit {
    tickets: mpsc::Sender<Ticket>,
}

impl fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts the flusher thread for `flush`, which must make durable everything written before it
    /// was called, lingering [`DEFAULT_LINGER`] when busy. The thread ends when the last handle is
    /// dropped.
    pub fn start<F>(name: &str, flush: F) -> Result<GroupCommit>
    where
        F: FnMut() -> Result<(), String> + Send + 'static,
    {
        GroupCommit::start_with_linger(name, DEFAULT_LINGER, flush)
    }

    /// [`start`](Self::start) with another linger (zero: flush back to back).
    pub fn start_with_linger<F>(name: &str, linger: Duration, flush: F) -> Result<GroupCommit>
    where
        F: FnMut() -> Result<(), String> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Ticket>();
        thread::Builder::new()
            .name(format!("{name}-flusher"))
            .spawn(move || run(rx, linger, flush))
            .map_err(|e| Error::Storage(format!("cannot start the flusher thread: {e}")))?;
        Ok(GroupCommit { tickets: tx })
    }

    /// Waits until everything written before this call is durable.
    pub async fn durable(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tickets.send(tx).map_err(|_| Error::Storage("the flusher thread has stopped".to_owned()))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Storage(format!("flush failed: {e}"))),
            Err(_) => Err(Error::Storage("the flusher thread has stopped".to_owned())),
        }
    }
}

fn run<F>(rx: mpsc::Receiver<Ticket>, linger: Duration, mut flush: F)
where
    F: FnMut() -> Result<(), String>,
{
    let mut batch = Vec::new();
    // A ticket that was already waiting when the last flush ended: writers are busy.
    let mut queued: Option<Ticket> = None;
    loop {
        let first = match queued.take() {
            Some(ticket) => {
                if !linger.is_zero() {
                    thread::sleep(linger);
                }
                ticket
            }
            // `recv` fails only once every handle is gone: then nobody can wait any more.
            None => match rx.recv() {
                Ok(ticket) => ticket,
                Err(_) => return,
            },
        };
        batch.push(first);
        batch.extend(rx.try_iter());
        let result = flush();
        if let Err(e) = &result {
            tracing::error!(error = %e, waiters = batch.len(), "store flush failed");
        }
        for ticket in batch.drain(..) {
            // A waiter that gave up (dropped its future) needs no answer.
            let _ = ticket.send(result.clone());
        }
        queued = rx.try_recv().ok();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_waiters_share_flushes() {
        let flushes = Arc::new(AtomicUsize::new(0));
        let counter = flushes.clone();
        let gc = GroupCommit::start("test", move || {
            counter.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(2));
            Ok(())
        })
        .unwrap();
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let gc = gc.clone();
            tasks.push(tokio::spawn(async move { gc.durable().await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let n = flushes.load(Ordering::SeqCst);
        assert!((1..200).contains(&n), "200 waiters took {n} flushes");
    }

    /// Lingering gathers tickets but never answers one with a flush that began before it was
    /// queued: every writer's change is covered by the flush that answers it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answered_ticket_is_covered_by_a_later_flush_while_lingering() {
        use std::sync::atomic::AtomicU64;
        let written = Arc::new(AtomicU64::new(0));
        let durable_upto = Arc::new(AtomicU64::new(0));
        let (w, d) = (written.clone(), durable_upto.clone());
        let gc = GroupCommit::start_with_linger("test", Duration::from_micros(300), move || {
            // Everything written so far is made durable by this flush.
            d.fetch_max(w.load(Ordering::SeqCst), Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (gc, written, durable_upto) = (gc.clone(), written.clone(), durable_upto.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    let mine = written.fetch_add(1, Ordering::SeqCst) + 1;
                    gc.durable().await.unwrap();
                    assert!(
                        durable_upto.load(Ordering::SeqCst) >= mine,
                        "write {mine} answered before its flush"
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_failed_flush_is_reported_to_every_waiter() {
        let gc = GroupCommit::start("test", || Err("disk on fire".to_owned())).unwrap();
        let err = gc.durable().await.unwrap_err();
        assert!(err.to_string().contains("disk on fire"));
    }
}
