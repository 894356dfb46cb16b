//! The demo is the README's first command: it must run to the end with every expectation met.
#![allow(clippy::unwrap_used)]

use std::process::Command;

/// Runs the demo with `args` and checks that every scenario ran and every expectation was met.
fn run_demo(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_travel-booking")).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in [
        "1. A booking that succeeds",
        "2. The hotel is sold out",
        "3. The hotel goes down during confirm",
        "4. The coordinator is killed (SIGKILL)",
        "5. A rush: 200 customers",
        "6. Loyalty as a saga",
        "miles taken back, points none",
        "7. The confirmation e-mail as a two-phase message",
        "submitted by the coordinator after the back-check said committed",
        "the back-check said rolled back, the message was aborted, no e-mail",
        "8. The coordinator is gone for good after both tries",
        "both holds released by the services themselves",
        "Ledger check across both services",
        "loyalty sagas: 1 with miles and points both standing, 1 with the miles taken back",
        "2 tickets issued, each with one e-mail at each service",
        "all as expected",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn the_demo_runs_every_scenario_and_the_ledger_balances() {
    run_demo(&[]);
}

/// The heterogeneous case: the flights in PostgreSQL, the hotels in MySQL, each service's inventory
/// and barrier in its own database's tables; then the other way round. Needs `TCC_TEST_POSTGRES_URL`
/// and `TCC_TEST_MYSQL_URL` (skipped without, failing with `TCC_REQUIRE_POSTGRES=1` /
/// `TCC_REQUIRE_MYSQL=1`).
#[test]
fn the_demo_runs_every_scenario_on_postgres_and_mysql_and_the_ledger_balances() {
    use tcc_core::barrier::sql::testing::{test_mysql_url, test_postgres_url};
    let (Some(pg), Some(my)) = (test_postgres_url(), test_mysql_url()) else { return };
    run_demo(&["--flights-db", &pg, "--hotels-db", &my]);
    // Each run works in fresh tables of its own: a second run on the same databases starts over.
    run_demo(&["--flights-db", &my, "--hotels-db", &pg]);
}

/// A child process killed when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

fn wait_listening(addr: &str) {
    for _ in 0..500 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("nothing listens on {addr}");
}

#[test]
fn each_service_runs_as_its_own_process_and_the_agency_books_through_them() {
    let dir = tempfile::tempdir().unwrap();
    let (tc, fl, ho) = (free_addr(), free_addr(), free_addr());
    let spawn = |cmd: &mut Command| Proc(cmd.stdout(std::process::Stdio::null()).spawn().unwrap());
    let _coordinator = spawn(
        Command::new(env!("CARGO_BIN_EXE_travel-booking"))
            .arg("--coordinator")
            .arg(&tc)
            .arg(dir.path().join("tc")),
    );
    let _flights = spawn(
        Command::new(env!("CARGO_BIN_EXE_flights"))
            .args(["--listen", &fl, "--data-dir"])
            .arg(dir.path().join("f")),
    );
    let _hotels = spawn(
        Command::new(env!("CARGO_BIN_EXE_hotels"))
            .args(["--listen", &ho, "--data-dir"])
            .arg(dir.path().join("h")),
    );
    for addr in [&tc, &fl, &ho] {
        wait_listening(addr);
    }
    let book = |customer: &str, hotel: &str| {
        Command::new(env!("CARGO_BIN_EXE_agency"))
            .args(["--coordinator", &format!("http://{tc}")])
            .args(["--flights", &format!("http://{fl}/tcc/flights")])
            .args(["--hotels", &format!("http://{ho}/tcc/hotels")])
            .args(["--customer", customer, "--flight", "TC42", "--hotel", hotel])
            .output()
            .unwrap()
    };
    let ok = book("ada", "Ritz");
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success() && text.contains("Confirmed"),
        "{text}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = book("bob", "Tiny Inn");
    let text = String::from_utf8_lossy(&refused.stdout);
    assert!(!refused.status.success() && text.contains("sold out"), "{text}");
}
