//! The reqwest [`Transport`]: how the coordinator calls participants in phase two.
//!
//! One shared, pooled [`reqwest::Client`] with a connect timeout, a request timeout and redirects
//! off. Every target is checked against the [`AllowList`] before it is called, even though
//! registration checked it already: the allow-list may have been narrowed since.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tcc_core::Decision;
use tcc_core::transport::{BackCheckCall, BranchCall, CallError, LocalOutcome, Transport};

use crate::metrics::Metrics;
use crate::protocol::{self, BRANCH_HEADER, DEADLINE_HEADER, GID_HEADER};
use crate::target::{AllowList, StepStyle, Target};

mod dtm;
mod phase_two_batches;
use phase_two_batches::Lane;

/// Longest part of a participant's error answer kept for the operator.
const MAX_ERROR_TEXT: usize = 512;

/// Settings of the HTTP client.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Longest a TCP (and TLS) connect may take.
    pub connect_timeout: Duration,
    /// Longest a whole request may take.
    pub request_timeout: Duration,
    /// Idle pooled connections kept per host (for up to 90 s). Connections open are bounded by the
    /// calls in flight, not by this; a cap below those calls makes a busy coordinator close
    /// connections after use and open new ones: with 256 (the earlier default) recovering 50,000
    /// transactions took 12.1 s in `tcc-bench --recover`, with 4,096 7.9 s.
    pub pool_max_idle_per_host: usize,
    /// How phase-two calls to one target are folded into batches.
    pub batching: Batching,
}

/// How calls to one destination are folded into batches: the phase-two calls the coordinator owes
/// one native target, into `POST {target}/batch` requests, and the begins, confirms and cancels of
/// a remote [`TccClient`](crate::client::TccClient), into `POST /v1/batch` requests to its
/// coordinator (see [`TccClient::remote_batching`](crate::client::TccClient::remote_batching)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    /// Most calls in one batch; 1 sends every call alone (`POST {target}/confirm` or `/cancel`).
    pub max_calls: usize,
    /// Batches under way to one target at once. A call arriving while this many are under way waits
    /// for the next; fewer make larger batches (fewer requests), more let a participant work on
    /// several at once.
    pub in_flight: usize,
}

impl Default for Batching {
    /// 256 calls a batch, two batches under way per target. In `tcc-bench`, one and two under way
    /// gave the same throughput and four less; two let a participant with several cores work on
    /// two batches at once.
    fn default() -> Batching {
        Batching { max_calls: 256, in_flight: 2 }
    }
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            pool_max_idle_per_host: 4096,
            batching: Batching::default(),
        }
    }
}

/// Builds the one pooled client a process shares: timeouts set, redirects never followed, no proxy
/// from the environment (a proxy would see every branch payload).
pub fn build_client(config: &ClientConfig) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(config.pool_max_idle_per_host)
        .tcp_nodelay(true)
        .no_proxy()
        .build()
}

/// The coordinator's transport over HTTP.
#[derive(Clone, Debug)]
pub struct HttpTransport {
    client: reqwest::Client,
    allow: AllowList,
    metrics: Arc<Metrics>,
    /// Targets already parsed and checked against `allow` (which never changes), with the URL each
    /// decision calls: parsing a URL (its host) was a tenth of the phase-two CPU. Emptied when full.
    resolved: Arc<Mutex<HashMap<String, Resolved>>>,
    batching: Batching,
}

/// Most targets [`HttpTransport`] keeps resolved.
const RESOLVED_CAP: usize = 4096;

/// A branch target, parsed and checked, or why it may not be called.
type Resolved = Result<Arc<Route>, String>;

/// How to call a target: the URLs of confirm and cancel, and for a native target the lane its
/// batches go through (DTM targets are called one call at a time, the way DTM calls them).
#[derive(Debug)]
struct Route {
    confirm: url::Url,
    cancel: url::Url,
    lane: Option<Arc<Lane>>,
    /// A saga or message step's URL (then `confirm` and `cancel` are both that URL).
    step: Option<StepStyle>,
}

impl HttpTransport {
    /// A transport using `client` (see [`build_client`]), calling only what `allow` allows and
    /// recording call latencies into `metrics`.
    pub fn new(client: reqwest::Client, allow: AllowList, metrics: Arc<Metrics>) -> HttpTransport {
        HttpTransport { client, allow, metrics, resolved: Arc::default(), batching: Batching::default() }
    }

    /// The same transport folding calls as `batching` says (see [`Batching`]).
    pub fn with_batching(mut self, batching: Batching) -> HttpTransport {
        self.batching = batching;
        self
    }

    /// `target` parsed and checked against the allow-list, from the cache when it was seen before.
    fn resolve(&self, target: &str) -> Resolved {
        let cache = || self.resolved.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = cache().get(target) {
            return found.clone();
        }
        let resolved = Target::parse(target).and_then(|t| {
            for url in t.urls() {
                self.allow.check_url(url)?;
            }
            Ok(Arc::new(match t {
                Target::Native(url) => Route {
                    confirm: phase_url(&url, protocol::CONFIRM_PATH),
                    cancel: phase_url(&url, protocol::CANCEL_PATH),
                    lane: Some(Arc::new(Lane::new(phase_two_batches::PhaseTwo {
                        url: phase_url(&url, protocol::BATCH_PATH),
                        client: self.client.clone(),
                        metrics: Arc::clone(&self.metrics),
                    }))),
                    step: None,
                },
                Target::Dtm { confirm, cancel } => Route { confirm, cancel, lane: None, step: None },
                Target::Step { style, url } => {
                    Route { confirm: url.clone(), cancel: url, lane: None, step: Some(style) }
                }
            }))
        });
        let mut cache = cache();
        if cache.len() >= RESOLVED_CAP {
            cache.clear();
        }
        cache.insert(target.to_owned(), resolved.clone());
        resolved
    }

    /// A native call: through its target's lane when batching is on and the target takes batches,
    /// otherwise alone.
    async fn call_native_or_batched(
        &self,
        url: &url::Url,
        lane: &Arc<Lane>,
        call: &BranchCall<'_>,
    ) -> Result<(), CallError> {
        if self.batching.max_calls > 1 {
            let batched = protocol::BatchCall {
                gid: call.gid.to_string(),
                branch: call.branch.id.to_string(),
                deadline: call.deadline.0,
                decision: call.decision,
            };
            match lane.call(self.batching, batched).await {
                crate::lane::Reply::Done(result) => return result,
                crate::lane::Reply::Alone => {}
            }
        }
        self.call_native(url, call).await
    }

    async fn call_native(&self, url: &url::Url, call: &BranchCall<'_>) -> Result<(), CallError> {
        let res = self
            .client
            .post(url.clone())
            .header(GID_HEADER, call.gid.as_str())
            .header(BRANCH_HEADER, call.branch.id.as_str())
            .header(DEADLINE_HEADER, call.deadline.0.to_string())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(call.branch.payload.clone())
            .send()
            .await
            .map_err(|e| transport_error(&e))?;
        let status = res.status();
        if status.is_success() {
            return Ok(());
        }
        let text = error_text(res).await;
        Err(classify(status, text))
    }
}

/// `{base}/{phase}`, keeping the base's query.
pub(crate) fn phase_url(base: &url::Url, phase: &str) -> url::Url {
    let mut u = base.clone();
    let path = format!("{}/{phase}", u.path().trim_end_matches('/'));
    u.set_path(&path);
    u
}

/// A reqwest failure as a call error: all of these (timeouts, refused connections, resets) are
/// worth retrying.
pub(crate) fn transport_error(e: &reqwest::Error) -> CallError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    CallError::Transient(format!("{what}: {}", without_url(e)))
}

/// reqwest errors print the URL, which may carry query parameters; keep the message short.
fn without_url(e: &reqwest::Error) -> String {
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut last = None;
    while let Some(s) = source {
        last = Some(s.to_string());
        source = s.source();
    }
    last.unwrap_or_else(|| e.to_string())
}

/// The whole body of a batch answer, or `Ok(None)` when it runs over `max` bytes (reading stops
/// there); a transport failure on the way is the error.
pub(crate) async fn bounded_body(
    res: &mut reqwest::Response,
    max: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut bytes = Vec::new();
    while let Some(chunk) = res.chunk().await? {
        if bytes.len() + chunk.len() > max {
            return Ok(None);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Some(bytes))
}

/// At most [`MAX_ERROR_TEXT`] bytes of an error answer, as text.
pub(crate) async fn error_text(mut res: reqwest::Response) -> String {
    let mut buf = Vec::new();
    while buf.len() < MAX_ERROR_TEXT {
        match res.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            _ => break,
        }
    }
    buf.truncate(MAX_ERROR_TEXT);
    String::from_utf8_lossy(&buf).into_owned()
}

/// What a non-2xx answer means for the retry policy (see [`crate::protocol`]).
pub(crate) fn classify(status: reqwest::StatusCode, text: String) -> CallError {
    let message = format!("participant answered {status}: {text}");
    if status.is_redirection() {
        return CallError::Permanent(format!(
            "participant answered {status} (a redirect); tcc never follows redirects"
        ));
    }
    let transient =
        status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429) || status.is_informational();
    if transient { CallError::Transient(message) } else { CallError::Permanent(message) }
}

#[async_trait]
impl Transport for HttpTransport {
    async fn call(&self, call: BranchCall<'_>) -> Result<(), CallError> {
        let started = Instant::now();
        let result = match self.resolve(&call.branch.target) {
            Err(e) => Err(CallError::Permanent(e)),
            Ok(route) => {
                let url = match call.decision {
                    Decision::Confirm => &route.confirm,
                    Decision::Cancel => &route.cancel,
                };
                match (&route.lane, route.step) {
                    (Some(lane), _) => self.call_native_or_batched(url, lane, &call).await,
                    (None, None) => dtm::call_branch(&self.client, url, &call).await,
                    (None, Some(StepStyle::Native)) => self.call_native(url, &call).await,
                    (None, Some(StepStyle::Dtm { trans_type, op })) => {
                        dtm::call_step(&self.client, url, trans_type, op, &call).await
                    }
                }
            }
        };
        let op = match call.decision {
            Decision::Confirm => "confirm",
            Decision::Cancel => "cancel",
        };
        let outcome = match &result {
            Ok(()) => "ok",
            Err(CallError::Transient(_)) => "transient",
            Err(CallError::Permanent(_)) => "permanent",
        };
        self.metrics.observe_call(op, outcome, started.elapsed());
        result
    }

    async fn back_check(&self, check: BackCheckCall<'_>) -> LocalOutcome {
        let route = match self.resolve(check.target) {
            Ok(route) => route,
            Err(e) => return LocalOutcome::Unknown(e),
        };
        let mut url = route.confirm.clone();
        let mut req = match route.step {
            Some(StepStyle::Dtm { trans_type, op }) => {
                url.query_pairs_mut()
                    .append_pair("gid", check.gid.as_str())
                    .append_pair("trans_type", trans_type)
                    .append_pair("branch_id", "00")
                    .append_pair("op", op);
                self.client.get(url)
            }
            Some(StepStyle::Native) => {
                url.query_pairs_mut().append_pair("gid", check.gid.as_str());
                self.client.get(url)
            }
            _ => return LocalOutcome::Unknown(format!("{} is not a back-check target", check.target)),
        };
        req =
            req.header(GID_HEADER, check.gid.as_str()).header(DEADLINE_HEADER, check.deadline.0.to_string());
        let mut res = match req.send().await {
            Ok(res) => res,
            Err(e) => return LocalOutcome::Unknown(transport_error(&e).to_string()),
        };
        let status = res.status();
        match bounded_body(&mut res, protocol::dtm::MAX_ANSWER).await {
            Ok(Some(body)) => protocol::dtm::classify_back_check(status, &body),
            Ok(None) => LocalOutcome::Unknown("the back-check's answer is too large".into()),
            Err(e) => LocalOutcome::Unknown(transport_error(&e).to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        use reqwest::StatusCode as S;
        let t = |s: S| matches!(classify(s, String::new()), CallError::Transient(_));
        for s in [
            S::INTERNAL_SERVER_ERROR,
            S::BAD_GATEWAY,
            S::SERVICE_UNAVAILABLE,
            S::TOO_MANY_REQUESTS,
            S::REQUEST_TIMEOUT,
        ] {
            assert!(t(s), "{s}");
        }
        for s in [S::CONFLICT, S::GONE, S::BAD_REQUEST, S::NOT_FOUND, S::FOUND, S::TEMPORARY_REDIRECT] {
            assert!(!t(s), "{s}");
        }
    }

    #[test]
    fn a_native_5xx_is_transient_whatever_its_body_says() {
        use reqwest::StatusCode as S;
        for body in [r#"{"dtm_result":"FAILURE"}"#, r#"{"code":"expired","message":"gone"}"#, "FAILURE"] {
            for s in [S::INTERNAL_SERVER_ERROR, S::SERVICE_UNAVAILABLE, S::GATEWAY_TIMEOUT] {
                assert!(matches!(classify(s, body.to_owned()), CallError::Transient(_)), "{s} {body}");
            }
        }
    }

    #[test]
    fn targets_are_resolved_once_and_a_refused_one_stays_refused() {
        let allow = AllowList::new(&[]).unwrap_or_else(|e| panic!("{e}"));
        let client = build_client(&ClientConfig::default()).unwrap_or_else(|e| panic!("{e}"));
        let t = HttpTransport::new(client, allow, Arc::default());
        for _ in 0..2 {
            let urls = t.resolve("http://127.0.0.1:9/tcc/seat").unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(urls.confirm.as_str(), "http://127.0.0.1:9/tcc/seat/confirm");
            assert_eq!(urls.cancel.as_str(), "http://127.0.0.1:9/tcc/seat/cancel");
            assert_eq!(
                urls.lane.as_ref().map(|l| l.carrier().url.as_str()),
                Some("http://127.0.0.1:9/tcc/seat/batch")
            );
            assert!(t.resolve("http://169.254.169.254/latest").is_err(), "not allowed, cached or not");
            assert!(t.resolve("not a url").is_err());
            let dtm = "dtm-tcc http://127.0.0.1:9/c http://127.0.0.1:9/x";
            let urls = t.resolve(dtm).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                (urls.confirm.as_str(), urls.cancel.as_str(), urls.lane.is_none()),
                ("http://127.0.0.1:9/c", "http://127.0.0.1:9/x", true)
            );
            assert!(
                t.resolve("dtm-tcc http://127.0.0.1:9/c http://169.254.169.254/x").is_err(),
                "both URLs checked"
            );
        }
        for i in 0..RESOLVED_CAP + 10 {
            let _ = t.resolve(&format!("http://127.0.0.1:9/p/{i}"));
        }
        let held = t.resolved.lock().map(|m| m.len()).unwrap_or_else(|e| e.into_inner().len());
        assert!(held <= RESOLVED_CAP, "the cache holds {held}");
    }

    #[test]
    fn phase_urls_append_a_segment() {
        let u = |s: &str| url::Url::parse(s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(phase_url(&u("http://h/tcc/op"), "confirm").as_str(), "http://h/tcc/op/confirm");
        assert_eq!(phase_url(&u("http://h/tcc/op/"), "cancel").as_str(), "http://h/tcc/op/cancel");
        assert_eq!(phase_url(&u("http://h/op?x=1"), "try").as_str(), "http://h/op/try?x=1");
    }
}
