//! Reading both services' books and checking the invariants a travel agency lives by.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use tcc_http::participant::Participant;

use crate::confirmation::{Mail, OUTBOX, TICKETS, Ticket};
use crate::inventory::{BOOKINGS, Booking, STOCK, Stock};
use crate::loyalty::{AWARDS, Award, BLOCKED};

/// One service's books: stock per item and what it did per transaction.
#[derive(Clone, Debug, Default)]
pub struct Books {
    /// Stock by item.
    pub stock: BTreeMap<String, Stock>,
    /// Booking by transaction id.
    pub bookings: BTreeMap<String, Booking>,
    /// Loyalty award by saga id.
    pub awards: BTreeMap<String, Award>,
    /// Customers whose loyalty account is blocked here.
    pub blocked: BTreeSet<String>,
    /// Ticket by message id (the local transactions of confirmation messages).
    pub tickets: BTreeMap<String, Ticket>,
    /// Confirmation e-mail by message id.
    pub outbox: BTreeMap<String, Mail>,
}

/// Reads a sled service's books: the keys from its database, the values through its participant (which
/// decodes the versioned form its contexts wrote).
pub fn read(participant: &Participant, db: &sled::Db) -> Result<Books, String> {
    Ok(Books {
        stock: read_tree(participant, db, STOCK)?,
        bookings: read_tree(participant, db, BOOKINGS)?,
        awards: read_tree(participant, db, AWARDS)?,
        blocked: read_tree::<bool>(participant, db, BLOCKED)?
            .into_iter()
            .filter(|(_, b)| *b)
            .map(|(c, _)| c)
            .collect(),
        tickets: read_tree(participant, db, TICKETS)?,
        outbox: read_tree(participant, db, OUTBOX)?,
    })
}

fn read_tree<T: DeserializeOwned>(
    participant: &Participant,
    db: &sled::Db,
    tree: &str,
) -> Result<BTreeMap<String, T>, String> {
    let mut values = BTreeMap::new();
    for key in db.open_tree(tree).map_err(|e| e.to_string())?.iter().keys() {
        let key = key.map_err(|e| e.to_string())?;
        if let Some(v) = participant.read::<T>(tree, &key).map_err(|e| e.to_string())? {
            values.insert(String::from_utf8_lossy(&key).into_owned(), v.value);
        }
    }
    Ok(values)
}

/// Checks the invariants across both services; returns every violation found (none is good).
///
/// - stock is conserved: free + held + sold equals what was stocked, for every item;
/// - nothing is left held once every booking is decided;
/// - every sold seat has its sold room, and the other way round (one transaction each);
/// - no booking is half done: a transaction is sold at both services or at neither;
/// - loyalty ([`check_loyalty`]): every saga's miles and points are all awarded or all taken back
///   (or never awarded), and nobody's blocked account was awarded anything;
/// - confirmations ([`check_confirmations`]): one e-mail at each service per ticket issued (per
///   committed local transaction), none for a message without a ticket, never a second copy.
pub fn check(flights: &Books, hotels: &Books, stocked: &[(&str, u32)], quiescent: bool) -> Vec<String> {
    let mut violations = Vec::new();
    for (name, books) in [("flights", flights), ("hotels", hotels)] {
        for (item, stock) in &books.stock {
            if let Some((_, units)) = stocked.iter().find(|(i, _)| i == item)
                && stock.total() != *units
            {
                violations
                    .push(format!("{name}: {item} has {} units in total, stocked {units}", stock.total()));
            }
            if quiescent && stock.held > 0 {
                violations.push(format!("{name}: {item} still has {} units held", stock.held));
            }
        }
        let sold = books.bookings.values().filter(|b| matches!(b, Booking::Sold { .. })).count();
        let counted: u32 = books.stock.values().map(|s| s.sold).sum();
        if u32::try_from(sold).ok() != Some(counted) {
            violations.push(format!("{name}: {sold} bookings sold but the stock counts {counted} sold"));
        }
    }
    let sold = |b: &Books| -> Vec<String> {
        b.bookings.iter().filter(|(_, v)| matches!(v, Booking::Sold { .. })).map(|(k, _)| k.clone()).collect()
    };
    let (f, h) = (sold(flights), sold(hotels));
    for gid in f.iter().filter(|g| !h.contains(g)) {
        violations.push(format!("booking {gid}: seat sold without its room"));
    }
    for gid in h.iter().filter(|g| !f.contains(g)) {
        violations.push(format!("booking {gid}: room sold without its seat"));
    }
    if quiescent {
        violations.extend(check_loyalty(flights, hotels));
        violations.extend(check_confirmations(&[("flights", flights), ("hotels", hotels)]));
    }
    violations
}

/// The loyalty saga's invariants once every saga has ended: for each saga, the miles at the flight
/// service and the points at the hotel both stand, or neither does (each taken back or never
/// awarded); no award stands for a customer whose account at that service is blocked.
pub fn check_loyalty(flights: &Books, hotels: &Books) -> Vec<String> {
    let mut violations = Vec::new();
    let sagas: BTreeSet<&String> = flights.awards.keys().chain(hotels.awards.keys()).collect();
    for gid in sagas {
        let (miles, points) = (flights.awards.get(gid), hotels.awards.get(gid));
        let stands = |a: Option<&Award>| a.is_some_and(Award::stands);
        if stands(miles) != stands(points) {
            violations.push(format!(
                "loyalty saga {gid}: half done: miles {}, points {}",
                award_name(miles),
                award_name(points)
            ));
        }
    }
    for (name, books) in [("flights", flights), ("hotels", hotels)] {
        for (gid, award) in &books.awards {
            if award.stands() && books.blocked.contains(award.customer()) {
                violations.push(format!(
                    "loyalty saga {gid}: {name} awarded {}, whose account there is blocked",
                    award.customer()
                ));
            }
        }
    }
    violations
}

fn award_name(a: Option<&Award>) -> &'static str {
    match a {
        None => "never awarded",
        Some(Award::Awarded { .. }) => "awarded",
        Some(Award::TakenBack { .. }) => "taken back",
    }
}

/// The confirmation message's invariants once every message has ended, over every service's books
/// (each message mails at each of them): every e-mail was written once; every ticket issued (a
/// committed local transaction) has its e-mail at every service; no e-mail was sent for a message
/// whose ticket was never issued.
pub fn check_confirmations(services: &[(&str, &Books)]) -> Vec<String> {
    let mut violations = Vec::new();
    let tickets: BTreeMap<&String, &Ticket> = services.iter().flat_map(|(_, b)| &b.tickets).collect();
    for (name, books) in services {
        for (gid, mail) in &books.outbox {
            if mail.copies != 1 {
                violations.push(format!("message {gid}: {name} wrote its e-mail {} times", mail.copies));
            }
            if !tickets.contains_key(gid) {
                violations.push(format!("message {gid}: {name} sent an e-mail but no ticket was issued"));
            }
        }
        for gid in tickets.keys() {
            if !books.outbox.contains_key(*gid) {
                violations.push(format!("message {gid}: ticket issued but {name} sent no e-mail"));
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::confirmation::Mail;

    fn awarded(customer: &str) -> Award {
        Award::Awarded { customer: customer.into(), amount: 10 }
    }

    fn taken_back(customer: &str) -> Award {
        Award::TakenBack { customer: customer.into(), amount: 10 }
    }

    /// A saga with both awards standing, one turned back at the hotel (miles taken back, no
    /// points), one taken back at both; a ticket with its two e-mails.
    fn consistent() -> (Books, Books) {
        let (mut f, mut h) = (Books::default(), Books::default());
        f.awards.insert("s1".into(), awarded("ada"));
        h.awards.insert("s1".into(), awarded("ada"));
        f.awards.insert("s2".into(), taken_back("mallory"));
        h.blocked.insert("mallory".into());
        f.awards.insert("s3".into(), taken_back("bob"));
        h.awards.insert("s3".into(), taken_back("bob"));
        f.tickets.insert("m1".into(), Ticket { booking: "t1".into(), customer: "ada".into() });
        let mail = Mail { customer: "ada".into(), booking: "t1".into(), copies: 1 };
        f.outbox.insert("m1".into(), mail.clone());
        h.outbox.insert("m1".into(), mail);
        (f, h)
    }

    fn violations(f: &Books, h: &Books) -> Vec<String> {
        check(f, h, &[], true)
    }

    #[test]
    fn consistent_sagas_and_messages_have_no_violation() {
        let (f, h) = consistent();
        assert_eq!(violations(&f, &h), Vec::<String>::new());
    }

    #[test]
    fn every_broken_saga_or_message_is_caught() {
        type Breakage = Box<dyn Fn(&mut Books, &mut Books)>;
        let breakages: Vec<(&str, Breakage)> = vec![
            (
                "half done: miles taken back, points awarded",
                Box::new(|_, h| {
                    h.awards.insert("s2".into(), awarded("mallory"));
                }),
            ),
            (
                "half done: miles awarded, points never awarded",
                Box::new(|_, h| {
                    h.awards.remove("s1");
                }),
            ),
            (
                "half done: miles awarded, points taken back",
                Box::new(|_, h| {
                    h.awards.insert("s1".into(), taken_back("ada"));
                }),
            ),
            (
                "hotels awarded mallory, whose account there is blocked",
                Box::new(|f, h| {
                    f.awards.insert("s4".into(), awarded("mallory"));
                    h.awards.insert("s4".into(), awarded("mallory"));
                }),
            ),
            (
                "hotels wrote its e-mail 2 times",
                Box::new(|_, h| {
                    h.outbox.get_mut("m1").unwrap().copies = 2;
                }),
            ),
            (
                "ticket issued but hotels sent no e-mail",
                Box::new(|_, h| {
                    h.outbox.remove("m1");
                }),
            ),
            (
                "flights sent an e-mail but no ticket was issued",
                Box::new(|f, _| {
                    f.tickets.remove("m1");
                }),
            ),
        ];
        for (expected, breakage) in breakages {
            let (mut f, mut h) = consistent();
            breakage(&mut f, &mut h);
            let found = violations(&f, &h);
            assert!(found.iter().any(|v| v.contains(expected)), "{expected:?} not caught: {found:?}");
        }
    }

    #[test]
    fn unfinished_sagas_and_messages_are_not_judged_before_quiescence() {
        let (f, mut h) = consistent();
        h.awards.remove("s1");
        h.outbox.remove("m1");
        assert_eq!(check(&f, &h, &[], false), Vec::<String>::new());
    }
}
