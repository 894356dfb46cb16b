//! Loyalty awards on PostgreSQL or MySQL: the rules of [`Award`] run by the saga step on the call's
//! own database transaction, which also holds the barrier row.
//!
//! The schema, created by [`create_tables`] when missing (idempotent; MySQL tables `ENGINE=InnoDB`):
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS awards (
//!     gid VARCHAR(128) PRIMARY KEY,   -- the saga
//!     state VARCHAR(16) NOT NULL,     -- awarded or taken_back
//!     customer VARCHAR(128) NOT NULL,
//!     amount BIGINT NOT NULL
//! );
//! CREATE TABLE IF NOT EXISTS loyalty_blocked (customer VARCHAR(128) PRIMARY KEY);
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::marker::PhantomData;

use tcc_http::participant::sql::{SqlAction, SqlStep};
use tcc_http::sqlx::{self, MySql, Postgres};
use tcc_http::{SqlContext, SqlError};

use super::{Award, AwardRequest};
use crate::api::BookingError;
use crate::inventory::sql::InventoryDb;

/// The loyalty statements of one database, in its placeholder syntax (written once, in
/// `loyalty_db!`).
pub trait LoyaltyDb: InventoryDb {
    /// Whether `customer`'s account is blocked.
    fn is_blocked<'c>(
        conn: &'c mut Self::Connection,
        customer: &'c str,
    ) -> impl Future<Output = Result<bool, SqlError>> + Send + 'c;
    /// Records the award of saga `gid`.
    fn insert_award<'c>(
        conn: &'c mut Self::Connection,
        gid: &'c str,
        award: &'c Award,
    ) -> impl Future<Output = Result<(), SqlError>> + Send + 'c;
    /// The award of saga `gid`, locked until the call's transaction ends.
    fn award_for_update<'c>(
        conn: &'c mut Self::Connection,
        gid: &'c str,
    ) -> impl Future<Output = Result<Option<Award>, SqlError>> + Send + 'c;
    /// Writes the state of the award of saga `gid`.
    fn write_award<'c>(
        conn: &'c mut Self::Connection,
        gid: &'c str,
        award: &'c Award,
    ) -> impl Future<Output = Result<(), SqlError>> + Send + 'c;
    /// Creates the two tables if missing.
    fn create_loyalty_tables(
        pool: &sqlx::Pool<Self>,
    ) -> impl Future<Output = Result<(), SqlError>> + Send + '_;
    /// Blocks `customer`'s account (if not blocked already).
    fn block<'c>(
        pool: &'c sqlx::Pool<Self>,
        customer: &'c str,
    ) -> impl Future<Output = Result<(), SqlError>> + Send + 'c;
    /// Every award by saga id, and every blocked account.
    fn read_awards(
        pool: &sqlx::Pool<Self>,
    ) -> impl Future<Output = Result<(BTreeMap<String, Award>, BTreeSet<String>), SqlError>> + Send + '_;
}

fn damaged(what: String) -> SqlError {
    SqlError::from(sqlx::Error::Decode(what.into()))
}

fn award_of((state, customer, amount): (String, String, i64)) -> Result<Award, SqlError> {
    let amount = u32::try_from(amount).map_err(|_| damaged(format!("an award of {amount}")))?;
    match state.as_str() {
        "awarded" => Ok(Award::Awarded { customer, amount }),
        "taken_back" => Ok(Award::TakenBack { customer, amount }),
        _ => Err(damaged(format!("an award in state {state:?}"))),
    }
}

fn columns(award: &Award) -> (&'static str, &str, i64) {
    match award {
        Award::Awarded { customer, amount } => ("awarded", customer, i64::from(*amount)),
        Award::TakenBack { customer, amount } => ("taken_back", customer, i64::from(*amount)),
    }
}

macro_rules! loyalty_db {
    ($db:ty, engine: $engine:literal, is_blocked: $ib:literal, insert_award: $ia:literal,
     award_for_update: $afu:literal, write_award: $wa:literal, block: $bl:literal) => {
        impl LoyaltyDb for $db {
            async fn is_blocked<'c>(
                conn: &'c mut Self::Connection,
                customer: &'c str,
            ) -> Result<bool, SqlError> {
                let row: Option<(String,)> = sqlx::query_as($ib).bind(customer).fetch_optional(conn).await?;
                Ok(row.is_some())
            }

            async fn insert_award<'c>(
                conn: &'c mut Self::Connection,
                gid: &'c str,
                award: &'c Award,
            ) -> Result<(), SqlError> {
                let (state, customer, amount) = columns(award);
                sqlx::query($ia).bind(gid).bind(state).bind(customer).bind(amount).execute(conn).await?;
                Ok(())
            }

            async fn award_for_update<'c>(
                conn: &'c mut Self::Connection,
                gid: &'c str,
            ) -> Result<Option<Award>, SqlError> {
                let row: Option<(String, String, i64)> =
                    sqlx::query_as($afu).bind(gid).fetch_optional(conn).await?;
                row.map(award_of).transpose()
            }

            async fn write_award<'c>(
                conn: &'c mut Self::Connection,
                gid: &'c str,
                award: &'c Award,
            ) -> Result<(), SqlError> {
                sqlx::query($wa).bind(columns(award).0).bind(gid).execute(conn).await?;
                Ok(())
            }

            async fn create_loyalty_tables(pool: &sqlx::Pool<Self>) -> Result<(), SqlError> {
                sqlx::query(concat!(
                    "CREATE TABLE IF NOT EXISTS awards (gid VARCHAR(128) PRIMARY KEY, ",
                    "state VARCHAR(16) NOT NULL, customer VARCHAR(128) NOT NULL, amount BIGINT NOT NULL)",
                    $engine
                ))
                .execute(pool)
                .await?;
                sqlx::query(concat!(
                    "CREATE TABLE IF NOT EXISTS loyalty_blocked (customer VARCHAR(128) PRIMARY KEY)",
                    $engine
                ))
                .execute(pool)
                .await?;
                Ok(())
            }

            async fn block<'c>(pool: &'c sqlx::Pool<Self>, customer: &'c str) -> Result<(), SqlError> {
                sqlx::query($bl).bind(customer).execute(pool).await?;
                Ok(())
            }

            async fn read_awards(
                pool: &sqlx::Pool<Self>,
            ) -> Result<(BTreeMap<String, Award>, BTreeSet<String>), SqlError> {
                let rows: Vec<(String, String, String, i64)> =
                    sqlx::query_as("SELECT gid, state, customer, amount FROM awards").fetch_all(pool).await?;
                let mut awards = BTreeMap::new();
                for (gid, state, customer, amount) in rows {
                    awards.insert(gid, award_of((state, customer, amount))?);
                }
                let blocked: Vec<(String,)> =
                    sqlx::query_as("SELECT customer FROM loyalty_blocked").fetch_all(pool).await?;
                Ok((awards, blocked.into_iter().map(|(c,)| c).collect()))
            }
        }
    };
}

loyalty_db!(
    Postgres,
    engine: "",
    is_blocked: "SELECT customer FROM loyalty_blocked WHERE customer = $1",
    insert_award: "INSERT INTO awards (gid, state, customer, amount) VALUES ($1, $2, $3, $4)",
    award_for_update: "SELECT state, customer, amount FROM awards WHERE gid = $1 FOR UPDATE",
    write_award: "UPDATE awards SET state = $1 WHERE gid = $2",
    block: "INSERT INTO loyalty_blocked (customer) VALUES ($1) ON CONFLICT (customer) DO NOTHING"
);

loyalty_db!(
    MySql,
    engine: " ENGINE=InnoDB",
    is_blocked: "SELECT customer FROM loyalty_blocked WHERE customer = ?",
    insert_award: "INSERT INTO awards (gid, state, customer, amount) VALUES (?, ?, ?, ?)",
    award_for_update: "SELECT state, customer, amount FROM awards WHERE gid = ? FOR UPDATE",
    write_award: "UPDATE awards SET state = ? WHERE gid = ?",
    block: "INSERT IGNORE INTO loyalty_blocked (customer) VALUES (?)"
);

/// Creates the loyalty tables in `pool`'s database if missing.
pub async fn create_tables<DB: LoyaltyDb>(pool: &sqlx::Pool<DB>) -> Result<(), SqlError> {
    DB::create_loyalty_tables(pool).await
}

/// The loyalty step of a service on a SQL database (miles or points).
#[derive(Debug)]
pub struct SqlLoyalty<DB>(PhantomData<fn() -> DB>);

impl<DB> Default for SqlLoyalty<DB> {
    fn default() -> Self {
        SqlLoyalty(PhantomData)
    }
}

impl<DB: LoyaltyDb> SqlAction for SqlLoyalty<DB> {
    type Db = DB;
    type Request = AwardRequest;
    type Error = BookingError;

    async fn action(&self, ctx: &mut SqlContext<DB>, req: AwardRequest) -> Result<(), BookingError> {
        let gid = ctx.gid().to_string();
        let blocked = DB::is_blocked(ctx.conn(), &req.customer).await?;
        let award = Award::grant(&req, blocked)?;
        DB::insert_award(ctx.conn(), &gid, &award).await?;
        Ok(())
    }
}

impl<DB: LoyaltyDb> SqlStep for SqlLoyalty<DB> {
    async fn compensate(&self, ctx: &mut SqlContext<DB>, _req: AwardRequest) -> Result<(), BookingError> {
        let gid = ctx.gid().to_string();
        let award = DB::award_for_update(ctx.conn(), &gid).await?.ok_or(BookingError::NoAward)?;
        DB::write_award(ctx.conn(), &gid, &award.take_back()?).await?;
        Ok(())
    }
}
