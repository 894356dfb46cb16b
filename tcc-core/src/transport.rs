//! The seam through which the engine calls participants.
//!
//! The engine never speaks HTTP: it hands a [`BranchCall`] to a [`Transport`]. `tcc-http` plugs in
//! reqwest; tests plug in participants that live in memory.

use async_trait::async_trait;

use crate::model::{Branch, Decision, Gid, Timestamp};
pub use crate::state::LocalOutcome;

/// A message's back-check: ask `target` whether the local transaction of `gid` committed.
#[derive(Clone, Copy, Debug)]
pub struct BackCheckCall<'a> {
    /// The message.
    pub gid: &'a Gid,
    /// Where to ask (the message's `query_prepared`), for the transport to interpret.
    pub target: &'a str,
    /// The message's deadline.
    pub deadline: Timestamp,
}

/// One phase-two call: tell `branch` of transaction `gid` to carry out `decision`.
#[derive(Clone, Copy, Debug)]
pub struct BranchCall<'a> {
    /// The global transaction.
    pub gid: &'a Gid,
    /// The branch, with its target and the payload registered with it.
    pub branch: &'a Branch,
    /// Confirm or cancel.
    pub decision: Decision,
    /// The transaction's deadline, for the participant's own expiry bookkeeping.
    pub deadline: Timestamp,
}

/// Why a call failed, which decides whether the engine tries again.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Worth retrying: a timeout, a refused connection, a 5xx, a participant that is busy.
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help (the participant says the reservation expired, or the request is one it
    /// will never accept); the transaction is flagged for an operator at once.
    #[error("{0}")]
    Permanent(String),
}

/// How the engine reaches participants. Calls must be idempotent at the participant (the barrier
/// makes them so): the engine repeats a call whenever it cannot know that the last one arrived.
///
/// ```
/// use async_trait::async_trait;
/// use tcc_core::transport::{BranchCall, CallError, Transport};
///
/// #[derive(Debug)]
/// struct AlwaysYes;
///
/// #[async_trait]
/// impl Transport for AlwaysYes {
///     async fn call(&self, _call: BranchCall<'_>) -> Result<(), CallError> {
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Transport: Send + Sync + std::fmt::Debug + 'static {
    /// Performs the call. The engine bounds it with the retry policy's per-call timeout.
    ///
    /// For a saga, `decision` confirm is the step's action (at the branch's target) and cancel
    /// its compensation (the engine hands over a branch whose target is the compensation's); an
    /// action answering [`CallError::Permanent`] refuses, which turns the saga back. For a
    /// message, confirm is the step's action.
    async fn call(&self, call: BranchCall<'_>) -> Result<(), CallError>;

    /// Asks a prepared message's back-check whether its local transaction committed. The engine
    /// bounds it with the per-call timeout. A transport that cannot (the default) answers
    /// [`LocalOutcome::Unknown`], so the message waits for its submit, abort or an operator.
    async fn back_check(&self, check: BackCheckCall<'_>) -> LocalOutcome {
        let _ = check;
        LocalOutcome::Unknown("this transport cannot call back-checks".into())
    }
}
