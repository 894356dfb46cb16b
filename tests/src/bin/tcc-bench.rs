//! `tcc-bench`: throughput and latency of tcc against the raw HTTP floor, in one run.
//!
//! ```text
//! cargo run --release --bin tcc-bench -- --duration 10 --json bench.json
//! ```
//!
//! Modes, each at the same concurrency against the same two in-process HTTP participants (answering
//! the native participant protocol at once, so the figures measure the framework, not business code):
//! - `raw`: try then confirm on each participant, called directly, no coordinator (4 requests);
//! - `embedded`: the same through a coordinator embedded in the initiator, durable (sled);
//! - `standalone`: through a `tcc-coordinator` process over HTTP, durable (6 requests: begin with
//!   both branches registered, two tries, confirm-and-wait, and the coordinator's two confirms);
//! - `coordinator_only`: standalone, the initiator making no tries (begin with two branches, then
//!   confirm and wait: the coordinator's own cost plus its phase-two calls).
//!
//! With `--participant-db URL` (PostgreSQL or MySQL), two more modes (see `tcc_tests::bench_db`):
//! - `raw_db`: two participants' business statements run directly on that database, no tcc: per
//!   transaction a `BEGIN; UPDATE; COMMIT` try on each, then both confirms the same way;
//! - `participant_db`: the same statements in two SQL participants (`Participant<Sql<DB>>`, the
//!   barrier row in each step's transaction) served over HTTP, driven by an embedded coordinator.
//!
//! `participant_db_ratio` is `participant_db` over `raw_db` (the median of the per-round ratios).
//!
//! The tcc modes register both branches with the begin (`BeginOptions::branches`), in one write,
//! then send each try (`GlobalTx::try_planned`).
//!
//! A transaction counts when its phase two has finished (both branches confirmed), not when the
//! confirm decision is acknowledged, so no mode can look fast by leaving a backlog.
//!
//! Extra measurements, each enabled by its flag:
//! - `--half-peak`: after each mode's closed-loop run, the mode again, open-loop, at half the rate
//!   it just reached (row `<mode>@half`), on the same coordinator or engine, for the same duration.
//!   Transactions are started on a fixed schedule (evenly spaced, each its own task), not when an
//!   initiator is free, and each one's latency runs from its scheduled start, so a stall shows up
//!   as latency rather than as fewer transactions started (no coordinated omission). At most
//!   `OPEN_LOOP_CAP` are in flight: one due while that many are is not started and counts as an
//!   error. The row's `conc` is the most in flight seen, its rate the transactions completed over
//!   the time from the first measured start to the last completion. This is what the target "p99 at
//!   half the peak rate" is read from;
//! - `--unfinished N`: resident memory of a `tcc-coordinator` process holding N unfinished
//!   transactions;
//! - `--recover N`: time to recover N unfinished transactions after a `kill -9`. N transactions are
//!   begun on a coordinator process (one common deadline, set from the expected set-up time), each
//!   with two branches registered on the in-process participants and never decided; the process is
//!   SIGKILLed before the deadline, the deadline is let pass, and the coordinator is restarted on
//!   the same sled directory. It must then cancel all N (the deadline sweep, then phase-two cancel
//!   calls to both participants). Reported: restart to healthy, restart to all N finished (polling
//!   `/metrics` for progress and `GET /v1/transactions?state=...&limit=1` for the end), and
//!   recovered transactions per second. N is the number still unfinished at the kill;
//! - `--history N`: throughput with N finished transactions in the store against an empty one.
//!   The store is filled directly through tcc-core's `SledStore` (in a child process, one sync at
//!   the end), then `standalone` and `embedded` each run on an empty store, twice on the filled
//!   one, and on an empty store again (so a drift in the machine's load hits both sides alike).
//!   Reported: both rates, filled/empty ratio, fill time and the store's size on disk.
//!
//! Figures on a shared 2-core machine are noisy: compare ratios within one run. Coordinator
//! processes log at `error` (on stderr); `TCC_BENCH_COORDINATOR_LOG` sets another `RUST_LOG` filter.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use clap::Parser;
use tcc_http::client::{BeginOptions, PlannedBranch, TccClient};
use tcc_http::protocol::{
    BRANCH_HEADER, BatchAnswer, BatchRequest, BatchResult, DEADLINE_HEADER, GID_HEADER, MAX_BATCH_CALLS,
    TryBatch, TryBatchAnswer, TryResult,
};
use tcc_http::server::native::{ListView, StateView};
use tcc_http::target::AllowList;
use tcc_http::transport::{Batching, ClientConfig, build_client};
use tcc_tests::bench_db::DbBench;
use tcc_tests::free_port;

/// With the `mimalloc` feature (on by default), the same allocator as the `tcc-coordinator` binary's
/// default, for every mode alike (the in-process participants, the initiators and the embedded
/// engine).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmark tcc against the raw HTTP floor.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Seconds each mode runs (after a short warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Concurrent initiators.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Modes to run (comma-separated): raw, embedded, standalone, coordinator_only.
    #[arg(long, value_delimiter = ',', default_value = "raw,embedded,standalone,coordinator_only")]
    modes: Vec<String>,
    /// Run the modes this many times, one after the other in each round (raw, embedded, ...,
    /// raw, embedded, ...), and report each mode's median rate and the median of its per-round
    /// ratio to the round's `raw`: on a shared, noisy machine one round's ratio can be off by more
    /// than the differences worth measuring.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// After each mode (not the sweeps), measure it again open-loop at half the rate it reached:
    /// transactions started on a fixed schedule, latency from the scheduled start, at most 4096 in
    /// flight (more are dropped and counted as errors). Rows `<mode>@half`.
    #[arg(long)]
    half_peak: bool,
    /// Also sweep branch counts 1, 2, 4 and 8 (embedded and standalone).
    #[arg(long)]
    sweep_branches: bool,
    /// Also sweep concurrency 1, 4, 16, 64 and 256 (raw, embedded and standalone).
    #[arg(long)]
    sweep_concurrency: bool,
    /// The tcc-coordinator binary for the standalone modes (default: next to this one; if it is not
    /// there, this binary serves the coordinator itself in a child process).
    #[arg(long, env = "TCC_COORDINATOR_BIN")]
    coordinator_bin: Option<PathBuf>,
    /// Most phase-two calls the coordinators (embedded and processes) send to one participant
    /// operation in one batch; 1 sends every call alone, as tcc did before batching.
    #[arg(long, value_name = "N", default_value_t = Batching::default().max_calls as u64,
          value_parser = clap::value_parser!(u64).range(1..=MAX_BATCH_CALLS as u64))]
    batch_max_calls: u64,
    /// Batches under way to one participant operation at once (the coordinators' setting).
    #[arg(long, value_name = "N", default_value_t = Batching::default().in_flight as u64,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    batches_in_flight: u64,
    /// Most begins, confirms and cancels the initiators' remote client sends its coordinator in one
    /// `POST /v1/batch` (standalone modes); 1 sends every call alone, as tcc did before client
    /// batching.
    #[arg(long, value_name = "N", default_value_t = Batching::default().max_calls as u64,
          value_parser = clap::value_parser!(u64).range(1..=tcc_http::server::batch::MAX_BATCH_OPS as u64))]
    client_batch_max_calls: u64,
    /// Batches under way from the initiators' remote client to its coordinator at once, per lane.
    #[arg(long, value_name = "N", default_value_t = Batching::default().in_flight as u64,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    client_batches_in_flight: u64,
    /// Most tries the initiators' client (embedded and remote) sends one participant operation in
    /// one `POST {target}/tries` (at most 128 are carried); 1 sends every try alone, as tcc did
    /// before batching tries. Batches under way per operation: `--batches-in-flight`.
    #[arg(long, value_name = "N", default_value_t = Batching::default().max_calls as u64,
          value_parser = clap::value_parser!(u64).range(1..=MAX_BATCH_CALLS as u64))]
    try_batch_max_calls: u64,
    /// Also run `postgres_1` and `postgres_3`: standalone on the PostgreSQL store at this URL (each
    /// run on a fresh schema), with one coordinator process and with three sharing the database
    /// (initiators spread over them).
    #[arg(long, env = "TCC_BENCH_POSTGRES_URL")]
    postgres: Option<String>,
    /// Also run `raw_db` and `participant_db`: two participants whose business state is in the
    /// PostgreSQL or MySQL database at this URL (a scratch schema or database per run, dropped at
    /// the end), the statements run directly and through tcc.
    #[arg(long, value_name = "URL")]
    participant_db: Option<String>,
    /// Also measure the resident memory of a `tcc-coordinator` process holding N unfinished
    /// transactions (confirm decided, participants failing, the next retry an hour away).
    #[arg(long, value_name = "N")]
    unfinished: Option<usize>,
    /// Also measure recovery after a crash: N transactions left trying on a coordinator process,
    /// SIGKILL, their deadline let pass, restart on the same directory; the time until all N are
    /// cancelled (restart to healthy, restart to all finished, transactions per second).
    #[arg(long, value_name = "N")]
    recover: Option<usize>,
    /// Also measure standalone and embedded throughput with N finished transactions already in the
    /// store (filled directly through the store API), against an empty store.
    #[arg(long, value_name = "N")]
    history: Option<usize>,
    /// Internal: fill the sled directory DIR with N finished transactions (the child process of
    /// `--history`).
    #[arg(long, hide = true, num_args = 2, value_names = ["N", "DIR"])]
    fill_history: Option<Vec<String>>,
    /// Internal: serve a coordinator on this address with this data directory (the child process of
    /// the standalone modes when no tcc-coordinator binary is found).
    #[arg(long, hide = true, num_args = 2, value_names = ["ADDR", "DIR"])]
    serve_coordinator: Option<Vec<String>>,
}

/// What one measured run gives.
#[derive(Clone, Debug)]
struct Figures {
    mode: String,
    branches: usize,
    concurrency: usize,
    transactions: u64,
    errors: u64,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    /// Open loop: the rate transactions were started at (`None`: closed loop).
    target_rate: Option<f64>,
    /// Open loop: transactions not started because `OPEN_LOOP_CAP` were in flight (in `errors`).
    dropped: u64,
}

impl Figures {
    fn tx_per_s(&self) -> f64 {
        self.transactions as f64 / self.seconds
    }

    fn json(&self) -> String {
        format!(
            "{{\"mode\":\"{}\",\"branches\":{},\"concurrency\":{},\"transactions\":{},\"errors\":{},\"seconds\":{:.3},\"tx_per_s\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"target_tx_per_s\":{},\"dropped\":{}}}",
            self.mode,
            self.branches,
            self.concurrency,
            self.transactions,
            self.errors,
            self.seconds,
            self.tx_per_s(),
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.target_rate.map_or("null".to_owned(), |r| format!("{r:.1}")),
            self.dropped
        )
    }
}

/// Two (or more) participants answering the native protocol at once, counting what they are told.
struct Participants {
    addr: SocketAddr,
    confirms: Arc<AtomicU64>,
    cancels: Arc<AtomicU64>,
    /// While set, confirm and cancel answer 503 (the participant is failing).
    failing: Arc<AtomicBool>,
}

impl Participants {
    async fn start() -> std::io::Result<Participants> {
        let confirms = Arc::new(AtomicU64::new(0));
        let cancels = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let (c, f, c2, f2) = (confirms.clone(), failing.clone(), cancels.clone(), failing.clone());
        let (c3, x3, f3) = (confirms.clone(), cancels.clone(), failing.clone());
        let app = Router::new()
            .route("/p/{n}/try", post(|| async { (StatusCode::OK, "held") }))
            .route("/p/{n}/tries", post(|body: axum::body::Bytes| async move { answer_tries(&body) }))
            .route(
                "/p/{n}/confirm",
                post(move || {
                    let (c, f) = (c.clone(), f.clone());
                    async move {
                        if f.load(Ordering::Relaxed) {
                            return StatusCode::SERVICE_UNAVAILABLE;
                        }
                        c.fetch_add(1, Ordering::Relaxed);
                        StatusCode::OK
                    }
                }),
            )
            .route(
                "/p/{n}/batch",
                post(move |body: axum::body::Bytes| {
                    let (c, x, f) = (c3.clone(), x3.clone(), f3.clone());
                    async move { answer_batch(&body, &c, &x, &f) }
                }),
            )
            .route(
                "/p/{n}/cancel",
                post(move || {
                    let (c, f) = (c2.clone(), f2.clone());
                    async move {
                        if f.load(Ordering::Relaxed) {
                            return StatusCode::SERVICE_UNAVAILABLE;
                        }
                        c.fetch_add(1, Ordering::Relaxed);
                        StatusCode::OK
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Participants { addr, confirms, cancels, failing })
    }

    fn target(&self, n: usize) -> String {
        format!("http://{}/p/{n}", self.addr)
    }
}

/// The bench participants' answer to a batch of tries: every try held, as a single try is.
fn answer_tries(body: &[u8]) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Ok(batch) = serde_json::from_slice::<TryBatch>(body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let results = batch.tries.iter().map(|_| TryResult::done(b"held".to_vec())).collect();
    axum::Json(TryBatchAnswer { results }).into_response()
}

/// The bench participants' answer to a phase-two batch: every call done (counted), unless failing.
fn answer_batch(
    body: &[u8],
    confirms: &AtomicU64,
    cancels: &AtomicU64,
    failing: &AtomicBool,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if failing.load(Ordering::Relaxed) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let Ok(batch) = serde_json::from_slice::<BatchRequest>(body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let results = batch
        .calls
        .iter()
        .map(|call| {
            let counter = match call.decision {
                tcc_core::Decision::Confirm => confirms,
                tcc_core::Decision::Cancel => cancels,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            BatchResult { status: 200, outcome: None, error: None }
        })
        .collect();
    axum::Json(BatchAnswer { results }).into_response()
}

/// The HTTP settings of a coordinator of this run (embedded, or the child process serving one):
/// the defaults, batching as `--batch-max-calls` and `--batches-in-flight` say.
fn client_config(args: &Args) -> ClientConfig {
    let batching =
        Batching { max_calls: args.batch_max_calls as usize, in_flight: args.batches_in_flight as usize };
    ClientConfig { batching, ..ClientConfig::default() }
}

/// The initiators' client of the coordinator process at `url`, batching as
/// `--client-batch-max-calls` and `--client-batches-in-flight` say.
fn remote(args: &Args, url: &str, http: &reqwest::Client) -> Result<TccClient, String> {
    let batching = Batching {
        max_calls: args.client_batch_max_calls as usize,
        in_flight: args.client_batches_in_flight as usize,
    };
    let client = TccClient::remote_batching(url, None, http.clone(), batching).map_err(|e| e.to_string())?;
    Ok(client.with_try_batching(try_batching(args)))
}

/// The initiators' batching of tries, as `--try-batch-max-calls` and `--batches-in-flight` say.
fn try_batching(args: &Args) -> Batching {
    Batching { max_calls: args.try_batch_max_calls as usize, in_flight: args.batches_in_flight as usize }
}

/// A coordinator process for the standalone modes; killed when dropped.
struct CoordinatorProcess {
    child: std::process::Child,
    url: String,
    _dir: Option<tempfile::TempDir>,
}

impl CoordinatorProcess {
    /// SIGKILLs the process (on Unix `Child::kill` is SIGKILL: no shutdown code runs) and reaps it.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A coordinator process on `store` (a sled directory in a new temporary directory when `None`).
async fn spawn_coordinator(
    args: &Args,
    store: Option<&str>,
    owner: &str,
) -> Result<CoordinatorProcess, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let store = store.map_or_else(|| format!("sled:{}", dir.path().join("data").display()), str::to_owned);
    spawn_coordinator_at(args, &store, owner, Some(dir), Duration::from_secs(10)).await
}

/// A coordinator process on `store`, healthy within `limit`; `dir` is removed when it is dropped.
async fn spawn_coordinator_at(
    args: &Args,
    store: &str,
    owner: &str,
    dir: Option<tempfile::TempDir>,
    limit: Duration,
) -> Result<CoordinatorProcess, String> {
    let port = free_port().map_err(|e| e.to_string())?;
    let listen = format!("127.0.0.1:{port}");
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = match &coordinator_bin(args) {
        Some(bin) => {
            let mut c = std::process::Command::new(bin);
            c.args(["--listen", &listen, "--owner", owner]).env("TCC_STORE", store);
            c.env("TCC_BATCH_MAX_CALLS", args.batch_max_calls.to_string());
            c.env("TCC_BATCHES_IN_FLIGHT", args.batches_in_flight.to_string());
            c
        }
        None => {
            let mut c = std::process::Command::new(&me);
            c.arg("--serve-coordinator").arg(&listen).arg(store);
            c.arg("--batch-max-calls").arg(args.batch_max_calls.to_string());
            c.arg("--batches-in-flight").arg(args.batches_in_flight.to_string());
            c
        }
    };
    let log = std::env::var("TCC_BENCH_COORDINATOR_LOG").unwrap_or_else(|_| "error".to_owned());
    cmd.env("RUST_LOG", log).stdout(std::process::Stdio::null());
    let child = cmd.spawn().map_err(|e| format!("starting the coordinator: {e}"))?;
    let proc = CoordinatorProcess { child, url: format!("http://{listen}"), _dir: dir };
    wait_healthy(&reqwest::Client::new(), &proc.url, limit).await?;
    Ok(proc)
}

/// The `tcc-coordinator` binary: `--coordinator-bin`, or a fresh one next to this binary.
fn coordinator_bin(args: &Args) -> Option<PathBuf> {
    tcc_tests::coordinator_binary(args.coordinator_bin.as_deref())
}

/// Waits until the coordinator at `url` answers `/healthz`, for at most `limit`.
async fn wait_healthy(http: &reqwest::Client, url: &str, limit: Duration) -> Result<(), String> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if http.get(format!("{url}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("the coordinator did not come up within {} s", limit.as_secs()))
}

/// How one transaction is run.
#[derive(Clone)]
enum Driver {
    Raw {
        http: reqwest::Client,
        targets: Vec<String>,
    },
    Tcc {
        clients: Arc<Vec<TccClient>>,
        next: Arc<std::sync::atomic::AtomicUsize>,
        targets: Vec<String>,
        tries: bool,
    },
    RawDb(Arc<DbBench>),
}

const WAIT: Duration = Duration::from_secs(30);

impl Driver {
    fn tcc(clients: Vec<TccClient>, targets: Vec<String>, tries: bool) -> Driver {
        Driver::Tcc { clients: Arc::new(clients), next: Arc::default(), targets, tries }
    }

    async fn one(&self) -> Result<(), String> {
        match self {
            Driver::RawDb(db) => db.raw_one().await,
            Driver::Raw { http, targets } => {
                let gid = tcc_core::Gid::generate();
                let deadline = (tcc_core::Clock::now(&tcc_core::SystemClock).0 + 30_000).to_string();
                let call = |target: &String, phase: &str, branch: usize| {
                    http.post(format!("{target}/{phase}"))
                        .header(GID_HEADER, gid.as_str())
                        .header(BRANCH_HEADER, format!("b{branch}"))
                        .header(DEADLINE_HEADER, deadline.as_str())
                        .body("{}")
                        .send()
                };
                for (i, t) in targets.iter().enumerate() {
                    ok(call(t, "try", i).await)?;
                }
                let confirms = targets.iter().enumerate().map(|(i, t)| call(t, "confirm", i));
                // Awaited on this task: awaiting lazily started requests one after the other would
                // not overlap them, and spawning would add work the raw mode does not otherwise do.
                for r in tcc_core::join::join_all(confirms).await {
                    ok(r)?;
                }
                Ok(())
            }
            Driver::Tcc { clients, next, targets, tries } => {
                // Initiators spread over the coordinators (one, except for postgres_3).
                let client = &clients[next.fetch_add(1, Ordering::Relaxed) % clients.len()];
                // Every branch is known up front: registered by the begin itself (one request, one
                // flush), then each try sent.
                let branches = targets
                    .iter()
                    .enumerate()
                    .map(|(i, t)| PlannedBranch {
                        branch: format!("b{i}"),
                        target: t.clone(),
                        request: b"{}".to_vec(),
                    })
                    .collect();
                let options = BeginOptions { branches, ..BeginOptions::default() };
                let tx = client.begin_with(WAIT, options).await.map_err(|e| e.to_string())?;
                if *tries {
                    for i in 0..targets.len() {
                        tx.try_planned(&format!("b{i}")).await.map_err(|e| e.to_string())?;
                    }
                }
                let done = tx.confirm_and_wait(WAIT).await.map_err(|e| e.to_string())?;
                if done.state == StateView::Confirmed {
                    Ok(())
                } else {
                    Err(format!("ended {:?}", done.state))
                }
            }
        }
    }
}

fn ok(r: Result<reqwest::Response, reqwest::Error>) -> Result<(), String> {
    match r {
        Ok(res) if res.status().is_success() => Ok(()),
        Ok(res) => Err(format!("participant answered {}", res.status())),
        Err(e) => Err(e.to_string()),
    }
}

/// Draws a progress bar on stderr (over the previous one): `label`, `frac` done, then `tail`.
fn draw_bar(label: &str, frac: f64, tail: &str) {
    let frac = frac.clamp(0.0, 1.0);
    let filled = (frac * 30.0) as usize;
    eprint!(
        "\r{label:>16} [{}{}] {:>3.0}% {tail}",
        "#".repeat(filled),
        ".".repeat(30 - filled),
        frac * 100.0
    );
}

/// Latencies and errors gathered by a run (or by one of its tasks).
#[derive(Debug, Default)]
struct Samples {
    /// Microseconds, one per completed transaction.
    lat: Vec<u32>,
    errors: u64,
    last_error: Option<String>,
}

impl Samples {
    /// One transaction that took `took` and ended with `r`.
    fn record(&mut self, took: Duration, r: Result<(), String>) {
        match r {
            Ok(()) => self.lat.push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX)),
            Err(e) => {
                self.errors += 1;
                self.last_error = Some(e);
            }
        }
    }

    fn add(&mut self, other: Samples) {
        self.lat.extend(other.lat);
        self.errors += other.errors;
        self.last_error = other.last_error.or(self.last_error.take());
    }

    /// The figures of a run of `seconds`: the transactions completed and their latency percentiles.
    /// The last error, if any, is printed on stderr.
    fn figures(mut self, mode: &str, branches: usize, concurrency: usize, seconds: f64) -> Figures {
        if let Some(e) = &self.last_error {
            eprintln!("{mode}: {} errors, the last: {e}", self.errors);
        }
        self.lat.sort_unstable();
        let lat = &self.lat;
        let pct = |p: f64| {
            if lat.is_empty() {
                return 0.0;
            }
            let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
            f64::from(lat[i]) / 1000.0
        };
        Figures {
            mode: mode.to_owned(),
            branches,
            concurrency,
            transactions: lat.len() as u64,
            errors: self.errors,
            seconds,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            p999_ms: pct(0.999),
            target_rate: None,
            dropped: 0,
        }
    }
}

/// The warm-up before a measured run of `seconds`: a tenth of it, at most a second.
fn warmup(seconds: f64) -> Duration {
    Duration::from_secs_f64((seconds / 10.0).min(1.0))
}

/// Waits until `seconds` have passed since `started`, with a progress bar on stderr (`done`
/// transactions so far) for runs longer than three seconds.
async fn watch(mode: &str, started: Instant, seconds: f64, done: &AtomicU64) {
    let run = Duration::from_secs_f64(seconds);
    let bar = seconds > 3.0;
    while started.elapsed() < run {
        tokio::time::sleep(Duration::from_millis(200).min(run.saturating_sub(started.elapsed()))).await;
        if bar {
            let frac = started.elapsed().as_secs_f64() / seconds;
            let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64().max(1e-3);
            draw_bar(mode, frac, &format!("{rate:>9.0} tx/s"));
        }
    }
    if bar {
        eprintln!();
    }
}

/// Runs `driver` closed-loop from `concurrency` tasks, each starting a transaction when its last
/// one is done, for `seconds` (after a warm-up).
async fn measure(mode: &str, branches: usize, driver: Driver, concurrency: usize, seconds: f64) -> Figures {
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (driver, measuring, stop, done) = (driver.clone(), measuring.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = driver.one().await;
                let took = t.elapsed();
                if measuring.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                    if r.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    samples.record(took, r);
                }
            }
            samples
        }));
    }
    tokio::time::sleep(warmup(seconds)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    watch(mode, started, seconds, &done).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let mut samples = Samples::default();
    for t in tasks {
        if let Ok(s) = t.await {
            samples.add(s);
        }
    }
    samples.figures(mode, branches, concurrency, elapsed)
}

/// The most transactions an open-loop run keeps in flight: one due while this many are is not
/// started, and counts as an error.
const OPEN_LOOP_CAP: usize = 4096;

/// How long an open-loop run waits, after its last start, for the transactions still in flight
/// (each call of a transaction is bounded by [`WAIT`]); those still running then count as errors.
const OPEN_LOOP_DRAIN: Duration = Duration::from_secs(40);

/// Runs `driver` open-loop: transactions started at `rate` a second, evenly spaced, each in its
/// own task whether or not the earlier ones are done, for `seconds` (after a warm-up at the same
/// rate). A transaction's latency runs from its scheduled start, so a system falling behind shows
/// as latency. The figures count the transactions scheduled in the measured window; their rate is
/// over the time from the window's first start to the last of them finishing.
async fn measure_open(mode: &str, branches: usize, driver: Driver, rate: f64, seconds: f64) -> Figures {
    let rate = if rate.is_finite() { rate.max(1.0) } else { 1.0 };
    let first = (warmup(seconds).as_secs_f64() * rate).ceil() as u64; // the first measured start
    let total = first + (seconds * rate).ceil() as u64;
    let done = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(std::sync::Mutex::new(Samples::default()));
    let t0 = tokio::time::Instant::now() + Duration::from_millis(10);
    let at = move |i: u64| t0 + Duration::from_secs_f64(i as f64 / rate);
    // The schedule, on its own task so that it is not held up by the progress bar.
    let schedule = {
        let (done, samples) = (done.clone(), samples.clone());
        tokio::spawn(async move {
            let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut tasks = tokio::task::JoinSet::new();
            let (mut launched, mut dropped, mut most) = (0u64, 0u64, 0usize);
            let mut i = 0;
            while i < total {
                tokio::time::sleep_until(at(i)).await;
                // Every start now due (the timer wakes up about once a millisecond).
                let now = tokio::time::Instant::now();
                while i < total && at(i) <= now {
                    let (scheduled, measured) = (at(i), i >= first);
                    i += 1;
                    let n = in_flight.load(Ordering::Relaxed);
                    if n >= OPEN_LOOP_CAP {
                        dropped += u64::from(measured);
                        continue;
                    }
                    in_flight.fetch_add(1, Ordering::Relaxed);
                    most = most.max(n + 1);
                    launched += u64::from(measured);
                    let (driver, in_flight, done, samples) =
                        (driver.clone(), in_flight.clone(), done.clone(), samples.clone());
                    tasks.spawn(async move {
                        let r = driver.one().await;
                        let took = scheduled.elapsed();
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                        if measured {
                            if r.is_ok() {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                            let mut s = samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            s.record(took, r);
                        }
                    });
                }
                while tasks.try_join_next().is_some() {}
            }
            (tasks, launched, dropped, most)
        })
    };
    let started = at(first).into_std();
    tokio::time::sleep_until(at(first)).await;
    watch(mode, started, seconds, &done).await;
    let (mut tasks, launched, dropped, most) = match schedule.await {
        Ok(out) => out,
        Err(e) => {
            eprintln!("{mode}: the schedule failed: {e}");
            (tokio::task::JoinSet::new(), 0, 0, 0)
        }
    };
    let drain = async { while tasks.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(OPEN_LOOP_DRAIN, drain).await;
    tasks.abort_all();
    let elapsed = started.elapsed().as_secs_f64();
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    let unfinished = launched.saturating_sub(samples.lat.len() as u64 + samples.errors);
    if dropped > 0 {
        eprintln!("{mode}: {dropped} transactions not started: {OPEN_LOOP_CAP} already in flight");
    }
    if unfinished > 0 {
        let secs = OPEN_LOOP_DRAIN.as_secs();
        eprintln!("{mode}: {unfinished} transactions still running {secs} s after the last start");
    }
    let mut f = samples.figures(mode, branches, most, elapsed);
    f.errors += dropped + unfinished;
    f.dropped = dropped;
    f.target_rate = Some(rate);
    f
}

/// A fast, durable engine for the benchmark: the defaults, with retries not needed.
fn embedded_config() -> tcc_core::Config {
    tcc_core::Config::default()
}

struct Bench {
    args: Args,
    participants: Participants,
    http: reqwest::Client,
    /// The database modes' participants (`--participant-db`).
    db: Option<Arc<DbBench>>,
}

impl Bench {
    /// The HTTP settings of an embedded coordinator: the defaults, batching as `--batch-max-calls`.
    fn client_config(&self) -> ClientConfig {
        client_config(&self.args)
    }

    fn targets(&self, branches: usize) -> Vec<String> {
        (0..branches).map(|n| self.participants.target(n)).collect()
    }

    async fn run(&self, mode: &str, branches: usize, concurrency: usize) -> Result<Figures, String> {
        Ok(self.run_with(mode, branches, concurrency, false).await?.0)
    }

    /// Measures `driver` closed-loop, then, with `half`, open-loop at half the rate it reached.
    async fn drive(
        &self,
        mode: &str,
        branches: usize,
        driver: Driver,
        concurrency: usize,
        half: bool,
    ) -> (Figures, Option<Figures>) {
        let secs = self.args.duration;
        let f = measure(mode, branches, driver.clone(), concurrency, secs).await;
        if !half {
            return (f, None);
        }
        let rate = f.tx_per_s() / 2.0;
        let h = measure_open(&format!("{mode}@half"), branches, driver, rate, secs).await;
        (f, Some(h))
    }

    /// Runs `mode` closed-loop and, with `half`, open-loop at half the rate it reached (on the same
    /// coordinator or engine).
    async fn run_with(
        &self,
        mode: &str,
        branches: usize,
        concurrency: usize,
        half: bool,
    ) -> Result<(Figures, Option<Figures>), String> {
        let targets = self.targets(branches);
        match mode {
            "raw" => {
                let d = Driver::Raw { http: self.http.clone(), targets };
                Ok(self.drive(mode, branches, d, concurrency, half).await)
            }
            "raw_db" => {
                let db = self.db.clone().ok_or("--participant-db URL is needed for raw_db")?;
                Ok(self.drive(mode, branches, Driver::RawDb(db), concurrency, half).await)
            }
            "embedded" | "participant_db" => {
                let targets = match mode {
                    "participant_db" => {
                        self.db.as_ref().ok_or("--participant-db URL is needed for participant_db")?.targets()
                    }
                    _ => targets,
                };
                let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
                let allow = AllowList::new(&[]).map_err(|e| e.to_string())?;
                let client =
                    TccClient::open_embedded_with(dir.path(), embedded_config(), allow, self.client_config())
                        .await
                        .map_err(|e| e.to_string())?
                        .with_try_batching(try_batching(&self.args));
                let d = Driver::tcc(vec![client.clone()], targets, true);
                let f = self.drive(mode, branches, d, concurrency, half).await;
                client.shutdown().await;
                Ok(f)
            }
            "standalone" | "coordinator_only" | "postgres_1" | "postgres_3" => {
                let (store, n) = match mode {
                    "postgres_1" | "postgres_3" => {
                        let base = self
                            .args
                            .postgres
                            .as_deref()
                            .ok_or_else(|| format!("--postgres URL is needed for {mode}"))?;
                        let url = tcc_core::store::postgres::create_scratch_schema(base, "tcc_bench")
                            .await
                            .map_err(|e| e.to_string())?;
                        (Some(url), if mode == "postgres_3" { 3 } else { 1 })
                    }
                    _ => (None, 1),
                };
                let mut procs = Vec::new();
                let mut clients = Vec::new();
                for i in 0..n {
                    let proc = spawn_coordinator(&self.args, store.as_deref(), &format!("bench-{i}")).await?;
                    clients.push(remote(&self.args, &proc.url, &self.http)?);
                    procs.push(proc);
                }
                let d = Driver::tcc(clients, targets, mode != "coordinator_only");
                let f = self.drive(mode, branches, d, concurrency, half).await;
                drop(procs);
                Ok(f)
            }
            other => Err(format!("unknown mode {other:?}")),
        }
    }
}

/// Resident memory of process `pid`, in MiB (Linux).
fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 =
        status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// What the `--unfinished` mode measured.
struct Unfinished {
    count: usize,
    create_s: f64,
    rss_mb: f64,
}

/// Leaves `n` transactions unfinished in a coordinator process and measures its RSS.
async fn unfinished(bench: &Bench, n: usize) -> Result<Unfinished, String> {
    let bin = coordinator_bin(&bench.args).ok_or(
        "--unfinished needs the tcc-coordinator binary: cargo build --release --bin tcc-coordinator",
    )?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let listen = format!("127.0.0.1:{}", free_port().map_err(|e| e.to_string())?);
    let url = format!("http://{listen}");
    // Phase two fails and is not retried for an hour: every transaction stays unfinished.
    bench.participants.failing.store(true, Ordering::Relaxed);
    let mut child = std::process::Command::new(&bin)
        .args(["--listen", &listen, "--retry-initial", "1h", "--retry-max-backoff", "2h"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the coordinator: {e}"))?;
    let result = async {
        wait_healthy(&bench.http, &url, Duration::from_secs(30)).await?;
        let client = remote(&bench.args, &url, &bench.http)?;
        let targets = bench.targets(2);
        let created = Instant::now();
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (client, targets, next) = (client.clone(), targets.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n as u64 {
                    let tx = client.begin(Duration::from_secs(3600)).await.map_err(|e| e.to_string())?;
                    for (i, t) in targets.iter().enumerate() {
                        tx.register_branch(&format!("b{i}"), t, b"{}".to_vec())
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    tx.confirm().await.map_err(|e| e.to_string())?;
                }
                Ok::<(), String>(())
            }));
        }
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        let create_s = created.elapsed().as_secs_f64();
        // Let the first (failing) rounds run, then look at the process.
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, String>((create_s, rss_mb(child.id()).unwrap_or(f64::NAN)))
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    bench.participants.failing.store(false, Ordering::Relaxed);
    let (create_s, rss_mb) = result?;
    Ok(Unfinished { count: n, create_s, rss_mb })
}

/// The set-up rate (transactions per second) `--recover` plans its common deadline for. A slower
/// set-up stops beginning transactions a little before that deadline and recovers fewer (the
/// number recovered is reported).
const RECOVER_SETUP_RATE: f64 = 1_500.0;
/// Concurrent initiators of the `--recover` set-up.
const RECOVER_SETUP_CONCURRENCY: usize = 128;
/// The `--recover` set-up stops beginning transactions this long before their deadline, so the
/// first coordinator never reaches it.
const RECOVER_GUARD: Duration = Duration::from_secs(1);
/// How often the `--recover` mode asks the restarted coordinator how far it is.
const RECOVER_POLL: Duration = Duration::from_millis(100);

/// What the `--recover` mode measured.
struct Recovery {
    /// Transactions begun in the set-up.
    begun: u64,
    /// Of those, unfinished when the coordinator was killed: the number recovered.
    count: u64,
    setup_s: f64,
    /// From the kill to the restart (waiting for the deadline to pass).
    wait_s: f64,
    /// From the restart (process spawn) until `/healthz` answers.
    healthy_ms: f64,
    /// From the restart until no transaction is left unfinished.
    finished_s: f64,
    /// Cancel calls the participants answered during the recovery.
    cancel_calls: u64,
}

impl Recovery {
    fn tx_per_s(&self) -> f64 {
        self.count as f64 / self.finished_s.max(1e-9)
    }
}

/// The value of the Prometheus series `series` (name and labels) in `text`.
fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn get_text(http: &reqwest::Client, url: &str) -> Result<String, String> {
    let res = http.get(url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
    let status = res.status();
    let text = res.text().await.map_err(|e| format!("GET {url}: {e}"))?;
    if !status.is_success() {
        return Err(format!("GET {url}: {status}: {text}"));
    }
    Ok(text)
}

/// Transactions begun and finished (confirmed, cancelled or flagged) by the coordinator at `url`
/// since it started, from its `/metrics`.
async fn begun_finished(http: &reqwest::Client, url: &str) -> Result<(u64, u64), String> {
    let text = get_text(http, &format!("{url}/metrics")).await?;
    let get = |series: &str| metric(&text, series).ok_or_else(|| format!("no {series} in /metrics"));
    let begun = get("tcc_transactions_begun_total")?;
    let finished = ["confirmed", "cancelled", "flagged"]
        .iter()
        .map(|o| get(&format!("tcc_transactions_finished_total{{outcome=\"{o}\"}}")))
        .sum::<Result<u64, String>>()?;
    Ok((begun, finished))
}

/// Whether the coordinator at `url` still lists a transaction trying, confirming or cancelling (a
/// transaction moves through these in this order, so one listed in none of them is finished). A
/// flagged one is an error: nothing in the recovery may fail.
async fn any_unfinished(http: &reqwest::Client, url: &str) -> Result<bool, String> {
    for state in ["trying", "confirming", "cancelling", "flagged"] {
        let text = get_text(http, &format!("{url}/v1/transactions?state={state}&limit=1")).await?;
        let page: ListView = serde_json::from_str(&text).map_err(|e| format!("listing {state}: {e}"))?;
        if let Some(tx) = page.items.first() {
            if state == "flagged" {
                return Err(format!("transaction {} was flagged: {:?}", tx.gid, tx.last_error));
            }
            return Ok(true);
        }
    }
    Ok(false)
}

/// Leaves `n` transactions trying in a coordinator process, kills it, lets their deadline pass,
/// restarts it on the same directory and measures until it has cancelled them all.
async fn recover(bench: &Bench, n: usize) -> Result<Recovery, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let store = format!("sled:{}", dir.path().join("data").display());
    let first =
        spawn_coordinator_at(&bench.args, &store, "bench-recover-1", None, Duration::from_secs(60)).await?;
    let client = remote(&bench.args, &first.url, &bench.http)?;

    // One deadline for all, planned for a set-up at RECOVER_SETUP_RATE plus a margin.
    let started = Instant::now();
    let started_ms = tcc_core::Clock::now(&tcc_core::SystemClock).0;
    let plan = Duration::from_secs_f64(n as f64 / RECOVER_SETUP_RATE) + Duration::from_secs(2);
    let deadline = started + plan;
    let deadline_ms = started_ms.saturating_add(u64::try_from(plan.as_millis()).unwrap_or(u64::MAX));
    let next = Arc::new(AtomicU64::new(0));
    let made = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    // The latest deadline the coordinator gave (unix ms): requests take time, so a little after ours.
    let latest = Arc::new(AtomicU64::new(deadline_ms));
    let max_errors = n as u64 / 100 + 10;
    let targets = bench.targets(2);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..RECOVER_SETUP_CONCURRENCY.min(n.max(1)) {
        let (client, targets) = (client.clone(), targets.clone());
        let (next, made, errors, latest) = (next.clone(), made.clone(), errors.clone(), latest.clone());
        tasks.spawn(async move {
            let mut last_error = None;
            while next.fetch_add(1, Ordering::Relaxed) < n as u64 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left <= RECOVER_GUARD {
                    break; // out of time: recover fewer rather than let the deadline pass here
                }
                let one = async {
                    let tx = client.begin(left).await.map_err(|e| e.to_string())?;
                    latest.fetch_max(tx.deadline().0, Ordering::Relaxed);
                    for (i, t) in targets.iter().enumerate() {
                        tx.register_branch(&format!("b{i}"), t, b"{}".to_vec())
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    Ok::<(), String>(())
                };
                match one.await {
                    Ok(()) => {
                        made.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if errors.fetch_add(1, Ordering::Relaxed) >= max_errors => return Err(e),
                    Err(e) => last_error = Some(e),
                }
            }
            Ok(last_error)
        });
    }
    let bar = n >= 10_000;
    let mut setup_error = None;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(Ok(None))) => {}
                Some(Ok(Ok(Some(e)))) => eprintln!("recover set-up: error: {e}"),
                Some(Ok(Err(e))) => setup_error = Some(e),
                Some(Err(e)) => setup_error = Some(e.to_string()),
            },
            () = tokio::time::sleep(Duration::from_millis(200)), if bar => {
                let done = made.load(Ordering::Relaxed);
                let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
                draw_bar("recover set-up", done as f64 / n as f64, &format!("{rate:>9.0} tx/s"));
            }
        }
    }
    if bar {
        eprintln!();
    }
    if let Some(e) = setup_error {
        return Err(format!(
            "recover set-up: too many errors ({}), the last: {e}",
            errors.load(Ordering::Relaxed)
        ));
    }
    let setup_s = started.elapsed().as_secs_f64();
    let (begun, finished) = begun_finished(&bench.http, &first.url).await?;
    let count = begun.saturating_sub(finished);
    first.kill();
    let killed = Instant::now();
    if count == 0 {
        return Err("recover: no transaction was left unfinished".into());
    }
    if count < n as u64 {
        eprintln!("recover: {count} of {n} unfinished at the kill (the set-up ran out of time or failed)");
    }

    // Let every deadline pass (bounded by the plan: the coordinator set them from our timeouts).
    let until = latest.load(Ordering::Relaxed).saturating_add(100);
    let now = tcc_core::Clock::now(&tcc_core::SystemClock).0;
    let wait = Duration::from_millis(until.saturating_sub(now)).min(plan + Duration::from_secs(60));
    tokio::time::sleep(wait).await;
    let wait_s = killed.elapsed().as_secs_f64();

    let cancels_before = bench.participants.cancels.load(Ordering::Relaxed);
    let restarted = Instant::now();
    let second =
        spawn_coordinator_at(&bench.args, &store, "bench-recover-2", Some(dir), Duration::from_secs(300))
            .await?;
    let healthy_ms = restarted.elapsed().as_secs_f64() * 1000.0;
    let limit = Duration::from_secs(120) + Duration::from_secs_f64(count as f64 / 500.0);
    let bar = count >= 10_000;
    let mut polls = 0u64;
    let finished_s = loop {
        let (_, done) = begun_finished(&bench.http, &second.url).await?;
        if bar {
            let rate = done as f64 / restarted.elapsed().as_secs_f64().max(1e-3);
            draw_bar("recover", done as f64 / count as f64, &format!("{rate:>9.0} tx/s"));
        }
        // Listing an unfinished state reads the whole due index: ask only once the counters say
        // all are done (and now and then regardless), not on every poll of the measured work.
        polls += 1;
        if (done >= count || polls.is_multiple_of(20)) && !any_unfinished(&bench.http, &second.url).await? {
            break restarted.elapsed().as_secs_f64();
        }
        if restarted.elapsed() > limit {
            let (_, done) = begun_finished(&bench.http, &second.url).await?;
            return Err(format!("recover: {done} of {count} finished after {} s", limit.as_secs()));
        }
        tokio::time::sleep(RECOVER_POLL).await;
    };
    if bar {
        eprintln!();
    }
    let (_, done) = begun_finished(&bench.http, &second.url).await?;
    if done != count {
        eprintln!("recover: the restarted coordinator finished {done}, {count} were unfinished at the kill");
    }
    let cancel_calls = bench.participants.cancels.load(Ordering::Relaxed).saturating_sub(cancels_before);
    drop(second);
    Ok(Recovery { begun, count, setup_s, wait_s, healthy_ms, finished_s, cancel_calls })
}

/// What the `--history` mode measured.
struct History {
    count: usize,
    fill_s: f64,
    store_mb: f64,
    /// Start of a coordinator process on the filled store, until `/healthz` answers.
    open_ms: f64,
    /// Each mode on an empty store and on the filled one (two runs of each, merged by [`merge`]).
    pairs: Vec<(Figures, Figures)>,
    /// Every run.
    runs: Vec<Figures>,
}

/// Two runs of one mode as one: transactions, errors and seconds added up; each percentile the
/// higher of the two (they cannot be merged exactly).
fn merge(a: &Figures, b: &Figures) -> Figures {
    Figures {
        transactions: a.transactions + b.transactions,
        errors: a.errors + b.errors,
        seconds: a.seconds + b.seconds,
        p50_ms: a.p50_ms.max(b.p50_ms),
        p99_ms: a.p99_ms.max(b.p99_ms),
        p999_ms: a.p999_ms.max(b.p999_ms),
        ..a.clone()
    }
}

/// Bytes in the files under `path` (at most 100,000 entries are looked at).
fn dir_bytes(path: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            seen += 1;
            if seen > 100_000 {
                return total;
            }
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Measures standalone and embedded throughput on an empty store and on one holding `n` finished
/// transactions.
async fn history(bench: &Bench, n: usize) -> Result<History, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let data = dir.path().join("data");
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let filling = Instant::now();
    let status = tokio::process::Command::new(&me)
        .arg("--fill-history")
        .arg(n.to_string())
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .map_err(|e| format!("filling the store: {e}"))?;
    if !status.success() {
        return Err(format!("filling the store failed: {status}"));
    }
    let fill_s = filling.elapsed().as_secs_f64();
    let store_mb = dir_bytes(&data) as f64 / (1024.0 * 1024.0);
    let (c, secs, targets) = (bench.args.concurrency, bench.args.duration, bench.targets(2));
    let mut pairs = Vec::new();
    let mut runs = Vec::new();
    // Each mode runs empty, filled, filled, empty (a fresh empty store each time, one open of the
    // filled one), so a drift in the machine's load hits both sides alike.
    let empty_run = |mode: &'static str| async move {
        let mut f = bench.run(mode, 2, c).await?;
        f.mode = format!("{mode}/empty");
        print_row(&f, None);
        Ok::<_, String>(f)
    };
    let filled_runs = |mode: &'static str, driver: Driver| async move {
        let mut out = Vec::new();
        for _ in 0..2 {
            let f = measure(&format!("{mode}/hist"), 2, driver.clone(), c, secs).await;
            print_row(&f, None);
            out.push(f);
        }
        out
    };

    let e1 = empty_run("standalone").await?;
    let store = format!("sled:{}", data.display());
    let opening = Instant::now();
    let proc =
        spawn_coordinator_at(&bench.args, &store, "bench-history", None, Duration::from_secs(300)).await?;
    let open_ms = opening.elapsed().as_secs_f64() * 1000.0;
    let client = remote(&bench.args, &proc.url, &bench.http)?;
    let filled = filled_runs("standalone", Driver::tcc(vec![client], targets.clone(), true)).await;
    proc.kill(); // the directory is free again once the process is gone
    let e2 = empty_run("standalone").await?;
    pairs.push((merge(&e1, &e2), merge(&filled[0], &filled[1])));
    runs.extend([e1, e2].into_iter().chain(filled));

    let e1 = empty_run("embedded").await?;
    let allow = AllowList::new(&[]).map_err(|e| e.to_string())?;
    let client = TccClient::open_embedded_with(&data, embedded_config(), allow, bench.client_config())
        .await
        .map_err(|e| e.to_string())?;
    let filled = filled_runs("embedded", Driver::tcc(vec![client.clone()], targets, true)).await;
    client.shutdown().await;
    let e2 = empty_run("embedded").await?;
    pairs.push((merge(&e1, &e2), merge(&filled[0], &filled[1])));
    runs.extend([e1, e2].into_iter().chain(filled));
    Ok(History { count: n, fill_s, store_mb, open_ms, pairs, runs })
}

/// The child process of `--history`: fills the sled directory `DIR` with `N` finished transactions
/// (nine in ten confirmed, the rest cancelled, two branches each) through the store API, without
/// waiting for a flush per record, and syncs once at the end.
async fn fill_history(args: Vec<String>) -> ExitCode {
    let [n, dir] = args.as_slice() else { return ExitCode::from(2) };
    let Ok(n) = n.parse::<usize>() else {
        eprintln!("tcc-bench fill: {n:?} is not a count");
        return ExitCode::from(2);
    };
    match fill(n, std::path::Path::new(dir)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcc-bench fill: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn fill(n: usize, dir: &std::path::Path) -> Result<(), String> {
    use tcc_core::{Branch, BranchId, Decision, Gid, Store as _, Timestamp};
    let store = tcc_core::SledStore::open(dir).map_err(|e| e.to_string())?;
    let ids: Vec<BranchId> =
        ["b0", "b1"].iter().map(|b| b.parse()).collect::<Result<_, _>>().map_err(|e| format!("{e}"))?;
    // A day of history ending now.
    let start = tcc_core::Clock::now(&tcc_core::SystemClock).0.saturating_sub(86_400_000);
    let step = 86_400_000 / n.max(1) as u64;
    let started = Instant::now();
    let bar = n >= 100_000;
    for i in 0..n {
        let created = Timestamp(start + i as u64 * step);
        let mut tx = tcc_core::state::begin(Gid::generate(), created, created + Duration::from_secs(30));
        let decision = if i % 10 == 9 { Decision::Cancel } else { Decision::Confirm };
        tx.branches = ids
            .iter()
            .enumerate()
            .map(|(k, id)| Branch {
                id: id.clone(),
                target: format!("http://127.0.0.1:9/p/{k}"),
                payload: b"{}".to_vec(),
                state: decision.branch_state(),
                last_error: None,
            })
            .collect();
        tx.decision = Some(decision);
        tx.state = decision.final_state();
        tx.updated_at = created + Duration::from_millis(20);
        tx.due_at = None;
        tx.version = 5; // begin, two registrations, the decision, the phase-two round
        store.insert_unsynced(&tx).await.map_err(|e| e.to_string())?;
        if bar && i % 20_000 == 0 {
            let rate = i as f64 / started.elapsed().as_secs_f64().max(1e-3);
            draw_bar("history fill", i as f64 / n as f64, &format!("{rate:>9.0} tx/s"));
        }
    }
    store.sync().await.map_err(|e| e.to_string())?;
    if bar {
        draw_bar("history fill", 1.0, "synced");
        eprintln!();
    }
    Ok(())
}

fn print_row(f: &Figures, raw: Option<f64>) {
    let ratio = raw.filter(|r| *r > 0.0).map_or(String::from("-"), |r| format!("{:.2}x", f.tx_per_s() / r));
    println!(
        "{:<21} {:>3} {:>5} {:>10.0} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>6}",
        f.mode,
        f.branches,
        f.concurrency,
        f.tx_per_s(),
        ratio,
        f.p50_ms,
        f.p99_ms,
        f.p999_ms,
        f.errors
    );
}

/// The median of `v` (the mean of the middle two for an even count), its lowest and its highest.
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    (median, s[0], s[n - 1])
}

async fn bench(args: Args) -> Result<bool, String> {
    let participants = Participants::start().await.map_err(|e| e.to_string())?;
    let http = build_client(&ClientConfig::default()).map_err(|e| e.to_string())?;
    let db = match &args.participant_db {
        Some(url) => Some(DbBench::start(url).await?),
        None => None,
    };
    let bench = Bench { args, participants, http, db };
    let c = bench.args.concurrency;
    println!(
        "{:<21} {:>3} {:>5} {:>10} {:>7} {:>8} {:>8} {:>8} {:>6}",
        "mode", "br", "conc", "tx/s", "vs raw", "p50 ms", "p99 ms", "p999 ms", "errors"
    );
    let mut main = Vec::new();
    let mut half = Vec::new();
    let mut modes = bench.args.modes.clone();
    if bench.args.postgres.is_some() {
        modes.extend(["postgres_1".to_owned(), "postgres_3".to_owned()]);
    }
    if bench.db.is_some() {
        for m in ["raw_db", "participant_db"] {
            if !modes.iter().any(|x| x == m) {
                modes.push(m.to_owned());
            }
        }
    }
    // Per mode: its rate in each round, and its ratio to that round's raw.
    let mut rounds: Vec<(String, Vec<f64>, Vec<f64>)> =
        modes.iter().map(|m| (m.clone(), Vec::new(), Vec::new())).collect();
    for round in 1..=bench.args.rounds {
        if bench.args.rounds > 1 {
            println!("round {round} of {}", bench.args.rounds);
        }
        let mut raw = None;
        for (mode, rates, ratios) in &mut rounds {
            let (f, h) = bench.run_with(mode, 2, c, bench.args.half_peak).await?;
            if mode == "raw" {
                raw = Some(f.tx_per_s());
            }
            print_row(&f, raw);
            rates.push(f.tx_per_s());
            if let Some(r) = raw.filter(|r| *r > 0.0) {
                ratios.push(f.tx_per_s() / r);
            }
            main.push(f);
            if let Some(h) = h {
                print_row(&h, None);
                half.push(h);
            }
        }
    }
    if bench.args.rounds > 1 {
        println!(
            "over {} rounds: median tx/s (lowest, highest); median ratio to the round's raw (lowest, highest)",
            bench.args.rounds
        );
        for (mode, rates, ratios) in &rounds {
            let (r, lo, hi) = spread(rates);
            let ratio = if ratios.is_empty() {
                String::new()
            } else {
                let (q, qlo, qhi) = spread(ratios);
                format!("; {q:.2}x ({qlo:.2}x, {qhi:.2}x)")
            };
            println!("{mode:<21} {r:>10.0} ({lo:.0}, {hi:.0}){ratio}");
        }
    }
    // participant_db over raw_db, round by round (each ran right after the other).
    let rates_of = |m: &str| rounds.iter().find(|(mode, _, _)| mode == m).map(|(_, r, _)| r.clone());
    let db_ratios: Vec<f64> = match (rates_of("raw_db"), rates_of("participant_db")) {
        (Some(raw), Some(tcc)) => {
            raw.iter().zip(&tcc).filter(|(r, _)| **r > 0.0).map(|(r, t)| t / r).collect()
        }
        _ => Vec::new(),
    };
    if let Some(db) = &bench.db
        && !db_ratios.is_empty()
    {
        let (q, lo, hi) = spread(&db_ratios);
        println!("participant_db over raw_db on {}: {q:.2}x ({lo:.2}x, {hi:.2}x)", db.describe());
    }
    let mut extra = Vec::new();
    if bench.args.sweep_branches {
        for mode in ["raw", "embedded", "standalone"] {
            let mut base = None;
            for b in [1, 2, 4, 8] {
                let f = bench.run(mode, b, c).await?;
                base = base.or(Some(f.tx_per_s()));
                print_row(&f, None);
                extra.push(f);
            }
        }
    }
    if bench.args.sweep_concurrency {
        for mode in ["raw", "embedded", "standalone"] {
            for conc in [1, 4, 16, 64, 256] {
                let f = bench.run(mode, 2, conc).await?;
                print_row(&f, None);
                extra.push(f);
            }
        }
    }
    let held = match bench.args.unfinished {
        Some(n) => {
            let u = unfinished(&bench, n).await?;
            println!(
                "unfinished: {} transactions (made in {:.1} s): coordinator RSS {:.1} MiB",
                u.count, u.create_s, u.rss_mb
            );
            Some(u)
        }
        None => None,
    };
    let recovered = match bench.args.recover {
        Some(n) => {
            let r = recover(&bench, n).await?;
            println!(
                "recover: {} unfinished of {} begun (set-up {:.1} s, restarted {:.1} s after the kill): \
                 healthy in {:.0} ms, all finished in {:.2} s, {:.0} tx/s ({} cancel calls)",
                r.count,
                r.begun,
                r.setup_s,
                r.wait_s,
                r.healthy_ms,
                r.finished_s,
                r.tx_per_s(),
                r.cancel_calls
            );
            Some(r)
        }
        None => None,
    };
    let hist = match bench.args.history {
        Some(n) => {
            let h = history(&bench, n).await?;
            println!(
                "history: {} finished transactions filled in {:.1} s, {:.1} MiB on disk, \
                 coordinator up in {:.0} ms",
                h.count, h.fill_s, h.store_mb, h.open_ms
            );
            for (empty, filled) in &h.pairs {
                println!(
                    "history: {:<10} {:>8.0} tx/s empty, {:>8.0} tx/s with history: {:.2}x",
                    empty.mode.split('/').next().unwrap_or_default(),
                    empty.tx_per_s(),
                    filled.tx_per_s(),
                    filled.tx_per_s() / empty.tx_per_s().max(1e-9)
                );
            }
            Some(h)
        }
        None => None,
    };
    // With one round, a mode's rate and its ratio to raw in that round; with more, the medians.
    let of = |m: &str| rounds.iter().find(|(mode, _, _)| mode == m);
    let rate = |m: &str| of(m).filter(|(_, r, _)| !r.is_empty()).map(|(_, r, _)| spread(r).0);
    let ratio = |m: &str| of(m).filter(|(_, _, q)| !q.is_empty()).map(|(_, _, q)| spread(q).0);
    if let Some(path) = &bench.args.json {
        let num = |v: Option<f64>| v.map_or("null".to_owned(), |v| format!("{v:.3}"));
        let mut out = String::from("{\n");
        for m in ["raw", "embedded", "standalone", "coordinator_only", "raw_db", "participant_db"] {
            let _ = writeln!(out, "  \"{m}_tx_per_s\": {},", num(rate(m)));
        }
        let db_ratio = (!db_ratios.is_empty()).then(|| spread(&db_ratios).0);
        let _ = writeln!(out, "  \"participant_db_ratio\": {},", num(db_ratio));
        let _ = writeln!(out, "  \"embedded_ratio\": {},", num(ratio("embedded")));
        let _ = writeln!(out, "  \"standalone_ratio\": {},", num(ratio("standalone")));
        let _ = writeln!(out, "  \"rounds\": {},", bench.args.rounds);
        let list = |v: &[f64]| v.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", ");
        for (mode, rates, ratios) in &rounds {
            let _ = writeln!(out, "  \"{mode}_tx_per_s_rounds\": [{}],", list(rates));
            if mode != "raw" && !ratios.is_empty() {
                let _ = writeln!(out, "  \"{mode}_ratio_rounds\": [{}],", list(ratios));
            }
        }
        for h in &half {
            let m = h.mode.trim_end_matches("@half");
            let _ = writeln!(out, "  \"{m}_half_peak_rate\": {:.1},", h.tx_per_s());
            let _ = writeln!(out, "  \"{m}_half_peak_target_rate\": {},", num(h.target_rate));
            let _ = writeln!(out, "  \"{m}_half_peak_p50_ms\": {:.3},", h.p50_ms);
            let _ = writeln!(out, "  \"{m}_half_peak_p99_ms\": {:.3},", h.p99_ms);
            let _ = writeln!(out, "  \"{m}_half_peak_p999_ms\": {:.3},", h.p999_ms);
            let _ = writeln!(out, "  \"{m}_half_peak_errors\": {},", h.errors);
        }
        let _ = writeln!(out, "  \"concurrency\": {c},\n  \"duration_s\": {},", bench.args.duration);
        if let Some(u) = &held {
            let _ =
                writeln!(out, "  \"unfinished\": {},\n  \"rss_mb_unfinished\": {:.1},", u.count, u.rss_mb);
        }
        let mut kv = |key: &str, value: String| {
            let _ = writeln!(out, "  \"{key}\": {value},");
        };
        if let Some(r) = &recovered {
            kv("recover_n", r.count.to_string());
            kv("recover_begun", r.begun.to_string());
            kv("recover_setup_s", format!("{:.3}", r.setup_s));
            kv("recover_healthy_ms", format!("{:.1}", r.healthy_ms));
            kv("recover_s", format!("{:.3}", r.finished_s));
            kv("recover_tx_per_s", format!("{:.1}", r.tx_per_s()));
            kv("recover_cancel_calls", r.cancel_calls.to_string());
        }
        if let Some(h) = &hist {
            kv("history_n", h.count.to_string());
            kv("history_fill_s", format!("{:.3}", h.fill_s));
            kv("history_store_mb", format!("{:.1}", h.store_mb));
            kv("history_open_ms", format!("{:.1}", h.open_ms));
            for (empty, filled) in &h.pairs {
                let m = empty.mode.split('/').next().unwrap_or_default();
                kv(&format!("history_{m}_empty_tx_per_s"), format!("{:.1}", empty.tx_per_s()));
                kv(&format!("history_{m}_filled_tx_per_s"), format!("{:.1}", filled.tx_per_s()));
                let ratio = filled.tx_per_s() / empty.tx_per_s().max(1e-9);
                kv(&format!("history_{m}_ratio"), format!("{ratio:.3}"));
            }
        }
        let history_runs = hist.iter().flat_map(|h| &h.runs);
        let rows: Vec<String> =
            main.iter().chain(&half).chain(&extra).chain(history_runs).map(Figures::json).collect();
        let _ = writeln!(out, "  \"runs\": [\n    {}\n  ]\n}}", rows.join(",\n    "));
        std::fs::write(path, out).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    let history_runs = hist.iter().flat_map(|h| &h.runs);
    let complete = main.iter().chain(&half).chain(&extra).chain(history_runs).all(|f| f.transactions > 0);
    if let Some(db) = &bench.db {
        db.finish().await?;
    }
    let confirmed = bench.participants.confirms.load(Ordering::Relaxed);
    if confirmed == 0 && main.iter().any(|f| !f.mode.ends_with("_db")) {
        return Err("no participant was ever confirmed".into());
    }
    Ok(complete)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tcc-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(serve) = args.serve_coordinator.clone() {
        return rt.block_on(serve_coordinator(serve, client_config(&args)));
    }
    if let Some(fill) = args.fill_history.clone() {
        return rt.block_on(fill_history(fill));
    }
    match rt.block_on(bench(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("tcc-bench: a mode completed no transaction");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("tcc-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The child-process coordinator of the standalone modes when no tcc-coordinator binary is found.
async fn serve_coordinator(serve: Vec<String>, client: ClientConfig) -> ExitCode {
    let [listen, dir] = serve.as_slice() else { return ExitCode::from(2) };
    let launch = tcc_http::server::Launch {
        listen: listen.clone(),
        store: match dir.parse() {
            Ok(store) => store,
            Err(e) => {
                eprintln!("tcc-bench coordinator: {e}");
                return ExitCode::from(2);
            }
        },
        core: tcc_core::Config::default(),
        server: Default::default(),
        client,
    };
    match tcc_http::server::start(launch).await {
        Ok(running) => {
            std::future::pending::<()>().await;
            drop(running);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tcc-bench coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}
