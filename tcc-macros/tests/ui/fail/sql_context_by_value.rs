use tcc_http::sqlx::Postgres;
use tcc_http::{tcc, SqlContext, SqlError};

#[tcc]
pub trait Bank {
    #[tcc(confirm = debit, cancel = release)]
    async fn hold(&self, ctx: SqlContext<Postgres>, cents: i64) -> Result<(), SqlError>;
    async fn debit(&self, ctx: &SqlContext<Postgres>, cents: i64) -> Result<(), SqlError>;
    async fn release(&self, ctx: &mut SqlContext, cents: i64) -> Result<(), SqlError>;
}

fn main() {}
