//! What `tcc-chaos` checks once everything is quiet, read from the stores themselves: the
//! coordinator's transactions, each participant's barrier records and books, and what the
//! initiators were told.
//!
//! Kept apart from the harness so that its judgement can be tested on hand-made worlds: a checker
//! that never finds anything proves nothing.

use std::collections::HashMap;

use tcc_core::barrier::BarrierState;
use tcc_core::{BranchId, Gid, Transaction, TxState};
use travel_booking::inventory::Booking;
use travel_booking::ledger::Books;

/// What an initiator was told about a transaction it began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Begin was acknowledged; no decision was (abandoned, or the decision call failed).
    Begun,
    /// The confirm decision was acknowledged.
    ConfirmAcked,
    /// The cancel decision was acknowledged.
    CancelAcked,
    /// Not a transaction of the coordinator's: tries sent straight to the services under a gid the
    /// coordinator never saw, with a short deadline, and never decided by anyone (a coordinator
    /// gone for good). Each service must release what it held by itself at deadline + grace.
    Orphan,
}

/// One participant service as found in its store after the run.
#[derive(Debug)]
pub struct Side<'a> {
    /// Its name in reports.
    pub name: &'a str,
    /// The branch id its transactions register it under.
    pub branch: BranchId,
    /// Its books (stock and bookings).
    pub books: &'a Books,
    /// Its barrier state per transaction, for every transaction the coordinator knows and every
    /// orphan ([`Seen::Orphan`]) (absent: no barrier record).
    pub barrier: &'a HashMap<Gid, BarrierState>,
}

/// Every violation of the guarantees found in this world, described; none is good.
///
/// - every transaction the coordinator knows is final (confirmed or cancelled);
/// - a confirmed transaction is confirmed at every branch (barrier `confirmed`, booking sold); a
///   cancelled one holds and sells nothing anywhere;
/// - no participant holds or sold anything for a transaction the coordinator does not know, or
///   for a branch it never registered;
/// - stock is conserved, nothing is left held, sold counts agree, no trip is half sold
///   ([`travel_booking::ledger::check`]);
/// - every begin the initiators saw acknowledged is in the coordinator's store, every acknowledged
///   confirm ended confirmed and every acknowledged cancel ended cancelled;
/// - a hold a service released by itself at deadline + grace (barrier `expired`) was confirmed
///   nowhere: not by the coordinator, not at any service;
/// - every orphan ([`Seen::Orphan`]) was released by each service that held it, by itself: barrier
///   `expired` and booking released, or nothing held there at all.
pub fn check(
    coordinator: &[Transaction],
    sides: &[Side<'_>; 2],
    stocked: &[(&str, u32)],
    seen: &HashMap<Gid, Seen>,
) -> Vec<String> {
    let mut violations = Vec::new();
    let known: HashMap<&str, &Transaction> = coordinator.iter().map(|t| (t.gid.as_str(), t)).collect();
    for tx in coordinator {
        let gid = &tx.gid;
        let confirmed = match tx.state {
            TxState::Confirmed => true,
            TxState::Cancelled => false,
            other => {
                violations.push(format!(
                    "transaction {gid}: not finished, {} (last error: {})",
                    other.as_str(),
                    tx.last_error.as_deref().unwrap_or("none")
                ));
                continue;
            }
        };
        for side in sides {
            let registered = tx.branches.iter().any(|b| b.id == side.branch);
            let barrier = side.barrier.get(gid).copied();
            let booking = side.books.bookings.get(gid.as_str());
            let what = format!(
                "barrier {}, booking {}",
                barrier.map_or("none", BarrierState::as_str),
                booking.map_or("none", booking_name)
            );
            if confirmed && !registered {
                violations.push(format!("transaction {gid}: confirmed without a {} branch", side.name));
            } else if confirmed
                && !(barrier == Some(BarrierState::Confirmed)
                    && matches!(booking, Some(Booking::Sold { .. })))
            {
                violations.push(format!("transaction {gid}: confirmed, but at {}: {what}", side.name));
            } else if !confirmed
                && (matches!(barrier, Some(BarrierState::Confirmed | BarrierState::Tried))
                    || matches!(booking, Some(Booking::Sold { .. } | Booking::Held { .. })))
            {
                violations.push(format!("transaction {gid}: cancelled, but at {}: {what}", side.name));
            } else if !registered && booking.is_some() {
                violations.push(format!(
                    "transaction {gid}: {} has a booking for a branch never registered: {what}",
                    side.name
                ));
            }
        }
    }
    for side in sides {
        for (gid, booking) in &side.books.bookings {
            if !known.contains_key(gid.as_str()) && !matches!(booking, Booking::Released { .. }) {
                violations.push(format!(
                    "{}: booking {gid} is {} but the coordinator does not know the transaction",
                    side.name,
                    booking_name(booking)
                ));
            }
        }
    }
    violations.extend(travel_booking::ledger::check(sides[0].books, sides[1].books, stocked, true));
    for side in sides {
        for (gid, _) in side.barrier.iter().filter(|(_, s)| **s == BarrierState::Expired) {
            let by = format!("transaction {gid}: released by {} itself at deadline + grace", side.name);
            if known.get(gid.as_str()).is_some_and(|t| t.state == TxState::Confirmed) {
                violations.push(format!("{by}, but the coordinator confirmed it"));
            }
            for other in sides {
                let sold = matches!(other.books.bookings.get(gid.as_str()), Some(Booking::Sold { .. }));
                if other.barrier.get(gid) == Some(&BarrierState::Confirmed) || sold {
                    violations.push(format!("{by}, but confirmed at {}", other.name));
                }
            }
        }
    }
    for gid in seen.iter().filter(|(_, s)| **s == Seen::Orphan).map(|(g, _)| g) {
        for side in sides {
            let barrier = side.barrier.get(gid).copied();
            let booking = side.books.bookings.get(gid.as_str());
            let released = matches!(
                (barrier, booking),
                (None, None) | (Some(BarrierState::Expired), Some(Booking::Released { .. }))
            );
            if !released {
                violations.push(format!(
                    "orphan {gid}: not released by {} itself: barrier {}, booking {}",
                    side.name,
                    barrier.map_or("none", BarrierState::as_str),
                    booking.map_or("none", booking_name)
                ));
            }
        }
    }
    for (gid, seen) in seen {
        let state = known.get(gid.as_str()).map(|t| t.state);
        match (seen, state) {
            (Seen::Orphan, None) => {}
            (Seen::Orphan, Some(_)) => {
                violations.push(format!("orphan {gid}: the coordinator knows a gid it never issued"));
            }
            (_, None) => violations
                .push(format!("transaction {gid}: begin was acknowledged but the coordinator lost it")),
            (Seen::ConfirmAcked, Some(s)) if s != TxState::Confirmed => violations
                .push(format!("transaction {gid}: confirm was acknowledged but it ended {}", s.as_str())),
            (Seen::CancelAcked, Some(s)) if s != TxState::Cancelled => violations
                .push(format!("transaction {gid}: cancel was acknowledged but it ended {}", s.as_str())),
            _ => {}
        }
    }
    violations
}

/// How many holds the services released by themselves at deadline + grace (barrier `expired`).
pub fn self_released(sides: &[Side<'_>; 2]) -> usize {
    sides.iter().map(|s| s.barrier.values().filter(|b| **b == BarrierState::Expired).count()).sum()
}

fn booking_name(b: &Booking) -> &'static str {
    match b {
        Booking::Held { .. } => "held",
        Booking::Sold { .. } => "sold",
        Booking::Released { .. } => "released",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tcc_core::{Branch, BranchState, Decision, Timestamp};
    use travel_booking::inventory::Stock;

    use super::*;

    struct World {
        txs: Vec<Transaction>,
        books: [Books; 2],
        barriers: [HashMap<Gid, BarrierState>; 2],
        seen: HashMap<Gid, Seen>,
    }

    const STOCKED: &[(&str, u32)] = &[("F1", 5), ("H1", 5)];

    fn branch(id: &str, state: BranchState) -> Branch {
        Branch {
            id: id.parse().unwrap(),
            target: "http://127.0.0.1:1/x".into(),
            payload: Vec::new(),
            state,
            last_error: None,
        }
    }

    fn tx(state: TxState) -> Transaction {
        let mut tx = tcc_core::state::begin(Gid::generate(), Timestamp(1), Timestamp(2));
        let (decision, bs) = match state {
            TxState::Confirmed => (Some(Decision::Confirm), BranchState::Confirmed),
            _ => (Some(Decision::Cancel), BranchState::Cancelled),
        };
        tx.state = state;
        tx.decision = decision;
        tx.branches = vec![branch("flight", bs), branch("hotel", bs)];
        tx
    }

    /// One trip sold, one cancelled after both held, one cancelled before any try, one orphan held
    /// at both services and released by each itself: all consistent.
    fn consistent() -> World {
        let (sold, released, empty) =
            (tx(TxState::Confirmed), tx(TxState::Cancelled), tx(TxState::Cancelled));
        let orphan = Gid::generate();
        let mut w = World {
            txs: vec![sold.clone(), released.clone(), empty.clone()],
            books: [Books::default(), Books::default()],
            barriers: [HashMap::new(), HashMap::new()],
            seen: HashMap::from([
                (sold.gid.clone(), Seen::ConfirmAcked),
                (released.gid.clone(), Seen::CancelAcked),
                (empty.gid.clone(), Seen::Begun),
                (orphan.clone(), Seen::Orphan),
            ]),
        };
        for (i, item) in ["F1", "H1"].into_iter().enumerate() {
            w.books[i].stock.insert(item.into(), Stock { free: 4, held: 0, sold: 1 });
            let customer = "c".to_owned();
            w.books[i].bookings.insert(
                sold.gid.to_string(),
                Booking::Sold { item: item.into(), customer: customer.clone() },
            );
            w.books[i].bookings.insert(released.gid.to_string(), Booking::Released { item: item.into() });
            w.barriers[i].insert(sold.gid.clone(), BarrierState::Confirmed);
            w.barriers[i].insert(released.gid.clone(), BarrierState::Cancelled);
            w.barriers[i].insert(empty.gid.clone(), BarrierState::CancelledEmpty);
            w.books[i].bookings.insert(orphan.to_string(), Booking::Released { item: item.into() });
            w.barriers[i].insert(orphan.clone(), BarrierState::Expired);
        }
        w
    }

    fn orphan(w: &World) -> Gid {
        w.seen.iter().find(|(_, s)| **s == Seen::Orphan).map(|(g, _)| g.clone()).unwrap()
    }

    fn run(w: &World) -> Vec<String> {
        let sides = [
            Side {
                name: "flights",
                branch: "flight".parse().unwrap(),
                books: &w.books[0],
                barrier: &w.barriers[0],
            },
            Side {
                name: "hotels",
                branch: "hotel".parse().unwrap(),
                books: &w.books[1],
                barrier: &w.barriers[1],
            },
        ];
        check(&w.txs, &sides, STOCKED, &w.seen)
    }

    #[test]
    fn a_consistent_world_has_no_violation() {
        assert_eq!(run(&consistent()), Vec::<String>::new());
    }

    #[test]
    fn every_kind_of_broken_world_is_caught() {
        type Breakage = Box<dyn Fn(&mut World)>;
        let breakages: Vec<(&str, Breakage)> = vec![
            ("not finished", Box::new(|w| w.txs[0].state = TxState::Confirming)),
            (
                "confirmed, but at hotels",
                Box::new(|w| {
                    w.barriers[1].insert(w.txs[0].gid.clone(), BarrierState::Cancelled);
                }),
            ),
            (
                "cancelled, but at flights",
                Box::new(|w| {
                    w.barriers[0].insert(w.txs[1].gid.clone(), BarrierState::Confirmed);
                }),
            ),
            (
                "cancelled, but at flights",
                Box::new(|w| {
                    let gid = w.txs[1].gid.to_string();
                    w.books[0]
                        .bookings
                        .insert(gid, Booking::Held { item: "F1".into(), customer: "c".into() });
                }),
            ),
            (
                "does not know",
                Box::new(|w| {
                    w.books[0]
                        .bookings
                        .insert("stray".into(), Booking::Held { item: "F1".into(), customer: "c".into() });
                }),
            ),
            ("never registered", Box::new(|w| w.txs[1].branches.truncate(1))),
            ("confirmed without a hotels branch", Box::new(|w| w.txs[0].branches.truncate(1))),
            (
                "in total",
                Box::new(|w| {
                    w.books[0].stock.insert("F1".into(), Stock { free: 5, held: 0, sold: 1 });
                }),
            ),
            (
                "still has 1 units held",
                Box::new(|w| {
                    w.books[1].stock.insert("H1".into(), Stock { free: 3, held: 1, sold: 1 });
                }),
            ),
            (
                "seat sold without its room",
                Box::new(|w| {
                    // The hotel released the room of a sold trip, its stock counting it back.
                    let gid = w.txs[0].gid.to_string();
                    w.books[1].bookings.insert(gid, Booking::Released { item: "H1".into() });
                    w.books[1].stock.insert("H1".into(), Stock { free: 5, held: 0, sold: 0 });
                }),
            ),
            (
                "room sold without its seat",
                Box::new(|w| {
                    let gid = w.txs[0].gid.to_string();
                    w.books[0].bookings.insert(gid, Booking::Released { item: "F1".into() });
                    w.books[0].stock.insert("F1".into(), Stock { free: 5, held: 0, sold: 0 });
                }),
            ),
            (
                "1 bookings sold but the stock counts 2 sold",
                Box::new(|w| {
                    w.books[0].stock.insert("F1".into(), Stock { free: 3, held: 0, sold: 2 });
                }),
            ),
            (
                "coordinator lost it",
                Box::new(|w| {
                    w.seen.insert(Gid::generate(), Seen::Begun);
                }),
            ),
            (
                "confirm was acknowledged",
                Box::new(|w| {
                    w.seen.insert(w.txs[1].gid.clone(), Seen::ConfirmAcked);
                }),
            ),
            (
                "cancel was acknowledged",
                Box::new(|w| {
                    w.seen.insert(w.txs[0].gid.clone(), Seen::CancelAcked);
                }),
            ),
            (
                "released by flights itself at deadline + grace, but the coordinator confirmed it",
                Box::new(|w| {
                    w.barriers[0].insert(w.txs[0].gid.clone(), BarrierState::Expired);
                }),
            ),
            (
                "released by hotels itself at deadline + grace, but confirmed at flights",
                Box::new(|w| {
                    // Both sides of a cancelled trip: the hotel released its hold itself, the
                    // flight service confirmed (a confirm nobody decided).
                    let gid = w.txs[1].gid.clone();
                    w.barriers[1].insert(gid.clone(), BarrierState::Expired);
                    w.barriers[0].insert(gid, BarrierState::Confirmed);
                }),
            ),
            (
                "orphan",
                Box::new(|w| {
                    // An orphan confirmed at the hotel instead of released.
                    let gid = orphan(w);
                    w.barriers[1].insert(gid.clone(), BarrierState::Confirmed);
                }),
            ),
            (
                "not released by flights itself",
                Box::new(|w| {
                    // Still held at the flight service.
                    let gid = orphan(w);
                    w.barriers[0].insert(gid.clone(), BarrierState::Tried);
                    w.books[0]
                        .bookings
                        .insert(gid.to_string(), Booking::Held { item: "F1".into(), customer: "c".into() });
                }),
            ),
        ];
        for (expected, breakage) in breakages {
            let mut w = consistent();
            breakage(&mut w);
            let found = run(&w);
            assert!(found.iter().any(|v| v.contains(expected)), "{expected:?} not caught: {found:?}");
        }
    }
}
