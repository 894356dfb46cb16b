//! Stock kept with a version column, the one business logic both services share.
//!
//! The tree `stock` maps an item to its [`Stock`] (free, held, sold); the tree `bookings` maps a
//! transaction id to what this service did for it ([`Booking`]), which the [`ledger`](crate::ledger)
//! reads. Every update goes through `TccContext::put` with the version it read: it commits only if
//! that version is still current, together with the barrier record. When two buyers race for the
//! last unit, one commit wins; the runtime runs the loser again on fresh reads, and it is then
//! refused (sold out) or holds the next unit.

use serde::{Deserialize, Serialize};
use tcc_http::TccContext;

use crate::api::{BookingError, Flights, Hold, HoldRequest, Hotels};

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

/// A service selling units of items: seats on flights or rooms in hotels.
#[derive(Clone, Copy, Debug, Default)]
pub struct Inventory;

impl Inventory {
    async fn hold(&self, ctx: &TccContext, req: &HoldRequest) -> Result<Hold, BookingError> {
        let stock =
            ctx.get::<Stock>(STOCK, &req.item)?.ok_or_else(|| BookingError::Unknown(req.item.clone()))?;
        if stock.value.free == 0 {
            return Err(BookingError::SoldOut(req.item.clone()));
        }
        let next = Stock { free: stock.value.free - 1, held: stock.value.held + 1, ..stock.value };
        ctx.put(STOCK, &req.item, &next, stock.version)?;
        let booking = Booking::Held { item: req.item.clone(), customer: req.customer.clone() };
        ctx.insert_new(BOOKINGS, ctx.gid().as_str(), &booking)?;
        Ok(Hold { item: req.item.clone(), left: next.free })
    }

    /// Moves the held unit to `sold` (confirm) or back to `free` (cancel).
    async fn settle(&self, ctx: &TccContext, req: &HoldRequest, sell: bool) -> Result<(), BookingError> {
        let booking = ctx.get::<Booking>(BOOKINGS, ctx.gid().as_str())?.ok_or(BookingError::NoHold)?;
        let Booking::Held { item, customer } = booking.value else {
            // The barrier runs confirm and cancel once; a settled booking here is a bug elsewhere.
            return Err(BookingError::NoHold);
        };
        let stock = ctx.get::<Stock>(STOCK, &item)?.ok_or_else(|| BookingError::Unknown(req.item.clone()))?;
        let mut next = stock.value;
        next.held = next.held.saturating_sub(1);
        let after = if sell {
            next.sold += 1;
            Booking::Sold { item: item.clone(), customer }
        } else {
            next.free += 1;
            Booking::Released { item: item.clone() }
        };
        ctx.put(STOCK, &item, &next, stock.version)?;
        ctx.put(BOOKINGS, ctx.gid().as_str(), &after, booking.version)?;
        Ok(())
    }
}

impl Flights for Inventory {
    async fn hold_seat(&self, ctx: TccContext, req: HoldRequest) -> Result<Hold, BookingError> {
        self.hold(&ctx, &req).await
    }
    async fn sell_seat(&self, ctx: TccContext, req: HoldRequest) -> Result<(), BookingError> {
        self.settle(&ctx, &req, true).await
    }
    async fn release_seat(&self, ctx: TccContext, req: HoldRequest) -> Result<(), BookingError> {
        self.settle(&ctx, &req, false).await
    }
}

impl Hotels for Inventory {
    async fn hold_room(&self, ctx: TccContext, req: HoldRequest) -> Result<Hold, BookingError> {
        self.hold(&ctx, &req).await
    }
    async fn sell_room(&self, ctx: TccContext, req: HoldRequest) -> Result<(), BookingError> {
        self.settle(&ctx, &req, true).await
    }
    async fn release_room(&self, ctx: TccContext, req: HoldRequest) -> Result<(), BookingError> {
        self.settle(&ctx, &req, false).await
    }
}
