//! # tcc-http
//!
//! The HTTP side of tcc, by role. Each role is a cargo feature; a crate names the ones it plays
//! (the defaults are all of them):
//!
//! | module | feature | role |
//! |---|---|---|
//! | [`protocol`] | always | the wire types both sides share: participant paths, headers, status codes and batch formats, the coordinator API's bodies ([`protocol::coordinator`]), DTM's branch-call conventions ([`protocol::dtm`]), the error body |
//! | [`client`] | `client` | an initiator: [`TccClient`] begins, registers and tries branches, confirms and cancels, the same whether the coordinator is embedded in its process or a `tcc-coordinator` server; [`stub`] is what `#[tcc]`'s typed client stubs call |
//! | [`transport`] | `client` | the reqwest [`Transport`](tcc_core::transport::Transport) the engine calls participants with |
//! | [`participant`] | `participant` | the axum routes a participant serves its try/confirm/cancel operations with, through the `tcc-core` barrier |
//! | [`server`] | `server` | the coordinator as an axum service: the native JSON API, the DTM-compatible API ([`server::dtm`]), `/healthz`, `/readyz`, `/metrics`, `/openapi.json`; and the `tcc-coordinator` binary |
//!
//! Shared by the roles: [`staged`] ([`TccContext`], the staged writes of async operations),
//! [`target`] (branch targets and the participant allow-list), [`error`] (the JSON error answer),
//! [`serve`](mod@serve) (serving a router, the coordinator's or a participant service's, with limits
//! against slow clients: header and body read timeouts, a bounded header buffer, a connection cap).
//! The `postgres` feature adds the coordinator's PostgreSQL store, `mimalloc` the binary's allocator.
//! `sqlx-postgres` and `sqlx-mysql` add participants whose barrier and business state live in
//! PostgreSQL or MySQL ([`participant::sql`], on sqlx); a sled-only participant compiles no SQL driver.
//! `client`, `participant` and `transport` depend on `protocol`, never on `server`.
//!
//! [`tcc`](macro@tcc): one trait defines a service's TCC operations; the attribute generates the
//! participant side when the `participant` feature is on (an implementation becomes
//! [`Participant`] operations, async methods over a staged [`TccContext`]) and a typed client stub
//! when `client` is on.
#![warn(missing_docs)]

pub mod protocol;

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "client")]
pub mod stub;
#[cfg(feature = "client")]
pub mod transport;

#[cfg(feature = "participant")]
pub mod participant;

#[cfg(feature = "server")]
pub mod server;

pub mod error;
#[cfg(feature = "client")]
mod lane;
#[cfg(feature = "client")]
pub mod metrics;
pub mod serve;
// Both sides stream batch answers: the participant writes them, the client reads them.
#[cfg(any(feature = "client", feature = "participant"))]
#[cfg_attr(not(all(feature = "client", feature = "participant")), allow(dead_code))]
mod ndjson;
// The participant runtime commits what a TccContext staged; without it only the types remain.
#[cfg_attr(not(feature = "participant"), allow(dead_code))]
pub mod staged;
pub mod target;

#[doc(hidden)]
#[path = "macro_support.rs"]
pub mod __private;

pub use tcc_macros::tcc;

pub use error::ApiError;
pub use protocol::ErrorBody;
pub use protocol::coordinator::{StateView, TransactionView};
pub use staged::{Disposition, StoreError, TccContext, TccError, Version, Versioned};
pub use tcc_core::{
    BarrierError, BranchId, Clock, Config, DurableDb, Gid, ManualClock, SledBarrier, SystemClock, Timestamp,
};

// What a service and an initiator need, reachable from this crate alone (see docs/getting-started.md).
/// The `axum` this crate is built with: [`Participant::router`](participant::Participant::router) is
/// an `axum::Router` of this version.
pub use axum;
#[cfg(feature = "client")]
pub use client::{ClientError, GlobalTx, TccClient};
#[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
pub use participant::sql::{SqlContext, SqlError};
#[cfg(feature = "participant")]
pub use participant::{Participant, ParticipantBuilder, ParticipantError};
/// The `sled` this crate is built with: a [`DurableDb`] (what [`SledBarrier::open`] takes) is a
/// `sled::Db` of this version, whose trees the business methods write.
pub use sled;
/// The `sqlx` this crate is built with (features `sqlx-postgres`, `sqlx-mysql`): a SQL participant's
/// pool and the [`SqlContext`]'s connection are of this version.
#[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
pub use sqlx;
#[cfg(feature = "client")]
pub use stub::TccCallError;
/// The SQL barrier's table name and errors (features `sqlx-postgres`, `sqlx-mysql`).
#[cfg(any(feature = "sqlx-postgres", feature = "sqlx-mysql"))]
pub use tcc_core::barrier::sql::{BarrierTable, SqlBarrier, SqlBarrierError};

/// The README's examples, compiled and run as doctests so they cannot rot.
#[doc = include_str!("../../README.md")]
#[cfg(all(doctest, feature = "client", feature = "participant", feature = "sqlx-postgres"))]
pub struct ReadmeDoctests;

/// The participants guide's examples, compiled and run as doctests.
#[doc = include_str!("../../docs/participants.md")]
#[cfg(all(doctest, feature = "client", feature = "participant"))]
pub struct ParticipantsGuideDoctests;

/// The console guide's example (mounting the console in a service's app), compiled as a doctest.
#[doc = include_str!("../../docs/console.md")]
#[cfg(all(doctest, feature = "client", feature = "server"))]
pub struct ConsoleGuideDoctests;

/// The sagas and messages guide's examples, compiled and run as doctests.
#[doc = include_str!("../../docs/sagas-and-messages.md")]
#[cfg(all(doctest, feature = "client", feature = "participant"))]
pub struct SagasAndMessagesGuideDoctests;

/// The SQL participants guide's example, compiled as a doctest.
#[doc = include_str!("../../docs/sql-participants.md")]
#[cfg(all(doctest, feature = "participant", feature = "sqlx-postgres"))]
pub struct SqlParticipantsGuideDoctests;

/// The architecture guide's examples, compiled and run as doctests.
#[doc = include_str!("../../docs/architecture.md")]
#[cfg(all(doctest, feature = "client", feature = "participant"))]
pub struct ArchitectureGuideDoctests;
