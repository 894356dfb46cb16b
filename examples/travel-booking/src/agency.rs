//! The travel agency: books a seat and a room in one transaction, both or neither.

use std::time::Duration;

use tcc_http::client::{ClientError, TccClient};
use tcc_http::stub::TccCallError;
use tcc_http::{StateView, TransactionView};

use crate::api::{BookingError, FlightsClient, Hold, HoldRequest, HotelsClient};

/// How long a booking may take before the coordinator cancels it.
pub const BOOKING_TIMEOUT: Duration = Duration::from_secs(30);

/// A trip to book.
#[derive(Clone, Debug)]
pub struct Trip {
    /// The customer.
    pub customer: String,
    /// The flight.
    pub flight: String,
    /// The hotel.
    pub hotel: String,
}

/// How a booking ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both held and the confirm decision is durable; `done` is the transaction once phase two
    /// finished (or as it was when the wait ended).
    Booked {
        /// The seat hold.
        seat: Hold,
        /// The room hold.
        room: Hold,
        /// The transaction after the wait.
        done: TransactionView,
    },
    /// A service refused; the booking was cancelled and whatever was held is released.
    Refused {
        /// Which service said no, and why.
        reason: String,
        /// The transaction id.
        gid: String,
    },
}

/// Why a booking could not be carried out at all (the coordinator or a service failed).
#[derive(Debug, thiserror::Error)]
pub enum AgencyError {
    /// The coordinator refused or failed.
    #[error(transparent)]
    Coordinator(#[from] ClientError),
}

/// The agency: a coordinator client and the two services' typed clients.
#[derive(Clone, Debug)]
pub struct Agency {
    tcc: TccClient,
    flights: FlightsClient,
    hotels: HotelsClient,
}

fn describe(e: TccCallError<BookingError>) -> String {
    match e.refusal() {
        Some(refusal) => refusal.to_string(),
        None => e.to_string(),
    }
}

impl Agency {
    /// An agency booking through `tcc` with the services at these base URLs.
    pub fn new(tcc: TccClient, flights_url: &str, hotels_url: &str) -> Agency {
        Agency { tcc, flights: FlightsClient::new(flights_url), hotels: HotelsClient::new(hotels_url) }
    }

    /// Books `trip`: holds a seat, then a room; confirms if both are held, cancels otherwise. With
    /// `wait`, also waits up to that long for phase two to finish.
    pub async fn book(&self, trip: &Trip, wait: Duration) -> Result<Outcome, AgencyError> {
        let tx = self.tcc.begin(BOOKING_TIMEOUT).await?;
        let gid = tx.gid().to_string();
        let seat_req = HoldRequest { item: trip.flight.clone(), customer: trip.customer.clone() };
        let seat = match self.flights.hold_seat(&tx, seat_req).await {
            Ok(seat) => seat,
            Err(e) => {
                tx.cancel().await?;
                return Ok(Outcome::Refused { reason: format!("flights: {}", describe(e)), gid });
            }
        };
        let room_req = HoldRequest { item: trip.hotel.clone(), customer: trip.customer.clone() };
        let room = match self.hotels.hold_room(&tx, room_req).await {
            Ok(room) => room,
            Err(e) => {
                tx.cancel().await?;
                return Ok(Outcome::Refused { reason: format!("hotels: {}", describe(e)), gid });
            }
        };
        let done = if wait.is_zero() { tx.confirm().await? } else { tx.confirm_and_wait(wait).await? };
        Ok(Outcome::Booked { seat, room, done })
    }

    /// The coordinator client.
    pub fn tcc(&self) -> &TccClient {
        &self.tcc
    }
}

/// Whether a booking's phase two finished with every branch confirmed.
pub fn is_confirmed(tx: &TransactionView) -> bool {
    tx.state == StateView::Confirmed
}
