//! The sled store: compare-and-set, the due index, leases and group commit.
//!
//! These tests speak only through the `Store` trait, so a later store (PostgreSQL) can run the same
//! checks by swapping `open`.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use tcc_core::store::{Cas, ListQuery, SledStore, Store};
use tcc_core::{Gid, Timestamp, Transaction, TxState};

fn open(dir: &tempfile::TempDir) -> SledStore {
    SledStore::open(dir.path()).unwrap()
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

#[tokio::test]
async fn insert_refuses_an_existing_id_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    let tx = new_tx(100);
    s.insert(&tx).await.unwrap();
    let other = bump(&tx, |t| t.deadline = Timestamp(5));
    assert!(matches!(s.insert(&other).await, Err(tcc_core::Error::AlreadyExists(_))));
    assert_eq!(s.get(&tx.gid).await.unwrap(), Some(tx));
}

#[tokio::test]
async fn compare_and_set_stores_only_over_the_expected_version() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
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

#[tokio::test]
async fn claim_due_takes_only_due_work_and_leases_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
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

    // Leased: nobody else gets it until the lease ends.
    assert!(s.claim_due("b", Timestamp(4_999), Timestamp(9_000), 10).await.unwrap().is_empty());
    let got = s.claim_due("b", Timestamp(5_000), Timestamp(9_000), 10).await.unwrap();
    assert_eq!((got.len(), got[0].lease_owner.as_deref()), (1, Some("b")));
}

#[tokio::test]
async fn final_and_flagged_transactions_leave_the_due_index() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
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

#[tokio::test]
async fn reopening_hands_back_abandoned_leases_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let gid = {
        let s = open(&dir);
        let tx = new_tx(100);
        s.insert(&tx).await.unwrap();
        let got = s.claim_due("dead", Timestamp(100), Timestamp(60_000), 1).await.unwrap();
        assert_eq!(got.len(), 1);
        s.sync().await.unwrap();
        tx.gid
    };
    let s = loop {
        // The flusher thread of the dropped store releases the directory lock shortly.
        match SledStore::open(dir.path()) {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    };
    assert_eq!(s.reclaim_abandoned(Timestamp(200)).await.unwrap(), 1);
    let got = s.claim_due("new", Timestamp(200), Timestamp(5_000), 10).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].gid, gid);
}

#[tokio::test]
async fn counts_and_lists_follow_state_changes() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    let a = new_tx(10);
    let b = new_tx(10);
    s.insert(&a).await.unwrap();
    s.insert(&b).await.unwrap();
    assert_eq!(s.count(TxState::Trying).await.unwrap(), 2);
    s.compare_and_set(1, &bump(&a, |t| t.state = TxState::Flagged)).await.unwrap();
    assert_eq!(s.count(TxState::Trying).await.unwrap(), 1);
    assert_eq!(s.count(TxState::Flagged).await.unwrap(), 1);
    let flagged = s.list(&ListQuery { state: Some(TxState::Flagged), ..Default::default() }).await.unwrap();
    assert_eq!(flagged.items.iter().map(|t| &t.gid).collect::<Vec<_>>(), vec![&a.gid]);
}

#[tokio::test]
async fn a_damaged_record_is_reported_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    let tx = new_tx(10);
    s.insert(&tx).await.unwrap();
    s.db().open_tree("tcc_tx").unwrap().insert(tx.gid.as_str().as_bytes(), &b"\x01\xff\xff"[..]).unwrap();
    assert!(matches!(s.get(&tx.gid).await, Err(tcc_core::Error::Storage(_))));
    assert!(s.list(&ListQuery::default()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_keeps_every_acknowledged_write_of_many_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Vec::new();
    {
        let s = Arc::new(open(&dir));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for _ in 0..50 {
                    let tx = new_tx(10);
                    s.insert(&tx).await.unwrap();
                    mine.push(tx.gid);
                }
                mine
            }));
        }
        for t in tasks {
            acked.extend(t.await.unwrap());
        }
    }
    let s = loop {
        match SledStore::open(dir.path()) {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    };
    assert_eq!(acked.len(), 64 * 50);
    for gid in &acked {
        assert!(s.get(gid).await.unwrap().is_some(), "{gid} lost");
    }
    // The multi-process variant, with SIGKILL instead of a clean drop, is tests/tests/kill9.rs.
}

#[tokio::test]
async fn index_entries_left_by_an_interrupted_change_are_ignored_and_cleaned() {
    // A crash between writing a change's new index entries and swapping the record leaves entries
    // the record does not use. They must never make a transaction due or listed in the wrong state.
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    let tx = new_tx(10_000);
    s.insert(&tx).await.unwrap();
    let mut stale_due = 500u64.to_be_bytes().to_vec();
    stale_due.extend_from_slice(tx.gid.as_str().as_bytes());
    s.db().open_tree("tcc_due").unwrap().insert(&stale_due, &[][..]).unwrap();
    let mut stale_state = vec![TxState::Flagged.code()];
    stale_state.extend_from_slice(tx.gid.as_str().as_bytes());
    s.db().open_tree("tcc_state").unwrap().insert(&stale_state, &[][..]).unwrap();

    assert!(s.claim_due("a", Timestamp(600), Timestamp(900), 10).await.unwrap().is_empty());
    assert!(!s.db().open_tree("tcc_due").unwrap().contains_key(&stale_due).unwrap(), "stale entry dropped");
    assert_eq!(s.count(TxState::Flagged).await.unwrap(), 0);
    let flagged = s.list(&ListQuery { state: Some(TxState::Flagged), ..Default::default() }).await.unwrap();
    assert!(flagged.items.is_empty());
    // The real entry still works.
    assert_eq!(s.claim_due("a", Timestamp(10_000), Timestamp(20_000), 10).await.unwrap().len(), 1);
}
