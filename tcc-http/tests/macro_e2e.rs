//! Two services defined with `#[tcc]` (flights and hotels), each a participant with its inventory in
//! its own sled database, booked in one transaction over HTTP through their generated typed clients,
//! with the coordinator embedded and standalone: success, a typed refusal at try that cancels the
//! whole transaction, a confirm retried after transient failures, and a rush that never oversells.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use support::{BOTH, Tcc, Where};
use tcc_core::{SledBarrier, SystemClock};
use tcc_http::client::ClientError;
use tcc_http::participant::Participant;
use tcc_http::server::native::StateView;
use tcc_http::stub::TccCallError;

use api::{
    FlightError, Flights, FlightsClient, HotelError, Hotels, HotelsClient, RoomHold, SeatHold, SeatRequest,
    Stock,
};

const LONG: Duration = Duration::from_secs(20);

/// What a shared API crate would hold: the definitions, their types, nothing else.
mod api {
    use serde::{Deserialize, Serialize};
    use tcc_http::staged::{Disposition, StoreError};
    use tcc_http::{TccContext, TccError, tcc};

    /// Free, held and sold units of one item.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Stock {
        pub free: u32,
        pub held: u32,
        pub sold: u32,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct SeatRequest {
        pub flight: String,
        pub passenger: String,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct SeatHold {
        pub flight: String,
        pub seats_left: u32,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
    pub enum FlightError {
        #[error("flight {0} is full")]
        Full(String),
        #[error("no flight {0}")]
        Unknown(String),
        #[error(transparent)]
        Store(#[from] StoreError),
    }

    impl TccError for FlightError {}

    /// The flight service.
    #[tcc]
    pub trait Flights {
        /// Holds one seat on a flight.
        #[tcc(confirm = sell_seat, cancel = release_seat)]
        async fn hold_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<SeatHold, FlightError>;
        async fn sell_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<(), FlightError>;
        async fn release_seat(&self, ctx: TccContext, req: SeatRequest) -> Result<(), FlightError>;
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct RoomHold {
        pub hotel: String,
        pub nights: u32,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
    pub enum HotelError {
        #[error("hotel {0} is sold out")]
        SoldOut(String),
        #[error("the booking system is in maintenance")]
        Maintenance,
        #[error(transparent)]
        Store(#[from] StoreError),
    }

    /// Maintenance is transient: the coordinator retries a confirm that hits it.
    impl TccError for HotelError {
        fn disposition(&self) -> Disposition {
            match self {
                HotelError::Maintenance => Disposition::Transient,
                _ => Disposition::Refuse,
            }
        }
    }

    /// The hotel service; its operation takes two parameters (sent as a JSON array) and has its
    /// own branch id.
    #[tcc(client = HotelsClient)]
    pub trait Hotels {
        #[tcc(confirm = book_room, cancel = free_room, branch = "hotel")]
        async fn hold_room(
            &self,
            ctx: TccContext,
            hotel: String,
            nights: u32,
        ) -> Result<RoomHold, HotelError>;
        async fn book_room(&self, ctx: TccContext, hotel: String, nights: u32) -> Result<(), HotelError>;
        async fn free_room(&self, ctx: TccContext, hotel: String, nights: u32) -> Result<(), HotelError>;
    }
}

/// Moves one unit of `key`'s stock with `f`, as a versioned update; `None` if there is no such key.
fn update(
    ctx: &tcc_http::TccContext,
    tree: &str,
    key: &str,
    f: impl FnOnce(&mut Stock),
) -> Result<Option<Stock>, tcc_http::staged::StoreError> {
    let Some(current) = ctx.get::<Stock>(tree, key)? else { return Ok(None) };
    let mut next = current.value;
    f(&mut next);
    ctx.put(tree, key, &next, current.version)?;
    Ok(Some(next))
}

/// Counts of business method runs (not effects: a run whose writes conflicted runs again).
#[derive(Debug, Default)]
struct Runs {
    tries: AtomicUsize,
    confirms: AtomicUsize,
    cancels: AtomicUsize,
}

#[derive(Debug, Default)]
struct FlightService {
    runs: Runs,
}

impl Flights for FlightService {
    async fn hold_seat(&self, ctx: tcc_http::TccContext, req: SeatRequest) -> Result<SeatHold, FlightError> {
        self.runs.tries.fetch_add(1, Ordering::SeqCst);
        let Some(stock) = ctx.get::<Stock>("flights", &req.flight)? else {
            return Err(FlightError::Unknown(req.flight));
        };
        if stock.value.free == 0 {
            return Err(FlightError::Full(req.flight));
        }
        // Yield between read and write, so concurrent holds really interleave.
        tokio::task::yield_now().await;
        let left = update(&ctx, "flights", &req.flight, |s| {
            s.free -= 1;
            s.held += 1;
        })?;
        Ok(SeatHold { flight: req.flight, seats_left: left.map_or(0, |s| s.free) })
    }

    async fn sell_seat(&self, ctx: tcc_http::TccContext, req: SeatRequest) -> Result<(), FlightError> {
        self.runs.confirms.fetch_add(1, Ordering::SeqCst);
        update(&ctx, "flights", &req.flight, |s| {
            s.held -= 1;
            s.sold += 1;
        })?;
        Ok(())
    }

    async fn release_seat(&self, ctx: tcc_http::TccContext, req: SeatRequest) -> Result<(), FlightError> {
        self.runs.cancels.fetch_add(1, Ordering::SeqCst);
        update(&ctx, "flights", &req.flight, |s| {
            s.held -= 1;
            s.free += 1;
        })?;
        Ok(())
    }
}

#[derive(Debug, Default)]
struct HotelService {
    runs: Runs,
    /// How many confirms still fail with maintenance before one goes through.
    failing_confirms: AtomicU32,
    /// How many tries still fail with maintenance before one goes through.
    failing_tries: AtomicU32,
}

impl Hotels for HotelService {
    async fn hold_room(
        &self,
        ctx: tcc_http::TccContext,
        hotel: String,
        nights: u32,
    ) -> Result<RoomHold, HotelError> {
        self.runs.tries.fetch_add(1, Ordering::SeqCst);
        let failing = self.failing_tries.load(Ordering::SeqCst);
        if failing > 0 {
            self.failing_tries.store(failing - 1, Ordering::SeqCst);
            return Err(HotelError::Maintenance);
        }
        match ctx.get::<Stock>("hotels", &hotel)? {
            Some(s) if s.value.free > 0 => {}
            _ => return Err(HotelError::SoldOut(hotel)),
        }
        update(&ctx, "hotels", &hotel, |s| {
            s.free -= 1;
            s.held += 1;
        })?;
        Ok(RoomHold { hotel, nights })
    }

    async fn book_room(
        &self,
        ctx: tcc_http::TccContext,
        hotel: String,
        _nights: u32,
    ) -> Result<(), HotelError> {
        self.runs.confirms.fetch_add(1, Ordering::SeqCst);
        let failing = self.failing_confirms.load(Ordering::SeqCst);
        if failing > 0 {
            self.failing_confirms.store(failing - 1, Ordering::SeqCst);
            return Err(HotelError::Maintenance);
        }
        update(&ctx, "hotels", &hotel, |s| {
            s.held -= 1;
            s.sold += 1;
        })?;
        Ok(())
    }

    async fn free_room(
        &self,
        ctx: tcc_http::TccContext,
        hotel: String,
        _nights: u32,
    ) -> Result<(), HotelError> {
        self.runs.cancels.fetch_add(1, Ordering::SeqCst);
        update(&ctx, "hotels", &hotel, |s| {
            s.held -= 1;
            s.free += 1;
        })?;
        Ok(())
    }
}

/// A participant on a loopback port serving one service's operations under `/tcc/{prefix}`.
struct Served {
    participant: Participant,
    url: String,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Served {
    async fn start(
        tree: &str,
        prefix: &str,
        stock: &[(&str, u32)],
        add: impl FnOnce(Participant) -> Participant,
    ) -> Served {
        let db = tcc_core::DurableDb::temporary().unwrap();
        let barrier = SledBarrier::open(
            &db,
            vec![db.open_tree(tree).unwrap()],
            Arc::new(SystemClock),
            Duration::from_secs(60),
        )
        .unwrap();
        let participant = add(Participant::new(barrier).unwrap());
        for (key, free) in stock {
            participant.seed(tree, key, &Stock { free: *free, ..Stock::default() }).unwrap();
        }
        let app = axum::Router::new().nest(&format!("/tcc/{prefix}"), participant.router());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/tcc/{prefix}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Served { participant, url, server }
    }

    fn stock(&self, tree: &str, key: &str) -> Stock {
        self.participant.read::<Stock>(tree, key).unwrap().unwrap().value
    }
}

/// Both services, with `seats` on flight TC42 and `rooms` at the Ritz.
struct Trip {
    flights: Arc<FlightService>,
    hotels: Arc<HotelService>,
    flight_side: Served,
    hotel_side: Served,
}

/// The implementations are shared with the test through `Arc`, which implements the trait by
/// delegation here (a service would own its implementation).
#[derive(Clone)]
struct SharedFlights(Arc<FlightService>);

impl Flights for SharedFlights {
    async fn hold_seat(&self, ctx: tcc_http::TccContext, req: SeatRequest) -> Result<SeatHold, FlightError> {
        self.0.hold_seat(ctx, req).await
    }
    async fn sell_seat(&self, ctx: tcc_http::TccContext, req: SeatRequest) -> Result<(), FlightError> {
        self.0.sell_seat(ctx, req).await
    }
    async fn release_seat(&self, ctx: tcc_http::TccContext, req: SeatRequest) -> Result<(), FlightError> {
        self.0.release_seat(ctx, req).await
    }
}

#[derive(Clone)]
struct SharedHotels(Arc<HotelService>);

impl Hotels for SharedHotels {
    async fn hold_room(
        &self,
        ctx: tcc_http::TccContext,
        hotel: String,
        nights: u32,
    ) -> Result<RoomHold, HotelError> {
        self.0.hold_room(ctx, hotel, nights).await
    }
    async fn book_room(
        &self,
        ctx: tcc_http::TccContext,
        hotel: String,
        nights: u32,
    ) -> Result<(), HotelError> {
        self.0.book_room(ctx, hotel, nights).await
    }
    async fn free_room(
        &self,
        ctx: tcc_http::TccContext,
        hotel: String,
        nights: u32,
    ) -> Result<(), HotelError> {
        self.0.free_room(ctx, hotel, nights).await
    }
}

impl Trip {
    async fn start(seats: u32, rooms: u32) -> Trip {
        let flights = Arc::new(FlightService::default());
        let hotels = Arc::new(HotelService::default());
        let f = SharedFlights(Arc::clone(&flights));
        let h = SharedHotels(Arc::clone(&hotels));
        let flight_side =
            Served::start("flights", "flights", &[("TC42", seats)], |p| f.into_participant(p)).await;
        let hotel_side =
            Served::start("hotels", "hotels", &[("Ritz", rooms)], |p| h.into_participant(p)).await;
        Trip { flights, hotels, flight_side, hotel_side }
    }

    fn flights_client(&self) -> FlightsClient {
        FlightsClient::new(&self.flight_side.url)
    }

    fn hotels_client(&self) -> HotelsClient {
        HotelsClient::new(self.hotel_side.url.clone())
    }

    fn seats(&self) -> Stock {
        self.flight_side.stock("flights", "TC42")
    }

    fn rooms(&self) -> Stock {
        self.hotel_side.stock("hotels", "Ritz")
    }
}

fn seat(passenger: &str) -> SeatRequest {
    SeatRequest { flight: "TC42".into(), passenger: passenger.into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booking_over_both_services_confirms_both_with_typed_results() {
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let trip = Trip::start(3, 2).await;
        let (flights, hotels) = (trip.flights_client(), trip.hotels_client());
        let (gid, seat_hold, room_hold) = tcc
            .client
            .run(LONG, |tx| async move {
                let seat_hold = flights.hold_seat(&tx, seat("ada")).await?;
                let room_hold = hotels.hold_room(&tx, "Ritz".to_owned(), 2).await?;
                Ok((tx.gid().clone(), seat_hold, room_hold))
            })
            .await
            .unwrap();
        assert_eq!(seat_hold, SeatHold { flight: "TC42".into(), seats_left: 2 }, "{mode:?}");
        assert_eq!(room_hold, RoomHold { hotel: "Ritz".into(), nights: 2 });

        let tx = tcc.client.wait(&gid, LONG).await.unwrap();
        assert_eq!(tx.state, StateView::Confirmed, "{mode:?}: {tx:?}");
        let branches: Vec<&str> = tx.branches.iter().map(|b| b.branch.as_str()).collect();
        assert_eq!(branches, ["Flights.hold_seat", "hotel"], "default and declared branch ids");
        assert_eq!(trip.seats(), Stock { free: 2, held: 0, sold: 1 });
        assert_eq!(trip.rooms(), Stock { free: 1, held: 0, sold: 1 });
        assert_eq!(trip.flights.runs.confirms.load(Ordering::SeqCst), 1);
        assert_eq!(trip.hotels.runs.confirms.load(Ordering::SeqCst), 1);
        tcc.client.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_at_try_returns_the_typed_error_and_cancels_the_whole_transaction() {
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let trip = Trip::start(3, 0).await;
        let (flights, hotels) = (trip.flights_client(), trip.hotels_client());

        // By hand: the typed error comes back as such.
        let tx = tcc.client.begin(LONG).await.unwrap();
        flights.hold_seat(&tx, seat("ada")).await.unwrap();
        assert_eq!(trip.seats(), Stock { free: 2, held: 1, sold: 0 });
        match hotels.hold_room(&tx, "Ritz".to_owned(), 2).await {
            Err(TccCallError::Refused { branch, error }) => {
                assert_eq!(branch, "hotel");
                assert_eq!(error, HotelError::SoldOut("Ritz".into()), "{mode:?}");
            }
            other => panic!("{mode:?}: expected a typed refusal, got {other:?}"),
        }
        tx.cancel().await.unwrap();
        let done = tcc.client.wait(tx.gid(), LONG).await.unwrap();
        assert_eq!(done.state, StateView::Cancelled, "{mode:?}: {done:?}");
        assert_eq!(trip.seats(), Stock { free: 3, held: 0, sold: 0 }, "the held seat is released");
        assert_eq!(trip.flights.runs.cancels.load(Ordering::SeqCst), 1);
        // The refused try stored nothing, so the hotel's cancel was empty: no business cancel ran.
        assert_eq!(trip.hotels.runs.cancels.load(Ordering::SeqCst), 0);
        assert_eq!(trip.rooms(), Stock::default());

        // With `?` inside `run`: the transaction is cancelled and the refusal keeps its typed detail.
        let mut gid = None;
        let err = tcc
            .client
            .run(LONG, |tx| {
                gid = Some(tx.gid().clone());
                let (flights, hotels) = (flights.clone(), hotels.clone());
                async move {
                    flights.hold_seat(&tx, seat("bob")).await?;
                    hotels.hold_room(&tx, "Ritz".to_owned(), 1).await?;
                    Ok(())
                }
            })
            .await
            .unwrap_err();
        let ClientError::Refused { code, detail: Some(detail), .. } = err else { panic!("{err:?}") };
        assert_eq!(code, "refused");
        assert_eq!(serde_json::from_value::<HotelError>(detail).unwrap(), HotelError::SoldOut("Ritz".into()));
        let done = tcc.client.wait(gid.as_ref().unwrap(), LONG).await.unwrap();
        assert_eq!(done.state, StateView::Cancelled);
        assert_eq!(trip.seats(), Stock { free: 3, held: 0, sold: 0 });
        tcc.client.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_confirm_failure_is_retried_until_it_succeeds() {
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let trip = Trip::start(3, 2).await;
        trip.hotels.failing_confirms.store(2, Ordering::SeqCst);
        let (flights, hotels) = (trip.flights_client(), trip.hotels_client());
        let gid = tcc
            .client
            .run(LONG, |tx| async move {
                flights.hold_seat(&tx, seat("ada")).await?;
                hotels.hold_room(&tx, "Ritz".to_owned(), 3).await?;
                Ok(tx.gid().clone())
            })
            .await
            .unwrap();
        let tx = tcc.client.wait(&gid, LONG).await.unwrap();
        assert_eq!(tx.state, StateView::Confirmed, "{mode:?}: {tx:?}");
        // Two answers of 503 `unavailable`, then the confirm that took effect, once.
        assert_eq!(trip.hotels.runs.confirms.load(Ordering::SeqCst), 3, "{mode:?}");
        assert_eq!(trip.rooms(), Stock { free: 1, held: 0, sold: 1 });
        assert_eq!(trip.seats(), Stock { free: 2, held: 0, sold: 1 });
        tcc.client.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_try_failure_is_tried_again_by_the_typed_client() {
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let trip = Trip::start(3, 2).await;
        trip.hotels.failing_tries.store(1, Ordering::SeqCst);
        let hotels = trip.hotels_client();
        let tx = tcc.client.begin(LONG).await.unwrap();
        let hold = hotels.hold_room(&tx, "Ritz".to_owned(), 1).await.unwrap();
        assert_eq!(hold, RoomHold { hotel: "Ritz".into(), nights: 1 }, "{mode:?}");
        assert_eq!(trip.hotels.runs.tries.load(Ordering::SeqCst), 2, "503 `unavailable`, then the try again");

        // With one attempt only, the transient failure is the caller's: cancel.
        trip.hotels.failing_tries.store(1, Ordering::SeqCst);
        match hotels.with_try_attempts(1).with_branch("hotel-2").hold_room(&tx, "Ritz".to_owned(), 1).await {
            Err(TccCallError::Failed(ClientError::TryFailed { branch, message })) => {
                assert_eq!(branch, "hotel-2");
                assert!(message.contains("503"), "{message}");
            }
            other => panic!("{mode:?}: expected a failed try, got {other:?}"),
        }
        tx.cancel().await.unwrap();
        assert_eq!(tcc.client.wait(tx.gid(), LONG).await.unwrap().state, StateView::Cancelled);
        assert_eq!(trip.rooms(), Stock { free: 2, held: 0, sold: 0 });
        tcc.client.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rush_of_concurrent_bookings_never_oversells_the_flight() {
    let tcc = Tcc::start(Where::Embedded).await;
    let trip = Trip::start(3, 100).await;
    let customers = 12;
    let bookings = (0..customers).map(|i| {
        let client = tcc.client.clone();
        let (flights, hotels) = (trip.flights_client(), trip.hotels_client());
        tokio::spawn(async move {
            client
                .run(LONG, |tx| async move {
                    let hold = flights.hold_seat(&tx, seat(&format!("p{i}"))).await?;
                    hotels.hold_room(&tx, "Ritz".to_owned(), 1).await?;
                    Ok((tx.gid().clone(), hold))
                })
                .await
        })
    });
    let mut confirmed = Vec::new();
    for b in bookings.collect::<Vec<_>>() {
        match b.await.unwrap() {
            Ok((gid, _)) => confirmed.push(gid),
            Err(ClientError::Refused { detail: Some(d), .. }) => {
                assert_eq!(
                    serde_json::from_value::<FlightError>(d).unwrap(),
                    FlightError::Full("TC42".into())
                );
            }
            Err(e) => panic!("unexpected failure: {e}"),
        }
    }
    assert_eq!(confirmed.len(), 3, "exactly the three seats are sold");
    for gid in &confirmed {
        assert_eq!(tcc.client.wait(gid, LONG).await.unwrap().state, StateView::Confirmed);
    }
    assert_eq!(trip.seats(), Stock { free: 0, held: 0, sold: 3 });
    assert_eq!(trip.rooms(), Stock { free: 97, held: 0, sold: 3 });
    // Concurrent confirms update the same stock, so some ran again after a conflict: the ledger
    // above, not the number of runs, is what took effect.
    assert!(trip.flights.runs.confirms.load(Ordering::SeqCst) >= 3);
    tcc.client.shutdown().await;
}
