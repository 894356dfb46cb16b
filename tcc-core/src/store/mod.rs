//! The coordinator's durable log: the [`Store`] trait, its embedded sled implementation and (with the
//! `postgres` feature) the PostgreSQL one in `store::postgres`, which several coordinator processes
//! share.
//!
//! ## Why the trait looks like this
//! The engine must run unchanged on one process with an embedded sled directory and on several
//! processes sharing one PostgreSQL database. So:
//!
//! - **Whole-record compare-and-set.** A transaction is one record with a `version`. Every change is
//!   [`Store::compare_and_set`] against the version the writer read: two coordinators can race, only one
//!   wins, and the loser re-reads and re-applies its event through the pure state machine. No store
//!   ever needs to understand a transition. (In SQL: `UPDATE ... WHERE gid = $1 AND version = $2`.)
//! - **A due index instead of scans.** Each unfinished transaction carries `due_at`: its deadline while
//!   trying, its next retry or the expiry of a phase-two lease afterwards. Final and flagged ones carry
//!   none. Recovery, retries and the deadline sweep all read "what is due by now" from that index and
//!   never touch finished history, however large it grows.
//! - **Claims with leases.** [`Store::claim_due`] atomically takes due work for one process until
//!   `lease_until`; if the process dies, the work falls due again when the lease ends and another
//!   process claims it (`SELECT ... FOR UPDATE SKIP LOCKED` in SQL). A store used by one process only
//!   (sled holds an exclusive lock on its directory) hands back leases left by a dead predecessor at
//!   once in [`Store::reclaim_abandoned`]; a shared store (PostgreSQL) leaves them to expire, since
//!   their owners may be alive.
//! - **Durable acknowledgements with group commit.** `insert` and `compare_and_set` return only after
//!   the change is flushed; concurrent writers share one flush (see [`group_commit`]).
//! - **Async and object-safe**, so the engine holds an `Arc<dyn Store>` chosen at run time.

pub mod codec;
pub mod group_commit;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sled;

use async_trait::async_trait;

use crate::error::Result;
use crate::model::{Gid, Timestamp, Transaction, TxState};

#[cfg(feature = "postgres")]
pub use self::postgres::PgStore;
pub use self::sled::SledStore;

/// Most transactions one [`Store::list`] call returns.
pub const MAX_PAGE: usize = 1_000;

/// What [`Store::claim_due_with`] calls on each claimed transaction.
pub type ClaimChange<'a> = dyn for<'t> Fn(&'t Transaction) -> Option<Transaction> + Send + Sync + 'a;

/// What one [`Store::prune_finished`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Finished transactions deleted.
    pub deleted: usize,
    /// Whether the store has more to look at (call again); `false` once a whole pass is done.
    pub more: bool,
}

/// The result of a [`Store::compare_and_set`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // one per write, moved once; boxing buys nothing
pub enum Cas {
    /// The new record is stored (and durable).
    Stored,
    /// The stored version was not the expected one; here is what is stored now (`None`: nothing).
    Conflict(Option<Transaction>),
}

/// What to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only transactions in this state.
    pub state: Option<TxState>,
    /// Start after this id (the previous page's [`Page::next`]), in the listing's order.
    pub after: Option<Gid>,
    /// At most this many (capped at [`MAX_PAGE`]; 0 means the cap).
    pub limit: usize,
    /// List in descending id order (newest first for generated ids) instead of ascending.
    pub newest_first: bool,
}

/// One page of a listing, in id order (which is creation order for generated ids), ascending or
/// descending as [`ListQuery::newest_first`] says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// The transactions.
    pub items: Vec<Transaction>,
    /// Pass as [`ListQuery::after`] to get the next page; `None` on the last page.
    pub next: Option<Gid>,
}

/// The coordinator's durable log of transactions. See the [module docs](self) for why it looks so.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a new transaction (its `version` as given). Durable when it returns.
    /// Fails with [`Error::AlreadyExists`](crate::Error::AlreadyExists) if the id is taken.
    async fn insert(&self, tx: &Transaction) -> Result<()>;

    /// [`insert`](Store::insert) without waiting for durability: the caller must
    /// [`sync`](Store::sync) before acknowledging the insert to anyone. The default is the durable
    /// one.
    async fn insert_unsynced(&self, tx: &Transaction) -> Result<()> {
        self.insert(tx).await
    }
    /// [`insert_unsynced`](Store::insert_unsynced) of a transaction whose id was generated just now
    /// ([`Gid::generate`], a UUIDv7: 74 random bits), so no transaction can hold it: a store may
    /// skip the lookups that refuse an id already taken by a finished transaction. A store must
    /// still not overwrite a record it comes across. The default is `insert_unsynced`.
    async fn insert_generated_unsynced(&self, tx: &Transaction) -> Result<()> {
        self.insert_unsynced(tx).await
    }

    /// The stored transaction with this id.
    async fn get(&self, gid: &Gid) -> Result<Option<Transaction>>;

    /// Replaces the transaction with `tx` if the stored version is `expected_version`, keeping the
    /// due and state indexes in step. Durable when it returns [`Cas::Stored`].
    async fn compare_and_set(&self, expected_version: u64, tx: &Transaction) -> Result<Cas>;

    /// [`compare_and_set`](Store::compare_and_set) for a change whose loss in a crash only repeats
    /// work (the coordinator uses it to record phase-two results: lost, the round runs again and
    /// participants answer it as a duplicate). It need not be durable when it returns; the next
    /// durable write or [`sync`](Store::sync) makes it so. The default is the durable one.
    async fn compare_and_set_unsynced(&self, expected_version: u64, tx: &Transaction) -> Result<Cas> {
        self.compare_and_set(expected_version, tx).await
    }

    /// Lists transactions, optionally in one state, one page at a time.
    async fn list(&self, query: &ListQuery) -> Result<Page>;

    /// Claims up to `limit` transactions whose `due_at <= now` for `owner`: sets their lease owner,
    /// moves `due_at` to `lease_until` and bumps their version, atomically per transaction, and returns
    /// them as stored. A claim need not be durable: losing one only makes the work due again.
    async fn claim_due(
        &self,
        owner: &str,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
    ) -> Result<Vec<Transaction>>;

    /// [`claim_due`](Store::claim_due) that lets the caller change each claimed transaction in
    /// the claim's own write: `then` gets the record as claimed and returns the record to store in
    /// its place (the store sets its version), or `None` to keep the claim as it is. Returns each
    /// transaction as stored, and whether `then`'s change was stored. Like a claim, this need not
    /// be durable when it returns.
    ///
    /// The scheduler expires transactions still trying at their deadline this way: one write per
    /// transaction instead of a claim and then the decision. The default claims, then stores each
    /// change with [`compare_and_set_unsynced`](Store::compare_and_set_unsynced), leaving out a
    /// transaction changed by someone else in between.
    async fn claim_due_with(
        &self,
        owner: &str,
        now: Timestamp,
        lease_until: Timestamp,
        limit: usize,
        then: &ClaimChange<'_>,
    ) -> Result<Vec<(Transaction, bool)>> {
        let mut out = Vec::new();
        for tx in self.claim_due(owner, now, lease_until, limit).await? {
            match then(&tx) {
                None => out.push((tx, false)),
                Some(mut next) => {
                    next.version = tx.version + 1;
                    if self.compare_and_set_unsynced(tx.version, &next).await? == Cas::Stored {
                        out.push((next, true));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Called once when a coordinator opens the store. A store that only one process can open makes
    /// every lease left by an earlier process due at `now` and returns how many; a shared store
    /// returns 0 and lets leases expire, since their owners may be alive.
    async fn reclaim_abandoned(&self, now: Timestamp) -> Result<usize>;

    /// How many transactions are in `state` (for metrics and the operator).
    async fn count(&self, state: TxState) -> Result<u64>;

    /// Waits until every change made so far is durable.
    async fn sync(&self) -> Result<()>;

    /// Deletes finished transactions (confirmed or cancelled; never an unfinished or flagged one)
    /// last changed before `before`, working through at most about `limit` records per call: how
    /// many it deleted, and whether to call again for the rest of the pass. A pass that starts
    /// after a transaction was eligible deletes it. The deletions need not be durable when it
    /// returns (a crash may bring some back, for the next pass). A deleted transaction is gone: a
    /// read finds nothing, and its id may be taken again.
    ///
    /// The default deletes nothing: a store that keeps all history.
    async fn prune_finished(&self, before: Timestamp, limit: usize) -> Result<Pruned> {
        let _ = (before, limit);
        Ok(Pruned::default())
    }
}
