//! Saga steps and message actions next to a TCC operation on sled: the participant side and the
//! typed client stubs that add them to a saga or a message.
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tcc_http::client::{ClientError, TccClient};
use tcc_http::participant::Participant;
use tcc_http::staged::StoreError;
use tcc_http::{tcc, TccContext, TccError};

#[derive(Debug, Serialize, Deserialize)]
pub struct Points {
    pub customer: String,
    pub points: u32,
}

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
pub enum LoyaltyError {
    #[error("{0} may not collect points")]
    Barred(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TccError for LoyaltyError {}

/// The loyalty service.
#[tcc]
pub trait Loyalty {
    /// Holds points for a redemption.
    #[tcc(confirm = redeem, cancel = release)]
    async fn hold(&self, ctx: TccContext, req: Points) -> Result<u32, LoyaltyError>;
    async fn redeem(&self, ctx: TccContext, req: Points) -> Result<(), LoyaltyError>;
    async fn release(&self, ctx: TccContext, req: Points) -> Result<(), LoyaltyError>;

    /// Credits points: a saga step.
    #[tcc(compensate = debit)]
    async fn credit(&self, ctx: TccContext, req: Points) -> Result<(), LoyaltyError>;
    /// Takes the credited points back.
    async fn debit(&self, ctx: TccContext, req: Points) -> Result<(), LoyaltyError>;

    /// A step with two parameters (a JSON array) and one with none (`null`).
    #[tcc(compensate = unstamp)]
    async fn stamp(&self, ctx: TccContext, customer: String, stamps: u8) -> Result<(), LoyaltyError>;
    async fn unstamp(&self, ctx: TccContext, customer: String, stamps: u8) -> Result<(), LoyaltyError>;
    #[tcc(compensate = unpoke)]
    async fn poke(&self, ctx: TccContext) -> Result<(), LoyaltyError>;
    async fn unpoke(&self, ctx: TccContext) -> Result<(), LoyaltyError>;

    /// Sends the welcome mail: a message action. Its parameter is named like the builder's.
    #[tcc(action)]
    async fn welcome(&self, ctx: TccContext, message: String) -> Result<(), LoyaltyError>;
}

struct Service;

impl Loyalty for Service {
    async fn hold(&self, _ctx: TccContext, req: Points) -> Result<u32, LoyaltyError> {
        Ok(req.points)
    }
    async fn redeem(&self, _ctx: TccContext, _req: Points) -> Result<(), LoyaltyError> {
        Ok(())
    }
    async fn release(&self, _ctx: TccContext, _req: Points) -> Result<(), LoyaltyError> {
        Ok(())
    }
    async fn credit(&self, ctx: TccContext, req: Points) -> Result<(), LoyaltyError> {
        if req.customer == "eve" {
            return Err(LoyaltyError::Barred(req.customer));
        }
        ctx.insert_new("points", &req.customer, &req.points)?;
        Ok(())
    }
    async fn debit(&self, _ctx: TccContext, _req: Points) -> Result<(), LoyaltyError> {
        Ok(())
    }
    async fn stamp(&self, _ctx: TccContext, _customer: String, _stamps: u8) -> Result<(), LoyaltyError> {
        Ok(())
    }
    async fn unstamp(&self, _ctx: TccContext, _customer: String, _stamps: u8) -> Result<(), LoyaltyError> {
        Ok(())
    }
    async fn poke(&self, _ctx: TccContext) -> Result<(), LoyaltyError> {
        Ok(())
    }
    async fn unpoke(&self, _ctx: TccContext) -> Result<(), LoyaltyError> {
        Ok(())
    }
    async fn welcome(&self, _ctx: TccContext, _message: String) -> Result<(), LoyaltyError> {
        Ok(())
    }
}

fn serve(participant: Participant) -> Participant {
    Service.into_participant(participant)
}

async fn initiate(tcc: &TccClient) -> Result<(), ClientError> {
    let loyalty = LoyaltyClient::new("http://127.0.0.1:8085/tcc/loyalty");
    let saga = tcc.saga(Duration::from_secs(30));
    let saga = loyalty.credit(saga, Points { customer: "ada".into(), points: 120 })?;
    let saga = loyalty.stamp(saga, "ada".into(), 2)?;
    let saga = loyalty.poke(saga)?;
    saga.submit().await?;

    let message = loyalty.welcome(tcc.message(Duration::from_secs(30)), "ada".into())?;
    message.submit().await?;
    Ok(())
}

fn main() {
    let _ = (serve, initiate);
}
