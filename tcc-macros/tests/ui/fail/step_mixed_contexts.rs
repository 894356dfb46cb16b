use tcc_http::sqlx::Postgres;
use tcc_http::{tcc, SqlContext, SqlError, TccContext};

#[tcc]
pub trait Loyalty {
    #[tcc(compensate = debit)]
    async fn credit(&self, ctx: &mut SqlContext<Postgres>, points: u32) -> Result<(), SqlError>;
    async fn debit(&self, ctx: TccContext, points: u32) -> Result<(), SqlError>;
    #[tcc(action)]
    async fn welcome(&self, ctx: TccContext, customer: String) -> Result<(), SqlError>;
}

fn main() {}
