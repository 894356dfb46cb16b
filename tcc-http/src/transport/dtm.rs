//! Calling a DTM-style branch: `POST` to its own confirm or cancel URL, the way DTM's server does,
//! the answer read by DTM's conventions ([`crate::protocol::dtm`]).

use tcc_core::Decision;
use tcc_core::transport::{BranchCall, CallError};
use url::Url;

use crate::protocol::dtm::{MAX_ANSWER, TCC, classify, classify_action};
use crate::protocol::{BRANCH_HEADER, DEADLINE_HEADER, GID_HEADER};

/// Calls a DTM-style branch's confirm or cancel `url` the way DTM's server does (see
/// `tcc_http::server::dtm`, "Calling branches") and reads the answer by DTM's conventions. The engine bounds the call's duration.
pub(crate) async fn call_branch(
    client: &reqwest::Client,
    url: &Url,
    call: &BranchCall<'_>,
) -> Result<(), CallError> {
    let op = match call.decision {
        Decision::Confirm => "confirm",
        Decision::Cancel => "cancel",
    };
    let (status, body) = post(client, url, TCC, op, call).await?;
    classify(op, status, &body)
}

/// Calls a DTM saga's action or compensation, or a DTM message's action, at `url` the way DTM's
/// server does. A saga action's refusal (409 or `FAILURE`) is [`CallError::Permanent`]; every
/// other failure is worth another try.
pub(crate) async fn call_step(
    client: &reqwest::Client,
    url: &Url,
    trans_type: &str,
    op: &str,
    call: &BranchCall<'_>,
) -> Result<(), CallError> {
    let (status, body) = post(client, url, trans_type, op, call).await?;
    if trans_type == crate::protocol::dtm::SAGA && op == "action" {
        classify_action(status, &body)
    } else {
        classify(op, status, &body)
    }
}

/// `POST`s the branch's payload to `url` with DTM's query parameters; the status and at most
/// [`MAX_ANSWER`] bytes of the answer.
async fn post(
    client: &reqwest::Client,
    url: &Url,
    trans_type: &str,
    op: &str,
    call: &BranchCall<'_>,
) -> Result<(reqwest::StatusCode, Vec<u8>), CallError> {
    let mut url = url.clone();
    url.query_pairs_mut()
        .append_pair("gid", call.gid.as_str())
        .append_pair("trans_type", trans_type)
        .append_pair("branch_id", call.branch.id.as_str())
        .append_pair("op", op);
    let mut res = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(GID_HEADER, call.gid.as_str())
        .header(BRANCH_HEADER, call.branch.id.as_str())
        .header(DEADLINE_HEADER, call.deadline.0.to_string())
        .body(call.branch.payload.clone())
        .send()
        .await
        .map_err(|e| crate::transport::transport_error(&e))?;
    let status = res.status();
    let mut body = Vec::new();
    while body.len() < MAX_ANSWER {
        match res.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => break,
            // Without the whole answer a success cannot be told from a failure: ask again.
            Err(e) => return Err(crate::transport::transport_error(&e)),
        }
    }
    body.truncate(MAX_ANSWER);
    Ok((status, body))
}
