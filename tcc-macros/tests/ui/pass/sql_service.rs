//! A service whose methods run statements in the participant's PostgreSQL transaction, with an
//! error type holding a database error, and one on MySQL.
use serde::{Deserialize, Serialize};
use tcc_http::participant::sql::Sql;
use tcc_http::sqlx::{MySql, Postgres};
use tcc_http::{tcc, Disposition, Participant, SqlContext, SqlError, TccError};

#[derive(Debug, thiserror::Error, Serialize, Deserialize)]
pub enum BankError {
    #[error("account {0} lacks the funds")]
    Insufficient(String),
    #[error(transparent)]
    Db(#[from] SqlError),
}

impl TccError for BankError {
    fn disposition(&self) -> Disposition {
        match self {
            BankError::Db(e) => e.disposition(),
            BankError::Insufficient(_) => Disposition::Refuse,
        }
    }
}

#[tcc]
pub trait Bank {
    /// Holds money.
    #[tcc(confirm = debit, cancel = release)]
    async fn hold(&self, ctx: &mut SqlContext<Postgres>, account: String, cents: i64) -> Result<u64, BankError>;
    async fn debit(&self, ctx: &mut SqlContext<Postgres>, account: String, cents: i64) -> Result<(), BankError>;
    async fn release(&self, ctx: &mut SqlContext<Postgres>, account: String, cents: i64) -> Result<(), BankError>;
}

struct Accounts;

impl Bank for Accounts {
    async fn hold(&self, ctx: &mut SqlContext<Postgres>, account: String, cents: i64) -> Result<u64, BankError> {
        let done = tcc_http::sqlx::query("UPDATE accounts SET free = free - $2 WHERE id = $1 AND free >= $2")
            .bind(&account)
            .bind(cents)
            .execute(ctx.conn())
            .await
            .map_err(SqlError::from)?;
        if done.rows_affected() == 0 {
            return Err(BankError::Insufficient(account));
        }
        Ok(done.rows_affected())
    }
    async fn debit(&self, _ctx: &mut SqlContext<Postgres>, _account: String, _cents: i64) -> Result<(), BankError> {
        Ok(())
    }
    async fn release(&self, ctx: &mut SqlContext<Postgres>, account: String, cents: i64) -> Result<(), BankError> {
        tcc_http::sqlx::query("UPDATE accounts SET free = free + $2 WHERE id = $1")
            .bind(&account)
            .bind(cents)
            .execute(ctx.conn())
            .await
            .map_err(SqlError::from)?;
        Ok(())
    }
}

/// An error holding nothing but a database error.
#[derive(Debug, thiserror::Error, Serialize, Deserialize)]
#[error("ledger: {0}")]
pub struct LedgerError(#[from] SqlError);

impl TccError for LedgerError {}

#[tcc(client = LedgerStub)]
pub trait Ledger {
    #[tcc(confirm = post, cancel = drop_entry)]
    async fn stage(&self, ctx: &mut SqlContext<MySql>, entry: String) -> Result<(), LedgerError>;
    async fn post(&self, ctx: &mut SqlContext<MySql>, entry: String) -> Result<(), LedgerError>;
    async fn drop_entry(&self, ctx: &mut SqlContext<MySql>, entry: String) -> Result<(), LedgerError>;
}

fn wire(pg: Participant<Sql<Postgres>>) -> Participant<Sql<Postgres>> {
    Accounts.into_participant(pg)
}

fn main() {
    let _ = wire;
}
