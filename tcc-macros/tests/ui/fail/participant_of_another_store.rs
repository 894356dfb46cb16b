use tcc_http::participant::sql::Sql;
use tcc_http::sqlx::{MySql, Postgres};
use tcc_http::{tcc, Participant, SqlContext, SqlError};

#[tcc]
pub trait Bank {
    #[tcc(confirm = debit, cancel = release)]
    async fn hold(&self, ctx: &mut SqlContext<Postgres>, cents: i64) -> Result<(), SqlError>;
    async fn debit(&self, ctx: &mut SqlContext<Postgres>, cents: i64) -> Result<(), SqlError>;
    async fn release(&self, ctx: &mut SqlContext<Postgres>, cents: i64) -> Result<(), SqlError>;
}

struct Accounts;

impl Bank for Accounts {
    async fn hold(&self, _: &mut SqlContext<Postgres>, _: i64) -> Result<(), SqlError> { Ok(()) }
    async fn debit(&self, _: &mut SqlContext<Postgres>, _: i64) -> Result<(), SqlError> { Ok(()) }
    async fn release(&self, _: &mut SqlContext<Postgres>, _: i64) -> Result<(), SqlError> { Ok(()) }
}

/// A PostgreSQL service on a MySQL participant.
fn on_mysql(p: Participant<Sql<MySql>>) {
    let _ = Accounts.into_participant(p);
}

/// A PostgreSQL service on a sled participant.
fn on_sled(p: Participant) {
    let _ = Accounts.into_participant(p);
}

fn main() {}
