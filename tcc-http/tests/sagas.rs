//! Sagas and two-phase messages through `TccClient`'s builders, embedded and standalone, against a
//! participant on a loopback port that records every call: steps called as the native protocol
//! says (`POST` the URL as is, the payload as the body, the `tcc-*` headers), a refusal compensating
//! what ran in reverse order, a message's actions run only when submitted, and a prepared message
//! resolved by its back-check.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::any;
use support::{BOTH, Tcc, fast_core};
use tcc_http::protocol::coordinator::StateView;
use tcc_http::server::ServerConfig;

/// (method, service, op, tcc-gid header, body)
type Seen = Arc<Mutex<Vec<(Method, String, String, String, String)>>>;

async fn participant() -> (String, Seen) {
    let seen: Seen = Arc::default();
    async fn serve(
        State(seen): State<Seen>,
        method: Method,
        Path((svc, op)): Path<(String, String)>,
        RawQuery(query): RawQuery,
        headers: HeaderMap,
        body: String,
    ) -> (StatusCode, String) {
        let gid = headers.get("tcc-gid").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let from_query = query.unwrap_or_default().contains(&format!("gid={gid}"));
        seen.lock().unwrap().push((method, svc.clone(), op.clone(), gid, body.clone()));
        match (svc.as_str(), op.as_str()) {
            (_, "charge") if body.contains("refuse") => (StatusCode::CONFLICT, "insufficient funds".into()),
            ("committed", "query") if from_query => (StatusCode::OK, "committed".into()),
            ("rolledback", "query") if from_query => (StatusCode::CONFLICT, "rolled back".into()),
            (_, "query") => (StatusCode::TOO_EARLY, "unknown".into()),
            _ => (StatusCode::OK, "ok".into()),
        }
    }
    let app = Router::new().route("/{svc}/{op}", any(serve)).with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        tcc_http::serve::serve(listener, app, &Default::default(), std::future::pending()).await
    });
    (url, seen)
}

/// (service, op) of the calls made for `gid`, in order, back-checks left out.
fn calls(seen: &Seen, gid: &str) -> Vec<(String, String)> {
    let seen = seen.lock().unwrap();
    seen.iter().filter(|c| c.3 == gid && c.2 != "query").map(|c| (c.1.clone(), c.2.clone())).collect()
}

fn call(svc: &str, op: &str) -> (String, String) {
    (svc.to_owned(), op.to_owned())
}

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_runs_its_steps_in_order_and_a_refusal_compensates_what_ran_in_reverse() {
    let (p, seen) = participant().await;
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let done = tcc
            .client
            .saga(Duration::from_secs(30))
            .step(&format!("{p}/pay/charge"), &format!("{p}/pay/refund"), r#"{"amount":1}"#)
            .step(&format!("{p}/mail/send"), &format!("{p}/mail/retract"), r#"{"to":"ada"}"#)
            .submit_and_wait(WAIT)
            .await
            .unwrap();
        assert_eq!((done.state, done.kind.as_str()), (StateView::Confirmed, "saga"), "{mode:?}");
        assert_eq!(calls(&seen, &done.gid), [call("pay", "charge"), call("mail", "send")], "{mode:?}");
        let bodies: Vec<String> =
            seen.lock().unwrap().iter().filter(|c| c.3 == done.gid).map(|c| c.4.clone()).collect();
        assert_eq!(bodies, [r#"{"amount":1}"#, r#"{"to":"ada"}"#], "the payload is the body");

        // The second charge refuses: the mail was sent, so it is retracted, then the first charge
        // refunded; the last step never runs.
        let failed = tcc
            .client
            .saga(Duration::from_secs(30))
            .step(&format!("{p}/pay/charge"), &format!("{p}/pay/refund"), "{}")
            .step(&format!("{p}/mail/send"), &format!("{p}/mail/retract"), "{}")
            .step(&format!("{p}/card/charge"), &format!("{p}/card/refund"), r#"{"refuse":true}"#)
            .step(&format!("{p}/ship/send"), &format!("{p}/ship/recall"), "{}")
            .submit_and_wait(WAIT)
            .await
            .unwrap();
        assert_eq!(failed.state, StateView::Cancelled, "{mode:?}");
        assert_eq!(
            calls(&seen, &failed.gid),
            [
                call("pay", "charge"),
                call("mail", "send"),
                call("card", "charge"),
                call("card", "refund"),
                call("mail", "retract"),
                call("pay", "refund")
            ],
            "{mode:?}"
        );
        tcc.client.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_saga_waits_for_each_steps_predecessors() {
    let (p, seen) = participant().await;
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let done = tcc
            .client
            .saga(Duration::from_secs(30))
            .step_after(&[], &format!("{p}/a/go"), &format!("{p}/a/undo"), "{}")
            .step_after(&[], &format!("{p}/b/go"), &format!("{p}/b/undo"), "{}")
            .step_after(&[0, 1], &format!("{p}/c/go"), &format!("{p}/c/undo"), "{}")
            .submit_and_wait(WAIT)
            .await
            .unwrap();
        assert_eq!(done.state, StateView::Confirmed, "{mode:?}");
        let order = calls(&seen, &done.gid);
        assert_eq!(order.len(), 3);
        assert_eq!(order[2], call("c", "go"), "{mode:?}: {order:?}");

        // `next_after` (what a `#[tcc]` stub's step is given) makes the next step concurrent: the
        // first two steps wait for nothing, so the second starts with the first, even though the
        // first refuses (a sequential saga would never call it), and is then compensated.
        let both = tcc
            .client
            .saga(Duration::from_secs(30))
            .next_after(&[])
            .step(&format!("{p}/x/charge"), &format!("{p}/x/refund"), r#"{"refuse":true}"#)
            .next_after(&[])
            .step(&format!("{p}/y/go"), &format!("{p}/y/undo"), "{}")
            .next_after(&[0, 1])
            .step(&format!("{p}/z/go"), &format!("{p}/z/undo"), "{}")
            .submit_and_wait(WAIT)
            .await
            .unwrap();
        assert_eq!(both.state, StateView::Cancelled, "{mode:?}");
        let order = calls(&seen, &both.gid);
        assert!(order.contains(&call("y", "go")), "{mode:?}: {order:?}");
        assert!(order.contains(&call("y", "undo")), "{mode:?}: {order:?}");
        assert!(!order.contains(&call("z", "go")), "{mode:?}: {order:?}");
        tcc.client.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_runs_its_actions_only_once_submitted() {
    let (p, seen) = participant().await;
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let msg = tcc
            .client
            .message(Duration::from_secs(30))
            .add(&format!("{p}/points/credit"), r#"{"points":5}"#)
            .add(&format!("{p}/mail/send"), "{}")
            .prepare(&format!("{p}/committed/query"))
            .await
            .unwrap();
        assert_eq!(tcc.client.get(msg.gid()).await.unwrap().state, StateView::Trying);
        assert!(calls(&seen, msg.gid().as_str()).is_empty(), "nothing runs while prepared");
        msg.submit().await.unwrap();
        let done = tcc.client.wait(msg.gid(), WAIT).await.unwrap();
        assert_eq!((done.state, done.kind.as_str()), (StateView::Confirmed, "msg"), "{mode:?}");
        assert_eq!(calls(&seen, &done.gid), [call("points", "credit"), call("mail", "send")]);

        let aborted = tcc
            .client
            .message(Duration::from_secs(30))
            .add(&format!("{p}/points/credit"), "{}")
            .prepare(&format!("{p}/rolledback/query"))
            .await
            .unwrap();
        let tx = aborted.abort().await.unwrap();
        assert_eq!(tx.state, StateView::Cancelled);
        assert!(aborted.submit().await.is_err(), "a submit after the abort is refused");
        assert!(calls(&seen, aborted.gid().as_str()).is_empty(), "an aborted message calls nothing");

        let at_once = tcc.client.message(Duration::from_secs(30)).add(&format!("{p}/mail/send"), "{}");
        let sent = at_once.submit().await.unwrap();
        let sent = tcc.client.wait(&sent.gid.parse().unwrap(), WAIT).await.unwrap();
        assert_eq!(sent.state, StateView::Confirmed);
        tcc.client.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_left_prepared_is_resolved_by_its_back_check() {
    let (p, seen) = participant().await;
    for mode in BOTH {
        let tcc = Tcc::start_with(mode, fast_core(), ServerConfig::default()).await;
        let msg = || tcc.client.message(Duration::from_millis(300)).add(&format!("{p}/points/credit"), "{}");
        let committed = msg().prepare(&format!("{p}/committed/query")).await.unwrap();
        let rolled_back = msg().prepare(&format!("{p}/rolledback/query")).await.unwrap();
        // The initiator never says: the coordinator asks at the deadline.
        let a = tcc.client.wait(committed.gid(), WAIT).await.unwrap();
        let b = tcc.client.wait(rolled_back.gid(), WAIT).await.unwrap();
        assert_eq!((a.state, b.state), (StateView::Confirmed, StateView::Cancelled), "{mode:?}");
        assert_eq!(calls(&seen, &a.gid), [call("points", "credit")]);
        assert!(calls(&seen, &b.gid).is_empty());
        let checks = seen.lock().unwrap().iter().filter(|c| c.3 == a.gid && c.2 == "query").count();
        assert!(checks >= 1, "the back-check was asked");
        tcc.client.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sagas_and_messages_are_refused_and_store_nothing() {
    let (p, _seen) = participant().await;
    let tcc = Tcc::start(support::Where::Standalone).await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        http.post(format!("{}/v1/{path}", tcc.url())).json(&body).send()
    };
    let step = |svc: &str| serde_json::json!({ "step": svc, "action": format!("{p}/{svc}/go"), "compensate": format!("{p}/{svc}/undo") });
    let after = |mut s: serde_json::Value, i: u32| {
        s["after"] = serde_json::json!([i]);
        s
    };
    for (path, body, status) in [
        ("sagas", serde_json::json!({ "steps": [{ "step": "a", "action": format!("{p}/a/go") }] }), 422),
        ("sagas", serde_json::json!({ "concurrent": true, "steps": [after(step("a"), 1)] }), 422),
        (
            "sagas",
            serde_json::json!({ "steps": [step("a"), { "step": "b", "action": "http://169.254.169.254/x", "compensate": format!("{p}/b/undo") }] }),
            422,
        ),
        ("sagas", serde_json::json!({ "steps": [step("a")], "surprise": 1 }), 400),
        ("messages", serde_json::json!({ "steps": [{ "step": "a", "action": format!("{p}/a/go") }] }), 422),
        ("messages", serde_json::json!({ "submit": true, "steps": [step("a")] }), 422),
    ] {
        let res = post(path, body.clone()).await.unwrap();
        assert_eq!(res.status().as_u16(), status, "{path} {body}: {}", res.text().await.unwrap());
    }
    let page: serde_json::Value =
        http.get(format!("{}/v1/transactions", tcc.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["items"].as_array().map(Vec::len), Some(0), "{page}");
}
