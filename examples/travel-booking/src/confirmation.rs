//! The confirmation e-mail of a trip as a two-phase message: the flight service issues the ticket
//! in a local transaction ([`Backend::issue_ticket`](crate::service::Backend::issue_ticket), run
//! through the participant runtime so that its barrier record commits with the ticket), and the
//! message's actions then write the confirmation to each service's outbox ([`Outbox`],
//! `{base}/mail/action`). A message, not a saga, because an e-mail cannot be taken back: it must go
//! out if, and only if, the ticket was issued. The agency
//! prepares the message first (its back-check `{flights}/back-check`), asks for the ticket
//! (`POST {flights}/tickets?gid=…`), then submits the message if the ticket was issued or aborts it
//! if it was refused; had it stopped in between, the coordinator asks the back-check at the
//! message's deadline.
//!
//! The rules ([`Ticket::issue`], [`Mail::send`]) are the same on sled (trees `tickets` and
//! `outbox`, here) and on PostgreSQL and MySQL ([`sql`]).

use serde::{Deserialize, Serialize};
use tcc_http::TccContext;
use tcc_http::staged::AsyncAction;

use crate::api::BookingError;
use crate::inventory::{BOOKINGS, Booking};

pub mod sql;

/// The business tree of tickets by message id.
pub const TICKETS: &str = "tickets";
/// The business tree of confirmation e-mails by message id.
pub const OUTBOX: &str = "outbox";
/// The message action at each service, served at `{base}/mail/action`.
pub const MAIL_ACTION: &str = "mail";
/// The route of the ticket's local transaction, under a service's base (`POST …/tickets?gid=`).
pub const TICKETS_PATH: &str = "/tickets";

/// A ticket asked for: the trip (the TCC transaction that booked it) and the customer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketRequest {
    /// The booking's transaction id.
    pub booking: String,
    /// The customer.
    pub customer: String,
}

/// A ticket issued, kept by the flight service under the message's id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The booking's transaction id.
    pub booking: String,
    /// The customer.
    pub customer: String,
}

impl Ticket {
    /// The rule of a ticket: issued only for a trip whose seat is booked here (held or sold);
    /// refused for one refused, released or unknown.
    pub fn issue(req: &TicketRequest, booking: Option<&Booking>) -> Result<Ticket, BookingError> {
        match booking {
            Some(Booking::Held { .. } | Booking::Sold { .. }) => {
                Ok(Ticket { booking: req.booking.clone(), customer: req.customer.clone() })
            }
            Some(Booking::Released { .. }) | None => Err(BookingError::NotBooked(req.booking.clone())),
        }
    }
}

/// The confirmation e-mail a message action writes: to whom, for which trip.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailRequest {
    /// The customer.
    pub customer: String,
    /// The booking's transaction id.
    pub booking: String,
}

/// A confirmation e-mail in a service's outbox, under the message's id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mail {
    /// The customer.
    pub customer: String,
    /// The booking's transaction id.
    pub booking: String,
    /// How many times it was written: 1, since the barrier runs a message action once. Kept (a
    /// counter on sled, one row per write on SQL) so that a checker would see a second one.
    pub copies: u32,
}

impl Mail {
    /// The rule of an outbox write: the first write of a message's mail, or one more copy.
    pub fn send(req: &MailRequest, before: Option<Mail>) -> Mail {
        match before {
            Some(m) => Mail { copies: m.copies + 1, ..m },
            None => Mail { customer: req.customer.clone(), booking: req.booking.clone(), copies: 1 },
        }
    }
}

/// The outbox of a service on sled: the message action writing a confirmation e-mail.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outbox;

impl AsyncAction for Outbox {
    type Request = MailRequest;
    type Error = BookingError;

    async fn action(&self, ctx: TccContext, req: MailRequest) -> Result<(), BookingError> {
        let key = ctx.gid().as_str().to_owned();
        match ctx.get::<Mail>(OUTBOX, &key)? {
            Some(m) => ctx.put(OUTBOX, &key, &Mail::send(&req, Some(m.value)), m.version).map(drop)?,
            None => ctx.insert_new(OUTBOX, &key, &Mail::send(&req, None)).map(drop)?,
        }
        Ok(())
    }
}

/// Issues the ticket on sled: the local transaction of the message `ctx.gid()`.
pub(crate) async fn issue_on_sled(ctx: TccContext, req: TicketRequest) -> Result<Ticket, BookingError> {
    let booking = ctx.get::<Booking>(BOOKINGS, &req.booking)?.map(|b| b.value);
    let ticket = Ticket::issue(&req, booking.as_ref())?;
    ctx.insert_new(TICKETS, ctx.gid().as_str(), &ticket)?;
    Ok(ticket)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_ticket_is_issued_only_for_a_seat_booked_here() {
        let req = TicketRequest { booking: "trip-1".into(), customer: "ada".into() };
        let held = Booking::Held { item: "TC42".into(), customer: "ada".into() };
        let sold = Booking::Sold { item: "TC42".into(), customer: "ada".into() };
        assert_eq!(Ticket::issue(&req, Some(&held)).unwrap().booking, "trip-1");
        assert!(Ticket::issue(&req, Some(&sold)).is_ok());
        for refused in [Some(Booking::Released { item: "TC42".into() }), None] {
            assert!(
                matches!(Ticket::issue(&req, refused.as_ref()), Err(BookingError::NotBooked(b)) if b == "trip-1")
            );
        }
    }

    #[test]
    fn a_second_outbox_write_shows_as_a_second_copy() {
        let req = MailRequest { customer: "ada".into(), booking: "trip-1".into() };
        let first = Mail::send(&req, None);
        assert_eq!(first.copies, 1);
        assert_eq!(Mail::send(&req, Some(first)).copies, 2);
    }
}
