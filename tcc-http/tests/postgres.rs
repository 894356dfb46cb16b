//! Several coordinators on one PostgreSQL database, active-active: three `tcc-coordinator`
//! processes share the transactions, one is killed with SIGKILL in the middle of phase two and the
//! other two finish every transaction once its leases end; two coordinators racing to decide one
//! transaction agree on one decision; the database password never reaches a log or `--help`.
//!
//! They need `TCC_TEST_POSTGRES_URL` (a `postgres://` URL of a test database; each test works in a
//! schema of its own) and print "skipped: ..." without it, unless `TCC_REQUIRE_POSTGRES=1`.
#![allow(clippy::unwrap_used)]

#[path = "support/coordinator_process.rs"]
mod coordinator_process;
mod support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::post;
use coordinator_process::{CoordinatorProcess, free_port};
use support::{Mode, Participant, eventually, fast_core};
use tcc_http::client::TccClient;
use tcc_http::protocol::{
    BATCH_PATH, BatchAnswer, BatchRequest, BatchResult, TRIES_PATH, TryBatch, TryBatchAnswer, TryResult,
};
use tcc_http::server::native::StateView;
use tcc_http::server::{Launch, ServerConfig, StoreChoice};

const LONG: Duration = Duration::from_secs(60);
const BIN: &str = env!("CARGO_BIN_EXE_tcc-coordinator");

/// A fresh schema's URL in the test database, or `None` after saying the test is skipped.
async fn scratch_url() -> Option<String> {
    let url = tcc_core::store::postgres::test_database_url()?;
    Some(tcc_core::store::postgres::create_scratch_schema(&url, "tcc_test").await.unwrap())
}

/// A `tcc-coordinator` process on a free port, its log under `dir`, `env` its settings (the store).
async fn spawn(dir: &std::path::Path, env: &[(&str, &str)]) -> CoordinatorProcess {
    let mut env = env.to_vec();
    env.push(("TCC_RETRY_MAX_ATTEMPTS", "1000"));
    CoordinatorProcess::spawn(BIN, dir, free_port(), &env).await
}

/// (gid, branch) -> phases called, in order.
type Calls = HashMap<(String, String), Vec<String>>;

/// A participant whose phase-two answers wait behind a gate, recording every call.
#[derive(Clone, Default)]
struct Gated {
    open: Arc<tokio::sync::watch::Sender<bool>>,
    calls: Arc<Mutex<Calls>>,
}

async fn gated(
    State(g): State<Gated>,
    Path((_op, phase)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    // A batch of tries: each try recorded as its single try would be, answered at once.
    if phase == TRIES_PATH {
        let Ok(tries) = serde_json::from_slice::<TryBatch>(&body) else {
            return axum::http::StatusCode::BAD_REQUEST.into_response();
        };
        let mut calls = g.calls.lock().unwrap();
        for t in &tries.tries {
            calls.entry((t.gid.clone(), t.branch.clone())).or_default().push("try".to_owned());
        }
        let results = tries.tries.iter().map(|_| TryResult::done(b"try ok".to_vec())).collect();
        return axum::Json(TryBatchAnswer { results }).into_response();
    }
    // A phase-two batch: each call recorded as its single call would be, answered behind the gate.
    let batch = (phase == BATCH_PATH).then(|| serde_json::from_slice::<BatchRequest>(&body).ok()).flatten();
    {
        let mut calls = g.calls.lock().unwrap();
        match &batch {
            Some(batch) => {
                for c in &batch.calls {
                    calls.entry((c.gid.clone(), c.branch.clone())).or_default().push(c.phase().to_owned());
                }
            }
            None => {
                let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                calls.entry((h("tcc-gid"), h("tcc-branch"))).or_default().push(phase.clone());
            }
        }
    }
    if phase != "try" {
        let mut open = g.open.subscribe();
        // Bounded: a call still waiting after this answers anyway.
        let _ = tokio::time::timeout(LONG, open.wait_for(|o| *o)).await;
    }
    match batch {
        Some(batch) => {
            let done = || BatchResult { status: 200, outcome: Some("done".into()), error: None };
            axum::Json(BatchAnswer { results: batch.calls.iter().map(|_| done()).collect() }).into_response()
        }
        None => format!("{phase} ok").into_response(),
    }
}

impl Gated {
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/tcc/{op}/{phase}", post(gated)).with_state(self.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}/tcc")
    }

    fn phases(&self, gid: &str, branch: &str) -> Vec<String> {
        self.calls.lock().unwrap().get(&(gid.to_owned(), branch.to_owned())).cloned().unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_coordinators_finish_every_transaction_when_one_is_killed_mid_phase_two() {
    let Some(store) = scratch_url().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let participant = Gated::default();
    let base = participant.start().await;
    let mut nodes = Vec::new();
    for owner in ["node-a", "node-b", "node-c"] {
        nodes.push(spawn(dir.path(), &[("TCC_STORE", &store), ("TCC_OWNER", owner)]).await);
    }
    let clients: Vec<TccClient> = nodes.iter().map(|n| TccClient::remote(&n.url, None).unwrap()).collect();

    // Transactions spread over the three; every fourth is cancelled. Phase two waits at the gate.
    let mut txs = Vec::new();
    for i in 0..24 {
        let client = &clients[i % 3];
        let tx = client.begin(LONG).await.unwrap();
        tx.try_branch("flight", &format!("{base}/seat"), b"1A".to_vec()).await.unwrap();
        tx.try_branch("hotel", &format!("{base}/room"), b"7".to_vec()).await.unwrap();
        let (decided, expected, phase) = if i % 4 == 3 {
            (tx.cancel().await.unwrap(), StateView::Cancelled, "cancel")
        } else {
            (tx.confirm().await.unwrap(), StateView::Confirmed, "confirm")
        };
        assert!(matches!(decided.state, StateView::Confirming | StateView::Cancelling));
        txs.push((tx.gid().clone(), i % 3, expected, phase));
    }
    // node-a is in the middle of phase two for every one of its transactions: kill it there.
    eventually("node-a's phase-two calls", LONG, async || {
        txs.iter().filter(|t| t.1 == 0).all(|(gid, _, _, phase)| {
            ["flight", "hotel"].iter().all(|b| participant.phases(gid.as_str(), b).iter().any(|p| p == phase))
        })
    })
    .await;
    nodes[0].kill9();
    participant.open.send_replace(true);

    // node-b and node-c finish everything, node-a's transactions once its leases end.
    for (gid, node, expected, phase) in &txs {
        let done = clients[1].wait(gid, LONG).await.unwrap();
        assert_eq!(done.state, *expected, "{gid} begun on node {node}\nnode-b:\n{}", nodes[1].log());
        for branch in ["flight", "hotel"] {
            let phases = participant.phases(gid.as_str(), branch);
            assert_eq!(phases.first().map(String::as_str), Some("try"), "{gid} {branch}");
            assert!(phases.iter().skip(1).all(|p| p == phase), "{gid} {branch}: {phases:?}");
        }
    }
    let a_txs: Vec<_> = txs.iter().filter(|t| t.1 == 0).collect();
    assert!(!a_txs.is_empty());
    for (gid, ..) in a_txs {
        // Every branch of node-a's transactions was called again after the kill, by someone else.
        for branch in ["flight", "hotel"] {
            assert!(participant.phases(gid.as_str(), branch).len() >= 3, "{gid} {branch}");
        }
    }
    for node in nodes.drain(1..) {
        let (_, log) = node.terminate();
        assert!(!log.contains("panicked"), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_racing_to_decide_one_transaction_agree_on_one_decision() {
    let Some(store) = scratch_url().await else { return };
    let start = |owner: &str| {
        server_on(
            StoreChoice::Postgres(store.clone()),
            tcc_core::Config { owner: owner.into(), ..fast_core() },
        )
    };
    let (a, b) = (start("node-a").await, start("node-b").await);
    let participant = Participant::start(Mode::Healthy).await;
    let client = TccClient::remote(&a.url(), None).unwrap();
    let http = reqwest::Client::new();
    let mut outcomes = HashMap::new();
    for _ in 0..30 {
        let tx = client.begin(LONG).await.unwrap();
        tx.try_branch("flight", &participant.target("seat"), b"1A".to_vec()).await.unwrap();
        let gid = tx.gid().to_string();
        let confirm = http.post(format!("{}/v1/transactions/{gid}/confirm", a.url())).send();
        let cancel = http.post(format!("{}/v1/transactions/{gid}/cancel", b.url())).send();
        let (confirm, cancel) = tokio::join!(confirm, cancel);
        let (confirm, cancel) = (confirm.unwrap().status().as_u16(), cancel.unwrap().status().as_u16());
        let (expected, phase) = match (confirm, cancel) {
            (200, 409) => (StateView::Confirmed, "confirm"),
            (409, 200) => (StateView::Cancelled, "cancel"),
            other => panic!("exactly one decision must win, got {other:?}"),
        };
        let done = client.wait(tx.gid(), LONG).await.unwrap();
        assert_eq!(done.state, expected);
        assert_eq!(participant.phases(&gid), ["try", phase]);
        *outcomes.entry(phase).or_insert(0) += 1;
    }
    println!("decisions won: {outcomes:?}");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

async fn server_on(store: StoreChoice, core: tcc_core::Config) -> tcc_http::server::Running {
    tcc_http::server::start(Launch {
        listen: "127.0.0.1:0".into(),
        store,
        core,
        server: ServerConfig::default(),
        client: Default::default(),
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_password_never_reaches_the_logs_or_the_help() {
    let Some(store) = scratch_url().await else { return };
    let secret = "pw-7c1d9e04b3";
    // The test database trusts loopback, so it accepts any password: the URL carries one anyway.
    let (scheme, rest) = store.split_once("://").unwrap();
    let (user, host) = rest.split_once('@').unwrap();
    assert!(!user.contains(':'), "the test URL has a password already");
    let with_password = format!("{scheme}://{user}:{secret}@{host}");
    let dir = tempfile::tempdir().unwrap();
    let node = spawn(dir.path(), &[("TCC_STORE", &with_password), ("RUST_LOG", "trace")]).await;
    let client = TccClient::remote(&node.url, None).unwrap();
    let tx = client.begin(LONG).await.unwrap();
    tx.cancel().await.unwrap();
    let (_, log) = node.terminate();
    assert!(log.contains("tcc-coordinator listening"), "{log}");
    assert!(log.contains(&format!("postgres://{user}@")), "the store is named in the log:\n{log}");
    assert!(!log.contains(secret), "the password appears in the log");

    let help = Command::new(BIN).arg("--help").env("TCC_STORE", &with_password).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("--store") && help.contains("TCC_STORE"), "{help}");
    assert!(!help.contains(secret), "--help shows the password");
    let bad = format!("postgres://tcc:{secret}@127.0.0.1:notaport/tcc");
    let out = Command::new(BIN).args(["--store", &bad]).env_clear().stderr(Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("--store") && !stderr.contains(secret), "{stderr}");
}

#[test]
fn store_and_data_dir_together_are_refused() {
    let out = Command::new(BIN)
        .args(["--store", "sled:/tmp/a", "--data-dir", "/tmp/b"])
        .env_clear()
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("both name a store"), "{stderr}");
}
