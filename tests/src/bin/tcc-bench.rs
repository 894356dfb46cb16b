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
//! - `standalone`: through a `tcc-coordinator` process over HTTP, durable;
//! - `coordinator_only`: standalone, the initiator making no tries (begin, register two branches,
//!   confirm and wait: the coordinator's own cost plus its phase-two calls).
//!
//! A transaction counts when its phase two has finished (both branches confirmed), not when the
//! confirm decision is acknowledged, so no mode can look fast by leaving a backlog.
//! Figures on a shared 2-core machine are noisy: compare ratios within one run.

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
use tcc_http::client::TccClient;
use tcc_http::protocol::{BRANCH_HEADER, DEADLINE_HEADER, GID_HEADER};
use tcc_http::server::native::StateView;
use tcc_http::target::AllowList;
use tcc_http::transport::{ClientConfig, build_client};

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
    /// Also run `postgres_1` and `postgres_3`: standalone on the PostgreSQL store at this URL (each
    /// run on a fresh schema), with one coordinator process and with three sharing the database
    /// (initiators spread over them).
    #[arg(long, env = "TCC_BENCH_POSTGRES_URL")]
    postgres: Option<String>,
    /// Also measure the resident memory of a `tcc-coordinator` process holding N unfinished
    /// transactions (confirm decided, participants failing, the next retry an hour away).
    #[arg(long, value_name = "N")]
    unfinished: Option<usize>,
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
}

impl Figures {
    fn tx_per_s(&self) -> f64 {
        self.transactions as f64 / self.seconds
    }

    fn json(&self) -> String {
        format!(
            "{{\"mode\":\"{}\",\"branches\":{},\"concurrency\":{},\"transactions\":{},\"errors\":{},\"seconds\":{:.3},\"tx_per_s\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3}}}",
            self.mode,
            self.branches,
            self.concurrency,
            self.transactions,
            self.errors,
            self.seconds,
            self.tx_per_s(),
            self.p50_ms,
            self.p99_ms,
            self.p999_ms
        )
    }
}

/// Two (or more) participants answering the native protocol at once, counting what they are told.
struct Participants {
    addr: SocketAddr,
    confirms: Arc<AtomicU64>,
    /// While set, confirm and cancel answer 503 (the participant is failing).
    failing: Arc<AtomicBool>,
}

impl Participants {
    async fn start() -> std::io::Result<Participants> {
        let confirms = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let (c, f, f2) = (confirms.clone(), failing.clone(), failing.clone());
        let app = Router::new()
            .route("/p/{n}/try", post(|| async { (StatusCode::OK, "held") }))
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
                "/p/{n}/cancel",
                post(move || {
                    let f = f2.clone();
                    async move {
                        if f.load(Ordering::Relaxed) {
                            StatusCode::SERVICE_UNAVAILABLE
                        } else {
                            StatusCode::OK
                        }
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Participants { addr, confirms, failing })
    }

    fn target(&self, n: usize) -> String {
        format!("http://{}/p/{n}", self.addr)
    }
}

/// A coordinator process for the standalone modes; killed when dropped.
struct CoordinatorProcess {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn spawn_coordinator(
    args: &Args,
    store: Option<&str>,
    owner: &str,
) -> Result<CoordinatorProcess, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let store = store.map_or_else(|| format!("sled:{}", dir.path().join("data").display()), str::to_owned);
    let port = free_port().map_err(|e| e.to_string())?;
    let listen = format!("127.0.0.1:{port}");
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = match &coordinator_bin(args) {
        Some(bin) => {
            let mut c = std::process::Command::new(bin);
            c.args(["--listen", &listen, "--owner", owner]).env("TCC_STORE", &store);
            c
        }
        None => {
            let mut c = std::process::Command::new(&me);
            c.arg("--serve-coordinator").arg(&listen).arg(&store);
            c
        }
    };
    cmd.env("RUST_LOG", "error").stdout(std::process::Stdio::null());
    let child = cmd.spawn().map_err(|e| format!("starting the coordinator: {e}"))?;
    let proc = CoordinatorProcess { child, url: format!("http://{listen}"), _dir: dir };
    wait_healthy(&reqwest::Client::new(), &proc.url, Duration::from_secs(10)).await?;
    Ok(proc)
}

/// The `tcc-coordinator` binary: `--coordinator-bin`, or the one next to this binary if built.
fn coordinator_bin(args: &Args) -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let sibling = me.with_file_name(format!("tcc-coordinator{}", std::env::consts::EXE_SUFFIX));
    args.coordinator_bin.clone().or_else(|| sibling.exists().then_some(sibling))
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
}

const WAIT: Duration = Duration::from_secs(30);

impl Driver {
    fn tcc(clients: Vec<TccClient>, targets: Vec<String>, tries: bool) -> Driver {
        Driver::Tcc { clients: Arc::new(clients), next: Arc::default(), targets, tries }
    }

    async fn one(&self) -> Result<(), String> {
        match self {
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
                for r in futures_join(confirms).await {
                    ok(r)?;
                }
                Ok(())
            }
            Driver::Tcc { clients, next, targets, tries } => {
                // Initiators spread over the coordinators (one, except for postgres_3).
                let client = &clients[next.fetch_add(1, Ordering::Relaxed) % clients.len()];
                let tx = client.begin(WAIT).await.map_err(|e| e.to_string())?;
                for (i, t) in targets.iter().enumerate() {
                    if *tries {
                        tx.try_branch(&format!("b{i}"), t, b"{}".to_vec())
                            .await
                            .map_err(|e| e.to_string())?;
                    } else {
                        tx.register_branch(&format!("b{i}"), t, b"{}".to_vec())
                            .await
                            .map_err(|e| e.to_string())?;
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

/// Awaits futures concurrently on this task and collects their outputs in order. Awaiting
/// lazily started requests one after the other would not overlap them, and spawning would add work
/// the raw mode does not otherwise do. (The same helper as tcc-core's private `join_all`.)
async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futs.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// Runs `driver` from `concurrency` tasks for `seconds` (after a warm-up of a tenth of that, at
/// most a second), with a progress bar on stderr for runs longer than three seconds.
async fn measure(mode: &str, branches: usize, driver: Driver, concurrency: usize, seconds: f64) -> Figures {
    let warmup = Duration::from_secs_f64((seconds / 10.0).min(1.0));
    let run = Duration::from_secs_f64(seconds);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (driver, measuring, stop, done) = (driver.clone(), measuring.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut last_error = None;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = driver.one().await;
                if measuring.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                    match r {
                        Ok(()) => {
                            lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            errors += 1;
                            last_error = Some(e);
                        }
                    }
                }
            }
            (lat, errors, last_error)
        }));
    }
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let bar = seconds > 3.0;
    while started.elapsed() < run {
        tokio::time::sleep(Duration::from_millis(200).min(run.saturating_sub(started.elapsed()))).await;
        if bar {
            let frac = (started.elapsed().as_secs_f64() / seconds).min(1.0);
            let filled = (frac * 30.0) as usize;
            let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64().max(1e-3);
            eprint!(
                "\r{mode:>16} [{}{}] {:>3.0}% {:>9.0} tx/s",
                "#".repeat(filled),
                ".".repeat(30 - filled),
                frac * 100.0,
                rate
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    if bar {
        eprintln!();
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e, last)) = t.await {
            lat.extend(l);
            errors += e;
            if let Some(last) = last {
                eprintln!("{mode}: error: {last}");
            }
        }
    }
    lat.sort_unstable();
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
        errors,
        seconds: elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
    }
}

/// A fast, durable engine for the benchmark: the defaults, with retries not needed.
fn embedded_config() -> tcc_core::Config {
    tcc_core::Config::default()
}

struct Bench {
    args: Args,
    participants: Participants,
    http: reqwest::Client,
}

impl Bench {
    fn targets(&self, branches: usize) -> Vec<String> {
        (0..branches).map(|n| self.participants.target(n)).collect()
    }

    async fn run(&self, mode: &str, branches: usize, concurrency: usize) -> Result<Figures, String> {
        let secs = self.args.duration;
        let targets = self.targets(branches);
        match mode {
            "raw" => {
                let d = Driver::Raw { http: self.http.clone(), targets };
                Ok(measure(mode, branches, d, concurrency, secs).await)
            }
            "embedded" => {
                let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
                let allow = AllowList::new(&[]).map_err(|e| e.to_string())?;
                let client = TccClient::open_embedded(dir.path(), embedded_config(), allow)
                    .await
                    .map_err(|e| e.to_string())?;
                let d = Driver::tcc(vec![client.clone()], targets, true);
                let f = measure(mode, branches, d, concurrency, secs).await;
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
                    clients.push(
                        TccClient::remote_with(&proc.url, None, self.http.clone())
                            .map_err(|e| e.to_string())?,
                    );
                    procs.push(proc);
                }
                let d = Driver::tcc(clients, targets, mode != "coordinator_only");
                let f = measure(mode, branches, d, concurrency, secs).await;
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
        let client = TccClient::remote_with(&url, None, bench.http.clone()).map_err(|e| e.to_string())?;
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

fn print_row(f: &Figures, raw: Option<f64>) {
    let ratio = raw.filter(|r| *r > 0.0).map_or(String::from("-"), |r| format!("{:.2}x", f.tx_per_s() / r));
    println!(
        "{:<17} {:>3} {:>5} {:>10.0} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>6}",
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

async fn bench(args: Args) -> Result<bool, String> {
    let participants = Participants::start().await.map_err(|e| e.to_string())?;
    let http = build_client(&ClientConfig::default()).map_err(|e| e.to_string())?;
    let bench = Bench { args, participants, http };
    let c = bench.args.concurrency;
    println!(
        "{:<17} {:>3} {:>5} {:>10} {:>7} {:>8} {:>8} {:>8} {:>6}",
        "mode", "br", "conc", "tx/s", "vs raw", "p50 ms", "p99 ms", "p999 ms", "errors"
    );
    let mut main = Vec::new();
    let mut raw = None;
    let mut modes = bench.args.modes.clone();
    if bench.args.postgres.is_some() {
        modes.extend(["postgres_1".to_owned(), "postgres_3".to_owned()]);
    }
    for mode in modes {
        let f = bench.run(&mode, 2, c).await?;
        if mode == "raw" {
            raw = Some(f.tx_per_s());
        }
        print_row(&f, raw);
        main.push(f);
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
    let rate = |m: &str| main.iter().find(|f| f.mode == m).map(Figures::tx_per_s);
    let ratio = |m: &str| match (rate(m), raw) {
        (Some(x), Some(r)) if r > 0.0 => Some(x / r),
        _ => None,
    };
    if let Some(path) = &bench.args.json {
        let num = |v: Option<f64>| v.map_or("null".to_owned(), |v| format!("{v:.3}"));
        let mut out = String::from("{\n");
        for m in ["raw", "embedded", "standalone", "coordinator_only"] {
            let _ = writeln!(out, "  \"{m}_tx_per_s\": {},", num(rate(m)));
        }
        let _ = writeln!(out, "  \"embedded_ratio\": {},", num(ratio("embedded")));
        let _ = writeln!(out, "  \"standalone_ratio\": {},", num(ratio("standalone")));
        let _ = writeln!(out, "  \"concurrency\": {c},\n  \"duration_s\": {},", bench.args.duration);
        if let Some(u) = &held {
            let _ =
                writeln!(out, "  \"unfinished\": {},\n  \"rss_mb_unfinished\": {:.1},", u.count, u.rss_mb);
        }
        let rows: Vec<String> = main.iter().chain(&extra).map(Figures::json).collect();
        let _ = writeln!(out, "  \"runs\": [\n    {}\n  ]\n}}", rows.join(",\n    "));
        std::fs::write(path, out).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    let complete = main.iter().chain(&extra).all(|f| f.transactions > 0);
    let confirmed = bench.participants.confirms.load(Ordering::Relaxed);
    if confirmed == 0 && !main.is_empty() {
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
        return rt.block_on(serve_coordinator(serve));
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
async fn serve_coordinator(serve: Vec<String>) -> ExitCode {
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
        client: Default::default(),
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
