//! The DTM-compatible API under `/api/dtmsvr`, over real loopback sockets: the protocol as DTM
//! clients speak it (with reqwest here, and with the unmodified PyPI client `dtmcli==1.7.7.0` in
//! `dtmcli_python_client_runs_its_tcc_transactions_on_tcc`), its conflict and bad-input answers,
//! the TransOptions, the token and the participant allow-list.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::any;
use serde_json::{Value, json};
use support::fast_core;
use tcc_core::{Config, RetryPolicy};
use tcc_http::server::{Launch, Running, ServerConfig, Token};

/// Longest any polling loop here waits.
const SETTLE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The coordinator

struct Tc {
    running: Running,
    http: reqwest::Client,
    token: Option<String>,
    _dir: tempfile::TempDir,
}

impl Tc {
    async fn start() -> Tc {
        Tc::start_with(fast_core(), ServerConfig::default()).await
    }

    async fn start_with(core: Config, server: ServerConfig) -> Tc {
        let dir = tempfile::tempdir().unwrap();
        let token = server.token.as_ref().map(|t| t.expose().to_owned());
        let running = tcc_http::server::start(Launch {
            listen: "127.0.0.1:0".into(),
            store: support::test_store(dir.path()).await,
            core,
            server,
            client: Default::default(),
        })
        .await
        .unwrap();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Tc { running, http, token, _dir: dir }
    }

    /// The DTM server URL a DTM client is given.
    fn dtm(&self) -> String {
        format!("{}/api/dtmsvr", self.running.url())
    }

    async fn answer(res: reqwest::Response) -> (u16, Value) {
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    /// POSTs raw text with the configured token, if any.
    async fn post_raw(&self, call: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}/{call}", self.dtm()))
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        Tc::answer(req.send().await.unwrap()).await
    }

    async fn post(&self, call: &str, body: Value) -> (u16, Value) {
        self.post_raw(call, body.to_string()).await
    }

    async fn get(&self, call: &str) -> (u16, Value) {
        Tc::answer(self.http.get(format!("{}/{call}", self.dtm())).send().await.unwrap()).await
    }

    async fn new_gid(&self) -> String {
        let (status, body) = self.get("newGid").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["dtm_result"], "SUCCESS");
        body["gid"].as_str().unwrap().to_owned()
    }

    async fn query(&self, gid: &str) -> Value {
        let (status, body) = self.get(&format!("query?gid={gid}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Polls `query` until `done` holds for its answer (bounded).
    async fn until(&self, gid: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let q = self.query(gid).await;
            if done(&q) {
                return q;
            }
            assert!(tokio::time::Instant::now() < deadline, "{gid} never became {what}: {q:#}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn settle(&self, gid: &str, status: &str) -> Value {
        self.until(gid, status, |q| q["transaction"]["status"] == status).await
    }

    async fn flagged(&self, gid: &str) -> Value {
        self.until(gid, "flagged", |q| q["transaction"]["tcc"]["flagged"] == true).await
    }

    /// prepare + registerBranch for each service of `p`, with `data` naming the service.
    async fn prepare_with(&self, options: Value, p: &Participant, services: &[&str]) -> String {
        let gid = self.new_gid().await;
        let mut body = json!({ "gid": gid, "trans_type": "tcc" });
        for (k, v) in options.as_object().unwrap() {
            body[k] = v.clone();
        }
        assert_ok(self.post("prepare", body).await);
        for (i, svc) in services.iter().enumerate() {
            assert_ok(self.post("registerBranch", p.branch(&gid, &format!("{:02}", i + 1), svc)).await);
        }
        gid
    }

    async fn stop(self) {
        self.running.stop().await.unwrap();
    }
}

/// A DTM success: 200 and a body without the word FAILURE.
#[track_caller]
fn assert_ok((status, body): (u16, Value)) {
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["dtm_result"], "SUCCESS", "{body}");
    assert!(!body.to_string().contains("FAILURE"), "{body}");
}

/// A DTM failure: `status` and `FAILURE` in the body.
#[track_caller]
fn assert_failure((got, body): (u16, Value), status: u16) -> Value {
    assert_eq!(got, status, "{body}");
    assert_eq!(body["dtm_result"], "FAILURE", "{body}");
    body
}

/// (branch_id, op, status) of each row of a query answer.
fn rows(q: &Value) -> Vec<(String, String, String)> {
    q["branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let s = |k: &str| b[k].as_str().unwrap().to_owned();
            (s("branch_id"), s("op"), s("status"))
        })
        .collect()
}

/// Decodes standard base64 with padding (how DTM's `bin_data` is encoded).
fn unbase64(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sextets: Vec<u32> = s
        .bytes()
        .filter(|&c| c != b'=')
        .map(|c| ALPHABET.iter().position(|&a| a == c).unwrap() as u32)
        .collect();
    let mut out = Vec::new();
    for chunk in sextets.chunks(4) {
        let n = chunk.iter().enumerate().fold(0, |n, (i, v)| n | v << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

fn row(branch: &str, op: &str, status: &str) -> (String, String, String) {
    (branch.to_owned(), op.to_owned(), status.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Participants

/// One call a participant received.
#[derive(Clone, Debug)]
struct Call {
    method: Method,
    svc: String,
    /// The last path segment: try, confirm or cancel.
    path_op: String,
    query: HashMap<String, String>,
    raw_query: String,
    content_type: String,
    body: String,
}

/// How a service answers confirm and cancel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase2 {
    Ok,
    /// 409 with a FAILURE body.
    Refuse,
    /// 200, but FAILURE in the body.
    FailureIn200,
    /// 425 with an ONGOING body.
    Ongoing,
    /// 500 this many more times, then Ok.
    Fail500(u32),
    /// 503 with a FAILURE body this many more times, then Ok.
    Unavailable(u32),
    /// No answer until released (at most `SETTLE`).
    Block,
}

#[derive(Default)]
struct Busi {
    calls: Mutex<Vec<Call>>,
    modes: Mutex<HashMap<String, Phase2>>,
    release: tokio::sync::Notify,
}

/// DTM-style services `/{svc}/try|confirm|cancel` on one loopback port.
struct Participant {
    url: String,
    busi: Arc<Busi>,
}

impl Participant {
    async fn start() -> Participant {
        let busi = Arc::new(Busi::default());
        let app = Router::new().route("/{svc}/{op}", any(serve)).with_state(busi.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let limits = tcc_http::serve::Limits::default();
            tcc_http::serve::serve(listener, app, &limits, std::future::pending()).await
        });
        Participant { url, busi }
    }

    fn set(&self, svc: &str, mode: Phase2) {
        self.busi.modes.lock().unwrap().insert(svc.to_owned(), mode);
    }

    fn release(&self) {
        self.busi.release.notify_waiters();
    }

    fn op_url(&self, svc: &str, op: &str) -> String {
        format!("{}/{svc}/{op}", self.url)
    }

    /// A registerBranch body for `svc`, as DTM clients send it.
    fn branch(&self, gid: &str, branch_id: &str, svc: &str) -> Value {
        json!({
            "gid": gid,
            "trans_type": "tcc",
            "branch_id": branch_id,
            "status": "prepared",
            "data": data(svc),
            "confirm": self.op_url(svc, "confirm"),
            "cancel": self.op_url(svc, "cancel"),
        })
    }

    fn calls(&self, gid: &str) -> Vec<Call> {
        self.busi
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.query.get("gid").map(String::as_str) == Some(gid))
            .cloned()
            .collect()
    }

    /// The operations `svc` was called with for `gid`, in order.
    fn ops(&self, gid: &str, svc: &str) -> Vec<String> {
        self.calls(gid).into_iter().filter(|c| c.svc == svc).map(|c| c.path_op).collect()
    }
}

/// The `data` registered for a service: a JSON document as a string, as DTM clients send it.
fn data(svc: &str) -> String {
    json!({ "svc": svc, "amount": 30 }).to_string()
}

async fn serve(
    State(busi): State<Arc<Busi>>,
    method: Method,
    Path((svc, op)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let raw_query = raw.unwrap_or_default();
    let query = url::form_urlencoded::parse(raw_query.as_bytes()).into_owned().collect();
    let body = String::from_utf8_lossy(&body).into_owned();
    let content_type =
        headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    busi.calls.lock().unwrap().push(Call {
        method,
        svc: svc.clone(),
        path_op: op.clone(),
        query,
        raw_query,
        content_type,
        body: body.clone(),
    });
    let success = (StatusCode::OK, axum::Json(json!({ "dtm_result": "SUCCESS" })));
    let failure = (StatusCode::CONFLICT, axum::Json(json!({ "dtm_result": "FAILURE" })));
    if op == "try" {
        let refuse = serde_json::from_str::<Value>(&body).is_ok_and(|v| v["try_fail"] == true);
        return if refuse { failure.into_response() } else { success.into_response() };
    }
    // A saga's action refuses when asked to; a message's back-check answers by service name.
    if op == "action" && serde_json::from_str::<Value>(&body).is_ok_and(|v| v["action_fail"] == true) {
        return failure.into_response();
    }
    if op == "query" {
        return match svc.as_str() {
            "committed" => success.into_response(),
            "rolledback" => failure.into_response(),
            _ => (StatusCode::TOO_EARLY, axum::Json(json!({ "dtm_result": "ONGOING" }))).into_response(),
        };
    }
    let mode = {
        let mut modes = busi.modes.lock().unwrap();
        let mode = modes.get(&svc).copied().unwrap_or(Phase2::Ok);
        match mode {
            Phase2::Fail500(n) => {
                modes.insert(svc.clone(), if n > 1 { Phase2::Fail500(n - 1) } else { Phase2::Ok });
            }
            Phase2::Unavailable(n) => {
                modes.insert(svc.clone(), if n > 1 { Phase2::Unavailable(n - 1) } else { Phase2::Ok });
            }
            _ => {}
        }
        mode
    };
    match mode {
        Phase2::Ok => success.into_response(),
        Phase2::Refuse => failure.into_response(),
        Phase2::FailureIn200 => (StatusCode::OK, r#"{"dtm_result":"FAILURE"}"#).into_response(),
        Phase2::Ongoing => {
            (StatusCode::TOO_EARLY, axum::Json(json!({ "dtm_result": "ONGOING" }))).into_response()
        }
        Phase2::Fail500(_) => (StatusCode::INTERNAL_SERVER_ERROR, "busy").into_response(),
        Phase2::Unavailable(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({ "dtm_result": "FAILURE" }))).into_response()
        }
        Phase2::Block => {
            let _ = tokio::time::timeout(SETTLE, busi.release.notified()).await;
            success.into_response()
        }
    }
}

/// Checks that `call` is `op` of branch `branch_id` of `gid`, made the way DTM's server makes it.
#[track_caller]
fn assert_dtm_call(call: &Call, gid: &str, branch_id: &str, op: &str) {
    assert_eq!(call.method, Method::POST, "{call:?}");
    assert_eq!(call.path_op, op, "{call:?}");
    let q = |k: &str| call.query.get(k).map(String::as_str);
    assert_eq!(q("gid"), Some(gid), "{call:?}");
    assert_eq!(q("trans_type"), Some("tcc"), "{call:?}");
    assert_eq!(q("branch_id"), Some(branch_id), "{call:?}");
    assert_eq!(q("op"), Some(op), "{call:?}");
    assert_eq!(call.content_type, "application/json", "{call:?}");
    assert_eq!(call.body, data(&call.svc), "the registered data is the body: {call:?}");
}

/// The gid each scenario reported (its `{"scenario", "gid"}` line).
fn scenario_gids(stdout: &str) -> HashMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| (v["scenario"].as_str().unwrap().to_owned(), v["gid"].as_str().unwrap().to_owned()))
        .collect()
}

/// Runs `tests/dtm/{script}` with `args` under `python`, at most `limit_secs`; asserts it
/// succeeded and returns its stdout and stderr.
async fn run_script(python: &str, script: &str, args: &[&str], limit_secs: u64) -> (String, String) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/dtm").join(script);
    let out = support::run_bounded(
        tokio::process::Command::new(python).arg(&path).args(args),
        Duration::from_secs(limit_secs),
    )
    .await
    .unwrap_or_else(|| panic!("{script} did not finish within {limit_secs} s"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{script} failed ({}):\n{stdout}\n{stderr}", out.status);
    (stdout, stderr)
}

// ---------------------------------------------------------------------------------------------
// The protocol

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_confirms_every_branch_the_way_dtm_calls_them() {
    let tc = Tc::start().await;
    let p = Participant::start().await;
    let gid = tc.new_gid().await;
    assert_ne!(gid, tc.new_gid().await);
    assert_ok(tc.post("prepare", json!({ "gid": gid, "trans_type": "tcc" })).await);
    assert_ok(tc.post("registerBranch", p.branch(&gid, "01", "a")).await);
    // The old SDKs' alias; and a confirm URL with a query of its own, which is kept.
    let mut b = p.branch(&gid, "02", "b");
    b["confirm"] = json!(format!("{}?tenant=7", p.op_url("b", "confirm")));
    assert_ok(tc.post("registerTccBranch", b).await);

    let q = tc.query(&gid).await;
    assert_eq!(q["transaction"]["status"], "prepared");
    assert_eq!(q["transaction"]["trans_type"], "tcc");
    assert_eq!(
        rows(&q),
        [
            row("01", "cancel", "prepared"),
            row("01", "confirm", "prepared"),
            row("02", "cancel", "prepared"),
            row("02", "confirm", "prepared")
        ]
    );
    assert!(p.calls(&gid).is_empty(), "nothing is called before the decision");

    assert_ok(tc.post("submit", json!({ "gid": gid, "trans_type": "tcc" })).await);
    let q = tc.settle(&gid, "succeed").await;
    assert_eq!(
        rows(&q),
        [
            row("01", "cancel", "prepared"),
            row("01", "confirm", "succeed"),
            row("02", "cancel", "prepared"),
            row("02", "confirm", "succeed")
        ]
    );
    let t = &q["transaction"];
    assert_eq!(t["gid"], gid.as_str());
    assert_eq!(t["protocol"], "http");
    assert_eq!(t["tcc"]["state"], "confirmed");
    for field in ["create_time", "update_time", "finish_time"] {
        let time = t[field].as_str().unwrap();
        assert!(time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T', "{field}: {time}");
    }
    assert!(t.get("rollback_time").is_none(), "{t}");
    let first = &q["branches"][0];
    assert_eq!(first["gid"], gid.as_str());
    assert_eq!(first["url"], p.op_url("a", "cancel"));
    assert_eq!(unbase64(first["bin_data"].as_str().unwrap()), data("a").as_bytes());
    assert_eq!(q["branches"][3]["url"], format!("{}?tenant=7", p.op_url("b", "confirm")));

    let calls = p.calls(&gid);
    assert_eq!(calls.len(), 2, "{calls:?}");
    for c in &calls {
        let branch = if c.svc == "a" { "01" } else { "02" };
        assert_dtm_call(c, &gid, branch, "confirm");
    }
    let b = calls.iter().find(|c| c.svc == "b").unwrap();
    assert!(b.raw_query.starts_with("tenant=7&gid="), "{b:?}");
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_cancels_every_branch_the_way_dtm_calls_them() {
    let tc = Tc::start().await;
    let p = Participant::start().await;
    let gid = tc.prepare_with(json!({}), &p, &["a", "b"]).await;
    assert_ok(tc.post("abort", json!({ "gid": gid, "trans_type": "tcc" })).await);
    let q = tc.settle(&gid, "failed").await;
    assert_eq!(
        rows(&q),
        [
            row("01", "cancel", "succeed"),
            row("01", "confirm", "prepared"),
            row("02", "cancel", "succeed"),
            row("02", "confirm", "prepared")
        ]
    );
    assert!(q["transaction"]["rollback_time"].is_string(), "{q}");
    let calls = p.calls(&gid);
    assert_eq!(calls.len(), 2, "{calls:?}");
    for c in &calls {
        assert_dtm_call(c, &gid, if c.svc == "a" { "01" } else { "02" }, "cancel");
    }
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_gids_are_failures_and_query_answers_null() {
    let tc = Tc::start().await;
    let p = Participant::start().await;
    let gid = tc.new_gid().await;
    assert_failure(tc.post("registerBranch", p.branch(&gid, "01", "a")).await, 409);
    assert_failure(tc.post("submit", json!({ "gid": gid, "trans_type": "tcc" })).await, 409);
    assert_failure(tc.post("abort", json!({ "gid": gid, "trans_type": "tcc" })).await, 409);
    let q = tc.query(&gid).await;
    assert_eq!(q, json!({ "transaction": null, "branches": [] }));
    tc.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Conflicts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn illegal_states_are_409_and_repeats_are_200() {
    let tc = Tc::start().await;
    let p = Participant::start().await;
    let tcc = |gid: &str| json!({ "gid": gid, "trans_type": "tcc" });

    // Prepared: preparing again is a repeat.
    let gid = tc.prepare_with(json!({}), &p, &["a"]).await;
    assert_ok(tc.post("prepare", tcc(&gid)).await);
    // Registering the same branch again is a repeat; the same id with other details is not.
    assert_ok(tc.post("registerBranch", p.branch(&gid, "01", "a")).await);
    let mut other = p.branch(&gid, "01", "a");
    other["data"] = json!("{}");
    let (status, body) = tc.post("registerBranch", other).await;
    assert!((400..500).contains(&status) && body["dtm_result"] == "FAILURE", "{status} {body}");

    // Submitted.
    assert_ok(tc.post("submit", tcc(&gid)).await);
    let refused = assert_failure(tc.post("registerBranch", p.branch(&gid, "02", "b")).await, 409);
    assert!(refused["message"].is_string(), "{refused}");
    let refused = assert_failure(tc.post("abort", tcc(&gid)).await, 409);
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains("'submitted'") || message.contains("'succeed'"), "{message}");
    assert_failure(tc.post("prepare", tcc(&gid)).await, 409);
    assert_ok(tc.post("submit", tcc(&gid)).await);
    tc.settle(&gid, "succeed").await;
    // Still a repeat once phase two finished.
    assert_ok(tc.post("submit", tcc(&gid)).await);
    assert_failure(tc.post("abort", tcc(&gid)).await, 409);
    let q = tc.query(&gid).await;
    assert_eq!(rows(&q).len(), 2, "nothing was registered after submit: {q}");
    assert_eq!(p.ops(&gid, "a"), ["confirm"]);
    assert!(p.ops(&gid, "b").is_empty());

    // Aborted.
    let gid = tc.prepare_with(json!({}), &p, &["a"]).await;
    assert_ok(tc.post("abort", tcc(&gid)).await);
    assert_failure(tc.post("registerBranch", p.branch(&gid, "02", "b")).await, 409);
    assert_failure(tc.post("submit", tcc(&gid)).await, 409);
    assert_failure(tc.post("prepare", tcc(&gid)).await, 409);
    assert_ok(tc.post("abort", tcc(&gid)).await);
    tc.settle(&gid, "failed").await;
    assert_ok(tc.post("abort", tcc(&gid)).await);
    assert_failure(tc.post("submit", tcc(&gid)).await, 409);
    assert_eq!(rows(&tc.query(&gid).await).len(), 2);
    assert_eq!(p.ops(&gid, "a"), ["cancel"]);
    tc.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Bad input

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let tc = Tc::start().await;
    let p = Participant::start().await;
    let gid = tc.prepare_with(json!({}), &p, &[]).await;

    // prepare
    let fresh = tc.new_gid().await;
    for body in [
        "{".to_owned(),
        "[]".to_owned(),
        json!({ "trans_type": "tcc" }).to_string(),
        json!({ "gid": 5, "trans_type": "tcc" }).to_string(),
        json!({ "gid": "bad gid!", "trans_type": "tcc" }).to_string(),
        json!({ "gid": fresh, "trans_type": "saga" }).to_string(),
        json!({ "gid": fresh, "trans_type": "tcc", "timeout_to_fail": "10" }).to_string(),
        json!({ "gid": fresh, "trans_type": "tcc", "timeout_to_fail": -1 }).to_string(),
        json!({ "gid": fresh, "trans_type": "tcc", "retry_interval": 1.5 }).to_string(),
        json!({ "gid": fresh, "trans_type": "tcc", "request_timeout": -3 }).to_string(),
        json!({ "gid": fresh, "trans_type": "tcc", "wait_result": "yes" }).to_string(),
        json!({ "gid": fresh, "trans_type": "tcc", "branch_headers": { "authorization": "x" } }).to_string(),
        json!({ "gid": fresh, "trans_type": "tcc", "passthrough_headers": ["authorization"] }).to_string(),
        json!({ "gid": fresh, "trans_type": "tcc", "protocol": "grpc" }).to_string(),
    ] {
        let (status, answer) = tc.post_raw("prepare", body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["dtm_result"], "FAILURE", "{body}: {answer}");
    }
    // Beyond the coordinator's longest timeout.
    let too_long = json!({ "gid": fresh, "trans_type": "tcc", "timeout_to_fail": 10_000_000 });
    assert_failure(tc.post("prepare", too_long).await, 422);
    assert_eq!(tc.query(&fresh).await["transaction"], Value::Null, "nothing was begun");

    // registerBranch: every value must be a string, and every field there.
    let good = p.branch(&gid, "01", "a");
    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b
    };
    let without = |k: &str| {
        let mut b = good.clone();
        b.as_object_mut().unwrap().remove(k);
        b
    };
    for body in [
        with("branch_id", json!(1)),
        with("data", json!({ "amount": 30 })),
        with("gid", json!(null)),
        with("branch_id", json!("0 1")),
        with("gid", json!("bad gid!")),
        with("trans_type", json!("xa")),
        with("confirm", json!("not a url")),
        with("cancel", json!("")),
        without("gid"),
        without("branch_id"),
        without("confirm"),
        without("cancel"),
    ] {
        let (status, answer) = tc.post("registerBranch", body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["dtm_result"], "FAILURE", "{body}: {answer}");
    }
    let (status, answer) = tc.post_raw("registerBranch", "not json").await;
    assert_eq!((status, &answer["dtm_result"]), (400, &json!("FAILURE")), "{answer}");
    // Over the body limit.
    let (status, _) = tc.post_raw("registerBranch", vec![b' '; (1 << 20) + 1]).await;
    assert_eq!(status, 413);
    // submit and abort
    for call in ["submit", "abort"] {
        for body in [json!({}), json!({ "gid": 1 }), json!({ "gid": gid, "trans_type": "xa" })] {
            let (status, answer) = tc.post(call, body.clone()).await;
            assert_eq!(status, 400, "{call} {body}: {answer}");
        }
    }
    // query
    for q in ["query", "query?gid=", "query?gid=bad%20gid!"] {
        let (status, _) = tc.get(q).await;
        assert_eq!(status, 400, "{q}");
    }

    let q = tc.query(&gid).await;
    assert_eq!(q["transaction"]["status"], "prepared");
    assert!(rows(&q).is_empty(), "{q}");
    // The transaction still works.
    assert_ok(tc.post("registerBranch", good).await);
    assert_ok(tc.post("submit", json!({ "gid": gid, "trans_type": "tcc", "wait_result": true })).await);
    assert_eq!(p.ops(&gid, "a"), ["confirm"]);
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_participant_urls_are_422_and_not_stored() {
    let tc = Tc::start().await;
    let p = Participant::start().await;
    let gid = tc.prepare_with(json!({}), &p, &[]).await;
    for (confirm, cancel) in [
        ("http://169.254.169.254/latest/meta-data".to_owned(), p.op_url("a", "cancel")),
        (p.op_url("a", "confirm"), "http://10.0.0.1/cancel".to_owned()),
        (p.op_url("a", "confirm"), "file:///etc/passwd".to_owned()),
        (p.op_url("a", "confirm"), "http://user:pw@127.0.0.1/cancel".to_owned()),
    ] {
        let mut body = p.branch(&gid, "01", "a");
        body["confirm"] = json!(confirm);
        body["cancel"] = json!(cancel);
        let refused = assert_failure(tc.post("registerBranch", body).await, 422);
        assert_eq!(refused["code"], "participant_not_allowed");
    }
    assert!(rows(&tc.query(&gid).await).is_empty());
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_every_post_needs_it() {
    let server = ServerConfig { token: Some(Token::new("s3cret").unwrap()), ..ServerConfig::default() };
    let tc = Tc::start_with(fast_core(), server).await;
    let p = Participant::start().await;
    let gid = tc.new_gid().await; // GETs need no token
    let post = |call: &str, body: Value, token: Option<&str>| {
        let mut req = tc.http.post(format!("{}/{call}", tc.dtm())).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let tcc = json!({ "gid": gid, "trans_type": "tcc" });
    assert_eq!(post("prepare", tcc.clone(), None).await, 401);
    assert_eq!(post("prepare", tcc.clone(), Some("wrong")).await, 401);
    assert_eq!(tc.query(&gid).await["transaction"], Value::Null);
    assert_eq!(post("prepare", tcc.clone(), Some("s3cret")).await, 200);
    for call in ["registerBranch", "registerTccBranch"] {
        assert_eq!(post(call, p.branch(&gid, "01", "a"), None).await, 401);
    }
    assert!(rows(&tc.query(&gid).await).is_empty());
    assert_eq!(post("registerBranch", p.branch(&gid, "01", "a"), Some("s3cret")).await, 200);
    for call in ["submit", "abort"] {
        assert_eq!(post(call, tcc.clone(), None).await, 401);
    }
    assert_eq!(tc.query(&gid).await["transaction"]["status"], "prepared");
    assert_eq!(post("submit", tcc.clone(), Some("s3cret")).await, 200);
    tc.settle(&gid, "succeed").await;
    tc.stop().await;
}

// ---------------------------------------------------------------------------------------------
// TransOptions and phase two

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_result_answers_once_phase_two_is_done() {
    let tc = Tc::start().await;
    let p = Participant::start().await;
    let gid = tc.prepare_with(json!({ "wait_result": true }), &p, &["a", "b"]).await;
    assert_ok(tc.post("submit", json!({ "gid": gid, "trans_type": "tcc", "wait_result": true })).await);
    // No polling: the answer came after phase two.
    let q = tc.query(&gid).await;
    assert_eq!(q["transaction"]["status"], "succeed", "{q}");
    assert_eq!(
        (p.ops(&gid, "a"), p.ops(&gid, "b")),
        (vec!["confirm".to_owned()], vec!["confirm".to_owned()])
    );

    let gid = tc.prepare_with(json!({}), &p, &["a", "b"]).await;
    assert_ok(tc.post("abort", json!({ "gid": gid, "trans_type": "tcc", "wait_result": true })).await);
    assert_eq!(tc.query(&gid).await["transaction"]["status"], "failed");
    assert_eq!(p.ops(&gid, "b"), ["cancel"]);
    tc.stop().await;
}

/// DTM's server calls a TCC confirm or cancel again whatever it answers unless it is a success;
/// tcc does too, under its retry policy, and flags the transaction only once the policy is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_answered_with_failure_is_retried_and_flagged_only_once_the_policy_is_spent() {
    let mut core = fast_core();
    core.retry.max_attempts = 3;
    let tc = Tc::start_with(core, ServerConfig::default()).await;
    let p = Participant::start().await;

    // 503 with FAILURE in the body, twice: retried, then confirmed; never flagged.
    p.set("a", Phase2::Unavailable(2));
    let gid = tc.prepare_with(json!({}), &p, &["a", "b"]).await;
    assert_ok(tc.post("submit", json!({ "gid": gid, "trans_type": "tcc" })).await);
    let q = tc.settle(&gid, "succeed").await;
    assert_eq!(q["transaction"]["tcc"]["flagged"], false);
    assert_eq!(p.ops(&gid, "a"), ["confirm", "confirm", "confirm"]);
    assert_eq!(p.ops(&gid, "b"), ["confirm"]);

    // 409 with FAILURE, every time: called once per round of the policy, then flagged. With
    // wait_result, the submit says so (500: decided, not finished, not failed).
    p.set("a", Phase2::Refuse);
    let gid = tc.prepare_with(json!({}), &p, &["a", "b"]).await;
    let (status, body) =
        tc.post("submit", json!({ "gid": gid, "trans_type": "tcc", "wait_result": true })).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["code"], "flagged");
    assert!(!body.to_string().contains("FAILURE") && body.get("dtm_result").is_none(), "{body}");
    let q = tc.query(&gid).await;
    let t = &q["transaction"];
    assert_eq!(t["status"], "submitted", "a flagged confirm is not finished: {q}");
    assert_eq!(
        (&t["tcc"]["state"], &t["tcc"]["flagged"], &t["tcc"]["decision"]),
        (&json!("flagged"), &json!(true), &json!("confirm"))
    );
    let error = t["tcc"]["last_error"].as_str().unwrap();
    assert!(error.contains("409") && !error.contains("FAILURE"), "{error}");
    assert_eq!(rows(&q)[1], row("01", "confirm", "prepared"));
    assert_eq!(rows(&q)[3], row("02", "confirm", "succeed"));
    assert_eq!(p.ops(&gid, "a"), ["confirm", "confirm", "confirm"]);

    // FAILURE in a 200 body: the same.
    p.set("a", Phase2::FailureIn200);
    let gid = tc.prepare_with(json!({}), &p, &["a"]).await;
    assert_ok(tc.post("submit", json!({ "gid": gid, "trans_type": "tcc" })).await);
    let q = tc.flagged(&gid).await;
    assert_eq!(q["transaction"]["status"], "submitted");
    assert_eq!(p.ops(&gid, "a"), ["confirm", "confirm", "confirm"]);
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ongoing_is_retried_and_wait_result_answers_425_meanwhile() {
    let tc = Tc::start().await;
    let p = Participant::start().await;
    p.set("a", Phase2::Ongoing);
    let gid = tc.prepare_with(json!({ "retry_interval": 1, "request_timeout": 1 }), &p, &["a"]).await;
    let (status, body) =
        tc.post("submit", json!({ "gid": gid, "trans_type": "tcc", "wait_result": true })).await;
    assert_eq!(status, 425, "{body}");
    assert_eq!(body["dtm_result"], "ONGOING", "{body}");
    let q = tc.query(&gid).await;
    assert_eq!(q["transaction"]["status"], "submitted");
    assert_eq!(q["transaction"]["tcc"]["flagged"], false);
    p.set("a", Phase2::Ok);
    tc.settle(&gid, "succeed").await;
    assert!(p.ops(&gid, "a").len() >= 2, "{:?}", p.ops(&gid, "a"));
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_interval_sets_the_delay_between_rounds() {
    // The coordinator's own policy would wait a minute between rounds.
    let mut core = fast_core();
    core.retry = RetryPolicy {
        initial_backoff: Duration::from_secs(60),
        max_backoff: Duration::from_secs(60),
        multiplier: 1.0,
        jitter: 0.0,
        ..core.retry
    };
    let tc = Tc::start_with(core, ServerConfig::default()).await;
    let p = Participant::start().await;
    p.set("a", Phase2::Fail500(2));
    let gid = tc.prepare_with(json!({ "retry_interval": 1 }), &p, &["a", "b"]).await;
    assert_eq!(tc.query(&gid).await["transaction"]["retry_interval"], 1);
    assert_ok(tc.post("submit", json!({ "gid": gid, "trans_type": "tcc" })).await);
    // Two failed rounds a second apart, then success: well inside SETTLE, which the coordinator's
    // own policy could not reach.
    let q = tc.settle(&gid, "succeed").await;
    assert_eq!(p.ops(&gid, "a"), ["confirm", "confirm", "confirm"]);
    assert_eq!(p.ops(&gid, "b"), ["confirm"]);
    assert_eq!(q["transaction"]["tcc"]["flagged"], false);
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_bounds_each_branch_call() {
    // The coordinator's own per-call timeout is long; the transaction's is one second.
    let mut core = fast_core();
    core.retry.call_timeout = Duration::from_secs(30);
    core.retry.max_attempts = 2;
    core.lease = Duration::from_secs(60);
    let tc = Tc::start_with(core, ServerConfig::default()).await;
    let p = Participant::start().await;
    p.set("a", Phase2::Block);
    let gid = tc.prepare_with(json!({ "request_timeout": 1, "retry_interval": 1 }), &p, &["a"]).await;
    assert_eq!(tc.query(&gid).await["transaction"]["request_timeout"], 1);
    assert_ok(tc.post("submit", json!({ "gid": gid, "trans_type": "tcc" })).await);
    let q = tc.flagged(&gid).await;
    let error = q["transaction"]["tcc"]["last_error"].as_str().unwrap();
    assert!(error.contains("no answer within 1000 ms"), "{error}");
    assert_eq!(q["transaction"]["status"], "submitted");
    assert_eq!(p.ops(&gid, "a").len(), 2);
    p.release();
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_to_fail_aborts_a_transaction_left_prepared() {
    let tc = Tc::start().await;
    let p = Participant::start().await;
    let gid = tc.prepare_with(json!({ "timeout_to_fail": 1 }), &p, &["a", "b"]).await;
    assert_eq!(tc.query(&gid).await["transaction"]["timeout_to_fail"], 1);
    tc.settle(&gid, "failed").await;
    assert_eq!((p.ops(&gid, "a"), p.ops(&gid, "b")), (vec!["cancel".to_owned()], vec!["cancel".to_owned()]));
    assert_failure(tc.post("submit", json!({ "gid": gid, "trans_type": "tcc" })).await, 409);
    tc.stop().await;

    // Past the deadline but before the coordinator's sweep got to it (it looks once a minute
    // here): registering and submitting are refused all the same, aborting works.
    let core = Config { poll_interval: Duration::from_secs(60), ..fast_core() };
    let tc = Tc::start_with(core, ServerConfig::default()).await;
    let gid = tc.prepare_with(json!({ "timeout_to_fail": 1 }), &p, &["a"]).await;
    let deadline = tc.query(&gid).await["transaction"]["tcc"]["deadline_ms"].as_u64().unwrap();
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let past = Duration::from_millis(deadline + 50);
    while now() < past {
        tokio::time::sleep(past.saturating_sub(now())).await;
    }
    assert_failure(tc.post("registerBranch", p.branch(&gid, "02", "b")).await, 409);
    assert_failure(tc.post("submit", json!({ "gid": gid, "trans_type": "tcc" })).await, 409);
    assert_ok(tc.post("abort", json!({ "gid": gid, "trans_type": "tcc", "wait_result": true })).await);
    assert_eq!(p.ops(&gid, "a"), ["cancel"]);
    assert!(p.ops(&gid, "b").is_empty());
    tc.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The unmodified PyPI client

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtmcli_python_client_runs_its_tcc_transactions_on_tcc() {
    let Some(python) =
        support::python_that_can("import dtmcli.tcc, dtmcli.utils", "dtmcli==1.7.7.0", "TCC_REQUIRE_DTMCLI")
            .await
    else {
        return;
    };

    let tc = Tc::start().await;
    let p = Participant::start().await;
    // flaky's confirm answers 503 FAILURE twice: retried, as DTM's server retries it.
    p.set("flaky", Phase2::Unavailable(2));
    let (stdout, stderr) = run_script(&python, "scenarios.py", &[&tc.dtm(), &p.url], 180).await;
    println!("scenarios.py:\n{stdout}{stderr}");

    let gids = scenario_gids(&stdout);
    let gid = |s: &str| gids.get(s).unwrap_or_else(|| panic!("no {s} scenario in:\n{stdout}")).clone();

    // success: dtmcli tried both, tcc confirmed both, with the data dtmcli registered.
    let g = gid("success");
    assert_eq!(p.ops(&g, "a"), ["try", "confirm"]);
    assert_eq!(p.ops(&g, "b"), ["try", "confirm"]);
    for svc in ["a", "b"] {
        let calls: Vec<Call> = p.calls(&g).into_iter().filter(|c| c.svc == svc).collect();
        let (tried, confirmed) = (&calls[0], &calls[1]);
        assert_eq!(tried.query.get("op").map(String::as_str), Some("try"));
        assert_eq!(confirmed.body, tried.body, "confirm gets the data registered with the try's body");
        assert_eq!(confirmed.query.get("branch_id"), tried.query.get("branch_id"));
        assert_eq!(confirmed.query.get("op").map(String::as_str), Some("confirm"));
        assert_eq!(confirmed.query.get("trans_type").map(String::as_str), Some("tcc"));
        assert_eq!(confirmed.method, Method::POST);
    }
    // try failure: both registered branches cancelled, the refused one too (an empty cancel).
    let g = gid("try_failure");
    assert_eq!(p.ops(&g, "a"), ["try", "cancel"]);
    assert_eq!(p.ops(&g, "b"), ["try", "cancel"]);
    let g = gid("query");
    assert_eq!(p.ops(&g, "a"), ["try", "confirm"]);
    let g = gid("flaky_confirm");
    assert_eq!(p.ops(&g, "a"), ["try", "confirm"]);
    assert_eq!(p.ops(&g, "flaky"), ["try", "confirm", "confirm", "confirm"]);
    tc.stop().await;
}

/// The unmodified `dtmcli` client runs sagas (`Saga`, and a concurrent one sent raw) and
/// messages (`Msg.prepare`/`submit`, `Msg.do_and_submit` both ways, and prepared messages the
/// coordinator resolves through `query_prepared`); the participant sees DTM's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtmcli_python_client_runs_sagas_and_messages_on_tcc() {
    let Some(python) = support::python_that_can(
        "import dtmcli.saga, dtmcli.msg, dtmcli.utils",
        "dtmcli==1.7.7.0",
        "TCC_REQUIRE_DTMCLI",
    )
    .await
    else {
        return;
    };
    // dtmcli sends request_timeout 8 s with every saga and message: the lease must outlast it.
    let tc =
        Tc::start_with(Config { lease: Duration::from_secs(30), ..fast_core() }, ServerConfig::default())
            .await;
    let p = Participant::start().await;
    let (stdout, _) = run_script(&python, "saga_msg.py", &[&tc.dtm(), &p.url], 180).await;
    let gids = scenario_gids(&stdout);
    let gid = |s: &str| gids.get(s).unwrap_or_else(|| panic!("no {s} scenario in:\n{stdout}")).clone();
    // (service, op) in call order, and each call made the way DTM's server makes it.
    let seen = |g: &str, trans_type: &str| -> Vec<(String, String)> {
        p.calls(g)
            .into_iter()
            .filter(|c| c.path_op != "query")
            .map(|c| {
                let q = |k: &str| c.query.get(k).cloned().unwrap_or_default();
                assert_eq!(c.method, Method::POST, "{c:?}");
                assert_eq!((q("trans_type").as_str(), q("op")), (trans_type, c.path_op.clone()), "{c:?}");
                assert_eq!(
                    c.body,
                    json!({ "amount": 30 }).to_string().replace(',', ", ").replace(':', ": "),
                    "{c:?}"
                );
                (c.svc.clone(), c.path_op.clone())
            })
            .collect()
    };
    let pair = |s: &str, op: &str| (s.to_owned(), op.to_owned());

    let g = gid("saga_success");
    assert_eq!(seen(&g, "saga"), [pair("a", "action"), pair("b", "action")]);
    let ids: Vec<String> = p.calls(&g).iter().map(|c| c.query["branch_id"].clone()).collect();
    assert_eq!(ids, ["01", "02"]);

    // b refused: b and a compensated in reverse order; c never ran.
    let g = gid("saga_refused");
    let calls: Vec<(String, String)> = p.calls(&g).into_iter().map(|c| (c.svc, c.path_op)).collect();
    assert_eq!(
        calls,
        [pair("a", "action"), pair("b", "action"), pair("b", "compensate"), pair("a", "compensate")]
    );

    let g = gid("saga_concurrent");
    let calls = seen(&g, "saga");
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[2], pair("c", "action"), "c runs after a and b: {calls:?}");

    for s in ["msg_submit", "msg_do_and_submit", "msg_backcheck_committed"] {
        let g = gid(s);
        let want: &[(String, String)] = if s == "msg_submit" {
            &[pair("a", "action"), pair("b", "action")]
        } else {
            &[pair("a", "action")]
        };
        assert_eq!(seen(&g, "msg"), want, "{s}");
    }
    // The aborted and rolled-back messages never called an action.
    for s in ["msg_do_and_abort", "msg_backcheck_rolledback"] {
        let g = gid(s);
        assert!(seen(&g, "msg").is_empty(), "{s}: {:?}", p.calls(&g));
    }
    // The coordinator asked the back-checks the way DTM asks them.
    for (s, svc) in [("msg_backcheck_committed", "committed"), ("msg_backcheck_rolledback", "rolledback")] {
        let g = gid(s);
        let checks: Vec<Call> = p.calls(&g).into_iter().filter(|c| c.path_op == "query").collect();
        assert!(!checks.is_empty(), "{s}");
        for c in checks {
            assert_eq!(c.method, Method::GET, "{c:?}");
            assert_eq!(c.svc, svc);
            let q = |k: &str| c.query.get(k).map(String::as_str);
            assert_eq!(
                (q("trans_type"), q("branch_id"), q("op")),
                (Some("msg"), Some("00"), Some("msg")),
                "{c:?}"
            );
        }
    }
    tc.stop().await;
}

/// Sagas and messages over raw DTM requests: bad input is refused and stores nothing, repeats
/// are answered as the first, an abort after a submit is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_and_message_bad_input_is_refused_and_repeats_are_answered() {
    let tc = Tc::start().await;
    let p = Participant::start().await;
    let step = |s: &str| json!({ "action": p.op_url(s, "action"), "compensate": p.op_url(s, "compensate") });
    let gid = tc.new_gid().await;
    let saga = |steps: Value, extra: Value| {
        let mut b = json!({ "gid": gid, "trans_type": "saga", "steps": steps, "payloads": ["{}", "{}"] });
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let bad = [
        saga(json!([step("a"), { "action": p.op_url("b", "action") }]), json!({})),
        saga(json!([step("a"), step("b")]), json!({ "payloads": ["{}"] })),
        saga(
            json!([step("a"), step("b")]),
            json!({ "custom_data": r#"{"orders":{"0":[1],"1":[0]},"concurrent":true}"# }),
        ),
        saga(
            json!([step("a"), step("b")]),
            json!({ "custom_data": r#"{"orders":{"7":[0]},"concurrent":true}"# }),
        ),
        saga(json!([step("a"), step("b")]), json!({ "custom_data": "not json" })),
        saga(
            json!([step("a"), { "action": "http://169.254.169.254/x", "compensate": p.op_url("b", "c") }]),
            json!({}),
        ),
    ];
    for body in bad {
        let (status, answer) = tc.post("submit", body.clone()).await;
        assert!(matches!(status, 400 | 422), "{status} {answer} for {body}");
        assert_eq!(answer["dtm_result"], "FAILURE");
        assert!(tc.query(&gid).await["transaction"].is_null(), "nothing stored for {body}");
    }
    // A saga is submitted, never prepared nor aborted.
    assert_failure(tc.post("prepare", json!({ "gid": gid, "trans_type": "saga" })).await, 400);
    assert_ok(tc.post("submit", saga(json!([step("a"), step("b")]), json!({}))).await);
    assert_ok(tc.post("submit", saga(json!([step("a"), step("b")]), json!({}))).await);
    tc.settle(&gid, "succeed").await;
    assert_eq!(p.ops(&gid, "a"), ["action"], "a repeated submit runs nothing again");
    assert_failure(tc.post("abort", json!({ "gid": gid, "trans_type": "saga" })).await, 400);

    // A message without its back-check URL is refused; aborted, it calls nothing; submitted
    // after an abort, it is refused.
    let m = tc.new_gid().await;
    let msg = json!({ "gid": m, "trans_type": "msg", "steps": [{ "action": p.op_url("a", "action") }], "payloads": ["{}"] });
    assert_failure(tc.post("prepare", msg.clone()).await, 400);
    let mut prepared = msg.clone();
    prepared["query_prepared"] = json!(p.op_url("committed", "query"));
    assert_ok(tc.post("prepare", prepared.clone()).await);
    assert_ok(tc.post("prepare", prepared).await);
    assert_eq!(tc.query(&m).await["transaction"]["status"], "prepared");
    assert_ok(tc.post("abort", json!({ "gid": m, "trans_type": "msg" })).await);
    assert_failure(tc.post("submit", msg).await, 409);
    assert_eq!(tc.query(&m).await["transaction"]["status"], "failed");
    assert!(p.calls(&m).is_empty());
    tc.stop().await;
}

/// A `tcc-coordinator` process on `store`, with quick retries and a retry policy that outlasts the
/// test (a short lease, so that a restarted process takes over the work of a killed one soon).
struct Process {
    child: std::process::Child,
    url: String,
}

impl Process {
    async fn spawn(port: u16, store: &str) -> Process {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tcc-coordinator"))
            .env_clear()
            .env("TCC_LISTEN", format!("127.0.0.1:{port}"))
            .env("TCC_STORE", store)
            .env("TCC_RETRY_INITIAL", "50ms")
            .env("TCC_RETRY_MAX_BACKOFF", "200ms")
            .env("TCC_RETRY_MAX_ATTEMPTS", "1000")
            .env("TCC_LEASE", "3s")
            .env("TCC_CALL_TIMEOUT", "2s")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut p = Process { child, url: format!("http://127.0.0.1:{port}") };
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        support::eventually("the coordinator to listen", SETTLE, async || {
            assert!(p.child.try_wait().unwrap().is_none(), "the coordinator exited");
            http.get(format!("{}/healthz", p.url)).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
        p
    }

    fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL on unix
        self.child.wait().unwrap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The unmodified `dtmcli` client submits a transaction whose confirm keeps answering 503 FAILURE;
/// the coordinator is killed with `kill -9` while it still fails, and restarted on the same store
/// (sled, or PostgreSQL with `TCC_TEST_STORE=postgres`). The confirm is retried before and after
/// the restart, never flagged, and the transaction succeeds once the participant recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtmcli_confirm_failing_across_a_kill_9_is_retried_until_the_participant_recovers() {
    let Some(python) =
        support::python_that_can("import dtmcli.tcc, dtmcli.utils", "dtmcli==1.7.7.0", "TCC_REQUIRE_DTMCLI")
            .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = match support::test_store(dir.path()).await {
        tcc_http::server::StoreChoice::Sled(d) => format!("sled:{}", d.display()),
        tcc_http::server::StoreChoice::Postgres(url) => url,
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let p = Participant::start().await;
    p.set("flaky", Phase2::Unavailable(u32::MAX));
    let tc = Process::spawn(port, &store).await;
    let dtm = format!("{}/api/dtmsvr", tc.url);
    let (stdout, _) = run_script(&python, "scenarios.py", &[&dtm, &p.url, "failing_confirm"], 120).await;
    let line: Value = serde_json::from_str(stdout.lines().next().unwrap_or_default()).unwrap();
    let gid = line["gid"].as_str().unwrap().to_owned();

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let query = async |gid: &str| -> Value {
        let res = http.get(format!("{dtm}/query?gid={gid}")).send().await.unwrap();
        res.json().await.unwrap()
    };
    let confirms = || p.ops(&gid, "flaky").iter().filter(|o| *o == "confirm").count();
    support::eventually("flaky's confirm to fail twice", SETTLE, async || confirms() >= 2).await;
    let q = query(&gid).await;
    assert_eq!(q["transaction"]["status"], "submitted", "{q}");
    assert_eq!(q["transaction"]["tcc"]["flagged"], false, "{q}");
    tc.kill9();

    // Still failing after the restart: retried, still not flagged.
    let before = confirms();
    let tc = Process::spawn(port, &store).await;
    support::eventually("the restarted coordinator to call confirm", SETTLE, async || {
        confirms() >= before + 2
    })
    .await;
    let q = query(&gid).await;
    assert_eq!(
        (&q["transaction"]["status"], &q["transaction"]["tcc"]["flagged"]),
        (&json!("submitted"), &json!(false)),
        "{q}"
    );

    p.set("flaky", Phase2::Ok);
    support::eventually("the transaction to succeed", SETTLE, async || {
        query(&gid).await["transaction"]["status"] == "succeed"
    })
    .await;
    let q = query(&gid).await;
    assert_eq!(q["transaction"]["tcc"]["flagged"], false, "{q}");
    // a may be confirmed again after the restart (a round's results are stored when it ends):
    // confirm is idempotent at the participant. Nothing is ever cancelled.
    for svc in ["a", "flaky"] {
        let ops = p.ops(&gid, svc);
        assert!(
            ops[0] == "try" && ops.len() > 1 && ops[1..].iter().all(|o| o == "confirm"),
            "{svc}: {ops:?}"
        );
    }
    drop(tc);
}
