//! The travel-booking demo: `cargo run --release -p travel-booking`.
//!
//! Starts a coordinator (a separate process: this binary in its coordinator role, the same server
//! as `tcc-coordinator`) and the flight and hotel services on free loopback ports, then narrates
//! eight scenarios that show what TCC, sagas, two-phase messages and tcc are for (bookings as TCC
//! transactions, loyalty awards as a saga, the confirmation e-mail as a message), and ends with a
//! ledger check across both services. Exits non-zero if any expectation or invariant fails.
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
use travel_booking::agency::{Agency, Confirmation, Outcome, TicketAnswer, Trip};
use travel_booking::inventory::Booking;
use travel_booking::ledger;
use travel_booking::ledger::Books;
use travel_booking::loyalty::Award;
use travel_booking::service::{Db, Kind, Service};

const FLIGHTS: &[(&str, u32)] = &[("TC42", 10), ("TC43", 10), ("RUSH-FLIGHT", 50)];
const HOTELS: &[(&str, u32)] = &[("Ritz", 10), ("Tiny Inn", 0), ("RUSH-HOTEL", 40)];
const WAIT: Duration = Duration::from_secs(30);
/// The services' grace period in the demo, short so that scenario 6 (a hold nobody decides) ends
/// in seconds; a real service waits longer ([`travel_booking::service::GRACE`]).
const DEMO_GRACE: Duration = Duration::from_secs(2);

/// The demo's command line.
#[derive(Debug, Parser)]
#[command(
    about = "The tcc travel-booking demo: bookings, loyalty sagas and confirmation messages across a flight and a hotel service"
)]
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
    let mut ada_trip = String::new();
    match agency.book(&trip("ada", "TC42", "Ritz"), WAIT).await.map_err(|e| e.to_string())? {
        Outcome::Booked { seat, room, done } => {
            ada_trip = done.gid.clone();
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
    let mut bob_trip = String::new();
    match agency.book(&trip("bob", "TC42", "Tiny Inn"), WAIT).await.map_err(|e| e.to_string())? {
        Outcome::Refused { reason, gid } => {
            n.ok(format!("refused: {reason}"));
            bob_trip = gid.clone();
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
    let cleo_trip = tx.gid().to_string();
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
    let dan_trip = tx.gid().to_string();
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

    n.step("6. Loyalty as a saga: miles at the flight service and points at the hotel, both or neither");
    let ada = agency
        .award_loyalty("ada", 1_200, 300, Duration::from_secs(30), WAIT)
        .await
        .map_err(|e| e.to_string())?;
    let (fb, hb) = (flights.books().await?, hotels.books().await?);
    n.expect(
        ada.state == StateView::Confirmed,
        format!("ada: {:?}; miles {}, points {}", ada.state, award(&fb, &ada.gid), award(&hb, &ada.gid)),
    );
    n.expect(
        fb.awards.get(&ada.gid).is_some_and(Award::stands)
            && hb.awards.get(&ada.gid).is_some_and(Award::stands),
        "both of ada's awards stand",
    );
    let mallory = agency
        .award_loyalty("mallory", 800, 200, Duration::from_secs(30), WAIT)
        .await
        .map_err(|e| e.to_string())?;
    let (fb, hb) = (flights.books().await?, hotels.books().await?);
    n.expect(
        mallory.state == StateView::Cancelled,
        format!(
            "mallory (her points account at the hotel is blocked): {:?}; miles {}, points {}",
            mallory.state,
            award(&fb, &mallory.gid),
            award(&hb, &mallory.gid)
        ),
    );
    n.expect(
        matches!(fb.awards.get(&mallory.gid), Some(Award::TakenBack { .. }))
            && !hb.awards.contains_key(&mallory.gid),
        "the hotel refused the points, so the miles already awarded were taken back (compensated once)",
    );

    n.step("7. The confirmation e-mail as a two-phase message: sent if, and only if, the ticket was issued");
    let sent = agency
        .send_confirmation(&ada_trip, "ada", Duration::from_secs(30), WAIT)
        .await
        .map_err(|e| e.to_string())?;
    let sent = settled(sent);
    let (fb, hb) = (flights.books().await?, hotels.books().await?);
    n.expect(
        sent.as_ref().is_some_and(|m| m.state == StateView::Confirmed && mailed(&[&fb, &hb], &m.gid) == [1, 1]),
        "ada's trip: the ticket issued in the flight service's local transaction, the message submitted, one e-mail in each service's outbox",
    );
    let bob = agency
        .send_confirmation(&bob_trip, "bob", Duration::from_secs(30), WAIT)
        .await
        .map_err(|e| e.to_string())?;
    let reason = match &bob {
        Confirmation::NotSent { reason, .. } => reason.clone(),
        other => format!("{other:?}"),
    };
    let bob = settled(bob);
    let (fb, hb) = (flights.books().await?, hotels.books().await?);
    n.expect(
        bob.as_ref()
            .is_some_and(|m| m.state == StateView::Cancelled && mailed(&[&fb, &hb], &m.gid) == [0, 0]),
        format!(
            "bob's refused trip: the local transaction failed ({reason}), the message was aborted, no e-mail"
        ),
    );
    // The agency prepares, the ticket is issued, and the agency stops before it submits: the
    // coordinator asks the flight service's back-check at the message's deadline.
    let short = Duration::from_secs(1);
    let cleo = agency.prepare_confirmation(&cleo_trip, "cleo", short).await.map_err(|e| e.to_string())?;
    let issued = agency.issue_ticket(cleo.gid(), &cleo_trip, "cleo").await;
    n.expect(
        matches!(issued, TicketAnswer::Issued(_)),
        format!("cleo's ticket issued: {issued:?}; then the agency stops before submitting"),
    );
    let done = tcc.wait(cleo.gid(), WAIT).await.map_err(|e| e.to_string())?;
    let (fb, hb) = (flights.books().await?, hotels.books().await?);
    n.expect(
        done.state == StateView::Confirmed && mailed(&[&fb, &hb], &done.gid) == [1, 1],
        format!("left prepared, it was submitted by the coordinator after the back-check said committed: {:?}, e-mails {:?}", done.state, mailed(&[&fb, &hb], &done.gid)),
    );
    // Another message, for dan's trip: the agency prepares it and stops before even asking for
    // the ticket.
    let dan = agency.prepare_confirmation(&dan_trip, "dan", short).await.map_err(|e| e.to_string())?;
    let done = tcc.wait(dan.gid(), WAIT).await.map_err(|e| e.to_string())?;
    let late = agency.issue_ticket(dan.gid(), &dan_trip, "dan").await;
    let (fb, hb) = (flights.books().await?, hotels.books().await?);
    n.expect(
        done.state == StateView::Cancelled && mailed(&[&fb, &hb], &done.gid) == [0, 0] && !fb.tickets.contains_key(&done.gid),
        format!("left prepared with no ticket: the back-check said rolled back, the message was aborted, no e-mail: {:?}", done.state),
    );
    n.expect(
        matches!(late, TicketAnswer::Refused(_)),
        format!("and a late ticket under that message is refused: {late:?}"),
    );

    n.step("8. The coordinator is gone for good after both tries: each service releases its hold itself");
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
    let standing = fb.awards.values().filter(|a| a.stands()).count();
    let taken_back = fb.awards.values().filter(|a| !a.stands()).count();
    n.expect(
        ledger::check_loyalty(&fb, &hb).is_empty()
            && ledger::check_confirmations(&[("flights", &fb), ("hotels", &hb)]).is_empty(),
        format!(
            "loyalty sagas: {standing} with miles and points both standing, {taken_back} with the miles taken back and no points; \
             {} tickets issued, each with one e-mail at each service, no other e-mail",
            fb.tickets.len()
        ),
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

/// How the award of saga `gid` stands in `books`.
fn award(books: &Books, gid: &str) -> &'static str {
    match books.awards.get(gid) {
        None => "none",
        Some(Award::Awarded { .. }) => "awarded",
        Some(Award::TakenBack { .. }) => "taken back",
    }
}

/// Copies of message `gid`'s e-mail in each service's outbox.
fn mailed(books: &[&Books; 2], gid: &str) -> [u32; 2] {
    books.map(|b| b.outbox.get(gid).map_or(0, |m| m.copies))
}

/// The message of a confirmation once it ended, or `None` when it was left to its back-check.
fn settled(sent: Confirmation) -> Option<tcc_http::TransactionView> {
    match sent {
        Confirmation::Sent(tx) | Confirmation::NotSent { message: tx, .. } => Some(tx),
        Confirmation::Pending { gid, reason } => {
            println!(
                "   the ticket's outcome is unknown ({reason}); message {gid} is left to its back-check"
            );
            None
        }
    }
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
