//! What `tcc-chaos` checks once everything is quiet, read from the stores themselves: the
//! coordinator's transactions, each participant's barrier records and books, and what the
//! initiators were told.
//!
//! Kept apart from the harness so that its judgement can be tested on hand-made worlds: a checker
//! that never finds anything proves nothing.
//!
//! Three kinds of transaction are judged: TCC bookings (a seat and a room), loyalty sagas (miles at
//! the flight service, points at the hotel: [`travel_booking::loyalty`]) and confirmation messages
//! (a ticket issued in a local transaction at the flight service, an e-mail in each service's
//! outbox: [`travel_booking::confirmation`]).

use std::collections::HashMap;

use tcc_core::barrier::BarrierState;
use tcc_core::{BranchId, Gid, Transaction, TxKind, TxState};
use travel_booking::confirmation::Mail;
use travel_booking::inventory::Booking;
use travel_booking::ledger::Books;
use travel_booking::loyalty::Award;

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
    /// A saga submitted (acknowledged) with a step the business refuses (a blocked loyalty
    /// account): it must end turned back, every step that ran compensated.
    Refusing,
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
    /// The path its URLs start with (`/tcc/flights/`): a saga step or message action whose target
    /// has it is served here, and so is a message whose back-check has it (its local transaction).
    pub prefix: &'a str,
    /// Its barrier state per (transaction, branch) for the branches of every saga and message the
    /// coordinator knows, and their local transaction's branch
    /// ([`LOCAL_BRANCH`](tcc_http::participant::LOCAL_BRANCH)) (absent: no record).
    pub steps: &'a HashMap<(Gid, BranchId), BarrierState>,
}

/// What the sagas and messages came to, for the run's summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sagas that ended with every step done.
    pub sagas_done: usize,
    /// Sagas that ended turned back.
    pub sagas_compensated: usize,
    /// Saga steps compensated after their action ran (barrier `compensated`).
    pub steps_compensated: usize,
    /// Saga steps whose compensation came first or alone, so nothing ran (barrier
    /// `compensated_empty`).
    pub steps_empty: usize,
    /// Messages that ended submitted, every action done.
    pub messages_sent: usize,
    /// Messages that ended aborted.
    pub messages_aborted: usize,
    /// Local transactions settled as rolled back by a back-check (barrier `rolled_back`).
    pub rolled_back_by_back_check: usize,
    /// E-mails in the services' outboxes (copies counted).
    pub emails: usize,
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
///   `expired` and booking released, or nothing held there at all;
/// - every saga is final and all done (each step's barrier `done`, its award standing) or all
///   turned back (no award standing anywhere, each taken back exactly where the barrier says the
///   compensation ran after the action, none where it was empty: never an action after its
///   compensation); a saga with a refusing step ([`Seen::Refusing`]) turned back;
/// - every submitted message had its local transaction committed (barrier `committed`, ticket
///   issued) and each action done with its e-mail written once; no aborted message has a ticket,
///   an action on record or an e-mail;
/// - no service has an award, a ticket or an e-mail of a transaction the coordinator does not know
///   as a saga or a message;
/// - the services' books agree on awards and e-mails ([`travel_booking::ledger::check`]).
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
        match &tx.kind {
            TxKind::Tcc => {}
            TxKind::Saga(_) => {
                check_saga(tx, sides, &mut violations);
                continue;
            }
            TxKind::Msg(msg) => {
                check_message(tx, &msg.query_prepared, sides, &mut violations);
                continue;
            }
        }
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
            (Seen::Refusing, Some(s)) if s != TxState::Cancelled => violations.push(format!(
                "saga {gid}: a step refuses (a blocked account), but the saga ended {}",
                s.as_str()
            )),
            _ => {}
        }
    }
    for side in sides {
        let of_kind = |gid: &str, saga: bool| {
            known.get(gid).is_some_and(|t| {
                if saga { matches!(t.kind, TxKind::Saga(_)) } else { matches!(t.kind, TxKind::Msg(_)) }
            })
        };
        for gid in side.books.awards.keys().filter(|g| !of_kind(g, true)) {
            violations.push(format!(
                "{}: an award for {gid}, which the coordinator does not know as a saga",
                side.name
            ));
        }
        let msgs = side.books.tickets.keys().chain(side.books.outbox.keys());
        for gid in msgs.filter(|g| !of_kind(g, false)) {
            violations.push(format!(
                "{}: a ticket or e-mail for {gid}, which the coordinator does not know as a message",
                side.name
            ));
        }
    }
    violations
}

/// The side serving `url` (by its path prefix).
fn side_of<'s, 'a>(sides: &'s [Side<'a>; 2], url: &str) -> Option<&'s Side<'a>> {
    sides.iter().find(|s| url.contains(s.prefix))
}

fn state_name(s: Option<BarrierState>) -> &'static str {
    s.map_or("none", BarrierState::as_str)
}

fn award_name(a: Option<&Award>) -> &'static str {
    match a {
        None => "none",
        Some(Award::Awarded { .. }) => "awarded",
        Some(Award::TakenBack { .. }) => "taken back",
    }
}

/// A saga: all done, or all turned back; at each step, the award agrees with the barrier.
fn check_saga(tx: &Transaction, sides: &[Side<'_>; 2], violations: &mut Vec<String>) {
    let gid = &tx.gid;
    let done = match tx.state {
        TxState::Confirmed => true,
        TxState::Cancelled => false,
        other => {
            violations.push(format!(
                "saga {gid}: not finished, {} (last error: {})",
                other.as_str(),
                tx.last_error.as_deref().unwrap_or("none")
            ));
            return;
        }
    };
    for b in &tx.branches {
        let Some(side) = side_of(sides, &b.target) else {
            violations.push(format!("saga {gid}: step {} at no known service: {}", b.id, b.target));
            continue;
        };
        let barrier = side.steps.get(&(gid.clone(), b.id.clone())).copied();
        let award = side.books.awards.get(gid.as_str());
        let at = format!(
            "step {} at {}: barrier {}, award {}",
            b.id,
            side.name,
            state_name(barrier),
            award_name(award)
        );
        let agrees = if done {
            barrier == Some(BarrierState::Done) && award.is_some_and(Award::stands)
        } else {
            match barrier {
                Some(BarrierState::Compensated) => matches!(award, Some(Award::TakenBack { .. })),
                None | Some(BarrierState::CompensatedEmpty) => award.is_none(),
                Some(_) => false,
            }
        };
        if !agrees {
            let what = if done { "all done" } else { "turned back" };
            violations.push(format!("saga {gid}: {what}, but {at}"));
        }
    }
}

/// A message: sent with its local transaction committed and every action's e-mail written once, or
/// aborted with no ticket and nothing sent.
fn check_message(tx: &Transaction, back_check: &str, sides: &[Side<'_>; 2], violations: &mut Vec<String>) {
    let gid = &tx.gid;
    let sent = match tx.state {
        TxState::Confirmed => true,
        TxState::Cancelled => false,
        other => {
            violations.push(format!(
                "message {gid}: not finished, {} (last error: {})",
                other.as_str(),
                tx.last_error.as_deref().unwrap_or("none")
            ));
            return;
        }
    };
    match (side_of(sides, back_check), tcc_http::participant::LOCAL_BRANCH.parse::<BranchId>()) {
        (Some(side), Ok(local)) => {
            let barrier = side.steps.get(&(gid.clone(), local)).copied();
            let committed = barrier == Some(BarrierState::Committed);
            let ticket = side.books.tickets.contains_key(gid.as_str());
            if committed != ticket {
                violations.push(format!(
                    "message {gid}: local transaction at {}: barrier {}, but ticket {}",
                    side.name,
                    state_name(barrier),
                    if ticket { "issued" } else { "not issued" }
                ));
            }
            if sent && !committed {
                violations.push(format!(
                    "message {gid}: sent, but its local transaction at {} did not commit: barrier {}",
                    side.name,
                    state_name(barrier)
                ));
            }
            if !sent && committed {
                violations.push(format!(
                    "message {gid}: aborted, but its local transaction at {} committed",
                    side.name
                ));
            }
        }
        _ => violations.push(format!("message {gid}: back-check at no known service: {back_check}")),
    }
    for b in &tx.branches {
        let Some(side) = side_of(sides, &b.target) else {
            violations.push(format!("message {gid}: action {} at no known service: {}", b.id, b.target));
            continue;
        };
        let barrier = side.steps.get(&(gid.clone(), b.id.clone())).copied();
        let copies = side.books.outbox.get(gid.as_str()).map_or(0, |m: &Mail| m.copies);
        let agrees = if sent {
            barrier == Some(BarrierState::Done) && copies == 1
        } else {
            barrier.is_none() && copies == 0
        };
        if !agrees {
            let what = if sent { "sent" } else { "aborted" };
            violations.push(format!(
                "message {gid}: {what}, but action {} at {}: barrier {}, e-mail written {copies} times",
                b.id,
                side.name,
                state_name(barrier)
            ));
        }
    }
}

/// What the sagas and messages came to.
pub fn counts(coordinator: &[Transaction], sides: &[Side<'_>; 2]) -> Counts {
    let mut c = Counts::default();
    for tx in coordinator {
        match (&tx.kind, tx.state) {
            (TxKind::Saga(_), TxState::Confirmed) => c.sagas_done += 1,
            (TxKind::Saga(_), TxState::Cancelled) => c.sagas_compensated += 1,
            (TxKind::Msg(_), TxState::Confirmed) => c.messages_sent += 1,
            (TxKind::Msg(_), TxState::Cancelled) => c.messages_aborted += 1,
            _ => {}
        }
    }
    for side in sides {
        for state in side.steps.values() {
            match state {
                BarrierState::Compensated => c.steps_compensated += 1,
                BarrierState::CompensatedEmpty => c.steps_empty += 1,
                BarrierState::RolledBack => c.rolled_back_by_back_check += 1,
                _ => {}
            }
        }
        c.emails += side.books.outbox.values().map(|m| m.copies as usize).sum::<usize>();
    }
    c
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

    use tcc_core::{Branch, BranchState, Decision, Msg, Saga, SagaStep, Timestamp};
    use travel_booking::confirmation::Ticket;
    use travel_booking::inventory::Stock;

    use super::*;

    struct World {
        txs: Vec<Transaction>,
        books: [Books; 2],
        barriers: [HashMap<Gid, BarrierState>; 2],
        steps: [HashMap<(Gid, BranchId), BarrierState>; 2],
        seen: HashMap<Gid, Seen>,
    }

    /// Indexes in [`World::txs`] of the sagas and messages [`consistent`] adds.
    const SAGA_DONE: usize = 3;
    const SAGA_BACK: usize = 4;
    const MSG_SENT: usize = 5;
    const MSG_ABORTED: usize = 6;

    const FLIGHTS: &str = "http://127.0.0.1:1/tcc/flights";
    const HOTELS: &str = "http://127.0.0.1:2/tcc/hotels";

    fn bid(id: &str) -> BranchId {
        id.parse().unwrap()
    }

    /// A saga of two steps, miles at the flight service and points at the hotel.
    fn saga(state: TxState) -> Transaction {
        let mut tx = tx(state);
        let step = |id: &str, base: &str, name: &str| {
            let mut b = branch(
                id,
                if state == TxState::Confirmed { BranchState::Confirmed } else { BranchState::Cancelled },
            );
            b.target = format!("{base}/{name}/action");
            (
                b,
                SagaStep {
                    compensate: format!("{base}/{name}/compensate"),
                    after: Vec::new(),
                    started: true,
                },
            )
        };
        let (miles, points) = (step("01", FLIGHTS, "miles"), step("02", HOTELS, "points"));
        tx.branches = vec![miles.0, points.0];
        tx.kind = TxKind::Saga(Box::new(Saga { concurrent: false, steps: vec![miles.1, points.1] }));
        tx
    }

    /// A confirmation message: its local transaction at the flight service, an e-mail at each.
    fn message(state: TxState) -> Transaction {
        let mut tx = tx(state);
        let action = |id: &str, base: &str| {
            let mut b = branch(
                id,
                if state == TxState::Confirmed { BranchState::Confirmed } else { BranchState::Cancelled },
            );
            b.target = format!("{base}/mail/action");
            b
        };
        tx.branches = vec![action("01", FLIGHTS), action("02", HOTELS)];
        tx.kind = TxKind::Msg(Box::new(Msg { query_prepared: format!("{FLIGHTS}/back-check") }));
        tx
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
        let sagas_and_messages = vec![
            saga(TxState::Confirmed),
            saga(TxState::Cancelled),
            message(TxState::Confirmed),
            message(TxState::Cancelled),
        ];
        let mut w = World {
            txs: [vec![sold.clone(), released.clone(), empty.clone()], sagas_and_messages].concat(),
            books: [Books::default(), Books::default()],
            barriers: [HashMap::new(), HashMap::new()],
            steps: [HashMap::new(), HashMap::new()],
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
        // The saga all done: both steps done, both awards standing.
        let done = w.txs[SAGA_DONE].gid.clone();
        w.seen.insert(done.clone(), Seen::Begun);
        for (i, step) in [(0, "01"), (1, "02")] {
            w.steps[i].insert((done.clone(), bid(step)), BarrierState::Done);
            w.books[i].awards.insert(done.to_string(), Award::Awarded { customer: "ada".into(), amount: 10 });
        }
        // The saga turned back: the hotel refused mallory (blocked there), so its compensation was
        // empty; the miles were taken back.
        let back = w.txs[SAGA_BACK].gid.clone();
        w.seen.insert(back.clone(), Seen::Refusing);
        w.books[1].blocked.insert("mallory".into());
        w.steps[0].insert((back.clone(), bid("01")), BarrierState::Compensated);
        w.books[0]
            .awards
            .insert(back.to_string(), Award::TakenBack { customer: "mallory".into(), amount: 10 });
        w.steps[1].insert((back.clone(), bid("02")), BarrierState::CompensatedEmpty);
        // The message sent: ticket issued with its local transaction, an e-mail at each service.
        let sent = w.txs[MSG_SENT].gid.clone();
        w.seen.insert(sent.clone(), Seen::ConfirmAcked);
        w.steps[0].insert((sent.clone(), bid("00")), BarrierState::Committed);
        w.books[0].tickets.insert(sent.to_string(), Ticket { booking: "t".into(), customer: "ada".into() });
        for (i, action) in [(0, "01"), (1, "02")] {
            w.steps[i].insert((sent.clone(), bid(action)), BarrierState::Done);
            let mail = Mail { customer: "ada".into(), booking: "t".into(), copies: 1 };
            w.books[i].outbox.insert(sent.to_string(), mail);
        }
        // The message aborted: the back-check settled its local transaction as rolled back.
        let aborted = w.txs[MSG_ABORTED].gid.clone();
        w.seen.insert(aborted.clone(), Seen::Begun);
        w.steps[0].insert((aborted, bid("00")), BarrierState::RolledBack);
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
                prefix: "/tcc/flights/",
                steps: &w.steps[0],
            },
            Side {
                name: "hotels",
                branch: "hotel".parse().unwrap(),
                books: &w.books[1],
                barrier: &w.barriers[1],
                prefix: "/tcc/hotels/",
                steps: &w.steps[1],
            },
        ];
        check(&w.txs, &sides, STOCKED, &w.seen)
    }

    #[test]
    fn a_consistent_world_has_no_violation() {
        assert_eq!(run(&consistent()), Vec::<String>::new());
    }

    fn gid(w: &World, i: usize) -> Gid {
        w.txs[i].gid.clone()
    }

    fn set_step(w: &mut World, side: usize, tx: usize, branch: &str, state: Option<BarrierState>) {
        let key = (gid(w, tx), bid(branch));
        match state {
            Some(s) => w.steps[side].insert(key, s),
            None => w.steps[side].remove(&key),
        };
    }

    fn set_award(w: &mut World, side: usize, tx: usize, award: Option<Award>) {
        let key = gid(w, tx).to_string();
        match award {
            Some(a) => w.books[side].awards.insert(key, a),
            None => w.books[side].awards.remove(&key),
        };
    }

    #[test]
    fn every_broken_saga_or_message_is_caught() {
        let awarded = |c: &str| Some(Award::Awarded { customer: c.into(), amount: 10 });
        let taken_back = |c: &str| Some(Award::TakenBack { customer: c.into(), amount: 10 });
        type Breakage = Box<dyn Fn(&mut World)>;
        let breakages: Vec<(&str, Breakage)> = vec![
            (": not finished, cancelling", Box::new(|w| w.txs[SAGA_DONE].state = TxState::Cancelling)),
            // All done, but the hotel's step never ran (its effect missing).
            (
                "all done, but step 02 at hotels: barrier none, award none",
                Box::new(move |w| {
                    set_step(w, 1, SAGA_DONE, "02", None);
                    set_award(w, 1, SAGA_DONE, None);
                }),
            ),
            // All done, but the hotel's award was taken back.
            (
                "all done, but step 02 at hotels",
                Box::new(move |w| set_award(w, 1, SAGA_DONE, taken_back("ada"))),
            ),
            // Turned back, but the miles still stand: compensation never ran.
            (
                "turned back, but step 01 at flights: barrier done, award awarded",
                Box::new(move |w| {
                    set_step(w, 0, SAGA_BACK, "01", Some(BarrierState::Done));
                    set_award(w, 0, SAGA_BACK, awarded("mallory"));
                }),
            ),
            // An action after its compensation: the empty compensation is on record, yet the
            // points were awarded.
            (
                "turned back, but step 02 at hotels: barrier compensated_empty, award awarded",
                Box::new(move |w| {
                    set_award(w, 1, SAGA_BACK, awarded("mallory"));
                }),
            ),
            // Compensated twice would show as the barrier saying compensated with no award taken back.
            (
                "turned back, but step 01 at flights: barrier compensated, award none",
                Box::new(move |w| {
                    set_award(w, 0, SAGA_BACK, None);
                }),
            ),
            (
                "a step refuses (a blocked account), but the saga ended confirmed",
                Box::new(|w| {
                    let g = gid(w, SAGA_DONE);
                    w.seen.insert(g, Seen::Refusing);
                }),
            ),
            (": not finished, confirming", Box::new(|w| w.txs[MSG_SENT].state = TxState::Confirming)),
            // Sent though its local transaction never committed (no ticket, back-check rolled back).
            (
                "sent, but its local transaction at flights did not commit",
                Box::new(move |w| {
                    set_step(w, 0, MSG_SENT, "00", Some(BarrierState::RolledBack));
                    let g = gid(w, MSG_SENT).to_string();
                    w.books[0].tickets.remove(&g);
                }),
            ),
            // An action ran twice.
            (
                "sent, but action 02 at hotels: barrier done, e-mail written 2 times",
                Box::new(|w| {
                    let g = gid(w, MSG_SENT).to_string();
                    w.books[1].outbox.get_mut(&g).unwrap().copies = 2;
                }),
            ),
            // A submitted message whose action never ran.
            (
                "sent, but action 01 at flights: barrier none, e-mail written 0 times",
                Box::new(move |w| {
                    set_step(w, 0, MSG_SENT, "01", None);
                    let g = gid(w, MSG_SENT).to_string();
                    w.books[0].outbox.remove(&g);
                }),
            ),
            // An aborted message's action ran.
            (
                "aborted, but action 02 at hotels: barrier done, e-mail written 1 times",
                Box::new(move |w| {
                    set_step(w, 1, MSG_ABORTED, "02", Some(BarrierState::Done));
                    let g = gid(w, MSG_ABORTED).to_string();
                    w.books[1]
                        .outbox
                        .insert(g, Mail { customer: "c".into(), booking: "t".into(), copies: 1 });
                }),
            ),
            // An aborted message whose local transaction committed after all.
            (
                "aborted, but its local transaction at flights committed",
                Box::new(move |w| {
                    set_step(w, 0, MSG_ABORTED, "00", Some(BarrierState::Committed));
                    let g = gid(w, MSG_ABORTED).to_string();
                    w.books[0].tickets.insert(g, Ticket { booking: "t".into(), customer: "c".into() });
                }),
            ),
            // A ticket written without its barrier record (not in one transaction).
            (
                "barrier rolled_back, but ticket issued",
                Box::new(|w| {
                    let g = gid(w, MSG_ABORTED).to_string();
                    w.books[0].tickets.insert(g, Ticket { booking: "t".into(), customer: "c".into() });
                }),
            ),
            // The initiator's submit was acknowledged, yet the message ended aborted.
            (
                "confirm was acknowledged but it ended cancelled",
                Box::new(|w| {
                    let g = gid(w, MSG_ABORTED);
                    w.seen.insert(g, Seen::ConfirmAcked);
                }),
            ),
            (
                "an award for stray, which the coordinator does not know as a saga",
                Box::new(move |w| {
                    w.books[0]
                        .awards
                        .insert("stray".into(), Award::Awarded { customer: "c".into(), amount: 1 });
                }),
            ),
            (
                "a ticket or e-mail for",
                Box::new(move |w| {
                    // An e-mail under a TCC booking's id.
                    let g = gid(w, 0).to_string();
                    w.books[1]
                        .outbox
                        .insert(g, Mail { customer: "c".into(), booking: "t".into(), copies: 1 });
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
