//! The PostgreSQL test database: `TCC_TEST_POSTGRES_URL` names it; each test works in a schema of its
//! own. Without the variable the PostgreSQL tests print "skipped: ..." and pass, unless
//! `TCC_REQUIRE_POSTGRES=1` (CI sets it), which turns the skip into a failure.
#![allow(dead_code, clippy::unwrap_used)]

use tcc_core::store::postgres::{create_scratch_schema, test_database_url};

/// A URL of a fresh, empty schema in the test database, or `None` (after saying so) when there is
/// no test database.
pub async fn scratch_url() -> Option<String> {
    let url = test_database_url()?;
    Some(create_scratch_schema(&url, "tcc_test").await.unwrap())
}

/// A plain connection, for a test to look at or tamper with the tables directly.
pub async fn sql(url: &str) -> tokio_postgres::Client {
    let (client, conn) =
        url.parse::<tokio_postgres::Config>().unwrap().connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}
