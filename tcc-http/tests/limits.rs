//! Limits that keep one client from exhausting the coordinator (DESIGN.md guarantee 10): the cap on
//! one transaction's payload bytes on every API that registers branches, and the limits on slow
//! clients (header and body read timeouts, the header buffer, the connection cap), over raw
//! loopback sockets.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Tcc, Where, fast_core};
use tcc_http::serve::Limits;
use tcc_http::server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest any wait here lasts.
const LONG: Duration = Duration::from_secs(10);

/// A standalone coordinator with these limits on its clients.
async fn coordinator(limits: Limits) -> Tcc {
    Tcc::start_with(Where::Standalone, fast_core(), ServerConfig { limits, ..ServerConfig::default() }).await
}

/// Limits short enough for a test: slow clients are cut off in a fraction of a second.
fn short() -> Limits {
    Limits {
        header_read_timeout: Duration::from_millis(300),
        max_header_bytes: 16 << 10,
        body_read_timeout: Duration::from_millis(300),
        max_connections: 64,
    }
}

/// Everything the server sends on `tcp` until it closes the connection; `None` if it has not closed
/// it within [`LONG`].
async fn until_closed(tcp: &mut TcpStream) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(LONG, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| got)
}

/// The status and JSON body of the first answer in `raw`.
fn parse_answer(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())))
}

/// The cap the tests configure: two branches of 40 KiB fit under it, a third does not.
const CAP: usize = 100 << 10;
const BRANCH: usize = 40 << 10;

async fn answer(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn register(id: &str, url: &str) -> Value {
    json!({ "branch": id, "target": url, "payload": "x".repeat(BRANCH) })
}

#[track_caller]
fn assert_over_cap((status, body): &(u16, Value)) {
    assert_eq!(*status, 422, "{body}");
    assert_eq!(body["code"], "invalid_input", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains(&format!("at most {CAP} payload bytes")), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_past_its_payload_cap_is_422_and_nothing_is_stored() {
    let core = tcc_core::Config { max_tx_payload: CAP, ..fast_core() };
    let tc = Tcc::start_with(Where::Standalone, core, ServerConfig::default()).await;
    let base = tc.url();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let target = "http://127.0.0.1:9/tcc/op";
    let get = async |gid: &str| {
        answer(http.get(format!("{base}/v1/transactions/{gid}")).send().await.unwrap()).await
    };

    // Native registration: the third 40 KiB branch would pass 100 KiB.
    let (status, _) = answer(
        http.post(format!("{base}/v1/transactions")).json(&json!({"gid": "reg"})).send().await.unwrap(),
    )
    .await;
    assert_eq!(status, 201);
    for id in ["a", "b"] {
        let url = format!("{base}/v1/transactions/reg/branches");
        let (status, body) = answer(http.post(&url).json(&register(id, target)).send().await.unwrap()).await;
        assert_eq!(status, 200, "{body}");
    }
    let before = get("reg").await;
    let url = format!("{base}/v1/transactions/reg/branches");
    assert_over_cap(&answer(http.post(&url).json(&register("c", target)).send().await.unwrap()).await);
    assert_eq!(get("reg").await, before, "a refused registration changes nothing");

    // A begin with its branches: refused whole.
    let branches: Vec<Value> = ["a", "b", "c"].iter().map(|id| register(id, target)).collect();
    let begin = json!({ "gid": "begun", "branches": branches });
    assert_over_cap(
        &answer(http.post(format!("{base}/v1/transactions")).json(&begin).send().await.unwrap()).await,
    );
    assert_eq!(get("begun").await.0, 404);

    // The same begin in a batch: that operation's line is the 422, nothing stored.
    let res =
        http.post(format!("{base}/v1/batch")).json(&json!({ "ops": [{ "begin": begin }] })).send().await;
    let res = res.unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let line: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_over_cap(&(line["status"].as_u64().unwrap() as u16, line["body"].clone()));
    assert_eq!(get("begun").await.0, 404);

    // DTM registerBranch: 422 with FAILURE, the branch not stored.
    let dtm = format!("{base}/api/dtmsvr");
    let post = async |call: &str, body: Value| {
        answer(http.post(format!("{dtm}/{call}")).json(&body).send().await.unwrap()).await
    };
    assert_eq!(post("prepare", json!({"gid": "dtm", "trans_type": "tcc"})).await.0, 200);
    let branch = |id: &str| {
        json!({ "gid": "dtm", "trans_type": "tcc", "branch_id": id, "data": "x".repeat(BRANCH),
                "confirm": format!("{target}/confirm"), "cancel": format!("{target}/cancel") })
    };
    for id in ["01", "02"] {
        let (status, body) = post("registerBranch", branch(id)).await;
        assert_eq!(status, 200, "{body}");
    }
    let refused = post("registerBranch", branch("03")).await;
    assert_over_cap(&refused);
    assert_eq!(refused.1["dtm_result"], "FAILURE");
    let q = answer(http.get(format!("{dtm}/query?gid=dtm")).send().await.unwrap()).await.1;
    assert_eq!(q["branches"].as_array().unwrap().len(), 4, "two branches, two rows each: {q}");
    drop(tc);
}

/// An idle keep-alive connection holds one of the capped connections: hyper's header timer starts
/// as soon as the connection waits for its next request, so an idle one is closed like a slow one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let tc = coordinator(short()).await;
    let addr = tc.server.as_ref().unwrap().addr();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let got = until_closed(&mut tcp).await.expect("an idle connection is still open");
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_never_finished_is_cut_off_and_its_connection_closed() {
    let tc = coordinator(short()).await;
    let addr = tc.server.as_ref().unwrap().addr();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nX-Pad: aaaa").await.unwrap();
    assert!(until_closed(&mut tcp).await.is_some(), "a connection with half a header is still open");
    // The server serves on.
    let tx = tc.client.begin(LONG).await.unwrap();
    tx.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_past_the_buffer_is_refused_with_431() {
    let tc = coordinator(short()).await;
    let addr = tc.server.as_ref().unwrap().addr();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let pad = "a".repeat(100 << 10);
    // The server may close before it has read it all: a failed write is part of the refusal.
    let _ =
        tcp.write_all(format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {pad}\r\n\r\n").as_bytes()).await;
    let answer = until_closed(&mut tcp).await.expect("the connection stays open");
    let head = String::from_utf8_lossy(&answer);
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    // A header under the limit is served.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let pad = "a".repeat(8 << 10);
    let req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {pad}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let answer = until_closed(&mut tcp).await.expect("the connection stays open");
    assert_eq!(parse_answer(&answer).0, 200, "{}", String::from_utf8_lossy(&answer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_is_answered_408_with_the_error_body_and_stores_nothing() {
    let tc = coordinator(short()).await;
    let addr = tc.server.as_ref().unwrap().addr();
    for path in ["/v1/transactions", "/v1/batch", "/api/dtmsvr/prepare"] {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        let answer = tokio::time::timeout(LONG, async {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains("}") {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            got
        })
        .await
        .unwrap_or_else(|_| panic!("{path}: a body that never arrives is still waited for"));
        let (status, body) = parse_answer(&answer);
        assert_eq!(status, 408, "{path}: {}", String::from_utf8_lossy(&answer));
        assert_eq!(body["code"], "body_timeout", "{path}: {body}");
    }
    // A Content-Length past the body limit is refused at once.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head =
        "POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\nConnection: close\r\n\r\n{";
    tcp.write_all(head.as_bytes()).await.unwrap();
    let answer = until_closed(&mut tcp).await.expect("the connection stays open");
    let (status, body) = parse_answer(&answer);
    assert_eq!((status, body["code"].as_str()), (413, Some("too_large")), "{body}");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let page: Value =
        http.get(format!("{}/v1/transactions", tc.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["items"], json!([]), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_until_one_closes() {
    let limits = Limits { max_connections: 2, header_read_timeout: Duration::from_secs(60), ..short() };
    let tc = coordinator(limits).await;
    let url = format!("{}/healthz", tc.url());
    let addr = tc.server.as_ref().unwrap().addr();
    let fresh = || reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().unwrap();
    // Two idle connections take the two places.
    let first = TcpStream::connect(addr).await.unwrap();
    let _second = TcpStream::connect(addr).await.unwrap();
    let refused = fresh().get(&url).timeout(Duration::from_millis(500)).send().await;
    assert!(refused.is_err(), "a third connection was served past the cap: {refused:?}");
    drop(first);
    let served = fresh().get(&url).timeout(LONG).send().await.unwrap();
    assert_eq!(served.status(), 200);
}
