//! The travel-booking demo: `cargo run --release -p travel-booking`.
//!
//! Starts a coordinator (a separate process: this binary in its coordinator role, the same server
//! as `tcc-coordinator`) and the flight and hotel services on free loopback ports, then narrates
//! six bookings that show what TCC and tcc are for, and ends with a ledger check across both
//! services. Exits non-zero if any expectation or invariant fails.
//!
//! Each service keeps its inventory in its own sled database unless told otherwise:
//! `--flights-db postgres://… --hotels-db mysql://…` runs the same scenarios with the flights in
//! PostgreSQL and the hotels in MySQL (or any mix of `sled:DIR`, `postgres://…`, `mysql://…`).
//! Each run works in a fresh schema (PostgreSQL) or database (MySQL) of its own, created at start
//! and dropped at the end when every expectation was met.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use tcc_http::StateView;
use tcc_http::client::TccClient;
use travel_booking::agency::{Agency, Outcome, Trip};
use travel_booking::inventory::Booking;
use travel_booking::ledger;
use travel_booking::service::{Db, Kind, Service};

const FLIGHTS: &[(&str, u32)] = &[("TC42", 10), ("TC43", 10), ("RUSH-FLIGHT", 50)];
const HOTELS: &[(&str, u32)] = &[("Ritz", 10), ("Tiny Inn", 0), ("RUSH-HOTEL", 40)];
const WAIT: Duration = Duration::from_secs(30);
/// The services' grace period in the demo, short so that scenario 6 (a hold nobody decides) ends
/// in seconds; a real service waits longer ([`travel_booking::service::GRACE`]).
const DEMO_GRACE: Duration = Duration::from_secs(2);

/// The demo's command line.
#[derive(Debug, Parser)]
#[command(about = "The tcc travel-booking demo: six bookings across a flight and a hotel service")]
struct DemoArgs {
    /// The flight service's database: `sled:DIR`, `postgres://…` or `mysql://…` (default: a sled
    /// database in a temporary directory). The demo works in a fresh schema or database of its own.
    #[arg(long)]
    flights_db: Option<Db>,
    /// The hotel service's database, as `--flights-db`.
    #[arg(long)]
    hotels_db: Option<Db>,
}

/// The coordinator, in its own process so that it can be killed with SIGKILL.
struct Coordinator {
    child: Child,
    addr: String,
    data: PathBuf,
}

impl Coordinator {
    async fn start(addr: &str, data: &Path) -> Result<Coordinator, String> {
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let child = Command::new(me)
            .arg("--coordinator")
            .arg(addr)
            .arg(data)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()))
            .spawn()
            .map_err(|e| format!("starting the coordinator: {e}"))?;
        let c = Coordinator { child, addr: addr.to_owned(), data: data.to_owned() };
        let http = tcc_http::transport::build_client(&Default::default()).map_err(|e| e.to_string())?;
        for _ in 0..500 {
            if http.get(format!("{}/readyz", c.url())).send().await.is_ok_and(|r| r.status().is_success()) {
                return Ok(c);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err("the coordinator did not come up".into())
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL: no shutdown, no flush, no goodbye.
    fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// The coordinator role of this binary (`--coordinator ADDR DATA_DIR`).
async fn serve_coordinator(addr: String, data: PathBuf) -> ExitCode {
    let fast = tcc_core::RetryPolicy {
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(1),
        call_timeout: Duration::from_secs(2),
        ..tcc_core::RetryPolicy::default()
    };
    let core = tcc_core::Config {
        retry: fast,
        poll_interval: Duration::from_millis(50),
        lease: Duration::from_secs(5),
        ..tcc_core::Config::default()
    };
    let launch = tcc_http::server::Launch {
        listen: addr,
        store: tcc_http::server::StoreChoice::Sled(data),
        core,
        server: Default::default(),
        client: Default::default(),
    };
    match tcc_http::server::start(launch).await {
        Ok(running) => {
            let _ = tokio::signal::ctrl_c().await;
            let _ = running.stop().await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Counts what went as expected and what did not.
#[derive(Default)]
struct Narrator {
    failures: Vec<String>,
}

impl Narrator {
    fn step(&self, title: &str) {
        println!("\n{title}");
    }

    fn ok(&self, what: impl AsRef<str>) {
        println!("   ok   {}", what.as_ref());
    }

    fn expect(&mut self, cond: bool, what: impl AsRef<str>) {
        if cond {
            self.ok(what);
        } else {
            println!("   FAIL {}", what.as_ref());
            self.failures.push(what.as_ref().to_owned());
        }
    }
}

fn trip(customer: &str, flight: &str, hotel: &str) -> Trip {
    Trip { customer: customer.into(), flight: flight.into(), hotel: hotel.into() }
}

async fn stock(service: &Service, item: &str) -> String {
    match service.books().await {
        Ok(b) => b
            .stock
            .get(item)
            .map_or("?".into(), |s| format!("{} free, {} held, {} sold", s.free, s.held, s.sold)),
        Err(e) => format!("unreadable: {e}"),
    }
}

/// A service's place for this run: a sled directory in `dir` by default, else a fresh schema or
/// database named `name` in the given one.
async fn place(given: Option<&Db>, dir: &std::path::Path, name: &str) -> Result<Db, String> {
    match given {
        None => Ok(Db::Sled(dir.join(name))),
        Some(db) => db.scratch(name).await.map_err(|e| format!("creating {name}: {e}")),
    }
}

async fn demo(args: DemoArgs) -> Result<Vec<String>, String> {
    let started = Instant::now();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port =
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?;
    let mut coordinator = Coordinator::start(&port.to_string(), &dir.path().join("coordinator")).await?;
    let run = format!("travel_{}", uuid::Uuid::now_v7().simple());
    let (flights_name, hotels_name) = (format!("{run}_flights"), format!("{run}_hotels"));
    let flights_db = place(args.flights_db.as_ref(), dir.path(), &flights_name).await?;
    let hotels_db = place(args.hotels_db.as_ref(), dir.path(), &hotels_name).await?;
    let flights = Service::start(Kind::Flights, &flights_db, "127.0.0.1:0", FLIGHTS, DEMO_GRACE)
        .await
        .map_err(|e| e.to_string())?;
    let mut hotels = Service::start(Kind::Hotels, &hotels_db, "127.0.0.1:0", HOTELS, DEMO_GRACE)
        .await
        .map_err(|e| e.to_string())?;
    let tcc = TccClient::remote(&coordinator.url(), None).map_err(|e| e.to_string())?;
    let agency = Agency::new(tcc.clone(), &flights.url(), &hotels.url());
    println!("tcc travel-booking demo");
    println!("   coordinator {}  (its own process, sled store)", coordinator.url());
    println!("   flights     {}  ({})", flights.url(), flights_db.describe());
    println!("   hotels      {}  ({})", hotels.url(), hotels_db.describe());
    let mut n = Narrator::default();

    n.step("1. A booking that succeeds");
    match agency.book(&trip("ada", "TC42", "Ritz"), WAIT).await.map_err(|e| e.to_string())? {
        Outcome::Booked { seat, room, done } => {
            n.ok(format!(
                "seat held on {} ({} left), room held at {} ({} left)",
                seat.item, seat.left, room.item, room.left
            ));
            n.expect(
                done.state == StateView::Confirmed,
                format!("confirmed at both services: {:?}", done.state),
            );
        }
        Outcome::Refused { reason, .. } => n.expect(false, format!("booked, but was refused: {reason}")),
    }
    n.ok(format!("TC42: {}; Ritz: {}", stock(&flights, "TC42").await, stock(&hotels, "Ritz").await));

    n.step("2. The hotel is sold out: the seat already held is released");
    match agency.book(&trip("bob", "TC42", "Tiny Inn"), WAIT).await.map_err(|e| e.to_string())? {
        Outcome::Refused { reason, gid } => {
            n.ok(format!("refused: {reason}"));
            let done = tcc
                .wait(&gid.parse().map_err(|e: tcc_core::Error| e.to_string())?, WAIT)
                .await
                .map_err(|e| e.to_string())?;
            n.expect(
                done.state == StateView::Cancelled,
                format!("cancelled at both services: {:?}", done.state),
            );
        }
        Outcome::Booked { .. } => n.expect(false, "refused, but it was booked"),
    }
    n.ok(format!("TC42: {} (bob's seat is free again)", stock(&flights, "TC42").await));

    n.step("3. The hotel goes down during confirm: the confirm is retried until it is back");
    let tx = tcc.begin(Duration::from_secs(60)).await.map_err(|e| e.to_string())?;
    let (fc, hc) = (
        travel_booking::api::FlightsClient::new(flights.url()),
        travel_booking::api::HotelsClient::new(hotels.url()),
    );
    let req = |item: &str| travel_booking::api::HoldRequest { item: item.into(), customer: "cleo".into() };
    fc.hold_seat(&tx, req("TC43")).await.map_err(|e| e.to_string())?;
    hc.hold_room(&tx, req("Ritz")).await.map_err(|e| e.to_string())?;
    hotels.go_down().await;
    n.ok("both held; the hotel service is now down");
    tx.confirm().await.map_err(|e| e.to_string())?;
    let retried = wait_for_attempts(&tcc, tx.gid(), 2).await?;
    n.expect(
        retried.state == StateView::Confirming,
        format!(
            "confirm decided; {} rounds failed so far: {}",
            retried.attempts,
            retried.last_error.unwrap_or_default()
        ),
    );
    hotels.come_back().await.map_err(|e| e.to_string())?;
    let done = tcc.wait(tx.gid(), WAIT).await.map_err(|e| e.to_string())?;
    n.expect(
        done.state == StateView::Confirmed,
        format!("the hotel is back and the booking completed: {:?}", done.state),
    );

    n.step("4. The coordinator is killed (SIGKILL) in the middle of phase two, then restarted");
    let tx = tcc.begin(Duration::from_secs(60)).await.map_err(|e| e.to_string())?;
    let req = |item: &str| travel_booking::api::HoldRequest { item: item.into(), customer: "dan".into() };
    fc.hold_seat(&tx, req("TC43")).await.map_err(|e| e.to_string())?;
    hc.hold_room(&tx, req("Ritz")).await.map_err(|e| e.to_string())?;
    hotels.go_down().await;
    tx.confirm().await.map_err(|e| e.to_string())?;
    let inflight = wait_for_attempts(&tcc, tx.gid(), 1).await?;
    n.ok(format!(
        "confirm decided and in phase two ({} round failed); killing the coordinator",
        inflight.attempts
    ));
    coordinator.kill_9();
    hotels.come_back().await.map_err(|e| e.to_string())?;
    let data = coordinator.data.clone();
    drop(coordinator);
    coordinator = Coordinator::start(&port.to_string(), &data).await?;
    n.ok("restarted on the same data");
    let done = tcc.wait(tx.gid(), WAIT).await.map_err(|e| e.to_string())?;
    n.expect(
        done.state == StateView::Confirmed,
        format!("the booking completed after the restart: {:?}", done.state),
    );

    n.step("5. A rush: 200 customers at once for 50 seats and 40 rooms");
    let mut tasks = Vec::new();
    for i in 0..200 {
        let agency = agency.clone();
        tasks.push(tokio::spawn(async move {
            agency.book(&trip(&format!("rush-{i}"), "RUSH-FLIGHT", "RUSH-HOTEL"), WAIT).await
        }));
    }
    let (mut booked, mut refused, mut failed) = (0, 0, 0);
    let mut gids = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(Outcome::Booked { done, .. })) => {
                booked += 1;
                gids.push(done.gid);
            }
            Ok(Ok(Outcome::Refused { gid, .. })) => {
                refused += 1;
                gids.push(gid);
            }
            Ok(Err(e)) => {
                failed += 1;
                eprintln!("   a booking failed: {e}");
            }
            Err(e) => {
                failed += 1;
                eprintln!("   a booking task failed: {e}");
            }
        }
    }
    for gid in &gids {
        if let Ok(gid) = gid.parse() {
            let _ = tcc.wait(&gid, WAIT).await;
        }
    }
    n.ok(format!("{booked} booked, {refused} refused, {failed} failed"));
    n.expect(booked <= 40, format!("no overbooking: {booked} booked for 40 rooms"));
    n.expect(booked == 40, "every room sold: the rush is not lost to contention");
    n.ok(format!(
        "RUSH-FLIGHT: {}; RUSH-HOTEL: {}",
        stock(&flights, "RUSH-FLIGHT").await,
        stock(&hotels, "RUSH-HOTEL").await
    ));

    n.step("6. The coordinator is gone for good after both tries: each service releases its hold itself");
    let tx = tcc.begin(Duration::from_secs(2)).await.map_err(|e| e.to_string())?;
    let req = |item: &str| travel_booking::api::HoldRequest { item: item.into(), customer: "eve".into() };
    fc.hold_seat(&tx, req("TC42")).await.map_err(|e| e.to_string())?;
    hc.hold_room(&tx, req("Ritz")).await.map_err(|e| e.to_string())?;
    n.ok(format!(
        "seat and room held, deadline in 2 s; TC42: {}; Ritz: {}",
        stock(&flights, "TC42").await,
        stock(&hotels, "Ritz").await
    ));
    coordinator.kill_9();
    n.ok("the coordinator is killed (SIGKILL) and does not come back: nobody will confirm or cancel");
    let gid = tx.gid().to_string();
    let waited = Instant::now();
    let released = wait_released(&[&flights, &hotels], &gid).await;
    n.expect(
        released,
        format!(
            "both holds released by the services themselves at deadline + grace ({} s), {:.1} s after the tries",
            DEMO_GRACE.as_secs(),
            waited.elapsed().as_secs_f64()
        ),
    );
    n.ok(format!("TC42: {}; Ritz: {}", stock(&flights, "TC42").await, stock(&hotels, "Ritz").await));

    n.step("Ledger check across both services");
    let (fb, hb) = (flights.books().await?, hotels.books().await?);
    let violations = ledger::check(&fb, &hb, &[FLIGHTS, HOTELS].concat(), true);
    for v in &violations {
        n.expect(false, v);
    }
    let sold_seats: u32 = fb.stock.values().map(|s| s.sold).sum();
    let sold_rooms: u32 = hb.stock.values().map(|s| s.sold).sum();
    n.expect(
        violations.is_empty(),
        format!("{sold_seats} seats and {sold_rooms} rooms sold, every seat with its room, nothing held, stock conserved"),
    );
    println!("\nfinished in {:.1} s", started.elapsed().as_secs_f64());
    drop(coordinator);
    drop((flights, hotels));
    for (given, name) in [(&args.flights_db, &flights_name), (&args.hotels_db, &hotels_name)] {
        if let Some(db) = given {
            if !n.failures.is_empty() {
                println!("   kept {name} for inspection");
            } else if let Err(e) = db.drop_scratch(name).await {
                println!("   could not drop {name}: {e}");
            }
        }
    }
    Ok(n.failures)
}

/// Waits (bounded) until every service in `services` shows the booking `gid` released.
async fn wait_released(services: &[&Service], gid: &str) -> bool {
    for _ in 0..600 {
        let mut all = true;
        for s in services {
            let released =
                s.books().await.is_ok_and(|b| matches!(b.bookings.get(gid), Some(Booking::Released { .. })));
            all &= released;
        }
        if all {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn wait_for_attempts(
    tcc: &TccClient,
    gid: &tcc_core::Gid,
    attempts: u32,
) -> Result<tcc_http::TransactionView, String> {
    for _ in 0..600 {
        let tx = tcc.get(gid).await.map_err(|e| e.to_string())?;
        if tx.attempts >= attempts || tx.state != StateView::Confirming {
            return Ok(tx);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("phase two of {gid} made no attempt"))
}

fn main() -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, addr, data] = args.as_slice()
        && flag == "--coordinator"
    {
        return rt.block_on(serve_coordinator(addr.clone(), data.into()));
    }
    let args = DemoArgs::parse();
    match rt.block_on(demo(args)) {
        Ok(failures) if failures.is_empty() => {
            println!("all as expected");
            ExitCode::SUCCESS
        }
        Ok(failures) => {
            println!("\n{} expectation(s) failed:", failures.len());
            for f in failures {
                println!("   {f}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}
