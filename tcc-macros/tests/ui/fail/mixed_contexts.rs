use tcc_http::sqlx::Postgres;
use tcc_http::{tcc, SqlContext, SqlError, TccContext};

#[tcc]
pub trait Bank {
    #[tcc(confirm = debit, cancel = release)]
    async fn hold(&self, ctx: &mut SqlContext<Postgres>, cents: i64) -> Result<(), SqlError>;
    async fn debit(&self, ctx: TccContext, cents: i64) -> Result<(), SqlError>;
    async fn release(&self, ctx: &mut SqlContext<Postgres>, cents: i64) -> Result<(), SqlError>;
}

fn main() {}
