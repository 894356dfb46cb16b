//! One barrier conformance suite (DESIGN.md guarantees 5, 6 and 9), run on every backend: sled
//! ([`SledBarrier`]), PostgreSQL and MySQL ([`SqlBarrier`]). The cases are written once, against the
//! small [`Rig`] adapter below; each backend module at the bottom runs all of them.
//!
//! It covers every kind of call the barrier keeps records for: TCC tries, confirms, cancels and the
//! expiry sweep; saga actions and compensations (duplicates run once, an empty compensation refuses
//! the late action, an action never expires); two-phase messages' local transactions and
//! back-checks (the back-check's answer stays true: a local transaction after a "rolled back" is
//! refused); and calls of one kind on another kind's record, refused.
//!
//! Business methods record their effects in the backend's own business store, inside the barrier's
//! transaction (a sled tree; a table written with real SQL statements on [`Pending::conn`]), so an
//! effect counted is a committed run, and a rolled-back one leaves none. The SQL rigs have two
//! replicas, two pools on one database, as two processes of one service would; the sled rig's
//! replicas share one database handle (sled is one process's).
//!
//! PostgreSQL and MySQL come from `TCC_TEST_POSTGRES_URL` and `TCC_TEST_MYSQL_URL`; each test works
//! in a scratch schema or database of its own. Without a URL a SQL test says "skipped" and passes,
//! unless `TCC_REQUIRE_POSTGRES=1` / `TCC_REQUIRE_MYSQL=1` (CI), where it fails.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tcc_core::barrier::{BarrierState, Op, Refusal};
use tcc_core::join::join_all;
use tcc_core::{BranchId, Clock, Gid, ManualClock, Timestamp};

const START: Timestamp = Timestamp(1_700_000_000_000);
const TTL: Duration = Duration::from_secs(30);
const GRACE: Duration = Duration::from_secs(5);
/// The request every saga action carries; its compensation must get it back.
const ACTION_REQUEST: &[u8] = b"charge 40 EUR";
/// The request every message's local transaction carries.
const LOCAL_REQUEST: &[u8] = b"order 7";

/// What a call came to, the same words for every backend.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// The business method ran and committed; its result bytes.
    Ran(Vec<u8>),
    /// Already done; the stored result bytes.
    Duplicate(Vec<u8>),
    /// Empty cancel recorded.
    Empty,
    /// Cancel of a reservation the participant had released itself.
    AlreadyExpired,
    Refused(Refusal),
    /// The business method failed; everything rolled back.
    BusinessFailed,
    /// The stored record is damaged; nothing ran.
    Corrupt,
    /// A back-check's answer: the local transaction committed.
    Committed,
    /// A back-check's answer: the local transaction did not commit, and now never will.
    RolledBack,
}

/// The business method's effects on one branch, counted in the business store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Effects {
    tries: u64,
    confirms: u64,
    cancels: u64,
    expiries: u64,
    actions: u64,
    compensations: u64,
    locals: u64,
}

/// How a test damages a stored record. Sled stores one encoded value, so any damage there is
/// undecodable bytes; the SQL backends get the column-level damage named.
#[derive(Clone, Copy, Debug)]
enum Damage {
    UnknownState,
    NegativeDeadline,
    NullResult,
}

/// A barrier under test with its business store. `replica` picks one of two replicas (0 or 1).
trait Rig {
    fn clock(&self) -> &ManualClock;
    /// A try whose business records a "try" effect, then fails if `fail`; returns `request` as result.
    async fn try_op(
        &self,
        replica: usize,
        gid: &Gid,
        branch: &BranchId,
        deadline: Timestamp,
        fail: bool,
    ) -> Outcome;
    async fn confirm(&self, replica: usize, gid: &Gid, branch: &BranchId) -> Outcome;
    async fn cancel(&self, replica: usize, gid: &Gid, branch: &BranchId) -> Outcome;
    /// A saga action with [`ACTION_REQUEST`], whose business records an "action" effect, then
    /// fails if `fail`.
    async fn action(&self, replica: usize, gid: &Gid, branch: &BranchId, fail: bool) -> Outcome;
    /// A saga compensation whose business records a "compensate" effect. It checks that it got the
    /// action's request, and fails ([`Outcome::BusinessFailed`]) if not.
    async fn compensate(&self, replica: usize, gid: &Gid, branch: &BranchId) -> Outcome;
    /// A message's local transaction with [`LOCAL_REQUEST`], whose business records a "local"
    /// effect, then fails if `fail`.
    async fn local(&self, replica: usize, gid: &Gid, branch: &BranchId, fail: bool) -> Outcome;
    /// A message's back-check: [`Outcome::Committed`] or [`Outcome::RolledBack`] (or a refusal).
    async fn back_check(&self, replica: usize, gid: &Gid, branch: &BranchId) -> Outcome;
    /// One expiry sweep; how many reservations it released.
    async fn sweep(&self, replica: usize) -> usize;
    async fn effects(&self, gid: &Gid, branch: &BranchId) -> Effects;
    async fn state(&self, gid: &Gid, branch: &BranchId) -> Option<BarrierState>;
    async fn held(&self) -> u64;
    async fn damage(&self, gid: &Gid, branch: &BranchId, how: Damage);
}

fn ids(tag: &str) -> (Gid, BranchId) {
    (format!("{tag}-{}", uuid::Uuid::now_v7().simple()).parse().unwrap(), "flight".parse().unwrap())
}

fn deadline(rig: &impl Rig) -> Timestamp {
    rig.clock().now() + TTL
}

fn once(kind: &str) -> Effects {
    let mut e = Effects::default();
    match kind {
        "try" => e.tries = 1,
        "confirm" => e.confirms = 1,
        "cancel" => e.cancels = 1,
        "expire" => e.expiries = 1,
        "action" => e.actions = 1,
        "compensate" => e.compensations = 1,
        "local" => e.locals = 1,
        _ => unreachable!(),
    }
    e
}

fn sum(a: Effects, b: Effects) -> Effects {
    Effects {
        tries: a.tries + b.tries,
        confirms: a.confirms + b.confirms,
        cancels: a.cancels + b.cancels,
        expiries: a.expiries + b.expiries,
        actions: a.actions + b.actions,
        compensations: a.compensations + b.compensations,
        locals: a.locals + b.locals,
    }
}

/// Every call the barrier takes, to write a case once for several of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Try,
    Confirm,
    Cancel,
    Action,
    Compensate,
    Local,
    BackCheck,
}

impl Call {
    const ALL: [Call; 7] = [
        Call::Try,
        Call::Confirm,
        Call::Cancel,
        Call::Action,
        Call::Compensate,
        Call::Local,
        Call::BackCheck,
    ];

    /// Calls of one kind share records: TCC, saga, message.
    fn kind(self) -> &'static str {
        match self {
            Call::Try | Call::Confirm | Call::Cancel => "tcc",
            Call::Action | Call::Compensate => "saga",
            Call::Local | Call::BackCheck => "message",
        }
    }

    /// Makes the call (successful business, deadline from now) through `replica`.
    async fn on(self, rig: &impl Rig, replica: usize, gid: &Gid, branch: &BranchId) -> Outcome {
        match self {
            Call::Try => rig.try_op(replica, gid, branch, deadline(rig), false).await,
            Call::Confirm => rig.confirm(replica, gid, branch).await,
            Call::Cancel => rig.cancel(replica, gid, branch).await,
            Call::Action => rig.action(replica, gid, branch, false).await,
            Call::Compensate => rig.compensate(replica, gid, branch).await,
            Call::Local => rig.local(replica, gid, branch, false).await,
            Call::BackCheck => rig.back_check(replica, gid, branch).await,
        }
    }
}

/// Makes calls `a` and `b` on many fresh branches at once, on different replicas, half of the
/// branches starting `a` first and half `b` first, alternating which replica takes which; each
/// branch with its two outcomes (of `a`, of `b`).
async fn race(rig: &impl Rig, tag: &str, a: Call, b: Call) -> Vec<(Gid, BranchId, Outcome, Outcome)> {
    let mut all = Vec::new();
    for round in 0..6 {
        let pairs: Vec<_> = (0..16).map(|i| ids(&format!("{tag}{round}x{i}"))).collect();
        let outcomes = join_all(pairs.iter().enumerate().map(|(i, (gid, branch))| async move {
            let (ra, rb) = (i % 2, 1 - i % 2);
            if i % 4 < 2 {
                tokio::join!(a.on(rig, ra, gid, branch), b.on(rig, rb, gid, branch))
            } else {
                let (ob, oa) = tokio::join!(b.on(rig, rb, gid, branch), a.on(rig, ra, gid, branch));
                (oa, ob)
            }
        }))
        .await;
        all.extend(pairs.into_iter().zip(outcomes).map(|((g, br), (oa, ob))| (g, br, oa, ob)));
    }
    all
}

/// The cases, each generic over the backend.
mod cases {
    use super::*;

    pub async fn duplicate_try_confirm_and_cancel_run_the_business_once(rig: &impl Rig) {
        let (gid, branch) = ids("dup");
        let d = deadline(rig);
        let first = rig.try_op(0, &gid, &branch, d, false).await;
        assert!(matches!(first, Outcome::Ran(_)), "{first:?}");
        let Outcome::Ran(result) = first else { unreachable!() };
        assert_eq!(rig.try_op(1, &gid, &branch, d, false).await, Outcome::Duplicate(result.clone()));
        assert_eq!(rig.try_op(0, &gid, &branch, d, false).await, Outcome::Duplicate(result));
        assert!(matches!(rig.confirm(0, &gid, &branch).await, Outcome::Ran(_)));
        assert!(matches!(rig.confirm(1, &gid, &branch).await, Outcome::Duplicate(_)));
        assert_eq!(rig.effects(&gid, &branch).await, sum(once("try"), once("confirm")));
        assert_eq!(rig.state(&gid, &branch).await, Some(BarrierState::Confirmed));

        let (gid, branch) = ids("dup-cancel");
        assert!(matches!(rig.try_op(0, &gid, &branch, d, false).await, Outcome::Ran(_)));
        assert!(matches!(rig.cancel(1, &gid, &branch).await, Outcome::Ran(_)));
        assert!(matches!(rig.cancel(0, &gid, &branch).await, Outcome::Duplicate(_)));
        assert!(matches!(rig.cancel(1, &gid, &branch).await, Outcome::Duplicate(_)));
        assert_eq!(rig.effects(&gid, &branch).await, sum(once("try"), once("cancel")));
        assert_eq!(rig.state(&gid, &branch).await, Some(BarrierState::Cancelled));
    }

    pub async fn empty_cancel_is_recorded_and_refuses_the_late_try(rig: &impl Rig) {
        let (gid, branch) = ids("empty");
        assert_eq!(rig.cancel(0, &gid, &branch).await, Outcome::Empty);
        assert_eq!(rig.state(&gid, &branch).await, Some(BarrierState::CancelledEmpty));
        assert_eq!(
            rig.try_op(1, &gid, &branch, deadline(rig), false).await,
            Outcome::Refused(Refusal::Suspended)
        );
        assert!(matches!(rig.cancel(1, &gid, &branch).await, Outcome::Duplicate(_)));
        assert_eq!(rig.confirm(0, &gid, &branch).await, Outcome::Refused(Refusal::AlreadyCancelled));
        assert_eq!(rig.effects(&gid, &branch).await, Effects::default(), "no business method ran");
        assert_eq!(rig.held().await, 0);
    }

    pub async fn confirm_without_try_is_refused_and_stores_nothing(rig: &impl Rig) {
        let (gid, branch) = ids("no-try");
        assert_eq!(rig.confirm(0, &gid, &branch).await, Outcome::Refused(Refusal::NotTried));
        assert_eq!(rig.state(&gid, &branch).await, None);
        // Nothing was stored: the try may still come and run.
        assert!(matches!(rig.try_op(0, &gid, &branch, deadline(rig), false).await, Outcome::Ran(_)));
        assert_eq!(rig.effects(&gid, &branch).await, once("try"));
    }

    pub async fn cancel_after_confirm_is_refused(rig: &impl Rig) {
        let (gid, branch) = ids("confirmed");
        assert!(matches!(rig.try_op(0, &gid, &branch, deadline(rig), false).await, Outcome::Ran(_)));
        assert!(matches!(rig.confirm(0, &gid, &branch).await, Outcome::Ran(_)));
        assert_eq!(rig.cancel(1, &gid, &branch).await, Outcome::Refused(Refusal::AlreadyConfirmed));
        assert_eq!(rig.effects(&gid, &branch).await, sum(once("try"), once("confirm")));
        assert_eq!(rig.state(&gid, &branch).await, Some(BarrierState::Confirmed));
    }

    pub async fn try_at_or_after_its_deadline_is_refused(rig: &impl Rig) {
        let now = rig.clock().now();
        for (tag, d) in [("at", now), ("after", Timestamp(now.0 - 1))] {
            let (gid, branch) = ids(tag);
            assert_eq!(
                rig.try_op(0, &gid, &branch, d, false).await,
                Outcome::Refused(Refusal::DeadlinePassed { deadline: d })
            );
            assert_eq!(rig.state(&gid, &branch).await, None, "a refused try stores nothing");
            assert_eq!(rig.cancel(0, &gid, &branch).await, Outcome::Empty);
            assert_eq!(rig.effects(&gid, &branch).await, Effects::default());
        }
    }

    pub async fn business_error_rolls_back_business_and_barrier(rig: &impl Rig) {
        let (gid, branch) = ids("fails");
        assert_eq!(rig.try_op(0, &gid, &branch, deadline(rig), true).await, Outcome::BusinessFailed);
        assert_eq!(rig.effects(&gid, &branch).await, Effects::default(), "the try's own write rolled back");
        assert_eq!(rig.state(&gid, &branch).await, None, "no barrier row");
        assert_eq!(rig.held().await, 0);
        assert_eq!(rig.cancel(1, &gid, &branch).await, Outcome::Empty, "a later cancel is empty");
        assert_eq!(rig.effects(&gid, &branch).await, Effects::default());
    }

    pub async fn operations_after_expiry_are_refused(rig: &impl Rig) {
        let (gid, branch) = ids("expired");
        assert!(matches!(rig.try_op(0, &gid, &branch, deadline(rig), false).await, Outcome::Ran(_)));
        rig.clock().advance(TTL + GRACE);
        assert_eq!(rig.sweep(1).await, 1);
        assert_eq!(rig.state(&gid, &branch).await, Some(BarrierState::Expired));
        assert_eq!(rig.confirm(0, &gid, &branch).await, Outcome::Refused(Refusal::Expired));
        assert_eq!(
            rig.try_op(0, &gid, &branch, deadline(rig), false).await,
            Outcome::Refused(Refusal::Expired)
        );
        assert_eq!(rig.cancel(0, &gid, &branch).await, Outcome::AlreadyExpired);
        assert_eq!(rig.effects(&gid, &branch).await, sum(once("try"), once("expire")));
    }

    pub async fn expiry_releases_due_holds_once_and_leaves_the_rest(rig: &impl Rig) {
        let d = deadline(rig);
        let due: Vec<_> = (0..12).map(|i| ids(&format!("due{i}"))).collect();
        for (gid, branch) in &due {
            assert!(matches!(rig.try_op(0, gid, branch, d, false).await, Outcome::Ran(_)));
        }
        let (confirmed, cb) = ids("confirmed");
        assert!(matches!(rig.try_op(0, &confirmed, &cb, d, false).await, Outcome::Ran(_)));
        assert!(matches!(rig.confirm(0, &confirmed, &cb).await, Outcome::Ran(_)));
        // Held, but its deadline is later: not due at the sweep below.
        let (later, lb) = ids("later");
        assert!(matches!(
            rig.try_op(0, &later, &lb, d + Duration::from_secs(60), false).await,
            Outcome::Ran(_)
        ));

        rig.clock().advance(TTL + GRACE - Duration::from_millis(1));
        assert_eq!(rig.sweep(0).await, 0, "one millisecond before deadline + grace, nothing is due");
        rig.clock().advance(Duration::from_millis(1));
        // Two replicas sweep at once: each hold is released by exactly one of them.
        let released = join_all([rig.sweep(0), rig.sweep(1)].into_iter()).await;
        assert_eq!(released.iter().sum::<usize>(), due.len(), "{released:?}");
        assert_eq!(rig.sweep(0).await + rig.sweep(1).await, 0, "nothing left to release");
        for (gid, branch) in &due {
            assert_eq!(rig.effects(gid, branch).await, sum(once("try"), once("expire")));
            assert_eq!(rig.state(gid, branch).await, Some(BarrierState::Expired));
        }
        assert_eq!(
            rig.effects(&confirmed, &cb).await,
            sum(once("try"), once("confirm")),
            "confirmed: never expired"
        );
        assert_eq!(rig.state(&later, &lb).await, Some(BarrierState::Tried), "not due: untouched");
        assert_eq!(rig.effects(&later, &lb).await, once("try"));
        assert_eq!(rig.held().await, 1);
    }

    pub async fn a_confirm_before_the_sweep_wins_over_expiry(rig: &impl Rig) {
        let (gid, branch) = ids("late-confirm");
        assert!(matches!(rig.try_op(0, &gid, &branch, deadline(rig), false).await, Outcome::Ran(_)));
        rig.clock().advance(TTL + GRACE + Duration::from_secs(1));
        assert!(matches!(rig.confirm(1, &gid, &branch).await, Outcome::Ran(_)));
        assert_eq!(rig.sweep(0).await, 0);
        assert_eq!(rig.effects(&gid, &branch).await, sum(once("try"), once("confirm")));
    }

    /// A try racing its cancel on two replicas ends "try ran, cancel compensated" or "cancel empty,
    /// try refused": never a try left held by a cancel that did not see it, never a cancel run twice.
    pub async fn a_try_racing_its_cancel_ends_compensated_or_refused(rig: &impl Rig) {
        let d = deadline(rig);
        let mut seen = (0, 0);
        for round in 0..6 {
            let pairs: Vec<_> = (0..16).map(|i| ids(&format!("race{round}x{i}"))).collect();
            let outcomes = join_all(pairs.iter().enumerate().map(|(i, (gid, branch))| async move {
                // Alternate who starts first on which replica.
                let (t, c) = (i % 2, 1 - i % 2);
                if i % 4 < 2 {
                    tokio::join!(rig.try_op(t, gid, branch, d, false), rig.cancel(c, gid, branch))
                } else {
                    let (c, t) =
                        tokio::join!(rig.cancel(c, gid, branch), rig.try_op(t, gid, branch, d, false));
                    (t, c)
                }
            }))
            .await;
            for ((gid, branch), (t, c)) in pairs.iter().zip(outcomes) {
                let effects = rig.effects(gid, branch).await;
                let state = rig.state(gid, branch).await;
                match (&t, &c) {
                    (Outcome::Ran(_), Outcome::Ran(_)) => {
                        assert_eq!(effects, sum(once("try"), once("cancel")));
                        assert_eq!(state, Some(BarrierState::Cancelled));
                        seen.0 += 1;
                    }
                    (Outcome::Refused(Refusal::Suspended), Outcome::Empty) => {
                        assert_eq!(effects, Effects::default());
                        assert_eq!(state, Some(BarrierState::CancelledEmpty));
                        seen.1 += 1;
                    }
                    _ => panic!("{gid}: try {t:?}, cancel {c:?}: effects {effects:?}, state {state:?}"),
                }
            }
        }
        assert_eq!(rig.held().await, 0);
        println!("try first: {}, cancel first: {}", seen.0, seen.1);
    }

    /// The same confirm delivered to two replicas at once runs the business confirm once.
    pub async fn duplicate_confirms_on_two_replicas_run_once(rig: &impl Rig) {
        let d = deadline(rig);
        let branches: Vec<_> = (0..24).map(|i| ids(&format!("dc{i}"))).collect();
        for (gid, branch) in &branches {
            assert!(matches!(rig.try_op(0, gid, branch, d, false).await, Outcome::Ran(_)));
        }
        let outcomes = join_all(branches.iter().map(|(gid, branch)| async move {
            tokio::join!(rig.confirm(0, gid, branch), rig.confirm(1, gid, branch))
        }))
        .await;
        for ((gid, branch), (a, b)) in branches.iter().zip(outcomes) {
            let ran = [&a, &b].into_iter().filter(|o| matches!(o, Outcome::Ran(_))).count();
            let dup = [&a, &b].into_iter().filter(|o| matches!(o, Outcome::Duplicate(_))).count();
            assert_eq!((ran, dup), (1, 1), "{gid}: {a:?} {b:?}");
            assert_eq!(rig.effects(gid, branch).await, sum(once("try"), once("confirm")));
        }
    }

    pub async fn damaged_records_are_corrupt_and_nothing_runs(rig: &impl Rig) {
        for how in [Damage::UnknownState, Damage::NegativeDeadline, Damage::NullResult] {
            let (gid, branch) = ids("damaged");
            assert!(matches!(rig.try_op(0, &gid, &branch, deadline(rig), false).await, Outcome::Ran(_)));
            rig.damage(&gid, &branch, how).await;
            assert_eq!(rig.confirm(0, &gid, &branch).await, Outcome::Corrupt, "{how:?}");
            assert_eq!(rig.cancel(1, &gid, &branch).await, Outcome::Corrupt, "{how:?}");
            assert_eq!(rig.try_op(0, &gid, &branch, deadline(rig), false).await, Outcome::Corrupt, "{how:?}");
            assert_eq!(rig.effects(&gid, &branch).await, once("try"), "{how:?}: nothing ran");
        }
        // Nor does the sweep run anything for them, however long they wait.
        rig.clock().advance(TTL + GRACE + Duration::from_secs(3600));
        assert_eq!(rig.sweep(0).await, 0);
    }

    // -----------------------------------------------------------------------------------------
    // Sagas

    pub async fn duplicate_actions_and_compensations_run_the_business_once(rig: &impl Rig) {
        let (gid, branch) = ids("saga-dup");
        assert_eq!(rig.action(0, &gid, &branch, false).await, Outcome::Ran(Vec::new()));
        assert_eq!(rig.state(&gid, &branch).await, Some(BarrierState::Done));
        assert!(matches!(rig.action(1, &gid, &branch, false).await, Outcome::Duplicate(_)));
        assert!(matches!(rig.action(0, &gid, &branch, false).await, Outcome::Duplicate(_)));
        assert_eq!(rig.effects(&gid, &branch).await, once("action"));

        assert_eq!(rig.compensate(1, &gid, &branch).await, Outcome::Ran(Vec::new()));
        assert!(matches!(rig.compensate(0, &gid, &branch).await, Outcome::Duplicate(_)));
        assert!(matches!(rig.compensate(1, &gid, &branch).await, Outcome::Duplicate(_)));
        assert_eq!(rig.state(&gid, &branch).await, Some(BarrierState::Compensated));
        // The saga turned back: the action, delivered once more, must not run again.
        assert_eq!(rig.action(0, &gid, &branch, false).await, Outcome::Refused(Refusal::Compensated));
        assert_eq!(rig.effects(&gid, &branch).await, sum(once("action"), once("compensate")));
        assert_eq!(rig.held().await, 0, "an action holds nothing");
    }

    /// The same first action (and then the same compensation) delivered to two replicas at once
    /// runs once: the second of two first inserts finds the first's row.
    pub async fn duplicate_actions_on_two_replicas_at_once_run_once(rig: &impl Rig) {
        let branches: Vec<_> = (0..24).map(|i| ids(&format!("saga-dc{i}"))).collect();
        let actions = join_all(branches.iter().map(|(gid, branch)| async move {
            tokio::join!(rig.action(0, gid, branch, false), rig.action(1, gid, branch, false))
        }))
        .await;
        let compensations = join_all(branches.iter().map(|(gid, branch)| async move {
            tokio::join!(rig.compensate(1, gid, branch), rig.compensate(0, gid, branch))
        }))
        .await;
        for (((gid, branch), (a, b)), (c, d)) in branches.iter().zip(actions).zip(compensations) {
            for pair in [[&a, &b], [&c, &d]] {
                let ran = pair.iter().filter(|o| matches!(o, Outcome::Ran(_))).count();
                let dup = pair.iter().filter(|o| matches!(o, Outcome::Duplicate(_))).count();
                assert_eq!((ran, dup), (1, 1), "{gid}: {pair:?}");
            }
            assert_eq!(rig.effects(gid, branch).await, sum(once("action"), once("compensate")));
            assert_eq!(rig.state(gid, branch).await, Some(BarrierState::Compensated));
        }
    }

    pub async fn empty_compensation_is_recorded_and_refuses_the_late_action(rig: &impl Rig) {
        let (gid, branch) = ids("saga-empty");
        assert_eq!(rig.compensate(0, &gid, &branch).await, Outcome::Empty);
        assert_eq!(rig.state(&gid, &branch).await, Some(BarrierState::CompensatedEmpty));
        assert_eq!(rig.action(1, &gid, &branch, false).await, Outcome::Refused(Refusal::Compensated));
        assert!(matches!(rig.compensate(1, &gid, &branch).await, Outcome::Duplicate(_)));
        assert_eq!(rig.action(0, &gid, &branch, false).await, Outcome::Refused(Refusal::Compensated));
        assert_eq!(rig.effects(&gid, &branch).await, Effects::default(), "no business method ran");
        assert_eq!(rig.state(&gid, &branch).await, Some(BarrierState::CompensatedEmpty));
    }

    pub async fn a_failed_action_stores_nothing_and_its_compensation_is_empty(rig: &impl Rig) {
        let (gid, branch) = ids("saga-fails");
        assert_eq!(rig.action(0, &gid, &branch, true).await, Outcome::BusinessFailed);
        assert_eq!(rig.effects(&gid, &branch).await, Effects::default(), "the action's write rolled back");
        assert_eq!(rig.state(&gid, &branch).await, None, "no barrier record");
        assert_eq!(rig.compensate(1, &gid, &branch).await, Outcome::Empty, "nothing to undo");
        assert_eq!(rig.action(0, &gid, &branch, false).await, Outcome::Refused(Refusal::Compensated));
        assert_eq!(rig.effects(&gid, &branch).await, Effects::default());

        // Nothing stored means the action may be retried: it runs then, once, and is undone.
        let (gid, branch) = ids("saga-retried");
        assert_eq!(rig.action(1, &gid, &branch, true).await, Outcome::BusinessFailed);
        assert_eq!(rig.action(0, &gid, &branch, false).await, Outcome::Ran(Vec::new()));
        assert_eq!(rig.compensate(1, &gid, &branch).await, Outcome::Ran(Vec::new()));
        assert_eq!(rig.effects(&gid, &branch).await, sum(once("action"), once("compensate")));
    }

    /// An action holds nothing, so nothing releases it: however far the clock goes, sweeps leave
    /// it done, it is not counted as held, and its compensation still runs when it comes.
    pub async fn actions_never_expire(rig: &impl Rig) {
        let (gid, branch) = ids("saga-old");
        assert_eq!(rig.action(0, &gid, &branch, false).await, Outcome::Ran(Vec::new()));
        // A reservation beside it, so that the sweeps below are seen to release what is due.
        let (held, hb) = ids("tcc-beside");
        assert!(matches!(rig.try_op(1, &held, &hb, deadline(rig), false).await, Outcome::Ran(_)));
        assert_eq!(rig.held().await, 1, "the reservation, not the action");

        rig.clock().advance(TTL + GRACE);
        assert_eq!(rig.sweep(0).await + rig.sweep(1).await, 1, "the reservation only");
        for _ in 0..3 {
            rig.clock().advance(Duration::from_secs(365 * 24 * 3600));
            assert_eq!(rig.sweep(1).await + rig.sweep(0).await, 0);
        }
        assert_eq!(rig.state(&gid, &branch).await, Some(BarrierState::Done));
        assert_eq!(rig.effects(&gid, &branch).await, once("action"));
        assert_eq!(rig.held().await, 0);

        assert!(matches!(rig.action(1, &gid, &branch, false).await, Outcome::Duplicate(_)));
        assert_eq!(rig.compensate(1, &gid, &branch).await, Outcome::Ran(Vec::new()));
        assert_eq!(rig.effects(&gid, &branch).await, sum(once("action"), once("compensate")));
    }

    /// An action racing its compensation on two replicas ends "action ran, compensation undid it"
    /// or "compensation empty, action refused": never an action left standing by a compensation
    /// that did not see it.
    pub async fn an_action_racing_its_compensation_ends_compensated_or_refused(rig: &impl Rig) {
        let mut seen = (0, 0);
        for (gid, branch, a, c) in race(rig, "saga-race", Call::Action, Call::Compensate).await {
            let effects = rig.effects(&gid, &branch).await;
            let state = rig.state(&gid, &branch).await;
            match (&a, &c) {
                (Outcome::Ran(_), Outcome::Ran(_)) => {
                    assert_eq!(effects, sum(once("action"), once("compensate")));
                    assert_eq!(state, Some(BarrierState::Compensated));
                    seen.0 += 1;
                }
                (Outcome::Refused(Refusal::Compensated), Outcome::Empty) => {
                    assert_eq!(effects, Effects::default());
                    assert_eq!(state, Some(BarrierState::CompensatedEmpty));
                    seen.1 += 1;
                }
                _ => panic!("{gid}: action {a:?}, compensation {c:?}: effects {effects:?}, state {state:?}"),
            }
        }
        println!("action first: {}, compensation first: {}", seen.0, seen.1);
    }

    // -----------------------------------------------------------------------------------------
    // Two-phase messages

    pub async fn a_committed_local_transaction_is_answered_committed(rig: &impl Rig) {
        let (gid, branch) = ids("msg-committed");
        assert_eq!(rig.local(0, &gid, &branch, false).await, Outcome::Ran(Vec::new()));
        assert_eq!(rig.state(&gid, &branch).await, Some(BarrierState::Committed));
        assert_eq!(rig.back_check(1, &gid, &branch).await, Outcome::Committed);
        assert_eq!(rig.back_check(0, &gid, &branch).await, Outcome::Committed, "and again");
        assert!(matches!(rig.local(1, &gid, &branch, false).await, Outcome::Duplicate(_)));
        assert_eq!(rig.back_check(1, &gid, &branch).await, Outcome::Committed, "still");
        assert_eq!(rig.effects(&gid, &branch).await, once("local"));
        assert_eq!(rig.state(&gid, &branch).await, Some(BarrierState::Committed));
    }

    /// A back-check that finds no local transaction answers "rolled back" and makes it so: the
    /// late local transaction is refused, and the answer stays the same.
    pub async fn a_back_check_before_the_local_transaction_rolls_it_back(rig: &impl Rig) {
        let (gid, branch) = ids("msg-early-check");
        assert_eq!(rig.back_check(0, &gid, &branch).await, Outcome::RolledBack);
        assert_eq!(rig.state(&gid, &branch).await, Some(BarrierState::RolledBack));
        assert_eq!(rig.local(1, &gid, &branch, false).await, Outcome::Refused(Refusal::RolledBack));
        assert_eq!(rig.local(0, &gid, &branch, false).await, Outcome::Refused(Refusal::RolledBack));
        assert_eq!(rig.back_check(1, &gid, &branch).await, Outcome::RolledBack, "and again");
        assert_eq!(rig.effects(&gid, &branch).await, Effects::default(), "the local transaction never ran");
        assert_eq!(rig.state(&gid, &branch).await, Some(BarrierState::RolledBack));
    }

    pub async fn a_failed_local_transaction_stores_nothing_and_is_answered_rolled_back(rig: &impl Rig) {
        let (gid, branch) = ids("msg-fails");
        assert_eq!(rig.local(0, &gid, &branch, true).await, Outcome::BusinessFailed);
        assert_eq!(rig.effects(&gid, &branch).await, Effects::default(), "its writes rolled back");
        assert_eq!(rig.state(&gid, &branch).await, None, "no barrier record");
        assert_eq!(rig.back_check(1, &gid, &branch).await, Outcome::RolledBack);
        assert_eq!(rig.local(0, &gid, &branch, false).await, Outcome::Refused(Refusal::RolledBack));
        assert_eq!(rig.effects(&gid, &branch).await, Effects::default());
    }

    /// A local transaction racing its back-check on two replicas ends "committed, answered
    /// committed" or "answered rolled back, refused": whatever the back-check says is the truth.
    pub async fn a_local_transaction_racing_its_back_check_ends_as_the_back_check_answers(rig: &impl Rig) {
        let mut seen = (0, 0);
        for (gid, branch, l, b) in race(rig, "msg-race", Call::Local, Call::BackCheck).await {
            let effects = rig.effects(&gid, &branch).await;
            let state = rig.state(&gid, &branch).await;
            match (&l, &b) {
                (Outcome::Ran(_), Outcome::Committed) => {
                    assert_eq!(effects, once("local"));
                    assert_eq!(state, Some(BarrierState::Committed));
                    seen.0 += 1;
                }
                (Outcome::Refused(Refusal::RolledBack), Outcome::RolledBack) => {
                    assert_eq!(effects, Effects::default());
                    assert_eq!(state, Some(BarrierState::RolledBack));
                    seen.1 += 1;
                }
                _ => panic!("{gid}: local {l:?}, back-check {b:?}: effects {effects:?}, state {state:?}"),
            }
            // Asked again, the back-check gives the same answer.
            assert_eq!(rig.back_check(0, &gid, &branch).await, b, "{gid}");
        }
        println!("local first: {}, back-check first: {}", seen.0, seen.1);
    }

    // -----------------------------------------------------------------------------------------
    // Every kind

    /// A record written by one kind of call (TCC, saga, message) refuses every call of another
    /// kind with `OtherKind`: nothing runs, the record stays as it was.
    pub async fn calls_of_another_kind_are_refused_and_run_nothing(rig: &impl Rig) {
        let firsts = [
            (Call::Try, BarrierState::Tried, once("try")),
            (Call::Cancel, BarrierState::CancelledEmpty, Effects::default()),
            (Call::Action, BarrierState::Done, once("action")),
            (Call::Compensate, BarrierState::CompensatedEmpty, Effects::default()),
            (Call::Local, BarrierState::Committed, once("local")),
            (Call::BackCheck, BarrierState::RolledBack, Effects::default()),
        ];
        let mut records = Vec::new();
        for (first, stored, effects) in firsts {
            let (gid, branch) = ids(&format!("other-{}", stored.as_str().replace('_', "-")));
            first.on(rig, 0, &gid, &branch).await;
            assert_eq!(rig.state(&gid, &branch).await, Some(stored), "{first:?}");
            for other in Call::ALL.into_iter().filter(|c| c.kind() != first.kind()) {
                assert_eq!(
                    other.on(rig, 1, &gid, &branch).await,
                    Outcome::Refused(Refusal::OtherKind { stored }),
                    "{other:?} on a record of {first:?}"
                );
            }
            records.push((gid, branch, first, stored, effects));
        }
        // The sweep, once everything is due, releases the reservation only.
        rig.clock().advance(TTL + GRACE);
        assert_eq!(rig.sweep(0).await, 1);
        assert_eq!(rig.held().await, 0);
        for (gid, branch, first, stored, effects) in records {
            let (stored, effects) = match first {
                Call::Try => (BarrierState::Expired, sum(effects, once("expire"))),
                _ => (stored, effects),
            };
            assert_eq!(rig.effects(&gid, &branch).await, effects, "{first:?}: only the first call ran");
            assert_eq!(rig.state(&gid, &branch).await, Some(stored), "{first:?}");
        }
    }

    /// A damaged saga or message record answers every call with `Corrupt`, and nothing runs.
    pub async fn damaged_saga_and_message_records_are_corrupt_and_nothing_runs(rig: &impl Rig) {
        for how in [Damage::UnknownState, Damage::NegativeDeadline, Damage::NullResult] {
            for (first, calls, effects) in [
                (Call::Action, [Call::Action, Call::Compensate], once("action")),
                (Call::Local, [Call::Local, Call::BackCheck], once("local")),
            ] {
                let (gid, branch) = ids("damaged");
                assert_eq!(first.on(rig, 0, &gid, &branch).await, Outcome::Ran(Vec::new()));
                rig.damage(&gid, &branch, how).await;
                for call in calls {
                    assert_eq!(call.on(rig, 1, &gid, &branch).await, Outcome::Corrupt, "{how:?}: {call:?}");
                }
                assert_eq!(rig.effects(&gid, &branch).await, effects, "{how:?}: nothing ran");
            }
        }
    }
}

macro_rules! conformance {
    ($make:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn duplicate_try_confirm_and_cancel_run_the_business_once() {
            let Some(rig) = $make else { return };
            cases::duplicate_try_confirm_and_cancel_run_the_business_once(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn empty_cancel_is_recorded_and_refuses_the_late_try() {
            let Some(rig) = $make else { return };
            cases::empty_cancel_is_recorded_and_refuses_the_late_try(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn confirm_without_try_is_refused_and_stores_nothing() {
            let Some(rig) = $make else { return };
            cases::confirm_without_try_is_refused_and_stores_nothing(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn cancel_after_confirm_is_refused() {
            let Some(rig) = $make else { return };
            cases::cancel_after_confirm_is_refused(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn try_at_or_after_its_deadline_is_refused() {
            let Some(rig) = $make else { return };
            cases::try_at_or_after_its_deadline_is_refused(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn business_error_rolls_back_business_and_barrier() {
            let Some(rig) = $make else { return };
            cases::business_error_rolls_back_business_and_barrier(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn operations_after_expiry_are_refused() {
            let Some(rig) = $make else { return };
            cases::operations_after_expiry_are_refused(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn expiry_releases_due_holds_once_and_leaves_the_rest() {
            let Some(rig) = $make else { return };
            cases::expiry_releases_due_holds_once_and_leaves_the_rest(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_confirm_before_the_sweep_wins_over_expiry() {
            let Some(rig) = $make else { return };
            cases::a_confirm_before_the_sweep_wins_over_expiry(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_try_racing_its_cancel_ends_compensated_or_refused() {
            let Some(rig) = $make else { return };
            cases::a_try_racing_its_cancel_ends_compensated_or_refused(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn duplicate_confirms_on_two_replicas_run_once() {
            let Some(rig) = $make else { return };
            cases::duplicate_confirms_on_two_replicas_run_once(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn damaged_records_are_corrupt_and_nothing_runs() {
            let Some(rig) = $make else { return };
            cases::damaged_records_are_corrupt_and_nothing_runs(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn duplicate_actions_and_compensations_run_the_business_once() {
            let Some(rig) = $make else { return };
            cases::duplicate_actions_and_compensations_run_the_business_once(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn duplicate_actions_on_two_replicas_at_once_run_once() {
            let Some(rig) = $make else { return };
            cases::duplicate_actions_on_two_replicas_at_once_run_once(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn empty_compensation_is_recorded_and_refuses_the_late_action() {
            let Some(rig) = $make else { return };
            cases::empty_compensation_is_recorded_and_refuses_the_late_action(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_failed_action_stores_nothing_and_its_compensation_is_empty() {
            let Some(rig) = $make else { return };
            cases::a_failed_action_stores_nothing_and_its_compensation_is_empty(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn actions_never_expire() {
            let Some(rig) = $make else { return };
            cases::actions_never_expire(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn an_action_racing_its_compensation_ends_compensated_or_refused() {
            let Some(rig) = $make else { return };
            cases::an_action_racing_its_compensation_ends_compensated_or_refused(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_committed_local_transaction_is_answered_committed() {
            let Some(rig) = $make else { return };
            cases::a_committed_local_transaction_is_answered_committed(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_back_check_before_the_local_transaction_rolls_it_back() {
            let Some(rig) = $make else { return };
            cases::a_back_check_before_the_local_transaction_rolls_it_back(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_failed_local_transaction_stores_nothing_and_is_answered_rolled_back() {
            let Some(rig) = $make else { return };
            cases::a_failed_local_transaction_stores_nothing_and_is_answered_rolled_back(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_local_transaction_racing_its_back_check_ends_as_the_back_check_answers() {
            let Some(rig) = $make else { return };
            cases::a_local_transaction_racing_its_back_check_ends_as_the_back_check_answers(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn calls_of_another_kind_are_refused_and_run_nothing() {
            let Some(rig) = $make else { return };
            cases::calls_of_another_kind_are_refused_and_run_nothing(&rig).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn damaged_saga_and_message_records_are_corrupt_and_nothing_runs() {
            let Some(rig) = $make else { return };
            cases::damaged_saga_and_message_records_are_corrupt_and_nothing_runs(&rig).await;
        }
    };
}

// ---------------------------------------------------------------------------------------------
// sled

mod sled_rig {
    use std::sync::Arc;

    use sled::transaction::{ConflictableTransactionResult, abort};
    use tcc_core::DurableDb;
    use tcc_core::barrier::{
        ActionOutcome, BARRIER_TREE, BackCheckOutcome, BarrierError, BusinessTx, CancelOutcome,
        CompensateOutcome, ConfirmOutcome, FORMAT_VERSION, SledBarrier, TryOutcome,
    };

    use super::*;

    pub struct SledRig {
        db: DurableDb,
        biz: sled::Tree,
        clock: ManualClock,
        barrier: SledBarrier,
    }

    impl SledRig {
        pub fn new() -> SledRig {
            let db = DurableDb::temporary().unwrap();
            let biz = db.open_tree("effects").unwrap();
            let clock = ManualClock::new(START);
            let barrier = SledBarrier::open(&db, vec![biz.clone()], Arc::new(clock.clone()), GRACE).unwrap();
            SledRig { db, biz, clock, barrier }
        }

        /// Runs a blocking barrier call off the async workers.
        async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(SledBarrier) -> T + Send + 'static) -> T {
            let barrier = self.barrier.clone();
            tokio::task::spawn_blocking(move || f(barrier)).await.unwrap()
        }
    }

    fn key(gid: &Gid, branch: &BranchId, kind: &str) -> Vec<u8> {
        format!("{gid}/{branch}/{kind}").into_bytes()
    }

    /// Counts one run of `kind` in the business tree, inside the barrier's transaction.
    fn record(tx: &BusinessTx<'_>, kind: &str) -> ConflictableTransactionResult<(), String> {
        let key = key(tx.gid(), tx.branch(), kind);
        let n = tx.tree(0).get(&key)?.map_or(0, |v| u64::from_be_bytes(v.as_ref().try_into().unwrap()));
        tx.tree(0).insert(key, &(n + 1).to_be_bytes())?;
        Ok(())
    }

    fn outcome<T>(r: Result<T, BarrierError<String>>, ok: impl FnOnce(T) -> Outcome) -> Outcome {
        match r {
            Ok(v) => ok(v),
            Err(BarrierError::Refused(r)) => Outcome::Refused(r),
            Err(BarrierError::Business(_)) => Outcome::BusinessFailed,
            Err(BarrierError::Corrupt { .. }) => Outcome::Corrupt,
            Err(e) => panic!("sled barrier failed: {e}"),
        }
    }

    fn ran_once(o: ActionOutcome) -> Outcome {
        match o {
            ActionOutcome::Ran => Outcome::Ran(Vec::new()),
            ActionOutcome::Duplicate => Outcome::Duplicate(Vec::new()),
        }
    }

    impl Rig for SledRig {
        fn clock(&self) -> &ManualClock {
            &self.clock
        }

        async fn try_op(
            &self,
            _: usize,
            gid: &Gid,
            branch: &BranchId,
            deadline: Timestamp,
            fail: bool,
        ) -> Outcome {
            let (gid, branch) = (gid.clone(), branch.clone());
            let r = self
                .blocking(move |b| {
                    b.try_op(&gid, &branch, deadline, b"seat 12A", |tx| {
                        record(tx, "try")?;
                        if fail {
                            return abort("no seat".to_string());
                        }
                        Ok(tx.request().to_vec())
                    })
                })
                .await;
            outcome(r, |o| match o {
                TryOutcome::Fresh(r) => Outcome::Ran(r),
                TryOutcome::Duplicate(r) => Outcome::Duplicate(r),
            })
        }

        async fn confirm(&self, _: usize, gid: &Gid, branch: &BranchId) -> Outcome {
            let (gid, branch) = (gid.clone(), branch.clone());
            let r = self.blocking(move |b| b.confirm(&gid, &branch, |tx| record(tx, "confirm"))).await;
            outcome(r, |o| match o {
                ConfirmOutcome::Confirmed => Outcome::Ran(Vec::new()),
                ConfirmOutcome::Duplicate => Outcome::Duplicate(Vec::new()),
            })
        }

        async fn cancel(&self, _: usize, gid: &Gid, branch: &BranchId) -> Outcome {
            let (gid, branch) = (gid.clone(), branch.clone());
            let r = self.blocking(move |b| b.cancel(&gid, &branch, |tx| record(tx, "cancel"))).await;
            outcome(r, |o| match o {
                CancelOutcome::Cancelled => Outcome::Ran(Vec::new()),
                CancelOutcome::Empty => Outcome::Empty,
                CancelOutcome::Duplicate => Outcome::Duplicate(Vec::new()),
                CancelOutcome::AlreadyExpired => Outcome::AlreadyExpired,
            })
        }

        async fn action(&self, _: usize, gid: &Gid, branch: &BranchId, fail: bool) -> Outcome {
            let (gid, branch) = (gid.clone(), branch.clone());
            let r = self
                .blocking(move |b| {
                    b.action(&gid, &branch, ACTION_REQUEST, |tx| {
                        record(tx, "action")?;
                        if fail {
                            return abort("card declined".to_string());
                        }
                        Ok(())
                    })
                })
                .await;
            outcome(r, ran_once)
        }

        async fn compensate(&self, _: usize, gid: &Gid, branch: &BranchId) -> Outcome {
            let (gid, branch) = (gid.clone(), branch.clone());
            let r = self
                .blocking(move |b| {
                    b.compensate(&gid, &branch, |tx| {
                        if tx.request() != ACTION_REQUEST {
                            return abort(format!("compensation got request {:?}", tx.request()));
                        }
                        record(tx, "compensate")
                    })
                })
                .await;
            outcome(r, |o| match o {
                CompensateOutcome::Compensated => Outcome::Ran(Vec::new()),
                CompensateOutcome::Empty => Outcome::Empty,
                CompensateOutcome::Duplicate => Outcome::Duplicate(Vec::new()),
            })
        }

        async fn local(&self, _: usize, gid: &Gid, branch: &BranchId, fail: bool) -> Outcome {
            let (gid, branch) = (gid.clone(), branch.clone());
            let r = self
                .blocking(move |b| {
                    b.local(&gid, &branch, LOCAL_REQUEST, |tx| {
                        record(tx, "local")?;
                        if fail {
                            return abort("out of stock".to_string());
                        }
                        Ok(())
                    })
                })
                .await;
            outcome(r, ran_once)
        }

        async fn back_check(&self, _: usize, gid: &Gid, branch: &BranchId) -> Outcome {
            let (gid, branch) = (gid.clone(), branch.clone());
            let r = self.blocking(move |b| b.back_check(&gid, &branch).map_err(BarrierError::widen)).await;
            outcome(r, |o| match o {
                BackCheckOutcome::Committed => Outcome::Committed,
                BackCheckOutcome::RolledBack => Outcome::RolledBack,
            })
        }

        async fn sweep(&self, _: usize) -> usize {
            self.blocking(|b| b.expire_due(|tx| record(tx, "expire"))).await.unwrap()
        }

        async fn effects(&self, gid: &Gid, branch: &BranchId) -> Effects {
            let n = |kind| {
                self.biz
                    .get(key(gid, branch, kind))
                    .unwrap()
                    .map_or(0, |v| u64::from_be_bytes(v.as_ref().try_into().unwrap()))
            };
            Effects {
                tries: n("try"),
                confirms: n("confirm"),
                cancels: n("cancel"),
                expiries: n("expire"),
                actions: n("action"),
                compensations: n("compensate"),
                locals: n("local"),
            }
        }

        async fn state(&self, gid: &Gid, branch: &BranchId) -> Option<BarrierState> {
            self.barrier.get(gid, branch).unwrap().map(|r| r.state)
        }

        async fn held(&self) -> u64 {
            self.barrier.held() as u64
        }

        async fn damage(&self, gid: &Gid, branch: &BranchId, _: Damage) {
            // The record's key is `gid 0x00 branch` (see barrier.rs); the value no longer decodes.
            let mut key = gid.as_str().as_bytes().to_vec();
            key.push(0);
            key.extend_from_slice(branch.as_str().as_bytes());
            self.db.open_tree(BARRIER_TREE).unwrap().insert(key, &[FORMAT_VERSION, 9][..]).unwrap();
        }
    }

    conformance!(Some(SledRig::new()));
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL and MySQL

#[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
mod sql_rig {
    use std::sync::Arc;

    use sqlx::AssertSqlSafe;
    use tcc_core::barrier::DueReservation;
    use tcc_core::barrier::sql::{Answer, BarrierTable, Begun, SqlBarrier, SqlBarrierError, SqlDatabase};

    use super::*;

    /// How often a call that hit a serialization failure or deadlock is run again, as the
    /// participant runtime does.
    const RETRIES: usize = 20;

    /// What the rig needs of a database beyond the barrier: plain statements, written with `?`.
    pub trait TestDb: SqlDatabase {
        async fn connect(url: &str) -> sqlx::Pool<Self>;
        /// A pool whose connections wait at most two seconds for a row lock, then fail.
        async fn connect_impatient(url: &str) -> sqlx::Pool<Self>;
        /// Runs `sql` with string parameters on the barrier's transaction.
        async fn exec(conn: &mut Self::Connection, sql: &str, args: &[&str]) -> Result<u64, sqlx::Error>;
        async fn exec_pool(pool: &sqlx::Pool<Self>, sql: &str, args: &[&str]) -> Result<u64, sqlx::Error>;
        async fn count(pool: &sqlx::Pool<Self>, sql: &str, args: &[&str]) -> i64;
        /// Lets the result column hold NULL (for the damaged-row case).
        const RESULT_NULLABLE: &'static str;
    }

    macro_rules! test_db {
        ($db:ty, $pool_opts:ty, $numbered:expr, $nullable:expr, $impatient:expr) => {
            impl TestDb for $db {
                const RESULT_NULLABLE: &'static str = $nullable;

                async fn connect(url: &str) -> sqlx::Pool<Self> {
                    <$pool_opts>::new().max_connections(24).connect(url).await.unwrap()
                }

                async fn connect_impatient(url: &str) -> sqlx::Pool<Self> {
                    <$pool_opts>::new()
                        .max_connections(4)
                        .after_connect(|conn, _| {
                            Box::pin(
                                async move { sqlx::query($impatient).execute(&mut *conn).await.map(|_| ()) },
                            )
                        })
                        .connect(url)
                        .await
                        .unwrap()
                }

                async fn exec(
                    conn: &mut Self::Connection,
                    sql: &str,
                    args: &[&str],
                ) -> Result<u64, sqlx::Error> {
                    let sql = if $numbered { numbered(sql) } else { sql.to_owned() };
                    let mut q = sqlx::query(AssertSqlSafe(sql));
                    for a in args {
                        q = q.bind(*a);
                    }
                    Ok(q.execute(&mut *conn).await?.rows_affected())
                }

                async fn exec_pool(
                    pool: &sqlx::Pool<Self>,
                    sql: &str,
                    args: &[&str],
                ) -> Result<u64, sqlx::Error> {
                    let mut conn = pool.acquire().await?;
                    Self::exec(&mut conn, sql, args).await
                }

                async fn count(pool: &sqlx::Pool<Self>, sql: &str, args: &[&str]) -> i64 {
                    let sql = if $numbered { numbered(sql) } else { sql.to_owned() };
                    let mut q = sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql));
                    for a in args {
                        q = q.bind(*a);
                    }
                    q.fetch_one(pool).await.unwrap()
                }
            }
        };
    }

    #[cfg(feature = "sqlx-postgres")]
    test_db!(
        sqlx::Postgres,
        sqlx::postgres::PgPoolOptions,
        true,
        "ALTER TABLE tcc_barrier ALTER COLUMN result DROP NOT NULL",
        "SET lock_timeout = '2s'"
    );
    #[cfg(feature = "sqlx-mysql")]
    test_db!(
        sqlx::MySql,
        sqlx::mysql::MySqlPoolOptions,
        false,
        "ALTER TABLE tcc_barrier MODIFY result LONGBLOB NULL",
        "SET SESSION innodb_lock_wait_timeout = 2"
    );

    fn numbered(sql: &str) -> String {
        let mut n = 0;
        sql.chars()
            .map(|c| {
                if c == '?' {
                    n += 1;
                    format!("${n}")
                } else {
                    c.to_string()
                }
            })
            .collect()
    }

    pub struct SqlRig<DB: TestDb> {
        url: String,
        clock: ManualClock,
        /// Two replicas: a pool each.
        replicas: [SqlBarrier<DB>; 2],
    }

    impl<DB: TestDb> SqlRig<DB> {
        /// A rig in the scratch schema or database at `url`: two replicas, both migrated (migrating
        /// twice is a no-op), and the business table.
        pub async fn new(url: &str) -> SqlRig<DB> {
            let clock = ManualClock::new(START);
            let replica =
                |pool| SqlBarrier::new(pool, BarrierTable::default(), Arc::new(clock.clone()), GRACE);
            let replicas = [replica(DB::connect(url).await), replica(DB::connect(url).await)];
            for r in &replicas {
                r.migrate().await.unwrap();
            }
            DB::exec_pool(
                replicas[0].pool(),
                "CREATE TABLE effects (gid VARCHAR(128) NOT NULL, branch VARCHAR(128) NOT NULL, kind VARCHAR(16) NOT NULL)",
                &[],
            )
            .await
            .unwrap();
            SqlRig { url: url.to_owned(), clock, replicas }
        }

        /// One call through `replica`'s barrier; the business inserts an effect row of `kind` with
        /// real SQL in the barrier's transaction (a compensation first checks that it got the
        /// action's request). A back-check's answer is read from the record as a participant
        /// would. Retryable failures run the call again.
        async fn call(
            &self,
            replica: usize,
            gid: &Gid,
            branch: &BranchId,
            op: Op<'_>,
            kind: &str,
            fail: bool,
        ) -> Outcome {
            let barrier = &self.replicas[replica];
            let back_check = op == Op::BackCheck;
            for _ in 0..RETRIES {
                let result = async {
                    match barrier.begin(gid, branch, op).await? {
                        Begun::Run(_) if back_check => panic!("a back-check runs nothing"),
                        Begun::Run(pending)
                            if op == Op::Compensate && pending.request() != ACTION_REQUEST =>
                        {
                            pending.rollback().await?;
                            Ok(Outcome::BusinessFailed)
                        }
                        Begun::Run(mut pending) => {
                            let insert = "INSERT INTO effects (gid, branch, kind) VALUES (?, ?, ?)";
                            DB::exec(pending.conn(), insert, &[gid.as_str(), branch.as_str(), kind]).await?;
                            if fail {
                                pending.rollback().await?;
                                return Ok(Outcome::BusinessFailed);
                            }
                            let result = pending.request().to_vec();
                            Ok(Outcome::Ran(pending.commit(result).await?.result))
                        }
                        Begun::Answered(Answer::Duplicate(rec))
                            if rec.state == BarrierState::Expired && kind == "cancel" =>
                        {
                            Ok(Outcome::AlreadyExpired)
                        }
                        Begun::Answered(Answer::Empty) if back_check => Ok(Outcome::RolledBack),
                        Begun::Answered(Answer::Duplicate(rec)) if back_check => Ok(match rec.state {
                            BarrierState::Committed => Outcome::Committed,
                            BarrierState::RolledBack => Outcome::RolledBack,
                            other => panic!("a back-check answered by a {other} record"),
                        }),
                        Begun::Answered(Answer::Duplicate(rec)) => Ok(Outcome::Duplicate(rec.result)),
                        Begun::Answered(Answer::Empty) => Ok(Outcome::Empty),
                        Begun::Answered(Answer::Refused(r)) => Ok(Outcome::Refused(r)),
                    }
                }
                .await;
                match result {
                    Ok(outcome) => return outcome,
                    Err(SqlBarrierError::Corrupt { .. }) => return Outcome::Corrupt,
                    Err(e) if e.is_retryable() => continue,
                    Err(e) => panic!("{} barrier failed: {e}", DB::NAME),
                }
            }
            panic!("{} call still failing after {RETRIES} retries", DB::NAME)
        }

        async fn release(&self, replica: usize, due: &DueReservation) -> Result<bool, SqlBarrierError> {
            let Some(mut pending) = self.replicas[replica].begin_expire(due).await? else { return Ok(false) };
            let insert = "INSERT INTO effects (gid, branch, kind) VALUES (?, ?, 'expire')";
            DB::exec(pending.conn(), insert, &[due.gid.as_str(), due.branch.as_str()]).await?;
            pending.commit(Vec::new()).await?;
            Ok(true)
        }
    }

    impl<DB: TestDb> Rig for SqlRig<DB> {
        fn clock(&self) -> &ManualClock {
            &self.clock
        }

        async fn try_op(
            &self,
            replica: usize,
            gid: &Gid,
            branch: &BranchId,
            deadline: Timestamp,
            fail: bool,
        ) -> Outcome {
            self.call(replica, gid, branch, Op::Try { deadline, request: b"seat 12A" }, "try", fail).await
        }

        async fn confirm(&self, replica: usize, gid: &Gid, branch: &BranchId) -> Outcome {
            self.call(replica, gid, branch, Op::Confirm, "confirm", false).await
        }

        async fn cancel(&self, replica: usize, gid: &Gid, branch: &BranchId) -> Outcome {
            self.call(replica, gid, branch, Op::Cancel, "cancel", false).await
        }

        async fn action(&self, replica: usize, gid: &Gid, branch: &BranchId, fail: bool) -> Outcome {
            self.call(replica, gid, branch, Op::Action { request: ACTION_REQUEST }, "action", fail).await
        }

        async fn compensate(&self, replica: usize, gid: &Gid, branch: &BranchId) -> Outcome {
            self.call(replica, gid, branch, Op::Compensate, "compensate", false).await
        }

        async fn local(&self, replica: usize, gid: &Gid, branch: &BranchId, fail: bool) -> Outcome {
            self.call(replica, gid, branch, Op::Local { request: LOCAL_REQUEST }, "local", fail).await
        }

        async fn back_check(&self, replica: usize, gid: &Gid, branch: &BranchId) -> Outcome {
            self.call(replica, gid, branch, Op::BackCheck, "back_check", false).await
        }

        async fn sweep(&self, replica: usize) -> usize {
            let mut released = 0;
            for due in self.replicas[replica].due(1000).await.unwrap() {
                for attempt in 0.. {
                    match self.release(replica, &due).await {
                        Ok(r) => {
                            released += usize::from(r);
                            break;
                        }
                        // Logged and left by a real sweep; nothing ran.
                        Err(SqlBarrierError::Corrupt { .. }) => break,
                        Err(e) if e.is_retryable() && attempt < RETRIES => continue,
                        Err(e) => panic!("{} release failed: {e}", DB::NAME),
                    }
                }
            }
            released
        }

        async fn effects(&self, gid: &Gid, branch: &BranchId) -> Effects {
            let pool = self.replicas[0].pool();
            let sql = "SELECT COUNT(*) FROM effects WHERE gid = ? AND branch = ? AND kind = ?";
            let kinds = ["try", "confirm", "cancel", "expire", "action", "compensate", "local"];
            let mut n = [0u64; 7];
            for (slot, kind) in n.iter_mut().zip(kinds) {
                *slot = DB::count(pool, sql, &[gid.as_str(), branch.as_str(), kind]).await as u64;
            }
            let [tries, confirms, cancels, expiries, actions, compensations, locals] = n;
            Effects { tries, confirms, cancels, expiries, actions, compensations, locals }
        }

        async fn state(&self, gid: &Gid, branch: &BranchId) -> Option<BarrierState> {
            self.replicas[1].get(gid, branch).await.unwrap().map(|r| r.state)
        }

        async fn held(&self) -> u64 {
            self.replicas[0].held().await.unwrap()
        }

        async fn damage(&self, gid: &Gid, branch: &BranchId, how: Damage) {
            let pool = self.replicas[0].pool();
            let sql = match how {
                Damage::UnknownState => {
                    "UPDATE tcc_barrier SET state = 'frozen' WHERE gid = ? AND branch = ?"
                }
                Damage::NegativeDeadline => {
                    "UPDATE tcc_barrier SET deadline = -5 WHERE gid = ? AND branch = ?"
                }
                Damage::NullResult => {
                    DB::exec_pool(pool, DB::RESULT_NULLABLE, &[]).await.unwrap();
                    "UPDATE tcc_barrier SET result = NULL WHERE gid = ? AND branch = ?"
                }
            };
            assert_eq!(DB::exec_pool(pool, sql, &[gid.as_str(), branch.as_str()]).await.unwrap(), 1);
        }
    }

    /// The tests that only a SQL backend has.
    pub mod sql_cases {
        use super::*;

        /// The shipped migration is what `migrate` ran, and the table it made works.
        pub async fn migration_sql_is_the_shipped_file<DB: TestDb>(rig: &SqlRig<DB>, file: &str) {
            let statements: String =
                file.lines().filter(|l| !l.starts_with("--")).map(|l| format!("{l}\n")).collect();
            assert_eq!(rig.replicas[0].migration_sql(), statements);
            assert_eq!(rig.held().await, 0);
        }

        /// First calls of different branches, even with neighbouring keys, do not wait for each
        /// other's transactions (at MySQL's REPEATABLE READ, the gap locks of `SELECT ... FOR UPDATE`
        /// on missing rows would make the second insert wait for the first commit). The second
        /// replica's connections give up on a lock after two seconds, so waiting would fail it.
        pub async fn first_calls_of_unrelated_branches_do_not_wait_for_each_other<DB: TestDb>(
            rig: &SqlRig<DB>,
        ) {
            let clock: Arc<dyn Clock> = Arc::new(rig.clock.clone());
            let impatient =
                SqlBarrier::new(DB::connect_impatient(&rig.url).await, BarrierTable::default(), clock, GRACE);
            let (a, branch) = ids("gap");
            let (b, c): (Gid, Gid) = (format!("{a}1").parse().unwrap(), format!("{a}2").parse().unwrap());
            let try_op = Op::Try { deadline: deadline(rig), request: b"seat" };
            let Begun::Run(held) = rig.replicas[0].begin(&a, &branch, try_op).await.unwrap() else {
                panic!("a fresh try runs")
            };
            // While the first try's transaction is open:
            match impatient.begin(&b, &branch, try_op).await {
                Ok(Begun::Run(p)) => assert_eq!(p.commit(b"ok".to_vec()).await.unwrap().result, b"ok"),
                other => panic!("a try of another branch: {other:?}"),
            }
            match impatient.begin(&c, &branch, Op::Cancel).await {
                Ok(Begun::Answered(Answer::Empty)) => {}
                other => panic!("an empty cancel of another branch: {other:?}"),
            }
            held.commit(Vec::new()).await.unwrap();
            for gid in [&a, &b] {
                assert_eq!(rig.state(gid, &branch).await, Some(BarrierState::Tried));
            }
            assert_eq!(rig.state(&c, &branch).await, Some(BarrierState::CancelledEmpty));
        }

        /// Replicas starting together all migrate: creating the table is idempotent and safe
        /// concurrently.
        pub async fn replicas_migrate_concurrently<DB: TestDb>(rig: &SqlRig<DB>) {
            let table = BarrierTable::new("tcc_barrier_concurrent").unwrap();
            let clock: Arc<dyn Clock> = Arc::new(rig.clock.clone());
            let barriers: Vec<_> = rig
                .replicas
                .iter()
                .chain(&rig.replicas)
                .map(|r| SqlBarrier::new(r.pool().clone(), table.clone(), clock.clone(), GRACE))
                .collect();
            for result in join_all(barriers.iter().map(|b| b.migrate())).await {
                result.unwrap();
            }
            assert_eq!(barriers[0].held().await.unwrap(), 0);
        }

        /// `begin` given an expiry waits for the row instead of skipping it, and answers "nothing to
        /// release" with the stored record.
        pub async fn an_expiry_through_begin_releases_only_when_due<DB: TestDb>(rig: &SqlRig<DB>) {
            let (gid, branch) = ids("begin-expire");
            let expire = Op::Expire { grace: GRACE };
            match rig.replicas[0].begin(&gid, &branch, expire).await.unwrap() {
                Begun::Answered(Answer::Refused(Refusal::NotTried)) => {}
                other => panic!("no row: {other:?}"),
            }
            assert!(matches!(rig.try_op(0, &gid, &branch, deadline(rig), false).await, Outcome::Ran(_)));
            match rig.replicas[1].begin(&gid, &branch, expire).await.unwrap() {
                Begun::Answered(Answer::Duplicate(r)) => assert_eq!(r.state, BarrierState::Tried),
                other => panic!("not due: {other:?}"),
            }
            rig.clock.advance(TTL + GRACE);
            let Begun::Run(pending) = rig.replicas[1].begin(&gid, &branch, expire).await.unwrap() else {
                panic!("due: runs")
            };
            assert_eq!(pending.commit(Vec::new()).await.unwrap().state, BarrierState::Expired);
            assert_eq!(rig.state(&gid, &branch).await, Some(BarrierState::Expired));
        }

        /// A due row whose deadline is negative is not listed, and nothing runs for it.
        pub async fn a_due_list_skips_unreadable_rows<DB: TestDb>(rig: &SqlRig<DB>) {
            let (gid, branch) = ids("bad-due");
            assert!(matches!(rig.try_op(0, &gid, &branch, deadline(rig), false).await, Outcome::Ran(_)));
            rig.damage(&gid, &branch, Damage::NegativeDeadline).await;
            assert_eq!(rig.replicas[0].due(10).await.unwrap(), Vec::new());
            let due = DueReservation { gid: gid.clone(), branch: branch.clone(), deadline: Timestamp(0) };
            assert!(matches!(rig.replicas[0].begin_expire(&due).await, Err(SqlBarrierError::Corrupt { .. })));
            assert_eq!(rig.effects(&gid, &branch).await, once("try"));
        }
    }

    #[cfg(feature = "sqlx-postgres")]
    mod postgres {
        use tcc_core::barrier::sql::testing::{create_scratch_postgres_schema, test_postgres_url};

        use super::sql_cases;
        use super::*;

        async fn rig() -> Option<SqlRig<sqlx::Postgres>> {
            let url = test_postgres_url()?;
            let scratch = create_scratch_postgres_schema(&url, "tcc_barrier_test").await.unwrap();
            Some(SqlRig::new(&scratch).await)
        }

        conformance!(rig().await);

        #[tokio::test]
        async fn migration_sql_is_the_shipped_file() {
            let Some(rig) = rig().await else { return };
            let file = include_str!("../migrations/postgres/0001_tcc_barrier.sql");
            sql_cases::migration_sql_is_the_shipped_file(&rig, file).await;
        }

        #[tokio::test]
        async fn a_due_list_skips_unreadable_rows() {
            let Some(rig) = rig().await else { return };
            sql_cases::a_due_list_skips_unreadable_rows(&rig).await;
        }

        #[tokio::test]
        async fn replicas_migrate_concurrently() {
            let Some(rig) = rig().await else { return };
            sql_cases::replicas_migrate_concurrently(&rig).await;
        }

        #[tokio::test]
        async fn an_expiry_through_begin_releases_only_when_due() {
            let Some(rig) = rig().await else { return };
            sql_cases::an_expiry_through_begin_releases_only_when_due(&rig).await;
        }

        #[tokio::test]
        async fn first_calls_of_unrelated_branches_do_not_wait_for_each_other() {
            let Some(rig) = rig().await else { return };
            sql_cases::first_calls_of_unrelated_branches_do_not_wait_for_each_other(&rig).await;
        }

        /// Serialization failures and deadlocks are retryable; other database errors are not.
        #[tokio::test]
        async fn retryable_errors_are_classified() {
            let Some(rig) = rig().await else { return };
            let pool = rig.replicas[0].pool();
            sqlx::query("CREATE TABLE accounts (id INT PRIMARY KEY, balance INT NOT NULL)")
                .execute(pool)
                .await
                .unwrap();
            sqlx::query("INSERT INTO accounts VALUES (1, 0), (2, 0)").execute(pool).await.unwrap();

            // Serialization failure: a REPEATABLE READ transaction updates a row changed since its snapshot.
            let mut a = pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ").await.unwrap();
            sqlx::query("SELECT balance FROM accounts WHERE id = 1").execute(&mut *a).await.unwrap();
            sqlx::query("UPDATE accounts SET balance = 5 WHERE id = 1").execute(pool).await.unwrap();
            let e = sqlx::query("UPDATE accounts SET balance = 6 WHERE id = 1")
                .execute(&mut *a)
                .await
                .unwrap_err();
            assert!(tcc_core::barrier::sql::is_retryable(&e), "40001: {e}");
            assert!(SqlBarrierError::from(e).is_retryable());
            drop(a);

            // Deadlock: two transactions lock two rows in opposite orders.
            let e = deadlock(pool, "UPDATE accounts SET balance = balance + 1 WHERE id = $1").await;
            assert!(tcc_core::barrier::sql::is_retryable(&e), "40P01: {e}");

            // Not retryable: a unique violation, a syntax error.
            let e = sqlx::query("INSERT INTO accounts VALUES (1, 0)").execute(pool).await.unwrap_err();
            assert!(!tcc_core::barrier::sql::is_retryable(&e), "{e}");
            let e = sqlx::query("SELEC 1").execute(pool).await.unwrap_err();
            assert!(!SqlBarrierError::from(e).is_retryable());
        }

        async fn deadlock(pool: &sqlx::PgPool, update: &'static str) -> sqlx::Error {
            let mut a = pool.begin().await.unwrap();
            let mut b = pool.begin().await.unwrap();
            sqlx::query(update).bind(1).execute(&mut *a).await.unwrap();
            sqlx::query(update).bind(2).execute(&mut *b).await.unwrap();
            let (ra, rb) = tokio::join!(
                sqlx::query(update).bind(2).execute(&mut *a),
                sqlx::query(update).bind(1).execute(&mut *b)
            );
            match (ra, rb) {
                (Err(e), Ok(_)) | (Ok(_), Err(e)) => e,
                other => panic!("expected one deadlock victim: {other:?}"),
            }
        }
    }

    #[cfg(feature = "sqlx-mysql")]
    mod mysql {
        use tcc_core::barrier::sql::testing::{create_scratch_mysql_database, test_mysql_url};

        use super::sql_cases;
        use super::*;

        async fn rig() -> Option<SqlRig<sqlx::MySql>> {
            let url = test_mysql_url()?;
            let scratch = create_scratch_mysql_database(&url, "tcc_barrier_test").await.unwrap();
            Some(SqlRig::new(&scratch).await)
        }

        conformance!(rig().await);

        #[tokio::test]
        async fn migration_sql_is_the_shipped_file() {
            let Some(rig) = rig().await else { return };
            let file = include_str!("../migrations/mysql/0001_tcc_barrier.sql");
            sql_cases::migration_sql_is_the_shipped_file(&rig, file).await;
        }

        #[tokio::test]
        async fn a_due_list_skips_unreadable_rows() {
            let Some(rig) = rig().await else { return };
            sql_cases::a_due_list_skips_unreadable_rows(&rig).await;
        }

        #[tokio::test]
        async fn replicas_migrate_concurrently() {
            let Some(rig) = rig().await else { return };
            sql_cases::replicas_migrate_concurrently(&rig).await;
        }

        #[tokio::test]
        async fn an_expiry_through_begin_releases_only_when_due() {
            let Some(rig) = rig().await else { return };
            sql_cases::an_expiry_through_begin_releases_only_when_due(&rig).await;
        }

        #[tokio::test]
        async fn first_calls_of_unrelated_branches_do_not_wait_for_each_other() {
            let Some(rig) = rig().await else { return };
            sql_cases::first_calls_of_unrelated_branches_do_not_wait_for_each_other(&rig).await;
        }

        /// Deadlocks (1213) and lock-wait timeouts (1205) are retryable; other errors are not.
        #[tokio::test]
        async fn retryable_errors_are_classified() {
            let Some(rig) = rig().await else { return };
            let pool = rig.replicas[0].pool();
            sqlx::query("CREATE TABLE accounts (id INT PRIMARY KEY, balance INT NOT NULL) ENGINE=InnoDB")
                .execute(pool)
                .await
                .unwrap();
            sqlx::query("INSERT INTO accounts VALUES (1, 0), (2, 0)").execute(pool).await.unwrap();
            let update = "UPDATE accounts SET balance = balance + 1 WHERE id = ?";

            // Deadlock: two transactions lock two rows in opposite orders.
            let mut a = pool.begin().await.unwrap();
            let mut b = pool.begin().await.unwrap();
            sqlx::query(update).bind(1).execute(&mut *a).await.unwrap();
            sqlx::query(update).bind(2).execute(&mut *b).await.unwrap();
            let (ra, rb) = tokio::join!(
                sqlx::query(update).bind(2).execute(&mut *a),
                sqlx::query(update).bind(1).execute(&mut *b)
            );
            let e = match (ra, rb) {
                (Err(e), Ok(_)) | (Ok(_), Err(e)) => e,
                other => panic!("expected one deadlock victim: {other:?}"),
            };
            assert!(tcc_core::barrier::sql::is_retryable(&e), "1213: {e}");
            assert!(SqlBarrierError::from(e).is_retryable());
            drop((a, b));

            // Lock-wait timeout: wait one second for a row another transaction holds.
            let mut holder = pool.begin().await.unwrap();
            sqlx::query(update).bind(1).execute(&mut *holder).await.unwrap();
            let mut waiter = pool.begin().await.unwrap();
            sqlx::query("SET innodb_lock_wait_timeout = 1").execute(&mut *waiter).await.unwrap();
            let e = sqlx::query(update).bind(1).execute(&mut *waiter).await.unwrap_err();
            assert!(tcc_core::barrier::sql::is_retryable(&e), "1205: {e}");
            drop((holder, waiter));

            // Not retryable: a duplicate key, a syntax error.
            let e = sqlx::query("INSERT INTO accounts VALUES (1, 0)").execute(pool).await.unwrap_err();
            assert!(!tcc_core::barrier::sql::is_retryable(&e), "{e}");
            let e = sqlx::query("SELEC 1").execute(pool).await.unwrap_err();
            assert!(!SqlBarrierError::from(e).is_retryable());
        }
    }
}

/// CI requires both databases: a build without a SQL driver must not pass for one that tested it.
#[cfg(not(feature = "sqlx-postgres"))]
#[test]
fn the_postgres_barrier_is_built_when_its_tests_are_required() {
    assert!(std::env::var("TCC_REQUIRE_POSTGRES").as_deref() != Ok("1"), "built without `sqlx-postgres`");
}

#[cfg(not(feature = "sqlx-mysql"))]
#[test]
fn the_mysql_barrier_is_built_when_its_tests_are_required() {
    assert!(std::env::var("TCC_REQUIRE_MYSQL").as_deref() != Ok("1"), "built without `sqlx-mysql`");
}

/// Participant runtimes run barrier calls inside spawned tasks and axum handlers: every future the
/// SQL barrier returns is `Send`. (Checked by the compiler; the function never runs.)
#[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
#[allow(dead_code, unused_must_use)]
fn sql_barrier_futures_are_send<DB: tcc_core::barrier::sql::SqlDatabase>(
    barrier: tcc_core::barrier::sql::SqlBarrier<DB>,
    pending: tcc_core::barrier::sql::Pending<DB>,
    due: tcc_core::barrier::DueReservation,
    gid: Gid,
    branch: BranchId,
) {
    fn send<T: Send>(_: T) {}
    send(barrier.begin(&gid, &branch, Op::Cancel));
    send(barrier.begin_expire(&due));
    send(barrier.due(1));
    send(barrier.get(&gid, &branch));
    send(barrier.held());
    send(barrier.migrate());
    send(pending.commit(Vec::new()));
}
