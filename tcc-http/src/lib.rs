//! # tcc-http
//!
//! The HTTP side of tcc:
//!
//! - [`server`]: the coordinator as an axum service — the native JSON API, the DTM-compatible API
//!   under `/api/dtmsvr` ([`server::dtm`]), `/healthz`, `/readyz`, `/metrics` and `/openapi.json`;
//! - [`participant`]: the axum routes a participant serves its try/confirm/cancel endpoints with,
//!   through the `tcc-core` barrier;
//! - [`transport`]: the reqwest [`Transport`](tcc_core::transport::Transport) the engine calls
//!   participants with;
//! - [`client`]: what an initiator uses to begin, register and try branches, confirm and cancel, the
//!   same whether the coordinator is embedded in its process or a `tcc-coordinator` server;
//! - [`protocol`]: the wire protocol (paths, headers, status codes, the error body);
//! - [`target`]: branch targets and the participant allow-list;
//! - [`tcc`](macro@tcc): one trait defines a service's TCC operations; the attribute generates the
//!   participant side (an implementation becomes [`participant::Participant`] operations, async
//!   methods over a staged [`TccContext`], see [`staged`]) and a typed client stub (see [`stub`]).
#![warn(missing_docs)]

pub mod client;
pub mod error;
mod lane;
pub mod metrics;
mod ndjson;
pub mod participant;
pub mod protocol;
pub mod server;
pub mod staged;
pub mod stub;
pub mod target;
pub mod transport;

#[doc(hidden)]
#[path = "macro_support.rs"]
pub mod __private;

pub use tcc_macros::tcc;

pub use error::ApiError;
pub use protocol::ErrorBody;
pub use staged::{StoreError, TccContext, TccError};

// What a service and an initiator need, reachable from this crate alone (see docs/getting-started.md).
/// The `axum` this crate is built with: [`Participant::router`] is an `axum::Router` of this version.
pub use axum;
pub use client::{ClientError, GlobalTx, TccClient};
pub use participant::{Participant, ParticipantError};
pub use protocol::coordinator::{StateView, TransactionView};
/// The `sled` this crate is built with: [`SledBarrier::open`] takes a `sled::Db` of this version.
pub use sled;
pub use stub::TccCallError;
pub use tcc_core::{BarrierError, Config, SledBarrier, SystemClock};

/// The README's examples, compiled and run as doctests so they cannot rot.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The participants guide's examples, compiled and run as doctests.
#[doc = include_str!("../../docs/participants.md")]
#[cfg(doctest)]
pub struct ParticipantsGuideDoctests;

/// The architecture guide's examples, compiled and run as doctests.
#[doc = include_str!("../../docs/architecture.md")]
#[cfg(doctest)]
pub struct ArchitectureGuideDoctests;
