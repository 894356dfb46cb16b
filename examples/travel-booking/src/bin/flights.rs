//! The flight service as its own process:
//! `cargo run --release -p travel-booking --bin flights -- --listen 127.0.0.1:8081 --data-dir ./flights-data`.
fn main() -> std::process::ExitCode {
    travel_booking::service::run_standalone(travel_booking::service::Kind::Flights)
}
