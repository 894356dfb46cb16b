//! The coordinator engine against in-memory participants, a manual clock and a real sled directory.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Fault, Rig};
use tcc_core::store::ListQuery;
use tcc_core::{BranchState, Decision, Error, Gid, TxState};

const MIN: Duration = Duration::from_secs(60);

fn all_branches(tx: &tcc_core::Transaction, s: BranchState) -> bool {
    tx.branches.iter().all(|b| b.state == s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_confirms_every_branch_once() {
    let rig = Rig::new().await;
    let gid = rig.begin_with(&["flight", "hotel"], MIN).await;
    let decided = rig.tc().confirm(&gid).await.unwrap();
    assert_eq!(decided.decision, Some(Decision::Confirm));
    let tx = rig.settle(&gid).await;
    assert_eq!(tx.state, TxState::Confirmed);
    assert!(all_branches(&tx, BranchState::Confirmed));
    for b in ["flight", "hotel"] {
        assert_eq!(rig.mem.effects(&gid, b).confirms, 1);
        assert_eq!(rig.mem.effects(&gid, b).cancels, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_cancels_every_branch() {
    let rig = Rig::new().await;
    let gid = rig.begin_with(&["flight", "hotel"], MIN).await;
    rig.tc().cancel(&gid).await.unwrap();
    let tx = rig.settle(&gid).await;
    assert_eq!(tx.state, TxState::Cancelled);
    assert!(all_branches(&tx, BranchState::Cancelled));
    assert_eq!(rig.mem.effects(&gid, "hotel").cancels, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_confirm_is_answered_without_a_second_decision() {
    let rig = Rig::new().await;
    let gid = rig.begin_with(&["a"], MIN).await;
    let first = rig.tc().confirm(&gid).await.unwrap();
    let again = rig.tc().confirm(&gid).await.unwrap();
    assert_eq!(again.decision, first.decision);
    rig.settle(&gid).await;
    rig.tc().confirm(&gid).await.unwrap();
    assert_eq!(rig.mem.effects(&gid, "a").confirms, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_still_trying_at_its_deadline_is_cancelled() {
    let rig = Rig::new().await;
    let gid = rig.begin_with(&["flight", "hotel"], Duration::from_secs(10)).await;
    // Nobody decides; the initiator has gone away.
    let tx = rig.settle(&gid).await;
    assert_eq!(tx.state, TxState::Cancelled);
    assert!(rig.clock_now() >= tx.deadline);
    assert_eq!(rig.mem.effects(&gid, "flight").cancels, 1);
    assert_eq!(rig.tc().stats().expired, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_after_the_deadline_is_refused_and_changes_nothing() {
    let rig = Rig::new().await;
    let gid = rig.begin_with(&["a"], Duration::from_secs(10)).await;
    rig.clock.advance(Duration::from_secs(11));
    // Refused either way: `DeadlinePassed` if the request comes first, `IllegalTransition` (it is
    // cancelling) if the deadline sweep does. `state.rs` pins the first case down deterministically.
    let err = rig.tc().confirm(&gid).await.unwrap_err();
    assert!(matches!(err, Error::DeadlinePassed { .. } | Error::IllegalTransition { .. }), "{err}");
    // Whatever the sweep did meanwhile, nothing was ever confirmed.
    let tx = rig.settle(&gid).await;
    assert_eq!(tx.state, TxState::Cancelled);
    assert_eq!(rig.mem.effects(&gid, "a").confirms, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_confirm_failures_are_retried_until_the_participant_is_back() {
    let rig = Rig::new().await;
    rig.mem.set_fault("mem://hotel", Fault::FailTimes(3));
    let gid = rig.begin_with(&["flight", "hotel"], MIN).await;
    rig.tc().confirm(&gid).await.unwrap();
    let tx = rig.settle(&gid).await;
    assert_eq!(tx.state, TxState::Confirmed);
    assert_eq!(rig.mem.calls_to(&gid, "hotel"), 4);
    // The flight was confirmed in the first round and not called again.
    assert_eq!(rig.mem.calls_to(&gid, "flight"), 1);
    let stats = rig.tc().stats();
    assert_eq!((stats.retries, stats.phase_two_failures), (3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_exponentially() {
    let rig = Rig::new().await;
    rig.mem.set_fault("mem://a", Fault::Down);
    let gid = rig.begin_with(&["a"], MIN).await;
    rig.tc().confirm(&gid).await.unwrap();
    let mut dues = Vec::new();
    let g = gid.clone();
    rig.run_until(Duration::from_millis(10), 5_000, async |tc| {
        let t = tc.get(&g).await.unwrap();
        if let (Some(due), true) = (t.due_at, t.lease_owner.is_none())
            && dues.last().map(|(a, _)| *a) != Some(t.attempts)
        {
            dues.push((t.attempts, due.since(t.updated_at)));
        }
        t.state == TxState::Flagged
    })
    .await;
    // Policy: 100 ms doubling, 20% jitter, 4 attempts => three scheduled retries before the flag.
    // The retry time is computed when the round's calls end and `updated_at` when its result is
    // stored; the manual clock may move one 10 ms step in between.
    let delays: Vec<u128> = dues.iter().map(|(_, d)| d.as_millis()).collect();
    assert_eq!(delays.len(), 3, "{dues:?}");
    for (i, d) in delays.iter().enumerate() {
        let full = 100u128 << i;
        assert!(*d <= full && *d + 10 >= full * 8 / 10, "retry {i}: {d} ms, expected ~{full}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_retry_policy_flags_the_transaction_with_its_last_error() {
    let rig = Rig::new().await;
    rig.mem.set_fault("mem://hotel", Fault::Down);
    let gid = rig.begin_with(&["flight", "hotel"], MIN).await;
    rig.tc().confirm(&gid).await.unwrap();
    let tx = rig.settle(&gid).await;
    assert_eq!(tx.state, TxState::Flagged);
    assert_eq!(tx.decision, Some(Decision::Confirm));
    assert_eq!(tx.attempts, 4);
    assert!(tx.last_error.as_deref().unwrap().contains("connection refused"), "{:?}", tx.last_error);
    assert_eq!(tx.due_at, None, "a flagged transaction is not retried in silence");
    assert_eq!(rig.tc().count(TxState::Flagged).await.unwrap(), 1);
    assert_eq!(rig.tc().stats().flagged, 1);
    let flagged =
        rig.tc().list(&ListQuery { state: Some(TxState::Flagged), ..Default::default() }).await.unwrap();
    assert_eq!(flagged.items.len(), 1);

    // Nothing more happens on its own.
    let calls = rig.mem.calls_to(&gid, "hotel");
    rig.clock.advance(Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(rig.mem.calls_to(&gid, "hotel"), calls);

    // The operator fixes the hotel and retries.
    rig.mem.set_fault("mem://hotel", Fault::Healthy);
    rig.tc().retry(&gid).await.unwrap();
    let tx = rig.settle(&gid).await;
    assert_eq!(tx.state, TxState::Confirmed);
    assert_eq!(rig.mem.effects(&gid, "hotel").confirms, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_flags_at_once_and_the_operator_can_force_the_decision() {
    let rig = Rig::new().await;
    rig.mem.set_fault("mem://hotel", Fault::Permanent);
    let gid = rig.begin_with(&["flight", "hotel"], MIN).await;
    rig.tc().confirm(&gid).await.unwrap();
    let tx = rig.settle(&gid).await;
    assert_eq!((tx.state, tx.attempts), (TxState::Flagged, 1));
    assert_eq!(rig.mem.calls_to(&gid, "hotel"), 1);

    let err = rig.tc().force(&gid, Decision::Cancel).await.unwrap_err();
    assert!(matches!(err, Error::IllegalTransition { .. }), "{err}");
    assert_eq!(rig.tc().get(&gid).await.unwrap(), tx, "a refused force changes nothing");

    let forced = rig.tc().force(&gid, Decision::Confirm).await.unwrap();
    assert_eq!(forced.state, TxState::Confirmed);
    assert!(all_branches(&forced, BranchState::Confirmed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_never_answers_times_out_per_call() {
    let rig = Rig::new().await;
    rig.mem.set_fault("mem://slow", Fault::Hang);
    let gid = rig.begin_with(&["fast", "slow"], MIN).await;
    rig.tc().cancel(&gid).await.unwrap();
    let tx = rig.settle(&gid).await;
    assert_eq!(tx.state, TxState::Flagged);
    assert!(tx.last_error.as_deref().unwrap().contains("no answer within 1000 ms"));
    assert_eq!(tx.branch(&"fast".parse().unwrap()).unwrap().state, BranchState::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_of_one_transaction_are_called_concurrently() {
    // Both participants hang: if calls were made one after another, only one would ever be called.
    let rig = Rig::new().await;
    rig.mem.set_fault("mem://a", Fault::Hang);
    rig.mem.set_fault("mem://b", Fault::Hang);
    let gid = rig.begin_with(&["a", "b"], MIN).await;
    rig.tc().confirm(&gid).await.unwrap();
    for _ in 0..500 {
        if rig.mem.calls().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(rig.mem.calls().len(), 2, "both calls are in flight at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let rig = Rig::new().await;
    let tc = rig.tc();
    let unknown = Gid::generate();
    for err in [
        tc.confirm(&unknown).await.unwrap_err(),
        tc.cancel(&unknown).await.unwrap_err(),
        tc.get(&unknown).await.unwrap_err(),
        tc.retry(&unknown).await.unwrap_err(),
        tc.register(&unknown, "a".parse().unwrap(), "mem://a".into(), vec![]).await.unwrap_err(),
    ] {
        assert!(matches!(err, Error::NotFound(_)), "{err}");
    }
    assert!(matches!(tc.begin(None, Duration::ZERO).await, Err(Error::InvalidInput(_))));
    assert!(matches!(tc.begin(None, Duration::from_secs(10 * 86_400)).await, Err(Error::InvalidInput(_))));

    let gid = rig.begin_with(&["a"], MIN).await;
    assert!(matches!(tc.begin(Some(gid.clone()), MIN).await, Err(Error::AlreadyExists(_))));
    let before = tc.get(&gid).await.unwrap();
    let big = vec![0u8; tc.config().max_payload + 1];
    assert!(matches!(
        tc.register(&gid, "b".parse().unwrap(), "mem://b".into(), big).await,
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        tc.register(&gid, "b".parse().unwrap(), String::new(), vec![]).await,
        Err(Error::InvalidInput(_))
    ));
    let clash = tc.register(&gid, "a".parse().unwrap(), "mem://other".into(), vec![]).await;
    assert!(matches!(clash, Err(Error::InvalidInput(_))));
    assert!(matches!(tc.force(&gid, Decision::Confirm).await, Err(Error::IllegalTransition { .. })));
    assert_eq!(tc.get(&gid).await.unwrap(), before);

    tc.cancel(&gid).await.unwrap();
    let decided = tc.get(&gid).await.unwrap();
    assert!(matches!(tc.confirm(&gid).await, Err(Error::IllegalTransition { .. })));
    let late = tc.register(&gid, "c".parse().unwrap(), "mem://c".into(), vec![]).await;
    assert!(matches!(late, Err(Error::IllegalTransition { .. })));
    let now = tc.get(&gid).await.unwrap();
    assert_eq!((now.decision, now.branches.len()), (decided.decision, 1));
    assert_eq!(rig.settle(&gid).await.state, TxState::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_by_state_and_pages() {
    let rig = Rig::new().await;
    let mut confirmed = Vec::new();
    for i in 0..7 {
        let gid = rig.begin_with(&["a"], MIN).await;
        if i % 2 == 0 {
            rig.tc().confirm(&gid).await.unwrap();
            rig.settle(&gid).await;
            confirmed.push(gid);
        }
    }
    let mut seen = Vec::new();
    let mut q = ListQuery { state: Some(TxState::Confirmed), after: None, limit: 3, newest_first: false };
    loop {
        let page = rig.tc().list(&q).await.unwrap();
        assert!(page.items.len() <= 3);
        seen.extend(page.items.iter().map(|t| t.gid.clone()));
        match page.next {
            Some(n) => q.after = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, confirmed, "every confirmed transaction once, in creation order");
    let trying =
        rig.tc().list(&ListQuery { state: Some(TxState::Trying), ..Default::default() }).await.unwrap();
    assert_eq!(trying.items.len(), 3);
    let all = rig.tc().list(&ListQuery::default()).await.unwrap();
    assert_eq!((all.items.len(), all.next), (7, None));
}

// ---- crash recovery: the engine dies at each step and a new one on the same directory finishes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_begin_then_the_deadline_cancels_after_restart() {
    let mut rig = Rig::new().await;
    let gid = rig.tc().begin(None, Duration::from_secs(5)).await.unwrap().gid;
    rig.restart().await;
    let tx = rig.settle(&gid).await;
    assert_eq!(tx.state, TxState::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_register_then_the_registered_branches_are_cancelled() {
    let mut rig = Rig::new().await;
    let gid = rig.begin_with(&["flight", "hotel"], Duration::from_secs(5)).await;
    rig.restart().await;
    let tx = rig.settle(&gid).await;
    assert_eq!(tx.state, TxState::Cancelled);
    assert_eq!(rig.mem.effects(&gid, "flight").cancels, 1);
    assert_eq!(rig.mem.effects(&gid, "hotel").cancels, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_confirm_with_one_branch_done_finishes_after_restart() {
    let mut rig = Rig::new().await;
    rig.mem.set_fault("mem://hotel", Fault::Down);
    let gid = rig.begin_with(&["flight", "hotel"], MIN).await;
    rig.tc().confirm(&gid).await.unwrap();
    let g = gid.clone();
    assert!(
        rig.run_until(Duration::from_millis(1), 1_000, async |tc| tc.get(&g).await.unwrap().attempts >= 1)
            .await
    );
    let mid = rig.tc().get(&gid).await.unwrap();
    assert_eq!(mid.state, TxState::Confirming);
    assert_eq!(mid.branch(&"flight".parse().unwrap()).unwrap().state, BranchState::Confirmed);

    rig.crash().await;
    rig.mem.set_fault("mem://hotel", Fault::Healthy);
    rig.open().await;
    let tx = rig.settle(&gid).await;
    assert_eq!(tx.state, TxState::Confirmed);
    assert_eq!(rig.mem.calls_to(&gid, "flight"), 1, "the confirmed branch is not called again");
    assert_eq!(rig.mem.effects(&gid, "hotel").confirms, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_while_calls_are_in_flight_repeats_them_after_restart() {
    let mut rig = Rig::new().await;
    rig.mem.set_fault("mem://hotel", Fault::Hang);
    let gid = rig.begin_with(&["flight", "hotel"], MIN).await;
    rig.tc().confirm(&gid).await.unwrap();
    for _ in 0..2_000 {
        if rig.mem.calls().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(rig.mem.calls().len(), 2, "both calls are in flight");
    // The flight confirmed, but the round waits for the hanging hotel: nothing of it is stored yet.
    assert_eq!(rig.mem.effects(&gid, "flight").confirms, 1);
    let mid = rig.tc().get(&gid).await.unwrap();
    assert_eq!(mid.state, TxState::Confirming);
    assert!(all_branches(&mid, BranchState::Registered), "{mid:?}");
    rig.crash().await;
    rig.mem.set_fault("mem://hotel", Fault::Healthy);
    rig.open().await;
    let tx = rig.settle(&gid).await;
    assert_eq!(tx.state, TxState::Confirmed);
    // The flight was confirmed before the crash but its answer was never stored: it is called again,
    // and the barrier (here: the in-memory participant) keeps the effect single.
    assert_eq!(rig.mem.calls_to(&gid, "flight"), 2);
    assert_eq!(rig.mem.effects(&gid, "flight").confirms, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_cancel_finishes_after_restart() {
    let mut rig = Rig::new().await;
    rig.mem.set_fault("mem://flight", Fault::Down);
    let gid = rig.begin_with(&["flight", "hotel"], MIN).await;
    rig.tc().cancel(&gid).await.unwrap();
    let g = gid.clone();
    assert!(
        rig.run_until(Duration::from_millis(1), 1_000, async |tc| tc.get(&g).await.unwrap().attempts >= 1)
            .await
    );
    rig.crash().await;
    rig.mem.set_fault("mem://flight", Fault::Healthy);
    rig.open().await;
    let tx = rig.settle(&gid).await;
    assert_eq!(tx.state, TxState::Cancelled);
    assert!(all_branches(&tx, BranchState::Cancelled));
    assert_eq!(rig.mem.effects(&gid, "flight").confirms, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flagged_transaction_stays_flagged_across_restarts() {
    let mut rig = Rig::new().await;
    rig.mem.set_fault("mem://a", Fault::Permanent);
    let gid = rig.begin_with(&["a"], MIN).await;
    rig.tc().confirm(&gid).await.unwrap();
    assert_eq!(rig.settle(&gid).await.state, TxState::Flagged);
    rig.restart().await;
    rig.clock.advance(Duration::from_secs(600));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let tx = rig.tc().get(&gid).await.unwrap();
    assert_eq!(tx.state, TxState::Flagged);
    assert_eq!(rig.mem.calls_to(&gid, "a"), 1);
}

impl Rig {
    fn clock_now(&self) -> tcc_core::Timestamp {
        use tcc_core::Clock;
        self.clock.now()
    }
}

/// A sled store that counts the writes not yet made durable by a sync, and the records read.
#[derive(Debug)]
struct Unflushed {
    inner: tcc_core::SledStore,
    pending: std::sync::atomic::AtomicUsize,
    syncs: std::sync::atomic::AtomicUsize,
    reads: std::sync::atomic::AtomicUsize,
}

impl Unflushed {
    async fn open(dir: &std::path::Path) -> std::sync::Arc<Unflushed> {
        std::sync::Arc::new(Unflushed {
            inner: common::open_store(dir).await,
            pending: Default::default(),
            syncs: Default::default(),
            reads: Default::default(),
        })
    }
    fn reads(&self) -> usize {
        self.reads.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn pending(&self) -> usize {
        self.pending.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn dirty(&self) {
        self.pending.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl tcc_core::Store for Unflushed {
    async fn insert(&self, tx: &tcc_core::Transaction) -> tcc_core::Result<()> {
        self.inner.insert(tx).await
    }
    async fn insert_unsynced(&self, tx: &tcc_core::Transaction) -> tcc_core::Result<()> {
        self.dirty();
        self.inner.insert_unsynced(tx).await
    }
    async fn get(&self, gid: &Gid) -> tcc_core::Result<Option<tcc_core::Transaction>> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.get(gid).await
    }
    async fn compare_and_set(
        &self,
        v: u64,
        tx: &tcc_core::Transaction,
    ) -> tcc_core::Result<tcc_core::store::Cas> {
        self.inner.compare_and_set(v, tx).await
    }
    async fn compare_and_set_unsynced(
        &self,
        v: u64,
        tx: &tcc_core::Transaction,
    ) -> tcc_core::Result<tcc_core::store::Cas> {
        self.dirty();
        self.inner.compare_and_set_unsynced(v, tx).await
    }
    async fn list(&self, q: &ListQuery) -> tcc_core::Result<tcc_core::store::Page> {
        self.inner.list(q).await
    }
    async fn claim_due(
        &self,
        owner: &str,
        now: tcc_core::Timestamp,
        until: tcc_core::Timestamp,
        limit: usize,
    ) -> tcc_core::Result<Vec<tcc_core::Transaction>> {
        self.inner.claim_due(owner, now, until, limit).await
    }
    async fn reclaim_abandoned(&self, now: tcc_core::Timestamp) -> tcc_core::Result<usize> {
        self.inner.reclaim_abandoned(now).await
    }
    async fn count(&self, state: TxState) -> tcc_core::Result<u64> {
        self.inner.count(state).await
    }
    async fn sync(&self) -> tcc_core::Result<()> {
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.pending.store(0, std::sync::atomic::Ordering::SeqCst);
        self.inner.sync().await
    }
}

/// A coordinator on `store` calling `transport`, on the system clock, with the tests' settings.
async fn open_on(
    store: std::sync::Arc<dyn tcc_core::Store>,
    transport: std::sync::Arc<dyn tcc_core::transport::Transport>,
) -> tcc_core::Coordinator {
    tcc_core::Coordinator::open(
        store,
        transport,
        std::sync::Arc::new(tcc_core::SystemClock),
        common::config(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_flushes_the_phase_two_results_recorded_without_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let store = Unflushed::open(dir.path()).await;
    let mem = common::Mem::default();
    let tc = open_on(store.clone(), std::sync::Arc::new(mem.clone())).await;
    let tx = tc.begin(None, MIN).await.unwrap();
    tc.register(&tx.gid, "flight".parse().unwrap(), "mem://flight".into(), Vec::new()).await.unwrap();
    tc.confirm(&tx.gid).await.unwrap();
    let done = tc.wait(&tx.gid, MIN).await.unwrap();
    assert_eq!(done.state, TxState::Confirmed);
    assert!(store.pending() > 0, "the round's result is recorded without a flush");
    tc.stop().await;
    assert_eq!(store.pending(), 0, "stopping flushed it");
}

fn planned(names: &[&str]) -> Vec<tcc_core::NewBranch> {
    names
        .iter()
        .map(|n| tcc_core::NewBranch {
            id: n.parse().unwrap(),
            target: format!("mem://{n}"),
            payload: n.as_bytes().to_vec(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_registered_with_begin_survive_a_crash_and_are_confirmed() {
    let mut rig = Rig::new().await;
    let tx = rig
        .tc()
        .begin_registered(None, MIN, Default::default(), planned(&["flight", "hotel"]))
        .await
        .unwrap();
    assert_eq!(tx.version, 1, "one write");
    assert_eq!(tx.branches.len(), 2);
    rig.restart().await;
    let stored = rig.tc().get(&tx.gid).await.unwrap();
    assert_eq!(stored, tx);
    rig.tc().confirm(&tx.gid).await.unwrap();
    let done = rig.settle(&tx.gid).await;
    assert_eq!(done.state, TxState::Confirmed);
    for b in ["flight", "hotel"] {
        assert_eq!(rig.mem.effects(&tx.gid, b).confirms, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_branch_at_begin_refuses_the_whole_begin_and_stores_nothing() {
    let rig = Rig::new().await;
    let mut twice = planned(&["a", "b"]);
    twice.push(tcc_core::NewBranch {
        id: "a".parse().unwrap(),
        target: "mem://other".into(),
        payload: vec![],
    });
    let mut too_big = planned(&["a"]);
    too_big[0].payload = vec![0; common::config().max_payload + 1];
    let mut no_target = planned(&["a"]);
    no_target[0].target.clear();
    let too_many: Vec<String> = (0..=common::config().max_branches).map(|i| format!("b{i}")).collect();
    let too_many = planned(&too_many.iter().map(String::as_str).collect::<Vec<_>>());
    for (what, branches) in
        [("same id, other details", twice), ("payload", too_big), ("target", no_target), ("count", too_many)]
    {
        let err = rig.tc().begin_registered(None, MIN, Default::default(), branches).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_) | Error::IllegalTransition { .. }), "{what}: {err:?}");
    }
    assert!(rig.tc().list(&ListQuery::default()).await.unwrap().items.is_empty());
    // The same branch twice with the same details is one branch, as with register.
    let mut same = planned(&["a"]);
    same.extend(planned(&["a"]));
    let tx = rig.tc().begin_registered(None, MIN, Default::default(), same).await.unwrap();
    assert_eq!(tx.branches.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_sweep_expires_a_batch_with_one_flush_not_one_per_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = Unflushed::open(dir.path()).await;
    let clock = tcc_core::ManualClock::new(common::START);
    let mem = common::Mem::default();
    let tc = tcc_core::Coordinator::open(
        store.clone(),
        std::sync::Arc::new(mem.clone()),
        std::sync::Arc::new(clock.clone()),
        common::config(),
    )
    .await
    .unwrap();
    let mut gids = Vec::new();
    for _ in 0..60 {
        let tx =
            tc.begin_registered(None, MIN, Default::default(), planned(&["flight", "hotel"])).await.unwrap();
        gids.push(tx.gid);
    }
    let before = store.syncs.load(std::sync::atomic::Ordering::SeqCst);
    clock.advance(MIN * 2);
    for gid in &gids {
        assert_eq!(tc.wait(gid, MIN).await.unwrap().state, TxState::Cancelled);
        assert_eq!(mem.effects(gid, "flight").cancels, 1);
    }
    let syncs = store.syncs.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(syncs <= 3, "60 expired with {syncs} flushes");
    tc.stop().await;
}

/// Branch calls that wait for a gate, counting how many are in flight at most. The gate lets calls
/// through one at a time ([`Gated::let_one_through`]) or all from now on ([`Gated::release`]).
#[derive(Clone, Debug)]
struct Gated {
    passes: std::sync::Arc<tokio::sync::Semaphore>,
    now: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    max: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    total: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl tcc_core::transport::Transport for Gated {
    async fn call(
        &self,
        _: tcc_core::transport::BranchCall<'_>,
    ) -> Result<(), tcc_core::transport::CallError> {
        use std::sync::atomic::Ordering::SeqCst;
        /// Counts the call out however it ends (answered, or dropped by a timeout or a stop).
        struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, SeqCst);
            }
        }
        self.total.fetch_add(1, SeqCst);
        let n = self.now.fetch_add(1, SeqCst) + 1;
        let _in_flight = InFlight(&self.now);
        self.max.fetch_max(n, SeqCst);
        if let Ok(pass) = self.passes.acquire().await {
            pass.forget();
        }
        Ok(())
    }
}

impl Gated {
    /// A coordinator on `dir` calling these participants, with `max_rounds` round slots.
    async fn coordinator(&self, dir: &std::path::Path, max_rounds: usize) -> tcc_core::Coordinator {
        tcc_core::Coordinator::open(
            std::sync::Arc::new(common::open_store(dir).await),
            std::sync::Arc::new(self.clone()),
            std::sync::Arc::new(tcc_core::SystemClock),
            // Calls wait at the gate as long as the test says: no call timeout cuts them short.
            tcc_core::Config {
                max_rounds,
                retry: tcc_core::RetryPolicy { call_timeout: Duration::from_secs(600), ..common::policy() },
                lease: Duration::from_secs(1_200),
                ..common::config()
            },
        )
        .await
        .unwrap()
    }

    /// Lets every call through, now and from now on.
    fn release(&self) {
        self.passes.close();
    }

    /// Lets one call through, now or when it comes.
    fn let_one_through(&self) {
        self.passes.add_permits(1);
    }

    /// Waits (in real time, boundedly) until exactly `n` calls are in flight.
    async fn until_in_flight(&self, n: usize) {
        for _ in 0..2_000 {
            if self.now.load(std::sync::atomic::Ordering::SeqCst) == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("never {n} calls in flight (now {})", self.now.load(std::sync::atomic::Ordering::SeqCst));
    }
}

impl Default for Gated {
    fn default() -> Gated {
        Gated {
            passes: std::sync::Arc::new(tokio::sync::Semaphore::new(0)),
            now: Default::default(),
            max: Default::default(),
            total: Default::default(),
        }
    }
}

/// Begins `n` one-branch transactions and confirms each.
async fn confirm_n(tc: &tcc_core::Coordinator, n: usize) -> Vec<Gid> {
    let mut gids = Vec::new();
    for _ in 0..n {
        let tx = tc.begin_registered(None, MIN, Default::default(), planned(&["flight"])).await.unwrap();
        tc.confirm(&tx.gid).await.unwrap();
        gids.push(tx.gid);
    }
    gids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_than_max_rounds_run_at_once() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let gated = Gated::default();
    let tc = gated.coordinator(dir.path(), 3).await;
    let gids = confirm_n(&tc, 10).await;
    // One call finishes at a time; each time, the slot it frees goes to exactly one waiting round.
    // (Without the cap all ten would be in flight and "3" would never be seen again: the wait fails.)
    for left in (1..=10).rev() {
        gated.until_in_flight(left.min(3)).await;
        gated.let_one_through();
    }
    for gid in &gids {
        assert_eq!(tc.wait(gid, MIN).await.unwrap().state, TxState::Confirmed);
    }
    assert_eq!(gated.max.load(SeqCst), 3, "rounds in flight at most");
    assert_eq!(gated.total.load(SeqCst), 10);
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_still_expire_while_every_round_slot_is_taken() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let gated = Gated::default();
    let tc = gated.coordinator(dir.path(), 2).await;
    // Two rounds hang in the participant, three more wait for a slot.
    let decided = confirm_n(&tc, 5).await;
    let late = tc
        .begin_registered(None, Duration::from_millis(200), Default::default(), planned(&["hotel"]))
        .await
        .unwrap();
    let mut expired = false;
    for _ in 0..500 {
        if tc.get(&late.gid).await.unwrap().decision == Some(Decision::Cancel) {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(expired, "the deadline sweep was starved by busy round slots");
    assert_eq!(gated.max.load(SeqCst), 2);
    gated.release();
    for gid in &decided {
        assert_eq!(tc.wait(gid, MIN).await.unwrap().state, TxState::Confirmed);
    }
    assert_eq!(tc.wait(&late.gid, MIN).await.unwrap().state, TxState::Cancelled);
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_leaves_rounds_waiting_for_a_slot_to_the_next_start() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let gated = Gated::default();
    let tc = std::sync::Arc::new(gated.coordinator(dir.path(), 1).await);
    let gids = confirm_n(&tc, 3).await;
    gated.until_in_flight(1).await;
    // One round is in the participant, two wait for the slot. Stopping lets the first finish and
    // does not start the others.
    let stopper = tc.clone();
    let stopping = tokio::spawn(async move { stopper.stop().await });
    while !tc.is_stopping() {
        tokio::task::yield_now().await;
    }
    drop(tc);
    gated.release();
    stopping.await.unwrap();
    assert_eq!(gated.total.load(SeqCst), 1, "no waiting round started after stop");
    // The next start resumes them.
    let tc = gated.coordinator(dir.path(), 1).await;
    for gid in &gids {
        assert_eq!(tc.wait(gid, MIN).await.unwrap().state, TxState::Confirmed);
    }
    assert_eq!(gated.total.load(SeqCst), 3);
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_records_its_results_on_the_stored_record_when_it_changed_during_the_round() {
    // The round records its results starting from its own copy of the transaction, to save a read;
    // a change stored meanwhile must make it read the record and keep that change.
    let dir = tempfile::tempdir().unwrap();
    let gated = Gated::default();
    let store = std::sync::Arc::new(common::open_store(dir.path()).await);
    let tc = open_on(store.clone(), std::sync::Arc::new(gated.clone())).await;
    let gid = confirm_n(&tc, 1).await.remove(0);
    let mut waited = 0;
    while gated.now.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(waited < 5_000, "the round never called the participant");
        tokio::time::sleep(Duration::from_millis(1)).await;
        waited += 1;
    }
    use tcc_core::Store as _;
    let during = store.get(&gid).await.unwrap().unwrap();
    let mut changed = during.clone();
    changed.options.retry_interval_ms = Some(4_321);
    changed.version = during.version + 1;
    assert_eq!(store.compare_and_set(during.version, &changed).await.unwrap(), tcc_core::store::Cas::Stored);
    gated.release();
    let done = tc.wait(&gid, MIN).await.unwrap();
    assert_eq!(done.state, TxState::Confirmed);
    assert_eq!(done.options.retry_interval_ms, Some(4_321), "the change made during the round was kept");
    assert_eq!(done.version, changed.version + 1);
    assert_eq!(store.get(&gid).await.unwrap(), Some(done));
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_and_a_decision_judged_on_the_callers_current_copy_read_no_record() {
    use tcc_core::Store as _;
    let dir = tempfile::tempdir().unwrap();
    let store = Unflushed::open(dir.path()).await;
    let mem = common::Mem::default();
    let tc = open_on(store.clone(), std::sync::Arc::new(mem.clone())).await;
    let begun = tc.begin_registered(None, MIN, Default::default(), planned(&["flight"])).await.unwrap();
    let before = store.reads();
    let hotel = "hotel".parse().unwrap();
    let tx = tc
        .register_with(&begun.gid, Some(&begun), hotel, "mem://hotel".into(), b"h".to_vec(), true)
        .await
        .unwrap();
    assert_eq!(tx.branches.len(), 2);
    let decided = tc.decide_and_wait(&tx.gid, Some(&tx), Decision::Confirm, Duration::ZERO).await.unwrap();
    assert_eq!(
        store.reads(),
        before,
        "the copies were current: neither the registration nor the decision read"
    );
    assert_eq!(decided.decision, Some(Decision::Confirm));
    assert_eq!(decided.version, begun.version + 2);
    // Waiting for another one: woken by phase two's own write.
    let other = tc.begin_registered(None, MIN, Default::default(), planned(&["flight"])).await.unwrap();
    let done = tc.decide_and_wait(&other.gid, Some(&other), Decision::Cancel, MIN).await.unwrap();
    assert_eq!(done.state, TxState::Cancelled);
    assert_eq!(store.get(&other.gid).await.unwrap(), Some(done));
    let first = tc.wait(&tx.gid, MIN).await.unwrap();
    assert_eq!(first.state, TxState::Confirmed);
    for b in ["flight", "hotel"] {
        assert_eq!(mem.effects(&tx.gid, b).confirms, 1);
    }
    assert_eq!(mem.effects(&other.gid, "flight").cancels, 1);
    tc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_on_a_stale_copy_is_judged_on_the_stored_record() {
    let rig = Rig::new().await;
    let tx = rig.tc().begin_registered(None, MIN, Default::default(), planned(&["flight"])).await.unwrap();
    // A branch registered after the copy was taken: the confirm must reach it too.
    rig.tc()
        .register(&tx.gid, "hotel".parse().unwrap(), "mem://hotel".into(), b"hotel".to_vec())
        .await
        .unwrap();
    let decided = rig.tc().decide_and_wait(&tx.gid, Some(&tx), Decision::Confirm, MIN).await.unwrap();
    assert_eq!(decided.state, TxState::Confirmed, "woken by phase two, the clock never moved");
    assert_eq!(decided.branches.len(), 2);
    assert!(all_branches(&decided, BranchState::Confirmed));
    assert_eq!(rig.mem.effects(&tx.gid, "hotel").confirms, 1);
    // A copy from before a cancel: confirming on it is refused, and nothing changes.
    let cancelled = rig.tc().begin_registered(None, MIN, Default::default(), planned(&["a"])).await.unwrap();
    rig.tc().cancel(&cancelled.gid).await.unwrap();
    let err = rig
        .tc()
        .decide_and_wait(&cancelled.gid, Some(&cancelled), Decision::Confirm, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::IllegalTransition { .. }), "{err}");
    let end = rig.settle(&cancelled.gid).await;
    assert_eq!(end.state, TxState::Cancelled);
    assert_eq!(rig.mem.effects(&cancelled.gid, "a").confirms, 0);
    // A copy of another transaction is ignored: the decision is judged on this one's record, and
    // the other is left alone.
    let third = rig.tc().begin_registered(None, MIN, Default::default(), planned(&["b"])).await.unwrap();
    let other = rig.tc().begin_registered(None, MIN, Default::default(), planned(&["b"])).await.unwrap();
    let decided =
        rig.tc().decide_and_wait(&other.gid, Some(&third), Decision::Cancel, Duration::ZERO).await.unwrap();
    assert_eq!((&decided.gid, decided.decision), (&other.gid, Some(Decision::Cancel)));
    assert_eq!(rig.tc().get(&third.gid).await.unwrap(), third, "the other transaction is untouched");
    assert_eq!(rig.settle(&other.gid).await.state, TxState::Cancelled);
    // Asking again on the stale copy is answered as asking again is.
    let again =
        rig.tc().decide_and_wait(&tx.gid, Some(&tx), Decision::Confirm, Duration::ZERO).await.unwrap();
    assert_eq!(again.state, TxState::Confirmed);
    assert_eq!(rig.mem.effects(&tx.gid, "flight").confirms, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_transactions_are_deleted_once_their_retention_has_passed_and_no_others() {
    const HOUR: Duration = Duration::from_secs(3600);
    let mut rig = Rig::new().await;
    rig.crash().await;
    rig.open_with(tcc_core::Config { retain_finished: Some(HOUR), ..common::config() }).await;
    let confirmed = rig.begin_with(&["flight"], MIN).await;
    rig.tc().confirm(&confirmed).await.unwrap();
    let cancelled = rig.begin_with(&["flight"], MIN).await;
    rig.tc().cancel(&cancelled).await.unwrap();
    rig.mem.set_fault("mem://hotel", Fault::Down);
    let flagged = rig.begin_with(&["hotel"], MIN).await;
    rig.tc().confirm(&flagged).await.unwrap();
    for gid in [&confirmed, &cancelled, &flagged] {
        rig.settle(gid).await;
    }
    assert_eq!(rig.tc().get(&flagged).await.unwrap().state, TxState::Flagged);
    let trying = rig.begin_with(&["flight"], 10 * HOUR).await;
    // Half the retention later (the pruner has run a pass by then): all still there.
    let quarter = HOUR / 4;
    for _ in 0..2 {
        rig.clock.advance(quarter);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for gid in [&confirmed, &cancelled, &flagged, &trying] {
        rig.tc().get(gid).await.unwrap();
    }
    assert_eq!(rig.tc().stats().pruned, 0);
    // Past the retention: the finished ones go at the pruner's next pass.
    let (c, x) = (confirmed.clone(), cancelled.clone());
    let gone = rig
        .run_until(quarter, 40, async move |tc: &tcc_core::Coordinator| {
            matches!(tc.get(&c).await, Err(Error::NotFound(_)))
                && matches!(tc.get(&x).await, Err(Error::NotFound(_)))
        })
        .await;
    assert!(gone, "the finished transactions were never deleted");
    assert_eq!(rig.tc().stats().pruned, 2);
    assert_eq!(
        rig.tc().get(&flagged).await.unwrap().state,
        TxState::Flagged,
        "flagged: kept for the operator"
    );
    assert_eq!(rig.tc().get(&trying).await.unwrap().state, TxState::Trying);
    // An explicit pass with no retention at all still keeps what is not finished.
    assert_eq!(rig.tc().prune_finished(Duration::ZERO).await.unwrap(), 0);
    assert_eq!(rig.tc().count(TxState::Flagged).await.unwrap(), 1);
    // A zero retention is refused.
    rig.crash().await;
    let refused = tcc_core::Coordinator::open(
        std::sync::Arc::new(common::open_store(rig.dir.path()).await),
        std::sync::Arc::new(rig.mem.clone()),
        std::sync::Arc::new(rig.clock.clone()),
        tcc_core::Config { retain_finished: Some(Duration::ZERO), ..common::config() },
    )
    .await;
    assert!(matches!(refused, Err(Error::InvalidInput(_))), "{refused:?}");
}

// ---------------------------------------------------------------------------------------------
// Sagas and two-phase messages

mod steps {
    use std::time::Duration;

    use tcc_core::transport::LocalOutcome;
    use tcc_core::{BranchState, Decision, Gid, NewBranch, NewStep, TxState};

    use super::MIN;
    use crate::common::{Fault, Rig};

    fn step(name: &str, after: &[u32]) -> NewStep {
        NewStep {
            id: name.parse().unwrap(),
            action: format!("mem://{name}"),
            compensate: format!("mem://{name}/undo"),
            payload: name.as_bytes().to_vec(),
            after: after.to_vec(),
        }
    }

    async fn saga(rig: &Rig, steps: Vec<NewStep>, concurrent: bool, timeout: Duration) -> Gid {
        rig.tc().begin_saga(None, timeout, Default::default(), steps, concurrent).await.unwrap().gid
    }

    async fn message(rig: &Rig, names: &[&str], timeout: Duration) -> Gid {
        let steps = names
            .iter()
            .map(|n| NewBranch { id: n.parse().unwrap(), target: format!("mem://{n}"), payload: Vec::new() })
            .collect();
        let tx = rig.tc().prepare_message(None, timeout, Default::default(), steps, "mem://check".into());
        tx.await.unwrap().gid
    }

    fn calls(rig: &Rig, gid: &Gid) -> Vec<(String, Decision)> {
        rig.mem.calls_of(gid)
    }

    fn act(b: &str) -> (String, Decision) {
        (b.to_owned(), Decision::Confirm)
    }

    fn undo(b: &str) -> (String, Decision) {
        (b.to_owned(), Decision::Cancel)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_saga_runs_its_actions_one_at_a_time_in_order() {
        let rig = Rig::new().await;
        let gid = saga(&rig, vec![step("a", &[]), step("b", &[]), step("c", &[])], false, MIN).await;
        let tx = rig.settle(&gid).await;
        assert_eq!(tx.state, TxState::Confirmed);
        assert_eq!(calls(&rig, &gid), vec![act("a"), act("b"), act("c")]);
        assert!(tx.branches.iter().all(|b| b.state == BranchState::Confirmed));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_action_compensates_what_ran_in_reverse_order_and_later_steps_never_run() {
        let rig = Rig::new().await;
        rig.mem.set_fault("mem://c", Fault::Permanent);
        let steps = vec![step("a", &[]), step("b", &[]), step("c", &[]), step("d", &[])];
        let gid = saga(&rig, steps, false, MIN).await;
        let tx = rig.settle(&gid).await;
        assert_eq!(tx.state, TxState::Cancelled);
        assert_eq!(tx.decision, Some(Decision::Cancel));
        assert!(tx.last_error.as_deref().is_some_and(|e| e.contains("step c refused")), "{tx:?}");
        // c refused, but it may have done something before refusing: it is compensated too
        // (an empty compensation at a participant with a barrier), first; d never runs.
        assert_eq!(calls(&rig, &gid), vec![act("a"), act("b"), act("c"), undo("c"), undo("b"), undo("a")]);
        assert_eq!(tx.branches[3].state, BranchState::Registered, "d never ran");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn other_action_failures_are_retried_and_the_saga_goes_on() {
        let rig = Rig::new().await;
        rig.mem.set_fault("mem://b", Fault::FailTimes(2));
        let gid = saga(&rig, vec![step("a", &[]), step("b", &[])], false, MIN).await;
        let tx = rig.settle(&gid).await;
        assert_eq!(tx.state, TxState::Confirmed);
        assert_eq!(calls(&rig, &gid), vec![act("a"), act("b"), act("b"), act("b")]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_concurrent_saga_runs_steps_together_once_their_predecessors_are_done() {
        let rig = Rig::new().await;
        // c comes after a and b; a and b run together.
        let gid = saga(&rig, vec![step("a", &[]), step("b", &[]), step("c", &[0, 1])], true, MIN).await;
        let tx = rig.settle(&gid).await;
        assert_eq!(tx.state, TxState::Confirmed);
        let seen = calls(&rig, &gid);
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[2], act("c"), "c runs last: {seen:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_concurrent_saga_compensates_in_reverse_dependency_order() {
        let rig = Rig::new().await;
        rig.mem.set_fault("mem://c", Fault::Permanent);
        // b after a, c after b.
        let gid = saga(&rig, vec![step("a", &[]), step("b", &[0]), step("c", &[1])], true, MIN).await;
        let tx = rig.settle(&gid).await;
        assert_eq!(tx.state, TxState::Cancelled);
        assert_eq!(calls(&rig, &gid), vec![act("a"), act("b"), act("c"), undo("c"), undo("b"), undo("a")]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cyclic_or_dangling_order_is_refused_and_nothing_is_stored() {
        let rig = Rig::new().await;
        for steps in [vec![step("a", &[1]), step("b", &[0])], vec![step("a", &[5])], vec![step("a", &[0])]] {
            let r = rig.tc().begin_saga(None, MIN, Default::default(), steps, true).await;
            assert!(matches!(r, Err(tcc_core::Error::InvalidInput(_))), "{r:?}");
        }
        let all = rig.tc().list(&Default::default()).await.unwrap();
        assert!(all.items.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_saga_still_running_at_its_deadline_compensates_what_may_have_run() {
        let rig = Rig::new().await;
        rig.mem.set_fault("mem://b", Fault::Down);
        let steps = vec![step("a", &[]), step("b", &[]), step("c", &[])];
        // The deadline comes before the retry policy is spent (it would flag the saga).
        let gid = saga(&rig, steps, false, Duration::from_secs(1)).await;
        let g = gid.clone();
        let mem = rig.mem.clone();
        let ok = rig
            .run_until(Duration::from_millis(200), 2_000, async move |tc: &tcc_core::Coordinator| {
                let t = tc.get(&g).await.unwrap();
                if t.decision == Some(Decision::Cancel) {
                    mem.heal_all();
                }
                t.state.is_final()
            })
            .await;
        assert!(ok);
        let tx = rig.tc().get(&gid).await.unwrap();
        assert_eq!(tx.state, TxState::Cancelled);
        let seen = calls(&rig, &gid);
        assert!(!seen.contains(&act("c")), "c never ran: {seen:?}");
        assert!(seen.ends_with(&[undo("b"), undo("a")]), "{seen:?}");
        assert!(tx.last_error.as_deref().is_some_and(|e| e.contains("deadline")), "{tx:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_saga_crashed_mid_compensation_finishes_compensating_after_a_restart() {
        let mut rig = Rig::new().await;
        rig.mem.set_fault("mem://b", Fault::Permanent);
        rig.mem.set_fault("mem://a/undo", Fault::Down);
        let gid = saga(&rig, vec![step("a", &[]), step("b", &[])], false, MIN).await;
        let g = gid.clone();
        let mem = rig.mem.clone();
        assert!(
            rig.run_until(Duration::from_millis(50), 2_000, async move |_: &tcc_core::Coordinator| {
                mem.calls_of(&g).contains(&undo("b"))
            })
            .await
        );
        rig.restart().await;
        rig.mem.heal_all();
        let tx = rig.settle(&gid).await;
        assert_eq!(tx.state, TxState::Cancelled);
        assert_eq!(rig.mem.effects(&gid, "a").cancels, 1, "a's compensation ran");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_compensation_that_keeps_failing_flags_the_saga_and_an_operator_retry_finishes_it() {
        let rig = Rig::new().await;
        rig.mem.set_fault("mem://b", Fault::Permanent);
        rig.mem.set_fault("mem://a/undo", Fault::Down);
        let gid = saga(&rig, vec![step("a", &[]), step("b", &[])], false, MIN).await;
        let tx = rig.settle(&gid).await;
        assert_eq!((tx.state, tx.decision), (TxState::Flagged, Some(Decision::Cancel)));
        assert!(tx.last_error.as_deref().is_some_and(|e| e.contains("connection refused")), "{tx:?}");
        // Still owed: an operator heals the service and retries.
        rig.mem.heal_all();
        rig.tc().retry(&gid).await.unwrap();
        let tx = rig.settle(&gid).await;
        assert_eq!(tx.state, TxState::Cancelled);
        assert_eq!(rig.mem.effects(&gid, "a").cancels, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_for_a_saga_returns_its_outcome() {
        let rig = Rig::new().await;
        let gid = saga(&rig, vec![step("a", &[])], false, MIN).await;
        let tx = rig.settle(&gid).await;
        assert_eq!(tx.state, TxState::Confirmed);
        let waited = rig.tc().wait(&gid, Duration::from_secs(1)).await.unwrap();
        assert_eq!(waited.state, TxState::Confirmed);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_aborted_message_never_calls_an_action() {
        let rig = Rig::new().await;
        let gid = message(&rig, &["mail", "points"], MIN).await;
        let tx = rig.tc().cancel(&gid).await.unwrap();
        assert_eq!(tx.state, TxState::Cancelled);
        // Time passes: nothing is called, not even the back-check.
        rig.run_until(Duration::from_secs(10), 20, async |_: &tcc_core::Coordinator| false).await;
        assert!(calls(&rig, &gid).is_empty());
        assert_eq!(rig.mem.back_checks(), 0);
        assert!(rig.tc().confirm(&gid).await.is_err(), "a submit after the abort is refused");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_submitted_message_runs_every_action_in_order_until_it_succeeds() {
        let rig = Rig::new().await;
        rig.mem.set_fault("mem://mail", Fault::FailTimes(3));
        let gid = message(&rig, &["mail", "points"], MIN).await;
        rig.tc().confirm(&gid).await.unwrap();
        let tx = rig.settle(&gid).await;
        assert_eq!(tx.state, TxState::Confirmed);
        assert_eq!(
            calls(&rig, &gid),
            vec![act("mail"), act("mail"), act("mail"), act("mail"), act("points")]
        );
        assert_eq!(rig.mem.back_checks(), 0, "submitted before its deadline: never asked");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prepared_message_is_resolved_by_its_back_check_across_a_restart() {
        let mut rig = Rig::new().await;
        let committed = message(&rig, &["mail"], Duration::from_secs(5)).await;
        let rolled_back = message(&rig, &["mail"], Duration::from_secs(5)).await;
        rig.restart().await;
        rig.mem.set_local(&committed, LocalOutcome::Committed);
        rig.mem.set_local(&rolled_back, LocalOutcome::RolledBack);
        let a = rig.settle(&committed).await;
        let b = rig.settle(&rolled_back).await;
        assert_eq!(a.state, TxState::Confirmed);
        assert_eq!(calls(&rig, &committed), vec![act("mail")]);
        assert_eq!(b.state, TxState::Cancelled);
        assert!(calls(&rig, &rolled_back).is_empty(), "a rolled-back message never calls an action");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unknown_back_check_asks_again_then_flags_and_an_operator_retry_resolves_it() {
        let rig = Rig::new().await;
        let gid = message(&rig, &["mail"], Duration::from_secs(5)).await;
        let tx = rig.settle(&gid).await;
        assert_eq!((tx.state, tx.decision), (TxState::Flagged, None));
        assert!(rig.mem.back_checks() > 1, "asked again before giving up");
        assert!(tx.last_error.as_deref().is_some_and(|e| e.contains("back-check")), "{tx:?}");
        assert!(calls(&rig, &gid).is_empty());
        rig.mem.set_local(&gid, LocalOutcome::Committed);
        rig.tc().retry(&gid).await.unwrap();
        let tx = rig.settle(&gid).await;
        assert_eq!(tx.state, TxState::Confirmed);
        assert_eq!(calls(&rig, &gid), vec![act("mail")]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_may_be_submitted_after_its_deadline_but_steps_are_fixed() {
        let rig = Rig::new().await;
        let gid = message(&rig, &["mail"], Duration::from_secs(1)).await;
        rig.clock.advance(Duration::from_secs(2));
        let r = rig.tc().register(&gid, "other".parse().unwrap(), "mem://x".into(), Vec::new()).await;
        assert!(matches!(r, Err(tcc_core::Error::IllegalTransition { .. })), "{r:?}");
        rig.tc().confirm(&gid).await.unwrap();
        assert_eq!(rig.settle(&gid).await.state, TxState::Confirmed);
    }
}
