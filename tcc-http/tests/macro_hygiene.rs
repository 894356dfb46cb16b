//! `#[tcc]` output names everything by absolute path: a definition compiles, is implemented and
//! served, and its client is built, in a crate without the implicit prelude.
#![no_implicit_prelude]

mod api {
    use ::serde::{Deserialize, Serialize};
    use ::std::result::Result;
    use ::std::string::String;
    use ::tcc_http::{TccContext, TccError, tcc};

    #[derive(::std::fmt::Debug, Serialize, Deserialize, ::std::cmp::PartialEq)]
    pub struct Seat(pub String);

    #[derive(::std::fmt::Debug, Serialize, Deserialize)]
    pub struct SeatError;

    impl ::std::fmt::Display for SeatError {
        fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
            f.write_str("no seat")
        }
    }

    impl TccError for SeatError {}

    /// A service with one parameterless operation and one with two parameters.
    #[tcc]
    pub trait Flights {
        #[tcc(confirm = sell, cancel = release)]
        async fn hold(&self, ctx: TccContext, seat: Seat, row: u32) -> Result<Seat, SeatError>;
        async fn sell(&self, ctx: TccContext, seat: Seat, row: u32) -> Result<(), SeatError>;
        async fn release(&self, ctx: TccContext, seat: Seat, row: u32) -> Result<(), SeatError> {
            let _ = (ctx, seat, row);
            Result::Ok(())
        }

        #[tcc(confirm = pong, cancel = unping, branch = "ping")]
        async fn ping(&self, ctx: TccContext) -> Result<(), SeatError>;
        async fn pong(&self, ctx: TccContext) -> Result<(), SeatError>;
        async fn unping(&self, ctx: TccContext) -> Result<(), SeatError>;

        /// A saga step with two parameters, and a message action with none.
        #[tcc(compensate = unmeal)]
        async fn meal(&self, ctx: TccContext, seat: Seat, row: u32) -> Result<(), SeatError>;
        async fn unmeal(&self, ctx: TccContext, seat: Seat, row: u32) -> Result<(), SeatError>;
        #[tcc(action)]
        async fn notify(&self, ctx: TccContext) -> Result<(), SeatError>;
    }

    pub struct Airline;

    impl Flights for Airline {
        async fn hold(&self, _ctx: TccContext, seat: Seat, _row: u32) -> Result<Seat, SeatError> {
            Result::Ok(seat)
        }
        async fn sell(&self, _ctx: TccContext, _seat: Seat, _row: u32) -> Result<(), SeatError> {
            Result::Ok(())
        }
        async fn ping(&self, _ctx: TccContext) -> Result<(), SeatError> {
            Result::Ok(())
        }
        async fn pong(&self, _ctx: TccContext) -> Result<(), SeatError> {
            Result::Ok(())
        }
        async fn unping(&self, _ctx: TccContext) -> Result<(), SeatError> {
            Result::Err(SeatError)
        }
        async fn meal(&self, _ctx: TccContext, _seat: Seat, _row: u32) -> Result<(), SeatError> {
            Result::Ok(())
        }
        async fn unmeal(&self, _ctx: TccContext, _seat: Seat, _row: u32) -> Result<(), SeatError> {
            Result::Ok(())
        }
        async fn notify(&self, _ctx: TccContext) -> Result<(), SeatError> {
            Result::Ok(())
        }
    }
}

#[::core::prelude::v1::test]
fn generated_code_needs_no_prelude() {
    use ::core::iter::Iterator;
    use api::Flights;

    let db = ::tcc_core::DurableDb::temporary().ok().unwrap_or_else(|| ::std::process::abort());
    let barrier = ::tcc_core::SledBarrier::open(
        &db,
        ::std::vec::Vec::new(),
        ::std::sync::Arc::new(::tcc_core::SystemClock),
        ::core::time::Duration::from_secs(60),
    );
    let barrier = barrier.ok().unwrap_or_else(|| ::std::process::abort());
    let participant = ::tcc_http::participant::Participant::with_barrier_durability(barrier);
    let participant = api::Airline.into_participant(participant);
    let mut ops: ::std::vec::Vec<&str> = participant.operations().collect();
    ops.sort_unstable();
    ::std::assert_eq!(ops, ["hold", "meal", "notify", "ping"]);

    let client = api::FlightsClient::new("http://127.0.0.1:1/flights/").with_branch("seat-2");
    ::std::assert_eq!(client.base_url(), "http://127.0.0.1:1/flights");

    // The step and action stubs only describe: nothing is sent before submit.
    let tcc = ::tcc_http::client::TccClient::remote("http://127.0.0.1:1", ::core::option::Option::None);
    let tcc = tcc.ok().unwrap_or_else(|| ::std::process::abort());
    let saga = tcc.saga(::core::time::Duration::from_secs(5));
    let saga = client.meal(saga, api::Seat(::std::string::String::new()), 3);
    ::std::assert!(saga.is_ok());
    let message = client.notify(tcc.message(::core::time::Duration::from_secs(5)));
    ::std::assert!(message.is_ok());
}
