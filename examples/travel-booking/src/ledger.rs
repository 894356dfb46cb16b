//! Reading both services' books and checking the invariants a travel agency lives by.

use std::collections::BTreeMap;

use tcc_http::participant::Participant;

use crate::inventory::{BOOKINGS, Booking, STOCK, Stock};

/// One service's books: stock per item and what it did per transaction.
#[derive(Clone, Debug, Default)]
pub struct Books {
    /// Stock by item.
    pub stock: BTreeMap<String, Stock>,
    /// Booking by transaction id.
    pub bookings: BTreeMap<String, Booking>,
}

/// Reads a sled service's books: the keys from its database, the values through its participant (which
/// decodes the versioned form its contexts wrote).
pub fn read(participant: &Participant, db: &sled::Db) -> Result<Books, String> {
    let mut books = Books::default();
    for (tree, is_stock) in [(STOCK, true), (BOOKINGS, false)] {
        let keys = db.open_tree(tree).map_err(|e| e.to_string())?;
        for key in keys.iter().keys() {
            let key = key.map_err(|e| e.to_string())?;
            let name = String::from_utf8_lossy(&key).into_owned();
            if is_stock {
                if let Some(v) = participant.read::<Stock>(tree, &key).map_err(|e| e.to_string())? {
                    books.stock.insert(name, v.value);
                }
            } else if let Some(v) = participant.read::<Booking>(tree, &key).map_err(|e| e.to_string())? {
                books.bookings.insert(name, v.value);
            }
        }
    }
    Ok(books)
}

/// Checks the invariants across both services; returns every violation found (none is good).
///
/// - stock is conserved: free + held + sold equals what was stocked, for every item;
/// - nothing is left held once every booking is decided;
/// - every sold seat has its sold room, and the other way round (one transaction each);
/// - no booking is half done: a transaction is sold at both services or at neither.
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
    violations
}
