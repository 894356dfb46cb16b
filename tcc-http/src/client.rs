//! What an initiator uses: begin a transaction, register and try its branches, then confirm or cancel.
//!
//! The same [`TccClient`] API works against a standalone `tcc-coordinator` ([`TccClient::remote`]) and
//! against an engine embedded in the initiator's own process ([`TccClient::embedded`]), where begin,
//! register, confirm and cancel are direct calls with no coordinator hop.
//!
//! A branch is always registered *before* its try is sent, so that if the try's answer is lost the
//! coordinator still knows to cancel it.
//!
//! A remote client shared by many tasks folds their begins, confirms and cancels into `POST
//! /v1/batch` requests when they crowd (see [`TccClient::remote_batching`] and
//! [`crate::protocol::coordinator`]); each call still gets the answer its own request would have had.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tcc_http::client::ClientError> {
//! use std::time::Duration;
//! use tcc_http::client::TccClient;
//!
//! let tcc = TccClient::remote("http://127.0.0.1:36789", None)?;
//! let booked = tcc
//!     .run(Duration::from_secs(30), |tx| async move {
//!         let seat = tx.try_branch("flight", "http://127.0.0.1:8081/tcc/hold_seat", br#"{"flight":"TC42"}"#.to_vec()).await?;
//!         let room = tx.try_branch("hotel", "http://127.0.0.1:8082/tcc/hold_room", br#"{"hotel":"Ritz"}"#.to_vec()).await?;
//!         Ok((seat, room))
//!     })
//!     .await?;
//! // Both tries succeeded and the confirm decision is on disk; phase two confirms both.
//! # let _ = booked;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use tcc_core::{BranchId, Coordinator, Decision, Gid, Timestamp, TxOptions};
use url::Url;

use crate::protocol::coordinator::{
    BatchOp, BeginRequest, DecideOp, MAX_WAIT, RegisterRequest, Token, TransactionView,
};
use crate::protocol::{self, BRANCH_HEADER, DEADLINE_HEADER, ErrorBody, GID_HEADER};
use crate::target::{AllowList, Target};
use crate::transport::{Batching, ClientConfig, build_client, error_text};

mod coordinator_batches;
mod steps;
mod try_batches;

#[cfg(feature = "participant")]
pub use steps::{FinishError, Finished};
pub use steps::{MessageBuilder, PreparedMessage, SagaBuilder};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A participant refused a try (business refusal, deadline passed, or a try arriving after its
    /// cancel). The transaction should be cancelled; [`TccClient::run`] does so.
    #[error("participant refused the try of branch {branch}: {code}: {message}")]
    Refused {
        /// The branch.
        branch: String,
        /// The participant's code.
        code: String,
        /// The participant's message.
        message: String,
        /// The participant's machine-readable details (a typed business error, as JSON).
        detail: Option<serde_json::Value>,
    },
    /// A participant failed a try for another reason (5xx, timeout, garbage). Whether the try ran
    /// is unknown; the branch is registered, so cancelling the transaction releases it if it did.
    #[error("try of branch {branch} failed: {message}")]
    TryFailed {
        /// The branch.
        branch: String,
        /// What happened.
        message: String,
    },
    /// The coordinator refused or failed a request.
    #[error("coordinator answered {status}: {code}: {message}")]
    Coordinator {
        /// The HTTP status (for the embedded engine, the status the server would have answered).
        status: u16,
        /// The stable code.
        code: String,
        /// The message.
        message: String,
    },
    /// The coordinator could not be reached, or answered something unreadable.
    #[error("coordinator unreachable: {0}")]
    Unreachable(String),
    /// Bad input on the caller's side (an invalid URL, id or option).
    #[error("invalid input: {0}")]
    Invalid(String),
}

impl ClientError {
    /// The stable code of a coordinator or participant refusal.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Refused { code, .. } | ClientError::Coordinator { code, .. } => Some(code),
            _ => None,
        }
    }
}

impl From<tcc_core::Error> for ClientError {
    fn from(e: tcc_core::Error) -> ClientError {
        crate::error::ApiError::from(e).into()
    }
}

impl From<crate::error::ApiError> for ClientError {
    fn from(e: crate::error::ApiError) -> ClientError {
        ClientError::Coordinator { status: e.status.as_u16(), code: e.code.to_owned(), message: e.message }
    }
}

#[derive(Clone, Debug)]
enum Backend {
    Embedded { coordinator: Arc<Coordinator>, allow: AllowList },
    Remote { base: Url, token: Option<Token> },
}

#[derive(Debug)]
struct Inner {
    backend: Backend,
    http: reqwest::Client,
    /// A remote client's batches to its coordinator, when batching is on.
    lanes: Option<Arc<coordinator_batches::Lanes>>,
    /// Batches of tries to participant operations, when batching them is on.
    tries: Option<Arc<try_batches::TryLanes>>,
}

/// The initiator's handle on a coordinator, embedded or remote. Cheap to clone; share one.
#[derive(Clone, Debug)]
pub struct TccClient {
    inner: Arc<Inner>,
}

/// Options of a new transaction.
#[derive(Clone, Debug, Default)]
pub struct BeginOptions {
    /// The id; generated when `None`.
    pub gid: Option<Gid>,
    /// Per-transaction retry overrides.
    pub options: TxOptions,
    /// Branches registered with the begin, in the same write, for an initiator that knows every
    /// branch and its request before the first try: one request and one flush instead of one per
    /// branch. Their tries are then sent with [`GlobalTx::try_planned`].
    pub branches: Vec<PlannedBranch>,
}

/// A branch registered together with begin (see [`BeginOptions::branches`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedBranch {
    /// The branch id, unique within the transaction.
    pub branch: String,
    /// The participant operation's base URL.
    pub target: String,
    /// The try's request, which the participant also gets back with confirm and cancel.
    pub request: Vec<u8>,
}

/// A branch registered at begin, as [`GlobalTx::try_planned`] sends its try.
#[derive(Debug)]
struct Planned {
    id: BranchId,
    url: Url,
    request: Vec<u8>,
}

impl TccClient {
    /// A client of the standalone coordinator at `base_url`, with the default HTTP settings.
    pub fn remote(base_url: &str, token: Option<Token>) -> Result<TccClient, ClientError> {
        let http = build_client(&ClientConfig::default()).map_err(|e| ClientError::Invalid(e.to_string()))?;
        TccClient::remote_with(base_url, token, http)
    }

    /// A client of the standalone coordinator at `base_url`, using `http` (share one pooled client
    /// per process; see [`build_client`]).
    pub fn remote_with(
        base_url: &str,
        token: Option<Token>,
        http: reqwest::Client,
    ) -> Result<TccClient, ClientError> {
        TccClient::remote_batching(base_url, token, http, Batching::default())
    }

    /// [`remote_with`](TccClient::remote_with), folding concurrent begins, confirms and cancels
    /// into `POST /v1/batch` requests as `batching` says ([`Batching::default`] there; `max_calls`
    /// 1 sends every call alone). A batch goes at once when no other is under way, so a lone call
    /// waits for nothing; calls made while `in_flight` batches are under way go together in the next
    /// one, sharing one request and the coordinator's flushes. Each call gets the answer its own
    /// request would have got. A coordinator without the batch route (an older version) is called
    /// one call at a time.
    pub fn remote_batching(
        base_url: &str,
        token: Option<Token>,
        http: reqwest::Client,
        batching: Batching,
    ) -> Result<TccClient, ClientError> {
        let base = Url::parse(base_url).map_err(|e| ClientError::Invalid(format!("coordinator URL: {e}")))?;
        let lanes =
            coordinator_batches::Lanes::new(&base, token.clone(), http.clone(), batching)?.map(Arc::new);
        let tries = try_batches::TryLanes::new(http.clone(), Batching::default()).map(Arc::new);
        let backend = Backend::Remote { base, token };
        Ok(TccClient { inner: Arc::new(Inner { backend, http, lanes, tries }) })
    }

    /// A client of an engine running in this process. `allow` limits the participant URLs branches
    /// may be registered with, as the server's allow-list does; `http` calls participants' tries
    /// (share it with the engine's [`HttpTransport`](crate::transport::HttpTransport)).
    pub fn embedded(coordinator: Arc<Coordinator>, allow: AllowList, http: reqwest::Client) -> TccClient {
        let tries = try_batches::TryLanes::new(http.clone(), Batching::default()).map(Arc::new);
        let backend = Backend::Embedded { coordinator, allow };
        TccClient { inner: Arc::new(Inner { backend, http, lanes: None, tries }) }
    }

    /// This client with its tries batched as `batching` says ([`Batching::default`] for a new
    /// client; `max_calls` 1 sends every try alone).
    ///
    /// Tries that this client's tasks send one participant operation at once go together in one
    /// `POST {target}/tries` (see [`crate::protocol`], "Batches of tries"), as the coordinator's
    /// confirms and cancels go in phase-two batches: a lone try goes at once, as a batch of one;
    /// tries made while `in_flight` batches are under way to that operation go in the next one, up
    /// to `max_calls` (at most 128). Each try gets the answer its own request would have got. A try
    /// whose request is not UTF-8 text or is over 1 KiB goes alone, and so does every try to an
    /// operation that serves no batches of tries (a participant not run by this crate's runtime).
    pub fn with_try_batching(&self, batching: Batching) -> TccClient {
        let inner = &self.inner;
        TccClient {
            inner: Arc::new(Inner {
                backend: inner.backend.clone(),
                http: inner.http.clone(),
                lanes: inner.lanes.clone(),
                tries: try_batches::TryLanes::new(inner.http.clone(), batching).map(Arc::new),
            }),
        }
    }

    /// Opens an embedded engine on the sled directory `dir`, calling participants over HTTP, and a
    /// client of it. The engine resumes unfinished transactions found there.
    pub async fn open_embedded(
        dir: impl AsRef<std::path::Path>,
        core: tcc_core::Config,
        allow: AllowList,
    ) -> Result<TccClient, ClientError> {
        TccClient::open_embedded_with(dir, core, allow, ClientConfig::default()).await
    }

    /// [`open_embedded`](TccClient::open_embedded) with these HTTP settings (phase-two batching
    /// among them). The request timeout is raised to the lease when it is shorter: phase-two calls
    /// are bounded by the engine's per-call timeout, which a transaction may raise up to the lease.
    pub async fn open_embedded_with(
        dir: impl AsRef<std::path::Path>,
        core: tcc_core::Config,
        allow: AllowList,
        client: ClientConfig,
    ) -> Result<TccClient, ClientError> {
        let config = ClientConfig { request_timeout: client.request_timeout.max(core.lease), ..client };
        let http = build_client(&config).map_err(|e| ClientError::Invalid(e.to_string()))?;
        let store = Arc::new(tcc_core::SledStore::open(dir.as_ref())?);
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let transport = crate::transport::HttpTransport::new(http.clone(), allow.clone(), metrics)
            .with_batching(config.batching);
        let coordinator =
            Coordinator::open(store, Arc::new(transport), Arc::new(tcc_core::SystemClock), core).await?;
        Ok(TccClient::embedded(Arc::new(coordinator), allow, http))
    }

    /// The embedded engine, if this client has one.
    pub fn coordinator(&self) -> Option<&Arc<Coordinator>> {
        match &self.inner.backend {
            Backend::Embedded { coordinator, .. } => Some(coordinator),
            Backend::Remote { .. } => None,
        }
    }

    /// Stops an embedded engine: its scheduler stops and phase-two rounds in flight finish; work not
    /// finished resumes when the directory is next opened. Does nothing for a remote client.
    pub async fn shutdown(&self) {
        if let Backend::Embedded { coordinator, .. } = &self.inner.backend {
            coordinator.stop().await;
        }
    }

    /// Begins a transaction that must be decided within `timeout`.
    ///
    /// A remote coordinator answers once the transaction is on disk. An embedded engine stores it
    /// without waiting for the flush, which then overlaps the first try (see
    /// [`GlobalTx::try_branch`]); every decision waits for it.
    pub async fn begin(&self, timeout: Duration) -> Result<GlobalTx, ClientError> {
        self.begin_with(timeout, BeginOptions::default()).await
    }

    /// Begins a transaction with options.
    pub async fn begin_with(
        &self,
        timeout: Duration,
        options: BeginOptions,
    ) -> Result<GlobalTx, ClientError> {
        let mut planned = Vec::with_capacity(options.branches.len());
        for b in &options.branches {
            let id: BranchId =
                b.branch.parse().map_err(|e: tcc_core::Error| ClientError::Invalid(e.to_string()))?;
            let url = match &self.inner.backend {
                Backend::Embedded { allow, .. } => {
                    allow.check(&b.target).map_err(crate::error::ApiError::participant_not_allowed)?
                }
                Backend::Remote { .. } => Url::parse(&b.target)
                    .map_err(|e| ClientError::Invalid(format!("participant URL: {e}")))?,
            };
            planned.push(Planned { id, url, request: b.request.clone() });
        }
        let mut stored = None;
        let view = match &self.inner.backend {
            Backend::Embedded { coordinator, .. } => {
                // Made durable together with the first registration (or by the first planned try's
                // sync), overlapping the first try.
                let branches = planned
                    .iter()
                    .map(|p| tcc_core::NewBranch {
                        id: p.id.clone(),
                        target: Target::Native(p.url.clone()).encode(),
                        payload: p.request.clone(),
                    })
                    .collect();
                let tx = coordinator
                    .begin_registered_deferred(options.gid, timeout, options.options, branches)
                    .await?;
                let view = TransactionView::from(&tx);
                stored = Some(tx);
                view
            }
            Backend::Remote { .. } => {
                let branches = options
                    .branches
                    .iter()
                    .map(|b| {
                        Ok(RegisterRequest {
                            branch: b.branch.clone(),
                            target: b.target.clone(),
                            payload: utf8_payload(&b.request)?,
                        })
                    })
                    .collect::<Result<_, ClientError>>()?;
                let req = BeginRequest {
                    gid: options.gid.map(|g| g.to_string()),
                    timeout_ms: Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
                    retry_interval_ms: options.options.retry_interval_ms,
                    call_timeout_ms: options.options.call_timeout_ms,
                    branches,
                };
                let batched = match &self.inner.lanes {
                    Some(lanes) => lanes.call(BatchOp::Begin(req.clone()), Duration::ZERO).await,
                    None => None,
                };
                match batched {
                    Some(answer) => answer?,
                    None => self.post("v1/transactions", &req).await?,
                }
            }
        };
        let gid: Gid = view
            .gid
            .parse()
            .map_err(|e| ClientError::Unreachable(format!("bad id from coordinator: {e}")))?;
        Ok(GlobalTx {
            client: self.clone(),
            gid,
            deadline: Timestamp(view.deadline_ms),
            planned: Arc::new(planned),
            synced: Arc::default(),
            stored: Arc::new(std::sync::Mutex::new(stored)),
        })
    }

    /// The transaction `gid` as the coordinator knows it.
    pub async fn get(&self, gid: &Gid) -> Result<TransactionView, ClientError> {
        match &self.inner.backend {
            Backend::Embedded { coordinator, .. } => Ok((&coordinator.get(gid).await?).into()),
            Backend::Remote { .. } => {
                self.request(reqwest::Method::GET, &format!("v1/transactions/{gid}"), None).await
            }
        }
    }

    /// Waits up to `timeout` for `gid` to finish (or be flagged) and returns it as it then is.
    pub async fn wait(&self, gid: &Gid, timeout: Duration) -> Result<TransactionView, ClientError> {
        match &self.inner.backend {
            Backend::Embedded { coordinator, .. } => Ok((&coordinator.wait(gid, timeout).await?).into()),
            Backend::Remote { .. } => {
                // Confirm and cancel answer as before when repeated, so waiting is a repeated decision
                // with wait_ms; a plain GET loop avoids deciding anything.
                let until = tokio::time::Instant::now() + timeout;
                loop {
                    let tx = self.get(gid).await?;
                    let done = matches!(
                        tx.state,
                        crate::protocol::coordinator::StateView::Confirmed
                            | crate::protocol::coordinator::StateView::Cancelled
                            | crate::protocol::coordinator::StateView::Flagged
                    );
                    if done || tokio::time::Instant::now() >= until {
                        return Ok(tx);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Runs `body` in a new transaction: confirms if it returns `Ok`, cancels if it returns `Err`
    /// (returning that error). The confirm is durable when this returns; phase two runs after.
    pub async fn run<F, Fut, T>(&self, timeout: Duration, body: F) -> Result<T, ClientError>
    where
        F: FnOnce(GlobalTx) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let tx = self.begin(timeout).await?;
        match body(tx.clone()).await {
            Ok(v) => {
                if let Err(e) = tx.confirm().await {
                    // Past the deadline, say: confirm is refused, so release what is held.
                    let _ = tx.cancel().await;
                    return Err(e);
                }
                Ok(v)
            }
            Err(e) => {
                if let Err(cancel) = tx.cancel().await {
                    // The coordinator's deadline sweep cancels it anyway.
                    tracing::warn!(tx = %tx.gid, error = %cancel, "cancel after a failed body failed");
                }
                Err(e)
            }
        }
    }

    fn url(&self, path: &str) -> Result<(Url, Option<&Token>), ClientError> {
        match &self.inner.backend {
            Backend::Remote { base, token } => {
                let u = base.join(path).map_err(|e| ClientError::Invalid(e.to_string()))?;
                Ok((u, token.as_ref()))
            }
            Backend::Embedded { .. } => Err(ClientError::Invalid("not a remote client".into())),
        }
    }

    async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Invalid(e.to_string()))?;
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    async fn request<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        self.request_with(method, path, body, Duration::ZERO).await
    }

    async fn request_with<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        extra_time: Duration,
    ) -> Result<T, ClientError> {
        let (url, token) = self.url(path)?;
        let mut req = self.inner.http.request(method, url);
        if !extra_time.is_zero() {
            req = req.timeout(ClientConfig::default().request_timeout + extra_time);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t.expose());
        }
        if let Some(body) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        }
        let res = req
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(crate::transport::transport_error(&e).to_string()))?;
        let status = res.status();
        if status.is_success() {
            let bytes = res.bytes().await.map_err(|e| ClientError::Unreachable(e.to_string()))?;
            return serde_json::from_slice(&bytes).map_err(|e| {
                ClientError::Unreachable(format!("unreadable answer from the coordinator: {e}"))
            });
        }
        Err(coordinator_error(status.as_u16(), error_text(res).await))
    }
}

/// A coordinator's error answer as a [`ClientError`]: its error body's code and message, or, when
/// the body is not one, the text itself. Single requests and batches read them alike.
fn coordinator_error(status: u16, text: String) -> ClientError {
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => ClientError::Coordinator { status, code: body.code, message: body.message },
        Err(_) => ClientError::Coordinator { status, code: "unknown".into(), message: text },
    }
}

/// One global transaction, begun by [`TccClient::begin`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct GlobalTx {
    client: TccClient,
    gid: Gid,
    deadline: Timestamp,
    /// Branches registered at begin.
    planned: Arc<Vec<Planned>>,
    /// Set once an embedded engine's deferred begin is known to be flushed.
    synced: Arc<std::sync::atomic::AtomicBool>,
    /// An embedded engine's latest copy of the transaction as this initiator stored it (begin,
    /// registrations): the decision is judged on it first, which saves reading the record when
    /// nothing else changed it (see [`Coordinator::decide_and_wait`]).
    stored: Arc<std::sync::Mutex<Option<tcc_core::Transaction>>>,
}

/// A remote coordinator takes payloads as JSON text.
fn utf8_payload(payload: &[u8]) -> Result<String, ClientError> {
    std::str::from_utf8(payload)
        .map(str::to_owned)
        .map_err(|_| ClientError::Invalid("a remote coordinator takes UTF-8 payloads only".into()))
}

impl GlobalTx {
    /// The transaction id.
    pub fn gid(&self) -> &Gid {
        &self.gid
    }

    /// The deadline sent with every try.
    pub fn deadline(&self) -> Timestamp {
        self.deadline
    }

    /// Takes the embedded engine's latest copy of the transaction, if this handle (or a clone) has
    /// one; whoever takes it writes and keeps the next one.
    fn likely(&self) -> Option<tcc_core::Transaction> {
        self.stored.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }

    /// Keeps `tx` as the embedded engine's latest copy, unless a newer one is kept already
    /// (registrations from clones of this handle may finish in any order).
    fn remember(&self, tx: tcc_core::Transaction) {
        let mut stored = self.stored.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if stored.as_ref().is_none_or(|s| s.version < tx.version) {
            *stored = Some(tx);
        }
    }

    /// Registers branch `branch` for the participant operation at `target` (its base URL), then
    /// calls its try with `request`, returning the participant's result bytes. `request` is also
    /// what the participant gets back with confirm and cancel.
    ///
    /// The registration is durable before this returns. With an embedded engine, its flush runs
    /// while the try travels instead of before it: a try sent for a registration that a crash then
    /// loses can never be confirmed (the transaction cannot be decided without its initiator seeing
    /// this return), and the participant releases it on its own at the deadline plus grace.
    pub async fn try_branch(
        &self,
        branch: &str,
        target: &str,
        request: Vec<u8>,
    ) -> Result<Bytes, ClientError> {
        let id: BranchId =
            branch.parse().map_err(|e: tcc_core::Error| ClientError::Invalid(e.to_string()))?;
        let url = self.register(&id, target, &request, false).await?;
        self.send_try(&id, &url, request, true).await
    }

    /// Calls the try of branch `branch`, registered at begin (see [`BeginOptions::branches`]), with
    /// the request given there, returning the participant's result bytes. Refused if no such branch
    /// was registered at begin.
    pub async fn try_planned(&self, branch: &str) -> Result<Bytes, ClientError> {
        let p =
            self.planned.iter().find(|p| p.id.as_str() == branch).ok_or_else(|| {
                ClientError::Invalid(format!("branch {branch} was not registered at begin"))
            })?;
        // An embedded engine stored the begin without waiting for its flush: the first try overlaps
        // it (later ones need not wait again once a sync has finished).
        let sync = !self.synced.load(std::sync::atomic::Ordering::Acquire);
        self.send_try(&p.id, &p.url, p.request.clone(), sync).await
    }

    /// Sends the try of branch `id` to `target_url`. With `sync`, an embedded engine's deferred
    /// writes are flushed while the try travels, and the answer waits for both.
    async fn send_try(
        &self,
        id: &BranchId,
        target_url: &Url,
        request: Vec<u8>,
        sync: bool,
    ) -> Result<Bytes, ClientError> {
        let sent = self.deliver_try(id, target_url, request);
        match &self.client.inner.backend {
            // The embedded engine stored the registration without waiting for its flush: flush while
            // the try travels, and answer only once both are done. Should the process die before
            // the flush, the transaction cannot be confirmed, and the participant releases what the
            // try held at its deadline plus grace.
            Backend::Embedded { coordinator, .. } if sync => {
                let (synced, sent) = tokio::join!(coordinator.sync(), sent);
                synced?;
                // Everything written before, the begin included, is on disk now.
                self.synced.store(true, std::sync::atomic::Ordering::Release);
                sent
            }
            _ => sent.await,
        }
    }

    /// The try of branch `id` at `target_url`, in a batch of tries when they are on and the
    /// operation takes them, else alone.
    async fn deliver_try(
        &self,
        id: &BranchId,
        target_url: &Url,
        request: Vec<u8>,
    ) -> Result<Bytes, ClientError> {
        if let Some(lanes) = &self.client.inner.tries
            && let Some(answer) = lanes.call(target_url, &self.gid, id, self.deadline, &request).await
        {
            return answer;
        }
        self.try_alone(id, target_url, request).await
    }

    /// The try of branch `id` at `target_url`, in a request of its own.
    async fn try_alone(
        &self,
        id: &BranchId,
        target_url: &Url,
        request: Vec<u8>,
    ) -> Result<Bytes, ClientError> {
        let branch = id.as_str();
        let url = crate::transport::phase_url(target_url, protocol::TRY_PATH);
        let sent = self
            .client
            .inner
            .http
            .post(url)
            .header(GID_HEADER, self.gid.as_str())
            .header(BRANCH_HEADER, id.as_str())
            .header(DEADLINE_HEADER, self.deadline.0.to_string())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .timeout(ClientConfig::default().request_timeout)
            .body(request)
            .send()
            .await;
        let res = sent.map_err(|e| ClientError::TryFailed {
            branch: branch.to_owned(),
            message: crate::transport::transport_error(&e).to_string(),
        })?;
        let status = res.status();
        if status.is_success() {
            return res
                .bytes()
                .await
                .map_err(|e| ClientError::TryFailed { branch: branch.to_owned(), message: e.to_string() });
        }
        let text = error_text(res).await;
        let body: Option<ErrorBody> = serde_json::from_str(&text).ok();
        Err(try_batches::try_error(branch, status, body, text))
    }

    /// Registers branch `branch` for the participant operation at `target` without calling its try,
    /// for an initiator that calls the participant itself (after this returns). `payload` is what
    /// the participant gets with confirm and cancel.
    pub async fn register_branch(
        &self,
        branch: &str,
        target: &str,
        payload: Vec<u8>,
    ) -> Result<(), ClientError> {
        let id: BranchId =
            branch.parse().map_err(|e: tcc_core::Error| ClientError::Invalid(e.to_string()))?;
        self.register(&id, target, &payload, true).await.map(drop)
    }

    /// Registers a branch; with `durable` false, an embedded engine does not wait for the flush
    /// (the caller syncs before answering). A remote coordinator always answers once durable.
    async fn register(
        &self,
        id: &BranchId,
        target: &str,
        payload: &[u8],
        durable: bool,
    ) -> Result<Url, ClientError> {
        match &self.client.inner.backend {
            Backend::Embedded { coordinator, allow } => {
                let url = allow.check(target).map_err(crate::error::ApiError::participant_not_allowed)?;
                let encoded = Target::Native(url.clone()).encode();
                let likely = self.likely();
                let tx = coordinator
                    .register_with(&self.gid, likely.as_ref(), id.clone(), encoded, payload.to_vec(), durable)
                    .await?;
                self.remember(tx);
                Ok(url)
            }
            Backend::Remote { .. } => {
                let payload = utf8_payload(payload)?;
                let url =
                    Url::parse(target).map_err(|e| ClientError::Invalid(format!("participant URL: {e}")))?;
                let req = RegisterRequest { branch: id.to_string(), target: target.to_owned(), payload };
                let _: TransactionView =
                    self.client.post(&format!("v1/transactions/{}/branches", self.gid), &req).await?;
                Ok(url)
            }
        }
    }

    /// Decides to confirm. Returns once the decision is durable.
    pub async fn confirm(&self) -> Result<TransactionView, ClientError> {
        self.decide("confirm").await
    }

    /// Decides to cancel. Returns once the decision is durable.
    pub async fn cancel(&self) -> Result<TransactionView, ClientError> {
        self.decide("cancel").await
    }

    /// Decides to confirm, then waits up to `wait` (at most 60 s) for phase two to finish, in one
    /// request to a remote coordinator. Returns the transaction as it then is: confirmed, still
    /// confirming (phase two is retrying), or flagged.
    pub async fn confirm_and_wait(&self, wait: Duration) -> Result<TransactionView, ClientError> {
        self.decide_and_wait("confirm", Some(wait)).await
    }

    /// Decides to cancel, then waits up to `wait` (at most 60 s) for phase two to finish.
    pub async fn cancel_and_wait(&self, wait: Duration) -> Result<TransactionView, ClientError> {
        self.decide_and_wait("cancel", Some(wait)).await
    }

    async fn decide(&self, what: &str) -> Result<TransactionView, ClientError> {
        self.decide_and_wait(what, None).await
    }

    async fn decide_and_wait(
        &self,
        what: &str,
        wait: Option<Duration>,
    ) -> Result<TransactionView, ClientError> {
        let wait = wait.map(|w| w.min(MAX_WAIT));
        match &self.client.inner.backend {
            Backend::Embedded { coordinator, .. } => {
                let decision = if what == "confirm" { Decision::Confirm } else { Decision::Cancel };
                let likely = self.likely();
                let tx = coordinator
                    .decide_and_wait(&self.gid, likely.as_ref(), decision, wait.unwrap_or_default())
                    .await?;
                Ok((&tx).into())
            }
            Backend::Remote { .. } => {
                let wait_ms = wait.map(|w| u64::try_from(w.as_millis().max(1)).unwrap_or(u64::MAX));
                if let Some(lanes) = &self.client.inner.lanes {
                    let op = DecideOp { gid: self.gid.to_string(), wait_ms };
                    let op = if what == "confirm" { BatchOp::Confirm(op) } else { BatchOp::Cancel(op) };
                    if let Some(answer) = lanes.call(op, wait.unwrap_or_default()).await {
                        return answer;
                    }
                }
                let query = wait_ms.map_or(String::new(), |ms| format!("?wait_ms={ms}"));
                let path = format!("v1/transactions/{}/{what}{query}", self.gid);
                // The wait happens on the server: give the request that much longer than usual.
                let extra = wait.unwrap_or_default();
                self.client.request_with(reqwest::Method::POST, &path, None, extra).await
            }
        }
    }
}
