//! Serving the flight or the hotel service on a loopback port, with its own sled database.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tcc_core::barrier::ExpiryTask;
use tcc_core::{DurableDb, SledBarrier, SystemClock};
use tcc_http::participant::Participant;

use crate::api::{Flights, Hotels};
use crate::inventory::{BOOKINGS, Inventory, STOCK, Stock};

/// How long after a booking's deadline a service waits for the coordinator's confirm or cancel
/// before releasing the hold itself.
pub const GRACE: Duration = Duration::from_secs(30);

/// Which service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Seats on flights.
    Flights,
    /// Rooms in hotels.
    Hotels,
}

impl Kind {
    /// The path the service's TCC operations are served under.
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Flights => "/tcc/flights",
            Kind::Hotels => "/tcc/hotels",
        }
    }

    /// What the narration calls it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Flights => "flights",
            Kind::Hotels => "hotels",
        }
    }
}

/// Opens the service's database in `dir` (created if missing) and its participant, without serving
/// it: what [`Service::start`] serves, and how a checker reads a stopped service's books and barrier
/// records.
pub fn open(kind: Kind, dir: &Path) -> Result<(DurableDb, Participant), StartError> {
    let db = DurableDb::open(dir)?;
    let trees = vec![db.open_tree(STOCK)?, db.open_tree(BOOKINGS)?];
    let barrier = SledBarrier::open(&db, trees, Arc::new(SystemClock), GRACE)?;
    let participant = Participant::new(barrier)?;
    let participant = match kind {
        Kind::Flights => Flights::into_participant(Inventory, participant),
        Kind::Hotels => Hotels::into_participant(Inventory, participant),
    };
    Ok((db, participant))
}

/// A running service. Dropping it stops serving.
#[derive(Debug)]
pub struct Service {
    kind: Kind,
    addr: SocketAddr,
    participant: Participant,
    db: DurableDb,
    serving: Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
    _expiry: ExpiryTask,
}

/// Why a service could not start.
pub type StartError = Box<dyn std::error::Error + Send + Sync>;

impl Service {
    /// Opens the service's database in `dir` (stocking every item of `stock` not stocked yet),
    /// starts its expiry sweep and serves it on `listen` (`127.0.0.1:0` picks a free port).
    pub async fn start(
        kind: Kind,
        dir: &Path,
        listen: &str,
        stock: &[(&str, u32)],
    ) -> Result<Service, StartError> {
        let (db, participant) = open(kind, dir)?;
        for (item, units) in stock {
            if participant.read::<Stock>(STOCK, item.as_bytes())?.is_none() {
                participant.seed(STOCK, item.as_bytes(), &Stock { free: *units, ..Stock::default() })?;
            }
        }
        let expiry = participant.spawn_expiry(Duration::from_secs(1));
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let mut service = Service { kind, addr, participant, db, serving: None, _expiry: expiry };
        service.serve(listener);
        Ok(service)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new().nest(self.kind.prefix(), self.participant.router());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            // Slow or hostile clients are cut off: header and body read timeouts, a bounded header
            // buffer, a cap on connections (tcc_http::serve's defaults).
            let limits = tcc_http::serve::Limits::default();
            if let Err(e) = tcc_http::serve::serve(listener, app, &limits, shutdown).await {
                eprintln!("serving stopped: {e}");
            }
        });
        self.serving = Some((stop, task));
    }

    /// The base URL of the service's TCC operations (what its typed client is built with).
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.kind.prefix())
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The service's books, read now.
    pub fn books(&self) -> Result<crate::ledger::Books, String> {
        crate::ledger::read(&self.participant, &self.db)
    }

    /// Stops answering (the port is closed; the database stays as it is): the service is down.
    pub async fn go_down(&mut self) {
        if let Some((stop, task)) = self.serving.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
    }

    /// Listens again on the same port.
    pub async fn come_back(&mut self) -> std::io::Result<()> {
        if self.serving.is_none() {
            let listener = tokio::net::TcpListener::bind(self.addr).await?;
            self.serve(listener);
        }
        Ok(())
    }

    /// Waits until every change is on disk (before reading the ledger from another handle).
    pub fn flush(&self) -> std::io::Result<()> {
        self.db.flush()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some((stop, task)) = self.serving.take() {
            let _ = stop.send(());
            task.abort();
        }
    }
}

/// The command line of a service run as its own process.
#[derive(Debug, clap::Parser)]
struct ServiceArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: Option<String>,
    /// The service's sled directory (created and stocked if missing).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

/// Runs a service as its own process until SIGINT: the `flights` and `hotels` binaries.
pub fn run_standalone(kind: Kind) -> std::process::ExitCode {
    use clap::Parser;
    let args = ServiceArgs::parse();
    let (listen, stock): (&str, &[(&str, u32)]) = match kind {
        Kind::Flights => ("127.0.0.1:8081", &[("TC42", 10), ("TC43", 10)]),
        Kind::Hotels => ("127.0.0.1:8082", &[("Ritz", 10), ("Tiny Inn", 0)]),
    };
    let listen = args.listen.unwrap_or_else(|| listen.to_owned());
    let dir = args.data_dir.unwrap_or_else(|| format!("./{}-data", kind.name()).into());
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: {e}", kind.name());
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        match Service::start(kind, &dir, &listen, stock).await {
            Ok(service) => {
                println!("{} serving at {} (data in {})", kind.name(), service.url(), dir.display());
                let _ = tokio::signal::ctrl_c().await;
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", kind.name());
                std::process::ExitCode::FAILURE
            }
        }
    })
}
