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
    #[tcc(compensate = welcome)]
    async fn credit(&self, ctx: TccContext, points: Points) -> Result<(), Barred>;
    #[tcc(action)]
    async fn welcome(&self, ctx: TccContext, points: Points) -> Result<(), Barred>;
}

fn main() {}
