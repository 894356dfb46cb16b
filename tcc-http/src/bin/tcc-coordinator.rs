//! `tcc-coordinator`: the standalone coordinator server. `tcc-coordinator --help` lists every flag and
//! the `TCC_*` environment variable it can also be read from.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use tcc_core::RetryPolicy;
use tcc_http::server::{Launch, ServerConfig, StoreChoice, Token};
use tcc_http::target::AllowList;
use tcc_http::transport::{Batching, ClientConfig};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The tcc Try-Confirm-Cancel transaction coordinator.
///
/// Serves the native JSON API (/v1, described at /openapi.json), the DTM-compatible API
/// (/api/dtmsvr), /healthz, /readyz and /metrics. Durations take a unit: 500ms, 30s, 5m, 1h, 7d.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "TCC_LISTEN", default_value = "127.0.0.1:36789")]
    listen: String,
    /// Where transactions are kept: `sled:DIR` (the embedded store; one process) or
    /// `postgres://USER@HOST:PORT/DB` (shared by every coordinator pointed at it, active-active; the
    /// schema is created or migrated on start). Default: sled:./tcc-data.
    #[arg(long, env = "TCC_STORE", hide_env_values = true)]
    store: Option<String>,
    /// Short for `--store sled:DIR`.
    #[arg(long, env = "TCC_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Require `Authorization: Bearer TOKEN` on every mutating call. Never logged.
    #[arg(long, env = "TCC_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// URL prefix of participants this coordinator may call (repeatable; comma-separated in the
    /// environment). With none, only loopback participants are allowed.
    #[arg(long = "allow-participant", env = "TCC_ALLOW_PARTICIPANT", value_delimiter = ',')]
    allow_participant: Vec<String>,
    /// Timeout of a transaction begun without one.
    #[arg(long, env = "TCC_DEFAULT_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    default_timeout: Duration,
    /// Longest transaction timeout a client may ask for.
    #[arg(long, env = "TCC_MAX_TIMEOUT", default_value = "24h", value_parser = parse_duration)]
    max_timeout: Duration,
    /// Delay before the first phase-two retry.
    #[arg(long, env = "TCC_RETRY_INITIAL", default_value = "500ms", value_parser = parse_duration)]
    retry_initial: Duration,
    /// Growth of the delay per retry.
    #[arg(long, env = "TCC_RETRY_MULTIPLIER", default_value_t = 2.0)]
    retry_multiplier: f64,
    /// Largest delay between two phase-two rounds.
    #[arg(long, env = "TCC_RETRY_MAX_BACKOFF", default_value = "60s", value_parser = parse_duration)]
    retry_max_backoff: Duration,
    /// Share (0 to 1) of each delay that is randomised away.
    #[arg(long, env = "TCC_RETRY_JITTER", default_value_t = 0.2)]
    retry_jitter: f64,
    /// Failed phase-two rounds after which a transaction is flagged for an operator.
    #[arg(long, env = "TCC_RETRY_MAX_ATTEMPTS", default_value_t = 12)]
    retry_max_attempts: u32,
    /// Longest one phase-two call to a participant may take.
    #[arg(long, env = "TCC_CALL_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    call_timeout: Duration,
    /// Longest a connection to a participant may take to open.
    #[arg(long, env = "TCC_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Most phase-two calls to one participant operation sent in one request (`POST {target}/batch`)
    /// when calls crowd; 1 sends every call alone.
    #[arg(long, env = "TCC_BATCH_MAX_CALLS", default_value_t = Batching::default().max_calls as u32,
          value_parser = clap::value_parser!(u32).range(1..=tcc_http::protocol::MAX_BATCH_CALLS as i64))]
    batch_max_calls: u32,
    /// Batches under way to one participant operation at once.
    #[arg(long, env = "TCC_BATCHES_IN_FLIGHT", default_value_t = Batching::default().in_flight as u32,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    batches_in_flight: u32,
    /// How long this process's claim on phase-two work lasts if it dies.
    #[arg(long, env = "TCC_LEASE", default_value = "30s", value_parser = parse_duration)]
    lease: Duration,
    /// Most phase-two rounds running at once (each calls the transaction's pending branches); a
    /// backlog beyond it waits its turn.
    #[arg(long, env = "TCC_MAX_ROUNDS", default_value_t = 1024)]
    max_rounds: usize,
    /// Delete finished (confirmed or cancelled) transactions this long after they finished, e.g. 7d
    /// (default: keep them all). Flagged and unfinished ones are never deleted.
    #[arg(long, env = "TCC_RETAIN_FINISHED", value_parser = parse_duration)]
    retain_finished: Option<Duration>,
    /// Most payload bytes the branches of one transaction may hold together (a registration past it
    /// is refused with 422 and stores nothing), e.g. 4MiB, 512KiB or a number of bytes. Each
    /// branch's payload is at most 1 MiB, and a transaction has at most 128 branches.
    #[arg(long, env = "TCC_MAX_TX_PAYLOAD", default_value = "4MiB", value_parser = parse_size)]
    max_tx_payload: usize,
    /// Longest a client may take to send a request's whole header; the connection is closed past
    /// it.
    #[arg(long, env = "TCC_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    header_read_timeout: Duration,
    /// Largest request header (at least 8KiB); a larger one is answered 431 and the connection
    /// closed.
    #[arg(long, env = "TCC_MAX_HEADER_BYTES", default_value = "32KiB", value_parser = parse_size)]
    max_header_bytes: usize,
    /// Longest a request's body may take to arrive, whole; past it the request is answered 408.
    #[arg(long, env = "TCC_BODY_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    body_read_timeout: Duration,
    /// Most client connections open at once; more wait in the listen backlog until one closes.
    #[arg(long, env = "TCC_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// This process's name in leases (must differ between processes sharing a store).
    #[arg(long, env = "TCC_OWNER")]
    owner: Option<String>,
}

/// Parses `250ms`, `30s`, `5m`, `1h`, `7d` (a bare number is seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 500ms, 30s, 5m, 1h or 7d"))?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)")),
    };
    ms.map(Duration::from_millis).ok_or_else(|| format!("{s:?} is too long"))
}

/// Parses `4MiB`, `512KiB`, `1GiB` or a number of bytes.
fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().map_err(|_| format!("{s:?} is not a size like 4MiB, 512KiB or 65536"))?;
    let shift = match unit {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use KiB, MiB, GiB or none for bytes)")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

fn launch(args: Args) -> Result<Launch, String> {
    let token = args.token.map(Token::new).transpose()?;
    let allow = AllowList::new(&args.allow_participant)?;
    let mut core = tcc_core::Config {
        retry: RetryPolicy {
            initial_backoff: args.retry_initial,
            multiplier: args.retry_multiplier,
            max_backoff: args.retry_max_backoff,
            jitter: args.retry_jitter,
            max_attempts: args.retry_max_attempts,
            call_timeout: args.call_timeout,
        },
        lease: args.lease,
        max_timeout: args.max_timeout,
        max_rounds: args.max_rounds,
        retain_finished: args.retain_finished,
        max_tx_payload: args.max_tx_payload,
        ..tcc_core::Config::default()
    };
    if let Some(owner) = args.owner {
        core.owner = owner;
    }
    if args.retain_finished.is_some_and(|d| d.is_zero()) {
        return Err("--retain-finished must be positive (leave it out to keep every transaction)".into());
    }
    if args.default_timeout.is_zero() || args.default_timeout > args.max_timeout {
        return Err("--default-timeout must be positive and not above --max-timeout".into());
    }
    let limits = tcc_http::serve::Limits {
        header_read_timeout: args.header_read_timeout,
        max_header_bytes: args.max_header_bytes,
        body_read_timeout: args.body_read_timeout,
        max_connections: args.max_connections,
    };
    limits.validate()?;
    let store = match (args.store, args.data_dir) {
        (Some(_), Some(_)) => {
            return Err(
                "--store (TCC_STORE) and --data-dir (TCC_DATA_DIR) both name a store: give one".into()
            );
        }
        // Not clap's value parser: its errors quote the value, which may hold a password.
        (Some(store), None) => store.parse::<StoreChoice>().map_err(|e| format!("--store: {e}"))?,
        (None, Some(dir)) => StoreChoice::Sled(dir),
        (None, None) => StoreChoice::Sled("./tcc-data".into()),
    };
    Ok(Launch {
        listen: args.listen,
        store,
        core,
        server: ServerConfig { token, allow, default_timeout: args.default_timeout, limits },
        client: ClientConfig {
            connect_timeout: args.connect_timeout,
            request_timeout: args.call_timeout,
            batching: Batching {
                max_calls: args.batch_max_calls as usize,
                in_flight: args.batches_in_flight as usize,
            },
            ..ClientConfig::default()
        },
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received; shutting down"),
        _ = term => tracing::info!("SIGTERM received; shutting down"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let started = Instant::now();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let launch = match launch(Args::parse()) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let allow = launch.server.allow.clone();
    let token = launch.server.token.is_some();
    let store = launch.store.to_string(); // never the password
    let running = match tcc_http::server::start(launch).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("could not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    if allow.is_loopback_only() {
        tracing::warn!(
            "no --allow-participant prefix configured: only loopback participant URLs are allowed"
        );
    } else {
        let prefixes: Vec<&str> = allow.prefixes().iter().map(|u| u.as_str()).collect();
        tracing::info!(?prefixes, "participant URLs allowed under these prefixes");
    }
    if !token {
        tracing::warn!(
            "no --token configured: anyone who can reach this port can begin and decide transactions"
        );
    }
    tracing::info!(
        addr = %running.addr,
        store,
        auth = if token { "bearer token" } else { "none" },
        startup_ms = started.elapsed().as_millis() as u64,
        "tcc-coordinator listening"
    );
    shutdown_signal().await;
    match running.stop().await {
        Ok(()) => {
            tracing::info!("stopped; unfinished transactions resume on the next start");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("error while stopping: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        for bad in ["", "ms", "1w", "-1s", "1.5s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("65536"), Ok(65536));
        for bad in ["", "MiB", "4MB", "-1", "1.5MiB", "99999999999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_flag_has_an_environment_variable() {
        use clap::CommandFactory;
        let cmd = Args::command();
        for arg in cmd.get_arguments().filter(|a| a.get_long().is_some_and(|l| l != "help" && l != "version"))
        {
            let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
            assert!(env.starts_with("TCC_"), "--{:?} has no TCC_ variable", arg.get_long());
        }
        cmd.debug_assert();
    }

    #[test]
    fn bad_settings_are_refused_before_starting() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["tcc-coordinator"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).map_err(|e| e.to_string()).and_then(launch)
        };
        assert!(parse(&[]).is_ok());
        assert!(parse(&["--token", ""]).is_err());
        assert!(parse(&["--allow-participant", "ftp://x/"]).is_err());
        assert!(parse(&["--default-timeout", "48h"]).is_err());
        assert!(parse(&["--call-timeout", "soon"]).is_err());
        assert!(parse(&["--retain-finished", "0s"]).is_err());
        let kept = |extra: &[&str]| parse(extra).map(|l| l.core.retain_finished);
        assert_eq!(kept(&[]), Ok(None));
        assert_eq!(kept(&["--retain-finished", "7d"]), Ok(Some(Duration::from_secs(7 * 86_400))));
        assert!(parse(&["--max-header-bytes", "4KiB"]).is_err());
        assert!(parse(&["--max-connections", "0"]).is_err());
        assert!(parse(&["--header-read-timeout", "0s"]).is_err());
        let limits = |extra: &[&str]| parse(extra).map(|l| l.server.limits);
        assert_eq!(limits(&[]), Ok(tcc_http::serve::Limits::default()));
        let set = limits(&[
            "--header-read-timeout",
            "2s",
            "--max-header-bytes",
            "16KiB",
            "--body-read-timeout",
            "5s",
            "--max-connections",
            "64",
        ]);
        assert_eq!(
            set,
            Ok(tcc_http::serve::Limits {
                header_read_timeout: Duration::from_secs(2),
                max_header_bytes: 16 << 10,
                body_read_timeout: Duration::from_secs(5),
                max_connections: 64,
            })
        );
        let cap = |extra: &[&str]| parse(extra).map(|l| l.core.max_tx_payload);
        assert_eq!(cap(&[]), Ok(4 << 20));
        assert_eq!(cap(&["--max-tx-payload", "256KiB"]), Ok(256 << 10));
    }

    #[test]
    fn the_store_is_named_by_store_or_its_short_form_data_dir_but_not_both() {
        let store = |extra: &[&str]| {
            let mut argv = vec!["tcc-coordinator"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).map_err(|e| e.to_string()).and_then(launch).map(|l| l.store)
        };
        assert_eq!(store(&[]), Ok(StoreChoice::Sled("./tcc-data".into())));
        assert_eq!(store(&["--data-dir", "/d"]), Ok(StoreChoice::Sled("/d".into())));
        assert_eq!(store(&["--store", "sled:/d"]), Ok(StoreChoice::Sled("/d".into())));
        let url = "postgres://tcc:pw-9f2e@127.0.0.1:5432/tcc";
        assert_eq!(store(&["--store", url]), Ok(StoreChoice::Postgres(url.into())));
        let both = store(&["--store", url, "--data-dir", "/d"]).unwrap_err();
        assert!(both.contains("both name a store"), "{both}");
        for bad in ["mysql://x", "sled:", "postgres://tcc:pw-9f2e@127.0.0.1:notaport/tcc"] {
            let err = store(&["--store", bad]).unwrap_err();
            assert!(err.starts_with("--store: ") && !err.contains("pw-9f2e"), "{err}");
        }
    }
}
