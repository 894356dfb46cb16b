//! # tcc-macros
//!
//! The `#[tcc]` attribute of the tcc framework: one trait defines a service's TCC operations, and
//! the attribute generates the participant side (an implementation of the trait becomes operations
//! of a `tcc_http::participant::Participant`, served through the barrier) and a typed client stub
//! for initiators. Use it as `tcc_http::tcc`: the generated code names `tcc_http` only, so that is
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

/// Defines a TCC service: a trait whose operations each have a try, a confirm and a cancel method.
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
/// # What it generates
///
/// - **The trait**, with each `async fn` declared as `fn ... -> impl Future<Output = ...> + Send`
///   (implement it with `async fn`), `Send + Sync + 'static` as supertraits, and the provided method
///   `into_participant(self, participant) -> Participant`, which adds every operation to a
///   `tcc_http::participant::Participant` (an `AsyncOperation` each, named after the try method).
/// - **`{Trait}Client`** (or the name given with `client = ...`), the typed client stub:
///   `new(base_url)`, `with_branch`, `with_try_attempts`, `base_url`, and for each operation an async
///   method taking the `tcc_http::client::GlobalTx` and the try's parameters, which registers the
///   branch (by default `"{Trait}.{try}"`) and calls the try, returning its result or a
///   `tcc_http::stub::TccCallError` holding the typed business refusal.
/// - Type checks placed on the types they concern: parameters and results serialize, errors
///   implement `tcc_http::TccError`.
///
/// # The definition
///
/// - A try method carries `#[tcc(confirm = method, cancel = method)]`, and optionally
///   `branch = "id"` (the client's default branch id). Every other method must be some operation's
///   confirm or cancel, each used by one operation only.
/// - Every method is `async fn name(&self, ctx: TccContext, params...) -> Result<T, E>`, not generic,
///   parameters by value (they travel as JSON: several become a JSON array). A confirm and a cancel
///   take the try's parameters and return `Result<(), E>` with the try's `E`.
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
