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

// ---------------------------------------------------------------------------------------------
// Sagas and two-phase messages
//
// Random histories of sagas (sequential or concurrent, 1 to 3 steps), messages (whose local
// transaction commits, rolls back or stays unknown; whose initiator submits, aborts or vanishes),
// participant faults (including an action that refuses), clock jumps and crashes. The participants
// keep a barrier of their own in memory (duplicate actions run once, a compensation before its
// action is empty and the late action is refused). After healing and operator retries every
// transaction must be final and:
// - a saga confirmed: every action took effect once, no compensation did; a saga cancelled: every
//   action that took effect was compensated once; one whose action refused is cancelled; in a
//   sequential saga the actions that took effect are a prefix (later steps never ran);
// - a message confirmed iff its local transaction committed; confirmed: every action took effect
//   exactly once; cancelled: no action was ever called.

use tcc_core::transport::{BackCheckCall, LocalOutcome};
use tcc_core::{NewBranch, NewStep, TxKind};

/// One step's barrier at a participant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum StepBarrier {
    #[default]
    Nothing,
    ActionDone,
    ActionRefused,
    Compensated,
    CompensatedEmpty,
}

/// A message's local transaction, as its back-check sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Local {
    Committed,
    RolledBack,
    InFlight,
}

#[derive(Debug, Default)]
struct StepWorld {
    faults: HashMap<String, Fault>,
    /// Participants whose next fresh action refuses (a business "no").
    refusing: std::collections::HashSet<String>,
    barrier: HashMap<(Gid, String), StepBarrier>,
    action_effects: HashMap<(Gid, String), u32>,
    compensation_effects: HashMap<(Gid, String), u32>,
    action_calls: HashMap<Gid, u32>,
    refused: std::collections::HashSet<Gid>,
    local: HashMap<Gid, Local>,
}

#[derive(Clone, Debug, Default)]
struct StepParticipants(Arc<Mutex<StepWorld>>);

impl StepParticipants {
    fn deliver(&self, call: &BranchCall<'_>) -> Result<(), CallError> {
        let mut w = self.0.lock().unwrap();
        let name = call.branch.target.trim_start_matches("mem://").trim_end_matches("/undo").to_owned();
        let key = (call.gid.clone(), call.branch.id.to_string());
        let state = w.barrier.get(&key).copied().unwrap_or_default();
        match call.decision {
            Decision::Confirm => match state {
                StepBarrier::ActionDone => Ok(()),
                // Only a saga's action may refuse; a message's action must succeed in the end.
                StepBarrier::Nothing if w.refusing.contains(&name) && !w.local.contains_key(call.gid) => {
                    w.barrier.insert(key, StepBarrier::ActionRefused);
                    w.refused.insert(call.gid.clone());
                    Err(CallError::Permanent("409 insufficient funds".into()))
                }
                StepBarrier::Nothing => {
                    w.barrier.insert(key.clone(), StepBarrier::ActionDone);
                    *w.action_effects.entry(key).or_default() += 1;
                    Ok(())
                }
                // A refused action stays refused; a late one (after its compensation) is refused.
                _ => Err(CallError::Permanent("409 refused".into())),
            },
            Decision::Cancel => {
                match state {
                    StepBarrier::ActionDone => {
                        w.barrier.insert(key.clone(), StepBarrier::Compensated);
                        *w.compensation_effects.entry(key).or_default() += 1;
                    }
                    StepBarrier::Nothing | StepBarrier::ActionRefused => {
                        w.barrier.insert(key, StepBarrier::CompensatedEmpty);
                    }
                    StepBarrier::Compensated | StepBarrier::CompensatedEmpty => {}
                }
                Ok(())
            }
        }
    }
}

#[async_trait]
impl Transport for StepParticipants {
    async fn call(&self, call: BranchCall<'_>) -> Result<(), CallError> {
        let name = call.branch.target.trim_start_matches("mem://").trim_end_matches("/undo").to_owned();
        let fault = {
            let mut w = self.0.lock().unwrap();
            if call.decision == Decision::Confirm {
                *w.action_calls.entry(call.gid.clone()).or_default() += 1;
            }
            let fault = w.faults.get(&name).cloned().unwrap_or(Fault::Healthy);
            let next = match fault {
                Fault::FailTimes(n) if n > 1 => Some(Fault::FailTimes(n - 1)),
                Fault::AnswerLost(n) if n > 1 => Some(Fault::AnswerLost(n - 1)),
                Fault::FailTimes(_) | Fault::AnswerLost(_) => Some(Fault::Healthy),
                _ => None,
            };
            if let Some(next) = next {
                w.faults.insert(name, next);
            }
            fault
        };
        match fault {
            Fault::Healthy | Fault::Permanent => self.deliver(&call),
            Fault::FailTimes(_) => Err(CallError::Transient("503 service unavailable".into())),
            Fault::Down => Err(CallError::Transient("connection refused".into())),
            Fault::Hang => std::future::pending().await,
            Fault::AnswerLost(_) => {
                self.deliver(&call)?;
                Err(CallError::Transient("connection reset after the request was sent".into()))
            }
        }
    }

    async fn back_check(&self, check: BackCheckCall<'_>) -> LocalOutcome {
        match self.0.lock().unwrap().local.get(check.gid) {
            Some(Local::Committed) => LocalOutcome::Committed,
            Some(Local::RolledBack) => LocalOutcome::RolledBack,
            Some(Local::InFlight) | None => LocalOutcome::Unknown("425 still running".into()),
        }
    }
}

#[derive(Clone, Debug)]
enum StepOp {
    Saga {
        timeout_s: u64,
        steps: usize,
        concurrent: bool,
    },
    /// A message whose local transaction ends `local`; `tell` says whether the initiator then
    /// submits (committed) or aborts (rolled back) or vanishes.
    Msg {
        timeout_s: u64,
        steps: usize,
        local: Local,
        tell: bool,
    },
    /// The local transaction of an in-flight message ends now (committed or not), and the
    /// initiator perhaps says so.
    Resolve {
        which: usize,
        commit: bool,
        tell: bool,
    },
    Fault {
        participant: usize,
        fault: Fault,
    },
    Refuse(usize),
    Advance(u64),
    Crash,
}

fn step_op() -> impl Strategy<Value = StepOp> {
    let local = prop_oneof![Just(Local::Committed), Just(Local::RolledBack), Just(Local::InFlight)];
    prop_oneof![
        3 => (1u64..30, 1usize..=3, any::<bool>())
            .prop_map(|(timeout_s, steps, concurrent)| StepOp::Saga { timeout_s, steps, concurrent }),
        3 => (1u64..30, 1usize..=3, local, any::<bool>())
            .prop_map(|(timeout_s, steps, local, tell)| StepOp::Msg { timeout_s, steps, local, tell }),
        1 => (any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(which, commit, tell)| StepOp::Resolve { which, commit, tell }),
        3 => (0usize..3, fault()).prop_map(|(participant, fault)| StepOp::Fault { participant, fault }),
        1 => (0usize..3).prop_map(StepOp::Refuse),
        2 => (0u64..15_000).prop_map(StepOp::Advance),
        1 => Just(StepOp::Crash),
    ]
}

struct StepHarness {
    dir: tempfile::TempDir,
    clock: ManualClock,
    parts: StepParticipants,
    tc: Option<Coordinator>,
}

impl StepHarness {
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

    fn tc(&self) -> &Coordinator {
        self.tc.as_ref().unwrap()
    }
}

async fn run_steps(ops: Vec<StepOp>) -> Result<(), TestCaseError> {
    let clock = ManualClock::new(START);
    let mut h = StepHarness { dir: tempfile::tempdir().unwrap(), clock, parts: Default::default(), tc: None };
    h.open().await;
    let mut sagas: Vec<(Gid, bool)> = Vec::new();
    let mut msgs: Vec<Gid> = Vec::new();
    for op in ops {
        match op {
            StepOp::Saga { timeout_s, steps, concurrent } => {
                let steps: Vec<NewStep> = PARTICIPANTS[..steps]
                    .iter()
                    .enumerate()
                    .map(|(i, name)| NewStep {
                        id: name.parse().unwrap(),
                        action: format!("mem://{name}"),
                        compensate: format!("mem://{name}/undo"),
                        payload: Vec::new(),
                        // Concurrent: the last step waits for the first.
                        after: if concurrent && i == 2 { vec![0] } else { Vec::new() },
                    })
                    .collect();
                let tx = h
                    .tc()
                    .begin_saga(None, Duration::from_secs(timeout_s), Default::default(), steps, concurrent)
                    .await
                    .unwrap();
                sagas.push((tx.gid, concurrent));
            }
            StepOp::Msg { timeout_s, steps, local, tell } => {
                let steps = PARTICIPANTS[..steps]
                    .iter()
                    .map(|name| NewBranch {
                        id: name.parse().unwrap(),
                        target: format!("mem://{name}"),
                        payload: Vec::new(),
                    })
                    .collect();
                let timeout = Duration::from_secs(timeout_s);
                let tx = h.tc().prepare_message(None, timeout, Default::default(), steps, "mem://q".into());
                let tx = tx.await.unwrap();
                h.parts.0.lock().unwrap().local.insert(tx.gid.clone(), local);
                match (local, tell) {
                    (Local::Committed, true) => drop(h.tc().confirm(&tx.gid).await.unwrap()),
                    (Local::RolledBack, true) => drop(h.tc().cancel(&tx.gid).await.unwrap()),
                    _ => {}
                }
                msgs.push(tx.gid);
            }
            StepOp::Resolve { which, commit, tell } if !msgs.is_empty() => {
                let gid = msgs[which % msgs.len()].clone();
                let resolved = {
                    let mut w = h.parts.0.lock().unwrap();
                    let in_flight = w.local.get(&gid) == Some(&Local::InFlight);
                    if in_flight {
                        w.local
                            .insert(gid.clone(), if commit { Local::Committed } else { Local::RolledBack });
                    }
                    in_flight
                };
                if !resolved {
                    continue;
                }
                if tell {
                    // The back-check may have settled it already, the same way: either answer is fine.
                    let r = if commit { h.tc().confirm(&gid).await } else { h.tc().cancel(&gid).await };
                    prop_assert!(r.is_ok(), "{gid}: telling the outcome: {r:?}");
                }
            }
            StepOp::Fault { participant, fault } => {
                h.parts.0.lock().unwrap().faults.insert(PARTICIPANTS[participant].into(), fault);
            }
            StepOp::Refuse(p) => drop(h.parts.0.lock().unwrap().refusing.insert(PARTICIPANTS[p].into())),
            StepOp::Advance(ms) => {
                h.clock.advance(Duration::from_millis(ms));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            StepOp::Crash => {
                if let Some(tc) = h.tc.take() {
                    tc.abort().await;
                }
                h.open().await;
            }
            StepOp::Resolve { .. } => {}
        }
    }

    // Heal; a local transaction still in flight is settled as rolled back (as the barrier's
    // back-check would settle it); an operator retries what is flagged.
    {
        let mut w = h.parts.0.lock().unwrap();
        w.faults.clear();
        for l in w.local.values_mut() {
            if *l == Local::InFlight {
                *l = Local::RolledBack;
            }
        }
    }
    let gids: Vec<Gid> = sagas.iter().map(|(g, _)| g.clone()).chain(msgs.iter().cloned()).collect();
    let settled = common::run_until(h.tc(), &h.clock, Duration::from_millis(500), 4_000, async |tc| {
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
    if !settled {
        let mut stuck = Vec::new();
        for gid in &gids {
            let tx = h.tc().get(gid).await.unwrap();
            if !tx.state.is_final() {
                stuck.push(format!("{tx:?}"));
            }
        }
        return Err(TestCaseError::fail(format!("not every saga and message became final: {stuck:#?}")));
    }

    let mut stored = HashMap::new();
    for gid in &gids {
        stored.insert(gid.clone(), h.tc().get(gid).await.unwrap());
    }
    let verdict = check_steps(&h.parts.0.lock().unwrap(), &stored, &sagas, &msgs);
    if let Some(tc) = h.tc.take() {
        tc.abort().await;
    }
    verdict
}

/// The end-of-history checks of [`run_steps`] (see the section's comment).
fn check_steps(
    w: &StepWorld,
    stored: &HashMap<Gid, tcc_core::Transaction>,
    sagas: &[(Gid, bool)],
    msgs: &[Gid],
) -> Result<(), TestCaseError> {
    let effects = |m: &HashMap<(Gid, String), u32>, gid: &Gid, name: &str| {
        m.get(&(gid.clone(), name.to_string())).copied().unwrap_or(0)
    };
    for (gid, concurrent) in sagas {
        let tx = &stored[gid];
        let n = tx.branches.len();
        let names = &PARTICIPANTS[..n];
        let acts: Vec<u32> = names.iter().map(|p| effects(&w.action_effects, gid, p)).collect();
        let comps: Vec<u32> = names.iter().map(|p| effects(&w.compensation_effects, gid, p)).collect();
        match tx.state {
            TxState::Confirmed => {
                prop_assert!(!w.refused.contains(gid), "{gid}: an action refused, yet the saga is done");
                prop_assert_eq!(&acts, &vec![1; n], "{}: every action once", gid);
                prop_assert_eq!(&comps, &vec![0; n], "{}: no compensation", gid);
            }
            TxState::Cancelled => {
                prop_assert_eq!(&acts, &comps, "{}: every action that ran is compensated once", gid);
                prop_assert!(acts.iter().all(|&a| a <= 1), "{gid}: an action ran twice");
                if !concurrent {
                    let ran = acts.iter().take_while(|&&a| a == 1).count();
                    prop_assert!(acts[ran..].iter().all(|&a| a == 0), "{gid}: a later step ran: {acts:?}");
                }
            }
            s => return Err(TestCaseError::fail(format!("{gid} ended {s}"))),
        }
    }
    for gid in msgs {
        let tx = &stored[gid];
        prop_assert!(matches!(tx.kind, TxKind::Msg(_)));
        let committed = w.local.get(gid) == Some(&Local::Committed);
        let names = &PARTICIPANTS[..tx.branches.len()];
        match tx.state {
            TxState::Confirmed => {
                prop_assert!(committed, "{gid}: submitted though its local transaction rolled back");
                for p in names {
                    prop_assert_eq!(effects(&w.action_effects, gid, p), 1, "{} {}: action once", gid, p);
                }
            }
            TxState::Cancelled => {
                prop_assert!(!committed, "{gid}: aborted though its local transaction committed");
                let calls = w.action_calls.get(gid).copied().unwrap_or(0);
                prop_assert_eq!(calls, 0, "{}: an aborted message called an action", gid);
            }
            s => return Err(TestCaseError::fail(format!("{gid} ended {s}"))),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 200, .. ProptestConfig::default() })]

    #[test]
    fn every_saga_ends_all_done_or_all_compensated_and_every_message_follows_its_local_transaction(
        ops in proptest::collection::vec(step_op(), 1..40),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run_steps(ops))?;
    }
}
