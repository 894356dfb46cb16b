//! The typed client side of async operations: what a `#[tcc]` client stub (`FlightsClient`) calls.
//!
//! [`ServiceStub::call_try`] registers the branch with the coordinator (embedded or standalone, through
//! [`GlobalTx::try_branch`]), sends the try with the request as JSON, and decodes the participant's
//! answer: the typed response, or the typed business error of a refusal
//! ([`TccCallError::Refused`]). Confirm and cancel are then the coordinator's job.
//!
//! # Error mapping at try
//!
//! | participant's answer | `call_try` returns | what the initiator does |
//! |---|---|---|
//! | 200 | `Ok(response)` | goes on |
//! | 409 `refused` (a business error with [`Disposition::Refuse`](crate::staged::Disposition)) | [`TccCallError::Refused`] with the typed error | cancels (with `?` inside [`TccClient::run`](crate::client::TccClient::run), `run` does) |
//! | 409/410 from the barrier (deadline passed, suspended, expired) | [`TccCallError::Failed`] with [`ClientError::Refused`] | cancels |
//! | 5xx (a [transient](crate::staged::Disposition::Transient) error, contention, storage), timeout, connection refused | tried again, up to [`ServiceStub::with_try_attempts`] attempts in all while the deadline is ahead, then [`TccCallError::Failed`] with [`ClientError::TryFailed`] | cancels: the outcome of the try is unknown, and the branch is registered, so the cancel releases it if it ran |
//! | coordinator refused the registration | [`TccCallError::Failed`] with [`ClientError::Coordinator`] | cancels |
//!
//! Trying again is safe: registering the same branch again is idempotent, and the participant's
//! barrier answers a try that already ran with its stored result.
//!
//! # Saga steps and message actions
//!
//! [`ServiceStub::saga_step`] and [`ServiceStub::message_action`] add a step of the participant to a
//! [`SagaBuilder`] or a [`MessageBuilder`]: nothing is sent until the saga or message is submitted,
//! and the coordinator then calls the participant (`{base_url}/{step}/action`, and
//! `{base_url}/{step}/compensate` to undo a saga step) with the request as the JSON body.

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tcc_core::{Clock, SystemClock};

use crate::client::{ClientError, GlobalTx, MessageBuilder, SagaBuilder};
use crate::staged::TccError;

/// How many times a try is sent by default when it fails with an unknown outcome.
pub const DEFAULT_TRY_ATTEMPTS: u32 = 3;

/// The first pause before trying again; it doubles after each attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// Why a typed try failed.
#[derive(Debug)]
pub enum TccCallError<E> {
    /// The participant's business refused the try with this error. Nothing was reserved; cancel the
    /// transaction (a `?` inside [`TccClient::run`](crate::client::TccClient::run) does).
    Refused {
        /// The branch.
        branch: String,
        /// The business error.
        error: E,
    },
    /// The try failed otherwise: refused by the barrier (deadline passed, branch already cancelled),
    /// an unknown outcome after every attempt (5xx, timeout), or the coordinator refused the
    /// registration. Cancel the transaction.
    Failed(ClientError),
    /// The request does not encode, or the participant's answer does not decode as the response type
    /// (a version mismatch between initiator and participant). The try may have run: cancel.
    Codec {
        /// The branch.
        branch: String,
        /// What does not (de)code.
        message: String,
    },
}

impl<E> TccCallError<E> {
    /// The business error, if the participant's business refused the try.
    pub fn refusal(&self) -> Option<&E> {
        match self {
            TccCallError::Refused { error, .. } => Some(error),
            _ => None,
        }
    }

    /// The business error, if the participant's business refused the try.
    pub fn into_refusal(self) -> Option<E> {
        match self {
            TccCallError::Refused { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl<E: fmt::Display> fmt::Display for TccCallError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TccCallError::Refused { branch, error } => write!(f, "branch {branch} refused: {error}"),
            TccCallError::Failed(e) => fmt::Display::fmt(e, f),
            TccCallError::Codec { branch, message } => write!(f, "branch {branch}: {message}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for TccCallError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TccCallError::Failed(e) => Some(e),
            _ => None,
        }
    }
}

/// So that `?` on a typed call works inside [`TccClient::run`](crate::client::TccClient::run),
/// which cancels the transaction on any error. A refusal keeps its typed error as JSON in
/// [`ClientError::Refused::detail`].
impl<E: TccError + Serialize> From<TccCallError<E>> for ClientError {
    fn from(e: TccCallError<E>) -> ClientError {
        match e {
            TccCallError::Refused { branch, error } => ClientError::Refused {
                branch,
                code: "refused".to_owned(),
                message: error.to_string(),
                detail: serde_json::to_value(&error).ok(),
            },
            TccCallError::Failed(e) => e,
            TccCallError::Codec { branch, message } => ClientError::TryFailed { branch, message },
        }
    }
}

/// The participant service's base URL and per-call options: what a generated client stub holds.
///
/// The target of operation `op` is `{base_url}/{op}`, as the participant serves it
/// ([`Participant::router`](crate::participant::Participant::router) nested under the base path).
#[derive(Clone, Debug)]
pub struct ServiceStub {
    base: String,
    branch: Option<String>,
    try_attempts: u32,
}

impl ServiceStub {
    /// A stub of the participant service at `base_url` (for example
    /// `http://127.0.0.1:8081/tcc/flights`).
    pub fn new(base_url: impl Into<String>) -> ServiceStub {
        let base: String = base_url.into();
        let base = base.trim_end_matches('/').to_owned();
        ServiceStub { base, branch: None, try_attempts: DEFAULT_TRY_ATTEMPTS }
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The branch target of operation `operation`.
    pub fn target(&self, operation: &str) -> String {
        format!("{}/{operation}", self.base)
    }

    /// The same stub registering its calls as branch `branch` instead of each operation's default
    /// one, for a second branch of the same operation in one transaction (two seats, say).
    pub fn with_branch(&self, branch: impl Into<String>) -> ServiceStub {
        ServiceStub { branch: Some(branch.into()), ..self.clone() }
    }

    /// The same stub sending a try at most `attempts` times (at least once) when its outcome is
    /// unknown (5xx, timeout, connection refused). The default is [`DEFAULT_TRY_ATTEMPTS`].
    pub fn with_try_attempts(&self, attempts: u32) -> ServiceStub {
        ServiceStub { try_attempts: attempts.max(1), ..self.clone() }
    }

    /// Registers the branch (this stub's, else `default_branch`) of `operation` in `tx` and calls
    /// its try with `request` as JSON, decoding the response or the typed business refusal. See the
    /// [module docs](self) for the error mapping.
    pub async fn call_try<Req, Resp, E>(
        &self,
        tx: &GlobalTx,
        operation: &str,
        default_branch: &str,
        request: &Req,
    ) -> Result<Resp, TccCallError<E>>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
        // Only decoded here; the participant side requires `TccError`, which says it once.
        E: DeserializeOwned,
    {
        let branch = self.branch.as_deref().unwrap_or(default_branch);
        let codec = |message: String| TccCallError::Codec { branch: branch.to_owned(), message };
        let body =
            serde_json::to_vec(request).map_err(|e| codec(format!("the request does not encode: {e}")))?;
        let target = self.target(operation);
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match tx.try_branch(branch, &target, body.clone()).await {
                Ok(bytes) => {
                    return serde_json::from_slice(&bytes)
                        .map_err(|e| codec(format!("the participant's answer does not decode: {e}")));
                }
                Err(ClientError::Refused { branch, code, message, detail }) => {
                    let typed = match (code.as_str(), &detail) {
                        ("refused", Some(d)) => serde_json::from_value::<E>(d.clone()).ok(),
                        _ => None,
                    };
                    return Err(match typed {
                        Some(error) => TccCallError::Refused { branch, error },
                        None => TccCallError::Failed(ClientError::Refused { branch, code, message, detail }),
                    });
                }
                Err(e @ ClientError::TryFailed { .. })
                    if attempt < self.try_attempts && SystemClock.now() + backoff < tx.deadline() =>
                {
                    tracing::debug!(tx = %tx.gid(), branch, error = %e, attempt, "try failed; trying again");
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2);
                    attempt += 1;
                }
                Err(e) => return Err(TccCallError::Failed(e)),
            }
        }
    }

    /// Adds saga step `step` of this participant to `saga`: action `{base_url}/{step}/action`,
    /// compensation `{base_url}/{step}/compensate`, `request` as JSON the body of both. An
    /// [`ClientError::Invalid`] if the request does not encode.
    pub fn saga_step<Req>(
        &self,
        saga: SagaBuilder,
        step: &str,
        request: &Req,
    ) -> Result<SagaBuilder, ClientError>
    where
        Req: Serialize + ?Sized,
    {
        let payload = encode_payload(step, request)?;
        let target = self.target(step);
        Ok(saga.step(&format!("{target}/action"), &format!("{target}/compensate"), payload))
    }

    /// Adds message action `action` of this participant to `message`: `{base_url}/{action}/action`,
    /// with `request` as JSON its body. An [`ClientError::Invalid`] if the request does not encode.
    pub fn message_action<Req>(
        &self,
        message: MessageBuilder,
        action: &str,
        request: &Req,
    ) -> Result<MessageBuilder, ClientError>
    where
        Req: Serialize + ?Sized,
    {
        let payload = encode_payload(action, request)?;
        Ok(message.add(&format!("{}/action", self.target(action)), payload))
    }
}

/// The JSON payload of step `name`.
fn encode_payload<Req: Serialize + ?Sized>(name: &str, request: &Req) -> Result<String, ClientError> {
    serde_json::to_string(request)
        .map_err(|e| ClientError::Invalid(format!("the request of step {name} does not encode: {e}")))
}
