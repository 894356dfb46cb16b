use serde::{Deserialize, Serialize};
use tcc_http::{tcc, TccContext, TccError};

#[derive(Debug, Serialize, Deserialize)]
pub struct Points(pub u32);

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("barred")]
pub struct Barred;

impl TccError for Barred {}

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("other")]
pub struct Other;

impl TccError for Other {}

#[tcc]
pub trait Loyalty {
    #[tcc(compensate = debit)]
    async fn credit(&self, ctx: TccContext, points: Points) -> Result<(), Barred>;
    /// Another error type than the action's.
    async fn debit(&self, ctx: TccContext, points: Points) -> Result<(), Other>;
    #[tcc(compensate = unstamp)]
    async fn stamp(&self, ctx: TccContext, points: Points) -> Result<(), Barred>;
    /// A result.
    async fn unstamp(&self, ctx: TccContext, points: Points) -> Result<u32, Barred>;
}

fn main() {}
