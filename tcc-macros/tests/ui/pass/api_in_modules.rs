//! The definition in one module (a shared API crate, in practice), the implementation in another
//! (the service) and the calls in a third (the initiator).
mod api {
    use serde::{Deserialize, Serialize};
    use tcc_http::{tcc, TccContext, TccError};

    #[derive(Debug, Serialize, Deserialize)]
    pub struct Room(pub u32);

    #[derive(Debug, Serialize, Deserialize)]
    pub enum HotelError {
        Full,
    }

    impl std::fmt::Display for HotelError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("full")
        }
    }

    impl TccError for HotelError {}

    #[tcc]
    pub trait Hotels {
        #[tcc(confirm = book, cancel = free)]
        async fn hold(&self, ctx: TccContext, room: Room) -> Result<Room, HotelError>;
        async fn book(&self, ctx: TccContext, room: Room) -> Result<(), HotelError>;
        async fn free(&self, ctx: TccContext, room: Room) -> Result<(), HotelError>;
    }
}

mod service {
    use crate::api::{HotelError, Hotels, Room};
    use tcc_http::TccContext;

    pub struct Ritz;

    impl Hotels for Ritz {
        async fn hold(&self, _ctx: TccContext, room: Room) -> Result<Room, HotelError> {
            if room.0 > 100 { Err(HotelError::Full) } else { Ok(room) }
        }
        async fn book(&self, _ctx: TccContext, _room: Room) -> Result<(), HotelError> {
            Ok(())
        }
        async fn free(&self, _ctx: TccContext, _room: Room) -> Result<(), HotelError> {
            Ok(())
        }
    }
}

mod initiator {
    use crate::api::{HotelsClient, Room};

    #[allow(dead_code)]
    pub async fn book(tx: &tcc_http::client::GlobalTx) -> Option<u32> {
        let hotels = HotelsClient::new("http://127.0.0.1:8082/tcc/hotels");
        match hotels.hold(tx, Room(7)).await {
            Ok(room) => Some(room.0),
            Err(e) => {
                let _full = e.refusal().is_some();
                None
            }
        }
    }
}

fn main() {
    use api::Hotels;
    let db = tcc_core::DurableDb::temporary().unwrap();
    let barrier = tcc_core::SledBarrier::open(
        &db,
        vec![],
        std::sync::Arc::new(tcc_core::SystemClock),
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    let p = service::Ritz.into_participant(tcc_http::participant::Participant::with_barrier_durability(barrier));
    assert_eq!(p.operations().count(), 1);
    let _ = initiator::book;
}
