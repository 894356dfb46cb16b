//! Every shape a definition may take: no parameter, several, unnamed ones, a parameter called `tx`,
//! a declared branch id, a renamed client, an explicit crate path, a default body, restricted
//! visibility, raw identifiers.
use serde::{Deserialize, Serialize};
use tcc_http::{tcc, TccContext, TccError};

#[derive(Debug, Serialize, Deserialize)]
pub struct Oops;

impl std::fmt::Display for Oops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("oops")
    }
}

impl TccError for Oops {}

#[tcc(client = BankStub, crate = ::tcc_http)]
pub(crate) trait Bank {
    #[tcc(confirm = commit_nothing, cancel = undo_nothing, branch = "bank:ping")]
    async fn ping(&self, ctx: TccContext) -> Result<u64, Oops>;
    async fn commit_nothing(&self, ctx: TccContext) -> Result<(), Oops>;
    async fn undo_nothing(&self, ctx: TccContext) -> Result<(), Oops> {
        let _ = ctx.gid();
        Ok(())
    }

    #[tcc(confirm = r#move, cancel = unmove)]
    async fn transfer(&self, ctx: TccContext, from: String, to: String, cents: u64) -> Result<Vec<String>, Oops>;
    async fn r#move(&self, ctx: TccContext, from: String, to: String, cents: u64) -> Result<(), Oops>;
    async fn unmove(&self, ctx: TccContext, _: String, _: String, _: u64) -> Result<(), Oops>;

    #[tcc(cancel = unlog, confirm = keep)]
    async fn r#type(&self, ctx: TccContext, tx: String) -> Result<(), Oops>;
    async fn keep(&self, ctx: TccContext, tx: String) -> Result<(), Oops>;
    async fn unlog(&self, ctx: TccContext, tx: String) -> Result<(), Oops>;
}

struct Vault;

impl Bank for Vault {
    async fn ping(&self, _ctx: TccContext) -> Result<u64, Oops> {
        Ok(1)
    }
    async fn commit_nothing(&self, _ctx: TccContext) -> Result<(), Oops> {
        Ok(())
    }
    async fn transfer(&self, _ctx: TccContext, from: String, to: String, _cents: u64) -> Result<Vec<String>, Oops> {
        Ok(vec![from, to])
    }
    async fn r#move(&self, _ctx: TccContext, _from: String, _to: String, _cents: u64) -> Result<(), Oops> {
        Ok(())
    }
    async fn unmove(&self, _ctx: TccContext, _: String, _: String, _: u64) -> Result<(), Oops> {
        Err(Oops)
    }
    async fn r#type(&self, _ctx: TccContext, _tx: String) -> Result<(), Oops> {
        Ok(())
    }
    async fn keep(&self, _ctx: TccContext, _tx: String) -> Result<(), Oops> {
        Ok(())
    }
    async fn unlog(&self, _ctx: TccContext, _tx: String) -> Result<(), Oops> {
        Ok(())
    }
}

#[allow(dead_code)]
async fn calls(tx: &tcc_http::client::GlobalTx) {
    let bank = BankStub::new(String::from("http://127.0.0.1:1/bank"));
    let _: Result<u64, tcc_http::stub::TccCallError<Oops>> = bank.ping(tx).await;
    let _: Result<Vec<String>, _> = bank.transfer(tx, "a".into(), "b".into(), 5).await;
    let _: Result<(), _> = bank.r#type(tx, "log".into()).await;
}

fn assert_send<T: Send>(_: &T) {}

fn main() {
    let db = tcc_core::DurableDb::temporary().unwrap();
    let barrier = tcc_core::SledBarrier::open(
        &db,
        vec![],
        std::sync::Arc::new(tcc_core::SystemClock),
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    let participant = Vault.into_participant(tcc_http::participant::Participant::with_barrier_durability(barrier));
    let mut ops: Vec<&str> = participant.operations().collect();
    ops.sort_unstable();
    assert_eq!(ops, ["ping", "transfer", "type"]);
    // The generated futures are Send, so a multi-threaded runtime can run them.
    let vault = Vault;
    assert_send(&Bank::undo_nothing(&vault, unreachable_context()));
}

#[allow(unreachable_code, clippy::diverging_sub_expression)]
fn unreachable_context() -> TccContext {
    // Only its type matters above: the future is never polled.
    std::process::exit(0)
}
