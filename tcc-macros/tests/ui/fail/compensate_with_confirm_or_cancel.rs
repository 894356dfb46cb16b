use serde::{Deserialize, Serialize};
use tcc_http::{tcc, TccContext, TccError};

#[derive(Debug, Serialize, Deserialize)]
pub struct Points(pub u32);

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("barred")]
pub struct Barred;

impl TccError for Barred {}

#[tcc]
pub trait Loyalty {
    #[tcc(confirm = redeem, cancel = release, compensate = release)]
    async fn hold(&self, ctx: TccContext, points: Points) -> Result<(), Barred>;
    async fn redeem(&self, ctx: TccContext, points: Points) -> Result<(), Barred>;
    async fn release(&self, ctx: TccContext, points: Points) -> Result<(), Barred>;
    #[tcc(compensate = debit, branch = "credit")]
    async fn credit(&self, ctx: TccContext, points: Points) -> Result<(), Barred>;
    async fn debit(&self, ctx: TccContext, points: Points) -> Result<(), Barred>;
}

fn main() {}
