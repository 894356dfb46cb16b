//! The client's batches of tries (`POST {target}/tries`), against participants that count what they
//! get: tries of concurrent transactions share requests and each gets its own answer, read as its
//! single try's would be; tries go alone to a participant without the route, when their request is
//! not short text, and when batching is off; a batch failing whole fails each try as alone.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use serde_json::json;
use tcc_http::client::{ClientError, TccClient};
use tcc_http::protocol::{AnswerLine, ErrorBody, TryBatch, TryBatchAnswer, TryResult};
use tcc_http::server::native::StateView;
use tcc_http::target::AllowList;
use tcc_http::transport::Batching;

const LONG: Duration = Duration::from_secs(30);

/// What a counting participant got.
#[derive(Default)]
struct Seen {
    /// `POST /op/tries` requests answered, and the tries they carried.
    batches: AtomicUsize,
    batched: AtomicUsize,
    /// `POST /op/try` requests.
    singles: AtomicUsize,
    /// Batches of tries refused: answered 404, or with something that is not a batch answer.
    not_found: AtomicUsize,
    /// While set, a batch of tries is answered 503 as a whole.
    failing: AtomicBool,
}

/// The participant's answer to one try: "held {gid}", or for the request "refuse" a refusal.
fn answer(gid: &str, request: &[u8]) -> TryResult {
    if request == b"refuse" {
        let error = ErrorBody {
            code: "refused".into(),
            message: "sold out".into(),
            detail: Some(json!({"left": 0})),
        };
        TryResult { status: 409, body: None, bytes: None, error: Some(error) }
    } else {
        TryResult::done(format!("held {gid}").into_bytes())
    }
}

/// What a participant does with a batch of tries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Batches {
    /// Answers each try (after a short pause, so that tries crowd).
    Served,
    /// The same, streamed (`application/x-ndjson`), the lines in reverse order.
    Streamed,
    /// Streamed, with a line for a try the batch does not have.
    BadLine,
    /// 404, as a participant that serves none.
    NotServed,
    /// 200 with a body that is not a batch answer.
    Garbage,
}

/// A participant operation at `{target}` that answers tries alone and, as `batches` says, in
/// batches. Confirm and cancel answer 200.
async fn participant(batches: Batches) -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let (s1, s2) = (Arc::clone(&seen), Arc::clone(&seen));
    let app = Router::new()
        .route(
            "/op/try",
            post(move |headers: HeaderMap, body: axum::body::Bytes| async move {
                s1.singles.fetch_add(1, Ordering::SeqCst);
                let gid = headers["tcc-gid"].to_str().unwrap().to_owned();
                let r = answer(&gid, &body);
                match r.error {
                    Some(e) => (StatusCode::CONFLICT, axum::Json(e)).into_response(),
                    None => (StatusCode::OK, r.result()).into_response(),
                }
            }),
        )
        .route("/op/confirm", post(|| async { StatusCode::OK }))
        .route("/op/cancel", post(|| async { StatusCode::OK }))
        .route(
            "/op/tries",
            post(move |headers: HeaderMap, axum::Json(batch): axum::Json<TryBatch>| async move {
                match batches {
                    Batches::Served => {}
                    Batches::Streamed => {
                        assert!(headers["accept"].to_str().unwrap().contains("application/x-ndjson"));
                    }
                    Batches::BadLine => {
                        s2.not_found.fetch_add(1, Ordering::SeqCst);
                        let line = format!("{{\"i\":{},\"status\":200,\"body\":\"x\"}}\n", batch.tries.len());
                        return ([("content-type", "application/x-ndjson")], line).into_response();
                    }
                    Batches::NotServed => {
                        s2.not_found.fetch_add(1, Ordering::SeqCst);
                        return StatusCode::NOT_FOUND.into_response();
                    }
                    Batches::Garbage => {
                        s2.not_found.fetch_add(1, Ordering::SeqCst);
                        return (StatusCode::OK, "not a batch answer").into_response();
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                if s2.failing.load(Ordering::SeqCst) {
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
                s2.batches.fetch_add(1, Ordering::SeqCst);
                s2.batched.fetch_add(batch.tries.len(), Ordering::SeqCst);
                let results: Vec<TryResult> =
                    batch.tries.iter().map(|t| answer(&t.gid, t.request.as_bytes())).collect();
                if batches == Batches::Streamed {
                    let mut lines = String::new();
                    for (i, result) in results.into_iter().enumerate().rev() {
                        lines.push_str(&serde_json::to_string(&AnswerLine { i, result }).unwrap());
                        lines.push('\n');
                    }
                    return ([("content-type", "application/x-ndjson")], lines).into_response();
                }
                axum::Json(TryBatchAnswer { results }).into_response()
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/op"), seen)
}

async fn embedded(dir: &tempfile::TempDir) -> TccClient {
    TccClient::open_embedded(dir.path(), support::fast_core(), AllowList::new(&[]).unwrap()).await.unwrap()
}

/// Runs `n` transactions at once, each trying one branch at `target` with `request(i)` and then
/// confirming (cancelling when the try failed): each one's gid and try result.
async fn run_many(
    client: &TccClient,
    target: &str,
    n: usize,
    request: impl Fn(usize) -> Vec<u8>,
) -> Vec<(String, Result<bytes::Bytes, ClientError>)> {
    let runs = (0..n).map(|i| {
        let (client, target, request) = (client.clone(), target.to_owned(), request(i));
        async move {
            let tx = client.begin(LONG).await.unwrap();
            let tried = tx.try_branch("b", &target, request).await;
            let done =
                if tried.is_ok() { tx.confirm_and_wait(LONG).await } else { tx.cancel_and_wait(LONG).await };
            let want = if tried.is_ok() { StateView::Confirmed } else { StateView::Cancelled };
            assert_eq!(done.unwrap().state, want);
            (tx.gid().to_string(), tried)
        }
    });
    tcc_core::join::join_all(runs).await
}

fn refused(r: &Result<bytes::Bytes, ClientError>) -> (String, String, String, Option<serde_json::Value>) {
    match r {
        Err(ClientError::Refused { branch, code, message, detail }) => {
            (branch.clone(), code.clone(), message.clone(), detail.clone())
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tries_of_concurrent_transactions_share_requests_and_each_gets_its_own_answer() {
    for kind in [Batches::Served, Batches::Streamed] {
        shared_requests(kind).await;
    }
}

/// Against a participant answering batches of tries as `kind` says (whole or streamed): tries of
/// concurrent transactions share requests, and each gets its own answer.
async fn shared_requests(kind: Batches) {
    let (target, seen) = participant(kind).await;
    let dir = tempfile::tempdir().unwrap();
    let client = embedded(&dir).await;
    let request = |i: usize| if i.is_multiple_of(5) { b"refuse".to_vec() } else { b"seat".to_vec() };
    let results = run_many(&client, &target, 50, request).await;
    for (i, (gid, r)) in results.iter().enumerate() {
        if i.is_multiple_of(5) {
            assert_eq!(
                refused(r),
                ("b".into(), "refused".into(), "sold out".into(), Some(json!({"left": 0})))
            );
        } else {
            assert_eq!(r.as_ref().unwrap(), format!("held {gid}").as_bytes(), "each try gets its own answer");
        }
    }
    assert_eq!(seen.batched.load(Ordering::SeqCst), 50);
    assert_eq!(seen.singles.load(Ordering::SeqCst), 0);
    let batches = seen.batches.load(Ordering::SeqCst);
    assert!(batches < 25, "50 tries in {batches} requests");
    // A refusal reads the same alone.
    let alone = client.with_try_batching(Batching { max_calls: 1, ..Batching::default() });
    let single = run_many(&alone, &target, 1, |_| b"refuse".to_vec()).await;
    assert_eq!(refused(&single[0].1), refused(&results[0].1));
    assert_eq!(seen.singles.load(Ordering::SeqCst), 1);
    assert_eq!(seen.batches.load(Ordering::SeqCst), batches, "batching off: no batch");
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tries_to_an_operation_without_batches_of_tries_go_alone() {
    for kind in [Batches::NotServed, Batches::Garbage, Batches::BadLine] {
        alone_after_a_refused_batch(kind).await;
    }
}

/// Against a participant answering batches of tries as `kind` says: every try goes alone and gets
/// its answer (a try the refused batch carried may have run; alone, it is a duplicate).
async fn alone_after_a_refused_batch(kind: Batches) {
    let (target, seen) = participant(kind).await;
    let dir = tempfile::tempdir().unwrap();
    let client = embedded(&dir).await;
    let results = run_many(&client, &target, 10, |_| b"seat".to_vec()).await;
    for (gid, r) in &results {
        assert_eq!(r.as_ref().unwrap(), format!("held {gid}").as_bytes());
    }
    assert_eq!(seen.singles.load(Ordering::SeqCst), 10);
    // The batches under way when the first 404 came (two, unless one stalled); then every try goes
    // alone at once.
    let refused = seen.not_found.load(Ordering::SeqCst);
    assert!((1..10).contains(&refused), "{refused} batches refused");
    run_many(&client, &target, 3, |_| b"seat".to_vec()).await;
    assert_eq!(seen.singles.load(Ordering::SeqCst), 13);
    assert_eq!(seen.not_found.load(Ordering::SeqCst), refused, "no batch tried again meanwhile");
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_whose_request_is_not_short_text_goes_alone() {
    let (target, seen) = participant(Batches::Served).await;
    let dir = tempfile::tempdir().unwrap();
    let client = embedded(&dir).await;
    let results =
        run_many(&client, &target, 2, |i| if i == 0 { vec![0xff, 0xfe] } else { vec![b'a'; 2048] }).await;
    for (gid, r) in &results {
        assert_eq!(r.as_ref().unwrap(), format!("held {gid}").as_bytes());
    }
    assert_eq!(seen.singles.load(Ordering::SeqCst), 2);
    assert_eq!(seen.batches.load(Ordering::SeqCst), 0);
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_tries_failing_whole_fails_each_try_and_batching_stays_on() {
    let (target, seen) = participant(Batches::Served).await;
    let dir = tempfile::tempdir().unwrap();
    let client = embedded(&dir).await;
    seen.failing.store(true, Ordering::SeqCst);
    let results = run_many(&client, &target, 4, |_| b"seat".to_vec()).await;
    for (_, r) in &results {
        match r {
            Err(ClientError::TryFailed { branch, message }) => {
                assert_eq!(branch, "b");
                assert!(message.contains("503"), "{message}");
            }
            other => panic!("expected a failed try, got {other:?}"),
        }
    }
    assert_eq!(seen.singles.load(Ordering::SeqCst), 0, "a transient failure is not a reason to go alone");
    seen.failing.store(false, Ordering::SeqCst);
    let results = run_many(&client, &target, 4, |_| b"seat".to_vec()).await;
    assert!(results.iter().all(|(_, r)| r.is_ok()));
    assert_eq!(seen.batched.load(Ordering::SeqCst), 4);
    assert_eq!(seen.singles.load(Ordering::SeqCst), 0);
    client.shutdown().await;
}
