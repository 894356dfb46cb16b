//! # travel-booking
//!
//! The tcc showcase: a flight service and a hotel service, each keeping its inventory in its own
//! sled database, and a travel agency that books a seat and a room in one transaction — both or
//! neither.
//!
//! - [`api`]: the two services' definitions with `#[tcc]` (what a shared API crate would hold);
//! - [`inventory`]: the one implementation both services use: stock with a version column;
//! - [`service`]: serving a service on a loopback port;
//! - [`agency`]: booking a trip;
//! - [`ledger`]: reading both services' books and checking that they agree.
#![warn(missing_docs)]

pub mod agency;
pub mod api;
pub mod inventory;
pub mod ledger;
pub mod service;
