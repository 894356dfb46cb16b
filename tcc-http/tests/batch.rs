//! `POST /v1/batch` and the remote client's batching: each operation is answered as its own request
//! would be, a refused batch changes nothing, an answer waiting for phase two holds up no other,
//! and a client falls back to single requests where the coordinator has no batch route.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing;
use serde_json::{Value, json};
use support::{Mode, Participant, Tcc, Where};
use tcc_core::{Config, RetryPolicy};
use tcc_http::client::{BeginOptions, ClientError, PlannedBranch, TccClient};
use tcc_http::server::native::StateView;
use tcc_http::server::{ServerConfig, Token};
use tcc_http::transport::{Batching, build_client};

const LONG: Duration = Duration::from_secs(30);

async fn standalone() -> Tcc {
    Tcc::start_with(Where::Standalone, support::fast_core(), ServerConfig::default()).await
}

async fn post(http: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let res = http.post(url).json(&body).send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Sends a batch and reads its whole answer: `(status, body)` of each operation, by index.
async fn batch(http: &reqwest::Client, base: &str, ops: Value) -> Vec<(u16, Value)> {
    let count = ops.as_array().unwrap().len();
    let res = http.post(format!("{base}/v1/batch")).json(&json!({ "ops": ops })).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/x-ndjson");
    let text = res.text().await.unwrap();
    let mut answers: Vec<Option<(u16, Value)>> = vec![None; count];
    for line in text.lines() {
        let line: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let i = usize::try_from(line["i"].as_u64().unwrap()).unwrap();
        assert!(answers[i].is_none(), "operation {i} answered twice");
        answers[i] = Some((u16::try_from(line["status"].as_u64().unwrap()).unwrap(), line["body"].clone()));
    }
    assert!(text.ends_with('\n'));
    answers.into_iter().enumerate().map(|(i, a)| a.unwrap_or_else(|| panic!("{i} not answered"))).collect()
}

async fn everything(http: &reqwest::Client, base: &str) -> Value {
    let res = http.get(format!("{base}/v1/transactions?limit=1000")).send().await.unwrap();
    res.json::<Value>().await.unwrap()["items"].clone()
}

async fn metric(http: &reqwest::Client, base: &str, series: &str) -> u64 {
    let text = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map_or(0, |v| v.parse().unwrap())
}

fn requests(route: &str) -> String {
    format!("tcc_http_request_duration_seconds_count{{method=\"POST\",route=\"{route}\",status=\"2xx\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_each_operation_as_its_own_request_would() {
    let tcc = standalone().await;
    let (base, http) = (tcc.url(), reqwest::Client::new());
    let hotel = Participant::start(Mode::Healthy).await;
    for body in [
        json!({"gid": "b"}),
        json!({"gid": "c", "branches": [{"branch": "room", "target": hotel.target("room"), "payload": "x"}]}),
        json!({"gid": "d"}),
    ] {
        assert_eq!(post(&http, &format!("{base}/v1/transactions"), body).await.0, 201);
    }
    let answers = batch(
        &http,
        &base,
        json!([
            {"begin": {"gid": "a"}},
            {"begin": {"gid": "a"}},
            {"begin": {"gid": "f", "timeout_ms": 90_000_000_000_u64}},
            {"confirm": {"gid": "nope"}},
            {"confirm": {"gid": "b", "wait_ms": 20000.0}},
            {"cancel": {"gid": "c", "wait_ms": 20000}},
            {"confirm": {"gid": "d", "wait_ms": 1}},
            {"begin": {"gid": "e", "branches": [{"branch": "x", "target": "http://169.254.169.254/x"}]}},
        ]),
    )
    .await;
    let codes: Vec<(u16, &str)> =
        answers.iter().map(|(s, b)| (*s, b["code"].as_str().or(b["state"].as_str()).unwrap())).collect();
    // The two begins of `a` ran concurrently: exactly one of them made it.
    let mut a = [codes[0], codes[1]];
    a.sort_unstable();
    assert_eq!(a, [(201, "trying"), (409, "already_exists")], "{answers:?}");
    assert_eq!(
        codes[2..],
        [
            (422, "invalid_input"),
            (404, "not_found"),
            (200, "confirmed"),
            (200, "cancelled"),
            (200, "confirmed"),
            (422, "participant_not_allowed"),
        ],
        "{answers:?}"
    );
    let late = batch(&http, &base, json!([{"cancel": {"gid": "b"}}])).await;
    assert_eq!((late[0].0, &late[0].1["code"]), (409, &json!("illegal_transition")), "{late:?}");
    assert!(answers[2].1["message"].is_string(), "errors have the one error shape");
    assert_eq!(hotel.phases("c"), ["cancel"]);
    // What the refused operations named is as it was, or was never stored.
    let stored = everything(&http, &base).await;
    let states: Vec<(&str, &str)> = stored
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["gid"].as_str().unwrap(), t["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [("a", "trying"), ("b", "confirmed"), ("c", "cancelled"), ("d", "confirmed")]);
    // Each operation is counted under its own request's route, and the batch under its own.
    assert_eq!(metric(&http, &base, &requests("/v1/batch")).await, 2);
    assert_eq!(metric(&http, &base, &requests("/v1/transactions")).await, 3 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_is_refused_whole_and_changes_nothing() {
    let tcc = standalone().await;
    let (base, http) = (tcc.url(), reqwest::Client::new());
    assert_eq!(post(&http, &format!("{base}/v1/transactions"), json!({"gid": "keep"})).await.0, 201);
    let before = everything(&http, &base).await;
    let too_many: Vec<Value> = (0..1025).map(|i| json!({"begin": {"gid": format!("n{i}")}})).collect();
    let cases = [
        (json!("not an object"), 400, "malformed"),
        (json!({"ops": [{"launch": {}}]}), 400, "malformed"),
        (json!({"ops": [{"begin": {"gid": "z"}}], "extra": 1}), 400, "malformed"),
        (
            json!({"ops": [{"begin": {"gid": "z"}}, {"confirm": {"gid": "keep", "wait": 5}}]}),
            400,
            "malformed",
        ),
        (json!({"ops": [{"begin": {"gid": "z"}, "cancel": {"gid": "keep"}}]}), 400, "malformed"),
        // An operation whose single request would be malformed makes the batch malformed.
        (json!({"ops": [{"begin": {"gid": "z"}}, {"begin": {"gid": "bad id!"}}]}), 400, "malformed"),
        (json!({"ops": [{"begin": {"gid": "z", "timeout_ms": 0}}]}), 400, "malformed"),
        (
            json!({"ops": [{"begin": {"gid": "z", "call_timeout_ms": 9_223_372_036_854_775_808_u64}}]}),
            400,
            "malformed",
        ),
        (
            json!({"ops": [{"begin": {"branches": [{"branch": "b c", "target": "http://127.0.0.1:9/x"}]}}]}),
            400,
            "malformed",
        ),
        (
            json!({"ops": [{"begin": {"gid": "z"}}, {"cancel": {"gid": "keep", "wait_ms": 9_223_372_036_854_775_808_u64}}]}),
            400,
            "malformed",
        ),
        (json!({"ops": [{"confirm": {"gid": "keep", "wait_ms": 1.5}}]}), 400, "malformed"),
        (json!({"ops": [{"confirm": {"gid": "has space"}}]}), 400, "malformed"),
        // serde reads a struct from an array of its fields too; the API takes objects only.
        (json!({"ops": [{"begin": [null, null]}]}), 400, "malformed"),
        (json!({"ops": [{"confirm": ["keep", 5]}]}), 400, "malformed"),
        (json!({"ops": [{"begin": {"branches": [["b", "http://127.0.0.1:9/x", ""]]}}]}), 400, "malformed"),
        (json!({"ops": too_many}), 422, "limit_exceeded"),
    ];
    for (body, status, code) in cases {
        let (got, answer) = post(&http, &format!("{base}/v1/batch"), body.clone()).await;
        assert_eq!((got, answer["code"].as_str()), (status, Some(code)), "{body}: {answer}");
    }
    assert_eq!(everything(&http, &base).await, before, "no refused batch changed anything");
    // An empty batch is answered with no lines.
    let res = http.post(format!("{base}/v1/batch")).json(&json!({"ops": []})).send().await.unwrap();
    assert_eq!((res.status().as_u16(), res.text().await.unwrap()), (200, String::new()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_waiting_for_phase_two_holds_up_no_other_answer() {
    // Phase two fails, and the next try is a minute away: a confirm waiting for it waits its whole
    // wait_ms.
    let core = Config {
        retry: RetryPolicy {
            initial_backoff: Duration::from_secs(60),
            max_backoff: Duration::from_secs(60),
            ..support::fast_core().retry
        },
        ..support::fast_core()
    };
    let tcc = Tcc::start_with(Where::Standalone, core, ServerConfig::default()).await;
    let (base, http) = (tcc.url(), reqwest::Client::new());
    let flight = Participant::start(Mode::FailPhaseTwo).await;
    let branches = json!([{"branch": "seat", "target": flight.target("seat")}]);
    let (status, _) =
        post(&http, &format!("{base}/v1/transactions"), json!({"gid": "slow", "branches": branches})).await;
    assert_eq!(status, 201);
    // The confirm waits longer than this test reads for its first line.
    let ops = json!({"ops": [{"confirm": {"gid": "slow", "wait_ms": 60000}}, {"begin": {"gid": "quick"}}]});
    let mut res = http.post(format!("{base}/v1/batch")).json(&ops).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let mut first = Vec::new();
    while !first.contains(&b'\n') {
        let chunk = tokio::time::timeout(LONG, res.chunk()).await.expect("no answer line came").unwrap();
        first.extend_from_slice(&chunk.expect("the answer ended before its first line"));
    }
    let line: Value = serde_json::from_slice(first.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!((line["i"].as_u64(), line["status"].as_u64()), (Some(1), Some(201)), "{line}");
    assert_eq!(line["body"]["gid"], "quick");
    // The confirm is decided and still waiting for its phase two.
    let slow: Value =
        http.get(format!("{base}/v1/transactions/slow")).send().await.unwrap().json().await.unwrap();
    assert_eq!(slow["state"], "confirming");
    drop(res);
    // The server serves on, and what the batch did stays done.
    let stored = everything(&http, &base).await;
    let gids: Vec<&str> = stored.as_array().unwrap().iter().map(|t| t["gid"].as_str().unwrap()).collect();
    assert_eq!(gids, ["quick", "slow"]);
}

/// `n` transactions at once through `client`, each with one branch at `target`: the even ones
/// confirmed, the odd ones cancelled, each waiting for its phase two.
async fn crowd(client: &TccClient, target: &str, n: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (client, target) = (client.clone(), target.to_owned());
        tasks.spawn(async move {
            let branches = vec![PlannedBranch { branch: "seat".into(), target, request: b"1A".to_vec() }];
            let tx =
                client.begin_with(LONG, BeginOptions { branches, ..BeginOptions::default() }).await.unwrap();
            tx.try_planned("seat").await.unwrap();
            let (done, expected) = if i % 2 == 0 {
                (tx.confirm_and_wait(LONG).await.unwrap(), StateView::Confirmed)
            } else {
                (tx.cancel_and_wait(LONG).await.unwrap(), StateView::Cancelled)
            };
            assert_eq!(done.state, expected, "{}", tx.gid());
            // A repeated decision is answered as before; the opposite one is refused.
            let again = if i % 2 == 0 { tx.confirm().await } else { tx.cancel().await };
            assert_eq!(again.unwrap().state, expected);
            let opposite = if i % 2 == 0 { tx.cancel().await } else { tx.confirm().await };
            assert!(matches!(opposite, Err(ClientError::Coordinator { status: 409, .. })), "{opposite:?}");
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_client_calls_share_batches_and_each_gets_its_own_answer() {
    let tcc = standalone().await;
    let (base, http) = (tcc.url(), reqwest::Client::new());
    let flight = Participant::start(Mode::Healthy).await;
    crowd(&tcc.client, &flight.target("seat"), 40).await;
    let begins = metric(&http, &base, &requests("/v1/transactions")).await;
    let confirms = metric(&http, &base, &requests("/v1/transactions/{gid}/confirm")).await;
    let cancels = metric(&http, &base, &requests("/v1/transactions/{gid}/cancel")).await;
    assert_eq!((begins, confirms, cancels), (40, 40, 40), "each operation counted once, under its route");
    let batches = metric(&http, &base, &requests("/v1/batch")).await;
    assert!(batches > 0 && batches < 120, "{batches} batches for 160 operations");
    for gid in ["a-gid-nobody-knows"] {
        let tx = tcc.client.get(&gid.parse().unwrap()).await;
        assert!(matches!(tx, Err(ClientError::Coordinator { status: 404, .. })), "{tx:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batching_off_sends_every_call_alone() {
    let tcc = standalone().await;
    let (base, http) = (tcc.url(), reqwest::Client::new());
    let flight = Participant::start(Mode::Healthy).await;
    let off = Batching { max_calls: 1, in_flight: 1 };
    let client =
        TccClient::remote_batching(&base, None, build_client(&Default::default()).unwrap(), off).unwrap();
    crowd(&client, &flight.target("seat"), 10).await;
    assert_eq!(metric(&http, &base, &requests("/v1/batch")).await, 0);
    assert_eq!(metric(&http, &base, &requests("/v1/transactions")).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_without_the_batch_route_is_called_one_call_at_a_time() {
    let tcc = standalone().await;
    let flight = Participant::start(Mode::Healthy).await;
    // In front of the coordinator: what an older version answers to a batch, the rest passed on.
    let refused = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&refused);
    let app = Router::new()
        .route(
            "/v1/batch",
            routing::post(move || async move {
                seen.fetch_add(1, Ordering::SeqCst);
                (
                    axum::http::StatusCode::NOT_FOUND,
                    axum::Json(json!({"code": "unknown_route", "message": "no"})),
                )
            }),
        )
        .fallback_service(tcc_http::server::router(Arc::clone(tcc.server.as_ref().unwrap().state())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = TccClient::remote(&front, None).unwrap();
    crowd(&client, &flight.target("seat"), 20).await;
    // One batch refused per lane (two if the first stalled on a busy machine), then calls went alone.
    let after_first = refused.load(Ordering::SeqCst);
    assert!((1..=4).contains(&after_first), "{after_first} batches refused");
    crowd(&client, &flight.target("seat"), 10).await;
    assert_eq!(refused.load(Ordering::SeqCst), after_first, "no batch tried again for a while");
    let http = reqwest::Client::new();
    assert_eq!(metric(&http, &tcc.url(), &requests("/v1/transactions")).await, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answer_that_is_not_lines_fails_each_call_and_a_wrong_token_fails_each_call() {
    // A coordinator answering its batches with garbage.
    let app = Router::new().route("/v1/batch", routing::post(|| async { "this is not an answer line\n" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let garbage = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = TccClient::remote(&garbage, None).unwrap();
    let tx = client.begin(LONG).await;
    assert!(matches!(&tx, Err(ClientError::Unreachable(m)) if m.contains("unreadable")), "{tx:?}");

    // A coordinator with a token, called with the wrong one: each call gets the 401.
    let server = ServerConfig { token: Some(Token::new("right-token").unwrap()), ..ServerConfig::default() };
    let tcc = Tcc::start_with(Where::Standalone, support::fast_core(), server).await;
    let wrong = TccClient::remote(&tcc.url(), Some(Token::new("wrong-token").unwrap())).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let wrong = wrong.clone();
        tasks.spawn(async move { wrong.begin(LONG).await.map(|_| ()) });
    }
    while let Some(joined) = tasks.join_next().await {
        let r = joined.unwrap();
        assert!(
            matches!(&r, Err(ClientError::Coordinator { status: 401, code, .. }) if code == "unauthorized"),
            "{r:?}"
        );
    }
    let http = reqwest::Client::new();
    assert_eq!(everything(&http, &tcc.url()).await, json!([]), "nothing stored");
    let tx = tcc.client.begin(LONG).await.unwrap();
    assert_eq!(tcc.client.get(tx.gid()).await.unwrap().state, StateView::Trying);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_coordinator_would_find_malformed_goes_alone_and_batching_stays_on() {
    let tcc = standalone().await;
    let (base, http) = (tcc.url(), reqwest::Client::new());
    let flight = Participant::start(Mode::Healthy).await;
    // A zero timeout would get a whole batch refused (400): the client sends it alone, and it
    // gets the begin's own answer.
    let zero = tcc.client.begin(Duration::ZERO).await;
    assert!(
        matches!(&zero, Err(ClientError::Coordinator { status: 422, code, .. }) if code == "invalid_input"),
        "{zero:?}"
    );
    assert_eq!(metric(&http, &base, &requests("/v1/batch")).await, 0);
    crowd(&tcc.client, &flight.target("seat"), 10).await;
    assert!(metric(&http, &base, &requests("/v1/batch")).await > 0, "batching is still on");
}
