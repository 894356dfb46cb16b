//! Saga steps and a message action whose methods run statements in the participant's SQL
//! transaction (PostgreSQL and MySQL), registered with `sql_step` / `sql_action`.
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tcc_http::client::{ClientError, TccClient};
use tcc_http::participant::sql::Sql;
use tcc_http::sqlx::{MySql, Postgres};
use tcc_http::{tcc, Participant, SqlContext, SqlError, TccError};

#[derive(Debug, thiserror::Error, Serialize, Deserialize)]
pub enum PayError {
    #[error("card {0} declined")]
    Declined(String),
    #[error(transparent)]
    Db(#[from] SqlError),
}

impl TccError for PayError {}

#[tcc]
pub trait Payments {
    /// Charges a card.
    #[tcc(compensate = refund)]
    async fn charge(&self, ctx: &mut SqlContext<Postgres>, card: String, cents: i64) -> Result<(), PayError>;
    /// Gives the money back.
    async fn refund(&self, ctx: &mut SqlContext<Postgres>, card: String, cents: i64) -> Result<(), PayError>;
    /// Sends the receipt.
    #[tcc(action)]
    async fn receipt(&self, ctx: &mut SqlContext<Postgres>, card: String) -> Result<(), PayError>;
}

struct Cards;

impl Payments for Cards {
    async fn charge(&self, ctx: &mut SqlContext<Postgres>, card: String, cents: i64) -> Result<(), PayError> {
        let done = tcc_http::sqlx::query("UPDATE cards SET balance = balance - $2 WHERE id = $1 AND balance >= $2")
            .bind(&card)
            .bind(cents)
            .execute(ctx.conn())
            .await
            .map_err(SqlError::from)?;
        if done.rows_affected() == 0 {
            return Err(PayError::Declined(card));
        }
        Ok(())
    }
    async fn refund(&self, ctx: &mut SqlContext<Postgres>, card: String, cents: i64) -> Result<(), PayError> {
        tcc_http::sqlx::query("UPDATE cards SET balance = balance + $2 WHERE id = $1")
            .bind(&card)
            .bind(cents)
            .execute(ctx.conn())
            .await
            .map_err(SqlError::from)?;
        Ok(())
    }
    async fn receipt(&self, _ctx: &mut SqlContext<Postgres>, _card: String) -> Result<(), PayError> {
        Ok(())
    }
}

/// The same shapes on MySQL, with a renamed client.
#[tcc(client = MailStub)]
pub trait Mail {
    #[tcc(action)]
    async fn send(&self, ctx: &mut SqlContext<MySql>, to: String) -> Result<(), PayError>;
    #[tcc(compensate = unqueue)]
    async fn queue(&self, ctx: &mut SqlContext<MySql>, to: String) -> Result<(), PayError>;
    async fn unqueue(&self, ctx: &mut SqlContext<MySql>, to: String) -> Result<(), PayError>;
}

fn wire(pg: Participant<Sql<Postgres>>) -> Participant<Sql<Postgres>> {
    Cards.into_participant(pg)
}

async fn initiate(tcc: &TccClient) -> Result<(), ClientError> {
    let payments = PaymentsClient::new("http://127.0.0.1:8083/tcc/payments");
    let mail = MailStub::new("http://127.0.0.1:8084/tcc/mail");
    let saga = payments.charge(tcc.saga(Duration::from_secs(30)), "4242".into(), 120)?;
    let saga = mail.queue(saga, "ada@example.com".into())?;
    saga.submit().await?;
    let message = payments.receipt(tcc.message(Duration::from_secs(30)), "4242".into())?;
    let message = mail.send(message, "ada@example.com".into())?;
    message.submit().await?;
    Ok(())
}

fn main() {
    let _ = (wire, initiate);
}
