//! A native target's lane: the phase-two calls waiting to go to that target in a batch.
//!
//! A call finding fewer than [`Batching::in_flight`] batches under way starts one (carrying every
//! call waiting by then, itself included); otherwise it waits, and the first batch to finish carries
//! it next. Batches are sent from their own task, so a caller that stops waiting (the engine's
//! per-call timeout) strands nobody else's call.
//!
//! A batch is answered when its slowest call is done. So that one slow call (a business confirm
//! waiting on something) does not hold up every call to its target, a batch under way for longer
//! than [`STALLED`] no longer counts against [`Batching::in_flight`]: the next call starts another
//! batch, up to [`MAX_BATCHES`] under way.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tcc_core::transport::{BranchCall, CallError};
use tokio::sync::oneshot;
use tracing::info;

use super::{Batching, classify, error_text, transport_error};
use crate::metrics::{BatchOutcome, Metrics};
use crate::protocol::{BatchAnswer, BatchCall, BatchRequest, MAX_BODY};

/// How long a target that refused a batch is called one call at a time before a batch is tried
/// again (it may have been upgraded, or the refusal may have come from something in between).
pub(super) const ALONE_FOR: Duration = Duration::from_secs(60);

/// How long a batch may be under way before it stops counting against [`Batching::in_flight`].
pub(super) const STALLED: Duration = Duration::from_millis(200);

/// Most batches under way to one target, stalled ones included.
pub(super) const MAX_BATCHES: usize = 64;

/// What became of a call handed to a lane.
#[derive(Debug)]
pub(super) enum Reply {
    /// The participant's answer to the call (or the failure of the batch that carried it).
    Done(Result<(), CallError>),
    /// The target takes no batches: make the call alone.
    Alone,
}

/// The batches of one target.
#[derive(Debug)]
pub(super) struct Lane {
    url: url::Url,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    waiting: VecDeque<(BatchCall, oneshot::Sender<Reply>)>,
    /// The drivers sending batches: their number, and since when their current batch is under way.
    drivers: Vec<(u64, Instant)>,
    next_driver: u64,
    /// Until when every call goes alone, after the target refused a batch.
    alone_until: Option<Instant>,
}

/// A batch: its calls, and where each one's answer goes.
type Batch = (Vec<BatchCall>, Vec<oneshot::Sender<Reply>>);

impl State {
    /// Starts a driver if fewer than `in_flight` batches are under way that have not stalled (and
    /// fewer than [`MAX_BATCHES`] in all): its number and first batch.
    fn start_driver(&mut self, in_flight: usize, max: usize) -> Option<(u64, Batch)> {
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
    fn next_batch(&mut self, id: u64, max: usize) -> Option<Batch> {
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
    /// waits for any more (the engine's per-call timeout gave up on them and will call again).
    fn take(&mut self, max: usize) -> Batch {
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

impl Lane {
    /// The lane of the target whose batch URL is `url`.
    pub(super) fn new(url: url::Url) -> Lane {
        Lane { url, state: Mutex::default() }
    }

    /// Where its batches go.
    #[cfg(test)]
    pub(super) fn url(&self) -> &url::Url {
        &self.url
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `call` to the lane and waits for what became of it.
    pub(super) async fn call(
        self: &Arc<Self>,
        client: &reqwest::Client,
        metrics: &Arc<Metrics>,
        batching: Batching,
        call: &BranchCall<'_>,
    ) -> Reply {
        let (tx, mut rx) = oneshot::channel();
        let mut start = {
            let mut st = self.state();
            if let Some(until) = st.alone_until {
                if Instant::now() < until {
                    return Reply::Alone;
                }
                st.alone_until = None;
            }
            let batched = BatchCall {
                gid: call.gid.to_string(),
                branch: call.branch.id.to_string(),
                deadline: call.deadline.0,
                decision: call.decision,
            };
            st.waiting.push_back((batched, tx));
            st.start_driver(batching.in_flight, batching.max_calls)
        };
        loop {
            if let Some((id, batch)) = start.take() {
                let driver = Driver { lane: Arc::clone(self), metrics: Arc::clone(metrics), id, armed: true };
                tokio::spawn(driver.run(client.clone(), batching.max_calls, batch));
            }
            // Calls are waiting behind batches under way: when the first of those turns stalled,
            // a batch may start for them. Nobody else may come to start it (no new call), so this
            // caller looks then, whether its own call is still waiting or already under way.
            let Some(at) = self.state().next_stall() else { break };
            tokio::select! {
                reply = &mut rx => return reply.unwrap_or_else(|_| dropped()),
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {
                    start = self.state().start_driver(batching.in_flight, batching.max_calls);
                }
            }
        }
        rx.await.unwrap_or_else(|_| dropped())
    }
}

fn dropped() -> Reply {
    Reply::Done(Err(CallError::Transient("the batch carrying this call was dropped".into())))
}

/// One of a lane's batches under way: sends batches while calls are waiting. Dropped without
/// finishing (a panic, the runtime shutting down), it gives its place back.
struct Driver {
    lane: Arc<Lane>,
    metrics: Arc<Metrics>,
    id: u64,
    armed: bool,
}

impl Driver {
    async fn run(mut self, client: reqwest::Client, max_calls: usize, mut batch: Batch) {
        loop {
            let (calls, replies) = batch;
            let count = calls.len();
            let sent = if count == 0 {
                Sent::Answers(Vec::new())
            } else {
                send(&client, &self.lane.url, BatchRequest { calls }).await
            };
            let outcome = match &sent {
                Sent::Answers(_) => BatchOutcome::Answered,
                Sent::Failed(_) => BatchOutcome::Failed,
                Sent::Refused(_) => BatchOutcome::Refused,
            };
            if count > 0 {
                self.metrics.observe_batch(outcome, count);
            }
            match sent {
                Sent::Answers(results) => {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(Reply::Done(result));
                    }
                }
                Sent::Failed(e) => {
                    for reply in replies {
                        let _ = reply.send(Reply::Done(Err(e.clone())));
                    }
                }
                Sent::Refused(why) => {
                    // The URL without its query, which may carry something secret.
                    let mut shown = self.lane.url.clone();
                    shown.set_query(None);
                    info!(
                        target_url = %shown, calls = count, reason = %why,
                        "participant takes no phase-two batches; calling it one call at a time for a while"
                    );
                    let waiting = {
                        let mut st = self.lane.state();
                        st.alone_until = Some(Instant::now() + ALONE_FOR);
                        std::mem::take(&mut st.waiting)
                    };
                    for reply in replies.into_iter().chain(waiting.into_iter().map(|(_, reply)| reply)) {
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

impl Drop for Driver {
    fn drop(&mut self) {
        if self.armed {
            let id = self.id;
            self.lane.state().drivers.retain(|(d, _)| *d != id);
        }
    }
}

/// What sending a batch came to.
enum Sent {
    /// One result per call, in order.
    Answers(Vec<Result<(), CallError>>),
    /// The batch as a whole failed in a way worth retrying: so did each of its calls.
    Failed(CallError),
    /// The target does not take this batch (no batch route, or an answer that is not a batch
    /// answer): its calls are to be made alone.
    Refused(String),
}

async fn send(client: &reqwest::Client, url: &url::Url, request: BatchRequest) -> Sent {
    let count = request.calls.len();
    let body = match serde_json::to_vec(&request) {
        Ok(body) => body,
        Err(e) => return Sent::Refused(format!("the batch does not encode: {e}")),
    };
    let res = client
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await;
    let mut res = match res {
        Ok(res) => res,
        Err(e) => return Sent::Failed(transport_error(&e)),
    };
    let status = res.status();
    if status != StatusCode::OK {
        return match classify(status, error_text(res).await) {
            e @ CallError::Transient(_) => Sent::Failed(e),
            CallError::Permanent(m) => Sent::Refused(m),
        };
    }
    let mut bytes = Vec::new();
    loop {
        match res.chunk().await {
            Ok(Some(chunk)) if bytes.len() + chunk.len() <= MAX_BODY => bytes.extend_from_slice(&chunk),
            Ok(Some(_)) => return Sent::Refused(format!("the batch answer is over {MAX_BODY} bytes")),
            Ok(None) => break,
            Err(e) => return Sent::Failed(transport_error(&e)),
        }
    }
    let answer: BatchAnswer = match serde_json::from_slice(&bytes) {
        Ok(answer) => answer,
        Err(e) => return Sent::Refused(format!("the batch answer does not decode: {e}")),
    };
    if answer.results.len() != count {
        return Sent::Refused(format!("{} results answered for {count} calls", answer.results.len()));
    }
    Sent::Answers(
        answer
            .results
            .into_iter()
            .map(|r| match StatusCode::from_u16(r.status) {
                Ok(s) if s.is_success() => Ok(()),
                Ok(s) => {
                    let text = r.error.and_then(|e| serde_json::to_string(&e).ok()).unwrap_or_default();
                    Err(classify(s, text))
                }
                Err(_) => Err(CallError::Permanent(format!(
                    "participant answered status {} for a batched call",
                    r.status
                ))),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Json;
    use axum::http::StatusCode as S;
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use tcc_core::transport::Transport;
    use tcc_core::{Branch, BranchState, Decision, Timestamp};

    use super::super::{ClientConfig, HttpTransport, build_client};
    use super::*;
    use crate::protocol::{BatchResult, ErrorBody};
    use crate::target::AllowList;

    /// What a test participant saw.
    #[derive(Default)]
    struct Seen {
        batches: AtomicUsize,
        batched_calls: AtomicUsize,
        largest: AtomicUsize,
        singles: AtomicUsize,
        not_found: AtomicUsize,
        /// Lets a batch with a `slow` call answer.
        release: tokio::sync::Notify,
    }

    /// How the test participant answers a batch.
    #[derive(Clone, Copy)]
    enum Batches {
        /// Per call: gids starting `refuse` 409, `busy` 503, others 200; after a short pause, so
        /// that calls crowd; a batch with a `slow` call only once the test releases it.
        Answer,
        /// No batch route: 404.
        NotServed,
        /// 503 for the whole batch.
        Unavailable,
        /// A 200 with no results.
        Short,
    }

    async fn participant(batches: Batches) -> (String, Arc<Seen>) {
        let seen = Arc::new(Seen::default());
        let (s1, s2, s3) = (Arc::clone(&seen), Arc::clone(&seen), Arc::clone(&seen));
        let mut app = axum::Router::new().route(
            "/op/confirm",
            post(move || async move {
                s1.singles.fetch_add(1, Ordering::SeqCst);
                S::OK
            }),
        );
        if !matches!(batches, Batches::NotServed) {
            app = app.route(
                "/op/batch",
                post(move |Json(req): Json<BatchRequest>| async move {
                    s2.batches.fetch_add(1, Ordering::SeqCst);
                    s2.batched_calls.fetch_add(req.calls.len(), Ordering::SeqCst);
                    s2.largest.fetch_max(req.calls.len(), Ordering::SeqCst);
                    let answer = |c: &BatchCall| {
                        let error = |status: S, code: &str| BatchResult {
                            status: status.as_u16(),
                            outcome: None,
                            error: Some(ErrorBody { code: code.into(), message: "no".into(), detail: None }),
                        };
                        if c.gid.starts_with("refuse") {
                            error(S::CONFLICT, "refused")
                        } else if c.gid.starts_with("busy") {
                            error(S::SERVICE_UNAVAILABLE, "storage")
                        } else {
                            BatchResult { status: 200, outcome: Some("confirmed".into()), error: None }
                        }
                    };
                    match batches {
                        Batches::Unavailable => S::SERVICE_UNAVAILABLE.into_response(),
                        Batches::Short => Json(BatchAnswer { results: Vec::new() }).into_response(),
                        _ => {
                            if req.calls.iter().any(|c| c.gid.starts_with("slow")) {
                                s2.release.notified().await;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            Json(BatchAnswer { results: req.calls.iter().map(answer).collect() })
                                .into_response()
                        }
                    }
                }),
            );
        }
        let app = app.fallback(move || async move {
            s3.not_found.fetch_add(1, Ordering::SeqCst);
            Response::from(S::NOT_FOUND.into_response())
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/op"), seen)
    }

    fn transport(batching: Batching) -> Arc<HttpTransport> {
        let allow = AllowList::new(&[]).unwrap_or_else(|e| panic!("{e}"));
        let client = build_client(&ClientConfig::default()).unwrap_or_else(|e| panic!("{e}"));
        Arc::new(HttpTransport::new(client, allow, Arc::default()).with_batching(batching))
    }

    /// Confirms of the branches of transactions `gids` at `target`, all at once; their results in
    /// the same order.
    async fn confirm_all(
        t: &Arc<HttpTransport>,
        target: &str,
        gids: &[String],
    ) -> Vec<Result<(), CallError>> {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, gid) in gids.iter().enumerate() {
            let (t, gid, target) =
                (Arc::clone(t), gid.parse().unwrap_or_else(|e| panic!("{e}")), target.to_owned());
            tasks.spawn(async move {
                let branch = Branch {
                    id: "b".parse().unwrap_or_else(|e| panic!("{e}")),
                    target,
                    payload: Vec::new(),
                    state: BranchState::Registered,
                    last_error: None,
                };
                let call = BranchCall {
                    gid: &gid,
                    branch: &branch,
                    decision: Decision::Confirm,
                    deadline: Timestamp(1),
                };
                (i, t.call(call).await)
            });
        }
        let mut out: Vec<Option<Result<(), CallError>>> = vec![None; gids.len()];
        while let Some(joined) = tasks.join_next().await {
            let (i, r) = joined.unwrap_or_else(|e| panic!("{e}"));
            out[i] = Some(r);
        }
        out.into_iter().map(|r| r.unwrap_or_else(|| panic!("a call never answered"))).collect()
    }

    fn gids(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}-{i}")).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crowded_calls_share_batches_and_each_gets_its_own_answer() {
        let (target, seen) = participant(Batches::Answer).await;
        let t = transport(Batching { max_calls: 8, in_flight: 1 });
        let mut all = gids("ok", 30);
        all.extend(gids("refuse", 5));
        all.extend(gids("busy", 5));
        let results = confirm_all(&t, &target, &all).await;
        for (gid, r) in all.iter().zip(&results) {
            match (gid.split('-').next(), r) {
                (Some("ok"), Ok(())) => {}
                (Some("refuse"), Err(CallError::Permanent(m))) => assert!(m.contains("409"), "{m}"),
                (Some("busy"), Err(CallError::Transient(m))) => assert!(m.contains("503"), "{m}"),
                other => panic!("{gid}: {other:?}"),
            }
        }
        let (batches, calls) =
            (seen.batches.load(Ordering::SeqCst), seen.batched_calls.load(Ordering::SeqCst));
        assert_eq!(calls, all.len(), "every call went in exactly one batch");
        assert!(seen.largest.load(Ordering::SeqCst) <= 8, "no batch over max_calls");
        assert!(batches < all.len() / 2, "{batches} batches for {} calls", all.len());
        assert_eq!(seen.singles.load(Ordering::SeqCst), 0);
        let text = t.metrics.render(&tcc_core::Stats::default(), 0);
        assert!(text.lines().any(|l| l == "tcc_phase_two_batched_calls_total 40"), "{text}");
        let answered = format!("tcc_phase_two_batches_total{{result=\"answered\"}} {batches}");
        assert!(text.lines().any(|l| l == answered), "{text}");
    }

    /// On a target allowed one batch under way, a batch with a `slow` call (held by the
    /// participant until released) is sent first, then `calls` after `pause`: each of them must be
    /// answered while the slow batch still is not.
    async fn calls_behind_a_slow_batch(pause: Duration, calls: &[String]) {
        let (target, seen) = participant(Batches::Answer).await;
        let t = transport(Batching { max_calls: 8, in_flight: 1 });
        let slow = {
            let (t, target) = (Arc::clone(&t), target.clone());
            tokio::spawn(async move { confirm_all(&t, &target, &["slow-0".to_owned()]).await })
        };
        for _ in 0..5_000 {
            if seen.batches.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(seen.batches.load(Ordering::SeqCst), 1, "the slow batch is under way");
        tokio::time::sleep(pause).await;
        let results = tokio::time::timeout(Duration::from_secs(60), confirm_all(&t, &target, calls))
            .await
            .unwrap_or_else(|_| panic!("the calls waited for the slow batch"));
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert!(!slow.is_finished(), "the slow batch is still under way");
        seen.release.notify_one();
        let slow = slow.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(slow.iter().all(Result::is_ok), "{slow:?}");
        assert_eq!(seen.batched_calls.load(Ordering::SeqCst), calls.len() + 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_batch_does_not_hold_up_the_calls_after_it() {
        // The one batch allowed under way has stalled when these come: they go in batches of
        // their own.
        calls_behind_a_slow_batch(STALLED + Duration::from_millis(50), &gids("ok", 10)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_waiting_behind_a_batch_that_stalls_goes_without_another_call_arriving() {
        // The call finds the one batch allowed under way (not stalled yet) and waits. No call
        // comes after it, so nobody else would start the batch that carries it.
        calls_behind_a_slow_batch(Duration::ZERO, &gids("ok", 1)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_target_without_batches_is_called_one_call_at_a_time() {
        let (target, seen) = participant(Batches::NotServed).await;
        let t = transport(Batching { max_calls: 8, in_flight: 1 });
        let results = confirm_all(&t, &target, &gids("ok", 20)).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(seen.singles.load(Ordering::SeqCst), 20);
        // One batch refused (two if the first stalled on a busy machine), then calls went alone.
        let refused = seen.not_found.load(Ordering::SeqCst);
        assert!((1..=2).contains(&refused), "{refused} batches refused");
        let results = confirm_all(&t, &target, &gids("later", 5)).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(seen.singles.load(Ordering::SeqCst), 25);
        assert_eq!(seen.not_found.load(Ordering::SeqCst), refused, "no batch tried again for a while");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_failing_as_a_whole_fails_each_call_as_transient() {
        let (target, seen) = participant(Batches::Unavailable).await;
        let t = transport(Batching { max_calls: 8, in_flight: 2 });
        let results = confirm_all(&t, &target, &gids("ok", 10)).await;
        for r in &results {
            assert!(matches!(r, Err(CallError::Transient(m)) if m.contains("503")), "{r:?}");
        }
        assert_eq!(seen.batched_calls.load(Ordering::SeqCst), 10);
        assert_eq!(seen.singles.load(Ordering::SeqCst), 0, "a busy participant is not called more");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_that_is_not_one_result_per_call_sends_the_calls_alone() {
        let (target, seen) = participant(Batches::Short).await;
        let t = transport(Batching { max_calls: 8, in_flight: 1 });
        let results = confirm_all(&t, &target, &gids("ok", 6)).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(seen.singles.load(Ordering::SeqCst), 6);
        // One batch, unless it stalled on a busy machine and a second one started meanwhile.
        let batches = seen.batches.load(Ordering::SeqCst);
        assert!((1..=2).contains(&batches), "{batches} batches");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batching_off_sends_every_call_alone() {
        let (target, seen) = participant(Batches::Answer).await;
        let t = transport(Batching { max_calls: 1, in_flight: 1 });
        let results = confirm_all(&t, &target, &gids("ok", 10)).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(seen.singles.load(Ordering::SeqCst), 10);
        assert_eq!(seen.batches.load(Ordering::SeqCst), 0);
    }
}
