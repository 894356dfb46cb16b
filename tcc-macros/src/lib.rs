//! # tcc-macros
//!
//! The `#[tcc]` attribute of the tcc framework: one trait defines a service's TCC operations, saga
//! steps and message actions, and the attribute generates the participant side (an implementation of
//! the trait is served by a `tcc_http::participant::Participant`, through the barrier) and a typed
//! client stub for initiators. Use it as `tcc_http::tcc`: the generated code names `tcc_http` only, so that is
//! the one dependency a user adds (with `serde` for their own derives).
//!
//! The crate is parse, model, render: `attrs` reads the attribute arguments, `model` validates the
//! trait (collecting every error), `render_server` and `render_client` write each side, and
//! `expand::expand` ties them together as a plain function of token streams.
#![warn(missing_docs)]

mod attrs;
mod errors;
mod expand;
mod model;
mod render_client;
mod render_server;

use proc_macro::TokenStream;

/// Defines a TCC service: a trait whose TCC operations each have a try, a confirm and a cancel
/// method, whose saga steps each have an action and a compensation, and whose message actions are
/// one method each.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tcc_http::{TccContext, TccError, tcc};
///
/// #[derive(Debug, Serialize, Deserialize)]
/// pub struct SeatRequest { pub flight: String, pub seat: String }
///
/// #[derive(Debug, Serialize, Deserialize)]
/// pub struct SeatHold { pub flight: String, pub seat: String }
///
/// #[derive(Debug, Serialize, Deserialize, thiserror::Error)]
/// pub enum FlightError {
///     #[error("seat {0} is taken")]
///     Taken(String),
///     #[error(transparent)]
///     Store(#[from] tcc_http::staged::StoreError),
/// }
///
/// // Every error refuses the try (and so cancels the transaction); see `TccError::disposition`.
/// impl TccError for FlightError {}
///
/// /// The flight service.
/// #[tcc]
/// pub trait Flights {
///     /// Holds a seat until the transaction decides.
///     #[tcc(confirm = sell_seat, cancel = release_seat)]
///     async fn hold_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<SeatHold, FlightError>;
///     /// Sells the held seat.
///     async fn sell_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<(), FlightError>;
///     /// Frees the held seat.
///     async fn release_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<(), FlightError>;
/// }
///
/// // The service implements it; its effects are staged in the context and commit with the barrier.
/// struct MyFlights;
///
/// impl Flights for MyFlights {
///     async fn hold_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<SeatHold, FlightError> {
///         if ctx.get::<String>("seats", &req.seat)?.is_some() {
///             return Err(FlightError::Taken(req.seat));
///         }
///         ctx.insert_new("seats", &req.seat, &"held")?;
///         Ok(SeatHold { flight: req.flight, seat: req.seat })
///     }
///     async fn sell_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<(), FlightError> {
///         if let Some(held) = ctx.get::<String>("seats", &req.seat)? {
///             ctx.put("seats", &req.seat, &"sold", held.version)?;
///         }
///         Ok(())
///     }
///     async fn release_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<(), FlightError> {
///         if let Some(held) = ctx.get::<String>("seats", &req.seat)? {
///             ctx.remove("seats", &req.seat, held.version)?;
///         }
///         Ok(())
///     }
/// }
///
/// # fn serve() -> Result<(), Box<dyn std::error::Error>> {
/// // The participant: the implementation's operations on the barrier of its sled database...
/// let db = tcc_core::DurableDb::temporary()?;
/// let barrier = tcc_core::SledBarrier::open(
///     &db,
///     vec![db.open_tree("seats")?],
///     std::sync::Arc::new(tcc_core::SystemClock),
///     std::time::Duration::from_secs(60),
/// )?;
/// let participant = MyFlights.into_participant(tcc_http::participant::Participant::new(barrier)?);
/// // Serve it: `axum::Router::new().nest("/tcc/flights", participant.router())`.
/// let _app = participant.router();
/// # Ok(()) }
///
/// // ... and the initiator's typed call, inside a transaction.
/// async fn book(tx: &tcc_http::client::GlobalTx) -> Result<SeatHold, tcc_http::stub::TccCallError<FlightError>> {
///     let flights = FlightsClient::new("http://127.0.0.1:8081/tcc/flights");
///     flights.hold_seat(tx, SeatRequest { flight: "TC42".into(), seat: "12A".into() }).await
/// }
/// ```
///
/// A saga step is an action paired with its compensation, a message action one method; both sit in
/// the same trait as TCC operations (or alone in one):
///
/// ```
/// use std::time::Duration;
/// use serde::{Deserialize, Serialize};
/// use tcc_http::client::{ClientError, TccClient};
/// use tcc_http::{TccContext, TccError, tcc};
///
/// #[derive(Debug, Serialize, Deserialize, thiserror::Error)]
/// pub enum LoyaltyError {
///     #[error("{0} may not collect points")]
///     Barred(String),
///     #[error(transparent)]
///     Store(#[from] tcc_http::staged::StoreError),
/// }
///
/// impl TccError for LoyaltyError {}
///
/// /// The loyalty service.
/// #[tcc]
/// pub trait Loyalty {
///     /// Credits points: a saga step. A refusal turns the saga back.
///     #[tcc(compensate = debit)]
///     async fn credit(&self, ctx: TccContext, customer: String, points: i64) -> Result<(), LoyaltyError>;
///     /// Takes them back, if the saga turns back after `credit` ran.
///     async fn debit(&self, ctx: TccContext, customer: String, points: i64) -> Result<(), LoyaltyError>;
///     /// Mails a welcome: a message action, run once the message's local transaction committed.
///     #[tcc(action)]
///     async fn welcome(&self, ctx: TccContext, customer: String) -> Result<(), LoyaltyError>;
/// }
///
/// struct Points;
///
/// impl Loyalty for Points {
///     async fn credit(&self, ctx: TccContext, customer: String, points: i64) -> Result<(), LoyaltyError> {
///         if customer == "eve" {
///             return Err(LoyaltyError::Barred(customer));
///         }
///         match ctx.get::<i64>("points", &customer)? {
///             Some(b) => ctx.put("points", &customer, &(b.value + points), b.version)?,
///             None => ctx.insert_new("points", &customer, &points)?,
///         };
///         Ok(())
///     }
///     async fn debit(&self, ctx: TccContext, customer: String, points: i64) -> Result<(), LoyaltyError> {
///         if let Some(b) = ctx.get::<i64>("points", &customer)? {
///             ctx.put("points", &customer, &(b.value - points), b.version)?;
///         }
///         Ok(())
///     }
///     async fn welcome(&self, ctx: TccContext, customer: String) -> Result<(), LoyaltyError> {
///         ctx.insert_new("mails", &customer, &"sent")?;
///         Ok(())
///     }
/// }
///
/// # fn serve() -> Result<(), Box<dyn std::error::Error>> {
/// // The participant: `credit` at `…/credit/action` and `…/credit/compensate`, `welcome` at
/// // `…/welcome/action`.
/// let db = tcc_core::DurableDb::temporary()?;
/// let participant =
///     Points.into_participant(tcc_http::participant::Participant::builder().sled(&db, &["points", "mails"])?);
/// let _app = participant.router();
/// # Ok(()) }
///
/// // The initiator: the typed stubs add steps to a saga, actions to a message; nothing is sent
/// // until it is submitted.
/// async fn sign_up(tcc: &TccClient) -> Result<(), ClientError> {
///     let loyalty = LoyaltyClient::new("http://127.0.0.1:8085/tcc/loyalty");
///     let saga = tcc.saga(Duration::from_secs(30));
///     let saga = loyalty.credit(saga, "ada".into(), 100)?;
///     saga.submit().await?; // all its steps done, or every one that ran compensated
///
///     let message = loyalty.welcome(tcc.message(Duration::from_secs(30)), "ada".into())?;
///     let prepared = message.prepare("http://127.0.0.1:8086/tcc/agency/back-check").await?;
///     // ... the local transaction (`Participant::local_transaction`) commits here ...
///     prepared.submit().await?;
///     Ok(())
/// }
/// ```
///
/// # What it generates
///
/// - **The trait**, with each `async fn` declared as `fn ... -> impl Future<Output = ...> + Send`
///   (implement it with `async fn`), `Send + Sync + 'static` as supertraits, and the provided method
///   `into_participant(self, participant) -> Participant`, which adds the implementation to a
///   `tcc_http::participant::Participant`, each part named after its method: every TCC operation
///   (an `AsyncOperation`, served at `…/{try}/try`, `/confirm`, `/cancel`), every saga step (an
///   `AsyncStep`, at `…/{action}/action` and `/compensate`) and every message action (an
///   `AsyncAction`, at `…/{action}/action`). When the methods take `&mut SqlContext<DB>`, the
///   participant is a `Participant<Sql<DB>>` and they are its `SqlOperation`s, `SqlStep`s and
///   `SqlAction`s, each call one transaction of `DB` with the barrier row.
/// - **`{Trait}Client`** (or the name given with `client = ...`), the typed client stub:
///   `new(base_url)`, `with_branch`, `with_try_attempts`, `base_url`, and
///   - for each TCC operation an async method taking the `tcc_http::client::GlobalTx` and the try's
///     parameters, which registers the branch (by default `"{Trait}.{try}"`) and calls the try,
///     returning its result or a `tcc_http::stub::TccCallError` holding the typed business refusal;
///   - for each saga step a method taking a `tcc_http::client::SagaBuilder` and the action's
///     parameters, which adds the step (its action and compensation URLs, the parameters as the
///     payload) after the saga's other steps and returns the builder:
///     `let saga = loyalty.credit(saga, customer, points)?;` (for a concurrent saga, give the
///     builder the step's predecessors first: `loyalty.credit(saga.next_after(&[0]), ...)`);
///   - for each message action a method taking a `tcc_http::client::MessageBuilder` and the
///     action's parameters, which adds the action and returns the builder.
///
///   The step and action methods send nothing; they fail only with
///   `tcc_http::client::ClientError::Invalid` when the parameters do not encode as JSON.
/// - Type checks placed on the types they concern: parameters and results serialize, errors
///   implement `tcc_http::TccError`.
///
/// # The definition
///
/// - A try method carries `#[tcc(confirm = method, cancel = method)]`, and optionally
///   `branch = "id"` (the client's default branch id).
/// - A saga step's action carries `#[tcc(compensate = method)]`; a message action `#[tcc(action)]`.
///   Neither takes `confirm`, `cancel` or `branch` (a step's branch is its position in the saga),
///   and a message action has no compensation.
/// - Every other method must be some operation's confirm or cancel or some step's compensation,
///   each used once: one method is not both, nor the same role of two.
/// - Every method is `async fn name(&self, ctx: TccContext, params...) -> Result<T, E>` (or
///   `ctx: &mut SqlContext<DB>`, the same for every method of the trait), not generic, parameters
///   by value (they travel as JSON: one as its value, several as a JSON array, none as `null`).
///   A confirm and a cancel take the try's parameters and return `Result<(), E>` with the try's
///   `E`; a compensation takes its action's parameters and returns `Result<(), E>` with the
///   action's `E`; a step's action and a message action return `Result<(), E>` (the coordinator
///   only hears done or refused).
/// - On the trait: `client = Name` renames the client stub; `crate = path` says where `tcc_http`
///   is when it is re-exported.
///
/// Every mistake is a compile error at the offending tokens, all of them at once.
#[proc_macro_attribute]
pub fn tcc(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    match expand::expand(attr.into(), item.clone()) {
        Ok(tokens) => tokens.into(),
        Err(e) => expand::with_errors(e, item).into(),
    }
}
