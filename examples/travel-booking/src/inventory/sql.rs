//! The inventory on PostgreSQL or MySQL: the same rules as on sled ([`Stock::hold`],
//! [`Stock::settle`], [`Booking::settle`]), run by `#[tcc]` methods on the call's own database
//! transaction, which also holds the barrier row. Rows are locked `FOR UPDATE` before they are
//! decided on, so concurrent buyers of one item queue on its stock row instead of retrying.
//!
//! The schema, created by [`create_tables`] when missing (idempotent):
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS stock (
//!     item VARCHAR(64) PRIMARY KEY,
//!     free BIGINT NOT NULL CHECK (free >= 0),  -- units anyone may hold
//!     held BIGINT NOT NULL CHECK (held >= 0),  -- units held by bookings not decided yet
//!     sold BIGINT NOT NULL CHECK (sold >= 0)   -- units sold
//! );
//! CREATE TABLE IF NOT EXISTS bookings (
//!     gid VARCHAR(128) PRIMARY KEY,            -- the transaction
//!     state VARCHAR(16) NOT NULL,              -- held, sold or released
//!     item VARCHAR(64) NOT NULL,
//!     customer VARCHAR(128) NOT NULL
//! );
//! ```
//!
//! (MySQL tables are `ENGINE=InnoDB`.)

use std::future::Future;

use tcc_http::sqlx::{self, MySql, Postgres};
use tcc_http::{SqlContext, SqlError};

use super::{Booking, Stock};
use crate::api::{
    BookingError, FlightsOnMySql, FlightsOnPostgres, Hold, HoldRequest, HotelsOnMySql, HotelsOnPostgres,
};
use crate::ledger::Books;

/// The statements of one database, in its placeholder syntax. Each backend is a list of these and
/// nothing else: the code that runs them is written once, in `inventory_db!`.
pub trait InventoryDb: tcc_core::barrier::sql::SqlDatabase {
    /// The stock row of `item`, locked until the call's transaction ends.
    fn stock_for_update<'c>(
        conn: &'c mut Self::Connection,
        item: &'c str,
    ) -> impl Future<Output = Result<Option<Stock>, SqlError>> + Send + 'c;
    /// Writes the stock row of `item`.
    fn write_stock<'c>(
        conn: &'c mut Self::Connection,
        item: &'c str,
        stock: Stock,
    ) -> impl Future<Output = Result<(), SqlError>> + Send + 'c;
    /// The booking of `gid`, locked until the call's transaction ends.
    fn booking_for_update<'c>(
        conn: &'c mut Self::Connection,
        gid: &'c str,
    ) -> impl Future<Output = Result<Option<Booking>, SqlError>> + Send + 'c;
    /// Records a new held booking.
    fn insert_booking<'c>(
        conn: &'c mut Self::Connection,
        gid: &'c str,
        req: &'c HoldRequest,
    ) -> impl Future<Output = Result<(), SqlError>> + Send + 'c;
    /// Writes the state of the booking of `gid`.
    fn write_booking<'c>(
        conn: &'c mut Self::Connection,
        gid: &'c str,
        booking: &'c Booking,
    ) -> impl Future<Output = Result<(), SqlError>> + Send + 'c;
    /// Creates the two tables if missing.
    fn create_tables(pool: &sqlx::Pool<Self>) -> impl Future<Output = Result<(), SqlError>> + Send + '_;
    /// Stocks `item` with `units` free units unless it is stocked already.
    fn stock_if_missing<'c>(
        pool: &'c sqlx::Pool<Self>,
        item: &'c str,
        units: u32,
    ) -> impl Future<Output = Result<(), SqlError>> + Send + 'c;
    /// Every stock row and every booking.
    fn read_books(pool: &sqlx::Pool<Self>) -> impl Future<Output = Result<Books, SqlError>> + Send + '_;
}

/// A value the schema's constraints rule out.
fn damaged(what: String) -> SqlError {
    SqlError::from(sqlx::Error::Decode(what.into()))
}

fn stock_of((free, held, sold): (i64, i64, i64)) -> Result<Stock, SqlError> {
    let unit = |n: i64| u32::try_from(n).map_err(|_| damaged(format!("a stock count of {n}")));
    Ok(Stock { free: unit(free)?, held: unit(held)?, sold: unit(sold)? })
}

fn booking_of((state, item, customer): (String, String, String)) -> Result<Booking, SqlError> {
    match state.as_str() {
        "held" => Ok(Booking::Held { item, customer }),
        "sold" => Ok(Booking::Sold { item, customer }),
        "released" => Ok(Booking::Released { item }),
        _ => Err(damaged(format!("a booking in state {state:?}"))),
    }
}

fn state_of(booking: &Booking) -> &'static str {
    match booking {
        Booking::Held { .. } => "held",
        Booking::Sold { .. } => "sold",
        Booking::Released { .. } => "released",
    }
}

/// Implements [`InventoryDb`] for `$db` with its statements.
macro_rules! inventory_db {
    ($db:ty, engine: $engine:literal, stock_for_update: $sfu:literal, write_stock: $ws:literal,
     booking_for_update: $bfu:literal, insert_booking: $ib:literal, write_booking: $wb:literal,
     stock_if_missing: $sim:literal) => {
        impl InventoryDb for $db {
            async fn stock_for_update<'c>(
                conn: &'c mut Self::Connection,
                item: &'c str,
            ) -> Result<Option<Stock>, SqlError> {
                let row: Option<(i64, i64, i64)> =
                    sqlx::query_as($sfu).bind(item).fetch_optional(conn).await?;
                row.map(stock_of).transpose()
            }

            async fn write_stock<'c>(
                conn: &'c mut Self::Connection,
                item: &'c str,
                s: Stock,
            ) -> Result<(), SqlError> {
                sqlx::query($ws)
                    .bind(i64::from(s.free))
                    .bind(i64::from(s.held))
                    .bind(i64::from(s.sold))
                    .bind(item)
                    .execute(conn)
                    .await?;
                Ok(())
            }

            async fn booking_for_update<'c>(
                conn: &'c mut Self::Connection,
                gid: &'c str,
            ) -> Result<Option<Booking>, SqlError> {
                let row: Option<(String, String, String)> =
                    sqlx::query_as($bfu).bind(gid).fetch_optional(conn).await?;
                row.map(booking_of).transpose()
            }

            async fn insert_booking<'c>(
                conn: &'c mut Self::Connection,
                gid: &'c str,
                req: &'c HoldRequest,
            ) -> Result<(), SqlError> {
                sqlx::query($ib).bind(gid).bind(&req.item).bind(&req.customer).execute(conn).await?;
                Ok(())
            }

            async fn write_booking<'c>(
                conn: &'c mut Self::Connection,
                gid: &'c str,
                booking: &'c Booking,
            ) -> Result<(), SqlError> {
                sqlx::query($wb).bind(state_of(booking)).bind(gid).execute(conn).await?;
                Ok(())
            }

            async fn create_tables(pool: &sqlx::Pool<Self>) -> Result<(), SqlError> {
                sqlx::query(concat!(
                    "CREATE TABLE IF NOT EXISTS stock (item VARCHAR(64) PRIMARY KEY, ",
                    "free BIGINT NOT NULL CHECK (free >= 0), held BIGINT NOT NULL CHECK (held >= 0), ",
                    "sold BIGINT NOT NULL CHECK (sold >= 0))",
                    $engine
                ))
                .execute(pool)
                .await?;
                sqlx::query(concat!(
                    "CREATE TABLE IF NOT EXISTS bookings (gid VARCHAR(128) PRIMARY KEY, ",
                    "state VARCHAR(16) NOT NULL, item VARCHAR(64) NOT NULL, customer VARCHAR(128) NOT NULL)",
                    $engine
                ))
                .execute(pool)
                .await?;
                Ok(())
            }

            async fn stock_if_missing<'c>(
                pool: &'c sqlx::Pool<Self>,
                item: &'c str,
                units: u32,
            ) -> Result<(), SqlError> {
                sqlx::query($sim).bind(item).bind(i64::from(units)).execute(pool).await?;
                Ok(())
            }

            async fn read_books(pool: &sqlx::Pool<Self>) -> Result<Books, SqlError> {
                let mut books = Books::default();
                let stock: Vec<(String, i64, i64, i64)> =
                    sqlx::query_as("SELECT item, free, held, sold FROM stock").fetch_all(pool).await?;
                for (item, free, held, sold) in stock {
                    books.stock.insert(item, stock_of((free, held, sold))?);
                }
                let bookings: Vec<(String, String, String, String)> =
                    sqlx::query_as("SELECT gid, state, item, customer FROM bookings").fetch_all(pool).await?;
                for (gid, state, item, customer) in bookings {
                    books.bookings.insert(gid, booking_of((state, item, customer))?);
                }
                Ok(books)
            }
        }
    };
}

inventory_db!(
    Postgres,
    engine: "",
    stock_for_update: "SELECT free, held, sold FROM stock WHERE item = $1 FOR UPDATE",
    write_stock: "UPDATE stock SET free = $1, held = $2, sold = $3 WHERE item = $4",
    booking_for_update: "SELECT state, item, customer FROM bookings WHERE gid = $1 FOR UPDATE",
    insert_booking: "INSERT INTO bookings (gid, state, item, customer) VALUES ($1, 'held', $2, $3)",
    write_booking: "UPDATE bookings SET state = $1 WHERE gid = $2",
    stock_if_missing: "INSERT INTO stock (item, free, held, sold) VALUES ($1, $2, 0, 0) ON CONFLICT (item) DO NOTHING"
);

inventory_db!(
    MySql,
    engine: " ENGINE=InnoDB",
    stock_for_update: "SELECT free, held, sold FROM stock WHERE item = ? FOR UPDATE",
    write_stock: "UPDATE stock SET free = ?, held = ?, sold = ? WHERE item = ?",
    booking_for_update: "SELECT state, item, customer FROM bookings WHERE gid = ? FOR UPDATE",
    insert_booking: "INSERT INTO bookings (gid, state, item, customer) VALUES (?, 'held', ?, ?)",
    write_booking: "UPDATE bookings SET state = ? WHERE gid = ?",
    stock_if_missing: "INSERT IGNORE INTO stock (item, free, held, sold) VALUES (?, ?, 0, 0)"
);

/// Creates the inventory's tables in `pool`'s database if missing.
pub async fn create_tables<DB: InventoryDb>(pool: &sqlx::Pool<DB>) -> Result<(), SqlError> {
    DB::create_tables(pool).await
}

/// A hold: the sled [`Inventory`](super::Inventory)'s rules on the call's transaction.
pub async fn hold<DB: InventoryDb>(
    ctx: &mut SqlContext<DB>,
    req: &HoldRequest,
) -> Result<Hold, BookingError> {
    let gid = ctx.gid().to_string();
    let stock = DB::stock_for_update(ctx.conn(), &req.item)
        .await?
        .ok_or_else(|| BookingError::Unknown(req.item.clone()))?;
    let next = stock.hold(&req.item)?;
    DB::write_stock(ctx.conn(), &req.item, next).await?;
    DB::insert_booking(ctx.conn(), &gid, req).await?;
    Ok(Hold { item: req.item.clone(), left: next.free })
}

/// A decision: the held unit moves to `sold` (confirm) or back to `free` (cancel, expiry).
pub async fn settle<DB: InventoryDb>(ctx: &mut SqlContext<DB>, sell: bool) -> Result<(), BookingError> {
    let gid = ctx.gid().to_string();
    let booking = DB::booking_for_update(ctx.conn(), &gid).await?.ok_or(BookingError::NoHold)?;
    let after = booking.settle(sell)?;
    let item = after.item();
    let stock = DB::stock_for_update(ctx.conn(), item)
        .await?
        .ok_or_else(|| BookingError::Unknown(item.to_owned()))?;
    DB::write_stock(ctx.conn(), item, stock.settle(sell)).await?;
    DB::write_booking(ctx.conn(), &gid, &after).await?;
    Ok(())
}

/// The inventory of a service on a SQL database.
#[derive(Clone, Copy, Debug, Default)]
pub struct SqlInventory;

/// Implements a service's trait on `$db` with [`hold`] and [`settle`].
macro_rules! service_on {
    ($trait:ident, $db:ty, $try_:ident, $confirm:ident, $cancel:ident) => {
        impl $trait for SqlInventory {
            async fn $try_(&self, ctx: &mut SqlContext<$db>, req: HoldRequest) -> Result<Hold, BookingError> {
                hold(ctx, &req).await
            }
            async fn $confirm(
                &self,
                ctx: &mut SqlContext<$db>,
                _req: HoldRequest,
            ) -> Result<(), BookingError> {
                settle(ctx, true).await
            }
            async fn $cancel(
                &self,
                ctx: &mut SqlContext<$db>,
                _req: HoldRequest,
            ) -> Result<(), BookingError> {
                settle(ctx, false).await
            }
        }
    };
}

service_on!(FlightsOnPostgres, Postgres, hold_seat, sell_seat, release_seat);
service_on!(FlightsOnMySql, MySql, hold_seat, sell_seat, release_seat);
service_on!(HotelsOnPostgres, Postgres, hold_room, sell_room, release_room);
service_on!(HotelsOnMySql, MySql, hold_room, sell_room, release_room);
