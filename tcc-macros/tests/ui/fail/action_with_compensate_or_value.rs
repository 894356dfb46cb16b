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
    #[tcc(action, compensate = retract)]
    async fn welcome(&self, ctx: TccContext, customer: String) -> Result<(), Barred>;
    async fn retract(&self, ctx: TccContext, customer: String) -> Result<(), Barred>;
    #[tcc(action = true)]
    async fn remind(&self, ctx: TccContext, customer: String) -> Result<(), Barred>;
    #[tcc(compensate)]
    async fn credit(&self, ctx: TccContext, customer: String) -> Result<(), Barred>;
}

fn main() {}
