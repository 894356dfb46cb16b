//! The participant runtime over real loopback sockets: the status codes of the wire protocol, the
//! three TCC anomalies, the body limit and the participant's own expiry.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use sled::transaction::{ConflictableTransactionResult, TransactionalTree, abort};
use tcc_core::barrier::{BARRIER_TREE, BarrierState, SledBarrier};
use tcc_core::{BranchId, Clock, Gid, ManualClock, Timestamp};
use tcc_http::ErrorBody;
use tcc_http::participant::{Call, OUTCOME_HEADER, Operation, Participant, decode_stored_request};
use tcc_http::protocol::{BRANCH_HEADER, DEADLINE_HEADER, GID_HEADER, MAX_BODY};

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

/// One participant with three operations (`hold_seat`, `hold_room`, `blob`) served on a loopback
/// port under `/tcc`, on a manual clock.
struct Fixture {
    db: sled::Db,
    clock: ManualClock,
    participant: Participant,
    addr: SocketAddr,
    http: reqwest::Client,
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
        let db = sled::Config::new().temporary(true).open().unwrap();
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
        let app = axum::Router::new().nest("/tcc", participant.router());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Fixture { db, clock, participant, addr, http }
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
        let answer = f.post("blob", phase, &headers, vec![b'x'; MAX_BODY + 1]).await;
        answer.expect_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large");
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
