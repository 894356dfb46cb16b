//! Durable writes per second of the PostgreSQL store next to the sled store, at 1, 16 and 256
//! concurrent writers: inserts of new transactions, and compare-and-sets (each writer moving its own
//! transaction from version to version).
//!
//! `TCC_TEST_POSTGRES_URL=postgres://... cargo bench -p tcc-core --features postgres --bench postgres_store [-- --seconds S] [--pg-writers N] [--op insert|cas] [--writers 1|16|256]`
//!
//! Every write returns only once durable (sled: flushed; PostgreSQL: committed with
//! synchronous_commit on), and concurrent writers share flushes or commits (group commit). Each
//! PostgreSQL measurement runs in a fresh schema. The last column is PostgreSQL / sled.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tcc_core::store::postgres::{PgOptions, PgStore, create_scratch_schema};
use tcc_core::store::{Cas, SledStore, Store};
use tcc_core::{Gid, Timestamp, Transaction, TxState};

fn seconds_arg() -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0)
}

/// `--pg-writers N`: the PostgreSQL store's writer connections (default: the store's default).
fn pg_options() -> PgOptions {
    let args: Vec<String> = std::env::args().collect();
    let writers = args.iter().position(|a| a == "--pg-writers").and_then(|i| args.get(i + 1)?.parse().ok());
    let mut options = PgOptions::default();
    if let Some(n) = writers {
        options.writers = n;
    }
    options
}

fn tx() -> Transaction {
    let mut tx = tcc_core::state::begin(Gid::generate(), Timestamp(1), Timestamp(60_000));
    tx.version = 1;
    tx
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Cas,
}

/// Writes per second by `writers` tasks for `secs`.
async fn run(store: Arc<dyn Store>, op: Op, writers: usize, secs: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (store, done) = (store.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = tx();
            if op == Op::Cas {
                store.insert(&mine).await.expect("insert");
            }
            while Instant::now() < until {
                match op {
                    Op::Insert => store.insert(&tx()).await.expect("insert"),
                    Op::Cas => {
                        let mut next = mine.clone();
                        next.version += 1;
                        next.attempts = next.attempts.wrapping_add(1);
                        next.state = TxState::Confirming;
                        let cas = store.compare_and_set(mine.version, &next).await.expect("cas");
                        assert_eq!(cas, Cas::Stored);
                        mine = next;
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return; // `cargo test --all-targets` runs benches in test mode; nothing to check here.
    }
    let Ok(url) = std::env::var("TCC_TEST_POSTGRES_URL") else {
        eprintln!("set TCC_TEST_POSTGRES_URL to a postgres:// URL of a database to benchmark in");
        std::process::exit(2);
    };
    let secs = seconds_arg();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    println!("{secs} s per line; durable writes/s; {} PostgreSQL writer connections", pg_options().writers);
    println!(
        "{:<7} {:>7} {:>10} {:>12} {:>10} {:>16}",
        "op", "writers", "sled", "postgres", "pg/sled", "pg writes/commit"
    );
    let args: Vec<String> = std::env::args().collect();
    let only = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let (only_op, only_writers) = (only("--op"), only("--writers").and_then(|w| w.parse::<usize>().ok()));
    for (op, name) in [(Op::Insert, "insert"), (Op::Cas, "cas")] {
        if only_op.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        for writers in [1, 16, 256] {
            if only_writers.is_some_and(|w| w != writers) {
                continue;
            }
            let dir = tempfile::tempdir().expect("temp dir");
            let sled: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).expect("sled"));
            let sled_rate = rt.block_on(run(sled, op, writers, secs));
            let (pg_rate, per_commit) = rt.block_on(async {
                let schema = create_scratch_schema(&url, "tcc_bench").await.expect("schema");
                let pg = Arc::new(PgStore::connect_with(&schema, pg_options()).await.expect("postgres"));
                let before = pg.stats();
                let rate = run(pg.clone(), op, writers, secs).await;
                let after = pg.stats();
                let per_commit =
                    (after.writes - before.writes) as f64 / (after.commits - before.commits).max(1) as f64;
                (rate, per_commit)
            });
            println!(
                "{name:<7} {writers:>7} {sled_rate:>10.0} {pg_rate:>12.0} {:>10.2} {per_commit:>16.1}",
                pg_rate / sled_rate
            );
        }
    }
}
