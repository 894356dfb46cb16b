use serde::{Deserialize, Serialize};
use tcc_http::{tcc, TccContext};

#[derive(Debug, Serialize, Deserialize)]
pub struct Barred;

impl std::fmt::Display for Barred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("barred")
    }
}

#[tcc]
pub trait Loyalty {
    #[tcc(compensate = debit)]
    async fn credit(&self, ctx: TccContext, points: u32) -> Result<(), Barred>;
    async fn debit(&self, ctx: TccContext, points: u32) -> Result<(), Barred>;
    #[tcc(action)]
    async fn welcome(&self, ctx: TccContext, customer: String) -> Result<(), std::io::Error>;
}

fn main() {}
