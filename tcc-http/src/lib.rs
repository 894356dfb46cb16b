//! # tcc-http
//!
//! The HTTP side of tcc:
//!
//! - [`server`]: the coordinator as an axum service — the native JSON API, the DTM-compatible API
//!   under `/api/dtmsvr` ([`dtm`]), `/healthz`, `/readyz`, `/metrics` and `/openapi.json`;
//! - [`participant`]: the axum routes a participant serves its try/confirm/cancel endpoints with,
//!   through the `tcc-core` barrier;
//! - [`transport`]: the reqwest [`Transport`](tcc_core::transport::Transport) the engine calls
//!   participants with;
//! - [`client`]: what an initiator uses to begin, register and try branches, confirm and cancel, the
//!   same whether the coordinator is embedded in its process or a `tcc-coordinator` server;
//! - [`serve`](mod@serve): serving a router (the coordinator's, or a participant service's) with limits
//!   against slow clients: header and body read timeouts, a bounded header buffer, a connection cap;
//! - [`protocol`]: the wire protocol (paths, headers, status codes, the error body);
//! - [`target`]: branch targets and the participant allow-list;
//! - [`tcc`](macro@tcc): one trait defines a service's TCC operations; the attribute generates the
//!   participant side (an implementation becomes [`participant::Participant`] operations, async
//!   methods over a staged [`TccContext`], see [`staged`]) and a typed client stub (see [`stub`]).
#![warn(missing_docs)]

pub mod client;
pub mod dtm;
pub mod error;
mod lane;
pub mod metrics;
mod ndjson;
pub mod participant;
pub mod protocol;
pub mod serve;
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
pub use staged::{TccContext, TccError};

/// The README's examples, compiled and run as doctests so they cannot rot.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
