//! `tcc-chaos`: the travel-booking system run as real processes while they are killed and their
//! calls fail, then checked from the stores themselves.
//!
//! ```text
//! cargo run --release --bin tcc-chaos -- --transactions 1000 --coordinator-kills 20 --participant-kills 10
//! ```
//!
//! It starts a `tcc-coordinator` (the binary next to this one, or this binary serving one) and the
//! flight and hotel services as separate processes on loopback, each service keeping its stock in
//! its own sled database, or with `--flights-db postgres://… --hotels-db mysql://…` in PostgreSQL
//! and MySQL (any mix; a scratch schema or database per run, dropped at the end unless a violation
//! was found). Every call to a service, the initiators' tries and the coordinator's
//! confirms and cancels alike, goes through a fault-injecting proxy (`tcc_tests::fault_proxy`:
//! 503s, dropped connections before and after the service acted, requests held past the caller's
//! timeout, slow answers, requests delivered after their caller gave up). Several initiators run
//! the transactions, half registering both branches with the begin, half as their typed clients
//! try: most book a seat and a room and confirm; some ask for an item that is sold out or not sold
//! there (refused at try, so cancelled), some cancel after holding, some walk away without deciding
//! (the coordinator cancels them at their deadline), and a few are orphans: tries sent straight to
//! both services under a gid the coordinator never saw, with a short deadline, never decided (a
//! coordinator gone for good), which each service must release by itself at deadline + grace.
//! After a booking whose confirm was acknowledged, an initiator often goes on, as the agency does
//! (`travel_booking::agency`): a loyalty saga (miles at the flight service, points at the hotel;
//! for a customer whose account the hotel blocked, the points step refuses and the miles are
//! compensated), or a confirmation message (prepared with the flight service's back-check, the
//! ticket issued in a local transaction at the flight service, then submitted, aborted when the
//! ticket is refused, or left prepared for the back-check when its outcome is unknown or the
//! initiator walks away; some ask a ticket for a trip that does not exist). Saga steps, message
//! actions, the tickets and the back-checks go through the fault proxies too.
//! Meanwhile the coordinator and the services are SIGKILLed and restarted at random moments.
//!
//! Then faults stop, flagged transactions get an operator retry, and once the coordinator has
//! nothing unfinished, every process is SIGKILLed once more and the stores are opened and checked
//! (`tcc_tests::chaos_check`): every transaction final, all branches confirmed or all cancelled,
//! nothing left held, stock conserved, every acknowledged decision carried out, every orphan released
//! by the services themselves and no hold a service released itself confirmed anywhere; every saga
//! all done or all compensated at the services (never an action after its compensation), every
//! submitted message's actions done once with its local transaction committed, no aborted
//! message's action run or ticket issued. The last line is
//! `chaos: N transactions, K coordinator kills, P participant kills, V violations`; the exit status
//! is non-zero when V > 0 (the stores are then kept and their directory printed).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tcc_core::barrier::BarrierState;
use tcc_core::store::ListQuery;
use tcc_core::{BranchId, TxKind};
use tcc_core::{Gid, Store, TxState};
use tcc_http::client::{BeginOptions, ClientError, PlannedBranch, TccClient};
use tcc_http::protocol::{BRANCH_HEADER, DEADLINE_HEADER, GID_HEADER};
use tcc_http::server::native::{DecisionView, ListView, StateView};
use tcc_tests::chaos_check::counts;
use tcc_tests::chaos_check::{Seen, Side, check, self_released};
use tcc_tests::fault_proxy::{Fault, FaultProxy};
use tcc_tests::free_port;
use travel_booking::agency::{Agency, TicketAnswer};
use travel_booking::api::{FlightsClient, HoldRequest, HotelsClient};
use travel_booking::service::{Db, Kind};

/// Kill and restart the travel-booking system's processes while it books, then check nothing was lost.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Transactions to begin.
    #[arg(long, default_value_t = 1000)]
    transactions: usize,
    /// Times the coordinator is SIGKILLed and restarted during the run.
    #[arg(long, default_value_t = 20)]
    coordinator_kills: usize,
    /// Times a service (flights or hotels, at random) is SIGKILLed and restarted during the run.
    #[arg(long, default_value_t = 10)]
    participant_kills: usize,
    /// Concurrent initiators.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Share (0 to 1) of calls to the services that get an injected fault.
    #[arg(long, default_value_t = 0.1)]
    fault_rate: f64,
    /// Seed of every random choice (default: from the clock; printed, to repeat a run's choices).
    #[arg(long)]
    seed: Option<u64>,
    /// Timeout of each transaction, in milliseconds.
    #[arg(long, default_value_t = 6_000)]
    timeout_ms: u64,
    /// Keep the processes' stores and logs in this directory (default: a temporary directory, kept
    /// only when a violation is found).
    #[arg(long)]
    keep: Option<PathBuf>,
    /// The tcc-coordinator binary (default: next to this one; if it is not there, this binary
    /// serves the coordinator in its child process).
    #[arg(long, env = "TCC_COORDINATOR_BIN")]
    coordinator_bin: Option<PathBuf>,
    /// The flight service's database: `sled:DIR` (default: a directory of the run), `postgres://…`
    /// or `mysql://…` (a scratch schema or database of its own is made there for the run).
    #[arg(long, value_name = "URL")]
    flights_db: Option<String>,
    /// The hotel service's database, as `--flights-db`.
    #[arg(long, value_name = "URL")]
    hotels_db: Option<String>,
    /// The services' grace period after a deadline before they release a hold themselves, in
    /// milliseconds. It must cover phase two's delivery after a deadline (retries, restarts), or a
    /// confirm decided in time may find its hold released.
    #[arg(long, default_value_t = 10_000)]
    grace_ms: u64,
    /// Internal: serve a coordinator on ADDR with its sled store in DIR.
    #[arg(long, hide = true, num_args = 2, value_names = ["ADDR", "DIR"])]
    serve_coordinator: Option<Vec<String>>,
    /// Internal: serve the flights or hotels service on ADDR with its store at NAME in the database
    /// DB (`sled:DIR` or a URL), stocking UNITS of each of its items, with GRACE_MS of grace.
    #[arg(long, hide = true, num_args = 6, value_names = ["KIND", "ADDR", "DB", "NAME", "UNITS", "GRACE_MS"])]
    serve_participant: Option<Vec<String>>,
}

/// The coordinator's settings for the run: phase two retries quickly (the run is short), a call
/// gives up after a second, so a held request ([`Fault::Hang`]) costs a round, not the run.
const RETRY_INITIAL: Duration = Duration::from_millis(100);
const RETRY_MAX_BACKOFF: Duration = Duration::from_secs(1);
const RETRY_MAX_ATTEMPTS: u32 = 40;
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a [`Fault::Hang`] holds a request: past the coordinator's call timeout.
const HANG: Duration = Duration::from_millis(1_500);
/// How long a process may take to come back after a restart before the run is abandoned.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long after the last transaction the coordinator may take to finish everything.
const QUIESCE_LIMIT: Duration = Duration::from_secs(180);

const KINDS: [Kind; 2] = [Kind::Flights, Kind::Hotels];
/// Every this many loyalty sagas (confirmation messages), one turns back for sure, besides those
/// drawn: even a short run sees both outcomes of each kind.
const TURN_BACK_EVERY: u64 = 8;

/// Every this many slots, one is an orphan for sure (besides the 3% drawn).
const ORPHAN_EVERY: usize = 50;

/// An orphan's deadline, from its tries.
const ORPHAN_DEADLINE: Duration = Duration::from_secs(2);

/// Items per service: one with plenty of stock, one that sells out during the run, one not sold.
fn items(kind: Kind) -> [&'static str; 3] {
    match kind {
        Kind::Flights => ["TC100", "TC7", "TC404"],
        Kind::Hotels => ["Grand", "Tiny Inn", "Nowhere"],
    }
}

/// Units of `[plenty, scarce]` stocked for a run of `n` transactions.
fn stock_for(n: usize) -> [u32; 2] {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    [n, (n / 10).max(3)]
}

/// One child process of the run, restartable on the same address and directory.
#[derive(Debug)]
struct Proc {
    name: &'static str,
    command: Vec<String>,
    program: PathBuf,
    env: Vec<(String, String)>,
    addr: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: log: {e}", self.name))?;
        let mut cmd = Command::new(&self.program);
        // A child of this binary exits when its standard input closes: when this process ends,
        // however it ends, its children do not outlive it.
        cmd.args(&self.command).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(log);
        // Nothing from the environment may change a coordinator's settings behind the run's back
        // (an allow-list that refuses every participant would make a run that tests nothing).
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TCC_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().map_err(|e| format!("starting {}: {e}", self.name))?);
        Ok(())
    }

    /// SIGKILL, and reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and waits for a clean exit (at most [`START_LIMIT`]); `false` if it had to be killed.
    async fn terminate(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else { return true };
        let pid = child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().is_ok_and(|s| s.success());
        let until = Instant::now() + START_LIMIT;
        while sent && Instant::now() < until {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.success();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
        false
    }

    /// Waits until it accepts connections again (or dies trying).
    async fn wait_up(&mut self) -> Result<(), String> {
        let until = Instant::now() + START_LIMIT;
        while Instant::now() < until {
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!("{} exited with {status}; see {}", self.name, self.log.display()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!("{} did not come up within {} s", self.name, START_LIMIT.as_secs()))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What one transaction sets out to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Intent {
    /// Hold both, confirm.
    Book,
    /// Hold both, then cancel.
    ChangeMind,
    /// Hold what it can and walk away without deciding.
    WalkAway,
    /// Try both services directly under a gid the coordinator never saw ([`Seen::Orphan`]).
    Orphan,
}

/// Counters of what the initiators did and were told.
#[derive(Debug, Default)]
struct Tally {
    slots: AtomicUsize,
    begun: AtomicUsize,
    /// Loyalty sagas and confirmation messages started, to make every [`TURN_BACK_EVERY`]th one
    /// turn back (a saga for the blocked account, a message asking a ticket for no trip).
    sagas_started: AtomicU64,
    messages_started: AtomicU64,
    begin_retries: AtomicU64,
    refused: AtomicU64,
    try_failed: AtomicU64,
    confirm_acked: AtomicU64,
    cancel_acked: AtomicU64,
    decision_failed: AtomicU64,
    walked_away: AtomicU64,
    orphans: AtomicU64,
    orphan_holds: AtomicU64,
    sagas: AtomicU64,
    sagas_refusing: AtomicU64,
    sagas_racing: AtomicU64,
    messages_racing: AtomicU64,
    saga_submit_failed: AtomicU64,
    messages: AtomicU64,
    prepare_failed: AtomicU64,
    tickets_issued: AtomicU64,
    tickets_refused: AtomicU64,
    tickets_unknown: AtomicU64,
    message_submit_acked: AtomicU64,
    message_abort_acked: AtomicU64,
    message_decision_failed: AtomicU64,
    messages_left: AtomicU64,
}

impl Tally {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Run {
    args: Args,
    seed: u64,
    dir: PathBuf,
    coordinator: tokio::sync::Mutex<Proc>,
    services: [tokio::sync::Mutex<Proc>; 2],
    proxies: [FaultProxy; 2],
    coordinator_url: String,
    tally: Tally,
    seen: Mutex<HashMap<Gid, Seen>>,
    coordinator_kills: AtomicUsize,
    participant_kills: AtomicUsize,
    restart_ms: Mutex<Vec<u128>>,
    /// Where each service's store is: the database and the name of its place there.
    stores: [(Db, String); 2],
    /// The latest deadline of an orphan's tries (ms since the epoch).
    last_orphan_deadline: AtomicU64,
}

impl Run {
    fn service_url(&self, kind: Kind) -> String {
        format!("http://{}{}", self.proxies[kind_index(kind)].addr(), kind.prefix())
    }

    fn record(&self, gid: &Gid, seen: Seen) {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).insert(gid.clone(), seen);
    }
}

fn kind_index(kind: Kind) -> usize {
    usize::from(kind == Kind::Hotels)
}

fn coordinator_proc(args: &Args, dir: &Path, addr: SocketAddr) -> Result<Proc, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = tcc_tests::coordinator_binary(args.coordinator_bin.as_deref());
    let data = dir.join("coordinator").display().to_string();
    let (program, command) = match bin {
        Some(bin) => (
            bin,
            [
                "--listen",
                &addr.to_string(),
                "--data-dir",
                &data,
                "--retry-initial",
                &format!("{}ms", RETRY_INITIAL.as_millis()),
                "--retry-max-backoff",
                &format!("{}ms", RETRY_MAX_BACKOFF.as_millis()),
                "--retry-max-attempts",
                &RETRY_MAX_ATTEMPTS.to_string(),
                "--call-timeout",
                &format!("{}ms", CALL_TIMEOUT.as_millis()),
                "--connect-timeout",
                &format!("{}ms", CONNECT_TIMEOUT.as_millis()),
            ]
            .map(str::to_owned)
            .to_vec(),
        ),
        None => (me, vec!["--serve-coordinator".into(), addr.to_string(), data]),
    };
    let env = vec![("RUST_LOG".into(), "warn".into())];
    Ok(Proc {
        name: "coordinator",
        command,
        program,
        env,
        addr,
        log: dir.join("coordinator.log"),
        child: None,
    })
}

fn service_proc(
    dir: &Path,
    kind: Kind,
    addr: SocketAddr,
    (db, name): (&str, &str),
    units: [u32; 2],
    grace_ms: u64,
) -> Result<Proc, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let command = vec![
        "--serve-participant".into(),
        kind.name().into(),
        addr.to_string(),
        db.into(),
        name.into(),
        format!("{},{}", units[0], units[1]),
        grace_ms.to_string(),
    ];
    Ok(Proc {
        name: kind.name(),
        command,
        program: me,
        env: Vec::new(),
        addr,
        log: dir.join(format!("{}.log", kind.name())),
        child: None,
    })
}

/// Kills `proc`, leaves it down for up to half a second, restarts it and waits until it serves.
async fn kill_and_restart(run: &Run, proc: &tokio::sync::Mutex<Proc>, down: Duration) -> Result<(), String> {
    let mut proc = proc.lock().await;
    proc.kill();
    tokio::time::sleep(down).await;
    let started = Instant::now();
    proc.spawn()?;
    proc.wait_up().await?;
    run.restart_ms.lock().unwrap_or_else(PoisonError::into_inner).push(started.elapsed().as_millis());
    Ok(())
}

/// The killer: at random points of the run (by transactions begun), kills and restarts the
/// coordinator or a service. Every planned kill happens, the late ones after the last transaction.
async fn monkey(run: Arc<Run>, done: Arc<AtomicBool>, mut rng: StdRng) -> Result<(), String> {
    let n = run.args.transactions;
    let mut plan: Vec<(usize, Option<Kind>)> = Vec::new();
    let point = |rng: &mut StdRng| rng.random_range(n / 20..=(n * 19 / 20).max(n / 20));
    for _ in 0..run.args.coordinator_kills {
        plan.push((point(&mut rng), None));
    }
    for _ in 0..run.args.participant_kills {
        plan.push((point(&mut rng), Some(KINDS[rng.random_range(0..2)])));
    }
    plan.sort_by_key(|(at, _)| *at);
    for (at, target) in plan {
        while run.tally.slots.load(Ordering::Relaxed) < at && !done.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let down = Duration::from_millis(rng.random_range(0..500));
        match target {
            None => {
                kill_and_restart(&run, &run.coordinator, down).await?;
                run.coordinator_kills.fetch_add(1, Ordering::Relaxed);
            }
            Some(kind) => {
                kill_and_restart(&run, &run.services[kind_index(kind)], down).await?;
                run.participant_kills.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

/// One initiator: begins transactions until `n` are begun, each with an intent drawn at random.
async fn initiator(run: Arc<Run>, mut rng: StdRng) -> Result<(), String> {
    let tcc = TccClient::remote(&run.coordinator_url, None).map_err(|e| e.to_string())?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(HANG + Duration::from_secs(1))
        .build()
        .map_err(|e| e.to_string())?;
    let flights = FlightsClient::new(run.service_url(Kind::Flights));
    let hotels = HotelsClient::new(run.service_url(Kind::Hotels));
    let agency = Agency::new(tcc.clone(), &run.service_url(Kind::Flights), &run.service_url(Kind::Hotels));
    let timeout = Duration::from_millis(run.args.timeout_ms);
    // Each pass takes a slot first, so exactly `transactions` are begun whatever the races.
    loop {
        let slot = run.tally.slots.fetch_add(1, Ordering::Relaxed);
        if slot >= run.args.transactions {
            break;
        }
        let intent = match rng.random_range(0..100) {
            // Every fiftieth slot is an orphan whatever the draw, so that even a short run makes
            // some (the 3% drawn could be none: a run of 200 once was).
            _ if slot % ORPHAN_EVERY == ORPHAN_EVERY / 2 => Intent::Orphan,
            0..78 => Intent::Book,
            78..90 => Intent::ChangeMind,
            90..97 => Intent::WalkAway,
            _ => Intent::Orphan,
        };
        // Mostly the item with plenty of stock, sometimes the scarce one, rarely one not sold.
        let pick = |rng: &mut StdRng, kind: Kind| {
            let [plenty, scarce, unknown] = items(kind);
            match rng.random_range(0..100) {
                0..70 => plenty,
                70..96 => scarce,
                _ => unknown,
            }
            .to_owned()
        };
        let (flight, hotel) = (pick(&mut rng, Kind::Flights), pick(&mut rng, Kind::Hotels));
        let customer = format!("c{}", rng.random_range(0..1_000_000));

        // Half the transactions register both branches with the begin and then send the tries
        // (`try_planned`); the others register each branch as its typed client tries it.
        let planned = rng.random_bool(0.5);
        let seat_req = HoldRequest { item: flight, customer: customer.clone() };
        let room_req = HoldRequest { item: hotel, customer: customer.clone() };
        if intent == Intent::Orphan {
            orphan(&run, &http, [&seat_req, &room_req]).await?;
            continue;
        }
        let options = if planned {
            let branch =
                |name: &str, kind: Kind, op: &str, req: &HoldRequest| -> Result<PlannedBranch, String> {
                    Ok(PlannedBranch {
                        branch: name.into(),
                        target: format!("{}/{op}", run.service_url(kind)),
                        request: serde_json::to_vec(req).map_err(|e| e.to_string())?,
                    })
                };
            BeginOptions {
                branches: vec![
                    branch(branch_of(Kind::Flights), Kind::Flights, "hold_seat", &seat_req)?,
                    branch(branch_of(Kind::Hotels), Kind::Hotels, "hold_room", &room_req)?,
                ],
                ..BeginOptions::default()
            }
        } else {
            BeginOptions::default()
        };
        let mut waited = Duration::ZERO;
        let tx = loop {
            match tcc.begin_with(timeout, options.clone()).await {
                Ok(tx) => break tx,
                // The coordinator is down (or restarting): try again shortly, for a bounded time.
                Err(e) if waited < START_LIMIT => {
                    Tally::add(&run.tally.begin_retries);
                    let pause = Duration::from_millis(50);
                    tokio::time::sleep(pause).await;
                    waited += pause;
                    if waited >= START_LIMIT {
                        return Err(format!("begin failed for {} s: {e}", START_LIMIT.as_secs()));
                    }
                }
                Err(e) => return Err(format!("begin failed: {e}")),
            }
        };
        run.tally.begun.fetch_add(1, Ordering::Relaxed);
        run.record(tx.gid(), Seen::Begun);

        // Ok: both held; Err(true): a service refused; Err(false): a try failed otherwise.
        let tries: Result<(), bool> = if planned {
            let try_one = async |branch: &str| match tx.try_planned(branch).await {
                Ok(_) => Ok(()),
                Err(e) => Err(matches!(e, ClientError::Refused { .. })),
            };
            match try_one(branch_of(Kind::Flights)).await {
                Ok(()) => try_one(branch_of(Kind::Hotels)).await,
                Err(refused) => Err(refused),
            }
        } else {
            match flights.hold_seat(&tx, seat_req).await {
                Ok(_) => hotels.hold_room(&tx, room_req).await.map(drop).map_err(|e| e.refusal().is_some()),
                Err(e) => Err(e.refusal().is_some()),
            }
        };
        match tries {
            Ok(()) => {}
            Err(true) => Tally::add(&run.tally.refused),
            Err(false) => Tally::add(&run.tally.try_failed),
        }
        let held = tries.is_ok();
        if intent == Intent::WalkAway {
            Tally::add(&run.tally.walked_away);
            continue;
        }
        if held && intent == Intent::Book {
            match tx.confirm().await {
                Ok(view) if view.decision == Some(DecisionView::Confirm) => {
                    run.record(tx.gid(), Seen::ConfirmAcked);
                    Tally::add(&run.tally.confirm_acked);
                    // After the booking, as the agency does: a loyalty saga, a confirmation message.
                    match rng.random_range(0..100) {
                        0..35 => loyalty(&run, &agency, &customer, &mut rng).await,
                        35..70 => confirmation(&run, &agency, tx.gid().as_str(), &customer, &mut rng).await,
                        _ => {}
                    }
                }
                Ok(_) | Err(_) => Tally::add(&run.tally.decision_failed),
            }
        } else {
            match tx.cancel().await {
                Ok(view) if view.decision == Some(DecisionView::Cancel) => {
                    run.record(tx.gid(), Seen::CancelAcked);
                    Tally::add(&run.tally.cancel_acked);
                }
                Ok(_) | Err(_) => Tally::add(&run.tally.decision_failed),
            }
        }
    }
    Ok(())
}

/// The customer whose loyalty account the hotel blocked (see `Kind::blocked`).
const BLOCKED_CUSTOMER: &str = "mallory";

/// The timeout of a saga or message: the run's, or for a fifth of them a few hundred milliseconds
/// at most, so that the deadline races the steps (a saga turned back while an action is in
/// flight, its compensation possibly overtaking it) or the local transaction (the back-check asked
/// while the ticket is being issued).
fn deadline_race(run: &Run, rng: &mut StdRng, racing: &AtomicU64) -> Duration {
    if rng.random_bool(0.2) {
        Tally::add(racing);
        Duration::from_millis(rng.random_range(1..300))
    } else {
        Duration::from_millis(run.args.timeout_ms)
    }
}

/// Submits a loyalty saga for `customer` (miles at the flight service, points at the hotel), or
/// for a quarter of them for the customer whose account the hotel blocked, without waiting for it:
/// the checker finds how it ended.
async fn loyalty(run: &Run, agency: &Agency, customer: &str, rng: &mut StdRng) {
    let timeout = deadline_race(run, rng, &run.tally.sagas_racing);
    let nth = run.tally.sagas_started.fetch_add(1, Ordering::Relaxed);
    let blocked = rng.random_bool(0.25) || nth % TURN_BACK_EVERY == TURN_BACK_EVERY / 2;
    let customer = if blocked { BLOCKED_CUSTOMER } else { customer };
    let gid = Gid::generate();
    let (miles, points) = (rng.random_range(100..2_000), rng.random_range(10..500));
    let saga = match agency.loyalty_saga(customer, miles, points, timeout) {
        Ok(saga) => saga.gid(&gid),
        Err(_) => return Tally::add(&run.tally.saga_submit_failed),
    };
    match saga.submit().await {
        Ok(_) => {
            let refusing = customer == BLOCKED_CUSTOMER;
            run.record(&gid, if refusing { Seen::Refusing } else { Seen::Begun });
            Tally::add(&run.tally.sagas);
            if refusing {
                Tally::add(&run.tally.sagas_refusing);
            }
        }
        // Maybe stored, maybe not: the checker judges whatever the coordinator has.
        Err(_) => Tally::add(&run.tally.saga_submit_failed),
    }
}

/// Sends the confirmation message of trip `booking`: prepares it, asks the flight service for the
/// ticket (its local transaction), then submits or aborts by the answer; sometimes asks a ticket
/// for a trip that does not exist (refused), sometimes walks away before or after the ticket,
/// leaving the message to the coordinator's back-check.
async fn confirmation(run: &Run, agency: &Agency, booking: &str, customer: &str, rng: &mut StdRng) {
    let timeout = deadline_race(run, rng, &run.tally.messages_racing);
    let msg = match agency.prepare_confirmation(booking, customer, timeout).await {
        Ok(msg) => msg,
        Err(_) => return Tally::add(&run.tally.prepare_failed),
    };
    run.record(msg.gid(), Seen::Begun);
    Tally::add(&run.tally.messages);
    let nth = run.tally.messages_started.fetch_add(1, Ordering::Relaxed);
    let draw = match rng.random_range(0..100) {
        // A ticket for a trip that does not exist: refused, so the message is aborted.
        _ if nth % TURN_BACK_EVERY == TURN_BACK_EVERY / 2 => 12,
        draw => draw,
    };
    if draw < 12 {
        // Walks away before the local transaction: the back-check will say rolled back.
        return Tally::add(&run.tally.messages_left);
    }
    let trip = if draw < 24 { Gid::generate().to_string() } else { booking.to_owned() };
    let answer = agency.issue_ticket(msg.gid(), &trip, customer).await;
    match &answer {
        TicketAnswer::Issued(_) => Tally::add(&run.tally.tickets_issued),
        TicketAnswer::Refused(_) => Tally::add(&run.tally.tickets_refused),
        TicketAnswer::Unknown(_) => Tally::add(&run.tally.tickets_unknown),
    }
    if (24..36).contains(&draw) {
        // Walks away after the local transaction: the back-check will say committed.
        return Tally::add(&run.tally.messages_left);
    }
    match answer {
        TicketAnswer::Issued(_) => match msg.submit().await {
            Ok(_) => {
                run.record(msg.gid(), Seen::ConfirmAcked);
                Tally::add(&run.tally.message_submit_acked);
            }
            Err(_) => Tally::add(&run.tally.message_decision_failed),
        },
        TicketAnswer::Refused(_) => match msg.abort().await {
            Ok(_) => {
                run.record(msg.gid(), Seen::CancelAcked);
                Tally::add(&run.tally.message_abort_acked);
            }
            Err(_) => Tally::add(&run.tally.message_decision_failed),
        },
        TicketAnswer::Unknown(_) => Tally::add(&run.tally.messages_left),
    }
}

/// Sends both tries of an orphan straight to the services (through their fault proxies), under a
/// fresh gid the coordinator never saw, with a deadline [`ORPHAN_DEADLINE`] away; nobody ever
/// decides it.
async fn orphan(run: &Run, http: &reqwest::Client, reqs: [&HoldRequest; 2]) -> Result<(), String> {
    let gid = Gid::generate();
    run.record(&gid, Seen::Orphan);
    Tally::add(&run.tally.orphans);
    let deadline = tcc_core::Clock::now(&tcc_core::SystemClock).0 + ORPHAN_DEADLINE.as_millis() as u64;
    run.last_orphan_deadline.fetch_max(deadline, Ordering::Relaxed);
    for (kind, req) in KINDS.into_iter().zip(reqs) {
        let op = match kind {
            Kind::Flights => "hold_seat",
            Kind::Hotels => "hold_room",
        };
        let body = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        let answer = http
            .post(format!("{}/{op}/try", run.service_url(kind)))
            .header(GID_HEADER, gid.as_str())
            .header(BRANCH_HEADER, branch_of(kind))
            .header(DEADLINE_HEADER, deadline.to_string())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        if answer.is_ok_and(|a| a.status().is_success()) {
            Tally::add(&run.tally.orphan_holds);
        }
    }
    Ok(())
}

/// Waits until every orphan's deadline + grace has passed, and a few expiry sweeps more.
async fn wait_orphans_released(run: &Run) {
    let last = run.last_orphan_deadline.load(Ordering::Relaxed);
    if last == 0 {
        return;
    }
    let release = last + run.args.grace_ms + 3_000;
    let now = tcc_core::Clock::now(&tcc_core::SystemClock).0;
    tokio::time::sleep(Duration::from_millis(release.saturating_sub(now))).await;
}

/// Waits until the coordinator has nothing unfinished, giving each flagged transaction an operator
/// retry. Returns the operator retries made, or what is still unfinished at the limit.
async fn quiesce(run: &Run) -> Result<usize, String> {
    let http = reqwest::Client::builder().no_proxy().build().map_err(|e| e.to_string())?;
    let until = Instant::now() + QUIESCE_LIMIT + Duration::from_millis(run.args.timeout_ms);
    let mut retried = 0;
    loop {
        let mut unfinished = Vec::new();
        for state in [StateView::Trying, StateView::Confirming, StateView::Cancelling, StateView::Flagged] {
            let name = serde_json::to_value(state).map_err(|e| e.to_string())?;
            let name = name.as_str().unwrap_or_default().to_owned();
            let url = format!("{}/v1/transactions?state={name}&limit=1000", run.coordinator_url);
            let page: ListView = match http.get(&url).send().await {
                Ok(res) if res.status().is_success() => res.json().await.map_err(|e| e.to_string())?,
                // Just restarted and not serving yet, or an answer lost: look again shortly.
                _ => {
                    unfinished.push(format!("(coordinator not answering for {name})"));
                    continue;
                }
            };
            for tx in page.items {
                if state == StateView::Flagged {
                    let url = format!("{}/v1/transactions/{}/retry", run.coordinator_url, tx.gid);
                    if http.post(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                        retried += 1;
                    }
                }
                unfinished.push(format!(
                    "{} {name} (last error: {})",
                    tx.gid,
                    tx.last_error.unwrap_or_default()
                ));
            }
        }
        if unfinished.is_empty() {
            return Ok(retried);
        }
        if Instant::now() >= until {
            return Err(format!("still unfinished after the run: {}", unfinished.join("; ")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Opens the stopped processes' stores and checks them against what the initiators saw.
async fn check_stores(run: &Run, units: [u32; 2]) -> Result<(Vec<String>, String), String> {
    let store = tcc_core::SledStore::open(run.dir.join("coordinator")).map_err(|e| e.to_string())?;
    let mut txs = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list(&ListQuery { state: None, after, limit: 0, newest_first: false })
            .await
            .map_err(|e| e.to_string())?;
        txs.extend(page.items);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    drop(store);
    let seen = run.seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let orphans = seen.iter().filter(|(_, s)| **s == Seen::Orphan).map(|(g, _)| g);
    let gids: Vec<&Gid> = txs.iter().map(|t| &t.gid).chain(orphans).collect();
    let local: BranchId =
        tcc_http::participant::LOCAL_BRANCH.parse().map_err(|e: tcc_core::Error| e.to_string())?;
    let mut books = Vec::new();
    let mut barriers = Vec::new();
    let mut steps = Vec::new();
    for (kind, (db, name)) in KINDS.into_iter().zip(&run.stores) {
        let grace = Duration::from_millis(run.args.grace_ms);
        let backend =
            travel_booking::service::open(kind, &db.at(name), grace).await.map_err(|e| e.to_string())?;
        books.push(backend.books().await?);
        let branch: tcc_core::BranchId =
            branch_of(kind).parse().map_err(|e: tcc_core::Error| e.to_string())?;
        let mut states: HashMap<Gid, BarrierState> = HashMap::new();
        for gid in &gids {
            if let Some(state) = backend.barrier_state(gid, &branch).await? {
                states.insert((*gid).clone(), state);
            }
        }
        barriers.push(states);
        // Every branch of every saga and message, and their local transaction's.
        let mut step_states: HashMap<(Gid, BranchId), BarrierState> = HashMap::new();
        for tx in txs.iter().filter(|t| !matches!(t.kind, TxKind::Tcc)) {
            let branches: Vec<BranchId> =
                tx.branches.iter().map(|b| b.id.clone()).chain(std::iter::once(local.clone())).collect();
            for (b, state) in backend.barrier_states(&tx.gid, &branches).await? {
                step_states.insert((tx.gid.clone(), b), state);
            }
        }
        steps.push(step_states);
    }
    let sides = [
        Side {
            name: "flights",
            branch: branch_of(Kind::Flights).parse().map_err(|e: tcc_core::Error| e.to_string())?,
            books: &books[0],
            barrier: &barriers[0],
            prefix: "/tcc/flights/",
            steps: &steps[0],
        },
        Side {
            name: "hotels",
            branch: branch_of(Kind::Hotels).parse().map_err(|e: tcc_core::Error| e.to_string())?,
            books: &books[1],
            barrier: &barriers[1],
            prefix: "/tcc/hotels/",
            steps: &steps[1],
        },
    ];
    let mut stocked = Vec::new();
    for kind in KINDS {
        let [plenty, scarce, _] = items(kind);
        stocked.extend([(plenty, units[0]), (scarce, units[1])]);
    }
    let mut violations = check(&txs, &sides, &stocked, &seen);
    let released_by_services = self_released(&sides);
    let orphan_holds = run.tally.orphan_holds.load(Ordering::Relaxed);
    if orphan_holds > 0 && released_by_services == 0 {
        violations
            .push(format!("{orphan_holds} orphan holds were made but no service released any by itself"));
    }

    let tcc_txs: Vec<&tcc_core::Transaction> = txs.iter().filter(|t| matches!(t.kind, TxKind::Tcc)).collect();
    let count = |s: TxState| tcc_txs.iter().filter(|t| t.state == s).count();
    let c = counts(&txs, &sides);
    // Messages the initiators neither submitted nor aborted, settled by the coordinator through the
    // back-check (or submitted by an initiator whose acknowledgement was lost).
    let by_back_check = txs
        .iter()
        .filter(|t| matches!(t.kind, TxKind::Msg(_)) && seen.get(&t.gid) == Some(&Seen::Begun))
        .count();
    let mut summary = format!(
        "coordinator store: {} transactions, {} confirmed, {} cancelled\n\
         released by the services themselves at deadline + grace: {released_by_services} holds \
         ({orphan_holds} orphan holds made)\n\
         sagas: {} all done, {} all compensated ({} steps compensated after their action, {} \
         compensations empty)\n\
         messages: {} sent, {} aborted ({by_back_check} neither submitted nor aborted by the initiator; \
         {} local transactions settled as rolled back by a back-check); {} e-mails in the outboxes\n",
        tcc_txs.len(),
        count(TxState::Confirmed),
        count(TxState::Cancelled),
        c.sagas_done,
        c.sagas_compensated,
        c.steps_compensated,
        c.steps_empty,
        c.messages_sent,
        c.messages_aborted,
        c.rolled_back_by_back_check,
        c.emails,
    );
    for ((side, kind), (db, name)) in sides.iter().zip(KINDS).zip(&run.stores) {
        let stock: Vec<String> = side
            .books
            .stock
            .iter()
            .map(|(item, s)| format!("{item}: {} free, {} held, {} sold", s.free, s.held, s.sold))
            .collect();
        summary.push_str(&format!(
            "{} store ({}): {}\n",
            kind.name(),
            db.at(name).describe(),
            stock.join("; ")
        ));
    }
    Ok((violations, summary))
}

fn branch_of(kind: Kind) -> &'static str {
    match kind {
        Kind::Flights => "flight",
        Kind::Hotels => "hotel",
    }
}

async fn progress(run: Arc<Run>, done: Arc<AtomicBool>) {
    let started = Instant::now();
    while !done.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let n = run.args.transactions.max(1);
        let begun = run.tally.begun.load(Ordering::Relaxed).min(n);
        let filled = begun * 30 / n;
        eprint!(
            "\r[{}{}] {begun}/{n} transactions, {} coordinator and {} participant kills, {:.0} s",
            "#".repeat(filled),
            ".".repeat(30 - filled),
            run.coordinator_kills.load(Ordering::Relaxed),
            run.participant_kills.load(Ordering::Relaxed),
            started.elapsed().as_secs_f64()
        );
    }
    eprintln!();
}

async fn chaos(args: Args) -> Result<(usize, usize, usize, Vec<String>), String> {
    if args.transactions == 0 || args.concurrency == 0 {
        return Err("--transactions and --concurrency must be at least 1".into());
    }
    if !(0.0..=1.0).contains(&args.fault_rate) {
        return Err("--fault-rate must be between 0 and 1".into());
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    let temp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = match &args.keep {
        Some(keep) => {
            std::fs::create_dir_all(keep).map_err(|e| format!("{}: {e}", keep.display()))?;
            keep.clone()
        }
        None => temp.path().to_owned(),
    };
    let units = stock_for(args.transactions);
    // Each service's database, and its place there for this run.
    let run_tag = format!("chaos_{seed}");
    let mut stores = Vec::new();
    for (kind, url) in KINDS.into_iter().zip([&args.flights_db, &args.hotels_db]) {
        let url = url.clone().unwrap_or_else(|| format!("sled:{}", dir.display()));
        let db: Db = url.parse()?;
        let name = match db {
            Db::Sled(_) => kind.name().to_owned(),
            _ => {
                let name = format!("{run_tag}_{}", kind.name());
                db.scratch(&name).await.map_err(|e| format!("creating {name}: {e}"))?;
                name
            }
        };
        stores.push((url, db, name));
    }
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let coordinator_addr = loopback(free_port().map_err(|e| e.to_string())?);
    let mut coordinator = coordinator_proc(&args, &dir, coordinator_addr)?;
    let mut services = Vec::new();
    let mut proxies = Vec::new();
    for (i, kind) in KINDS.into_iter().enumerate() {
        let addr = loopback(free_port().map_err(|e| e.to_string())?);
        let (url, _, name) = &stores[i];
        let mut proc = service_proc(&dir, kind, addr, (url, name), units, args.grace_ms)?;
        proc.spawn()?;
        proc.wait_up().await?;
        services.push(tokio::sync::Mutex::new(proc));
        let proxy =
            FaultProxy::start(addr, HANG, seed.wrapping_add(i as u64)).await.map_err(|e| e.to_string())?;
        proxy.set_rate(args.fault_rate);
        proxies.push(proxy);
    }
    coordinator.spawn()?;
    coordinator.wait_up().await?;
    println!(
        "tcc-chaos: seed {seed}, {} transactions from {} initiators, fault rate {}, stores in {}; \
         coordinator: {}",
        args.transactions,
        args.concurrency,
        args.fault_rate,
        dir.display(),
        match coordinator.command.first().map(String::as_str) {
            Some("--serve-coordinator") => "served by this binary".to_owned(),
            _ => coordinator.program.display().to_string(),
        }
    );
    let [flights, hotels]: [tokio::sync::Mutex<Proc>; 2] =
        services.try_into().map_err(|_| "two services".to_owned())?;
    let [fp, hp]: [FaultProxy; 2] = proxies.try_into().map_err(|_| "two proxies".to_owned())?;
    let run = Arc::new(Run {
        seed,
        dir: dir.clone(),
        coordinator: tokio::sync::Mutex::new(coordinator),
        services: [flights, hotels],
        proxies: [fp, hp],
        coordinator_url: format!("http://{coordinator_addr}"),
        tally: Tally::default(),
        seen: Mutex::default(),
        coordinator_kills: AtomicUsize::new(0),
        participant_kills: AtomicUsize::new(0),
        restart_ms: Mutex::default(),
        stores: stores
            .into_iter()
            .map(|(_, db, name)| (db, name))
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| "two stores".to_owned())?,
        last_orphan_deadline: AtomicU64::new(0),
        args,
    });

    let started = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let bar = tokio::spawn(progress(run.clone(), done.clone()));
    let mut rng = StdRng::seed_from_u64(run.seed);
    let killer = tokio::spawn(monkey(run.clone(), done.clone(), StdRng::seed_from_u64(rng.random())));
    let mut initiators = Vec::new();
    for _ in 0..run.args.concurrency {
        initiators.push(tokio::spawn(initiator(run.clone(), StdRng::seed_from_u64(rng.random()))));
    }
    let mut failure = None;
    for i in initiators {
        match i.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(format!("an initiator panicked: {e}")),
        }
    }
    done.store(true, Ordering::Relaxed);
    match killer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => failure = Some(e),
        Err(e) => failure = Some(format!("the killer panicked: {e}")),
    }
    let _ = bar.await;
    if let Some(e) = failure {
        return Err(e);
    }
    let ran = started.elapsed();

    // Quiet: no more faults; every process is up (the killer waited for each restart).
    for p in &run.proxies {
        p.set_rate(0.0);
    }
    let quiet = Instant::now();
    wait_orphans_released(&run).await;
    let (retried, mut violations) = match quiesce(&run).await {
        Ok(retried) => (retried, Vec::new()),
        Err(e) => (0, vec![e]),
    };
    let quiesced = quiet.elapsed();
    // Late deliveries still on their way arrive before the end (at a quiet coordinator, where each
    // is a duplicate or a try after its cancel, and must change nothing).
    for _ in 0..1_000 {
        if run.proxies.iter().all(|p| p.late_pending() == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One more SIGKILL of every process once all is quiet, and a restart: whatever the coordinator
    // had recorded without a flush (phase-two results) may be lost, and must be redone.
    let mut all: Vec<&tokio::sync::Mutex<Proc>> = run.services.iter().collect();
    all.push(&run.coordinator);
    for p in &all {
        p.lock().await.kill();
    }
    for p in &all {
        let mut p = p.lock().await;
        p.spawn()?;
        p.wait_up().await?;
    }
    let requiet = Instant::now();
    if let Err(e) = quiesce(&run).await {
        violations.push(format!("after the final kill and restart: {e}"));
    }
    let requiesced = requiet.elapsed();
    // A clean stop of the coordinator flushes everything; the services' acknowledged writes are
    // already durable, so they are simply killed. The check reads only the stores.
    if !run.coordinator.lock().await.terminate().await {
        violations.push("the coordinator did not stop cleanly on SIGTERM".into());
    }
    for s in &run.services {
        s.lock().await.kill();
    }
    let (found, summary) = check_stores(&run, units).await?;
    violations.extend(found);

    let t = &run.tally;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "initiators: {} begun in {:.1} s ({:.0}/s); confirm acknowledged {}, cancel acknowledged {}, \
         decision not acknowledged {}, walked away {}; tries refused by a service {}, tries failed {}; \
         begin retried {} times; orphans {} ({} holds made)",
        t.begun.load(Ordering::Relaxed),
        ran.as_secs_f64(),
        t.begun.load(Ordering::Relaxed) as f64 / ran.as_secs_f64().max(1e-3),
        get(&t.confirm_acked),
        get(&t.cancel_acked),
        get(&t.decision_failed),
        get(&t.walked_away),
        get(&t.refused),
        get(&t.try_failed),
        get(&t.begin_retries),
        get(&t.orphans),
        get(&t.orphan_holds),
    );
    let mut faults: HashMap<Fault, u64> = HashMap::new();
    for p in &run.proxies {
        for (f, n) in p.counts() {
            *faults.entry(f).or_default() += n;
        }
    }
    println!(
        "sagas and messages: {} loyalty sagas submitted ({} for the blocked account, {} racing a short \
         deadline), submit failed {}; {} messages prepared ({} racing a short deadline), prepare failed {}; \
         tickets issued {}, refused {}, unknown {}; \
         submit acknowledged {}, abort acknowledged {}, decision not acknowledged {}, left to the back-check {}",
        get(&t.sagas),
        get(&t.sagas_refusing),
        get(&t.sagas_racing),
        get(&t.saga_submit_failed),
        get(&t.messages),
        get(&t.messages_racing),
        get(&t.prepare_failed),
        get(&t.tickets_issued),
        get(&t.tickets_refused),
        get(&t.tickets_unknown),
        get(&t.message_submit_acked),
        get(&t.message_abort_acked),
        get(&t.message_decision_failed),
        get(&t.messages_left),
    );
    let faults: Vec<String> = Fault::ALL.iter().map(|f| format!("{} {}", f.name(), faults[f])).collect();
    println!(
        "faults injected: {}; forwarded {}, answered 502 while a service was down {}",
        faults.join(", "),
        run.proxies.iter().map(FaultProxy::forwarded).sum::<u64>(),
        run.proxies.iter().map(FaultProxy::upstream_down).sum::<u64>(),
    );
    let restarts = run.restart_ms.lock().unwrap_or_else(PoisonError::into_inner).clone();
    println!(
        "restarts: {}, back up in {} ms at most; quiescent {:.1} s after the last transaction and \
         {:.1} s after the final kill; operator retries of flagged transactions {retried}",
        restarts.len(),
        restarts.iter().max().copied().unwrap_or(0),
        quiesced.as_secs_f64(),
        requiesced.as_secs_f64(),
    );
    print!("{summary}");
    if !violations.is_empty() && run.args.keep.is_none() {
        let kept = temp.keep();
        println!("stores and logs kept in {}", kept.display());
    }
    for (db, name) in &run.stores {
        match db {
            Db::Sled(_) => {}
            _ if !violations.is_empty() => println!("kept for inspection: {}", db.at(name).describe()),
            _ => {
                if let Err(e) = db.drop_scratch(name).await {
                    println!("could not drop {name}: {e}");
                }
            }
        }
    }
    Ok((
        // Orphans count among the transactions: those of a coordinator gone for good.
        run.tally.begun.load(Ordering::Relaxed) + run.tally.orphans.load(Ordering::Relaxed) as usize,
        run.coordinator_kills.load(Ordering::Relaxed),
        run.participant_kills.load(Ordering::Relaxed),
        violations,
    ))
}

/// Returns when the harness that started this child process is gone (its end of our standard
/// input closed).
async fn parent_gone() {
    let mut sink = tokio::io::sink();
    let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut sink).await;
}

/// The coordinator's child process when no tcc-coordinator binary is found: the same settings.
async fn serve_coordinator(serve: &[String]) -> Result<(), String> {
    let [listen, dir] = serve else { return Err("--serve-coordinator ADDR DIR".into()) };
    let core = tcc_core::Config {
        retry: tcc_core::RetryPolicy {
            initial_backoff: RETRY_INITIAL,
            max_backoff: RETRY_MAX_BACKOFF,
            max_attempts: RETRY_MAX_ATTEMPTS,
            call_timeout: CALL_TIMEOUT,
            ..tcc_core::RetryPolicy::default()
        },
        ..tcc_core::Config::default()
    };
    let launch = tcc_http::server::Launch {
        listen: listen.clone(),
        store: tcc_http::server::StoreChoice::Sled(dir.into()),
        core,
        server: Default::default(),
        client: tcc_http::transport::ClientConfig {
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: CALL_TIMEOUT,
            ..Default::default()
        },
    };
    let running = tcc_http::server::start(launch).await.map_err(|e| e.to_string())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => running.stop().await.map_err(|e| e.to_string()),
        () = parent_gone() => Err("the harness is gone".into()),
    }
}

/// A service's child process.
async fn serve_participant(serve: &[String]) -> Result<(), String> {
    let [kind, listen, db, name, units, grace_ms] = serve else {
        return Err("--serve-participant KIND ADDR DB NAME UNITS GRACE_MS".into());
    };
    let db = db.parse::<Db>()?.at(name);
    let grace = Duration::from_millis(grace_ms.parse().map_err(|e| format!("GRACE_MS: {e}"))?);
    let kind = KINDS.into_iter().find(|k| k.name() == kind).ok_or_else(|| format!("no service {kind}"))?;
    let units: Vec<u32> =
        units.split(',').map(str::parse).collect::<Result<_, _>>().map_err(|e| format!("{e}"))?;
    let [plenty, scarce] = units[..] else { return Err("UNITS is PLENTY,SCARCE".into()) };
    let [a, b, _] = items(kind);
    let service =
        travel_booking::service::Service::start(kind, &db, listen, &[(a, plenty), (b, scarce)], grace)
            .await
            .map_err(|e| e.to_string())?;
    parent_gone().await;
    drop(service);
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tcc-chaos: {e}");
            return ExitCode::FAILURE;
        }
    };
    let child = |what: &str, r: Result<(), String>| match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcc-chaos {what}: {e}");
            ExitCode::FAILURE
        }
    };
    // A child's runtime is shut down without waiting: the thread reading standard input (see
    // `parent_gone`) never finishes on its own.
    if let Some(serve) = &args.serve_coordinator {
        let r = rt.block_on(serve_coordinator(serve));
        rt.shutdown_background();
        return child("coordinator", r);
    }
    if let Some(serve) = &args.serve_participant {
        let r = rt.block_on(serve_participant(serve));
        rt.shutdown_background();
        return child("service", r);
    }
    match rt.block_on(chaos(args)) {
        Ok((n, k, p, violations)) => {
            for v in &violations {
                println!("violation: {v}");
            }
            println!(
                "chaos: {n} transactions, {k} coordinator kills, {p} participant kills, {} violations",
                violations.len()
            );
            if violations.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => {
            eprintln!("tcc-chaos: the run could not be carried out: {e}");
            ExitCode::from(2)
        }
    }
}
