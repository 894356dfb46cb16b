//! The coordinator's native API fuzzed from its own OpenAPI document (`/openapi.json`) by
//! schemathesis, the PyPI property-based API tester: no 5xx, no crash, every answer (status, content
//! type, body) as the document says, once with the bearer token and once without it (every mutating
//! call then must be a documented 401 and change nothing). `TCC_PYTHON` picks the interpreter (as for
//! the DTM test); when it cannot import schemathesis the fuzz tests are skipped, unless
//! `TCC_REQUIRE_SCHEMATHESIS=1`, which CI sets.
//!
//! The other tests here pin answers to bad input that `docs/bad-input.md` lists and no other suite
//! checked.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use serde_json::{Value, json};
use support::{Mode, Participant, fast_core};
use tcc_core::{Clock, Config, ManualClock, RetryPolicy, SystemClock};
use tcc_http::server::{Launch, ServerConfig, Token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "fuzz-token-0123456789";

/// Longest one schemathesis run may take before it is killed and the test fails.
const RUN_LIMIT: Duration = Duration::from_secs(300);

struct Coordinator {
    running: support::Server,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Coordinator {
    /// A coordinator with the token whose phase two gives up after two failed rounds, so that a
    /// transaction is flagged quickly.
    async fn start() -> Coordinator {
        Coordinator::start_with(Config {
            retry: RetryPolicy { max_attempts: 2, ..fast_core().retry },
            ..fast_core()
        })
        .await
    }

    async fn start_with(core: Config) -> Coordinator {
        let dir = tempfile::tempdir().unwrap();
        let running = tcc_http::server::start(Launch {
            listen: "127.0.0.1:0".into(),
            store: support::test_store(dir.path()).await,
            core,
            server: ServerConfig { token: Some(Token::new(TOKEN).unwrap()), ..ServerConfig::default() },
            client: Default::default(),
        })
        .await
        .unwrap();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Coordinator { running: support::Server::Started(running), http, _dir: dir }
    }

    /// The same coordinator with its engine on `clock`, which only the test moves.
    async fn start_on_clock(core: Config, clock: ManualClock) -> Coordinator {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerConfig { token: Some(Token::new(TOKEN).unwrap()), ..ServerConfig::default() };
        let running =
            support::Server::on_clock(support::test_store(dir.path()).await, core, server, clock).await;
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Coordinator { running, http, _dir: dir }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.running.url())
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.send(
            self.http
                .post(self.url(path))
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(body.to_owned()),
        )
        .await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(self.url(path))).await
    }

    /// Every transaction, every page: what "the stored state" is here.
    async fn everything(&self) -> Vec<Value> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let query = after.as_ref().map(|a| format!("&after={a}")).unwrap_or_default();
            let (status, page) = self.get(&format!("/v1/transactions?limit=1000{query}")).await;
            assert_eq!(status, 200, "{page}");
            all.extend(page["items"].as_array().unwrap().iter().cloned());
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => return all,
            }
        }
    }

    /// A transaction `gid` flagged for an operator: its one branch's participant fails confirm.
    async fn flagged(&self, gid: &str, participant: &Participant) {
        let (status, body) = self.post("/v1/transactions", &json!({ "gid": gid }).to_string()).await;
        assert_eq!(status, 201, "{body}");
        let branch = json!({ "branch": "b1", "target": participant.target("op") }).to_string();
        let (status, body) = self.post(&format!("/v1/transactions/{gid}/branches"), &branch).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = self.post(&format!("/v1/transactions/{gid}/confirm?wait_ms=30000"), "").await;
        assert_eq!((status, &body["state"]), (200, &json!("flagged")), "{body}");
    }

    async fn assert_serving(&self) {
        let (status, body) = self.get("/healthz").await;
        assert_eq!(status, 200, "the coordinator stopped serving: {body}");
    }

    async fn stop(self) {
        self.running.stop().await.unwrap();
    }
}

/// The interpreter that can run schemathesis, or `None` (the test is skipped; see
/// [`support::python_that_can`]).
async fn schemathesis_python() -> Option<String> {
    support::python_that_can(
        "import schemathesis.cli; print(schemathesis.__version__)",
        "schemathesis==4.32.5",
        "TCC_REQUIRE_SCHEMATHESIS",
    )
    .await
}

/// Runs schemathesis against `base`'s `/openapi.json`, with `Authorization: Bearer TOKEN` when
/// `token`, and panics with its output when it reports any failure.
async fn fuzz(python: &str, base: &str, token: bool) {
    let work = tempfile::tempdir().unwrap();
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openapi/schemathesis.toml");
    let mut cmd = tokio::process::Command::new(python);
    cmd.current_dir(work.path())
        .env("NO_COLOR", "1")
        .args(["-m", "schemathesis.cli", "--config-file"])
        .arg(&config)
        .args([
            "run",
            &format!("{base}/openapi.json"),
            // Every check schemathesis has; none is excluded.
            "--checks",
            "all",
            // Coverage walks each schema's boundaries and every kind of invalid value, fuzzing
            // generates the rest, and the stateful phase follows the document's links (begin, then
            // register, confirm, cancel or read the transaction it made). The examples phase has
            // nothing to run: the document carries no examples.
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--max-examples",
            "60",
            // The same cases every run: a failure reproduces.
            "--generation-deterministic",
            "--workers",
            "1",
            "--request-timeout",
            "20",
            "--max-redirects",
            "0",
            "--continue-on-failure",
            "--no-shrink",
        ]);
    if token {
        cmd.args(["-H", &format!("Authorization: Bearer {TOKEN}")]);
    }
    let out = support::run_bounded(&mut cmd, RUN_LIMIT).await.expect("schemathesis did not finish");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found failures ({}):\n{stdout}\n{stderr}", out.status);
    println!("schemathesis:\n{stdout}{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_mismatch_with_the_token() {
    let Some(python) = schemathesis_python().await else { return };
    let tc = Coordinator::start().await;
    // The operator calls (retry, force) are fuzzed on this one (tests/openapi/schemathesis.toml),
    // so that they get past "unknown transaction".
    let participant = Participant::start(Mode::FailPhaseTwo).await;
    tc.flagged("flagged", &participant).await;
    fuzz(&python, &tc.running.url(), true).await;
    tc.assert_serving().await;
    // Whatever was stored is still readable, and the store still takes writes.
    let stored = tc.everything().await;
    let (status, body) = tc.post("/v1/transactions", "{}").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(tc.everything().await.len(), stored.len() + 1);
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_without_the_token_gets_documented_401s_and_changes_nothing() {
    let Some(python) = schemathesis_python().await else { return };
    let tc = Coordinator::start().await;
    // A few transactions for the fuzz to find: none of its calls, all without the token, may touch them.
    for gid in ["0", "a", "fuzz-1"] {
        let (status, body) = tc.post("/v1/transactions", &json!({ "gid": gid }).to_string()).await;
        assert_eq!(status, 201, "{body}");
    }
    let before = tc.everything().await;
    fuzz(&python, &tc.running.url(), false).await;
    tc.assert_serving().await;
    assert_eq!(tc.everything().await, before, "calls without the token changed the stored state");
    tc.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Bad input that docs/bad-input.md lists and no other suite pins.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_fuzz_found_is_refused_and_changes_nothing() {
    let tc = Coordinator::start().await;
    let (status, body) = tc.post("/v1/transactions", r#"{"gid":"keep"}"#).await;
    assert_eq!(status, 201, "{body}");
    let before = tc.everything().await;
    for (path, body) in [
        // serde reads a struct from an array of its fields too; the API takes objects only.
        ("/v1/transactions", "[null, null]"),
        ("/v1/transactions", "[\"arr\", 5000]"),
        ("/v1/transactions", "null"),
        ("/v1/transactions", "\"keep\""),
        ("/v1/transactions/keep/branches", r#"["b", "http://127.0.0.1:9/x", ""]"#),
        ("/v1/transactions/keep/force", r#"["confirm"]"#),
        ("/v1/transactions", r#"{"branches": [["b", "http://127.0.0.1:9/x", ""]]}"#),
        // Milliseconds are whole numbers.
        ("/v1/transactions", r#"{"timeout_ms": 1500.5}"#),
        ("/v1/transactions", r#"{"timeout_ms": -1.0}"#),
        // wait_ms is an int64 in the document.
        ("/v1/transactions/keep/cancel?wait_ms=9223372036854775808", ""),
        ("/v1/transactions/keep/confirm?wait_ms=18446744073709551615", ""),
        ("/v1/transactions/keep/cancel?wait_ms=-1", ""),
    ] {
        let (status, answer) = tc.post(path, body).await;
        assert_eq!((status, &answer["code"]), (400, &json!("malformed")), "{path} {body}: {answer}");
    }
    assert_eq!(tc.everything().await, before, "no refused request changed anything");

    // What JSON Schema calls an integer is one: 1500.0 milliseconds are 1500.
    let (status, body) = tc.post("/v1/transactions", r#"{"gid":"whole","timeout_ms":60000.0}"#).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["deadline_ms"].as_u64().unwrap() - body["created_at_ms"].as_u64().unwrap(), 60_000);
    // The Content-Type is not looked at: the body is read as JSON whatever it says (no 415).
    let (status, body) = tc
        .send(
            tc.http
                .post(tc.url("/v1/transactions"))
                .bearer_auth(TOKEN)
                .header("content-type", "text/plain")
                .body(r#"{"gid":"plain"}"#),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // Unknown routes and methods: 404 and 405 (with Allow), with the usual error body.
    let res = tc.http.get(tc.url("/v2/transactions")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "unknown_route", "{body}");
    let res = tc.http.put(tc.url("/v1/transactions")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(res.headers().contains_key("allow"));
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "method_not_allowed", "{body}");
    tc.assert_serving().await;
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_after_the_deadline_is_422_and_stores_nothing() {
    // The engine's clock moves only when the test moves it, and its scheduler sleeps an hour of it:
    // the deadline passes and no sweep can run before the registration.
    let clock = ManualClock::new(SystemClock.now());
    let core = Config { poll_interval: Duration::from_secs(3600), ..fast_core() };
    let tc = Coordinator::start_on_clock(core, clock.clone()).await;
    let p = Participant::start(Mode::Healthy).await;
    let (status, body) = tc.post("/v1/transactions", r#"{"gid":"late","timeout_ms":50}"#).await;
    assert_eq!(status, 201, "{body}");
    clock.advance(Duration::from_millis(50));
    let branch = json!({ "branch": "b1", "target": p.target("op") }).to_string();
    let (status, body) = tc.post("/v1/transactions/late/branches", &branch).await;
    assert_eq!((status, &body["code"]), (422, &json!("deadline_passed")), "{body}");
    let (_, tx) = tc.get("/v1/transactions/late").await;
    assert_eq!((&tx["state"], &tx["branches"]), (&json!("trying"), &json!([])), "{tx}");
    assert!(p.calls().is_empty());
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_branch_in_a_begin_refuses_the_whole_begin_and_stores_nothing() {
    let tc = Coordinator::start().await;
    let p = Participant::start(Mode::Healthy).await;
    let ok = json!({ "branch": "b1", "target": p.target("op"), "payload": "x" });
    let max = fast_core().max_branches;
    let too_many: Vec<Value> =
        (0..=max).map(|i| json!({ "branch": format!("b{i}"), "target": p.target("op") })).collect();
    let cases = [
        (json!([ok, { "branch": "b c", "target": p.target("op") }]), 400, "malformed"),
        (json!([ok, { "branch": "b2", "target": p.target("op"), "surprise": 1 }]), 400, "malformed"),
        (json!([ok, { "branch": "b2" }]), 400, "malformed"),
        (json!([ok, { "branch": "b2", "target": "http://203.0.113.9/x" }]), 422, "participant_not_allowed"),
        (json!([ok, { "branch": "b1", "target": p.target("other") }]), 422, "invalid_input"),
        (json!(too_many), 422, "invalid_input"),
    ];
    for (branches, status, code) in cases {
        let (got, body) = tc
            .post("/v1/transactions", &json!({ "gid": "bad-begin", "branches": branches }).to_string())
            .await;
        assert_eq!((got, &body["code"]), (status, &json!(code)), "{branches}: {body}");
        let (missing, _) = tc.get("/v1/transactions/bad-begin").await;
        assert_eq!(missing, 404, "{branches}: nothing stored");
    }
    assert!(p.calls().is_empty());
    // The same branch twice with the same details is one branch, as with register.
    let (status, body) =
        tc.post("/v1/transactions", &json!({ "gid": "good", "branches": [ok, ok] }).to_string()).await;
    assert_eq!((status, body["branches"].as_array().map(Vec::len)), (201, Some(1)), "{body}");
    tc.stop().await;
}

/// A participant whose confirm answers are garbage of several kinds, counting the calls.
struct Garbage {
    base: String,
    raw: String,
    calls: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Garbage {
    async fn start() -> Garbage {
        let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = calls.clone();
        let junk: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let app = Router::new().route(
            "/g/{kind}/{phase}",
            post(move |Path((kind, phase)): Path<(String, String)>| {
                let (seen, junk) = (seen.clone(), junk.clone());
                async move {
                    seen.lock().unwrap().push(format!("{kind}/{phase}"));
                    let status = match kind.as_str() {
                        "ok" => StatusCode::OK,
                        "refuse" => StatusCode::BAD_REQUEST,
                        _ => StatusCode::INTERNAL_SERVER_ERROR,
                    };
                    (status, [("content-type", "application/json")], junk).into_response()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/g", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        // Not HTTP at all: a line of bytes, then the connection closes.
        let raw_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let raw = format!("http://{}/raw", raw_listener.local_addr().unwrap());
        let seen = calls.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = raw_listener.accept().await {
                seen.lock().unwrap().push("raw/confirm".to_owned());
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await;
                let _ = conn.write_all(b"\x00\xffNOT HTTP\r\n\r\n").await;
            }
        });
        Garbage { base, raw, calls }
    }

    fn count(&self, what: &str) -> usize {
        self.calls.lock().unwrap().iter().filter(|c| *c == what).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_answering_garbage_is_retried_or_flagged_and_the_coordinator_serves_on() {
    let tc = Coordinator::start().await; // two rounds, then flagged
    let g = Garbage::start().await;
    let decide = async |gid: &str, target: String| -> Value {
        let (status, body) = tc.post("/v1/transactions", &json!({ "gid": gid }).to_string()).await;
        assert_eq!(status, 201, "{body}");
        let branch = json!({ "branch": "b1", "target": target }).to_string();
        let (status, body) = tc.post(&format!("/v1/transactions/{gid}/branches"), &branch).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = tc.post(&format!("/v1/transactions/{gid}/confirm?wait_ms=30000"), "").await;
        assert_eq!(status, 200, "{body}");
        body
    };
    // A 2xx is an acknowledgement whatever its body: the native protocol reads only the status.
    // (The garbage 200 to a phase-two batch is no batch answer: the call is then made alone.)
    let tx = decide("ok", format!("{}/ok", g.base)).await;
    assert_eq!(tx["state"], "confirmed", "{tx}");
    assert_eq!((g.count("ok/batch"), g.count("ok/confirm")), (1, 1));
    // A 4xx can never succeed: flagged at once, after one call, with a bounded, readable last error.
    let tx = decide("refused", format!("{}/refuse", g.base)).await;
    assert_eq!(tx["state"], "flagged", "{tx}");
    assert_eq!(g.count("refuse/confirm"), 1);
    let error = tx["last_error"].as_str().unwrap();
    assert!(error.contains("400") && error.len() < 4096, "{} bytes: {error:.200}", error.len());
    // A 5xx is transient: retried (two rounds here), then flagged.
    let tx = decide("broken", format!("{}/broken", g.base)).await;
    assert_eq!(tx["state"], "flagged", "{tx}");
    // (A 500 to a phase-two batch fails each call in it alike, so a round is a batch or a call.)
    assert_eq!(g.count("broken/confirm") + g.count("broken/batch"), 2);
    assert!(tx["last_error"].as_str().unwrap().contains("500"), "{tx}");
    // Bytes that are not HTTP: a transport error, transient like a refused connection.
    let tx = decide("raw", g.raw.clone()).await;
    assert_eq!(tx["state"], "flagged", "{tx}");
    assert!(g.count("raw/confirm") >= 2, "retried: {}", g.count("raw/confirm"));
    tc.assert_serving().await;
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_after_confirm_is_409_and_changes_nothing() {
    let tc = Coordinator::start().await;
    let p = Participant::start(Mode::Healthy).await;
    let (status, body) = tc.post("/v1/transactions", r#"{"gid":"done"}"#).await;
    assert_eq!(status, 201, "{body}");
    let branch = json!({ "branch": "b1", "target": p.target("op") }).to_string();
    assert_eq!(tc.post("/v1/transactions/done/branches", &branch).await.0, 200);
    let (status, body) = tc.post("/v1/transactions/done/confirm?wait_ms=30000", "").await;
    assert_eq!((status, &body["state"]), (200, &json!("confirmed")), "{body}");
    let before = tc.everything().await;
    for (path, body) in [
        ("/v1/transactions/done/cancel", ""),
        ("/v1/transactions/done/retry", ""),
        ("/v1/transactions/done/force", r#"{"outcome":"cancel"}"#),
        ("/v1/transactions/done/branches", r#"{"branch":"b2","target":"http://127.0.0.1:9/x"}"#),
    ] {
        let (status, answer) = tc.post(path, body).await;
        assert_eq!((status, &answer["code"]), (409, &json!("illegal_transition")), "{path}: {answer}");
    }
    // Confirming again is answered as before.
    assert_eq!(tc.post("/v1/transactions/done/confirm", "").await.0, 200);
    assert_eq!(tc.everything().await, before);
    assert_eq!(p.phases("done"), ["confirm"], "the participant was called once");
    tc.stop().await;
}
