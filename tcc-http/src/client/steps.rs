//! Sagas and two-phase messages from the initiator's side: [`TccClient::saga`] and
//! [`TccClient::message`] describe one step at a time, then hand the whole to the coordinator in
//! one request (or one call of the embedded engine).
//!
//! Step URLs are called as they are (see [`crate::protocol::coordinator::StepRequest`]): `POST`
//! with the payload as the body and the `tcc-gid`, `tcc-branch` and `tcc-deadline` headers; a 2xx
//! is done, 409 (or another 4xx) refuses, anything else is retried. A message's back-check is
//! `GET {query_prepared}?gid=`: 2xx committed, 409 rolled back, anything else unknown.

use std::time::Duration;

use tcc_core::{BranchId, Decision, Gid, NewBranch, NewStep, TxOptions};

use super::{Backend, ClientError, TccClient};
use crate::protocol::coordinator::{MessageRequest, SagaRequest, StepRequest, TransactionView};
use crate::target::{StepStyle, Target};

/// Millisecond options as the native API takes them.
fn ms(d: Duration) -> Option<u64> {
    Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1))
}

/// A saga being described: its steps, in order, each an action and its compensation. Built by
/// [`TccClient::saga`]; [`submit`](Self::submit) begins it and the coordinator runs it.
///
/// ```no_run
/// # async fn demo() -> Result<(), tcc_http::client::ClientError> {
/// use std::time::Duration;
/// use tcc_http::client::TccClient;
///
/// let tcc = TccClient::remote("http://127.0.0.1:36789", None)?;
/// let saga = tcc
///     .saga(Duration::from_secs(60))
///     .step("http://127.0.0.1:8083/pay/charge", "http://127.0.0.1:8083/pay/refund", r#"{"amount":120}"#)
///     .step("http://127.0.0.1:8084/mail/send", "http://127.0.0.1:8084/mail/retract", r#"{"to":"ada"}"#)
///     .submit_and_wait(Duration::from_secs(10))
///     .await?;
/// // Either both steps are done, or every step that ran was compensated.
/// println!("{} ended {:?}", saga.gid, saga.state);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
#[must_use = "a saga runs only once submitted"]
pub struct SagaBuilder {
    client: TccClient,
    timeout: Duration,
    req: SagaRequest,
    /// What the next step added waits for ([`next_after`](SagaBuilder::next_after)).
    next_after: Option<Vec<u32>>,
}

impl SagaBuilder {
    /// Uses `gid` as the saga's id instead of a generated one.
    pub fn gid(mut self, gid: &Gid) -> SagaBuilder {
        self.req.gid = Some(gid.to_string());
        self
    }

    /// Per-saga overrides of the coordinator's retry policy.
    pub fn options(mut self, options: TxOptions) -> SagaBuilder {
        self.req.retry_interval_ms = options.retry_interval_ms;
        self.req.call_timeout_ms = options.call_timeout_ms;
        self
    }

    /// Adds a step: `action` runs after every earlier step's action is done; `compensate` undoes it
    /// if the saga fails. `payload` is the body of both. The step's id is its position, from `01`.
    /// After [`next_after`](Self::next_after), it waits for those steps only.
    pub fn step(mut self, action: &str, compensate: &str, payload: impl Into<String>) -> SagaBuilder {
        match self.next_after.take() {
            Some(after) => self.step_after(&after, action, compensate, payload),
            None => {
                self.push(action, compensate, payload.into(), Vec::new());
                self
            }
        }
    }

    /// Makes the next step added, by [`step`](Self::step) or a `#[tcc]` client stub, a step of a
    /// concurrent saga that runs as soon as the steps at the indexes in `after` (from 0) are done
    /// (see [`step_after`](Self::step_after)).
    ///
    /// ```no_run
    /// # async fn demo(tcc: tcc_http::TccClient) -> Result<(), tcc_http::ClientError> {
    /// use std::time::Duration;
    /// let saga = tcc
    ///     .saga(Duration::from_secs(30))
    ///     .step("http://127.0.0.1:8081/miles/action", "http://127.0.0.1:8081/miles/compensate", "{}")
    ///     .step("http://127.0.0.1:8082/points/action", "http://127.0.0.1:8082/points/compensate", "{}")
    ///     // The e-mail waits for both awards; the two awards run at once.
    ///     .next_after(&[0, 1])
    ///     .step("http://127.0.0.1:8083/mail/action", "http://127.0.0.1:8083/mail/compensate", "{}");
    /// saga.submit().await?;
    /// # Ok(()) }
    /// ```
    pub fn next_after(mut self, after: &[u32]) -> SagaBuilder {
        self.next_after = Some(after.to_vec());
        self
    }

    /// Adds a step of a concurrent saga: it runs as soon as the steps at the indexes in `after`
    /// (from 0) are done, alongside any other step that may run. Makes the whole saga concurrent:
    /// steps added with [`step`](Self::step) then wait for nothing.
    pub fn step_after(
        mut self,
        after: &[u32],
        action: &str,
        compensate: &str,
        payload: impl Into<String>,
    ) -> SagaBuilder {
        self.req.concurrent = true;
        self.push(action, compensate, payload.into(), after.to_vec());
        self
    }

    fn push(&mut self, action: &str, compensate: &str, payload: String, after: Vec<u32>) {
        let step = format!("{:02}", self.req.steps.len() + 1);
        let compensate = Some(compensate.to_owned());
        self.req.steps.push(StepRequest { step, action: action.to_owned(), compensate, payload, after });
    }

    /// Begins the saga: once this returns it is on disk and its steps run in the background.
    pub async fn submit(self) -> Result<TransactionView, ClientError> {
        let SagaBuilder { client, timeout, mut req, next_after: _ } = self;
        req.timeout_ms = ms(timeout);
        match &client.inner.backend {
            Backend::Embedded { coordinator, allow } => {
                let gid = req.gid.as_deref().map(str::parse).transpose()?;
                let mut steps = Vec::with_capacity(req.steps.len());
                for s in req.steps {
                    let compensate = s.compensate.unwrap_or_default();
                    steps.push(NewStep {
                        id: s.step.parse::<BranchId>()?,
                        action: step_target(allow, &s.action)?,
                        compensate: step_target(allow, &compensate)?,
                        payload: s.payload.into_bytes(),
                        after: s.after,
                    });
                }
                let options = TxOptions {
                    retry_interval_ms: req.retry_interval_ms,
                    call_timeout_ms: req.call_timeout_ms,
                };
                Ok((&coordinator.begin_saga(gid, timeout, options, steps, req.concurrent).await?).into())
            }
            Backend::Remote { .. } => client.post("v1/sagas", &req).await,
        }
    }

    /// [`submit`](Self::submit), then waits up to `wait` for the saga to end (done or compensated)
    /// or be flagged, and returns it as it then is.
    pub async fn submit_and_wait(self, wait: Duration) -> Result<TransactionView, ClientError> {
        let client = self.client.clone();
        let tx = self.submit().await?;
        let gid: Gid = tx.gid.parse()?;
        client.wait(&gid, wait).await
    }
}

/// A two-phase message being described: actions that must run if, and only if, the initiator's
/// local transaction commits. Built by [`TccClient::message`]; [`prepare`](Self::prepare) it
/// before the local transaction, then submit or abort the [`PreparedMessage`]; or
/// [`submit`](Self::submit) it at once when there is nothing to wait for.
///
/// ```no_run
/// # async fn demo() -> Result<(), tcc_http::client::ClientError> {
/// use std::time::Duration;
/// use tcc_http::client::TccClient;
///
/// let tcc = TccClient::remote("http://127.0.0.1:36789", None)?;
/// let msg = tcc
///     .message(Duration::from_secs(30))
///     .add("http://127.0.0.1:8085/points/credit", r#"{"user":"ada","points":120}"#)
///     .prepare("http://127.0.0.1:8086/agency/booking-committed")
///     .await?;
/// let committed = true; // ... the local transaction runs here, with the message's barrier row ...
/// if committed { msg.submit().await?; } else { msg.abort().await?; }
/// // Had this process died before either, the coordinator would ask the back-check at the deadline.
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
#[must_use = "a message does nothing until prepared or submitted"]
pub struct MessageBuilder {
    client: TccClient,
    timeout: Duration,
    req: MessageRequest,
}

impl MessageBuilder {
    /// Uses `gid` as the message's id instead of a generated one.
    pub fn gid(mut self, gid: &Gid) -> MessageBuilder {
        self.req.gid = Some(gid.to_string());
        self
    }

    /// Per-message overrides of the coordinator's retry policy.
    pub fn options(mut self, options: TxOptions) -> MessageBuilder {
        self.req.retry_interval_ms = options.retry_interval_ms;
        self.req.call_timeout_ms = options.call_timeout_ms;
        self
    }

    /// Adds an action: once the message is submitted it is called (after the earlier ones) until
    /// it succeeds, with `payload` as its body. Its id is its position, from `01`.
    pub fn add(mut self, action: &str, payload: impl Into<String>) -> MessageBuilder {
        let step = format!("{:02}", self.req.steps.len() + 1);
        let payload = payload.into();
        self.req.steps.push(StepRequest { step, action: action.to_owned(), payload, ..Default::default() });
        self
    }

    /// Prepares the message with its back-check `query_prepared`, asked (`GET ...?gid=`) if the
    /// message is still prepared at its deadline. Durable when it returns.
    pub async fn prepare(self, query_prepared: &str) -> Result<PreparedMessage, ClientError> {
        let client = self.client.clone();
        let mut req = self.req;
        req.query_prepared = Some(query_prepared.to_owned());
        let tx = send(&client, self.timeout, req).await?;
        Ok(PreparedMessage { client, gid: tx.gid.parse()? })
    }

    /// Sends the message at once: prepared and submitted in one durable write.
    pub async fn submit(self) -> Result<TransactionView, ClientError> {
        let mut req = self.req;
        req.submit = true;
        send(&self.client, self.timeout, req).await
    }
}

async fn send(
    client: &TccClient,
    timeout: Duration,
    mut req: MessageRequest,
) -> Result<TransactionView, ClientError> {
    req.timeout_ms = ms(timeout);
    match &client.inner.backend {
        Backend::Embedded { coordinator, allow } => {
            let gid = req.gid.as_deref().map(str::parse).transpose()?;
            let mut steps = Vec::with_capacity(req.steps.len());
            for s in req.steps {
                let target = step_target(allow, &s.action)?;
                steps.push(NewBranch { id: s.step.parse()?, target, payload: s.payload.into_bytes() });
            }
            let options =
                TxOptions { retry_interval_ms: req.retry_interval_ms, call_timeout_ms: req.call_timeout_ms };
            let tx = match req.query_prepared.filter(|_| !req.submit) {
                Some(q) => {
                    coordinator.prepare_message(gid, timeout, options, steps, step_target(allow, &q)?).await?
                }
                None => coordinator.submit_message(gid, timeout, options, steps).await?,
            };
            Ok((&tx).into())
        }
        Backend::Remote { .. } => client.post("v1/messages", &req).await,
    }
}

/// A prepared message: submit it once the local transaction committed, abort it if it rolled back.
#[derive(Clone, Debug)]
pub struct PreparedMessage {
    client: TccClient,
    gid: Gid,
}

impl PreparedMessage {
    /// The message's id (what the back-check is asked about).
    pub fn gid(&self) -> &Gid {
        &self.gid
    }

    /// Submits: every action runs, in order, until it succeeds. Durable when it returns.
    pub async fn submit(&self) -> Result<TransactionView, ClientError> {
        self.decide(Decision::Confirm).await
    }

    /// Aborts: no action is ever called. Durable when it returns.
    pub async fn abort(&self) -> Result<TransactionView, ClientError> {
        self.decide(Decision::Cancel).await
    }

    async fn decide(&self, decision: Decision) -> Result<TransactionView, ClientError> {
        match &self.client.inner.backend {
            Backend::Embedded { coordinator, .. } => {
                let tx = match decision {
                    Decision::Confirm => coordinator.confirm(&self.gid).await?,
                    Decision::Cancel => coordinator.cancel(&self.gid).await?,
                };
                Ok((&tx).into())
            }
            Backend::Remote { .. } => {
                let what = if decision == Decision::Confirm { "confirm" } else { "cancel" };
                let path = format!("v1/transactions/{}/{what}", self.gid);
                self.client.request(reqwest::Method::POST, &path, None).await
            }
        }
    }
}

/// What [`PreparedMessage::finish`] did with a message whose local transaction committed.
#[cfg(feature = "participant")]
#[derive(Debug, PartialEq, Eq)]
pub enum Finished<T> {
    /// The local transaction committed now, with this value, and the message is submitted.
    Sent(T),
    /// A local transaction of this message had committed before (this one ran nothing); the message
    /// is submitted.
    SentEarlier,
}

/// Why [`PreparedMessage::finish`] did not submit the message.
#[cfg(feature = "participant")]
#[derive(Debug, thiserror::Error)]
pub enum FinishError<E> {
    /// The local transaction did not commit, and the message is aborted (or, if the abort could not
    /// be sent, its back-check aborts it at the deadline); or its outcome is unknown
    /// ([`LocalError::Unknown`](crate::participant::LocalError::Unknown)), and the back-check
    /// settles it.
    #[error(transparent)]
    Local(crate::participant::LocalError<E>),
    /// The local transaction committed, but the submit failed: the coordinator submits the message
    /// when it asks the back-check at the message's deadline.
    #[error("the local transaction committed, but submitting the message failed (its back-check will): {0}")]
    Submit(ClientError),
}

#[cfg(feature = "participant")]
impl PreparedMessage {
    /// Ends the message as its local transaction's outcome says (what
    /// [`Participant::local_transaction`](crate::participant::Participant::local_transaction)
    /// returned, on any store): submitted when it committed, aborted when it certainly did not,
    /// left to the back-check when nobody knows. DTM's `DoAndSubmit` in two lines:
    ///
    /// ```no_run
    /// # async fn demo(tcc: tcc_http::TccClient, orders: tcc_http::Participant) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tcc_http::{StoreError, TccContext};
    ///
    /// let msg = tcc
    ///     .message(Duration::from_secs(30))
    ///     .add("http://127.0.0.1:8085/loyalty/award/action", r#"{"customer":"ada","points":120}"#)
    ///     .prepare("http://127.0.0.1:8086/orders/back-check")
    ///     .await?;
    /// let placed = orders
    ///     .local_transaction(msg.gid(), |ctx: TccContext| async move {
    ///         ctx.insert_new("orders", "order-7", &"placed")?;
    ///         Ok::<_, StoreError>(())
    ///     })
    ///     .await;
    /// msg.finish(placed).await?;
    /// # Ok(()) }
    /// ```
    pub async fn finish<T, E>(
        &self,
        local: Result<T, crate::participant::LocalError<E>>,
    ) -> Result<Finished<T>, FinishError<E>> {
        use crate::participant::LocalError;
        match local {
            Ok(value) => {
                self.submit().await.map_err(FinishError::Submit)?;
                Ok(Finished::Sent(value))
            }
            Err(LocalError::AlreadyCommitted) => {
                self.submit().await.map_err(FinishError::Submit)?;
                Ok(Finished::SentEarlier)
            }
            Err(e) if e.not_committed() => {
                if let Err(abort) = self.abort().await {
                    tracing::warn!(gid = %self.gid, error = %abort,
                        "aborting a message whose local transaction did not commit failed; its back-check will");
                }
                Err(FinishError::Local(e))
            }
            Err(e) => Err(FinishError::Local(e)),
        }
    }
}

/// A step URL as the engine stores it, checked against the embedded client's allow-list.
fn step_target(allow: &crate::target::AllowList, url: &str) -> Result<String, ClientError> {
    let url = allow.check(url).map_err(|e| ClientError::Coordinator {
        status: 422,
        code: "participant_not_allowed".into(),
        message: e,
    })?;
    Ok(Target::Step { style: StepStyle::Native, url }.encode())
}

impl TccClient {
    /// Starts describing a saga that must be done within `timeout` (past it, it is compensated);
    /// see [`SagaBuilder`].
    pub fn saga(&self, timeout: Duration) -> SagaBuilder {
        SagaBuilder { client: self.clone(), timeout, req: SagaRequest::default(), next_after: None }
    }

    /// Starts describing a two-phase message, back-checked if still prepared after `timeout`;
    /// see [`MessageBuilder`].
    pub fn message(&self, timeout: Duration) -> MessageBuilder {
        MessageBuilder { client: self.clone(), timeout, req: MessageRequest::default() }
    }
}
