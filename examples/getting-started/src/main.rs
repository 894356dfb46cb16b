//! Two banks and a transfer between them, in one process: each bank serves `Bank` on its own port
//! with its own database; the initiator embeds the coordinator.

use std::time::Duration;

use getting_started::{ACCOUNTS, Account, Accounts, Bank, BankClient, Move};
use tcc_http::target::AllowList;
use tcc_http::{DurableDb, Participant, StateView, TccClient, axum};

/// Opens a bank's database in `dir`, opens its accounts and serves it on a free port.
async fn start_bank(
    dir: &str,
    accounts: &[(&str, i64)],
) -> Result<(String, Participant), Box<dyn std::error::Error>> {
    // A sled database whose flush is synced to the disk (fdatasync), not only handed to the OS.
    let db = DurableDb::open(dir)?;
    // Reservations neither confirmed nor cancelled 60 s after their deadline are released here, by
    // the bank's own expiry loop (the builder's defaults).
    let participant = Participant::builder().grace(Duration::from_secs(60)).sled(&db, &[ACCOUNTS])?;
    let bank = Accounts.into_participant(participant);
    for (name, balance) in accounts {
        if bank.read::<Account>(ACCOUNTS, name)?.is_none() {
            bank.seed(ACCOUNTS, name, &Account { balance: *balance, ..Account::default() })?;
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/bank", listener.local_addr()?);
    let app = axum::Router::new().nest("/bank", bank.router());
    // Served with limits against slow clients (header and body timeouts, a connection cap).
    let limits = tcc_http::serve::Limits::default();
    tokio::spawn(async move { tcc_http::serve::serve(listener, app, &limits, std::future::pending()).await });
    Ok((url, bank))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (bank_a, a) = start_bank("bank-a-data", &[("alice", 100)]).await?;
    let (bank_b, b) = start_bank("bank-b-data", &[("bob", 0)]).await?;

    // The initiator, with the coordinator embedded in its process (its own database).
    let tcc = TccClient::open_embedded("agency-data", Default::default(), AllowList::new(&[])?).await?;
    // Both moves call the same operation, so each registers under a branch name of its own.
    let (from_a, to_b) =
        (BankClient::new(&bank_a).with_branch("from"), BankClient::new(&bank_b).with_branch("to"));

    // Alice sends Bob 30: both holds succeed, the transaction confirms, both moves are applied.
    let tx = tcc.begin(Duration::from_secs(30)).await?;
    from_a.hold(&tx, Move { account: "alice".into(), amount: -30 }).await?;
    to_b.hold(&tx, Move { account: "bob".into(), amount: 30 }).await?;
    let done = tx.confirm_and_wait(Duration::from_secs(10)).await?;
    println!("transfer of 30: {:?}", done.state);

    // Alice tries to send 1,000: Bob's bank holds the credit, Alice's refuses the debit, so the
    // initiator cancels and Bob's bank releases its hold.
    let tx = tcc.begin(Duration::from_secs(30)).await?;
    to_b.hold(&tx, Move { account: "bob".into(), amount: 1000 }).await?;
    if let Err(refused) = from_a.hold(&tx, Move { account: "alice".into(), amount: -1000 }).await {
        println!("bank A refused: {refused}");
    }
    let undone = tx.cancel_and_wait(Duration::from_secs(10)).await?;
    println!("transfer of 1000: {:?}", undone.state);

    let alice = a.read::<Account>(ACCOUNTS, "alice")?.map(|v| v.value);
    let bob = b.read::<Account>(ACCOUNTS, "bob")?.map(|v| v.value);
    println!("alice: {alice:?}\nbob:   {bob:?}");
    assert_eq!((done.state, undone.state), (StateView::Confirmed, StateView::Cancelled));
    tcc.shutdown().await;
    Ok(())
}
