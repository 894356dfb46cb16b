//! What only the PostgreSQL store has: its schema and migrations, its columns next to the record,
//! group commit through one writer, lost connections, and several coordinators on one database
//! (a lease left by a crashed coordinator, two coordinators deciding the same transaction).
//!
//! The conformance checks both stores share are in `store.rs`. These need `TCC_TEST_POSTGRES_URL`
//! (see `pg/mod.rs`), except the ones about unreachable databases and URLs.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

mod common;
mod pg;

use std::sync::Arc;
use std::time::Duration;

use common::{Fault, Mem, START, config};
use tcc_core::store::postgres::{PgOptions, PgStore, SCHEMA_VERSION, check_url, describe_url};
use tcc_core::store::{Cas, Store};
use tcc_core::{Coordinator, Error, Gid, ManualClock, Timestamp, Transaction, TxState};

fn new_tx(deadline: u64) -> Transaction {
    let mut tx = tcc_core::state::begin(Gid::generate(), Timestamp(0), Timestamp(deadline));
    tx.version = 1;
    tx
}

/// Polls `check` every 10 ms, at most 3,000 times.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..3_000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("gave up waiting: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_starting_together_create_the_schema_once() {
    let Some(url) = pg::scratch_url().await else { return };
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move { PgStore::connect(&url).await.map(|_| ()) }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let db = pg::sql(&url).await;
    let rows = db.query("SELECT version FROM tcc_schema", &[]).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), SCHEMA_VERSION);
}

#[tokio::test]
async fn a_schema_newer_than_this_build_is_refused() {
    let Some(url) = pg::scratch_url().await else { return };
    drop(PgStore::connect(&url).await.unwrap());
    let db = pg::sql(&url).await;
    db.execute("UPDATE tcc_schema SET version = $1", &[&(SCHEMA_VERSION + 1)]).await.unwrap();
    let err = PgStore::connect(&url).await.unwrap_err();
    assert!(matches!(&err, Error::Storage(m) if m.contains("newer than this build")), "{err}");
}

#[tokio::test]
async fn a_version_1_schema_gets_the_index_of_finished_transactions_on_start() {
    let Some(url) = pg::scratch_url().await else { return };
    drop(PgStore::connect(&url).await.unwrap());
    let db = pg::sql(&url).await;
    let index = "SELECT count(*) FROM pg_indexes WHERE schemaname = current_schema() AND indexname = 'tcc_tx_finished'";
    // As a version-1 database was: no index of finished transactions.
    db.batch_execute("DROP INDEX tcc_tx_finished; UPDATE tcc_schema SET version = 1").await.unwrap();
    assert_eq!(db.query_one(index, &[]).await.unwrap().get::<_, i64>(0), 0);
    drop(PgStore::connect(&url).await.unwrap());
    assert_eq!(db.query_one(index, &[]).await.unwrap().get::<_, i64>(0), 1);
    let version = db.query_one("SELECT version FROM tcc_schema", &[]).await.unwrap();
    assert_eq!(version.get::<_, i32>(0), SCHEMA_VERSION);
}

#[tokio::test]
async fn a_row_whose_columns_disagree_with_its_record_is_an_error() {
    let Some(url) = pg::scratch_url().await else { return };
    let s = PgStore::connect(&url).await.unwrap();
    let tx = new_tx(10);
    s.insert(&tx).await.unwrap();
    let db = pg::sql(&url).await;
    db.execute("UPDATE tcc_tx SET state = 6 WHERE gid = $1", &[&tx.gid.as_str()]).await.unwrap();
    assert!(matches!(s.get(&tx.gid).await, Err(Error::Storage(m)) if m.contains("state column")));
    db.execute("UPDATE tcc_tx SET state = 1, version = -4 WHERE gid = $1", &[&tx.gid.as_str()])
        .await
        .unwrap();
    assert!(matches!(s.get(&tx.gid).await, Err(Error::Storage(_))));
    // A damaged due row is skipped by claims (and reported in the log); the others are claimed.
    let fine = new_tx(10);
    s.insert(&fine).await.unwrap();
    db.execute("UPDATE tcc_tx SET version = 1, record = '\\x01ff' WHERE gid = $1", &[&tx.gid.as_str()])
        .await
        .unwrap();
    let claimed = s.claim_due("a", Timestamp(10), Timestamp(100), 10).await.unwrap();
    assert_eq!(claimed.iter().map(|t| &t.gid).collect::<Vec<_>>(), vec![&fine.gid]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_database_refuses_fails_alone_not_its_whole_batch() {
    let Some(url) = pg::scratch_url().await else { return };
    let s = Arc::new(PgStore::connect(&url).await.unwrap());
    let db = pg::sql(&url).await;
    db.batch_execute("ALTER TABLE tcc_tx ADD CONSTRAINT no_poison CHECK (gid NOT LIKE 'poison%')")
        .await
        .unwrap();
    for round in 0..3 {
        let mut tasks = Vec::new();
        for i in 0..40 {
            let s = s.clone();
            let mut tx = new_tx(10);
            if i % 13 == 5 {
                tx.gid = format!("poison-{round}-{i}").parse().unwrap();
            }
            tasks.push(tokio::spawn(async move { (tx.gid.clone(), s.insert(&tx).await) }));
        }
        for t in tasks {
            let (gid, result) = t.await.unwrap();
            if gid.as_str().starts_with("poison") {
                assert!(matches!(&result, Err(Error::Storage(m)) if m.contains("no_poison")), "{result:?}");
                assert_eq!(s.get(&gid).await.unwrap(), None);
            } else {
                result.unwrap();
                assert!(s.get(&gid).await.unwrap().is_some());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_commits() {
    let Some(url) = pg::scratch_url().await else { return };
    let s = Arc::new(PgStore::connect(&url).await.unwrap());
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                s.insert(&new_tx(10)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = s.stats();
    assert_eq!(stats.writes, 64 * 20);
    assert!(stats.commits < stats.writes / 2, "{stats:?}: writes did not share commits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_a_storage_error_and_the_store_carries_on() {
    let Some(url) = pg::scratch_url().await else { return };
    let app = format!("tcc_test_{}", uuid_like());
    let url = format!("{url}&application_name={app}");
    let s = PgStore::connect(&url).await.unwrap();
    let kept = new_tx(10);
    s.insert(&kept).await.unwrap();
    assert!(s.get(&kept.gid).await.unwrap().is_some());
    let db = pg::sql(&url).await;
    let killed: i64 = db
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&app],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 2, "the writer's and a reader's connections, got {killed}");
    // Each call either fails with a storage error or works; it works again soon, on new connections.
    let mut errors = 0;
    let mut written = None;
    for _ in 0..200 {
        let tx = new_tx(10);
        match s.insert(&tx).await {
            Ok(()) => {
                written = Some(tx);
                break;
            }
            Err(Error::Storage(_)) => errors += 1,
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let written = written.expect("the store never wrote again");
    eventually("reads to work again", async || s.get(&written.gid).await.is_ok_and(|t| t.is_some())).await;
    assert_eq!(s.get(&kept.gid).await.unwrap(), Some(kept));
    println!("{errors} writes failed while reconnecting");
}

#[tokio::test]
async fn an_unreachable_database_is_a_storage_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // closed again: nothing listens there
    let url = format!("postgres://tcc:secret-pw@127.0.0.1:{port}/tcc");
    let options = PgOptions { connect_timeout: Duration::from_secs(2), ..PgOptions::default() };
    let err = PgStore::connect_with(&url, options).await.unwrap_err();
    assert!(matches!(&err, Error::Storage(_)), "{err}");
    assert!(!err.to_string().contains("secret-pw"));
}

#[test]
fn urls_are_checked_and_shown_without_their_password() {
    assert!(check_url("postgres://u:pw@127.0.0.1:5432/db?options=-c%20search_path%3Dx").is_ok());
    for bad in ["postgres://u@h:99999/db", "postgres://u@h/db?nosuchparam=1"] {
        let err = check_url(bad).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{bad}: {err}");
    }
    let shown = describe_url("postgresql://tcc:hunter2@db.internal:6543/coord");
    assert_eq!(shown, "postgres://tcc@db.internal:6543/coord");
    assert!(!describe_url("postgres://u:hunter2@h:bad/db").contains("hunter2"));
}

fn uuid_like() -> String {
    Gid::generate().as_str().replace('-', "")
}

/// Two engines on one database with one manual clock; their participants are separate `Mem`s.
async fn two_coordinators(url: &str, clock: &ManualClock) -> ((Coordinator, Mem), (Coordinator, Mem)) {
    let mut out = Vec::new();
    for owner in ["node-a", "node-b"] {
        let mem = Mem::default();
        let store = Arc::new(PgStore::connect(url).await.unwrap());
        let tc = Coordinator::open(
            store,
            Arc::new(mem.clone()),
            Arc::new(clock.clone()),
            tcc_core::Config { owner: owner.into(), ..config() },
        )
        .await
        .unwrap();
        out.push((tc, mem));
    }
    let b = out.pop().unwrap();
    let a = out.pop().unwrap();
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_takes_over_the_lease_of_a_crashed_one_when_it_ends() {
    let Some(url) = pg::scratch_url().await else { return };
    let clock = ManualClock::new(START);
    let ((a, mem_a), (b, mem_b)) = two_coordinators(&url, &clock).await;
    mem_a.set_fault("mem://hotel", Fault::Hang);

    let tx = a.begin(None, Duration::from_secs(60)).await.unwrap();
    for name in ["flight", "hotel"] {
        a.register(&tx.gid, name.parse().unwrap(), format!("mem://{name}"), name.into()).await.unwrap();
    }
    a.confirm(&tx.gid).await.unwrap();
    eventually("node-a to be calling the hotel", async || mem_a.calls_to(&tx.gid, "hotel") == 1).await;
    a.abort().await; // killed mid-phase-two, holding the lease

    let leased = b.get(&tx.gid).await.unwrap();
    assert_eq!((leased.state, leased.lease_owner.as_deref()), (TxState::Confirming, Some("node-a")));
    // Before the lease ends node-b leaves it alone, however often its scheduler looks.
    clock.advance(Duration::from_secs(2));
    for _ in 0..10 {
        clock.advance(Duration::from_millis(50)); // still 500 ms before the lease ends
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mem_b.calls().len(), 0);
    assert_eq!(b.get(&tx.gid).await.unwrap().lease_owner.as_deref(), Some("node-a"));

    clock.advance(Duration::from_millis(500)); // node-a's lease ends
    eventually("node-b to finish it", async || {
        clock.advance(Duration::from_millis(50));
        b.get(&tx.gid).await.unwrap().state == TxState::Confirmed
    })
    .await;
    assert_eq!(mem_b.effects(&tx.gid, "hotel").confirms, 1);
    assert!(mem_a.violations().is_empty() && mem_b.violations().is_empty());
    assert!(mem_b.calls().iter().all(|c| c.2 == tcc_core::Decision::Confirm));
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_deciding_one_transaction_at_once_agree_on_one_decision() {
    let Some(url) = pg::scratch_url().await else { return };
    let clock = ManualClock::new(START);
    let ((a, mem_a), (b, mem_b)) = two_coordinators(&url, &clock).await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    for _ in 0..20 {
        let tx = a.begin(None, Duration::from_secs(60)).await.unwrap();
        a.register(&tx.gid, "flight".parse().unwrap(), "mem://flight".into(), vec![]).await.unwrap();
        let (ga, gb) = (tx.gid.clone(), tx.gid.clone());
        let (a2, b2) = (a.clone(), b.clone());
        let confirm = tokio::spawn(async move { a2.confirm(&ga).await });
        let cancel = tokio::spawn(async move { b2.cancel(&gb).await });
        let (confirm, cancel) = (confirm.await.unwrap(), cancel.await.unwrap());
        let winner = match (&confirm, &cancel) {
            (Ok(_), Err(Error::IllegalTransition { .. })) => TxState::Confirmed,
            (Err(Error::IllegalTransition { .. }), Ok(_)) => TxState::Cancelled,
            other => panic!("exactly one decision must win: {other:?}"),
        };
        eventually("phase two", async || {
            clock.advance(Duration::from_millis(50));
            a.get(&tx.gid).await.unwrap().state == winner
        })
        .await;
    }
    for mem in [mem_a, mem_b] {
        assert!(mem.violations().is_empty(), "{:?}", mem.violations());
    }
    // And at the store itself: of two handles racing over one version, one stores.
    let (s1, s2) = (PgStore::connect(&url).await.unwrap(), PgStore::connect(&url).await.unwrap());
    let v1 = new_tx(10);
    s1.insert(&v1).await.unwrap();
    let (mut x, mut y) = (v1.clone(), v1.clone());
    (x.version, y.version) = (2, 2);
    x.state = TxState::Confirming;
    y.state = TxState::Cancelling;
    let (rx, ry) = tokio::join!(s1.compare_and_set(1, &x), s2.compare_and_set(1, &y));
    let stored = [rx.unwrap(), ry.unwrap()].into_iter().filter(|c| *c == Cas::Stored).count();
    assert_eq!(stored, 1);
}

/// A TCP relay in front of the test database that a test can cut (every connection dropped, new
/// ones refused) and restore on the same port: the database "goes away" without touching it.
struct Relay {
    port: u16,
    upstream: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(upstream: String) -> Relay {
        let mut relay = Relay { port: 0, upstream, task: None };
        relay.restore().await;
        relay
    }

    async fn restore(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        self.port = listener.local_addr().unwrap().port();
        let upstream = self.upstream.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                conns.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        }));
    }

    /// Drops the listener and every relayed connection (the JoinSet aborts them when dropped).
    async fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_keeps_serving_through_a_database_outage() {
    let Some(url) = pg::scratch_url().await else { return };
    let config: tokio_postgres::Config = url.parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        other => panic!("the relay needs a TCP database, not {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let mut relay = Relay::start(format!("{host}:{port}")).await;
    let relayed = url.replacen(&format!("@{host}:{port}/"), &format!("@127.0.0.1:{}/", relay.port), 1);
    assert_ne!(relayed, url, "the test database URL needs an explicit host:port");

    let options = PgOptions { op_timeout: Duration::from_secs(5), ..PgOptions::default() };
    let store = Arc::new(PgStore::connect_with(&relayed, options).await.unwrap());
    let clock = ManualClock::new(START);
    let mem = Mem::default();
    let tc =
        Coordinator::open(store.clone(), Arc::new(mem.clone()), Arc::new(clock.clone()), config_for("solo"))
            .await
            .unwrap();
    let before = tc.begin(None, Duration::from_secs(5)).await.unwrap();

    relay.cut().await;
    // Every call fails with a storage error, promptly, and nothing panics.
    for _ in 0..3 {
        assert!(matches!(tc.begin(None, Duration::from_secs(5)).await, Err(Error::Storage(_))));
        assert!(matches!(tc.get(&before.gid).await, Err(Error::Storage(_))));
        assert!(matches!(tc.count(TxState::Flagged).await, Err(Error::Storage(_))));
        clock.advance(Duration::from_millis(100)); // the scheduler's passes fail too, and go on
    }

    relay.restore().await;
    let mut after = None;
    eventually("the engine to write again", async || {
        after = tc.begin(None, Duration::from_secs(5)).await.ok();
        after.is_some()
    })
    .await;
    let after = after.unwrap();
    // Each reader connection tries again at most every 250 ms after a failed attempt.
    eventually("reads to work again", async || {
        tc.get(&before.gid).await.is_ok_and(|t| t.state == TxState::Trying)
    })
    .await;
    // The scheduler survived the outage: both deadlines are swept.
    eventually("the deadline sweep", async || {
        clock.advance(Duration::from_millis(100));
        let (a, b) = (tc.get(&before.gid).await, tc.get(&after.gid).await);
        a.is_ok_and(|t| t.state == TxState::Cancelled) && b.is_ok_and(|t| t.state == TxState::Cancelled)
    })
    .await;
    tc.shutdown().await;
}

fn config_for(owner: &str) -> tcc_core::Config {
    tcc_core::Config { owner: owner.into(), ..config() }
}
