//! A bank as a TCC participant: money moves between accounts of different banks all or nothing.

use serde::{Deserialize, Serialize};
use tcc_http::{StoreError, TccContext, TccError, tcc};

/// Money moving in or out of one account: a negative amount leaves it, a positive one arrives.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Move {
    pub account: String,
    pub amount: i64,
}

/// An account: what it holds, what is on its way out (held by a try) and on its way in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub balance: i64,
    pub outgoing: i64,
    pub incoming: i64,
}

/// Why a bank refuses a move.
#[derive(Debug, Serialize, Deserialize)]
pub enum BankError {
    NoSuchAccount(String),
    InsufficientFunds { account: String, balance: i64 },
    Storage(String),
}

impl std::fmt::Display for BankError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BankError::NoSuchAccount(a) => write!(f, "no account {a}"),
            BankError::InsufficientFunds { account, balance } => write!(f, "{account} holds only {balance}"),
            BankError::Storage(e) => write!(f, "storage: {e}"),
        }
    }
}

impl std::error::Error for BankError {}

impl From<StoreError> for BankError {
    fn from(e: StoreError) -> BankError {
        BankError::Storage(e.to_string())
    }
}

// Every error refuses the try, and a refused try cancels the whole transaction.
impl TccError for BankError {}

/// The TCC service: `hold` reserves a move, `apply` makes it real, `release` undoes the hold.
#[tcc]
pub trait Bank {
    #[tcc(confirm = apply, cancel = release)]
    async fn hold(&self, ctx: TccContext, req: Move) -> Result<Account, BankError>;
    async fn apply(&self, ctx: TccContext, req: Move) -> Result<(), BankError>;
    async fn release(&self, ctx: TccContext, req: Move) -> Result<(), BankError>;
}

/// The tree the accounts live in.
pub const ACCOUNTS: &str = "accounts";

/// The implementation: each method reads the account and stages its new value in the context.
pub struct Accounts;

impl Accounts {
    async fn change(
        &self,
        ctx: &TccContext,
        account: &str,
        change: impl FnOnce(&mut Account) -> Result<(), BankError>,
    ) -> Result<Account, BankError> {
        let Some(read) = ctx.get::<Account>(ACCOUNTS, account)? else {
            return Err(BankError::NoSuchAccount(account.to_owned()));
        };
        let mut next = read.value;
        change(&mut next)?;
        // Written together with the barrier record, and only if the account is still as read.
        ctx.put(ACCOUNTS, account, &next, read.version)?;
        Ok(next)
    }
}

impl Bank for Accounts {
    async fn hold(&self, ctx: TccContext, req: Move) -> Result<Account, BankError> {
        self.change(&ctx, &req.account, |a| {
            if req.amount < 0 {
                if a.balance < -req.amount {
                    return Err(BankError::InsufficientFunds {
                        account: req.account.clone(),
                        balance: a.balance,
                    });
                }
                a.balance += req.amount;
                a.outgoing -= req.amount;
            } else {
                a.incoming += req.amount;
            }
            Ok(())
        })
        .await
    }

    async fn apply(&self, ctx: TccContext, req: Move) -> Result<(), BankError> {
        self.change(&ctx, &req.account, |a| {
            if req.amount < 0 {
                a.outgoing += req.amount;
            } else {
                a.incoming -= req.amount;
                a.balance += req.amount;
            }
            Ok(())
        })
        .await
        .map(drop)
    }

    async fn release(&self, ctx: TccContext, req: Move) -> Result<(), BankError> {
        self.change(&ctx, &req.account, |a| {
            if req.amount < 0 {
                a.outgoing += req.amount;
                a.balance -= req.amount;
            } else {
                a.incoming -= req.amount;
            }
            Ok(())
        })
        .await
        .map(drop)
    }
}
