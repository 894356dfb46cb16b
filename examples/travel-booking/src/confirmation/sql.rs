//! Tickets and the outbox on PostgreSQL or MySQL: the rules of [`Ticket`] and [`Mail`] on the
//! call's own database transaction (the ticket's with the message's barrier row, each e-mail's with
//! its action's).
//!
//! The schema, created by [`create_tables`] when missing (idempotent; MySQL tables `ENGINE=InnoDB`,
//! its `id` an `AUTO_INCREMENT` column):
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS tickets (
//!     gid VARCHAR(128) PRIMARY KEY,       -- the message
//!     booking VARCHAR(128) NOT NULL,      -- the trip's transaction
//!     customer VARCHAR(128) NOT NULL
//! );
//! CREATE TABLE IF NOT EXISTS outbox (
//!     id BIGSERIAL PRIMARY KEY,           -- one row per write: a second copy would show
//!     gid VARCHAR(128) NOT NULL,          -- the message
//!     customer VARCHAR(128) NOT NULL,
//!     booking VARCHAR(128) NOT NULL
//! );
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::marker::PhantomData;

use tcc_http::participant::sql::SqlAction;
use tcc_http::sqlx::{self, MySql, Postgres};
use tcc_http::{SqlContext, SqlError};

use super::{Mail, MailRequest, Ticket, TicketRequest};
use crate::api::BookingError;
use crate::inventory::sql::InventoryDb;

/// The ticket and outbox statements of one database (written once, in `confirmation_db!`).
pub trait ConfirmationDb: InventoryDb {
    /// Records the ticket of message `gid`.
    fn insert_ticket<'c>(
        conn: &'c mut Self::Connection,
        gid: &'c str,
        ticket: &'c Ticket,
    ) -> impl Future<Output = Result<(), SqlError>> + Send + 'c;
    /// Writes one e-mail of message `gid` to the outbox.
    fn insert_mail<'c>(
        conn: &'c mut Self::Connection,
        gid: &'c str,
        req: &'c MailRequest,
    ) -> impl Future<Output = Result<(), SqlError>> + Send + 'c;
    /// Creates the two tables if missing.
    fn create_confirmation_tables(
        pool: &sqlx::Pool<Self>,
    ) -> impl Future<Output = Result<(), SqlError>> + Send + '_;
    /// Every ticket and every e-mail (its copies counted) by message id.
    #[allow(clippy::type_complexity)]
    fn read_confirmations(
        pool: &sqlx::Pool<Self>,
    ) -> impl Future<Output = Result<(BTreeMap<String, Ticket>, BTreeMap<String, Mail>), SqlError>> + Send + '_;
}

macro_rules! confirmation_db {
    ($db:ty, engine: $engine:literal, id: $id:literal, insert_ticket: $it:literal, insert_mail: $im:literal) => {
        impl ConfirmationDb for $db {
            async fn insert_ticket<'c>(
                conn: &'c mut Self::Connection,
                gid: &'c str,
                ticket: &'c Ticket,
            ) -> Result<(), SqlError> {
                sqlx::query($it).bind(gid).bind(&ticket.booking).bind(&ticket.customer).execute(conn).await?;
                Ok(())
            }

            async fn insert_mail<'c>(
                conn: &'c mut Self::Connection,
                gid: &'c str,
                req: &'c MailRequest,
            ) -> Result<(), SqlError> {
                sqlx::query($im).bind(gid).bind(&req.customer).bind(&req.booking).execute(conn).await?;
                Ok(())
            }

            async fn create_confirmation_tables(pool: &sqlx::Pool<Self>) -> Result<(), SqlError> {
                sqlx::query(concat!(
                    "CREATE TABLE IF NOT EXISTS tickets (gid VARCHAR(128) PRIMARY KEY, ",
                    "booking VARCHAR(128) NOT NULL, customer VARCHAR(128) NOT NULL)",
                    $engine
                ))
                .execute(pool)
                .await?;
                sqlx::query(concat!(
                    "CREATE TABLE IF NOT EXISTS outbox (",
                    $id,
                    ", gid VARCHAR(128) NOT NULL, customer VARCHAR(128) NOT NULL, booking VARCHAR(128) NOT NULL)",
                    $engine
                ))
                .execute(pool)
                .await?;
                Ok(())
            }

            async fn read_confirmations(
                pool: &sqlx::Pool<Self>,
            ) -> Result<(BTreeMap<String, Ticket>, BTreeMap<String, Mail>), SqlError> {
                let rows: Vec<(String, String, String)> =
                    sqlx::query_as("SELECT gid, booking, customer FROM tickets").fetch_all(pool).await?;
                let tickets =
                    rows.into_iter().map(|(gid, booking, customer)| (gid, Ticket { booking, customer })).collect();
                let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
                    "SELECT gid, customer, booking, COUNT(*) FROM outbox GROUP BY gid, customer, booking",
                )
                .fetch_all(pool)
                .await?;
                let mut outbox: BTreeMap<String, Mail> = BTreeMap::new();
                for (gid, customer, booking, n) in rows {
                    let n = u32::try_from(n).unwrap_or(u32::MAX);
                    outbox
                        .entry(gid)
                        .and_modify(|m| m.copies = m.copies.saturating_add(n))
                        .or_insert(Mail { customer, booking, copies: n });
                }
                Ok((tickets, outbox))
            }
        }
    };
}

confirmation_db!(
    Postgres,
    engine: "",
    id: "id BIGSERIAL PRIMARY KEY",
    insert_ticket: "INSERT INTO tickets (gid, booking, customer) VALUES ($1, $2, $3)",
    insert_mail: "INSERT INTO outbox (gid, customer, booking) VALUES ($1, $2, $3)"
);

confirmation_db!(
    MySql,
    engine: " ENGINE=InnoDB",
    id: "id BIGINT AUTO_INCREMENT PRIMARY KEY",
    insert_ticket: "INSERT INTO tickets (gid, booking, customer) VALUES (?, ?, ?)",
    insert_mail: "INSERT INTO outbox (gid, customer, booking) VALUES (?, ?, ?)"
);

/// Creates the ticket and outbox tables in `pool`'s database if missing.
pub async fn create_tables<DB: ConfirmationDb>(pool: &sqlx::Pool<DB>) -> Result<(), SqlError> {
    DB::create_confirmation_tables(pool).await
}

/// Issues the ticket on SQL: the local transaction of the message `ctx.gid()`, in its transaction.
pub(crate) async fn issue<DB: ConfirmationDb>(
    ctx: &mut SqlContext<DB>,
    req: TicketRequest,
) -> Result<Ticket, BookingError> {
    let gid = ctx.gid().to_string();
    let booking = DB::booking_for_update(ctx.conn(), &req.booking).await?;
    let ticket = Ticket::issue(&req, booking.as_ref())?;
    DB::insert_ticket(ctx.conn(), &gid, &ticket).await?;
    Ok(ticket)
}

/// The outbox of a service on a SQL database: the message action writing a confirmation e-mail.
#[derive(Debug)]
pub struct SqlOutbox<DB>(PhantomData<fn() -> DB>);

impl<DB> Default for SqlOutbox<DB> {
    fn default() -> Self {
        SqlOutbox(PhantomData)
    }
}

impl<DB: ConfirmationDb> SqlAction for SqlOutbox<DB> {
    type Db = DB;
    type Request = MailRequest;
    type Error = BookingError;

    async fn action(&self, ctx: &mut SqlContext<DB>, req: MailRequest) -> Result<(), BookingError> {
        let gid = ctx.gid().to_string();
        DB::insert_mail(ctx.conn(), &gid, &req).await?;
        Ok(())
    }
}
