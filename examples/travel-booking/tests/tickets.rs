//! The flight service's ticket route (`POST {base}/tickets?gid=`), the local transaction of a
//! confirmation message: bad input is refused with the documented JSON error and issues nothing; a
//! ticket for a trip not booked is refused (409) and the back-check then says rolled back; an
//! issued ticket is issued once, and the back-check says committed. On sled, and on PostgreSQL and
//! MySQL when `TCC_TEST_POSTGRES_URL` / `TCC_TEST_MYSQL_URL` are set.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use travel_booking::service::{Db, Kind, Service};

async fn post(http: &reqwest::Client, url: &str, body: &str) -> (u16, serde_json::Value) {
    let res =
        http.post(url).header("content-type", "application/json").body(body.to_owned()).send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_are_issued_once_only_for_a_booked_trip_and_the_back_check_agrees() {
    use tcc_core::barrier::sql::testing::{test_mysql_url, test_postgres_url};
    let dir = tempfile::tempdir().unwrap();
    let mut dbs = vec![(Db::Sled(dir.path().to_owned()), "flights".to_owned())];
    let run = format!("tickets_{}", uuid::Uuid::now_v7().simple());
    for url in [test_postgres_url(), test_mysql_url()].into_iter().flatten() {
        let db: Db = url.parse().unwrap();
        db.scratch(&run).await.unwrap();
        dbs.push((db, run.clone()));
    }
    for (db, name) in &dbs {
        tickets_on(&db.at(name)).await;
        if !matches!(db, Db::Sled(_)) {
            db.drop_scratch(name).await.unwrap();
        }
    }
}

async fn tickets_on(db: &Db) {
    let flights = Service::start(Kind::Flights, db, "127.0.0.1:0", &[("TC42", 5)], Duration::from_secs(30))
        .await
        .unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    // A seat held for trip `trip-1` (a TCC try, as the coordinator's initiator sends it).
    let deadline = tcc_core::Clock::now(&tcc_core::SystemClock).0 + 60_000;
    let held = http
        .post(format!("{}/hold_seat/try", flights.url()))
        .header("tcc-gid", "trip-1")
        .header("tcc-branch", "flight")
        .header("tcc-deadline", deadline.to_string())
        .header("content-type", "application/json")
        .body(r#"{"item":"TC42","customer":"ada"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(held.status().as_u16(), 200, "{}", db.describe());
    let tickets = format!("{}/tickets", flights.url());
    let ok = r#"{"booking":"trip-1","customer":"ada"}"#;

    // Bad input: no gid, a bad gid, a body that is not a ticket request. Nothing is issued.
    for (query, body) in [("", ok), ("?gid=a%20b", ok), ("?gid=m-bad", "not json")] {
        let (status, answer) = post(&http, &format!("{tickets}{query}"), body).await;
        assert_eq!((status, answer["code"].as_str()), (400, Some("malformed")), "{query} {body}: {answer}");
    }
    assert!(flights.books().await.unwrap().tickets.is_empty(), "{}", db.describe());

    // A trip not booked here: refused, nothing issued, and the back-check says rolled back.
    let (status, answer) =
        post(&http, &format!("{tickets}?gid=m-refused"), r#"{"booking":"nope","customer":"ada"}"#).await;
    assert_eq!((status, answer["code"].as_str()), (409, Some("refused")), "{answer}");
    let check = |gid: &str| http.get(format!("{}/back-check?gid={gid}", flights.url())).send();
    assert_eq!(check("m-refused").await.unwrap().status().as_u16(), 409);
    assert!(flights.books().await.unwrap().tickets.is_empty());

    // A booked trip: issued, once; asked again it answers the same and writes nothing more.
    for _ in 0..2 {
        let (status, answer) = post(&http, &format!("{tickets}?gid=m-ok"), ok).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["booking"].as_str(), Some("trip-1"));
    }
    assert_eq!(flights.books().await.unwrap().tickets.len(), 1, "{}", db.describe());
    assert_eq!(check("m-ok").await.unwrap().status().as_u16(), 200);
}
