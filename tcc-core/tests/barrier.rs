//! The participant barrier's guarantees (DESIGN.md guarantees 5 and 6), checked against a real sled
//! database. Business methods count their own runs in the business tree, inside the barrier's
//! transaction, so a count is exactly the number of committed runs (a run sled retried is not counted).

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use sled::transaction::{ConflictableTransactionResult, TransactionalTree, abort};
use tcc_core::barrier::{
    BARRIER_TREE, BarrierError, BarrierState, BusinessTx, CancelOutcome, ConfirmOutcome, Durability,
    EXPIRY_TREE, Refusal, SledBarrier, TryOutcome,
};
use tcc_core::{BranchId, Clock, DurableDb, Gid, ManualClock, Timestamp};

type TestResult = Result<(), Box<dyn Error>>;
type Biz<T> = ConflictableTransactionResult<T, String>;

const START: Timestamp = Timestamp(1_700_000_000_000);
const TTL: Duration = Duration::from_secs(10);
const GRACE: Duration = Duration::from_secs(5);

struct Fixture {
    db: DurableDb,
    biz: sled::Tree,
    clock: ManualClock,
    barrier: SledBarrier,
}

impl Fixture {
    fn new() -> Fixture {
        let db = DurableDb::temporary().expect("temporary sled db");
        Fixture::on(db)
    }

    fn on(db: DurableDb) -> Fixture {
        let biz = db.open_tree("seats").expect("business tree");
        let clock = ManualClock::new(START);
        let barrier =
            SledBarrier::open(&db, vec![biz.clone()], Arc::new(clock.clone()), GRACE).expect("barrier");
        Fixture { db, biz, clock, barrier }
    }

    fn deadline(&self) -> Timestamp {
        self.clock.now() + TTL
    }

    /// How many times business method `name` committed.
    fn runs(&self, name: &str) -> u64 {
        read_count(self.biz.get(format!("runs/{name}")).expect("read counter").as_deref())
    }

    fn holds(&self, gid: &Gid, branch: &BranchId) -> Option<Vec<u8>> {
        self.biz.get(format!("held/{gid}/{branch}")).expect("read hold").map(|v| v.to_vec())
    }

    fn sold(&self, gid: &Gid, branch: &BranchId) -> bool {
        self.biz.get(format!("sold/{gid}/{branch}")).expect("read sale").is_some()
    }

    fn state(&self, gid: &Gid, branch: &BranchId) -> Option<BarrierState> {
        self.barrier.get(gid, branch).expect("readable record").map(|r| r.state)
    }

    fn business_snapshot(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.biz.iter().map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).expect("scan")).collect()
    }
}

fn read_count(bytes: Option<&[u8]>) -> u64 {
    bytes.and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0)
}

fn bump(tree: &TransactionalTree, name: &str) -> Biz<()> {
    let key = format!("runs/{name}");
    let n = read_count(tree.get(&key)?.as_deref());
    tree.insert(key.as_bytes(), &(n + 1).to_be_bytes())?;
    Ok(())
}

fn branch(name: &str) -> BranchId {
    name.parse().expect("valid branch id")
}

/// Business try: hold the seat named in the request; reply "held <request>".
fn hold(tx: &BusinessTx<'_>) -> Biz<Vec<u8>> {
    bump(tx.tree(0), "try")?;
    tx.tree(0).insert(format!("held/{}/{}", tx.gid(), tx.branch()).as_bytes(), tx.request())?;
    Ok([&b"held "[..], tx.request()].concat())
}

/// Business confirm: turn the hold into a sale.
fn sell(tx: &BusinessTx<'_>) -> Biz<()> {
    bump(tx.tree(0), "confirm")?;
    tx.tree(0).remove(format!("held/{}/{}", tx.gid(), tx.branch()).as_bytes())?;
    tx.tree(0).insert(format!("sold/{}/{}", tx.gid(), tx.branch()).as_bytes(), tx.request())?;
    Ok(())
}

/// Business cancel (also used by expiry): drop the hold.
fn release(tx: &BusinessTx<'_>) -> Biz<()> {
    bump(tx.tree(0), "cancel")?;
    tx.tree(0).remove(format!("held/{}/{}", tx.gid(), tx.branch()).as_bytes())?;
    Ok(())
}

fn refusal<T: std::fmt::Debug>(r: Result<T, BarrierError<String>>) -> Refusal {
    match r {
        Err(BarrierError::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn duplicate_confirm_runs_business_confirm_once() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    assert_eq!(fx.barrier.confirm(&gid, &b, sell)?, ConfirmOutcome::Confirmed);
    for _ in 0..3 {
        assert_eq!(fx.barrier.confirm(&gid, &b, sell)?, ConfirmOutcome::Duplicate);
    }
    assert_eq!(fx.runs("confirm"), 1);
    assert!(fx.sold(&gid, &b));
    assert_eq!(fx.state(&gid, &b), Some(BarrierState::Confirmed));
    Ok(())
}

#[test]
fn duplicate_cancel_runs_business_cancel_once() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    assert_eq!(fx.barrier.cancel(&gid, &b, release)?, CancelOutcome::Cancelled);
    for _ in 0..3 {
        assert_eq!(fx.barrier.cancel(&gid, &b, release)?, CancelOutcome::Duplicate);
    }
    assert_eq!(fx.runs("cancel"), 1);
    assert_eq!(fx.holds(&gid, &b), None);
    assert_eq!(fx.state(&gid, &b), Some(BarrierState::Cancelled));
    Ok(())
}

#[test]
fn cancel_before_try_succeeds_without_business_cancel_and_refuses_the_late_try() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));

    // Empty cancel: success, recorded, business cancel not run.
    assert_eq!(fx.barrier.cancel(&gid, &b, release)?, CancelOutcome::Empty);
    assert_eq!(fx.runs("cancel"), 0);
    assert_eq!(fx.state(&gid, &b), Some(BarrierState::CancelledEmpty));
    // Its duplicate is a plain duplicate.
    assert_eq!(fx.barrier.cancel(&gid, &b, release)?, CancelOutcome::Duplicate);

    // Suspension: the try that arrives after its cancel is refused and never runs.
    let late = fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold);
    assert_eq!(refusal(late), Refusal::Suspended);
    assert_eq!(fx.runs("try"), 0);
    assert_eq!(fx.holds(&gid, &b), None);
    assert_eq!(fx.barrier.held(), 0);
    // Nor can it be confirmed.
    assert_eq!(refusal(fx.barrier.confirm(&gid, &b, sell)), Refusal::AlreadyCancelled);
    Ok(())
}

#[test]
fn try_after_deadline_is_refused_without_running() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    let deadline = fx.deadline();
    fx.clock.advance(TTL);
    let late = fx.barrier.try_op(&gid, &b, deadline, b"12A", hold);
    assert_eq!(refusal(late), Refusal::DeadlinePassed { deadline });
    assert_eq!(fx.runs("try"), 0);
    assert_eq!(fx.barrier.get(&gid, &b)?, None, "a refusal stores nothing");
    // A cancel for it is then an empty cancel.
    assert_eq!(fx.barrier.cancel(&gid, &b, release)?, CancelOutcome::Empty);
    Ok(())
}

#[test]
fn duplicate_try_returns_the_first_result_without_rerunning() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    let first = fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    assert_eq!(first, TryOutcome::Fresh(b"held 12A".to_vec()));
    // Even a retransmission with different bytes gets the first answer: the branch id names the try.
    let again = fx.barrier.try_op(&gid, &b, fx.deadline(), b"99Z", hold)?;
    assert_eq!(again, TryOutcome::Duplicate(b"held 12A".to_vec()));
    assert!(!again.is_fresh());
    assert_eq!(fx.runs("try"), 1);
    assert_eq!(fx.holds(&gid, &b), Some(b"12A".to_vec()));
    // After confirm, a late duplicate try still gets the stored answer and runs nothing.
    fx.barrier.confirm(&gid, &b, sell)?;
    assert_eq!(fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?.result(), b"held 12A");
    assert_eq!(fx.runs("try"), 1);
    Ok(())
}

#[test]
fn confirm_without_try_is_refused_and_stores_nothing() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    assert_eq!(refusal(fx.barrier.confirm(&gid, &b, sell)), Refusal::NotTried);
    assert_eq!(fx.runs("confirm"), 0);
    assert_eq!(fx.barrier.get(&gid, &b)?, None);
    Ok(())
}

#[test]
fn confirm_after_cancel_is_refused_and_changes_nothing() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    fx.barrier.cancel(&gid, &b, release)?;
    let record = fx.barrier.get(&gid, &b)?;
    let business = fx.business_snapshot();

    fx.clock.advance(Duration::from_millis(1));
    assert_eq!(refusal(fx.barrier.confirm(&gid, &b, sell)), Refusal::AlreadyCancelled);
    assert_eq!(fx.barrier.get(&gid, &b)?, record);
    assert_eq!(fx.business_snapshot(), business);
    assert_eq!(fx.runs("confirm"), 0);
    Ok(())
}

#[test]
fn cancel_after_confirm_is_refused_and_changes_nothing() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    fx.barrier.confirm(&gid, &b, sell)?;
    let record = fx.barrier.get(&gid, &b)?;
    let business = fx.business_snapshot();

    fx.clock.advance(Duration::from_millis(1));
    assert_eq!(refusal(fx.barrier.cancel(&gid, &b, release)), Refusal::AlreadyConfirmed);
    assert_eq!(fx.barrier.get(&gid, &b)?, record);
    assert_eq!(fx.business_snapshot(), business);
    assert_eq!(fx.runs("cancel"), 0);
    Ok(())
}

#[test]
fn aborted_business_try_leaves_no_barrier_record_and_no_business_writes() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    let sold_out = |tx: &BusinessTx<'_>| -> Biz<Vec<u8>> {
        // Writes first, then gives up: the writes must vanish with the abort.
        hold(tx)?;
        abort("sold out".to_string())
    };
    match fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", sold_out) {
        Err(BarrierError::Business(e)) => assert_eq!(e, "sold out"),
        other => panic!("expected the business error, got {other:?}"),
    }
    assert_eq!(fx.barrier.get(&gid, &b)?, None);
    assert!(fx.business_snapshot().is_empty(), "no business write survives the abort");
    assert_eq!(fx.barrier.held(), 0);

    // The anomalies still hold afterwards: the cancel is empty and a late try is refused.
    assert_eq!(fx.barrier.cancel(&gid, &b, release)?, CancelOutcome::Empty);
    assert_eq!(refusal(fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)), Refusal::Suspended);
    assert_eq!(fx.runs("try") + fx.runs("cancel"), 0);
    Ok(())
}

#[test]
fn aborted_try_can_be_tried_again() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    let flaky = |_: &BusinessTx<'_>| -> Biz<Vec<u8>> { abort("database busy".to_string()) };
    assert!(matches!(
        fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", flaky),
        Err(BarrierError::Business(_))
    ));
    assert!(fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?.is_fresh());
    assert_eq!(fx.runs("try"), 1);
    Ok(())
}

#[test]
fn aborted_business_cancel_keeps_the_reservation_for_a_retry() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    let failing = |tx: &BusinessTx<'_>| -> Biz<()> {
        release(tx)?;
        abort("downstream unavailable".to_string())
    };
    assert!(matches!(fx.barrier.cancel(&gid, &b, failing), Err(BarrierError::Business(_))));
    assert_eq!(fx.state(&gid, &b), Some(BarrierState::Tried));
    assert_eq!(fx.holds(&gid, &b), Some(b"12A".to_vec()));
    assert_eq!(fx.barrier.cancel(&gid, &b, release)?, CancelOutcome::Cancelled);
    assert_eq!(fx.runs("cancel"), 1);
    Ok(())
}

#[test]
fn barrier_record_and_business_write_commit_together() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    // Both visible together.
    assert_eq!(fx.state(&gid, &b), Some(BarrierState::Tried));
    assert_eq!(fx.holds(&gid, &b), Some(b"12A".to_vec()));
    let record = fx.barrier.get(&gid, &b)?.ok_or("record")?;
    assert_eq!((record.request.as_slice(), record.result.as_slice()), (&b"12A"[..], &b"held 12A"[..]));
    assert_eq!(record.deadline, fx.deadline());

    // A confirm whose business aborts leaves neither the sale nor the Confirmed record.
    let half_sale = |tx: &BusinessTx<'_>| -> Biz<()> {
        sell(tx)?;
        abort("payment declined".to_string())
    };
    assert!(fx.barrier.confirm(&gid, &b, half_sale).is_err());
    assert_eq!(fx.state(&gid, &b), Some(BarrierState::Tried));
    assert!(!fx.sold(&gid, &b));
    assert_eq!(fx.holds(&gid, &b), Some(b"12A".to_vec()));

    // The real confirm moves both.
    fx.barrier.confirm(&gid, &b, sell)?;
    assert_eq!(fx.state(&gid, &b), Some(BarrierState::Confirmed));
    assert!(fx.sold(&gid, &b));
    assert_eq!(fx.holds(&gid, &b), None);
    Ok(())
}

#[test]
fn the_barrier_reports_its_grace_and_business_trees() -> TestResult {
    let fx = Fixture::new();
    assert_eq!(fx.barrier.grace(), GRACE);
    let names: Vec<Vec<u8>> = fx.barrier.business_trees().iter().map(|t| t.name().to_vec()).collect();
    assert_eq!(names, [b"seats".to_vec()]);
    Ok(())
}

#[test]
fn business_methods_see_every_business_tree_in_order() -> TestResult {
    let db = DurableDb::temporary()?;
    let (seats, meals) = (db.open_tree("seats")?, db.open_tree("meals")?);
    let clock = ManualClock::new(START);
    let barrier = SledBarrier::open(&db, vec![seats.clone(), meals.clone()], Arc::new(clock.clone()), GRACE)?;
    let (gid, b) = (Gid::generate(), branch("flight"));
    let deadline = clock.now() + TTL;
    barrier.try_op(&gid, &b, deadline, b"12A", |tx| -> Biz<Vec<u8>> {
        let trees = tx.trees();
        if trees.len() != 2 {
            return abort(format!("{} business trees", trees.len()));
        }
        trees[0].insert("12A", "held")?;
        trees[1].insert("12A", "vegetarian")?;
        Ok(Vec::new())
    })?;
    assert_eq!(seats.get("12A")?.as_deref(), Some(&b"held"[..]));
    assert_eq!(meals.get("12A")?.as_deref(), Some(&b"vegetarian"[..]));
    Ok(())
}

#[test]
fn only_tried_is_not_final() {
    use BarrierState::*;
    let finals: Vec<bool> =
        [Tried, Confirmed, Cancelled, CancelledEmpty, Expired].map(|s| s.is_final()).into();
    assert_eq!(finals, [false, true, true, true, true]);
}

#[test]
fn errors_name_their_refusal_and_only_refusals_do() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    let refused = fx.barrier.confirm(&gid, &b, sell).expect_err("no try ran");
    assert_eq!(refused.refusal(), Some(Refusal::NotTried));
    assert_eq!(refused.code(), "not_tried");
    let failed = fx
        .barrier
        .try_op(&gid, &b, fx.deadline(), b"12A", |_| -> Biz<Vec<u8>> { abort("sold out".to_string()) })
        .expect_err("the business try aborts");
    assert_eq!(failed.refusal(), None);
    assert_eq!(failed.code(), "business");
    Ok(())
}

#[test]
fn business_methods_get_the_stored_try_request() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    let seen = std::sync::Mutex::new(Vec::new());
    fx.barrier.confirm(&gid, &b, |tx| {
        seen.lock()
            .map_err(|e| sled::transaction::ConflictableTransactionError::Abort(e.to_string()))?
            .push((tx.gid().clone(), tx.branch().clone(), tx.request().to_vec()));
        Ok(())
    })?;
    let seen = seen.into_inner()?;
    assert_eq!(seen.last(), Some(&(gid, b, b"12A".to_vec())));
    Ok(())
}

#[test]
fn expiry_releases_a_held_reservation_after_deadline_plus_grace_and_not_before() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    assert_eq!(fx.barrier.held(), 1);

    // At the deadline, and up to the last millisecond of grace, the reservation stays.
    fx.clock.advance(TTL);
    assert_eq!(fx.barrier.expire_due(release)?, 0);
    fx.clock.advance(GRACE - Duration::from_millis(1));
    assert_eq!(fx.barrier.expire_due(release)?, 0);
    assert_eq!(fx.state(&gid, &b), Some(BarrierState::Tried));
    assert_eq!(fx.runs("cancel"), 0);

    // At deadline + grace the participant releases it on its own, with the stored request.
    fx.clock.advance(Duration::from_millis(1));
    assert_eq!(fx.barrier.expire_due(release)?, 1);
    assert_eq!(fx.state(&gid, &b), Some(BarrierState::Expired));
    assert_eq!(fx.runs("cancel"), 1);
    assert_eq!(fx.holds(&gid, &b), None);
    assert_eq!(fx.barrier.held(), 0);
    assert_eq!(fx.barrier.expire_due(release)?, 0, "released once");

    // A confirm arriving now gets the distinct Expired error, for the coordinator to flag.
    let late = fx.barrier.confirm(&gid, &b, sell);
    assert_eq!(refusal(late), Refusal::Expired);
    assert_eq!(fx.runs("confirm"), 0);
    // A cancel is an idempotent success with no second business run.
    assert_eq!(fx.barrier.cancel(&gid, &b, release)?, CancelOutcome::AlreadyExpired);
    assert_eq!(fx.runs("cancel"), 1);
    // A repeated try is refused too: the reservation is gone.
    assert_eq!(refusal(fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)), Refusal::Expired);
    Ok(())
}

#[test]
fn expiry_leaves_confirmed_and_cancelled_branches_alone() -> TestResult {
    let fx = Fixture::new();
    let gid = Gid::generate();
    let (confirmed, cancelled, held) = (branch("a"), branch("b"), branch("c"));
    for b in [&confirmed, &cancelled, &held] {
        fx.barrier.try_op(&gid, b, fx.deadline(), b"x", hold)?;
    }
    fx.barrier.confirm(&gid, &confirmed, sell)?;
    fx.barrier.cancel(&gid, &cancelled, release)?;
    // Finished branches leave the expiry index at once: the sweep only ever reads what is held.
    assert_eq!(fx.barrier.held(), 1);
    fx.clock.advance(TTL + GRACE);
    assert_eq!(fx.barrier.expire_due(release)?, 1);
    assert_eq!(fx.state(&gid, &confirmed), Some(BarrierState::Confirmed));
    assert_eq!(fx.state(&gid, &cancelled), Some(BarrierState::Cancelled));
    assert_eq!(fx.state(&gid, &held), Some(BarrierState::Expired));
    assert_eq!(fx.runs("cancel"), 2);
    Ok(())
}

#[test]
fn confirm_that_beats_the_sweep_wins_over_expiry() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    fx.clock.advance(TTL + GRACE + Duration::from_secs(1));
    // Nothing has been released yet, so confirming still matches the global decision.
    assert_eq!(fx.barrier.confirm(&gid, &b, sell)?, ConfirmOutcome::Confirmed);
    assert_eq!(fx.barrier.expire_due(release)?, 0);
    assert_eq!(fx.runs("cancel"), 0);
    Ok(())
}

#[test]
fn expiry_retries_a_failed_business_cancel_on_the_next_sweep() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    let (other, ob) = (Gid::generate(), branch("hotel"));
    fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    fx.barrier.try_op(&other, &ob, fx.deadline(), b"room 7", hold)?;
    fx.clock.advance(TTL + GRACE);
    let picky = |tx: &BusinessTx<'_>| -> Biz<()> {
        if tx.branch().as_str() == "flight" {
            return abort("flight service down".to_string());
        }
        release(tx)
    };
    // One failure does not stop the others.
    assert_eq!(fx.barrier.expire_due(picky)?, 1);
    assert_eq!(fx.state(&gid, &b), Some(BarrierState::Tried));
    assert_eq!(fx.state(&other, &ob), Some(BarrierState::Expired));
    assert_eq!(fx.barrier.expire_due(release)?, 1);
    assert_eq!(fx.state(&gid, &b), Some(BarrierState::Expired));
    Ok(())
}

#[test]
fn expiry_releases_more_reservations_than_one_sweep_batch() -> TestResult {
    let fx = Fixture::new().with_deferred();
    let gid = Gid::generate();
    let n = 600;
    for i in 0..n {
        // Spread deadlines so the index holds many distinct instants.
        fx.barrier.try_op(
            &gid,
            &branch(&format!("b{i}")),
            fx.deadline() + Duration::from_millis(i),
            b"x",
            hold,
        )?;
    }
    fx.clock.advance(TTL + GRACE + Duration::from_millis(n));
    assert_eq!(fx.barrier.expire_due(release)?, n as usize);
    assert_eq!(fx.barrier.held(), 0);
    assert_eq!(fx.runs("cancel"), n);
    Ok(())
}

#[test]
fn a_sweep_ends_after_a_short_page_even_when_more_falls_due_meanwhile() -> TestResult {
    // Each release takes a full second on the participant's clock, making the next reservation
    // due. A sweep that went on paging after a short page would chase them all; this one releases
    // what was due when its page was read, and leaves the rest to the next sweep.
    let fx = Fixture::new().with_deferred();
    let gid = Gid::generate();
    for i in 0..3u64 {
        let deadline = fx.deadline() + Duration::from_secs(i);
        fx.barrier.try_op(&gid, &branch(&format!("b{i}")), deadline, b"x", hold)?;
    }
    fx.clock.advance(TTL + GRACE);
    let slow_release = |tx: &BusinessTx<'_>| {
        fx.clock.advance(Duration::from_secs(1));
        release(tx)
    };
    assert_eq!(fx.barrier.expire_due(slow_release)?, 1, "one page, read once");
    assert_eq!(fx.barrier.held(), 2);
    assert_eq!(fx.state(&gid, &branch("b1")), Some(BarrierState::Tried));
    Ok(())
}

#[test]
fn due_lists_only_what_is_due_earliest_first_a_page_at_a_time() -> TestResult {
    let fx = Fixture::new();
    let gid = Gid::generate();
    // Tried in reverse deadline order: the listing still comes earliest first.
    for (i, name) in ["c", "b", "a"].iter().enumerate() {
        let deadline = fx.deadline() + Duration::from_millis(10 * (2 - i as u64));
        fx.barrier.try_op(&gid, &branch(name), deadline, b"x", hold)?;
    }
    let late = branch("late");
    fx.barrier.try_op(&gid, &late, fx.deadline() + Duration::from_secs(60), b"x", hold)?;
    let confirmed = branch("confirmed");
    fx.barrier.try_op(&gid, &confirmed, fx.deadline(), b"x", hold)?;
    fx.barrier.confirm(&gid, &confirmed, sell)?;
    assert_eq!(fx.barrier.due(None, 10)?, vec![], "nothing is due before deadline + grace");

    fx.clock.advance(TTL + GRACE + Duration::from_millis(20));
    let all = fx.barrier.due(None, 10)?;
    let names: Vec<&str> = all.iter().map(|d| d.branch.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"], "due ones only, earliest deadline first");
    assert!(all.windows(2).all(|w| w[0].deadline < w[1].deadline));
    assert!(all.iter().all(|d| d.gid == gid));

    let first = fx.barrier.due(None, 2)?;
    assert_eq!(first, all[..2]);
    assert_eq!(fx.barrier.due(first.last(), 2)?, all[2..]);
    assert_eq!(fx.barrier.due(all.last(), 2)?, vec![]);
    // Listing changes nothing.
    assert_eq!(fx.runs("cancel"), 0);
    assert_eq!(fx.barrier.held(), 4);
    Ok(())
}

#[test]
fn expire_releases_one_listed_reservation_once_with_its_business_cancel() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    fx.clock.advance(TTL + GRACE);
    let [due] = <[_; 1]>::try_from(fx.barrier.due(None, 10)?).map_err(|d| format!("{d:?}"))?;
    assert_eq!(due.deadline, START + TTL);

    // The cancel gets the stored request, inside the barrier's transaction.
    let seen = std::sync::Mutex::new(Vec::new());
    let cancel = |tx: &BusinessTx<'_>| {
        seen.lock().expect("unpoisoned").push(tx.request().to_vec());
        release(tx)
    };
    assert!(fx.barrier.expire(&due, cancel)?);
    assert_eq!(fx.state(&gid, &b), Some(BarrierState::Expired));
    assert_eq!(fx.runs("cancel"), 1);
    assert_eq!(fx.holds(&gid, &b), None);
    assert_eq!(seen.lock().expect("unpoisoned").as_slice(), [b"12A".to_vec()]);

    // Again: nothing to release, nothing runs.
    assert!(!fx.barrier.expire(&due, release)?);
    assert_eq!(fx.runs("cancel"), 1);
    assert_eq!(fx.barrier.due(None, 10)?, vec![]);
    Ok(())
}

#[test]
fn expire_of_a_branch_finished_after_the_listing_runs_nothing() -> TestResult {
    let fx = Fixture::new();
    let gid = Gid::generate();
    let (confirmed, cancelled) = (branch("a"), branch("b"));
    for b in [&confirmed, &cancelled] {
        fx.barrier.try_op(&gid, b, fx.deadline(), b"x", hold)?;
    }
    fx.clock.advance(TTL + GRACE);
    let due = fx.barrier.due(None, 10)?;
    assert_eq!(due.len(), 2);
    // The coordinator's word arrives between the listing and the release.
    fx.barrier.confirm(&gid, &confirmed, sell)?;
    fx.barrier.cancel(&gid, &cancelled, release)?;
    for d in &due {
        assert!(!fx.barrier.expire(d, release)?);
    }
    assert_eq!(fx.state(&gid, &confirmed), Some(BarrierState::Confirmed));
    assert_eq!(fx.state(&gid, &cancelled), Some(BarrierState::Cancelled));
    assert_eq!((fx.runs("confirm"), fx.runs("cancel")), (1, 1));
    Ok(())
}

#[test]
fn expire_whose_business_cancel_aborts_keeps_the_reservation() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    fx.clock.advance(TTL + GRACE);
    let due = fx.barrier.due(None, 10)?;
    let failing = |_: &BusinessTx<'_>| -> Biz<()> { abort("down".to_string()) };
    assert!(matches!(fx.barrier.expire(&due[0], failing), Err(BarrierError::Business(m)) if m == "down"));
    assert_eq!(fx.state(&gid, &b), Some(BarrierState::Tried));
    assert_eq!(fx.barrier.held(), 1);
    assert!(fx.barrier.expire(&due[0], release)?);
    Ok(())
}

#[test]
fn concurrent_cancels_of_one_branch_run_business_cancel_exactly_once() -> TestResult {
    let fx = Fixture::new();
    let b = branch("flight");
    let rounds = 200;
    for _ in 0..rounds {
        let gid = Gid::generate();
        fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
        // Two recoveries deliver the same cancel at the same instant.
        let gate = std::sync::Barrier::new(2);
        let mut outcomes = std::thread::scope(|s| {
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        gate.wait();
                        fx.barrier.cancel(&gid, &b, release)
                    })
                })
                .collect();
            racers.into_iter().map(|h| h.join().expect("no panic")).collect::<Result<Vec<_>, _>>()
        })?;
        outcomes.sort_by_key(|o| format!("{o:?}"));
        assert_eq!(outcomes, [CancelOutcome::Cancelled, CancelOutcome::Duplicate]);
    }
    assert_eq!(fx.runs("cancel"), rounds);
    Ok(())
}

#[test]
fn racing_try_and_cancel_never_leave_a_reservation_held() -> TestResult {
    let fx = Fixture::new().with_deferred();
    let b = branch("flight");
    let rounds = 200;
    let fresh_tries = AtomicUsize::new(0);
    for _ in 0..rounds {
        let gid = Gid::generate();
        let gate = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                gate.wait();
                // Either it runs first (and the cancel undoes it) or it is refused as suspended.
                match fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold) {
                    Ok(out) if out.is_fresh() => {
                        fresh_tries.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(BarrierError::Refused(Refusal::Suspended)) => {}
                    other => panic!("unexpected try outcome {other:?}"),
                }
            });
            s.spawn(|| {
                gate.wait();
                fx.barrier.cancel(&gid, &b, release).expect("cancel succeeds");
            });
        });
        assert!(matches!(fx.state(&gid, &b), Some(BarrierState::Cancelled | BarrierState::CancelledEmpty)));
        assert_eq!(fx.holds(&gid, &b), None);
    }
    assert_eq!(fx.barrier.held(), 0);
    assert_eq!(fx.runs("try"), fresh_tries.load(Ordering::Relaxed) as u64);
    assert_eq!(fx.runs("cancel"), fx.runs("try"), "every try that ran was cancelled, no other");
    Ok(())
}

/// Opens the database again. sled releases its directory lock when its background flusher thread
/// notices the last handle is gone, a moment after the drop: try again for a bounded while.
fn reopen(path: &std::path::Path) -> std::io::Result<DurableDb> {
    let mut last = None;
    for _ in 0..500 {
        match DurableDb::open(path) {
            Ok(db) => return Ok(db),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("reopen")))
}

#[test]
fn reopening_the_db_keeps_barrier_records() -> TestResult {
    let dir = tempfile::tempdir()?;
    let gid = Gid::generate();
    let (confirmed, empty, held) = (branch("a"), branch("b"), branch("c"));
    let deadline;
    {
        let fx = Fixture::on(DurableDb::open(dir.path())?);
        deadline = fx.deadline();
        for b in [&confirmed, &held] {
            fx.barrier.try_op(&gid, b, deadline, b"x", hold)?;
        }
        fx.barrier.confirm(&gid, &confirmed, sell)?;
        fx.barrier.cancel(&gid, &empty, release)?;
        // Every operation flushed already (Durability::FlushEachOp); dropping closes the db.
    }
    let fx = Fixture::on(reopen(dir.path())?);
    assert_eq!(fx.state(&gid, &confirmed), Some(BarrierState::Confirmed));
    assert_eq!(fx.state(&gid, &empty), Some(BarrierState::CancelledEmpty));
    assert_eq!(fx.state(&gid, &held), Some(BarrierState::Tried));
    assert_eq!(fx.barrier.confirm(&gid, &confirmed, sell)?, ConfirmOutcome::Duplicate);
    assert_eq!(refusal(fx.barrier.try_op(&gid, &empty, deadline, b"x", hold)), Refusal::Suspended);
    assert_eq!(
        fx.barrier.try_op(&gid, &held, deadline, b"x", hold)?,
        TryOutcome::Duplicate(b"held x".to_vec())
    );
    assert_eq!((fx.runs("try"), fx.runs("confirm")), (2, 1));
    // The expiry index survived too.
    assert_eq!(fx.barrier.held(), 1);
    fx.clock.advance(deadline.since(fx.clock.now()) + GRACE);
    assert_eq!(fx.barrier.expire_due(release)?, 1);
    Ok(())
}

#[test]
fn damaged_barrier_bytes_are_errors_not_panics() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    let records = fx.db.open_tree(BARRIER_TREE)?;
    let (key, good) = records.iter().next().ok_or("one record")??;
    let damaged: [&[u8]; 5] =
        [b"", b"\x09unknown version", b"\x01", &good[..good.len() - 1], b"\x01\xff\xff\xff\xff"];
    for bytes in damaged {
        records.insert(&key, bytes)?;
        let corrupt = |e: &BarrierError<String>| matches!(e, BarrierError::Corrupt { .. });
        assert!(matches!(fx.barrier.get(&gid, &b), Err(BarrierError::Corrupt { .. })), "{bytes:?}");
        assert!(fx.barrier.confirm(&gid, &b, sell).as_ref().is_err_and(corrupt));
        assert!(fx.barrier.cancel(&gid, &b, release).as_ref().is_err_and(corrupt));
        assert!(fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold).as_ref().is_err_and(corrupt));
        if let Err(e) = fx.barrier.confirm(&gid, &b, sell) {
            assert_eq!(e.code(), "corrupt");
        }
    }
    // Nothing ran on the damaged record, and nothing rewrote it.
    assert_eq!((fx.runs("try"), fx.runs("confirm"), fx.runs("cancel")), (1, 0, 0));
    assert_eq!(records.get(&key)?.as_deref(), Some(&b"\x01\xff\xff\xff\xff"[..]));

    // The sweep skips a damaged record and a damaged index key, and keeps going.
    let index = fx.db.open_tree(EXPIRY_TREE)?;
    index.insert([&[0u8; 8][..], b"no separator"].concat(), &[])?;
    let (other, ob) = (Gid::generate(), branch("hotel"));
    fx.barrier.try_op(&other, &ob, fx.deadline(), b"room 7", hold)?;
    fx.clock.advance(TTL + GRACE);
    assert_eq!(fx.barrier.expire_due(release)?, 1);
    assert_eq!(fx.state(&other, &ob), Some(BarrierState::Expired));
    Ok(())
}

#[test]
fn sweep_drops_an_index_entry_whose_record_is_gone() -> TestResult {
    let fx = Fixture::new();
    let index = fx.db.open_tree(EXPIRY_TREE)?;
    index.insert([&[0u8; 8][..], b"ghost\0flight"].concat(), &[])?;
    assert_eq!(fx.barrier.held(), 1);
    assert_eq!(fx.barrier.expire_due(release)?, 0);
    assert_eq!(fx.barrier.held(), 0);
    Ok(())
}

#[test]
fn flush_hook_runs_after_every_call_and_its_failure_is_reported() -> TestResult {
    let fx = Fixture::new();
    let flushes = Arc::new(AtomicUsize::new(0));
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hook = {
        let (flushes, fail, db) = (flushes.clone(), fail.clone(), fx.db.clone());
        Durability::Hook(Arc::new(move || {
            flushes.fetch_add(1, Ordering::SeqCst);
            if fail.load(Ordering::SeqCst) {
                return Err("disk full".into());
            }
            db.flush()?;
            Ok(())
        }))
    };
    let barrier = fx.barrier.clone().with_durability(hook);
    let (gid, b) = (Gid::generate(), branch("flight"));
    barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    assert_eq!(flushes.load(Ordering::SeqCst), 2, "duplicates flush too");

    // A failed flush is not an acknowledgement; the retry is a duplicate that flushes again.
    fail.store(true, Ordering::SeqCst);
    match barrier.confirm(&gid, &b, sell) {
        Err(e @ BarrierError::NotFlushed(_)) => assert_eq!(e.code(), "not_flushed"),
        other => panic!("expected NotFlushed, got {other:?}"),
    }
    fail.store(false, Ordering::SeqCst);
    assert_eq!(barrier.confirm(&gid, &b, sell)?, ConfirmOutcome::Duplicate);
    assert_eq!(fx.runs("confirm"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_expiry_loop_releases_reservations_on_the_clock() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    let task = fx.barrier.spawn_expiry(Duration::from_secs(1), release);

    // The first sweep finds nothing due and the loop goes to sleep on the manual clock.
    wait_until(|| fx.clock.sleepers() == 1).await;
    assert_eq!(fx.state(&gid, &b), Some(BarrierState::Tried));

    fx.clock.advance(TTL + GRACE);
    wait_until(|| fx.state(&gid, &b) == Some(BarrierState::Expired)).await;
    assert_eq!(fx.runs("cancel"), 1);
    task.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_expiry_task_stops_the_loop() -> TestResult {
    let fx = Fixture::new();
    let (gid, b) = (Gid::generate(), branch("flight"));
    fx.barrier.try_op(&gid, &b, fx.deadline(), b"12A", hold)?;
    let task = fx.barrier.spawn_expiry(Duration::from_secs(1), release);
    wait_until(|| fx.clock.sleepers() == 1).await;
    drop(task);
    // The loop's sleep is dropped with the loop; a loop still running would keep it.
    wait_until(|| fx.clock.sleepers() == 0).await;
    fx.clock.advance(TTL + GRACE);
    tokio::task::yield_now().await;
    assert_eq!(fx.state(&gid, &b), Some(BarrierState::Tried), "nobody sweeps after the drop");
    assert_eq!(fx.runs("cancel"), 0);
    Ok(())
}

/// Polls (in real time, briefly) until a background effect is visible; the clock is never real.
async fn wait_until(mut done: impl FnMut() -> bool) {
    for _ in 0..1_000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("condition not reached within 5 s");
}

impl Fixture {
    /// The same fixture without a flush per call, for tests making many calls.
    fn with_deferred(mut self) -> Fixture {
        self.barrier = self.barrier.with_durability(Durability::Deferred);
        self
    }
}

#[derive(Clone, Copy, Debug)]
enum Call {
    Try,
    Confirm,
    Cancel,
    Sweep,
    Wait(u64),
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        3 => Just(Call::Try),
        3 => Just(Call::Confirm),
        3 => Just(Call::Cancel),
        2 => Just(Call::Sweep),
        2 => (0u64..20_000).prop_map(Call::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever order calls arrive in, each business method runs at most once, confirm and cancel
    /// never both run, nothing runs after an empty cancel, and the record, the business state and
    /// the expiry index agree.
    #[test]
    fn any_order_of_calls_keeps_the_barrier_guarantees(calls in proptest::collection::vec(call(), 1..24)) {
        let fx = Fixture::new().with_deferred();
        let (gid, b) = (Gid::generate(), branch("flight"));
        let deadline = fx.deadline();
        let mut emptied = false;
        let mut expired = false;
        for c in calls {
            match c {
                Call::Try => match fx.barrier.try_op(&gid, &b, deadline, b"12A", hold) {
                    Ok(_) | Err(BarrierError::Refused(_)) => {}
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                },
                Call::Confirm => match fx.barrier.confirm(&gid, &b, sell) {
                    Ok(_) | Err(BarrierError::Refused(_)) => {}
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                },
                Call::Cancel => match fx.barrier.cancel(&gid, &b, release) {
                    Ok(CancelOutcome::Empty) => emptied = true,
                    Ok(_) | Err(BarrierError::Refused(Refusal::AlreadyConfirmed)) => {}
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                },
                Call::Sweep => expired |= fx.barrier.expire_due(release)? > 0,
                Call::Wait(ms) => fx.clock.advance(Duration::from_millis(ms)),
            }
            let (tries, confirms, cancels) = (fx.runs("try"), fx.runs("confirm"), fx.runs("cancel"));
            prop_assert!(tries <= 1 && confirms <= tries && cancels <= tries);
            prop_assert!(confirms + cancels <= 1);
            if emptied {
                prop_assert_eq!(tries, 0);
            }
            let state = fx.state(&gid, &b);
            let expected = match (tries, confirms, cancels) {
                (0, _, _) if emptied => Some(BarrierState::CancelledEmpty),
                (0, _, _) => None,
                (_, 1, _) => Some(BarrierState::Confirmed),
                // Released by the participant's own expiry (a sweep that released it) or by a cancel.
                (_, _, 1) if expired => Some(BarrierState::Expired),
                (_, _, 1) => Some(BarrierState::Cancelled),
                _ => Some(BarrierState::Tried),
            };
            prop_assert_eq!(state, expected);
            let held = state == Some(BarrierState::Tried);
            prop_assert_eq!(fx.holds(&gid, &b).is_some(), held);
            prop_assert_eq!(fx.barrier.held(), usize::from(held));
        }
    }
}
