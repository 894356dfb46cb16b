//! Shared helpers of the end-to-end tests: a scriptable participant on a loopback port, coordinators
//! in both modes, and bounded waiting.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tcc_core::{Config, ManualClock, RetryPolicy};
use tcc_http::ErrorBody;
use tcc_http::client::TccClient;
use tcc_http::protocol::{
    BATCH_PATH, BatchAnswer, BatchRequest, BatchResult, TRIES_PATH, TryBatch, TryBatchAnswer, TryResult,
};
use tcc_http::server::{self, AppState, Launch, Running, ServerConfig, StoreChoice};
use tcc_http::target::AllowList;

/// How a [`Participant`] answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 200 to everything.
    Healthy,
    /// 409 to tries (a business refusal); 200 to confirm and cancel.
    RefuseTry,
    /// 200 to tries, 503 to confirm and cancel.
    FailPhaseTwo,
    /// 200 to tries, a 307 redirect to confirm and cancel.
    Redirect,
}

#[derive(Debug)]
pub struct Shared {
    pub mode: Mutex<Mode>,
    /// (gid, branch, phase, deadline header) of every call, in order (a batched call or try as its
    /// single call would be).
    pub calls: Mutex<Vec<(String, String, String, String)>>,
}

/// A participant whose answers a test scripts, recording every call.
#[derive(Debug)]
pub struct Participant {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    Path((op, phase)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let _ = op;
    if phase == BATCH_PATH {
        return batch(&shared, &body);
    }
    if phase == TRIES_PATH {
        return tries(&shared, &body);
    }
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    shared.calls.lock().unwrap().push((h("tcc-gid"), h("tcc-branch"), phase.clone(), h("tcc-deadline")));
    let mode = *shared.mode.lock().unwrap();
    match (mode, phase.as_str()) {
        (Mode::RefuseTry, "try") => {
            (StatusCode::CONFLICT, axum::Json(serde_json::json!({"code": "refused", "message": "sold out"})))
                .into_response()
        }
        (Mode::FailPhaseTwo, "confirm" | "cancel") => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        (Mode::Redirect, "confirm" | "cancel") => {
            (StatusCode::TEMPORARY_REDIRECT, [("location", "http://127.0.0.1:9/elsewhere")]).into_response()
        }
        _ => (StatusCode::OK, format!("{phase} ok")).into_response(),
    }
}

/// A phase-two batch: each call recorded as its single call would be, and answered as the mode
/// says (a redirect answers the whole batch, so the coordinator sends the calls alone).
fn batch(shared: &Shared, body: &[u8]) -> Response {
    let mode = *shared.mode.lock().unwrap();
    if mode == Mode::Redirect {
        return (StatusCode::TEMPORARY_REDIRECT, [("location", "http://127.0.0.1:9/elsewhere")])
            .into_response();
    }
    let Ok(request) = serde_json::from_slice::<BatchRequest>(body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut calls = shared.calls.lock().unwrap();
    let results = request
        .calls
        .into_iter()
        .map(|c| {
            calls.push((c.gid.clone(), c.branch.clone(), c.phase().to_owned(), c.deadline.to_string()));
            match mode {
                Mode::FailPhaseTwo => BatchResult {
                    status: 503,
                    outcome: None,
                    error: Some(ErrorBody { code: "storage".into(), message: "down".into(), detail: None }),
                },
                _ => BatchResult { status: 200, outcome: Some("done".into()), error: None },
            }
        })
        .collect();
    axum::Json(BatchAnswer { results }).into_response()
}

/// A batch of tries: each try recorded as its single try would be, and answered as the mode says.
fn tries(shared: &Shared, body: &[u8]) -> Response {
    let mode = *shared.mode.lock().unwrap();
    let Ok(batch) = serde_json::from_slice::<TryBatch>(body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut calls = shared.calls.lock().unwrap();
    let results = batch
        .tries
        .into_iter()
        .map(|t| {
            calls.push((t.gid.clone(), t.branch.clone(), "try".to_owned(), t.deadline.to_string()));
            match mode {
                Mode::RefuseTry => TryResult {
                    status: 409,
                    body: None,
                    bytes: None,
                    error: Some(ErrorBody {
                        code: "refused".into(),
                        message: "sold out".into(),
                        detail: None,
                    }),
                },
                _ => TryResult::done(b"try ok".to_vec()),
            }
        })
        .collect();
    axum::Json(TryBatchAnswer { results }).into_response()
}

impl Participant {
    pub async fn start(mode: Mode) -> Participant {
        Participant::start_on(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Shared { mode: Mutex::new(mode), calls: Mutex::default() }),
        )
        .await
    }

    async fn start_on(addr: SocketAddr, shared: Arc<Shared>) -> Participant {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/tcc/{op}/{phase}", post(handle)).with_state(shared.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let limits = tcc_http::serve::Limits::default();
            let _ = tcc_http::serve::serve(listener, app, &limits, async move {
                let _ = stopped.await;
            })
            .await;
        });
        Participant { addr, shared, stop: Some(stop), task: Some(task) }
    }

    /// The target URL of operation `op`.
    pub fn target(&self, op: &str) -> String {
        format!("http://{}/tcc/{op}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// The phases called for `gid`, in order.
    pub fn phases(&self, gid: &str) -> Vec<String> {
        self.shared.calls.lock().unwrap().iter().filter(|c| c.0 == gid).map(|c| c.2.clone()).collect()
    }

    pub fn calls(&self) -> Vec<(String, String, String, String)> {
        self.shared.calls.lock().unwrap().clone()
    }

    /// Stops listening (connections closed): the participant is down.
    pub async fn down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Listens again on the same port.
    pub async fn up(&mut self) {
        let again = Participant::start_on(self.addr, self.shared.clone()).await;
        *self = again;
    }
}

/// Engine settings that retry quickly, so tests do not wait for the default half-second backoff.
pub fn fast_core() -> Config {
    Config {
        retry: RetryPolicy {
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            call_timeout: Duration::from_secs(2),
            ..RetryPolicy::default()
        },
        poll_interval: Duration::from_millis(10),
        lease: Duration::from_secs(5),
        ..Config::default()
    }
}

/// Where the coordinator runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Where {
    Embedded,
    Standalone,
}

pub const BOTH: [Where; 2] = [Where::Embedded, Where::Standalone];

/// A coordinator in one of the two modes and a client of it.
#[derive(Debug)]
pub struct Tcc {
    pub client: TccClient,
    pub server: Option<Server>,
    pub dir: tempfile::TempDir,
}

/// A standalone coordinator: started by [`server::start`], or served the same way with its engine on
/// a clock the test moves by hand ([`Server::on_clock`]).
#[derive(Debug)]
pub enum Server {
    Started(Running),
    OnClock {
        addr: SocketAddr,
        state: Arc<AppState>,
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    },
}

impl Server {
    /// What [`server::start`] does (the router on a loopback port, the engine calling participants
    /// over HTTP), with the engine on `clock`: deadlines pass when the test says, never because
    /// the machine was slow, and the scheduler runs only when its sleep on `clock` ends.
    pub async fn on_clock(
        store: StoreChoice,
        core: Config,
        server: ServerConfig,
        clock: ManualClock,
    ) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let coordinator = Arc::new(engine(store, core, server.allow.clone(), clock).await.0);
        let metrics = Arc::new(tcc_http::metrics::Metrics::default());
        let state = Arc::new(AppState { coordinator, config: server, metrics });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(listener, server::router(state.clone()), async move {
            let _ = stopped.await;
        }));
        Server::OnClock { addr, state, stop, task }
    }

    /// The served state (engine, settings, metrics).
    pub fn state(&self) -> &Arc<AppState> {
        match self {
            Server::Started(running) => &running.state,
            Server::OnClock { state, .. } => state,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Server::Started(running) => running.addr,
            Server::OnClock { addr, .. } => *addr,
        }
    }

    pub async fn stop(self) -> std::io::Result<()> {
        match self {
            Server::Started(running) => running.stop().await,
            Server::OnClock { stop, task, .. } => {
                let _ = stop.send(());
                task.await.map_err(std::io::Error::other)?
            }
        }
    }
}

/// An engine on `store` and `clock` calling participants over HTTP (the URLs `allow` permits), and
/// the HTTP client it calls them with.
async fn engine(
    store: StoreChoice,
    core: Config,
    allow: AllowList,
    clock: ManualClock,
) -> (tcc_core::Coordinator, reqwest::Client) {
    let http = tcc_http::transport::build_client(&Default::default()).unwrap();
    let metrics = Arc::new(tcc_http::metrics::Metrics::default());
    let transport = tcc_http::transport::HttpTransport::new(http.clone(), allow, metrics);
    let store = store.open().await.unwrap();
    let tc = tcc_core::Coordinator::open(store, Arc::new(transport), Arc::new(clock), core).await.unwrap();
    (tc, http)
}

impl Tcc {
    pub async fn start(mode: Where) -> Tcc {
        Tcc::start_with(mode, fast_core(), ServerConfig::default()).await
    }

    pub async fn start_with(mode: Where, core: Config, server: ServerConfig) -> Tcc {
        let dir = tempfile::tempdir().unwrap();
        match mode {
            Where::Embedded => {
                let client = match test_store(dir.path()).await {
                    StoreChoice::Sled(path) => {
                        TccClient::open_embedded(path, core, server.allow.clone()).await.unwrap()
                    }
                    postgres => {
                        // What open_embedded does, on the PostgreSQL store.
                        let allow = server.allow.clone();
                        let http = tcc_http::transport::build_client(&Default::default()).unwrap();
                        let metrics = Arc::new(tcc_http::metrics::Metrics::default());
                        let transport =
                            tcc_http::transport::HttpTransport::new(http.clone(), allow.clone(), metrics);
                        let store = postgres.open().await.unwrap();
                        let clock = Arc::new(tcc_core::SystemClock);
                        let tc = tcc_core::Coordinator::open(store, Arc::new(transport), clock, core)
                            .await
                            .unwrap();
                        TccClient::embedded(Arc::new(tc), allow, http)
                    }
                };
                Tcc { client, server: None, dir }
            }
            Where::Standalone => {
                let token = server.token.clone();
                let running = server::start(Launch {
                    listen: "127.0.0.1:0".into(),
                    store: test_store(&dir.path().join("store")).await,
                    core,
                    server,
                    client: Default::default(),
                })
                .await
                .unwrap();
                let client = TccClient::remote(&running.url(), token).unwrap();
                Tcc { client, server: Some(Server::Started(running)), dir }
            }
        }
    }

    /// A coordinator in `mode` whose engine runs on `clock`, which only the test moves.
    pub async fn start_on_clock(mode: Where, core: Config, server: ServerConfig, clock: ManualClock) -> Tcc {
        let dir = tempfile::tempdir().unwrap();
        match mode {
            Where::Embedded => {
                let allow = server.allow.clone();
                let (tc, http) = engine(test_store(dir.path()).await, core, allow.clone(), clock).await;
                Tcc { client: TccClient::embedded(Arc::new(tc), allow, http), server: None, dir }
            }
            Where::Standalone => {
                let token = server.token.clone();
                let store = test_store(&dir.path().join("store")).await;
                let running = Server::on_clock(store, core, server, clock).await;
                let client = TccClient::remote(&running.url(), token).unwrap();
                Tcc { client, server: Some(running), dir }
            }
        }
    }

    pub fn url(&self) -> String {
        self.server.as_ref().map(|s| s.url()).unwrap_or_default()
    }
}

/// The store of a test's coordinator: the sled store in `dir`, or with `TCC_TEST_STORE=postgres` a
/// fresh schema of its own in the database `TCC_TEST_POSTGRES_URL` names (CI runs the end-to-end,
/// DTM and stack suites both ways).
pub async fn test_store(dir: &std::path::Path) -> StoreChoice {
    match std::env::var("TCC_TEST_STORE").as_deref() {
        Err(_) | Ok("" | "sled") => StoreChoice::Sled(dir.to_owned()),
        Ok("postgres") => {
            let url = std::env::var("TCC_TEST_POSTGRES_URL").expect(
                "TCC_TEST_STORE=postgres needs TCC_TEST_POSTGRES_URL (a postgres:// URL of a test database)",
            );
            StoreChoice::Postgres(
                tcc_core::store::postgres::create_scratch_schema(&url, "tcc_test").await.unwrap(),
            )
        }
        Ok(other) => panic!("TCC_TEST_STORE={other:?}: use sled or postgres"),
    }
}

pub fn loopback_only() -> AllowList {
    AllowList::new(&[]).unwrap()
}

/// Polls `check` every 10 ms until it holds, for at most `limit` (then panics with `what`).
pub async fn eventually(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let until = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < until {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("gave up waiting: {what}");
}

/// Runs `cmd` to completion within `limit` (the child is killed if it overruns or the test ends);
/// `None`, with the reason printed, if it could not start or ran out of time.
pub async fn run_bounded(cmd: &mut tokio::process::Command, limit: Duration) -> Option<std::process::Output> {
    cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
    match tokio::time::timeout(limit, cmd.output()).await {
        Ok(Ok(out)) => Some(out),
        Ok(Err(e)) => {
            println!("could not run {cmd:?}: {e}");
            None
        }
        Err(_) => {
            println!("{cmd:?} ran out of time ({limit:?})");
            None
        }
    }
}

/// The Python interpreter of the tests (`TCC_PYTHON`, else `python3`), if it can run `import`.
/// Otherwise prints why the test is skipped and returns `None`, or fails the test when the
/// environment variable `require` is `1` (CI sets it).
pub async fn python_that_can(import: &str, package: &str, require: &str) -> Option<String> {
    let python = std::env::var("TCC_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let required = std::env::var(require).is_ok_and(|v| v == "1");
    let probe =
        run_bounded(tokio::process::Command::new(&python).args(["-c", import]), Duration::from_secs(60))
            .await;
    if probe.as_ref().is_some_and(|o| o.status.success()) {
        return Some(python);
    }
    let why = probe.map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default();
    assert!(!required, "{require}=1 but `{python}` cannot import {package}: {why}");
    println!(
        "skipped: `{python}` cannot import {package} (pip install {package}, or set TCC_PYTHON to an \
         interpreter that can; {require}=1 makes this a failure): {}",
        why.lines().last().unwrap_or_default()
    );
    None
}
