//! The participant runtime over real loopback sockets: the status codes of the wire protocol, the
//! three TCC anomalies, the body limit and the participant's own expiry; for synchronous operations
//! and for async ones (`AsyncOperation`, staged writes committed through the barrier).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionResult, TransactionalTree, abort};
use tcc_core::barrier::{BARRIER_TREE, BarrierState, SledBarrier};
use tcc_core::{BranchId, Clock, Gid, ManualClock, Timestamp};
use tcc_http::ErrorBody;
use tcc_http::participant::{Call, MAX_RUNS, OUTCOME_HEADER, Operation, Participant, decode_stored_request};
use tcc_http::protocol::{
    BRANCH_HEADER, BatchAnswer, DEADLINE_HEADER, GID_HEADER, MAX_BATCH_CALLS, MAX_BODY, TryBatchAnswer,
};
use tcc_http::staged::{AsyncOperation, Disposition, Phase, StoreError, TccContext, TccError};
use tokio::sync::oneshot;

const START: Timestamp = Timestamp(1_700_000_000_000);
const GRACE: Duration = Duration::from_secs(5);
const LIFETIME: Duration = Duration::from_secs(30);

/// Tree indexes of the business trees, in the order given to the barrier.
const SEATS: usize = 0;
const ROOMS: usize = 1;
const CALLS: usize = 2;

/// Adds one to the committed count of `key` (so sled re-running a closure cannot inflate it).
fn bump(calls: &TransactionalTree, key: String) -> ConflictableTransactionResult<(), String> {
    let n = calls.get(key.as_bytes())?.map_or(0, |v| u64::from_be_bytes(v.as_ref().try_into().unwrap()));
    calls.insert(key.as_bytes(), &(n + 1).to_be_bytes())?;
    Ok(())
}

/// The business: try holds the item named by the request in tree `tree`, confirm sells it, cancel
/// frees it. Every run is counted in the calls tree under `{operation}:{phase}`.
fn hold(call: &Call<'_>, tree: usize) -> ConflictableTransactionResult<Vec<u8>, String> {
    let item = String::from_utf8_lossy(call.request()).into_owned();
    if call.tree(tree).get(call.request())?.is_some() {
        return abort(format!("{item} is taken"));
    }
    call.tree(tree).insert(call.request(), format!("held:{}", call.gid()).as_bytes())?;
    bump(call.tree(CALLS), format!("{}:try", call.operation()))?;
    Ok(format!("held {item}").into_bytes())
}

fn sell(call: &Call<'_>, tree: usize) -> ConflictableTransactionResult<(), String> {
    call.tree(tree).insert(call.request(), "sold")?;
    bump(call.tree(CALLS), format!("{}:confirm", call.operation()))
}

fn free(call: &Call<'_>, tree: usize) -> ConflictableTransactionResult<(), String> {
    call.tree(tree).remove(call.request())?;
    bump(call.tree(CALLS), format!("{}:cancel", call.operation()))
}

/// `hold_seat`, as a type implementing [`Operation`]; seat names are 1 to 8 letters and digits.
struct HoldSeat;

impl Operation for HoldSeat {
    type Error = String;

    fn check(&self, request: &[u8]) -> Result<(), String> {
        if (1..=8).contains(&request.len()) && request.iter().all(u8::is_ascii_alphanumeric) {
            Ok(())
        } else {
            Err("a seat is 1 to 8 letters and digits".into())
        }
    }

    fn try_(&self, call: &Call<'_>) -> ConflictableTransactionResult<Vec<u8>, String> {
        hold(call, SEATS)
    }

    fn confirm(&self, call: &Call<'_>) -> ConflictableTransactionResult<(), String> {
        sell(call, SEATS)
    }

    fn cancel(&self, call: &Call<'_>) -> ConflictableTransactionResult<(), String> {
        free(call, SEATS)
    }
}

/// Free, held and sold units of an item, as the async operation `reserve` keeps them (versioned, in
/// the rooms tree under `stock/{item}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Stock {
    free: u32,
    held: u32,
    sold: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct ReserveRequest {
    item: String,
    /// Swallow store errors and carry on (the runtime must still not commit).
    #[serde(default)]
    lenient: bool,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Reserved {
    item: String,
    left: u32,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
enum ReserveError {
    #[error("only {left} of {item} left")]
    NotEnough { item: String, left: u32 },
    #[error("the warehouse is offline")]
    Offline,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TccError for ReserveError {
    fn disposition(&self) -> Disposition {
        match self {
            ReserveError::Offline => Disposition::Transient,
            _ => Disposition::Refuse,
        }
    }
}

fn stock_key(item: &str) -> String {
    format!("stock/{item}")
}

/// A try paused inside its business method: `started` fires once it has read, `release` lets it go on.
struct Pause {
    started: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
}

/// `reserve`: an async operation holding one unit of an item; the test steers and counts it.
#[derive(Default)]
struct Reserve {
    tries: AtomicUsize,
    confirms: AtomicUsize,
    cancels: AtomicUsize,
    /// Phases seen, with the context's deadline.
    seen: Mutex<Vec<(Phase, Timestamp)>>,
    offline: AtomicU32,
    panic_next: AtomicBool,
    pause: Mutex<Option<Pause>>,
    /// For item `hot`: the participant, to change the stock behind every run's back.
    meddler: OnceLock<Participant>,
}

impl Reserve {
    fn runs(&self) -> (usize, usize, usize) {
        (
            self.tries.load(Ordering::SeqCst),
            self.confirms.load(Ordering::SeqCst),
            self.cancels.load(Ordering::SeqCst),
        )
    }

    fn move_one(
        &self,
        ctx: &TccContext,
        req: &ReserveRequest,
        f: impl FnOnce(&mut Stock),
    ) -> Result<Stock, ReserveError> {
        let key = stock_key(&req.item);
        let current = match ctx.get::<Stock>("rooms", &key) {
            Ok(Some(s)) => s,
            Ok(None) => return Err(ReserveError::NotEnough { item: req.item.clone(), left: 0 }),
            Err(_) if req.lenient => return Ok(Stock::default()),
            Err(e) => return Err(e.into()),
        };
        let mut next = current.value;
        f(&mut next);
        ctx.put("rooms", &key, &next, current.version)?;
        Ok(next)
    }
}

/// The operation as registered; the test keeps the `Reserve` to steer it.
struct ReserveOp(Arc<Reserve>);

impl std::ops::Deref for ReserveOp {
    type Target = Reserve;
    fn deref(&self) -> &Reserve {
        &self.0
    }
}

impl AsyncOperation for ReserveOp {
    type Request = ReserveRequest;
    type Response = Reserved;
    type Error = ReserveError;

    /// The typed error travels as the answer's `detail` (what `#[tcc]` generates for a `Serialize` error).
    fn error_detail(error: &ReserveError) -> Option<serde_json::Value> {
        serde_json::to_value(error).ok()
    }

    async fn try_(&self, ctx: TccContext, req: ReserveRequest) -> Result<Reserved, ReserveError> {
        self.tries.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().unwrap().push((ctx.phase(), ctx.deadline()));
        if self.panic_next.swap(false, Ordering::SeqCst) {
            panic!("the business try panicked");
        }
        if self.offline.load(Ordering::SeqCst) > 0 {
            self.offline.fetch_sub(1, Ordering::SeqCst);
            return Err(ReserveError::Offline);
        }
        let key = stock_key(&req.item);
        let current = match ctx.get::<Stock>("rooms", &key) {
            Ok(Some(s)) => s,
            Ok(None) => return Err(ReserveError::NotEnough { item: req.item, left: 0 }),
            Err(_) if req.lenient => return Ok(Reserved { item: req.item, left: 0 }),
            Err(e) => return Err(e.into()),
        };
        if current.value.free == 0 {
            return Err(ReserveError::NotEnough { item: req.item, left: 0 });
        }
        let pause = self.pause.lock().unwrap().take();
        if let Some(p) = pause {
            let _ = p.started.send(());
            let _ = p.release.await;
        }
        if req.item == "hot" {
            let meddled = Stock { free: current.value.free + 1, ..current.value };
            self.meddler.get().unwrap().seed("rooms", &key, &meddled).unwrap();
        }
        let next = Stock { free: current.value.free - 1, held: current.value.held + 1, ..current.value };
        ctx.put("rooms", &key, &next, current.version)?;
        Ok(Reserved { item: req.item, left: next.free })
    }

    async fn confirm(&self, ctx: TccContext, req: ReserveRequest) -> Result<(), ReserveError> {
        self.confirms.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().unwrap().push((ctx.phase(), ctx.deadline()));
        self.move_one(&ctx, &req, |s| {
            s.held -= 1;
            s.sold += 1;
        })
        .map(drop)
    }

    async fn cancel(&self, ctx: TccContext, req: ReserveRequest) -> Result<(), ReserveError> {
        self.cancels.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().unwrap().push((ctx.phase(), ctx.deadline()));
        self.move_one(&ctx, &req, |s| {
            s.held -= 1;
            s.free += 1;
        })
        .map(drop)
    }
}

/// One participant with three synchronous operations (`hold_seat`, `hold_room`, `blob`) and one
/// async one (`reserve`) served on a loopback port under `/tcc`, on a manual clock.
struct Fixture {
    db: tcc_core::DurableDb,
    clock: ManualClock,
    participant: Participant,
    addr: SocketAddr,
    http: reqwest::Client,
    reserve: Arc<Reserve>,
    waiting: WaitSignal,
}

/// Where the next cancel to stop and wait inside the participant reports it (see [`report_waiting`]).
type WaitSignal = Arc<Mutex<Option<oneshot::Sender<()>>>>;

/// A layer in front of the participant's router: a cancel's body is read whole first, so that the
/// first time the participant's handler has to wait is at the branch lock (extracting the path,
/// headers and a whole body never waits); then the first `Pending` of the handler reports, once, to
/// the [`WaitSignal`] set by [`Fixture::next_cancel_waits`].
async fn report_waiting(
    axum::extract::State(signal): axum::extract::State<WaitSignal>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if !req.uri().path().ends_with("/cancel") {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let mut handler = std::pin::pin!(next.run(axum::extract::Request::from_parts(parts, body.into())));
    std::future::poll_fn(|cx| {
        let polled = handler.as_mut().poll(cx);
        if polled.is_pending()
            && let Some(waiting) = signal.lock().unwrap().take()
        {
            let _ = waiting.send(());
        }
        polled
    })
    .await
}

/// The answer to one call.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    outcome: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    fn error(&self) -> ErrorBody {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{} answered a non-ErrorBody ({e}): {:?}", self.status, self.body))
    }

    /// Asserts an error answer and returns its body.
    fn expect_error(&self, status: StatusCode, code: &str) -> ErrorBody {
        assert_eq!(self.status, status, "{:?}", String::from_utf8_lossy(&self.body));
        let body = self.error();
        assert_eq!(body.code, code, "{body:?}");
        body
    }

    fn expect_ok(&self, outcome: &str) {
        assert_eq!(self.status, StatusCode::OK, "{:?}", String::from_utf8_lossy(&self.body));
        assert_eq!(self.outcome.as_deref(), Some(outcome));
    }
}

impl Fixture {
    async fn start() -> Fixture {
        Fixture::start_with(true).await
    }

    async fn start_with(group_commit: bool) -> Fixture {
        let db = tcc_core::DurableDb::temporary().unwrap();
        let trees = ["seats", "rooms", "calls"].map(|t| db.open_tree(t).unwrap()).to_vec();
        let clock = ManualClock::new(START);
        let barrier = SledBarrier::open(&db, trees, Arc::new(clock.clone()), GRACE).unwrap();
        let participant = if group_commit {
            Participant::new(barrier).unwrap()
        } else {
            Participant::with_barrier_durability(barrier)
        };
        let participant = participant
            .operation("hold_seat", HoldSeat)
            .operation_fn("hold_room", |c| hold(c, ROOMS), |c| sell(c, ROOMS), |c| free(c, ROOMS))
            .operation_fn(
                "blob",
                |c| Ok::<_, _>(c.request().len().to_string().into_bytes()),
                |_| Ok(()),
                |_| Ok::<_, sled::transaction::ConflictableTransactionError<String>>(()),
            );
        // `fragile`: its confirm panics on the request `boom`.
        let participant = participant.operation_fn(
            "fragile",
            |_| Ok::<_, sled::transaction::ConflictableTransactionError<String>>(Vec::new()),
            |c| {
                assert!(c.request() != b"boom", "the business confirm panicked");
                Ok(())
            },
            |_| Ok(()),
        );
        let reserve = Arc::new(Reserve::default());
        let participant = participant.async_operation("reserve", ReserveOp(Arc::clone(&reserve)));
        let _ = reserve.meddler.set(participant.clone());
        let waiting = WaitSignal::default();
        let app = axum::Router::new()
            .nest("/tcc", participant.router())
            .layer(axum::middleware::from_fn_with_state(Arc::clone(&waiting), report_waiting));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Fixture { db, clock, participant, addr, http, reserve, waiting }
    }

    /// Resolves once the next cancel is inside the participant's handler and has to wait there.
    fn next_cancel_waits(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        *self.waiting.lock().unwrap() = Some(tx);
        rx
    }

    fn deadline(&self) -> u64 {
        (self.clock.now() + LIFETIME).0
    }

    /// `POST /tcc/{op}/{phase}` with the given headers and body.
    async fn post(&self, op: &str, phase: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Answer {
        let mut req = self.http.post(format!("http://{}/tcc/{op}/{phase}", self.addr)).body(body);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let outcome = res.headers().get(OUTCOME_HEADER).map(|v| v.to_str().unwrap().to_owned());
        Answer { status, outcome, body: res.bytes().await.unwrap().to_vec() }
    }

    /// A call as the coordinator makes it: gid, branch and deadline headers.
    async fn call(&self, op: &str, phase: &str, gid: &str, branch: &str, body: &str) -> Answer {
        let deadline = self.deadline().to_string();
        let headers = [(GID_HEADER, gid), (BRANCH_HEADER, branch), (DEADLINE_HEADER, deadline.as_str())];
        self.post(op, phase, &headers, body.as_bytes().to_vec()).await
    }

    async fn try_with_deadline(
        &self,
        op: &str,
        gid: &str,
        branch: &str,
        deadline: u64,
        body: &str,
    ) -> Answer {
        let deadline = deadline.to_string();
        let headers = [(GID_HEADER, gid), (BRANCH_HEADER, branch), (DEADLINE_HEADER, deadline.as_str())];
        self.post(op, "try", &headers, body.as_bytes().to_vec()).await
    }

    fn tree(&self, name: &str) -> sled::Tree {
        self.db.open_tree(name).unwrap()
    }

    fn item(&self, tree: &str, key: &str) -> Option<String> {
        self.tree(tree).get(key).unwrap().map(|v| String::from_utf8(v.to_vec()).unwrap())
    }

    /// How many times `{op}:{phase}` committed.
    fn runs(&self, op: &str, phase: &str) -> u64 {
        self.tree("calls")
            .get(format!("{op}:{phase}"))
            .unwrap()
            .map_or(0, |v| u64::from_be_bytes(v.as_ref().try_into().unwrap()))
    }

    fn total_runs(&self) -> usize {
        self.tree("calls").len()
    }

    fn stock(&self, item: &str) -> Stock {
        self.participant.read::<Stock>("rooms", stock_key(item)).unwrap().map(|v| v.value).unwrap_or_default()
    }

    fn set_stock(&self, item: &str, free: u32) {
        self.participant.seed("rooms", stock_key(item), &Stock { free, ..Stock::default() }).unwrap();
    }

    /// A call of `reserve` for `item`.
    async fn reserve(&self, phase: &str, gid: &str, branch: &str, item: &str) -> Answer {
        let body = serde_json::json!({ "item": item }).to_string();
        self.call("reserve", phase, gid, branch, &body).await
    }

    /// Starts the try of `tx-1` at `shop` for `item` and returns once its business method is
    /// paused inside, with the sender that lets it go on.
    async fn paused_try(
        self: &Arc<Self>,
        item: &str,
    ) -> (tokio::task::JoinHandle<Answer>, oneshot::Sender<()>) {
        let (started, wait_started) = oneshot::channel();
        let (go, release) = oneshot::channel();
        *self.reserve.pause.lock().unwrap() = Some(Pause { started, release });
        let f = Arc::clone(self);
        let item = item.to_owned();
        let tried = tokio::spawn(async move { f.reserve("try", "tx-1", "shop", &item).await });
        wait_started.await.unwrap();
        (tried, go)
    }

    fn state(&self, gid: &str, branch: &str) -> Option<BarrierState> {
        let (gid, branch): (Gid, BranchId) = (gid.parse().unwrap(), branch.parse().unwrap());
        self.participant.barrier().get(&gid, &branch).unwrap().map(|r| r.state)
    }
}

/// Waits (bounded) until `done` holds; panics if it never does.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..2_000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_then_confirm_sells_the_seat() {
    let f = Fixture::start().await;
    let held = f.call("hold_seat", "try", "tx-1", "flight", "12A").await;
    held.expect_ok("fresh");
    assert_eq!(held.body, b"held 12A");
    assert_eq!(f.item("seats", "12A").as_deref(), Some("held:tx-1"));
    assert_eq!(f.state("tx-1", "flight"), Some(BarrierState::Tried));
    assert_eq!(f.participant.barrier().held(), 1);

    // Confirm runs on the try's stored request, whatever its own body says.
    f.call("hold_seat", "confirm", "tx-1", "flight", "99Z").await.expect_ok("confirmed");
    assert_eq!(f.item("seats", "12A").as_deref(), Some("sold"));
    assert_eq!(f.item("seats", "99Z"), None);
    assert_eq!(f.state("tx-1", "flight"), Some(BarrierState::Confirmed));
    assert_eq!(f.participant.barrier().held(), 0);

    // The stored request names the operation, which the expiry sweep relies on.
    let (gid, branch): (Gid, BranchId) = ("tx-1".parse().unwrap(), "flight".parse().unwrap());
    let record = f.participant.barrier().get(&gid, &branch).unwrap().unwrap();
    assert_eq!(decode_stored_request(&record.request), Some(("hold_seat", &b"12A"[..])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_then_cancel_releases_the_seat() {
    let f = Fixture::start().await;
    f.call("hold_seat", "try", "tx-1", "flight", "12A").await.expect_ok("fresh");
    f.call("hold_seat", "cancel", "tx-1", "flight", "12A").await.expect_ok("cancelled");
    assert_eq!(f.item("seats", "12A"), None);
    assert_eq!(f.state("tx-1", "flight"), Some(BarrierState::Cancelled));
    assert_eq!((f.runs("hold_seat", "try"), f.runs("hold_seat", "cancel")), (1, 1));
    assert_eq!(f.participant.barrier().held(), 0);
    // The seat is free for another transaction.
    f.call("hold_seat", "try", "tx-2", "flight", "12A").await.expect_ok("fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_calls_run_the_business_once() {
    let f = Fixture::start().await;
    f.call("hold_seat", "try", "tx-1", "flight", "12A").await.expect_ok("fresh");
    let again = f.call("hold_seat", "try", "tx-1", "flight", "12A").await;
    again.expect_ok("duplicate");
    assert_eq!(again.body, b"held 12A", "a duplicate try gets the stored result");

    f.call("hold_seat", "confirm", "tx-1", "flight", "").await.expect_ok("confirmed");
    for _ in 0..3 {
        f.call("hold_seat", "confirm", "tx-1", "flight", "").await.expect_ok("duplicate");
    }
    // A try repeated after confirm is a duplicate too.
    f.call("hold_seat", "try", "tx-1", "flight", "12A").await.expect_ok("duplicate");
    assert_eq!((f.runs("hold_seat", "try"), f.runs("hold_seat", "confirm")), (1, 1));

    f.call("hold_seat", "try", "tx-2", "flight", "14C").await.expect_ok("fresh");
    f.call("hold_seat", "cancel", "tx-2", "flight", "").await.expect_ok("cancelled");
    for _ in 0..3 {
        f.call("hold_seat", "cancel", "tx-2", "flight", "").await.expect_ok("duplicate");
    }
    assert_eq!(f.runs("hold_seat", "cancel"), 1);
    assert_eq!(f.item("seats", "12A").as_deref(), Some("sold"));
    assert_eq!(f.item("seats", "14C"), None);

    // Crossed phase-two calls are refused, and change nothing.
    f.call("hold_seat", "cancel", "tx-1", "flight", "")
        .await
        .expect_error(StatusCode::CONFLICT, "already_confirmed");
    f.call("hold_seat", "confirm", "tx-2", "flight", "")
        .await
        .expect_error(StatusCode::CONFLICT, "already_cancelled");
    assert_eq!(f.item("seats", "12A").as_deref(), Some("sold"));
    assert_eq!((f.runs("hold_seat", "confirm"), f.runs("hold_seat", "cancel")), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_cancel_then_late_try_is_refused_as_suspended() {
    let f = Fixture::start().await;
    f.call("hold_seat", "cancel", "tx-1", "flight", "12A").await.expect_ok("empty");
    assert_eq!(f.state("tx-1", "flight"), Some(BarrierState::CancelledEmpty));
    f.call("hold_seat", "cancel", "tx-1", "flight", "12A").await.expect_ok("duplicate");

    let late = f.call("hold_seat", "try", "tx-1", "flight", "12A").await;
    late.expect_error(StatusCode::CONFLICT, "suspended");
    assert_eq!(f.item("seats", "12A"), None, "the suspended try reserved nothing");
    assert_eq!(f.total_runs(), 0, "no business method ran");
    assert_eq!(f.participant.barrier().held(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_at_or_after_its_deadline_is_refused() {
    let f = Fixture::start().await;
    let now = f.clock.now().0;
    for (branch, deadline) in [("a", now), ("b", now - 1), ("c", 0)] {
        let late = f.try_with_deadline("hold_seat", "tx-1", branch, deadline, "12A").await;
        let body = late.expect_error(StatusCode::CONFLICT, "deadline_passed");
        assert!(body.message.contains("deadline"), "{body:?}");
        assert_eq!(f.state("tx-1", branch), None, "nothing stored");
    }
    // The participant's clock decides: a deadline that was ahead is not once the clock passes it.
    let deadline = f.deadline();
    f.clock.advance(LIFETIME);
    f.try_with_deadline("hold_seat", "tx-2", "flight", deadline, "12A")
        .await
        .expect_error(StatusCode::CONFLICT, "deadline_passed");
    assert_eq!(f.total_runs(), 0);
    assert_eq!(f.item("seats", "12A"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_without_try_is_refused_as_not_tried() {
    let f = Fixture::start().await;
    let body = f
        .call("hold_seat", "confirm", "tx-1", "flight", "12A")
        .await
        .expect_error(StatusCode::CONFLICT, "not_tried");
    assert!(body.message.contains("no try"), "{body:?}");
    assert_eq!(f.state("tx-1", "flight"), None);
    assert_eq!(f.total_runs(), 0);
    // And it did not block the try that may still come.
    f.call("hold_seat", "try", "tx-1", "flight", "12A").await.expect_ok("fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_malformed_headers_are_400_and_run_nothing() {
    let f = Fixture::start().await;
    let ok_deadline = f.deadline().to_string();
    let d = ok_deadline.as_str();
    let long_branch = "b".repeat(129);
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("try", vec![(BRANCH_HEADER, "flight"), (DEADLINE_HEADER, d)]),
        ("try", vec![(GID_HEADER, "tx-1"), (DEADLINE_HEADER, d)]),
        ("try", vec![(GID_HEADER, "tx-1"), (BRANCH_HEADER, "flight")]),
        ("try", vec![(GID_HEADER, "tx-1"), (BRANCH_HEADER, "flight"), (DEADLINE_HEADER, "soon")]),
        ("try", vec![(GID_HEADER, "tx-1"), (BRANCH_HEADER, "flight"), (DEADLINE_HEADER, "")]),
        ("try", vec![(GID_HEADER, "tx-1"), (BRANCH_HEADER, "flight"), (DEADLINE_HEADER, "-5")]),
        ("try", vec![(GID_HEADER, "tx-1"), (BRANCH_HEADER, "flight"), (DEADLINE_HEADER, "+5")]),
        ("try", vec![(GID_HEADER, "tx-1"), (BRANCH_HEADER, "flight"), (DEADLINE_HEADER, "1.5e12")]),
        ("try", vec![(GID_HEADER, "tx-1"), (BRANCH_HEADER, "flight"), (DEADLINE_HEADER, "99999999999999999999999")]),
        ("try", vec![(GID_HEADER, "not ok!"), (BRANCH_HEADER, "flight"), (DEADLINE_HEADER, d)]),
        ("try", vec![(GID_HEADER, "tx-1"), (BRANCH_HEADER, &long_branch), (DEADLINE_HEADER, d)]),
        ("try", vec![(GID_HEADER, "tx-1"), (GID_HEADER, "tx-2"), (BRANCH_HEADER, "flight"), (DEADLINE_HEADER, d)]),
        ("try", vec![(GID_HEADER, "tx-1"), (BRANCH_HEADER, "flight"), (DEADLINE_HEADER, d), (DEADLINE_HEADER, d)]),
        ("confirm", vec![(BRANCH_HEADER, "flight"), (DEADLINE_HEADER, d)]),
        ("confirm", vec![(GID_HEADER, "tx-1"), (BRANCH_HEADER, "flight"), (DEADLINE_HEADER, "x")]),
        ("cancel", vec![(GID_HEADER, "tx-1"), (DEADLINE_HEADER, d)]),
        ("cancel", vec![(GID_HEADER, "tx/1"), (BRANCH_HEADER, "flight")]),
    ];
    for (phase, headers) in &cases {
        let answer = f.post("hold_seat", phase, headers, b"12A".to_vec()).await;
        let body = answer.expect_error(StatusCode::BAD_REQUEST, "malformed");
        assert!(body.message.contains("tcc-"), "{phase} {headers:?}: {body:?}");
    }
    // A try whose request the operation rejects is a 400 too.
    f.call("hold_seat", "try", "tx-1", "flight", "not a seat")
        .await
        .expect_error(StatusCode::BAD_REQUEST, "malformed");
    assert_eq!(f.total_runs(), 0);
    assert_eq!(f.tree(BARRIER_TREE).len(), 0, "no barrier record");
    assert_eq!(f.item("seats", "12A"), None);

    // Confirm and cancel do not need the deadline.
    f.call("hold_seat", "try", "tx-1", "flight", "12A").await.expect_ok("fresh");
    let no_deadline = [(GID_HEADER, "tx-1"), (BRANCH_HEADER, "flight")];
    let answer = f.post("hold_seat", "confirm", &no_deadline, Vec::new()).await;
    answer.expect_ok("confirmed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_operations_and_phases_are_404_and_other_methods_405() {
    let f = Fixture::start().await;
    f.call("book_taxi", "try", "tx-1", "taxi", "x")
        .await
        .expect_error(StatusCode::NOT_FOUND, "unknown_operation");
    f.call("hold_seat", "commit", "tx-1", "flight", "12A")
        .await
        .expect_error(StatusCode::NOT_FOUND, "unknown_phase");
    let get = f.http.get(format!("http://{}/tcc/hold_seat/try", f.addr)).send().await.unwrap();
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get.headers().get("allow").unwrap(), "POST");
    let body: ErrorBody = get.json().await.unwrap();
    assert_eq!(body.code, "method_not_allowed");
    assert_eq!(f.total_runs(), 0);
    assert_eq!(f.tree(BARRIER_TREE).len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_413_and_one_at_the_limit_is_served() {
    let f = Fixture::start().await;
    let deadline = f.deadline().to_string();
    let headers = [(GID_HEADER, "tx-1"), (BRANCH_HEADER, "big"), (DEADLINE_HEADER, deadline.as_str())];
    for phase in ["try", "confirm", "cancel"] {
        // The server answers 413 from the Content-Length and closes the connection without reading
        // the body; a client still writing it then may see the connection closed instead of the
        // answer (a race that a loaded machine makes likely). Such an attempt is sent again: one of
        // them must get the answer.
        let mut answered = false;
        for _ in 0..5 {
            let mut req =
                f.http.post(format!("http://{}/tcc/blob/{phase}", f.addr)).body(vec![b'x'; MAX_BODY + 1]);
            for (name, value) in headers {
                req = req.header(name, value);
            }
            match req.send().await {
                Ok(res) => {
                    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE, "{phase}");
                    let body: serde_json::Value = res.json().await.unwrap();
                    assert_eq!(body["code"], "too_large", "{phase}");
                    answered = true;
                    break;
                }
                Err(e) if e.is_request() => continue,
                Err(e) => panic!("{phase}: {e}"),
            }
        }
        assert!(answered, "{phase}: no 413 in five attempts");
    }
    assert_eq!(f.tree(BARRIER_TREE).len(), 0, "nothing stored");

    let answer = f.post("blob", "try", &headers, vec![b'x'; MAX_BODY]).await;
    answer.expect_ok("fresh");
    assert_eq!(answer.body, MAX_BODY.to_string().as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_refusal_is_409_with_its_message_and_stores_nothing() {
    let f = Fixture::start().await;
    f.call("hold_seat", "try", "tx-1", "flight", "12A").await.expect_ok("fresh");
    let taken = f.call("hold_seat", "try", "tx-2", "flight", "12A").await;
    let body = taken.expect_error(StatusCode::CONFLICT, "refused");
    assert_eq!(body.message, "12A is taken");
    assert_eq!(f.state("tx-2", "flight"), None, "no barrier record");
    assert_eq!(f.item("seats", "12A").as_deref(), Some("held:tx-1"));
    assert_eq!(f.runs("hold_seat", "try"), 1);

    // The initiator cancels: an empty cancel, since the try left nothing.
    f.call("hold_seat", "cancel", "tx-2", "flight", "12A").await.expect_ok("empty");
    assert_eq!(f.runs("hold_seat", "cancel"), 0);
    assert_eq!(f.item("seats", "12A").as_deref(), Some("held:tx-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_releases_a_held_reservation_after_deadline_and_grace() {
    let f = Fixture::start().await;
    f.call("hold_seat", "try", "tx-1", "flight", "12A").await.expect_ok("fresh");
    assert_eq!(f.participant.expire_due().await.unwrap(), 0, "not due");

    f.clock.advance(LIFETIME + GRACE - Duration::from_millis(1));
    assert_eq!(f.participant.expire_due().await.unwrap(), 0, "one millisecond early");
    assert_eq!(f.item("seats", "12A").as_deref(), Some("held:tx-1"));

    f.clock.advance(Duration::from_millis(1));
    assert_eq!(f.participant.expire_due().await.unwrap(), 1);
    assert_eq!(f.item("seats", "12A"), None, "the business cancel ran");
    assert_eq!(f.runs("hold_seat", "cancel"), 1);
    assert_eq!(f.state("tx-1", "flight"), Some(BarrierState::Expired));
    assert_eq!(f.participant.expire_due().await.unwrap(), 0, "released once");

    // The coordinator's late word: a confirm is gone, a cancel already happened, a try is gone too.
    let body =
        f.call("hold_seat", "confirm", "tx-1", "flight", "").await.expect_error(StatusCode::GONE, "expired");
    assert!(body.message.contains("expired"), "{body:?}");
    f.call("hold_seat", "cancel", "tx-1", "flight", "").await.expect_ok("expired");
    f.try_with_deadline("hold_seat", "tx-1", "flight", u64::MAX, "12A")
        .await
        .expect_error(StatusCode::GONE, "expired");
    assert_eq!((f.runs("hold_seat", "confirm"), f.runs("hold_seat", "cancel")), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_runs_the_cancel_of_the_operation_that_made_each_reservation() {
    let f = Fixture::start().await;
    f.call("hold_seat", "try", "tx-1", "flight", "12A").await.expect_ok("fresh");
    f.call("hold_room", "try", "tx-1", "hotel", "701").await.expect_ok("fresh");
    // Same item name in the other operation's tree: only the right tree may be touched.
    f.call("hold_room", "try", "tx-2", "hotel", "12A").await.expect_ok("fresh");
    f.call("hold_room", "confirm", "tx-2", "hotel", "").await.expect_ok("confirmed");

    f.clock.advance(LIFETIME + GRACE);
    assert_eq!(f.participant.expire_due().await.unwrap(), 2);
    assert_eq!(f.item("seats", "12A"), None);
    assert_eq!(f.item("rooms", "701"), None);
    assert_eq!(f.item("rooms", "12A").as_deref(), Some("sold"), "the confirmed room is untouched");
    assert_eq!((f.runs("hold_seat", "cancel"), f.runs("hold_room", "cancel")), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spawned_expiry_loop_follows_the_participants_clock() {
    let f = Fixture::start().await;
    let _expiry = f.participant.spawn_expiry(Duration::from_secs(1));
    // The loop swept once and sleeps on the manual clock.
    eventually("the expiry loop sleeps", || f.clock.sleepers() == 1).await;
    f.call("hold_seat", "try", "tx-1", "flight", "12A").await.expect_ok("fresh");

    f.clock.advance(LIFETIME + GRACE);
    eventually("the reservation is released", || f.participant.barrier().held() == 0).await;
    assert_eq!(f.item("seats", "12A"), None);
    assert_eq!(f.state("tx-1", "flight"), Some(BarrierState::Expired));
    assert_eq!(f.runs("hold_seat", "cancel"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_tries_run_the_business_try_once() {
    let f = Arc::new(Fixture::start().await);
    let tries = (0..16).map(|_| {
        let f = Arc::clone(&f);
        tokio::spawn(async move { f.call("hold_seat", "try", "tx-1", "flight", "12A").await })
    });
    let mut fresh = 0;
    for t in tries.collect::<Vec<_>>() {
        let answer = t.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        assert_eq!(answer.body, b"held 12A");
        fresh += usize::from(answer.outcome.as_deref() == Some("fresh"));
    }
    assert_eq!(fresh, 1);
    assert_eq!(f.runs("hold_seat", "try"), 1);
    assert_eq!(f.participant.barrier().held(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_is_served_only_by_the_operation_that_tried_it() {
    let f = Fixture::start().await;
    f.call("hold_seat", "try", "tx-1", "flight", "12A").await.expect_ok("fresh");
    for phase in ["try", "confirm", "cancel"] {
        let body = f
            .call("hold_room", phase, "tx-1", "flight", "12A")
            .await
            .expect_error(StatusCode::CONFLICT, "operation_mismatch");
        assert!(body.message.contains("hold_seat"), "{body:?}");
    }
    assert_eq!(f.state("tx-1", "flight"), Some(BarrierState::Tried));
    assert_eq!(f.item("seats", "12A").as_deref(), Some("held:tx-1"));
    assert_eq!(f.item("rooms", "12A"), None);
    f.call("hold_seat", "confirm", "tx-1", "flight", "").await.expect_ok("confirmed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_barrier_record_is_500_corrupt_and_runs_nothing() {
    let f = Fixture::start().await;
    // The barrier's key is `gid 0x00 branch`.
    f.tree(BARRIER_TREE).insert(b"tx-1\0flight", &b"\x07garbage"[..]).unwrap();
    for phase in ["try", "confirm", "cancel"] {
        let answer = f.call("hold_seat", phase, "tx-1", "flight", "12A").await;
        let body = answer.expect_error(StatusCode::INTERNAL_SERVER_ERROR, "corrupt");
        assert!(body.message.contains("tx-1"), "{body:?}");
    }
    assert_eq!(f.total_runs(), 0);
    assert_eq!(f.item("seats", "12A"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_barriers_own_durability_serves_the_same_protocol() {
    let f = Fixture::start_with(false).await;
    f.call("hold_seat", "try", "tx-1", "flight", "12A").await.expect_ok("fresh");
    f.call("hold_seat", "confirm", "tx-1", "flight", "").await.expect_ok("confirmed");
    f.call("hold_seat", "confirm", "tx-1", "flight", "").await.expect_ok("duplicate");
    f.call("hold_seat", "cancel", "tx-2", "flight", "").await.expect_ok("empty");
    f.call("hold_seat", "try", "tx-2", "flight", "14C").await.expect_error(StatusCode::CONFLICT, "suspended");
    assert_eq!(f.item("seats", "12A").as_deref(), Some("sold"));
    assert_eq!((f.runs("hold_seat", "try"), f.runs("hold_seat", "confirm")), (1, 1));
}

// ---- async operations: business methods staged in a TccContext, committed through the barrier ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_try_and_confirm_commit_their_staged_writes_with_the_barrier_record() {
    let f = Fixture::start().await;
    f.set_stock("lamp", 2);
    let held = f.reserve("try", "tx-1", "shop", "lamp").await;
    held.expect_ok("fresh");
    let reserved: Reserved = serde_json::from_slice(&held.body).unwrap();
    assert_eq!(reserved, Reserved { item: "lamp".into(), left: 1 });
    assert_eq!(f.stock("lamp"), Stock { free: 1, held: 1, sold: 0 });
    assert_eq!(f.state("tx-1", "shop"), Some(BarrierState::Tried));
    assert_eq!(f.participant.barrier().held(), 1);
    let (gid, branch): (Gid, BranchId) = ("tx-1".parse().unwrap(), "shop".parse().unwrap());
    let record = f.participant.barrier().get(&gid, &branch).unwrap().unwrap();
    assert_eq!(decode_stored_request(&record.request), Some(("reserve", &br#"{"item":"lamp"}"#[..])));

    f.reserve("confirm", "tx-1", "shop", "ignored").await.expect_ok("confirmed");
    assert_eq!(f.stock("lamp"), Stock { free: 1, held: 0, sold: 1 });
    assert_eq!(f.state("tx-1", "shop"), Some(BarrierState::Confirmed));
    // Confirm ran on the try's stored request, with the try's deadline.
    let seen = f.reserve.seen.lock().unwrap().clone();
    assert_eq!(seen, [(Phase::Try, Timestamp(f.deadline())), (Phase::Confirm, Timestamp(f.deadline()))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_duplicates_run_the_business_methods_once() {
    let f = Fixture::start().await;
    f.set_stock("lamp", 5);
    f.reserve("try", "tx-1", "shop", "lamp").await.expect_ok("fresh");
    let again = f.reserve("try", "tx-1", "shop", "lamp").await;
    again.expect_ok("duplicate");
    assert_eq!(serde_json::from_slice::<Reserved>(&again.body).unwrap().left, 4, "the stored result");
    f.reserve("confirm", "tx-1", "shop", "lamp").await.expect_ok("confirmed");
    for _ in 0..3 {
        f.reserve("confirm", "tx-1", "shop", "lamp").await.expect_ok("duplicate");
    }
    f.reserve("try", "tx-2", "shop", "lamp").await.expect_ok("fresh");
    f.reserve("cancel", "tx-2", "shop", "lamp").await.expect_ok("cancelled");
    for _ in 0..3 {
        f.reserve("cancel", "tx-2", "shop", "lamp").await.expect_ok("duplicate");
    }
    f.reserve("cancel", "tx-1", "shop", "lamp").await.expect_error(StatusCode::CONFLICT, "already_confirmed");
    f.reserve("confirm", "tx-2", "shop", "lamp")
        .await
        .expect_error(StatusCode::CONFLICT, "already_cancelled");
    assert_eq!(f.reserve.runs(), (2, 1, 1));
    assert_eq!(f.stock("lamp"), Stock { free: 4, held: 0, sold: 1 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_empty_cancel_then_late_try_is_refused_without_running_anything() {
    let f = Fixture::start().await;
    f.set_stock("lamp", 1);
    f.reserve("cancel", "tx-1", "shop", "lamp").await.expect_ok("empty");
    assert_eq!(f.state("tx-1", "shop"), Some(BarrierState::CancelledEmpty));
    f.reserve("try", "tx-1", "shop", "lamp").await.expect_error(StatusCode::CONFLICT, "suspended");
    f.reserve("confirm", "tx-2", "shop", "lamp").await.expect_error(StatusCode::CONFLICT, "not_tried");
    let now = f.clock.now().0;
    let late = f.try_with_deadline("reserve", "tx-3", "shop", now, r#"{"item":"lamp"}"#).await;
    late.expect_error(StatusCode::CONFLICT, "deadline_passed");
    assert_eq!(f.reserve.runs(), (0, 0, 0), "no business method ran");
    assert_eq!(f.stock("lamp"), Stock { free: 1, held: 0, sold: 0 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_refusal_is_409_with_the_typed_error_as_detail_and_stores_nothing() {
    let f = Fixture::start().await;
    f.set_stock("lamp", 0);
    let refused = f.reserve("try", "tx-1", "shop", "lamp").await;
    let body = refused.expect_error(StatusCode::CONFLICT, "refused");
    assert_eq!(body.message, "only 0 of lamp left");
    let detail: ReserveError = serde_json::from_value(body.detail.unwrap()).unwrap();
    assert_eq!(detail, ReserveError::NotEnough { item: "lamp".into(), left: 0 });
    assert_eq!(f.state("tx-1", "shop"), None, "no barrier record");
    f.reserve("cancel", "tx-1", "shop", "lamp").await.expect_ok("empty");
    assert_eq!(f.reserve.runs(), (1, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_async_error_is_503_unavailable_and_a_retry_succeeds() {
    let f = Fixture::start().await;
    f.set_stock("lamp", 1);
    f.reserve.offline.store(1, Ordering::SeqCst);
    let body = f
        .reserve("try", "tx-1", "shop", "lamp")
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert_eq!(serde_json::from_value::<ReserveError>(body.detail.unwrap()).unwrap(), ReserveError::Offline);
    assert_eq!(f.state("tx-1", "shop"), None);
    assert_eq!(f.stock("lamp"), Stock { free: 1, held: 0, sold: 0 });
    f.reserve("try", "tx-1", "shop", "lamp").await.expect_ok("fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_async_request_is_400_and_runs_nothing() {
    let f = Fixture::start().await;
    for body in ["", "not json", r#"{"item": 5}"#, r#"{"thing": "lamp"}"#] {
        f.call("reserve", "try", "tx-1", "shop", body)
            .await
            .expect_error(StatusCode::BAD_REQUEST, "malformed");
    }
    assert_eq!(f.reserve.runs(), (0, 0, 0));
    assert_eq!(f.tree(BARRIER_TREE).len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_conflicts_runs_the_business_method_again_on_fresh_reads() {
    let f = Arc::new(Fixture::start().await);
    f.set_stock("lamp", 5);
    // tx-1 read 5 free and waits; tx-2 takes one meanwhile.
    let (first, go) = f.paused_try("lamp").await;
    f.reserve("try", "tx-2", "shop", "lamp").await.expect_ok("fresh");
    go.send(()).unwrap();
    let first = first.await.unwrap();
    first.expect_ok("fresh");
    assert_eq!(serde_json::from_slice::<Reserved>(&first.body).unwrap().left, 3, "ran again on 4 free");
    assert_eq!(f.stock("lamp"), Stock { free: 3, held: 2, sold: 0 });
    assert_eq!(f.reserve.runs().0, 3, "tx-1 ran twice, tx-2 once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_conflicts_every_time_is_503_contended_and_stores_nothing() {
    let f = Fixture::start().await;
    f.set_stock("hot", 1);
    let body = f
        .reserve("try", "tx-1", "shop", "hot")
        .await
        .expect_error(StatusCode::SERVICE_UNAVAILABLE, "contended");
    assert!(body.message.contains("conflicted"), "{body:?}");
    assert_eq!(f.reserve.runs().0, MAX_RUNS);
    assert_eq!(f.state("tx-1", "shop"), None);
    assert_eq!(f.stock("hot").held, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_arriving_while_the_try_runs_waits_for_it_and_then_cancels_it() {
    let f = Arc::new(Fixture::start().await);
    f.set_stock("lamp", 1);
    let (tried, go) = f.paused_try("lamp").await;
    let waits = f.next_cancel_waits();
    let cancelled = {
        let f = Arc::clone(&f);
        tokio::spawn(async move { f.reserve("cancel", "tx-1", "shop", "lamp").await })
    };
    // The cancel has arrived and waits (for the branch the paused try holds) before the try goes on.
    waits.await.unwrap();
    assert_eq!(f.reserve.runs(), (1, 0, 0), "the cancel ran nothing while the try was paused");
    go.send(()).unwrap();
    tried.await.unwrap().expect_ok("fresh");
    // Not an empty cancel: the cancel ran after the try, on what it held.
    cancelled.await.unwrap().expect_ok("cancelled");
    assert_eq!(f.reserve.runs(), (1, 0, 1));
    assert_eq!(f.stock("lamp"), Stock { free: 1, held: 0, sold: 0 });
    assert_eq!(f.state("tx-1", "shop"), Some(BarrierState::Cancelled));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_async_tries_run_the_business_try_once() {
    let f = Arc::new(Fixture::start().await);
    f.set_stock("lamp", 100);
    let tries: Vec<_> = (0..16)
        .map(|_| {
            let f = Arc::clone(&f);
            tokio::spawn(async move { f.reserve("try", "tx-1", "shop", "lamp").await })
        })
        .collect();
    let mut fresh = 0;
    for t in tries {
        let answer = t.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        assert_eq!(serde_json::from_slice::<Reserved>(&answer.body).unwrap().left, 99);
        fresh += usize::from(answer.outcome.as_deref() == Some("fresh"));
    }
    assert_eq!(fresh, 1);
    assert_eq!(f.reserve.runs().0, 1);
    assert_eq!(f.stock("lamp"), Stock { free: 99, held: 1, sold: 0 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_runs_the_async_cancel_and_the_sync_one_in_the_same_sweep() {
    let f = Fixture::start().await;
    f.set_stock("lamp", 1);
    f.reserve("try", "tx-1", "shop", "lamp").await.expect_ok("fresh");
    f.call("hold_seat", "try", "tx-1", "flight", "12A").await.expect_ok("fresh");
    f.clock.advance(LIFETIME + GRACE - Duration::from_millis(1));
    assert_eq!(f.participant.expire_due().await.unwrap(), 0);
    f.clock.advance(Duration::from_millis(1));
    assert_eq!(f.participant.expire_due().await.unwrap(), 2);
    assert_eq!(f.stock("lamp"), Stock { free: 1, held: 0, sold: 0 });
    assert_eq!(f.item("seats", "12A"), None);
    assert_eq!(f.state("tx-1", "shop"), Some(BarrierState::Expired));
    assert_eq!(f.reserve.runs(), (1, 0, 1));
    assert_eq!(f.reserve.seen.lock().unwrap().last().map(|s| s.0), Some(Phase::Expire));
    assert_eq!(f.participant.expire_due().await.unwrap(), 0, "released once");
    f.reserve("confirm", "tx-1", "shop", "lamp").await.expect_error(StatusCode::GONE, "expired");
    f.reserve("cancel", "tx-1", "shop", "lamp").await.expect_ok("expired");
    assert_eq!(f.reserve.runs(), (1, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_expiry_whose_cancel_fails_is_retried_on_the_next_sweep() {
    let f = Fixture::start().await;
    f.set_stock("lamp", 1);
    f.reserve("try", "tx-1", "shop", "lamp").await.expect_ok("fresh");
    // Someone removed the stock behind the runtime's back: the cancel refuses (no such item).
    let (gid, branch): (Gid, BranchId) = ("tx-1".parse().unwrap(), "shop".parse().unwrap());
    f.tree("rooms").remove(stock_key("lamp")).unwrap();
    f.clock.advance(LIFETIME + GRACE);
    assert_eq!(f.participant.expire_due().await.unwrap(), 0);
    assert_eq!(f.participant.barrier().get(&gid, &branch).unwrap().unwrap().state, BarrierState::Tried);
    let restock = Stock { free: 0, held: 1, sold: 0 };
    f.participant.seed("rooms", stock_key("lamp"), &restock).unwrap();
    assert_eq!(f.participant.expire_due().await.unwrap(), 1);
    assert_eq!(f.stock("lamp"), Stock { free: 1, held: 0, sold: 0 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_async_method_is_500_and_commits_nothing() {
    let f = Fixture::start().await;
    f.set_stock("lamp", 1);
    f.reserve.panic_next.store(true, Ordering::SeqCst);
    f.reserve("try", "tx-1", "shop", "lamp")
        .await
        .expect_error(StatusCode::INTERNAL_SERVER_ERROR, "internal");
    assert_eq!(f.state("tx-1", "shop"), None);
    // The participant goes on serving.
    f.reserve("try", "tx-1", "shop", "lamp").await.expect_ok("fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_fault_is_never_committed_even_when_the_method_returns_ok() {
    let f = Fixture::start().await;
    // A value not written through a context: reading it is a fault.
    f.tree("rooms").insert(stock_key("raw"), &b"not versioned"[..]).unwrap();
    let lenient = serde_json::json!({ "item": "raw", "lenient": true }).to_string();
    let body = f
        .call("reserve", "try", "tx-1", "shop", &lenient)
        .await
        .expect_error(StatusCode::INTERNAL_SERVER_ERROR, "internal");
    assert!(body.message.contains("does not decode"), "{body:?}");
    assert_eq!(f.state("tx-1", "shop"), None);
    // Without leniency the fault comes back through the business error: the same answer.
    f.reserve("try", "tx-2", "shop", "raw").await.expect_error(StatusCode::INTERNAL_SERVER_ERROR, "internal");
    assert_eq!(f.state("tx-2", "shop"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_is_served_only_by_the_operation_that_tried_it_sync_or_async() {
    let f = Fixture::start().await;
    f.set_stock("lamp", 1);
    f.call("hold_seat", "try", "tx-1", "flight", "12A").await.expect_ok("fresh");
    f.reserve("try", "tx-2", "shop", "lamp").await.expect_ok("fresh");
    for phase in ["try", "confirm", "cancel"] {
        f.reserve(phase, "tx-1", "flight", "lamp")
            .await
            .expect_error(StatusCode::CONFLICT, "operation_mismatch");
        f.call("hold_seat", phase, "tx-2", "shop", "12A")
            .await
            .expect_error(StatusCode::CONFLICT, "operation_mismatch");
    }
    assert_eq!(f.reserve.runs(), (1, 0, 0));
    assert_eq!(f.stock("lamp"), Stock { free: 0, held: 1, sold: 0 });
    assert_eq!(f.item("seats", "12A").as_deref(), Some("held:tx-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_recorded_while_the_try_runs_discards_the_trys_staged_writes() {
    let f = Arc::new(Fixture::start().await);
    f.set_stock("lamp", 1);
    let (tried, go) = f.paused_try("lamp").await;
    // The check let the try run; an empty cancel lands before its commit (straight through the
    // barrier, as another process sharing the record would).
    let barrier = f.participant.barrier().clone();
    let (gid, branch): (Gid, BranchId) = ("tx-1".parse().unwrap(), "shop".parse().unwrap());
    let empty =
        tokio::task::spawn_blocking(move || {
            barrier.cancel(&gid, &branch, |_| {
                Ok::<_, sled::transaction::ConflictableTransactionError<String>>(())
            })
        });
    assert_eq!(empty.await.unwrap().unwrap(), tcc_core::barrier::CancelOutcome::Empty);
    go.send(()).unwrap();
    // The barrier's check inside the commit is the authority: the try is suspended, its writes dropped.
    tried.await.unwrap().expect_error(StatusCode::CONFLICT, "suspended");
    assert_eq!(f.stock("lamp"), Stock { free: 1, held: 0, sold: 0 });
    assert_eq!(f.state("tx-1", "shop"), Some(BarrierState::CancelledEmpty));
    assert_eq!(f.participant.barrier().held(), 0);
}

/// The `Accept` header of the tcc clients' batches: a streamed answer, or a whole one.
const STREAMED: &str = "application/x-ndjson, application/json";

/// What `POST /tcc/{op}/batch` answered: the status and, for a 200, each call's (status, outcome or
/// error code).
#[derive(Debug)]
struct BatchAnswered {
    status: StatusCode,
    results: Vec<(u16, String)>,
    body: Vec<u8>,
}

impl Fixture {
    /// `POST /tcc/{op}/{path}` with this JSON body, asking for a streamed answer as the tcc
    /// clients do: the status and the answer's body. A 200 must be streamed; its lines are checked
    /// (each call answered once) and returned as the whole answer would be, `{"results": [...]}`
    /// in the batch's order.
    async fn post_json(&self, op: &str, path: &str, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        let (status, content_type, body) = self.post_batch(op, path, body, STREAMED).await;
        if status != StatusCode::OK {
            return (status, body);
        }
        assert_eq!(content_type, "application/x-ndjson");
        let text = String::from_utf8(body).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "{text:?}");
        let mut slots: Vec<Option<serde_json::Value>> = Vec::new();
        for line in text.lines() {
            let mut line: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
            let i = usize::try_from(line.remove("i").unwrap().as_u64().unwrap()).unwrap();
            if slots.len() <= i {
                slots.resize(i + 1, None);
            }
            assert!(slots[i].is_none(), "call {i} answered twice: {text:?}");
            slots[i] = Some(serde_json::Value::Object(line));
        }
        let results: Vec<serde_json::Value> = slots
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.unwrap_or_else(|| panic!("call {i} unanswered")))
            .collect();
        (status, serde_json::to_vec(&serde_json::json!({ "results": results })).unwrap())
    }

    /// `POST /tcc/{op}/{path}` with this JSON body and `Accept` header: the status, content type
    /// and body of the answer.
    async fn post_batch(
        &self,
        op: &str,
        path: &str,
        body: Vec<u8>,
        accept: &str,
    ) -> (StatusCode, String, Vec<u8>) {
        let res = self
            .http
            .post(format!("http://{}/tcc/{op}/{path}", self.addr))
            .header("content-type", "application/json")
            .header("accept", accept)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = res.status();
        let content_type =
            res.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        (status, content_type, res.bytes().await.unwrap().to_vec())
    }

    /// `POST /tcc/{op}/batch` with this body.
    async fn batch_raw(&self, op: &str, body: Vec<u8>) -> BatchAnswered {
        let (status, body) = self.post_json(op, "batch", body).await;
        let results = if status == StatusCode::OK {
            let answer: BatchAnswer = serde_json::from_slice(&body).unwrap();
            answer
                .results
                .into_iter()
                .map(|r| match (r.outcome, r.error) {
                    (Some(outcome), None) => (r.status, outcome),
                    (None, Some(e)) => (r.status, e.code),
                    other => panic!("a result with neither or both of outcome and error: {other:?}"),
                })
                .collect()
        } else {
            Vec::new()
        };
        BatchAnswered { status, results, body }
    }

    /// A batch of `(decision, gid, branch)` calls for `op`, with the fixture's deadline.
    async fn batch(&self, op: &str, calls: &[(&str, &str, &str)]) -> BatchAnswered {
        let deadline = self.deadline();
        let calls: Vec<_> = calls
            .iter()
            .map(|(decision, gid, branch)| {
                serde_json::json!({ "gid": gid, "branch": branch, "deadline": deadline, "decision": decision })
            })
            .collect();
        self.batch_raw(op, serde_json::to_vec(&serde_json::json!({ "calls": calls })).unwrap()).await
    }
}

fn results(expected: &[(u16, &str)]) -> Vec<(u16, String)> {
    expected.iter().map(|(s, o)| (*s, (*o).to_owned())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_each_call_as_its_single_call_would() {
    let f = Fixture::start().await;
    for (gid, seat) in [("tx-1", "12A"), ("tx-2", "12B"), ("tx-3", "12C")] {
        f.call("hold_seat", "try", gid, "flight", seat).await.expect_ok("fresh");
    }
    let calls = [
        ("confirm", "tx-1", "flight"),
        ("cancel", "tx-2", "flight"),
        ("confirm", "tx-4", "flight"),
        ("cancel", "tx-5", "flight"),
        ("confirm", "tx-1", "flight"),
        ("cancel", "tx-3", "flight"),
        ("confirm", "tx-3", "flight"),
    ];
    let expected = results(&[
        (200, "confirmed"),
        (200, "cancelled"),
        (409, "not_tried"),
        (200, "empty"),
        (200, "duplicate"),
        (200, "cancelled"),
        (409, "already_cancelled"),
    ]);
    let answered = f.batch("hold_seat", &calls).await;
    assert_eq!(answered.status, StatusCode::OK, "{:?}", String::from_utf8_lossy(&answered.body));
    assert_eq!(answered.results, expected);
    assert_eq!(f.item("seats", "12A").as_deref(), Some("sold"));
    assert_eq!((f.item("seats", "12B"), f.item("seats", "12C")), (None, None));
    assert_eq!((f.runs("hold_seat", "confirm"), f.runs("hold_seat", "cancel")), (1, 2));
    assert_eq!(f.participant.barrier().held(), 0);

    // The same batch again changes nothing: the calls that were done are duplicates now.
    let again = f.batch("hold_seat", &calls).await;
    let repeated = results(&[
        (200, "duplicate"),
        (200, "duplicate"),
        (409, "not_tried"),
        (200, "duplicate"), // the empty cancel was recorded
        (200, "duplicate"),
        (200, "duplicate"),
        (409, "already_cancelled"),
    ]);
    assert_eq!(again.results, repeated);
    assert_eq!((f.runs("hold_seat", "confirm"), f.runs("hold_seat", "cancel")), (1, 2));

    // The batched empty cancel guards against the late try (suspension), as a single one does.
    f.call("hold_seat", "try", "tx-5", "flight", "12E").await.expect_error(StatusCode::CONFLICT, "suspended");
    assert_eq!(f.item("seats", "12E"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_an_async_operation_runs_each_call_through_the_barrier() {
    let f = Fixture::start().await;
    f.set_stock("room", 3);
    f.reserve("try", "tx-1", "shop", "room").await.expect_ok("fresh");
    f.reserve("try", "tx-2", "shop", "room").await.expect_ok("fresh");
    let answered = f
        .batch(
            "reserve",
            &[
                ("confirm", "tx-1", "shop"),
                ("cancel", "tx-2", "shop"),
                ("cancel", "tx-3", "shop"),
                ("cancel", "tx-2", "shop"),
            ],
        )
        .await;
    assert_eq!(answered.status, StatusCode::OK, "{:?}", String::from_utf8_lossy(&answered.body));
    assert_eq!(
        answered.results,
        results(&[(200, "confirmed"), (200, "cancelled"), (200, "empty"), (200, "duplicate")])
    );
    // Each committed once (the two calls of the batch run concurrently on one stock key, so a
    // method may run again after a conflict, as concurrent single calls may).
    assert_eq!(f.stock("room"), Stock { free: 2, held: 0, sold: 1 });
    assert_eq!(f.state("tx-1", "shop"), Some(BarrierState::Confirmed));
    assert_eq!(f.state("tx-2", "shop"), Some(BarrierState::Cancelled));
    assert_eq!(f.state("tx-3", "shop"), Some(BarrierState::CancelledEmpty));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_batch_is_refused_whole_and_runs_nothing() {
    let f = Fixture::start().await;
    f.call("hold_seat", "try", "tx-1", "flight", "12A").await.expect_ok("fresh");
    let deadline = f.deadline();
    let good =
        serde_json::json!({ "gid": "tx-1", "branch": "flight", "deadline": deadline, "decision": "confirm" });
    let body = |calls: serde_json::Value| serde_json::to_vec(&serde_json::json!({ "calls": calls })).unwrap();
    let bad_bodies: Vec<(Vec<u8>, &str)> = vec![
        (
            body(
                serde_json::json!([good, { "gid": "not ok!", "branch": "flight", "deadline": deadline, "decision": "confirm" }]),
            ),
            "call 1",
        ),
        (
            body(
                serde_json::json!([good, { "gid": "tx-2", "branch": "flight", "deadline": deadline, "decision": "commit" }]),
            ),
            "decision",
        ),
        (
            body(
                serde_json::json!([good, { "gid": "tx-2", "branch": "flight", "deadline": -1, "decision": "cancel" }]),
            ),
            "invalid batch",
        ),
        (
            body(serde_json::json!([good, { "gid": "tx-2", "branch": "flight", "decision": "cancel" }])),
            "deadline",
        ),
        (
            body(
                serde_json::json!([{ "gid": "tx-1", "branch": "flight", "deadline": deadline, "decision": "confirm", "extra": 1 }]),
            ),
            "extra",
        ),
        (b"{\"calls\": 5}".to_vec(), "invalid batch"),
        (b"not json".to_vec(), "invalid batch"),
        (Vec::new(), "invalid batch"),
    ];
    for (bad, says) in bad_bodies {
        let answered = f.batch_raw("hold_seat", bad.clone()).await;
        assert_eq!(answered.status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&bad));
        let e: ErrorBody = serde_json::from_slice(&answered.body).unwrap();
        assert_eq!(e.code, "malformed");
        assert!(e.message.contains(says), "{says:?} not in {e:?}");
    }
    let too_many = vec![good.clone(); MAX_BATCH_CALLS + 1];
    let answered = f.batch_raw("hold_seat", body(serde_json::json!(too_many))).await;
    assert_eq!(answered.status, StatusCode::PAYLOAD_TOO_LARGE);
    let unknown = f.batch("book_taxi", &[("confirm", "tx-1", "flight")]).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    // Nothing ran: the good call in each refused batch included.
    assert_eq!(f.state("tx-1", "flight"), Some(BarrierState::Tried));
    assert_eq!(f.runs("hold_seat", "confirm"), 0);
    assert_eq!(f.item("seats", "12A").as_deref(), Some("held:tx-1"));
    assert_eq!(f.tree(BARRIER_TREE).len(), 1);

    // A batch of exactly the most calls is served (the same call over and over: one run).
    let most = vec![good; MAX_BATCH_CALLS];
    let answered = f.batch_raw("hold_seat", body(serde_json::json!(most))).await;
    assert_eq!(answered.status, StatusCode::OK);
    assert_eq!(answered.results.len(), MAX_BATCH_CALLS);
    assert_eq!(answered.results[0], (200, "confirmed".to_owned()));
    assert!(answered.results[1..].iter().all(|r| r == &(200, "duplicate".to_owned())));
    assert_eq!(f.runs("hold_seat", "confirm"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_call_in_a_batch_fails_alone() {
    let f = Fixture::start().await;
    f.call("fragile", "try", "tx-1", "b", "fine").await.expect_ok("fresh");
    f.call("fragile", "try", "tx-2", "b", "boom").await.expect_ok("fresh");
    f.call("fragile", "try", "tx-3", "b", "fine").await.expect_ok("fresh");
    let calls = [("confirm", "tx-1", "b"), ("confirm", "tx-2", "b"), ("confirm", "tx-3", "b")];
    let answered = f.batch("fragile", &calls).await;
    assert_eq!(answered.status, StatusCode::OK, "{:?}", String::from_utf8_lossy(&answered.body));
    assert_eq!(answered.results, results(&[(200, "confirmed"), (500, "internal"), (200, "confirmed")]));
    assert_eq!(f.state("tx-1", "b"), Some(BarrierState::Confirmed));
    assert_eq!(f.state("tx-2", "b"), Some(BarrierState::Tried), "the panicking call changed nothing");
    assert_eq!(f.state("tx-3", "b"), Some(BarrierState::Confirmed));
}

/// One try's answer, single or batched: its status, and its result text or its error code.
type TryAnswer = (u16, String);

impl Fixture {
    /// `POST /tcc/{op}/tries` with this body: the status and, for a 200, each try's answer.
    async fn tries_raw(&self, op: &str, body: Vec<u8>) -> (StatusCode, Vec<TryAnswer>) {
        let (status, body) = self.post_json(op, "tries", body).await;
        if status != StatusCode::OK {
            return (status, Vec::new());
        }
        let answer: TryBatchAnswer = serde_json::from_slice(&body).unwrap();
        let answers = answer
            .results
            .into_iter()
            .map(|r| match (r.status, r.error.clone()) {
                (200, None) => (200, String::from_utf8(r.result()).unwrap()),
                (status, Some(e)) => (status, e.code),
                (status, None) => panic!("a {status} result without an error body"),
            })
            .collect();
        (status, answers)
    }

    /// A batch of `(gid, branch, deadline, request)` tries for `op`.
    async fn tries(&self, op: &str, tries: &[(&str, &str, u64, &str)]) -> (StatusCode, Vec<TryAnswer>) {
        let tries: Vec<_> = tries
            .iter()
            .map(|(gid, branch, deadline, request)| {
                serde_json::json!({ "gid": gid, "branch": branch, "deadline": deadline, "request": request })
            })
            .collect();
        self.tries_raw(op, serde_json::to_vec(&serde_json::json!({ "tries": tries })).unwrap()).await
    }

    /// The same tries, one request each, in order.
    async fn tries_alone(&self, op: &str, tries: &[(&str, &str, u64, &str)]) -> Vec<TryAnswer> {
        let mut answers = Vec::new();
        for (gid, branch, deadline, request) in tries {
            let a = self.try_with_deadline(op, gid, branch, *deadline, request).await;
            let status = a.status.as_u16();
            answers.push(if status == 200 {
                (200, String::from_utf8(a.body).unwrap())
            } else {
                (status, a.error().code)
            });
        }
        answers
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_tries_answers_each_try_as_its_single_try_would() {
    // The same tries, on two participants in the same state: one request each, and one batch.
    let (alone, batched) = (Fixture::start().await, Fixture::start().await);
    for f in [&alone, &batched] {
        f.call("hold_seat", "try", "tx-other", "flight", "12Z").await.expect_ok("fresh");
        f.call("hold_seat", "cancel", "tx-gone", "flight", "12B").await.expect_ok("empty");
    }
    let (deadline, now) = (alone.deadline(), alone.clock.now().0);
    assert_eq!((deadline, now), (batched.deadline(), batched.clock.now().0));
    let tries = [
        ("tx-1", "flight", deadline, "12A"),
        ("tx-1", "flight", deadline, "12A"),        // again: a duplicate
        ("tx-2", "flight", deadline, "12Z"),        // taken: the business refuses
        ("tx-gone", "flight", deadline, "12B"),     // after its cancel: suspended
        ("tx-late", "flight", now, "12C"),          // at its deadline
        ("tx-bad", "flight", deadline, "no seat!"), // refused by the operation's check
        ("tx-3", "flight", deadline, "12D"),
    ];
    let expected: Vec<TryAnswer> = [
        (200, "held 12A"),
        (200, "held 12A"),
        (409, "refused"),
        (409, "suspended"),
        (409, "deadline_passed"),
        (400, "malformed"),
        (200, "held 12D"),
    ]
    .iter()
    .map(|(s, t)| (*s, (*t).to_owned()))
    .collect();
    assert_eq!(alone.tries_alone("hold_seat", &tries).await, expected);
    let (status, answers) = batched.tries("hold_seat", &tries).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answers, expected);
    // And they left the same state behind: each business try ran once.
    for f in [&alone, &batched] {
        assert_eq!(f.runs("hold_seat", "try"), 3);
        assert_eq!(f.item("seats", "12A").as_deref(), Some("held:tx-1"));
        assert_eq!(f.item("seats", "12D").as_deref(), Some("held:tx-3"));
        assert_eq!((f.item("seats", "12B"), f.item("seats", "12C")), (None, None));
        assert_eq!(f.state("tx-gone", "flight"), Some(BarrierState::CancelledEmpty));
        assert_eq!(f.state("tx-late", "flight"), None);
    }
    // A batched try is confirmed as a single one is.
    batched.call("hold_seat", "confirm", "tx-1", "flight", "").await.expect_ok("confirmed");
    assert_eq!(batched.item("seats", "12A").as_deref(), Some("sold"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_tries_of_an_async_operation_runs_each_through_the_barrier() {
    let f = Fixture::start().await;
    f.set_stock("lamp", 1);
    let d = f.deadline();
    let lamp = serde_json::json!({ "item": "lamp" }).to_string();
    // The first try of tx-1 panics: only that try fails, committing nothing; the next try of the
    // same branch (run after it, in the batch's order) goes through.
    f.reserve.panic_next.store(true, Ordering::SeqCst);
    let (status, answers) =
        f.tries("reserve", &[("tx-1", "shop", d, &lamp), ("tx-1", "shop", d, &lamp)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answers[0], (500, "internal".to_owned()));
    assert_eq!(answers[1].0, 200);
    let reserved: Reserved = serde_json::from_str(&answers[1].1).unwrap();
    assert_eq!(reserved, Reserved { item: "lamp".into(), left: 0 });
    // Sold out now: the next one is refused with the typed error, as alone.
    let (_, answers) = f.tries("reserve", &[("tx-2", "shop", d, &lamp), ("tx-1", "shop", d, &lamp)]).await;
    assert_eq!(answers[0], (409, "refused".to_owned()));
    assert_eq!(answers[1], (200, serde_json::to_string(&reserved).unwrap()), "a duplicate answers as stored");
    assert_eq!(f.stock("lamp"), Stock { free: 0, held: 1, sold: 0 });
    assert_eq!(f.state("tx-1", "shop"), Some(BarrierState::Tried));
    assert_eq!(f.state("tx-2", "shop"), None);
    assert_eq!(f.reserve.runs(), (3, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_batch_of_tries_is_refused_whole_and_runs_nothing() {
    let f = Fixture::start().await;
    let d = f.deadline();
    let (status, _) =
        f.tries("hold_seat", &[("tx-1", "flight", d, "12A"), ("bad id!", "flight", d, "12B")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    for body in [&b"not json"[..], b"{\"tries\": 5}", b"{\"tries\": [], \"extra\": 1}", b""] {
        assert_eq!(f.tries_raw("hold_seat", body.to_vec()).await.0, StatusCode::BAD_REQUEST, "{body:?}");
    }
    let many: Vec<_> = (0..=MAX_BATCH_CALLS)
        .map(|i| serde_json::json!({ "gid": format!("tx-{i}"), "branch": "b", "deadline": d, "request": "12A" }))
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({ "tries": many })).unwrap();
    assert_eq!(f.tries_raw("hold_seat", body).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(f.total_runs(), 0);
    assert_eq!(f.state("tx-1", "flight"), None);
    // An empty batch is a batch: nothing to answer.
    assert_eq!(f.tries("hold_seat", &[]).await, (StatusCode::OK, Vec::new()));
}

/// Reads the lines of a streamed answer as they come into `buf`, until it holds `count` lines, the
/// answer ends, or `within` passes; returns the lines read so far, decoded.
async fn streamed_lines(
    res: &mut reqwest::Response,
    buf: &mut String,
    count: usize,
    within: Duration,
) -> Vec<serde_json::Value> {
    let until = tokio::time::Instant::now() + within;
    while buf.matches('\n').count() < count {
        match tokio::time::timeout_at(until, res.chunk()).await {
            Ok(Ok(Some(chunk))) => buf.push_str(std::str::from_utf8(&chunk).unwrap()),
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(e)) => panic!("{e}"),
        }
    }
    buf.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The indexes the lines answer, and their statuses.
fn answered(lines: &[serde_json::Value]) -> Vec<(u64, u64)> {
    let mut seen: Vec<(u64, u64)> =
        lines.iter().map(|l| (l["i"].as_u64().unwrap(), l["status"].as_u64().unwrap())).collect();
    seen.sort_unstable();
    seen
}

impl Fixture {
    /// Sends a batch of tries for `op` asking for a streamed answer; the answer, its head read.
    async fn tries_streamed(&self, op: &str, tries: &[(&str, String)]) -> reqwest::Response {
        let deadline = self.deadline();
        let tries: Vec<_> = tries
            .iter()
            .map(|(gid, request)| {
                serde_json::json!({ "gid": gid, "branch": "b", "deadline": deadline, "request": request })
            })
            .collect();
        let res = self
            .http
            .post(format!("http://{}/tcc/{op}/tries", self.addr))
            .header("content-type", "application/json")
            .header("accept", STREAMED)
            .body(serde_json::to_vec(&serde_json::json!({ "tries": tries })).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["content-type"], "application/x-ndjson");
        res
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_async_try_holds_up_only_its_own_answer_in_a_streamed_batch() {
    let f = Fixture::start().await;
    let items = ["a", "b", "c", "d"];
    for item in items {
        f.set_stock(item, 1);
    }
    // Whichever try reaches the pause first stays inside its business method until released.
    let (started, wait_started) = oneshot::channel();
    let (go, release) = oneshot::channel();
    *f.reserve.pause.lock().unwrap() = Some(Pause { started, release });
    let tries: Vec<(String, String)> = items
        .iter()
        .enumerate()
        .map(|(n, item)| (format!("tx-{n}"), serde_json::json!({ "item": item }).to_string()))
        .collect();
    let tries: Vec<(&str, String)> = tries.iter().map(|(g, r)| (g.as_str(), r.clone())).collect();
    let mut res = f.tries_streamed("reserve", &tries).await;
    wait_started.await.unwrap();
    let mut buf = String::new();
    let early = streamed_lines(&mut res, &mut buf, 3, Duration::from_secs(60)).await;
    assert_eq!(early.len(), 3, "the other tries are answered while one is paused: {buf:?}");
    assert!(answered(&early).iter().all(|(_, status)| *status == 200), "{buf:?}");
    // The paused one cannot have answered (its business method has not returned).
    let still = streamed_lines(&mut res, &mut buf, 4, Duration::from_millis(200)).await;
    assert_eq!(still.len(), 3, "{buf:?}");
    go.send(()).unwrap();
    let all = streamed_lines(&mut res, &mut buf, 4, Duration::from_secs(60)).await;
    assert_eq!(answered(&all), vec![(0, 200), (1, 200), (2, 200), (3, 200)], "{buf:?}");
    assert!(res.chunk().await.unwrap().is_none(), "the answer ends after the last call's line");
    for (n, item) in items.iter().enumerate() {
        assert_eq!(f.stock(item), Stock { free: 0, held: 1, sold: 0 });
        assert_eq!(f.state(&format!("tx-{n}"), "b"), Some(BarrierState::Tried));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_not_asking_for_a_stream_is_answered_whole_in_order() {
    let f = Fixture::start().await;
    let d = f.deadline();
    // Asking for JSON only, and not saying (an older client, or one written by hand).
    for (n, accept) in ["application/json", "*/*"].into_iter().enumerate() {
        let taken = format!("{n}Z");
        f.call("hold_seat", "try", &format!("tx-taken-{n}"), "flight", &taken).await.expect_ok("fresh");
        let tries = serde_json::json!({ "tries": [
            { "gid": format!("tx-{n}-1"), "branch": "flight", "deadline": d, "request": format!("{n}A") },
            { "gid": format!("tx-{n}-2"), "branch": "flight", "deadline": d, "request": taken },
            { "gid": format!("tx-{n}-3"), "branch": "flight", "deadline": d, "request": format!("{n}B") },
        ]});
        let (status, content_type, answer) =
            f.post_batch("hold_seat", "tries", serde_json::to_vec(&tries).unwrap(), accept).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, "application/json");
        let answer: TryBatchAnswer = serde_json::from_slice(&answer).unwrap();
        let statuses: Vec<u16> = answer.results.iter().map(|r| r.status).collect();
        assert_eq!(statuses, vec![200, 409, 200], "{accept}");
        assert_eq!(answer.results[0].body, Some(format!("held {n}A")));
        assert_eq!(answer.results[2].body, Some(format!("held {n}B")));
    }
}
