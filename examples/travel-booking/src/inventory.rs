//! The one business logic both services share, on every backend: the rules of a hold and of a
//! decision ([`Stock::hold`], [`Stock::settle`], [`Booking::settle`]), and their sled implementation
//! ([`Inventory`]); [`sql`] runs the same rules on PostgreSQL and MySQL.
//!
//! On sled, stock is kept with a version column.
//! The tree `stock` maps an item to its [`Stock`] (free, held, sold); the tree `bookings` maps a
//! transaction id to what this service did for it ([`Booking`]), which the [`ledger`](crate::ledger)
//! reads. Every update goes through `TccContext::put` with the version it read: it commits only if
//! that version is still current, together with the barrier record. When two buyers race for the
//! last unit, one commit wins; the runtime runs the loser again on fresh reads, and it is then
//! refused (sold out) or holds the next unit.

use serde::{Deserialize, Serialize};
use tcc_http::TccContext;

use crate::api::{BookingError, Flights, Hold, HoldRequest, Hotels};

pub mod sql;

/// The business tree of stock levels.
pub const STOCK: &str = "stock";
/// The business tree of bookings by transaction id.
pub const BOOKINGS: &str = "bookings";

/// The stock of one item.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    /// Units anyone may hold.
    pub free: u32,
    /// Units held by bookings not decided yet.
    pub held: u32,
    /// Units sold.
    pub sold: u32,
}

impl Stock {
    /// Every unit, whatever its state: constant for an item.
    pub fn total(&self) -> u32 {
        self.free + self.held + self.sold
    }
}

/// What a service did for one booking (one transaction).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Booking {
    /// A unit of `item` is held for `customer`.
    Held {
        /// The item.
        item: String,
        /// The customer.
        customer: String,
    },
    /// Sold.
    Sold {
        /// The item.
        item: String,
        /// The customer.
        customer: String,
    },
    /// Released (cancelled, or expired at deadline plus grace).
    Released {
        /// The item.
        item: String,
    },
}

impl Stock {
    /// The rule of a hold: one unit moves from `free` to `held`; refused when none is free.
    pub fn hold(self, item: &str) -> Result<Stock, BookingError> {
        if self.free == 0 {
            return Err(BookingError::SoldOut(item.to_owned()));
        }
        Ok(Stock { free: self.free - 1, held: self.held + 1, ..self })
    }

    /// The rule of a decision: the held unit moves to `sold` (confirm) or back to `free` (cancel,
    /// expiry).
    pub fn settle(self, sell: bool) -> Stock {
        let held = self.held.saturating_sub(1);
        if sell {
            Stock { held, sold: self.sold + 1, ..self }
        } else {
            Stock { held, free: self.free + 1, ..self }
        }
    }
}

impl Booking {
    /// The booking a hold records.
    pub fn held(req: &HoldRequest) -> Booking {
        Booking::Held { item: req.item.clone(), customer: req.customer.clone() }
    }

    /// The item booked.
    pub fn item(&self) -> &str {
        match self {
            Booking::Held { item, .. } | Booking::Sold { item, .. } | Booking::Released { item } => item,
        }
    }

    /// The rule of a decision on the booking: a held one becomes sold or released; anything else
    /// has no hold to decide.
    pub fn settle(self, sell: bool) -> Result<Booking, BookingError> {
        let Booking::Held { item, customer } = self else {
            // The barrier runs confirm and cancel once; a settled booking here is a bug elsewhere.
            return Err(BookingError::NoHold);
        };
        Ok(if sell { Booking::Sold { item, customer } } else { Booking::Released { item } })
    }
}

/// A service selling units of items from sled: seats on flights or rooms in hotels.
#[derive(Clone, Copy, Debug, Default)]
pub struct Inventory;

impl Inventory {
    async fn hold(&self, ctx: &TccContext, req: &HoldRequest) -> Result<Hold, BookingError> {
        let stock =
            ctx.get::<Stock>(STOCK, &req.item)?.ok_or_else(|| BookingError::Unknown(req.item.clone()))?;
        let next = stock.value.hold(&req.item)?;
        ctx.put(STOCK, &req.item, &next, stock.version)?;
        ctx.insert_new(BOOKINGS, ctx.gid().as_str(), &Booking::held(req))?;
        Ok(Hold { item: req.item.clone(), left: next.free })
    }

    /// Moves the held unit to `sold` (confirm) or back to `free` (cancel).
    async fn settle(&self, ctx: &TccContext, sell: bool) -> Result<(), BookingError> {
        let booking = ctx.get::<Booking>(BOOKINGS, ctx.gid().as_str())?.ok_or(BookingError::NoHold)?;
        let after = booking.value.settle(sell)?;
        let item = after.item();
        let stock = ctx.get::<Stock>(STOCK, item)?.ok_or_else(|| BookingError::Unknown(item.to_owned()))?;
        ctx.put(STOCK, item, &stock.value.settle(sell), stock.version)?;
        ctx.put(BOOKINGS, ctx.gid().as_str(), &after, booking.version)?;
        Ok(())
    }
}

impl Flights for Inventory {
    async fn hold_seat(&self, ctx: TccContext, req: HoldRequest) -> Result<Hold, BookingError> {
        self.hold(&ctx, &req).await
    }
    async fn sell_seat(&self, ctx: TccContext, _req: HoldRequest) -> Result<(), BookingError> {
        self.settle(&ctx, true).await
    }
    async fn release_seat(&self, ctx: TccContext, _req: HoldRequest) -> Result<(), BookingError> {
        self.settle(&ctx, false).await
    }
}

impl Hotels for Inventory {
    async fn hold_room(&self, ctx: TccContext, req: HoldRequest) -> Result<Hold, BookingError> {
        self.hold(&ctx, &req).await
    }
    async fn sell_room(&self, ctx: TccContext, _req: HoldRequest) -> Result<(), BookingError> {
        self.settle(&ctx, true).await
    }
    async fn release_room(&self, ctx: TccContext, _req: HoldRequest) -> Result<(), BookingError> {
        self.settle(&ctx, false).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_hold_takes_a_free_unit_and_the_last_one_leaves_the_next_buyer_refused() {
        let stock = Stock { free: 1, held: 0, sold: 0 };
        let held = stock.hold("TC42").unwrap();
        assert_eq!(held, Stock { free: 0, held: 1, sold: 0 });
        assert!(matches!(held.hold("TC42"), Err(BookingError::SoldOut(item)) if item == "TC42"));
    }

    #[test]
    fn a_decision_moves_the_held_unit_to_sold_or_back_to_free_and_keeps_the_total() {
        let held = Stock { free: 3, held: 2, sold: 1 };
        assert_eq!(held.settle(true), Stock { free: 3, held: 1, sold: 2 });
        assert_eq!(held.settle(false), Stock { free: 4, held: 1, sold: 1 });
        assert_eq!(held.settle(true).total(), held.total());
    }

    #[test]
    fn only_a_held_booking_can_be_decided() {
        let req = HoldRequest { item: "Ritz".into(), customer: "ada".into() };
        let sold = Booking::held(&req).settle(true).unwrap();
        assert_eq!(sold, Booking::Sold { item: "Ritz".into(), customer: "ada".into() });
        assert_eq!(Booking::held(&req).settle(false).unwrap(), Booking::Released { item: "Ritz".into() });
        assert!(matches!(sold.settle(false), Err(BookingError::NoHold)));
    }
}
