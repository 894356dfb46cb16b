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
    async fn debit(&self, ctx: TccContext, points: Points) -> Result<(), Barred>;
    #[tcc(compensate = debit)]
    async fn bonus(&self, ctx: TccContext, points: Points) -> Result<(), Barred>;
    #[tcc(confirm = debit2, cancel = credit2)]
    async fn hold(&self, ctx: TccContext, points: Points) -> Result<(), Barred>;
    async fn debit2(&self, ctx: TccContext, points: Points) -> Result<(), Barred>;
    async fn credit2(&self, ctx: TccContext, points: Points) -> Result<(), Barred>;
    /// A compensation that is also a confirm.
    #[tcc(compensate = debit2)]
    async fn gift(&self, ctx: TccContext, points: Points) -> Result<(), Barred>;
}

fn main() {}
