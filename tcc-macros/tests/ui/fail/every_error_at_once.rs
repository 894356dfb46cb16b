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
    #[tcc(confirm = sel, cancel = release, timeout = 30)]
    fn hold(&mut self, seat: Seat) -> Seat;
    async fn sell(&self, ctx: TccContext, seat: Seat) -> Result<(), SeatError>;
    async fn release<T>(&self, ctx: TccContext, seat: T) -> Result<(), SeatError>;
}

fn main() {}
