//! The hotel service as its own process:
//! `cargo run --release -p travel-booking --bin hotels -- --listen 127.0.0.1:8082 --data-dir ./hotels-data`.
fn main() -> std::process::ExitCode {
    travel_booking::service::run_standalone(travel_booking::service::Kind::Hotels)
}
