//! Durable-write rate of the sled store under 1, 16 and 256 concurrent writers.
//!
//! `cargo bench -p tcc-core --bench group_commit [-- --seconds S]`
//!
//! Each writer inserts new transactions (about 150 bytes each) through `Store::insert`, which returns
//! only once the write is flushed; concurrent writers share flushes (group commit). The first line is
//! the baseline the group commit replaces: one sled insert plus its own `flush()`, serially. With
//! `--compare` it also measures bare sled writes under the same group commit, with and without a sled
//! transaction (the reason the store does not use them).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tcc_core::store::{SledStore, Store};
use tcc_core::{Gid, Timestamp};

fn seconds_arg() -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0)
}

fn tx() -> tcc_core::Transaction {
    let mut tx = tcc_core::state::begin(Gid::generate(), Timestamp(1), Timestamp(60_000));
    tx.version = 1;
    tx
}

fn baseline(secs: f64) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = sled::open(dir.path()).expect("sled");
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        let t = tx();
        db.insert(t.gid.as_str().as_bytes(), tcc_core::store::codec::encode(&t).expect("encode"))
            .expect("insert");
        db.flush().expect("flush");
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn group(writers: usize, secs: f64) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(SledStore::open(dir.path()).expect("store"));
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let store = store.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                store.insert(&tx()).await.expect("insert");
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
    let secs = seconds_arg();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let base = baseline(secs);
    println!("baseline: insert + flush, serially:  {base:>9.0} durable writes/s");
    for writers in [1, 16, 256] {
        let rate = rt.block_on(group(writers, secs));
        println!(
            "store, group commit, {writers:>3} writers: {rate:>9.0} durable writes/s  ({:.1}x baseline)",
            rate / base
        );
    }
    if std::env::args().any(|a| a == "--compare") {
        // Why the store avoids sled transactions: one two-tree transaction per write, same group commit.
        for writers in [1, 16, 256] {
            let rate = rt.block_on(raw(writers, secs, true));
            println!("sled transaction + group commit, {writers:>3} writers: {rate:>9.0} writes/s");
            let rate = rt.block_on(raw(writers, secs, false));
            println!("single insert + group commit,    {writers:>3} writers: {rate:>9.0} writes/s");
        }
    }
}

/// Group commit around bare sled writes: a two-tree transaction (`txn`) or a single insert.
async fn raw(writers: usize, secs: f64, txn: bool) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = tcc_core::DurableDb::open(dir.path()).expect("sled");
    let t1 = db.open_tree("a").expect("t");
    let t2 = db.open_tree("b").expect("t");
    let fdb = db.clone();
    let gc = tcc_core::store::group_commit::GroupCommit::start("x", move || {
        fdb.flush().map_err(|e| e.to_string())
    })
    .expect("gc");
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (t1, t2, gc, done) = (t1.clone(), t2.clone(), gc.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let t = tx();
                let bytes = tcc_core::store::codec::encode(&t).expect("encode");
                if txn {
                    use sled::Transactional;
                    (&t1, &t2)
                        .transaction(|(a, b)| {
                            a.insert(t.gid.as_str().as_bytes(), bytes.clone())?;
                            b.insert(t.gid.as_str().as_bytes(), &[][..])?;
                            Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
                        })
                        .expect("tx");
                } else {
                    t1.insert(t.gid.as_str().as_bytes(), bytes).expect("insert");
                }
                gc.durable().await.expect("durable");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("w");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}
