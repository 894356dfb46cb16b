//! Every error the coordinator and the participant runtime answer carries the documented JSON
//! error body `{code, message}`: the errors of the handlers, and those axum and tower-http answer
//! before a handler runs (extractor rejections, body limits, unknown routes, wrong methods).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use support::{Tcc, Where};
use tcc_core::barrier::SledBarrier;
use tcc_http::participant::Participant;

/// One bad request and what it must be answered.
struct Case {
    method: Method,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

fn case(method: Method, path: &'static str, body: &[u8], status: u16, code: &'static str) -> Case {
    Case { method, path, content_type: Some("application/json"), body: body.to_vec(), status, code }
}

/// Sends every case to `base` and checks each answer is `status` with a JSON `{code, message}`.
async fn check(base: &str, cases: Vec<Case>) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for c in cases {
        let mut req = http.request(c.method.clone(), format!("{base}{}", c.path)).body(c.body.clone());
        if let Some(ct) = c.content_type {
            req = req.header("content-type", ct);
        }
        let res = req.send().await.unwrap();
        let what = format!("{} {}", c.method, c.path);
        let status = res.status().as_u16();
        let ct =
            res.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let text = res.text().await.unwrap();
        assert_eq!(status, c.status, "{what}: {text}");
        assert!(ct.starts_with("application/json"), "{what}: answered {ct:?}: {text}");
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"));
        assert_eq!(body["code"], c.code, "{what}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
        // The DTM API's 4xx say FAILURE, as DTM's do (its unknown routes and methods are the
        // native API's).
        if c.path.starts_with("/api/dtmsvr/") && !matches!(c.status, 404 | 405) {
            assert_eq!(body["dtm_result"], "FAILURE", "{what}: {body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_the_coordinator_answers_carries_the_json_error_body() {
    let tc = Tcc::start(Where::Standalone).await;
    let big = vec![b' '; (1 << 20) + 1];
    let cases = vec![
        // A path or query that does not decode (axum's extractors).
        case(Method::GET, "/v1/transactions/%FF", b"", 400, "malformed"),
        case(Method::POST, "/v1/transactions/%FF/confirm", b"", 400, "malformed"),
        case(Method::POST, "/v1/transactions/%C3%28/branches", b"{}", 400, "malformed"),
        case(Method::GET, "/v1/transactions?limit=many", b"", 400, "malformed"),
        // JSON syntax errors, a missing body, a wrong content type with a body that is no object.
        case(Method::POST, "/v1/transactions", b"{not json", 400, "malformed"),
        case(Method::POST, "/v1/transactions/tx-1/branches", b"", 400, "malformed"),
        Case {
            content_type: Some("text/plain"),
            ..case(Method::POST, "/v1/transactions", b"hello", 400, "malformed")
        },
        Case { content_type: None, ..case(Method::POST, "/v1/batch", b"", 400, "malformed") },
        // Too large: by its Content-Length (refused before it is read).
        case(Method::POST, "/v1/transactions", &big, 413, "too_large"),
        case(Method::POST, "/api/dtmsvr/prepare", &big, 413, "too_large"),
        // Unknown routes and wrong methods.
        case(Method::GET, "/nope", b"", 404, "unknown_route"),
        case(Method::GET, "/api/dtmsvr/nope", b"", 404, "unknown_route"),
        case(Method::DELETE, "/v1/transactions", b"", 405, "method_not_allowed"),
        case(Method::PUT, "/api/dtmsvr/prepare", b"", 405, "method_not_allowed"),
        // The DTM API.
        case(Method::POST, "/api/dtmsvr/prepare", b"{", 400, "malformed"),
        case(Method::GET, "/api/dtmsvr/query?gid=%FF", b"", 400, "malformed"),
    ];
    check(&tc.url(), cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_the_participant_runtime_answers_carries_the_json_error_body() {
    let db = tcc_core::DurableDb::temporary().unwrap();
    let barrier =
        SledBarrier::open(&db, Vec::new(), Arc::new(tcc_core::SystemClock), Duration::from_secs(60)).unwrap();
    let participant = Participant::new(barrier).unwrap().operation_fn(
        "op",
        |_| Ok::<_, sled::transaction::ConflictableTransactionError<String>>(Vec::new()),
        |_| Ok(()),
        |_| Ok(()),
    );
    let app = axum::Router::new().nest("/tcc", participant.router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        let limits = tcc_http::serve::Limits::default();
        tcc_http::serve::serve(listener, app, &limits, async move {
            let _ = stopped.await;
        })
        .await
    });
    let big = vec![b' '; (1 << 20) + 1];
    let cases = vec![
        case(Method::POST, "/tcc/%FF/try", b"", 400, "malformed"),
        case(Method::POST, "/tcc/op/try", b"", 400, "malformed"), // no tcc headers
        case(Method::POST, "/tcc/op/batch", b"{not json", 400, "malformed"),
        case(Method::POST, "/tcc/op/try", &big, 413, "too_large"),
        case(Method::POST, "/tcc/nope/try", b"", 404, "unknown_operation"),
        case(Method::POST, "/tcc/op/nope", b"", 404, "unknown_phase"),
        case(Method::GET, "/tcc/op/try", b"", 405, "method_not_allowed"),
    ];
    check(&base, cases).await;
    let _ = stop.send(());
    served.await.unwrap().unwrap();
}
