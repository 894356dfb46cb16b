//! The error type of the crate, with variants a caller can act on.

use crate::model::{Gid, Timestamp, TxState};

/// Everything that can go wrong in the coordinator, the store or the barrier.
///
/// Each variant maps to one stable [`code`](Error::code), which the HTTP layer turns into a status.
/// Whenever one of these is returned for a request, the stored state is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No transaction with this id.
    #[error("transaction {0} not found")]
    NotFound(Gid),

    /// A transaction with this id already exists.
    #[error("transaction {0} already exists")]
    AlreadyExists(Gid),

    /// The request is not allowed in the transaction's current state (for example confirm after
    /// cancel, or registering a branch on a transaction that has a decision).
    #[error("cannot {action} transaction {gid}: it is {state}")]
    IllegalTransition {
        /// The transaction.
        gid: Gid,
        /// Its current state.
        state: TxState,
        /// What was asked.
        action: &'static str,
    },

    /// The transaction's deadline has passed; only cancel is possible now.
    #[error("transaction {gid} passed its deadline {deadline}; it can only be cancelled")]
    DeadlinePassed {
        /// The transaction.
        gid: Gid,
        /// Its deadline.
        deadline: Timestamp,
    },

    /// The request itself is malformed (bad id, zero timeout, duplicate branch, oversized payload).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// Another writer changed the transaction first and the request could not be re-applied.
    #[error("transaction {0} was changed concurrently; try again")]
    Conflict(Gid),

    /// A participant refused or failed a call.
    #[error("participant failure: {0}")]
    Participant(String),

    /// The durable store failed, or holds a record it cannot decode.
    #[error("storage: {0}")]
    Storage(String),

    /// The coordinator is shutting down.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
}

impl Error {
    /// A stable machine-readable code for this error.
    ///
    /// ```
    /// use tcc_core::{Error, Gid};
    /// assert_eq!(Error::NotFound(Gid::generate()).code(), "not_found");
    /// ```
    pub fn code(&self) -> &'static str {
        match self {
            Error::NotFound(_) => "not_found",
            Error::AlreadyExists(_) => "already_exists",
            Error::IllegalTransition { .. } => "illegal_transition",
            Error::DeadlinePassed { .. } => "deadline_passed",
            Error::InvalidInput(_) => "invalid_input",
            Error::Conflict(_) => "conflict",
            Error::Participant(_) => "participant_failure",
            Error::Storage(_) => "storage",
            Error::ShuttingDown => "shutting_down",
        }
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Error {
        Error::Storage(e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Storage(e.to_string())
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
