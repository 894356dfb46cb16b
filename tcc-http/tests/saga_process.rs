//! Sagas and two-phase messages across a `kill -9` of the real `tcc-coordinator` process and a
//! restart on the same store: a saga killed while it retries a compensation compensates every step
//! that ran or may have run, and only those; so does one killed while an action's call is in
//! flight, that step included. Messages left prepared are resolved by their back-checks after the
//! restart, and a submitted message whose action kept failing still runs it.
//!
//! The participant is a loopback server that answers each step URL as the test says and keeps a
//! barrier of its own per (gid, step): it counts calls (attempts) and effects separately, as a
//! service behind the participant barrier would see them.
//!
//! Each test runs on the sled store; the `_on_postgres` ones run the same on PostgreSQL when
//! `TCC_TEST_POSTGRES_URL` names a test database (each in a schema of its own) and print
//! "skipped: ..." without it, unless `TCC_REQUIRE_POSTGRES=1`.
#![allow(clippy::unwrap_used)]

#[path = "support/coordinator_process.rs"]
mod coordinator_process;
mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::any;
use coordinator_process::{CoordinatorProcess, free_port};
use support::eventually;
use tcc_http::client::TccClient;
use tcc_http::server::native::{BranchStateView, StateView, TransactionView};

const LONG: Duration = Duration::from_secs(20);
const BIN: &str = env!("CARGO_BIN_EXE_tcc-coordinator");

/// Where a coordinator keeps its transactions; a restart opens the same.
#[derive(Clone, Debug)]
enum Store {
    Sled(std::path::PathBuf),
    Postgres(String),
}

/// The binary on `port` and `store`, never giving up within a test (so a saga that cannot finish
/// shows as still running, not flagged).
async fn spawn(logs: &std::path::Path, port: u16, store: &Store) -> CoordinatorProcess {
    let store = match store {
        Store::Sled(dir) => ("TCC_DATA_DIR", dir.to_str().unwrap().to_owned()),
        Store::Postgres(url) => ("TCC_STORE", url.clone()),
    };
    let env = [(store.0, store.1.as_str()), ("TCC_RETRY_MAX_ATTEMPTS", "1000")];
    CoordinatorProcess::spawn(BIN, logs, port, &env).await
}

/// One call the participant received.
#[derive(Clone, Debug)]
struct Call {
    gid: String,
    branch: String,
    /// `svc/op`: `op` is `do` (an action), `undo` (its compensation) or `check` (a back-check).
    path: String,
    /// What it answered; 0 for no answer.
    status: u16,
}

/// What the participant's barrier holds for one (gid, step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Row {
    /// The action's effect is in place.
    Done,
    /// Compensated: the effect undone, or never made (an empty compensation, after which a late
    /// action does nothing).
    Compensated,
}

#[derive(Debug, Default)]
struct Ledger {
    /// The status each path answers: 200 unless set (a back-check 425, "don't know").
    answers: HashMap<String, u16>,
    /// How many more calls of a path answer 503 before its answer applies.
    flaky: HashMap<String, u32>,
    /// Paths whose next call makes its effect and then never answers: the answer is lost.
    lose_answer: HashSet<String>,
    calls: Vec<Call>,
    rows: HashMap<(String, String), Row>,
    /// (gid, step, path) of each effect made: an action's business write or its undoing.
    effects: Vec<(String, String, String)>,
}

impl Ledger {
    /// A successful call as the barrier takes it: an action has an effect once, and none after a
    /// compensation; a compensation undoes only an effect in place.
    fn apply(&mut self, gid: &str, branch: &str, path: &str) {
        let key = (gid.to_owned(), branch.to_owned());
        let row = self.rows.get(&key).copied();
        // An empty compensation (nothing to undo) still leaves its row, so a late action does
        // nothing; a duplicate, a late action or a back-check changes nothing.
        let (next, effect) = match (path.rsplit('/').next(), row) {
            (Some("do"), None) => (Row::Done, true),
            (Some("undo"), Some(Row::Done)) => (Row::Compensated, true),
            (Some("undo"), None) => (Row::Compensated, false),
            _ => return,
        };
        self.rows.insert(key, next);
        if effect {
            self.effects.push((gid.to_owned(), branch.to_owned(), path.to_owned()));
        }
    }
}

/// A participant of saga steps, message actions and back-checks at `{url}/{svc}/{op}`.
struct Steps {
    url: String,
    ledger: Arc<Mutex<Ledger>>,
}

async fn serve(
    State(ledger): State<Arc<Mutex<Ledger>>>,
    Path((svc, op)): Path<(String, String)>,
    headers: HeaderMap,
) -> StatusCode {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let (gid, branch, path) = (h("tcc-gid"), h("tcc-branch"), format!("{svc}/{op}"));
    let status = {
        let mut l = ledger.lock().unwrap();
        let lost = l.lose_answer.remove(&path);
        let status = match l.flaky.get_mut(&path) {
            _ if lost => None,
            Some(left) if *left > 0 => {
                *left -= 1;
                Some(503)
            }
            _ => Some(l.answers.get(&path).copied().unwrap_or(if op == "check" { 425 } else { 200 })),
        };
        if status.is_none_or(|s| (200..300).contains(&s)) {
            l.apply(&gid, &branch, &path);
        }
        l.calls.push(Call { gid, branch, path, status: status.unwrap_or(0) });
        status
    };
    match status {
        Some(status) => StatusCode::from_u16(status).unwrap(),
        None => {
            tokio::time::sleep(LONG * 2).await; // the caller is gone long before
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

impl Steps {
    async fn start() -> Steps {
        let ledger: Arc<Mutex<Ledger>> = Arc::default();
        let app = Router::new().route("/{svc}/{op}", any(serve)).with_state(ledger.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            tcc_http::serve::serve(listener, app, &Default::default(), std::future::pending()).await
        });
        Steps { url, ledger }
    }

    fn at(&self, path: &str) -> String {
        format!("{}/{path}", self.url)
    }

    /// `path` answers `status` from now on.
    fn answer(&self, path: &str, status: u16) {
        self.ledger.lock().unwrap().answers.insert(path.to_owned(), status);
    }

    /// The next call of `path` makes its effect, and its answer is lost: it never comes.
    fn lose_next_answer(&self, path: &str) {
        self.ledger.lock().unwrap().lose_answer.insert(path.to_owned());
    }

    /// The next `n` calls of `path` answer 503.
    fn fail_next(&self, path: &str, n: u32) {
        self.ledger.lock().unwrap().flaky.insert(path.to_owned(), n);
    }

    /// The calls of `path` for `gid`, in order.
    fn calls(&self, gid: &str, path: &str) -> Vec<Call> {
        let l = self.ledger.lock().unwrap();
        l.calls.iter().filter(|c| c.gid == gid && c.path == path).cloned().collect()
    }

    fn attempts(&self, gid: &str, path: &str) -> usize {
        self.calls(gid, path).len()
    }

    /// Every call made for `gid`, as `svc/op`, in order.
    fn paths(&self, gid: &str) -> Vec<String> {
        let l = self.ledger.lock().unwrap();
        l.calls.iter().filter(|c| c.gid == gid).map(|c| c.path.clone()).collect()
    }

    fn effects(&self, gid: &str, path: &str) -> usize {
        let l = self.ledger.lock().unwrap();
        l.effects.iter().filter(|e| e.0 == gid && e.2 == path).count()
    }
}

/// The transaction as the coordinator's native `GET /v1/transactions/{gid}` shows it.
async fn get(tc: &CoordinatorProcess, gid: &str) -> TransactionView {
    let res = reqwest::get(format!("{}/v1/transactions/{gid}", tc.url)).await.unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

fn branch_states(tx: &TransactionView) -> Vec<(String, BranchStateView)> {
    tx.branches.iter().map(|b| (b.branch.clone(), b.state)).collect()
}

/// A three-step saga whose second action refuses: the first step's compensation keeps failing
/// while the coordinator is killed, and only succeeds once a restarted coordinator retries it.
async fn mid_compensation(store: &Store, logs: &std::path::Path) {
    let port = free_port();
    let p = Steps::start().await;
    p.answer("ship/do", 409); // a refusal: the saga turns back
    p.answer("pay/undo", 503);
    let mut tc = spawn(logs, port, store).await;
    let client = TccClient::remote(&tc.url, None).unwrap();
    let saga = client
        .saga(Duration::from_secs(60))
        .step(&p.at("pay/do"), &p.at("pay/undo"), r#"{"amount":120}"#)
        .step(&p.at("ship/do"), &p.at("ship/undo"), r#"{"parcel":7}"#)
        .step(&p.at("mail/do"), &p.at("mail/undo"), r#"{"to":"ada"}"#)
        .submit()
        .await
        .unwrap();
    let gid = saga.gid.clone();
    eventually("step 1's compensation to be tried", LONG, async || p.attempts(&gid, "pay/undo") >= 1).await;
    assert_eq!(get(&tc, &gid).await.state, StateView::Cancelling);
    tc.kill9();

    let before = p.attempts(&gid, "pay/undo");
    let tc = spawn(logs, port, store).await;
    eventually("the restarted coordinator to retry step 1's compensation", LONG, async || {
        p.attempts(&gid, "pay/undo") > before
    })
    .await;
    p.answer("pay/undo", 200);
    let done = client.wait(&gid.parse().unwrap(), LONG).await.unwrap();
    assert_eq!(done.state, StateView::Cancelled, "{done:?}\nlog:\n{}", tc.log());
    let seen = get(&tc, &gid).await;
    assert_eq!((seen.state, seen.kind), (StateView::Cancelled, tcc_http::server::native::KindView::Saga));
    assert_eq!(
        branch_states(&seen),
        [
            ("01".to_owned(), BranchStateView::Cancelled),
            ("02".to_owned(), BranchStateView::Cancelled),
            ("03".to_owned(), BranchStateView::Registered)
        ]
    );

    // Step 1 ran, so it is compensated: retried across the restart, undone exactly once.
    assert_eq!(p.effects(&gid, "pay/do"), 1);
    let undo = p.calls(&gid, "pay/undo");
    assert!(undo.len() >= 2, "{undo:?}");
    assert!(undo.iter().all(|c| c.branch == "01"), "{undo:?}");
    assert_eq!(undo.last().map(|c| c.status), Some(200), "{undo:?}");
    assert_eq!(p.effects(&gid, "pay/undo"), 1);
    // Step 2 refused, but may have done something: its compensation is called (empty here), and
    // before step 1's, in reverse order.
    assert!(p.attempts(&gid, "ship/undo") >= 1);
    assert_eq!((p.effects(&gid, "ship/do"), p.effects(&gid, "ship/undo")), (0, 0));
    let paths = p.paths(&gid);
    let first = |path: &str| paths.iter().position(|p| p == path).unwrap();
    assert!(first("ship/undo") < first("pay/undo"), "{paths:?}");
    // Step 3 never started: neither its action nor its compensation is ever called.
    assert!(!paths.iter().any(|p| p.starts_with("mail/")), "{paths:?}");
}

/// A saga killed while its second action is in flight: the participant made the effect, but the
/// answer is lost with the coordinator. After the restart the action keeps failing until the
/// saga's deadline passes, so it turns back, and the step whose answer was lost is compensated too
/// (it may have run; here it did).
async fn action_in_flight(store: &Store, logs: &std::path::Path) {
    let port = free_port();
    let p = Steps::start().await;
    p.lose_next_answer("ship/do");
    p.answer("ship/do", 503);
    let mut tc = spawn(logs, port, store).await;
    let client = TccClient::remote(&tc.url, None).unwrap();
    let saga = client
        .saga(Duration::from_secs(4))
        .step(&p.at("pay/do"), &p.at("pay/undo"), r#"{"amount":120}"#)
        .step(&p.at("ship/do"), &p.at("ship/undo"), r#"{"parcel":7}"#)
        .step(&p.at("mail/do"), &p.at("mail/undo"), r#"{"to":"ada"}"#)
        .submit()
        .await
        .unwrap();
    let gid = saga.gid.clone();
    eventually("step 2's action to be called", LONG, async || p.attempts(&gid, "ship/do") >= 1).await;
    tc.kill9();

    let tc = spawn(logs, port, store).await;
    let done = client.wait(&gid.parse().unwrap(), LONG).await.unwrap();
    assert_eq!(done.state, StateView::Cancelled, "{done:?}\nlog:\n{}", tc.log());
    let seen = get(&tc, &gid).await;
    assert_eq!(
        branch_states(&seen),
        [
            ("01".to_owned(), BranchStateView::Cancelled),
            ("02".to_owned(), BranchStateView::Cancelled),
            ("03".to_owned(), BranchStateView::Registered)
        ]
    );
    // Both effects made are undone, once each, step 2's first.
    assert_eq!((p.effects(&gid, "pay/do"), p.effects(&gid, "pay/undo")), (1, 1));
    assert_eq!((p.effects(&gid, "ship/do"), p.effects(&gid, "ship/undo")), (1, 1));
    let paths = p.paths(&gid);
    let first = |path: &str| paths.iter().position(|p| p == path).unwrap();
    assert!(first("ship/undo") < first("pay/undo"), "{paths:?}");
    assert!(!paths.iter().any(|p| p.starts_with("mail/")), "{paths:?}");
}

/// Two messages left prepared and a submitted one whose action keeps failing, across a kill:
/// after the restart the back-checks decide the prepared ones, and every submitted action runs.
async fn prepared_messages(store: &Store, logs: &std::path::Path) {
    let port = free_port();
    let p = Steps::start().await;
    p.answer("committed/check", 200);
    p.answer("rolledback/check", 409);
    p.answer("late/do", 503);
    p.fail_next("mail/do", 2); // the committed message's second action fails twice, then works
    let mut tc = spawn(logs, port, store).await;
    let client = TccClient::remote(&tc.url, None).unwrap();

    let sent = client.message(Duration::from_secs(60)).add(&p.at("late/do"), "{}").submit().await.unwrap();
    let late = sent.gid.clone();
    eventually("the submitted message's action to be tried", LONG, async || {
        p.attempts(&late, "late/do") >= 1
    })
    .await;
    // Prepared, then the initiator and the coordinator both die before either is submitted or
    // aborted; their deadlines pass while the coordinator is down or just after it is back.
    let prepare = async |check: &str| {
        let msg = client
            .message(Duration::from_secs(3))
            .add(&p.at("points/do"), r#"{"points":120}"#)
            .add(&p.at("mail/do"), r#"{"to":"ada"}"#)
            .prepare(&p.at(check))
            .await
            .unwrap();
        msg.gid().to_string()
    };
    let committed = prepare("committed/check").await;
    let rolled_back = prepare("rolledback/check").await;
    assert_eq!(p.paths(&committed).len() + p.paths(&rolled_back).len(), 0, "nothing runs while prepared");
    tc.kill9();

    let before = p.attempts(&late, "late/do");
    let tc = spawn(logs, port, store).await;
    eventually("the restarted coordinator to retry the submitted action", LONG, async || {
        p.attempts(&late, "late/do") > before
    })
    .await;
    p.answer("late/do", 200);

    let wait = async |gid: &str| client.wait(&gid.parse().unwrap(), LONG).await.unwrap();
    let (a, b, c) = (wait(&committed).await, wait(&rolled_back).await, wait(&late).await);
    let log = tc.log();
    assert_eq!(a.state, StateView::Confirmed, "{a:?}\nlog:\n{log}");
    assert_eq!(b.state, StateView::Cancelled, "{b:?}\nlog:\n{log}");
    assert_eq!(c.state, StateView::Confirmed, "{c:?}\nlog:\n{log}");
    for (gid, state) in [(&committed, StateView::Confirmed), (&rolled_back, StateView::Cancelled)] {
        let seen = get(&tc, gid).await;
        assert_eq!((seen.state, seen.kind), (state, tcc_http::server::native::KindView::Msg));
    }

    // Committed: each action called until it succeeded, in order, with one effect each.
    assert!(p.attempts(&committed, "committed/check") >= 1, "the back-check was asked");
    let paths: Vec<String> = p.paths(&committed).into_iter().filter(|p| p != "committed/check").collect();
    assert_eq!(paths.first().map(String::as_str), Some("points/do"), "{paths:?}");
    assert!(paths[1..].iter().all(|p| p == "mail/do"), "{paths:?}");
    assert_eq!(p.calls(&committed, "mail/do").last().map(|c| c.status), Some(200));
    assert!(p.attempts(&committed, "mail/do") >= 3, "{paths:?}");
    assert_eq!((p.effects(&committed, "points/do"), p.effects(&committed, "mail/do")), (1, 1));
    // Rolled back: asked, and no action ever called.
    assert!(p.attempts(&rolled_back, "rolledback/check") >= 1, "the back-check was asked");
    let paths = p.paths(&rolled_back);
    assert!(paths.iter().all(|p| p == "rolledback/check"), "{paths:?}");
    // Submitted before the kill: its failing action ran once it could, with one effect.
    assert!(p.attempts(&late, "late/do") >= 2);
    assert_eq!(p.calls(&late, "late/do").last().map(|c| c.status), Some(200));
    assert_eq!(p.effects(&late, "late/do"), 1);
    assert!(p.paths(&late).iter().all(|p| p == "late/do"), "a submitted message is never back-checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_compensation_then_restart_compensates_every_started_step() {
    let dir = tempfile::tempdir().unwrap();
    mid_compensation(&Store::Sled(dir.path().join("data")), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_a_saga_action_in_flight_then_the_deadline_compensates_it_too() {
    let dir = tempfile::tempdir().unwrap();
    action_in_flight(&Store::Sled(dir.path().join("data")), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_a_prepared_message_then_restart_resolves_it_by_back_check() {
    let dir = tempfile::tempdir().unwrap();
    prepared_messages(&Store::Sled(dir.path().join("data")), dir.path()).await;
}

/// A fresh schema of the test database, or `None` after saying the test is skipped.
#[cfg(feature = "postgres")]
async fn postgres() -> Option<Store> {
    let url = tcc_core::store::postgres::test_database_url()?;
    Some(Store::Postgres(tcc_core::store::postgres::create_scratch_schema(&url, "tcc_test").await.unwrap()))
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_compensation_then_restart_compensates_every_started_step_on_postgres() {
    let Some(store) = postgres().await else { return };
    let dir = tempfile::tempdir().unwrap();
    mid_compensation(&store, dir.path()).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_a_prepared_message_then_restart_resolves_it_by_back_check_on_postgres() {
    let Some(store) = postgres().await else { return };
    let dir = tempfile::tempdir().unwrap();
    prepared_messages(&store, dir.path()).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_a_saga_action_in_flight_then_the_deadline_compensates_it_too_on_postgres() {
    let Some(store) = postgres().await else { return };
    let dir = tempfile::tempdir().unwrap();
    action_in_flight(&store, dir.path()).await;
}
