//! The injectable clock: wall time plus sleeping, so deadline and retry tests never sleep for real.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use crate::model::Timestamp;

/// A future returned by [`Clock::sleep`].
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Where the engine and the barrier get the time from.
///
/// Production uses [`SystemClock`]; tests use [`ManualClock`] and move time by hand.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current wall-clock time.
    fn now(&self) -> Timestamp;
    /// A future that completes once `d` has passed on this clock.
    fn sleep(&self, d: Duration) -> Sleep;
}

/// The operating system's clock and tokio's timer.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    fn sleep(&self, d: Duration) -> Sleep {
        Box::pin(tokio::time::sleep(d))
    }
}

#[derive(Default)]
struct ManualState {
    now: Timestamp,
    next_id: u64,
    sleepers: BTreeMap<(Timestamp, u64), oneshot::Sender<()>>,
}

/// A clock that only moves when told to. Sleepers wake when [`advance`](ManualClock::advance) passes
/// their wake-up time. Clones share the same time.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use tcc_core::{Clock, ManualClock, Timestamp};
/// let clock = ManualClock::new(Timestamp(1_000));
/// let nap = clock.sleep(Duration::from_millis(500));
/// clock.advance(Duration::from_millis(500));
/// nap.await;
/// assert_eq!(clock.now(), Timestamp(1_500));
/// # });
/// ```
#[derive(Clone, Default)]
pub struct ManualClock {
    state: Arc<Mutex<ManualState>>,
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock").field("now", &self.now()).finish()
    }
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Timestamp) -> ManualClock {
        let clock = ManualClock::default();
        clock.lock().now = start;
        clock
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ManualState> {
        // A panic while holding this lock cannot leave the map inconsistent; keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves time forward by `d` and wakes every sleeper whose time has come.
    pub fn advance(&self, d: Duration) {
        let mut st = self.lock();
        st.now = st.now + d;
        let now = st.now;
        let later = st.sleepers.split_off(&(Timestamp(now.0.saturating_add(1)), 0));
        let due = std::mem::replace(&mut st.sleepers, later);
        drop(st);
        for (_, tx) in due {
            let _ = tx.send(());
        }
    }

    /// How many sleepers are waiting (tests use it to know the engine has gone to sleep).
    pub fn sleepers(&self) -> usize {
        let mut st = self.lock();
        st.sleepers.retain(|_, tx| !tx.is_closed());
        st.sleepers.len()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        self.lock().now
    }

    fn sleep(&self, d: Duration) -> Sleep {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.lock();
            if d.is_zero() {
                let _ = tx.send(());
            } else {
                let at = st.now + d;
                let id = st.next_id;
                st.next_id += 1;
                st.sleepers.insert((at, id), tx);
            }
        }
        Box::pin(async move {
            // A dropped clock never wakes anyone; that only happens at teardown.
            if rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}
