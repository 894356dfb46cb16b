//! Durable means synced (DESIGN.md guarantee 2): nothing is acknowledged before an `fdatasync` of the
//! files sled wrote it to has completed.
//!
//! Each test opens the sled database with an observer that [`DurableDb`] calls after every completed
//! sync, and logs it in one sequence with each call's start and its acknowledgement. A call must then
//! see a completed sync of the log file between its start and its answer. If a flush stopped syncing
//! (sled's own flush alone, the state before this test), or a caller answered before its flush, no such
//! sync would stand between the two and the test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sled::transaction::ConflictableTransactionResult;
use tcc_core::barrier::{BarrierState, BusinessTx, CancelOutcome, ConfirmOutcome, Durability, SledBarrier};
use tcc_core::durable::SyncObserver;
use tcc_core::store::Cas;
use tcc_core::{
    BranchId, Clock, Coordinator, DurableDb, Gid, ManualClock, SledStore, Store, Timestamp, Transaction,
};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    Call(usize),
    Synced(PathBuf),
    Answered(usize),
}

/// One log of calls, syncs and answers, in the order they happened.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Event>>>);

impl Log {
    fn push(&self, e: Event) {
        self.0.lock().unwrap().push(e);
    }

    fn observer(&self) -> SyncObserver {
        let log = self.clone();
        Arc::new(move |p: &Path| log.push(Event::Synced(p.to_path_buf())))
    }

    fn open(&self, dir: &Path) -> DurableDb {
        DurableDb::open_observed(dir, sled::Config::new(), Some(self.observer())).unwrap()
    }

    fn syncs_of(&self, file: &Path) -> usize {
        self.0.lock().unwrap().iter().filter(|e| **e == Event::Synced(file.to_path_buf())).count()
    }

    /// Every call `0..calls` was answered, and after a sync of `file` that completed after it began.
    fn assert_each_answer_follows_a_sync(&self, calls: usize, file: &Path) {
        let events = self.0.lock().unwrap().clone();
        for i in 0..calls {
            let at = |want: &Event| events.iter().position(|e| e == want);
            let start = at(&Event::Call(i)).unwrap_or_else(|| panic!("call {i} never started"));
            let end = at(&Event::Answered(i)).unwrap_or_else(|| panic!("call {i} never answered"));
            let synced = events[start..end].iter().any(|e| *e == Event::Synced(file.to_path_buf()));
            assert!(synced, "call {i} was answered before any sync of {file:?} completed: {events:?}");
        }
    }
}

fn new_tx() -> Transaction {
    let mut tx = tcc_core::state::begin(Gid::generate(), Timestamp(0), Timestamp(u64::MAX / 2));
    tx.version = 1;
    tx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_answers_inserts_swaps_and_syncs_only_after_an_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let store = Arc::new(SledStore::with_db(log.open(dir.path())).unwrap());
    let file = dir.path().join("db");
    // Three kinds of durable call, 16 of each at once so that they share group flushes.
    let mut tasks = Vec::new();
    for i in 0..48 {
        let (store, log) = (store.clone(), log.clone());
        tasks.push(tokio::spawn(async move {
            let tx = new_tx();
            if i % 3 == 1 {
                store.insert_unsynced(&tx).await.unwrap();
            }
            log.push(Event::Call(i));
            match i % 3 {
                0 => store.insert(&tx).await.unwrap(),
                1 => {
                    let mut next = tx.clone();
                    next.version = 2;
                    assert!(matches!(store.compare_and_set(1, &next).await.unwrap(), Cas::Stored));
                }
                _ => {
                    store.insert_unsynced(&tx).await.unwrap();
                    store.sync().await.unwrap();
                }
            }
            log.push(Event::Answered(i));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    log.assert_each_answer_follows_a_sync(48, &file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_acknowledges_begin_register_and_decisions_only_after_an_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::default();
    let store = SledStore::with_db(log.open(dir.path())).unwrap();
    let mem = common::Mem::default();
    let clock = ManualClock::new(common::START);
    let tc =
        Coordinator::open(Arc::new(store), Arc::new(mem), Arc::new(clock), common::config()).await.unwrap();
    let file = dir.path().join("db");

    log.push(Event::Call(0));
    let tx = tc.begin(None, Duration::from_secs(30)).await.unwrap();
    log.push(Event::Answered(0));
    log.push(Event::Call(1));
    tc.register(&tx.gid, "flight".parse().unwrap(), "mem://flight".into(), b"12A".to_vec()).await.unwrap();
    log.push(Event::Answered(1));
    log.push(Event::Call(2));
    tc.confirm(&tx.gid).await.unwrap();
    log.push(Event::Answered(2));

    let other = tc.begin(None, Duration::from_secs(30)).await.unwrap();
    log.push(Event::Call(3));
    tc.cancel(&other.gid).await.unwrap();
    log.push(Event::Answered(3));
    log.assert_each_answer_follows_a_sync(4, &file);
    tc.shutdown().await;
}

/// A barrier over one business tree on an observed database, its clock, the log of syncs and the
/// path of the log file (the directory lives as long as the returned guard).
struct BarrierRig {
    _dir: tempfile::TempDir,
    log: Log,
    clock: ManualClock,
    barrier: SledBarrier,
    file: PathBuf,
}

const GRACE: Duration = Duration::from_secs(5);

impl BarrierRig {
    fn new() -> BarrierRig {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::default();
        let db = log.open(dir.path());
        let clock = ManualClock::new(common::START);
        let seats = db.open_tree("seats").unwrap();
        let barrier = SledBarrier::open(&db, vec![seats], Arc::new(clock.clone()), GRACE).unwrap();
        let file = dir.path().join("db");
        BarrierRig { _dir: dir, log, clock, barrier, file }
    }
}

type Biz<T> = ConflictableTransactionResult<T, String>;

fn hold(tx: &BusinessTx<'_>) -> Biz<Vec<u8>> {
    tx.tree(0).insert(tx.request(), "held")?;
    Ok(Vec::new())
}

fn settle(tx: &BusinessTx<'_>) -> Biz<()> {
    tx.tree(0).remove(tx.request())?;
    Ok(())
}

#[test]
fn the_barrier_answers_each_try_confirm_and_cancel_only_after_an_fdatasync() {
    let BarrierRig { log, clock, barrier, file, .. } = &BarrierRig::new();
    let gid = Gid::generate();
    let (a, b, c): (BranchId, BranchId, BranchId) =
        ("a".parse().unwrap(), "b".parse().unwrap(), "c".parse().unwrap());
    let deadline = clock.now() + Duration::from_secs(10);

    let calls: Vec<Box<dyn Fn()>> = vec![
        Box::new(|| assert!(barrier.try_op(&gid, &a, deadline, b"1A", hold).unwrap().is_fresh())),
        Box::new(|| assert!(barrier.try_op(&gid, &b, deadline, b"1B", hold).unwrap().is_fresh())),
        Box::new(|| assert_eq!(barrier.confirm(&gid, &a, settle).unwrap(), ConfirmOutcome::Confirmed)),
        Box::new(|| assert_eq!(barrier.cancel(&gid, &b, settle).unwrap(), CancelOutcome::Cancelled)),
        // Duplicates and empty cancels answer from a record that may not be on disk yet: they sync too.
        Box::new(|| assert_eq!(barrier.confirm(&gid, &a, settle).unwrap(), ConfirmOutcome::Duplicate)),
        Box::new(|| assert_eq!(barrier.cancel(&gid, &c, settle).unwrap(), CancelOutcome::Empty)),
    ];
    for (i, call) in calls.iter().enumerate() {
        log.push(Event::Call(i));
        call();
        log.push(Event::Answered(i));
    }
    log.assert_each_answer_follows_a_sync(calls.len(), file);
}

#[test]
fn the_expiry_sweep_syncs_what_it_released_and_an_idle_sweep_syncs_nothing() {
    let BarrierRig { log, clock, barrier, file, .. } = &BarrierRig::new();
    let (gid, a): (Gid, BranchId) = (Gid::generate(), "a".parse().unwrap());
    let ttl = Duration::from_secs(10);
    barrier.try_op(&gid, &a, clock.now() + ttl, b"1A", hold).unwrap();

    // Nothing due: nothing released, and no sync paid for it.
    let before = log.syncs_of(file);
    assert_eq!(barrier.expire_due(settle).unwrap(), 0);
    assert_eq!(log.syncs_of(file), before, "an idle sweep synced");

    clock.advance(ttl + GRACE);
    log.push(Event::Call(0));
    assert_eq!(barrier.expire_due(settle).unwrap(), 1);
    log.push(Event::Answered(0));
    log.assert_each_answer_follows_a_sync(1, file);
    assert_eq!(barrier.get(&gid, &a).unwrap().map(|r| r.state), Some(BarrierState::Expired));
}

/// With [`Durability::Deferred`] (how the participant runtime's group commit uses the barrier),
/// operations do not sync and [`SledBarrier::flush`] does: it is what the runtime waits on before
/// answering.
#[test]
fn a_deferred_barrier_syncs_on_flush_and_only_then() {
    let BarrierRig { log, clock, barrier, file, .. } = &BarrierRig::new();
    let barrier = barrier.clone().with_durability(Durability::Deferred);
    let (gid, a): (Gid, BranchId) = (Gid::generate(), "a".parse().unwrap());

    let before = log.syncs_of(file);
    assert!(barrier.try_op(&gid, &a, clock.now() + Duration::from_secs(10), b"1A", hold).unwrap().is_fresh());
    assert_eq!(log.syncs_of(file), before, "a deferred try synced by itself");
    log.push(Event::Call(0));
    barrier.flush().unwrap();
    log.push(Event::Answered(0));
    log.assert_each_answer_follows_a_sync(1, file);
}
