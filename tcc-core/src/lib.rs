//! # tcc-core
//!
//! The transport-independent heart of the tcc Try-Confirm-Cancel framework:
//!
//! - [`model`]: global transaction ids, branches, states and deadlines;
//! - [`state`]: every transition of a transaction, as one pure function of (state, event);
//! - [`Store`] with [`SledStore`], the embedded durable log with group commit;
//! - [`DurableDb`]: a sled database whose flush reaches stable storage (fdatasync), for the store and the barrier;
//! - [`Coordinator`]: the engine that records decisions and drives every branch to them;
//! - [`Transport`](transport::Transport): the seam through which the engine calls participants (HTTP lives in `tcc-http`);
//! - [`barrier`]: the participant-side barrier against duplicate calls, empty cancels and suspended tries;
//! - [`Clock`]: injectable time, so tests never sleep for real.
#![warn(missing_docs)]

pub mod barrier;
pub mod clock;
pub mod durable;
pub mod error;
pub mod join;
pub mod model;
pub mod state;
pub mod store;

pub use clock::{Clock, ManualClock, SystemClock};
pub use durable::DurableDb;
pub use error::{Error, Result};
pub use model::{
    Branch, BranchId, BranchState, Decision, Gid, Happening, HistoryEntry, Msg, Saga, SagaStep, Timestamp,
    Transaction, TxKind, TxOptions, TxState,
};
pub mod coordinator;
mod phase_two;
mod recovery;
pub mod retry;
pub mod transport;

pub use barrier::{BarrierError, SledBarrier};
pub use coordinator::{Config, Coordinator, NewBranch, NewStep, Stats};
pub use retry::RetryPolicy;
pub use store::{SledStore, Store};
