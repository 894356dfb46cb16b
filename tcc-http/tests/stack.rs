//! The whole stack: two participants built on the participant runtime, each keeping an inventory in
//! its own sled database behind the barrier, booked in one transaction through the coordinator,
//! embedded and standalone. Inventory is conserved and a booking is all or nothing.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use sled::transaction::{ConflictableTransactionResult, abort};
use support::{BOTH, Tcc};
use tcc_core::Gid;
use tcc_core::{Clock, SledBarrier, SystemClock};
use tcc_http::client::{ClientError, TccClient};
use tcc_http::participant::{Call, Participant};
use tcc_http::server::native::StateView;

const LONG: Duration = Duration::from_secs(20);

fn count(
    tree: &sled::transaction::TransactionalTree,
    key: &str,
) -> ConflictableTransactionResult<u32, String> {
    Ok(tree.get(key)?.map_or(0, |v| u32::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 4]))))
}

fn add(
    tree: &sled::transaction::TransactionalTree,
    key: &str,
    delta: i64,
) -> ConflictableTransactionResult<(), String> {
    let now = i64::from(count(tree, key)?) + delta;
    let Ok(now) = u32::try_from(now) else { return abort(format!("{key} would go below zero")) };
    tree.insert(key, &now.to_be_bytes())?;
    Ok(())
}

/// A service selling `stock` units: try moves one from free to held, confirm from held to sold,
/// cancel from held back to free.
struct Shop {
    db: tcc_core::DurableDb,
    _dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
    url: String,
    /// Requests served, by phase (the last path segment).
    requests: Arc<Mutex<HashMap<String, usize>>>,
}

impl Shop {
    async fn open(stock: u32) -> Shop {
        let dir = tempfile::tempdir().unwrap();
        let db = tcc_core::DurableDb::open(dir.path()).unwrap();
        let inventory = db.open_tree("inventory").unwrap();
        inventory.insert("free", &stock.to_be_bytes()).unwrap();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let barrier = SledBarrier::open(&db, vec![inventory], clock, Duration::from_secs(60)).unwrap();
        let participant = Participant::new(barrier).unwrap().operation_fn(
            "hold",
            |c: &Call<'_>| {
                if count(c.tree(0), "free")? == 0 {
                    return abort("sold out".to_owned());
                }
                add(c.tree(0), "free", -1)?;
                add(c.tree(0), "held", 1)?;
                Ok(b"held".to_vec())
            },
            |c: &Call<'_>| {
                add(c.tree(0), "held", -1)?;
                add(c.tree(0), "sold", 1)
            },
            |c: &Call<'_>| {
                add(c.tree(0), "held", -1)?;
                add(c.tree(0), "free", 1)
            },
        );
        let requests = Arc::new(Mutex::new(HashMap::new()));
        let app = axum::Router::new().nest("/tcc", participant.router()).layer(
            axum::middleware::from_fn_with_state(
                Arc::clone(&requests),
                |State(seen): State<Arc<Mutex<HashMap<String, usize>>>>,
                 req: axum::extract::Request,
                 next: axum::middleware::Next| async move {
                    let phase = req.uri().path().rsplit('/').next().unwrap_or_default().to_owned();
                    *seen.lock().unwrap().entry(phase).or_default() += 1;
                    next.run(req).await
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/tcc/hold", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Shop { db, _dir: dir, server, url, requests }
    }

    /// Requests served for `phase` (`try`, `confirm`, `cancel`, `batch`).
    fn requests(&self, phase: &str) -> usize {
        self.requests.lock().unwrap().get(phase).copied().unwrap_or(0)
    }

    /// (free, held, sold)
    fn ledger(&self) -> (u32, u32, u32) {
        let t = self.db.open_tree("inventory").unwrap();
        let get =
            |k: &str| t.get(k).unwrap().map_or(0, |v| u32::from_be_bytes(v.as_ref().try_into().unwrap()));
        (get("free"), get("held"), get("sold"))
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// One customer booking a seat at `flights` and a room at `hotels` in one transaction: its id and
/// what the customer was told.
async fn book(client: &TccClient, flights: &str, hotels: &str) -> (Gid, Result<(), ClientError>) {
    let mut gid = None;
    let r = client
        .run(LONG, |tx| {
            gid = Some(tx.gid().clone());
            async move {
                tx.try_branch("flight", flights, b"{}".to_vec()).await?;
                tx.try_branch("hotel", hotels, b"{}".to_vec()).await?;
                Ok(())
            }
        })
        .await;
    (gid.unwrap(), r)
}

/// `n` customers at once; how many booked, once every transaction has ended as its customer was
/// told (confirmed if booked, else cancelled).
async fn rush(tcc: &Tcc, flights: &Shop, hotels: &Shop, n: usize) -> u32 {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (client, f, h) = (tcc.client.clone(), flights.url.clone(), hotels.url.clone());
        tasks.push(tokio::spawn(async move {
            let (gid, r) = book(&client, &f, &h).await;
            (gid, r.is_ok())
        }));
    }
    let mut booked = 0;
    for t in tasks {
        let (gid, ok) = t.await.unwrap();
        let done = tcc.client.wait(&gid, LONG).await.unwrap();
        assert_eq!(done.state, if ok { StateView::Confirmed } else { StateView::Cancelled });
        booked += u32::from(ok);
    }
    booked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookings_are_all_or_nothing_and_inventory_is_conserved() {
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let flights = Shop::open(3).await;
        let hotels = Shop::open(2).await;
        let mut outcomes = Vec::new();
        let mut gids = Vec::new();
        // Four customers one after another: two book, then the hotel is sold out and the seat each
        // held is released.
        for _ in 0..4 {
            let (gid, r) = book(&tcc.client, &flights.url, &hotels.url).await;
            outcomes.push(r.map_err(|e| match e {
                ClientError::Refused { message, .. } => message,
                other => panic!("{other}"),
            }));
            gids.push(gid);
        }
        assert_eq!(outcomes, [Ok(()), Ok(()), Err("sold out".into()), Err("sold out".into())], "{mode:?}");
        for (gid, outcome) in gids.iter().zip(&outcomes) {
            let done = tcc.client.wait(gid, LONG).await.unwrap();
            let want = if outcome.is_ok() { StateView::Confirmed } else { StateView::Cancelled };
            assert_eq!(done.state, want, "{mode:?}");
        }
        assert_eq!(flights.ledger(), (1, 0, 2), "{mode:?}: (free, held, sold) of seats");
        assert_eq!(hotels.ledger(), (0, 0, 2), "{mode:?}: (free, held, sold) of rooms");
        assert_eq!(flights.ledger().2, hotels.ledger().2, "every sold seat has its room");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rush_of_concurrent_customers_never_overbooks() {
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let flights = Shop::open(10).await;
        let hotels = Shop::open(7).await;
        let booked = rush(&tcc, &flights, &hotels, 30).await;
        let (ff, fh, fs) = flights.ledger();
        let (hf, hh, hs) = hotels.ledger();
        assert_eq!((fh, hh), (0, 0), "{mode:?}: nothing left held");
        assert_eq!((ff + fs, hf + hs), (10, 7), "{mode:?}: inventory conserved");
        assert_eq!((fs, hs), (booked, booked), "{mode:?}: every sold seat has its room");
        assert_eq!(booked, 7, "{mode:?}: rooms are the bottleneck and all of them sold");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_of_bookings_is_confirmed_through_batches_all_or_nothing() {
    for mode in BOTH {
        let tcc = Tcc::start(mode).await;
        let flights = Shop::open(1_000).await;
        let hotels = Shop::open(150).await;
        let booked = rush(&tcc, &flights, &hotels, 200).await;
        assert_eq!(booked, 150, "{mode:?}: every room sold, the rest refused");
        assert_eq!(flights.ledger(), (850, 0, 150), "{mode:?}: (free, held, sold) of seats");
        assert_eq!(hotels.ledger(), (0, 0, 150), "{mode:?}: (free, held, sold) of rooms");
        // Phase two reached the participants in batches only: no single confirm or cancel.
        for shop in [&flights, &hotels] {
            assert_eq!((shop.requests("confirm"), shop.requests("cancel")), (0, 0), "{mode:?}");
            assert!(shop.requests("batch") > 0, "{mode:?}");
        }
        eprintln!(
            "{mode:?}: {} flight and {} hotel batches for 200 phase-two calls each",
            flights.requests("batch"),
            hotels.requests("batch")
        );
    }
}
