//! The store conformance suite: compare-and-set, the due index, claims and leases, listing,
//! damaged records and group commit, speaking only through the `Store` trait.
//!
//! Every check is one generic function run against each backend by `conformance!`: the sled store
//! always (`sled_store::*`), the PostgreSQL store (`postgres_store::*`, with the `postgres` feature)
//! when `TCC_TEST_POSTGRES_URL` names a test database (see `pg/mod.rs`; each test gets a schema of its
//! own). What differs between the backends is only what a backend says about itself: a store one
//! process owns hands back abandoned leases on open, a shared one lets them expire.
#![allow(clippy::unwrap_used)]

#[cfg(feature = "postgres")]
mod pg;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use tcc_core::store::{Cas, ListQuery, SledStore, Store};
use tcc_core::{Branch, BranchState, Decision, Gid, Happening, Timestamp, Transaction, TxOptions, TxState};

/// One backend under test, holding the data of one test.
#[async_trait]
trait Backend: Send + Sync {
    /// A handle on this test's store.
    async fn open(&self) -> Arc<dyn Store>;
    /// A second handle on the same data, as another coordinator would hold (the same handle where
    /// only one process may open the store).
    async fn another(&self, first: &Arc<dyn Store>) -> Arc<dyn Store>;
    /// Opens again once every earlier handle is dropped: a restart.
    async fn reopen(&self) -> Arc<dyn Store>;
    /// Overwrites the stored record of `gid` with bytes that do not decode.
    async fn damage(&self, gid: &Gid);
    /// Several processes share the store.
    fn shared(&self) -> bool;
}

struct Sled {
    dir: tempfile::TempDir,
    opened: Mutex<Vec<Weak<SledStore>>>,
}

impl Sled {
    fn new() -> Sled {
        Sled { dir: tempfile::tempdir().unwrap(), opened: Mutex::default() }
    }
}

#[async_trait]
impl Backend for Sled {
    async fn open(&self) -> Arc<dyn Store> {
        let s = Arc::new(open_sled(self.dir.path()).await);
        self.opened.lock().unwrap().push(Arc::downgrade(&s));
        s
    }

    async fn another(&self, first: &Arc<dyn Store>) -> Arc<dyn Store> {
        first.clone()
    }

    async fn reopen(&self) -> Arc<dyn Store> {
        self.open().await
    }

    async fn damage(&self, gid: &Gid) {
        let store = self.opened.lock().unwrap().iter().rev().find_map(Weak::upgrade).unwrap();
        store
            .db()
            .open_tree("tcc_live")
            .unwrap()
            .insert(gid.as_str().as_bytes(), &b"\x01\xff\xff"[..])
            .unwrap();
    }

    fn shared(&self) -> bool {
        false
    }
}

#[cfg(feature = "postgres")]
struct Postgres {
    url: String,
}

#[cfg(feature = "postgres")]
impl Postgres {
    async fn new() -> Option<Postgres> {
        Some(Postgres { url: pg::scratch_url().await? })
    }
}

#[cfg(feature = "postgres")]
#[async_trait]
impl Backend for Postgres {
    async fn open(&self) -> Arc<dyn Store> {
        Arc::new(tcc_core::store::PgStore::connect(&self.url).await.unwrap())
    }

    async fn another(&self, _first: &Arc<dyn Store>) -> Arc<dyn Store> {
        self.open().await
    }

    async fn reopen(&self) -> Arc<dyn Store> {
        self.open().await
    }

    async fn damage(&self, gid: &Gid) {
        let db = pg::sql(&self.url).await;
        let bad: &[u8] = b"\x01\xff\xff";
        let n =
            db.execute("UPDATE tcc_tx SET record = $2 WHERE gid = $1", &[&gid.as_str(), &bad]).await.unwrap();
        assert_eq!(n, 1);
    }

    fn shared(&self) -> bool {
        true
    }
}

/// Runs each named check as a test against every backend.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod sled_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(&super::Sled::new()).await;
                }
            )*
        }

        #[cfg(feature = "postgres")]
        mod postgres_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    if let Some(backend) = super::Postgres::new().await {
                        super::$check(&backend).await;
                    }
                }
            )*
        }
    };
}

conformance!(
    insert_refuses_an_existing_id_and_changes_nothing,
    every_field_of_a_record_round_trips,
    sagas_and_messages_round_trip_with_their_steps,
    compare_and_set_stores_only_over_the_expected_version,
    concurrent_compare_and_sets_of_one_version_have_exactly_one_winner,
    claim_due_takes_only_due_work_and_leases_it,
    claim_due_takes_the_earliest_first_up_to_its_limit,
    a_claim_bumps_the_version_so_a_writer_holding_the_old_one_loses,
    a_claim_can_store_the_callers_change_in_its_place,
    concurrent_claims_never_hand_one_transaction_to_two_owners,
    final_and_flagged_transactions_leave_the_due_index,
    reopening_after_a_crash_resumes_leased_work,
    counts_and_lists_follow_state_changes,
    lists_page_in_id_order,
    a_state_change_that_keeps_the_due_time_moves_the_listing,
    a_damaged_record_is_reported_not_a_panic,
    group_commit_keeps_every_acknowledged_write_of_many_concurrent_writers,
    unsynced_writes_are_visible_at_once_and_durable_once_synced,
    pruning_deletes_only_finished_transactions_older_than_the_cutoff,
);

async fn pruning_deletes_only_finished_transactions_older_than_the_cutoff(b: &dyn Backend) {
    let s = b.open().await;
    // `old` finished at 100, `recent` at 1,000; the cutoff is 500.
    let at = |tx: Transaction, updated_at: u64| Transaction { updated_at: Timestamp(updated_at), ..tx };
    let stored = |state: TxState, updated_at: u64| {
        let tx = new_tx(10_000);
        let tx = match state {
            TxState::Confirmed | TxState::Cancelled => finished(&tx, state),
            TxState::Trying => tx,
            other => bump(&tx, |t| {
                t.state = other;
                t.decision = Some(Decision::Confirm);
                t.due_at = (other != TxState::Flagged).then_some(Timestamp(20_000));
            }),
        };
        at(tx, updated_at)
    };
    let old: Vec<Transaction> = (0..5)
        .map(|i| stored(if i % 2 == 0 { TxState::Confirmed } else { TxState::Cancelled }, 100))
        .collect();
    let kept = vec![
        stored(TxState::Confirmed, 1_000),
        stored(TxState::Cancelled, 500),
        stored(TxState::Flagged, 100),
        stored(TxState::Trying, 100),
        stored(TxState::Confirming, 100),
        stored(TxState::Cancelling, 100),
    ];
    for tx in old.iter().chain(&kept) {
        s.insert(tx).await.unwrap();
    }
    // Two records a call: the pass takes several calls, and deletes every old one.
    let (mut deleted, mut calls) = (0, 0);
    loop {
        let pruned = s.prune_finished(Timestamp(500), 2).await.unwrap();
        deleted += pruned.deleted;
        calls += 1;
        assert!(calls <= 100, "the pass never ends");
        if !pruned.more {
            break;
        }
    }
    assert_eq!(deleted, old.len());
    for tx in &old {
        assert_eq!(s.get(&tx.gid).await.unwrap(), None, "{:?} finished before the cutoff", tx.state);
    }
    for tx in &kept {
        assert_eq!(s.get(&tx.gid).await.unwrap().as_ref(), Some(tx), "{:?} at {}", tx.state, tx.updated_at);
    }
    assert_eq!(s.count(TxState::Confirmed).await.unwrap(), 1);
    assert_eq!(s.count(TxState::Cancelled).await.unwrap(), 1);
    // The next pass finds nothing more; a deleted id may be taken again.
    let again = s.prune_finished(Timestamp(500), 1_000).await.unwrap();
    assert_eq!((again.deleted, again.more), (0, false));
    let reused = Transaction { gid: old[0].gid.clone(), ..new_tx(10_000) };
    s.insert(&reused).await.unwrap();
    assert_eq!(s.get(&reused.gid).await.unwrap(), Some(reused));
    // Gone for good: not back after a restart (once synced).
    s.sync().await.unwrap();
    drop(s);
    let s = b.reopen().await;
    assert_eq!(s.get(&old[1].gid).await.unwrap(), None);
    assert_eq!(s.count(TxState::Confirmed).await.unwrap(), 1);
}

fn new_tx(deadline: u64) -> Transaction {
    let mut tx = tcc_core::state::begin(Gid::generate(), Timestamp(0), Timestamp(deadline));
    tx.version = 1;
    tx
}

fn bump(tx: &Transaction, f: impl FnOnce(&mut Transaction)) -> Transaction {
    let mut n = tx.clone();
    f(&mut n);
    n.version = tx.version + 1;
    n
}

async fn insert_refuses_an_existing_id_and_changes_nothing(b: &dyn Backend) {
    let s = b.open().await;
    let tx = new_tx(100);
    s.insert(&tx).await.unwrap();
    let other = bump(&tx, |t| t.deadline = Timestamp(5));
    assert!(matches!(s.insert(&other).await, Err(tcc_core::Error::AlreadyExists(_))));
    // A store may skip looking for finished holders of a generated id, never overwrite a live one.
    assert!(matches!(s.insert_generated_unsynced(&other).await, Err(tcc_core::Error::AlreadyExists(_))));
    assert_eq!(s.get(&tx.gid).await.unwrap(), Some(tx.clone()));
    let generated = new_tx(100);
    s.insert_generated_unsynced(&generated).await.unwrap();
    s.sync().await.unwrap();
    assert_eq!(s.get(&generated.gid).await.unwrap(), Some(generated.clone()));
    assert_eq!(s.get(&Gid::generate()).await.unwrap(), None);
    // A finished transaction's id stays taken, whichever state the new record is in.
    let done = bump(&tx, |t| {
        t.state = TxState::Cancelled;
        t.due_at = None;
    });
    assert_eq!(s.compare_and_set(1, &done).await.unwrap(), Cas::Stored);
    for state in [TxState::Trying, TxState::Confirmed, TxState::Cancelled] {
        let again = bump(&tx, |t| t.state = state);
        assert!(matches!(s.insert(&again).await, Err(tcc_core::Error::AlreadyExists(_))), "{state:?}");
    }
    assert_eq!(s.get(&tx.gid).await.unwrap(), Some(done));
    assert_eq!(s.count(TxState::Trying).await.unwrap(), 1, "the generated one");
    assert_eq!(s.count(TxState::Cancelled).await.unwrap(), 1);
}

async fn every_field_of_a_record_round_trips(b: &dyn Backend) {
    let s = b.open().await;
    let mut tx = new_tx(1_700_000_000_000);
    tx.state = TxState::Confirming;
    tx.decision = Some(Decision::Confirm);
    tx.updated_at = Timestamp(1_699_999_999_999);
    tx.attempts = 3;
    tx.last_error = Some("branch hotel: 503 – ünïcode".into());
    tx.lease_owner = Some("node-a".into());
    tx.due_at = Some(Timestamp(1_700_000_000_500));
    tx.options = TxOptions { retry_interval_ms: Some(250), call_timeout_ms: Some(900) };
    for (i, state) in [BranchState::Registered, BranchState::Confirmed].into_iter().enumerate() {
        tx.branches.push(Branch {
            id: format!("b{i}").parse().unwrap(),
            target: format!("http://127.0.0.1:9/p{i}"),
            payload: vec![0, 255, i as u8, 0],
            state,
            last_error: (i == 0).then(|| "timeout".into()),
        });
    }
    tx.record(Timestamp(1_699_999_999_998), Happening::Decided(Decision::Confirm));
    let error = Some("branch hotel: 503 – ünïcode".into());
    tx.record(Timestamp(1_699_999_999_999), Happening::Round { done: 1, failed: 1, error });
    assert_eq!(tx.history.len(), 3, "begun, decided, one round");
    s.insert(&tx).await.unwrap();
    assert_eq!(s.get(&tx.gid).await.unwrap().as_ref(), Some(&tx));
    let next = bump(&tx, |t| {
        t.lease_owner = None;
        t.due_at = Some(Timestamp(1_700_000_001_000));
        t.branches[0].state = BranchState::Confirmed;
    });
    assert_eq!(s.compare_and_set(tx.version, &next).await.unwrap(), Cas::Stored);
    assert_eq!(b.another(&s).await.get(&tx.gid).await.unwrap(), Some(next));
}

async fn sagas_and_messages_round_trip_with_their_steps(b: &dyn Backend) {
    use tcc_core::{Msg, Saga, SagaStep, TxKind};
    let s = b.open().await;
    let mut saga = new_tx(1_700_000_000_000);
    saga.state = TxState::Cancelling;
    saga.decision = Some(Decision::Cancel);
    saga.kind = TxKind::Saga(Box::new(Saga {
        concurrent: true,
        steps: vec![
            SagaStep { compensate: "http://127.0.0.1:9/undo".into(), after: vec![], started: true },
            SagaStep { compensate: "http://127.0.0.1:9/undo2".into(), after: vec![0], started: false },
        ],
    }));
    let mut msg = new_tx(1_700_000_000_000);
    msg.kind = TxKind::Msg(Box::new(Msg { query_prepared: "http://127.0.0.1:9/query".into() }));
    for tx in [saga, msg] {
        s.insert(&tx).await.unwrap();
        assert_eq!(s.get(&tx.gid).await.unwrap().as_ref(), Some(&tx));
        let next = bump(&tx, |t| t.attempts = 1);
        assert_eq!(s.compare_and_set(tx.version, &next).await.unwrap(), Cas::Stored);
        assert_eq!(b.another(&s).await.get(&tx.gid).await.unwrap(), Some(next));
    }
}

async fn compare_and_set_stores_only_over_the_expected_version(b: &dyn Backend) {
    let s = b.open().await;
    let v1 = new_tx(100);
    s.insert(&v1).await.unwrap();
    let v2 = bump(&v1, |t| t.state = TxState::Cancelling);
    assert_eq!(s.compare_and_set(1, &v2).await.unwrap(), Cas::Stored);
    // A writer still holding v1 loses and is shown what is there now.
    let stale = bump(&v1, |t| t.state = TxState::Confirming);
    assert_eq!(s.compare_and_set(1, &stale).await.unwrap(), Cas::Conflict(Some(v2.clone())));
    assert_eq!(s.get(&v1.gid).await.unwrap(), Some(v2));
    let missing = new_tx(1);
    assert_eq!(s.compare_and_set(1, &missing).await.unwrap(), Cas::Conflict(None));
    assert_eq!(s.get(&missing.gid).await.unwrap(), None);
}

async fn concurrent_compare_and_sets_of_one_version_have_exactly_one_winner(b: &dyn Backend) {
    // Two coordinators (two handles) read version 1 and race to store their own version 2.
    let first = b.open().await;
    let second = b.another(&first).await;
    for _ in 0..5 {
        let v1 = new_tx(100);
        first.insert(&v1).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..16 {
            let s = if i % 2 == 0 { first.clone() } else { second.clone() };
            let mine = bump(&v1, |t| t.last_error = Some(format!("writer {i}")));
            tasks.push(tokio::spawn(async move { (s.compare_and_set(1, &mine).await.unwrap(), mine) }));
        }
        let mut winners = Vec::new();
        let mut conflicts = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                (Cas::Stored, mine) => winners.push(mine),
                (Cas::Conflict(current), _) => conflicts.push(current),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one writer wins");
        let stored = first.get(&v1.gid).await.unwrap();
        assert_eq!(stored.as_ref(), Some(&winners[0]));
        assert!(conflicts.iter().all(|c| c == &stored), "losers are shown the winner's record");
    }
}

async fn claim_due_takes_only_due_work_and_leases_it(b: &dyn Backend) {
    let s = b.open().await;
    let early = new_tx(100);
    let late = new_tx(10_000);
    s.insert(&early).await.unwrap();
    s.insert(&late).await.unwrap();

    let got = s.claim_due("a", Timestamp(100), Timestamp(5_000), 10).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].gid, early.gid);
    assert_eq!(got[0].lease_owner.as_deref(), Some("a"));
    assert_eq!(got[0].due_at, Some(Timestamp(5_000)));
    assert_eq!(got[0].version, 2);
    assert_eq!(s.get(&early.gid).await.unwrap().as_ref(), Some(&got[0]), "the claim is what is stored");

    // Leased: nobody else gets it until the lease ends.
    assert!(s.claim_due("b", Timestamp(4_999), Timestamp(9_000), 10).await.unwrap().is_empty());
    let got = s.claim_due("b", Timestamp(5_000), Timestamp(9_000), 10).await.unwrap();
    assert_eq!((got.len(), got[0].lease_owner.as_deref()), (1, Some("b")));
    assert!(s.claim_due("c", Timestamp(100), Timestamp(9_000), 0).await.unwrap().is_empty());
}

async fn claim_due_takes_the_earliest_first_up_to_its_limit(b: &dyn Backend) {
    let s = b.open().await;
    let mut txs: Vec<Transaction> = [50, 10, 40, 20, 30].into_iter().map(new_tx).collect();
    for tx in &txs {
        s.insert(tx).await.unwrap();
    }
    txs.sort_by_key(|t| t.deadline);
    let got = s.claim_due("a", Timestamp(100), Timestamp(1_000), 2).await.unwrap();
    let mut gids: Vec<&Gid> = got.iter().map(|t| &t.gid).collect();
    gids.sort();
    let mut expected = vec![&txs[0].gid, &txs[1].gid];
    expected.sort();
    assert_eq!(gids, expected);
    assert_eq!(s.claim_due("a", Timestamp(100), Timestamp(1_000), 10).await.unwrap().len(), 3);
}

async fn a_claim_bumps_the_version_so_a_writer_holding_the_old_one_loses(b: &dyn Backend) {
    let s = b.open().await;
    let v1 = new_tx(10);
    s.insert(&v1).await.unwrap();
    let claimed = s.claim_due("sweeper", Timestamp(10), Timestamp(500), 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let late = bump(&v1, |t| t.state = TxState::Cancelling);
    assert_eq!(s.compare_and_set(1, &late).await.unwrap(), Cas::Conflict(Some(claimed[0].clone())));
    // Re-applied over what is stored, it goes in.
    let again = bump(&claimed[0], |t| t.state = TxState::Cancelling);
    assert_eq!(s.compare_and_set(2, &again).await.unwrap(), Cas::Stored);
}

async fn a_claim_can_store_the_callers_change_in_its_place(b: &dyn Backend) {
    let s = b.open().await;
    let (change, keep) = (new_tx(10), new_tx(10));
    s.insert(&change).await.unwrap();
    s.insert(&keep).await.unwrap();
    let target = change.gid.clone();
    let then = move |tx: &Transaction| {
        (tx.gid == target).then(|| {
            assert_eq!(tx.lease_owner.as_deref(), Some("me"), "the change is made to the claimed record");
            let mut next = tx.clone();
            next.state = TxState::Cancelling;
            next.decision = Some(Decision::Cancel);
            next.version = 0; // the store sets it
            next
        })
    };
    let got = s.claim_due_with("me", Timestamp(10), Timestamp(100), 10, &then).await.unwrap();
    assert_eq!(got.len(), 2);
    for (tx, changed) in got {
        assert_eq!(s.get(&tx.gid).await.unwrap().as_ref(), Some(&tx), "returned as stored");
        assert_eq!(tx.lease_owner.as_deref(), Some("me"));
        assert_eq!(tx.due_at, Some(Timestamp(100)));
        if tx.gid == change.gid {
            assert!(changed);
            assert_eq!(tx.state, TxState::Cancelling);
            assert!(tx.version > change.version);
        } else {
            assert!(!changed);
            assert_eq!((tx.state, tx.version), (TxState::Trying, keep.version + 1));
        }
    }
    assert_eq!(listed(&*s, TxState::Cancelling).await, vec![change.gid.clone()]);
    // Claimed until 100: nothing is due before then.
    assert!(s.claim_due_with("me", Timestamp(50), Timestamp(200), 10, &|_| None).await.unwrap().is_empty());
}

async fn concurrent_claims_never_hand_one_transaction_to_two_owners(b: &dyn Backend) {
    let first = b.open().await;
    let second = b.another(&first).await;
    let mut all = HashSet::new();
    for _ in 0..60 {
        let tx = new_tx(10);
        first.insert(&tx).await.unwrap();
        all.insert(tx.gid);
    }
    let claim = |s: Arc<dyn Store>, owner: &'static str| {
        tokio::spawn(async move {
            let mut mine = Vec::new();
            for _ in 0..100 {
                let got = s.claim_due(owner, Timestamp(10), Timestamp(60_000), 7).await.unwrap();
                if got.is_empty() {
                    break;
                }
                assert!(got.iter().all(|t| t.lease_owner.as_deref() == Some(owner)));
                mine.extend(got.into_iter().map(|t| t.gid));
            }
            mine
        })
    };
    let (a, b2) = (claim(first.clone(), "a"), claim(second.clone(), "b"));
    let (a, b2) = (a.await.unwrap(), b2.await.unwrap());
    let mut seen = HashSet::new();
    for gid in a.iter().chain(&b2) {
        assert!(seen.insert(gid.clone()), "{gid} claimed twice");
    }
    assert_eq!(seen, all, "every due transaction claimed once");
}

async fn final_and_flagged_transactions_leave_the_due_index(b: &dyn Backend) {
    let s = b.open().await;
    for state in [TxState::Confirmed, TxState::Cancelled, TxState::Flagged] {
        let tx = new_tx(10);
        s.insert(&tx).await.unwrap();
        let done = bump(&tx, |t| {
            t.state = state;
            t.due_at = None;
        });
        assert_eq!(s.compare_and_set(1, &done).await.unwrap(), Cas::Stored);
    }
    assert!(s.claim_due("a", Timestamp(u64::MAX - 1), Timestamp(u64::MAX), 100).await.unwrap().is_empty());
}

async fn reopening_after_a_crash_resumes_leased_work(b: &dyn Backend) {
    let gid = {
        let s = b.open().await;
        let tx = new_tx(100);
        s.insert(&tx).await.unwrap();
        let got = s.claim_due("dead", Timestamp(100), Timestamp(60_000), 1).await.unwrap();
        assert_eq!(got.len(), 1);
        s.sync().await.unwrap();
        tx.gid
    };
    let s = b.reopen().await;
    if b.shared() {
        // Its owner may be alive: the lease is honoured until it ends, then anyone claims it.
        assert_eq!(s.reclaim_abandoned(Timestamp(200)).await.unwrap(), 0);
        assert!(s.claim_due("new", Timestamp(200), Timestamp(5_000), 10).await.unwrap().is_empty());
        let got = s.claim_due("new", Timestamp(60_000), Timestamp(65_000), 10).await.unwrap();
        assert_eq!((got.len(), &got[0].gid), (1, &gid));
    } else {
        // Only one process can open it: whoever held the lease is gone, so it is due at once.
        assert_eq!(s.reclaim_abandoned(Timestamp(200)).await.unwrap(), 1);
        let got = s.claim_due("new", Timestamp(200), Timestamp(5_000), 10).await.unwrap();
        assert_eq!((got.len(), &got[0].gid), (1, &gid));
    }
}

async fn counts_and_lists_follow_state_changes(b: &dyn Backend) {
    let s = b.open().await;
    let a = new_tx(10);
    let c = new_tx(10);
    s.insert(&a).await.unwrap();
    s.insert(&c).await.unwrap();
    assert_eq!(s.count(TxState::Trying).await.unwrap(), 2);
    s.compare_and_set(1, &bump(&a, |t| t.state = TxState::Flagged)).await.unwrap();
    assert_eq!(s.count(TxState::Trying).await.unwrap(), 1);
    assert_eq!(s.count(TxState::Flagged).await.unwrap(), 1);
    assert_eq!(s.count(TxState::Confirmed).await.unwrap(), 0);
    let flagged = s.list(&ListQuery { state: Some(TxState::Flagged), ..Default::default() }).await.unwrap();
    assert_eq!(flagged.items.iter().map(|t| &t.gid).collect::<Vec<_>>(), vec![&a.gid]);
    assert_eq!(flagged.next, None);
}

async fn lists_page_in_id_order(b: &dyn Backend) {
    let s = b.open().await;
    let mut gids = Vec::new();
    for i in 0..9 {
        let mut tx = new_tx(10);
        if i % 3 != 0 {
            tx.state = if i % 3 == 1 { TxState::Cancelled } else { TxState::Confirmed };
            tx.due_at = None;
        }
        s.insert(&tx).await.unwrap();
        gids.push((tx.gid, tx.state));
    }
    gids.sort_by(|a, b| a.0.cmp(&b.0));
    for newest_first in [false, true] {
        for state in [None, Some(TxState::Cancelled), Some(TxState::Trying)] {
            let mut expected: Vec<&Gid> =
                gids.iter().filter(|(_, st)| state.is_none_or(|s| s == *st)).map(|(g, _)| g).collect();
            if newest_first {
                expected.reverse();
            }
            let mut seen = Vec::new();
            let mut after = None;
            for _ in 0..10 {
                let q = ListQuery { state, after: after.clone(), limit: 2, newest_first };
                let page = s.list(&q).await.unwrap();
                assert!(page.items.len() <= 2);
                seen.extend(page.items.iter().map(|t| t.gid.clone()));
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            assert_eq!(
                seen.iter().collect::<Vec<_>>(),
                expected,
                "state {state:?}, newest first {newest_first}"
            );
        }
    }
    let all = s.list(&ListQuery::default()).await.unwrap();
    assert_eq!((all.items.len(), all.next), (9, None));
}

async fn listed(s: &dyn Store, state: TxState) -> Vec<Gid> {
    let page = s.list(&ListQuery { state: Some(state), ..Default::default() }).await.unwrap();
    page.items.into_iter().map(|t| t.gid).collect()
}

async fn a_state_change_that_keeps_the_due_time_moves_the_listing(b: &dyn Backend) {
    // Trying with its deadline due at 10, then cancelling with its lease also ending at 10: the
    // due entry's key stays, the state it is listed under must not.
    let s = b.open().await;
    let tx = new_tx(10);
    s.insert(&tx).await.unwrap();
    let cancelling = bump(&tx, |t| {
        t.state = TxState::Cancelling;
        t.decision = Some(Decision::Cancel);
    });
    assert_eq!(cancelling.due_at, tx.due_at);
    assert_eq!(s.compare_and_set(1, &cancelling).await.unwrap(), Cas::Stored);
    assert_eq!(listed(&*s, TxState::Trying).await, Vec::<Gid>::new());
    assert_eq!(listed(&*s, TxState::Cancelling).await, vec![tx.gid.clone()]);
    assert_eq!(s.count(TxState::Cancelling).await.unwrap(), 1);
    assert_eq!(s.count(TxState::Trying).await.unwrap(), 0);
    // And it is still due.
    let got = s.claim_due("me", Timestamp(10), Timestamp(100), 10).await.unwrap();
    assert_eq!(got.iter().map(|t| &t.gid).collect::<Vec<_>>(), vec![&tx.gid]);
}

async fn a_damaged_record_is_reported_not_a_panic(b: &dyn Backend) {
    let s = b.open().await;
    let tx = new_tx(10);
    let fine = new_tx(10);
    s.insert(&tx).await.unwrap();
    s.insert(&fine).await.unwrap();
    b.damage(&tx.gid).await;
    assert!(matches!(s.get(&tx.gid).await, Err(tcc_core::Error::Storage(_))));
    assert!(matches!(s.list(&ListQuery::default()).await, Err(tcc_core::Error::Storage(_))));
    // The store goes on serving everything else, and one damaged record does not stall recovery.
    assert_eq!(s.get(&fine.gid).await.unwrap(), Some(fine.clone()));
    let claimed = s.claim_due("owner", Timestamp(20), Timestamp(40), 10).await.unwrap();
    assert_eq!(claimed.iter().map(|t| &t.gid).collect::<Vec<_>>(), [&fine.gid], "the damaged one is skipped");
    let claimed = &claimed[0];
    s.reclaim_abandoned(Timestamp(50)).await.unwrap();
    let current = s.get(&fine.gid).await.unwrap().unwrap();
    s.compare_and_set(current.version, &bump(&current, |t| t.state = TxState::Cancelling)).await.unwrap();
    assert_eq!(claimed.lease_owner.as_deref(), Some("owner"));
}

async fn group_commit_keeps_every_acknowledged_write_of_many_concurrent_writers(b: &dyn Backend) {
    let mut acked = Vec::new();
    {
        let s = b.open().await;
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for _ in 0..50 {
                    let tx = new_tx(10);
                    s.insert(&tx).await.unwrap();
                    let next = bump(&tx, |t| t.state = TxState::Cancelling);
                    assert_eq!(s.compare_and_set(1, &next).await.unwrap(), Cas::Stored);
                    mine.push(next);
                }
                mine
            }));
        }
        for t in tasks {
            acked.extend(t.await.unwrap());
        }
    }
    let s = b.reopen().await;
    assert_eq!(acked.len(), 64 * 50);
    for tx in &acked {
        assert_eq!(s.get(&tx.gid).await.unwrap().as_ref(), Some(tx), "{} lost", tx.gid);
    }
    assert_eq!(s.count(TxState::Cancelling).await.unwrap(), 64 * 50);
    // The multi-process variant, with SIGKILL instead of a clean drop, is tests/tests/kill9.rs.
}

async fn unsynced_writes_are_visible_at_once_and_durable_once_synced(b: &dyn Backend) {
    let written = {
        let s = b.open().await;
        let mut written = Vec::new();
        for _ in 0..20 {
            let tx = new_tx(10);
            s.insert_unsynced(&tx).await.unwrap();
            assert!(matches!(s.insert_unsynced(&tx).await, Err(tcc_core::Error::AlreadyExists(_))));
            let next = bump(&tx, |t| t.state = TxState::Cancelling);
            assert_eq!(s.compare_and_set_unsynced(1, &next).await.unwrap(), Cas::Stored);
            assert_eq!(
                s.compare_and_set_unsynced(1, &next).await.unwrap(),
                Cas::Conflict(Some(next.clone()))
            );
            assert_eq!(s.get(&tx.gid).await.unwrap().as_ref(), Some(&next));
            written.push(next);
        }
        s.sync().await.unwrap();
        written
    };
    let s = b.reopen().await;
    for tx in written {
        assert_eq!(s.get(&tx.gid).await.unwrap(), Some(tx));
    }
}

/// Opens the sled store in `dir`, waiting for a dropped one's flusher thread to release the
/// directory lock (it does shortly after the store is dropped).
async fn open_sled(dir: &std::path::Path) -> SledStore {
    for _ in 0..1_000 {
        if let Ok(s) = SledStore::open(dir) {
            return s;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the sled directory stayed locked");
}

fn finished(tx: &Transaction, state: TxState) -> Transaction {
    bump(tx, |t| {
        t.state = state;
        t.decision = Some(if state == TxState::Confirmed { Decision::Confirm } else { Decision::Cancel });
        t.due_at = None;
    })
}

fn done_key(state: TxState, gid: &Gid) -> Vec<u8> {
    [&[state.code()][..], gid.as_str().as_bytes()].concat()
}

#[tokio::test]
async fn sled_keeps_unfinished_and_finished_records_apart() {
    // Unfinished records are in `tcc_live`, which is all that opening reads; a final one moves to
    // `tcc_done` under its state, so listing a final state reads only that state's records.
    let dir = tempfile::tempdir().unwrap();
    let (live, done, tx, end) = {
        let s = open_sled(dir.path()).await;
        let (live, done) = (s.db().open_tree("tcc_live").unwrap(), s.db().open_tree("tcc_done").unwrap());
        let tx = new_tx(10_000);
        s.insert(&tx).await.unwrap();
        assert_eq!((live.len(), done.len()), (1, 0));
        let cancelling = bump(&tx, |t| {
            t.state = TxState::Cancelling;
            t.decision = Some(Decision::Cancel);
        });
        assert_eq!(s.compare_and_set(1, &cancelling).await.unwrap(), Cas::Stored);
        assert_eq!((live.len(), done.len()), (1, 0));
        let end = finished(&cancelling, TxState::Cancelled);
        assert_eq!(s.compare_and_set(2, &end).await.unwrap(), Cas::Stored);
        assert_eq!((live.len(), done.len()), (0, 1));
        assert!(done.contains_key(done_key(TxState::Cancelled, &tx.gid)).unwrap());
        assert_eq!(s.get(&tx.gid).await.unwrap().as_ref(), Some(&end));
        assert!(s.claim_due("a", Timestamp(u64::MAX - 1), Timestamp(u64::MAX), 10).await.unwrap().is_empty());
        // A final record is final: a change of it stays where it is, under its state.
        assert_eq!(s.compare_and_set(2, &end).await.unwrap(), Cas::Conflict(Some(end.clone())));
        (live.len(), done.len(), tx, end)
    };
    assert_eq!((live, done), (0, 1));
    let s = open_sled(dir.path()).await;
    assert_eq!(s.get(&tx.gid).await.unwrap(), Some(end.clone()));
    assert_eq!(listed(&s, TxState::Cancelled).await, vec![tx.gid.clone()]);
    assert!(listed(&s, TxState::Cancelling).await.is_empty());
    assert_eq!(s.count(TxState::Cancelled).await.unwrap(), 1);
    assert_eq!(s.count(TxState::Cancelling).await.unwrap(), 0);
    assert!(s.claim_due("a", Timestamp(u64::MAX - 1), Timestamp(u64::MAX), 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn sled_finishes_on_open_a_move_a_crash_interrupted() {
    // Finishing writes the record into `tcc_done`, then removes it from `tcc_live`. A crash in
    // between leaves both: the newer one must win on open, and the transaction must be neither due
    // nor listed twice.
    let dir = tempfile::tempdir().unwrap();
    let (tx, end) = {
        let s = open_sled(dir.path()).await;
        let tx = new_tx(100);
        s.insert(&tx).await.unwrap();
        let confirming = bump(&tx, |t| {
            t.state = TxState::Confirming;
            t.decision = Some(Decision::Confirm);
        });
        assert_eq!(s.compare_and_set(1, &confirming).await.unwrap(), Cas::Stored);
        let end = finished(&confirming, TxState::Confirmed);
        let bytes = tcc_core::store::codec::encode(&end).unwrap();
        s.db().open_tree("tcc_done").unwrap().insert(done_key(TxState::Confirmed, &tx.gid), bytes).unwrap();
        s.sync().await.unwrap();
        (tx, end)
    };
    let s = open_sled(dir.path()).await;
    assert_eq!(s.get(&tx.gid).await.unwrap(), Some(end));
    assert!(!s.db().open_tree("tcc_live").unwrap().contains_key(tx.gid.as_str()).unwrap());
    assert!(s.claim_due("a", Timestamp(u64::MAX - 1), Timestamp(u64::MAX), 10).await.unwrap().is_empty());
    assert_eq!(s.count(TxState::Confirming).await.unwrap(), 0);
    let all = s.list(&ListQuery::default()).await.unwrap();
    assert_eq!(all.items.iter().map(|t| &t.gid).collect::<Vec<_>>(), vec![&tx.gid], "listed once");
}

#[tokio::test]
async fn sled_moves_a_directory_of_an_earlier_layout_on_open() {
    // Earlier versions kept every record in `tcc_tx` beside on-disk due and state indexes. Such a
    // directory must be moved on open, once, with every record served, due and listed as before.
    let dir = tempfile::tempdir().unwrap();
    let trying = new_tx(100);
    let cancelled = finished(&new_tx(100), TxState::Cancelled);
    let damaged = Gid::generate();
    {
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let txs = db.open_tree("tcc_tx").unwrap();
        for tx in [&trying, &cancelled] {
            txs.insert(tx.gid.as_str(), tcc_core::store::codec::encode(tx).unwrap()).unwrap();
        }
        txs.insert(damaged.as_str(), &b"\x01\xff\xff"[..]).unwrap();
        let mut due = 100u64.to_be_bytes().to_vec();
        due.extend_from_slice(trying.gid.as_str().as_bytes());
        db.open_tree("tcc_due").unwrap().insert(due, &[TxState::Trying.code()][..]).unwrap();
        db.open_tree("tcc_state")
            .unwrap()
            .insert(done_key(TxState::Cancelled, &cancelled.gid), &[][..])
            .unwrap();
        db.open_tree("tcc_meta").unwrap().insert("index_layout", &[2u8][..]).unwrap();
        db.flush().unwrap();
    }
    let s = open_sled(dir.path()).await;
    assert_eq!(s.get(&trying.gid).await.unwrap(), Some(trying.clone()));
    assert_eq!(s.get(&cancelled.gid).await.unwrap(), Some(cancelled.clone()));
    assert!(matches!(s.get(&damaged).await, Err(tcc_core::Error::Storage(_))), "still reported");
    assert_eq!(listed(&s, TxState::Trying).await, vec![trying.gid.clone()]);
    assert_eq!(listed(&s, TxState::Cancelled).await, vec![cancelled.gid.clone()]);
    let got = s.claim_due("a", Timestamp(100), Timestamp(200), 10).await.unwrap();
    assert_eq!(got.iter().map(|t| &t.gid).collect::<Vec<_>>(), vec![&trying.gid], "due as before");
    let names: Vec<_> =
        s.db().tree_names().into_iter().map(|n| String::from_utf8_lossy(&n).into_owned()).collect();
    for old in ["tcc_tx", "tcc_due", "tcc_state"] {
        assert!(!names.iter().any(|n| n == old), "{old} dropped");
    }
    let note = s.db().open_tree("tcc_meta").unwrap().get("index_layout").unwrap();
    assert_eq!(note.as_deref(), Some(&[3u8][..]), "moved once: the next open skips the move");
    s.sync().await.unwrap();
    drop(s);
    let s = open_sled(dir.path()).await;
    assert_eq!(s.get(&cancelled.gid).await.unwrap(), Some(cancelled));
    assert_eq!(s.count(TxState::Trying).await.unwrap(), 1);
}

/// CI sets `TCC_REQUIRE_POSTGRES=1`: a build without the PostgreSQL store must not pass for one
/// that tested it.
#[cfg(not(feature = "postgres"))]
#[test]
fn the_postgres_store_is_built_when_its_tests_are_required() {
    assert!(
        std::env::var("TCC_REQUIRE_POSTGRES").as_deref() != Ok("1"),
        "TCC_REQUIRE_POSTGRES=1 but tcc-core was built without its `postgres` feature"
    );
}
