//! The embedded default store on sled.
//!
//! Three trees, changed together in one sled transaction:
//! - `tcc_tx`: gid -> record ([`codec`](super::codec));
//! - `tcc_due`: due time (big-endian ms) ++ gid -> (), for unfinished transactions only;
//! - `tcc_state`: state code ++ gid -> (), so listing one state never reads the others.

use std::path::Path;

use async_trait::async_trait;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Transactional, Tree};

use super::codec::{decode, encode};
use super::group_commit::GroupCommit;
use super::{Cas, ListQuery, MAX_PAGE, Page, Store};
use crate::error::{Error, Result};
use crate::model::{Gid, Timestamp, Transaction, TxState};

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
#[derive(Clone, Debug)]
pub struct SledStore {
    db: sled::Db,
    txs: Tree,
    due: Tree,
    states: Tree,
    commit: GroupCommit,
}

fn due_key(at: Timestamp, gid: &Gid) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + gid.as_str().len());
    k.extend_from_slice(&at.0.to_be_bytes());
    k.extend_from_slice(gid.as_str().as_bytes());
    k
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

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<Error>>;

fn abort<T>(e: Error) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

/// Writes `new` over `old` (if any) in the three trees, inside a sled transaction.
fn write(
    t: &TransactionalTree,
    d: &TransactionalTree,
    s: &TransactionalTree,
    old: Option<&Transaction>,
    new: &Transaction,
) -> TxResult<()> {
    let bytes = match encode(new) {
        Ok(b) => b,
        Err(e) => return abort(e),
    };
    t.insert(new.gid.as_str().as_bytes(), bytes)?;
    if let Some(old) = old {
        if let Some(at) = old.due_at {
            d.remove(due_key(at, &old.gid))?;
        }
        s.remove(state_key(old.state, &old.gid))?;
    }
    if let Some(at) = new.due_at {
        d.insert(due_key(at, &new.gid), &[][..])?;
    }
    s.insert(state_key(new.state, &new.gid), &[][..])?;
    Ok(())
}

fn read(t: &TransactionalTree, gid: &Gid) -> TxResult<Option<Transaction>> {
    match t.get(gid.as_str().as_bytes())? {
        None => Ok(None),
        Some(bytes) => match decode(&bytes) {
            Ok(tx) => Ok(Some(tx)),
            Err(e) => abort(Error::Storage(format!("transaction {gid}: {e}"))),
        },
    }
}

fn unwrap_tx<T>(r: std::result::Result<T, TransactionError<Error>>) -> Result<T> {
    match r {
        Ok(v) => Ok(v),
        Err(TransactionError::Abort(e)) => Err(e),
        Err(TransactionError::Storage(e)) => Err(e.into()),
    }
}

impl SledStore {
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
        let commit = GroupCommit::start("tcc-store", move || {
            flush_db.flush().map(|_| ()).map_err(|e| e.to_string())
        })?;
        Ok(SledStore { db, txs, due, states, commit })
    }

    /// The underlying sled database.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    fn claim_one(
        &self,
        key: &[u8],
        owner: &str,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<Option<Transaction>> {
        let gid = gid_from(key.get(8..).unwrap_or_default())?;
        let r = (&self.txs, &self.due, &self.states).transaction(|(t, d, s)| {
            let Some(old) = read(t, &gid)? else {
                d.remove(key)?; // an index entry without a record: drop it
                return Ok(None);
            };
            // Someone else moved it since the scan: it is not due any more.
            if old.due_at.is_none_or(|at| at > now) || old.state.is_final() || old.state == TxState::Flagged {
                return Ok(None);
            }
            let mut new = old.clone();
            new.lease_owner = Some(owner.to_owned());
            new.due_at = Some(lease_until);
            new.version = old.version + 1;
            write(t, d, s, Some(&old), &new)?;
            Ok(Some(new))
        });
        unwrap_tx(r)
    }
}

#[async_trait]
impl Store for SledStore {
    async fn insert(&self, tx: &Transaction) -> Result<()> {
        let r = (&self.txs, &self.due, &self.states).transaction(|(t, d, s)| {
            if t.get(tx.gid.as_str().as_bytes())?.is_some() {
                return abort(Error::AlreadyExists(tx.gid.clone()));
            }
            write(t, d, s, None, tx)
        });
        unwrap_tx(r)?;
        self.commit.durable().await
    }

    async fn get(&self, gid: &Gid) -> Result<Option<Transaction>> {
        match self.txs.get(gid.as_str().as_bytes())? {
            None => Ok(None),
            Some(bytes) => decode(&bytes).map(Some).map_err(|e| Error::Storage(format!("transaction {gid}: {e}"))),
        }
    }

    async fn compare_and_set(&self, expected_version: u64, tx: &Transaction) -> Result<Cas> {
        let r = (&self.txs, &self.due, &self.states).transaction(|(t, d, s)| {
            let old = read(t, &tx.gid)?;
            match old {
                Some(old) if old.version == expected_version => {
                    write(t, d, s, Some(&old), tx)?;
                    Ok(Cas::Stored)
                }
                other => Ok(Cas::Conflict(other)),
            }
        });
        let cas = unwrap_tx(r)?;
        if cas == Cas::Stored {
            self.commit.durable().await?;
        }
        Ok(cas)
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
                    let (_, v) = kv?;
                    if items.len() == limit {
                        more = true;
                        break;
                    }
                    items.push(decode(&v)?);
                }
            }
            Some(state) => {
                let start = match &query.after {
                    Some(after) => std::ops::Bound::Excluded(state_key(state, after)),
                    None => std::ops::Bound::Included(vec![state.code()]),
                };
                let end = std::ops::Bound::Excluded(vec![state.code() + 1]);
                for kv in self.states.range((start, end)) {
                    let (k, _) = kv?;
                    if items.len() == limit {
                        more = true;
                        break;
                    }
                    let gid = gid_from(&k[1..])?;
                    // The index and the record are written in one transaction; a missing record here
                    // means it moved between the two reads, so skip it.
                    if let Some(tx) = self.get(&gid).await?
                        && tx.state == state
                    {
                        items.push(tx);
                    }
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
            if let Some(tx) = self.claim_one(&k, owner, now, lease_until)? {
                claimed.push(tx);
            }
        }
        Ok(claimed)
    }

    async fn reclaim_abandoned(&self, now: Timestamp) -> Result<usize> {
        let mut leased = Vec::new();
        for kv in self.due.iter() {
            let (k, _) = kv?;
            let gid = gid_from(k.get(8..).unwrap_or_default())?;
            if let Some(tx) = self.get(&gid).await?
                && tx.lease_owner.is_some()
            {
                leased.push(tx);
            }
        }
        let mut n = 0;
        for old in leased {
            let mut new = old.clone();
            new.lease_owner = None;
            new.due_at = Some(now);
            new.version = old.version + 1;
            if self.compare_and_set(old.version, &new).await? == Cas::Stored {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn count(&self, state: TxState) -> Result<u64> {
        Ok(self.states.scan_prefix([state.code()]).count() as u64)
    }

    async fn sync(&self) -> Result<()> {
        self.commit.durable().await
    }
}
