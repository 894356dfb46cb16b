//! The demo is the README's first command: it must run to the end with every expectation met.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn the_demo_runs_every_scenario_and_the_ledger_balances() {
    let out = Command::new(env!("CARGO_BIN_EXE_travel-booking")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in [
        "1. A booking that succeeds",
        "2. The hotel is sold out",
        "3. The hotel goes down during confirm",
        "4. The coordinator is killed (SIGKILL)",
        "5. A rush: 200 customers",
        "Ledger check across both services",
        "all as expected",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
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
