//! The embedded default store on sled.
//!
//! Two trees, and an index in memory:
//! - `tcc_live`: gid -> record ([`codec`](super::codec)) of every transaction not yet final
//!   (trying, confirming, cancelling, flagged);
//! - `tcc_done`: state code ++ gid -> record of every final one (confirmed, cancelled), so a
//!   listing of one final state reads only that state's records;
//! - in memory: the state, due time and version of every live record, ordered by due time for the
//!   scheduler's claims. It is rebuilt from `tcc_live` on open, which reads only the unfinished
//!   transactions, never the history.
//!
//! A transaction's life is therefore four sled writes: begin one, the decision one, and the end
//! two (the record goes into `tcc_done`, then leaves `tcc_live`). The layout before this one kept
//! every record in one tree with a due index and a state index on disk beside it, eight writes per
//! transaction; index writes were half of the store's CPU in the benchmarks. Directories of the
//! earlier layouts are moved on open (see [`SledStore::open`]).
//!
//! ## Crash safety without sled transactions
//! Measured here: a sled multi-tree transaction (or a `Batch`, which takes a lock over the whole
//! database and writes out the log buffer) cannot run while a flush is in progress, so with group
//! commit every write waited for the previous flush and the store topped out near 7,000 writes/s
//! whatever the number of writers. Single-key operations do not wait. So:
//! - a change that keeps a record in its tree is one write of the record: a plain insert when the
//!   memory index knows the live record's version to be the expected one (no read needed), a
//!   compare-and-swap of the bytes read otherwise;
//! - a change that moves it (the end of a transaction) writes the new record in its new place,
//!   then removes the old one. A crash in between leaves both; on open the one with the higher
//!   version stays and the other goes. Readers look in `tcc_live` first, so they see the old
//!   record until the move is complete and the new one after, never neither.
//!
//! Writers of one transaction inside this process take one of [`STRIPES`] locks, so two of them
//! never interleave these steps, and update the memory index while holding it; no other process can
//! open the directory (sled locks it).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use sled::{CompareAndSwapError, IVec, Tree};

use super::codec::{decode, encode, state_and_updated_at};
use super::group_commit::GroupCommit;
use super::{Cas, ClaimChange, ListQuery, MAX_PAGE, Page, Pruned, Store};
use crate::durable::DurableDb;
use crate::error::{Error, Result};
use crate::model::{Gid, Timestamp, Transaction, TxState};

const LIVE_TREE: &str = "tcc_live";
const DONE_TREE: &str = "tcc_done";
/// The trees of the earlier layouts: every record by gid, a due index and a state index.
const LEGACY_TREES: [&str; 3] = ["tcc_tx", "tcc_due", "tcc_state"];
/// Where the store notes its layout, so that the move from an earlier one runs once per directory.
const META_TREE: &str = "tcc_meta";
const LAYOUT_KEY: &[u8] = b"index_layout";
/// The layout of the module docs. 2 and earlier (or no note) kept the legacy trees.
const LAYOUT: &[u8] = &[3];
/// The final states, whose records are in `tcc_done`.
const FINAL: [TxState; 2] = [TxState::Confirmed, TxState::Cancelled];

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
    db: DurableDb,
    live: Tree,
    done: Tree,
    commit: GroupCommit,
    stripes: Vec<Mutex<()>>,
    index: Mutex<LiveIndex>,
    /// Live records that do not decode, already reported: skipped by claims (one damaged record
    /// must not stall recovery of the others) and logged once, not every poll.
    damaged: Mutex<HashSet<Gid>>,
    /// How far the pruning pass over `tcc_done` has come: the last key it looked at (`None`: the
    /// next call starts a pass).
    pruned_to: Mutex<Option<IVec>>,
}

/// Where a record is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Live,
    Done(TxState),
}

impl Slot {
    fn of(tx: &Transaction) -> Slot {
        if tx.state.is_final() { Slot::Done(tx.state) } else { Slot::Live }
    }
}

fn done_key(state: TxState, gid: &Gid) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + gid.as_str().len());
    k.push(state.code());
    k.extend_from_slice(gid.as_str().as_bytes());
    k
}

fn gid_from(bytes: &[u8]) -> Result<Gid> {
    let s = std::str::from_utf8(bytes).map_err(|_| Error::Storage("damaged record key".to_owned()))?;
    s.parse().map_err(|_| Error::Storage(format!("damaged record key {s:?}")))
}

fn decode_for(gid: &Gid, bytes: &[u8]) -> Result<Transaction> {
    decode(bytes).map_err(|e| Error::Storage(format!("transaction {gid}: {e}")))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update of these keeps them consistent before it can panic; carry on.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The state, due time and version of every live record, by gid, and the live records by due time.
#[derive(Debug, Default)]
struct LiveIndex {
    by_gid: HashMap<Gid, Entry>,
    due: BTreeSet<(Timestamp, Gid)>,
}

/// What the memory index knows of one live record.
#[derive(Clone, Copy, Debug)]
struct Entry {
    state: TxState,
    due_at: Option<Timestamp>,
    version: u64,
}

impl LiveIndex {
    /// Notes `tx` as stored in `tcc_live`.
    fn set(&mut self, tx: &Transaction) {
        let entry = Entry { state: tx.state, due_at: tx.due_at, version: tx.version };
        if let Some(Entry { due_at: Some(at), .. }) = self.by_gid.insert(tx.gid.clone(), entry) {
            if tx.due_at == Some(at) {
                return;
            }
            self.due.remove(&(at, tx.gid.clone()));
        }
        if let Some(at) = tx.due_at {
            self.due.insert((at, tx.gid.clone()));
        }
    }

    /// Notes that `gid` is not in `tcc_live` (any more).
    fn remove(&mut self, gid: &Gid) {
        if let Some(Entry { due_at: Some(at), .. }) = self.by_gid.remove(gid) {
            self.due.remove(&(at, gid.clone()));
        }
    }
}

/// A record as read: the transaction, its stored bytes (swaps compare bytes) and where it is.
type Found = (Transaction, IVec, Slot);

impl SledStore {
    /// Opens (or creates) the store in directory `path`.
    ///
    /// A directory written by an earlier version (one tree of every record with on-disk due and
    /// state indexes) is moved to the current layout first: each record is copied to its tree and
    /// the old trees are dropped. This reads the whole history once; it is safe to repeat if a
    /// crash interrupts it, and noted in the directory so that it runs once.
    pub fn open(path: impl AsRef<Path>) -> Result<SledStore> {
        let db = DurableDb::open(path).map_err(|e| Error::Storage(format!("cannot open the store: {e}")))?;
        SledStore::with_db(db)
    }

    /// Uses an already open sled database (for example one shared with an embedded participant).
    /// One store per database: the store keeps the state and version of every live record in
    /// memory and writes on their strength, so a second store over the same trees would not see
    /// the first one's writes.
    pub fn with_db(db: DurableDb) -> Result<SledStore> {
        let live = db.open_tree(LIVE_TREE)?;
        let done = db.open_tree(DONE_TREE)?;
        let flush_db = db.clone();
        let commit = GroupCommit::start("tcc-store", move || flush_db.flush().map_err(|e| e.to_string()))?;
        let stripes = (0..STRIPES).map(|_| Mutex::new(())).collect();
        let store = SledStore {
            db,
            live,
            done,
            commit,
            stripes,
            index: Mutex::default(),
            damaged: Mutex::default(),
            pruned_to: Mutex::default(),
        };
        store.migrate()?;
        store.load()?;
        Ok(store)
    }

    /// The underlying sled database.
    pub fn db(&self) -> &sled::Db {
        self.db.db()
    }

    fn stripe(&self, gid: &Gid) -> MutexGuard<'_, ()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(gid.as_str());
        let i = (h % STRIPES as u64) as usize;
        // The guarded data is `()`: a panic elsewhere cannot leave it inconsistent.
        lock(&self.stripes[i])
    }

    fn tree_and_key(&self, slot: Slot, gid: &Gid) -> (&Tree, Vec<u8>) {
        match slot {
            Slot::Live => (&self.live, gid.as_str().as_bytes().to_vec()),
            Slot::Done(state) => (&self.done, done_key(state, gid)),
        }
    }

    /// The record of `gid` in `tcc_live`, with its bytes.
    fn read_live(&self, gid: &Gid) -> Result<Option<(Transaction, IVec)>> {
        match self.live.get(gid.as_str().as_bytes())? {
            None => Ok(None),
            Some(bytes) => Ok(Some((decode_for(gid, &bytes)?, bytes))),
        }
    }

    /// The record of `gid` in `tcc_done`, with its bytes.
    fn read_done(&self, gid: &Gid) -> Result<Option<Found>> {
        for state in FINAL {
            if let Some(bytes) = self.done.get(done_key(state, gid))? {
                return Ok(Some((decode_for(gid, &bytes)?, bytes, Slot::Done(state))));
            }
        }
        Ok(None)
    }

    /// The record of `gid`: in `tcc_live` first, so that a record being moved at this instant is
    /// found in one place or the other (see the module docs).
    fn read(&self, gid: &Gid) -> Result<Option<Found>> {
        match self.read_live(gid)? {
            Some((tx, bytes)) => Ok(Some((tx, bytes, Slot::Live))),
            None => self.read_done(gid),
        }
    }

    /// Replaces the record `old` (as read, or `None` for a new one) with `new`, moving it between
    /// the trees if its slot changes, and keeps the memory index in step. The caller holds the
    /// gid's stripe. Returns the record stored now if the swap lost.
    fn swap(
        &self,
        old: Option<(&IVec, Slot)>,
        new: &Transaction,
    ) -> Result<std::result::Result<(), Option<Transaction>>> {
        let bytes = encode(new)?;
        let new_slot = Slot::of(new);
        let (tree, key) = self.tree_and_key(new_slot, &new.gid);
        let in_place = old.as_ref().is_some_and(|(_, slot)| *slot == new_slot);
        let expected = if in_place { old.map(|(b, _)| b.clone()) } else { None };
        if let Err(CompareAndSwapError { current, .. }) =
            tree.compare_and_swap(&key, expected, Some(bytes))?
        {
            return Ok(Err(current.map(|b| decode_for(&new.gid, &b)).transpose()?));
        }
        if let Some((old_bytes, old_slot)) = old.filter(|_| !in_place) {
            // The new record is in place; now the old one goes.
            let (old_tree, old_key) = self.tree_and_key(old_slot, &new.gid);
            if let Err(CompareAndSwapError { current, .. }) =
                old_tree.compare_and_swap(&old_key, Some(old_bytes), None as Option<IVec>)?
            {
                // Changed behind the stripe (not by this store): take the move back.
                tree.remove(&key)?;
                return Ok(Err(current.map(|b| decode_for(&new.gid, &b)).transpose()?));
            }
        }
        self.note(new);
        Ok(Ok(()))
    }

    /// Keeps the memory index in step with `new`, just stored: noted if live, gone if final.
    fn note(&self, new: &Transaction) {
        let mut index = lock(&self.index);
        match Slot::of(new) {
            Slot::Live => index.set(new),
            Slot::Done(_) => index.remove(&new.gid),
        }
    }

    /// The compare-and-set itself, without waiting for durability.
    fn swap_if(&self, expected_version: u64, tx: &Transaction) -> Result<Cas> {
        let _g = self.stripe(&tx.gid);
        // The memory index holds the version of every live record, kept in step by every writer
        // under the record's stripe (held here), and no other process opens the directory: when it
        // says the expected version, the record need not be read (a read and a decode were a
        // tenth of an embedded coordinator's store time).
        let known = lock(&self.index).by_gid.get(&tx.gid).map(|e| e.version);
        if known == Some(expected_version) {
            self.replace_live(tx)?;
            return Ok(Cas::Stored);
        }
        Ok(match self.read(&tx.gid)? {
            Some((old, bytes, slot)) if old.version == expected_version => {
                match self.swap(Some((&bytes, slot)), tx)? {
                    Ok(()) => Cas::Stored,
                    Err(current) => Cas::Conflict(current),
                }
            }
            other => Cas::Conflict(other.map(|(t, _, _)| t)),
        })
    }

    /// Replaces the live record of `new.gid`, known to be the one `new` follows, with `new`: in
    /// place, or, if `new` is final, moved to `tcc_done` (new place first, as `swap` does). The
    /// caller holds the gid's stripe.
    fn replace_live(&self, new: &Transaction) -> Result<()> {
        let bytes = encode(new)?;
        let key = new.gid.as_str().as_bytes();
        match Slot::of(new) {
            Slot::Live => {
                self.live.insert(key, bytes)?;
            }
            Slot::Done(state) => {
                self.done.insert(done_key(state, &new.gid), bytes)?;
                self.live.remove(key)?;
            }
        }
        self.note(new);
        Ok(())
    }

    /// Stores a new transaction, refusing an id taken in either tree (the swap itself checks the
    /// new record's own place). A `generated` id, which nobody can hold, skips the two lookups
    /// into `tcc_done` for a live record.
    fn insert_new(&self, tx: &Transaction, generated: bool) -> Result<()> {
        let _g = self.stripe(&tx.gid);
        let taken_elsewhere = match Slot::of(tx) {
            Slot::Live => !generated && self.read_done(&tx.gid)?.is_some(),
            Slot::Done(_) => self.read(&tx.gid)?.is_some(),
        };
        if taken_elsewhere {
            return Err(Error::AlreadyExists(tx.gid.clone()));
        }
        match self.swap(None, tx)? {
            Ok(()) => Ok(()),
            Err(_) => Err(Error::AlreadyExists(tx.gid.clone())),
        }
    }

    /// Reports a live record that cannot be read, once, and leaves it for an operator.
    fn skip_damaged(&self, gid: &Gid, e: &Error) {
        if lock(&self.damaged).insert(gid.clone()) {
            tracing::error!(
                tx = %gid,
                error = %e,
                "a transaction's record cannot be read; skipping it (the others are served)"
            );
        }
    }

    /// Moves a directory of an earlier layout (see [`open`](Self::open)). Run before anyone else
    /// uses the store.
    fn migrate(&self) -> Result<()> {
        let meta = self.db.open_tree(META_TREE)?;
        if meta.get(LAYOUT_KEY)?.as_deref() == Some(LAYOUT) {
            return Ok(());
        }
        let names = self.db.tree_names();
        let has = |name: &str| names.iter().any(|n| &n[..] == name.as_bytes());
        let mut moved = 0usize;
        if has(LEGACY_TREES[0]) {
            let old = self.db.open_tree(LEGACY_TREES[0])?;
            for kv in old.iter() {
                let (k, v) = kv?;
                // A record that does not decode stays live, where reading it reports the damage.
                let target = match (gid_from(&k), decode(&v)) {
                    (Ok(gid), Ok(tx)) => self.tree_and_key(Slot::of(&tx), &gid),
                    _ => (&self.live, k.to_vec()),
                };
                target.0.insert(target.1, v)?;
                moved += 1;
            }
        }
        // The copies first, then the old trees, then the note: a crash anywhere repeats the move.
        self.db.flush()?;
        for name in LEGACY_TREES {
            if has(name) {
                self.db.drop_tree(name)?;
            }
        }
        meta.insert(LAYOUT_KEY, LAYOUT)?;
        self.db.flush()?;
        if moved > 0 {
            tracing::info!(records = moved, "moved the store to the current layout");
        }
        Ok(())
    }

    /// Builds the memory index from `tcc_live`, and finishes any move between the trees that a
    /// crash interrupted (the record with the higher version stays).
    fn load(&self) -> Result<()> {
        let mut index = lock(&self.index);
        for kv in self.live.iter() {
            let (k, v) = kv?;
            let gid = match gid_from(&k) {
                Ok(gid) => gid,
                Err(e) => {
                    tracing::error!(error = %e, "skipping a record under a key that is not an id");
                    continue;
                }
            };
            let tx = match decode_for(&gid, &v) {
                Ok(tx) => tx,
                Err(e) => {
                    self.skip_damaged(&gid, &e);
                    continue;
                }
            };
            match self.read_done(&gid) {
                Ok(Some((done, _, slot))) => {
                    if done.version >= tx.version {
                        self.live.remove(&k)?;
                        continue;
                    }
                    let (tree, key) = self.tree_and_key(slot, &gid);
                    tree.remove(key)?;
                }
                Ok(None) => {}
                Err(e) => self.skip_damaged(&gid, &e),
            }
            index.set(&tx);
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
        let gids: Vec<Gid> = {
            let damaged = lock(&self.damaged);
            let index = lock(&self.index);
            index
                .due
                .iter()
                .take_while(|(at, _)| *at <= now)
                .filter(|(_, gid)| !damaged.contains(gid))
                .take(limit)
                .map(|(_, gid)| gid.clone())
                .collect()
        };
        let mut claimed = Vec::with_capacity(gids.len());
        for gid in gids {
            match self.claim_one(&gid, owner, now, lease_until, then) {
                Ok(Some(found)) => claimed.push(found),
                Ok(None) => {}
                Err(e) => self.skip_damaged(&gid, &e),
            }
        }
        Ok(claimed)
    }

    fn claim_one(
        &self,
        gid: &Gid,
        owner: &str,
        now: Timestamp,
        lease_until: Timestamp,
        then: Option<&ClaimChange<'_>>,
    ) -> Result<Option<(Transaction, bool)>> {
        let _g = self.stripe(gid);
        let Some((old, bytes)) = self.read_live(gid)? else {
            lock(&self.index).remove(gid); // finished meanwhile
            return Ok(None);
        };
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
        Ok(self.swap(Some((&bytes, Slot::Live)), &new)?.ok().map(|()| (new, changed)))
    }

    /// Up to `take` records of one part of a tree, in id order (descending with `desc`), from
    /// after `after` in that order: with `code`, the part of `tcc_done` under that state code;
    /// without, the whole tree (`tcc_live`). Each as its id's bytes (the key without the code) and
    /// its record's bytes.
    fn part(
        &self,
        tree: &Tree,
        code: Option<u8>,
        after: Option<&Gid>,
        take: usize,
        desc: bool,
    ) -> Result<Vec<(IVec, IVec)>> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let prefix: Vec<u8> = code.into_iter().collect();
        let at = |a: &Gid| [&prefix[..], a.as_str().as_bytes()].concat();
        let low = match (after, desc) {
            (Some(a), false) => Excluded(at(a)),
            _ => Included(prefix.clone()),
        };
        let high = match (after, code, desc) {
            (Some(a), _, true) => Excluded(at(a)),
            (_, Some(c), _) => Excluded(vec![c + 1]),
            (_, None, _) => Unbounded,
        };
        let range = tree.range((low, high));
        let records: Box<dyn Iterator<Item = sled::Result<(IVec, IVec)>>> =
            if desc { Box::new(range.rev()) } else { Box::new(range) };
        let mut found = Vec::new();
        for kv in records.take(take) {
            let (k, v) = kv?;
            found.push((k.subslice(prefix.len(), k.len() - prefix.len()), v));
        }
        Ok(found)
    }

    /// Every record in id order, from after `after`: the live tree and each final state's part of
    /// the done tree, merged. Reads at most `limit + 1` records from each.
    fn list_all(&self, after: Option<&Gid>, limit: usize, desc: bool) -> Result<Page> {
        let mut found = self.part(&self.live, None, after, limit + 1, desc)?;
        for state in FINAL {
            found.extend(self.part(&self.done, Some(state.code()), after, limit + 1, desc)?);
        }
        found.sort_unstable_by(|a, b| if desc { b.0.cmp(&a.0) } else { a.0.cmp(&b.0) });
        decoded_page(found, limit)
    }

    /// The records in final `state`, in id order, from after `after`.
    fn list_done(&self, state: TxState, after: Option<&Gid>, limit: usize, desc: bool) -> Result<Page> {
        decoded_page(self.part(&self.done, Some(state.code()), after, limit + 1, desc)?, limit)
    }

    /// The live records in `state`, in id order, from after `after`: the memory index names them
    /// (reading only unfinished transactions), each record is read to be returned.
    fn list_live(&self, state: TxState, after: Option<&Gid>, limit: usize, desc: bool) -> Result<Page> {
        let mut gids: Vec<Gid> = lock(&self.index)
            .by_gid
            .iter()
            .filter(|(gid, e)| {
                e.state == state && after.is_none_or(|a| if desc { *gid < a } else { *gid > a })
            })
            .map(|(gid, _)| gid.clone())
            .collect();
        gids.sort_unstable();
        if desc {
            gids.reverse();
        }
        let mut items = Vec::new();
        let mut more = false;
        for gid in gids {
            // Changed since the index was read: trust the record.
            let Some((tx, _)) = self.read_live(&gid)? else { continue };
            if tx.state != state {
                continue;
            }
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(tx);
        }
        Ok(page(items, more))
    }
}

/// A page of `items`, with more after them or not.
fn page(items: Vec<Transaction>, more: bool) -> Page {
    let next = if more { items.last().map(|t| t.gid.clone()) } else { None };
    Page { items, next }
}

/// The page of the first `limit` of `found` (id bytes and record bytes, in id order), decoded.
fn decoded_page(found: Vec<(IVec, IVec)>, limit: usize) -> Result<Page> {
    let more = found.len() > limit;
    let mut items = Vec::with_capacity(found.len().min(limit));
    for (k, v) in found.into_iter().take(limit) {
        let gid = gid_from(&k)?;
        items.push(decode_for(&gid, &v)?);
    }
    Ok(page(items, more))
}

#[async_trait]
impl Store for SledStore {
    async fn insert(&self, tx: &Transaction) -> Result<()> {
        self.insert_unsynced(tx).await?;
        self.commit.durable().await
    }

    async fn get(&self, gid: &Gid) -> Result<Option<Transaction>> {
        Ok(self.read(gid)?.map(|(tx, _, _)| tx))
    }

    async fn compare_and_set(&self, expected_version: u64, tx: &Transaction) -> Result<Cas> {
        let cas = self.swap_if(expected_version, tx)?;
        if cas == Cas::Stored {
            self.commit.durable().await?;
        }
        Ok(cas)
    }

    async fn insert_unsynced(&self, tx: &Transaction) -> Result<()> {
        self.insert_new(tx, false)
    }

    async fn insert_generated_unsynced(&self, tx: &Transaction) -> Result<()> {
        self.insert_new(tx, true)
    }

    async fn compare_and_set_unsynced(&self, expected_version: u64, tx: &Transaction) -> Result<Cas> {
        self.swap_if(expected_version, tx)
    }

    async fn list(&self, query: &ListQuery) -> Result<Page> {
        let limit = if query.limit == 0 { MAX_PAGE } else { query.limit.min(MAX_PAGE) };
        let after = query.after.as_ref();
        let desc = query.newest_first;
        match query.state {
            None => self.list_all(after, limit, desc),
            Some(state) if state.is_final() => self.list_done(state, after, limit, desc),
            Some(state) => self.list_live(state, after, limit, desc),
        }
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
        let gids: Vec<Gid> = lock(&self.index).by_gid.keys().cloned().collect();
        let mut n = 0;
        for gid in gids {
            let _g = self.stripe(&gid);
            let (old, bytes) = match self.read_live(&gid) {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(e) => {
                    self.skip_damaged(&gid, &e);
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
            if self.swap(Some((&bytes, Slot::Live)), &new)?.is_ok() {
                n += 1;
            }
        }
        // One flush for all of them: after a crash with many transactions in flight, recovery must
        // not wait for a flush per transaction.
        self.commit.durable().await?;
        Ok(n)
    }

    async fn count(&self, state: TxState) -> Result<u64> {
        if state.is_final() {
            let mut n = 0;
            for kv in self.done.scan_prefix([state.code()]) {
                kv?;
                n += 1;
            }
            return Ok(n);
        }
        Ok(lock(&self.index).by_gid.values().filter(|e| e.state == state).count() as u64)
    }

    async fn sync(&self) -> Result<()> {
        self.commit.durable().await
    }

    /// Walks `tcc_done` in key order, `limit` records a call, from where the last call stopped,
    /// reading only the start of each record. A record that does not decode is left alone.
    async fn prune_finished(&self, before: Timestamp, limit: usize) -> Result<Pruned> {
        let limit = limit.max(1);
        let from = lock(&self.pruned_to).clone();
        let records = match &from {
            Some(key) => self.done.range::<&[u8], _>((Bound::Excluded(key.as_ref()), Bound::Unbounded)),
            None => self.done.iter(),
        };
        let (mut seen, mut deleted, mut last) = (0, 0, None);
        for record in records.take(limit) {
            let (key, bytes) = record?;
            seen += 1;
            if let Ok((state, updated_at)) = state_and_updated_at(&bytes) {
                // Only a record that is still the one read goes (finished records do not change,
                // so this is a belt over the braces).
                if state.is_final()
                    && updated_at < before
                    && self.done.compare_and_swap(&key, Some(&bytes), None as Option<IVec>)?.is_ok()
                {
                    deleted += 1;
                }
            }
            last = Some(key);
        }
        let more = seen == limit;
        *lock(&self.pruned_to) = if more { last } else { None };
        Ok(Pruned { deleted, more })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn damaged_keys_and_records_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..160)) {
            let _ = gid_from(&bytes);
            let _ = decode_for(&Gid::generate(), &bytes);
        }

        /// Damaged copies of real records, which get past the format byte (random bytes rarely do):
        /// an error naming the transaction, or a transaction.
        #[test]
        fn damaged_records_are_errors_naming_the_transaction(bytes in crate::store::codec::fuzz::damaged_record()) {
            let gid = Gid::generate();
            if let Err(e) = decode_for(&gid, &bytes) {
                prop_assert!(e.to_string().contains(gid.as_str()), "{}", e);
            }
        }

        #[test]
        fn done_keys_give_back_their_id(gid in "[A-Za-z0-9_.:-]{1,128}") {
            let gid: Gid = gid.parse().expect("valid");
            prop_assert_eq!(gid_from(&done_key(TxState::Confirmed, &gid)[1..]).ok(), Some(gid));
        }
    }
}
