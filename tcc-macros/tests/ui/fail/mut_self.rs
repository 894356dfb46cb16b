use serde::{Deserialize, Serialize};
use tcc_http::{tcc, TccContext, TccError};

#[derive(Debug, Serialize, Deserialize)]
pub struct Seat(pub String);

#[derive(Debug, Serialize, Deserialize)]
pub struct SeatError;

impl std::fmt::Display for SeatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no seat")
    }
}

impl TccError for SeatError {}

#[tcc]
pub trait Flights {
    #[tcc(confirm = sell, cancel = release)]
    async fn hold(&mut self, ctx: TccContext, seat: Seat) -> Result<(), SeatError>;
    async fn sell(&self, ctx: TccContext, seat: Seat) -> Result<(), SeatError>;
    async fn release(&self, ctx: TccContext, seat: Seat) -> Result<(), SeatError>;
}

fn main() {}
