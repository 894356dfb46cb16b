//! Durability under `kill -9`: a child process writes and prints each acknowledgement, the parent kills
//! it with SIGKILL mid-stream, reopens the same directory and checks that every acknowledged fact
//! survived (DESIGN.md guarantees 1 to 3).
//!
//! The child is this same test binary, started with `TCC_KILL9_CHILD` set.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tcc_core::store::{SledStore, Store};
use tcc_core::{Config, Coordinator, Gid, SystemClock, Timestamp, TxState};
use tcc_tests::MemParticipants;

const CHILD_ENV: &str = "TCC_KILL9_CHILD";
const DIR_ENV: &str = "TCC_KILL9_DIR";

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn child_store_writes(dir: &str) {
    let store = Arc::new(SledStore::open(dir).unwrap());
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let mut tx = tcc_core::state::begin(Gid::generate(), Timestamp(1), Timestamp(u64::MAX / 2));
                tx.version = 1;
                store.insert(&tx).await.unwrap();
                say(format!("acked {}", tx.gid));
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// The child's engine: on `dir`, with participants that never answer (phase two stays in flight).
async fn child_engine(dir: &str) -> Arc<Coordinator> {
    let store = Arc::new(SledStore::open(dir).unwrap());
    let config = Config { owner: "child".into(), ..Config::default() };
    Arc::new(
        Coordinator::open(store, Arc::new(MemParticipants::hanging()), Arc::new(SystemClock), config)
            .await
            .unwrap(),
    )
}

async fn child_coordinator(dir: &str) {
    let tc = child_engine(dir).await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let tc = tc.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0.. {
                let tx = tc.begin(None, Duration::from_secs(3600)).await.unwrap();
                for b in ["flight", "hotel"] {
                    tc.register(&tx.gid, b.parse().unwrap(), format!("mem://{b}"), vec![]).await.unwrap();
                }
                say(format!("registered {}", tx.gid));
                if (i + n) % 2 == 0 {
                    tc.confirm(&tx.gid).await.unwrap();
                    say(format!("confirmed {}", tx.gid));
                } else {
                    tc.cancel(&tx.gid).await.unwrap();
                    say(format!("cancelled {}", tx.gid));
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// The embedded client's pattern: begin and register without waiting for the flush, then one sync
/// (which the client overlaps with the try) before anything is acknowledged.
async fn child_deferred(dir: &str) {
    let tc = child_engine(dir).await;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let tc = tc.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let tx =
                    tc.begin_deferred(None, Duration::from_secs(3600), Default::default()).await.unwrap();
                for b in ["flight", "hotel"] {
                    tc.register_deferred(&tx.gid, b.parse().unwrap(), format!("mem://{b}"), vec![])
                        .await
                        .unwrap();
                    tc.sync().await.unwrap();
                }
                say(format!("registered {}", tx.gid));
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Not a test of its own: the body of the child process.
#[test]
fn kill9_child_entry() {
    let (Ok(mode), Ok(dir)) = (std::env::var(CHILD_ENV), std::env::var(DIR_ENV)) else {
        return; // run as a normal test: nothing to do
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        match mode.as_str() {
            "store" => child_store_writes(&dir).await,
            "deferred" => child_deferred(&dir).await,
            _ => child_coordinator(&dir).await,
        }
    });
}

/// Starts the child, collects its acknowledgements until `enough` lines, then SIGKILLs it.
fn run_child_and_kill(mode: &str, dir: &std::path::Path, enough: usize) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "kill9_child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .env(DIR_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    let reader = BufReader::new(child.stdout.take().unwrap());
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if line.starts_with("acked ")
            || line.starts_with("registered ")
            || line.starts_with("confirmed ")
            || line.starts_with("cancelled ")
        {
            lines.push(line);
        }
        if lines.len() >= enough {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL: no destructor, no flush, no goodbye
    child.wait().unwrap();
    assert!(lines.len() >= enough, "the child stopped early after {} acknowledgements", lines.len());
    lines
}

fn gid_of(line: &str) -> Gid {
    line.split_once(' ').unwrap().1.parse().unwrap()
}

async fn open_after_kill(dir: &std::path::Path) -> SledStore {
    for _ in 0..500 {
        if let Ok(s) = SledStore::open(dir) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    SledStore::open(dir).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let acked = run_child_and_kill("store", dir.path(), 5_000);
    let store = open_after_kill(dir.path()).await;
    for line in &acked {
        let gid = gid_of(line);
        assert!(store.get(&gid).await.unwrap().is_some(), "acknowledged {gid} was lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_decision_survives_kill_9_and_is_carried_out_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let acked = run_child_and_kill("coordinator", dir.path(), 600);
    let store = Arc::new(open_after_kill(dir.path()).await);
    let participants = MemParticipants::healthy();
    let config = Config { owner: "parent".into(), ..Config::default() };
    let tc = Coordinator::open(store, Arc::new(participants.clone()), Arc::new(SystemClock), config)
        .await
        .unwrap();
    let mut checked = 0;
    for line in &acked {
        let gid = gid_of(line);
        let tx = tc.get(&gid).await.unwrap();
        let want = if line.starts_with("confirmed ") {
            TxState::Confirmed
        } else if line.starts_with("cancelled ") {
            TxState::Cancelled
        } else {
            assert_eq!(tx.branches.len(), 2, "{gid}: both registrations were acknowledged");
            continue;
        };
        let done = tc.wait(&gid, Duration::from_secs(30)).await.unwrap();
        assert_eq!(done.state, want, "{gid}");
        for b in &done.branches {
            let told = participants.seen(&gid, &b.id);
            let expected = if want == TxState::Confirmed {
                tcc_core::Decision::Confirm
            } else {
                tcc_core::Decision::Cancel
            };
            assert!(!told.is_empty() && told.iter().all(|d| *d == expected), "{gid} {}: {told:?}", b.id);
        }
        checked += 1;
    }
    assert!(checked > 100, "only {checked} decisions were checked");
    tc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_begin_and_registration_are_durable_once_synced() {
    let dir = tempfile::tempdir().unwrap();
    let acked = run_child_and_kill("deferred", dir.path(), 2_000);
    let store = open_after_kill(dir.path()).await;
    for line in &acked {
        let gid = gid_of(line);
        let tx = store.get(&gid).await.unwrap().unwrap_or_else(|| panic!("synced {gid} was lost"));
        assert_eq!(tx.branches.len(), 2, "{gid}: both synced registrations survive");
    }
}
