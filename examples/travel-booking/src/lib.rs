//! # travel-booking
//!
//! The tcc showcase: a flight service and a hotel service, each keeping its inventory in its own
//! database (sled, PostgreSQL or MySQL, any mix), and a travel agency that books a seat and a room
//! in one transaction — both or neither.
//!
//! - [`api`]: the two services' definitions with `#[tcc]` (what a shared API crate would hold), on
//!   sled and on each SQL database;
//! - [`inventory`]: the one set of business rules both services use, run on sled (stock with a
//!   version column) and on SQL ([`inventory::sql`]: rows locked in the call's transaction);
//! - [`service`]: serving a service on a loopback port over the database its `--db` names;
//! - [`agency`]: booking a trip, then the loyalty saga and the confirmation message;
//! - [`loyalty`]: miles and points awarded as saga steps (action and compensation), on every
//!   backend;
//! - [`confirmation`]: the ticket issued in a local transaction and the confirmation e-mail sent
//!   as a two-phase message, on every backend;
//! - [`ledger`]: reading both services' books and checking that they agree.
#![warn(missing_docs)]

pub mod agency;
pub mod api;
pub mod confirmation;
pub mod inventory;
pub mod ledger;
pub mod loyalty;
pub mod service;
