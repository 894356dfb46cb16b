//! Group commit: many writers, one flush.
//!
//! Measured on the target machine (see DESIGN.md): sled `flush()` after each insert gives about 7,500
//! durable writes/s, and many tokio tasks each awaiting `flush_async()` stalled for over a minute. So
//! one dedicated thread owns flushing. A writer applies its change in memory, then asks for a flush
//! ticket and waits. The thread takes every ticket that queued up while the previous flush ran and
//! covers them all with one `flush()`. A change applied before its ticket was queued is in the flush
//! that answers the ticket, so an answered ticket means durable.

use std::fmt;
use std::sync::mpsc;
use std::thread;

use tokio::sync::oneshot;

use crate::error::{Error, Result};

type Ticket = oneshot::Sender<Result<(), String>>;

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
    /// was called. The thread ends when the last handle is dropped.
    pub fn start<F>(name: &str, flush: F) -> Result<GroupCommit>
    where
        F: FnMut() -> Result<(), String> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Ticket>();
        thread::Builder::new()
            .name(format!("{name}-flusher"))
            .spawn(move || run(rx, flush))
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

fn run<F>(rx: mpsc::Receiver<Ticket>, mut flush: F)
where
    F: FnMut() -> Result<(), String>,
{
    let mut batch = Vec::new();
    // `recv` fails only once every handle is gone: then nobody can wait any more.
    while let Ok(first) = rx.recv() {
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

    #[tokio::test]
    async fn a_failed_flush_is_reported_to_every_waiter() {
        let gc = GroupCommit::start("test", || Err("disk on fire".to_owned())).unwrap();
        let err = gc.durable().await.unwrap_err();
        assert!(err.to_string().contains("disk on fire"));
    }
}
