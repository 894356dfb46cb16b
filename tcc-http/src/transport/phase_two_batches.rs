//! Phase-two batches: the lane of a native target, the confirms and cancels the coordinator owes one
//! participant operation, folded into `POST {target}/batch` requests (see [`crate::lane`] for when
//! batches go, and [`crate::protocol`] for the batch and its answer).

use std::sync::Arc;

use reqwest::StatusCode;
use tcc_core::transport::CallError;

use super::{bounded_body, classify, error_text, transport_error};
use crate::lane::{Answer, Carrier, Reply, take_reply};
use crate::metrics::{BatchOutcome, Metrics};
use crate::ndjson::{self, ReadError};
use crate::protocol::{AnswerLine, BatchAnswer, BatchCall, BatchRequest, BatchResult, MAX_BODY};

/// The lane of one participant operation.
pub(super) type Lane = crate::lane::Lane<PhaseTwo>;

/// Sends a participant operation's batches of phase-two calls.
#[derive(Debug)]
pub(super) struct PhaseTwo {
    /// `{target}/batch`.
    pub(super) url: url::Url,
    pub(super) client: reqwest::Client,
    pub(super) metrics: Arc<Metrics>,
}

impl Carrier for PhaseTwo {
    type Call = BatchCall;
    type Answer = Result<(), CallError>;

    async fn send(&self, calls: Vec<BatchCall>, replies: &mut [Option<Answer<Self>>]) -> Result<(), String> {
        let count = calls.len();
        let sent = send(&self.client, &self.url, BatchRequest { calls }, replies).await;
        let outcome = match &sent {
            Sent::Answered => BatchOutcome::Answered,
            Sent::Failed(_) => BatchOutcome::Failed,
            Sent::Refused(_) => BatchOutcome::Refused,
        };
        self.metrics.observe_batch(outcome, count);
        match sent {
            Sent::Answered => Ok(()),
            Sent::Failed(e) => {
                for reply in replies.iter_mut().filter_map(Option::take) {
                    let _ = reply.send(Reply::Done(Err(e.clone())));
                }
                Ok(())
            }
            Sent::Refused(why) => Err(why),
        }
    }

    fn dropped() -> Result<(), CallError> {
        Err(CallError::Transient("the batch carrying this call was dropped".into()))
    }

    fn destination(&self) -> String {
        crate::lane::without_query(&self.url)
    }
}

/// What sending a batch came to.
enum Sent {
    /// The participant answered the calls (each reply taken as its answer came).
    Answered,
    /// The batch failed in a way worth retrying: so did each of its calls not answered yet.
    Failed(CallError),
    /// The target does not take this batch (no batch route, or an answer that is not a batch
    /// answer): its calls not answered yet are to be made alone.
    Refused(String),
}

/// Longest line of a streamed answer read: one call's result, with its error body.
const MAX_LINE: usize = 64 * 1024;

async fn send(
    client: &reqwest::Client,
    url: &url::Url,
    request: BatchRequest,
    replies: &mut [Option<Answer<PhaseTwo>>],
) -> Sent {
    let count = request.calls.len();
    let body = match serde_json::to_vec(&request) {
        Ok(body) => body,
        Err(e) => return Sent::Refused(format!("the batch does not encode: {e}")),
    };
    let res = client
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::ACCEPT, ndjson::ACCEPT)
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
    if ndjson::is_ndjson(&res) {
        let read = ndjson::read_lines(&mut res, MAX_LINE, |line| {
            let line: AnswerLine<BatchResult> = serde_json::from_slice(line)
                .map_err(|e| format!("a batch answer line does not decode: {e}"))?;
            let reply = take_reply(replies, line.i)?;
            let _ = reply.send(Reply::Done(call_result(line.result)));
            Ok(())
        })
        .await;
        return match read {
            Ok(()) => Sent::Answered,
            Err(ReadError::Transport(e)) => Sent::Failed(transport_error(&e)),
            Err(ReadError::Line(why)) => Sent::Refused(why),
        };
    }
    let bytes = match bounded_body(&mut res, MAX_BODY).await {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Sent::Refused(format!("the batch answer is over {MAX_BODY} bytes")),
        Err(e) => return Sent::Failed(transport_error(&e)),
    };
    let answer: BatchAnswer = match serde_json::from_slice(&bytes) {
        Ok(answer) => answer,
        Err(e) => return Sent::Refused(format!("the batch answer does not decode: {e}")),
    };
    if answer.results.len() != count {
        return Sent::Refused(format!("{} results answered for {count} calls", answer.results.len()));
    }
    for (reply, result) in replies.iter_mut().zip(answer.results) {
        if let Some(reply) = reply.take() {
            let _ = reply.send(Reply::Done(call_result(result)));
        }
    }
    Sent::Answered
}

/// One call's result in a batch answer, as its single answer would have been read.
fn call_result(r: BatchResult) -> Result<(), CallError> {
    match StatusCode::from_u16(r.status) {
        Ok(s) if s.is_success() => Ok(()),
        Ok(s) => {
            let text = r.error.and_then(|e| serde_json::to_string(&e).ok()).unwrap_or_default();
            Err(classify(s, text))
        }
        Err(_) => {
            Err(CallError::Permanent(format!("participant answered status {} for a batched call", r.status)))
        }
    }
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

    use std::time::Duration;

    use tcc_core::transport::BranchCall;

    use super::super::{Batching, ClientConfig, HttpTransport, build_client};
    use super::*;
    use crate::lane::STALLED;
    use crate::ndjson;
    use crate::protocol::ErrorBody;
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_streamed_answer_reaches_each_call_as_its_line_comes() {
        // Streams the lines of the calls whose gid starts `ok` at once, in reverse order, then
        // those of `slow` calls once released; none for `lost` calls.
        let release = Arc::new(tokio::sync::Notify::new());
        let released = Arc::clone(&release);
        let app = axum::Router::new().route(
            "/op/batch",
            post(move |Json(req): Json<BatchRequest>| {
                let released = Arc::clone(&released);
                async move {
                    let (lines, rx) = tokio::sync::mpsc::channel(8);
                    tokio::spawn(async move {
                        let line = |i: usize| {
                            let result =
                                BatchResult { status: 200, outcome: Some("confirmed".into()), error: None };
                            let mut line = serde_json::to_vec(&AnswerLine { i, result }).unwrap_or_default();
                            line.push(b'\n');
                            (bytes::Bytes::from(line), true)
                        };
                        for (i, c) in req.calls.iter().enumerate().rev() {
                            if c.gid.starts_with("ok") {
                                let _ = lines.send(line(i)).await;
                            }
                        }
                        released.notified().await;
                        for (i, c) in req.calls.iter().enumerate() {
                            if c.gid.starts_with("slow") {
                                let _ = lines.send(line(i)).await;
                            }
                        }
                    });
                    let body = axum::body::Body::new(ndjson::Lines::new(rx, 0));
                    ([(reqwest::header::CONTENT_TYPE, ndjson::CONTENT_TYPE)], body).into_response()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let carrier = PhaseTwo {
            url: format!("http://{addr}/op/batch").parse().unwrap_or_else(|e| panic!("{e}")),
            client: build_client(&ClientConfig::default()).unwrap_or_else(|e| panic!("{e}")),
            metrics: Arc::default(),
        };
        let gids = ["ok-0", "slow-1", "ok-2", "lost-3"];
        let calls: Vec<BatchCall> = gids
            .iter()
            .map(|g| BatchCall {
                gid: (*g).into(),
                branch: "b".into(),
                deadline: 1,
                decision: Decision::Confirm,
            })
            .collect();
        let (senders, mut receivers): (Vec<_>, Vec<_>) =
            gids.iter().map(|_| tokio::sync::oneshot::channel()).unzip();
        let sending = tokio::spawn(async move {
            let mut replies: Vec<Option<Answer<PhaseTwo>>> = senders.into_iter().map(Some).collect();
            let sent = carrier.send(calls, &mut replies).await;
            (sent, replies.iter().map(Option::is_some).collect::<Vec<bool>>())
        });
        let answered =
            |r: Result<Result<Reply<Result<(), CallError>>, _>, _>| matches!(r, Ok(Ok(Reply::Done(Ok(())))));
        for i in [0, 2] {
            let r = tokio::time::timeout(Duration::from_secs(60), &mut receivers[i]).await;
            assert!(answered(r), "call {i} is answered while the slow one is not");
        }
        assert!(!sending.is_finished(), "the batch is still under way");
        release.notify_one();
        let r = tokio::time::timeout(Duration::from_secs(60), &mut receivers[1]).await;
        assert!(answered(r), "the slow call is answered once its line comes");
        let (sent, left) = sending.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sent, Ok(()));
        // The call the answer ended without: left for the lane to fail as dropped in transit.
        assert_eq!(left, vec![false, false, false, true]);
    }
}
