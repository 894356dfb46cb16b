//! The travel agency: books a seat and a room in one TCC transaction, both or neither; then
//! awards the customer's miles and points in a saga ([`Agency::award_loyalty`], see
//! [`crate::loyalty`]) and e-mails the confirmation as a two-phase message
//! ([`Agency::send_confirmation`], see [`crate::confirmation`]).

use std::time::Duration;

use tcc_core::Gid;
use tcc_http::client::{ClientError, TccClient};
use tcc_http::client::{PreparedMessage, SagaBuilder};
use tcc_http::stub::TccCallError;
use tcc_http::{StateView, TransactionView};

use crate::api::{BookingError, FlightsClient, Hold, HoldRequest, HotelsClient};
use crate::confirmation::{MAIL_ACTION, MailRequest, TICKETS_PATH, Ticket, TicketRequest};
use crate::loyalty::{AwardRequest, MILES_STEP, POINTS_STEP};

/// How long a booking may take before the coordinator cancels it.
pub const BOOKING_TIMEOUT: Duration = Duration::from_secs(30);

/// A trip to book.
#[derive(Clone, Debug)]
pub struct Trip {
    /// The customer.
    pub customer: String,
    /// The flight.
    pub flight: String,
    /// The hotel.
    pub hotel: String,
}

/// How a booking ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both held and the confirm decision is durable; `done` is the transaction once phase two
    /// finished (or as it was when the wait ended).
    Booked {
        /// The seat hold.
        seat: Hold,
        /// The room hold.
        room: Hold,
        /// The transaction after the wait.
        done: TransactionView,
    },
    /// A service refused; the booking was cancelled and whatever was held is released.
    Refused {
        /// Which service said no, and why.
        reason: String,
        /// The transaction id.
        gid: String,
    },
}

/// Why a booking could not be carried out at all (the coordinator or a service failed).
#[derive(Debug, thiserror::Error)]
pub enum AgencyError {
    /// The coordinator refused or failed.
    #[error(transparent)]
    Coordinator(#[from] ClientError),
    /// A request could not be encoded (a bug).
    #[error("encoding a request: {0}")]
    Encode(#[from] serde_json::Error),
}

/// What the flight service answered to a ticket's local transaction.
#[derive(Debug)]
pub enum TicketAnswer {
    /// Issued (now or before): the local transaction committed; submit the message.
    Issued(Ticket),
    /// Not issued, and never will be under this message (refused, or the back-check came first):
    /// abort the message.
    Refused(String),
    /// Unknown (no answer, or the commit's outcome unknown): leave the message to its back-check.
    Unknown(String),
}

/// How a confirmation message went.
#[derive(Debug)]
pub enum Confirmation {
    /// The ticket was issued and the message submitted: the e-mails go out.
    Sent(TransactionView),
    /// The ticket was refused and the message aborted: no e-mail, ever.
    NotSent {
        /// Why the ticket was refused.
        reason: String,
        /// The aborted message.
        message: TransactionView,
    },
    /// The outcome of the ticket is unknown: the message stays prepared until the coordinator
    /// asks the back-check at its deadline.
    Pending {
        /// The message.
        gid: Gid,
        /// What went wrong.
        reason: String,
    },
}

/// The agency: a coordinator client, the two services' typed clients and base URLs.
#[derive(Clone, Debug)]
pub struct Agency {
    tcc: TccClient,
    flights: FlightsClient,
    hotels: HotelsClient,
    urls: [String; 2],
    http: reqwest::Client,
}

fn describe(e: TccCallError<BookingError>) -> String {
    match e.refusal() {
        Some(refusal) => refusal.to_string(),
        None => e.to_string(),
    }
}

impl Agency {
    /// An agency booking through `tcc` with the services at these base URLs.
    pub fn new(tcc: TccClient, flights_url: &str, hotels_url: &str) -> Agency {
        // The defaults of a coordinator's client: timeouts on, redirects off.
        let http = tcc_http::transport::build_client(&Default::default()).unwrap_or_default();
        Agency {
            tcc,
            flights: FlightsClient::new(flights_url),
            hotels: HotelsClient::new(hotels_url),
            urls: [flights_url.trim_end_matches('/').to_owned(), hotels_url.trim_end_matches('/').to_owned()],
            http,
        }
    }

    /// The loyalty saga awarding `customer` `miles` at the flight service and `points` at the
    /// hotel, ready to submit: both stand in the end, or the hotel refused (a blocked account) and
    /// the miles were taken back.
    pub fn loyalty_saga(
        &self,
        customer: &str,
        miles: u32,
        points: u32,
        timeout: Duration,
    ) -> Result<SagaBuilder, AgencyError> {
        let [flights, hotels] = &self.urls;
        let step =
            |base: &str, name: &str| (format!("{base}/{name}/action"), format!("{base}/{name}/compensate"));
        let (miles_action, miles_back) = step(flights, MILES_STEP);
        let (points_action, points_back) = step(hotels, POINTS_STEP);
        let body = |amount| serde_json::to_string(&AwardRequest { customer: customer.to_owned(), amount });
        Ok(self.tcc.saga(timeout).step(&miles_action, &miles_back, body(miles)?).step(
            &points_action,
            &points_back,
            body(points)?,
        ))
    }

    /// Submits the [loyalty saga](Self::loyalty_saga) and waits up to `wait` for it to end.
    pub async fn award_loyalty(
        &self,
        customer: &str,
        miles: u32,
        points: u32,
        timeout: Duration,
        wait: Duration,
    ) -> Result<TransactionView, AgencyError> {
        Ok(self.loyalty_saga(customer, miles, points, timeout)?.submit_and_wait(wait).await?)
    }

    /// Prepares the confirmation message of trip `booking`: an e-mail from each service's outbox,
    /// sent only if the flight service issues the ticket; its back-check is the flight service's.
    pub async fn prepare_confirmation(
        &self,
        booking: &str,
        customer: &str,
        timeout: Duration,
    ) -> Result<PreparedMessage, AgencyError> {
        let [flights, hotels] = &self.urls;
        let mail = serde_json::to_string(&MailRequest {
            customer: customer.to_owned(),
            booking: booking.to_owned(),
        })?;
        Ok(self
            .tcc
            .message(timeout)
            .add(&format!("{flights}/{MAIL_ACTION}/action"), mail.clone())
            .add(&format!("{hotels}/{MAIL_ACTION}/action"), mail)
            .prepare(&format!("{flights}/back-check"))
            .await?)
    }

    /// Asks the flight service to issue the ticket of trip `booking`, the local transaction of
    /// message `gid` (`POST {flights}/tickets?gid=`).
    pub async fn issue_ticket(&self, gid: &Gid, booking: &str, customer: &str) -> TicketAnswer {
        let req = TicketRequest { booking: booking.to_owned(), customer: customer.to_owned() };
        let body = match serde_json::to_vec(&req) {
            Ok(b) => b,
            Err(e) => return TicketAnswer::Refused(format!("encoding the request: {e}")),
        };
        let url = format!("{}{TICKETS_PATH}?gid={}", self.urls[0], gid.as_str());
        let res = match self.http.post(url).header("content-type", "application/json").body(body).send().await
        {
            Ok(res) => res,
            Err(e) => return TicketAnswer::Unknown(e.to_string()),
        };
        let status = res.status();
        let text = match res.text().await {
            Ok(t) => t,
            Err(e) => return TicketAnswer::Unknown(e.to_string()),
        };
        if status.is_success() {
            return match serde_json::from_str(&text) {
                Ok(ticket) => TicketAnswer::Issued(ticket),
                Err(e) => TicketAnswer::Unknown(format!("an unreadable ticket: {e}")),
            };
        }
        match serde_json::from_str::<tcc_http::ErrorBody>(&text) {
            // 409 says the local transaction did not commit and never will under this message.
            Ok(body) if status.as_u16() == 409 => TicketAnswer::Refused(body.message),
            Ok(body) => TicketAnswer::Unknown(format!("{status} {}: {}", body.code, body.message)),
            Err(_) => TicketAnswer::Unknown(format!("{status}")),
        }
    }

    /// Sends the confirmation e-mail of trip `booking`: prepares the message, asks for the ticket,
    /// then submits the message if the ticket was issued or aborts it if it was refused (waiting up
    /// to `wait` for the outcome); leaves it to the back-check when the ticket's outcome is
    /// unknown.
    pub async fn send_confirmation(
        &self,
        booking: &str,
        customer: &str,
        timeout: Duration,
        wait: Duration,
    ) -> Result<Confirmation, AgencyError> {
        let msg = self.prepare_confirmation(booking, customer, timeout).await?;
        Ok(match self.issue_ticket(msg.gid(), booking, customer).await {
            TicketAnswer::Issued(_) => {
                msg.submit().await?;
                Confirmation::Sent(self.tcc.wait(msg.gid(), wait).await?)
            }
            TicketAnswer::Refused(reason) => {
                msg.abort().await?;
                Confirmation::NotSent { reason, message: self.tcc.wait(msg.gid(), wait).await? }
            }
            TicketAnswer::Unknown(reason) => Confirmation::Pending { gid: msg.gid().clone(), reason },
        })
    }

    /// Books `trip`: holds a seat, then a room; confirms if both are held, cancels otherwise. With
    /// `wait`, also waits up to that long for phase two to finish.
    pub async fn book(&self, trip: &Trip, wait: Duration) -> Result<Outcome, AgencyError> {
        let tx = self.tcc.begin(BOOKING_TIMEOUT).await?;
        let gid = tx.gid().to_string();
        let seat_req = HoldRequest { item: trip.flight.clone(), customer: trip.customer.clone() };
        let seat = match self.flights.hold_seat(&tx, seat_req).await {
            Ok(seat) => seat,
            Err(e) => {
                tx.cancel().await?;
                return Ok(Outcome::Refused { reason: format!("flights: {}", describe(e)), gid });
            }
        };
        let room_req = HoldRequest { item: trip.hotel.clone(), customer: trip.customer.clone() };
        let room = match self.hotels.hold_room(&tx, room_req).await {
            Ok(room) => room,
            Err(e) => {
                tx.cancel().await?;
                return Ok(Outcome::Refused { reason: format!("hotels: {}", describe(e)), gid });
            }
        };
        let done = if wait.is_zero() { tx.confirm().await? } else { tx.confirm_and_wait(wait).await? };
        Ok(Outcome::Booked { seat, room, done })
    }

    /// The coordinator client.
    pub fn tcc(&self) -> &TccClient {
        &self.tcc
    }
}

/// Whether a booking's phase two finished with every branch confirmed.
pub fn is_confirmed(tx: &TransactionView) -> bool {
    tx.state == StateView::Confirmed
}
