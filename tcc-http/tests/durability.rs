//! Durable means synced, on the participant side (DESIGN.md guarantees 2 and 6): the participant
//! runtime answers a try, confirm or cancel only after an `fdatasync` of the database holding the
//! barrier record and the business writes has completed.
//!
//! The database is opened with an observer that [`DurableDb`] calls after each completed sync; the
//! test logs, in the same sequence, when each HTTP call was sent and when its answer came. Every
//! answer must follow a sync of the log file that completed after its call was sent. If the group
//! commit answered before its flush, or the flush stopped at sled's own (no fdatasync), it fails.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tcc_core::barrier::SledBarrier;
use tcc_core::durable::SyncObserver;
use tcc_core::{Clock, DurableDb, SystemClock};
use tcc_http::participant::Participant;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    Sent(usize),
    Synced(PathBuf),
    Answered(usize),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_participant_answers_every_phase_only_after_an_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let observer: SyncObserver = Arc::new(move |p: &Path| log.lock().unwrap().push(Event::Synced(p.into())));
    let db = DurableDb::open_observed(dir.path(), sled::Config::new(), Some(observer)).unwrap();
    let seats = db.open_tree("seats").unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let barrier =
        SledBarrier::open(&db, vec![seats.clone()], clock.clone(), Duration::from_secs(60)).unwrap();
    let participant = Participant::new(barrier).unwrap().operation_fn(
        "hold_seat",
        |call| {
            call.tree(0).insert(call.request(), "held")?;
            Ok::<_, sled::transaction::ConflictableTransactionError<String>>(Vec::new())
        },
        |call| {
            call.tree(0).insert(call.request(), "sold")?;
            Ok(())
        },
        |call| {
            call.tree(0).remove(call.request())?;
            Ok(())
        },
    );
    let app = axum::Router::new().nest("/p", participant.router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = clock.now() + Duration::from_secs(30);
    // Two branches of one transaction, each tried; one confirmed, the other cancelled, plus an empty
    // cancel and a duplicate confirm: every answer counts.
    let calls =
        [("a", "try"), ("b", "try"), ("a", "confirm"), ("b", "cancel"), ("c", "cancel"), ("a", "confirm")];
    for (i, (branch, phase)) in calls.iter().enumerate() {
        events.lock().unwrap().push(Event::Sent(i));
        let answer = http
            .post(format!("http://{addr}/p/hold_seat/{phase}"))
            .header("tcc-gid", "tx-1")
            .header("tcc-branch", *branch)
            .header("tcc-deadline", deadline.0.to_string())
            .body(format!("seat-{branch}"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{phase} of {branch}");
        events.lock().unwrap().push(Event::Answered(i));
    }
    assert_eq!(seats.get("seat-a").unwrap().as_deref(), Some(&b"sold"[..]));
    assert_eq!(seats.get("seat-b").unwrap(), None);

    let file = dir.path().join("db");
    let events = events.lock().unwrap().clone();
    for (i, call) in calls.iter().enumerate() {
        let start = events.iter().position(|e| *e == Event::Sent(i)).unwrap();
        let end = events.iter().position(|e| *e == Event::Answered(i)).unwrap();
        assert!(
            events[start..end].contains(&Event::Synced(file.clone())),
            "call {i} {:?} was answered before a sync of the log completed: {events:?}",
            call
        );
    }
    server.abort();
}
