//! The embedded default store on sled.
//!
//! Three trees:
//! - `tcc_tx`: gid -> record ([`codec`](super::codec)), the truth;
//! - `tcc_due`: due time (big-endian ms) ++ gid -> state code, for unfinished transactions only
//!   (every one of them has a due time); listing an unfinished state reads this small index;
//! - `tcc_state`: state code ++ gid -> (), for the states without a due time (final and flagged),
//!   so listing one of them never reads the others or the unfinished ones.
//!
//! Each record is in exactly one index, so a transaction's life costs eight writes (begin two,
//! decision three, end three) rather than twelve with both indexes on every record: index writes
//! were two thirds of the store's CPU in the embedded benchmark. Listing an unfinished state scans
//! the due index, whose size is the number of unfinished transactions, never the history.
//!
//! ## Why no sled transactions
//! Measured here: a sled multi-tree transaction cannot run while a flush is in progress, so with group
//! commit every write waited for the previous flush and the store topped out near 7,000 writes/s
//! whatever the number of writers. Single-key operations do not wait, so each change is three steps
//! that keep the indexes safe without a transaction:
//! 1. insert the new record's index entries;
//! 2. compare-and-swap the record itself (the only step that decides);
//! 3. remove the old record's index entries (or, if the swap lost, the entries of step 1 that the
//!    stored record does not use).
//!
//! An index entry therefore exists whenever a record needs it, whatever instant a crash hits; at worst
//! an entry is left over, and readers check the record before trusting an entry (and drop stale due
//! entries). Writers of the same transaction inside this process take one of [`STRIPES`] locks, so two
//! of them never interleave these steps; no other process can open the directory (sled locks it).

use std::path::Path;
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use sled::{CompareAndSwapError, IVec, Tree};

use super::codec::{decode, encode};
use super::group_commit::GroupCommit;
use super::{Cas, ClaimChange, ListQuery, MAX_PAGE, Page, Store};
use crate::error::{Error, Result};
use crate::model::{Gid, Timestamp, Transaction, TxState};

/// Where the store notes its index layout, so that [`SledStore::migrate`] runs once per directory.
const META_TREE: &str = "tcc_meta";
const LAYOUT_KEY: &[u8] = b"index_layout";
/// The layout of the module docs: due entries carry the state, the state index only final and
/// flagged transactions. Directories without the note predate it.
const LAYOUT: &[u8] = &[2];

/// How many locks writers of different transactions spread over.
pub const STRIPES: usize = 256;

/// The sled store: one process, one directory (sled locks it), durable writes through group commit.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use tcc_core::store::{SledStore, Store};
/// use tcc_core::{Gid, Timestamp};
/// let dir = tempfile::tempdir().unwrap();
/// let store = SledStore::open(dir.path()).unwrap();
/// let mut tx = tcc_core::state::begin(Gid::generate(), Timestamp(0), Timestamp(1_000));
/// tx.version = 1;
/// store.insert(&tx).await.unwrap();
/// assert_eq!(store.get(&tx.gid).await.unwrap(), Some(tx));
/// # });
/// ```
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    txs: Tree,
    due: Tree,
    states: Tree,
    commit: GroupCommit,
    stripes: Vec<Mutex<()>>,
    /// Due entries whose record does not decode, already reported: skipped by claims (one damaged
    /// record must not stall recovery of the others) and logged once, not every poll.
    damaged: Mutex<std::collections::HashSet<Vec<u8>>>,
}

fn due_key(at: Timestamp, gid: &Gid) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + gid.as_str().len());
    k.extend_from_slice(&at.0.to_be_bytes());
    k.extend_from_slice(gid.as_str().as_bytes());
    k
}

/// Whether a record is indexed by state: one in a state without a due time (see the module docs of
/// [`super`]), or, against that rule, one with no due time.
fn in_state_index(tx: &Transaction) -> bool {
    !listed_by_due(tx.state) || tx.due_at.is_none()
}

/// Whether a listing of `state` must read the due index (it is a state with a due time).
fn listed_by_due(state: TxState) -> bool {
    !(state.is_final() || state == TxState::Flagged)
}

fn state_key(state: TxState, gid: &Gid) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + gid.as_str().len());
    k.push(state.code());
    k.extend_from_slice(gid.as_str().as_bytes());
    k
}

fn gid_from(bytes: &[u8]) -> Result<Gid> {
    let s = std::str::from_utf8(bytes).map_err(|_| Error::Storage("damaged index key".to_owned()))?;
    s.parse().map_err(|_| Error::Storage(format!("damaged index key {s:?}")))
}

fn decode_for(gid: &Gid, bytes: &[u8]) -> Result<Transaction> {
    decode(bytes).map_err(|e| Error::Storage(format!("transaction {gid}: {e}")))
}

/// A record's due entry: its key and its value (the state code; empty in stores written before the
/// value was kept, and while a change that keeps the key but not the state is in flight: readers
/// then look at the record).
type DueEntry = (Vec<u8>, u8);

/// The index entries a record needs: its due entry and its state entry (see the module docs).
fn index_keys(tx: &Transaction) -> (Option<DueEntry>, Option<Vec<u8>>) {
    let due = tx.due_at.map(|at| (due_key(at, &tx.gid), tx.state.code()));
    let state = in_state_index(tx).then(|| state_key(tx.state, &tx.gid));
    (due, state)
}

impl SledStore {
    /// The compare-and-set itself, without waiting for durability.
    fn swap_if(&self, expected_version: u64, tx: &Transaction) -> Result<Cas> {
        let _g = self.stripe(&tx.gid);
        Ok(match self.read(&tx.gid)? {
            Some((old, bytes)) if old.version == expected_version => {
                match self.swap(Some(&old), Some(&bytes), tx)? {
                    Ok(()) => Cas::Stored,
                    Err(current) => Cas::Conflict(current),
                }
            }
            other => Cas::Conflict(other.map(|(t, _)| t)),
        })
    }
    /// Opens (or creates) the store in directory `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<SledStore> {
        let db = sled::Config::new().path(path).open()?;
        SledStore::with_db(db)
    }

    /// Uses an already open sled database (for example one shared with an embedded participant).
    pub fn with_db(db: sled::Db) -> Result<SledStore> {
        let txs = db.open_tree("tcc_tx")?;
        let due = db.open_tree("tcc_due")?;
        let states = db.open_tree("tcc_state")?;
        let flush_db = db.clone();
        let commit =
            GroupCommit::start("tcc-store", move || flush_db.flush().map(|_| ()).map_err(|e| e.to_string()))?;
        let stripes = (0..STRIPES).map(|_| Mutex::new(())).collect();
        let store = SledStore { db, txs, due, states, commit, stripes, damaged: Mutex::default() };
        store.migrate()?;
        Ok(store)
    }

    /// The underlying sled database.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    fn stripe(&self, gid: &Gid) -> std::sync::MutexGuard<'_, ()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(gid.as_str());
        let i = (h % STRIPES as u64) as usize;
        // The guarded data is `()`: a panic elsewhere cannot leave it inconsistent.
        self.stripes[i].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the record `expected` (bytes as stored, or `None` for a new one) with `new`, keeping
    /// both indexes right at every instant (see the module docs). The caller holds the gid's stripe.
    /// Returns the record stored now if the swap lost.
    fn swap(
        &self,
        old: Option<&Transaction>,
        old_bytes: Option<&IVec>,
        new: &Transaction,
    ) -> Result<std::result::Result<(), Option<Transaction>>> {
        let bytes = encode(new)?;
        let (new_due, new_state) = index_keys(new);
        let (old_due, old_state) = old.map(index_keys).unwrap_or((None, None));
        let old_due_key = old_due.as_ref().map(|(k, _)| k);
        // A due entry whose key stays while the state changes holds no state until the swap is
        // done, so that at no instant does it name a state the record is not in.
        let mut relabel = None;
        if let Some((k, code)) = &new_due {
            match &old_due {
                Some((ok, oc)) if ok == k && oc == code => {} // already there (a registration)
                Some((ok, _)) if ok == k => {
                    self.due.insert(k.as_slice(), &[][..])?;
                    relabel = Some((k, *code));
                }
                _ => {
                    self.due.insert(k.as_slice(), &[*code][..])?;
                }
            }
        }
        if let Some(k) = new_state.as_ref().filter(|k| old_state.as_ref() != Some(*k)) {
            self.states.insert(k.as_slice(), &[][..])?;
        }
        let key = new.gid.as_str().as_bytes();
        match self.txs.compare_and_swap(key, old_bytes, Some(bytes))? {
            Ok(()) => {
                if let Some((k, code)) = relabel {
                    self.due.insert(k.as_slice(), &[code][..])?;
                }
                if let Some(k) = old_due_key.filter(|k| Some(*k) != new_due.as_ref().map(|(nk, _)| nk)) {
                    self.due.remove(k)?;
                }
                if let Some(k) = old_state.filter(|k| Some(k) != new_state.as_ref()) {
                    self.states.remove(k)?;
                }
                Ok(Ok(()))
            }
            Err(CompareAndSwapError { current, .. }) => {
                let current = current.map(|b| decode_for(&new.gid, &b)).transpose()?;
                let (cur_due, cur_state) = current.as_ref().map(index_keys).unwrap_or((None, None));
                if let Some((k, _)) = &new_due {
                    match &cur_due {
                        // The entry is the stored record's: give it back its state.
                        Some((ck, cc)) if ck == k => {
                            self.due.insert(k.as_slice(), &[*cc][..])?;
                        }
                        _ => {
                            self.due.remove(k.as_slice())?;
                        }
                    }
                }
                if let Some(k) = new_state.filter(|k| Some(k) != cur_state.as_ref()) {
                    self.states.remove(k)?;
                }
                Ok(Err(current))
            }
        }
    }

    /// Reads the record with its stored bytes (the swap compares bytes).
    fn read(&self, gid: &Gid) -> Result<Option<(Transaction, IVec)>> {
        match self.txs.get(gid.as_str().as_bytes())? {
            None => Ok(None),
            Some(bytes) => Ok(Some((decode_for(gid, &bytes)?, bytes))),
        }
    }

    /// Reports a due entry whose record cannot be read, once, and leaves it for an operator.
    fn skip_damaged(&self, key: &[u8], e: &Error) {
        let mut seen = self.damaged.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.insert(key.to_vec()) {
            tracing::error!(
                entry = %String::from_utf8_lossy(key.get(8..).unwrap_or_default()),
                error = %e,
                "a due transaction cannot be read; skipping it (the others are served)"
            );
        }
    }

    /// The ids that may be in `state`, after `after`, in id order, each still to be checked
    /// against its record: the state index's entries, and for a state with a due time the due
    /// index's entries naming it (or no state). Reads no finished history for an unfinished state.
    fn candidates(&self, state: TxState, after: Option<&Gid>) -> Result<Vec<Gid>> {
        let code = state.code();
        let start = match after {
            Some(after) => std::ops::Bound::Excluded(state_key(state, after)),
            None => std::ops::Bound::Included(vec![code]),
        };
        let end = std::ops::Bound::Excluded(vec![code + 1]);
        let mut gids = Vec::new();
        for kv in self.states.range((start, end)) {
            let (k, _) = kv?;
            gids.push(gid_from(k.get(1..).unwrap_or_default())?);
        }
        if listed_by_due(state) {
            let from_state_index = gids.len();
            for kv in self.due.iter() {
                let (k, v) = kv?;
                if v.first().is_some_and(|c| *c != code) {
                    continue;
                }
                let gid = gid_from(k.get(8..).unwrap_or_default())?;
                if after.is_none_or(|a| gid.as_str() > a.as_str()) {
                    gids.push(gid);
                }
            }
            if gids.len() > from_state_index {
                gids.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
                gids.dedup();
            }
        }
        Ok(gids)
    }

    /// Brings a directory written before due entries held their state (and every record had a
    /// state entry) to the current layout: each due entry gets its record's state, and state
    /// entries of records indexed by due time go. Reads only the due index and the state index's
    /// unfinished part; run on open, before anyone else uses the store, once per directory (a note
    /// in `tcc_meta` says it is done), and safe to repeat if a crash interrupts it.
    fn migrate(&self) -> Result<()> {
        let meta = self.db.open_tree(META_TREE)?;
        if meta.get(LAYOUT_KEY)?.as_deref() == Some(LAYOUT) {
            return Ok(());
        }
        let mut fixed = 0usize;
        for kv in self.due.iter() {
            let (k, v) = kv?;
            if !v.is_empty() {
                continue;
            }
            let Ok(gid) = gid_from(k.get(8..).unwrap_or_default()) else { continue };
            match self.read(&gid) {
                Ok(Some((tx, _))) if tx.due_at.map(|at| due_key(at, &gid)).as_deref() == Some(&k[..]) => {
                    self.due.insert(k, &[tx.state.code()][..])?;
                }
                Ok(_) => {
                    self.due.remove(k)?;
                }
                Err(e) => self.skip_damaged(&k, &e),
            }
            fixed += 1;
        }
        for state in [TxState::Trying, TxState::Confirming, TxState::Cancelling] {
            for kv in self.states.scan_prefix([state.code()]) {
                let (k, _) = kv?;
                let Ok(gid) = gid_from(k.get(1..).unwrap_or_default()) else { continue };
                match self.read(&gid) {
                    Ok(Some((tx, _))) if tx.state == state && in_state_index(&tx) => {}
                    Ok(_) => {
                        self.states.remove(k)?;
                        fixed += 1;
                    }
                    Err(e) => self.skip_damaged(&k, &e),
                }
            }
        }
        // Noted after the entries it vouches for, and flushed with them (sled's log keeps order).
        meta.insert(LAYOUT_KEY, LAYOUT)?;
        self.db.flush()?;
        if fixed > 0 {
            tracing::info!(entries = fixed, "moved the store's indexes to the current layout");
        }
        Ok(())
    }

    fn claim(
        &self,
        owner: &str,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
        then: Option<&ClaimChange<'_>>,
    ) -> Result<Vec<(Transaction, bool)>> {
        let end = (now.0.saturating_add(1)).to_be_bytes();
        let mut keys = Vec::new();
        for kv in self.due.range(..end.to_vec()) {
            let (k, _) = kv?;
            keys.push(k);
            if keys.len() >= limit {
                break;
            }
        }
        let mut claimed = Vec::with_capacity(keys.len());
        for k in keys {
            match self.claim_one(&k, owner, now, lease_until, then) {
                Ok(Some(found)) => claimed.push(found),
                Ok(None) => {}
                Err(e) => self.skip_damaged(&k, &e),
            }
        }
        Ok(claimed)
    }

    fn claim_one(
        &self,
        key: &[u8],
        owner: &str,
        now: Timestamp,
        lease_until: Timestamp,
        then: Option<&ClaimChange<'_>>,
    ) -> Result<Option<(Transaction, bool)>> {
        let gid = gid_from(key.get(8..).unwrap_or_default())?;
        let _g = self.stripe(&gid);
        let Some((old, bytes)) = self.read(&gid)? else {
            self.due.remove(key)?; // an entry left over from a record that is gone
            return Ok(None);
        };
        if old.due_at.map(|at| due_key(at, &gid)).as_deref() != Some(key) {
            self.due.remove(key)?; // left over by a change a crash interrupted
            return Ok(None);
        }
        if old.due_at.is_none_or(|at| at > now) || old.state.is_final() || old.state == TxState::Flagged {
            return Ok(None);
        }
        let mut new = old.clone();
        new.lease_owner = Some(owner.to_owned());
        new.due_at = Some(lease_until);
        new.version = old.version + 1;
        // The caller's change, if any, replaces the claim in the same write.
        let mut changed = false;
        if let Some(mut next) = then.and_then(|f| f(&new)) {
            next.version = new.version;
            new = next;
            changed = true;
        }
        Ok(self.swap(Some(&old), Some(&bytes), &new)?.ok().map(|()| (new, changed)))
    }
}

#[async_trait]
impl Store for SledStore {
    async fn insert(&self, tx: &Transaction) -> Result<()> {
        self.insert_unsynced(tx).await?;
        self.commit.durable().await
    }

    async fn get(&self, gid: &Gid) -> Result<Option<Transaction>> {
        Ok(self.read(gid)?.map(|(tx, _)| tx))
    }

    async fn compare_and_set(&self, expected_version: u64, tx: &Transaction) -> Result<Cas> {
        let cas = self.swap_if(expected_version, tx)?;
        if cas == Cas::Stored {
            self.commit.durable().await?;
        }
        Ok(cas)
    }

    async fn insert_unsynced(&self, tx: &Transaction) -> Result<()> {
        let _g = self.stripe(&tx.gid);
        match self.swap(None, None, tx)? {
            Ok(()) => Ok(()),
            Err(_) => Err(Error::AlreadyExists(tx.gid.clone())),
        }
    }

    async fn compare_and_set_unsynced(&self, expected_version: u64, tx: &Transaction) -> Result<Cas> {
        self.swap_if(expected_version, tx)
    }

    async fn list(&self, query: &ListQuery) -> Result<Page> {
        let limit = if query.limit == 0 { MAX_PAGE } else { query.limit.min(MAX_PAGE) };
        let mut items = Vec::with_capacity(limit.min(64));
        let mut more = false;
        match query.state {
            None => {
                let iter = match &query.after {
                    Some(after) => self.txs.range((
                        std::ops::Bound::Excluded(after.as_str().as_bytes().to_vec()),
                        std::ops::Bound::Unbounded,
                    )),
                    None => self.txs.iter(),
                };
                for kv in iter {
                    let (k, v) = kv?;
                    if items.len() == limit {
                        more = true;
                        break;
                    }
                    let gid = gid_from(&k)?;
                    items.push(decode_for(&gid, &v)?);
                }
            }
            Some(state) => {
                for gid in self.candidates(state, query.after.as_ref())? {
                    // An entry may be left over from an interrupted change: trust the record.
                    let Some(tx) = self.get(&gid).await? else { continue };
                    if tx.state != state {
                        continue;
                    }
                    if items.len() == limit {
                        more = true;
                        break;
                    }
                    items.push(tx);
                }
            }
        }
        let next = if more { items.last().map(|t| t.gid.clone()) } else { None };
        Ok(Page { items, next })
    }

    async fn claim_due(
        &self,
        owner: &str,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> Result<Vec<Transaction>> {
        let claimed = self.claim(owner, now, lease_until, limit, None)?;
        Ok(claimed.into_iter().map(|(tx, _)| tx).collect())
    }

    async fn claim_due_with(
        &self,
        owner: &str,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
        then: &ClaimChange<'_>,
    ) -> Result<Vec<(Transaction, bool)>> {
        self.claim(owner, now, lease_until, limit, Some(then))
    }

    async fn reclaim_abandoned(&self, now: Timestamp) -> Result<usize> {
        let mut leased = Vec::new();
        for kv in self.due.iter() {
            let (k, _) = kv?;
            match gid_from(k.get(8..).unwrap_or_default()) {
                Ok(gid) => leased.push((gid, k)),
                Err(e) => self.skip_damaged(&k, &e),
            }
        }
        let mut n = 0;
        for (gid, key) in leased {
            let _g = self.stripe(&gid);
            let (old, bytes) = match self.read(&gid) {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(e) => {
                    self.skip_damaged(&key, &e);
                    continue;
                }
            };
            if old.lease_owner.is_none() {
                continue;
            }
            let mut new = old.clone();
            new.lease_owner = None;
            new.due_at = Some(now);
            new.version = old.version + 1;
            if self.swap(Some(&old), Some(&bytes), &new)?.is_ok() {
                n += 1;
            }
        }
        // One flush for all of them: after a crash with many transactions in flight, recovery must
        // not wait for a flush per transaction.
        self.commit.durable().await?;
        Ok(n)
    }

    async fn count(&self, state: TxState) -> Result<u64> {
        let mut n = 0;
        for gid in self.candidates(state, None)? {
            // Count only entries their record agrees with (see the module docs).
            if self.get(&gid).await?.is_some_and(|t| t.state == state) {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn sync(&self) -> Result<()> {
        self.commit.durable().await
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn damaged_index_keys_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..160)) {
            let _ = gid_from(&bytes);
            let _ = decode_for(&Gid::generate(), &bytes);
        }

        #[test]
        fn index_keys_give_back_their_id(at in any::<u64>(), gid in "[A-Za-z0-9_.:-]{1,128}") {
            let gid: Gid = gid.parse().expect("valid");
            prop_assert_eq!(gid_from(&due_key(Timestamp(at), &gid)[8..]).ok(), Some(gid.clone()));
            prop_assert_eq!(gid_from(&state_key(TxState::Trying, &gid)[1..]).ok(), Some(gid));
        }
    }
}
