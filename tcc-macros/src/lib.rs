//! # tcc-macros
//!
//! Will hold `#[tcc]`: one service definition from which the try/confirm/cancel HTTP handlers (run
//! through the participant barrier of `tcc-core`) and a typed client stub are generated, with mistakes
//! reported at compile time. The attribute arrives with the macro issue; this crate is its place in the
//! workspace.
