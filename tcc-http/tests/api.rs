//! The coordinator's HTTP API under bad input and without credentials: every refusal has the
//! documented status and stable code, changes nothing, and the server keeps serving.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Mode, Participant, Tcc, Where};
use tcc_core::{Clock, ManualClock, SystemClock};
use tcc_http::server::{ServerConfig, Token};

const TOKEN: &str = "s3cret-Token-for-tests";

async fn standalone(token: bool) -> (Tcc, reqwest::Client) {
    let server = ServerConfig { token: token.then(|| Token::new(TOKEN).unwrap()), ..ServerConfig::default() };
    (Tcc::start_with(Where::Standalone, support::fast_core(), server).await, reqwest::Client::new())
}

async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let res = req.send().await.unwrap();
    let status = res.status();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Status and error code of a refusal; asserts the body has the one error shape.
async fn refusal(req: reqwest::RequestBuilder) -> (u16, String) {
    let (status, body) = send(req).await;
    let code = body["code"].as_str().unwrap_or_else(|| panic!("no error body: {status} {body}")).to_owned();
    assert!(body["message"].is_string(), "{body}");
    (status.as_u16(), code)
}

/// `POST`s the head of a request declaring `body`'s length to `base` + `path` over a raw
/// connection, with only the first byte of the body, as a client still sending would (the server
/// must answer from the declared length); the answer's status and JSON body.
async fn raw_post(base: &str, path: &str, body: &[u8]) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..1]).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())))
}

async fn listing(http: &reqwest::Client, base: &str) -> Value {
    let (status, body) = send(http.get(format!("{base}/v1/transactions"))).await;
    assert_eq!(status, 200);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_calls_need_the_token_reads_do_not() {
    let (tcc, http) = standalone(true).await;
    let base = tcc.url();
    let gid = "tx-1";
    let mutations = [
        http.post(format!("{base}/v1/transactions")).json(&json!({"gid": gid})),
        http.post(format!("{base}/v1/transactions/{gid}/branches"))
            .json(&json!({"branch": "b", "target": "http://127.0.0.1:1/x"})),
        http.post(format!("{base}/v1/transactions/{gid}/confirm")),
        http.post(format!("{base}/v1/transactions/{gid}/cancel")),
        http.post(format!("{base}/v1/transactions/{gid}/retry")),
        http.post(format!("{base}/v1/transactions/{gid}/force")).json(&json!({"outcome": "cancel"})),
        http.post(format!("{base}/v1/batch")).json(&json!({"ops": [{"begin": {"gid": gid}}]})),
        http.post(format!("{base}/api/dtmsvr/prepare")).json(&json!({"gid": gid, "trans_type": "tcc"})),
        http.post(format!("{base}/api/dtmsvr/registerBranch")).json(&json!({"gid": gid})),
        http.post(format!("{base}/api/dtmsvr/submit")).json(&json!({"gid": gid, "trans_type": "tcc"})),
        http.post(format!("{base}/api/dtmsvr/abort")).json(&json!({"gid": gid, "trans_type": "tcc"})),
    ];
    for req in mutations {
        for auth in [None, Some("wrong"), Some(""), Some("s3cret-Token-for-test")] {
            let mut r = req.try_clone().unwrap();
            if let Some(t) = auth {
                r = r.bearer_auth(t);
            }
            assert_eq!(refusal(r).await, (401, "unauthorized".into()), "{req:?} {auth:?}");
        }
        // Basic auth or a bare token is no bearer token either.
        let r = req.try_clone().unwrap().header("authorization", TOKEN);
        assert_eq!(refusal(r).await.0, 401);
    }
    assert_eq!(listing(&http, &base).await["items"], json!([]), "nothing was stored");

    let (status, body) =
        send(http.post(format!("{base}/v1/transactions")).bearer_auth(TOKEN).json(&json!({"gid": gid})))
            .await;
    assert_eq!(status, 201, "{body}");
    for read in
        ["/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/transactions", "/v1/transactions/tx-1"]
    {
        assert_eq!(http.get(format!("{base}{read}")).send().await.unwrap().status(), 200, "{read}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let (tcc, http) = standalone(false).await;
    let base = tcc.url();
    let flight = Participant::start(Mode::Healthy).await;
    let begin = |body: &str| {
        http.post(format!("{base}/v1/transactions"))
            .header("content-type", "application/json")
            .body(body.to_owned())
    };
    let (status, _) = send(begin(r#"{"gid":"keep"}"#)).await;
    assert_eq!(status, 201);
    let (status, _) = send(http.post(format!("{base}/v1/transactions/keep/branches")).json(&json!({
        "branch": "flight", "target": flight.target("seat"), "payload": "1A"
    })))
    .await;
    assert_eq!(status, 200);
    let before = listing(&http, &base).await;

    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (begin("{not json"), 400, "malformed"),
        (begin(""), 400, "malformed"),
        (begin(r#"{"timeout_ms":"soon"}"#), 400, "malformed"),
        (begin(r#"{"timeout_ms":-5}"#), 400, "malformed"),
        (begin(r#"{"gid":42}"#), 400, "malformed"),
        (begin(r#"{"surprise":true}"#), 400, "malformed"),
        (begin(r#"{"gid":"has space"}"#), 400, "malformed"),
        (begin(r#"{"gid":"keep"}"#), 409, "already_exists"),
        (begin(r#"{"timeout_ms":0}"#), 422, "invalid_input"),
        (begin(r#"{"timeout_ms":99999999999999}"#), 422, "invalid_input"),
        (begin(r#"{"retry_interval_ms":0}"#), 422, "invalid_input"),
        (http.get(format!("{base}/v1/transactions/nope")), 404, "not_found"),
        (http.get(format!("{base}/v1/transactions/bad%20id")), 400, "malformed"),
        (http.get(format!("{base}/v1/transactions?limit=0")), 400, "malformed"),
        (http.get(format!("{base}/v1/transactions?state=bogus")), 400, "malformed"),
        (http.get(format!("{base}/v1/transactions?order=sideways")), 400, "malformed"),
        (http.get(format!("{base}/v1/transactions?kind=xa")), 400, "malformed"),
        (http.post(format!("{base}/v1/transactions/nope/confirm")), 404, "not_found"),
        (http.post(format!("{base}/v1/transactions/keep/confirm?wait_ms=x")), 400, "malformed"),
        (
            http.post(format!("{base}/v1/transactions/nope/branches"))
                .json(&json!({"branch":"b","target":flight.target("x")})),
            404,
            "not_found",
        ),
        (
            http.post(format!("{base}/v1/transactions/keep/branches")).json(&json!({"branch":"b"})),
            400,
            "malformed",
        ),
        (
            http.post(format!("{base}/v1/transactions/keep/branches"))
                .json(&json!({"branch":"b c","target":flight.target("x")})),
            400,
            "malformed",
        ),
        (
            http.post(format!("{base}/v1/transactions/keep/branches"))
                .json(&json!({"branch":"b","target":"http://10.1.2.3/x"})),
            422,
            "participant_not_allowed",
        ),
        (
            http.post(format!("{base}/v1/transactions/keep/branches"))
                .json(&json!({"branch":"b","target":"not a url"})),
            422,
            "participant_not_allowed",
        ),
        (
            http.post(format!("{base}/v1/transactions/keep/branches"))
                .json(&json!({"branch":"flight","target":flight.target("other")})),
            422,
            "invalid_input",
        ),
        (http.post(format!("{base}/v1/transactions/keep/retry")), 409, "illegal_transition"),
        (
            http.post(format!("{base}/v1/transactions/keep/force")).json(&json!({"outcome":"maybe"})),
            400,
            "malformed",
        ),
        (
            http.post(format!("{base}/v1/transactions/keep/force")).json(&json!({"outcome":"confirm"})),
            409,
            "illegal_transition",
        ),
    ];
    for (req, status, code) in cases {
        let dbg = format!("{req:?}");
        assert_eq!(refusal(req).await, (status, code.to_owned()), "{}", &dbg[..dbg.len().min(300)]);
    }
    // A body over 1 MiB is refused from its Content-Length, before it is read (sent over a raw
    // connection: a client writing the rest after the answer could fail on the closed connection).
    let big = format!(r#"{{"gid":"x","pad":"{}"}}"#, "a".repeat(1 << 20));
    let (status, body) = raw_post(&base, "/v1/transactions", big.as_bytes()).await;
    assert_eq!((status, body["code"].as_str()), (413, Some("too_large")), "{body}");
    assert_eq!(listing(&http, &base).await, before, "no refused request changed anything");
    assert!(flight.calls().is_empty(), "no participant was called");

    // Illegal transitions: confirm after cancel, cancel after confirm, register after a decision.
    let (status, body) = send(http.post(format!("{base}/v1/transactions/keep/cancel?wait_ms=10000"))).await;
    assert_eq!((status.as_u16(), &body["state"]), (200, &json!("cancelled")));
    let decided = listing(&http, &base).await;
    for (req, code) in [
        (http.post(format!("{base}/v1/transactions/keep/confirm")), "illegal_transition"),
        (
            http.post(format!("{base}/v1/transactions/keep/branches"))
                .json(&json!({"branch":"late","target":flight.target("x")})),
            "illegal_transition",
        ),
    ] {
        assert_eq!(refusal(req).await, (409, code.to_owned()));
    }
    // Asking for the same decision again is answered as before.
    assert_eq!(send(http.post(format!("{base}/v1/transactions/keep/cancel"))).await.0, 200);
    let after = listing(&http, &base).await;
    assert_eq!(after["items"][0]["branches"], decided["items"][0]["branches"]);
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_after_the_deadline_is_refused_with_422() {
    // The engine's clock moves only when the test moves it, and its scheduler sleeps an hour of it:
    // the deadline passes and no sweep can run before the confirm.
    let clock = ManualClock::new(SystemClock.now());
    let core = tcc_core::Config { poll_interval: Duration::from_secs(3600), ..support::fast_core() };
    let tcc = Tcc::start_on_clock(Where::Standalone, core, ServerConfig::default(), clock.clone()).await;
    let http = reqwest::Client::new();
    let base = tcc.url();
    let (status, _) =
        send(http.post(format!("{base}/v1/transactions")).json(&json!({"gid":"late","timeout_ms":50}))).await;
    assert_eq!(status, 201);
    clock.advance(Duration::from_millis(50));
    assert_eq!(
        refusal(http.post(format!("{base}/v1/transactions/late/confirm"))).await,
        (422, "deadline_passed".into())
    );
    let (_, tx) = send(http.get(format!("{base}/v1/transactions/late"))).await;
    assert_eq!(tx["state"], "trying", "unchanged until cancelled");
    assert_eq!(send(http.post(format!("{base}/v1/transactions/late/cancel"))).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_and_filters() {
    let (tcc, http) = standalone(false).await;
    let base = tcc.url();
    for i in 0..5 {
        let (status, _) =
            send(http.post(format!("{base}/v1/transactions")).json(&json!({"gid": format!("t{i}")}))).await;
        assert_eq!(status, 201);
    }
    for i in [1, 3] {
        assert_eq!(send(http.post(format!("{base}/v1/transactions/t{i}/cancel?wait_ms=5000"))).await.0, 200);
    }
    let (_, page1) = send(http.get(format!("{base}/v1/transactions?limit=2"))).await;
    let ids = |v: &Value| {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["gid"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&page1), ["t0", "t1"]);
    let (_, page2) =
        send(http.get(format!("{base}/v1/transactions?limit=2&after={}", page1["next"].as_str().unwrap())))
            .await;
    assert_eq!(ids(&page2), ["t2", "t3"]);
    let (_, cancelled) = send(http.get(format!("{base}/v1/transactions?state=cancelled"))).await;
    assert_eq!(ids(&cancelled), ["t1", "t3"]);
    assert!(cancelled["next"].is_null());
    // Newest first (descending ids), paged the same way, filters kept.
    let (_, newest) = send(http.get(format!("{base}/v1/transactions?order=newest&limit=2&kind=tcc"))).await;
    assert_eq!(ids(&newest), ["t4", "t3"]);
    let next = newest["next"].as_str().unwrap();
    let (_, older) =
        send(http.get(format!("{base}/v1/transactions?order=newest&limit=2&after={next}"))).await;
    assert_eq!(ids(&older), ["t2", "t1"]);
    let (_, trying) = send(http.get(format!("{base}/v1/transactions?order=newest&state=trying"))).await;
    assert_eq!(ids(&trying), ["t4", "t2", "t0"]);
    // A transaction carries its kind, options and history.
    let t1 = &cancelled["items"][0];
    assert_eq!(t1["kind"], "tcc");
    assert_eq!(t1["options"], json!({"retry_interval_ms": null, "call_timeout_ms": null}));
    let what: Vec<&str> =
        t1["history"].as_array().unwrap().iter().map(|h| h["what"].as_str().unwrap()).collect();
    assert_eq!(what, ["begun", "decided"]);
    assert_eq!(t1["history"][1]["decision"], "cancel");
    assert_eq!(t1["history"][1]["state"], "cancelled", "no branch: cancelled at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_counts_per_state_and_samples_the_recent_past() {
    let (tcc, http) = standalone(false).await;
    let base = tcc.url();
    for i in 0..3 {
        let (status, _) =
            send(http.post(format!("{base}/v1/transactions")).json(&json!({"gid": format!("o{i}")}))).await;
        assert_eq!(status, 201);
    }
    let (status, first) = send(http.get(format!("{base}/v1/overview"))).await;
    assert_eq!(status, 200);
    assert_eq!(first["counts"]["trying"], 3);
    assert_eq!(first["counts"]["flagged"], 0);
    assert_eq!(first["slot_ms"], 5000);
    assert_eq!(first["recent"], json!([]), "the first sample only starts the first slot");
    for i in [0, 1] {
        assert_eq!(send(http.post(format!("{base}/v1/transactions/o{i}/confirm?wait_ms=5000"))).await.0, 200);
    }
    assert_eq!(send(http.post(format!("{base}/v1/transactions/o2/cancel?wait_ms=5000"))).await.0, 200);
    let (_, then) = send(http.get(format!("{base}/v1/overview"))).await;
    assert_eq!((then["counts"]["trying"].as_u64(), then["counts"]["confirmed"].as_u64()), (Some(0), Some(2)));
    let recent = then["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 1, "{then}");
    assert_eq!((recent[0]["confirmed"].as_u64(), recent[0]["cancelled"].as_u64()), (Some(2), Some(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_openapi_and_probes() {
    let (tcc, http) = standalone(false).await;
    let base = tcc.url();
    let flight = Participant::start(Mode::Healthy).await;
    let tx = tcc.client.begin(Duration::from_secs(20)).await.unwrap();
    tx.try_branch("flight", &flight.target("seat"), b"1A".to_vec()).await.unwrap();
    tx.confirm().await.unwrap();
    tcc.client.wait(tx.gid(), Duration::from_secs(20)).await.unwrap();

    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    for needle in [
        "tcc_transactions_begun_total 1",
        "tcc_transactions_finished_total{outcome=\"confirmed\"} 1",
        "tcc_phase_two_calls_total{result=\"ok\"} 1",
        "tcc_flagged_transactions 0",
        "tcc_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/transactions\",status=\"2xx\"} 1",
        "tcc_phase_two_call_duration_seconds_count{op=\"confirm\",outcome=\"ok\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == needle), "missing {needle:?} in\n{metrics}");
    }
    let (status, doc) = send(http.get(format!("{base}/openapi.json"))).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with('3'));
    for path in [
        "/v1/transactions",
        "/v1/transactions/{gid}",
        "/v1/transactions/{gid}/branches",
        "/v1/transactions/{gid}/force",
        "/v1/batch",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    assert!(doc["components"]["schemas"]["TransactionView"].is_object());
    assert_eq!(http.get(format!("{base}/readyz")).send().await.unwrap().text().await.unwrap(), "ready");
}
