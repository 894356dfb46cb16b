//! In-memory participants and helpers shared by the engine tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tcc_core::transport::{BranchCall, CallError, Transport};
use tcc_core::{
    BranchId, Config, Coordinator, Decision, Gid, ManualClock, RetryPolicy, SledStore, Timestamp,
};

/// How a participant (addressed by its target) misbehaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answers every call.
    Healthy,
    /// Fails the next n calls with a transient error, then answers.
    FailTimes(u32),
    /// Every call fails transiently (the service is down).
    Down,
    /// Every call fails permanently.
    Permanent,
    /// Calls never answer.
    Hang,
    /// The next n calls take effect but their answer is lost: the caller sees a transient error.
    AnswerLost(u32),
}

/// What a participant has done for one branch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    pub confirms: u32,
    pub cancels: u32,
}

#[derive(Debug, Default)]
struct State {
    faults: HashMap<String, Fault>,
    effects: HashMap<(Gid, BranchId), Effects>,
    calls: Vec<(Gid, BranchId, Decision)>,
    violations: Vec<String>,
    /// What a message's back-check answers, by gid (unknown when absent).
    local: HashMap<Gid, tcc_core::transport::LocalOutcome>,
    back_checks: usize,
}

/// Participants living in memory, reached by target string. Confirm and cancel are idempotent per
/// branch, as the barrier makes real participants; `effects` counts business runs.
#[derive(Clone, Debug, Default)]
pub struct Mem {
    state: Arc<Mutex<State>>,
}

impl Mem {
    pub fn set_fault(&self, target: &str, fault: Fault) {
        self.state.lock().unwrap().faults.insert(target.to_owned(), fault);
    }

    pub fn effects(&self, gid: &Gid, branch: &str) -> Effects {
        let key = (gid.clone(), branch.parse().unwrap());
        self.state.lock().unwrap().effects.get(&key).copied().unwrap_or_default()
    }

    /// Branches that were told both confirm and cancel (must stay empty).
    pub fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }

    /// What the back-check of message `gid` answers from now on.
    pub fn set_local(&self, gid: &Gid, outcome: tcc_core::transport::LocalOutcome) {
        self.state.lock().unwrap().local.insert(gid.clone(), outcome);
    }

    /// How many back-checks were called.
    pub fn back_checks(&self) -> usize {
        self.state.lock().unwrap().back_checks
    }

    /// The calls made for `gid`, in order: (branch, decision, target-independent).
    pub fn calls_of(&self, gid: &Gid) -> Vec<(String, Decision)> {
        let st = self.state.lock().unwrap();
        st.calls.iter().filter(|(g, ..)| g == gid).map(|(_, b, d)| (b.to_string(), *d)).collect()
    }

    pub fn heal_all(&self) {
        self.state.lock().unwrap().faults.clear();
    }

    pub fn calls(&self) -> Vec<(Gid, BranchId, Decision)> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn calls_to(&self, gid: &Gid, branch: &str) -> usize {
        let b: BranchId = branch.parse().unwrap();
        self.state.lock().unwrap().calls.iter().filter(|(g, id, _)| g == gid && id == &b).count()
    }
}

#[async_trait]
impl Transport for Mem {
    async fn back_check(
        &self,
        check: tcc_core::transport::BackCheckCall<'_>,
    ) -> tcc_core::transport::LocalOutcome {
        let mut st = self.state.lock().unwrap();
        st.back_checks += 1;
        st.local
            .get(check.gid)
            .cloned()
            .unwrap_or_else(|| tcc_core::transport::LocalOutcome::Unknown("425 still running".into()))
    }

    async fn call(&self, call: BranchCall<'_>) -> Result<(), CallError> {
        let mut answer_lost = false;
        let outcome = {
            let mut st = self.state.lock().unwrap();
            st.calls.push((call.gid.clone(), call.branch.id.clone(), call.decision));
            let fault = st.faults.get(&call.branch.target).cloned().unwrap_or(Fault::Healthy);
            match fault {
                Fault::Healthy => Some(Ok(())),
                Fault::FailTimes(0) => Some(Ok(())),
                Fault::FailTimes(n) => {
                    st.faults.insert(call.branch.target.clone(), Fault::FailTimes(n - 1));
                    Some(Err(CallError::Transient("503 service unavailable".into())))
                }
                Fault::Down => Some(Err(CallError::Transient("connection refused".into()))),
                Fault::Permanent => Some(Err(CallError::Permanent("reservation expired".into()))),
                Fault::Hang => None,
                Fault::AnswerLost(n) => {
                    let next = if n > 1 { Fault::AnswerLost(n - 1) } else { Fault::Healthy };
                    st.faults.insert(call.branch.target.clone(), next);
                    answer_lost = true;
                    Some(Ok(()))
                }
            }
        };
        match outcome {
            None => std::future::pending().await,
            Some(Err(e)) => Err(e),
            Some(Ok(())) => {
                let mut st = self.state.lock().unwrap();
                let e = st.effects.entry((call.gid.clone(), call.branch.id.clone())).or_default();
                // The barrier's promise: the business method runs once, and never both.
                let mixed = match call.decision {
                    Decision::Confirm if e.confirms == 0 => {
                        e.confirms = 1;
                        e.cancels > 0
                    }
                    Decision::Cancel if e.cancels == 0 => {
                        e.cancels = 1;
                        e.confirms > 0
                    }
                    _ => false,
                };
                if mixed {
                    let v = format!("{} branch {} got both confirm and cancel", call.gid, call.branch.id);
                    st.violations.push(v);
                }
                if answer_lost {
                    return Err(CallError::Transient("connection reset after the request was sent".into()));
                }
                Ok(())
            }
        }
    }
}

pub const START: Timestamp = Timestamp(1_700_000_000_000);

pub fn policy() -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(100),
        multiplier: 2.0,
        max_backoff: Duration::from_secs(1),
        jitter: 0.2,
        max_attempts: 4,
        call_timeout: Duration::from_secs(1),
    }
}

pub fn config() -> Config {
    Config {
        owner: "test".into(),
        retry: policy(),
        lease: Duration::from_secs(3),
        poll_interval: Duration::from_millis(50),
        ..Config::default()
    }
}

/// A coordinator on a sled directory with in-memory participants and a manual clock.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub mem: Mem,
    pub clock: ManualClock,
    pub tc: Option<Coordinator>,
}

impl Rig {
    pub async fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let mut rig = Rig { dir, mem: Mem::default(), clock: ManualClock::new(START), tc: None };
        rig.open().await;
        rig
    }

    pub async fn open(&mut self) {
        self.open_with(config()).await;
    }

    /// Opens the engine with `config` (after a [`crash`](Rig::crash), or on a new rig).
    pub async fn open_with(&mut self, config: Config) {
        assert!(self.tc.is_none());
        let store = open_store(self.dir.path()).await;
        let tc = Coordinator::open(
            Arc::new(store),
            Arc::new(self.mem.clone()),
            Arc::new(self.clock.clone()),
            config,
        )
        .await
        .unwrap();
        self.tc = Some(tc);
    }

    /// Kills the engine as a crash would, leaving the directory as it is.
    pub async fn crash(&mut self) {
        if let Some(tc) = self.tc.take() {
            tc.abort().await;
        }
    }

    pub async fn restart(&mut self) {
        self.crash().await;
        self.open().await;
    }

    pub fn tc(&self) -> &Coordinator {
        self.tc.as_ref().unwrap()
    }

    /// Begins a transaction with one branch per name, targets `mem://NAME`.
    pub async fn begin_with(&self, names: &[&str], timeout: Duration) -> Gid {
        let tx = self.tc().begin(None, timeout).await.unwrap();
        for n in names {
            self.tc()
                .register(&tx.gid, n.parse().unwrap(), format!("mem://{n}"), n.as_bytes().to_vec())
                .await
                .unwrap();
        }
        tx.gid
    }

    /// Moves the clock in `step`s, letting tasks run, until `done` holds (at most `max` steps).
    pub async fn run_until<F>(&self, step: Duration, max: usize, done: F) -> bool
    where
        F: AsyncFnMut(&Coordinator) -> bool,
    {
        run_until(self.tc(), &self.clock, step, max, done).await
    }

    pub async fn settle(&self, gid: &Gid) -> tcc_core::Transaction {
        let g = gid.clone();
        let ok = self
            .run_until(Duration::from_millis(100), 2_000, async move |tc: &Coordinator| {
                let t = tc.get(&g).await.unwrap();
                t.state.is_final() || t.state == tcc_core::TxState::Flagged
            })
            .await;
        assert!(ok, "transaction {gid} did not settle");
        self.tc().get(gid).await.unwrap()
    }
}

/// Opens a sled store, retrying briefly while a dropped predecessor releases the directory lock.
/// Moves `clock` in `step`s, letting `tc`'s tasks run, until `done` holds (at most `max` steps).
pub async fn run_until<F>(
    tc: &Coordinator,
    clock: &ManualClock,
    step: Duration,
    max: usize,
    mut done: F,
) -> bool
where
    F: AsyncFnMut(&Coordinator) -> bool,
{
    for _ in 0..max {
        if done(tc).await {
            return true;
        }
        clock.advance(step);
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    done(tc).await
}

pub async fn open_store(path: &std::path::Path) -> SledStore {
    for _ in 0..200 {
        match SledStore::open(path) {
            Ok(s) => return s,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    SledStore::open(path).unwrap()
}
