//! Model-based test: random histories of begin (with tries), confirm, cancel, participant faults of
//! every kind, clock jumps and coordinator crashes, checked against a small reference model.
//!
//! The participants are real [`SledBarrier`]s whose business methods count every committed run, so
//! an effect is counted exactly: a branch whose business confirm ran twice, or whose confirm and
//! cancel both ran, fails the test. Faults: transient failures (a few, or until healed), permanent
//! failures, calls that never answer (`Hang`, ended by the coordinator's call timeout on the manual
//! clock) and answers lost after the effect committed (so the coordinator calls again and the
//! barrier must absorb the duplicate).
//!
//! After every history the participants heal, flagged transactions get an operator retry and time
//! runs on; then every transaction must be final, all its branches confirmed or all cancelled, and
//! the outcome must match what the coordinator acknowledged: an accepted confirm ends confirmed, an
//! accepted cancel or a passed deadline cancelled. At the participants, a confirmed branch ran its
//! try and its confirm exactly once and no cancel; a cancelled branch ran its cancel exactly once if
//! its try ran, and nothing at all (an empty cancel) if it did not; no reservation is left held.
//!
//! `TCC_MODEL_CASES` sets the number of histories (default 64, what CI runs); the long mode is
//! `TCC_MODEL_CASES=5000 cargo test --release -p tcc-core --test model` (see docs/testing.md).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{Fault, START, config, open_store};
use proptest::prelude::*;
use sled::transaction::{ConflictableTransactionResult, TransactionalTree};
use tcc_core::barrier::{BarrierError, BarrierState, BusinessTx, Durability, SledBarrier};
use tcc_core::transport::{BranchCall, CallError, Transport};
use tcc_core::{BranchState, Clock, Coordinator, Decision, Error, Gid, ManualClock, Timestamp, TxState};

const PARTICIPANTS: [&str; 3] = ["flight", "hotel", "car"];

/// How many histories to run: `TCC_MODEL_CASES`, or 64.
fn cases() -> u32 {
    std::env::var("TCC_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

#[derive(Clone, Debug)]
enum Op {
    /// Begin with a timeout (seconds), register the first `branches` participants and run the tries
    /// of the first `tried` of them (an initiator that stopped early leaves the rest untried).
    Begin {
        timeout_s: u64,
        branches: usize,
        tried: usize,
    },
    Confirm(usize),
    Cancel(usize),
    Fault {
        participant: usize,
        fault: Fault,
    },
    Advance(u64),
    Crash,
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        2 => Just(Fault::Healthy),
        1 => (1u32..4).prop_map(Fault::FailTimes),
        1 => Just(Fault::Down),
        1 => Just(Fault::Permanent),
        1 => Just(Fault::Hang),
        2 => (1u32..4).prop_map(Fault::AnswerLost),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u64..30, 0usize..=3, 0usize..=3).prop_map(|(timeout_s, branches, tried)| Op::Begin {
            timeout_s,
            branches,
            // Mostly every try ran, as an initiator that goes on to confirm would have it.
            tried: if tried == 0 { 0 } else { branches },
        }),
        3 => any::<usize>().prop_map(Op::Confirm),
        2 => any::<usize>().prop_map(Op::Cancel),
        3 => (0usize..3, fault()).prop_map(|(participant, fault)| Op::Fault { participant, fault }),
        2 => (0u64..15_000).prop_map(Op::Advance),
        1 => Just(Op::Crash),
    ]
}

/// The participants: one sled database holding each one's barrier; the business methods count
/// their committed runs per (transaction, branch, method) in a business tree.
#[derive(Clone, Debug)]
struct Participants {
    barrier: SledBarrier,
    runs: sled::Tree,
    faults: Arc<Mutex<HashMap<String, Fault>>>,
    /// Calls the barrier refused: the coordinator sent a decision the branch cannot take.
    violations: Arc<Mutex<Vec<String>>>,
}

type Biz<T> = ConflictableTransactionResult<T, String>;

fn bump(tx: &BusinessTx<'_>, method: &str) -> Biz<()> {
    let tree: &TransactionalTree = tx.tree(0);
    let key = format!("{}/{}/{method}", tx.gid(), tx.branch());
    let n = tree.get(&key)?.map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap())).unwrap_or(0);
    tree.insert(key.as_bytes(), &(n + 1).to_be_bytes())?;
    Ok(())
}

impl Participants {
    fn new(clock: &ManualClock) -> Participants {
        let db = tcc_core::DurableDb::temporary().unwrap();
        let runs = db.open_tree("runs").unwrap();
        // No expiry sweep runs: a participant releasing a reservation on its own is a separate
        // guarantee (the barrier tests), and would make a late confirm a flagged transaction.
        let barrier =
            SledBarrier::open(&db, vec![runs.clone()], Arc::new(clock.clone()), Duration::from_secs(3_600))
                .unwrap()
                .with_durability(Durability::Deferred);
        Participants { barrier, runs, faults: Arc::default(), violations: Arc::default() }
    }

    fn set_fault(&self, name: &str, fault: Fault) {
        self.faults.lock().unwrap().insert(format!("mem://{name}"), fault);
    }

    fn heal_all(&self) {
        self.faults.lock().unwrap().clear();
    }

    /// How many times `method` committed for (gid, branch).
    fn runs(&self, gid: &Gid, branch: &str, method: &str) -> u64 {
        let v = self.runs.get(format!("{gid}/{branch}/{method}")).unwrap();
        v.map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap())).unwrap_or(0)
    }

    fn state(&self, gid: &Gid, branch: &str) -> Option<BarrierState> {
        self.barrier.get(gid, &branch.parse().unwrap()).unwrap().map(|r| r.state)
    }

    /// The initiator's try of `branch`, straight to the participant.
    fn try_branch(&self, gid: &Gid, branch: &str, deadline: Timestamp) {
        let out = self.barrier.try_op(gid, &branch.parse().unwrap(), deadline, branch.as_bytes(), |tx| {
            bump(tx, "try")?;
            Ok(Vec::new())
        });
        assert!(out.is_ok_and(|o| o.is_fresh()), "a first try before the deadline runs");
    }

    /// The barrier's answer to a phase-two call, as the participant runtime would send it.
    fn deliver(&self, call: &BranchCall<'_>) -> Result<(), CallError> {
        let out = match call.decision {
            Decision::Confirm => {
                self.barrier.confirm(call.gid, &call.branch.id, |tx| bump(tx, "confirm")).map(drop)
            }
            Decision::Cancel => {
                self.barrier.cancel(call.gid, &call.branch.id, |tx| bump(tx, "cancel")).map(drop)
            }
        };
        match out {
            Ok(()) => Ok(()),
            Err(BarrierError::Refused(r)) => {
                let v = format!("{} branch {}: {} {r}", call.gid, call.branch.id, call.decision);
                self.violations.lock().unwrap().push(v);
                Err(CallError::Permanent(r.to_string()))
            }
            Err(e) => Err(CallError::Transient(e.to_string())),
        }
    }
}

#[async_trait]
impl Transport for Participants {
    async fn call(&self, call: BranchCall<'_>) -> Result<(), CallError> {
        let fault = {
            let mut faults = self.faults.lock().unwrap();
            let fault = faults.get(&call.branch.target).cloned().unwrap_or(Fault::Healthy);
            // Count down the faults that last a number of calls.
            let next = match fault {
                Fault::FailTimes(n) if n > 1 => Some(Fault::FailTimes(n - 1)),
                Fault::AnswerLost(n) if n > 1 => Some(Fault::AnswerLost(n - 1)),
                Fault::FailTimes(_) | Fault::AnswerLost(_) => Some(Fault::Healthy),
                _ => None,
            };
            if let Some(next) = next {
                faults.insert(call.branch.target.clone(), next);
            }
            fault
        };
        match fault {
            Fault::Healthy => self.deliver(&call),
            Fault::FailTimes(_) => Err(CallError::Transient("503 service unavailable".into())),
            Fault::Down => Err(CallError::Transient("connection refused".into())),
            Fault::Permanent => Err(CallError::Permanent("reservation expired".into())),
            Fault::Hang => std::future::pending().await,
            Fault::AnswerLost(_) => {
                self.deliver(&call)?;
                Err(CallError::Transient("connection reset after the request was sent".into()))
            }
        }
    }
}

/// A coordinator on a sled directory, crashed and reopened on demand, calling [`Participants`].
struct Harness {
    dir: tempfile::TempDir,
    clock: ManualClock,
    parts: Participants,
    tc: Option<Coordinator>,
}

impl Harness {
    async fn new() -> Harness {
        let clock = ManualClock::new(START);
        let parts = Participants::new(&clock);
        let mut h = Harness { dir: tempfile::tempdir().unwrap(), clock, parts, tc: None };
        h.open().await;
        h
    }

    async fn open(&mut self) {
        let store = open_store(self.dir.path()).await;
        let tc = Coordinator::open(
            Arc::new(store),
            Arc::new(self.parts.clone()),
            Arc::new(self.clock.clone()),
            config(),
        )
        .await
        .unwrap();
        self.tc = Some(tc);
    }

    async fn crash(&mut self) {
        if let Some(tc) = self.tc.take() {
            tc.abort().await;
        }
    }

    fn tc(&self) -> &Coordinator {
        self.tc.as_ref().unwrap()
    }

    /// Moves the clock in `step`s, letting tasks run, until `done` holds (at most `max` steps).
    async fn run_until<F>(&self, step: Duration, max: usize, done: F) -> bool
    where
        F: AsyncFnMut(&Coordinator) -> bool,
    {
        common::run_until(self.tc(), &self.clock, step, max, done).await
    }
}

/// What the reference model knows of one transaction.
#[derive(Debug)]
struct Expect {
    deadline: Timestamp,
    branches: usize,
    tried: usize,
    /// The outcome the coordinator has committed to, as far as the model can tell.
    decision: Option<Decision>,
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut h = Harness::new().await;
    let mut model: Vec<(Gid, Expect)> = Vec::new();
    for op in ops {
        match op {
            Op::Begin { timeout_s, branches, tried } => {
                let tx = h.tc().begin(None, Duration::from_secs(timeout_s)).await.unwrap();
                for (i, name) in PARTICIPANTS[..branches].iter().enumerate() {
                    h.tc()
                        .register(
                            &tx.gid,
                            name.parse().unwrap(),
                            format!("mem://{name}"),
                            name.as_bytes().to_vec(),
                        )
                        .await
                        .unwrap();
                    if i < tried {
                        h.parts.try_branch(&tx.gid, name, tx.deadline);
                    }
                }
                let exp = Expect { deadline: tx.deadline, branches, tried, decision: None };
                model.push((tx.gid, exp));
            }
            Op::Confirm(i) if !model.is_empty() => {
                let n = model.len();
                let (gid, exp) = &mut model[i % n];
                // An initiator confirms only after every try succeeded.
                if exp.tried < exp.branches {
                    continue;
                }
                let before_deadline = h.clock.now() < exp.deadline;
                match h.tc().confirm(gid).await {
                    Ok(_) => {
                        prop_assert!(exp.decision != Some(Decision::Cancel), "confirm accepted after cancel");
                        prop_assert!(before_deadline || exp.decision == Some(Decision::Confirm));
                        exp.decision = Some(Decision::Confirm);
                    }
                    Err(Error::DeadlinePassed { .. }) => {
                        prop_assert!(!before_deadline && exp.decision.is_none());
                        exp.decision = Some(Decision::Cancel); // the sweep will cancel it
                    }
                    Err(Error::IllegalTransition { .. }) => {
                        // Cancelled by request, or by the deadline sweep.
                        prop_assert!(exp.decision == Some(Decision::Cancel) || !before_deadline);
                        prop_assert!(exp.decision != Some(Decision::Confirm));
                        exp.decision = Some(Decision::Cancel);
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("confirm: {e}"))),
                }
            }
            Op::Cancel(i) if !model.is_empty() => {
                let n = model.len();
                let (gid, exp) = &mut model[i % n];
                match h.tc().cancel(gid).await {
                    Ok(_) => {
                        prop_assert!(
                            exp.decision != Some(Decision::Confirm),
                            "cancel accepted after confirm"
                        );
                        exp.decision = Some(Decision::Cancel);
                    }
                    Err(Error::IllegalTransition { .. }) => {
                        prop_assert!(exp.decision == Some(Decision::Confirm));
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("cancel: {e}"))),
                }
            }
            Op::Fault { participant, fault } => h.parts.set_fault(PARTICIPANTS[participant], fault),
            Op::Advance(ms) => {
                h.clock.advance(Duration::from_millis(ms));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Op::Crash => {
                h.crash().await;
                h.open().await;
            }
            Op::Confirm(_) | Op::Cancel(_) => {}
        }
    }

    // Heal everything, let an operator retry what is flagged, and let time run until all is final.
    h.parts.heal_all();
    let gids: Vec<Gid> = model.iter().map(|(g, _)| g.clone()).collect();
    let settled = h
        .run_until(Duration::from_millis(500), 4_000, async |tc| {
            let mut all_final = true;
            for gid in &gids {
                let tx = tc.get(gid).await.unwrap();
                if tx.state == TxState::Flagged {
                    tc.retry(gid).await.unwrap();
                }
                all_final &= tx.state.is_final();
            }
            all_final
        })
        .await;
    prop_assert!(settled, "not every transaction became final");

    prop_assert_eq!(h.parts.violations.lock().unwrap().clone(), Vec::<String>::new());
    for (gid, exp) in &model {
        let tx = h.tc().get(gid).await.unwrap();
        prop_assert_eq!(tx.branches.len(), exp.branches);
        let want = match tx.state {
            TxState::Confirmed => BranchState::Confirmed,
            TxState::Cancelled => BranchState::Cancelled,
            s => return Err(TestCaseError::fail(format!("{gid} ended {s}"))),
        };
        prop_assert!(tx.branches.iter().all(|b| b.state == want), "{gid}: mixed branch states");
        match exp.decision {
            Some(Decision::Confirm) => {
                prop_assert_eq!(tx.state, TxState::Confirmed, "{} was acknowledged as confirmed", gid)
            }
            // Never decided and past the deadline by now: the sweep cancelled it.
            Some(Decision::Cancel) | None => prop_assert_eq!(tx.state, TxState::Cancelled, "{}", gid),
        }
        for (i, name) in PARTICIPANTS[..exp.branches].iter().enumerate() {
            let tried = i < exp.tried;
            let runs = |m| h.parts.runs(gid, name, m);
            let seen = (runs("try"), runs("confirm"), runs("cancel"), h.parts.state(gid, name));
            let expected = match (want, tried) {
                (BranchState::Confirmed, _) => (1, 1, 0, Some(BarrierState::Confirmed)),
                (_, true) => (1, 0, 1, Some(BarrierState::Cancelled)),
                (_, false) => (0, 0, 0, Some(BarrierState::CancelledEmpty)),
            };
            prop_assert_eq!(seen, expected, "{} {}: (tries, confirms, cancels, barrier state)", gid, name);
        }
    }
    prop_assert_eq!(h.parts.barrier.held(), 0, "a reservation is left held");
    h.crash().await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 200, .. ProptestConfig::default() })]

    #[test]
    fn every_history_ends_all_confirmed_or_all_cancelled_with_each_effect_once(
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run(ops))?;
    }
}
