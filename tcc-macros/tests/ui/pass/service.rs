//! A definition, an implementation with `async fn`, the participant side and the client stub.
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tcc_http::staged::StoreError;
use tcc_http::{tcc, TccContext, TccError};

#[derive(Debug, Serialize, Deserialize)]
pub struct SeatRequest {
    pub flight: String,
    pub seat: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SeatHold {
    pub seat: String,
}

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
pub enum FlightError {
    #[error("seat {0} is taken")]
    Taken(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TccError for FlightError {}

/// The flight service.
#[tcc]
pub trait Flights {
    /// Holds a seat.
    #[tcc(confirm = sell_seat, cancel = release_seat)]
    async fn hold_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<SeatHold, FlightError>;
    /// Sells it.
    async fn sell_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<(), FlightError>;
    /// Frees it.
    async fn release_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<(), FlightError>;
}

struct MyFlights;

impl Flights for MyFlights {
    async fn hold_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<SeatHold, FlightError> {
        if ctx.get::<String>("seats", &req.seat)?.is_some() {
            return Err(FlightError::Taken(req.seat));
        }
        ctx.insert_new("seats", &req.seat, &"held")?;
        Ok(SeatHold { seat: req.seat })
    }

    async fn sell_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<(), FlightError> {
        if let Some(v) = ctx.get::<String>("seats", &req.seat)? {
            ctx.put("seats", &req.seat, &"sold", v.version)?;
        }
        Ok(())
    }

    async fn release_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<(), FlightError> {
        if let Some(v) = ctx.get::<String>("seats", &req.seat)? {
            ctx.remove("seats", &req.seat, v.version)?;
        }
        Ok(())
    }
}

async fn book(tx: &tcc_http::client::GlobalTx) -> Result<SeatHold, tcc_http::client::ClientError> {
    let flights = FlightsClient::new("http://127.0.0.1:8081/tcc/flights").with_try_attempts(2);
    // `?` turns the typed error into the client error `TccClient::run` cancels on.
    let hold = flights.hold_seat(tx, SeatRequest { flight: "TC42".into(), seat: "12A".into() }).await?;
    Ok(hold)
}

fn main() {
    let db = tcc_core::DurableDb::temporary().unwrap();
    let barrier = tcc_core::SledBarrier::open(
        &db,
        vec![db.open_tree("seats").unwrap()],
        Arc::new(tcc_core::SystemClock),
        Duration::from_secs(60),
    )
    .unwrap();
    let participant = tcc_http::participant::Participant::with_barrier_durability(barrier);
    let participant = MyFlights.into_participant(participant);
    assert_eq!(participant.operations().collect::<Vec<_>>(), ["hold_seat"]);
    let _router = participant.router();

    let client = FlightsClient::new("http://127.0.0.1:8081/tcc/flights/");
    assert_eq!(client.base_url(), "http://127.0.0.1:8081/tcc/flights");
    let _second_seat = client.with_branch("seat-2");
    let _ = book;
}
