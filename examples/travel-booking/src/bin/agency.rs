//! The travel agency as its own process: books one trip through a `tcc-coordinator`.
//!
//! ```text
//! cargo run --release -p travel-booking --bin agency -- \
//!     --coordinator http://127.0.0.1:36789 --flights http://127.0.0.1:8081/tcc/flights \
//!     --hotels http://127.0.0.1:8082/tcc/hotels --customer ada --flight TC42 --hotel Ritz
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tcc_http::client::TccClient;
use travel_booking::agency::{Agency, Outcome, Trip};

/// Books a seat and a room in one transaction.
#[derive(Debug, Parser)]
struct Args {
    /// The coordinator's base URL.
    #[arg(long, env = "TCC_COORDINATOR", default_value = "http://127.0.0.1:36789")]
    coordinator: String,
    /// The flight service's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8081/tcc/flights")]
    flights: String,
    /// The hotel service's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8082/tcc/hotels")]
    hotels: String,
    /// Who travels.
    #[arg(long, default_value = "ada")]
    customer: String,
    /// The flight.
    #[arg(long, default_value = "TC42")]
    flight: String,
    /// The hotel.
    #[arg(long, default_value = "Ritz")]
    hotel: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let a = Args::parse();
    let tcc = match TccClient::remote(&a.coordinator, None) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("agency: {e}");
            return ExitCode::from(2);
        }
    };
    let agency = Agency::new(tcc, &a.flights, &a.hotels);
    let trip = Trip { customer: a.customer, flight: a.flight, hotel: a.hotel };
    match agency.book(&trip, Duration::from_secs(30)).await {
        Ok(Outcome::Booked { seat, room, done }) => {
            println!(
                "booked {}: seat on {} and room at {}: {:?}",
                done.gid, seat.item, room.item, done.state
            );
            ExitCode::SUCCESS
        }
        Ok(Outcome::Refused { reason, gid }) => {
            println!("not booked ({gid} cancelled): {reason}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("agency: {e}");
            ExitCode::FAILURE
        }
    }
}
