//! Lanes: calls to one destination folded into batch requests.
//!
//! Two kinds of lane use this: the coordinator's phase-two calls to one participant operation
//! (`POST {target}/batch`, see [`crate::transport`]) and a remote client's calls to its coordinator
//! (`POST /v1/batch`, see [`crate::client`]). A [`Carrier`] says how one batch is sent and answered;
//! the lane decides when batches go.
//!
//! A call finding fewer than [`Batching::in_flight`] batches under way starts one (carrying every
//! call waiting by then, itself included); otherwise it waits, and the first batch to finish carries
//! it next. Batches are sent from their own task, so a caller that stops waiting (a timeout, a
//! dropped future) strands nobody else's call.
//!
//! A batch is done when its slowest call is. So that one slow call does not hold up every call
//! behind it, a batch under way for longer than [`STALLED`] no longer counts against
//! [`Batching::in_flight`]: the next call starts another batch, up to [`MAX_BATCHES`] under way.
//!
//! A destination that refuses a batch (it serves no batches, or answers something that is not a
//! batch answer) gets every call alone for [`ALONE_FOR`]: each caller is told [`Reply::Alone`] and
//! makes its call itself.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::info;

use crate::transport::Batching;

/// How long a destination that refused a batch is called one call at a time before a batch is
/// tried again (it may have been upgraded, or the refusal may have come from something in between).
pub(crate) const ALONE_FOR: Duration = Duration::from_secs(60);

/// How long a batch may be under way before it stops counting against [`Batching::in_flight`].
pub(crate) const STALLED: Duration = Duration::from_millis(200);

/// Most batches under way to one destination, stalled ones included.
pub(crate) const MAX_BATCHES: usize = 64;

/// What became of a call handed to a lane.
#[derive(Debug)]
pub(crate) enum Reply<A> {
    /// The destination's answer to the call (or the failure of the batch that carried it).
    Done(A),
    /// The destination takes no batches: make the call alone.
    Alone,
}

/// Where a call's answer goes.
pub(crate) type Answer<C> = oneshot::Sender<Reply<<C as Carrier>::Answer>>;

/// How a lane's batches are sent.
pub(crate) trait Carrier: Send + Sync + 'static {
    /// One call, as it goes into a batch.
    type Call: Send + 'static;
    /// What its caller gets back.
    type Answer: Send + 'static;

    /// Sends `calls` as one batch and answers each call through the reply of the same index, as the
    /// answers come (taking it out of `replies`). Returns why, answering nothing, when the
    /// destination takes no batches of this kind. A reply still in `replies` when this returns
    /// `Ok` gets [`Carrier::dropped`].
    fn send(
        &self,
        calls: Vec<Self::Call>,
        replies: &mut [Option<Answer<Self>>],
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// The answer of a call whose batch ended without answering it.
    fn dropped() -> Self::Answer;

    /// Where the batches go, for the log: nothing secret in it.
    fn destination(&self) -> String;
}

/// `url` without its query, which may carry something secret: a destination as the log shows it.
pub(crate) fn without_query(url: &url::Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.to_string()
}

/// The reply of call `i` of a batch, taken out of `replies`: an error when the batch has no call
/// `i`, or when that call was answered already.
pub(crate) fn take_reply<R>(replies: &mut [Option<R>], i: usize) -> Result<R, String> {
    let count = replies.len();
    replies
        .get_mut(i)
        .ok_or_else(|| format!("answer for call {i} of a batch of {count}"))?
        .take()
        .ok_or_else(|| format!("call {i} of a batch answered twice"))
}

/// The batches of one destination.
pub(crate) struct Lane<C: Carrier> {
    carrier: C,
    state: Mutex<State<C::Call, Answer<C>>>,
}

impl<C: Carrier> std::fmt::Debug for Lane<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane").field("destination", &self.carrier.destination()).finish_non_exhaustive()
    }
}

struct State<Call, R> {
    waiting: VecDeque<(Call, R)>,
    /// The drivers sending batches: their number, and since when their current batch is under way.
    drivers: Vec<(u64, Instant)>,
    next_driver: u64,
    /// Until when every call goes alone, after the destination refused a batch.
    alone_until: Option<Instant>,
}

/// A batch: its calls, and where each one's answer goes.
type Batch<Call, R> = (Vec<Call>, Vec<R>);

impl<Call, A> State<Call, oneshot::Sender<A>> {
    /// Starts a driver if fewer than `in_flight` batches are under way that have not stalled (and
    /// fewer than [`MAX_BATCHES`] in all): its number and first batch.
    fn start_driver(
        &mut self,
        in_flight: usize,
        max: usize,
    ) -> Option<(u64, Batch<Call, oneshot::Sender<A>>)> {
        let now = Instant::now();
        let moving = self.drivers.iter().filter(|(_, since)| now.duration_since(*since) < STALLED).count();
        if moving >= in_flight.max(1) || self.drivers.len() >= MAX_BATCHES {
            return None;
        }
        let id = self.next_driver;
        self.next_driver += 1;
        self.drivers.push((id, now));
        Some((id, self.take(max)))
    }

    /// When the first of the batches under way that have not stalled will have, if calls are
    /// waiting and another batch may start then.
    fn next_stall(&self) -> Option<Instant> {
        if self.waiting.is_empty() || self.drivers.len() >= MAX_BATCHES {
            return None;
        }
        let now = Instant::now();
        self.drivers.iter().map(|(_, since)| *since + STALLED).filter(|at| *at > now).min()
    }

    /// The next batch of driver `id`, or `None` (and the driver gone) when no call is waiting.
    fn next_batch(&mut self, id: u64, max: usize) -> Option<Batch<Call, oneshot::Sender<A>>> {
        if self.waiting.is_empty() {
            self.drivers.retain(|(d, _)| *d != id);
            return None;
        }
        if let Some(slot) = self.drivers.iter_mut().find(|(d, _)| *d == id) {
            slot.1 = Instant::now();
        }
        Some(self.take(max))
    }

    /// The next batch: up to `max` of the waiting calls, oldest first, leaving out those nobody
    /// waits for any more (their caller gave up and will call again, or not).
    fn take(&mut self, max: usize) -> Batch<Call, oneshot::Sender<A>> {
        let (mut calls, mut replies) = (Vec::new(), Vec::new());
        while calls.len() < max {
            let Some((call, reply)) = self.waiting.pop_front() else { break };
            if !reply.is_closed() {
                calls.push(call);
                replies.push(reply);
            }
        }
        (calls, replies)
    }
}

impl<C: Carrier> Lane<C> {
    /// The lane whose batches `carrier` sends.
    pub(crate) fn new(carrier: C) -> Lane<C> {
        let state =
            State { waiting: VecDeque::new(), drivers: Vec::new(), next_driver: 0, alone_until: None };
        Lane { carrier, state: Mutex::new(state) }
    }

    /// What sends its batches.
    #[cfg(test)]
    pub(crate) fn carrier(&self) -> &C {
        &self.carrier
    }

    fn state(&self) -> MutexGuard<'_, State<C::Call, Answer<C>>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `call` to the lane and waits for what became of it.
    pub(crate) async fn call(self: &Arc<Self>, batching: Batching, call: C::Call) -> Reply<C::Answer> {
        let (tx, mut rx) = oneshot::channel();
        let mut start = {
            let mut st = self.state();
            if let Some(until) = st.alone_until {
                if Instant::now() < until {
                    return Reply::Alone;
                }
                st.alone_until = None;
            }
            st.waiting.push_back((call, tx));
            st.start_driver(batching.in_flight, batching.max_calls)
        };
        loop {
            if let Some((id, batch)) = start.take() {
                let driver = Driver { lane: Arc::clone(self), id, armed: true };
                tokio::spawn(driver.run(batching.max_calls, batch));
            }
            // Calls are waiting behind batches under way: when the first of those turns stalled,
            // a batch may start for them. Nobody else may come to start it (no new call), so this
            // caller looks then, whether its own call is still waiting or already under way.
            let Some(at) = self.state().next_stall() else { break };
            tokio::select! {
                reply = &mut rx => return reply.unwrap_or_else(|_| Reply::Done(C::dropped())),
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {
                    start = self.state().start_driver(batching.in_flight, batching.max_calls);
                }
            }
        }
        rx.await.unwrap_or_else(|_| Reply::Done(C::dropped()))
    }
}

/// One of a lane's batches under way: sends batches while calls are waiting. Dropped without
/// finishing (a panic, the runtime shutting down), it gives its place back.
struct Driver<C: Carrier> {
    lane: Arc<Lane<C>>,
    id: u64,
    armed: bool,
}

impl<C: Carrier> Driver<C> {
    async fn run(mut self, max_calls: usize, mut batch: Batch<C::Call, Answer<C>>) {
        loop {
            let (calls, replies) = batch;
            let mut replies: Vec<Option<Answer<C>>> = replies.into_iter().map(Some).collect();
            let sent =
                if calls.is_empty() { Ok(()) } else { self.lane.carrier.send(calls, &mut replies).await };
            match sent {
                Ok(()) => {
                    for reply in replies.into_iter().flatten() {
                        let _ = reply.send(Reply::Done(C::dropped()));
                    }
                }
                Err(why) => {
                    info!(
                        destination = %self.lane.carrier.destination(), calls = replies.len(), reason = %why,
                        "the destination takes no batches; calling it one call at a time for a while"
                    );
                    let waiting = {
                        let mut st = self.lane.state();
                        st.alone_until = Some(Instant::now() + ALONE_FOR);
                        std::mem::take(&mut st.waiting)
                    };
                    let left = replies.into_iter().flatten();
                    for reply in left.chain(waiting.into_iter().map(|(_, reply)| reply)) {
                        let _ = reply.send(Reply::Alone);
                    }
                }
            }
            match self.lane.state().next_batch(self.id, max_calls) {
                Some(next) => batch = next,
                None => {
                    self.armed = false;
                    return;
                }
            }
        }
    }
}

impl<C: Carrier> Drop for Driver<C> {
    fn drop(&mut self) {
        if self.armed {
            let id = self.id;
            self.lane.state().drivers.retain(|(d, _)| *d != id);
        }
    }
}
