//! The two services' TCC definitions. In a real system these live in a small API crate that the
//! service (which implements them) and the agency (which calls them) both depend on.

use serde::{Deserialize, Serialize};
use tcc_http::sqlx::{MySql, Postgres};
use tcc_http::staged::StoreError;
use tcc_http::{Disposition, SqlContext, SqlError, TccContext, TccError, tcc};

/// What the agency asks a service to hold: one unit of an item (a seat on a flight, a room in a
/// hotel) for one customer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRequest {
    /// The flight or hotel.
    pub item: String,
    /// Who it is for.
    pub customer: String,
}

/// What a successful try answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The flight or hotel.
    pub item: String,
    /// Units still free after this hold.
    pub left: u32,
}

/// Why a service refuses.
#[derive(Clone, Debug, thiserror::Error, Serialize, Deserialize)]
pub enum BookingError {
    /// Nothing left to hold.
    #[error("{0} is sold out")]
    SoldOut(String),
    /// The service does not sell this item.
    #[error("{0} is not sold here")]
    Unknown(String),
    /// The confirm or cancel found no hold for this transaction (it never tried here).
    #[error("no hold for this booking")]
    NoHold,
    /// The customer's loyalty account here is blocked: no miles or points are awarded (a saga's
    /// step refusing, so the steps before it are compensated).
    #[error("the loyalty account of {0} is blocked")]
    Blocked(String),
    /// A compensation found no award to take back (the barrier runs it only after its action).
    #[error("no award for this saga")]
    NoAward,
    /// A ticket was asked for a trip with no seat booked here (refused, or released).
    #[error("no seat is booked for trip {0}")]
    NotBooked(String),
    /// Too many concurrent buyers changed the stock while this one was deciding; it gave up.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The service's SQL database failed (a deadlock or serialization failure is run again).
    #[error(transparent)]
    Db(#[from] SqlError),
}

/// Every business error refuses the try, and so cancels the whole booking; a database failure is
/// run again or answered as transient, as [`SqlError::disposition`] says.
impl TccError for BookingError {
    fn disposition(&self) -> Disposition {
        match self {
            BookingError::Db(e) => e.disposition(),
            _ => Disposition::Refuse,
        }
    }
}

/// The flight service.
#[tcc]
pub trait Flights {
    /// Holds a seat until the booking is decided.
    #[tcc(confirm = sell_seat, cancel = release_seat, branch = "flight")]
    async fn hold_seat(&self, ctx: TccContext, req: HoldRequest) -> Result<Hold, BookingError>;
    /// Sells the held seat.
    async fn sell_seat(&self, ctx: TccContext, req: HoldRequest) -> Result<(), BookingError>;
    /// Frees the held seat.
    async fn release_seat(&self, ctx: TccContext, req: HoldRequest) -> Result<(), BookingError>;
}

/// The hotel service.
#[tcc]
pub trait Hotels {
    /// Holds a room until the booking is decided.
    #[tcc(confirm = sell_room, cancel = release_room, branch = "hotel")]
    async fn hold_room(&self, ctx: TccContext, req: HoldRequest) -> Result<Hold, BookingError>;
    /// Sells the held room.
    async fn sell_room(&self, ctx: TccContext, req: HoldRequest) -> Result<(), BookingError>;
    /// Frees the held room.
    async fn release_room(&self, ctx: TccContext, req: HoldRequest) -> Result<(), BookingError>;
}

/// The same service on a SQL database: the operations and the branch of `$base`, so that its typed
/// client ([`FlightsClient`], [`HotelsClient`]) calls any backend alike.
macro_rules! on_sql {
    ($(#[$doc:meta])* $name:ident, $client:ident, $db:ident, $try_:ident, $confirm:ident, $cancel:ident, $branch:tt) => {
        $(#[$doc])*
        #[tcc(client = $client)]
        pub trait $name {
            /// Holds a unit until the booking is decided.
            #[tcc(confirm = $confirm, cancel = $cancel, branch = $branch)]
            async fn $try_(&self, ctx: &mut SqlContext<$db>, req: HoldRequest) -> Result<Hold, BookingError>;
            /// Sells the held unit.
            async fn $confirm(&self, ctx: &mut SqlContext<$db>, req: HoldRequest) -> Result<(), BookingError>;
            /// Frees the held unit.
            async fn $cancel(&self, ctx: &mut SqlContext<$db>, req: HoldRequest) -> Result<(), BookingError>;
        }
    };
}

on_sql!(
    /// [`Flights`] on PostgreSQL.
    FlightsOnPostgres, FlightsOnPostgresClient, Postgres, hold_seat, sell_seat, release_seat, "flight"
);
on_sql!(
    /// [`Flights`] on MySQL.
    FlightsOnMySql, FlightsOnMySqlClient, MySql, hold_seat, sell_seat, release_seat, "flight"
);
on_sql!(
    /// [`Hotels`] on PostgreSQL.
    HotelsOnPostgres, HotelsOnPostgresClient, Postgres, hold_room, sell_room, release_room, "hotel"
);
on_sql!(
    /// [`Hotels`] on MySQL.
    HotelsOnMySql, HotelsOnMySqlClient, MySql, hold_room, sell_room, release_room, "hotel"
);
