//! The coordinator engine: the driver around the pure state machine in [`crate::state`].
//!
//! Every request reads the transaction, applies an event with [`state::apply`], stores the result with
//! compare-and-set (retrying on a concurrent change) and then performs the effects: phase-two rounds,
//! waking waiters, flagging. Phase two itself is in the `phase_two` module, the scheduler that resumes
//! unfinished work, retries and expires deadlines is in the `recovery` module.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinSet;

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::model::{
    Branch, BranchId, Decision, Gid, Msg, Saga, SagaStep, Timestamp, Transaction, TxOptions, TxState,
};
use crate::retry::RetryPolicy;
use crate::state::{self, Context, Effect, Event, Transition};
use crate::store::{Cas, ListQuery, Page, Store};
use crate::transport::Transport;

/// How many times a request re-reads and re-applies after losing a compare-and-set race.
const MAX_CAS_ROUNDS: usize = 32;

/// Settings of a [`Coordinator`].
#[derive(Clone, Debug)]
pub struct Config {
    /// This process's name in leases. Must differ between processes sharing a store.
    pub owner: String,
    /// How phase two retries, and when it flags.
    pub retry: RetryPolicy,
    /// How long a claim on phase-two work lasts if this process dies silently.
    pub lease: Duration,
    /// How often the scheduler looks for due work (retries, deadlines, abandoned leases).
    pub poll_interval: Duration,
    /// Most transactions the scheduler claims at once.
    pub claim_batch: usize,
    /// Most phase-two rounds running at once in this process. The scheduler claims no more due work
    /// than there is room for, so a large backlog (say, after a long outage) is worked through with
    /// a bounded number of participant calls in flight; a round started by a decision waits for
    /// room too.
    pub max_rounds: usize,
    /// Longest timeout [`Coordinator::begin`] accepts.
    pub max_timeout: Duration,
    /// Most branches one transaction may have.
    pub max_branches: usize,
    /// Largest branch payload, in bytes.
    pub max_payload: usize,
    /// Most payload bytes one transaction's branches may hold together (4 MiB by default):
    /// registering a branch that would take the sum past it is refused ([`Error::InvalidInput`])
    /// and stores nothing. Every registration rewrites the whole record, so this bounds the memory
    /// and disk one transaction can take, whatever its branch count.
    pub max_tx_payload: usize,
    /// Longest branch target, in bytes.
    pub max_target: usize,
    /// How long a finished (confirmed or cancelled) transaction is kept after it finished; `None`
    /// keeps every one. Past it, the transaction is deleted in the background (a pass at least
    /// every minute, see [`Coordinator::prune_finished`]): reading it finds nothing, and its id may
    /// be taken again. Flagged and unfinished transactions are never deleted. Keep it longer than
    /// any initiator may still ask about a transaction, or send a decision for it again.
    pub retain_finished: Option<Duration>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            owner: format!("tcc-{}", uuid::Uuid::now_v7().simple()),
            retry: RetryPolicy::default(),
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
            claim_batch: 256,
            max_rounds: 1024,
            max_timeout: Duration::from_secs(24 * 3600),
            max_branches: 128,
            max_payload: 1 << 20,
            max_tx_payload: 4 << 20,
            max_target: 2048,
            retain_finished: None,
        }
    }
}

impl Config {
    fn validate(&self) -> Result<()> {
        self.retry.validate()?;
        if self.owner.is_empty() {
            return Err(Error::InvalidInput("owner must not be empty".into()));
        }
        if self.lease <= self.retry.call_timeout {
            return Err(Error::InvalidInput("lease must be longer than the per-call timeout".into()));
        }
        if self.max_rounds > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(Error::InvalidInput("max_rounds is too large".into()));
        }
        if self.retain_finished.is_some_and(|d| d.is_zero()) {
            return Err(Error::InvalidInput("retain_finished must be positive".into()));
        }
        if self.poll_interval.is_zero() || self.claim_batch == 0 || self.max_rounds == 0 {
            return Err(Error::InvalidInput(
                "poll_interval, claim_batch and max_rounds must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// A snapshot of the engine's counters since it opened (for metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Transactions begun.
    pub begun: u64,
    /// Transactions that ended confirmed.
    pub confirmed: u64,
    /// Transactions that ended cancelled.
    pub cancelled: u64,
    /// Transactions flagged for an operator.
    pub flagged: u64,
    /// Calls made to participants in phase two.
    pub phase_two_calls: u64,
    /// Of those, calls that failed.
    pub phase_two_failures: u64,
    /// Phase-two rounds that were retries (second round or later).
    pub retries: u64,
    /// Transactions past their deadline cancelled by the sweep.
    pub expired: u64,
    /// Finished transactions deleted past [`Config::retain_finished`] (or by
    /// [`Coordinator::prune_finished`]).
    pub pruned: u64,
}

/// A branch registered together with begin ([`Coordinator::begin_registered`]): what
/// [`Coordinator::register`] takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewBranch {
    /// Unique within the transaction.
    pub id: BranchId,
    /// Where the participant is, for the transport to interpret.
    pub target: String,
    /// Handed back to the participant with confirm and cancel (the try's request).
    pub payload: Vec<u8>,
}

/// A saga step, for [`Coordinator::begin_saga`]: an action and its compensation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewStep {
    /// Unique within the saga.
    pub id: BranchId,
    /// Where the action is called, for the transport to interpret.
    pub action: String,
    /// Where the compensation is called.
    pub compensate: String,
    /// Handed to the action and to the compensation.
    pub payload: Vec<u8>,
    /// Indexes of the steps whose actions must be done before this one starts; read only for a
    /// concurrent saga.
    pub after: Vec<u32>,
}

fn new_branch(id: BranchId, target: String, payload: Vec<u8>) -> crate::model::Branch {
    crate::model::Branch {
        id,
        target,
        payload,
        state: crate::model::BranchState::Registered,
        last_error: None,
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) begun: AtomicU64,
    pub(crate) confirmed: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) flagged: AtomicU64,
    pub(crate) phase_two_calls: AtomicU64,
    pub(crate) phase_two_failures: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) pruned: AtomicU64,
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: Config,
    pub(crate) counters: Counters,
    /// Transactions this process is running a phase-two round for, so it never runs two at once.
    pub(crate) driving: Mutex<std::collections::HashSet<Gid>>,
    /// One permit per phase-two round allowed to run at once ([`Config::max_rounds`]).
    pub(crate) rounds: Arc<tokio::sync::Semaphore>,
    /// Rounds spawned and not finished, running or waiting for a permit: what the scheduler leaves
    /// room for before claiming more.
    pub(crate) pending_rounds: std::sync::atomic::AtomicUsize,
    /// Callers of [`Coordinator::wait`], each handed the transaction as stored when it ends or is
    /// flagged here.
    waiters: Mutex<HashMap<Gid, Vec<oneshot::Sender<Transaction>>>>,
    tasks: Mutex<JoinSet<()>>,
    pub(crate) wake: Notify,
    pub(crate) stop: watch::Sender<bool>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coordinator").field("owner", &self.config.owner).field("store", &self.store).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing in these maps can be left half-updated by a panic; carry on.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The transaction coordinator: records global decisions durably and drives every branch to them.
///
/// It runs embedded in a service or behind `tcc-http`'s server; either way this is the engine.
/// Opening it resumes every unfinished transaction found in the store.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use async_trait::async_trait;
/// use tcc_core::transport::{BranchCall, CallError, Transport};
/// use tcc_core::{Config, Coordinator, SledStore, SystemClock, TxState};
///
/// #[derive(Debug)]
/// struct Ok_;
/// #[async_trait]
/// impl Transport for Ok_ {
///     async fn call(&self, _: BranchCall<'_>) -> Result<(), CallError> { Ok(()) }
/// }
///
/// let dir = tempfile::tempdir().unwrap();
/// let store = Arc::new(SledStore::open(dir.path()).unwrap());
/// let tc = Coordinator::open(store, Arc::new(Ok_), Arc::new(SystemClock), Config::default()).await.unwrap();
/// let tx = tc.begin(None, Duration::from_secs(30)).await.unwrap();
/// tc.register(&tx.gid, "flight".parse().unwrap(), "mem://flight".into(), b"seat 1A".to_vec()).await.unwrap();
/// // ... the initiator calls the flight service's try here ...
/// tc.confirm(&tx.gid).await.unwrap();
/// let done = tc.wait(&tx.gid, Duration::from_secs(5)).await.unwrap();
/// assert_eq!(done.state, TxState::Confirmed);
/// tc.shutdown().await;
/// # });
/// ```
pub struct Coordinator {
    inner: Arc<Inner>,
}

impl fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.inner.stop.send(true);
        lock(&self.inner.tasks).abort_all();
    }
}

impl Coordinator {
    /// Opens the engine on `store` and starts the scheduler, which resumes every unfinished transaction
    /// (recovery), retries failed phase-two rounds and cancels transactions past their deadline.
    /// Must be called inside a tokio runtime.
    pub async fn open(
        store: Arc<dyn Store>,
        transport: Arc<dyn Transport>,
        clock: Arc<dyn Clock>,
        config: Config,
    ) -> Result<Coordinator> {
        config.validate()?;
        let now = clock.now();
        let reclaimed = store.reclaim_abandoned(now).await?;
        if reclaimed > 0 {
            tracing::info!(reclaimed, "resuming transactions left unfinished by an earlier run");
        }
        let (stop, _) = watch::channel(false);
        let rounds = Arc::new(tokio::sync::Semaphore::new(config.max_rounds));
        let inner = Arc::new(Inner {
            store,
            transport,
            clock,
            config,
            counters: Counters::default(),
            driving: Mutex::new(Default::default()),
            rounds,
            pending_rounds: Default::default(),
            waiters: Mutex::new(HashMap::new()),
            tasks: Mutex::new(JoinSet::new()),
            wake: Notify::new(),
            stop,
        });
        let sched = inner.clone();
        inner.spawn(async move { sched.run_scheduler().await });
        if let Some(retain) = inner.config.retain_finished {
            let pruner = inner.clone();
            inner.spawn(async move { pruner.run_pruner(retain).await });
        }
        Ok(Coordinator { inner })
    }

    /// Deletes now every finished (confirmed or cancelled) transaction that finished more than
    /// `older_than` ago, in one pass over the store: how many it deleted. Flagged and unfinished
    /// transactions are never deleted; a deleted one is gone for good (reading it finds nothing,
    /// its id may be taken again). With [`Config::retain_finished`] set, the engine runs such a
    /// pass by itself, at least every minute.
    pub async fn prune_finished(&self, older_than: Duration) -> Result<usize> {
        self.inner.prune_pass(older_than).await
    }

    /// Begins a transaction that must be decided within `timeout`. `gid` lets a client choose the id
    /// (the DTM protocol does); `None` generates a time-ordered one.
    pub async fn begin(&self, gid: Option<Gid>, timeout: Duration) -> Result<Transaction> {
        self.begin_with(gid, timeout, TxOptions::default()).await
    }

    /// [`begin`](Self::begin) with per-transaction overrides of the retry policy. A transaction id
    /// that exists already is refused with [`Error::AlreadyExists`].
    pub async fn begin_with(
        &self,
        gid: Option<Gid>,
        timeout: Duration,
        options: TxOptions,
    ) -> Result<Transaction> {
        self.begin_registered(gid, timeout, options, Vec::new()).await
    }

    /// [`begin_with`](Self::begin_with) without waiting for the flush: the transaction is stored
    /// but durable only after the next [`sync`](Self::sync) or durable write (every decision is
    /// one). For an initiator in this process that overlaps the flush with other work (the embedded
    /// `tcc-http` client sends the first try meanwhile); it must not treat the transaction as begun
    /// to anyone else before a sync.
    pub async fn begin_deferred(
        &self,
        gid: Option<Gid>,
        timeout: Duration,
        options: TxOptions,
    ) -> Result<Transaction> {
        self.begin_registered_deferred(gid, timeout, options, Vec::new()).await
    }

    /// Begins a transaction with its branches registered in the same write: one flush instead of
    /// one per branch (and, over HTTP, one request instead of one per branch), for an initiator that
    /// knows every branch and its request before the first try. The rules are those of
    /// [`begin_with`](Self::begin_with) and [`register`](Self::register); a refused branch refuses
    /// the whole call and nothing is stored. Durable when it returns.
    pub async fn begin_registered(
        &self,
        gid: Option<Gid>,
        timeout: Duration,
        options: TxOptions,
        branches: Vec<NewBranch>,
    ) -> Result<Transaction> {
        let tx = self.begin_registered_deferred(gid, timeout, options, branches).await?;
        self.inner.store.sync().await?;
        Ok(tx)
    }

    /// [`begin_registered`](Self::begin_registered) without waiting for the flush; see
    /// [`begin_deferred`](Self::begin_deferred) and [`register_deferred`](Self::register_deferred).
    pub async fn begin_registered_deferred(
        &self,
        gid: Option<Gid>,
        timeout: Duration,
        options: TxOptions,
        branches: Vec<NewBranch>,
    ) -> Result<Transaction> {
        self.check_begin(timeout, &options)?;
        let ctx = self.inner.context();
        let generated = gid.is_none();
        let mut tx = state::begin(gid.unwrap_or_else(Gid::generate), ctx.now, ctx.now + timeout);
        tx.options = options;
        for NewBranch { id, target, payload } in branches {
            self.check_branch(&target, &payload)?;
            if let Transition::Changed(next, _) =
                state::apply(&tx, &Event::Register { id, target, payload }, &ctx)?
            {
                tx = next;
            }
        }
        tx.version = 1;
        if generated {
            self.inner.store.insert_generated_unsynced(&tx).await?;
        } else {
            self.inner.store.insert_unsynced(&tx).await?;
        }
        self.inner.counters.begun.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(tx = %tx.gid, deadline = %tx.deadline, "begun");
        Ok(tx)
    }

    /// Registers a branch. Call it before the branch's try runs, so that a cancel reaches the
    /// participant even if the try's answer is lost. Registering the same branch again with the same
    /// details is a no-op; a branch beyond [`Config::max_branches`] is refused by the state machine.
    pub async fn register(
        &self,
        gid: &Gid,
        id: BranchId,
        target: String,
        payload: Vec<u8>,
    ) -> Result<Transaction> {
        self.register_with(gid, None, id, target, payload, true).await
    }

    /// [`register`](Self::register) without waiting for the flush; see
    /// [`begin_deferred`](Self::begin_deferred). A try may be sent meanwhile: if the registration is
    /// lost in a crash, the transaction cannot be confirmed (its initiator never saw the
    /// registration acknowledged) and the participant releases the reservation at its deadline plus
    /// grace.
    pub async fn register_deferred(
        &self,
        gid: &Gid,
        id: BranchId,
        target: String,
        payload: Vec<u8>,
    ) -> Result<Transaction> {
        self.register_with(gid, None, id, target, payload, false).await
    }

    /// [`register`](Self::register) (with `durable`) or [`register_deferred`](Self::register_deferred)
    /// (without), judged first on `likely`, the caller's copy of the transaction, as
    /// [`decide_and_wait`](Self::decide_and_wait) does: a current copy saves reading the record, a
    /// stale one is caught by the store's compare-and-set and the record is read (pass a copy as the
    /// engine returned it, unmodified).
    pub async fn register_with(
        &self,
        gid: &Gid,
        likely: Option<&Transaction>,
        id: BranchId,
        target: String,
        payload: Vec<u8>,
        durable: bool,
    ) -> Result<Transaction> {
        self.check_branch(&target, &payload)?;
        let event = Event::Register { id, target, payload };
        let (tx, _) = self.inner.update_from(gid, likely, &event, durable).await?;
        Ok(tx)
    }

    /// Waits until every change made so far is durable.
    pub async fn sync(&self) -> Result<()> {
        self.inner.store.sync().await
    }

    fn check_branch(&self, target: &str, payload: &[u8]) -> Result<()> {
        let c = &self.inner.config;
        if payload.len() > c.max_payload {
            return Err(Error::InvalidInput(format!("payload is over {} bytes", c.max_payload)));
        }
        if target.is_empty() || target.len() > c.max_target {
            return Err(Error::InvalidInput(format!("target must be 1 to {} bytes", c.max_target)));
        }
        Ok(())
    }

    /// The rules of begin's timeout and options, shared by every kind of transaction.
    fn check_begin(&self, timeout: Duration, options: &TxOptions) -> Result<()> {
        let c = &self.inner.config;
        let limit = c.max_timeout.as_millis();
        for (name, value) in
            [("retry_interval", options.retry_interval_ms), ("call_timeout", options.call_timeout_ms)]
        {
            if value.is_some_and(|ms| ms == 0 || u128::from(ms) > limit) {
                return Err(Error::InvalidInput(format!(
                    "{name} must be between 1 ms and {} s",
                    c.max_timeout.as_secs()
                )));
            }
        }
        if options.call_timeout_ms.is_some_and(|ms| u128::from(ms) >= c.lease.as_millis()) {
            // A call outliving the lease would let another process start the same round meanwhile.
            return Err(Error::InvalidInput(format!(
                "call_timeout must be below the coordinator's lease of {} ms",
                c.lease.as_millis()
            )));
        }
        if timeout.is_zero() || timeout > c.max_timeout {
            return Err(Error::InvalidInput(format!(
                "timeout must be between 1 ms and {} s",
                c.max_timeout.as_secs()
            )));
        }
        Ok(())
    }

    /// Begins a saga and starts running it: its steps' actions run one at a time in order (or,
    /// with `concurrent`, each as soon as the steps named in its [`NewStep::after`] are done),
    /// each retried under the retry policy. An action that refuses (the transport's
    /// [`CallError::Permanent`](crate::transport::CallError), over HTTP a 409 or DTM's `FAILURE`)
    /// fails the saga: the steps that ran or may have run are compensated in reverse order and the
    /// steps after it never run. So does the deadline (`timeout`) passing before every action is
    /// done. Compensations are retried until they succeed, and the saga is flagged when the policy
    /// is spent. Durable when it returns; [`wait`](Self::wait) for the outcome.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use async_trait::async_trait;
    /// use tcc_core::transport::{BranchCall, CallError, Transport};
    /// use tcc_core::{Config, Coordinator, NewStep, SledStore, SystemClock, TxState};
    ///
    /// #[derive(Debug)]
    /// struct Ok_;
    /// #[async_trait]
    /// impl Transport for Ok_ {
    ///     async fn call(&self, _: BranchCall<'_>) -> Result<(), CallError> { Ok(()) }
    /// }
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = Arc::new(SledStore::open(dir.path()).unwrap());
    /// let tc = Coordinator::open(store, Arc::new(Ok_), Arc::new(SystemClock), Config::default()).await.unwrap();
    /// let step = |id: &str| NewStep {
    ///     id: id.parse().unwrap(),
    ///     action: format!("mem://{id}/charge"),
    ///     compensate: format!("mem://{id}/refund"),
    ///     payload: b"42".to_vec(),
    ///     after: vec![],
    /// };
    /// let tx = tc.begin_saga(None, Duration::from_secs(30), Default::default(), vec![step("pay"), step("mail")], false).await.unwrap();
    /// assert_eq!(tc.wait(&tx.gid, Duration::from_secs(5)).await.unwrap().state, TxState::Confirmed);
    /// tc.shutdown().await;
    /// # });
    /// ```
    pub async fn begin_saga(
        &self,
        gid: Option<Gid>,
        timeout: Duration,
        options: TxOptions,
        steps: Vec<NewStep>,
        concurrent: bool,
    ) -> Result<Transaction> {
        self.check_begin(timeout, &options)?;
        let ctx = self.inner.context();
        let generated = gid.is_none();
        let mut branches = Vec::with_capacity(steps.len());
        let mut saga = Saga { concurrent, steps: Vec::with_capacity(steps.len()) };
        for NewStep { id, action, compensate, payload, after } in steps {
            self.check_branch(&action, &payload)?;
            self.check_branch(&compensate, &[])?;
            branches.push(new_branch(id, action, payload));
            saga.steps.push(SagaStep { compensate, after, started: false });
        }
        let gid = gid.unwrap_or_else(Gid::generate);
        let Transition::Changed(mut tx, effects) = state::saga(gid, ctx.now + timeout, branches, saga, &ctx)?
        else {
            return Err(Error::Storage("a new saga must be stored".into()));
        };
        self.insert_new(&mut tx, generated).await?;
        self.inner.perform(&tx, effects);
        Ok(tx)
    }

    /// Prepares a two-phase message: its actions (`steps`) run, in order, once it is submitted
    /// ([`confirm`](Self::confirm)), each called until it succeeds; aborted
    /// ([`cancel`](Self::cancel)) none ever runs. Submit it once the initiator's local transaction
    /// committed, abort it if it rolled back. Still prepared at its deadline (`timeout`), the
    /// coordinator asks `query_prepared` (the transport's
    /// [`back_check`](crate::transport::Transport::back_check)): committed submits it, rolled
    /// back aborts it, anything else asks again later (flagged when the retry policy is spent).
    /// Durable when it returns.
    pub async fn prepare_message(
        &self,
        gid: Option<Gid>,
        timeout: Duration,
        options: TxOptions,
        steps: Vec<NewBranch>,
        query_prepared: String,
    ) -> Result<Transaction> {
        self.check_begin(timeout, &options)?;
        self.check_branch(&query_prepared, &[])?;
        let ctx = self.inner.context();
        let generated = gid.is_none();
        let branches = self.message_branches(steps)?;
        let gid = gid.unwrap_or_else(Gid::generate);
        let mut tx = state::message(gid, ctx.now + timeout, branches, Msg { query_prepared }, &ctx)?;
        tx.options = options;
        self.insert_new(&mut tx, generated).await?;
        Ok(tx)
    }

    /// Sends a message at once: prepared and submitted in one durable write, for an initiator
    /// with no local transaction to wait for (DTM's `submit` of a message never prepared). Its
    /// actions run in order, each until it succeeds; it is never back-checked.
    pub async fn submit_message(
        &self,
        gid: Option<Gid>,
        timeout: Duration,
        options: TxOptions,
        steps: Vec<NewBranch>,
    ) -> Result<Transaction> {
        self.check_begin(timeout, &options)?;
        let ctx = self.inner.context();
        let generated = gid.is_none();
        let branches = self.message_branches(steps)?;
        let gid = gid.unwrap_or_else(Gid::generate);
        let mut tx = state::message(gid, ctx.now + timeout, branches, Msg::default(), &ctx)?;
        tx.options = options;
        let Transition::Changed(mut tx, effects) = state::apply(&tx, &Event::Confirm, &ctx)? else {
            return Err(Error::Storage("a new message must be stored".into()));
        };
        self.insert_new(&mut tx, generated).await?;
        self.inner.perform(&tx, effects);
        Ok(tx)
    }

    /// A message's actions as its branches, each checked as a registration is.
    fn message_branches(&self, steps: Vec<NewBranch>) -> Result<Vec<Branch>> {
        let mut branches = Vec::with_capacity(steps.len());
        for NewBranch { id, target, payload } in steps {
            self.check_branch(&target, &payload)?;
            branches.push(new_branch(id, target, payload));
        }
        Ok(branches)
    }

    /// Stores a new transaction (version 1) durably and counts it.
    async fn insert_new(&self, tx: &mut Transaction, generated: bool) -> Result<()> {
        tx.version = 1;
        if generated {
            self.inner.store.insert_generated_unsynced(tx).await?;
        } else {
            self.inner.store.insert_unsynced(tx).await?;
        }
        self.inner.store.sync().await?;
        self.inner.counters.begun.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(tx = %tx.gid, kind = tx.kind.as_str(), deadline = %tx.deadline, "begun");
        Ok(())
    }

    /// Decides to confirm every branch. Returns once the decision is durable; phase two then runs in
    /// the background (see [`wait`](Self::wait)). Refused after the deadline, after a cancel, and for
    /// a transaction that is not trying any more, except that asking again is answered as before.
    pub async fn confirm(&self, gid: &Gid) -> Result<Transaction> {
        self.inner.decide(gid, None, &Event::Confirm).await
    }

    /// Decides to cancel every branch. Returns once the decision is durable. Refused once confirm was
    /// decided.
    pub async fn cancel(&self, gid: &Gid) -> Result<Transaction> {
        self.inner.decide(gid, None, &Event::Cancel).await
    }

    /// Decides as [`confirm`](Self::confirm) or [`cancel`](Self::cancel) would, then waits up to
    /// `wait` for the transaction to be final or flagged, as [`wait`](Self::wait) would (a zero
    /// `wait` answers at once with the decided transaction). Cheaper than the two calls: the waiter
    /// is in place before the decision is stored, so a phase two that finishes at once is seen
    /// without reading the record back.
    ///
    /// `likely`, when given, is the caller's copy of the transaction (as
    /// [`begin_registered`](Self::begin_registered) or a registration returned it): the decision
    /// is judged on it first, which saves reading the record when the copy is still the stored one
    /// (the store's compare-and-set checks that by version). A stale copy (a branch registered
    /// since, a cancel at the deadline), or one on which the decision would change nothing or be
    /// refused, makes it read and judge the stored record, so the answer is the same either way.
    /// The compare-and-set checks the copy's version only: pass a copy as the engine returned it,
    /// unmodified. A copy of another transaction is ignored.
    pub async fn decide_and_wait(
        &self,
        gid: &Gid,
        likely: Option<&Transaction>,
        decision: Decision,
        wait: Duration,
    ) -> Result<Transaction> {
        let event = match decision {
            Decision::Confirm => Event::Confirm,
            Decision::Cancel => Event::Cancel,
        };
        let inner = &self.inner;
        if wait.is_zero() {
            return inner.decide(gid, likely, &event).await;
        }
        let until = inner.clock.now() + wait;
        let rx = inner.waiter(gid);
        match inner.decide(gid, likely, &event).await {
            Ok(decided) => self.wait_until(gid, until, Some((decided, rx))).await,
            Err(e) => {
                drop(rx);
                inner.forget_waiters(gid);
                Err(e)
            }
        }
    }

    /// The transaction as stored.
    pub async fn get(&self, gid: &Gid) -> Result<Transaction> {
        self.inner.store.get(gid).await?.ok_or_else(|| Error::NotFound(gid.clone()))
    }

    /// Lists transactions, optionally in one state, a page at a time.
    pub async fn list(&self, query: &ListQuery) -> Result<Page> {
        self.inner.store.list(query).await
    }

    /// How many transactions are in `state` (for example how many wait for an operator).
    pub async fn count(&self, state: TxState) -> Result<u64> {
        self.inner.store.count(state).await
    }

    /// Operator action: run phase two again now with a fresh retry budget, for a flagged transaction
    /// (or one waiting for its next retry).
    pub async fn retry(&self, gid: &Gid) -> Result<Transaction> {
        self.inner.decide(gid, None, &Event::OperatorRetry).await
    }

    /// Operator action: declare a flagged transaction finished with `outcome`, after resolving its
    /// remaining branches by hand. Only the transaction's own decision can be forced.
    pub async fn force(&self, gid: &Gid, outcome: Decision) -> Result<Transaction> {
        self.inner.decide(gid, None, &Event::OperatorForce(outcome)).await
    }

    /// Waits until the transaction is final or flagged, or `timeout` passes (then returns it as it is).
    pub async fn wait(&self, gid: &Gid, timeout: Duration) -> Result<Transaction> {
        self.wait_until(gid, self.inner.clock.now() + timeout, None).await
    }

    /// [`wait`](Self::wait) until `until`. `known` is the transaction as this process has just
    /// stored it, with a waiter put in place before that write: it stands for the first read.
    async fn wait_until(
        &self,
        gid: &Gid,
        until: Timestamp,
        mut known: Option<(Transaction, oneshot::Receiver<Transaction>)>,
    ) -> Result<Transaction> {
        let inner = &self.inner;
        loop {
            let (current, rx) = match known.take() {
                // Once the time is up the answer is the record as it is now: read it then.
                Some((tx, rx))
                    if tx.state.is_final() || tx.state == TxState::Flagged || inner.clock.now() < until =>
                {
                    (tx, rx)
                }
                _ => {
                    let rx = inner.waiter(gid);
                    (self.get(gid).await?, rx)
                }
            };
            let now = inner.clock.now();
            if current.state.is_final() || current.state == TxState::Flagged || now >= until {
                drop(rx);
                inner.forget_waiters(gid);
                return Ok(current);
            }
            // Another process may finish it; look again now and then even without a wake-up.
            let nap = until.since(now).min(inner.config.poll_interval * 10);
            tokio::select! {
                // Woken by this process's own write: the transaction as it stored it, final or
                // flagged, no need to read it back.
                Ok(stored) = rx => return Ok(stored),
                _ = inner.clock.sleep(nap) => {}
            }
        }
    }

    /// The engine's counters.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            begun: get(&c.begun),
            confirmed: get(&c.confirmed),
            cancelled: get(&c.cancelled),
            flagged: get(&c.flagged),
            phase_two_calls: get(&c.phase_two_calls),
            phase_two_failures: get(&c.phase_two_failures),
            retries: get(&c.retries),
            expired: get(&c.expired),
            pruned: get(&c.pruned),
        }
    }

    /// The store the engine writes to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The settings the engine runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Stops the scheduler and waits for phase-two rounds in flight to finish. Work not finished
    /// resumes when a coordinator next opens the store.
    pub async fn shutdown(self) {
        self.stop().await;
    }

    /// [`shutdown`](Self::shutdown) through a shared reference, for an engine held in an `Arc`: stops
    /// the scheduler, refuses new phase-two work and waits for rounds in flight. Requests still
    /// answer, but decisions taken after this are carried out only when a coordinator next opens the
    /// store.
    ///
    /// Phase-two results are recorded without waiting for the flush (losing one only repeats a
    /// round); stopping flushes them, so a clean restart does not call participants again for
    /// rounds already done.
    pub async fn stop(&self) {
        let _ = self.inner.stop.send(true);
        self.inner.wake.notify_waiters();
        let mut tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        while tasks.join_next().await.is_some() {}
        if let Err(e) = self.inner.store.sync().await {
            tracing::warn!(
                "flushing the store while stopping: {e}; unflushed rounds repeat on the next start"
            );
        }
    }

    /// Whether [`stop`](Self::stop) (or [`abort`](Self::abort)) was called: no new phase-two work
    /// starts in this process any more.
    pub fn is_stopping(&self) -> bool {
        *self.inner.stop.borrow()
    }

    /// Stops at once, as a crash would: rounds in flight are abandoned mid-way. Their transactions
    /// resume on the next open. For tests and for a process that must go down now.
    pub async fn abort(self) {
        let _ = self.inner.stop.send(true);
        let mut tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

impl Inner {
    pub(crate) fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut tasks = lock(&self.tasks);
        // Reap finished tasks so the set does not grow with every transaction.
        while tasks.try_join_next().is_some() {}
        if !*self.stop.borrow() {
            tasks.spawn(fut);
        }
    }

    /// Starts a phase-two round for `tx` in the background, counted in `pending_rounds` until it
    /// ends (however it ends).
    pub(crate) fn spawn_drive(self: &Arc<Self>, tx: Transaction) {
        let pending = PendingRound::new(self.clone());
        let me = self.clone();
        self.spawn(async move {
            let _pending = pending;
            me.drive(tx).await;
        });
    }

    pub(crate) fn context(&self) -> Context<'_> {
        let now = self.clock.now();
        let c = &self.config;
        Context {
            now,
            owner: &c.owner,
            lease_until: now + c.lease,
            max_branches: c.max_branches,
            max_tx_payload: c.max_tx_payload,
        }
    }

    /// Reads, applies `event`, stores with compare-and-set, re-applying on a lost race. Returns the
    /// transaction as stored and the effects still to perform. With `durable` false the change need
    /// not be on disk when this returns (see [`Store::compare_and_set_unsynced`]): only for changes
    /// nobody is told of as a durable fact, whose loss makes the work run again.
    pub(crate) async fn update_with(
        &self,
        gid: &Gid,
        event: &Event,
        durable: bool,
    ) -> Result<(Transaction, Vec<Effect>)> {
        self.update_from(gid, None, event, durable).await
    }

    /// [`update_with`](Self::update_with), first trying the change on `likely`, the caller's copy
    /// of the transaction, which saves reading it when it is still the stored one (phase two's
    /// copy usually is). The compare-and-set refuses a stale copy; then, or when the event would
    /// change nothing on it, the stored record is read as usual.
    pub(crate) async fn update_from(
        &self,
        gid: &Gid,
        likely: Option<&Transaction>,
        event: &Event,
        durable: bool,
    ) -> Result<(Transaction, Vec<Effect>)> {
        // A copy of another transaction is no copy of this one (the write would go to the other).
        let mut likely = likely.filter(|tx| &tx.gid == gid);
        for _ in 0..MAX_CAS_ROUNDS {
            let read;
            let (current, guessed) = match likely.take() {
                Some(tx) => (tx, true),
                None => {
                    read = self.store.get(gid).await?.ok_or_else(|| Error::NotFound(gid.clone()))?;
                    (&read, false)
                }
            };
            let ctx = self.context();
            let transition = match state::apply(current, event, &ctx) {
                // A refusal or no change, judged on a copy that may be stale: judge the stored one.
                Err(_) | Ok(Transition::Unchanged) if guessed => continue,
                other => other?,
            };
            match transition {
                Transition::Unchanged => {
                    // What we answer from may not be flushed yet (another writer's change); make sure
                    // it is before acknowledging it.
                    self.store.sync().await?;
                    return Ok((current.clone(), Vec::new()));
                }
                Transition::Changed(mut next, effects) => {
                    next.version = current.version + 1;
                    let cas = if durable {
                        self.store.compare_and_set(current.version, &next).await?
                    } else {
                        self.store.compare_and_set_unsynced(current.version, &next).await?
                    };
                    match cas {
                        Cas::Stored => return Ok((next, effects)),
                        Cas::Conflict(_) => continue,
                    }
                }
            }
        }
        Err(Error::Conflict(gid.clone()))
    }

    /// Stores a decision durably (judged first on `likely`, see [`update_from`](Self::update_from))
    /// and starts what it sets off.
    async fn decide(
        self: &Arc<Self>,
        gid: &Gid,
        likely: Option<&Transaction>,
        event: &Event,
    ) -> Result<Transaction> {
        let (tx, effects) = self.update_from(gid, likely, event, true).await?;
        self.perform(&tx, effects);
        Ok(tx)
    }

    /// Carries out the effects of a stored transition.
    pub(crate) fn perform(self: &Arc<Self>, tx: &Transaction, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::DrivePhaseTwo => self.spawn_drive(tx.clone()),
                Effect::Finished(state) => {
                    let counter = match state {
                        TxState::Confirmed => &self.counters.confirmed,
                        _ => &self.counters.cancelled,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(tx = %tx.gid, state = %state, "finished");
                    self.notify(tx);
                }
                Effect::Flagged(error) => {
                    self.counters.flagged.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        tx = %tx.gid,
                        decision = ?tx.decision,
                        attempts = tx.attempts,
                        error = %error,
                        "phase two gave up; the transaction is flagged for an operator"
                    );
                    self.notify(tx);
                }
                Effect::CallBackCheck => self.spawn_back_check(tx.clone()),
            }
        }
    }

    /// A waiter for `gid`: it gets the transaction when this process stores it final or flagged.
    fn waiter(&self, gid: &Gid) -> oneshot::Receiver<Transaction> {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).entry(gid.clone()).or_default().push(tx);
        rx
    }

    /// Drops waiters that stopped waiting, so the map does not keep them.
    fn forget_waiters(&self, gid: &Gid) {
        let mut waiters = lock(&self.waiters);
        if let Some(list) = waiters.get_mut(gid) {
            list.retain(|w| !w.is_closed());
            if list.is_empty() {
                waiters.remove(gid);
            }
        }
    }

    /// Hands `tx` (final or flagged, as stored) to everyone waiting for it.
    fn notify(&self, tx: &Transaction) {
        if let Some(waiters) = lock(&self.waiters).remove(&tx.gid) {
            for w in waiters {
                let _ = w.send(tx.clone());
            }
        }
    }
}

/// A round counted in [`Inner::pending_rounds`] until dropped. Dropping the one that frees room
/// for the scheduler wakes it, so a backlog is worked through as fast as rounds finish.
struct PendingRound(Arc<Inner>);

impl PendingRound {
    fn new(inner: Arc<Inner>) -> PendingRound {
        inner.pending_rounds.fetch_add(1, Ordering::AcqRel);
        PendingRound(inner)
    }
}

impl Drop for PendingRound {
    fn drop(&mut self) {
        let before = self.0.pending_rounds.fetch_sub(1, Ordering::AcqRel);
        if before == self.0.config.max_rounds {
            self.0.wake.notify_one();
        }
    }
}
