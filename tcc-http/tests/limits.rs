//! Limits that keep one client from exhausting the coordinator (DESIGN.md guarantee 10): the cap on
//! one transaction's payload bytes on every API that registers branches.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::{Value, json};
use support::{Tcc, Where, fast_core};
use tcc_http::server::ServerConfig;

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
