//! `tcc-flood`: resident memory of a `tcc-coordinator` process under two floods, over loopback.
//!
//! ```text
//! cargo build --release -p tcc-http --bin tcc-coordinator
//! cargo run --release -p tcc-tests --bin tcc-flood
//! cargo run --release -p tcc-tests --bin tcc-flood -- --coordinator path/to/tcc-coordinator
//! ```
//!
//! Each flood runs against a coordinator process of its own (sled store in a temporary directory,
//! default settings), started from `--coordinator` (default: the `tcc-coordinator` next to this
//! binary):
//!
//! - `headers`: `--connections` (900) connections each send a request header that never ends,
//!   `--header-kib` (300) KiB of it, and hold their connection for `--hold` (2 s);
//! - `registrations`: one transaction gets `--registrations` (100) branch registrations of
//!   `--payload-kib` (900) KiB of payload each, `--concurrency` (4) at a time.
//!
//! For each it prints the coordinator's resident memory (VmRSS) before, while the flood is held (or
//! once it is done), and two seconds after it ended, the peak (VmHWM), the answers it got, and for
//! `registrations` the size of the data directory. Every connection, write and request is bounded
//! by a timeout, and the whole run by `--limit` (5 min): it stops by itself, and kills the
//! coordinators it started.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[derive(Debug, Parser)]
#[command(about = "Resident memory of a tcc-coordinator under a header flood and a registration flood.")]
struct Args {
    /// The tcc-coordinator binary (default: the one next to this binary).
    #[arg(long)]
    coordinator: Option<PathBuf>,
    /// Which floods to run.
    #[arg(long, value_delimiter = ',', default_value = "headers,registrations")]
    floods: Vec<String>,
    /// Connections of the header flood.
    #[arg(long, default_value_t = 900)]
    connections: usize,
    /// KiB of header each connection sends (never ending it).
    #[arg(long, default_value_t = 300)]
    header_kib: usize,
    /// Seconds the header flood holds its connections once sent.
    #[arg(long, default_value_t = 2)]
    hold: u64,
    /// Registrations of the registration flood, all on one transaction.
    #[arg(long, default_value_t = 100)]
    registrations: usize,
    /// KiB of payload of each registration.
    #[arg(long, default_value_t = 900)]
    payload_kib: usize,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Longest the whole run may take, in seconds.
    #[arg(long, default_value_t = 300)]
    limit: u64,
}

/// A coordinator process of this probe, killed when dropped.
struct Coordinator {
    child: tokio::process::Child,
    url: String,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Coordinator {
    async fn start(bin: &Path) -> Result<Coordinator> {
        let dir = tempfile::tempdir().context("a temporary directory")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("a free port")?
            .port();
        let data = dir.path().join("data");
        let child = tokio::process::Command::new(bin)
            .env_clear()
            .env("TCC_LISTEN", format!("127.0.0.1:{port}"))
            .env("TCC_DATA_DIR", &data)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let c = Coordinator { child, url: format!("http://127.0.0.1:{port}"), data, _dir: dir };
        let http = client()?;
        for _ in 0..300 {
            let health = http.get(format!("{}/healthz", c.url)).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return Ok(c);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the coordinator did not become healthy within 30 s")
    }

    fn port(&self) -> &str {
        self.url.rsplit(':').next().unwrap_or_default()
    }

    /// (VmRSS, VmHWM) in MiB.
    fn memory(&self) -> (f64, f64) {
        let status =
            self.child.id().and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok());
        let field = |name: &str| -> f64 {
            status
                .as_deref()
                .and_then(|s| s.lines().find(|l| l.starts_with(name)))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .map_or(f64::NAN, |kb| kb / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

fn client() -> Result<reqwest::Client> {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().context("an HTTP client")
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// One connection of the header flood: how far it got, and the connection if it is still open.
async fn half_header(addr: String, kib: usize) -> (&'static str, Option<TcpStream>) {
    let step = Duration::from_secs(5);
    let mut tcp = match tokio::time::timeout(step, TcpStream::connect(&addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(_)) => return ("refused", None),
        Err(_) => return ("connect timed out", None),
    };
    let head = b"POST /v1/transactions HTTP/1.1\r\nHost: flood\r\nX-Pad: ";
    if !matches!(tokio::time::timeout(step, tcp.write_all(head)).await, Ok(Ok(()))) {
        return ("cut off", None);
    }
    let chunk = vec![b'a'; 1024];
    for _ in 0..kib {
        match tokio::time::timeout(step, tcp.write_all(&chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return ("cut off", None),
            Err(_) => return ("stalled", Some(tcp)),
        }
    }
    ("sent", Some(tcp))
}

async fn headers(bin: &Path, args: &Args) -> Result<serde_json::Value> {
    let c = Coordinator::start(bin).await?;
    let before = c.memory();
    let addr = format!("127.0.0.1:{}", c.port());
    let started = Instant::now();
    let tasks: Vec<_> =
        (0..args.connections).map(|_| tokio::spawn(half_header(addr.clone(), args.header_kib))).collect();
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut held = Vec::new();
    for t in tasks {
        let (outcome, tcp) = t.await.context("a flood connection")?;
        *outcomes.entry(outcome).or_default() += 1;
        held.extend(tcp);
    }
    let sent_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    let during = c.memory();
    drop(held);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = c.memory();
    let serves =
        client()?.get(format!("{}/healthz", c.url)).send().await.is_ok_and(|r| r.status().is_success());
    Ok(serde_json::json!({
        "flood": "headers",
        "connections": args.connections,
        "header_kib": args.header_kib,
        "outcomes": outcomes,
        "sent_in_ms": sent_in.as_millis() as u64,
        "rss_before_mib": round(before.0),
        "rss_held_mib": round(during.0),
        "rss_after_mib": round(after.0),
        "rss_peak_mib": round(after.1),
        "serves_after": serves,
    }))
}

async fn registrations(bin: &Path, args: &Args) -> Result<serde_json::Value> {
    let c = Coordinator::start(bin).await?;
    let before = c.memory();
    let http = client()?;
    let begun = http
        .post(format!("{}/v1/transactions", c.url))
        .header("content-type", "application/json")
        .body(r#"{"timeout_ms": 600000}"#)
        .send()
        .await
        .context("begin")?;
    let tx: serde_json::Value =
        serde_json::from_slice(&begun.bytes().await.context("begin's answer")?).context("begin's answer")?;
    let gid = tx["gid"].as_str().ok_or_else(|| anyhow!("begin answered no gid: {tx}"))?.to_owned();
    let payload = "x".repeat(args.payload_kib << 10);
    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..args.concurrency.max(1))
        .map(|_| {
            let (http, next, url, payload, total) = (
                http.clone(),
                next.clone(),
                format!("{}/v1/transactions/{gid}/branches", c.url),
                payload.clone(),
                args.registrations,
            );
            tokio::spawn(async move {
                let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        return statuses;
                    }
                    let body = serde_json::json!({
                        "branch": format!("b{i}"),
                        "target": "http://127.0.0.1:9/flood",
                        "payload": payload,
                    });
                    let status = match http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.to_string())
                        .send()
                        .await
                    {
                        Ok(res) => res.status().as_u16().to_string(),
                        Err(e) if e.is_timeout() => "timeout".to_owned(),
                        Err(_) => "error".to_owned(),
                    };
                    *statuses.entry(status).or_default() += 1;
                }
            })
        })
        .collect();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for w in workers {
        for (k, v) in w.await.context("a registration worker")? {
            *statuses.entry(k).or_default() += v;
        }
    }
    let took = started.elapsed();
    let during = c.memory();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = c.memory();
    Ok(serde_json::json!({
        "flood": "registrations",
        "registrations": args.registrations,
        "payload_kib": args.payload_kib,
        "concurrency": args.concurrency,
        "statuses": statuses,
        "took_ms": took.as_millis() as u64,
        "rss_before_mib": round(before.0),
        "rss_done_mib": round(during.0),
        "rss_after_mib": round(after.0),
        "rss_peak_mib": round(after.1),
        "data_dir_mib": round(dir_size(&c.data) as f64 / (1024.0 * 1024.0)),
    }))
}

fn round(mib: f64) -> f64 {
    (mib * 10.0).round() / 10.0
}

async fn run(args: Args) -> Result<()> {
    let bin = match &args.coordinator {
        Some(bin) => bin.clone(),
        None => std::env::current_exe().context("this binary's path")?.with_file_name("tcc-coordinator"),
    };
    for flood in &args.floods {
        let report = match flood.as_str() {
            "headers" => headers(&bin, &args).await?,
            "registrations" => registrations(&bin, &args).await?,
            other => bail!("unknown flood {other:?} (headers, registrations)"),
        };
        println!("{report}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let limit = Duration::from_secs(args.limit);
    match tokio::time::timeout(limit, run(args)).await {
        Ok(Ok(())) => std::process::ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("tcc-flood: {e:#}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("tcc-flood: the run took longer than {limit:?}; stopped");
            std::process::ExitCode::FAILURE
        }
    }
}
