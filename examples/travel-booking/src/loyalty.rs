//! Loyalty awards as saga steps: after a booking, the agency awards the customer miles at the
//! flight service and points at the hotel service in one saga. A saga, not TCC, because an award
//! holds nothing: it is done at once and, if a later step refuses, taken back (a visible reversal
//! on the customer's statement). The hotel refuses points to a customer whose loyalty account
//! there is blocked ([`Kind::blocked`](crate::service::Kind::blocked)); the saga then compensates
//! the miles already awarded.
//!
//! The one set of rules ([`Award::grant`], [`Award::take_back`]) runs on sled here ([`Loyalty`]:
//! the tree `awards` maps a saga's id to its [`Award`], the tree `blocked` holds blocked accounts)
//! and on PostgreSQL and MySQL in [`sql`]. The barrier runs an action once, a compensation once and
//! only after its action, and refuses an action arriving after its compensation, so an award is
//! written once and taken back at most once.

use serde::{Deserialize, Serialize};
use tcc_http::TccContext;
use tcc_http::staged::{AsyncAction, AsyncStep};

use crate::api::BookingError;

pub mod sql;

/// The business tree of awards by saga id.
pub const AWARDS: &str = "awards";
/// The business tree of blocked loyalty accounts (customer → `true`).
pub const BLOCKED: &str = "blocked";

/// The step at the flight service (miles), served at `{flights}/miles/action` and `…/compensate`.
pub const MILES_STEP: &str = "miles";
/// The step at the hotel service (points), served at `{hotels}/points/action` and `…/compensate`.
pub const POINTS_STEP: &str = "points";

/// What a loyalty step awards: `amount` miles or points to `customer`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwardRequest {
    /// Who earns them.
    pub customer: String,
    /// How many.
    pub amount: u32,
}

/// What a service did for one loyalty saga.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Award {
    /// Awarded and standing.
    Awarded {
        /// The customer.
        customer: String,
        /// Miles or points.
        amount: u32,
    },
    /// Awarded, then taken back by the saga's compensation.
    TakenBack {
        /// The customer.
        customer: String,
        /// Miles or points.
        amount: u32,
    },
}

impl Award {
    /// The rule of an award: granted unless the customer's account here is blocked (a refusal,
    /// which turns the saga back).
    pub fn grant(req: &AwardRequest, blocked: bool) -> Result<Award, BookingError> {
        if blocked {
            return Err(BookingError::Blocked(req.customer.clone()));
        }
        Ok(Award::Awarded { customer: req.customer.clone(), amount: req.amount })
    }

    /// The rule of a compensation: a standing award is taken back; anything else has nothing to
    /// take back (the barrier runs a compensation once, so this is a bug elsewhere).
    pub fn take_back(self) -> Result<Award, BookingError> {
        match self {
            Award::Awarded { customer, amount } => Ok(Award::TakenBack { customer, amount }),
            Award::TakenBack { .. } => Err(BookingError::NoAward),
        }
    }

    /// Whether the award stands.
    pub fn stands(&self) -> bool {
        matches!(self, Award::Awarded { .. })
    }

    /// The customer.
    pub fn customer(&self) -> &str {
        match self {
            Award::Awarded { customer, .. } | Award::TakenBack { customer, .. } => customer,
        }
    }
}

/// The loyalty step of a service on sled (the same at both services: miles or points).
#[derive(Clone, Copy, Debug, Default)]
pub struct Loyalty;

impl AsyncAction for Loyalty {
    type Request = AwardRequest;
    type Error = BookingError;

    async fn action(&self, ctx: TccContext, req: AwardRequest) -> Result<(), BookingError> {
        let blocked = ctx.get::<bool>(BLOCKED, &req.customer)?.is_some_and(|b| b.value);
        let award = Award::grant(&req, blocked)?;
        ctx.insert_new(AWARDS, ctx.gid().as_str(), &award)?;
        Ok(())
    }
}

impl AsyncStep for Loyalty {
    async fn compensate(&self, ctx: TccContext, _req: AwardRequest) -> Result<(), BookingError> {
        let award = ctx.get::<Award>(AWARDS, ctx.gid().as_str())?.ok_or(BookingError::NoAward)?;
        ctx.put(AWARDS, ctx.gid().as_str(), &award.value.take_back()?, award.version)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_blocked_account_refuses_the_award_and_others_get_it() {
        let req = AwardRequest { customer: "mallory".into(), amount: 500 };
        assert!(matches!(Award::grant(&req, true), Err(BookingError::Blocked(c)) if c == "mallory"));
        let award = Award::grant(&req, false).unwrap();
        assert!(award.stands());
        assert_eq!(award, Award::Awarded { customer: "mallory".into(), amount: 500 });
    }

    #[test]
    fn an_award_is_taken_back_once() {
        let req = AwardRequest { customer: "ada".into(), amount: 120 };
        let back = Award::grant(&req, false).unwrap().take_back().unwrap();
        assert!(!back.stands());
        assert!(matches!(back.take_back(), Err(BookingError::NoAward)));
    }
}
