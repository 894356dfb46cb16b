//! `tcc-chaos` at CI size: 200 transactions while the coordinator is SIGKILLed 5 times and the
//! services 3 times, with faults injected into a tenth of the calls to the services; loyalty sagas
//! and confirmation messages ride along after the bookings. Passes only if the harness finds no
//! violation in the stores (see `tcc_tests::chaos_check`, whose own tests show it catches each kind
//! of violation). No duration is asserted.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn a_short_chaos_run_ends_with_no_violation() {
    short_run(&[]);
}

/// The same on SQL participants: the flights in PostgreSQL, the hotels in MySQL. Needs
/// `TCC_TEST_POSTGRES_URL` and `TCC_TEST_MYSQL_URL` (skipped without, failing with
/// `TCC_REQUIRE_POSTGRES=1` / `TCC_REQUIRE_MYSQL=1`).
#[test]
fn a_short_chaos_run_on_postgres_and_mysql_ends_with_no_violation() {
    use tcc_core::barrier::sql::testing::{test_mysql_url, test_postgres_url};
    let (Some(pg), Some(my)) = (test_postgres_url(), test_mysql_url()) else { return };
    short_run(&["--flights-db", &pg, "--hotels-db", &my]);
}

/// 200 transactions with 5 coordinator and 3 service kills, the services' grace shortened so that
/// the orphans' holds are released within seconds.
fn short_run(db: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_tcc-chaos"))
        .args(["--transactions", "200", "--coordinator-kills", "5", "--participant-kills", "3"])
        .args(["--grace-ms", "5000"])
        .args(db)
        .env_remove("TCC_COORDINATOR_BIN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{stderr}", out.status);
    assert_eq!(
        last, "chaos: 200 transactions, 5 coordinator kills, 3 participant kills, 0 violations",
        "\n{stdout}"
    );
    // The run really went through restarts, drew every kind of fault, and both confirmed and
    // cancelled transactions: not a run that passes by testing nothing.
    assert!(stdout.contains("restarts: 8,"), "{stdout}");
    let faults = stdout.lines().find_map(|l| l.strip_prefix("faults injected: ")).unwrap();
    for kind in faults.split(';').next().unwrap().split(", ") {
        let n: u64 = kind.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n > 0, "no {kind} fault drawn:\n{stdout}");
    }
    let store = stdout.lines().find_map(|l| l.strip_prefix("coordinator store: ")).unwrap();
    let count = |what: &str| -> u64 {
        store.split(", ").find_map(|p| p.strip_suffix(what)).unwrap().trim().parse().unwrap()
    };
    assert!(count(" confirmed") > 0 && count(" cancelled") > 0, "{stdout}");
    // Some holds were released by the services themselves (the orphans'), and the checker found
    // none of them confirmed anywhere (0 violations above).
    let released = stdout
        .lines()
        .find_map(|l| l.strip_prefix("released by the services themselves at deadline + grace: "))
        .unwrap();
    let released: u64 = released.split(' ').next().unwrap().parse().unwrap();
    assert!(released > 0, "{stdout}");
    // Sagas ran both ways (all done, and turned back by the blocked account's refusal), and
    // messages both ways (sent, and aborted), all judged by the checker above.
    let number_before = |line: &str, what: &str| -> u64 {
        let (head, _) = line.split_once(what).unwrap();
        head.rsplit(|c: char| !c.is_ascii_digit()).find(|s| !s.is_empty()).unwrap().parse().unwrap()
    };
    let sagas = stdout.lines().find_map(|l| l.strip_prefix("sagas: ")).unwrap();
    assert!(
        number_before(sagas, " all done") > 0 && number_before(sagas, " all compensated") > 0,
        "{stdout}"
    );
    let messages = stdout.lines().find_map(|l| l.strip_prefix("messages: ")).unwrap();
    assert!(number_before(messages, " sent") > 0 && number_before(messages, " aborted") > 0, "{stdout}");
    assert!(number_before(messages, " e-mails in the outboxes") > 0, "{stdout}");
}
