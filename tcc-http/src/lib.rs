//! # tcc-http
//!
//! Will hold the HTTP side of tcc: the axum coordinator API (native and DTM-compatible), the
//! participant routes serving try/confirm/cancel through the `tcc-core` barrier, the reqwest
//! [`Transport`](tcc_core::transport::Transport) the engine calls participants with, and the
//! `tcc-coordinator` binary. It arrives with the HTTP issue; `tcc-core` already defines every seam it
//! plugs into.
