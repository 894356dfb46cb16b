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
    #[tcc(compensate = debit)]
    async fn credit(&self, ctx: TccContext, points: Points) -> Result<(), Barred>;
    async fn debit(&self, ctx: TccContext, points: u32) -> Result<(), Barred>;
    #[tcc(compensate = unstamp)]
    async fn stamp(&self, ctx: TccContext, customer: String, stamps: u8) -> Result<(), Barred>;
    async fn unstamp(&self, ctx: TccContext, customer: String) -> Result<(), Barred>;
}

fn main() {}
